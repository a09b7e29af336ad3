//! The benchmark of issue "fast and lean": one run on this machine's RabbitMQ and Redis and an
//! in-process Opsgenie stand-in, on its own exchange, queues and Redis prefix. It prints
//! figures and never fails on a time.
//!
//! 1. ceilings: a plain consumer (no work) drains N jobs, acking one by one at prefetch 256,
//!    then with one `multiple` ack every 64 deliveries at prefetch 64 and at prefetch 256;
//! 2. the HTTP floor: the worker's reqwest client alone sends N creates, then N creates each
//!    followed by its status read, 64 at a time on one thread (`floor`), and the CPU it spent;
//!    no worker can spend less per job and still send through reqwest;
//! 3. backlog drain: N jobs published first, then `opsgenie-worker run` at its defaults (and
//!    at prefetch 256, and with `--confirm off`), as a ratio to each ceiling, with the share
//!    of the worker's CPU spent in the kernel;
//! 4. latency at a steady rate, publish to the stand-in's receipt;
//! 5. CPU per 1,000 jobs of the worker and of the broker (beam.smp) and peak RSS of the
//!    worker, from /proc;
//! 6. at a real API's distance: the stand-in answers after `--api-latency`, and a backlog is
//!    drained at prefetch 64 and 256, against the ideal of prefetch / latency;
//! 7. the drain with 1, 2 and 4 replicas;
//! 8. a summary, as rows of the table in docs/performance.md.
//!
//! With `--soak DURATION` it runs only a soak instead: jobs published at a steady `--rate` for
//! that long to one worker (at its defaults, metrics endpoint on and never scraped) against a
//! stand-in `--soak-latency` away, with the worker's resident set (VmRSS, /proc) printed once a
//! minute and after every 100,000 jobs, and how far it moved from 100,000 to 1,000,000 jobs.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, ExchangeDeleteOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use opsgenie_standin::{StandIn, StandInConfig};
use opsgenie_worker::broker::Topology;
use opsgenie_worker::cli::{BrokerArgs, Delays, QueueType};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

mod floor;

#[derive(Debug, Parser)]
#[command(about = "Benchmarks opsgenie-worker against the broker's own consume-and-ack ceiling.")]
struct Args {
    /// Jobs per drain.
    #[arg(long, default_value_t = 30_000)]
    jobs: usize,
    /// Publish rate of the latency phase, jobs per second.
    #[arg(long, default_value_t = 1_000)]
    rate: u32,
    /// Length of the latency phase, seconds.
    #[arg(long, default_value_t = 20)]
    seconds: u64,
    /// Replica counts for the scaling drains, comma-separated ("" to skip them).
    #[arg(long, default_value = "1,2,4", value_parser = replica_counts)]
    replicas: ReplicaCounts,
    /// How long the stand-in takes to answer in the API-latency phase ("0" or "off" skips it).
    #[arg(long, default_value = "100ms", value_parser = api_latency)]
    api_latency: ApiLatency,
    /// Jobs per drain of the API-latency phase.
    #[arg(long, default_value_t = 3_000)]
    api_jobs: usize,
    /// Run only a soak of this length ("10m", "1h"): a steady `--rate` to one worker, its
    /// resident set printed once a minute and after every 100,000 jobs.
    #[arg(long, value_parser = humantime::parse_duration)]
    soak: Option<Duration>,
    /// How long the stand-in takes to answer during the soak ("0" or "off" for at once).
    #[arg(long, default_value = "20ms", value_parser = api_latency)]
    soak_latency: ApiLatency,
    /// The worker binary (default: opsgenie-worker beside this one).
    #[arg(long)]
    worker: Option<PathBuf>,
    #[arg(long, default_value = "amqp://guest:guest@127.0.0.1:5672/%2f")]
    amqp_url: String,
    #[arg(long, default_value = "redis://127.0.0.1:6379")]
    redis_url: String,
    /// Internal: run as the HTTP floor's child against this stand-in (see `floor`).
    #[arg(long, hide = true)]
    http_floor_child: Option<String>,
    /// Internal: the HTTP floor's child reads each request's status too.
    #[arg(long, hide = true)]
    floor_status: bool,
}

#[derive(Debug, Clone)]
struct ReplicaCounts(Vec<usize>);

fn replica_counts(text: &str) -> Result<ReplicaCounts, String> {
    text.split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(|t| match t.parse::<usize>() {
            Ok(n) if n > 0 => Ok(n),
            _ => Err(format!("\"{t}\" is not a replica count")),
        })
        .collect::<Result<Vec<_>, _>>()
        .map(ReplicaCounts)
}

#[derive(Debug, Clone, Copy)]
struct ApiLatency(Option<Duration>);

/// A duration as humantime reads it ("100ms", "1s", "1s 500ms"), or "0"/"off" for none.
fn api_latency(text: &str) -> Result<ApiLatency, String> {
    let text = text.trim();
    if text == "off" || text == "0" {
        return Ok(ApiLatency(None));
    }
    let latency = humantime::parse_duration(text)
        .map_err(|e| format!("\"{text}\" is not a latency (100ms, 1s, 0 or off): {e}"))?;
    Ok(ApiLatency(Some(latency).filter(|d| !d.is_zero())))
}

fn main() -> Result<()> {
    let args = Args::parse();
    let _ = rustls::crypto::ring::default_provider().install_default();
    if let Some(base_url) = &args.http_floor_child {
        return floor::child(base_url, args.jobs, args.floor_status);
    }
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(run(args))
}

async fn run(args: Args) -> Result<()> {
    let worker = match &args.worker {
        Some(w) => w.clone(),
        None => std::env::current_exe()?
            .parent()
            .context("bench has a directory")?
            .join("opsgenie-worker"),
    };
    if !worker.exists() {
        bail!(
            "{} is missing: build it first (cargo build --release -p opsgenie-worker)",
            worker.display()
        );
    }
    let run_id = uuid::Uuid::new_v4().simple().to_string()[..8].to_string();
    let dir = std::env::temp_dir().join(format!("opsgenie-bench-{run_id}"));
    std::fs::create_dir_all(&dir)?;
    let standin = StandIn::start(StandInConfig {
        record_bodies: false,
        ..StandInConfig::default()
    })
    .await?;
    let keyring = write_keyring(&dir.join("keyring.toml"), &standin)?;
    let connection = Connection::connect(&args.amqp_url, ConnectionProperties::default()).await?;
    let redis = {
        use fred::prelude::*;
        let client = Builder::from_config(Config::from_url(&args.redis_url)?).build()?;
        client.init().await?;
        client
    };
    let bench = Bench {
        args: &args,
        worker,
        keyring,
        dir: dir.clone(),
        run_id,
        connection,
        redis,
        standin,
    };
    if let Some(duration) = args.soak {
        println!(
            "opsgenie-worker soak: {} jobs/s for {}, {} cores, {}",
            args.rate,
            humantime::format_duration(duration),
            std::thread::available_parallelism().map_or(0, |n| n.get()),
            cpu_model()
        );
        let result = bench.soak(duration, bench.args.soak_latency.0).await;
        let _ = std::fs::remove_dir_all(&dir);
        return result;
    }
    println!(
        "opsgenie-worker benchmark: {} jobs per drain, {} cores, {}",
        args.jobs,
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        cpu_model()
    );
    let bodies = realistic_jobs(args.jobs, 7);
    let mean = bodies.iter().map(Vec::len).sum::<usize>() / bodies.len().max(1);
    println!("jobs: realistic issue alerts, mean body {mean} bytes\n");

    let broker = Broker::find();
    match broker.pids.as_slice() {
        [] => println!("broker: no beam.smp process found, so its CPU is not shown"),
        pids => println!(
            "broker: beam.smp pid {} (its CPU is read from /proc; anything else using the broker meanwhile is counted too)",
            pids.iter()
                .map(u32::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
    println!();
    let mut summary = Vec::new();

    let mut ceilings = Vec::new();
    for (label, short, prefetch, ack_every) in [
        ("one-by-one acks, prefetch 256", "one-by-one", 256, 1),
        (
            "`multiple` ack every 64, prefetch 64",
            "multiple/64 @64",
            64,
            64,
        ),
        (
            "`multiple` ack every 64, prefetch 256",
            "multiple/64 @256",
            256,
            64,
        ),
    ] {
        settle().await;
        let ceiling = bench.ceiling(&broker, &bodies, prefetch, ack_every).await?;
        println!(
            "ceiling (plain consumer, {label}, no work): {} msg/s; broker CPU {} per 1,000",
            thousands(ceiling.rate),
            ms(ceiling.broker_cpu_ms_per_1000)
        );
        summary.push(format!(
            "| ceiling, {label} | {} msg/s; broker CPU {} per 1,000 |",
            thousands(ceiling.rate),
            ms(ceiling.broker_cpu_ms_per_1000)
        ));
        ceilings.push(Ceiling {
            short,
            rate: ceiling.rate,
        });
    }

    settle().await;
    let floor = floor::measure(
        &std::env::current_exe()?,
        &bench.standin.base_url(),
        args.jobs,
    )?;
    println!(
        "HTTP floor (the worker's reqwest client alone, 64 requests at a time, one thread, nothing else): create {} per 1,000 jobs; create and status read {} per 1,000 jobs",
        ms(Some(floor.create_only)),
        ms(Some(floor.create_and_status))
    );
    summary.push(format!(
        "| HTTP floor, reqwest alone, CPU per 1,000 jobs | create {}; create and status read {} |",
        ms(Some(floor.create_only)),
        ms(Some(floor.create_and_status))
    ));

    for (label, phase, extra) in [
        ("defaults (prefetch 64)", "drain", &[][..]),
        ("prefetch 256", "drain256", &["--prefetch", "256"][..]),
        (
            "confirmation off (prefetch 64)",
            "drainnoconfirm",
            &["--confirm", "off"][..],
        ),
    ] {
        settle().await;
        let d = bench
            .drain(
                &bench.standin,
                &bench.keyring,
                &broker,
                phase,
                &bodies,
                1,
                extra,
            )
            .await?;
        println!(
            "backlog drain, {label}: {} jobs/s = {}; CPU per 1,000 jobs: worker {} ({} once every delivery is confirmed, {:.0}% of it in the kernel), broker {}; peak RSS {:.1} MiB",
            thousands(d.rate),
            ratios(d.rate, &ceilings),
            ms(Some(d.cpu_ms_per_1000)),
            ms(d.confirmed_cpu_ms_per_1000),
            d.system_share * 100.0,
            ms(d.broker_cpu_ms_per_1000),
            d.peak_rss_mib
        );
        summary.push(format!(
            "| backlog drain, {label} | {} jobs/s = {} |",
            thousands(d.rate),
            ratios(d.rate, &ceilings)
        ));
        summary.push(format!(
            "| CPU per 1,000 jobs, {label} | worker {} ({} with confirmations, {:.0}% kernel), broker {} |",
            ms(Some(d.cpu_ms_per_1000)),
            ms(d.confirmed_cpu_ms_per_1000),
            d.system_share * 100.0,
            ms(d.broker_cpu_ms_per_1000)
        ));
        summary.push(format!("| peak RSS, {label} | {:.1} MiB |", d.peak_rss_mib));
    }

    settle().await;
    let latency = bench.latency().await?;
    println!(
        "latency at {} jobs/s for {} s (publish -> stand-in receipt): p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms ({} jobs)",
        args.rate, args.seconds, latency.p50, latency.p99, latency.max, latency.count
    );
    summary.push(format!(
        "| latency at {} jobs/s | p50 {:.1} ms, p99 {:.1} ms, max {:.0} ms |",
        thousands(f64::from(args.rate)),
        latency.p50,
        latency.p99,
        latency.max
    ));

    if let ApiLatency(Some(delay)) = args.api_latency {
        settle().await;
        summary.extend(bench.api_distance(&broker, delay).await?);
    }

    for &replicas in &args.replicas.0 {
        settle().await;
        let r = bench
            .drain(
                &bench.standin,
                &bench.keyring,
                &broker,
                &format!("replicas{replicas}"),
                &bodies,
                replicas,
                &[],
            )
            .await?;
        let label = format!(
            "drain with {replicas} replica{}",
            if replicas == 1 { "" } else { "s" }
        );
        println!(
            "{label}: {} jobs/s = {}; CPU per 1,000 jobs: workers {}, broker {}",
            thousands(r.rate),
            ratios(r.rate, &ceilings),
            ms(Some(r.cpu_ms_per_1000)),
            ms(r.broker_cpu_ms_per_1000)
        );
        summary.push(format!(
            "| {label} | {} jobs/s = {} |",
            thousands(r.rate),
            ratios(r.rate, &ceilings)
        ));
    }

    println!("\nsummary ({} jobs per drain):\n", args.jobs);
    println!("| | figure |\n| --- | --- |");
    for line in &summary {
        println!("{line}");
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

struct Bench<'a> {
    args: &'a Args,
    worker: PathBuf,
    keyring: PathBuf,
    dir: PathBuf,
    run_id: String,
    connection: Connection,
    /// The machine's Redis, to watch the phases' pending confirmations and remove their keys.
    redis: fred::prelude::Client,
    standin: StandIn,
}

struct DrainResult {
    rate: f64,
    cpu_ms_per_1000: f64,
    /// The workers' CPU once every delivery of the drain is confirmed as well (the same as
    /// `cpu_ms_per_1000` with confirmation off); `None` when they did not finish within a
    /// minute.
    confirmed_cpu_ms_per_1000: Option<f64>,
    /// From the last answer until no confirmation of the drain was left pending (each is
    /// first asked about a second after its delivery); `None` when some still were a minute
    /// later.
    confirmed_after: Option<Duration>,
    /// The share of the workers' CPU spent in the kernel (system time), once confirmed.
    system_share: f64,
    broker_cpu_ms_per_1000: Option<f64>,
    peak_rss_mib: f64,
    /// From the workers' start to the stand-in's first 2xx answer.
    first_answer: Duration,
    /// From the workers' start to the last answer.
    elapsed: Duration,
}

struct CeilingResult {
    rate: f64,
    broker_cpu_ms_per_1000: Option<f64>,
}

/// A ceiling's rate, for the ratios of the drains.
struct Ceiling {
    short: &'static str,
    rate: f64,
}

struct Latency {
    p50: f64,
    p99: f64,
    max: f64,
    count: usize,
}

impl Bench<'_> {
    fn topology(&self, phase: &str) -> Topology {
        let broker = BrokerArgs {
            amqp_url: self.args.amqp_url.clone(),
            exchange: format!("bench.{}.{phase}", self.run_id),
            queue: format!("bench.{}.{phase}.alerts", self.run_id),
            routing_key: "alert".into(),
            queue_type: QueueType::Classic,
            retry_delays: Delays(vec![Duration::from_secs(5), Duration::from_secs(30)]),
        };
        Topology::new(&broker)
    }

    async fn channel(&self) -> Result<Channel> {
        let channel = self.connection.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        Ok(channel)
    }

    /// The broker's own rate: publish the jobs to a plain queue, then consume them at
    /// `prefetch` and ack them one by one (`ack_every` 1) or with one `multiple` ack every
    /// `ack_every` deliveries (and one for the rest at the end).
    async fn ceiling(
        &self,
        broker: &Broker,
        bodies: &[Vec<u8>],
        prefetch: u16,
        ack_every: usize,
    ) -> Result<CeilingResult> {
        let channel = self.channel().await?;
        let queue = format!("bench.{}.ceiling{prefetch}x{ack_every}", self.run_id);
        channel
            .queue_declare(
                queue.as_str().into(),
                QueueDeclareOptions {
                    durable: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await?;
        publish_all(&channel, "", &queue, bodies).await?;
        channel
            .basic_qos(prefetch, BasicQosOptions::default())
            .await?;
        let mut consumer = channel
            .basic_consume(
                queue.as_str().into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        let broker_before = broker.cpu_seconds();
        let started = Instant::now();
        let mut received = 0;
        while received < bodies.len() {
            let delivery = consumer.next().await.context("consumer ended")??;
            received += 1;
            if ack_every <= 1 {
                delivery.ack(BasicAckOptions::default()).await?;
            } else if received % ack_every == 0 || received == bodies.len() {
                delivery.ack(BasicAckOptions { multiple: true }).await?;
            }
        }
        let elapsed = started.elapsed().as_secs_f64();
        let broker_cpu = broker_before.zip(broker.cpu_seconds()).map(|(b, a)| a - b);
        channel
            .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
            .await?;
        let _ = channel.close(200, "done".into()).await;
        Ok(CeilingResult {
            rate: received as f64 / elapsed,
            broker_cpu_ms_per_1000: broker_cpu.map(|c| per_1000(c, received)),
        })
    }

    fn spawn_worker(
        &self,
        topology: &Topology,
        phase: &str,
        keyring: &Path,
        extra: &[&str],
    ) -> Result<Child> {
        let log = std::fs::File::create(
            self.dir
                .join(format!("{phase}-{}.log", uuid::Uuid::new_v4().simple())),
        )?;
        // On, as by default, so that the metrics' cost per job is counted; on a port of its
        // own (the system picks it), as replicas run side by side.
        let metrics: &[&str] = if extra.contains(&"--metrics-addr") {
            &[]
        } else {
            &["--metrics-addr", "127.0.0.1:0"]
        };
        Command::new(&self.worker)
            .arg("run")
            .args([
                "--amqp-url",
                &self.args.amqp_url,
                "--redis-url",
                &self.args.redis_url,
            ])
            .args(["--exchange", &topology.exchange, "--queue", &topology.queue])
            .args(["--retry-delays", "5s,30s"])
            .args(["--redis-prefix", &format!("bench:{}:{phase}:", self.run_id)])
            .arg("--keyring")
            .arg(keyring)
            .args(metrics)
            .args(["--log-format", "json"])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("start opsgenie-worker")
    }

    /// Publishes the backlog, starts `replicas` workers, and times until `standin` has
    /// counted every job.
    #[allow(clippy::too_many_arguments)]
    async fn drain(
        &self,
        standin: &StandIn,
        keyring: &Path,
        broker: &Broker,
        phase: &str,
        bodies: &[Vec<u8>],
        replicas: usize,
        extra: &[&str],
    ) -> Result<DrainResult> {
        let topology = self.topology(phase);
        let channel = self.channel().await?;
        topology.declare(&channel).await?;
        publish_all(&channel, &topology.exchange, &topology.routing_key, bodies).await?;
        let base = standin.delivered();
        let target = base + bodies.len() as u64;
        let broker_before = broker.cpu_seconds();
        let started = Instant::now();
        let mut workers = Vec::new();
        for _ in 0..replicas {
            workers.push(self.spawn_worker(&topology, phase, keyring, extra)?);
        }
        let mut done = standin
            .wait_for_delivered(base + 1, Duration::from_secs(600))
            .await;
        let first_answer = started.elapsed();
        if done {
            done = standin
                .wait_for_delivered(target, Duration::from_secs(600))
                .await;
        }
        let elapsed = started.elapsed();
        let broker_cpu = broker_before.zip(broker.cpu_seconds()).map(|(b, a)| a - b);
        let cpu: f64 = workers.iter().map(|w| cpu_seconds(w.id())).sum();
        // The confirmations trail the deliveries (each is asked about a second or more after
        // its 202): their cost is counted once none is left pending.
        let confirmed = done && self.confirmations_settled(phase).await;
        let confirmed_after = confirmed.then(|| started.elapsed().saturating_sub(elapsed));
        let (confirmed_cpu, system_cpu) = workers
            .iter()
            .map(|w| cpu_split(w.id()))
            .fold((0.0, 0.0), |(all, system), (u, s)| {
                (all + u + s, system + s)
            });
        let rss = workers
            .iter()
            .map(|w| peak_rss_mib(w.id()))
            .fold(0.0, f64::max);
        for mut w in workers {
            stop(&mut w);
        }
        self.remove(&channel, &topology, phase).await;
        let _ = channel.close(200, "done".into()).await;
        if !done {
            bail!(
                "{phase}: the stand-in counted {} of {}",
                standin.delivered() - base,
                bodies.len()
            );
        }
        Ok(DrainResult {
            rate: bodies.len() as f64 / elapsed.as_secs_f64(),
            cpu_ms_per_1000: per_1000(cpu, bodies.len()),
            confirmed_cpu_ms_per_1000: confirmed.then(|| per_1000(confirmed_cpu, bodies.len())),
            confirmed_after,
            system_share: if confirmed_cpu > 0.0 {
                system_cpu / confirmed_cpu
            } else {
                0.0
            },
            broker_cpu_ms_per_1000: broker_cpu.map(|c| per_1000(c, bodies.len())),
            peak_rss_mib: rss,
            first_answer,
            elapsed,
        })
    }

    /// Waits (up to a minute) until the phase's workers have no confirmation pending; false
    /// when some still are.
    async fn confirmations_settled(&self, phase: &str) -> bool {
        let key = format!("bench:{}:{phase}:confirm:due", self.run_id);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let pending: Option<u64> = fred::prelude::SortedSetsInterface::zcard(&self.redis, &key)
                .await
                .ok();
            if pending == Some(0) {
                return true;
            }
            if Instant::now() > deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// At a real API's distance: a stand-in that answers after `delay`, a backlog of
    /// `--api-jobs` drained at prefetch 64 and 256. With every prefetched job in flight the
    /// ideal is prefetch / delay. The clock starts when the first request went out (the first
    /// answer less the delay), so the worker's start-up is left out. Returns summary rows.
    async fn api_distance(&self, broker: &Broker, delay: Duration) -> Result<Vec<String>> {
        let standin = StandIn::start(StandInConfig {
            record_bodies: false,
            delay: Some(delay),
            ..StandInConfig::default()
        })
        .await?;
        let keyring = write_keyring(&self.dir.join("keyring-api.toml"), &standin)?;
        let delay_ms = delay.as_secs_f64() * 1000.0;
        let probe = concurrent_probe(standin.addr(), 256).await?;
        println!(
            "stand-in answering after {delay_ms:.0} ms: 256 concurrent requests all answered in {:.0} ms{}",
            probe.as_secs_f64() * 1000.0,
            if probe < delay * 2 {
                " (side by side)"
            } else {
                " (NOT side by side: the figures below understate the worker)"
            }
        );
        let bodies = realistic_jobs(self.args.api_jobs, 13);
        let mut rows = Vec::new();
        for prefetch in [64_u16, 256] {
            settle().await;
            let prefetch_text = prefetch.to_string();
            let d = self
                .drain(
                    &standin,
                    &keyring,
                    broker,
                    &format!("api{prefetch}"),
                    &bodies,
                    1,
                    &["--prefetch", &prefetch_text],
                )
                .await?;
            let clocked = d
                .elapsed
                .saturating_sub(d.first_answer.saturating_sub(delay));
            let rate = bodies.len() as f64 / clocked.as_secs_f64();
            let ideal = f64::from(prefetch) / delay.as_secs_f64();
            println!(
                "API {delay_ms:.0} ms away, prefetch {prefetch}: {} jobs/s = {:.2} x the ideal {} (prefetch / latency); first answer {:.0} ms after start; every delivery confirmed {} after the last answer; CPU per 1,000 jobs: worker {}, broker {}; peak RSS {:.1} MiB",
                thousands(rate),
                rate / ideal,
                thousands(ideal),
                d.first_answer.as_secs_f64() * 1000.0,
                confirmed_after(d.confirmed_after),
                ms(Some(d.cpu_ms_per_1000)),
                ms(d.broker_cpu_ms_per_1000),
                d.peak_rss_mib
            );
            rows.push(format!(
                "| API {delay_ms:.0} ms away, prefetch {prefetch} | {} jobs/s = {:.2} x the ideal {}; confirmed {} after the last answer; peak RSS {:.1} MiB |",
                thousands(rate),
                rate / ideal,
                thousands(ideal),
                confirmed_after(d.confirmed_after),
                d.peak_rss_mib
            ));
        }
        let _ = standin.shutdown().await;
        Ok(rows)
    }

    /// Publishes at a steady rate to a running worker; each job's publish time is matched
    /// with the stand-in's receipt through its notification_uuid.
    async fn latency(&self) -> Result<Latency> {
        let standin = StandIn::start(StandInConfig::default()).await?;
        let keyring = write_keyring(&self.dir.join("keyring-latency.toml"), &standin)?;
        let topology = self.topology("latency");
        let channel = self.channel().await?;
        topology.declare(&channel).await?;
        let mut worker = self.spawn_worker(&topology, "latency", &keyring, &[])?;
        // Wait until the worker consumes: one job through before the clock starts.
        let warm = realistic_jobs(1, 99);
        publish_all(&channel, &topology.exchange, &topology.routing_key, &warm).await?;
        standin.wait_for_delivered(1, Duration::from_secs(30)).await;

        let total = (self.args.rate as u64 * self.args.seconds) as usize;
        let bodies = realistic_jobs(total, 11);
        let mut sent_at: std::collections::HashMap<String, u64> =
            std::collections::HashMap::with_capacity(total);
        let interval = Duration::from_secs_f64(1.0 / f64::from(self.args.rate));
        let start = tokio::time::Instant::now();
        let mut publisher =
            Confirmed::new(channel.clone(), &topology.exchange, &topology.routing_key);
        for (i, body) in bodies.iter().enumerate() {
            tokio::time::sleep_until(start + interval * i as u32).await;
            let uuid = uuid_of(body);
            sent_at.insert(uuid, now_us());
            publisher.publish(body).await?;
        }
        publisher.finish().await?;
        standin
            .wait_for_delivered(total as u64 + 1, Duration::from_secs(120))
            .await;
        let mut samples: Vec<f64> = standin
            .requests()
            .iter()
            .filter_map(|r| {
                let uuid = r
                    .body
                    .split("notification_uuid=")
                    .nth(1)?
                    .split('"')
                    .next()?;
                let sent = sent_at.get(uuid)?;
                Some((r.received_at_ms as f64 * 1000.0 - *sent as f64).max(0.0) / 1000.0)
            })
            .collect();
        stop(&mut worker);
        self.remove(&channel, &topology, "latency").await;
        samples.sort_by(f64::total_cmp);
        if samples.is_empty() {
            bail!("latency: no sample matched");
        }
        let pick = |q: f64| samples[((samples.len() - 1) as f64 * q).round() as usize];
        Ok(Latency {
            p50: pick(0.5),
            p99: pick(0.99),
            max: pick(1.0),
            count: samples.len(),
        })
    }

    /// The soak: one worker at its defaults (its metrics endpoint on, and never scraped, as
    /// where nobody runs Prometheus), jobs published at a steady `--rate` for `duration`
    /// against a stand-in `delay` away. Prints the worker's VmRSS once a minute and after
    /// every 100,000 jobs, then the change from 100,000 to 1,000,000 jobs (or to the last
    /// 100,000 mark reached).
    async fn soak(&self, duration: Duration, delay: Option<Duration>) -> Result<()> {
        const MARK: u64 = 100_000;
        const TARGET: u64 = 1_000_000;
        let standin = StandIn::start(StandInConfig {
            record_bodies: false,
            delay,
            ..StandInConfig::default()
        })
        .await?;
        let keyring = write_keyring(&self.dir.join("keyring-soak.toml"), &standin)?;
        let topology = self.topology("soak");
        let channel = self.channel().await?;
        topology.declare(&channel).await?;
        let metrics_addr = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .to_string();
        // Short-lived dedupe markers and a short stream, so that the shared Redis does not
        // hold a million of each; neither changes what the worker keeps in its own memory.
        let mut worker = self.spawn_worker(
            &topology,
            "soak",
            &keyring,
            &[
                "--metrics-addr",
                &metrics_addr,
                "--dedupe-ttl",
                "120",
                "--stream-maxlen",
                "10000",
            ],
        )?;
        let pid = worker.id();
        let warm = realistic_jobs(1, 98);
        let warmed =
            match publish_all(&channel, &topology.exchange, &topology.routing_key, &warm).await {
                Ok(()) => standin.wait_for_delivered(1, Duration::from_secs(30)).await,
                Err(_) => false,
            };
        if !warmed {
            stop(&mut worker);
            self.remove(&channel, &topology, "soak").await;
            bail!("soak: the worker did not deliver its first job within 30 s");
        }
        let base = standin.delivered();
        let total = (f64::from(self.args.rate) * duration.as_secs_f64()) as u64;
        println!(
            "stand-in answering after {} ms; worker pid {pid}, metrics on {metrics_addr} (not scraped); {} jobs to publish",
            delay.map_or(0, |d| d.as_millis()),
            thousands(total as f64)
        );
        println!(
            "start: VmRSS {:.2} MiB",
            read_status_kib(pid, "VmRSS:") / 1024.0
        );

        let publisher = {
            let mut publisher =
                Confirmed::new(channel.clone(), &topology.exchange, &topology.routing_key);
            let rate = self.args.rate;
            tokio::spawn(async move {
                let mut rng = StdRng::seed_from_u64(17);
                let interval = Duration::from_secs_f64(1.0 / f64::from(rate));
                let start = tokio::time::Instant::now();
                for i in 0..total {
                    tokio::time::sleep_until(start + interval.mul_f64(i as f64)).await;
                    publisher.publish(&realistic_job(&mut rng)).await?;
                }
                publisher.finish().await
            })
        };

        let started = Instant::now();
        let mut marks: Vec<(u64, f64)> = Vec::new();
        let mut next_minute = Duration::from_secs(60);
        let mut last_done = 0;
        let mut stalled_since = Instant::now();
        let finished = loop {
            tokio::time::sleep(Duration::from_millis(20)).await;
            let done = standin.delivered() - base;
            let rss = read_status_kib(pid, "VmRSS:") / 1024.0;
            if rss == 0.0 {
                break Err(anyhow::anyhow!("soak: the worker exited after {done} jobs"));
            }
            let next_mark = (marks.len() as u64 + 1) * MARK;
            if done >= next_mark {
                println!(
                    "after {} jobs: VmRSS {rss:.2} MiB ({:.0} s)",
                    thousands(next_mark as f64),
                    started.elapsed().as_secs_f64()
                );
                marks.push((next_mark, rss));
            }
            if started.elapsed() >= next_minute {
                println!(
                    "minute {}: {} jobs, VmRSS {rss:.2} MiB",
                    next_minute.as_secs() / 60,
                    thousands(done as f64)
                );
                next_minute += Duration::from_secs(60);
            }
            if done >= total {
                break Ok(());
            }
            if done != last_done {
                last_done = done;
                stalled_since = Instant::now();
            } else if stalled_since.elapsed() > Duration::from_secs(60) {
                break Err(anyhow::anyhow!(
                    "soak: no job delivered for 60 s, {done} of {total} done"
                ));
            }
        };
        let elapsed = started.elapsed().as_secs_f64();
        let rss_end = read_status_kib(pid, "VmRSS:") / 1024.0;
        let peak = peak_rss_mib(pid);
        stop(&mut worker);
        let published = publisher.await;
        self.remove(&channel, &topology, "soak").await;
        let _ = channel.close(200, "done".into()).await;
        let _ = standin.shutdown().await;
        finished?;
        published??;
        println!(
            "end: {} jobs in {elapsed:.0} s ({} jobs/s), VmRSS {rss_end:.2} MiB, peak (VmHWM) {peak:.2} MiB",
            thousands(total as f64),
            thousands(total as f64 / elapsed)
        );
        match (
            marks.first(),
            marks.iter().find(|(n, _)| *n == TARGET).or(marks.last()),
        ) {
            (Some((first_n, first)), Some((n, last))) if n > first_n => println!(
                "VmRSS after {} jobs minus after {}: {:+.2} MiB ({:+.1} bytes per job)",
                thousands(*n as f64),
                thousands(*first_n as f64),
                last - first,
                (last - first) * 1024.0 * 1024.0 / (n - first_n) as f64
            ),
            _ => println!("(fewer than 200,000 jobs: no difference to show)"),
        }
        Ok(())
    }

    async fn remove(&self, channel: &Channel, topology: &Topology, phase: &str) {
        for q in topology.queue_names() {
            let _ = channel
                .queue_delete(q.into(), QueueDeleteOptions::default())
                .await;
        }
        let _ = channel
            .exchange_delete(
                topology.exchange.as_str().into(),
                ExchangeDeleteOptions::default(),
            )
            .await;
        // Deleted in slices, so that a phase's many keys never make one oversized command.
        let _: Result<i64, _> = fred::prelude::LuaInterface::eval(
            &self.redis,
            "local k = redis.call('KEYS', ARGV[1]) for i=1,#k,500 do redis.call('DEL', unpack(k, i, math.min(i+499, #k))) end return #k",
            Vec::<String>::new(),
            vec![format!("bench:{}:{phase}:*", self.run_id)],
        )
        .await;
    }
}

/// The RabbitMQ server's processes (beam.smp), found by name in /proc.
struct Broker {
    pids: Vec<u32>,
}

impl Broker {
    fn find() -> Broker {
        let mut pids: Vec<u32> = std::fs::read_dir("/proc")
            .map(|entries| {
                entries
                    .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
                    .filter(|pid| {
                        std::fs::read_to_string(format!("/proc/{pid}/comm"))
                            .is_ok_and(|comm| comm.trim() == "beam.smp")
                    })
                    .collect()
            })
            .unwrap_or_default();
        pids.sort_unstable();
        Broker { pids }
    }

    /// User plus system CPU of the broker's processes (threads included), seconds; None when
    /// there is no broker process to read.
    fn cpu_seconds(&self) -> Option<f64> {
        (!self.pids.is_empty()).then(|| self.pids.iter().map(|&pid| cpu_seconds(pid)).sum())
    }
}

/// Opens `n` connections to `addr`, sends one request on each at once, and returns the time
/// until every answer is read: about one delay when the server answers them side by side.
async fn concurrent_probe(addr: std::net::SocketAddr, n: usize) -> Result<Duration> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let started = Instant::now();
    let requests = (0..n).map(|_| async move {
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        // Not an API route: answered 404 after the delay, and not counted as delivered.
        stream
            .write_all(b"GET /_probe HTTP/1.1\r\nHost: standin\r\nConnection: close\r\n\r\n")
            .await?;
        let mut answer = Vec::new();
        stream.read_to_end(&mut answer).await?;
        anyhow::ensure!(answer.starts_with(b"HTTP/1.1 "), "no HTTP answer");
        Ok::<_, anyhow::Error>(())
    });
    for result in futures_util::future::join_all(requests).await {
        result.context("probe the stand-in")?;
    }
    Ok(started.elapsed())
}

/// How long after the last answer every delivery was confirmed, for a line of output.
fn confirmed_after(after: Option<Duration>) -> String {
    after.map_or_else(
        || "more than a minute".to_owned(),
        |d| format!("{:.1} s", d.as_secs_f64()),
    )
}

/// CPU milliseconds per 1,000 jobs.
fn per_1000(cpu_seconds: f64, jobs: usize) -> f64 {
    cpu_seconds * 1000.0 / (jobs as f64 / 1000.0)
}

fn ms(value: Option<f64>) -> String {
    value.map_or_else(|| "n/a".to_string(), |v| format!("{v:.1} ms"))
}

/// 12345.6 as "12,346".
fn thousands(value: f64) -> String {
    let digits = format!("{:.0}", value.max(0.0));
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// "0.52 x one-by-one, 0.17 x multiple/64 @64, ..." for a drain's rate.
fn ratios(rate: f64, ceilings: &[Ceiling]) -> String {
    ceilings
        .iter()
        .map(|c| format!("{:.2} x {}", rate / c.rate, c.short))
        .collect::<Vec<_>>()
        .join(", ")
}

/// A keyring whose one team, `backend`, is served by `standin`.
fn write_keyring(path: &Path, standin: &StandIn) -> Result<PathBuf> {
    std::fs::write(
        path,
        format!(
            "[[team]]\nid = \"backend\"\nintegration_key = \"bench-key\"\napi_url = \"{}\"\n",
            standin.base_url()
        ),
    )?;
    Ok(path.to_path_buf())
}

fn job_properties() -> BasicProperties {
    BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type("application/json".into())
}

async fn publish_all(
    channel: &Channel,
    exchange: &str,
    routing_key: &str,
    bodies: &[Vec<u8>],
) -> Result<()> {
    let mut publisher = Confirmed::new(channel.clone(), exchange, routing_key);
    for body in bodies {
        publisher.publish(body).await?;
    }
    publisher.finish().await
}

/// Publishes jobs with publisher confirms, awaiting them a batch at a time, so that the broker
/// is never more than a batch behind; a job the broker refuses is an error.
struct Confirmed {
    channel: Channel,
    exchange: String,
    routing_key: String,
    waiting: Vec<lapin::PublisherConfirm>,
}

impl Confirmed {
    const BATCH: usize = 1024;

    fn new(channel: Channel, exchange: &str, routing_key: &str) -> Confirmed {
        Confirmed {
            channel,
            exchange: exchange.to_owned(),
            routing_key: routing_key.to_owned(),
            waiting: Vec::with_capacity(Self::BATCH),
        }
    }

    async fn publish(&mut self, body: &[u8]) -> Result<()> {
        let confirm = self
            .channel
            .basic_publish(
                self.exchange.as_str().into(),
                self.routing_key.as_str().into(),
                BasicPublishOptions::default(),
                body,
                job_properties(),
            )
            .await?;
        self.waiting.push(confirm);
        if self.waiting.len() >= Self::BATCH {
            self.confirm_waiting().await?;
        }
        Ok(())
    }

    async fn confirm_waiting(&mut self) -> Result<()> {
        for confirm in self.waiting.drain(..) {
            if !confirm.await?.is_ack() {
                bail!("the broker refused a job");
            }
        }
        Ok(())
    }

    async fn finish(mut self) -> Result<()> {
        self.confirm_waiting().await
    }
}

/// Issue alerts shaped like real ones: a group, a few tags, a rule or two, ~1 KiB.
fn realistic_jobs(n: usize, seed: u64) -> Vec<Vec<u8>> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n).map(|_| realistic_job(&mut rng)).collect()
}

fn realistic_job(rng: &mut StdRng) -> Vec<u8> {
    let errors = [
        ("ZeroDivisionError: division by zero", "app.views.divide"),
        ("KeyError: 'user_id'", "app.api.users.get_user"),
        (
            "TimeoutError: upstream request timed out after 30s",
            "app.clients.billing.charge",
        ),
        (
            "TypeError: Cannot read properties of undefined (reading 'map')",
            "src/components/List.tsx",
        ),
    ];
    let (title, culprit) = errors[rng.random_range(0..errors.len())];
    let group: u64 = rng.random_range(1..5_000_000);
    let tags: Vec<[String; 2]> = vec![
        ["level".into(), "error".into()],
        ["environment".into(), "production".into()],
        [
            "release".into(),
            format!(
                "api@1.{}.{}",
                rng.random_range(0..40),
                rng.random_range(0..10)
            ),
        ],
        [
            "server_name".into(),
            format!("web-{}", rng.random_range(1..64)),
        ],
        ["browser".into(), "Chrome 131.0, Safari 18".into()],
        [
            "transaction".into(),
            "/api/0/organizations/{organization_slug}/issues/".into(),
        ],
    ];
    serde_json::json!({
        "version": 1,
        "kind": "issue_alert",
        "notification_uuid": uuid::Uuid::new_v4().to_string(),
        "team_id": "backend",
        "priority": "P2",
        "organization": {"id": 1, "slug": "acme", "url": "https://acme.sentry.io"},
        "project": {"id": 7, "slug": "api", "name": "API"},
        "group": {"id": group, "title": title, "culprit": culprit, "logger": "", "level": "error"},
        "event": {"event_id": uuid::Uuid::new_v4().simple().to_string(), "message": "", "title": title,
                  "release": "api@1.4.2", "tags": tags},
        "rules": [{"id": 17, "label": "Errors in prod"}, {"id": 23, "label": "High volume"}]
    })
    .to_string()
    .into_bytes()
}

fn uuid_of(body: &[u8]) -> String {
    serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v["notification_uuid"].as_str().map(str::to_string))
        .unwrap_or_default()
}

/// Waits (up to 30 s) until the machine is mostly idle again: after a phase the broker goes
/// on compacting its message store for a while, which would be charged to the next phase.
async fn settle() {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        let before = cpu_times();
        tokio::time::sleep(Duration::from_millis(500)).await;
        let after = cpu_times();
        let (busy, idle) = (after.0 - before.0, after.1 - before.1);
        if busy + idle > 0 && idle * 4 >= (busy + idle) * 3 {
            return;
        }
    }
    println!("(the machine stayed busy for 30 s before the next phase; its figures are noisier)");
}

/// Busy and idle jiffies of the whole machine, from /proc/stat.
fn cpu_times() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let fields: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal
    let idle = fields.get(3).copied().unwrap_or(0) + fields.get(4).copied().unwrap_or(0);
    let busy = fields.iter().take(8).sum::<u64>().saturating_sub(idle);
    (busy, idle)
}

fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// User plus system CPU of a process, from /proc/<pid>/stat.
fn cpu_seconds(pid: u32) -> f64 {
    let (user, system) = cpu_split(pid);
    user + system
}

/// User and system CPU of a process, seconds, from /proc/<pid>/stat.
fn cpu_split(pid: u32) -> (f64, f64) {
    // Asked before the read, so that the first call's work stays outside a measured span
    // that starts with this read.
    let hz = clock_ticks();
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return (0.0, 0.0);
    };
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    (ticks(11) / hz, ticks(12) / hz)
}

/// The kernel's clock ticks per second, asked once.
fn clock_ticks() -> f64 {
    static HZ: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *HZ.get_or_init(|| {
        // SAFETY: sysconf reads a constant of the running kernel and has no preconditions.
        let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
        if ticks > 0 { ticks as f64 } else { 100.0 }
    })
}

/// VmHWM (peak resident set) of a process, MiB.
fn peak_rss_mib(pid: u32) -> f64 {
    read_status_kib(pid, "VmHWM:") / 1024.0
}

fn read_status_kib(pid: u32, field: &str) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0.0)
}

fn stop(child: &mut Child) {
    if let Ok(pid) = libc::pid_t::try_from(child.id()) {
        // SAFETY: kill has no memory preconditions; the pid is our own child's, not yet waited for.
        unsafe { libc::kill(pid, libc::SIGTERM) };
    }
    for _ in 0..500 {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = child.kill();
    let _ = child.wait();
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, m)| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into())
}

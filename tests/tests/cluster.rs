//! A three-node RabbitMQ cluster (started by `tests/rabbitmq-cluster.sh` beside the machine's
//! own broker) and a worker on a quorum queue given all three node URLs: the node the worker
//! is connected to is killed with SIGKILL mid-stream, then the queue's leader. Every job is
//! delivered, the jobs handled twice stay within what was in flight (the prefetch) and are
//! reported, and the deliveries stream holds every job once.
//!
//! It takes a minute or two (three nodes start, one restarts), so it is ignored by the
//! workspace's test command and run on its own:
//! `cargo test -p opsgenie-e2e --test cluster -- --ignored` (`.ci/run` does). The other test
//! here, a first node that refuses, needs only the machine's broker and runs with the rest.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use lapin::BasicProperties;
use lapin::options::ConfirmSelectOptions;
use opsgenie_e2e::fixtures::*;
use opsgenie_e2e::*;
use opsgenie_shared::{AlertJob, build_request};
use opsgenie_worker::cli::QueueType;
use serde_json::Value;

/// Generous: three Erlang nodes share two cores with everything else.
const SLOW: Duration = Duration::from_secs(240);
const PREFETCH: u16 = 32;
const TEAM: &str = "backend";

/// The cluster of `tests/rabbitmq-cluster.sh`; every node is killed and its directory removed
/// when dropped, whatever happened.
struct Cluster {
    dir: PathBuf,
    env: HashMap<String, String>,
}

fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("rabbitmq-cluster.sh")
}

async fn run_script(args: &[&str]) -> Result<String, String> {
    let out = tokio::process::Command::new(script())
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .map_err(|e| format!("cannot run the cluster script: {e}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if out.status.success() {
        Ok(stdout)
    } else {
        Err(format!(
            "{args:?} failed: {}\n{stdout}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

impl Cluster {
    async fn start(name: &str) -> Cluster {
        let dir = std::env::temp_dir().join(format!(
            "og-cluster-{name}-{}",
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        ));
        // Owned before the start, so that a half-started cluster is torn down too.
        let mut cluster = Cluster {
            dir,
            env: HashMap::new(),
        };
        let dir = cluster.dir_str();
        if let Err(error) = run_script(&["start", &dir]).await {
            panic!("the cluster did not start: {error}");
        }
        let text = std::fs::read_to_string(cluster.dir.join("cluster.env")).expect("cluster.env");
        cluster.env = text
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        cluster
    }

    fn dir_str(&self) -> String {
        self.dir.to_str().expect("a UTF-8 temp dir").to_string()
    }

    fn urls(&self) -> String {
        self.env["URLS"].clone()
    }

    fn port(&self, n: usize) -> u16 {
        self.env[&format!("PORT{n}")].parse().expect("a port")
    }

    fn node(&self, n: usize) -> &str {
        &self.env[&format!("NODE{n}")]
    }

    fn number_of(&self, node: &str) -> Option<usize> {
        (1..=3).find(|n| self.node(*n) == node)
    }

    async fn ctl(&self, n: usize, args: &[&str]) -> Result<String, String> {
        let dir = self.dir_str();
        let n = n.to_string();
        let mut all = vec!["ctl", &dir, &n];
        all.extend_from_slice(args);
        run_script(&all).await
    }

    async fn kill(&self, n: usize) {
        let dir = self.dir_str();
        run_script(&["kill", &dir, &n.to_string()])
            .await
            .expect("SIGKILL the node");
    }

    async fn restart(&self, n: usize) {
        let dir = self.dir_str();
        run_script(&["restart", &dir, &n.to_string()])
            .await
            .expect("restart the node");
    }

    /// The node (1..3) a connection named `name` is on, asked of node `via`.
    async fn connection_node(&self, via: usize, name: &str) -> Option<usize> {
        let out = self
            .ctl(
                via,
                &[
                    "list_connections",
                    "port",
                    "client_properties",
                    "--formatter",
                    "json",
                ],
            )
            .await
            .ok()?;
        let rows: Vec<Value> = serde_json::from_str(&out).ok()?;
        let port = rows
            .iter()
            .find(|r| r["client_properties"].to_string().contains(name))?["port"]
            .as_u64()?;
        (1..=3).find(|n| u64::from(self.port(*n)) == port)
    }

    /// The node (1..3) that leads quorum queue `queue`, asked of node `via`.
    async fn leader(&self, via: usize, queue: &str) -> Option<usize> {
        let out = self
            .ctl(
                via,
                &["list_queues", "name", "leader", "--formatter", "json"],
            )
            .await
            .ok()?;
        let rows: Vec<Value> = serde_json::from_str(&out).ok()?;
        let leader = rows.iter().find(|r| r["name"] == queue)?["leader"].as_str()?;
        self.number_of(leader)
    }

    /// Whether every member of quorum queue `queue` runs (leader or follower), asked of `via`.
    async fn all_members_up(&self, via: usize, queue: &str) -> bool {
        let dir = self.dir_str();
        let Ok(out) = run_script(&[
            "queues",
            &dir,
            &via.to_string(),
            "quorum_status",
            queue,
            "--formatter",
            "json",
        ])
        .await
        else {
            return false;
        };
        let Ok(rows) = serde_json::from_str::<Vec<Value>>(&out) else {
            return false;
        };
        rows.len() == 3
            && rows
                .iter()
                .all(|r| matches!(r["Raft State"].as_str(), Some("leader" | "follower")))
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = std::process::Command::new(script())
            .args(["stop", &self.dir_str()])
            .status();
    }
}

/// What the publisher did: every job the cluster confirmed, and how many it sent again
/// because a confirm never came (those may be in the queue twice).
struct Published {
    jobs: Vec<Value>,
    resent: u64,
}

/// Publishes jobs in small confirmed batches at a steady pace until `stop`, to whichever node
/// answers (in turn from node `first`); a batch not confirmed is sent again on the next node.
async fn publish_steadily(
    urls: String,
    exchange: String,
    first: usize,
    stop: Arc<AtomicBool>,
    confirmed: Arc<AtomicU64>,
) -> Published {
    const BATCH: usize = 10;
    let mut jobs = Vec::new();
    let mut resent = 0;
    let mut node = first;
    let mut group = 0;
    let mut session: Option<(lapin::Connection, lapin::Channel)> = None;
    let mut batch: Vec<Value> = Vec::new();
    let started = Instant::now();
    while !stop.load(Ordering::SeqCst) {
        assert!(started.elapsed() < SLOW * 2, "the publisher never stopped");
        if batch.is_empty() {
            batch = (0..BATCH)
                .map(|_| {
                    group += 1;
                    issue_job(&new_uuid(), TEAM, 100_000 + group)
                })
                .collect();
        }
        if session.is_none() {
            match opsgenie_worker::broker::connect_from(&urls, node, "opsgenie-e2e publisher").await
            {
                Ok((connection, at)) => {
                    node = at;
                    let channel = connection.create_channel().await;
                    match channel {
                        Ok(channel)
                            if channel
                                .confirm_select(ConfirmSelectOptions::default())
                                .await
                                .is_ok() =>
                        {
                            session = Some((connection, channel));
                        }
                        _ => {
                            node += 1;
                            tokio::time::sleep(Duration::from_millis(200)).await;
                            continue;
                        }
                    }
                }
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            }
        }
        let (_, channel) = session.as_ref().expect("a session");
        let sent = async {
            let mut confirms = Vec::new();
            for job in &batch {
                let body = job.to_string();
                let confirm = publish_job(
                    channel,
                    &exchange,
                    body.as_bytes(),
                    BasicProperties::default(),
                )
                .await?;
                confirms.push(confirm);
            }
            let mut all_acked = true;
            for confirm in confirms {
                all_acked &= confirm.await?.is_ack();
            }
            Ok::<bool, lapin::Error>(all_acked)
        };
        match tokio::time::timeout(Duration::from_secs(30), sent).await {
            Ok(Ok(true)) => {
                confirmed.fetch_add(batch.len() as u64, Ordering::SeqCst);
                jobs.append(&mut batch);
                // About 200 jobs a second.
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            _ => {
                // Unknown which of the batch the queue holds: all of it goes again, elsewhere.
                resent += batch.len() as u64;
                if let Some((connection, _)) = session.take() {
                    let _ = connection.close(200, "".into()).await;
                }
                node += 1;
            }
        }
    }
    if let Some((connection, _)) = session.take() {
        let _ = connection.close(200, "".into()).await;
    }
    Published { jobs, resent }
}

/// The alias Opsgenie files `job` under: the stand-in counts sends per alias.
fn alias_of(job: &Value) -> String {
    let parsed = AlertJob::parse(job.to_string().as_bytes()).expect("a valid job");
    let request = build_request(&parsed);
    let body: Value = serde_json::from_slice(&request.body).expect("a JSON body");
    body["alias"].as_str().expect("an alias").to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "starts a three-node RabbitMQ cluster; run with `cargo test -p opsgenie-e2e --test cluster -- --ignored`"]
async fn losing_the_workers_node_and_then_the_queue_leader_loses_no_job() {
    let env = TestEnv::new("cluster").await;
    let cluster = Cluster::start("kill").await;
    let standin = env
        .standin()
        .serving(TEAM, "key-cluster")
        // Jobs stay in flight long enough for a kill to catch some.
        .delay(Duration::from_millis(50))
        .await;
    // The queues are declared through node 3, which so leads the work queue, while the
    // worker starts on node 1: the first kill takes the worker's node, the second (most
    // likely) a leader the worker is not connected to.
    let mut topology = env.topology();
    topology.queue_type = QueueType::Quorum;
    let (connection, _) = opsgenie_worker::broker::connect_from(&cluster.urls(), 2, "opsgenie-e2e")
        .await
        .expect("node 3");
    let channel = connection.create_channel().await.expect("channel");
    topology
        .declare(&channel)
        .await
        .expect("declare the quorum topology");
    let _ = connection.close(200, "".into()).await;
    let mut worker = env
        .worker()
        .amqp_url(&cluster.urls())
        .flag("--queue-type", "quorum")
        .flag("--prefetch", &PREFETCH.to_string())
        .metrics()
        .spawn();
    let port = worker.metrics_port();
    let ready = || async { matches!(http_get(port, "/readyz").await, Some((200, _))) };
    assert!(
        wait_until(SLOW, ready).await,
        "never ready: {}",
        worker.log_tail(30)
    );
    let consuming = |worker: &WorkerProcess| {
        worker
            .logs()
            .iter()
            .filter(|l| l["message"] == "Consuming.")
            .count()
    };

    let stop = Arc::new(AtomicBool::new(false));
    let confirmed = Arc::new(AtomicU64::new(0));
    // The worker tries node 1 first; the publisher starts on node 2.
    let publisher = tokio::spawn(publish_steadily(
        cluster.urls(),
        env.exchange.clone(),
        1,
        Arc::clone(&stop),
        Arc::clone(&confirmed),
    ));
    let progressed = |by: u64| {
        let target = standin.delivered() + by;
        let standin = &standin;
        async move { standin.wait_for_delivered(target, SLOW).await }
    };
    assert!(progressed(300).await, "{}", worker.log_tail(30));

    // 1. SIGKILL the node the worker is connected to, mid-stream.
    let first = std::cell::Cell::new(None);
    assert!(
        wait_until(SLOW, || async {
            first.set(cluster.connection_node(1, "opsgenie-worker run").await);
            first.get().is_some()
        })
        .await,
        "the worker's connection is not listed"
    );
    let first = first.get().expect("found above");
    let sessions = consuming(&worker);
    let in_flight_before = standin.delivered();
    cluster.kill(first).await;
    eprintln!(
        "killed node {first} (the worker's) after {in_flight_before} deliveries, {} jobs confirmed",
        confirmed.load(Ordering::SeqCst)
    );
    assert!(
        wait_until(SLOW, || async { consuming(&worker) > sessions }).await,
        "the worker did not reconnect: {}",
        worker.log_tail(30)
    );
    let survivor = (1..=3).find(|n| *n != first).expect("a live node");
    assert!(
        wait_until(SLOW, || async {
            cluster
                .connection_node(survivor, "opsgenie-worker run")
                .await
                .is_some_and(|n| n != first)
        })
        .await,
        "the worker's new connection is not listed on a live node"
    );
    assert!(progressed(300).await, "{}", worker.log_tail(30));

    // The killed node comes back, so that the queue keeps a majority when its leader goes.
    cluster.restart(first).await;
    assert!(
        wait_until(SLOW, || cluster.all_members_up(survivor, &env.queue)).await,
        "the restarted node did not rejoin the queue"
    );

    // 2. SIGKILL the queue's leader, mid-stream.
    let leader = std::cell::Cell::new(None);
    assert!(
        wait_until(SLOW, || async {
            leader.set(cluster.leader(survivor, &env.queue).await);
            leader.get().is_some()
        })
        .await,
        "the queue has no leader"
    );
    let leader = leader.get().expect("found above");
    let sessions = consuming(&worker);
    let before = standin.delivered();
    let worker_on = cluster
        .connection_node(survivor, "opsgenie-worker run")
        .await;
    cluster.kill(leader).await;
    eprintln!(
        "killed node {leader} (the queue's leader; the worker on node {worker_on:?}) after \
         {before} deliveries, {} jobs confirmed",
        confirmed.load(Ordering::SeqCst)
    );
    assert!(progressed(300).await, "{}", worker.log_tail(30));
    let reconnected = consuming(&worker) - sessions;

    // The stream ends; everything published must arrive.
    stop.store(true, Ordering::SeqCst);
    let published = publisher.await.expect("the publisher");
    let aliases: Vec<String> = published.jobs.iter().map(alias_of).collect();
    let all_sent = || {
        let alerts = standin.alerts();
        aliases.iter().all(|a| alerts.contains_key(a))
    };
    assert!(
        wait_until(SLOW, || async { all_sent() }).await,
        "{} of {} jobs never reached the stand-in: {}",
        aliases
            .iter()
            .filter(|a| !standin.alerts().contains_key(*a))
            .count(),
        aliases.len(),
        worker.log_tail(30)
    );
    // Every job in the stream, once.
    let uuids: HashSet<String> = published
        .jobs
        .iter()
        .map(|j| j["notification_uuid"].as_str().expect("uuid").to_string())
        .collect();
    assert_eq!(uuids.len(), published.jobs.len());
    let delivered_in_stream = || async {
        env.stream()
            .await
            .into_iter()
            // A delivery's entry (a confirmation's has its own `event`).
            .filter(|e| e.get("event").is_none_or(|event| event == "delivered"))
            .filter_map(|e| e.get("notification_uuid").cloned())
            .collect::<Vec<_>>()
    };
    assert!(
        wait_until(SLOW, || async {
            let seen: HashSet<String> = delivered_in_stream().await.into_iter().collect();
            uuids.iter().all(|u| seen.contains(u))
        })
        .await,
        "the stream misses jobs"
    );
    // The jobs handled twice are reported in the metrics too: read before the worker stops.
    let metrics_text = http_get(port, "/metrics")
        .await
        .map(|(_, body)| body)
        .unwrap_or_default();
    let duplicates_metric: u64 = metrics_text
        .lines()
        .find_map(|l| l.strip_prefix(r#"opsgenie_jobs_total{outcome="duplicate",reason=""} "#))
        .map_or(0, |n| n.trim().parse().expect("a count"));
    // Let the worker finish what it holds, then count.
    let status = worker.terminate(SLOW).await;
    assert_eq!(status.code(), Some(0), "{}", worker.log_tail(30));
    let in_stream = delivered_in_stream().await;
    let mut per_uuid: HashMap<&str, usize> = HashMap::new();
    for uuid in &in_stream {
        *per_uuid.entry(uuid.as_str()).or_default() += 1;
    }
    let twice_in_stream = per_uuid.values().filter(|n| **n > 1).count();
    assert_eq!(
        per_uuid.keys().filter(|u| !uuids.contains(**u)).count(),
        0,
        "the stream holds jobs nobody published"
    );

    // Handled twice: sent to Opsgenie again, or redelivered and recognised (`duplicate`).
    let alerts = standin.alerts();
    let sent_twice: u64 = aliases
        .iter()
        .map(|a| alerts[a].creates.saturating_sub(1))
        .sum();
    let lines = worker.job_lines();
    let duplicates = lines.iter().filter(|l| l["outcome"] == "duplicate").count() as u64;
    let delivered = lines.iter().filter(|l| l["outcome"] == "delivered").count() as u64;
    let others: Vec<&Value> = lines
        .iter()
        .filter(|l| !matches!(l["outcome"].as_str(), Some("delivered" | "duplicate")))
        .collect();
    eprintln!(
        "published {} jobs ({} sent again by the publisher); worker reconnected {} time(s) \
         after the leader's loss; delivered {delivered}, duplicate {duplicates}; sent to \
         Opsgenie twice: {sent_twice}; in the stream twice: {twice_in_stream}",
        published.jobs.len(),
        published.resent,
        reconnected,
    );
    assert_eq!(duplicates_metric, duplicates, "the duplicates metric");
    assert!(
        others.iter().all(|l| l["outcome"] == "requeued"),
        "unexpected outcomes: {others:?}"
    );
    // Each kill can return at most what was in flight (the prefetch) to the queue; the
    // publisher's own resends may add as many jobs as it sent again.
    let allowance = 2 * u64::from(PREFETCH) + published.resent;
    assert!(
        duplicates + sent_twice <= allowance,
        "{duplicates} duplicates and {sent_twice} second sends, over {allowance}"
    );
    assert_eq!(
        delivered,
        published.jobs.len() as u64 + sent_twice,
        "every job delivered"
    );
    assert_eq!(
        twice_in_stream as u64, sent_twice,
        "the stream holds each send once"
    );
    assert_eq!(sent_twice, 0, "a job was sent to Opsgenie twice");
}

/// The nodes of `--amqp-url` are tried in turn: a first node that refuses connections is
/// passed over for the next, which the `Consuming.` line names, password redacted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_refuses_is_passed_over_for_the_next() {
    let env = TestEnv::new("nodes").await;
    let standin = env.standin().serving(TEAM, "key-nodes").await;
    let closed = free_port();
    let urls = format!("amqp://guest:Refused0@127.0.0.1:{closed}/%2f,{AMQP_URL}");
    let mut worker = env.worker().amqp_url(&urls).metrics().spawn();
    let port = worker.metrics_port();
    assert!(
        wait_until(Duration::from_secs(60), || async {
            matches!(http_get(port, "/readyz").await, Some((200, _)))
        })
        .await,
        "never ready: {}",
        worker.log_tail(20)
    );
    let job = issue_job(&new_uuid(), TEAM, 7);
    env.publish_job(&job).await;
    assert!(
        standin.wait_for_delivered(1, Duration::from_secs(60)).await,
        "{}",
        worker.log_tail(20)
    );
    let status = worker.terminate(Duration::from_secs(60)).await;
    assert_eq!(status.code(), Some(0), "{}", worker.log_tail(20));
    let consuming: Vec<Value> = worker
        .logs()
        .into_iter()
        .filter(|l| l["message"] == "Consuming.")
        .collect();
    assert_eq!(consuming.len(), 1, "{}", worker.raw_log());
    assert_eq!(
        consuming[0]["node"],
        "amqp://guest:***@127.0.0.1:5672/%2f",
        "{}",
        worker.raw_log()
    );
    assert!(!worker.raw_log().contains("Refused0"));
}

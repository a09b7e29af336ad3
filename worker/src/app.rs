//! The `run` command: wires the consumer, the confirmer, the heartbeat and telemetry together
//! and runs them until shutdown.

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::task::JoinHandle;

use crate::broker::{Topology, check_names};
use crate::cli::{Fatal, MetricsAddr, RunArgs};
use crate::job::consumer;
use crate::job::consumer::ConsumerSettings;
use crate::job::pipeline::Pipeline;
use crate::keyring::Keyring;
use crate::opsgenie::Sender;
use crate::store::{Store, StoreSettings};
use crate::support::init_tls;
use crate::support::open_files::raise_open_file_limit;
use crate::support::redact::{redact_error, redact_url};
use crate::support::shutdown::Shutdown;
use crate::telemetry::catalogue;
use crate::telemetry::health::Health;
use crate::{cli as config, confirm, heartbeat, telemetry};

/// Runs the worker until `shutdown` is triggered and jobs in flight are drained.
///
/// Fails (exit 2) with `Fatal::Keyring` for a keyring that cannot be loaded, `Fatal::RedisUrl`
/// for a Redis URL that cannot be parsed, `Fatal::HttpClient` when no HTTP client can be
/// built, `Fatal::Config` for a name the broker cannot take and `Fatal::MetricsAddr` for a
/// metrics address that cannot be bound. Losing the broker or Redis is not fatal.
pub async fn run(args: RunArgs, shutdown: Shutdown) -> Result<(), Fatal> {
    init_tls();
    raise_open_file_limit();
    let keyring = Keyring::load(&args.keyring)?;
    if keyring.is_empty() {
        tracing::warn!(keyring = %args.keyring.display(), "The keyring has no team: every job will be dead-lettered as unknown_team.");
    }
    let topology = Topology::new(&args.broker);
    // A name over 255 bytes would make the AMQP client panic on first use.
    check_names(&args.broker, &topology)?;
    log_start(&args, &topology, &keyring);
    let keyring = Arc::new(ArcSwap::from_pointee(keyring));
    let health = Arc::new(Health::default());
    let store = open_store(&args)?;
    store.start();
    let sender = Sender::new(args.request_timeout)?;
    // A 429 seen here makes every replica wait.
    let sender = sender.share_cooldowns(store.clone());

    let server = serve_endpoints(args.metrics_addr, &health, &shutdown).await?;
    catalogue::register();
    record_keyring(&keyring.load());
    warn_if_readable_by_others(&args.keyring);
    reload_on_sighup(args.keyring.clone(), Arc::clone(&keyring));
    spawn_redis_probe(store.clone(), Arc::clone(&health), shutdown.clone());

    let topology = Arc::new(topology);
    let confirm_within = (args.confirm == config::Switch::On).then_some(args.confirm_within);
    let pipeline = Arc::new(Pipeline {
        keyring,
        sender,
        store: store.clone(),
        policy: args.retry_policy(),
        health,
        poison_after: args.poison_after,
        quarantine: tokio::sync::RwLock::new(()),
        confirm_within,
    });
    let background = spawn_background(&pipeline, &args, &topology, &shutdown);
    let counts = Arc::new(telemetry::JobCounts::default());
    let summary =
        telemetry::spawn_summary(Arc::clone(&counts), args.summary_interval, shutdown.clone());
    let settings = ConsumerSettings {
        amqp_url: args.broker.amqp_url.clone(),
        topology,
        prefetch: args.prefetch,
        drain_timeout: args.drain_timeout,
        counts,
    };
    consumer::consume(settings, pipeline, shutdown).await;
    for task in background {
        let _ = task.await;
    }
    store.quit().await;
    let _ = summary.await;
    if let Some(server) = server {
        let _ = server.await;
    }
    tracing::info!("Stopped.");
    Ok(())
}

/// The start-up line: where the worker connects (passwords redacted), the names it uses and
/// the settings that shape a job's way.
fn log_start(args: &RunArgs, topology: &Topology, keyring: &Keyring) {
    tracing::info!(
        amqp_url = redact_url(&args.broker.amqp_url),
        redis_url = redact_url(&args.redis.redis_url),
        exchange = topology.exchange,
        queue = topology.queue,
        routing_key = topology.routing_key,
        queue_type = ?args.broker.queue_type,
        retry_queues = ?topology.retry_queues.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(),
        dead_queue = topology.dead_queue,
        redis_prefix = args.redis.redis_prefix,
        redis_replicas = args.redis_replicas,
        prefetch = args.prefetch,
        keyring = %args.keyring.display(),
        teams = ?keyring.team_ids(),
        max_attempts = args.max_attempts,
        max_age_s = args.max_age.as_secs(),
        "Starting opsgenie-worker {}.",
        env!("CARGO_PKG_VERSION")
    );
}

/// The Redis store of `--redis-url`, not yet connected.
///
/// Fails (exit 2) when the URL cannot be parsed; the message is redacted, since the client's
/// error quotes the URL, password and all.
fn open_store(args: &RunArgs) -> Result<Store, Fatal> {
    let store = Store::new(
        &args.redis.redis_url,
        StoreSettings {
            prefix: args.redis.redis_prefix.clone(),
            stream_maxlen: args.stream_maxlen,
            dedupe_ttl: Duration::from_secs(args.dedupe_ttl),
            lease_ttl: args.quick_window + args.request_timeout + Duration::from_secs(5),
        },
    )
    .map_err(|e| Fatal::RedisUrl {
        url: redact_url(&args.redis.redis_url),
        error: redact_error(&e.to_string(), &args.redis.redis_url),
    })?;
    Ok(store.with_replicas(args.redis_replicas))
}

/// Serves `/metrics`, `/healthz` and `/readyz` unless `--metrics-addr off`; the handle ends
/// after shutdown.
///
/// Fails (exit 2) when the address cannot be bound.
async fn serve_endpoints(
    addr: MetricsAddr,
    health: &Arc<Health>,
    shutdown: &Shutdown,
) -> Result<Option<JoinHandle<()>>, Fatal> {
    let MetricsAddr::On(addr) = addr else {
        return Ok(None);
    };
    let server = telemetry::serve(
        addr,
        telemetry::init_metrics(),
        Arc::clone(health),
        shutdown.clone(),
    )
    .await
    .map_err(|source| Fatal::MetricsAddr { addr, source })?;
    Ok(Some(server))
}

/// The tasks that run beside the consumer until shutdown: the confirmer (unless
/// `--confirm off`) and the heartbeat.
fn spawn_background(
    pipeline: &Pipeline,
    args: &RunArgs,
    topology: &Arc<Topology>,
    shutdown: &Shutdown,
) -> Vec<JoinHandle<()>> {
    let mut background = Vec::new();
    if pipeline.confirm_within.is_some() {
        let confirmer = confirm::Confirmer::new(
            pipeline.store.clone(),
            pipeline.sender.clone(),
            Arc::clone(&pipeline.keyring),
            Arc::clone(&pipeline.health),
            args.broker.amqp_url.clone(),
            Arc::clone(topology),
            args.request_timeout,
        );
        background.push(tokio::spawn(confirmer.run(shutdown.clone())));
    }
    background.push(tokio::spawn(heartbeat::run(
        Arc::clone(&pipeline.keyring),
        pipeline.store.clone(),
        pipeline.sender.clone(),
        Arc::clone(&pipeline.health),
        shutdown.clone(),
    )));
    background
}

/// The keyring's gauges: how many teams, and when it was (re)loaded.
fn record_keyring(keyring: &Keyring) {
    metrics::gauge!(catalogue::KEYRING_TEAMS).set(keyring.len() as f64);
    metrics::gauge!(catalogue::KEYRING_RELOADED)
        .set(crate::support::clock::now_ms() as f64 / 1000.0);
}

/// How long a keyring reload may read its files before it is given up.
const RELOAD_TIMEOUT: Duration = Duration::from_secs(10);

/// SIGHUP re-reads the keyring (and its key files); a broken file keeps the old keyring.
///
/// The files are read on a blocking thread (`Keyring::load_off_runtime`): on the runtime, a
/// file that never answers would stop deliveries, `/healthz` and SIGTERM with it.
fn reload_on_sighup(path: std::path::PathBuf, keyring: Arc<ArcSwap<Keyring>>) {
    use tokio::signal::unix::{SignalKind, signal};
    let Ok(mut hup) = signal(SignalKind::hangup()) else {
        tracing::warn!("Cannot listen for SIGHUP; the keyring will not reload.");
        return;
    };
    tokio::spawn(async move {
        while hup.recv().await.is_some() {
            // `stat` can wait on a stuck file system too; nothing waits for this warning.
            let check = path.clone();
            drop(tokio::task::spawn_blocking(move || {
                warn_if_readable_by_others(&check)
            }));
            match Keyring::load_off_runtime(path.clone(), RELOAD_TIMEOUT).await {
                Ok(new) => {
                    let teams = new.team_ids().join(",");
                    record_keyring(&new);
                    keyring.store(Arc::new(new));
                    tracing::info!(teams, "Keyring reloaded.");
                }
                Err(error) => {
                    tracing::error!(error = %error, "Keyring reload failed; keeping the previous keyring.");
                }
            }
        }
    });
}

/// Keeps `/readyz` honest about Redis while no job is passing through.
fn spawn_redis_probe(store: Store, health: Arc<Health>, shutdown: Shutdown) {
    tokio::spawn(async move {
        loop {
            health.set_redis(store.ping().await.is_ok());
            health.publish();
            if !shutdown
                .sleep_until(tokio::time::Instant::now() + Duration::from_secs(2))
                .await
            {
                break;
            }
        }
    });
}

/// A keyring holds keys: say so when users other than its owner can read it.
fn warn_if_readable_by_others(path: &std::path::Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(meta) = std::fs::metadata(path)
        && meta.permissions().mode() & 0o004 != 0
    {
        tracing::warn!(
            keyring = %path.display(),
            mode = format!("{:o}", meta.permissions().mode() & 0o777),
            "The keyring is readable by every user of this machine; consider chmod 600 (or 640 for a group)."
        );
    }
}

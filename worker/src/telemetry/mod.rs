//! Logs (tracing, text or JSON) and the HTTP endpoints `/metrics`, `/healthz` and `/readyz`.

pub mod catalogue;
pub mod health;

use std::collections::VecDeque;
use std::io::IsTerminal;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpStream;
use tokio::sync::{Notify, Semaphore};
use tower_http::limit::RequestBodyLimitLayer;
use tracing::Subscriber;
use tracing_appender::non_blocking::{NonBlockingBuilder, WorkerGuard};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::util::SubscriberInitExt;

use crate::cli::LogFormat;
use crate::job::pipeline::Outcome;
use crate::support::shutdown::Shutdown;
use crate::telemetry::health::Health;

/// Lines that may wait for standard error before a job that logs has to wait for them. At a
/// few hundred bytes a job's line that is a few MiB, and over two seconds of the fastest
/// drain the worker manages: only a standard error stalled for that long holds jobs up.
const LOG_LINES_QUEUED: usize = 16 * 1024;
/// The writer thread gathers the lines it finds waiting into one `write` of up to this much:
/// a `write` per line cost a tenth of the worker's CPU at a few thousand jobs a second.
const LOG_WRITE_BYTES: usize = 64 * 1024;

/// Keeps the log writer thread; dropping it writes out every line still queued (waiting up to
/// a second). `main` holds it until the process exits, whatever the exit code.
#[must_use = "dropping the guard stops the log writer"]
pub struct LogGuard {
    _writer: Option<WorkerGuard>,
}

/// Installs the global subscriber: `RUST_LOG` filters (default `info`); JSON unless asked for
/// text or writing to a terminal. Logs go to standard error, so `enqueue` and `dead list`
/// keep standard output for their results.
///
/// Lines are written by a thread of their own (tracing-appender), so a slow standard error
/// does not slow jobs down. The writer is not lossy: when `LOG_LINES_QUEUED` lines wait, the
/// next line waits for room rather than being dropped, since a missing line of an alerting
/// tool may be the one an operator needed.
pub fn init_logs(format: Option<LogFormat>) -> LogGuard {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let format = format.unwrap_or(if std::io::stderr().is_terminal() {
        LogFormat::Text
    } else {
        LogFormat::Json
    });
    // The writer thread flushes whenever it finds no line waiting, so the store batches
    // writes under load and adds no delay when idle.
    let stderr = std::io::BufWriter::with_capacity(LOG_WRITE_BYTES, std::io::stderr());
    let (writer, guard) = NonBlockingBuilder::default()
        .lossy(false)
        .buffered_lines_limit(LOG_LINES_QUEUED)
        .thread_name("log-writer")
        .finish(stderr);
    let installed = match format {
        LogFormat::Json => json_subscriber(filter, writer).try_init(),
        LogFormat::Text => tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(writer)
            .with_ansi(std::io::stderr().is_terminal())
            .finish()
            .try_init(),
    };
    LogGuard {
        // When a subscriber was installed before (tests), the writer has nothing to write.
        _writer: installed.is_ok().then_some(guard),
    }
}

/// The subscriber of `--log-format json`: one line per event with `timestamp` (RFC 3339, UTC),
/// `level`, the event's fields (`message` among them) as keys of the line itself, `target`,
/// and, for a line written inside a span (a job's), that span's name and fields under `span`.
fn json_subscriber<W>(filter: EnvFilter, writer: W) -> impl Subscriber + Send + Sync + 'static
where
    W: for<'a> MakeWriter<'a> + Send + Sync + 'static,
{
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .json()
        .flatten_event(true)
        .with_current_span(true)
        .with_span_list(false)
        .finish()
}

/// How often the samples recorded into a histogram are folded into its buckets.
const METRICS_UPKEEP_INTERVAL: Duration = Duration::from_secs(1);

/// Installs the Prometheus recorder (once per process) and returns its handle.
///
/// The recorder keeps every sample of a histogram (two per job) in a list of its own until
/// something folds them into the buckets: a scrape of `/metrics`, or an upkeep. Nothing else
/// bounds that list, so a worker nobody scrapes grew by some 40 bytes a job for as long as it
/// ran. A thread of its own does the upkeep every `METRICS_UPKEEP_INTERVAL`, whether or not
/// anyone scrapes, and whatever the job runtime is doing.
pub fn init_metrics() -> Option<PrometheusHandle> {
    static HANDLE: std::sync::OnceLock<Option<PrometheusHandle>> = std::sync::OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let handle = prometheus_builder()?.install_recorder().ok()?;
            let upkeep = handle.clone();
            let spawned = std::thread::Builder::new()
                .name("metrics-upkeep".into())
                .spawn(move || {
                    loop {
                        std::thread::sleep(METRICS_UPKEEP_INTERVAL);
                        upkeep.run_upkeep();
                        // The folded samples' blocks are freed through crossbeam's epochs:
                        // hand them over and let the epoch move on (a step per flush), so
                        // that they are freed now rather than whenever enough of them have
                        // gathered on this thread, or jobs come again.
                        for _ in 0..3 {
                            crossbeam_epoch::pin().flush();
                        }
                    }
                });
            if let Err(error) = spawned {
                tracing::warn!(error = %error, "Cannot start the metrics upkeep; histogram samples are folded only when /metrics is scraped.");
            }
            Some(handle)
        })
        .clone()
}

/// The exporter's settings: histogram buckets (without them a histogram is rendered as a
/// summary, which cannot be aggregated across replicas).
pub(crate) fn prometheus_builder() -> Option<PrometheusBuilder> {
    PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Suffix("duration_seconds".into()),
            &[
                0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
            ],
        )
        .ok()?
        // Opsgenie processes an alert within seconds, slower under load: up to minutes.
        .set_buckets_for_metric(
            Matcher::Full(crate::telemetry::catalogue::CONFIRMATION_LAG.into()),
            &[
                0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0,
            ],
        )
        .ok()
}

#[derive(Clone)]
struct Endpoints {
    metrics: Option<PrometheusHandle>,
    health: Arc<Health>,
}

// The endpoint is reachable by whoever reaches the address (the image binds 0.0.0.0), and
// its answers are what liveness probes act on: nothing a client does may hold it, or the
// process's descriptors, for long. Prometheus and the kubelet send a short GET in one packet,
// so every limit below is generous for them and tight for anything else.

/// Connections open at once. Past it the oldest one is closed to make room for the newcomer:
/// a crowd of stalled connections then cannot shut a probe out, and the endpoint never holds
/// more than this many descriptors (plus the one just accepted).
const MAX_CONNECTIONS: usize = 64;
/// Time to send a whole request head, counted again after each keep-alive response, so it is
/// also the idle time-out: a connection that is silent this long is closed.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// No connection lives longer, so that a client that stops reading a response cannot keep it.
const CONNECTION_LIFETIME: Duration = Duration::from_secs(30);
/// When a connection is told to close (its lifetime over, or shutdown), the response it is
/// writing gets this long to finish.
const CLOSE_GRACE: Duration = Duration::from_secs(1);
/// A request line and a few headers; a larger head gets 431.
const MAX_HEAD_BYTES: usize = 8 * 1024;
const MAX_HEADERS: usize = 32;
/// hyper's read store per connection; 8 KiB is the least it accepts.
const MAX_READ_BUFFER_BYTES: usize = 8 * 1024;
/// Every route is a GET without a body; a larger declared body gets 413.
const MAX_BODY_BYTES: usize = 1024;
/// The soft open-file limit is raised towards the hard one, never past this: some libraries
/// size tables by the soft limit, and a container's hard limit can be a billion.
const OPEN_FILES_WANTED: u64 = 65_536;

/// Serves the endpoints on `addr` until shutdown; the handle ends once every connection has
/// closed (at most `CLOSE_GRACE` after shutdown).
///
/// Fails when the address cannot be bound.
pub async fn serve(
    addr: SocketAddr,
    metrics: Option<PrometheusHandle>,
    health: Arc<Health>,
    shutdown: Shutdown,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let app = Router::new()
        .route("/metrics", get(render_metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .layer(RequestBodyLimitLayer::new(MAX_BODY_BYTES))
        .with_state(Endpoints { metrics, health });
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_buf_size(MAX_READ_BUFFER_BYTES)
        .max_header_size(MAX_HEAD_BYTES)
        .max_headers(MAX_HEADERS);
    Ok(tokio::spawn(accept_loop(listener, app, http, shutdown)))
}

type Connection = http1::Connection<TokioIo<TcpStream>, TowerToHyperService<Router>>;

/// The connections being served, oldest first, each with the bell that closes it at once.
#[derive(Default)]
struct OpenConnections {
    queue: Mutex<VecDeque<(u64, Arc<Notify>)>>,
}

impl OpenConnections {
    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<(u64, Arc<Notify>)>> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn close_oldest(&self) {
        if let Some((_, bell)) = self.lock().pop_front() {
            bell.notify_one();
        }
    }

    fn forget(&self, id: u64) {
        self.lock().retain(|(open, _)| *open != id);
    }
}

async fn accept_loop(
    listener: tokio::net::TcpListener,
    app: Router,
    http: http1::Builder,
    shutdown: Shutdown,
) {
    // One permit per open connection: the cap, and at shutdown the sign that all are closed.
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let open = Arc::new(OpenConnections::default());
    let mut next_id = 0_u64;
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = shutdown.triggered() => break,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(error) => {
                // Out of descriptors, most likely: wait for some to be freed rather than spin.
                tracing::warn!(error = %error, "The metrics endpoint could not accept a connection.");
                let pause = tokio::time::Instant::now() + Duration::from_millis(100);
                if shutdown.sleep_until(pause).await {
                    continue;
                }
                break;
            }
        };
        let permit = match Arc::clone(&slots).try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => {
                open.close_oldest();
                match Arc::clone(&slots).acquire_owned().await {
                    Ok(permit) => permit,
                    Err(_) => break,
                }
            }
        };
        next_id += 1;
        let id = next_id;
        let bell = Arc::new(Notify::new());
        open.lock().push_back((id, Arc::clone(&bell)));
        let connection =
            http.serve_connection(TokioIo::new(stream), TowerToHyperService::new(app.clone()));
        let open = Arc::clone(&open);
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            serve_connection(connection, &bell, &shutdown).await;
            open.forget(id);
            drop(permit);
        });
    }
    drop(listener);
    let _ = slots.acquire_many(MAX_CONNECTIONS as u32).await;
}

/// Drives one connection until it ends, is closed to make room (`bell`), outlives
/// `CONNECTION_LIFETIME`, or shutdown begins; the last two let the response in flight finish.
async fn serve_connection(connection: Connection, bell: &Notify, shutdown: &Shutdown) {
    tokio::pin!(connection);
    tokio::select! {
        _ = connection.as_mut() => return,
        () = bell.notified() => return,
        () = tokio::time::sleep(CONNECTION_LIFETIME) => {}
        () = shutdown.triggered() => {}
    }
    connection.as_mut().graceful_shutdown();
    let _ = tokio::time::timeout(CLOSE_GRACE, connection).await;
}

/// Raises the soft limit on open files towards the hard one, so that a burst of connections
/// (to the endpoint, to Opsgenie) does not run the process out of descriptors at the distro's
/// default of 1024. Failing to raise it is not fatal: the caps above hold either way.
pub fn raise_open_file_limit() {
    match rlimit::increase_nofile_limit(OPEN_FILES_WANTED) {
        Ok(limit) => tracing::debug!(limit, "The open-file limit is set."),
        Err(error) => tracing::warn!(error = %error, "Could not raise the open-file limit."),
    }
}

async fn render_metrics(State(endpoints): State<Endpoints>) -> impl IntoResponse {
    let body = endpoints
        .metrics
        .as_ref()
        .map(PrometheusHandle::render)
        .unwrap_or_default();
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body)
}

async fn readyz(State(endpoints): State<Endpoints>) -> impl IntoResponse {
    match endpoints.health.readiness() {
        Ok(()) => (StatusCode::OK, "ready\n".to_string()),
        Err(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {why}\n"),
        ),
    }
}

/// Counts since the last summary line, written by the consumer, read by `spawn_summary`.
#[derive(Debug, Default)]
pub struct JobCounts {
    delivered: AtomicU64,
    retried: AtomicU64,
    dead_lettered: AtomicU64,
    skipped: AtomicU64,
    in_flight: AtomicI64,
}

impl JobCounts {
    pub fn started(&self) {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a finished job by what became of it.
    pub fn finished(&self, outcome: &Outcome) {
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
        let counter = match outcome {
            Outcome::Delivered => &self.delivered,
            Outcome::RetryLater { .. } => &self.retried,
            Outcome::DeadLetter { .. } => &self.dead_lettered,
            Outcome::Duplicate | Outcome::Stale | Outcome::Requeue => &self.skipped,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// Logs one summary line every `every` (delivered, retried, dead-lettered, duplicate or
/// stale since the last line, and in flight now), and a last one at shutdown.
pub fn spawn_summary(
    counts: Arc<JobCounts>,
    every: Duration,
    shutdown: Shutdown,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            let go_on = shutdown
                .sleep_until(tokio::time::Instant::now() + every)
                .await;
            tracing::info!(
                delivered = counts.delivered.swap(0, Ordering::Relaxed),
                retried = counts.retried.swap(0, Ordering::Relaxed),
                dead_lettered = counts.dead_lettered.swap(0, Ordering::Relaxed),
                duplicate_or_stale = counts.skipped.swap(0, Ordering::Relaxed),
                in_flight = counts.in_flight.load(Ordering::Relaxed),
                interval_s = every.as_secs(),
                "Summary."
            );
            if !go_on {
                break;
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    /// The lines written by the JSON subscriber while `emit` runs, parsed back.
    fn json_lines_of(emit: impl FnOnce()) -> Vec<serde_json::Value> {
        #[derive(Clone, Default)]
        struct Sink(Arc<Mutex<Vec<u8>>>);
        impl std::io::Write for Sink {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let sink = Sink::default();
        let out = sink.clone();
        let subscriber = json_subscriber(EnvFilter::new("info"), move || out.clone());
        tracing::subscriber::with_default(subscriber, emit);
        let bytes = sink.0.lock().unwrap().clone();
        String::from_utf8(bytes)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).expect(l))
            .collect()
    }

    #[test]
    fn a_json_line_has_the_fields_at_the_top_and_the_span_beside_them() {
        let lines = json_lines_of(|| {
            let error = std::io::Error::other("broken \"pipe\"\n");
            let job = tracing::info_span!("job", notification_uuid = "u-1", team_id = "ops");
            let _entered = job.enter();
            tracing::info!(
                outcome = "delivered",
                status = Some(202u16),
                missing = None::<u16>,
                latency_ms = 3u64,
                delta = -2i64,
                ok = true,
                error = %error,
                "Job finished."
            );
            tracing::debug!("Not at the default level.");
            drop(_entered);
            tracing::warn!(reason = "odd", "Odd {}.", 7);
        });
        assert_eq!(lines.len(), 2, "{lines:?}");
        let first = &lines[0];
        assert_eq!(first["level"], "INFO");
        assert_eq!(first["message"], "Job finished.");
        assert_eq!(first["outcome"], "delivered");
        assert_eq!(first["status"], 202);
        assert!(first.get("missing").is_none());
        assert_eq!(first["latency_ms"], 3);
        assert_eq!(first["delta"], -2);
        assert_eq!(first["ok"], true);
        assert_eq!(first["error"], "broken \"pipe\"\n");
        assert_eq!(first["target"], "opsgenie_worker::telemetry::tests");
        assert_eq!(first["span"]["name"], "job");
        assert_eq!(first["span"]["notification_uuid"], "u-1");
        assert_eq!(first["span"]["team_id"], "ops");
        let stamp = first["timestamp"].as_str().unwrap();
        assert_eq!((stamp.len(), &stamp[10..11], &stamp[26..]), (27, "T", "Z"));
        let second = &lines[1];
        assert_eq!(second["level"], "WARN");
        assert_eq!(second["message"], "Odd 7.");
        assert_eq!(second["reason"], "odd");
        assert!(second.get("span").is_none());
    }
}

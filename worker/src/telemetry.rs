//! Logs (tracing, text or JSON) and the HTTP endpoints `/metrics`, `/healthz` and `/readyz`.

use std::collections::VecDeque;
use std::io::{IsTerminal, Write};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
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
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::MakeWriter;

mod json_lines;

use crate::config::LogFormat;
use crate::health::Health;
use crate::shutdown::Shutdown;

/// Installs the global subscriber: `RUST_LOG` filters (default `info`); JSON unless asked for
/// text or writing to a terminal. Logs go to standard error, so `enqueue` and `dead list`
/// keep standard output for their results.
pub fn init_logs(format: Option<LogFormat>) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let format = format.unwrap_or(if std::io::stderr().is_terminal() {
        LogFormat::Text
    } else {
        LogFormat::Json
    });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(LogBuffer::global());
    let _ = match format {
        LogFormat::Json => builder.event_format(json_lines::JsonLines).try_init(),
        LogFormat::Text => builder
            .with_ansi(std::io::stderr().is_terminal())
            .try_init(),
    };
}

/// Log lines gathered in memory and written to standard error in batches: one `write` per
/// line was a tenth of the worker's CPU at a few thousand jobs a second. A line at WARN or
/// above is written at once, the rest within `LOG_FLUSH_EVERY` or when the buffer fills.
#[derive(Clone, Copy)]
pub struct LogBuffer {
    lines: &'static Mutex<Vec<u8>>,
}

const LOG_FLUSH_EVERY: Duration = Duration::from_millis(100);
const LOG_BUFFER_BYTES: usize = 64 * 1024;

impl LogBuffer {
    fn global() -> LogBuffer {
        static LINES: OnceLock<Mutex<Vec<u8>>> = OnceLock::new();
        let lines = LINES.get_or_init(|| {
            std::thread::Builder::new()
                .name("log-flush".into())
                .spawn(|| {
                    loop {
                        std::thread::sleep(LOG_FLUSH_EVERY);
                        flush_logs();
                    }
                })
                .ok();
            Mutex::new(Vec::with_capacity(LOG_BUFFER_BYTES))
        });
        LogBuffer { lines }
    }

    fn flush(&self) {
        let pending = {
            let mut lines = self.lines.lock().unwrap_or_else(|p| p.into_inner());
            if lines.is_empty() {
                return;
            }
            std::mem::replace(&mut *lines, Vec::with_capacity(LOG_BUFFER_BYTES))
        };
        let _ = std::io::stderr().lock().write_all(&pending);
    }
}

/// Writes out the buffered log lines; called at exit so that none is lost.
pub fn flush_logs() {
    LogBuffer::global().flush();
}

/// One event's line, appended to the buffer as it is written.
pub struct LogLine {
    buffer: LogBuffer,
    urgent: bool,
}

impl Write for LogLine {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        let full = {
            let mut lines = self.buffer.lines.lock().unwrap_or_else(|p| p.into_inner());
            lines.extend_from_slice(bytes);
            lines.len() >= LOG_BUFFER_BYTES
        };
        if full {
            self.buffer.flush();
        }
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for LogLine {
    fn drop(&mut self) {
        if self.urgent {
            self.buffer.flush();
        }
    }
}

impl<'a> MakeWriter<'a> for LogBuffer {
    type Writer = LogLine;

    fn make_writer(&'a self) -> LogLine {
        LogLine {
            buffer: *self,
            urgent: false,
        }
    }

    fn make_writer_for(&'a self, meta: &tracing::Metadata<'_>) -> LogLine {
        LogLine {
            buffer: *self,
            urgent: *meta.level() <= tracing::Level::WARN,
        }
    }
}

/// Installs the Prometheus recorder (once per process) and returns its handle.
pub fn init_metrics() -> Option<PrometheusHandle> {
    static HANDLE: std::sync::OnceLock<Option<PrometheusHandle>> = std::sync::OnceLock::new();
    HANDLE
        .get_or_init(|| {
            PrometheusBuilder::new()
                .set_buckets_for_metric(
                    Matcher::Suffix("duration_seconds".into()),
                    &[
                        0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                    ],
                )
                .ok()?
                .install_recorder()
                .ok()
        })
        .clone()
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
/// hyper's read buffer per connection; 8 KiB is the least it accepts.
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

    /// Counts a finished job by its `outcome` label.
    pub fn finished(&self, outcome: &str) {
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
        let counter = match outcome {
            "delivered" => &self.delivered,
            "retry_scheduled" => &self.retried,
            "dead_lettered" => &self.dead_lettered,
            _ => &self.skipped,
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

//! Logs (tracing, text or JSON) and the HTTP endpoints `/metrics`, `/healthz` and `/readyz`.

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
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
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

/// Serves the endpoints on `addr` until shutdown.
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
        .with_state(Endpoints { metrics, health });
    Ok(tokio::spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(async move { shutdown.triggered().await })
            .await;
        if let Err(error) = served {
            tracing::error!(error = %error, "The metrics endpoint stopped.");
        }
    }))
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

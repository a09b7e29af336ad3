//! The HTTP endpoints `/metrics`, `/healthz` and `/readyz`, served on a listener of their own
//! with tight limits on what a client may hold.

use std::collections::VecDeque;
use std::net::SocketAddr;
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
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpStream;
use tokio::sync::{Notify, Semaphore};
use tower_http::limit::RequestBodyLimitLayer;

use crate::support::shutdown::Shutdown;
use crate::telemetry::health::Health;

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

//! Accepting connections: plain TCP or TLS, HTTP/1.1 or HTTP/2 on each, and the ways a server
//! can misbehave at the connection level (dropping an idle connection, hanging up on a request).
//!
//! The stand-in serves its own accept loop rather than `axum::serve` so that it can count the
//! connections it accepted, tag every request with the connection it came on, and drop a
//! connection abruptly: dropping the stream sends a TCP FIN and, under TLS, no `close_notify`.

use std::io;
use std::pin::pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, oneshot};
use tokio_rustls::TlsAcceptor;
use tower_service::Service as _;

use crate::{Shared, StandInTls};

/// One accepted connection, as the requests on it and its watchdogs see it.
pub(crate) struct Connection {
    /// Numbered from 1 in the order connections were accepted.
    pub(crate) id: u64,
    /// Requests whose answer is not finished yet; the connection is idle only at zero.
    in_flight: AtomicU64,
    /// When the connection last became idle (accepted, or a request finished).
    idle_since: Mutex<Instant>,
    /// Woken whenever `in_flight` changes, so the idle watchdog re-checks.
    activity: Notify,
    /// Given a permit by a request that scripts a hang-up; the connection task then drops
    /// the connection. A permit, not a wake-up, so that it is not lost before the task waits.
    hang_up: Notify,
}

impl Connection {
    fn new(id: u64) -> Self {
        Self {
            id,
            in_flight: AtomicU64::new(0),
            idle_since: Mutex::new(Instant::now()),
            activity: Notify::new(),
            hang_up: Notify::new(),
        }
    }

    /// Ends the connection without answering whatever is in flight on it.
    pub(crate) fn hang_up(&self) {
        self.hang_up.notify_one();
    }

    fn idle_since(&self) -> Instant {
        *self
            .idle_since
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Resolves once no request has been in flight for `limit`.
    async fn idle_for(&self, limit: Duration) {
        loop {
            let changed = self.activity.notified();
            let mut changed = pin!(changed);
            // Registered before the check, so a change between check and await still wakes us.
            changed.as_mut().enable();
            if self.in_flight.load(Ordering::SeqCst) == 0 {
                let idle = self.idle_since().elapsed();
                if idle >= limit {
                    return;
                }
                tokio::select! {
                    _ = tokio::time::sleep(limit - idle) => {}
                    _ = changed => {}
                }
            } else {
                changed.await;
            }
        }
    }
}

/// Counts a request in flight on its connection until the answer is done (or dropped).
struct InFlight(Arc<Connection>);

impl InFlight {
    fn start(connection: Arc<Connection>) -> Self {
        connection.in_flight.fetch_add(1, Ordering::SeqCst);
        connection.activity.notify_waiters();
        Self(connection)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        *self
            .0
            .idle_since
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Instant::now();
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
        self.0.activity.notify_waiters();
    }
}

/// The request extension through which a handler learns which connection it is answering on.
#[derive(Clone)]
pub(crate) struct ConnectionTag(pub(crate) Arc<Connection>);

/// Counts a connection as closed however its task ends, and wakes the stand-in's waiters.
struct Closed(Arc<Shared>);

impl Drop for Closed {
    fn drop(&mut self) {
        self.0.closed_connections.fetch_add(1, Ordering::SeqCst);
        self.0.answered.notify_waiters();
    }
}

/// The byte stream a connection is served on, plain or TLS.
trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// A rustls acceptor (ring provider) offering `h2` and `http/1.1` by ALPN.
///
/// Fails when the PEM holds no certificate or no private key, or rustls refuses them.
pub(crate) fn tls_acceptor(tls: &StandInTls) -> anyhow::Result<TlsAcceptor> {
    let chain = CertificateDer::pem_slice_iter(tls.cert_chain_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .context("cannot read the certificate chain PEM")?;
    anyhow::ensure!(!chain.is_empty(), "the certificate chain PEM is empty");
    let key = PrivateKeyDer::from_pem_slice(tls.key_pem.as_bytes())
        .context("cannot read the private key PEM")?;
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .context("rustls has no protocol version in common with ring")?
    .with_no_client_auth()
    .with_single_cert(chain, key)
    .context("rustls refused the certificate or key")?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// Everything a connection task needs, shared by all of them.
pub(crate) struct Server {
    pub(crate) shared: Arc<Shared>,
    pub(crate) app: Router,
    pub(crate) tls: Option<TlsAcceptor>,
    pub(crate) idle_drop: Option<Duration>,
}

/// Accepts until `stopped` resolves, then lets open connections finish their answers.
pub(crate) async fn serve(
    listener: TcpListener,
    server: Server,
    stopped: oneshot::Receiver<()>,
) -> io::Result<()> {
    let server = Arc::new(server);
    let graceful = GracefulShutdown::new();
    let mut stopped = pin!(stopped);
    loop {
        let accepted = tokio::select! {
            // Err means the handle was dropped, which is a stop request as well.
            _ = &mut stopped => break,
            accepted = listener.accept() => accepted,
        };
        let stream = match accepted {
            Ok((stream, _peer)) => stream,
            // Out of file descriptors and the like: wait rather than spin, as axum does.
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let id = server.shared.connections.fetch_add(1, Ordering::SeqCst) + 1;
        let watcher = graceful.watcher();
        let server = Arc::clone(&server);
        tokio::spawn(async move {
            let _closed = Closed(Arc::clone(&server.shared));
            let connection = Arc::new(Connection::new(id));
            let Some(stream) = handshake(&server, stream).await else {
                return;
            };
            let app = server.app.clone();
            let tag = ConnectionTag(Arc::clone(&connection));
            let service =
                hyper::service::service_fn(move |mut request: hyper::Request<Incoming>| {
                    let in_flight = InFlight::start(Arc::clone(&tag.0));
                    request.extensions_mut().insert(tag.clone());
                    let mut app = app.clone();
                    async move {
                        let answer = app.call(request).await;
                        drop(in_flight);
                        answer
                    }
                });
            let builder = auto::Builder::new(TokioExecutor::new());
            let serving = builder
                .serve_connection(TokioIo::new(stream), service)
                .into_owned();
            let serving = watcher.watch(serving);
            let idle = async {
                match server.idle_drop {
                    Some(limit) => connection.idle_for(limit).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                // A client that goes away mid-request is its business, not a server failure.
                _ = serving => {}
                () = idle => {
                    server.shared.idle_drops.fetch_add(1, Ordering::SeqCst);
                }
                () = connection.hang_up.notified() => {}
            }
            // Leaving the select drops the connection and its stream: a bare TCP close,
            // without an HTTP/2 GOAWAY or a TLS close_notify.
        });
    }
    drop(listener);
    graceful.shutdown().await;
    Ok(())
}

async fn handshake(server: &Server, stream: TcpStream) -> Option<Box<dyn Stream>> {
    match &server.tls {
        None => Some(Box::new(stream)),
        // A client that does not trust the certificate aborts here; it was still a connection.
        Some(acceptor) => match acceptor.accept(stream).await {
            Ok(tls) => Some(Box::new(tls)),
            Err(_) => None,
        },
    }
}

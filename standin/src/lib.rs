//! A local stand-in for the Opsgenie Alert API, for end-to-end tests, the benchmark and
//! docker-compose.
//!
//! `opsgenie` answers `POST /v2/alerts` and `POST /v2/alerts/{identifier}/close` the way Opsgenie
//! does (authentication, field limits, 202 with a `requestId`), after serving any scripted faults
//! first. `admin` exposes what was received under `/_standin/` so the binary can be driven and
//! inspected from outside. [`StandIn`] is the in-process handle: it binds, serves on the current
//! tokio runtime, and lets a test read the same books and wait on them without polling.
//! `serve` accepts the connections, plain or TLS (HTTP/2 or HTTP/1.1 by ALPN), and stages the
//! connection-level faults; `pki` makes a private CA for TLS tests.

mod admin;
mod listen;
mod opsgenie;
mod pki;
mod processing;
mod serve;

pub use pki::LocalPki;
pub use processing::AsyncFailure;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use anyhow::Context as _;
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, oneshot};
use tokio::task::JoinHandle;

/// How to start a [`StandIn`].
#[derive(Debug, Clone)]
pub struct StandInConfig {
    /// `host:port` to bind; port 0 picks a free one.
    pub addr: String,
    /// Accepted API keys; empty accepts any non-empty key.
    pub keys: Vec<String>,
    /// When off, only counts, statuses and alias state are kept, so memory stays flat.
    pub record_bodies: bool,
    /// Added before every Opsgenie API answer, faulted or not.
    pub delay: Option<Duration>,
    /// Serve https instead of http: the same API over TLS, HTTP/2 or HTTP/1.1 by ALPN.
    pub tls: Option<StandInTls>,
    /// Misbehaviour: a connection with no request in flight for this long is dropped abruptly,
    /// as an aggressive load balancer does: the TCP stream is closed without an HTTP/2 GOAWAY
    /// and, under TLS, without a `close_notify` alert. A client that reuses it finds it dead.
    pub idle_drop: Option<Duration>,
    /// How long after its 202 a request counts as not processed yet: until then
    /// `GET /v2/alerts/requests/{id}` answers 404 `RequestNotProcessed`.
    pub processing_delay: Duration,
}

/// A server certificate chain and its private key, both PEM (see [`LocalPki`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StandInTls {
    /// The server certificate first, then any intermediates.
    pub cert_chain_pem: String,
    /// PKCS#8, PKCS#1 or SEC1.
    pub key_pem: String,
}

impl Default for StandInConfig {
    fn default() -> Self {
        Self {
            addr: "127.0.0.1:0".to_owned(),
            keys: Vec::new(),
            record_bodies: true,
            delay: None,
            tls: None,
            idle_drop: None,
            processing_delay: Duration::ZERO,
        }
    }
}

/// One request to the Opsgenie API as received, with the answer given.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RecordedRequest {
    pub method: String,
    /// As received, percent-encoding intact.
    pub path: String,
    pub query: Option<String>,
    pub authorization: Option<String>,
    pub content_type: Option<String>,
    pub user_agent: Option<String>,
    pub body: String,
    /// The body parsed, when it is JSON.
    pub json: Option<serde_json::Value>,
    /// 0 when the request was hung up on (see [`Fault::hang_up`]).
    pub status: u16,
    pub request_id: String,
    /// Milliseconds since the UNIX epoch.
    pub received_at_ms: u64,
    /// `HTTP/1.1` or `HTTP/2.0`.
    #[serde(default)]
    pub http_version: String,
    /// Which connection the request came on: connections are numbered from 1 as accepted.
    #[serde(default)]
    pub connection_id: u64,
}

/// A scripted answer, served `count` times before normal behaviour resumes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fault {
    /// Ignored when `hang_up` is set.
    #[serde(default)]
    pub status: u16,
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    #[serde(default = "one")]
    pub count: u32,
    #[serde(default)]
    pub delay_ms: Option<u64>,
    /// Misbehaviour: read the request in full, then close its connection without answering
    /// (under HTTP/2, every stream on that connection goes with it). The request counts as
    /// received and is recorded with status 0; the client cannot tell whether it was acted on.
    #[serde(default)]
    pub hang_up: bool,
}

fn one() -> u32 {
    1
}

impl Fault {
    pub fn new(status: u16) -> Self {
        Self {
            status,
            headers: BTreeMap::new(),
            count: 1,
            delay_ms: None,
            hang_up: false,
        }
    }

    /// A request read in full and then hung up on: see [`Fault::hang_up`] (the field).
    pub fn hang_up() -> Self {
        Self {
            hang_up: true,
            ..Self::new(0)
        }
    }

    pub fn times(mut self, count: u32) -> Self {
        self.count = count;
        self
    }

    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.insert(name.into(), value.into());
        self
    }

    pub fn delay(mut self, delay: Duration) -> Self {
        self.delay_ms = Some(u64::try_from(delay.as_millis()).unwrap_or(u64::MAX));
        self
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AliasStatus {
    Open,
    Closed,
}

/// What the stand-in believes about one alert alias.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AliasState {
    pub status: AliasStatus,
    pub creates: u64,
    pub closes: u64,
    /// Closes that arrived while the alias was not open: a close that overtook its create
    /// shows up here.
    pub stray_closes: u64,
}

impl AliasState {
    /// An alias first seen in `status`, with nothing counted yet.
    fn new(status: AliasStatus) -> AliasState {
        AliasState {
            status,
            creates: 0,
            closes: 0,
            stray_closes: 0,
        }
    }
}

/// Counters over everything answered since start; not reset by clearing the requests.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stats {
    /// Requests read, hung-up ones included.
    pub received: u64,
    pub delivered: u64,
    pub by_status: BTreeMap<u16, u64>,
    pub aliases: usize,
    pub open_aliases: usize,
    pub recorded: usize,
    pub pending_faults: u64,
    /// TCP connections accepted, whether or not a TLS handshake followed.
    #[serde(default)]
    pub connections: u64,
    /// Connections that ended, for any reason (client close, idle drop, hang-up, failed TLS).
    #[serde(default)]
    pub closed_connections: u64,
    /// Connections dropped by `idle_drop`.
    #[serde(default)]
    pub idle_drops: u64,
    /// Requests hung up on by a [`Fault::hang_up`].
    #[serde(default)]
    pub hang_ups: u64,
    /// `GET /v2/alerts/requests/{id}` questions answered. Neither they nor pings count in
    /// `received`, `delivered` or `by_status`, which are about alert requests only.
    #[serde(default)]
    pub status_asks: u64,
    /// The most `GET /v2/alerts/requests/{id}` questions in flight at once (read, not yet
    /// answered), over everything served since start.
    #[serde(default)]
    pub most_status_asks_in_flight: u64,
    /// Heartbeat pings, by name.
    #[serde(default)]
    pub heartbeats: BTreeMap<String, u64>,
}

/// A fault after validation, so serving it cannot fail.
struct ScriptedAnswer {
    action: Scripted,
    remaining: u32,
    delay: Option<Duration>,
}

/// What a scripted fault does with the request it meets.
#[derive(Clone)]
pub(crate) enum Scripted {
    Answer(StatusCode, HeaderMap),
    HangUp,
}

#[derive(Default)]
struct Books {
    received: u64,
    hang_ups: u64,
    by_status: BTreeMap<u16, u64>,
    requests: Vec<RecordedRequest>,
    alerts: HashMap<String, AliasState>,
    script: VecDeque<ScriptedAnswer>,
}

/// What an answered request changes in the alias books.
enum Effect {
    None,
    Open(String),
    Close(String),
}

struct Shared {
    keys: Vec<String>,
    processing_delay: Duration,
    processing: Mutex<processing::Processing>,
    record_bodies: bool,
    delay: Option<Duration>,
    /// Outside the mutex so a benchmark can poll it at any rate without slowing the server.
    delivered: AtomicU64,
    /// Counted by the accept loop, outside the mutex like `delivered`.
    connections: AtomicU64,
    closed_connections: AtomicU64,
    idle_drops: AtomicU64,
    /// Status questions read and not yet answered, and the most there ever were.
    status_asks_in_flight: AtomicU64,
    most_status_asks_in_flight: AtomicU64,
    /// Woken after every answer and every closed connection so waiters re-check their
    /// condition instead of sleeping.
    answered: Notify,
    books: Mutex<Books>,
}

impl Shared {
    fn books(&self) -> MutexGuard<'_, Books> {
        // A panic elsewhere while holding the lock leaves plain counters behind; keep serving.
        self.books.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn push_faults(&self, faults: Vec<Fault>) -> anyhow::Result<()> {
        let scripted = faults
            .into_iter()
            .map(ScriptedAnswer::try_from)
            .collect::<anyhow::Result<Vec<_>>>()?;
        self.books().script.extend(scripted);
        Ok(())
    }

    fn take_fault(&self) -> Option<(Scripted, Option<Duration>)> {
        let mut books = self.books();
        let front = books.script.front_mut()?;
        let served = (front.action.clone(), front.delay);
        front.remaining -= 1;
        if front.remaining == 0 {
            books.script.pop_front();
        }
        Some(served)
    }

    fn settle(&self, status: StatusCode, effect: Effect, record: Option<RecordedRequest>) {
        let mut books = self.books();
        books.received += 1;
        *books.by_status.entry(status.as_u16()).or_default() += 1;
        match effect {
            Effect::None => {}
            Effect::Open(alias) => {
                let state = books
                    .alerts
                    .entry(alias)
                    .or_insert(AliasState::new(AliasStatus::Open));
                state.status = AliasStatus::Open;
                state.creates += 1;
            }
            Effect::Close(alias) => {
                let state = books
                    .alerts
                    .entry(alias)
                    .or_insert(AliasState::new(AliasStatus::Closed));
                if state.status != AliasStatus::Open {
                    state.stray_closes += 1;
                }
                state.status = AliasStatus::Closed;
                state.closes += 1;
            }
        }
        books.requests.extend(record);
        drop(books);
        if status.is_success() {
            self.delivered.fetch_add(1, Ordering::Release);
        }
        self.answered.notify_waiters();
    }

    /// Books a request that is hung up on: read, recorded, never answered.
    fn settle_hang_up(&self, record: Option<RecordedRequest>) {
        let mut books = self.books();
        books.received += 1;
        books.hang_ups += 1;
        books.requests.extend(record);
        drop(books);
        self.answered.notify_waiters();
    }

    fn stats(&self) -> Stats {
        let (status_asks, heartbeats) = {
            let processing = self.processing();
            (processing.status_asks, processing.ping_count.clone())
        };
        let books = self.books();
        Stats {
            received: books.received,
            delivered: self.delivered.load(Ordering::Acquire),
            by_status: books.by_status.clone(),
            aliases: books.alerts.len(),
            open_aliases: books
                .alerts
                .values()
                .filter(|a| a.status == AliasStatus::Open)
                .count(),
            recorded: books.requests.len(),
            pending_faults: books.script.iter().map(|s| u64::from(s.remaining)).sum(),
            connections: self.connections.load(Ordering::SeqCst),
            closed_connections: self.closed_connections.load(Ordering::SeqCst),
            idle_drops: self.idle_drops.load(Ordering::SeqCst),
            hang_ups: books.hang_ups,
            status_asks,
            most_status_asks_in_flight: self.most_status_asks_in_flight.load(Ordering::SeqCst),
            heartbeats,
        }
    }

    fn processing(&self) -> MutexGuard<'_, processing::Processing> {
        self.processing
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

impl TryFrom<Fault> for ScriptedAnswer {
    type Error = anyhow::Error;

    fn try_from(fault: Fault) -> anyhow::Result<Self> {
        anyhow::ensure!(fault.count > 0, "fault count must be at least 1");
        if fault.hang_up {
            return Ok(Self {
                action: Scripted::HangUp,
                remaining: fault.count,
                delay: fault.delay_ms.map(Duration::from_millis),
            });
        }
        let status = StatusCode::from_u16(fault.status)
            .with_context(|| format!("invalid fault status {}", fault.status))?;
        let mut headers = HeaderMap::new();
        for (name, value) in &fault.headers {
            let name = HeaderName::try_from(name.as_str())
                .with_context(|| format!("invalid fault header name {name:?}"))?;
            let value = HeaderValue::try_from(value.as_str())
                .with_context(|| format!("invalid value for fault header {name}"))?;
            headers.insert(name, value);
        }
        Ok(Self {
            action: Scripted::Answer(status, headers),
            remaining: fault.count,
            delay: fault.delay_ms.map(Duration::from_millis),
        })
    }
}

/// A running stand-in; stops accepting connections when dropped or shut down.
pub struct StandIn {
    shared: Arc<Shared>,
    addr: SocketAddr,
    /// Whether `base_url` is https.
    tls: bool,
    /// Dropping it (with the handle, or in `shutdown`) starts the graceful shutdown.
    stop: oneshot::Sender<()>,
    server: JoinHandle<std::io::Result<()>>,
}

impl StandIn {
    /// Binds `config.addr` and serves on the current tokio runtime.
    ///
    /// Fails when the address does not resolve or cannot be bound, or when `config.tls` holds
    /// no usable certificate and key.
    pub async fn start(config: StandInConfig) -> anyhow::Result<StandIn> {
        let tls = config.tls.as_ref().map(serve::tls_acceptor).transpose()?;
        let listener = listen::bind(&config.addr)
            .await
            .with_context(|| format!("cannot listen on {}", config.addr))?;
        let addr = listener
            .local_addr()
            .context("bound socket has no address")?;
        let shared = Arc::new(Shared {
            keys: config.keys,
            processing_delay: config.processing_delay,
            processing: Mutex::new(processing::Processing::default()),
            record_bodies: config.record_bodies,
            delay: config.delay.filter(|d| !d.is_zero()),
            delivered: AtomicU64::new(0),
            connections: AtomicU64::new(0),
            closed_connections: AtomicU64::new(0),
            idle_drops: AtomicU64::new(0),
            status_asks_in_flight: AtomicU64::new(0),
            most_status_asks_in_flight: AtomicU64::new(0),
            answered: Notify::new(),
            books: Mutex::new(Books::default()),
        });
        let (stop, stopped) = oneshot::channel::<()>();
        let is_tls = tls.is_some();
        let server = serve::Server {
            shared: Arc::clone(&shared),
            app: admin::routes(Arc::clone(&shared)),
            tls,
            idle_drop: config.idle_drop.filter(|d| !d.is_zero()),
        };
        let server = tokio::spawn(serve::serve(listener, server, stopped));
        Ok(StandIn {
            shared,
            addr,
            tls: is_tls,
            stop,
            server,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://host:port` (`https://` when serving TLS), without a trailing slash.
    pub fn base_url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    /// Empty when started with `record_bodies: false`.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.shared.books().requests.clone()
    }

    pub fn clear_requests(&self) {
        self.shared.books().requests.clear();
    }

    /// Requests answered with a 2xx since start, faulted ones included.
    pub fn delivered(&self) -> u64 {
        self.shared.delivered.load(Ordering::Acquire)
    }

    pub fn alerts(&self) -> HashMap<String, AliasState> {
        self.shared.books().alerts.clone()
    }

    pub fn stats(&self) -> Stats {
        self.shared.stats()
    }

    /// Appends to the fault script; all or nothing.
    ///
    /// Fails when a status is not a valid HTTP status, a count is 0, or a header is invalid.
    pub fn push_faults(&self, faults: Vec<Fault>) -> anyhow::Result<()> {
        self.shared.push_faults(faults)
    }

    /// Makes the alert requests whose body contains `failure.contains` fail after their 202
    /// (see [`AsyncFailure`]).
    pub fn fail_asynchronously(&self, failure: AsyncFailure) {
        self.shared.processing().add_rules(vec![failure]);
    }

    /// When each ping of heartbeat `name` arrived, in ms since the epoch, oldest first.
    pub fn heartbeat_pings(&self, name: &str) -> Vec<u64> {
        self.shared.processing().ping_times(name)
    }

    /// Waits until `delivered() >= n`; false when `deadline` passed first.
    pub async fn wait_for_delivered(&self, n: u64, deadline: Duration) -> bool {
        self.wait_until(deadline, |standin| standin.delivered() >= n)
            .await
    }

    /// Re-checks `condition` after every answered request; false when `deadline` passed first.
    pub async fn wait_until(
        &self,
        deadline: Duration,
        mut condition: impl FnMut(&StandIn) -> bool,
    ) -> bool {
        let wait = async {
            loop {
                let answered = self.shared.answered.notified();
                let mut answered = std::pin::pin!(answered);
                // Registered before the check, so an answer between check and await still wakes us.
                answered.as_mut().enable();
                if condition(self) {
                    return;
                }
                answered.await;
            }
        };
        tokio::time::timeout(deadline, wait).await.is_ok()
    }

    /// Stops accepting, lets in-flight answers finish, and waits for the server to end.
    ///
    /// Fails when the server task failed or panicked.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        let StandIn { stop, server, .. } = self;
        drop(stop);
        server
            .await
            .context("stand-in server task failed")?
            .context("stand-in server failed")
    }
}

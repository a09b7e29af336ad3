//! The HTTP clients, and per destination whether a connection is known to be open.
//!
//! One client serves every team that trusts only the system's CA certificates; a team with a
//! `ca_file` gets a client of its own (one per distinct bundle), built the first time it is
//! needed. Each client keeps its connections alive 30 s, negotiates HTTP/2 over https when
//! the server offers it (one connection then carries every request in flight), never follows
//! a redirect, and goes through `HTTPS_PROXY` / `HTTP_PROXY` / `ALL_PROXY` unless `NO_PROXY`
//! names the host, as curl reads them.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use reqwest::header::HeaderValue;

use crate::keyring::Team;
use crate::opsgenie::{Answer, error_chain, send};

const USER_AGENT: &str = concat!("opsgenie-worker/", env!("CARGO_PKG_VERSION"));
/// How long an idle connection is kept for the next request.
const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// Why a team's client could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("building the HTTP client failed: {0}")]
    Task(#[from] tokio::task::JoinError),
    /// The team's `ca_file` holds nothing the TLS configuration can use.
    #[error("cannot use the CA certificates of {}: {cause}", .path.display())]
    CaCertificates {
        path: std::path::PathBuf,
        cause: String,
    },
}

/// The clients, by trust set, and the warmth of each destination.
#[derive(Clone)]
pub(super) struct Clients {
    /// Trusts the system's CA certificates only.
    default_client: reqwest::Client,
    /// Per `ca_file` bundle (by digest), built on first use.
    ca_clients: Arc<Mutex<HashMap<[u8; 32], reqwest::Client>>>,
    connect_timeout: Duration,
    request_timeout: Duration,
    /// Per API base and trust set: whether a connection is known to be open, so that a burst of
    /// jobs to a cold destination sends one request first (its connection learns by ALPN
    /// whether the server speaks HTTP/2, and then carries the rest) instead of opening one
    /// connection per job.
    warmth: Arc<Mutex<HashMap<String, Arc<Warmth>>>>,
}

impl Clients {
    /// Builds the default client (it reads the system's CA certificates).
    pub(super) fn new(request_timeout: Duration) -> Result<Clients, reqwest::Error> {
        let connect_timeout = Duration::from_secs(5).min(request_timeout);
        Ok(Clients {
            default_client: build_client(connect_timeout, request_timeout, &[])?,
            ca_clients: Arc::new(Mutex::new(HashMap::new())),
            warmth: Arc::new(Mutex::new(HashMap::new())),
            connect_timeout,
            request_timeout,
        })
    }

    /// The client for `team`: the default one, or the one of its CA bundle (built now, off
    /// the runtime, the first time: it reads the system's certificates too).
    pub(super) async fn client_for(&self, team: &Team) -> Result<reqwest::Client, ClientError> {
        let Some(ca) = &team.ca else {
            return Ok(self.default_client.clone());
        };
        if let Some(client) = self.lock_ca_clients().get(&ca.digest) {
            return Ok(client.clone());
        }
        let (connect, request) = (self.connect_timeout, self.request_timeout);
        let certificates = ca.certificates.clone();
        let built =
            tokio::task::spawn_blocking(move || build_client(connect, request, &certificates))
                .await?
                .map_err(|e| ClientError::CaCertificates {
                    path: ca.path.clone(),
                    cause: error_chain(&e),
                })?;
        Ok(self
            .lock_ca_clients()
            .entry(ca.digest)
            .or_insert(built)
            .clone())
    }

    /// The warmth of `team`'s destination (its API base, with its trust set). Only https
    /// destinations have one: HTTP/2 is negotiated by ALPN only there, and over plain http
    /// each request in flight needs a connection of its own anyway.
    pub(super) fn warmth_of(&self, team: &Team) -> Option<Arc<Warmth>> {
        if !team.api_base.starts_with("https://") {
            return None;
        }
        let mut map = self.warmth.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(warmth) = map.get(&team.api_base)
            && team.ca.is_none()
        {
            return Some(Arc::clone(warmth));
        }
        let key = match &team.ca {
            None => team.api_base.clone(),
            Some(ca) => format!("{} {}", team.api_base, ca.path.display()),
        };
        Some(Arc::clone(map.entry(key).or_default()))
    }

    /// Sends one request; to a cold destination, one at a time until one is answered.
    pub(super) async fn send_warm(
        &self,
        warmth: Option<&Warmth>,
        client: &reqwest::Client,
        url: &url::Url,
        authorization: &HeaderValue,
        body: &bytes::Bytes,
    ) -> Result<Answer, reqwest::Error> {
        let Some(warmth) = warmth else {
            return send(client, url, authorization, body).await;
        };
        if !warmth.is_warm() {
            let opening = warmth.opening.lock().await;
            // Those that waited here while the first went out find it warm now, and go
            // together.
            if !warmth.is_warm() {
                let answer = send(client, url, authorization, body).await;
                if answer.is_ok() {
                    warmth.answered_now();
                }
                drop(opening);
                return answer;
            }
        }
        let answer = send(client, url, authorization, body).await;
        if answer.is_ok() {
            warmth.answered_now();
        }
        answer
    }

    fn lock_ca_clients(&self) -> std::sync::MutexGuard<'_, HashMap<[u8; 32], reqwest::Client>> {
        self.ca_clients.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The one client configuration: see the module's comment. Public for the benchmark, which
/// measures what this client alone costs per request.
pub fn build_client(
    connect_timeout: Duration,
    request_timeout: Duration,
    extra_roots: &[reqwest::Certificate],
) -> Result<reqwest::Client, reqwest::Error> {
    reqwest::Client::builder()
        .user_agent(USER_AGENT)
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(connect_timeout)
        .timeout(request_timeout)
        .pool_idle_timeout(IDLE_TIMEOUT)
        .tcp_nodelay(true)
        .tls_certs_merge(extra_roots.iter().cloned())
        .build()
}

/// Whether a destination has a connection open, as far as the sender can tell.
#[derive(Default)]
pub(super) struct Warmth {
    /// When a request to it was last answered.
    answered: Mutex<Option<std::time::Instant>>,
    /// Held by the one request that opens the connection.
    opening: tokio::sync::Mutex<()>,
}

impl Warmth {
    /// Answered within the idle time-out: its connection is likely still open.
    fn is_warm(&self) -> bool {
        self.answered
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some_and(|at| at.elapsed() < IDLE_TIMEOUT)
    }

    fn answered_now(&self) {
        *self.answered.lock().unwrap_or_else(|p| p.into_inner()) = Some(std::time::Instant::now());
    }
}

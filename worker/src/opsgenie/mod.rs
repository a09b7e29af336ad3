//! The Opsgenie boundary: the HTTP clients (reqwest, with rustls), one round of quick retries
//! with exponential backoff and jitter, and the per-key cooldown after a 429. What each answer
//! means is decided by `opsgenie_shared::outcome::classify_response`; this file only moves
//! bytes and waits.
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

use opsgenie_shared::outcome::{classify_response, classify_transport_error};
use opsgenie_shared::retry::RetryPolicy;
use opsgenie_shared::text::{cap_bytes, printable};
use opsgenie_shared::{DeadReason, OpsgenieRequest, Verdict};
use reqwest::header::{AUTHORIZATION, CONTENT_TYPE, HeaderValue};
use serde::Deserialize;
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::keyring::Team;
use crate::support::pacing::Pacing;
use crate::support::redact::redact_url;
use crate::support::shutdown::Shutdown;
use crate::telemetry::catalogue;

const USER_AGENT: &str = concat!("opsgenie-worker/", env!("CARGO_PKG_VERSION"));
/// How long an idle connection is kept for the next request.
const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// The most of an answer's body that is read: Opsgenie answers in a few hundred bytes, and
/// only the start of an error reaches a dead letter.
const MAX_ANSWER_BYTES: usize = 64 * 1024;
/// The most bytes of an answer's `requestId` the worker keeps.
const REQUEST_ID_LIMIT_BYTES: usize = 128;

/// The end of one delivery round.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RoundResult {
    /// 2xx, or 404 on a close. `status` and `request_id` are Opsgenie's.
    Delivered { status: u16, request_id: String },
    /// A permanent refusal.
    Refused {
        reason: DeadReason,
        status: u16,
        message: String,
    },
    /// Every try failed in a way worth trying again later. `status` is the last answer, if
    /// any; `wait` is how long the server asked us to wait.
    Failed {
        status: Option<u16>,
        wait: Option<Duration>,
        message: String,
    },
}

/// The HTTP clients and the cooldowns of rate-limited keys.
#[derive(Clone)]
pub struct Sender {
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
    /// Until when requests with a key must wait after a 429, by team id. Shared by every task
    /// so that one 429 slows all requests with that key, not only the one that got it.
    cooldowns: Arc<Mutex<HashMap<String, Instant>>>,
    /// Where a 429 is reported (team id, wait), so that other replicas wait as well.
    rate_limits: Option<mpsc::UnboundedSender<(String, Duration)>>,
}

/// The answer to a `Sender::call`.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    /// How long a 429 asked to wait.
    pub wait: Option<Duration>,
    /// At most `MAX_ANSWER_BYTES`.
    pub body: Vec<u8>,
}

impl Reply {
    /// The start of the body, for a message, without the team's key.
    pub fn excerpt(&self, team: &Team) -> String {
        excerpt(&self.body, team.key.expose())
    }
}

/// Why a `Sender::call` got no answer.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CallError {
    /// The key is cooling down after a 429 for this long; nothing was sent.
    #[error("rate limited: the key is cooling down")]
    CoolingDown(Duration),
    /// No answer: the connection or the request failed. Names the team, never the key.
    #[error("{0}")]
    Transport(String),
}

/// Why the sender could not be built.
#[derive(Debug, thiserror::Error)]
#[error("cannot build the HTTP client: {0}")]
pub struct SenderError(#[from] reqwest::Error);

#[derive(Deserialize)]
struct Accepted {
    #[serde(rename = "requestId", default)]
    request_id: String,
}

/// Whether a destination has a connection open, as far as the sender can tell.
#[derive(Default)]
struct Warmth {
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

/// What came back from one request.
struct Answer {
    status: u16,
    retry_after: Option<String>,
    rate_limit_period: Option<String>,
    body: Vec<u8>,
}

impl Sender {
    /// Builds the default client (it reads the system's CA certificates).
    ///
    /// Fails when the TLS configuration cannot be built (no usable CA store, no crypto
    /// provider).
    pub fn new(request_timeout: Duration) -> Result<Sender, SenderError> {
        let connect_timeout = Duration::from_secs(5).min(request_timeout);
        Ok(Sender {
            default_client: build_client(connect_timeout, request_timeout, &[])?,
            ca_clients: Arc::new(Mutex::new(HashMap::new())),
            warmth: Arc::new(Mutex::new(HashMap::new())),
            connect_timeout,
            request_timeout,
            cooldowns: Arc::new(Mutex::new(HashMap::new())),
            rate_limits: None,
        })
    }

    /// The client for `team`: the default one, or the one of its CA bundle (built now, off
    /// the runtime, the first time: it reads the system's certificates too).
    async fn client_for(&self, team: &Team) -> Result<reqwest::Client, String> {
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
                .await
                .map_err(|e| format!("building the HTTP client failed: {e}"))?
                .map_err(|e| {
                    format!(
                        "cannot use the CA certificates of {}: {}",
                        ca.path.display(),
                        error_chain(&e)
                    )
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
    fn warmth_of(&self, team: &Team) -> Option<Arc<Warmth>> {
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
    async fn send_warm(
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

    /// Reports every 429 to `reports` as well.
    pub fn with_rate_limit_reports(
        mut self,
        reports: mpsc::UnboundedSender<(String, Duration)>,
    ) -> Sender {
        self.rate_limits = Some(reports);
        self
    }

    /// Sends `request` to `team` up to `policy.quick_tries` times within `policy.quick_window`.
    /// Returns early, as `Failed`, when shutdown begins during a wait, so the job can go to a
    /// delay queue instead of holding up the drain.
    pub async fn deliver(
        &self,
        team: &Team,
        request: &OpsgenieRequest,
        policy: &RetryPolicy,
        shutdown: &Shutdown,
    ) -> RoundResult {
        let deadline = Instant::now() + policy.quick_window;
        let mut pacing = Pacing::growing(Duration::from_millis(200), policy.quick_window, 3.0, 0.5);
        let client = match self.client_for(team).await {
            Ok(client) => client,
            Err(message) => {
                tracing::warn!(team_id = team.id, error = message, "Cannot reach Opsgenie.");
                return RoundResult::Failed {
                    status: None,
                    wait: None,
                    message,
                };
            }
        };
        let url = request_url(&team.api, &request.path, request.query);
        let authorization = &team.authorization;
        // Shared by every try: a try clones a pointer, not the body.
        let body = bytes::Bytes::copy_from_slice(&request.body);
        let warmth = self.warmth_of(team);
        let mut tries = 0u32;
        loop {
            if let Some(until) = self.cooldown(&team.id) {
                if until > deadline {
                    return RoundResult::Failed {
                        status: Some(429),
                        wait: Some(until - Instant::now()),
                        message: "rate limited: the key is cooling down".into(),
                    };
                }
                let _waiting = crate::telemetry::catalogue::WaitingForCooldown::start();
                if !shutdown.sleep_until(until).await {
                    return interrupted();
                }
            }
            let started = std::time::Instant::now();
            let answer = self
                .send_warm(warmth.as_deref(), &client, &url, authorization, &body)
                .await;
            // A request that never reached the server (no connection could be made) is not
            // a try; anything else may have been received, and counts.
            if !matches!(&answer, Err(e) if e.is_connect()) {
                tries += 1;
            }
            let (verdict, status, request_id, message) = match answer {
                Ok(answer) => {
                    let status = answer.status;
                    let verdict = classify_response(
                        request.action,
                        status,
                        answer.retry_after.as_deref(),
                        answer.rate_limit_period.as_deref(),
                    );
                    // Opsgenie's ids are uuids; an answer is not trusted to keep them short,
                    // since the id goes into a log line and the stream.
                    let request_id = serde_json::from_slice::<Accepted>(&answer.body)
                        .map(|a| {
                            printable(&cap_bytes(&a.request_id, REQUEST_ID_LIMIT_BYTES))
                                .into_owned()
                        })
                        .unwrap_or_default();
                    let message = match verdict {
                        Verdict::Delivered | Verdict::NothingToClose => String::new(),
                        _ => format!(
                            "Opsgenie answered {status}: {}",
                            excerpt(&answer.body, team.key.expose())
                        ),
                    };
                    (verdict, Some(status), request_id, message)
                }
                Err(error) => {
                    let message = format!(
                        "team {}: request to {} failed: {}",
                        team.id,
                        redact_url(&team.api_base),
                        error_chain(&error.without_url())
                    );
                    tracing::warn!(
                        team_id = team.id,
                        error = message,
                        "A request to Opsgenie failed."
                    );
                    (classify_transport_error(), None, String::new(), message)
                }
            };
            metrics::histogram!(catalogue::REQUEST_DURATION)
                .record(started.elapsed().as_secs_f64());
            metrics::counter!(catalogue::RESPONSES, "status" => status_label(status)).increment(1);
            match verdict {
                Verdict::Delivered | Verdict::NothingToClose => {
                    if verdict == Verdict::NothingToClose {
                        tracing::info!(
                            alias = request.alias.as_deref(),
                            "Nothing open to close; counted as delivered."
                        );
                    }
                    return RoundResult::Delivered {
                        status: status.unwrap_or(0),
                        request_id,
                    };
                }
                Verdict::DeadLetter(reason) => {
                    return RoundResult::Refused {
                        reason,
                        status: status.unwrap_or(0),
                        message,
                    };
                }
                Verdict::Retry { wait, rate_limited } => {
                    let pause = match wait {
                        Some(w) => w,
                        None => pacing.next_pause(),
                    };
                    if rate_limited {
                        self.cool_down(&team.id, Instant::now() + pause);
                        if let Some(reports) = &self.rate_limits {
                            let _ = reports.send((team.id.clone(), pause));
                        }
                    }
                    let resume = Instant::now() + pause;
                    if tries >= policy.quick_tries || resume > deadline {
                        return RoundResult::Failed {
                            status,
                            wait,
                            message,
                        };
                    }
                    tracing::debug!(
                        status,
                        retry_in_ms = pause.as_millis() as u64,
                        "Request failed; trying again."
                    );
                    metrics::counter!(catalogue::RETRIES, "kind" => "quick").increment(1);
                    if !shutdown.sleep_until(resume).await {
                        return RoundResult::Failed {
                            status,
                            wait,
                            message,
                        };
                    }
                }
            }
        }
    }

    /// One request outside the delivery path (a request's status, a heartbeat ping): one
    /// try, no retries (the caller asks again on its own schedule), and none while the key is
    /// cooling down after a 429 (`Err` then, with the time left).
    ///
    /// Fails, with a message naming the team and never the key, when no answer came.
    pub async fn call(
        &self,
        team: &Team,
        method: reqwest::Method,
        path: &str,
    ) -> Result<Reply, CallError> {
        if let Some(until) = self.cooldown(&team.id) {
            return Err(CallError::CoolingDown(until - Instant::now()));
        }
        let client = self.client_for(team).await.map_err(CallError::Transport)?;
        let url = request_url(&team.api, path, "");
        let started = std::time::Instant::now();
        let request = client
            .request(method, url)
            .header(AUTHORIZATION, team.authorization.clone());
        let answer = read_answer(request).await;
        metrics::histogram!(catalogue::REQUEST_DURATION).record(started.elapsed().as_secs_f64());
        match answer {
            Ok(answer) => {
                metrics::counter!(catalogue::RESPONSES, "status" => status_label(Some(answer.status)))
                    .increment(1);
                let wait = match classify_response(
                    opsgenie_shared::Action::Create,
                    answer.status,
                    answer.retry_after.as_deref(),
                    answer.rate_limit_period.as_deref(),
                ) {
                    Verdict::Retry {
                        wait: Some(wait),
                        rate_limited: true,
                    } => {
                        self.cool_down(&team.id, Instant::now() + wait);
                        Some(wait)
                    }
                    _ => None,
                };
                Ok(Reply {
                    status: answer.status,
                    wait,
                    body: answer.body,
                })
            }
            Err(error) => {
                metrics::counter!(catalogue::RESPONSES, "status" => status_label(None))
                    .increment(1);
                Err(CallError::Transport(format!(
                    "team {}: request to {} failed: {}",
                    team.id,
                    redact_url(&team.api_base),
                    error_chain(&error.without_url())
                )))
            }
        }
    }

    fn cooldown(&self, team: &str) -> Option<Instant> {
        let mut map = self.cooldowns.lock().unwrap_or_else(|p| p.into_inner());
        match map.get(team) {
            Some(until) if *until > Instant::now() => Some(*until),
            Some(_) => {
                map.remove(team);
                None
            }
            None => None,
        }
    }

    fn cool_down(&self, team: &str, until: Instant) {
        let mut map = self.cooldowns.lock().unwrap_or_else(|p| p.into_inner());
        let entry = map.entry(team.to_string()).or_insert(until);
        if *entry < until {
            *entry = until;
        }
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

/// `path` (already percent-encoded by the request builder) below the team's base, whose own
/// path prefix (a gateway's, or JSM's `/jsm/ops/integration`) is kept, with `query`.
fn request_url(api: &url::Url, path: &str, query: &str) -> url::Url {
    let mut url = api.clone();
    let base_path = api.path().trim_end_matches('/');
    url.set_path(&[base_path, path].concat());
    url.set_query((!query.is_empty()).then_some(query));
    url
}

/// One POST; the answer's body is read up to `MAX_ANSWER_BYTES`.
async fn send(
    client: &reqwest::Client,
    url: &url::Url,
    authorization: &HeaderValue,
    body: &bytes::Bytes,
) -> Result<Answer, reqwest::Error> {
    let request = client
        .post(url.clone())
        .header(AUTHORIZATION, authorization.clone())
        .header(CONTENT_TYPE, HeaderValue::from_static("application/json"))
        .body(body.clone());
    read_answer(request).await
}

/// Sends `request`; the answer's body is read up to `MAX_ANSWER_BYTES`.
async fn read_answer(request: reqwest::RequestBuilder) -> Result<Answer, reqwest::Error> {
    let mut response = request.send().await?;
    let header = |name: &str| {
        response
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(|v| cap_bytes(v, 64).into_owned())
    };
    let retry_after = header("retry-after");
    let rate_limit_period = header("x-ratelimit-period-in-sec");
    let status = response.status().as_u16();
    let mut answer = Vec::new();
    while answer.len() < MAX_ANSWER_BYTES
        && let Some(chunk) = response.chunk().await?
    {
        let room = MAX_ANSWER_BYTES - answer.len();
        answer.extend_from_slice(&chunk[..chunk.len().min(room)]);
    }
    Ok(Answer {
        status,
        retry_after,
        rate_limit_period,
        body: answer,
    })
}

/// An error and its causes, one after another: reqwest's own message says little ("error
/// sending request"); the cause says why (a refused connection, an unknown issuer).
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    printable(&cap_bytes(&text, 512)).into_owned()
}

fn interrupted() -> RoundResult {
    RoundResult::Failed {
        status: None,
        wait: None,
        message: "shutting down".into(),
    }
}

/// The start of a response body, for a readable dead-letter message, without `key`.
///
/// An answer that echoes the key must not carry it into a dead letter: it is scrubbed from
/// the whole text before the cut, which could otherwise leave its first characters behind.
/// Control characters are escaped (`\n`, `\u{1b}`) so that the excerpt stays one line that
/// no terminal interprets; other characters, quotes included, stay readable.
fn excerpt(body: &[u8], key: &str) -> String {
    let text = String::from_utf8_lossy(body);
    let mut escaped = String::with_capacity(text.len());
    for c in text.trim().chars() {
        if c.is_control() {
            escaped.extend(c.escape_debug());
        } else {
            escaped.push(c);
        }
    }
    // A key has no control character, so escaping left every copy of it whole.
    let scrubbed = if key.is_empty() {
        escaped
    } else {
        escaped.replace(key, "***")
    };
    scrubbed
        .chars()
        .take(200)
        .collect::<String>()
        .trim()
        .to_string()
}

/// The `status` label without an allocation for the answers that matter.
fn status_label(status: Option<u16>) -> std::borrow::Cow<'static, str> {
    match status {
        None => "error".into(),
        Some(200) => "200".into(),
        Some(202) => "202".into(),
        Some(404) => "404".into(),
        Some(429) => "429".into(),
        Some(503) => "503".into(),
        Some(other) => other.to_string().into(),
    }
}

#[cfg(test)]
mod tests {
    use super::{excerpt, request_url};

    #[test]
    fn requests_go_below_the_base_with_its_prefix_kept() {
        let cases = [
            (
                "https://api.opsgenie.com",
                "/v2/alerts",
                "",
                "https://api.opsgenie.com/v2/alerts",
            ),
            (
                "https://api.atlassian.com/jsm/ops/integration",
                "/v2/alerts/incident_1_2/close",
                "identifierType=alias",
                "https://api.atlassian.com/jsm/ops/integration/v2/alerts/incident_1_2/close?identifierType=alias",
            ),
            (
                "http://127.0.0.1:18080/gw/",
                "/v2/alerts/sentry%3A%2012/close",
                "identifierType=alias",
                "http://127.0.0.1:18080/gw/v2/alerts/sentry%3A%2012/close?identifierType=alias",
            ),
        ];
        for (base, path, query, expected) in cases {
            let base = url::Url::parse(base).unwrap();
            assert_eq!(request_url(&base, path, query).as_str(), expected);
        }
    }

    #[test]
    fn a_key_across_the_cut_leaves_no_piece_behind() {
        let key = "KEY0123456789abcdefKEY";
        for at in 180..=200 {
            let body = format!("{}{key} and more", "x".repeat(at));
            let shown = excerpt(body.as_bytes(), key);
            assert!(!shown.contains("KEY0"), "key at {at}: {shown}");
            assert!(shown.chars().count() <= 200);
        }
        let shown = excerpt(
            format!("{{\"message\":\"bad key {key}\",\r\n\u{1b}[2J}}").as_bytes(),
            key,
        );
        assert_eq!(shown, r#"{"message":"bad key ***",\r\n\u{1b}[2J}"#);
    }
}

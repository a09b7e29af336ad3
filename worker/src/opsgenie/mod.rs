//! The Opsgenie boundary: the HTTP clients (reqwest, with rustls, in `client`), one delivery
//! round of quick retries with exponential backoff and jitter (`delivery`), the per-key
//! cooldown after a 429 (`cooldown`), and here the single requests outside the delivery path
//! and what every request shares. What each answer means is decided by
//! `opsgenie_shared::outcome::classify_response`; this module only moves bytes and waits.

mod client;
mod cooldown;
mod delivery;

use std::time::Duration;

use opsgenie_shared::Verdict;
use opsgenie_shared::outcome::classify_response;
use opsgenie_shared::text::{cap_bytes, printable};
use reqwest::header::{AUTHORIZATION, CONTENT_TYPE, HeaderValue};
use tokio::time::Instant;

use crate::keyring::Team;
use crate::support::redact::redact_url;
use crate::telemetry::catalogue;
use client::Clients;
use cooldown::Cooldowns;

pub use client::{ClientError, build_client};
pub(crate) use delivery::RoundResult;

/// The most of an answer's body that is read: Opsgenie answers in a few hundred bytes, and
/// only the start of an error reaches a dead letter.
const MAX_ANSWER_BYTES: usize = 64 * 1024;

/// The HTTP clients and the cooldowns of rate-limited keys.
#[derive(Clone)]
pub struct Sender {
    clients: Clients,
    cooldowns: Cooldowns,
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
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// The key is cooling down after a 429 for this long; nothing was sent.
    #[error("rate limited: the key is cooling down")]
    CoolingDown(Duration),
    /// No answer: the connection or the request failed.
    #[error(transparent)]
    Transport(#[from] TransportError),
}

/// Why a request got no answer. Names the team, never the key.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("team {team}: request to {destination} failed: {cause}")]
    Request {
        team: String,
        /// The team's API base, redacted.
        destination: String,
        /// The error and its causes, one line.
        cause: String,
    },
}

impl TransportError {
    /// A request to `team` that failed with `error`.
    fn request(team: &Team, error: reqwest::Error) -> TransportError {
        TransportError::Request {
            team: team.id.clone(),
            destination: redact_url(&team.api_base),
            cause: error_chain(&error.without_url()),
        }
    }
}

/// Why the sender could not be built.
#[derive(Debug, thiserror::Error)]
#[error("cannot build the HTTP client: {0}")]
pub struct SenderError(#[from] reqwest::Error);

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
        Ok(Sender {
            clients: Clients::new(request_timeout)?,
            cooldowns: Cooldowns::default(),
        })
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
        if let Some(until) = self.cooldowns.until(&team.id) {
            return Err(CallError::CoolingDown(until - Instant::now()));
        }
        let client = self
            .clients
            .client_for(team)
            .await
            .map_err(TransportError::from)?;
        let url = request_url(&team.api, path, "");
        let started = std::time::Instant::now();
        let request = client
            .request(method, url)
            .header(AUTHORIZATION, team.authorization.clone());
        let answer = read_answer(request).await;
        measured(started, answer.as_ref().ok().map(|a| a.status));
        match answer {
            Ok(answer) => {
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
                        self.cooldowns.cool_down(&team.id, Instant::now() + wait);
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
            Err(error) => Err(TransportError::request(team, error).into()),
        }
    }
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

/// Records one request's duration and its answer's status (`None`: no answer).
fn measured(started: std::time::Instant, status: Option<u16>) {
    metrics::histogram!(catalogue::REQUEST_DURATION).record(started.elapsed().as_secs_f64());
    metrics::counter!(catalogue::RESPONSES, "status" => status_label(status)).increment(1);
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

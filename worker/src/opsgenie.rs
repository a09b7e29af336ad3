//! The Opsgenie boundary: one HTTP client for the process (`http`), one round of quick
//! retries with exponential backoff and jitter, and the per-key cooldown after a 429. What
//! each answer means is decided by `opsgenie_shared::outcome::classify_response`; this file
//! only moves bytes and waits.

mod http;

pub use http::{Endpoint, HttpError};

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use backoff::backoff::Backoff;
use opsgenie_shared::outcome::{classify_response, classify_transport_error};
use opsgenie_shared::retry::RetryPolicy;
use opsgenie_shared::{DeadReason, OpsgenieRequest, Verdict};
use serde::Deserialize;
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::keyring::Team;
use crate::shutdown::Shutdown;
use http::{HttpClient, RequestHead};

const USER_AGENT: &str = concat!("opsgenie-worker/", env!("CARGO_PKG_VERSION"));

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

/// The HTTP client and the cooldowns of rate-limited keys.
#[derive(Clone)]
pub struct Sender {
    http: Arc<HttpClient>,
    /// Until when requests with a key must wait after a 429, by team id. Shared by every task
    /// so that one 429 slows all requests with that key, not only the one that got it.
    cooldowns: Arc<Mutex<HashMap<String, Instant>>>,
    /// Where a 429 is reported (team id, wait), so that other replicas wait as well.
    rate_limits: Option<mpsc::UnboundedSender<(String, Duration)>>,
}

#[derive(Deserialize)]
struct Accepted {
    #[serde(rename = "requestId", default)]
    request_id: String,
}

impl Sender {
    pub fn new(request_timeout: Duration) -> Sender {
        Sender {
            http: Arc::new(HttpClient::new(
                Duration::from_secs(5).min(request_timeout),
                request_timeout,
            )),
            cooldowns: Arc::new(Mutex::new(HashMap::new())),
            rate_limits: None,
        }
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
        let mut backoff = backoff::ExponentialBackoffBuilder::new()
            .with_initial_interval(Duration::from_millis(200))
            .with_multiplier(3.0)
            .with_randomization_factor(0.5)
            .with_max_interval(policy.quick_window)
            .with_max_elapsed_time(None)
            .build();
        let head = RequestHead {
            authorization: team.authorization.expose(),
            user_agent: USER_AGENT,
        };
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
                if !shutdown.sleep_until(until).await {
                    return interrupted();
                }
            }
            tries += 1;
            let started = std::time::Instant::now();
            let answer = self
                .http
                .post(
                    &team.endpoint,
                    &request.path,
                    request.query,
                    &head,
                    &request.body,
                )
                .await;
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
                            opsgenie_shared::text::printable(&opsgenie_shared::text::cap_bytes(
                                &a.request_id,
                                REQUEST_ID_LIMIT_BYTES,
                            ))
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
                Err(error) => (
                    classify_transport_error(),
                    None,
                    String::new(),
                    error.to_string(),
                ),
            };
            metrics::histogram!("opsgenie_request_duration_seconds")
                .record(started.elapsed().as_secs_f64());
            metrics::counter!("opsgenie_responses_total", "status" => status_label(status))
                .increment(1);
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
                        None => backoff.next_backoff().unwrap_or(policy.quick_window),
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
                    metrics::counter!("opsgenie_retries_total", "kind" => "quick").increment(1);
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
/// The most bytes of an answer's `requestId` the worker keeps.
const REQUEST_ID_LIMIT_BYTES: usize = 128;

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
    use super::excerpt;

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

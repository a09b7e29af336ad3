//! What Opsgenie does after its 202: it processes the request later, and answers
//! `GET /v2/alerts/requests/{requestId}` with the outcome (404 until it is processed); and
//! the heartbeat pings, `/v2/heartbeats/{name}/ping`.
//!
//! Request ids are UUIDv7, which carry the time they were made, so the stand-in knows when a
//! request was accepted without keeping one entry per request: a long benchmark does not grow
//! its memory. Only the requests chosen to fail asynchronously are kept, up to
//! `MAX_FAILED_REQUESTS`.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::http::{Method, StatusCode};
use serde::{Deserialize, Serialize};
use serde_json::json;
use uuid::Uuid;

/// The most asynchronously failed requests remembered; the oldest go first.
const MAX_FAILED_REQUESTS: usize = 100_000;
/// The most distinct heartbeat names counted.
const MAX_HEARTBEATS: usize = 1_000;
/// The most ping times kept per heartbeat.
const MAX_PING_TIMES: usize = 10_000;

/// A rule that makes accepted alert requests fail after their 202: every request whose body
/// contains `contains` (up to `count` of them; all when absent) is processed with
/// `isSuccess: false` and `status` as its status text.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AsyncFailure {
    pub contains: String,
    pub status: String,
    #[serde(default)]
    pub count: Option<u64>,
}

/// The books of asynchronous processing and heartbeats.
#[derive(Default)]
pub(crate) struct Processing {
    rules: Vec<AsyncFailure>,
    failed: HashMap<Uuid, String>,
    failed_order: VecDeque<Uuid>,
    /// Per heartbeat name: ping times, ms since the epoch, oldest first.
    pings: BTreeMap<String, VecDeque<u64>>,
    pub(crate) ping_count: BTreeMap<String, u64>,
    pub(crate) status_asks: u64,
}

/// A request id that records when it was made.
pub(crate) fn new_request_id() -> Uuid {
    Uuid::now_v7()
}

pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl Processing {
    pub(crate) fn add_rules(&mut self, rules: Vec<AsyncFailure>) {
        self.rules.extend(rules);
    }

    pub(crate) fn clear_rules(&mut self) {
        self.rules.clear();
    }

    /// An alert request was accepted with `id`: decides now whether it will fail.
    pub(crate) fn accepted(&mut self, id: Uuid, body: &[u8]) {
        let Some(rule) = self
            .rules
            .iter_mut()
            .find(|rule| rule.count != Some(0) && contains(body, rule.contains.as_bytes()))
        else {
            return;
        };
        if let Some(count) = &mut rule.count {
            *count -= 1;
        }
        let status = rule.status.clone();
        if self.failed.len() >= MAX_FAILED_REQUESTS
            && let Some(oldest) = self.failed_order.pop_front()
        {
            self.failed.remove(&oldest);
        }
        self.failed.insert(id, status);
        self.failed_order.push_back(id);
    }

    /// The answer to `GET /v2/alerts/requests/{id}` after `processing_delay`.
    pub(crate) fn status(&mut self, id: &str, processing_delay: Duration) -> (StatusCode, String) {
        self.status_asks += 1;
        let answer_id = new_request_id();
        let not_found = |message: &str| {
            (
                StatusCode::NOT_FOUND,
                json!({"message": message, "took": 0.001, "requestId": answer_id.to_string()})
                    .to_string(),
            )
        };
        let Some((id, made_ms)) = Uuid::parse_str(id).ok().and_then(|id| {
            let (secs, nanos) = id.get_timestamp()?.to_unix();
            Some((id, secs * 1000 + u64::from(nanos) / 1_000_000))
        }) else {
            return not_found("Request not found");
        };
        let delay_ms = u64::try_from(processing_delay.as_millis()).unwrap_or(u64::MAX);
        if now_ms() < made_ms.saturating_add(delay_ms) {
            return not_found("RequestNotProcessed");
        }
        let (success, status) = match self.failed.get(&id) {
            Some(text) => (false, text.clone()),
            None => (true, "Request processed".to_owned()),
        };
        let data = json!({
            "success": success,
            "action": "Create",
            "processedAt": made_ms + delay_ms,
            "integrationId": "00000000-0000-0000-0000-000000000000",
            "isSuccess": success,
            "status": status,
            "alertId": if success { Uuid::new_v4().to_string() } else { String::new() },
        });
        (
            StatusCode::OK,
            json!({"data": data, "took": 0.002, "requestId": answer_id.to_string()}).to_string(),
        )
    }

    /// Counts a ping of `name`.
    pub(crate) fn ping(&mut self, name: String) {
        if !self.ping_count.contains_key(&name) && self.ping_count.len() >= MAX_HEARTBEATS {
            return;
        }
        *self.ping_count.entry(name.clone()).or_default() += 1;
        let times = self.pings.entry(name).or_default();
        if times.len() >= MAX_PING_TIMES {
            times.pop_front();
        }
        times.push_back(now_ms());
    }

    pub(crate) fn ping_times(&self, name: &str) -> Vec<u64> {
        self.pings
            .get(name)
            .map(|t| t.iter().copied().collect())
            .unwrap_or_default()
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    needle.is_empty() || haystack.windows(needle.len()).any(|w| w == needle)
}

/// Which of the two routes a request is for, if any.
pub(crate) enum Route {
    /// `GET /v2/alerts/requests/{id}`.
    Status(String),
    /// `GET|POST|PUT /v2/heartbeats/{name}/ping`, the name percent-decoded.
    Ping(String),
}

pub(crate) fn route(method: &Method, path: &str) -> Option<Route> {
    if method == Method::GET
        && let Some(id) = path.strip_prefix("/v2/alerts/requests/")
        && !id.is_empty()
        && !id.contains('/')
    {
        return Some(Route::Status(id.to_owned()));
    }
    if matches!(*method, Method::GET | Method::POST | Method::PUT)
        && let Some(name) = path
            .strip_prefix("/v2/heartbeats/")
            .and_then(|rest| rest.strip_suffix("/ping"))
        && !name.is_empty()
        && !name.contains('/')
    {
        return Some(Route::Ping(
            percent_encoding::percent_decode_str(name)
                .decode_utf8_lossy()
                .into_owned(),
        ));
    }
    None
}

/// The body of a ping's answer.
pub(crate) fn pong() -> String {
    json!({"result": "PONG - Heartbeat received", "took": 0.006, "requestId": new_request_id().to_string()})
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_is_not_processed_until_its_delay_and_then_fails_when_a_rule_chose_it() {
        let mut books = Processing::default();
        books.add_rules(vec![AsyncFailure {
            contains: "doomed".into(),
            status: "Integration is disabled".into(),
            count: Some(1),
        }]);
        let (fine, doomed, spared) = (new_request_id(), new_request_id(), new_request_id());
        books.accepted(fine, b"{\"message\":\"ok\"}");
        books.accepted(doomed, b"{\"message\":\"doomed\"}");
        books.accepted(spared, b"{\"message\":\"doomed too\"}");
        let (status, body) = books.status(&fine.to_string(), Duration::from_secs(3600));
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert!(body.contains("RequestNotProcessed"), "{body}");
        let answer = |id: Uuid, books: &mut Processing| {
            let (status, body) = books.status(&id.to_string(), Duration::ZERO);
            assert_eq!(status, StatusCode::OK);
            serde_json::from_str::<serde_json::Value>(&body).unwrap()["data"].clone()
        };
        assert_eq!(answer(fine, &mut books)["isSuccess"], true);
        let failed = answer(doomed, &mut books);
        assert_eq!(failed["isSuccess"], false);
        assert_eq!(failed["status"], "Integration is disabled");
        assert_eq!(answer(spared, &mut books)["isSuccess"], true);
        assert_eq!(
            books.status("not-a-uuid", Duration::ZERO).0,
            StatusCode::NOT_FOUND
        );
        assert_eq!(books.status_asks, 5);
    }

    #[test]
    fn routes_and_ping_names() {
        assert!(
            matches!(route(&Method::GET, "/v2/alerts/requests/abc"), Some(Route::Status(id)) if id == "abc")
        );
        assert!(route(&Method::POST, "/v2/alerts/requests/abc").is_none());
        assert!(
            matches!(route(&Method::POST, "/v2/heartbeats/pager%20pipeline/ping"), Some(Route::Ping(n)) if n == "pager pipeline")
        );
        assert!(route(&Method::DELETE, "/v2/heartbeats/x/ping").is_none());
        assert!(route(&Method::POST, "/v2/alerts").is_none());
    }
}

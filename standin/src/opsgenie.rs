//! The Opsgenie Alert API as the worker sees it: scripted faults first, then authentication,
//! then the field limits Opsgenie enforces.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value, json};
use uuid::Uuid;

use crate::serve::ConnectionTag;
use crate::{Effect, RecordedRequest, Scripted, Shared, processing};

/// Far above what a valid alert can hold (about 50 000 chars of text), so only junk is cut off.
const MAX_BODY_BYTES: usize = 1 << 20;

const CREATE_TEXT_LIMITS: [(&str, usize); 7] = [
    ("message", 130),
    ("alias", 512),
    ("description", 15_000),
    ("entity", 512),
    ("source", 100),
    ("user", 100),
    ("note", 25_000),
];
const CLOSE_TEXT_LIMITS: [(&str, usize); 3] = [("source", 100), ("user", 100), ("note", 25_000)];
const MAX_TAGS: usize = 20;
const MAX_TAG_CHARS: usize = 50;
const MAX_DETAILS_CHARS: usize = 8_000;
const PRIORITIES: [&str; 5] = ["P1", "P2", "P3", "P4", "P5"];

/// A field Opsgenie would refuse, and why.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Rejection {
    pub field: &'static str,
    pub reason: String,
}

enum Reply {
    Accepted,
    Failed {
        message: String,
        rejection: Option<Rejection>,
    },
}

struct Verdict {
    status: StatusCode,
    headers: HeaderMap,
    reply: Reply,
    delay: Option<Duration>,
    effect: Effect,
}

impl Verdict {
    fn accepted(effect: Effect) -> Self {
        Self {
            status: StatusCode::ACCEPTED,
            headers: HeaderMap::new(),
            reply: Reply::Accepted,
            delay: None,
            effect,
        }
    }

    fn failed(status: StatusCode, message: impl Into<String>) -> Self {
        Self::refused(status, message.into(), None)
    }

    fn unprocessable(rejection: Rejection) -> Self {
        let message = format!(
            "Request body is not processable: {} {}.",
            rejection.field, rejection.reason
        );
        Self::refused(StatusCode::UNPROCESSABLE_ENTITY, message, Some(rejection))
    }

    fn refused(status: StatusCode, message: String, rejection: Option<Rejection>) -> Self {
        Self {
            status,
            headers: HeaderMap::new(),
            reply: Reply::Failed { message, rejection },
            delay: None,
            effect: Effect::None,
        }
    }
}

/// Every request that is not for `/_standin/` lands here, so unknown routes are recorded too.
pub(crate) async fn answer(State(shared): State<Arc<Shared>>, request: Request) -> Response {
    let received_at_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    let (parts, body) = request.into_parts();
    let body = axum::body::to_bytes(body, MAX_BODY_BYTES).await;
    if let Some(route) = processing::route(&parts.method, api_path(parts.uri.path())) {
        return after_the_202(&shared, &parts, route).await;
    }
    let request_uuid = processing::new_request_id();
    let request_id = request_uuid.to_string();
    let json = body
        .as_ref()
        .ok()
        .and_then(|b| serde_json::from_slice::<Value>(b).ok());

    let connection = parts.extensions.get::<ConnectionTag>().cloned();
    let verdict = match (shared.take_fault(), &body) {
        (Some((Scripted::HangUp, delay)), _) => {
            if let Some(delay) = delay {
                tokio::time::sleep(delay).await;
            }
            let record = shared.record_bodies.then(|| {
                record(
                    &parts,
                    &body,
                    json,
                    0,
                    request_id,
                    received_at_ms,
                    connection.as_ref(),
                )
            });
            shared.settle_hang_up(record);
            if let Some(ConnectionTag(connection)) = connection {
                connection.hang_up();
            }
            // The connection task drops this answer with the connection; it is never sent.
            return std::future::pending().await;
        }
        // A 2xx fault is a slow or scripted success, so it answers like one, minus the effect.
        (Some((Scripted::Answer(status, headers), delay)), _) => Verdict {
            status,
            headers,
            delay,
            ..if status.is_success() {
                Verdict::accepted(Effect::None)
            } else {
                Verdict::failed(
                    status,
                    status.canonical_reason().unwrap_or("Injected fault"),
                )
            }
        },
        (None, Err(_)) => Verdict::failed(
            StatusCode::PAYLOAD_TOO_LARGE,
            "Request body is too large or could not be read.",
        ),
        (None, Ok(bytes)) => judge(&shared.keys, &parts, json.as_ref(), bytes),
    };

    let delay = shared.delay.unwrap_or_default() + verdict.delay.unwrap_or_default();
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }

    if verdict.status.is_success()
        && let Ok(bytes) = &body
    {
        shared.processing().accepted(request_uuid, bytes);
    }
    let record = shared.record_bodies.then(|| {
        record(
            &parts,
            &body,
            json,
            verdict.status.as_u16(),
            request_id.clone(),
            received_at_ms,
            connection.as_ref(),
        )
    });
    shared.settle(verdict.status, verdict.effect, record);

    let body = match verdict.reply {
        Reply::Accepted => format!(
            r#"{{"result":"Request will be processed","took":0.002,"requestId":"{request_id}"}}"#
        ),
        Reply::Failed { message, rejection } => {
            let mut answer = json!({ "message": message, "took": 0.0, "requestId": request_id });
            if let Some(Rejection { field, reason }) = rejection {
                answer["errors"] = json!({ field: reason });
            }
            answer.to_string()
        }
    };
    let mut response = (
        verdict.status,
        [(header::CONTENT_TYPE, "application/json")],
        Body::from(body),
    )
        .into_response();
    response.headers_mut().extend(verdict.headers);
    response
}

/// A request status question or a heartbeat ping: authenticated like an alert request,
/// delayed like one, never faulted, recorded or counted with them.
async fn after_the_202(
    shared: &Shared,
    parts: &axum::http::request::Parts,
    route: processing::Route,
) -> Response {
    let _asking = matches!(route, processing::Route::Status(_)).then(|| StatusAsk::start(shared));
    if let Some(delay) = shared.delay {
        tokio::time::sleep(delay).await;
    }
    let (status, body) = if !authorized(&shared.keys, &parts.headers) {
        (
            StatusCode::UNAUTHORIZED,
            json!({"message": "Could not authenticate", "took": 0.0, "requestId": Uuid::new_v4().to_string()})
                .to_string(),
        )
    } else {
        match route {
            processing::Route::Status(id) => {
                shared.processing().status(&id, shared.processing_delay)
            }
            processing::Route::Ping(name) => {
                shared.processing().ping(name);
                (StatusCode::ACCEPTED, processing::pong())
            }
        }
    };
    shared.answered.notify_waiters();
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        Body::from(body),
    )
        .into_response()
}

/// A status question in flight, counted from when it is read until it is answered (or its
/// connection is gone).
struct StatusAsk<'a>(&'a Shared);

impl<'a> StatusAsk<'a> {
    fn start(shared: &'a Shared) -> StatusAsk<'a> {
        let now = shared.status_asks_in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        shared
            .most_status_asks_in_flight
            .fetch_max(now, Ordering::SeqCst);
        StatusAsk(shared)
    }
}

impl Drop for StatusAsk<'_> {
    fn drop(&mut self) {
        self.0.status_asks_in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

fn record(
    parts: &axum::http::request::Parts,
    body: &Result<axum::body::Bytes, axum::Error>,
    json: Option<Value>,
    status: u16,
    request_id: String,
    received_at_ms: u64,
    connection: Option<&ConnectionTag>,
) -> RecordedRequest {
    let text = |name| {
        parts
            .headers
            .get(name)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
    };
    RecordedRequest {
        method: parts.method.to_string(),
        path: parts.uri.path().to_owned(),
        query: parts.uri.query().map(str::to_owned),
        authorization: text(header::AUTHORIZATION),
        content_type: text(header::CONTENT_TYPE),
        user_agent: text(header::USER_AGENT),
        body: body
            .as_ref()
            .map(|b| String::from_utf8_lossy(b).into_owned())
            .unwrap_or_default(),
        json,
        status,
        request_id,
        received_at_ms,
        http_version: format!("{:?}", parts.version),
        connection_id: connection.map_or(0, |ConnectionTag(c)| c.id),
    }
}

enum Route<'a> {
    Create,
    Close(&'a str),
}

/// Where Jira Service Management operations serves the Alert API: the stand-in answers below
/// it too, so that a team moved to JSM (`region = "jsm"`, here through `api_url`) is served
/// the same way. Requests are recorded with the path as received.
const JSM_PREFIX: &str = "/jsm/ops/integration";

/// The Alert API path of a request, below the JSM prefix if it has one.
fn api_path(path: &str) -> &str {
    path.strip_prefix(JSM_PREFIX)
        .filter(|rest| rest.starts_with('/'))
        .unwrap_or(path)
}

fn judge(
    keys: &[String],
    parts: &axum::http::request::Parts,
    json: Option<&Value>,
    body: &[u8],
) -> Verdict {
    let path = api_path(parts.uri.path());
    let route = if parts.method != Method::POST {
        None
    } else if path == "/v2/alerts" {
        Some(Route::Create)
    } else {
        path.strip_prefix("/v2/alerts/")
            .and_then(|rest| rest.strip_suffix("/close"))
            .filter(|id| !id.is_empty() && !id.contains('/'))
            .map(Route::Close)
    };
    let Some(route) = route else {
        return Verdict::failed(StatusCode::NOT_FOUND, "Resource not found.");
    };
    if !authorized(keys, &parts.headers) {
        return Verdict::failed(StatusCode::UNAUTHORIZED, "Could not authenticate");
    }
    // An empty close body is fine; anything else that is not a JSON object is not.
    let fields = match json {
        Some(Value::Object(fields)) => Some(fields),
        None if body.is_empty() && matches!(route, Route::Close(_)) => None,
        _ => {
            return Verdict::failed(
                StatusCode::BAD_REQUEST,
                "Request body must be a JSON object.",
            );
        }
    };
    match route {
        Route::Create => match fields.map_or(Ok(()), check_create) {
            Ok(()) => Verdict::accepted(
                fields
                    .and_then(|f| f.get("alias"))
                    .and_then(Value::as_str)
                    .filter(|alias| !alias.is_empty())
                    .map_or(Effect::None, |alias| Effect::Open(alias.to_owned())),
            ),
            Err(rejection) => Verdict::unprocessable(rejection),
        },
        Route::Close(identifier) => match fields.map_or(Ok(()), check_close) {
            // Opsgenie's default identifierType is `id`, which the stand-in cannot resolve.
            Ok(()) if is_alias(parts.uri.query()) => {
                Verdict::accepted(Effect::Close(percent_decode(identifier)))
            }
            Ok(()) => Verdict::accepted(Effect::None),
            Err(rejection) => Verdict::unprocessable(rejection),
        },
    }
}

fn authorized(keys: &[String], headers: &HeaderMap) -> bool {
    let key = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("GenieKey "))
        .map(str::trim)
        .unwrap_or_default();
    !key.is_empty() && (keys.is_empty() || keys.iter().any(|k| k == key))
}

fn is_alias(query: Option<&str>) -> bool {
    query.is_some_and(|q| q.split('&').any(|pair| pair == "identifierType=alias"))
}

fn chars(s: &str) -> usize {
    s.chars().count()
}

fn reject(field: &'static str, reason: impl Into<String>) -> Result<(), Rejection> {
    Err(Rejection {
        field,
        reason: reason.into(),
    })
}

fn check_texts(
    fields: &Map<String, Value>,
    limits: &[(&'static str, usize)],
) -> Result<(), Rejection> {
    for &(field, limit) in limits {
        match fields.get(field) {
            None => {}
            Some(Value::String(s)) if chars(s) <= limit => {}
            Some(Value::String(_)) => reject(field, format!("is longer than {limit} characters"))?,
            // Null is refused too: the worker is meant to leave absent fields out.
            Some(_) => reject(field, "must be a string")?,
        }
    }
    Ok(())
}

pub(crate) fn check_create(fields: &Map<String, Value>) -> Result<(), Rejection> {
    match fields.get("message") {
        Some(Value::String(m)) if !m.trim().is_empty() => {}
        _ => reject("message", "must be a non-empty string")?,
    }
    check_texts(fields, &CREATE_TEXT_LIMITS)?;
    if let Some(tags) = fields.get("tags") {
        let Value::Array(tags) = tags else {
            return reject("tags", "must be an array of strings");
        };
        if tags.len() > MAX_TAGS {
            reject("tags", format!("has more than {MAX_TAGS} entries"))?;
        }
        for tag in tags {
            match tag {
                Value::String(t) if chars(t) <= MAX_TAG_CHARS => {}
                Value::String(_) => reject(
                    "tags",
                    format!("has an entry longer than {MAX_TAG_CHARS} characters"),
                )?,
                _ => reject("tags", "must be an array of strings")?,
            }
        }
    }
    if let Some(details) = fields.get("details") {
        let Value::Object(details) = details else {
            return reject("details", "must be an object of strings");
        };
        let mut total = 0;
        for (key, value) in details {
            let Value::String(value) = value else {
                return reject("details", "must be an object of strings");
            };
            total += chars(key) + chars(value);
        }
        if total > MAX_DETAILS_CHARS {
            reject(
                "details",
                format!("is longer than {MAX_DETAILS_CHARS} characters in keys and values"),
            )?;
        }
    }
    match fields.get("priority") {
        None => Ok(()),
        Some(Value::String(p)) if PRIORITIES.contains(&p.as_str()) => Ok(()),
        Some(_) => reject("priority", "must be one of P1, P2, P3, P4, P5"),
    }
}

pub(crate) fn check_close(fields: &Map<String, Value>) -> Result<(), Rejection> {
    check_texts(fields, &CLOSE_TEXT_LIMITS)
}

/// Aliases are keyed as the worker wrote them in the create body, so the close path segment is
/// decoded to match; invalid escapes are kept as they are rather than refused.
fn percent_decode(segment: &str) -> String {
    percent_encoding::percent_decode_str(segment)
        .decode_utf8_lossy()
        .into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn create(body: Value) -> Result<(), Rejection> {
        match body {
            Value::Object(fields) => check_create(&fields),
            _ => unreachable!("test bodies are objects"),
        }
    }

    fn field(result: Result<(), Rejection>) -> Option<&'static str> {
        result.err().map(|r| r.field)
    }

    #[test]
    fn limits_count_unicode_scalar_values() {
        let cases: Vec<(Value, Option<&str>)> = vec![
            (json!({"message": "é".repeat(130)}), None),
            (json!({"message": "é".repeat(131)}), Some("message")),
            (json!({"message": ""}), Some("message")),
            (json!({"alias": "a"}), Some("message")),
            (
                json!({"message": "m", "alias": "a".repeat(513)}),
                Some("alias"),
            ),
            (
                json!({"message": "m", "description": "d".repeat(15_000)}),
                None,
            ),
            (
                json!({"message": "m", "description": "d".repeat(15_001)}),
                Some("description"),
            ),
            (
                json!({"message": "m", "entity": "e".repeat(513)}),
                Some("entity"),
            ),
            (
                json!({"message": "m", "source": "s".repeat(101)}),
                Some("source"),
            ),
            (
                json!({"message": "m", "user": "u".repeat(101)}),
                Some("user"),
            ),
            (
                json!({"message": "m", "note": "n".repeat(25_001)}),
                Some("note"),
            ),
            (json!({"message": "m", "alias": null}), Some("alias")),
            (json!({"message": "m", "tags": vec!["t"; 20]}), None),
            (json!({"message": "m", "tags": vec!["t"; 21]}), Some("tags")),
            (json!({"message": "m", "tags": ["ü".repeat(50)]}), None),
            (
                json!({"message": "m", "tags": ["t".repeat(51)]}),
                Some("tags"),
            ),
            (
                json!({"message": "m", "details": {"k": "v".repeat(7_999)}}),
                None,
            ),
            (
                json!({"message": "m", "details": {"k": "v".repeat(8_000)}}),
                Some("details"),
            ),
            (
                json!({"message": "m", "details": {"k": 1}}),
                Some("details"),
            ),
            (json!({"message": "m", "priority": "P5"}), None),
            (json!({"message": "m", "priority": "P6"}), Some("priority")),
        ];
        for (body, expected) in cases {
            let shown = body.to_string();
            assert_eq!(field(create(body)), expected, "{shown:.80}");
        }
    }

    #[test]
    fn decodes_close_identifiers() {
        assert_eq!(percent_decode("sentry%3A%2042"), "sentry: 42");
        assert_eq!(percent_decode("incident_1_2"), "incident_1_2");
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("%E2%80%A6%zz"), "…%zz");
    }
}

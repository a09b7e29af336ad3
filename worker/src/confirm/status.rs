//! What Opsgenie says about a request it accepted (`GET /v2/alerts/requests/{requestId}`):
//! processed (successfully or not), not processed yet, or no usable answer.

use std::time::Duration;

use opsgenie_shared::text::{cap_bytes, printable};

/// The most bytes of Opsgenie's status text and alert id kept.
const TEXT_LIMIT_BYTES: usize = 512;

/// What Opsgenie said about a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Status {
    /// Processed; `success` is `isSuccess`.
    Processed {
        success: bool,
        text: String,
        alert_id: String,
    },
    /// Not processed yet (404, or an answer without `isSuccess`).
    NotYet,
    /// No usable answer; ask again at the earliest after `wait`.
    Failed {
        message: String,
        wait: Option<Duration>,
    },
}

/// A request status answer: Opsgenie wraps the status in `data`; the status itself, unwrapped,
/// is read too. Every other field is skipped unread, and strings are borrowed from the
/// answer unless they hold escapes.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(default)]
struct RequestStatus<'a> {
    #[serde(borrow)]
    data: Option<Box<RequestStatus<'a>>>,
    #[serde(rename = "isSuccess")]
    is_success: Option<bool>,
    success: Option<bool>,
    #[serde(borrow)]
    status: Option<std::borrow::Cow<'a, str>>,
    #[serde(rename = "alertId", borrow)]
    alert_id: Option<std::borrow::Cow<'a, str>>,
}

/// Reads a request status answer: Opsgenie wraps it in `data`; the unwrapped form is
/// accepted as well.
pub(super) fn read_status(body: &[u8]) -> Status {
    let Ok(answer) = serde_json::from_slice::<RequestStatus<'_>>(body) else {
        return Status::Failed {
            message: "the request status answer is not a JSON object Opsgenie would send".into(),
            wait: None,
        };
    };
    let status = match answer.data {
        Some(data) => *data,
        None => answer,
    };
    let text = |value: Option<std::borrow::Cow<'_, str>>| {
        value
            .map(|s| printable(&cap_bytes(&s, TEXT_LIMIT_BYTES)).into_owned())
            .unwrap_or_default()
    };
    match status.is_success.or(status.success) {
        Some(success) => Status::Processed {
            success,
            text: text(status.status),
            alert_id: text(status.alert_id),
        },
        None => Status::NotYet,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_status_is_read_wrapped_or_not() {
        let cases = [
            (
                r#"{"data":{"success":true,"action":"Create","isSuccess":true,"status":"Created alert","alertId":"a-1","alias":"x"},"took":0.01,"requestId":"r"}"#,
                Status::Processed {
                    success: true,
                    text: "Created alert".into(),
                    alert_id: "a-1".into(),
                },
            ),
            (
                r#"{"isSuccess":false,"status":"Integration is disabled"}"#,
                Status::Processed {
                    success: false,
                    text: "Integration is disabled".into(),
                    alert_id: String::new(),
                },
            ),
            (r#"{"data":{"action":"Create"}}"#, Status::NotYet),
            (r#"{"message":"Request not processed yet"}"#, Status::NotYet),
            (
                r#"{"data":null,"took":1,"isSuccess":true,"status":"Closed \u0022x\u0022"}"#,
                Status::Processed {
                    success: true,
                    text: "Closed \"x\"".into(),
                    alert_id: String::new(),
                },
            ),
        ];
        for (body, expected) in cases {
            assert_eq!(read_status(body.as_bytes()), expected, "{body}");
        }
        assert!(matches!(read_status(b"<html>"), Status::Failed { .. }));
        assert!(matches!(
            read_status(br#"{"data":{"isSuccess":"yes"}}"#),
            Status::Failed { .. }
        ));
        let long = format!(
            r#"{{"isSuccess":false,"status":"{}\u001b[2J"}}"#,
            "x".repeat(5000)
        );
        let Status::Processed { text, .. } = read_status(long.as_bytes()) else {
            panic!("not processed");
        };
        assert!(
            text.len() <= TEXT_LIMIT_BYTES + 8 && !text.contains('\u{1b}'),
            "{}",
            text.len()
        );
    }
}

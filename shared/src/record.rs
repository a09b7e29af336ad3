//! The delivery record: the fields of the Redis stream entry of docs/contract.md section 7.

use crate::job::{Alert, AlertJob};
use crate::request::OpsgenieRequest;
use crate::text::cap_bytes;

/// The most bytes a stream field's value holds (docs/contract.md section 8); a longer one is cut on a
/// character boundary and ends with `…`. Ids and numbers never come near it; a producer's
/// slug or team id, or an answer's request id, can.
pub const FIELD_LIMIT_BYTES: usize = 1024;

/// What the shell knows once a request was delivered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery<'a> {
    pub status: u16,
    /// Opsgenie's `requestId`, or empty.
    pub request_id: &'a str,
    pub attempts: u32,
    pub delivered_at_ms: u64,
}

/// The stream entry's fields, in this order: `notification_uuid`, `kind`, `action`,
/// `team_id`, `alias` (empty when none), `organization_id`, then for an issue alert
/// `project_slug`, `group_id` (empty without a group), `rule_ids` (comma-separated), or for a
/// metric alert `incident_identifier`; then `status`, `request_id`, `attempts`,
/// `delivered_at_ms`, and `event` = `delivered`. Every value is at most `FIELD_LIMIT_BYTES`
/// long.
pub fn delivery_fields(
    job: &AlertJob,
    request: &OpsgenieRequest,
    delivery: &Delivery<'_>,
) -> Vec<(&'static str, String)> {
    let mut fields = Vec::with_capacity(15);
    fields.extend([
        ("notification_uuid", job.notification_uuid.clone()),
        ("kind", job.kind().as_str().to_owned()),
        ("action", request.action.as_str().to_owned()),
        ("team_id", job.team_id.clone()),
        ("alias", request.alias.clone().unwrap_or_default()),
        ("organization_id", job.organization.id.to_string()),
    ]);
    match &job.alert {
        Alert::Issue(issue) => {
            let rule_ids: Vec<String> = issue.rules.iter().map(|r| r.id.to_string()).collect();
            fields.extend([
                ("project_slug", issue.project.slug.clone()),
                (
                    "group_id",
                    issue
                        .group
                        .as_ref()
                        .map(|g| g.id.to_string())
                        .unwrap_or_default(),
                ),
                ("rule_ids", rule_ids.join(",")),
            ]);
        }
        Alert::Metric(metric) => {
            fields.push((
                "incident_identifier",
                metric.incident.identifier.to_string(),
            ));
        }
    }
    fields.extend([
        ("status", delivery.status.to_string()),
        ("request_id", delivery.request_id.to_owned()),
        ("attempts", delivery.attempts.to_string()),
        ("delivered_at_ms", delivery.delivered_at_ms.to_string()),
        ("event", "delivered".to_owned()),
    ]);
    for (_, value) in &mut fields {
        if value.len() > FIELD_LIMIT_BYTES {
            *value = cap_bytes(value, FIELD_LIMIT_BYTES).into_owned();
        }
    }
    fields
}

/// How a delivery's confirmation ended (docs/contract.md section 6.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConfirmationEvent {
    /// Opsgenie processed the request: `isSuccess: true`.
    Confirmed,
    /// Opsgenie processed the request and failed it: `isSuccess: false`.
    FailedAsync,
    /// No answer said it was processed within `--confirm-within`.
    Unconfirmed,
}

impl ConfirmationEvent {
    /// `confirmed`, `failed_async`, `unconfirmed`: the stream's `event` field.
    pub fn as_str(self) -> &'static str {
        match self {
            ConfirmationEvent::Confirmed => "confirmed",
            ConfirmationEvent::FailedAsync => "failed_async",
            ConfirmationEvent::Unconfirmed => "unconfirmed",
        }
    }
}

/// What the shell knows once a confirmation ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Confirmation<'a> {
    pub event: ConfirmationEvent,
    pub request_id: &'a str,
    /// Opsgenie's `status` text, or why there is none.
    pub status_text: &'a str,
    /// Opsgenie's `alertId`, or empty.
    pub alert_id: &'a str,
    pub confirmed_at_ms: u64,
}

/// The stream entry of a confirmation, in this order: `notification_uuid`, `event`,
/// `request_id`, `status_text`, `alert_id`, `confirmed_at_ms`. Every value is at most
/// `FIELD_LIMIT_BYTES` long.
pub fn confirmation_fields(
    notification_uuid: &str,
    confirmation: &Confirmation<'_>,
) -> Vec<(&'static str, String)> {
    [
        ("notification_uuid", notification_uuid),
        ("event", confirmation.event.as_str()),
        ("request_id", confirmation.request_id),
        ("status_text", confirmation.status_text),
        ("alert_id", confirmation.alert_id),
    ]
    .into_iter()
    .map(|(name, value)| (name, cap_bytes(value, FIELD_LIMIT_BYTES).into_owned()))
    .chain([("confirmed_at_ms", confirmation.confirmed_at_ms.to_string())])
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::request::build_request;

    fn job(body: &str) -> AlertJob {
        AlertJob::parse(body.as_bytes()).unwrap()
    }

    const ISSUE: &str = r#"{"version":1,"kind":"issue_alert","notification_uuid":"n-1","team_id":"backend",
        "organization":{"id":1,"slug":"acme","url":"https://acme.sentry.io"},
        "project":{"id":7,"slug":"api","name":"API"},
        "group":{"id":1234,"title":"Boom"},
        "event":{"title":"Boom"},
        "rules":[{"id":17,"label":"a"},{"id":18,"label":"b"}]}"#;

    const DELIVERY: Delivery<'static> = Delivery {
        status: 202,
        request_id: "req-9",
        attempts: 2,
        delivered_at_ms: 1732665600123,
    };

    fn fields(job: &AlertJob, delivery: &Delivery<'_>) -> Vec<(&'static str, String)> {
        delivery_fields(job, &build_request(job), delivery)
    }

    fn expect(pairs: &[(&'static str, &str)]) -> Vec<(&'static str, String)> {
        pairs.iter().map(|&(k, v)| (k, v.to_owned())).collect()
    }

    #[test]
    fn issue_alert_fields() {
        assert_eq!(
            fields(&job(ISSUE), &DELIVERY),
            expect(&[
                ("notification_uuid", "n-1"),
                ("kind", "issue_alert"),
                ("action", "create"),
                ("team_id", "backend"),
                ("alias", "sentry: 1234"),
                ("organization_id", "1"),
                ("project_slug", "api"),
                ("group_id", "1234"),
                ("rule_ids", "17,18"),
                ("status", "202"),
                ("request_id", "req-9"),
                ("attempts", "2"),
                ("delivered_at_ms", "1732665600123"),
                ("event", "delivered"),
            ])
        );
    }

    #[test]
    fn issue_alert_without_a_group_has_empty_alias_and_group() {
        let without = ISSUE.replace(r#""group":{"id":1234,"title":"Boom"},"#, "");
        let delivery = Delivery {
            request_id: "",
            ..DELIVERY
        };
        let got = fields(&job(&without), &delivery);
        let get = |key: &str| got.iter().find(|(k, _)| *k == key).unwrap().1.as_str();
        assert_eq!(get("alias"), "");
        assert_eq!(get("group_id"), "");
        assert_eq!(get("request_id"), "");
        assert_eq!(got.len(), 14);
    }

    #[test]
    fn metric_alert_fields() {
        let body = r#"{"version":1,"kind":"metric_alert","notification_uuid":"n-2","team_id":"ops",
            "organization":{"id":3,"slug":"acme","url":"https://acme.sentry.io"},
            "alert_rule":{"id":9,"name":"p95"},
            "incident":{"identifier":314,"status":"resolved","sequence":5}}"#;
        let delivery = Delivery {
            status: 404,
            ..DELIVERY
        };
        assert_eq!(
            fields(&job(body), &delivery),
            expect(&[
                ("notification_uuid", "n-2"),
                ("kind", "metric_alert"),
                ("action", "close"),
                ("team_id", "ops"),
                ("alias", "incident_3_314"),
                ("organization_id", "3"),
                ("incident_identifier", "314"),
                ("status", "404"),
                ("request_id", "req-9"),
                ("attempts", "2"),
                ("delivered_at_ms", "1732665600123"),
                ("event", "delivered"),
            ])
        );
    }

    #[test]
    fn every_field_is_capped_at_a_kilobyte() {
        let rules: Vec<String> = (0..5000)
            .map(|i| format!(r#"{{"id":{i},"label":"x"}}"#))
            .collect();
        let body = format!(
            r#"{{"version":1,"kind":"issue_alert","notification_uuid":"n-2","team_id":"{team}",
            "organization":{{"id":1,"slug":"acme","url":"https://acme.sentry.io"}},
            "project":{{"id":7,"slug":"{slug}","name":"API"}},
            "event":{{"title":"Boom"}},"rules":[{rules}]}}"#,
            team = "t".repeat(3000),
            slug = "é".repeat(400_000),
            rules = rules.join(",")
        );
        let job = job(&body);
        let request_id = "r".repeat(5000);
        let delivery = Delivery {
            request_id: &request_id,
            ..DELIVERY
        };
        let fields = fields(&job, &delivery);
        for (name, value) in &fields {
            assert!(
                value.len() <= FIELD_LIMIT_BYTES,
                "{name}: {} bytes",
                value.len()
            );
        }
        let get = |name: &str| &fields.iter().find(|(n, _)| *n == name).unwrap().1;
        assert!(get("project_slug").starts_with("éé") && get("project_slug").ends_with('…'));
        assert!(get("rule_ids").starts_with("0,1,2,3,") && get("rule_ids").ends_with('…'));
        assert_eq!(get("notification_uuid"), "n-2");
    }

    #[test]
    fn confirmation_fields_in_order_and_capped() {
        let long = "s".repeat(5000);
        let fields = confirmation_fields(
            "n-3",
            &Confirmation {
                event: ConfirmationEvent::FailedAsync,
                request_id: "req-1",
                status_text: &long,
                alert_id: "",
                confirmed_at_ms: 7,
            },
        );
        let names: Vec<&str> = fields.iter().map(|(n, _)| *n).collect();
        assert_eq!(
            names,
            [
                "notification_uuid",
                "event",
                "request_id",
                "status_text",
                "alert_id",
                "confirmed_at_ms"
            ]
        );
        assert_eq!(fields[1].1, "failed_async");
        assert!(fields[3].1.len() <= FIELD_LIMIT_BYTES && fields[3].1.ends_with('…'));
        assert_eq!(fields[5].1, "7");
    }
}

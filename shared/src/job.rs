//! The alert job (schema version 1, docs/contract.md section 3): its types, parsing and validation.

use serde::Deserialize;

/// The largest body a job may have; a larger one is dead-lettered as `too_large` unparsed.
pub const MAX_JOB_BYTES: usize = 1024 * 1024;

/// The only schema version this worker understands.
pub const SCHEMA_VERSION: u64 = 1;

/// One notification to deliver: the fields common to both kinds, and the kind's own.
#[derive(Debug, Clone, PartialEq)]
pub struct AlertJob {
    pub notification_uuid: String,
    pub team_id: String,
    /// As sent; `request::build_request` decides whether it is one Opsgenie accepts.
    pub priority: Option<String>,
    pub organization: Organization,
    pub alert: Alert,
}

// One job is built per message and moved a handful of times; boxing the larger variant
// would cost an allocation and make the type clumsier to match on for nothing measurable.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum Alert {
    Issue(IssueAlert),
    Metric(MetricAlert),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum JobKind {
    IssueAlert,
    MetricAlert,
}

impl JobKind {
    /// The `kind` field's value: `issue_alert` or `metric_alert`.
    pub fn as_str(self) -> &'static str {
        match self {
            JobKind::IssueAlert => "issue_alert",
            JobKind::MetricAlert => "metric_alert",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Organization {
    pub id: i64,
    pub slug: String,
    pub url: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct IssueAlert {
    pub project: Project,
    pub group: Option<Group>,
    pub event: Event,
    /// At least one.
    pub rules: Vec<Rule>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Project {
    pub id: i64,
    pub slug: String,
    pub name: String,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Group {
    pub id: i64,
    pub title: String,
    #[serde(default)]
    pub culprit: Option<String>,
    #[serde(default)]
    pub logger: Option<String>,
    #[serde(default)]
    pub level: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Event {
    #[serde(default)]
    pub event_id: Option<String>,
    #[serde(default)]
    pub message: Option<String>,
    pub title: String,
    #[serde(default)]
    pub release: Option<String>,
    #[serde(default)]
    pub tags: Option<Vec<(String, String)>>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Rule {
    pub id: i64,
    pub label: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct MetricAlert {
    pub alert_rule: AlertRule,
    pub incident: Incident,
    pub text: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct AlertRule {
    pub id: i64,
    pub name: String,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Incident {
    pub identifier: i64,
    pub status: IncidentStatus,
    #[serde(default)]
    pub sequence: Option<i64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IncidentStatus {
    Critical,
    Warning,
    Resolved,
}

/// Why a body is not a job. `Display` is the readable reason that goes into the dead letter's
/// `x-opsgenie-error-message` and the `enqueue` report: for a field, `path: problem`
/// (for example `event.tags[3]: invalid length 1, expected a tuple of size 2`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JobError {
    /// Over `MAX_JOB_BYTES`; never parsed.
    #[error("body is {size} bytes, over the limit of {MAX_JOB_BYTES}")]
    TooLarge { size: usize },
    /// Not UTF-8, not JSON, not an object, or a field missing, mistyped or out of its range.
    /// `path` is empty when the problem is the body as a whole.
    #[error("{}", if path.is_empty() { message.clone() } else { format!("{path}: {message}") })]
    Invalid { path: String, message: String },
}

impl AlertJob {
    /// Parses and validates one job body. Unknown fields are ignored.
    ///
    /// Fails with `JobError::TooLarge` for a body over `MAX_JOB_BYTES` (checked before
    /// anything else) and `JobError::Invalid` for everything docs/contract.md section 3 rules out.
    pub fn parse(body: &[u8]) -> Result<AlertJob, JobError> {
        if body.len() > MAX_JOB_BYTES {
            return Err(JobError::TooLarge { size: body.len() });
        }
        // Checked up front because serde_json skips the strings of unknown fields without
        // validating them, and a job must be UTF-8 as a whole.
        let text = std::str::from_utf8(body)
            .map_err(|e| invalid("", format!("body is not UTF-8: {e}")))?;
        // Most jobs are valid: read them without tracking where the reader is, which costs
        // about as much again, and read a broken one a second time to say where it broke.
        let raw: Object<RawJob> = match serde_json::from_str(text) {
            Ok(raw) => raw,
            Err(_) => {
                let mut de = serde_json::Deserializer::from_str(text);
                let raw = serde_path_to_error::deserialize(&mut de).map_err(json_error)?;
                de.end().map_err(|e| invalid("", e.to_string()))?;
                raw
            }
        };
        raw.0.validate()
    }

    pub fn kind(&self) -> JobKind {
        match self.alert {
            Alert::Issue(_) => JobKind::IssueAlert,
            Alert::Metric(_) => JobKind::MetricAlert,
        }
    }

    /// The Opsgenie alias the request will carry: `sentry: <group.id>` for an issue alert
    /// with a group, `incident_<org.id>_<incident.identifier>` for a metric alert, else none.
    pub fn alias(&self) -> Option<String> {
        match &self.alert {
            Alert::Issue(issue) => issue.group.as_ref().map(|g| format!("sentry: {}", g.id)),
            Alert::Metric(metric) => Some(format!(
                "incident_{}_{}",
                self.organization.id, metric.incident.identifier
            )),
        }
    }

    /// `incident.sequence` of a metric alert.
    pub fn sequence(&self) -> Option<i64> {
        match &self.alert {
            Alert::Metric(m) => m.incident.sequence,
            Alert::Issue(_) => None,
        }
    }
}

/// The wire form: one pass over the body, the fields of both kinds optional, so that a
/// problem is reported with its path before the kind's own rules are checked.
#[derive(Deserialize)]
struct RawJob {
    version: Option<u64>,
    kind: Option<String>,
    notification_uuid: Option<String>,
    team_id: Option<String>,
    priority: Option<String>,
    organization: Option<Object<Organization>>,
    project: Option<Object<Project>>,
    group: Option<Object<Group>>,
    event: Option<Object<Event>>,
    rules: Option<Vec<Object<Rule>>>,
    alert_rule: Option<Object<AlertRule>>,
    incident: Option<Object<Incident>>,
    text: Option<String>,
}

impl RawJob {
    fn validate(self) -> Result<AlertJob, JobError> {
        let version = required(self.version, "version")?;
        if version != SCHEMA_VERSION {
            return Err(invalid("version", format!("unsupported version {version}")));
        }
        let kind = match required(self.kind, "kind")?.as_str() {
            "issue_alert" => JobKind::IssueAlert,
            "metric_alert" => JobKind::MetricAlert,
            other => return Err(invalid("kind", format!("unknown kind {other:?}"))),
        };
        let notification_uuid = required(self.notification_uuid, "notification_uuid")?;
        if !(1..=100).contains(&notification_uuid.chars().count()) {
            return Err(invalid("notification_uuid", "must be 1 to 100 characters"));
        }
        let team_id = required(self.team_id, "team_id")?;
        if team_id.is_empty() {
            return Err(invalid("team_id", "must not be empty"));
        }
        let organization = required(self.organization, "organization")?.0;
        if !is_http_url(&organization.url) {
            return Err(invalid(
                "organization.url",
                "must be an absolute http:// or https:// URL with a host",
            ));
        }
        let alert = match kind {
            JobKind::IssueAlert => {
                let rules: Vec<Rule> = required(self.rules, "rules")?
                    .into_iter()
                    .map(|r| r.0)
                    .collect();
                if rules.is_empty() {
                    return Err(invalid("rules", "at least one rule is required"));
                }
                Alert::Issue(IssueAlert {
                    project: required(self.project, "project")?.0,
                    group: self.group.map(|g| g.0),
                    event: required(self.event, "event")?.0,
                    rules,
                })
            }
            JobKind::MetricAlert => Alert::Metric(MetricAlert {
                alert_rule: required(self.alert_rule, "alert_rule")?.0,
                incident: required(self.incident, "incident")?.0,
                text: self.text,
            }),
        };
        Ok(AlertJob {
            notification_uuid,
            team_id,
            priority: self.priority,
            organization,
            alert,
        })
    }
}

/// A JSON object, nothing else. Derived structs also accept an array of their fields in
/// order, which would let a mistyped field through.
struct Object<T>(T);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Object<T> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ObjectVisitor<T>(std::marker::PhantomData<T>);

        impl<'de, T: Deserialize<'de>> serde::de::Visitor<'de> for ObjectVisitor<T> {
            type Value = Object<T>;

            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }

            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<Self::Value, A::Error> {
                T::deserialize(serde::de::value::MapAccessDeserializer::new(map)).map(Object)
            }
        }

        deserializer.deserialize_map(ObjectVisitor(std::marker::PhantomData))
    }
}

fn invalid(path: &str, message: impl Into<String>) -> JobError {
    JobError::Invalid {
        path: path.to_owned(),
        message: message.into(),
    }
}

fn required<T>(value: Option<T>, path: &str) -> Result<T, JobError> {
    value.ok_or_else(|| invalid(path, "missing field"))
}

fn json_error(e: serde_path_to_error::Error<serde_json::Error>) -> JobError {
    // `.` is the root; `?` is a key that could not be read, which says nothing useful.
    let path = match e.path().to_string() {
        root if root == "." || root == "?" => String::new(),
        path => path,
    };
    let inner = e.into_inner();
    let mut message = inner.to_string();
    // A field's path already says where a data error is; the position only helps with syntax.
    if inner.classify() == serde_json::error::Category::Data {
        let position = format!(" at line {} column {}", inner.line(), inner.column());
        if let Some(stripped) = message.strip_suffix(&position) {
            message.truncate(stripped.len());
        }
    }
    JobError::Invalid { path, message }
}

/// An absolute `http` or `https` URL with a non-empty host and no white space.
fn is_http_url(url: &str) -> bool {
    let Some((scheme, rest)) = url.split_once("://") else {
        return false;
    };
    if !(scheme.eq_ignore_ascii_case("http") || scheme.eq_ignore_ascii_case("https")) {
        return false;
    }
    if url.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return false;
    }
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let host = if host_port.starts_with('[') {
        host_port
            .split_once(']')
            .map_or("", |(h, _)| h.trim_start_matches('['))
    } else {
        host_port.split(':').next().unwrap_or_default()
    };
    !host.is_empty()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    fn issue_json() -> Value {
        json!({"version":1,"kind":"issue_alert","notification_uuid":"3f1c9a2e-5d7b-4e1a-9c2f-0b8d6e4a1f37",
         "team_id":"backend","priority":"P2",
         "organization":{"id":1,"slug":"acme","url":"https://acme.sentry.io"},
         "project":{"id":7,"slug":"api","name":"API"},
         "group":{"id":1234,"title":"ZeroDivisionError: division by zero","culprit":"app.views.divide","logger":"","level":"error"},
         "event":{"event_id":"9fe1b6f0","message":"","title":"ZeroDivisionError: division by zero","release":"api@1.4.2",
                  "tags":[["level","error"],["environment","prod"]]},
         "rules":[{"id":17,"label":"Errors in prod"}]})
    }

    fn metric_json() -> Value {
        json!({"version":1,"kind":"metric_alert","notification_uuid":"b7e2d4c1-0a9f-4c3e-8d21-6f5a7b9c0e12",
         "team_id":"backend",
         "organization":{"id":1,"slug":"acme","url":"https://acme.sentry.io"},
         "alert_rule":{"id":9,"name":"p95 latency above 2s"},
         "incident":{"identifier":314,"status":"critical","sequence":1732665600000_i64},
         "text":"p95(transaction.duration) is 2480ms in the last 5 minutes"})
    }

    /// Sets the value at a `/`-separated pointer, or removes it when `value` is `None`.
    fn with(mut job: Value, pointer: &str, value: Option<Value>) -> Vec<u8> {
        let (parent, key) = pointer.rsplit_once('/').unwrap();
        let target = job.pointer_mut(parent).unwrap();
        match (target, value) {
            (Value::Object(map), Some(v)) => {
                map.insert(key.to_owned(), v);
            }
            (Value::Object(map), None) => {
                map.remove(key);
            }
            (Value::Array(items), Some(v)) => items[key.parse::<usize>().unwrap()] = v,
            _ => panic!("bad pointer {pointer}"),
        }
        serde_json::to_vec(&job).unwrap()
    }

    fn error_of(body: &[u8]) -> String {
        match AlertJob::parse(body) {
            Ok(job) => panic!("parsed {job:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn parses_the_spec_examples() {
        let issue = AlertJob::parse(&serde_json::to_vec(&issue_json()).unwrap()).unwrap();
        assert_eq!(issue.kind(), JobKind::IssueAlert);
        assert_eq!(issue.priority.as_deref(), Some("P2"));
        assert_eq!(issue.alias().as_deref(), Some("sentry: 1234"));
        assert_eq!(issue.sequence(), None);
        let Alert::Issue(alert) = &issue.alert else {
            panic!("not an issue alert")
        };
        assert_eq!(alert.group.as_ref().unwrap().logger.as_deref(), Some(""));
        assert_eq!(
            alert.event.tags.as_deref().unwrap(),
            [
                ("level".into(), "error".into()),
                ("environment".into(), "prod".into())
            ]
        );
        assert_eq!(
            alert.rules,
            [Rule {
                id: 17,
                label: "Errors in prod".into()
            }]
        );

        let metric = AlertJob::parse(&serde_json::to_vec(&metric_json()).unwrap()).unwrap();
        assert_eq!(metric.kind(), JobKind::MetricAlert);
        assert_eq!(metric.priority, None);
        assert_eq!(metric.alias().as_deref(), Some("incident_1_314"));
        assert_eq!(metric.sequence(), Some(1732665600000));
        let Alert::Metric(alert) = &metric.alert else {
            panic!("not a metric alert")
        };
        assert_eq!(alert.incident.status, IncidentStatus::Critical);
        assert_eq!(
            alert.alert_rule,
            AlertRule {
                id: 9,
                name: "p95 latency above 2s".into()
            }
        );
    }

    #[test]
    fn optional_parts_may_be_absent_or_null() {
        let body = with(issue_json(), "/group", None);
        let job = AlertJob::parse(&body).unwrap();
        assert_eq!(job.alias(), None);

        let body = with(issue_json(), "/group", Some(Value::Null));
        assert_eq!(AlertJob::parse(&body).unwrap().alias(), None);

        let mut v = metric_json();
        v.as_object_mut().unwrap().remove("text");
        v["incident"].as_object_mut().unwrap().remove("sequence");
        let job = AlertJob::parse(&serde_json::to_vec(&v).unwrap()).unwrap();
        assert_eq!(job.sequence(), None);
        let Alert::Metric(alert) = job.alert else {
            panic!("not a metric alert")
        };
        assert_eq!(alert.text, None);
    }

    #[test]
    fn unknown_fields_are_ignored() {
        let mut v = issue_json();
        v["future"] = json!({"deep": [1, 2, {"x": null}]});
        v["event"]["extra"] = json!("yes");
        v["organization"]["region"] = json!("eu");
        let job = AlertJob::parse(&serde_json::to_vec(&v).unwrap()).unwrap();
        assert_eq!(job.organization.slug, "acme");
    }

    #[test]
    fn rejects_bad_fields_with_their_path() {
        let too_long_uuid = json!("u".repeat(101));
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (
                with(issue_json(), "/organization/url", None),
                "organization: missing field `url`",
            ),
            (
                with(issue_json(), "/version", None),
                "version: missing field",
            ),
            (with(issue_json(), "/kind", None), "kind: missing field"),
            (
                with(issue_json(), "/notification_uuid", None),
                "notification_uuid: missing field",
            ),
            (
                with(issue_json(), "/team_id", None),
                "team_id: missing field",
            ),
            (
                with(issue_json(), "/organization", None),
                "organization: missing field",
            ),
            (
                with(issue_json(), "/project", None),
                "project: missing field",
            ),
            (with(issue_json(), "/event", None), "event: missing field"),
            (with(issue_json(), "/rules", None), "rules: missing field"),
            (
                with(metric_json(), "/alert_rule", None),
                "alert_rule: missing field",
            ),
            (
                with(metric_json(), "/incident", None),
                "incident: missing field",
            ),
            (
                with(issue_json(), "/event/title", None),
                "event: missing field `title`",
            ),
            (
                with(issue_json(), "/team_id", Some(json!(5))),
                "team_id: invalid type: integer `5`, expected a string",
            ),
            (
                with(issue_json(), "/group/id", Some(json!("1234"))),
                "group.id: invalid type: string \"1234\", expected i64",
            ),
            (
                with(
                    issue_json(),
                    "/event/tags",
                    Some(json!([["a", "b"], ["c", "d"], ["e", "f"], ["g"]])),
                ),
                "event.tags[3]: invalid length 1, expected a tuple of size 2",
            ),
            (
                with(issue_json(), "/event/tags", Some(json!([["a", 1]]))),
                "event.tags[0][1]: invalid type: integer `1`, expected a string",
            ),
            (
                with(issue_json(), "/rules/0", Some(json!({"id": 1}))),
                "rules[0]: missing field `label`",
            ),
            (
                with(
                    issue_json(),
                    "/organization",
                    Some(json!([1, "acme", "https://acme.sentry.io"])),
                ),
                "organization: invalid type: sequence, expected a JSON object",
            ),
            (
                with(issue_json(), "/version", Some(json!(2))),
                "version: unsupported version 2",
            ),
            (
                with(issue_json(), "/version", Some(json!(0))),
                "version: unsupported version 0",
            ),
            (
                with(issue_json(), "/version", Some(json!("1"))),
                "version: invalid type: string \"1\", expected u64",
            ),
            (
                with(issue_json(), "/version", Some(json!(1.0))),
                "version: invalid type: floating point `1.0`, expected u64",
            ),
            (
                with(issue_json(), "/kind", Some(json!("x"))),
                "kind: unknown kind \"x\"",
            ),
            (
                with(issue_json(), "/rules", Some(json!([]))),
                "rules: at least one rule is required",
            ),
            (
                with(metric_json(), "/incident/status", Some(json!("open"))),
                "incident.status: unknown variant `open`, expected one of `critical`, `warning`, `resolved`",
            ),
            (
                with(issue_json(), "/notification_uuid", Some(json!(""))),
                "notification_uuid: must be 1 to 100 characters",
            ),
            (
                with(issue_json(), "/notification_uuid", Some(too_long_uuid)),
                "notification_uuid: must be 1 to 100 characters",
            ),
            (
                with(issue_json(), "/team_id", Some(json!(""))),
                "team_id: must not be empty",
            ),
        ];
        for (body, expected) in cases {
            assert_eq!(
                error_of(&body),
                expected,
                "{}",
                String::from_utf8_lossy(&body)
            );
        }
    }

    #[test]
    fn notification_uuid_counts_chars_not_bytes() {
        let body = with(
            issue_json(),
            "/notification_uuid",
            Some(json!("ü".repeat(100))),
        );
        assert_eq!(
            AlertJob::parse(&body)
                .unwrap()
                .notification_uuid
                .chars()
                .count(),
            100
        );
    }

    #[test]
    fn organization_url_must_be_absolute_http() {
        let table = [
            ("https://acme.sentry.io", true),
            ("http://localhost:9000/", true),
            ("HTTPS://acme.sentry.io/base", true),
            ("https://user@[::1]:8443", true),
            ("ftp://acme.sentry.io", false),
            ("acme.sentry.io", false),
            ("/organizations/acme", false),
            ("https://", false),
            ("https:///path", false),
            ("https://:443", false),
            ("https://acme .sentry.io", false),
            ("javascript://%0aalert(1)", false),
            ("", false),
        ];
        for (url, ok) in table {
            let body = with(issue_json(), "/organization/url", Some(json!(url)));
            match AlertJob::parse(&body) {
                Ok(_) => assert!(ok, "{url} was accepted"),
                Err(e) => {
                    assert!(!ok, "{url} was rejected: {e}");
                    assert_eq!(
                        e,
                        JobError::Invalid {
                            path: "organization.url".into(),
                            message: "must be an absolute http:// or https:// URL with a host"
                                .into()
                        }
                    );
                }
            }
        }
    }

    #[test]
    fn rejects_bodies_that_are_not_a_json_object() {
        let cases: [(&[u8], &str); 7] = [
            (b"[1]", "invalid type: sequence, expected a JSON object"),
            (
                b"\"job\"",
                "invalid type: string \"job\", expected a JSON object",
            ),
            (b"null", "invalid type: null, expected a JSON object"),
            (b"", "EOF while parsing a value"),
            (b"{\"version\":1", "EOF while parsing an object"),
            (b"not json", "expected ident"),
            (b"{} x", "trailing characters"),
        ];
        for (body, prefix) in cases {
            let err = AlertJob::parse(body).unwrap_err();
            let JobError::Invalid { path, message } = &err else {
                panic!("{err:?}")
            };
            assert_eq!(path, "", "{err}");
            assert!(message.starts_with(prefix), "{message}");
        }
    }

    #[test]
    fn trailing_garbage_after_a_valid_job_is_rejected() {
        let mut body = serde_json::to_vec(&issue_json()).unwrap();
        body.extend_from_slice(b" {}");
        assert!(error_of(&body).starts_with("trailing characters at line 1"));
        // White space after the object is fine.
        let mut body = serde_json::to_vec(&issue_json()).unwrap();
        body.extend_from_slice(b" \n\t");
        assert!(AlertJob::parse(&body).is_ok());
    }

    #[test]
    fn rejects_bodies_that_are_not_utf8() {
        let valid = serde_json::to_vec(&issue_json()).unwrap();
        for (needle, replacement) in [
            (&b"backend"[..], &b"back\xffend"[..]),
            (b"\"future\"", b"\"fu\xc3\""),
        ] {
            let mut text = valid.clone();
            if needle == b"\"future\"" {
                // An unknown field is not looked at by the JSON parser, so it proves the
                // whole body is checked.
                text.pop();
                text.extend_from_slice(b",\"future\":1}");
            }
            let at = text
                .windows(needle.len())
                .position(|w| w == needle)
                .unwrap();
            text.splice(at..at + needle.len(), replacement.iter().copied());
            let err = error_of(&text);
            assert!(err.starts_with("body is not UTF-8"), "{err}");
        }
    }

    #[test]
    fn rejects_a_lone_surrogate_in_a_field() {
        for (escape, expected) in [
            (r"\ud800", "unexpected end of hex escape"),
            (r"\ud800x", "unexpected end of hex escape"),
            (r"\ud800\u0041", "lone leading surrogate in hex escape"),
            (r"\udc00", "lone leading surrogate in hex escape"),
        ] {
            let body = format!(
                r#"{{"version":1,"kind":"issue_alert","notification_uuid":"a","team_id":"{escape}"}}"#
            );
            let err = AlertJob::parse(body.as_bytes()).unwrap_err();
            let JobError::Invalid { path, message } = err else {
                panic!("not invalid")
            };
            assert_eq!(path, "team_id", "{escape}");
            assert!(message.starts_with(expected), "{escape}: {message}");
        }
        // A proper pair is a character like any other.
        let mut v = issue_json();
        v["team_id"] = json!("\u{1F600}");
        let pair = serde_json::to_string(&v)
            .unwrap()
            .replace('\u{1F600}', "\\ud83d\\ude00");
        assert_eq!(
            AlertJob::parse(pair.as_bytes()).unwrap().team_id,
            "\u{1F600}"
        );
    }

    #[test]
    fn size_is_checked_before_anything_else() {
        let body = vec![0xff; MAX_JOB_BYTES + 1];
        assert_eq!(
            AlertJob::parse(&body),
            Err(JobError::TooLarge {
                size: MAX_JOB_BYTES + 1
            })
        );
        assert_eq!(
            JobError::TooLarge {
                size: MAX_JOB_BYTES + 1
            }
            .to_string(),
            "body is 1048577 bytes, over the limit of 1048576"
        );

        let mut exactly = serde_json::to_vec(&issue_json()).unwrap();
        exactly.resize(MAX_JOB_BYTES, b' ');
        assert!(AlertJob::parse(&exactly).is_ok());
    }

    #[test]
    fn alias_per_kind() {
        let job = |v: Value| AlertJob::parse(&serde_json::to_vec(&v).unwrap()).unwrap();
        let mut issue = issue_json();
        issue["group"]["id"] = json!(-5);
        assert_eq!(job(issue).alias().as_deref(), Some("sentry: -5"));
        let mut metric = metric_json();
        metric["organization"]["id"] = json!(42);
        metric["incident"]["identifier"] = json!(7);
        assert_eq!(job(metric).alias().as_deref(), Some("incident_42_7"));
    }
}

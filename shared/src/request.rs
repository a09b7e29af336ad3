//! The Opsgenie request a job becomes (docs/contract.md section 5).

use serde::Serialize;

use crate::job::{Alert, AlertJob, IncidentStatus, IssueAlert, MetricAlert};
use crate::text::{chars, seg, truncate};

/// Opsgenie's limits on the fields of a create request.
pub const MESSAGE_LIMIT: usize = 130;
pub const ALIAS_LIMIT: usize = 512;
pub const ENTITY_LIMIT: usize = 512;
pub const DESCRIPTION_LIMIT: usize = 15000;
pub const TAG_LIMIT: usize = 50;
pub const MAX_TAGS: usize = 20;
/// The cap on the sum of `chars(key) + chars(value)` over `details`.
pub const DETAILS_LIMIT: usize = 8000;

const SOURCE: &str = "Sentry";

/// What a request does to the alert.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action {
    Create,
    Close,
}

impl Action {
    /// `create` or `close`, as in the delivery record and the logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Create => "create",
            Action::Close => "close",
        }
    }
}

/// One HTTP request to the Alert API, relative to the team's API base URL. Always `POST`
/// with a JSON body; the shell adds the base URL and the headers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpsgenieRequest {
    pub action: Action,
    /// The path below the API base: `/v2/alerts` or `/v2/alerts/<seg(alias)>/close`.
    pub path: String,
    /// The query without `?`: `identifierType=alias` on a close, else empty.
    pub query: &'static str,
    /// The serialized JSON body, keys in the order docs/contract.md section 5 lists them.
    pub body: Vec<u8>,
    /// The alias the request carries or names (see `AlertJob::alias`).
    pub alias: Option<String>,
    /// The job's `priority` when it was present but not one of P1..P5 (so the default applied
    /// and the shell logs a warning).
    pub ignored_priority: Option<String>,
}

/// Builds the request for a validated job, exactly as docs/contract.md section 5 says.
pub fn build_request(job: &AlertJob) -> OpsgenieRequest {
    let alias = job.alias();
    let base = job.organization.url.trim_end_matches('/');
    let org_slug = seg(&job.organization.slug);
    let uuid = seg(&job.notification_uuid);
    let valid_priority = job.priority.as_deref().filter(|p| is_priority(p));

    let context = JobContext {
        alias: alias.clone(),
        base,
        org_slug: &org_slug,
        uuid: &uuid,
        priority: valid_priority,
    };
    let body = match &job.alert {
        Alert::Metric(metric) if metric.incident.status == IncidentStatus::Resolved => {
            let path = format!(
                "/v2/alerts/{}/close",
                seg(alias.as_deref().unwrap_or_default())
            );
            return OpsgenieRequest {
                action: Action::Close,
                path,
                query: "identifierType=alias",
                body: to_json(&CloseBody { source: SOURCE }),
                alias,
                // A close carries no priority, so nothing was ignored.
                ignored_priority: None,
            };
        }
        Alert::Metric(metric) => metric_body(metric, context),
        Alert::Issue(issue) => issue_body(issue, context),
    };
    OpsgenieRequest {
        action: Action::Create,
        path: "/v2/alerts".to_owned(),
        query: "",
        body: to_json(&body),
        alias,
        ignored_priority: job.priority.clone().filter(|p| !is_priority(p)),
    }
}

fn is_priority(p: &str) -> bool {
    matches!(p, "P1" | "P2" | "P3" | "P4" | "P5")
}

/// What the create body of every kind of job takes from the job as a whole.
struct JobContext<'a> {
    alias: Option<String>,
    base: &'a str,
    org_slug: &'a str,
    uuid: &'a str,
    priority: Option<&'a str>,
}

fn issue_body<'a>(issue: &'a IssueAlert, context: JobContext<'a>) -> CreateBody<'a> {
    let JobContext {
        alias,
        base,
        org_slug,
        uuid,
        priority,
    } = context;
    let event = &issue.event;
    let message = [event.message.as_deref(), Some(event.title.as_str())]
        .into_iter()
        .flatten()
        .find(|m| !m.is_empty())
        .unwrap_or("<unlabeled event>");
    let tags = event.tags.as_ref().map(|tags| {
        tags.iter()
            .take(MAX_TAGS)
            .map(|(k, v)| {
                let mut tag = String::with_capacity(k.len() + 1 + v.len());
                for part in [k.as_str(), ":", v.as_str()] {
                    if part.contains(',') {
                        tag.extend(part.chars().filter(|&c| c != ','));
                    } else {
                        tag.push_str(part);
                    }
                }
                if tag.len() > TAG_LIMIT {
                    tag = truncate(&tag, TAG_LIMIT);
                }
                tag
            })
            .collect()
    });

    let mut details: Vec<(&'static str, DetailValue)> = Vec::with_capacity(10);
    if let Some(group) = &issue.group {
        let issue_url = format!(
            "{base}/organizations/{org_slug}/issues/{}/?referrer=opsgenie&notification_uuid={uuid}",
            group.id
        );
        details.extend([
            ("Sentry ID", DetailValue::of(&group.id.to_string())),
            ("Sentry Group", DetailValue::of(&group.title)),
            ("Project ID", DetailValue::of(&issue.project.slug)),
            ("Project Name", DetailValue::of(&issue.project.name)),
            (
                "Logger",
                DetailValue::of(group.logger.as_deref().unwrap_or_default()),
            ),
            (
                "Level",
                DetailValue::of(group.level.as_deref().unwrap_or_default()),
            ),
            ("Issue URL", DetailValue::of(&issue_url)),
        ]);
    }
    // The rule labels and URLs are joined as docs/contract.md section 5 says, but only as far as the
    // details cap can keep: each URL repeats the organization's base, so a job with a long
    // base and many rules would otherwise ask for (rules x base) bytes before the cap trims
    // them. The full length in chars is still counted, so the cap shrinks them exactly as if
    // they had been joined whole.
    let mut labels = DetailValue::default();
    for (i, rule) in issue.rules.iter().enumerate() {
        if i > 0 {
            labels.push(", ");
        }
        labels.push(&rule.label);
    }
    let rules_base = format!(
        "{base}/organizations/{org_slug}/alerts/rules/{}/",
        seg(&issue.project.slug)
    );
    let rules_base_chars = chars(&rules_base);
    let mut urls = DetailValue::default();
    for (i, rule) in issue.rules.iter().enumerate() {
        if i > 0 {
            urls.push("\n");
        }
        urls.push_counted(&rules_base, rules_base_chars);
        urls.push(&rule.id.to_string());
        urls.push("/details/");
    }
    details.push(("Triggering Rules", labels));
    details.push(("Triggering Rule URLs", urls));
    if let Some(release) = &event.release {
        details.push(("Release", DetailValue::of(release)));
    }

    CreateBody {
        message: truncate(message, MESSAGE_LIMIT),
        alias,
        description: None,
        entity: issue
            .group
            .as_ref()
            .map(|g| truncate(g.culprit.as_deref().unwrap_or_default(), ENTITY_LIMIT)),
        source: SOURCE,
        priority: priority.unwrap_or("P3"),
        tags,
        details: Details::within_limit(details),
    }
}

fn metric_body<'a>(metric: &'a MetricAlert, context: JobContext<'a>) -> CreateBody<'a> {
    let JobContext {
        alias,
        base,
        org_slug,
        uuid,
        priority,
    } = context;
    let rule = &metric.alert_rule;
    let message = if rule.name.is_empty() {
        format!("Metric alert {}", rule.id)
    } else {
        truncate(&rule.name, MESSAGE_LIMIT)
    };
    let default_priority = match metric.incident.status {
        IncidentStatus::Critical => "P1",
        _ => "P2",
    };
    let url = format!(
        "{base}/organizations/{org_slug}/alerts/rules/details/{}/?alert={}&referrer=metric_alert_opsgenie&notification_uuid={uuid}",
        rule.id, metric.incident.identifier
    );
    CreateBody {
        message,
        alias,
        description: metric
            .text
            .as_deref()
            .filter(|t| !t.is_empty())
            .map(|t| truncate(t, DESCRIPTION_LIMIT)),
        entity: None,
        source: SOURCE,
        priority: priority.unwrap_or(default_priority),
        tags: None,
        details: Details::within_limit(vec![("URL", DetailValue::of(&url))]),
    }
}

/// Keys in the order docs/contract.md section 5 lists them; an issue alert never has a description and
/// a metric alert never has an entity or tags, so one order fits both.
#[derive(Serialize)]
struct CreateBody<'a> {
    message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    alias: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    description: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    entity: Option<String>,
    source: &'static str,
    priority: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    tags: Option<Vec<String>>,
    details: Details,
}

#[derive(Serialize)]
struct CloseBody {
    source: &'static str,
}

/// A `details` value as the cap sees it: its first `DETAILS_LIMIT` chars, which is all the
/// cap can ever keep of it, and its whole length in chars, which decides how much it keeps.
#[derive(Debug, Default)]
struct DetailValue {
    kept: String,
    /// Chars in `kept`: at most `DETAILS_LIMIT`.
    kept_chars: usize,
    /// Chars of the whole value, kept or not.
    chars: usize,
}

impl DetailValue {
    fn of(s: &str) -> DetailValue {
        let mut value = DetailValue::default();
        value.push(s);
        value
    }

    /// Appends `s`.
    fn push(&mut self, s: &str) {
        if self.kept_chars == DETAILS_LIMIT {
            self.chars += chars(s);
        } else {
            self.push_counted(s, chars(s));
        }
    }

    /// Appends `s`, whose length in chars the caller already knows, so that a long piece
    /// appended many times is counted once, not once per time.
    fn push_counted(&mut self, s: &str, s_chars: usize) {
        self.chars += s_chars;
        let room = DETAILS_LIMIT - self.kept_chars;
        if room == 0 {
            return;
        }
        if s_chars <= room {
            self.kept.push_str(s);
            self.kept_chars += s_chars;
        } else {
            let cut = s.char_indices().nth(room).map_or(s.len(), |(i, _)| i);
            self.kept.push_str(&s[..cut]);
            self.kept_chars = DETAILS_LIMIT;
        }
    }

    /// `truncate(value, n)` for `n` below the whole length and at most `DETAILS_LIMIT`.
    fn truncate_to(&mut self, n: usize) {
        let cut = self
            .kept
            .char_indices()
            .nth(n.saturating_sub(1))
            .map_or(self.kept.len(), |(i, _)| i);
        self.kept.truncate(cut);
        if n > 0 {
            self.kept.push('…');
        }
        self.kept_chars = n;
        self.chars = n;
    }
}

/// `details` as a JSON object whose keys keep their order.
struct Details(Vec<(&'static str, String)>);

impl Details {
    /// Shrinks the longest value (the first on a tie) until the entries fit Opsgenie's cap.
    ///
    /// Every value that is left whole ends within the cap, and a shrunk one keeps at most
    /// `DETAILS_LIMIT` chars of its start, so the first `DETAILS_LIMIT` chars of each value
    /// are all this needs of it.
    fn within_limit(mut entries: Vec<(&'static str, DetailValue)>) -> Details {
        let mut total: usize = entries.iter().map(|(k, v)| chars(k) + v.chars).sum();
        while total > DETAILS_LIMIT {
            let excess = total - DETAILS_LIMIT;
            let mut longest = 0;
            for (i, (_, v)) in entries.iter().enumerate() {
                if v.chars > entries[longest].1.chars {
                    longest = i;
                }
            }
            let size = entries[longest].1.chars;
            // Keys alone never reach the cap, but a loop that cannot shrink must not spin.
            if size <= 1 {
                break;
            }
            let keep = size.saturating_sub(excess).max(1);
            entries[longest].1.truncate_to(keep);
            total = total - size + keep;
        }
        Details(entries.into_iter().map(|(k, v)| (k, v.kept)).collect())
    }
}

impl Serialize for Details {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_map(self.0.iter().map(|(k, v)| (k, v)))
    }
}

fn to_json<T: Serialize>(body: &T) -> Vec<u8> {
    // Only strings and string maps go in, which serde_json always serializes.
    serde_json::to_vec(body).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::{AlertRule, Event, Group, Incident, Organization, Project, Rule};
    use proptest::prelude::*;
    use serde::Deserialize;
    use serde::de::{MapAccess, Visitor};
    use serde_json::Value;

    fn issue_job() -> AlertJob {
        AlertJob {
            notification_uuid: "3f1c9a2e-5d7b-4e1a-9c2f-0b8d6e4a1f37".into(),
            team_id: "backend".into(),
            priority: Some("P2".into()),
            organization: Organization {
                id: 1,
                slug: "acme".into(),
                url: "https://acme.sentry.io".into(),
            },
            alert: Alert::Issue(IssueAlert {
                project: Project {
                    id: 7,
                    slug: "api".into(),
                    name: "API".into(),
                },
                group: Some(Group {
                    id: 1234,
                    title: "ZeroDivisionError: division by zero".into(),
                    culprit: Some("app.views.divide".into()),
                    logger: Some("".into()),
                    level: Some("error".into()),
                }),
                event: Event {
                    event_id: Some("9fe1b6f0".into()),
                    message: Some("".into()),
                    title: "ZeroDivisionError: division by zero".into(),
                    release: Some("api@1.4.2".into()),
                    tags: Some(vec![
                        ("level".into(), "error".into()),
                        ("environment".into(), "prod".into()),
                    ]),
                },
                rules: vec![Rule {
                    id: 17,
                    label: "Errors in prod".into(),
                }],
            }),
        }
    }

    fn metric_job(status: IncidentStatus) -> AlertJob {
        AlertJob {
            notification_uuid: "b7e2d4c1-0a9f-4c3e-8d21-6f5a7b9c0e12".into(),
            team_id: "backend".into(),
            priority: None,
            organization: Organization {
                id: 1,
                slug: "acme".into(),
                url: "https://acme.sentry.io".into(),
            },
            alert: Alert::Metric(MetricAlert {
                alert_rule: AlertRule {
                    id: 9,
                    name: "p95 latency above 2s".into(),
                },
                incident: Incident {
                    identifier: 314,
                    status,
                    sequence: Some(1732665600000),
                },
                text: Some("p95(transaction.duration) is 2480ms in the last 5 minutes".into()),
            }),
        }
    }

    fn issue(job: &mut AlertJob) -> &mut IssueAlert {
        match &mut job.alert {
            Alert::Issue(issue) => issue,
            Alert::Metric(_) => panic!("not an issue alert"),
        }
    }

    fn metric(job: &mut AlertJob) -> &mut MetricAlert {
        match &mut job.alert {
            Alert::Metric(metric) => metric,
            Alert::Issue(_) => panic!("not a metric alert"),
        }
    }

    /// A JSON object with its keys in the order they were written.
    #[derive(Debug)]
    struct Ordered(Vec<(String, Value)>);

    impl<'de> Deserialize<'de> for Ordered {
        fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V;
            impl<'de> Visitor<'de> for V {
                type Value = Ordered;
                fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                    f.write_str("an object")
                }
                fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Ordered, A::Error> {
                    let mut entries = Vec::new();
                    while let Some(entry) = map.next_entry()? {
                        entries.push(entry);
                    }
                    Ok(Ordered(entries))
                }
            }
            d.deserialize_map(V)
        }
    }

    impl Ordered {
        fn keys(&self) -> Vec<&str> {
            self.0.iter().map(|(k, _)| k.as_str()).collect()
        }
        fn get(&self, key: &str) -> Option<&Value> {
            self.0.iter().find(|(k, _)| k == key).map(|(_, v)| v)
        }
        fn str(&self, key: &str) -> &str {
            self.get(key)
                .and_then(Value::as_str)
                .unwrap_or_else(|| panic!("no string {key}"))
        }
    }

    fn body(req: &OpsgenieRequest) -> Ordered {
        serde_json::from_slice(&req.body).unwrap()
    }

    fn details(req: &OpsgenieRequest) -> Vec<(String, String)> {
        #[derive(Deserialize)]
        struct WithDetails {
            details: Ordered,
        }
        let parsed: WithDetails = serde_json::from_slice(&req.body).unwrap();
        parsed
            .details
            .0
            .into_iter()
            .map(|(k, v)| (k, v.as_str().unwrap().to_owned()))
            .collect()
    }

    fn detail(req: &OpsgenieRequest, key: &str) -> Option<String> {
        details(req)
            .into_iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v)
    }

    fn details_size(details: &[(String, String)]) -> usize {
        details.iter().map(|(k, v)| chars(k) + chars(v)).sum()
    }

    #[test]
    fn issue_example_body_is_exact() {
        let req = build_request(&issue_job());
        assert_eq!(req.action, Action::Create);
        assert_eq!(req.path, "/v2/alerts");
        assert_eq!(req.query, "");
        assert_eq!(req.alias.as_deref(), Some("sentry: 1234"));
        assert_eq!(req.ignored_priority, None);
        let expected = concat!(
            r#"{"message":"ZeroDivisionError: division by zero","alias":"sentry: 1234","#,
            r#""entity":"app.views.divide","source":"Sentry","priority":"P2","#,
            r#""tags":["level:error","environment:prod"],"details":{"Sentry ID":"1234","#,
            r#""Sentry Group":"ZeroDivisionError: division by zero","Project ID":"api","#,
            r#""Project Name":"API","Logger":"","Level":"error","#,
            r#""Issue URL":"https://acme.sentry.io/organizations/acme/issues/1234/?referrer=opsgenie&notification_uuid=3f1c9a2e-5d7b-4e1a-9c2f-0b8d6e4a1f37","#,
            r#""Triggering Rules":"Errors in prod","#,
            r#""Triggering Rule URLs":"https://acme.sentry.io/organizations/acme/alerts/rules/api/17/details/","#,
            r#""Release":"api@1.4.2"}}"#
        );
        assert_eq!(String::from_utf8(req.body).unwrap(), expected);
    }

    #[test]
    fn metric_example_body_is_exact() {
        let req = build_request(&metric_job(IncidentStatus::Critical));
        assert_eq!(req.action, Action::Create);
        assert_eq!(req.path, "/v2/alerts");
        assert_eq!(req.query, "");
        assert_eq!(req.alias.as_deref(), Some("incident_1_314"));
        let expected = concat!(
            r#"{"message":"p95 latency above 2s","alias":"incident_1_314","#,
            r#""description":"p95(transaction.duration) is 2480ms in the last 5 minutes","#,
            r#""source":"Sentry","priority":"P1","details":{"URL":"#,
            r#""https://acme.sentry.io/organizations/acme/alerts/rules/details/9/?alert=314&referrer=metric_alert_opsgenie&notification_uuid=b7e2d4c1-0a9f-4c3e-8d21-6f5a7b9c0e12"}}"#
        );
        assert_eq!(String::from_utf8(req.body).unwrap(), expected);
    }

    #[test]
    fn issue_message_falls_back_in_order() {
        let table = [
            (Some("boom"), "title", "boom"),
            (Some(""), "title", "title"),
            (None, "title", "title"),
            (Some(" "), "title", " "),
            (Some(""), "", "<unlabeled event>"),
            (None, "", "<unlabeled event>"),
        ];
        for (message, title, expected) in table {
            let mut job = issue_job();
            issue(&mut job).event.message = message.map(str::to_owned);
            issue(&mut job).event.title = title.to_owned();
            assert_eq!(
                body(&build_request(&job)).str("message"),
                expected,
                "{message:?} {title:?}"
            );
        }
    }

    #[test]
    fn messages_are_truncated_to_130_chars() {
        let exact = "ü".repeat(130);
        let long = format!("{}xyz", "ü".repeat(129));
        let table = [
            (exact.clone(), exact.clone()),
            (long, format!("{}…", "ü".repeat(129))),
        ];
        for (input, expected) in &table {
            let mut job = issue_job();
            issue(&mut job).event.message = Some(input.clone());
            assert_eq!(body(&build_request(&job)).str("message"), expected);

            let mut job = metric_job(IncidentStatus::Warning);
            metric(&mut job).alert_rule.name = input.clone();
            assert_eq!(body(&build_request(&job)).str("message"), expected);
        }
    }

    #[test]
    fn alias_and_entity_come_with_a_group_only() {
        let mut job = issue_job();
        issue(&mut job).group = None;
        let req = build_request(&job);
        assert_eq!(req.alias, None);
        let b = body(&req);
        assert_eq!(
            b.keys(),
            ["message", "source", "priority", "tags", "details"]
        );

        let mut job = issue_job();
        issue(&mut job).group.as_mut().unwrap().id = -42;
        let req = build_request(&job);
        assert_eq!(req.alias.as_deref(), Some("sentry: -42"));
        assert_eq!(body(&req).str("alias"), "sentry: -42");
        assert_eq!(detail(&req, "Sentry ID").as_deref(), Some("-42"));
    }

    #[test]
    fn entity_is_the_culprit_truncated_to_512() {
        let long = "c".repeat(600);
        let table = [
            (None, String::new()),
            (Some(String::new()), String::new()),
            (Some("app.views".to_owned()), "app.views".to_owned()),
            (Some("c".repeat(512)), "c".repeat(512)),
            (Some(long), format!("{}…", "c".repeat(511))),
        ];
        for (culprit, expected) in table {
            let mut job = issue_job();
            issue(&mut job).group.as_mut().unwrap().culprit = culprit;
            assert_eq!(body(&build_request(&job)).str("entity"), expected);
        }
    }

    #[test]
    fn priority_defaults_and_overrides() {
        let critical = IncidentStatus::Critical;
        let warning = IncidentStatus::Warning;
        let table = [
            (None, None, "P3", None),
            (None, Some("P1"), "P1", None),
            (None, Some("P2"), "P2", None),
            (None, Some("P3"), "P3", None),
            (None, Some("P4"), "P4", None),
            (None, Some("P5"), "P5", None),
            (None, Some("p1"), "P3", Some("p1")),
            (None, Some("P6"), "P3", Some("P6")),
            (None, Some(" P1"), "P3", Some(" P1")),
            (None, Some(""), "P3", Some("")),
            (Some(critical), None, "P1", None),
            (Some(warning), None, "P2", None),
            (Some(warning), Some("P4"), "P4", None),
            (Some(critical), Some("urgent"), "P1", Some("urgent")),
        ];
        for (status, priority, expected, ignored) in table {
            let mut job = match status {
                Some(status) => metric_job(status),
                None => issue_job(),
            };
            job.priority = priority.map(str::to_owned);
            let req = build_request(&job);
            assert_eq!(
                body(&req).str("priority"),
                expected,
                "{status:?} {priority:?}"
            );
            assert_eq!(
                req.ignored_priority.as_deref(),
                ignored,
                "{status:?} {priority:?}"
            );
        }
    }

    #[test]
    fn tags_lose_commas_and_are_capped() {
        let tag = |k: &str, v: &str| (k.to_owned(), v.to_owned());
        let cases = vec![
            (None, None),
            (Some(vec![]), Some(vec![])),
            (
                Some(vec![tag("a,b", "c,,d"), tag(",", ",")]),
                Some(vec!["ab:cd".into(), ":".into()]),
            ),
            (Some(vec![tag("k", "v:w")]), Some(vec!["k:v:w".into()])),
            (
                Some(vec![tag("k", &"v".repeat(48))]),
                Some(vec![format!("k:{}", "v".repeat(48))]),
            ),
            (
                Some(vec![tag("k", &"v".repeat(49))]),
                Some(vec![format!("k:{}…", "v".repeat(47))]),
            ),
            // Commas go before the length is counted.
            (
                Some(vec![tag("k", &",v".repeat(48))]),
                Some(vec![format!("k:{}", "v".repeat(48))]),
            ),
            (
                Some(vec![tag("ключ", &"значение".repeat(10))]),
                Some(vec![truncate(
                    &format!("ключ:{}", "значение".repeat(10)),
                    50,
                )]),
            ),
            (
                Some((0..25).map(|i| tag(&format!("k{i}"), "v")).collect()),
                Some((0..20).map(|i| format!("k{i}:v")).collect()),
            ),
        ];
        for (tags, expected) in cases {
            let mut job = issue_job();
            issue(&mut job).event.tags = tags.clone();
            let got = body(&build_request(&job)).get("tags").map(|t| {
                t.as_array()
                    .unwrap()
                    .iter()
                    .map(|s| s.as_str().unwrap().to_owned())
                    .collect::<Vec<_>>()
            });
            assert_eq!(got, expected, "{tags:?}");
        }
    }

    #[test]
    fn details_order_and_absence() {
        let with_group = [
            "Sentry ID",
            "Sentry Group",
            "Project ID",
            "Project Name",
            "Logger",
            "Level",
            "Issue URL",
            "Triggering Rules",
            "Triggering Rule URLs",
            "Release",
        ];
        let keys = |job: &AlertJob| {
            details(&build_request(job))
                .into_iter()
                .map(|(k, _)| k)
                .collect::<Vec<_>>()
        };
        assert_eq!(keys(&issue_job()), with_group);

        let mut job = issue_job();
        issue(&mut job).event.release = None;
        assert_eq!(keys(&job), with_group[..9]);

        let mut job = issue_job();
        issue(&mut job).group = None;
        assert_eq!(
            keys(&job),
            ["Triggering Rules", "Triggering Rule URLs", "Release"]
        );

        let mut job = issue_job();
        issue(&mut job).group = None;
        issue(&mut job).event.release = None;
        assert_eq!(keys(&job), ["Triggering Rules", "Triggering Rule URLs"]);

        // An empty release is present, not absent; a missing logger or level is "".
        let mut job = issue_job();
        issue(&mut job).event.release = Some(String::new());
        let group = issue(&mut job).group.as_mut().unwrap();
        group.logger = None;
        group.level = None;
        let req = build_request(&job);
        assert_eq!(detail(&req, "Release").as_deref(), Some(""));
        assert_eq!(detail(&req, "Logger").as_deref(), Some(""));
        assert_eq!(detail(&req, "Level").as_deref(), Some(""));
        assert_eq!(detail(&req, "Project ID").as_deref(), Some("api"));
        assert_eq!(detail(&req, "Project Name").as_deref(), Some("API"));
    }

    #[test]
    fn several_rules_are_joined() {
        let mut job = issue_job();
        issue(&mut job).rules = vec![
            Rule {
                id: 17,
                label: "Errors in prod".into(),
            },
            Rule {
                id: 18,
                label: "New, noisy".into(),
            },
        ];
        let req = build_request(&job);
        assert_eq!(
            detail(&req, "Triggering Rules").as_deref(),
            Some("Errors in prod, New, noisy")
        );
        assert_eq!(
            detail(&req, "Triggering Rule URLs").as_deref(),
            Some(
                "https://acme.sentry.io/organizations/acme/alerts/rules/api/17/details/\n\
                 https://acme.sentry.io/organizations/acme/alerts/rules/api/18/details/"
            )
        );
    }

    #[test]
    fn urls_percent_encode_slugs_and_uuid() {
        let mut job = issue_job();
        job.organization.slug = "ac me/ü".into();
        job.notification_uuid = "id 1/ü~".into();
        issue(&mut job).project.slug = "a/b c".into();
        let req = build_request(&job);
        assert_eq!(
            detail(&req, "Issue URL").as_deref(),
            Some(
                "https://acme.sentry.io/organizations/ac%20me%2F%C3%BC/issues/1234/?referrer=opsgenie&notification_uuid=id%201%2F%C3%BC~"
            )
        );
        assert_eq!(
            detail(&req, "Triggering Rule URLs").as_deref(),
            Some(
                "https://acme.sentry.io/organizations/ac%20me%2F%C3%BC/alerts/rules/a%2Fb%20c/17/details/"
            )
        );
        // The slug itself is shown as sent.
        assert_eq!(detail(&req, "Project ID").as_deref(), Some("a/b c"));

        let mut job = metric_job(IncidentStatus::Critical);
        job.organization.slug = "ac me/ü".into();
        job.notification_uuid = "id 1/ü~".into();
        assert_eq!(
            detail(&build_request(&job), "URL").as_deref(),
            Some(
                "https://acme.sentry.io/organizations/ac%20me%2F%C3%BC/alerts/rules/details/9/?alert=314&referrer=metric_alert_opsgenie&notification_uuid=id%201%2F%C3%BC~"
            )
        );
    }

    #[test]
    fn trailing_slashes_of_the_base_are_dropped() {
        for url in [
            "https://acme.sentry.io/",
            "https://acme.sentry.io///",
            "https://acme.sentry.io",
        ] {
            let mut job = issue_job();
            job.organization.url = url.into();
            let req = build_request(&job);
            assert!(
                detail(&req, "Issue URL")
                    .unwrap()
                    .starts_with("https://acme.sentry.io/organizations/acme/issues/"),
                "{url}"
            );
            assert!(
                detail(&req, "Triggering Rule URLs")
                    .unwrap()
                    .starts_with("https://acme.sentry.io/organizations/"),
                "{url}"
            );

            let mut job = metric_job(IncidentStatus::Warning);
            job.organization.url = url.into();
            assert!(
                detail(&build_request(&job), "URL")
                    .unwrap()
                    .starts_with("https://acme.sentry.io/organizations/"),
                "{url}"
            );
        }
        let mut job = issue_job();
        job.organization.url = "http://host:9000/sentry/".into();
        assert!(
            detail(&build_request(&job), "Issue URL")
                .unwrap()
                .starts_with("http://host:9000/sentry/organizations/acme/")
        );
    }

    /// An issue job whose details without the two values below add up to `fixed` chars.
    fn job_with_values(title: &str, name: &str) -> (AlertJob, usize) {
        let mut job = issue_job();
        issue(&mut job).group.as_mut().unwrap().title = title.to_owned();
        issue(&mut job).project.name = name.to_owned();
        let fixed = details_size(&details(&build_request(&job))) - chars(title) - chars(name);
        (job, fixed)
    }

    #[test]
    fn details_within_8000_are_left_alone() {
        let (_, fixed) = job_with_values("", "");
        let (job, _) = job_with_values(&"t".repeat(8000 - fixed), "");
        let d = details(&build_request(&job));
        assert_eq!(details_size(&d), 8000);
        assert!(d.iter().all(|(_, v)| !v.ends_with('…')));
    }

    #[test]
    fn details_over_8000_shrink_the_longest_value() {
        let (_, fixed) = job_with_values("", "");
        let title = "ü".repeat(8000 - fixed + 10);
        let (job, _) = job_with_values(&title, "short");
        let d = details(&build_request(&job));
        let get = |key: &str| d.iter().find(|(k, _)| k == key).unwrap().1.clone();
        assert_eq!(details_size(&d), 8000);
        // Five chars of the name plus ten of excess come off the title.
        assert_eq!(
            get("Sentry Group"),
            format!("{}…", "ü".repeat(8000 - fixed + 10 - 16))
        );
        assert_eq!(get("Project Name"), "short");
    }

    #[test]
    fn details_tie_shrinks_the_first_in_order() {
        let (_, fixed) = job_with_values("", "");
        let each = (8000 - fixed) / 2 + 50;
        let (job, _) = job_with_values(&"t".repeat(each), &"n".repeat(each));
        let d = details(&build_request(&job));
        let get = |key: &str| d.iter().find(|(k, _)| k == key).unwrap().1.clone();
        assert_eq!(details_size(&d), 8000);
        assert!(get("Sentry Group").ends_with('…'));
        assert_eq!(get("Project Name"), "n".repeat(each));
    }

    #[test]
    fn details_shrink_in_several_steps() {
        let mut job = issue_job();
        let big = 3000;
        {
            let alert = issue(&mut job);
            let group = alert.group.as_mut().unwrap();
            group.title = "t".repeat(big);
            group.logger = Some("l".repeat(big - 1));
            alert.project.name = "n".repeat(big);
            alert.event.release = Some("r".repeat(big));
        }
        let unshrunk = details_size(&details(&build_request(&issue_job())))
            - chars("ZeroDivisionError: division by zero")
            - chars("API")
            - chars("")
            - chars("api@1.4.2")
            + 4 * big
            - 1;
        let d = details(&build_request(&job));
        let get = |key: &str| d.iter().find(|(k, _)| k == key).unwrap().1.clone();
        assert_eq!(details_size(&d), 8000);
        // The first step cannot take the whole excess from the title, which keeps one char;
        // the next longest (the name, ahead of the release) takes the rest.
        let first_excess = unshrunk - 8000;
        assert!(
            first_excess >= big,
            "the test needs a first step that empties the title"
        );
        assert_eq!(get("Sentry Group"), "…");
        let second_excess = first_excess - (big - 1);
        assert_eq!(
            get("Project Name"),
            format!("{}…", "n".repeat(big - second_excess - 1))
        );
        assert_eq!(get("Release"), "r".repeat(big));
        assert_eq!(get("Logger"), "l".repeat(big - 1));
    }

    #[test]
    fn metric_message_falls_back_to_the_rule_id() {
        let mut job = metric_job(IncidentStatus::Critical);
        metric(&mut job).alert_rule.name = String::new();
        assert_eq!(body(&build_request(&job)).str("message"), "Metric alert 9");
    }

    #[test]
    fn metric_description_is_the_text_truncated_to_15000() {
        let table = [
            (None, None),
            (Some(String::new()), None),
            (Some("x".repeat(15000)), Some("x".repeat(15000))),
            (
                Some("ü".repeat(15001)),
                Some(format!("{}…", "ü".repeat(14999))),
            ),
        ];
        for (text, expected) in table {
            let mut job = metric_job(IncidentStatus::Critical);
            metric(&mut job).text = text;
            let b = body(&build_request(&job));
            assert_eq!(
                b.get("description").and_then(Value::as_str),
                expected.as_deref()
            );
            let keys = b.keys();
            let expected_keys: &[&str] = if expected.is_some() {
                &[
                    "message",
                    "alias",
                    "description",
                    "source",
                    "priority",
                    "details",
                ]
            } else {
                &["message", "alias", "source", "priority", "details"]
            };
            assert_eq!(keys, expected_keys);
        }
    }

    #[test]
    fn resolved_incident_closes_by_alias() {
        let mut job = metric_job(IncidentStatus::Resolved);
        job.priority = Some("bogus".into());
        job.organization.id = -1;
        metric(&mut job).incident.identifier = 77;
        let req = build_request(&job);
        assert_eq!(req.action, Action::Close);
        assert_eq!(req.path, "/v2/alerts/incident_-1_77/close");
        assert_eq!(req.query, "identifierType=alias");
        assert_eq!(req.body, br#"{"source":"Sentry"}"#);
        assert_eq!(req.alias.as_deref(), Some("incident_-1_77"));
        assert_eq!(req.ignored_priority, None);
    }

    #[test]
    fn close_path_encodes_the_alias_as_one_segment() {
        // A metric alias is always `incident_<int>_<int>`; the path goes through `seg` all the
        // same, so an alias with a space or a colon could never split the path.
        assert_eq!(
            format!("/v2/alerts/{}/close", seg("sentry: 12/3")),
            "/v2/alerts/sentry%3A%2012%2F3/close"
        );
        let req = build_request(&metric_job(IncidentStatus::Resolved));
        assert_eq!(
            req.path,
            format!("/v2/alerts/{}/close", seg(req.alias.as_deref().unwrap()))
        );
    }

    fn text() -> impl Strategy<Value = String> {
        prop_oneof![
            3 => any::<String>(),
            1 => prop::collection::vec(any::<char>(), 0..4000).prop_map(String::from_iter),
            1 => (any::<char>(), 0usize..9000).prop_map(|(c, n)| std::iter::repeat_n(c, n).collect()),
        ]
    }

    fn opt_text() -> impl Strategy<Value = Option<String>> {
        prop::option::of(text())
    }

    prop_compose! {
        fn arb_job()(
            uuid in text(),
            priority in opt_text(),
            org in (any::<i64>(), text(), text()),
            project in (any::<i64>(), text(), text()),
            group in prop::option::of((any::<i64>(), text(), opt_text(), opt_text(), opt_text())),
            event in (opt_text(), text(), opt_text()),
            tags in prop::option::of(prop::collection::vec((text(), text()), 0..30)),
            rules in prop::collection::vec((any::<i64>(), text()), 1..4),
            metric in prop::option::of((any::<i64>(), text(), any::<i64>(), 0u8..3, opt_text())),
        ) -> AlertJob {
            let alert = match metric {
                Some((rule_id, name, identifier, status, text)) => Alert::Metric(MetricAlert {
                    alert_rule: AlertRule { id: rule_id, name },
                    incident: Incident {
                        identifier,
                        status: [IncidentStatus::Critical, IncidentStatus::Warning, IncidentStatus::Resolved][usize::from(status)],
                        sequence: None,
                    },
                    text,
                }),
                None => Alert::Issue(IssueAlert {
                    project: Project { id: project.0, slug: project.1, name: project.2 },
                    group: group.map(|(id, title, culprit, logger, level)| Group { id, title, culprit, logger, level }),
                    event: Event { event_id: None, message: event.0, title: event.1, release: event.2, tags },
                    rules: rules.into_iter().map(|(id, label)| Rule { id, label }).collect(),
                }),
            };
            AlertJob {
                notification_uuid: uuid,
                team_id: "team".into(),
                priority,
                organization: Organization { id: org.0, slug: org.1, url: format!("https://{}", org.2) },
                alert,
            }
        }
    }

    /// docs/contract.md section 5's details of an issue alert, literally: every value built whole, the
    /// rule URLs joined whole, then the longest value shrunk until the entries fit.
    fn spec_details(job: &AlertJob) -> Vec<(String, String)> {
        let Alert::Issue(issue) = &job.alert else {
            panic!("not an issue alert")
        };
        let base = job.organization.url.trim_end_matches('/');
        let org = seg(&job.organization.slug);
        let mut entries: Vec<(String, String)> = Vec::new();
        if let Some(group) = &issue.group {
            entries.extend([
                ("Sentry ID".to_string(), group.id.to_string()),
                ("Sentry Group".to_string(), group.title.clone()),
                ("Project ID".to_string(), issue.project.slug.clone()),
                ("Project Name".to_string(), issue.project.name.clone()),
                ("Logger".to_string(), group.logger.clone().unwrap_or_default()),
                ("Level".to_string(), group.level.clone().unwrap_or_default()),
                (
                    "Issue URL".to_string(),
                    format!(
                        "{base}/organizations/{org}/issues/{}/?referrer=opsgenie&notification_uuid={}",
                        group.id,
                        seg(&job.notification_uuid)
                    ),
                ),
            ]);
        }
        let labels: Vec<&str> = issue.rules.iter().map(|r| r.label.as_str()).collect();
        let urls: Vec<String> = issue
            .rules
            .iter()
            .map(|r| {
                format!(
                    "{base}/organizations/{org}/alerts/rules/{}/{}/details/",
                    seg(&issue.project.slug),
                    r.id
                )
            })
            .collect();
        entries.push(("Triggering Rules".to_string(), labels.join(", ")));
        entries.push(("Triggering Rule URLs".to_string(), urls.join("\n")));
        if let Some(release) = &issue.event.release {
            entries.push(("Release".to_string(), release.clone()));
        }
        loop {
            let total: usize = entries.iter().map(|(k, v)| chars(k) + chars(v)).sum();
            if total <= DETAILS_LIMIT {
                return entries;
            }
            let excess = total - DETAILS_LIMIT;
            let longest = (0..entries.len())
                .rev()
                .max_by_key(|&i| chars(&entries[i].1))
                .unwrap();
            let size = chars(&entries[longest].1);
            entries[longest].1 = truncate(&entries[longest].1, size.saturating_sub(excess).max(1));
        }
    }

    prop_compose! {
        /// Issue alerts with many rules, long labels and long bases: the joins the builder
        /// must not make whole.
        fn arb_wide_issue_job()(
            base in prop_oneof![Just(String::new()), "[a-z]{1,40}", (any::<char>(), 0usize..1500)
                .prop_map(|(c, n)| std::iter::repeat_n(c, n).collect::<String>())],
            slugs in (text(), text()),
            group in prop::option::of((any::<i64>(), text())),
            labels in prop::collection::vec(prop_oneof![Just(String::new()), text()], 1..60),
            extra_rules in 0usize..600,
            release in opt_text(),
        ) -> AlertJob {
            let mut job = issue_job();
            job.organization.url = format!("https://acme.example/{}", base.replace(['/', '\\'], ""));
            job.organization.slug = slugs.0;
            let issue = issue(&mut job);
            issue.project.slug = slugs.1;
            issue.group = group.map(|(id, title)| Group { id, title, culprit: None, logger: None, level: None });
            issue.event.release = release;
            let mut rules: Vec<Rule> = labels
                .into_iter()
                .enumerate()
                .map(|(i, label)| Rule { id: i as i64 * 7919 - 3, label })
                .collect();
            rules.extend((0..extra_rules).map(|i| Rule { id: i as i64, label: "r".into() }));
            issue.rules = rules;
            job
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// The bounded joins give exactly what joining everything whole gives.
        #[test]
        fn details_are_those_of_the_spec_however_wide_the_job(job in arb_wide_issue_job()) {
            prop_assert_eq!(details(&build_request(&job)), spec_details(&job));
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]

        #[test]
        fn no_field_exceeds_its_opsgenie_limit(job in arb_job()) {
            let req = build_request(&job);
            let body: Value = serde_json::from_slice(&req.body).expect("the body is JSON");
            prop_assert!(req.alias.as_deref().map_or(0, chars) <= ALIAS_LIMIT);
            if req.action == Action::Close {
                prop_assert_eq!(&req.body, br#"{"source":"Sentry"}"#);
                return Ok(());
            }
            let field = |key: &str| body.get(key).and_then(Value::as_str).map_or(0, chars);
            prop_assert!((1..=MESSAGE_LIMIT).contains(&field("message")));
            prop_assert!(field("alias") <= ALIAS_LIMIT);
            prop_assert!(field("entity") <= ENTITY_LIMIT);
            prop_assert!(field("description") <= DESCRIPTION_LIMIT);
            prop_assert_eq!(body["source"].as_str(), Some("Sentry"));
            prop_assert!(matches!(body["priority"].as_str(), Some("P1" | "P2" | "P3" | "P4" | "P5")));
            if let Some(tags) = body.get("tags") {
                let tags = tags.as_array().expect("tags are an array");
                prop_assert!(tags.len() <= MAX_TAGS);
                for tag in tags {
                    prop_assert!(chars(tag.as_str().expect("a tag is a string")) <= TAG_LIMIT);
                }
            }
            let details = body["details"].as_object().expect("details are an object");
            let size: usize = details
                .iter()
                .map(|(k, v)| chars(k) + v.as_str().map_or(usize::MAX, chars))
                .sum();
            prop_assert!(size <= DETAILS_LIMIT, "details hold {} chars", size);
        }
    }
}

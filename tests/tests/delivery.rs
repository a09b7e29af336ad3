//! The delivery pipeline end to end: a job on RabbitMQ becomes exactly the Opsgenie request of
//! docs/contract.md section 5, one stream entry, one log line, and an empty queue.

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use fred::prelude::{ClientLike, KeysInterface};
use opsgenie_e2e::fixtures::*;
use opsgenie_e2e::*;
use opsgenie_shared::record::{Delivery, delivery_fields};
use opsgenie_shared::{AlertJob, build_request};
use opsgenie_standin::RecordedRequest;
use rand::SeedableRng;
use rand::rngs::StdRng;
use serde_json::{Value, json};

/// Generous: the machine is small and shared, and a passing run never waits this long.
const DEADLINE: Duration = Duration::from_secs(30);

/// Fields every "Job finished." line carries (docs/contract.md section 10).
const JOB_LINE_FIELDS: [&str; 10] = [
    "notification_uuid",
    "team_id",
    "kind",
    "action",
    "alias",
    "outcome",
    "status",
    "attempt",
    "request_id",
    "latency_ms",
];

fn field<'a>(entry: &'a HashMap<String, String>, name: &str) -> Option<&'a str> {
    entry.get(name).map(String::as_str)
}

fn field_names(entry: &HashMap<String, String>) -> BTreeSet<&str> {
    entry.keys().map(String::as_str).collect()
}

fn job_line_for(worker: &WorkerProcess, uuid: &str) -> Value {
    let lines = worker.job_lines_for(uuid);
    assert_eq!(lines.len(), 1, "job lines of {uuid}: {lines:?}");
    lines.into_iter().next().expect("one line")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_issue_alert_becomes_the_spec_request_and_one_stream_entry() {
    let env = TestEnv::new("issue").await;
    let standin = env.standin().serving("backend", "key-a").await;
    let mut worker = env.worker().spawn();
    let uuid = new_uuid();
    env.publish_job(&spec_issue_job(&uuid, "backend")).await;
    assert!(
        standin.wait_for_delivered(1, DEADLINE).await,
        "{}",
        worker.raw_log()
    );
    let requests = standin.requests();
    assert_eq!(requests.len(), 1);
    let r = &requests[0];
    assert_eq!(r.method, "POST");
    assert_eq!(r.path, "/v2/alerts");
    assert_eq!(r.query, None);
    assert_eq!(r.authorization.as_deref(), Some("GenieKey key-a"));
    assert_eq!(r.content_type.as_deref(), Some("application/json"));
    assert!(
        r.user_agent
            .as_deref()
            .unwrap_or("")
            .starts_with("opsgenie-worker/")
    );
    let expected = json!({
        "message": "ZeroDivisionError: division by zero",
        "alias": "sentry: 1234",
        "entity": "app.views.divide",
        "source": "Sentry",
        "priority": "P2",
        "tags": ["level:error", "environment:prod"],
        "details": {
            "Sentry ID": "1234",
            "Sentry Group": "ZeroDivisionError: division by zero",
            "Project ID": "api",
            "Project Name": "API",
            "Logger": "",
            "Level": "error",
            "Issue URL": format!("https://acme.sentry.io/organizations/acme/issues/1234/?referrer=opsgenie&notification_uuid={uuid}"),
            "Triggering Rules": "Errors in prod",
            "Triggering Rule URLs": "https://acme.sentry.io/organizations/acme/alerts/rules/api/17/details/",
            "Release": "api@1.4.2"
        }
    });
    assert_eq!(r.json.as_ref(), Some(&expected));
    env.wait_for_stream_len(1).await;
    let entry = &env.stream().await[0];
    for (name, value) in [
        ("notification_uuid", uuid.as_str()),
        ("kind", "issue_alert"),
        ("action", "create"),
        ("team_id", "backend"),
        ("alias", "sentry: 1234"),
        ("organization_id", "1"),
        ("project_slug", "api"),
        ("group_id", "1234"),
        ("rule_ids", "17"),
        ("status", "202"),
        ("request_id", r.request_id.as_str()),
        ("attempts", "1"),
    ] {
        assert_eq!(field(entry, name), Some(value), "field {name}");
    }
    worker.wait_for_job_lines(1).await;
    let line = &worker.job_lines()[0];
    assert_eq!(line["outcome"], "delivered");
    assert_eq!(line["notification_uuid"], uuid.as_str());
    assert_eq!(line["status"], 202);
    assert_eq!(env.queue_len(&env.queue).await, 0);
    worker.stop_cleanly(&["key-a"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_issue_alert_without_a_group_has_no_alias_and_no_entity() {
    let env = TestEnv::new("nogroup").await;
    let standin = env.standin().serving("backend", "key-ng").await;
    let mut worker = env.worker().spawn();
    let uuid = new_uuid();
    // No priority, no release, no event message, and a base URL with a trailing slash.
    let job = bare_issue_job(&uuid, "backend");
    let before_ms = now_ms();
    env.publish_job(&job).await;
    assert!(
        standin.wait_for_delivered(1, DEADLINE).await,
        "{}",
        worker.raw_log()
    );
    let requests = standin.requests();
    assert_eq!(requests.len(), 1);
    let r = &requests[0];
    assert_eq!(r.path, "/v2/alerts");
    assert_eq!(r.query, None);
    assert_eq!(r.authorization.as_deref(), Some("GenieKey key-ng"));
    let expected = json!({
        "message": "Unhandled rejection: fetch failed",
        "source": "Sentry",
        "priority": "P3",
        "tags": ["browser:Firefox 128"],
        "details": {
            "Triggering Rules": "Errors in prod, New issues",
            "Triggering Rule URLs": "https://acme.sentry.io/organizations/acme/alerts/rules/api/17/details/\nhttps://acme.sentry.io/organizations/acme/alerts/rules/api/18/details/"
        }
    });
    assert_eq!(r.json.as_ref(), Some(&expected));

    env.wait_for_stream_len(1).await;
    let stream = env.stream().await;
    assert_eq!(stream.len(), 1);
    let entry = &stream[0];
    assert_eq!(
        field_names(entry),
        BTreeSet::from([
            "notification_uuid",
            "kind",
            "action",
            "team_id",
            "alias",
            "organization_id",
            "project_slug",
            "group_id",
            "rule_ids",
            "status",
            "request_id",
            "attempts",
            "delivered_at_ms",
            "event",
        ])
    );
    for (name, value) in [
        ("notification_uuid", uuid.as_str()),
        ("kind", "issue_alert"),
        ("action", "create"),
        ("team_id", "backend"),
        ("alias", ""),
        ("organization_id", "3"),
        ("project_slug", "api"),
        ("group_id", ""),
        ("rule_ids", "17,18"),
        ("status", "202"),
        ("request_id", r.request_id.as_str()),
        ("attempts", "1"),
    ] {
        assert_eq!(field(entry, name), Some(value), "field {name}");
    }
    let delivered_at: u64 = field(entry, "delivered_at_ms")
        .and_then(|v| v.parse().ok())
        .expect("delivered_at_ms is a number");
    assert!(
        (before_ms..=now_ms()).contains(&delivered_at),
        "delivered_at_ms {delivered_at} is not between publishing and now"
    );

    worker.wait_for_job_lines(1).await;
    let line = job_line_for(&worker, &uuid);
    assert_eq!(line["outcome"], "delivered");
    assert_eq!(line["kind"], "issue_alert");
    assert_eq!(line["action"], "create");
    assert_eq!(line["team_id"], "backend");
    assert_eq!(line["request_id"], r.request_id.as_str());
    assert_eq!(env.queue_len(&env.queue).await, 0);
    worker.stop_cleanly(&["key-ng"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metric_alerts_take_their_priority_from_the_status_unless_a_valid_one_is_given() {
    let env = TestEnv::new("metric").await;
    let standin = env.standin().serving("backend", "key-m").await;
    let mut worker = env.worker().spawn();
    let run = uuid::Uuid::new_v4().simple().to_string();
    // One uuid needs percent-encoding in the URL, so that `seg` is checked end to end.
    let uuids = [
        format!("{run}:ü/1"),
        format!("{run}-2"),
        format!("{run}-3"),
        format!("{run}-4"),
    ];
    let critical = metric_job(&uuids[0], "backend", 401, "critical", 1_732_665_600_000);
    let mut warning = spec_metric_job(&uuids[1], "backend", 402, "warning");
    warning.as_object_mut().expect("object").remove("text");
    let mut explicit = spec_metric_job(&uuids[2], "backend", 403, "critical");
    explicit["priority"] = json!("P4");
    let mut invalid = spec_metric_job(&uuids[3], "backend", 404, "warning");
    invalid["priority"] = json!("urgent");
    for job in [&critical, &warning, &explicit, &invalid] {
        env.publish_job(job).await;
    }
    assert!(
        standin.wait_for_delivered(4, DEADLINE).await,
        "{}",
        worker.raw_log()
    );

    let url = |identifier: u32, encoded_uuid: &str| {
        format!(
            "https://acme.sentry.io/organizations/acme/alerts/rules/details/9/?alert={identifier}&referrer=metric_alert_opsgenie&notification_uuid={encoded_uuid}"
        )
    };
    let text = "p95(transaction.duration) is 2480ms in the last 5 minutes";
    let expected = [
        json!({"message":"p95 latency above 2s","alias":"incident_1_401","description":text,
               "source":"Sentry","priority":"P1",
               "details":{"URL":url(401, &format!("{run}%3A%C3%BC%2F1"))}}),
        json!({"message":"p95 latency above 2s","alias":"incident_1_402",
               "source":"Sentry","priority":"P2",
               "details":{"URL":url(402, &uuids[1])}}),
        json!({"message":"p95 latency above 2s","alias":"incident_1_403","description":text,
               "source":"Sentry","priority":"P4",
               "details":{"URL":url(403, &uuids[2])}}),
        json!({"message":"p95 latency above 2s","alias":"incident_1_404","description":text,
               "source":"Sentry","priority":"P2",
               "details":{"URL":url(404, &uuids[3])}}),
    ];
    let requests = standin.requests();
    assert_eq!(requests.len(), 4);
    for want in &expected {
        let alias = want["alias"].as_str().expect("alias");
        let got: Vec<&RecordedRequest> = requests
            .iter()
            .filter(|r| r.json.as_ref().is_some_and(|j| j["alias"] == alias))
            .collect();
        assert_eq!(got.len(), 1, "requests for {alias}");
        assert_eq!(got[0].path, "/v2/alerts");
        assert_eq!(got[0].query, None);
        assert_eq!(got[0].authorization.as_deref(), Some("GenieKey key-m"));
        assert_eq!(got[0].json.as_ref(), Some(want), "{alias}");
    }

    env.wait_for_stream_len(4).await;
    worker.wait_for_job_lines(4).await;
    let stream = env.stream().await;
    assert_eq!(stream.len(), 4);
    for (uuid, identifier) in uuids.iter().zip(401..) {
        let entries: Vec<_> = stream
            .iter()
            .filter(|e| field(e, "notification_uuid") == Some(uuid))
            .collect();
        assert_eq!(entries.len(), 1, "stream entries of {uuid}");
        let entry = entries[0];
        let alias = format!("incident_1_{identifier}");
        let identifier = identifier.to_string();
        for (name, value) in [
            ("kind", "metric_alert"),
            ("action", "create"),
            ("alias", alias.as_str()),
            ("incident_identifier", identifier.as_str()),
            ("organization_id", "1"),
            ("status", "202"),
        ] {
            assert_eq!(field(entry, name), Some(value), "{uuid}: field {name}");
        }
        let line = job_line_for(&worker, uuid);
        assert_eq!(line["outcome"], "delivered", "{line}");
        assert_eq!(line["alias"], alias.as_str());
    }

    // The invalid priority is not an error, but it is said out loud.
    let warnings: Vec<Value> = worker
        .logs()
        .into_iter()
        .filter(|l| l["level"] == "WARN" && l.to_string().contains("urgent"))
        .collect();
    assert_eq!(warnings.len(), 1, "{}", worker.raw_log());
    assert_eq!(warnings[0]["notification_uuid"], uuids[3].as_str());
    for uuid in &uuids[..3] {
        assert!(
            !worker
                .logs()
                .iter()
                .any(|l| l["level"] == "WARN" && l["notification_uuid"] == uuid.as_str()),
            "a warning about {uuid}, whose priority is valid or absent:\n{}",
            worker.raw_log()
        );
    }
    assert_eq!(env.queue_len(&env.queue).await, 0);
    worker.stop_cleanly(&["key-m"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resolved_incident_closes_its_alert_by_alias() {
    let env = TestEnv::new("close").await;
    let standin = env.standin().serving("backend", "key-c").await;
    let mut worker = env.worker().spawn();
    let uuid = new_uuid();
    let mut job = spec_metric_job(&uuid, "backend", 314, "resolved");
    // A close carries no priority, so the job's must not reach the request.
    job["priority"] = json!("P1");
    env.publish_job(&job).await;
    assert!(
        standin.wait_for_delivered(1, DEADLINE).await,
        "{}",
        worker.raw_log()
    );
    let requests = standin.requests();
    assert_eq!(requests.len(), 1);
    let r = &requests[0];
    assert_eq!(r.method, "POST");
    assert_eq!(r.path, "/v2/alerts/incident_1_314/close");
    assert_eq!(r.query.as_deref(), Some("identifierType=alias"));
    assert_eq!(r.authorization.as_deref(), Some("GenieKey key-c"));
    assert_eq!(r.content_type.as_deref(), Some("application/json"));
    assert_eq!(r.body, r#"{"source":"Sentry"}"#);
    assert_eq!(r.status, 202);

    env.wait_for_stream_len(1).await;
    let stream = env.stream().await;
    assert_eq!(stream.len(), 1);
    let entry = &stream[0];
    assert_eq!(
        field_names(entry),
        BTreeSet::from([
            "notification_uuid",
            "kind",
            "action",
            "team_id",
            "alias",
            "organization_id",
            "incident_identifier",
            "status",
            "request_id",
            "attempts",
            "delivered_at_ms",
            "event",
        ])
    );
    for (name, value) in [
        ("notification_uuid", uuid.as_str()),
        ("kind", "metric_alert"),
        ("action", "close"),
        ("team_id", "backend"),
        ("alias", "incident_1_314"),
        ("organization_id", "1"),
        ("incident_identifier", "314"),
        ("status", "202"),
        ("request_id", r.request_id.as_str()),
        ("attempts", "1"),
    ] {
        assert_eq!(field(entry, name), Some(value), "field {name}");
    }
    worker.wait_for_job_lines(1).await;
    let line = job_line_for(&worker, &uuid);
    assert_eq!(line["outcome"], "delivered");
    assert_eq!(line["action"], "close");
    assert_eq!(line["alias"], "incident_1_314");
    assert_eq!(env.queue_len(&env.queue).await, 0);
    worker.stop_cleanly(&["key-c"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_team_reaches_its_own_api_with_its_own_key() {
    let env = TestEnv::new("regions").await;
    // Each stand-in accepts only its own key, so a crossed key would be refused, not counted.
    let eu = env.standin().serving("payments", "key-eu-payments").await;
    let us = env.standin().serving("backend", "key-us-backend").await;
    let mut worker = env.worker().spawn();
    let mut jobs: Vec<(String, &str)> = Vec::new();
    for i in 0..6 {
        let team = if i % 2 == 0 { "payments" } else { "backend" };
        let uuid = new_uuid();
        env.publish_job(&spec_issue_job(&uuid, team)).await;
        jobs.push((uuid, team));
    }
    assert!(
        eu.wait_for_delivered(3, DEADLINE).await,
        "{}",
        worker.raw_log()
    );
    assert!(
        us.wait_for_delivered(3, DEADLINE).await,
        "{}",
        worker.raw_log()
    );
    worker.wait_for_job_lines(6).await;

    for (standin, team, key) in [
        (&eu, "payments", "key-eu-payments"),
        (&us, "backend", "key-us-backend"),
    ] {
        let requests = standin.requests();
        assert_eq!(requests.len(), 3, "{team}");
        let mut got: Vec<String> = requests
            .iter()
            .map(|r| {
                assert_eq!(
                    r.authorization.as_deref(),
                    Some(format!("GenieKey {key}").as_str())
                );
                assert_eq!(r.status, 202);
                r.json.as_ref().expect("json")["details"]["Issue URL"]
                    .as_str()
                    .expect("issue url")
                    .rsplit_once("notification_uuid=")
                    .expect("uuid in the issue url")
                    .1
                    .to_owned()
            })
            .collect();
        got.sort();
        let mut want: Vec<String> = jobs
            .iter()
            .filter(|(_, t)| *t == team)
            .map(|(u, _)| u.clone())
            .collect();
        want.sort();
        assert_eq!(got, want, "{team}");
    }
    env.wait_for_stream_len(6).await;
    for entry in env.stream().await {
        let uuid = field(&entry, "notification_uuid").expect("uuid");
        let team = jobs.iter().find(|(u, _)| u == uuid).expect("a known job").1;
        assert_eq!(field(&entry, "team_id"), Some(team));
    }
    assert_eq!(env.queue_len(&env.dead_queue()).await, 0);
    assert_eq!(env.queue_len(&env.queue).await, 0);
    worker
        .stop_cleanly(&["key-eu-payments", "key-us-backend"])
        .await;
}

// ---------------------------------------------------------------------------------------------
// A randomized batch.

fn chars(s: &str) -> usize {
    s.chars().count()
}

/// The cases the randomized batch exists for; each must occur in it.
const EDGES: [&str; 11] = [
    "close",
    "create without alias",
    "message truncated",
    "more than 20 tags",
    "tag truncated",
    "comma stripped from a tag",
    "details capped",
    "description truncated",
    "entity truncated",
    "invalid priority",
    "both teams",
];

fn edges_reached(path: &str, body: &Value, job: &AlertJob) -> Vec<&'static str> {
    let mut reached = Vec::new();
    let truncated_at = |v: &Value, n: usize| {
        v.as_str()
            .is_some_and(|s| chars(s) == n && s.ends_with('\u{2026}'))
    };
    if path.ends_with("/close") {
        reached.push("close");
        return reached;
    }
    if body.get("alias").is_none() {
        reached.push("create without alias");
    }
    if truncated_at(&body["message"], 130) {
        reached.push("message truncated");
    }
    if let opsgenie_shared::Alert::Issue(issue) = &job.alert {
        let tags = issue.event.tags.as_deref().unwrap_or_default();
        if tags.len() > 20 {
            reached.push("more than 20 tags");
        }
        if tags
            .iter()
            .take(20)
            .any(|(k, v)| k.contains(',') || v.contains(','))
        {
            reached.push("comma stripped from a tag");
        }
    }
    if body["tags"]
        .as_array()
        .is_some_and(|tags| tags.iter().any(|t| truncated_at(t, 50)))
    {
        reached.push("tag truncated");
    }
    let details_total: usize = body["details"]
        .as_object()
        .map(|d| {
            d.iter()
                .map(|(k, v)| chars(k) + v.as_str().map_or(0, chars))
                .sum()
        })
        .unwrap_or_default();
    if details_total == 8000 {
        reached.push("details capped");
    }
    if truncated_at(&body["description"], 15_000) {
        reached.push("description truncated");
    }
    if truncated_at(&body["entity"], 512) {
        reached.push("entity truncated");
    }
    if job
        .priority
        .as_deref()
        .is_some_and(|p| !matches!(p, "P1" | "P2" | "P3" | "P4" | "P5"))
    {
        reached.push("invalid priority");
    }
    reached
}

/// Opsgenie's limits, checked on what arrived without help from the builder under test; a
/// close carries nothing but its source.
fn assert_within_opsgenie_limits(path: &str, body: &Value, context: &str) {
    if path.ends_with("/close") {
        assert_eq!(body, &json!({"source": "Sentry"}), "{context}");
        return;
    }
    let message = body["message"].as_str().expect("message");
    assert!(chars(message) <= 130, "{context}: message {message:?}");
    if let Some(entity) = body.get("entity") {
        assert!(chars(entity.as_str().expect("entity")) <= 512, "{context}");
    }
    if let Some(description) = body.get("description") {
        assert!(
            chars(description.as_str().expect("description")) <= 15_000,
            "{context}"
        );
    }
    if let Some(tags) = body.get("tags") {
        let tags = tags.as_array().expect("tags");
        assert!(tags.len() <= 20, "{context}: {} tags", tags.len());
        for tag in tags {
            let tag = tag.as_str().expect("tag");
            assert!(chars(tag) <= 50, "{context}: tag {tag:?}");
            assert!(!tag.contains(','), "{context}: comma in tag {tag:?}");
        }
    }
    let details = body["details"].as_object().expect("details");
    let total: usize = details
        .iter()
        .map(|(k, v)| chars(k) + chars(v.as_str().expect("detail value")))
        .sum();
    assert!(total <= 8000, "{context}: details hold {total} chars");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_randomized_batch_is_delivered_exactly_once_per_job() {
    const JOBS: usize = 300;
    let env = TestEnv::new("batch").await;
    let standin = env
        .standin()
        .serving("alpha", "key-alpha-batch")
        .serving("beta", "key-beta-batch")
        .await;
    // Fixed seed: a failure reproduces with the same jobs; the run id only keeps uuids unique.
    let mut rng = StdRng::seed_from_u64(0x0b5_9e1e);
    let run = uuid::Uuid::new_v4().simple().to_string();
    let jobs: Vec<Value> = (0..JOBS).map(|i| random_job(&mut rng, &run, i)).collect();
    let parsed: Vec<AlertJob> = jobs
        .iter()
        .map(|j| AlertJob::parse(j.to_string().as_bytes()).expect("a valid job"))
        .collect();

    let mut worker = env.worker().flag("--prefetch", "64").spawn();
    for job in &jobs {
        env.publish_job(job).await;
    }
    assert!(
        standin
            .wait_for_delivered(JOBS as u64, Duration::from_secs(60))
            .await,
        "{} of {JOBS} delivered:\n{}",
        standin.delivered(),
        worker.raw_log()
    );
    worker.wait_for_job_lines(JOBS).await;
    env.wait_for_stream_len(JOBS).await;
    assert_eq!(env.queue_len(&env.queue).await, 0);
    assert_eq!(env.queue_len(&env.dead_queue()).await, 0);
    worker
        .stop_cleanly(&["key-alpha-batch", "key-beta-batch"])
        .await;

    // The worker is gone, so the books below are final.
    let mut requests = standin.requests();
    let stream = env.stream().await;
    let lines = worker.job_lines();

    assert_eq!(requests.len(), JOBS, "one request per job");
    let mut request_ids: HashMap<&str, String> = HashMap::new();
    let mut edges = BTreeSet::new();
    for (job, parsed) in jobs.iter().zip(&parsed) {
        let uuid = parsed.notification_uuid.as_str();
        let request = build_request(parsed);
        let body: Value = serde_json::from_slice(&request.body).expect("built body is JSON");
        let query = (!request.query.is_empty()).then(|| request.query.to_owned());
        let authorization = format!("GenieKey key-{}-batch", parsed.team_id);
        let found = requests.iter().position(|r| {
            r.path == request.path
                && r.query == query
                && r.authorization.as_deref() == Some(authorization.as_str())
                && r.json.as_ref() == Some(&body)
        });
        let Some(found) = found else {
            panic!("no request matches job {uuid}:\n{job}\nexpected body {body}");
        };
        let r = requests.swap_remove(found);
        assert_eq!(r.method, "POST", "{uuid}");
        assert_eq!(r.status, 202, "{uuid}");
        assert_eq!(r.content_type.as_deref(), Some("application/json"));
        let arrived = r.json.as_ref().expect("JSON body");
        assert_within_opsgenie_limits(&r.path, arrived, uuid);
        edges.extend(edges_reached(&r.path, arrived, parsed));
        request_ids.insert(uuid, r.request_id);
    }
    if ["alpha", "beta"]
        .iter()
        .all(|team| parsed.iter().any(|p| p.team_id == *team))
    {
        edges.insert("both teams");
    }
    // Without these the batch would pass while testing none of the limits.
    assert_eq!(
        edges,
        BTreeSet::from(EDGES),
        "the seeded batch no longer reaches every edge case"
    );

    assert_eq!(stream.len(), JOBS);
    let mut entries: HashMap<&str, &HashMap<String, String>> = HashMap::new();
    for entry in &stream {
        let uuid = field(entry, "notification_uuid").expect("notification_uuid");
        assert!(
            entries.insert(uuid, entry).is_none(),
            "two entries for {uuid}"
        );
    }
    for parsed in &parsed {
        let uuid = parsed.notification_uuid.as_str();
        let entry = entries
            .get(uuid)
            .unwrap_or_else(|| panic!("no stream entry for {uuid}"));
        let delivered_at_ms = field(entry, "delivered_at_ms")
            .and_then(|v| v.parse().ok())
            .expect("delivered_at_ms");
        let want: HashMap<String, String> = delivery_fields(
            parsed,
            &build_request(parsed),
            &Delivery {
                status: 202,
                request_id: &request_ids[uuid],
                attempts: 1,
                delivered_at_ms,
            },
        )
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        assert_eq!(*entry, &want, "stream entry of {uuid}");
    }

    assert_eq!(lines.len(), JOBS, "one log line per job");
    let mut seen = BTreeSet::new();
    let mut missing: Vec<(&str, Value)> = Vec::new();
    for line in &lines {
        let uuid = line["notification_uuid"].as_str().expect("uuid");
        assert!(seen.insert(uuid.to_owned()), "two lines for {uuid}");
        let parsed = parsed
            .iter()
            .find(|p| p.notification_uuid == uuid)
            .expect("a line for a known job");
        let request = build_request(parsed);
        missing.extend(
            JOB_LINE_FIELDS
                .iter()
                .filter(|name| line.get(**name).is_none())
                .map(|name| (*name, line.clone())),
        );
        assert_eq!(line["outcome"], "delivered", "{line}");
        assert_eq!(line["status"], 202, "{line}");
        assert_eq!(line["attempt"], 1, "{line}");
        assert_eq!(line["team_id"], parsed.team_id.as_str(), "{line}");
        assert_eq!(line["kind"], parsed.kind().as_str(), "{line}");
        assert_eq!(line["action"], request.action.as_str(), "{line}");
        // A job without an alias is checked for the field's presence below, not here, so
        // that every other field of every line is checked first.
        if let Some(alias) = line.get("alias") {
            assert_eq!(alias, request.alias.as_deref().unwrap_or(""), "{line}");
        }
        assert_eq!(line["request_id"], request_ids[uuid].as_str(), "{line}");
        assert!(line["latency_ms"].is_u64(), "{line}");
    }
    let names: BTreeSet<&str> = missing.iter().map(|(name, _)| *name).collect();
    assert!(
        missing.is_empty(),
        "{} job lines lack a field of docs/contract.md section 10 ({names:?}), for example:\n{}",
        missing.len(),
        missing[0].1
    );
}

// ---------------------------------------------------------------------------------------------
// Idempotency, dead letters and the Redis keys.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redelivered_job_is_acked_as_a_duplicate_without_sending() {
    let env = TestEnv::new("dup").await;
    let standin = env.standin().serving("backend", "key-d").await;
    let mut worker = env.worker().spawn();
    let uuid = new_uuid();
    let body = spec_issue_job(&uuid, "backend").to_string();
    env.publish(body.as_bytes()).await;
    assert!(
        standin.wait_for_delivered(1, DEADLINE).await,
        "{}",
        worker.raw_log()
    );
    worker.wait_for_job_lines(1).await;
    env.publish(body.as_bytes()).await;
    worker.wait_for_job_lines(2).await;
    let lines = worker.job_lines();
    assert_eq!(lines[0]["outcome"], "delivered");
    assert_eq!(lines[1]["outcome"], "duplicate", "{}", lines[1]);
    assert_eq!(lines[1]["notification_uuid"], uuid.as_str());
    assert_eq!(env.queue_len(&env.queue).await, 0);
    worker.stop_cleanly(&["key-d"]).await;
    assert_eq!(standin.stats().received, 1);
    assert_eq!(standin.requests().len(), 1);
    let stream = env.stream().await;
    assert_eq!(stream.len(), 1);
    assert_eq!(field(&stream[0], "notification_uuid"), Some(uuid.as_str()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_for_an_unknown_team_is_dead_lettered_and_not_sent() {
    let env = TestEnv::new("noteam").await;
    let standin = env.standin().serving("backend", "key-u").await;
    let mut worker = env.worker().spawn();
    let uuid = new_uuid();
    let body = spec_issue_job(&uuid, "nobody").to_string();
    env.publish(body.as_bytes()).await;
    assert!(
        wait_until(DEADLINE, || async {
            env.queue_len(&env.dead_queue()).await == 1
        })
        .await,
        "nothing in {}:\n{}",
        env.dead_queue(),
        worker.raw_log()
    );
    worker.stop_cleanly(&["key-u"]).await;

    let letters = env.take_dead_letters().await;
    assert_eq!(letters.len(), 1);
    let letter = &letters[0];
    assert_eq!(letter.body, body.as_bytes(), "the original body is kept");
    assert_eq!(
        letter.headers.get("x-opsgenie-error").map(String::as_str),
        Some("unknown_team")
    );
    let message = letter
        .headers
        .get("x-opsgenie-error-message")
        .expect("x-opsgenie-error-message");
    assert!(message.contains("nobody"), "{message}");
    assert!(letter.headers.contains_key("x-opsgenie-attempts"));
    assert!(
        !letter.headers.contains_key("x-opsgenie-status"),
        "no HTTP answer, so no status: {:?}",
        letter.headers
    );
    assert_eq!(
        letter
            .properties
            .content_type()
            .as_ref()
            .map(|c| c.as_str()),
        Some("application/json")
    );
    assert_eq!(*letter.properties.delivery_mode(), Some(2));
    assert_eq!(standin.stats().received, 0, "a request was sent");
    assert!(env.stream().await.is_empty());
    assert_eq!(env.queue_len(&env.queue).await, 0);

    let lines = worker.job_lines();
    let log = worker.raw_log();
    assert_eq!(
        lines.len(),
        1,
        "one \"Job finished.\" line expected:\n{log}"
    );
    assert_eq!(lines[0]["notification_uuid"], uuid.as_str());
    assert_eq!(lines[0]["outcome"], "dead_lettered", "{}", lines[0]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_keys_carry_the_prefix_and_the_sent_marker_expires_with_the_dedupe_ttl() {
    let env = TestEnv::new("prefix").await;
    let standin = env.standin().serving("backend", "key-p").await;
    let mut worker = env.worker().flag("--dedupe-ttl", "600").spawn();
    let issue_uuid = new_uuid();
    let metric_uuid = new_uuid();
    let identifier = 7_000_001;
    let sequence = 1_732_665_600_000_i64;
    let metric = metric_job(&metric_uuid, "backend", identifier, "critical", sequence);
    env.publish_job(&spec_issue_job(&issue_uuid, "backend"))
        .await;
    env.publish_job(&metric).await;
    assert!(
        standin.wait_for_delivered(2, DEADLINE).await,
        "{}",
        worker.raw_log()
    );
    worker.wait_for_job_lines(2).await;
    worker.stop_cleanly(&["key-p"]).await;

    let stream_key = format!("{}deliveries", env.prefix);
    let kind: String = env
        .redis
        .custom(fred::cmd!("TYPE"), vec![stream_key.clone()])
        .await
        .expect("TYPE");
    assert_eq!(kind, "stream");
    // Two deliveries (each followed by its confirmation once Opsgenie processed it).
    assert_eq!(env.stream().await.len(), 2);

    for uuid in [&issue_uuid, &metric_uuid] {
        let marker = format!("{}sent:{uuid}", env.prefix);
        let value: Option<String> = env.redis.get(&marker).await.expect("GET");
        assert_eq!(value.as_deref(), Some("1"), "{marker}");
        let ttl: i64 = env.redis.ttl(&marker).await.expect("TTL");
        assert!(0 < ttl && ttl <= 600, "{marker} has TTL {ttl}");
        // Nothing about the job is written outside the prefix (not even the default one).
        let keys: Vec<String> = env
            .redis
            .custom(fred::cmd!("KEYS"), vec![format!("*{uuid}*")])
            .await
            .expect("KEYS");
        // Beside the marker, at most its pending confirmation (gone once it is confirmed).
        let pending = format!("{}confirm:{uuid}", env.prefix);
        assert!(keys.contains(&marker), "keys naming {uuid}: {keys:?}");
        assert!(
            keys.iter().all(|k| *k == marker || *k == pending),
            "keys naming {uuid}: {keys:?}"
        );
    }

    let seq_key = format!("{}seq:incident_1_{identifier}", env.prefix);
    let value: Option<String> = env.redis.get(&seq_key).await.expect("GET");
    assert_eq!(value, Some(sequence.to_string()), "{seq_key}");
    let ttl: i64 = env.redis.ttl(&seq_key).await.expect("TTL");
    assert!(
        0 < ttl && ttl <= 7 * 24 * 3600,
        "{seq_key} has TTL {ttl}, not up to 7 days"
    );
    let outside: Vec<String> = env
        .redis
        .custom(
            fred::cmd!("KEYS"),
            vec![format!("*seq:incident_1_{identifier}")],
        )
        .await
        .expect("KEYS");
    // Other tests' keys (each under a prefix `e2e:<its own name>:`) are not this job's.
    let outside: Vec<String> = outside
        .into_iter()
        .filter(|k| !k.starts_with("e2e:") || k.starts_with(&env.prefix))
        .collect();
    assert_eq!(outside, [seq_key]);
}

//! The jobs the tests publish: the examples of docs/contract.md section 3, varied where a test
//! needs its own alias, a sequence, a missing part or a size; and the randomized jobs of the
//! delivery batch. Every job body of the suites comes from here.

use rand::Rng;
use rand::rngs::StdRng;
use serde_json::{Value, json};

/// A fresh, random `notification_uuid`.
pub fn new_uuid() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// The issue alert example of docs/contract.md section 3, for `team`.
pub fn spec_issue_job(uuid: &str, team: &str) -> Value {
    json!({"version":1,"kind":"issue_alert","notification_uuid":uuid,
     "team_id":team,"priority":"P2",
     "organization":{"id":1,"slug":"acme","url":"https://acme.sentry.io"},
     "project":{"id":7,"slug":"api","name":"API"},
     "group":{"id":1234,"title":"ZeroDivisionError: division by zero","culprit":"app.views.divide","logger":"","level":"error"},
     "event":{"event_id":"9fe1b6f0","message":"","title":"ZeroDivisionError: division by zero","release":"api@1.4.2",
              "tags":[["level","error"],["environment","prod"]]},
     "rules":[{"id":17,"label":"Errors in prod"}]})
}

/// The metric alert example of docs/contract.md section 3, for `team`, without a sequence so that any
/// status of incident `identifier` may follow any other.
pub fn spec_metric_job(uuid: &str, team: &str, identifier: i64, status: &str) -> Value {
    json!({"version":1,"kind":"metric_alert","notification_uuid":uuid,
     "team_id":team,
     "organization":{"id":1,"slug":"acme","url":"https://acme.sentry.io"},
     "alert_rule":{"id":9,"name":"p95 latency above 2s"},
     "incident":{"identifier":identifier,"status":status},
     "text":"p95(transaction.duration) is 2480ms in the last 5 minutes"})
}

/// The issue alert example for `team`, with group `group`: its alias (`issue_alias(group)`)
/// is unique per group, so that the stand-in's per-alias books count the sends of each job.
pub fn issue_job(uuid: &str, team: &str, group: i64) -> Value {
    let mut job = spec_issue_job(uuid, team);
    job["group"]["id"] = json!(group);
    job
}

/// The alias Opsgenie files the `issue_job` of group `group` under.
pub fn issue_alias(group: i64) -> String {
    format!("sentry: {group}")
}

/// The metric alert example for `team`, incident `identifier` in `status`, with `sequence`
/// as its `incident.sequence`.
pub fn metric_job(uuid: &str, team: &str, identifier: i64, status: &str, sequence: i64) -> Value {
    let mut job = spec_metric_job(uuid, team, identifier, status);
    job["incident"]["sequence"] = json!(sequence);
    job
}

/// An issue alert for `team` with little more than the schema requires: no group (so no alias
/// and no entity), no priority, no release, no event message, and a base URL with a trailing
/// slash; organization 3, one tag `browser: Firefox 128`, rules 17 and 18.
pub fn bare_issue_job(uuid: &str, team: &str) -> Value {
    json!({"version":1,"kind":"issue_alert","notification_uuid":uuid,"team_id":team,
        "organization":{"id":3,"slug":"acme","url":"https://acme.sentry.io/"},
        "project":{"id":7,"slug":"api","name":"API"},
        "event":{"title":"Unhandled rejection: fetch failed","tags":[["browser","Firefox 128"]]},
        "rules":[{"id":17,"label":"Errors in prod"},{"id":18,"label":"New issues"}]})
}

/// An issue alert for `team` of `rules` rules whose organization URL is `url_chars` long, so
/// that its rule URLs would each repeat it: with 500,000 and 20,000, about 1 MB that would
/// multiply to 10 GB.
pub fn rule_bomb(team: &str, url_chars: usize, rules: usize) -> Vec<u8> {
    let rules: Vec<Value> = (0..rules).map(|i| json!({"id": i, "label": "r"})).collect();
    serde_json::to_vec(&json!({
        "version": 1, "kind": "issue_alert", "notification_uuid": new_uuid(), "team_id": team,
        "organization": {"id": 1, "slug": "acme", "url": format!("https://acme.example/{}", "a".repeat(url_chars))},
        "project": {"id": 7, "slug": "api", "name": "API"},
        "group": {"id": 77, "title": "Boom"},
        "event": {"title": "Boom"},
        "rules": rules,
    }))
    .unwrap()
}

/// Pieces strings are made of: plain text, the separators the builder strips or encodes,
/// multi-byte characters, emoji (with ZWJ sequences and flags) and combining marks, so that
/// every limit is counted in Unicode scalar values and nothing is split in the wrong place.
const PIECES: &[&str] = &[
    "a",
    "Z",
    "7",
    " ",
    ",",
    ",",
    ":",
    "-",
    "é",
    "e\u{301}",
    "a\u{308}\u{332}",
    "😀",
    "👩\u{200d}💻",
    "🇯🇵",
    "日本",
    "ß",
    "שלום",
    "\u{200b}",
    "/",
    "?",
    "&",
    "%",
    "#",
    "\"",
    "\\",
    "\n",
    "\t",
    "+",
    "=",
];

fn text(rng: &mut StdRng, max_pieces: usize) -> String {
    let n = rng.random_range(0..=max_pieces);
    (0..n)
        .map(|_| PIECES[rng.random_range(0..PIECES.len())])
        .collect()
}

/// Mostly short, sometimes long enough to hit the field's limit.
fn sized_text(rng: &mut StdRng, short: usize, long: usize) -> String {
    if rng.random_bool(0.15) {
        text(rng, long)
    } else {
        text(rng, short)
    }
}

fn random_priority(rng: &mut StdRng) -> Option<&'static str> {
    const CHOICES: [Option<&str>; 10] = [
        None,
        Some("P1"),
        Some("P2"),
        Some("P3"),
        Some("P4"),
        Some("P5"),
        Some("urgent"),
        Some("p2"),
        Some(""),
        Some("P0"),
    ];
    CHOICES[rng.random_range(0..CHOICES.len())]
}

/// A valid job for team `alpha` or `beta`, drawn from `rng`; `run` keeps its uuid unique
/// across runs and `index` makes its request unique (the message, or the incident alias).
pub fn random_job(rng: &mut StdRng, run: &str, index: usize) -> Value {
    let notification_uuid = if rng.random_bool(0.2) {
        format!("{run}-{index}-ü/é?&%")
    } else {
        format!("{run}-{index}")
    };
    let team = if rng.random_bool(0.5) {
        "alpha"
    } else {
        "beta"
    };
    let url = [
        "https://acme.sentry.io",
        "https://acme.sentry.io/",
        "http://sentry.internal:9000/base",
    ][rng.random_range(0..3)];
    let mut job = json!({
        "version": 1,
        "notification_uuid": notification_uuid,
        "team_id": team,
        "organization": {"id": rng.random_range(-5..1_000_000_i64), "slug": text(rng, 12), "url": url},
    });
    if let Some(priority) = random_priority(rng) {
        job["priority"] = json!(priority);
    }
    if rng.random_bool(0.1) {
        job["added_by_a_newer_producer"] = json!({"nested": [1, 2, 3]});
    }
    if rng.random_bool(0.5) {
        job["kind"] = json!("issue_alert");
        job["project"] = json!({"id": rng.random_range(1..10_000_i64), "slug": text(rng, 10), "name": text(rng, 20)});
        let mut event = json!({"title": format!("#{index} {}", sized_text(rng, 40, 300))});
        if rng.random_bool(0.5) {
            event["message"] = if rng.random_bool(0.3) {
                json!("")
            } else {
                json!(format!("m{index} {}", sized_text(rng, 40, 300)))
            };
        }
        if rng.random_bool(0.7) {
            event["release"] = json!(sized_text(rng, 10, 3000));
        }
        if rng.random_bool(0.8) {
            let n = rng.random_range(0..=30);
            let tags: Vec<[String; 2]> = (0..n)
                .map(|_| [sized_text(rng, 8, 60), sized_text(rng, 12, 60)])
                .collect();
            event["tags"] = json!(tags);
        }
        job["event"] = event;
        if rng.random_bool(0.6) {
            let mut group = json!({"id": rng.random_range(1..1_000_000_000_000_i64), "title": sized_text(rng, 30, 9000)});
            for name in ["culprit", "logger", "level"] {
                if rng.random_bool(0.7) {
                    group[name] = json!(sized_text(rng, 15, 700));
                }
            }
            job["group"] = group;
        }
        let rules: Vec<Value> = (0..rng.random_range(1..=4))
            .map(|_| json!({"id": rng.random_range(1..100_000_i64), "label": sized_text(rng, 15, 2500)}))
            .collect();
        job["rules"] = json!(rules);
    } else {
        job["kind"] = json!("metric_alert");
        let name = if rng.random_bool(0.1) {
            String::new()
        } else {
            format!("r{index} {}", sized_text(rng, 20, 300))
        };
        job["alert_rule"] = json!({"id": rng.random_range(1..100_000_i64), "name": name});
        let status = ["critical", "warning", "resolved"][rng.random_range(0..3)];
        // A distinct incident per job, so that the per-incident order never holds one back.
        let mut incident = json!({"identifier": 1_000_000 + index, "status": status});
        if rng.random_bool(0.5) {
            incident["sequence"] = json!(rng.random_range(1..2_000_000_000_000_i64));
        }
        job["incident"] = incident;
        if rng.random_bool(0.8) {
            job["text"] = json!(sized_text(rng, 40, 16_000));
        }
    }
    job
}

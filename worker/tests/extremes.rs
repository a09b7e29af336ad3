//! Jobs at the schema's extremes (lengths, counts, unicode, integer limits), valid or not:
//! whatever becomes of one, everything the worker produces from it stays within its cap: the
//! request within Opsgenie's limits, the stream entry's fields within 1 KB, a dead letter's
//! message within 1 KB and its properties within the broker's frame, the message id within an
//! AMQP short string.

use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable};
use opsgenie_shared::record::{Delivery, FIELD_LIMIT_BYTES, delivery_fields};
use opsgenie_shared::request::{
    ALIAS_LIMIT, DESCRIPTION_LIMIT, DETAILS_LIMIT, ENTITY_LIMIT, MAX_TAGS, MESSAGE_LIMIT, TAG_LIMIT,
};
use opsgenie_shared::text::chars;
use opsgenie_shared::{AlertJob, DeadReason, JobError, build_request};
use opsgenie_worker::broker::{
    HEADER_ERROR, HEADER_ERROR_MESSAGE, HEADER_VALUE_LIMIT, copy_properties, encoded_size,
    job_message_id,
};
use opsgenie_worker::job::pipeline::Outcome;
use proptest::prelude::*;
use serde_json::{Value, json};

/// Strings at the edges: empty, one char, around 255 bytes, 100 four-byte chars, long runs,
/// control characters, quotes, lone combining marks.
fn extreme_string() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        Just(String::new()),
        Just("\u{0}\u{1b}[31m\n\r\t\"\\".to_string()),
        Just("😀".to_string()),
        Just("e\u{301}".to_string()),
        Just("\u{202e}".to_string()),
        "[a-z]{1,8}",
        any::<String>(),
    ];
    (
        piece,
        prop_oneof![
            Just(1usize),
            Just(64),
            Just(100),
            Just(255),
            Just(256),
            0usize..5000,
            Just(60_000)
        ],
    )
        .prop_map(|(p, n)| {
            if p.is_empty() {
                p
            } else {
                p.repeat(n.div_ceil(p.len().max(1)))
                    .chars()
                    .take(n)
                    .collect()
            }
        })
}

fn extreme_int() -> impl Strategy<Value = Value> {
    prop_oneof![
        12 => prop_oneof![
            Just(i64::MIN),
            Just(i64::MAX),
            Just(9_007_199_254_740_993_i64),
            Just(-1),
            Just(0),
            any::<i64>(),
        ]
        .prop_map(|n| json!(n)),
        1 => prop_oneof![Just(json!(u64::MAX)), Just(json!(1.5)), Just(json!("12"))],
    ]
}

/// A notification uuid: mostly within the schema's 1 to 100 chars, sometimes not.
fn extreme_uuid() -> impl Strategy<Value = String> {
    prop_oneof![
        8 => prop_oneof![
            Just("😀".repeat(100)),
            Just("x".to_string()),
            "[0-9a-f-]{36}",
            prop::collection::vec(any::<char>(), 1..=100).prop_map(String::from_iter),
        ],
        1 => extreme_string(),
    ]
}

fn extreme_job() -> impl Strategy<Value = Vec<u8>> {
    (
        (extreme_uuid(), prop_oneof![8 => extreme_string().prop_map(|t| format!("t{t}")), 1 => Just(String::new())], extreme_string(), extreme_int()),
        (extreme_string(), extreme_string(), extreme_int(), extreme_int()),
        (extreme_string(), extreme_string(), prop::option::of(extreme_string())),
        (0usize..1200, extreme_string(), 0usize..60),
        (any::<bool>(), extreme_int(), prop_oneof![4 => Just("critical"), 4 => Just("resolved"), 4 => Just("warning"), 1 => Just("other")]),
        prop_oneof![
            8 => prop_oneof![
                "https://[a-z]{1,12}\\.example(/[a-z0-9%._~-]{0,30}){0,3}/?",
                (0usize..200_000).prop_map(|n| format!("http://a/{}", "u".repeat(n))),
            ],
            1 => Just("ftp://x".to_string()),
        ],
    )
        .prop_map(|((uuid, team, priority, org_id), (slug, title, group_id, rule_id), (message, culprit, release), (rules, label, tags), (metric, sequence, status), scheme)| {
            let url = scheme;
            let job = if metric {
                json!({"version": 1, "kind": "metric_alert", "notification_uuid": uuid, "team_id": team,
                  "priority": priority, "organization": {"id": org_id, "slug": slug, "url": url},
                  "alert_rule": {"id": rule_id, "name": title},
                  "incident": {"identifier": group_id, "status": status, "sequence": sequence},
                  "text": message})
            } else {
                json!({"version": 1, "kind": "issue_alert", "notification_uuid": uuid, "team_id": team,
                  "priority": priority, "organization": {"id": org_id, "slug": slug, "url": url},
                  "project": {"id": 1, "slug": slug, "name": title},
                  "group": {"id": group_id, "title": title, "culprit": culprit},
                  "event": {"title": title, "message": message, "release": release,
                            "tags": (0..tags).map(|i| json!([label, format!("{i}{culprit}")])).collect::<Vec<_>>()},
                  "rules": (0..rules).map(|i| json!({"id": rule_id.clone(), "label": format!("{label}{i}")})).collect::<Vec<_>>()})
            };
            serde_json::to_vec(&job).unwrap()
        })
}

fn check_request(job: &AlertJob) -> Result<(), TestCaseError> {
    let request = build_request(job);
    prop_assert!(request.alias.as_deref().map_or(0, chars) <= ALIAS_LIMIT);
    let body: Value = serde_json::from_slice(&request.body).unwrap();
    let field = |key: &str| body.get(key).and_then(Value::as_str).map_or(0, chars);
    prop_assert!(field("message") <= MESSAGE_LIMIT);
    prop_assert!(field("entity") <= ENTITY_LIMIT);
    prop_assert!(field("description") <= DESCRIPTION_LIMIT);
    if let Some(tags) = body.get("tags").and_then(Value::as_array) {
        prop_assert!(tags.len() <= MAX_TAGS);
        prop_assert!(tags.iter().all(|t| chars(t.as_str().unwrap()) <= TAG_LIMIT));
    }
    if let Some(details) = body.get("details").and_then(Value::as_object) {
        let size: usize = details
            .iter()
            .map(|(k, v)| chars(k) + chars(v.as_str().unwrap()))
            .sum();
        prop_assert!(size <= DETAILS_LIMIT);
    }
    let long_request_id = "r".repeat(4000);
    let delivery = Delivery {
        status: 202,
        request_id: &long_request_id,
        attempts: u32::MAX,
        delivered_at_ms: u64::MAX,
    };
    for (name, value) in delivery_fields(job, &request, &delivery) {
        prop_assert!(
            value.len() <= FIELD_LIMIT_BYTES,
            "{} holds {} bytes",
            name,
            value.len()
        );
    }
    prop_assert!(job_message_id(&job.notification_uuid).as_str().len() <= 255);
    Ok(())
}

fn check_dead_letter(error: &JobError) -> Result<(), TestCaseError> {
    let reason = match error {
        JobError::TooLarge { .. } => DeadReason::TooLarge,
        JobError::Invalid { .. } => DeadReason::InvalidJob,
    };
    let Outcome::DeadLetter { message, .. } = Outcome::dead_letter(reason, error.to_string())
    else {
        unreachable!()
    };
    prop_assert!(message.len() <= HEADER_VALUE_LIMIT);
    let mut own = FieldTable::default();
    own.insert(
        "x-trace".into(),
        AMQPValue::LongString("t".repeat(130_950).into()),
    );
    let original = BasicProperties::default().with_headers(own);
    let ours = [
        (HEADER_ERROR, AMQPValue::LongString(reason.as_str().into())),
        (
            HEADER_ERROR_MESSAGE,
            AMQPValue::LongString(message.as_str().into()),
        ),
    ];
    let budget = 131_072 - 84;
    prop_assert!(encoded_size(&copy_properties(&original, &ours, budget)) <= budget);
    Ok(())
}

#[test]
fn whatever_a_job_holds_everything_made_from_it_stays_within_its_cap() {
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig::with_cases(64));
    let valid = std::cell::Cell::new(0);
    let invalid = std::cell::Cell::new(0);
    runner
        .run(&extreme_job(), |body| match AlertJob::parse(&body) {
            Ok(job) => {
                valid.set(valid.get() + 1);
                check_request(&job)
            }
            Err(error) => {
                invalid.set(invalid.get() + 1);
                check_dead_letter(&error)
            }
        })
        .unwrap();
    // Both ways a job can go were taken, or the run proved less than it says.
    assert!(
        valid.get() >= 8 && invalid.get() >= 8,
        "{} valid, {} invalid",
        valid.get(),
        invalid.get()
    );
}

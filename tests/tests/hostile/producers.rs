//! What a producer can send that must not stop `enqueue` or garble `dead list`: a valid job
//! whose `notification_uuid` is longer than an AMQP short string, invalid jobs mixed with valid
//! ones, and control characters (a newline, ESC) in the fields an operator reads.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use lapin::BasicProperties;
use lapin::options::{BasicGetOptions, BasicPublishOptions};
use lapin::types::{AMQPValue, FieldTable};
use opsgenie_e2e::fixtures::*;
use opsgenie_e2e::*;
use sha2::{Digest, Sha256};

/// Generous: the machine is small and shared, and a passing run never waits this long.
const DEADLINE: Duration = Duration::from_secs(60);

/// Takes every message of the work queue: `message_id` by `notification_uuid`.
async fn take_published(env: &TestEnv) -> BTreeMap<String, Option<String>> {
    let mut taken = BTreeMap::new();
    while let Some(message) = env
        .channel
        .basic_get(env.queue.as_str().into(), BasicGetOptions { no_ack: true })
        .await
        .expect("basic.get")
    {
        let job: serde_json::Value =
            serde_json::from_slice(&message.delivery.data).expect("a published job is JSON");
        let uuid = job["notification_uuid"].as_str().expect("uuid").to_owned();
        let id = message
            .delivery
            .properties
            .message_id()
            .as_ref()
            .map(|m| m.as_str().to_owned());
        assert!(taken.insert(uuid, id).is_none(), "published twice");
    }
    taken
}

/// No control character but the newlines that end lines (and the tabs of `dead list`).
fn assert_no_raw_control(output: &str, allowed: &[u8]) {
    let raw: Vec<(usize, u8)> = output
        .bytes()
        .enumerate()
        .filter(|(_, b)| (*b < 0x20 || *b == 0x7f) && !allowed.contains(b))
        .collect();
    assert!(raw.is_empty(), "raw control bytes {raw:?} in:\n{output}");
    assert!(
        !output.chars().any(|c| ('\u{80}'..='\u{9f}').contains(&c)),
        "a C1 control character in:\n{output}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_uuid_longer_than_a_short_string_is_published_with_its_hash_as_message_id() {
    let env = TestEnv::new("hostile-long-uuid").await;
    // 100 characters, the most the schema allows, and 292 bytes: over AMQP's 255.
    let long = format!("{}{}", new_uuid(), "😀".repeat(64));
    assert_eq!((long.chars().count(), long.len()), (100, 292));
    // Exactly 255 bytes: still the uuid itself.
    let edge = format!("{}abc", "𝄞".repeat(63));
    let short = [new_uuid(), new_uuid()];
    let jobs = [
        spec_issue_job(&short[0], "backend"),
        spec_metric_job(&long, "backend", 801, "critical"),
        spec_issue_job(&edge, "backend"),
        spec_metric_job(&short[1], "backend", 802, "resolved"),
    ];
    let text: String = jobs.iter().map(|j| format!("{j}\n")).collect();
    let file = env.write_file("jobs.jsonl", text);

    let (code, stdout, stderr) = env.command(&["enqueue", file.to_str().expect("path")], None);
    assert_eq!(code, 0, "stdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(stdout.contains("published 4, failed 0"), "{stdout}");
    assert!(
        wait_until(DEADLINE, || async { env.queue_len(&env.queue).await == 4 }).await,
        "{} jobs in the queue",
        env.queue_len(&env.queue).await
    );

    let published = take_published(&env).await;
    let hash = format!("sha256:{:x}", Sha256::digest(long.as_bytes()));
    let expected: BTreeMap<String, Option<String>> = [
        (short[0].clone(), Some(short[0].clone())),
        (long.clone(), Some(hash)),
        (edge.clone(), Some(edge.clone())),
        (short[1].clone(), Some(short[1].clone())),
    ]
    .into_iter()
    .collect();
    assert_eq!(published, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_jobs_are_each_named_and_the_valid_ones_still_published() {
    let env = TestEnv::new("hostile-mixed").await;
    let valid = [new_uuid(), new_uuid(), new_uuid()];
    let mut no_team = spec_issue_job(&new_uuid(), "backend");
    no_team.as_object_mut().expect("object").remove("team_id");
    let hostile_status = "\u{1b}[31mopen\nforged line";
    let hostile = spec_metric_job(&new_uuid(), "backend", 901, hostile_status);
    let mixed = env.write_file(
        "mixed.jsonl",
        format!(
            "{}\n{no_team}\n{}\n{hostile}\n",
            spec_issue_job(&valid[0], "backend"),
            spec_metric_job(&valid[1], "backend", 902, "critical"),
        ),
    );
    // A file that is not JSON, with a newline in its name; the file after it still counts.
    let broken = env.write_file("broken\nname.json", "{oops");
    let last = env.write_file(
        "last.json",
        spec_issue_job(&valid[2], "backend").to_string(),
    );

    let (code, stdout, stderr) = env.command(
        &[
            "enqueue",
            mixed.to_str().expect("path"),
            broken.to_str().expect("path"),
            last.to_str().expect("path"),
        ],
        None,
    );
    assert_eq!(code, 1, "stdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(stdout.contains("published 3, failed 3"), "{stdout}");
    // Each named once, in the order of the input.
    let lines: Vec<&str> = stderr.lines().collect();
    let mut at = Vec::new();
    for named in [
        "mixed.jsonl: line 2: invalid job: team_id: missing field",
        "mixed.jsonl: line 4: invalid job: incident.status: unknown variant `\\u{1b}[31mopen\\nforged line`",
        "broken\\nname.json: not JSON",
    ] {
        let found: Vec<usize> = (0..lines.len())
            .filter(|i| lines[*i].contains(named))
            .collect();
        assert_eq!(found.len(), 1, "{named:?} in:\n{stderr}");
        at.extend(found);
    }
    assert!(at.is_sorted(), "{stderr}");
    assert!(!stderr.contains("forged line\n"), "{stderr}");
    assert_no_raw_control(&stdout, b"\n");
    assert_no_raw_control(&stderr, b"\n");

    assert!(
        wait_until(DEADLINE, || async { env.queue_len(&env.queue).await == 3 }).await,
        "{} jobs in the queue",
        env.queue_len(&env.queue).await
    );
    let published = take_published(&env).await;
    assert_eq!(
        published.keys().cloned().collect::<BTreeSet<_>>(),
        valid.iter().cloned().collect::<BTreeSet<_>>()
    );
    assert!(published.iter().all(|(uuid, id)| id.as_ref() == Some(uuid)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_list_shows_one_escaped_row_per_letter_whatever_the_letter_carries() {
    let env = TestEnv::new("hostile-dead").await;
    let _standin = env.standin().serving("backend", "key-h1").await;

    // A job for a team nobody has, whose id would forge a row and clear the screen: the worker
    // dead-letters it as unknown_team, with the team id in the message.
    let team = "ops\nunknown_team\tforged\u{1b}[2J";
    let uuid = new_uuid();
    env.publish_job(&spec_issue_job(&uuid, team)).await;
    let mut worker = env.worker().spawn();
    assert!(
        wait_until(DEADLINE, || async {
            env.queue_len(&env.dead_queue()).await == 1
        })
        .await,
        "{}",
        worker.raw_log()
    );
    assert_eq!(worker.terminate(DEADLINE).await.code(), Some(0));

    // A letter that is not a job at all, straight into the dead-letter queue: every field a
    // reader sees comes from whoever published it.
    let mut headers = FieldTable::default();
    headers.insert(
        "x-opsgenie-error".into(),
        AMQPValue::LongString("invalid_job\nrejected".into()),
    );
    headers.insert(
        "x-opsgenie-error-message".into(),
        AMQPValue::LongString("not JSON\r\n\u{1b}]0;owned\u{7}".into()),
    );
    let confirm = env
        .channel
        .basic_publish(
            "".into(),
            env.dead_queue().as_str().into(),
            BasicPublishOptions::default(),
            b"\x1b[31m not a job",
            BasicProperties::default()
                .with_message_id("id\nforged\u{9b}31m".into())
                .with_headers(headers),
        )
        .await
        .expect("publish")
        .await
        .expect("confirm");
    assert!(confirm.is_ack());
    assert!(
        wait_until(DEADLINE, || async {
            env.queue_len(&env.dead_queue()).await == 2
        })
        .await
    );

    let (code, stdout, stderr) = env.command(&["dead", "list"], None);
    assert_eq!(code, 0, "stdout:\n{stdout}\nstderr:\n{stderr}");
    assert_no_raw_control(&stdout, b"\t\n");
    assert_no_raw_control(&stderr, b"\n");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 3, "a header and one row per letter:\n{stdout}");
    for line in &lines {
        assert_eq!(line.split('\t').count(), 7, "{line:?}");
    }

    let worker_row = lines
        .iter()
        .find(|l| l.contains(&uuid))
        .unwrap_or_else(|| panic!("{uuid} not listed:\n{stdout}"));
    let fields: Vec<&str> = worker_row.split('\t').collect();
    assert_eq!(fields[0], "unknown_team");
    assert_eq!(fields[2], "ops\\nunknown_team\\tforged\\u{1b}[2J");
    assert!(fields[6].contains("is not in the keyring"), "{worker_row}");

    let crafted = lines
        .iter()
        .find(|l| l.starts_with("invalid_job"))
        .unwrap_or_else(|| panic!("the crafted letter is not listed:\n{stdout}"));
    let fields: Vec<&str> = crafted.split('\t').collect();
    assert_eq!(fields[0], "invalid_job\\nrejected");
    assert_eq!(fields[1], "id\\nforged\\u{9b}31m");
    assert_eq!(fields[2], "-");
    assert_eq!(fields[6], "not JSON\\r\\n\\u{1b}]0;owned\\u{7}");

    assert_eq!(
        env.queue_len(&env.dead_queue()).await,
        2,
        "dead list took a letter"
    );
}

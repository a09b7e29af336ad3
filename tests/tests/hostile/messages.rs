//! Hostile and unlucky messages, each queued in front of valid jobs: none of them may stop
//! the worker, make it reconnect, blow up its memory or its logs, or keep the jobs behind it
//! from being delivered. Each ends as a dead letter with a readable reason, or is delivered
//! within Opsgenie's and the record's limits.

use std::time::Duration;

use fred::interfaces::KeysInterface;
use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable};
use opsgenie_e2e::fixtures::*;
use opsgenie_e2e::*;
use serde_json::json;

const TEAM: &str = "backend";
const KEY: &str = "key-hostile";

/// Long enough for a loaded two-core machine; every wait ends as soon as its condition holds.
const SETTLE: Duration = Duration::from_secs(60);

/// The worker's peak resident memory so far, in KiB.
fn peak_rss_kib(worker: &WorkerProcess) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{}/status", worker.pid())).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM in /proc/<pid>/status")
}

/// The worker is alive, connected once (never reconnected), and wrote no line too long to read.
async fn assert_steady(worker: &mut WorkerProcess) {
    assert!(
        worker.child.try_wait().unwrap().is_none(),
        "the worker died:\n{}",
        tail(worker)
    );
    let consuming = || {
        worker
            .logs()
            .iter()
            .filter(|l| l["message"] == "Consuming.")
            .count()
    };
    // Log lines are written in batches: wait for the first one to land.
    wait_until(SETTLE, || async { consuming() > 0 }).await;
    let consuming = consuming();
    let log = worker.raw_log();
    assert_eq!(consuming, 1, "the worker reconnected:\n{}", tail(worker));
    let longest = log.lines().map(str::len).max().unwrap_or(0);
    assert!(longest < 8 * 1024, "a log line of {longest} bytes");
    assert!(log.len() < 1024 * 1024, "{} bytes of logs", log.len());
}

/// The log's last lines, each cut short: a hostile job makes long ones.
fn tail(worker: &WorkerProcess) -> String {
    worker
        .log_tail(15)
        .lines()
        .map(|l| &l[..l.len().min(600)])
        .collect::<Vec<_>>()
        .join("\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_too_large_for_a_frame_are_cut_and_valid_jobs_flow_behind_them() {
    let env = TestEnv::new("hostile-frame").await;
    let standin = env.standin().serving(TEAM, KEY).await;
    let mut worker = env.worker().spawn();

    // A string of 150,000 chars where a number belongs: serde quotes it in its error.
    let wrong_type = format!(r#"{{"version":"{}"}}"#, "A".repeat(150_000));
    env.publish(wrong_type.as_bytes()).await;
    // A valid job for a team of 200,000 chars: the unknown-team message names it.
    let long_team = "t".repeat(200_000);
    env.publish_job(&spec_issue_job(&new_uuid(), &long_team))
        .await;
    // A message that came with nearly a frame of headers of its own.
    let mut own = FieldTable::default();
    own.insert(
        "x-producer-trace".into(),
        AMQPValue::LongString("p".repeat(130_900).into()),
    );
    env.publish_with(
        spec_issue_job(&new_uuid(), "nobody").to_string().as_bytes(),
        BasicProperties::default().with_headers(own),
    )
    .await;
    let valid = env.publish_issue_uuids(TEAM, 10_000..10_020).await;

    assert!(
        wait_until(SETTLE, || async {
            env.queue_len(&env.dead_queue()).await == 3 && env.stream().await.len() == valid.len()
        })
        .await,
        "dead {} of 3, delivered {} of {}:\n{}",
        env.queue_len(&env.dead_queue()).await,
        env.stream().await.len(),
        valid.len(),
        tail(&worker)
    );
    assert_eq!(standin.delivered(), valid.len() as u64);
    assert_steady(&mut worker).await;

    let letters = env.take_dead_letters().await;
    let reasons: Vec<&str> = letters
        .iter()
        .map(|l| l.headers["x-opsgenie-error"].as_str())
        .collect();
    assert_eq!(reasons, ["invalid_job", "unknown_team", "unknown_team"]);
    for letter in &letters {
        let message = &letter.headers["x-opsgenie-error-message"];
        assert!(message.len() <= 1024, "{} bytes", message.len());
    }
    assert!(letters[0].headers["x-opsgenie-error-message"].starts_with("version: invalid type"));
    assert!(letters[1].headers["x-opsgenie-error-message"].contains("is not in the keyring"));
    // The body is kept whole; the producer's headers did not fit beside ours and say so.
    assert_eq!(letters[0].body, wrong_type.as_bytes());
    assert!(!letters[2].headers.contains_key("x-producer-trace"));
    let dropped: u64 = letters[2].headers["x-opsgenie-headers-dropped"]
        .parse()
        .unwrap();
    assert!(dropped > 130_000, "{dropped}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_whose_parts_multiply_are_delivered_in_bounded_memory() {
    let env = TestEnv::new("hostile-bomb").await;
    let standin = env.standin().serving(TEAM, KEY).await;
    let mut worker = env.worker().spawn();
    let bombs = [
        rule_bomb(TEAM, 500_000, 20_000),
        rule_bomb(TEAM, 100_000, 1_000),
    ];
    assert!(bombs[0].len() > 900_000 && bombs[0].len() < 1024 * 1024);
    for bomb in &bombs {
        env.publish(bomb).await;
    }
    let valid = env.publish_issue_uuids(TEAM, 10_000..10_020).await;
    let expected = valid.len() + bombs.len();
    assert!(
        wait_until(SETTLE, || async { env.stream().await.len() == expected }).await,
        "delivered {} of {expected}:\n{}",
        env.stream().await.len(),
        tail(&worker)
    );
    assert_eq!(standin.delivered(), expected as u64);
    // Each request stayed within Opsgenie's limits (the stand-in answers 422 otherwise).
    for request in standin.requests() {
        assert!(
            request.body.len() < 64 * 1024,
            "{} bytes",
            request.body.len()
        );
    }
    let peak_mib = peak_rss_kib(&worker) / 1024;
    assert!(peak_mib < 100, "peak RSS {peak_mib} MiB");
    assert_steady(&mut worker).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resolve_one_above_two_to_the_53_closes_the_incident() {
    let env = TestEnv::new("hostile-seq").await;
    let standin = env.standin().serving(TEAM, KEY).await;
    let mut worker = env.worker().spawn();
    let job = |status: &str, sequence: i64| {
        metric_job(&new_uuid(), TEAM, 4242, status, sequence).to_string()
    };
    // Nanosecond timestamps: neighbours a double cannot tell apart.
    env.publish(job("critical", 9_007_199_254_740_992).as_bytes())
        .await;
    assert!(standin.wait_for_delivered(1, SETTLE).await);
    env.publish(job("resolved", 9_007_199_254_740_993).as_bytes())
        .await;
    assert!(
        wait_until(SETTLE, || async { env.stream().await.len() == 2 }).await,
        "{}",
        tail(&worker)
    );
    let stream = env.stream().await;
    assert_eq!(stream[1]["action"], "close");
    assert_eq!(standin.alerts()["incident_1_4242"].closes, 1);
    // And one below is stale: the incident is not reopened.
    env.publish(job("critical", 9_007_199_254_740_992).as_bytes())
        .await;
    assert!(
        wait_until(SETTLE, || async {
            worker.job_lines().iter().any(|l| l["outcome"] == "stale")
        })
        .await
    );
    assert_eq!(env.stream().await.len(), 2);
    assert_steady(&mut worker).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_issue_alert_named_like_an_incident_leaves_the_incident_its_lease() {
    let env = TestEnv::new("hostile-lease").await;
    let standin = env
        .standin()
        .serving(TEAM, KEY)
        .delay(Duration::from_secs(8))
        .await;
    let mut worker = env.worker().flag("--request-timeout", "30s").spawn();
    let alias = "incident_1_9001";
    env.publish_job(&spec_issue_job(alias, TEAM)).await;
    let notification_lease = format!("{}lease:notification:{alias}", env.prefix);
    let incident_lease = format!("{}lease:{alias}", env.prefix);
    let held = |key: String| {
        let redis = env.redis.clone();
        async move { redis.exists::<u32, _>(key).await.unwrap() == 1 }
    };
    assert!(wait_until(SETTLE, || held(notification_lease.clone())).await);
    assert!(!held(incident_lease.clone()).await);
    // While the issue alert's request is in flight, the incident's own job takes its lease.
    env.publish_job(&spec_metric_job(&new_uuid(), TEAM, 9001, "critical"))
        .await;
    assert!(wait_until(SETTLE, || held(incident_lease.clone())).await);
    assert!(
        held(notification_lease.clone()).await,
        "both leases are held at once"
    );
    assert!(standin.wait_for_delivered(2, SETTLE).await);
    assert_steady(&mut worker).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_fields_are_capped_whatever_the_job_holds() {
    let env = TestEnv::new("hostile-stream").await;
    let _standin = env.standin().serving(TEAM, KEY).await;
    let mut worker = env.worker().spawn();
    let mut job = spec_issue_job(&new_uuid(), TEAM);
    job["project"]["slug"] = json!("s".repeat(900_000));
    job["rules"] = json!(
        (0..3000)
            .map(|i| json!({"id": i, "label": "x"}))
            .collect::<Vec<_>>()
    );
    env.publish_job(&job).await;
    assert!(wait_until(SETTLE, || async { env.stream().await.len() == 1 }).await);
    let entry = &env.stream().await[0];
    for (name, value) in entry {
        assert!(value.len() <= 1024, "{name}: {} bytes", value.len());
    }
    assert!(entry["project_slug"].ends_with('…'));
    assert!(entry["rule_ids"].starts_with("0,1,2,"));
    assert_steady(&mut worker).await;
}

/// A message that kills every attempt at it (here: the worker is killed with it in hand) is
/// dead-lettered as poison after `--poison-after` unfinished attempts, and the jobs behind it
/// are delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_that_keeps_killing_its_attempt_ends_as_poison() {
    let env = TestEnv::new("hostile-poison").await;
    // Its team's API never answers in time: the attempt is always in hand when the worker dies.
    let _hanging = env
        .standin()
        .serving("hanging", KEY)
        .delay(Duration::from_secs(120))
        .await;
    let _answering = env.standin().serving(TEAM, KEY).await;
    let poison_uuid = new_uuid();
    let poison = issue_job(&poison_uuid, "hanging", 1);
    env.publish_job(&poison).await;
    let lease = format!("{}lease:notification:{poison_uuid}", env.prefix);
    let flags = ["--request-timeout", "300s", "--poison-after", "3"];
    // Four workers die with it in hand: the first delivery is not counted, the next three are.
    for round in 0..4 {
        let mut worker = env.worker().flags(&flags).spawn();
        let held = wait_until(SETTLE, || async {
            env.redis.exists::<u32, _>(&lease).await.unwrap() == 1
        })
        .await;
        assert!(
            held,
            "round {round}: the job never went out:\n{}",
            tail(&worker)
        );
        worker.signal("KILL");
        worker.wait_exit(SETTLE).await.expect("killed");
        // Its lease would expire by itself; the next round need not wait for that.
        let _: u32 = env.redis.del(&lease).await.unwrap();
    }
    let mut worker = env.worker().flags(&flags).spawn();
    let valid = env.publish_issue_uuids(TEAM, 10_000..10_005).await;
    assert!(
        wait_until(SETTLE, || async {
            env.queue_len(&env.dead_queue()).await == 1 && env.stream().await.len() == valid.len()
        })
        .await,
        "{}",
        tail(&worker)
    );
    let letters = env.take_dead_letters().await;
    assert_eq!(letters[0].headers["x-opsgenie-error"], "poison");
    assert!(letters[0].headers["x-opsgenie-error-message"].contains("never finished"));
    assert_eq!(letters[0].body, poison.to_string().as_bytes());
    assert_steady(&mut worker).await;
}

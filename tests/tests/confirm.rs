//! Past the 202 (docs/contract.md sections 4, 6.1 and 6.2), end to end against the real broker
//! and Redis: every delivery confirmed once; a request that fails after its 202 dead-lettered
//! with the API's reason and delivered again by `dead replay`; pending confirmations that
//! survive a replica killed with SIGKILL and a Redis outage; a heartbeat that the fleet pings
//! about once per interval, that stops when the fleet cannot work; a team moved to Jira
//! Service Management by one keyring line; questions in flight that stay within their bound.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use fred::prelude::*;
use opsgenie_e2e::fixtures::*;
use opsgenie_e2e::relay::Relay;
use opsgenie_e2e::*;
use opsgenie_standin::{AsyncFailure, StandIn, StandInConfig};

/// Generous: the machine is small and shared, and a passing run never waits this long.
const DEADLINE: Duration = Duration::from_secs(90);
const TEAM: &str = "backend";
const KEY: &str = "key-backend";

async fn standin(processing_delay: Duration, delay: Option<Duration>) -> StandIn {
    StandIn::start(StandInConfig {
        keys: vec![KEY.to_owned()],
        processing_delay,
        delay,
        ..StandInConfig::default()
    })
    .await
    .expect("start the stand-in")
}

fn keyring(env: &TestEnv, api_url: &str, heartbeat: Option<(&str, &str)>) -> PathBuf {
    let mut text = format!(
        "[[team]]\nid = \"{TEAM}\"\nintegration_key = \"{KEY}\"\napi_url = \"{api_url}\"\n"
    );
    if let Some((name, interval)) = heartbeat {
        text.push_str(&format!(
            "\n[heartbeat]\nname = \"{name}\"\nintegration_key = \"{KEY}\"\napi_url = \"{api_url}\"\ninterval = \"{interval}\"\n"
        ));
    }
    let path = env.dir.join("keyring.toml");
    std::fs::write(&path, text).expect("write keyring");
    path
}

/// Stream entries by event, then by notification_uuid: how many of each.
async fn events(env: &TestEnv) -> HashMap<String, HashMap<String, usize>> {
    let mut counts: HashMap<String, HashMap<String, usize>> = HashMap::new();
    for entry in env.stream_events().await {
        *counts
            .entry(entry.get("event").cloned().unwrap_or_default())
            .or_default()
            .entry(entry["notification_uuid"].clone())
            .or_default() += 1;
    }
    counts
}

fn count(events: &HashMap<String, HashMap<String, usize>>, event: &str) -> usize {
    events.get(event).map_or(0, |m| m.values().sum())
}

async fn pending(env: &TestEnv) -> u64 {
    env.redis
        .zcard(format!("{}confirm:due", env.prefix))
        .await
        .expect("zcard")
}

async fn publish_issue_jobs(env: &TestEnv, n: usize, first_group: i64) -> Vec<String> {
    let mut uuids = Vec::with_capacity(n);
    for i in 0..n {
        let uuid = new_uuid();
        env.publish(
            issue_job(&uuid, TEAM, first_group + i as i64)
                .to_string()
                .as_bytes(),
        )
        .await;
        uuids.push(uuid);
    }
    uuids
}

/// Waits until every one of `uuids` is confirmed, checks that each is confirmed once, and
/// answers the stream's events.
async fn all_confirmed_once(
    env: &TestEnv,
    worker: &WorkerProcess,
    uuids: &[String],
) -> HashMap<String, HashMap<String, usize>> {
    assert!(
        wait_until(DEADLINE, || async {
            count(&events(env).await, "confirmed") >= uuids.len()
        })
        .await,
        "{}",
        log_tail(worker, 20)
    );
    let events = events(env).await;
    for uuid in uuids {
        assert_eq!(events["confirmed"].get(uuid), Some(&1), "{uuid} confirmed");
    }
    events
}

async fn stop(worker: &mut WorkerProcess) {
    let status = worker.terminate(Duration::from_secs(40)).await;
    assert!(status.success(), "{status:?}: {}", log_tail(worker, 20));
}

#[tokio::test]
async fn every_delivery_of_hundreds_is_confirmed_exactly_once() {
    let env = TestEnv::new("confirm-all").await;
    let standin = standin(Duration::from_millis(300), None).await;
    let keyring = keyring(&env, &standin.base_url(), None);
    let uuids = publish_issue_jobs(&env, 300, 1).await;
    let (mut worker, port) = env.spawn_ready_worker(&keyring, &[]).await;
    assert!(
        wait_until(DEADLINE, || async {
            count(&events(&env).await, "confirmed") >= uuids.len()
        })
        .await,
        "{:?}\n{}",
        events(&env)
            .await
            .iter()
            .map(|(e, m)| (e.clone(), m.len()))
            .collect::<Vec<_>>(),
        log_tail(&worker, 20)
    );
    let events = events(&env).await;
    for uuid in &uuids {
        assert_eq!(events["delivered"].get(uuid), Some(&1), "{uuid} delivered");
        assert_eq!(events["confirmed"].get(uuid), Some(&1), "{uuid} confirmed");
    }
    assert_eq!(count(&events, "confirmed"), uuids.len());
    assert!(!events.contains_key("failed_async") && !events.contains_key("unconfirmed"));
    // Each confirmation names the delivery's request and the alert it became.
    let all = env.stream_events().await;
    let delivered: HashMap<&str, &str> = all
        .iter()
        .filter(|e| e["event"] == "delivered")
        .map(|e| (e["notification_uuid"].as_str(), e["request_id"].as_str()))
        .collect();
    for confirmed in all.iter().filter(|e| e["event"] == "confirmed") {
        let uuid = confirmed["notification_uuid"].as_str();
        assert_eq!(confirmed["request_id"], delivered[uuid], "{uuid}");
        assert!(!confirmed["alert_id"].is_empty(), "{confirmed:?}");
        assert!(confirmed["confirmed_at_ms"].parse::<u64>().is_ok());
    }
    // Nothing is left pending, and the metrics say so.
    assert!(wait_until(DEADLINE, || async { pending(&env).await == 0 }).await);
    assert_eq!(standin.delivered(), uuids.len() as u64);
    assert!(standin.stats().status_asks >= uuids.len() as u64);
    let metrics = http_get(port, "/metrics").await.expect("metrics").1;
    let confirmed = metrics
        .lines()
        .find(|l| l.starts_with("opsgenie_confirmations_total{result=\"confirmed\"}"))
        .unwrap_or_else(|| panic!("no confirmed count:\n{metrics}"));
    assert!(confirmed.ends_with(" 300"), "{confirmed}");
    assert!(
        metrics.contains("opsgenie_confirmation_lag_seconds_count 300"),
        "{metrics}"
    );
    stop(&mut worker).await;
}

/// The questions a replica asks are bounded (docs/contract.md section 6.1: at most 16 in
/// flight), however many confirmations fall due together: behind an API that takes 300 ms to
/// answer, deliveries answered together fall due together, 64 at a time, and the confirmer
/// asks about them up to its bound, never past it. Every one is still confirmed once.
#[tokio::test]
async fn questions_in_flight_stay_within_their_bound_when_many_fall_due_together() {
    let env = TestEnv::new("confirm-bound").await;
    let standin = standin(Duration::ZERO, Some(Duration::from_millis(300))).await;
    let keyring = keyring(&env, &standin.base_url(), None);
    let uuids = publish_issue_jobs(&env, 256, 1).await;
    let (mut worker, _port) = env.spawn_ready_worker(&keyring, &[]).await;
    all_confirmed_once(&env, &worker, &uuids).await;
    let most = standin.stats().most_status_asks_in_flight;
    assert!(
        (8..=16).contains(&most),
        "{most} questions in flight at most; the bound is 16"
    );
    stop(&mut worker).await;
}

#[tokio::test]
async fn a_request_failed_after_its_202_is_dead_lettered_with_the_reason_and_replayed() {
    let env = TestEnv::new("confirm-failed").await;
    let standin = standin(Duration::from_millis(200), None).await;
    let marker = format!("doomed-{}", &new_uuid()[..8]);
    standin.fail_asynchronously(AsyncFailure {
        contains: marker.clone(),
        status: "Integration is disabled".into(),
        count: Some(2),
    });
    let keyring = keyring(&env, &standin.base_url(), None);
    let fine = publish_issue_jobs(&env, 5, 10).await;
    let mut doomed = Vec::new();
    for group in [100, 101] {
        let uuid = new_uuid();
        let mut job = issue_job(&uuid, TEAM, group);
        job["event"]["title"] = format!("{marker} {group}").into();
        env.publish(job.to_string().as_bytes()).await;
        doomed.push(uuid);
    }
    let (mut worker, _) = env.spawn_ready_worker(&keyring, &[]).await;
    assert!(
        wait_until(DEADLINE, || async {
            let events = events(&env).await;
            count(&events, "failed_async") == 2 && count(&events, "confirmed") == fine.len()
        })
        .await,
        "{:?}\n{}",
        events(&env).await,
        log_tail(&worker, 20)
    );
    let entries = env.stream_events().await;
    for uuid in &doomed {
        let failed = entries
            .iter()
            .find(|e| e["event"] == "failed_async" && &e["notification_uuid"] == uuid)
            .expect("a failed_async entry");
        assert_eq!(failed["status_text"], "Integration is disabled");
    }
    assert!(
        wait_until(DEADLINE, || async {
            env.queue_len(&env.dead_queue()).await == 2
        })
        .await
    );
    let (code, out, err) = env.command(&["dead", "list"], None);
    assert_eq!(code, 0, "{out}{err}");
    for uuid in &doomed {
        let line = out
            .lines()
            .find(|l| l.contains(uuid.as_str()))
            .unwrap_or_else(|| panic!("{uuid} not listed:\n{out}"));
        assert!(line.starts_with("failed_async\t"), "{line}");
        assert!(line.contains("Integration is disabled"), "{line}");
    }

    // The cause is fixed (the rule served its two failures); the replay delivers each once
    // more, and this time it is confirmed.
    let (code, out, err) = env.command(&["dead", "replay"], None);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("Replayed 2 dead letter"), "{out}");
    assert!(
        wait_until(DEADLINE, || async {
            let events = events(&env).await;
            doomed
                .iter()
                .all(|u| events.get("confirmed").and_then(|m| m.get(u)) == Some(&1))
        })
        .await,
        "{:?}\n{}",
        events(&env).await,
        log_tail(&worker, 20)
    );
    let events = events(&env).await;
    for uuid in &doomed {
        assert_eq!(
            events["delivered"][uuid], 2,
            "{uuid}: first and replayed delivery"
        );
        assert_eq!(events["failed_async"][uuid], 1);
    }
    for uuid in &fine {
        assert_eq!(events["delivered"][uuid], 1);
    }
    assert_eq!(standin.delivered(), (fine.len() + 2 * doomed.len()) as u64);
    assert_eq!(env.queue_len(&env.dead_queue()).await, 0);
    stop(&mut worker).await;
}

#[tokio::test]
async fn a_replica_killed_while_confirming_leaves_every_confirmation_to_another() {
    let env = TestEnv::new("confirm-kill").await;
    // Slow to process and slow to answer: the first replica is asking when it dies.
    let standin = standin(Duration::from_secs(3), Some(Duration::from_millis(300))).await;
    let keyring = keyring(&env, &standin.base_url(), None);
    let uuids = publish_issue_jobs(&env, 60, 1).await;
    let (mut first, _) = env
        .spawn_ready_worker(&keyring, &["--request-timeout", "2s"])
        .await;
    assert!(
        wait_until(DEADLINE, || async {
            env.stream().await.len() == uuids.len() && standin.stats().status_asks > 0
        })
        .await,
        "{}",
        log_tail(&first, 20)
    );
    first.signal("KILL");
    first
        .wait_exit(Duration::from_secs(10))
        .await
        .expect("killed");
    let unsettled = pending(&env).await;
    assert!(unsettled > 0, "every confirmation settled before the kill");

    let (mut second, _) = env
        .spawn_ready_worker(&keyring, &["--request-timeout", "2s"])
        .await;
    assert!(
        wait_until(DEADLINE, || async {
            count(&events(&env).await, "confirmed") >= uuids.len()
        })
        .await,
        "{} left pending\n{}",
        pending(&env).await,
        log_tail(&second, 20)
    );
    let events = events(&env).await;
    for uuid in &uuids {
        assert_eq!(events["confirmed"].get(uuid), Some(&1), "{uuid}");
        assert_eq!(events["delivered"].get(uuid), Some(&1), "{uuid}");
    }
    assert_eq!(pending(&env).await, 0);
    stop(&mut second).await;
}

#[tokio::test]
async fn confirmations_pending_while_redis_is_cut_off_are_all_settled_after() {
    let env = TestEnv::new("confirm-redis").await;
    let processing = Duration::from_secs(4);
    let standin = standin(processing, None).await;
    let keyring = keyring(&env, &standin.base_url(), None);
    let relay = Relay::start("127.0.0.1:6379".parse().unwrap())
        .await
        .expect("relay");
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let mut worker = env.spawn_worker_via(
        &keyring,
        AMQP_URL,
        &relay.redis_url(),
        &["--metrics-addr", &addr],
    );
    let uuids = publish_issue_jobs(&env, 40, 1).await;
    assert!(
        wait_until(DEADLINE, || async {
            env.stream().await.len() == uuids.len()
        })
        .await,
        "{}",
        log_tail(&worker, 20)
    );
    let last_delivery_ms = env
        .stream()
        .await
        .iter()
        .filter_map(|e| e["delivered_at_ms"].parse::<u64>().ok())
        .max()
        .expect("deliveries");
    // Cut off before any request could be processed: every confirmation is still pending,
    // and falls due while Redis is away.
    relay.cut().await;
    assert_eq!(count(&events(&env).await, "confirmed"), 0);
    assert!(
        wait_until(DEADLINE, || async {
            matches!(http_get(port, "/readyz").await, Some((503, _)))
        })
        .await
    );
    let processed_at = last_delivery_ms + processing.as_millis() as u64;
    assert!(
        wait_until(DEADLINE, || async {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_millis() as u64
                > processed_at
        })
        .await
    );
    relay.restore();
    let events = all_confirmed_once(&env, &worker, &uuids).await;
    for uuid in &uuids {
        assert_eq!(events["delivered"].get(uuid), Some(&1), "{uuid}");
    }
    assert_eq!(pending(&env).await, 0);
    stop(&mut worker).await;
}

#[tokio::test]
async fn two_replicas_ping_the_heartbeat_once_per_interval_and_stop_without_redis() {
    let env = TestEnv::new("heartbeat").await;
    let standin = standin(Duration::ZERO, None).await;
    let name = format!("pager pipeline {}", &new_uuid()[..8]);
    let keyring = keyring(&env, &standin.base_url(), Some((&name, "1s")));
    let relay = Relay::start("127.0.0.1:6379".parse().unwrap())
        .await
        .expect("relay");
    let ports = [free_port(), free_port()];
    let mut workers: Vec<WorkerProcess> = ports
        .iter()
        .map(|port| {
            let addr = format!("127.0.0.1:{port}");
            env.spawn_worker_via(
                &keyring,
                AMQP_URL,
                &relay.redis_url(),
                &["--metrics-addr", &addr],
            )
        })
        .collect();
    for port in ports {
        assert!(
            wait_until(DEADLINE, || async {
                matches!(http_get(port, "/readyz").await, Some((200, _)))
            })
            .await
        );
    }
    let pings = || standin.heartbeat_pings(&name);
    let start = pings().len();
    assert!(
        standin
            .wait_until(DEADLINE, |_| pings().len() >= start + 8)
            .await,
        "{:?}",
        pings()
    );
    // About once a second together: never two within an interval, never a long silence.
    let times = pings();
    let gaps: Vec<u64> = times[start..].windows(2).map(|w| w[1] - w[0]).collect();
    assert!(
        gaps.iter().all(|&gap| (900..=2_500).contains(&gap)),
        "gaps between pings (ms): {gaps:?}"
    );
    let mean = gaps.iter().sum::<u64>() as f64 / gaps.len() as f64;
    assert!((950.0..=1_500.0).contains(&mean), "mean gap {mean} ms");

    // Without Redis neither replica is ready, and nobody pings.
    relay.cut().await;
    for port in ports {
        assert!(
            wait_until(DEADLINE, || async {
                matches!(http_get(port, "/readyz").await, Some((503, _)))
            })
            .await
        );
    }
    let silent_from = pings().len();
    assert!(
        !standin
            .wait_until(Duration::from_secs(4), |_| pings().len() > silent_from)
            .await,
        "pinged without Redis"
    );
    relay.restore();
    assert!(
        standin
            .wait_until(DEADLINE, |_| pings().len() >= silent_from + 2)
            .await,
        "pings did not resume"
    );
    let metrics = http_get(ports[0], "/metrics").await.expect("metrics").1
        + &http_get(ports[1], "/metrics").await.expect("metrics").1;
    let ok: u64 = metrics
        .lines()
        .filter(|l| l.starts_with("opsgenie_heartbeat_pings_total{result=\"ok\"}"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum();
    assert!(ok >= 10, "{ok} pings counted");
    for worker in &mut workers {
        stop(worker).await;
    }
    // The heartbeat's key never travels: not in a log line.
    for worker in &workers {
        assert!(!worker.raw_log().contains(KEY));
    }
}

#[tokio::test]
async fn a_team_moved_to_jira_service_management_is_served_below_its_prefix() {
    let env = TestEnv::new("jsm").await;
    let standin = standin(Duration::from_millis(100), None).await;
    let base = format!("{}/jsm/ops/integration", standin.base_url());
    let name = format!("jsm heartbeat {}", &new_uuid()[..8]);
    let keyring = keyring(&env, &base, Some((&name, "1s")));

    let (code, out, err) = env.command(
        &[
            "check",
            "--keyring",
            keyring.to_str().unwrap(),
            "--redis-prefix",
            &env.prefix,
        ],
        None,
    );
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains(&format!("ok: team {TEAM}: api_url {base}")),
        "check does not show the destination:\n{out}"
    );
    assert!(!out.contains(KEY) && !err.contains(KEY));

    let (critical, resolved) = (new_uuid(), new_uuid());
    env.publish(
        metric_job(&critical, TEAM, 77, "critical", 1)
            .to_string()
            .as_bytes(),
    )
    .await;
    env.publish(
        metric_job(&resolved, TEAM, 77, "resolved", 2)
            .to_string()
            .as_bytes(),
    )
    .await;
    let (mut worker, _) = env.spawn_ready_worker(&keyring, &[]).await;
    assert!(
        wait_until(DEADLINE, || async {
            count(&events(&env).await, "confirmed") == 2
                && !standin.heartbeat_pings(&name).is_empty()
        })
        .await,
        "{:?}\n{}",
        events(&env).await,
        log_tail(&worker, 20)
    );
    let requests = standin.requests();
    let paths: Vec<(String, Option<String>)> = requests
        .iter()
        .map(|r| (r.path.clone(), r.query.clone()))
        .collect();
    assert_eq!(
        paths,
        [
            ("/jsm/ops/integration/v2/alerts".to_string(), None),
            (
                "/jsm/ops/integration/v2/alerts/incident_1_77/close".to_string(),
                Some("identifierType=alias".to_string())
            ),
        ],
        "{requests:#?}"
    );
    assert!(
        requests
            .iter()
            .all(|r| r.authorization.as_deref() == Some(&format!("GenieKey {KEY}")))
    );
    assert_eq!(
        standin.alerts()["incident_1_77"].status,
        opsgenie_standin::AliasStatus::Closed
    );
    stop(&mut worker).await;
}

#[tokio::test]
async fn sighup_starts_and_stops_the_heartbeat() {
    let env = TestEnv::new("heartbeat-hup").await;
    let standin = standin(Duration::ZERO, None).await;
    let name = format!("reloaded {}", &new_uuid()[..8]);
    let without = keyring(&env, &standin.base_url(), None);
    let (mut worker, _) = env.spawn_ready_worker(&without, &[]).await;
    let pings = || standin.heartbeat_pings(&name).len();

    keyring(&env, &standin.base_url(), Some((&name, "1s")));
    worker.signal("HUP");
    assert!(
        standin.wait_until(DEADLINE, |_| pings() >= 2).await,
        "no ping after the reload: {}",
        log_tail(&worker, 10)
    );

    // Removed again: the pings stop.
    keyring(&env, &standin.base_url(), None);
    let reloads = || {
        worker
            .logs()
            .iter()
            .filter(|l| l["message"] == "Keyring reloaded.")
            .count()
    };
    worker.signal("HUP");
    assert!(wait_until(DEADLINE, || async { reloads() >= 2 }).await);
    // A ping whose turn was taken just before the reload may still land.
    let after = pings() + 1;
    assert!(
        !standin
            .wait_until(Duration::from_secs(4), |_| pings() > after)
            .await,
        "still pinging after the heartbeat was removed"
    );
    stop(&mut worker).await;
}

//! Past the 202 (docs/contract.md sections 4, 6.1 and 6.2), end to end against the real broker
//! and Redis: every delivery confirmed once; a request that fails after its 202 dead-lettered
//! with the API's reason and delivered again by `dead replay`; pending confirmations that
//! survive a replica killed with SIGKILL and a Redis outage; a heartbeat that the fleet pings
//! about once per interval, that stops when the fleet cannot work; a team moved to Jira
//! Service Management by one keyring line; questions in flight that stay within their bound.

use std::collections::HashMap;
use std::time::Duration;

use fred::prelude::*;
use opsgenie_e2e::fixtures::*;
use opsgenie_e2e::relay::Relay;
use opsgenie_e2e::*;
use opsgenie_standin::AsyncFailure;

/// Generous: the machine is small and shared, and a passing run never waits this long.
const DEADLINE: Duration = Duration::from_secs(90);
const TEAM: &str = "backend";
const KEY: &str = "key-backend";

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
        worker.log_tail(20)
    );
    let events = events(env).await;
    for uuid in uuids {
        assert_eq!(events["confirmed"].get(uuid), Some(&1), "{uuid} confirmed");
    }
    events
}

#[tokio::test]
async fn every_delivery_of_hundreds_is_confirmed_exactly_once() {
    let env = TestEnv::new("confirm-all").await;
    let standin = env
        .standin()
        .serving(TEAM, KEY)
        .processing_delay(Duration::from_millis(300))
        .await;
    let uuids = env.publish_issue_uuids(TEAM, 1..=300).await;
    let mut worker = env.worker().ready().await;
    let port = worker.metrics_port();
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
        worker.log_tail(20)
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
    worker.stop().await;
}

/// The questions a replica asks are bounded (docs/contract.md section 6.1: at most 16 in
/// flight), however many confirmations fall due together: behind an API that takes 300 ms to
/// answer, deliveries answered together fall due together, 64 at a time, and the confirmer
/// asks about them up to its bound, never past it. Every one is still confirmed once.
#[tokio::test]
async fn questions_in_flight_stay_within_their_bound_when_many_fall_due_together() {
    let env = TestEnv::new("confirm-bound").await;
    let standin = env
        .standin()
        .serving(TEAM, KEY)
        .delay(Duration::from_millis(300))
        .await;
    let uuids = env.publish_issue_uuids(TEAM, 1..=256).await;
    let mut worker = env.worker().ready().await;
    all_confirmed_once(&env, &worker, &uuids).await;
    let most = standin.stats().most_status_asks_in_flight;
    assert!(
        (8..=16).contains(&most),
        "{most} questions in flight at most; the bound is 16"
    );
    worker.stop().await;
}

#[tokio::test]
async fn a_request_failed_after_its_202_is_dead_lettered_with_the_reason_and_replayed() {
    let env = TestEnv::new("confirm-failed").await;
    let standin = env
        .standin()
        .serving(TEAM, KEY)
        .processing_delay(Duration::from_millis(200))
        .await;
    let marker = format!("doomed-{}", &new_uuid()[..8]);
    standin.fail_asynchronously(AsyncFailure {
        contains: marker.clone(),
        status: "Integration is disabled".into(),
        count: Some(2),
    });
    let fine = env.publish_issue_uuids(TEAM, 10..15).await;
    let mut doomed = Vec::new();
    for group in [100, 101] {
        let uuid = new_uuid();
        let mut job = issue_job(&uuid, TEAM, group);
        job["event"]["title"] = format!("{marker} {group}").into();
        env.publish_job(&job).await;
        doomed.push(uuid);
    }
    let mut worker = env.worker().ready().await;
    assert!(
        wait_until(DEADLINE, || async {
            let events = events(&env).await;
            count(&events, "failed_async") == 2 && count(&events, "confirmed") == fine.len()
        })
        .await,
        "{:?}\n{}",
        events(&env).await,
        worker.log_tail(20)
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
        worker.log_tail(20)
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
    worker.stop().await;
}

#[tokio::test]
async fn a_replica_killed_while_confirming_leaves_every_confirmation_to_another() {
    let env = TestEnv::new("confirm-kill").await;
    // Slow to process and slow to answer: the first replica is asking when it dies.
    let standin = env
        .standin()
        .serving(TEAM, KEY)
        .processing_delay(Duration::from_secs(3))
        .delay(Duration::from_millis(300))
        .await;
    let uuids = env.publish_issue_uuids(TEAM, 1..=60).await;
    let mut first = env.worker().flag("--request-timeout", "2s").ready().await;
    assert!(
        wait_until(DEADLINE, || async {
            env.stream().await.len() == uuids.len() && standin.stats().status_asks > 0
        })
        .await,
        "{}",
        first.log_tail(20)
    );
    first.signal("KILL");
    first
        .wait_exit(Duration::from_secs(10))
        .await
        .expect("killed");
    let unsettled = pending(&env).await;
    assert!(unsettled > 0, "every confirmation settled before the kill");

    let mut second = env.worker().flag("--request-timeout", "2s").ready().await;
    assert!(
        wait_until(DEADLINE, || async {
            count(&events(&env).await, "confirmed") >= uuids.len()
        })
        .await,
        "{} left pending\n{}",
        pending(&env).await,
        second.log_tail(20)
    );
    let events = events(&env).await;
    for uuid in &uuids {
        assert_eq!(events["confirmed"].get(uuid), Some(&1), "{uuid}");
        assert_eq!(events["delivered"].get(uuid), Some(&1), "{uuid}");
    }
    assert_eq!(pending(&env).await, 0);
    second.stop().await;
}

#[tokio::test]
async fn confirmations_pending_while_redis_is_cut_off_are_all_settled_after() {
    let env = TestEnv::new("confirm-redis").await;
    let processing = Duration::from_secs(4);
    let _standin = env
        .standin()
        .serving(TEAM, KEY)
        .processing_delay(processing)
        .await;
    let relay = Relay::start("127.0.0.1:6379".parse().unwrap())
        .await
        .expect("relay");
    let mut worker = env.worker().redis_url(&relay.redis_url()).metrics().spawn();
    let port = worker.metrics_port();
    let uuids = env.publish_issue_uuids(TEAM, 1..=40).await;
    assert!(
        wait_until(DEADLINE, || async {
            env.stream().await.len() == uuids.len()
        })
        .await,
        "{}",
        worker.log_tail(20)
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
    assert!(wait_until(DEADLINE, || async { now_ms() > processed_at }).await);
    relay.restore();
    let events = all_confirmed_once(&env, &worker, &uuids).await;
    for uuid in &uuids {
        assert_eq!(events["delivered"].get(uuid), Some(&1), "{uuid}");
    }
    assert_eq!(pending(&env).await, 0);
    worker.stop().await;
}

#[tokio::test]
async fn two_replicas_ping_the_heartbeat_once_per_interval_and_stop_without_redis() {
    let env = TestEnv::new("heartbeat").await;
    let standin = env.standin().serving(TEAM, KEY).await;
    let name = format!("pager pipeline {}", &new_uuid()[..8]);
    env.heartbeat(&name)
        .key(KEY)
        .every("1s")
        .served_by(&standin);
    let relay = Relay::start("127.0.0.1:6379".parse().unwrap())
        .await
        .expect("relay");
    let mut workers: Vec<WorkerProcess> = (0..2)
        .map(|_| env.worker().redis_url(&relay.redis_url()).metrics().spawn())
        .collect();
    let ports = [workers[0].metrics_port(), workers[1].metrics_port()];
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
        worker.stop().await;
    }
    // The heartbeat's key never travels: not in a log line.
    for worker in &workers {
        assert!(!worker.raw_log().contains(KEY));
    }
}

#[tokio::test]
async fn a_team_moved_to_jira_service_management_is_served_below_its_prefix() {
    let env = TestEnv::new("jsm").await;
    let standin = env
        .standin()
        .accepts(KEY)
        .processing_delay(Duration::from_millis(100))
        .await;
    let base = format!("{}/jsm/ops/integration", standin.base_url());
    let name = format!("jsm heartbeat {}", &new_uuid()[..8]);
    env.team(TEAM).key(KEY).at(&base);
    env.heartbeat(&name).key(KEY).every("1s").at(&base);

    let (code, out, err) = env.command(
        &[
            "check",
            "--keyring",
            env.keyring().to_str().unwrap(),
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
    env.publish_job(&metric_job(&critical, TEAM, 77, "critical", 1))
        .await;
    env.publish_job(&metric_job(&resolved, TEAM, 77, "resolved", 2))
        .await;
    let mut worker = env.worker().ready().await;
    assert!(
        wait_until(DEADLINE, || async {
            count(&events(&env).await, "confirmed") == 2
                && !standin.heartbeat_pings(&name).is_empty()
        })
        .await,
        "{:?}\n{}",
        events(&env).await,
        worker.log_tail(20)
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
    worker.stop().await;
}

#[tokio::test]
async fn sighup_starts_and_stops_the_heartbeat() {
    let env = TestEnv::new("heartbeat-hup").await;
    let standin = env.standin().serving(TEAM, KEY).await;
    let name = format!("reloaded {}", &new_uuid()[..8]);
    let mut worker = env.worker().ready().await;
    let pings = || standin.heartbeat_pings(&name).len();

    env.heartbeat(&name)
        .key(KEY)
        .every("1s")
        .served_by(&standin);
    worker.signal("HUP");
    assert!(
        standin.wait_until(DEADLINE, |_| pings() >= 2).await,
        "no ping after the reload: {}",
        worker.log_tail(10)
    );

    // Removed again: the pings stop.
    env.remove_heartbeat();
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
    worker.stop().await;
}

//! The worker's HTTP transport end to end (docs/contract.md section 4): https with a team's `ca_file`,
//! HTTP/2 multiplexing on one connection, an egress proxy from `HTTPS_PROXY` and `NO_PROXY`,
//! and servers that misbehave at the connection level. A request is sent again without
//! counting as a try only when it provably never reached the server; anything else is a try.

use std::collections::HashMap;
use std::time::Duration;

use opsgenie_e2e::fixtures::*;
use opsgenie_e2e::proxy::ConnectProxy;
use opsgenie_e2e::*;
use serde_json::Value;

/// Generous: the machine is small and shared, and a passing run never waits this long.
const DEADLINE: Duration = Duration::from_secs(60);
const TEAM: &str = "backend";

async fn publish(env: &TestEnv, uuid: &str, group: i64) {
    env.publish(issue_job(uuid, TEAM, group).to_string().as_bytes())
        .await;
}

fn log_tail(worker: &WorkerProcess, n: usize) -> String {
    let log = worker.raw_log();
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Stream entries per notification_uuid.
async fn stream_counts(env: &TestEnv) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for entry in env.stream().await {
        if let Some(uuid) = entry.get("notification_uuid") {
            *counts.entry(uuid.clone()).or_default() += 1;
        }
    }
    counts
}

/// Requests the stand-in received with `alias` in their body.
fn requests_for(standin: &StandIn, alias: &str) -> usize {
    standin
        .requests()
        .iter()
        .filter(|r| r.json.as_ref().and_then(|j| j["alias"].as_str()) == Some(alias))
        .count()
}

fn job_lines_for(worker: &WorkerProcess, uuid: &str) -> Vec<Value> {
    worker
        .job_lines()
        .into_iter()
        .filter(|l| l["notification_uuid"] == uuid)
        .collect()
}

async fn wait_for_stream_len(env: &TestEnv, worker: &WorkerProcess, n: usize) {
    assert!(
        wait_until(DEADLINE, || async { env.stream().await.len() >= n }).await,
        "expected {n} stream entries, found {}:\n{}",
        env.stream().await.len(),
        log_tail(worker, 30)
    );
}

/// Every queue of the test is empty (work, delay and dead-letter queues).
async fn all_queues_empty(env: &TestEnv) -> bool {
    for q in env.topology().queue_names() {
        if env.queue_len(q).await > 0 {
            return false;
        }
    }
    true
}

/// Messages ready in the work queue and the delay queues.
async fn jobs_waiting(env: &TestEnv) -> u32 {
    let topology = env.topology();
    let mut n = env.queue_len(&topology.queue).await;
    for (queue, _) in &topology.retry_queues {
        n += env.queue_len(queue).await;
    }
    n
}

/// Starts a worker with `vars` in its environment and waits until it is ready (consuming,
/// Redis reachable); fails at once, with its log, if it exits instead (a keyring it refuses).
async fn ready_worker(
    env: &TestEnv,
    keyring: &std::path::Path,
    extra: &[&str],
    vars: &[(&str, &str)],
) -> WorkerProcess {
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let mut flags = vec!["--metrics-addr", addr.as_str()];
    flags.extend_from_slice(extra);
    let mut worker = env.spawn_worker_with_env(keyring, &flags, vars);
    let end = tokio::time::Instant::now() + DEADLINE;
    loop {
        if let Ok(Some(status)) = worker.child.try_wait() {
            panic!("the worker exited ({status}):\n{}", log_tail(&worker, 30));
        }
        if matches!(http_get(port, "/readyz").await, Some((200, _))) {
            return worker;
        }
        assert!(
            tokio::time::Instant::now() < end,
            "never ready:\n{}",
            log_tail(&worker, 30)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// SIGTERM ends the worker with exit code 0, and its log never shows `key`.
async fn stop(worker: &mut WorkerProcess, key: &str) {
    let status = worker.terminate(DEADLINE).await;
    assert_eq!(status.code(), Some(0), "{}", log_tail(worker, 30));
    assert!(
        !worker.raw_log().contains(key),
        "the key {key} appears in the log"
    );
}

// ---------------------------------------------------------------------------------------------
// https, HTTP/2 and the team's ca_file

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_concurrent_jobs_share_one_http2_connection_to_a_private_ca_server() {
    const KEY: &str = "key-h2";
    const JOBS: i64 = 50;
    let env = TestEnv::new("h2").await;
    let (standin, keyring) =
        tls_standin_for_team(&env, TEAM, KEY, StandInConfig::default(), true).await;
    assert!(standin.base_url().starts_with("https://"));
    // Published before the worker starts, so the default prefetch takes them all at once.
    let mut uuids = Vec::new();
    for group in 0..JOBS {
        let uuid = new_uuid();
        publish(&env, &uuid, group).await;
        uuids.push(uuid);
    }
    let mut worker = ready_worker(&env, &keyring, &[], &[]).await;

    assert!(
        wait_until(DEADLINE, || async {
            env.stream().await.len() >= uuids.len() && all_queues_empty(&env).await
        })
        .await,
        "not all delivered ({} of {JOBS}):\n{}",
        env.stream().await.len(),
        log_tail(&worker, 30)
    );
    let counts = stream_counts(&env).await;
    for uuid in &uuids {
        assert_eq!(counts.get(uuid), Some(&1), "{uuid}");
    }
    let alerts = standin.alerts();
    for group in 0..JOBS {
        let state = alerts.get(&issue_alias(group));
        assert_eq!(state.map(|s| s.creates), Some(1), "group {group}");
    }
    let requests = standin.requests();
    assert_eq!(requests.len(), JOBS as usize);
    let versions: Vec<&str> = requests.iter().map(|r| r.http_version.as_str()).collect();
    assert!(versions.iter().all(|v| *v == "HTTP/2.0"), "{versions:?}");
    let mut connection_ids: Vec<u64> = requests.iter().map(|r| r.connection_id).collect();
    connection_ids.sort_unstable();
    connection_ids.dedup();
    assert_eq!(connection_ids.len(), 1, "requests spread over connections");
    // Not only multiplexed: no connection opened in the burst and thrown away unused either.
    let stats = standin.stats();
    assert_eq!(stats.connections, 1, "{stats:?}");

    stop(&mut worker, KEY).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_certificate_from_an_unknown_ca_is_refused_and_the_job_kept() {
    const KEY: &str = "key-untrusted";
    const UNTRUSTED_TEAM: &str = "untrusted-team";
    let env = TestEnv::new("unknown-ca").await;
    let pki = LocalPki::generate().expect("a private CA");
    let standin = StandIn::start(StandInConfig {
        keys: vec![KEY.into()],
        tls: Some(pki.server),
        ..StandInConfig::default()
    })
    .await
    .expect("TLS stand-in");
    // No ca_file: the stand-in's CA is in no trust store the worker reads.
    let keyring = env.write_keyring_with_ca_files(&[(
        TeamSpec {
            id: UNTRUSTED_TEAM,
            key: KEY,
            api_url: &standin.base_url(),
        },
        None,
    )]);
    let mut worker = ready_worker(&env, &keyring, &["--quick-tries", "1"], &[]).await;
    let uuid = new_uuid();
    let mut job = issue_job(&uuid, TEAM, 1);
    job["team_id"] = UNTRUSTED_TEAM.into();
    env.publish(job.to_string().as_bytes()).await;

    assert!(
        wait_until(DEADLINE, || async {
            job_lines_for(&worker, &uuid)
                .iter()
                .any(|l| l["outcome"] == "retry_scheduled")
        })
        .await,
        "no retry scheduled:\n{}",
        log_tail(&worker, 30)
    );
    // The worker reached the server but never got past the handshake.
    let stats = standin.stats();
    assert!(stats.connections >= 1, "{stats:?}");
    assert_eq!(stats.received, 0, "{stats:?}");
    // Some line says why, naming the team: an operator must see what to fix.
    let log = worker.raw_log();
    let why = log
        .lines()
        .find(|l| l.contains(UNTRUSTED_TEAM) && l.to_ascii_lowercase().contains("certificate"));
    assert!(
        why.is_some(),
        "no log line names {UNTRUSTED_TEAM} and the certificate:\n{}",
        log_tail(&worker, 30)
    );
    let why = why.unwrap_or_default().to_ascii_lowercase();
    assert!(
        why.contains("trust") || why.contains("unknown") || why.contains("issuer"),
        "the line does not say the certificate is not trusted: {why}"
    );

    // Stopped, the worker gives the job back: it waits in a queue, not dead, not lost.
    stop(&mut worker, KEY).await;
    assert!(
        wait_until(DEADLINE, || async { jobs_waiting(&env).await == 1 }).await,
        "the job is not waiting in a queue (waiting: {}, dead: {})",
        jobs_waiting(&env).await,
        env.queue_len(&env.dead_queue()).await
    );
    assert_eq!(env.queue_len(&env.dead_queue()).await, 0);
    assert!(env.stream().await.is_empty());
}

// ---------------------------------------------------------------------------------------------
// The egress proxy

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_goes_through_the_connect_proxy_named_by_https_proxy() {
    const KEY: &str = "key-proxied";
    const JOBS: i64 = 5;
    let env = TestEnv::new("https-proxy").await;
    let (standin, keyring) =
        tls_standin_for_team(&env, TEAM, KEY, StandInConfig::default(), true).await;
    let proxy = ConnectProxy::start().await.expect("proxy");
    let proxy_url = proxy.url();
    let mut worker =
        ready_worker(&env, &keyring, &[], &[("HTTPS_PROXY", proxy_url.as_str())]).await;
    let mut uuids = Vec::new();
    for group in 0..JOBS {
        let uuid = new_uuid();
        publish(&env, &uuid, group).await;
        uuids.push(uuid);
    }

    wait_for_stream_len(&env, &worker, uuids.len()).await;
    let counts = stream_counts(&env).await;
    for uuid in &uuids {
        assert_eq!(counts.get(uuid), Some(&1), "{uuid}");
    }
    assert_eq!(standin.stats().received, JOBS as u64);
    for group in 0..JOBS {
        assert_eq!(
            requests_for(&standin, &issue_alias(group)),
            1,
            "group {group}"
        );
    }
    assert!(proxy.tunnels() >= 1, "no tunnel through the proxy");
    let target = standin.addr().to_string();
    let targets = proxy.targets();
    assert!(targets.iter().all(|t| *t == target), "{targets:?}");
    // Every connection the stand-in accepted came through a tunnel.
    assert_eq!(standin.stats().connections, proxy.tunnels());
    assert_eq!(proxy.forwarded(), 0);

    stop(&mut worker, KEY).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_proxy_naming_the_host_bypasses_the_proxy() {
    const KEY: &str = "key-bypass";
    let env = TestEnv::new("no-proxy").await;
    let (standin, keyring) =
        tls_standin_for_team(&env, TEAM, KEY, StandInConfig::default(), true).await;
    let proxy = ConnectProxy::start().await.expect("proxy");
    let proxy_url = proxy.url();
    let mut worker = ready_worker(
        &env,
        &keyring,
        &[],
        &[
            ("HTTPS_PROXY", proxy_url.as_str()),
            ("HTTP_PROXY", proxy_url.as_str()),
            ("NO_PROXY", "example.test,127.0.0.1"),
        ],
    )
    .await;
    let uuid = new_uuid();
    publish(&env, &uuid, 1).await;

    wait_for_stream_len(&env, &worker, 1).await;
    assert_eq!(stream_counts(&env).await.get(&uuid), Some(&1));
    assert_eq!(requests_for(&standin, &issue_alias(1)), 1);
    assert!(
        !proxy.saw_anything(),
        "the proxy was used: {:?}",
        proxy.targets()
    );

    stop(&mut worker, KEY).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_http_uses_http_proxy_and_never_https_proxy() {
    const KEY: &str = "key-plain-proxy";
    let env = TestEnv::new("http-proxy").await;
    let (standin, keyring) = standin_for_team(&env, TEAM, KEY).await;
    let https_only = ConnectProxy::start().await.expect("proxy");
    let for_http = ConnectProxy::start().await.expect("proxy");
    let (https_url, http_url) = (https_only.url(), for_http.url());
    // Lower case: curl reads only `http_proxy` for plain http.
    let mut worker = ready_worker(
        &env,
        &keyring,
        &[],
        &[
            ("HTTPS_PROXY", https_url.as_str()),
            ("http_proxy", http_url.as_str()),
        ],
    )
    .await;
    let uuid = new_uuid();
    publish(&env, &uuid, 1).await;

    wait_for_stream_len(&env, &worker, 1).await;
    assert_eq!(requests_for(&standin, &issue_alias(1)), 1);
    assert!(
        for_http.forwarded() + for_http.tunnels() >= 1,
        "http_proxy unused"
    );
    let target = standin.addr().to_string();
    assert!(for_http.targets().iter().all(|t| *t == target));
    assert!(
        !https_only.saw_anything(),
        "plain http went through HTTPS_PROXY"
    );

    stop(&mut worker, KEY).await;
}

// ---------------------------------------------------------------------------------------------
// Servers that misbehave at the connection level

/// The server drops the worker's kept-alive connection while it is idle: the next job's
/// request must go on a new connection as its first try, not fail a try on the dead one.
async fn an_idle_drop_costs_the_next_job_no_try(
    env: &TestEnv,
    standin: &StandIn,
    key: &str,
    keyring: &std::path::Path,
) {
    let mut worker = ready_worker(env, keyring, &[], &[]).await;

    let first = new_uuid();
    publish(env, &first, 1).await;
    wait_for_stream_len(env, &worker, 1).await;
    // The worker keeps its connection for 30 s; the server drops it well before.
    assert!(
        standin
            .wait_until(DEADLINE, |s| s.stats().idle_drops >= 1)
            .await,
        "the stand-in never dropped an idle connection: {:?}",
        standin.stats()
    );

    let second = new_uuid();
    publish(env, &second, 2).await;
    wait_for_stream_len(env, &worker, 2).await;
    assert!(
        wait_until(DEADLINE, || async {
            !job_lines_for(&worker, &second).is_empty()
        })
        .await,
        "{}",
        log_tail(&worker, 20)
    );
    let lines = job_lines_for(&worker, &second);
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert_eq!(lines[0]["outcome"], "delivered", "{}", lines[0]);
    assert_eq!(lines[0]["attempt"], 1, "{}", lines[0]);
    assert_eq!(requests_for(standin, &issue_alias(2)), 1);
    let entry = env
        .stream()
        .await
        .into_iter()
        .find(|e| e.get("notification_uuid") == Some(&second))
        .expect("the second job's entry");
    assert_eq!(entry.get("attempts").map(String::as_str), Some("1"));
    // The second request went on a new connection, not the dead one.
    let stats = standin.stats();
    assert!(stats.connections >= 2, "{stats:?}");
    assert_eq!(stats.received, 2, "{stats:?}");
    let connections: Vec<u64> = standin.requests().iter().map(|r| r.connection_id).collect();
    assert_ne!(connections.first(), connections.last(), "{connections:?}");

    stop(&mut worker, key).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_connection_dropped_while_idle_without_close_notify_costs_no_try() {
    const KEY: &str = "key-idle-tls";
    let env = TestEnv::new("idle-drop-tls").await;
    let config = StandInConfig {
        idle_drop: Some(Duration::from_millis(300)),
        ..StandInConfig::default()
    };
    let (standin, keyring) = tls_standin_for_team(&env, TEAM, KEY, config, true).await;
    an_idle_drop_costs_the_next_job_no_try(&env, &standin, KEY, &keyring).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_http_connection_dropped_while_idle_costs_no_try() {
    const KEY: &str = "key-idle-http";
    let env = TestEnv::new("idle-drop-http").await;
    let standin = StandIn::start(StandInConfig {
        keys: vec![KEY.into()],
        idle_drop: Some(Duration::from_millis(300)),
        ..StandInConfig::default()
    })
    .await
    .expect("stand-in");
    let keyring = env.write_keyring(&[TeamSpec {
        id: TEAM,
        key: KEY,
        api_url: &standin.base_url(),
    }]);
    an_idle_drop_costs_the_next_job_no_try(&env, &standin, KEY, &keyring).await;
}

/// A server reads the request and closes the connection without answering: the request may
/// have been acted on, so it is a try, the round (of one try) fails, and the job is scheduled
/// for retry rather than re-sent behind the policy's back or lost.
async fn a_hang_up_is_a_try_and_the_job_is_retried(
    env: &TestEnv,
    standin: &StandIn,
    key: &str,
    keyring: &std::path::Path,
) {
    standin
        .push_faults(vec![Fault::hang_up()])
        .expect("hang-up fault");
    let mut worker = ready_worker(env, keyring, &["--quick-tries", "1"], &[]).await;
    let uuid = new_uuid();
    publish(env, &uuid, 1).await;

    assert!(
        wait_until(DEADLINE, || async {
            job_lines_for(&worker, &uuid)
                .iter()
                .any(|l| l["outcome"] == "retry_scheduled")
        })
        .await,
        "no retry scheduled:\n{}",
        log_tail(&worker, 30)
    );
    // Read when the round ended: exactly the one request that was hung up on.
    let stats = standin.stats();
    assert_eq!((stats.received, stats.hang_ups), (1, 1), "{stats:?}");
    let line = job_lines_for(&worker, &uuid)
        .into_iter()
        .find(|l| l["outcome"] == "retry_scheduled")
        .expect("the retry line");
    assert_eq!(line["attempt"], 1, "{line}");

    // The job comes back from the delay queue and is delivered once.
    wait_for_stream_len(env, &worker, 1).await;
    let entries = env.stream().await;
    assert_eq!(entries.len(), 1);
    assert_eq!(
        entries[0].get("notification_uuid").map(String::as_str),
        Some(uuid.as_str())
    );
    assert_eq!(entries[0].get("attempts").map(String::as_str), Some("2"));
    let stats = standin.stats();
    assert_eq!((stats.received, stats.delivered), (2, 1), "{stats:?}");
    assert_eq!(env.queue_len(&env.dead_queue()).await, 0);
    stop(&mut worker, key).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_server_that_hangs_up_after_reading_gets_the_request_once_per_round() {
    const KEY: &str = "key-hangup-tls";
    let env = TestEnv::new("hangup-tls").await;
    let (standin, keyring) =
        tls_standin_for_team(&env, TEAM, KEY, StandInConfig::default(), true).await;
    a_hang_up_is_a_try_and_the_job_is_retried(&env, &standin, KEY, &keyring).await;
    assert!(
        standin
            .requests()
            .iter()
            .all(|r| r.http_version == "HTTP/2.0")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_http_server_that_hangs_up_after_reading_gets_the_request_once_per_round() {
    const KEY: &str = "key-hangup-http";
    let env = TestEnv::new("hangup-http").await;
    let (standin, keyring) = standin_for_team(&env, TEAM, KEY).await;
    a_hang_up_is_a_try_and_the_job_is_retried(&env, &standin, KEY, &keyring).await;
}

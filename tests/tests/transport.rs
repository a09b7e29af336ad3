//! The worker's HTTP transport end to end (docs/contract.md section 4): https with a team's `ca_file`,
//! HTTP/2 multiplexing on one connection, an egress proxy from `HTTPS_PROXY` and `NO_PROXY`,
//! and servers that misbehave at the connection level. A request is sent again without
//! counting as a try only when it provably never reached the server; anything else is a try.

use std::time::Duration;

use opsgenie_e2e::fixtures::*;
use opsgenie_e2e::proxy::ConnectProxy;
use opsgenie_e2e::*;

/// Generous: the machine is small and shared, and a passing run never waits this long.
const DEADLINE: Duration = Duration::from_secs(60);
const TEAM: &str = "backend";

/// Requests the stand-in received with `alias` in their body.
fn requests_for(standin: &StandIn, alias: &str) -> usize {
    standin
        .requests()
        .iter()
        .filter(|r| r.json.as_ref().and_then(|j| j["alias"].as_str()) == Some(alias))
        .count()
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

// ---------------------------------------------------------------------------------------------
// https, HTTP/2 and the team's ca_file

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_concurrent_jobs_share_one_http2_connection_to_a_private_ca_server() {
    const KEY: &str = "key-h2";
    const JOBS: i64 = 50;
    let env = TestEnv::new("h2").await;
    let standin = env.standin().tls().serving(TEAM, KEY).await;
    assert!(standin.base_url().starts_with("https://"));
    // Published before the worker starts, so the default prefetch takes them all at once.
    let mut uuids = Vec::new();
    for group in 0..JOBS {
        let uuid = new_uuid();
        env.publish_job(&issue_job(&uuid, TEAM, group)).await;
        uuids.push(uuid);
    }
    let mut worker = env.worker().ready().await;

    assert!(
        wait_until(DEADLINE, || async {
            env.stream().await.len() >= uuids.len() && env.all_queues_empty().await
        })
        .await,
        "not all delivered ({} of {JOBS}):\n{}",
        env.stream().await.len(),
        worker.log_tail(30)
    );
    let counts = env.stream_counts().await;
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

    worker.stop_cleanly(&[KEY]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_certificate_from_an_unknown_ca_is_refused_and_the_job_kept() {
    const KEY: &str = "key-untrusted";
    const UNTRUSTED_TEAM: &str = "untrusted-team";
    let env = TestEnv::new("unknown-ca").await;
    let standin = env.standin().tls().accepts(KEY).await;
    // No ca_file: the stand-in's CA is in no trust store the worker reads.
    env.team(UNTRUSTED_TEAM).key(KEY).served_by(&standin);
    let mut worker = env.worker().flag("--quick-tries", "1").ready().await;
    let uuid = new_uuid();
    let mut job = issue_job(&uuid, TEAM, 1);
    job["team_id"] = UNTRUSTED_TEAM.into();
    env.publish_job(&job).await;

    assert!(
        wait_until(DEADLINE, || async {
            worker
                .job_lines_for(&uuid)
                .iter()
                .any(|l| l["outcome"] == "retry_scheduled")
        })
        .await,
        "no retry scheduled:\n{}",
        worker.log_tail(30)
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
        worker.log_tail(30)
    );
    let why = why.unwrap_or_default().to_ascii_lowercase();
    assert!(
        why.contains("trust") || why.contains("unknown") || why.contains("issuer"),
        "the line does not say the certificate is not trusted: {why}"
    );

    // Stopped, the worker gives the job back: it waits in a queue, not dead, not lost.
    worker.stop_cleanly(&[KEY]).await;
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
    let standin = env.standin().tls().serving(TEAM, KEY).await;
    let proxy = ConnectProxy::start().await.expect("proxy");
    let proxy_url = proxy.url();
    let mut worker = env.worker().env("HTTPS_PROXY", &proxy_url).ready().await;
    let mut uuids = Vec::new();
    for group in 0..JOBS {
        let uuid = new_uuid();
        env.publish_job(&issue_job(&uuid, TEAM, group)).await;
        uuids.push(uuid);
    }

    env.wait_for_stream_len(uuids.len()).await;
    let counts = env.stream_counts().await;
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

    worker.stop_cleanly(&[KEY]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_proxy_naming_the_host_bypasses_the_proxy() {
    const KEY: &str = "key-bypass";
    let env = TestEnv::new("no-proxy").await;
    let standin = env.standin().tls().serving(TEAM, KEY).await;
    let proxy = ConnectProxy::start().await.expect("proxy");
    let proxy_url = proxy.url();
    let mut worker = env
        .worker()
        .env("HTTPS_PROXY", &proxy_url)
        .env("HTTP_PROXY", &proxy_url)
        .env("NO_PROXY", "example.test,127.0.0.1")
        .ready()
        .await;
    let uuid = new_uuid();
    env.publish_job(&issue_job(&uuid, TEAM, 1)).await;

    env.wait_for_stream_len(1).await;
    assert_eq!(env.stream_counts().await.get(&uuid), Some(&1));
    assert_eq!(requests_for(&standin, &issue_alias(1)), 1);
    assert!(
        !proxy.saw_anything(),
        "the proxy was used: {:?}",
        proxy.targets()
    );

    worker.stop_cleanly(&[KEY]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_http_uses_http_proxy_and_never_https_proxy() {
    const KEY: &str = "key-plain-proxy";
    let env = TestEnv::new("http-proxy").await;
    let standin = env.standin().serving(TEAM, KEY).await;
    let https_only = ConnectProxy::start().await.expect("proxy");
    let for_http = ConnectProxy::start().await.expect("proxy");
    let (https_url, http_url) = (https_only.url(), for_http.url());
    // Lower case: curl reads only `http_proxy` for plain http.
    let mut worker = env
        .worker()
        .env("HTTPS_PROXY", &https_url)
        .env("http_proxy", &http_url)
        .ready()
        .await;
    let uuid = new_uuid();
    env.publish_job(&issue_job(&uuid, TEAM, 1)).await;

    env.wait_for_stream_len(1).await;
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

    worker.stop_cleanly(&[KEY]).await;
}

// ---------------------------------------------------------------------------------------------
// Servers that misbehave at the connection level

/// The server drops the worker's kept-alive connection while it is idle: the next job's
/// request must go on a new connection as its first try, not fail a try on the dead one.
async fn an_idle_drop_costs_the_next_job_no_try(env: &TestEnv, standin: &StandIn, key: &str) {
    let mut worker = env.worker().ready().await;

    let first = new_uuid();
    env.publish_job(&issue_job(&first, TEAM, 1)).await;
    env.wait_for_stream_len(1).await;
    // The worker keeps its connection for 30 s; the server drops it well before.
    assert!(
        standin
            .wait_until(DEADLINE, |s| s.stats().idle_drops >= 1)
            .await,
        "the stand-in never dropped an idle connection: {:?}",
        standin.stats()
    );

    let second = new_uuid();
    env.publish_job(&issue_job(&second, TEAM, 2)).await;
    env.wait_for_stream_len(2).await;
    assert!(
        wait_until(DEADLINE, || async {
            !worker.job_lines_for(&second).is_empty()
        })
        .await,
        "{}",
        worker.log_tail(20)
    );
    let lines = worker.job_lines_for(&second);
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

    worker.stop_cleanly(&[key]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_connection_dropped_while_idle_without_close_notify_costs_no_try() {
    const KEY: &str = "key-idle-tls";
    let env = TestEnv::new("idle-drop-tls").await;
    let standin = env
        .standin()
        .tls()
        .serving(TEAM, KEY)
        .idle_drop(Duration::from_millis(300))
        .await;
    an_idle_drop_costs_the_next_job_no_try(&env, &standin, KEY).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_http_connection_dropped_while_idle_costs_no_try() {
    const KEY: &str = "key-idle-http";
    let env = TestEnv::new("idle-drop-http").await;
    let standin = env
        .standin()
        .serving(TEAM, KEY)
        .idle_drop(Duration::from_millis(300))
        .await;
    an_idle_drop_costs_the_next_job_no_try(&env, &standin, KEY).await;
}

/// A server reads the request and closes the connection without answering: the request may
/// have been acted on, so it is a try, the round (of one try) fails, and the job is scheduled
/// for retry rather than re-sent behind the policy's back or lost.
async fn a_hang_up_is_a_try_and_the_job_is_retried(env: &TestEnv, standin: &StandIn, key: &str) {
    standin
        .push_faults(vec![Fault::hang_up()])
        .expect("hang-up fault");
    let mut worker = env.worker().flag("--quick-tries", "1").ready().await;
    let uuid = new_uuid();
    env.publish_job(&issue_job(&uuid, TEAM, 1)).await;

    assert!(
        wait_until(DEADLINE, || async {
            worker
                .job_lines_for(&uuid)
                .iter()
                .any(|l| l["outcome"] == "retry_scheduled")
        })
        .await,
        "no retry scheduled:\n{}",
        worker.log_tail(30)
    );
    // Read when the round ended: exactly the one request that was hung up on.
    let stats = standin.stats();
    assert_eq!((stats.received, stats.hang_ups), (1, 1), "{stats:?}");
    let line = worker
        .job_lines_for(&uuid)
        .into_iter()
        .find(|l| l["outcome"] == "retry_scheduled")
        .expect("the retry line");
    assert_eq!(line["attempt"], 1, "{line}");

    // The job comes back from the delay queue and is delivered once.
    env.wait_for_stream_len(1).await;
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
    worker.stop_cleanly(&[key]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_server_that_hangs_up_after_reading_gets_the_request_once_per_round() {
    const KEY: &str = "key-hangup-tls";
    let env = TestEnv::new("hangup-tls").await;
    let standin = env.standin().tls().serving(TEAM, KEY).await;
    a_hang_up_is_a_try_and_the_job_is_retried(&env, &standin, KEY).await;
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
    let standin = env.standin().serving(TEAM, KEY).await;
    a_hang_up_is_a_try_and_the_job_is_retried(&env, &standin, KEY).await;
}

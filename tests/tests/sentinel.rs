//! Redis behind Sentinel (docs/contract.md section 7, `--redis-replicas`): the primary is
//! killed with SIGKILL while jobs stream through the worker, Sentinel promotes the replica,
//! and the worker, never restarted, goes on with the new primary. Every delivery is in the
//! stream on the promoted primary, once, with its marker; Opsgenie got one request per job.
//!
//! What is guaranteed, and so asserted: the record of every acked job is on the primary and
//! on a replica before the ack, so a failover loses none; the stream holds each notification
//! once (a record written again finds its marker). Opsgenie gets a job's request again only
//! when the job itself is processed again (its worker died, or lost the broker, with it in
//! hand): a record that cannot be written is retried in place, never by sending again. This
//! worker keeps running and its broker stays up, so here every job is sent exactly once.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use fred::prelude::*;
use lapin::{BasicProperties, Channel};
use opsgenie_e2e::fixtures::*;
use opsgenie_e2e::sentinel::SentinelSet;
use opsgenie_e2e::*;

const TEAM: &str = "backend";
const KEY: &str = "key-sentinel";
/// Jobs published a second, steadily, from before the kill until after the recovery.
const RATE: u64 = 50;

/// A client of one server of the set, not through Sentinel: to read what that server holds.
async fn direct(port: u16) -> Client {
    let config = Config::from_url(&format!("redis://127.0.0.1:{port}")).expect("url");
    let client = Builder::from_config(config).build().expect("client");
    client.init().await.expect("connect to a server of the set");
    client
}

/// The delivery entries of the stream (its confirmations left out).
async fn stream_of(client: &Client, prefix: &str) -> Vec<HashMap<String, String>> {
    let entries: Vec<(String, HashMap<String, String>)> = client
        .xrange(format!("{prefix}deliveries"), "-", "+", None)
        .await
        .unwrap_or_default();
    entries
        .into_iter()
        .map(|(_, fields)| fields)
        .filter(|fields| fields.get("event").is_none_or(|e| e == "delivered"))
        .collect()
}

/// Publishes an issue alert (group `i`, so alias `sentry: i`) every 1/RATE s until `stop`;
/// answers the uuids published, in order.
async fn publish_steadily(
    channel: Channel,
    exchange: String,
    stop: Arc<AtomicBool>,
) -> Vec<String> {
    let mut uuids = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_millis(1000 / RATE));
    while !stop.load(Ordering::SeqCst) {
        tick.tick().await;
        let uuid = new_uuid();
        let body = issue_job(&uuid, TEAM, uuids.len() as i64).to_string();
        let confirm = publish_job(
            &channel,
            &exchange,
            body.as_bytes(),
            BasicProperties::default(),
        )
        .await
        .expect("publish")
        .await
        .expect("confirm");
        assert!(confirm.is_ack(), "the broker refused a job");
        uuids.push(uuid);
    }
    uuids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_killed_mid_stream_loses_no_record_and_pages_nobody_twice() {
    let env = TestEnv::new("sentinel").await;
    let mut set = SentinelSet::start(&env.dir).await;
    let (old_primary, promoted) = (set.first_primary(), set.first_replica());
    let standin = env.standin().serving(TEAM, KEY).await;
    let mut worker = env
        .worker()
        .redis_url(&set.url())
        .flag("--redis-replicas", "1")
        .metrics()
        .spawn();
    let port = worker.metrics_port();
    let ready = || async { matches!(http_get(port, "/readyz").await, Some((200, _))) };
    assert!(
        wait_until(Duration::from_secs(30), ready).await,
        "never ready: {}",
        worker.log_tail(20)
    );

    let stop = Arc::new(AtomicBool::new(false));
    let publisher = tokio::spawn(publish_steadily(
        env.channel.clone(),
        env.exchange.clone(),
        Arc::clone(&stop),
    ));

    // Mid-stream: some jobs delivered and acked, more in flight and queued.
    assert!(
        standin
            .wait_for_delivered(100, Duration::from_secs(60))
            .await,
        "the stream did not start: {}",
        worker.log_tail(20)
    );
    let delivered_at_kill = standin.delivered();
    let killed_at = std::time::Instant::now();
    set.kill_server(old_primary);
    assert!(
        wait_until(Duration::from_secs(60), || async {
            set.primary_by_sentinels() == Some(promoted)
        })
        .await,
        "Sentinel did not promote the replica: {}",
        set.logs()
    );

    let promoted_after = killed_at.elapsed();

    // The promoted primary has no replica yet: nothing can be acked, and the worker says so.
    let not_ready = Arc::new(std::sync::Mutex::new(None));
    assert!(
        wait_until(Duration::from_secs(30), || {
            let not_ready = Arc::clone(&not_ready);
            async move {
                match http_get(port, "/readyz").await {
                    Some((503, body)) => {
                        *not_ready.lock().unwrap() = Some(body);
                        true
                    }
                    _ => false,
                }
            }
        })
        .await,
        "still ready with no replica to hold its records: {}",
        worker.log_tail(20)
    );
    let not_ready = not_ready.lock().unwrap().clone().unwrap_or_default();
    assert!(not_ready.contains("Redis"), "{not_ready}");

    // The old primary comes back, empty; Sentinel makes it a replica of the promoted one.
    set.restart_server(old_primary);
    assert!(
        wait_until(Duration::from_secs(60), || async {
            set.replica_link_up(old_primary)
                && set
                    .replication_info(promoted)
                    .lines()
                    .any(|l| l.trim() == "connected_slaves:1")
        })
        .await,
        "the old primary did not rejoin as a replica: {}",
        set.logs()
    );
    assert!(
        wait_until(Duration::from_secs(30), ready).await,
        "not ready again after the failover: {}",
        worker.log_tail(20)
    );

    let recovered_after = killed_at.elapsed();

    // The same process goes on with the new primary: more jobs, then the stream stops.
    let after_recovery = standin.delivered();
    assert!(
        standin
            .wait_for_delivered(after_recovery + 100, Duration::from_secs(60))
            .await,
        "no deliveries after the failover: {}",
        worker.log_tail(20)
    );
    stop.store(true, Ordering::SeqCst);
    let uuids = publisher.await.expect("the publisher");
    let n = uuids.len();
    assert!(
        matches!(worker.child.try_wait(), Ok(None)),
        "the worker exited: {}",
        worker.log_tail(20)
    );

    let primary = direct(promoted).await;
    assert!(
        wait_until(Duration::from_secs(90), || async {
            stream_of(&primary, &env.prefix).await.len() >= n
        })
        .await,
        "{} of {n} deliveries in the promoted primary's stream: {}",
        stream_of(&primary, &env.prefix).await.len(),
        worker.log_tail(30)
    );

    // Every delivery is in the stream on the promoted primary, none twice, none unknown.
    let stream = stream_of(&primary, &env.prefix).await;
    let mut entries: HashMap<&str, usize> = HashMap::new();
    for entry in &stream {
        *entries
            .entry(entry.get("notification_uuid").map_or("", String::as_str))
            .or_default() += 1;
    }
    let missing: Vec<&String> = uuids
        .iter()
        .filter(|u| !entries.contains_key(u.as_str()))
        .collect();
    let twice: Vec<(&&str, &usize)> = entries.iter().filter(|(_, c)| **c > 1).collect();
    assert!(missing.is_empty(), "not in the stream: {missing:?}");
    assert!(twice.is_empty(), "in the stream more than once: {twice:?}");
    assert_eq!(stream.len(), n, "entries for jobs nobody published");
    // With the markers that stop a redelivery from paging again.
    let markers: Vec<String> = uuids
        .iter()
        .map(|u| format!("{}sent:{u}", env.prefix))
        .collect();
    let present: u64 = primary.exists(markers).await.expect("exists");
    assert_eq!(present, n as u64, "sent markers on the promoted primary");

    // Opsgenie: one request per job (see the top of this file for why exactly one here).
    let mut requests: HashMap<String, usize> = HashMap::new();
    for request in standin.requests() {
        let alias = request
            .json
            .as_ref()
            .and_then(|j| j["alias"].as_str())
            .unwrap_or_default()
            .to_owned();
        *requests.entry(alias).or_default() += 1;
    }
    for (i, uuid) in uuids.iter().enumerate() {
        let alias = format!("sentry: {i}");
        assert_eq!(
            requests.get(&alias).copied().unwrap_or(0),
            1,
            "requests for {alias} (job {uuid})"
        );
    }
    assert_eq!(requests.values().sum::<usize>(), n);

    // Every job finished delivered, and some records were held back while no replica had them:
    // the WAIT rule, not luck, kept them from being acked early.
    let jobs = worker.job_lines();
    assert_eq!(jobs.len(), n, "{}", worker.log_tail(20));
    assert!(jobs.iter().all(|l| l["outcome"] == "delivered"));
    let held = worker
        .logs()
        .iter()
        .filter(|l| {
            l["message"] == "Delivered, but the record could not be written to Redis; trying again."
                && l["error"].as_str().unwrap_or_default().contains("replicas")
        })
        .count();
    assert!(
        held > 0,
        "no record waited for a replica: {}",
        worker.log_tail(30)
    );

    eprintln!(
        "{n} jobs; primary killed after {delivered_at_kill} deliveries; replica promoted after \
         {promoted_after:?}; ready again (old primary rejoined as a replica) after \
         {recovered_after:?}; {held} record writes waited for a replica"
    );

    // The old primary, now a replica, holds the whole stream too.
    let rejoined = direct(old_primary).await;
    assert!(
        wait_until(Duration::from_secs(30), || async {
            stream_of(&rejoined, &env.prefix).await.len() == n
        })
        .await,
        "the rejoined replica's stream is incomplete"
    );

    let _ = worker.terminate(Duration::from_secs(30)).await;
    let _ = primary.quit().await;
    let _ = rejoined.quit().await;
}

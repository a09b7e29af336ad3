//! Fault injection: what the worker does when Opsgenie fails, when a replica dies, when Redis
//! or RabbitMQ go away, when a job is poison, and when it is told to stop. Each test holds the
//! worker to sections 6, 7, 8 and 10 of docs/contract.md with exact counts: nothing lost, nothing paged twice
//! beyond what the contract allows, nothing acked before it is durable.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use fred::interfaces::{ClientLike, KeysInterface};
use opsgenie_e2e::fixtures::*;
use opsgenie_e2e::relay::Relay;
use opsgenie_e2e::*;
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use serde_json::{Value, json};

const TEAM: &str = "backend";
const KEY: &str = "key-a";

/// Long enough for a loaded two-core machine; every wait ends as soon as its condition holds.
const SETTLE: Duration = Duration::from_secs(60);

/// Creates the stand-in accepted, by alias.
fn creates(standin: &StandIn) -> HashMap<String, u64> {
    standin
        .alerts()
        .into_iter()
        .map(|(alias, state)| (alias, state.creates))
        .collect()
}

/// Leases held in Redis right now: one per job between its admission and its record.
async fn leases_held(env: &TestEnv) -> usize {
    use fred::prelude::*;
    let keys: Vec<String> = env
        .redis
        .custom(fred::cmd!("KEYS"), vec![format!("{}lease:*", env.prefix)])
        .await
        .unwrap_or_default();
    keys.len()
}

/// `opsgenie_responses_total{status}` from the worker's /metrics on `port`; 0 while it does
/// not answer or has not counted one yet.
async fn answers_counted(port: u16, status: u16) -> u64 {
    let Some((_, raw)) = http_get(port, "/metrics").await else {
        return 0;
    };
    let label = format!("status=\"{status}\"");
    raw.lines()
        .filter(|l| l.starts_with("opsgenie_responses_total{") && l.contains(&label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .map(|v| v as u64)
        .sum()
}

fn assert_alive(worker: &mut WorkerProcess) {
    assert!(
        matches!(worker.child.try_wait(), Ok(None)),
        "the worker exited:\n{}",
        worker.log_tail(40)
    );
}

/// Outcomes per notification_uuid over the "Job finished." lines of `workers`.
fn outcomes(workers: &[&WorkerProcess]) -> HashMap<String, Vec<String>> {
    let mut by_uuid: HashMap<String, Vec<String>> = HashMap::new();
    for worker in workers {
        for line in worker.job_lines() {
            if let (Some(uuid), Some(outcome)) =
                (line["notification_uuid"].as_str(), line["outcome"].as_str())
            {
                by_uuid
                    .entry(uuid.to_owned())
                    .or_default()
                    .push(outcome.to_owned());
            }
        }
    }
    by_uuid
}

// ---------------------------------------------------------------------------------------------
// Opsgenie failing

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_503_storm_ends_in_one_delivery_per_job_through_the_delay_queues() {
    let env = TestEnv::new("storm").await;
    let standin = env.standin().serving(TEAM, KEY).await;
    // Five 503s against two tries per round: whichever jobs meet them, at least one round must
    // fail outright, so at least one job goes through a delay queue.
    const STORM: u64 = 5;
    standin
        .push_faults(vec![Fault::new(503).times(STORM as u32)])
        .unwrap();
    let jobs = env.publish_issue_jobs(TEAM, 100..103).await;
    let mut worker = env
        .worker()
        .flag("--quick-tries", "2")
        .flag("--quick-window", "5s")
        .spawn();

    assert!(
        wait_until(SETTLE, || async {
            env.stream().await.len() >= jobs.len() && env.all_queues_empty().await
        })
        .await,
        "not all delivered:\n{}",
        worker.log_tail(30)
    );
    let stats = standin.stats();
    assert_eq!(stats.by_status.get(&503), Some(&STORM), "{stats:?}");
    assert_eq!(standin.delivered(), jobs.len() as u64, "{stats:?}");
    let creates = creates(&standin);
    for (group, _) in &jobs {
        assert_eq!(creates.get(&issue_alias(*group)), Some(&1), "group {group}");
    }

    let entries = env.stream().await;
    assert_eq!(entries.len(), jobs.len());
    let counts = env.stream_counts().await;
    for (_, uuid) in &jobs {
        assert_eq!(counts.get(uuid), Some(&1), "{uuid}");
    }
    let attempts: Vec<u32> = entries
        .iter()
        .map(|e| e["attempts"].parse().expect("attempts is a number"))
        .collect();
    assert!(
        attempts.iter().any(|&a| a > 1),
        "no job went through a delay queue: {attempts:?}"
    );
    // Each round beyond the first was scheduled by exactly one retry.
    let scheduled = worker
        .job_lines()
        .iter()
        .filter(|l| l["outcome"] == "retry_scheduled")
        .count();
    let extra_rounds: u32 = attempts.iter().map(|a| a - 1).sum();
    assert_eq!(scheduled, extra_rounds as usize, "attempts {attempts:?}");
    println!("503 storm: attempts per job {attempts:?}, {scheduled} retries scheduled");
    assert_eq!(env.queue_len(&env.dead_queue()).await, 0);

    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_with_retry_after_holds_every_request_with_that_key() {
    let env = TestEnv::new("ratelimit").await;
    let standin = env.standin().serving(TEAM, KEY).await;
    standin
        .push_faults(vec![Fault::new(429).header("Retry-After", "2")])
        .unwrap();
    let mut worker = env.worker().flag("--quick-window", "10s").metrics().spawn();
    let port = worker.metrics_port();
    let first = new_uuid();
    env.publish_job(&issue_job(&first, TEAM, 1)).await;
    // The worker counts an answer just before it acts on it: from then on the key cools down.
    assert!(
        wait_until(SETTLE, || async { answers_counted(port, 429).await >= 1 }).await,
        "{}",
        worker.log_tail(20)
    );
    // A second job with the same key, sent while the key cools down, must wait as well.
    let second = new_uuid();
    env.publish_job(&issue_job(&second, TEAM, 2)).await;
    assert!(
        wait_until(SETTLE, || async { env.stream().await.len() >= 2 }).await,
        "{}",
        worker.log_tail(20)
    );

    let requests = standin.requests();
    assert_eq!(requests.len(), 3, "one 429 and two deliveries");
    assert_eq!(requests[0].status, 429);
    let limited_at = requests[0].received_at_ms;
    let mut waits = Vec::new();
    for r in &requests[1..] {
        assert_eq!(r.status, 202);
        let waited = r.received_at_ms - limited_at;
        assert!(
            waited >= 1990,
            "a request came {waited} ms after the 429 that asked for 2 s"
        );
        waits.push(waited);
    }
    println!("429 Retry-After: 2 -> the next requests came {waits:?} ms later");
    assert_eq!(creates(&standin).values().sum::<u64>(), 2);
    assert_eq!(env.stream().await.len(), 2);
    let counts = env.stream_counts().await;
    assert_eq!(counts.get(&first), Some(&1));
    assert_eq!(counts.get(&second), Some(&1));
    assert_eq!(env.queue_len(&env.dead_queue()).await, 0);

    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_seen_by_one_replica_holds_the_others_too() {
    let env = TestEnv::new("ratelimit-x").await;
    let standin = env.standin().serving(TEAM, KEY).await;
    standin
        .push_faults(vec![Fault::new(429).header("Retry-After", "3")])
        .unwrap();
    let mut first_replica = env.worker().spawn();
    let first = new_uuid();
    env.publish_job(&issue_job(&first, TEAM, 1)).await;
    // The cooldown is shared through Redis: once it is there, no replica may use the key.
    let cooldown_key = format!("{}cooldown:{TEAM}", env.prefix);
    assert!(
        wait_until(SETTLE, || async {
            env.redis
                .exists::<i64, _>(cooldown_key.as_str())
                .await
                .unwrap_or(0)
                == 1
        })
        .await,
        "{}",
        first_replica.log_tail(20)
    );
    // The replica that saw the 429 leaves (its job goes to a delay queue); a second one,
    // which never saw it, takes every job from here on.
    first_replica.stop().await;
    let mut second_replica = env.worker().spawn();
    assert!(wait_until(SETTLE, || async { second_replica.logged("Consuming.") }).await);
    let later = env.publish_issue_jobs(TEAM, 2..8).await;
    assert!(
        wait_until(SETTLE, || async { env.stream().await.len() >= 7 }).await,
        "{}\n{}",
        first_replica.log_tail(20),
        second_replica.log_tail(20)
    );
    let requests = standin.requests();
    assert_eq!(requests[0].status, 429);
    let limited_at = requests[0].received_at_ms;
    let earliest = requests[1..]
        .iter()
        .map(|r| r.received_at_ms - limited_at)
        .min()
        .unwrap_or(0);
    println!("429 Retry-After: 3 -> the first request by any replica came {earliest} ms later");
    assert!(
        earliest >= 2990,
        "a request came {earliest} ms after the 429 that asked for 3 s"
    );
    let counts = env.stream_counts().await;
    assert_eq!(counts.get(&first), Some(&1));
    for (_, uuid) in &later {
        assert_eq!(counts.get(uuid), Some(&1));
    }
    second_replica.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_flow_on_after_redis_forgets_the_scripts() {
    let env = TestEnv::new("noscript").await;
    let standin = env.standin().serving(TEAM, KEY).await;
    let mut worker = env.worker().spawn();
    let before = env.publish_issue_jobs(TEAM, 1..4).await;
    assert!(wait_until(SETTLE, || async { env.stream().await.len() == 3 }).await);
    // What a Redis restart does to the script cache.
    let _: () = env
        .redis
        .custom(fred::cmd!("SCRIPT"), vec!["FLUSH"])
        .await
        .unwrap();
    let after = env.publish_issue_jobs(TEAM, 4..7).await;
    assert!(
        wait_until(SETTLE, || async { env.stream().await.len() == 6 }).await,
        "{}",
        worker.log_tail(20)
    );
    let counts = env.stream_counts().await;
    for (_, uuid) in before.iter().chain(&after) {
        assert_eq!(counts.get(uuid), Some(&1));
    }
    assert_eq!(standin.delivered(), 6);
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_max_attempts_a_failing_job_is_dead_lettered_as_exhausted() {
    let env = TestEnv::new("exhausted").await;
    let standin = env.standin().serving(TEAM, KEY).await;
    standin
        .push_faults(vec![Fault::new(503).times(1000)])
        .unwrap();
    let mut worker = env
        .worker()
        .flag("--max-attempts", "2")
        .flag("--quick-tries", "2")
        .flag("--quick-window", "5s")
        .spawn();
    let uuid = new_uuid();
    let body = issue_job(&uuid, TEAM, 1).to_string();
    env.publish(body.as_bytes()).await;
    assert!(
        wait_until(SETTLE, || async {
            env.queue_len(&env.dead_queue()).await == 1
        })
        .await,
        "{}",
        worker.log_tail(20)
    );
    let dead = env.take_dead_letters().await;
    assert_eq!(dead.len(), 1);
    let letter = &dead[0];
    assert_eq!(letter.body, body.as_bytes());
    assert_eq!(letter.headers["x-opsgenie-error"], "exhausted");
    assert_eq!(letter.headers["x-opsgenie-attempts"], "2");
    assert_eq!(letter.headers["x-opsgenie-status"], "503");
    assert!(
        letter.headers["x-opsgenie-error-message"].contains("2 attempts"),
        "{:?}",
        letter.headers
    );
    // Two rounds of two tries, and nothing after the dead letter.
    assert_eq!(standin.stats().received, 4, "{:?}", standin.stats());
    assert!(env.stream().await.is_empty());
    assert!(env.all_queues_empty().await);

    worker.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Replicas dying and sharing incidents

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_stream_loses_nothing_and_pages_twice_at_most_prefetch_times() {
    const JOBS: i64 = 300;
    const PREFETCH: u64 = 16;
    let env = TestEnv::new("sigkill").await;
    let standin = env
        .standin()
        .serving(TEAM, KEY)
        .delay(Duration::from_millis(20))
        .await;
    let jobs = env.publish_issue_jobs(TEAM, 1..=JOBS).await;
    let prefetch = PREFETCH.to_string();
    // A short quick window and request time-out keep the lease of a killed replica short.
    let flags = [
        "--prefetch",
        prefetch.as_str(),
        "--quick-window",
        "1s",
        "--request-timeout",
        "2s",
    ];
    let mut a = env.worker().flags(&flags).spawn();
    assert!(
        standin.wait_for_delivered(100, SETTLE).await,
        "{}",
        a.log_tail(20)
    );
    a.signal("KILL");
    let status = a.wait_exit(Duration::from_secs(10)).await.expect("killed");
    assert_eq!(status.code(), None, "killed by a signal");
    let by_a = standin.delivered();

    let mut b = env.worker().flags(&flags).spawn();
    assert!(
        wait_until(Duration::from_secs(120), || async {
            env.stream().await.len() >= JOBS as usize && env.queue_len(&env.queue).await == 0
        })
        .await,
        "stream has {} of {JOBS}:\n{}",
        env.stream().await.len(),
        b.log_tail(30)
    );

    let creates = creates(&standin);
    let mut sends = 0;
    for (group, uuid) in &jobs {
        let n = creates.get(&issue_alias(*group)).copied().unwrap_or(0);
        assert!(n >= 1, "job {uuid} never reached the stand-in");
        sends += n;
    }
    let duplicates = sends - JOBS as u64;
    println!(
        "SIGKILL: A sent {by_a} before it died; {sends} sends for {JOBS} jobs: {duplicates} duplicates (prefetch {PREFETCH})"
    );
    assert!(duplicates <= PREFETCH, "{duplicates} duplicate sends");
    let counts = env.stream_counts().await;
    for (_, uuid) in &jobs {
        assert_eq!(counts.get(uuid), Some(&1), "stream entries of {uuid}");
    }
    assert_eq!(counts.len(), JOBS as usize);
    assert!(env.all_queues_empty().await);

    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_never_reopen_or_double_close_a_shuffled_incident() {
    const INCIDENTS: i64 = 100;
    let env = TestEnv::new("replicas").await;
    let standin = env
        .standin()
        .serving(TEAM, KEY)
        .delay(Duration::from_millis(5))
        .await;
    let flags = ["--prefetch", "8", "--quick-window", "2s"];
    let workers: Vec<WorkerProcess> = (0..3).map(|_| env.worker().flags(&flags).spawn()).collect();
    for w in &workers {
        assert!(
            wait_until(SETTLE, || async { w.logged("Consuming.") }).await,
            "{}",
            w.log_tail(20)
        );
    }

    // (incident, create uuid, resolve uuid)
    let incidents: Vec<(i64, String, String)> = (1..=INCIDENTS)
        .map(|i| (i, new_uuid(), new_uuid()))
        .collect();
    let mut bodies: Vec<String> = incidents
        .iter()
        .flat_map(|(i, create, resolve)| {
            [
                metric_job(create, TEAM, *i, "critical", 1).to_string(),
                metric_job(resolve, TEAM, *i, "resolved", 2).to_string(),
            ]
        })
        .collect();
    bodies.shuffle(&mut StdRng::seed_from_u64(7));
    for body in &bodies {
        env.publish(body.as_bytes()).await;
    }

    let all = bodies.len();
    let refs: Vec<&WorkerProcess> = workers.iter().collect();
    assert!(
        wait_until(Duration::from_secs(120), || async {
            let done = outcomes(&refs)
                .values()
                .filter(|o| {
                    o.iter()
                        .any(|o| matches!(o.as_str(), "delivered" | "stale" | "duplicate"))
                })
                .count();
            done == all && env.all_queues_empty().await
        })
        .await,
        "not every job finished"
    );

    let outcomes = outcomes(&refs);
    let alerts = standin.alerts();
    let counts = env.stream_counts().await;
    let mut resolved_first = 0;
    for (i, create, resolve) in &incidents {
        let alias = format!("incident_1_{i}");
        let state = alerts
            .get(&alias)
            .unwrap_or_else(|| panic!("{alias} never reached the stand-in"));
        assert_eq!(
            state.status,
            opsgenie_standin::AliasStatus::Closed,
            "{alias} is open: {state:?}"
        );
        assert_eq!(state.closes, 1, "{alias}: {state:?}");
        assert_eq!(
            counts.get(resolve),
            Some(&1),
            "{alias}: resolve not recorded"
        );
        if state.stray_closes > 0 {
            // The resolve went first; the create must then have been held back as stale.
            resolved_first += 1;
            assert_eq!(
                state.creates, 0,
                "{alias}: a create after its close: {state:?}"
            );
            assert!(
                outcomes[create].iter().any(|o| o == "stale"),
                "{alias}: create {create} was {:?}",
                outcomes[create]
            );
            assert_eq!(counts.get(create), None, "{alias}: a stale create recorded");
        } else {
            assert_eq!(state.creates, 1, "{alias}: {state:?}");
            assert_eq!(counts.get(create), Some(&1), "{alias}: create not recorded");
        }
    }
    let delivered = standin.delivered();
    assert_eq!(env.stream().await.len() as u64, delivered);
    assert_eq!(delivered, (2 * INCIDENTS - resolved_first) as u64);
    let shares: Vec<usize> = workers.iter().map(|w| w.job_lines().len()).collect();
    assert!(
        shares.iter().all(|&n| n > 0),
        "a replica sat idle: {shares:?}"
    );
    println!(
        "3 replicas ({shares:?} jobs each), {INCIDENTS} incidents: {resolved_first} resolved before their create (create stale), {delivered} requests"
    );
    for mut w in workers {
        w.stop().await;
    }
}

// ---------------------------------------------------------------------------------------------
// Redis and RabbitMQ going away

/// The staged outage: long enough for every client to notice and retry a few times.
const OUTAGE: Duration = Duration::from_secs(3);

/// Longer than the worker's Redis command time-out (5 s), so that commands fail rather than
/// wait for the reconnect, and the worker's own retries are what carries the jobs through.
const REDIS_OUTAGE: Duration = Duration::from_secs(7);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_outage_holds_acks_until_every_delivery_is_recorded() {
    const JOBS: i64 = 200;
    let env = TestEnv::new("redisdown").await;
    let standin = env
        .standin()
        .serving(TEAM, KEY)
        .delay(Duration::from_millis(20))
        .await;
    let relay = Relay::start("127.0.0.1:6379".parse().unwrap())
        .await
        .unwrap();
    let jobs = env.publish_issue_jobs(TEAM, 1..=JOBS).await;
    let mut worker = env
        .worker()
        .redis_url(&relay.redis_url())
        .flag("--prefetch", "16")
        .flag("--request-timeout", "2s")
        .spawn();
    assert!(
        standin.wait_for_delivered(40, SETTLE).await,
        "{}",
        worker.log_tail(20)
    );
    relay.cut().await;
    let recorded_at_cut = env.stream().await.len();
    tokio::time::sleep(REDIS_OUTAGE).await;
    // A job is logged as delivered only after its ack, so every job logged so far must be in
    // the stream already, even though jobs were sent that Redis could not hear about.
    let acked: Vec<String> = outcomes(&[&worker])
        .into_iter()
        .filter(|(_, o)| o.iter().any(|o| o == "delivered"))
        .map(|(uuid, _)| uuid)
        .collect();
    let recorded = env.stream_counts().await;
    assert_eq!(
        recorded.len(),
        recorded_at_cut,
        "a record landed through a cut relay"
    );
    let unrecorded: Vec<&String> = acked
        .iter()
        .filter(|u| !recorded.contains_key(*u))
        .collect();
    assert!(
        unrecorded.is_empty(),
        "acked before recorded: {unrecorded:?}"
    );
    let sent_in_outage = standin.delivered() as usize - recorded_at_cut;
    assert_alive(&mut worker);
    relay.restore();

    assert!(
        wait_until(SETTLE, || async {
            env.stream().await.len() >= JOBS as usize && env.all_queues_empty().await
        })
        .await,
        "stream has {} of {JOBS}:\n{}",
        env.stream().await.len(),
        worker.log_tail(30)
    );
    assert_eq!(env.stream().await.len(), JOBS as usize);
    let counts = env.stream_counts().await;
    for (_, uuid) in &jobs {
        assert_eq!(counts.get(uuid), Some(&1), "stream entries of {uuid}");
    }
    let creates = creates(&standin);
    let sends: u64 = creates.values().sum();
    for (group, _) in &jobs {
        assert!(creates.get(&issue_alias(*group)).copied().unwrap_or(0) >= 1);
    }
    println!(
        "Redis outage: {recorded_at_cut} recorded before the cut, {sent_in_outage} sent but not recorded while it lasted, {sends} sends for {JOBS} jobs"
    );
    let mut complaints: HashMap<String, usize> = HashMap::new();
    for line in worker.logs() {
        let message = line["message"].as_str().unwrap_or("");
        if line["level"] != "INFO" && message.contains("Redis") {
            *complaints.entry(message.to_owned()).or_default() += 1;
        }
    }
    println!("Redis outage: {complaints:?}");
    assert!(
        !complaints.is_empty(),
        "the outage left no trace in the log"
    );
    assert_alive(&mut worker);
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_outage_ends_in_a_reconnect_and_every_job_delivered() {
    const HALF: i64 = 60;
    let env = TestEnv::new("brokerdown").await;
    let standin = env
        .standin()
        .serving(TEAM, KEY)
        .delay(Duration::from_millis(20))
        .await;
    let relay = Relay::start("127.0.0.1:5672".parse().unwrap())
        .await
        .unwrap();
    let mut jobs = env.publish_issue_jobs(TEAM, 1..=HALF).await;
    let mut worker = env
        .worker()
        .amqp_url(&relay.amqp_url())
        .flag("--prefetch", "8")
        .spawn();
    assert!(
        standin.wait_for_delivered(20, SETTLE).await,
        "{}",
        worker.log_tail(20)
    );
    relay.cut().await;
    let relayed_before = relay.relayed();
    // Producers keep publishing to the broker, which is up for them.
    jobs.extend(env.publish_issue_jobs(TEAM, HALF + 1..=2 * HALF).await);
    tokio::time::sleep(OUTAGE).await;
    assert_alive(&mut worker);
    relay.restore();

    let total = jobs.len();
    assert!(
        wait_until(SETTLE, || async {
            env.stream().await.len() >= total && env.all_queues_empty().await
        })
        .await,
        "stream has {} of {total}:\n{}",
        env.stream().await.len(),
        worker.log_tail(30)
    );
    assert!(
        relay.relayed() > relayed_before,
        "the worker never came back"
    );
    assert_eq!(env.stream().await.len(), total);
    let counts = env.stream_counts().await;
    let creates = creates(&standin);
    for (group, uuid) in &jobs {
        assert_eq!(counts.get(uuid), Some(&1), "stream entries of {uuid}");
        // A job whose ack was lost with the connection comes back, and Redis says it is done.
        assert_eq!(
            creates.get(&issue_alias(*group)),
            Some(&1),
            "sends of group {group}"
        );
    }
    let consuming = worker
        .logs()
        .iter()
        .filter(|l| l["message"] == "Consuming.")
        .count();
    println!(
        "Broker outage: {total} jobs delivered once each; the worker started consuming {consuming} times over {} relayed connections",
        relay.relayed()
    );
    assert!(consuming >= 2, "consumed {consuming} times");
    assert_alive(&mut worker);
    worker.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Poison and dead letters

/// One message that must end in the dead-letter queue, and what its letter must say.
struct Poison {
    name: &'static str,
    body: Vec<u8>,
    reason: &'static str,
    /// Each must appear in `x-opsgenie-error-message`.
    says: Vec<&'static str>,
    status: Option<u16>,
}

fn poison(
    name: &'static str,
    body: impl Into<Vec<u8>>,
    reason: &'static str,
    says: &[&'static str],
) -> Poison {
    Poison {
        name,
        body: body.into(),
        reason,
        says: says.to_vec(),
        status: None,
    }
}

/// A valid job with `edit` applied, under a fresh uuid unless the edit changes it.
fn edited(edit: impl FnOnce(&mut serde_json::Map<String, Value>)) -> Vec<u8> {
    let mut job = issue_job(&new_uuid(), TEAM, 9);
    edit(job.as_object_mut().expect("a job is an object"));
    job.to_string().into_bytes()
}

fn edited_metric(edit: impl FnOnce(&mut serde_json::Map<String, Value>)) -> Vec<u8> {
    let mut job = metric_job(&new_uuid(), TEAM, 9, "critical", 1);
    edit(job.as_object_mut().expect("a job is an object"));
    job.to_string().into_bytes()
}

/// Poison that never reaches Opsgenie: every way docs/contract.md section 8 says a body is not a job, and
/// a team the keyring does not have.
fn poison_before_http() -> Vec<Poison> {
    let text = |uuid: &str| issue_job(uuid, TEAM, 9).to_string();
    let not_utf8 = {
        let mut b = text(&new_uuid()).into_bytes();
        let at = b.windows(4).position(|w| w == b"Zero").unwrap();
        b[at] = 0xC3;
        b[at + 1] = 0x28;
        b
    };
    let surrogate = text(&new_uuid()).replace(r#""team_id":"backend""#, r#""team_id":"\ud800""#);
    let mut oversized = issue_job(&new_uuid(), TEAM, 9);
    oversized["padding"] = Value::String("x".repeat(1024 * 1024));
    vec![
        poison(
            "not JSON",
            "<html>not json</html>",
            "invalid_job",
            &["expected value"],
        ),
        poison("not UTF-8", not_utf8, "invalid_job", &["UTF-8"]),
        poison(
            "lone surrogate",
            surrogate,
            "invalid_job",
            &["team_id: ", "escape"],
        ),
        poison("array", "[1,2,3]", "invalid_job", &["JSON object"]),
        poison("number", "42", "invalid_job", &["JSON object"]),
        poison("null", "null", "invalid_job", &["JSON object"]),
        poison("empty body", "", "invalid_job", &["EOF"]),
        poison(
            "missing version",
            edited(|j| {
                j.remove("version");
            }),
            "invalid_job",
            &["version: missing field"],
        ),
        poison(
            "version 2",
            edited(|j| {
                j.insert("version".into(), json!(2));
            }),
            "invalid_job",
            &["version: unsupported version 2"],
        ),
        poison(
            "unknown kind",
            edited(|j| {
                j.insert("kind".into(), json!("page"));
            }),
            "invalid_job",
            &["kind: unknown kind"],
        ),
        poison(
            "missing notification_uuid",
            edited(|j| {
                j.remove("notification_uuid");
            }),
            "invalid_job",
            &["notification_uuid: missing field"],
        ),
        poison(
            "empty notification_uuid",
            edited(|j| {
                j.insert("notification_uuid".into(), json!(""));
            }),
            "invalid_job",
            &["notification_uuid: must be 1 to 100 characters"],
        ),
        poison(
            "101-char notification_uuid",
            edited(|j| {
                j.insert("notification_uuid".into(), json!("u".repeat(101)));
            }),
            "invalid_job",
            &["notification_uuid: must be 1 to 100 characters"],
        ),
        poison(
            "team_id a number",
            edited(|j| {
                j.insert("team_id".into(), json!(7));
            }),
            "invalid_job",
            &["team_id: invalid type"],
        ),
        poison(
            "organization.id a string",
            edited(|j| {
                j["organization"]["id"] = json!("one");
            }),
            "invalid_job",
            &["organization.id: invalid type"],
        ),
        poison(
            "rules a string",
            edited(|j| {
                j.insert("rules".into(), json!("17"));
            }),
            "invalid_job",
            &["rules: invalid type"],
        ),
        poison(
            "rules[0].id a string",
            edited(|j| {
                j["rules"][0]["id"] = json!("17");
            }),
            "invalid_job",
            &["rules[0].id: invalid type"],
        ),
        poison(
            "priority a number",
            edited(|j| {
                j.insert("priority".into(), json!(2));
            }),
            "invalid_job",
            &["priority: invalid type"],
        ),
        poison(
            "tags entry of length 1",
            edited(|j| {
                j["event"]["tags"] = json!([["level", "error"], ["environment"]]);
            }),
            "invalid_job",
            &["event.tags[1]: invalid length 1"],
        ),
        poison(
            "event without title",
            edited(|j| {
                j["event"].as_object_mut().unwrap().remove("title");
            }),
            "invalid_job",
            &["event", "title"],
        ),
        poison(
            "empty rules",
            edited(|j| {
                j.insert("rules".into(), json!([]));
            }),
            "invalid_job",
            &["rules: at least one rule"],
        ),
        poison(
            "ftp organization.url",
            edited(|j| {
                j["organization"]["url"] = json!("ftp://acme.sentry.io");
            }),
            "invalid_job",
            &["organization.url: must be an absolute http"],
        ),
        poison(
            "issue_alert without project",
            edited(|j| {
                j.remove("project");
            }),
            "invalid_job",
            &["project: missing field"],
        ),
        poison(
            "incident.status bogus",
            edited_metric(|j| {
                j["incident"]["status"] = json!("bogus");
            }),
            "invalid_job",
            &["incident.status: unknown variant `bogus`"],
        ),
        poison(
            "metric_alert without incident",
            edited_metric(|j| {
                j.remove("incident");
            }),
            "invalid_job",
            &["incident: missing field"],
        ),
        poison(
            "incident.identifier a float",
            edited_metric(|j| {
                j["incident"]["identifier"] = json!(1.5);
            }),
            "invalid_job",
            &["incident.identifier: invalid type"],
        ),
        poison(
            "over 1 MiB",
            oversized.to_string(),
            "too_large",
            &["over the limit of 1048576"],
        ),
        poison(
            "unknown team",
            issue_job(&new_uuid(), "nobody", 9).to_string(),
            "unknown_team",
            &["\"nobody\"", "keyring"],
        ),
        Poison {
            status: Some(401),
            ..poison(
                "wrong key (401)",
                issue_job(&new_uuid(), "wrongkey", 9).to_string(),
                "unauthorized",
                &["401"],
            )
        },
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_is_dead_lettered_with_its_reason_and_valid_jobs_flow_around_it() {
    let env = TestEnv::new("poison").await;
    let standin = env.standin().serving(TEAM, KEY).await;
    env.team("wrongkey").key("not-the-key").served_by(&standin);
    let mut worker = env.worker().spawn();

    let mut valid: Vec<String> = Vec::new();
    // Valid jobs get groups 1000 and up; poison uses group 9, so their aliases never meet.
    async fn publish_valid(env: &TestEnv, valid: &mut Vec<String>) {
        let uuid = new_uuid();
        let group = 1000 + valid.len() as i64;
        env.publish_job(&issue_job(&uuid, TEAM, group)).await;
        valid.push(uuid);
    }

    let mut cases = poison_before_http();
    for case in &cases {
        publish_valid(&env, &mut valid).await;
        env.publish(&case.body).await;
    }
    publish_valid(&env, &mut valid).await;
    let expected_dead = cases.len() as u32;
    assert!(
        wait_until(SETTLE, || async {
            env.queue_len(&env.dead_queue()).await == expected_dead
                && env.stream().await.len() >= valid.len()
        })
        .await,
        "dead {} of {expected_dead}, delivered {} of {}:\n{}",
        env.queue_len(&env.dead_queue()).await,
        env.stream().await.len(),
        valid.len(),
        worker.log_tail(20)
    );

    // Opsgenie's refusals, one at a time: the stand-in serves a fault to whichever request
    // comes next, so nothing else may be in flight.
    for status in [400u16, 402, 422, 501] {
        standin.push_faults(vec![Fault::new(status)]).unwrap();
        let body = issue_job(&new_uuid(), TEAM, 9).to_string().into_bytes();
        env.publish(&body).await;
        let dead_now = cases.len() as u32 + 1;
        assert!(
            wait_until(SETTLE, || async {
                env.queue_len(&env.dead_queue()).await == dead_now
            })
            .await,
            "{status}: {}",
            worker.log_tail(10)
        );
        cases.push(Poison {
            status: Some(status),
            ..poison("Opsgenie refusal", body, "rejected", &[])
        });
        publish_valid(&env, &mut valid).await;
        let delivered = valid.len();
        assert!(wait_until(SETTLE, || async { env.stream().await.len() >= delivered }).await);
    }

    let letters = env.take_dead_letters().await;
    assert_eq!(letters.len(), cases.len());
    let mut mistakes = Vec::new();
    for case in &cases {
        let letter = letters
            .iter()
            .find(|l| l.body == case.body)
            .unwrap_or_else(|| panic!("{}: no dead letter with its body", case.name));
        let h = &letter.headers;
        let message = h
            .get("x-opsgenie-error-message")
            .cloned()
            .unwrap_or_default();
        let mut wrong = Vec::new();
        if h.get("x-opsgenie-error").map(String::as_str) != Some(case.reason) {
            wrong.push(format!("x-opsgenie-error {:?}", h.get("x-opsgenie-error")));
        }
        if message.trim().is_empty() || message.chars().any(char::is_control) {
            wrong.push("no readable message".to_owned());
        }
        if message.contains(KEY) || message.contains("not-the-key") {
            wrong.push("a key in the message".to_owned());
        }
        for needle in &case.says {
            if !message.contains(needle) {
                wrong.push(format!("the message does not say {needle:?}"));
            }
        }
        let status = case.status.map(|s| s.to_string());
        if h.get("x-opsgenie-status") != status.as_ref() {
            wrong.push(format!(
                "x-opsgenie-status {:?}",
                h.get("x-opsgenie-status")
            ));
        }
        if h.get("x-opsgenie-attempts").map(String::as_str) != Some("1") {
            wrong.push(format!(
                "x-opsgenie-attempts {:?}",
                h.get("x-opsgenie-attempts")
            ));
        }
        if !wrong.is_empty() {
            mistakes.push(format!("{}: {} ({message:?})", case.name, wrong.join(", ")));
        }
        println!("{:<30} {:<13} {message}", case.name, case.reason);
    }
    println!("{} kinds of poison dead-lettered", cases.len());
    assert!(mistakes.is_empty(), "{}", mistakes.join("\n"));

    let counts = env.stream_counts().await;
    for uuid in &valid {
        assert_eq!(counts.get(uuid), Some(&1), "valid job {uuid}");
    }
    assert_eq!(counts.len(), valid.len());
    assert_eq!(standin.delivered(), valid.len() as u64);
    assert!(env.all_queues_empty().await);
    assert_alive(&mut worker);
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_list_shows_a_letter_and_dead_replay_delivers_it_once_the_team_exists() {
    let env = TestEnv::new("replay").await;
    let standin = env.standin().serving(TEAM, KEY).await;
    let mut worker = env.worker().spawn();
    let uuid = new_uuid();
    env.publish_job(&issue_job(&uuid, "ops", 1)).await;
    assert!(
        wait_until(SETTLE, || async {
            env.queue_len(&env.dead_queue()).await == 1
        })
        .await,
        "{}",
        worker.log_tail(10)
    );

    let (code, out, err) = env.command(&["dead", "list"], None);
    assert_eq!(code, 0, "{out}{err}");
    let line = out
        .lines()
        .find(|l| l.contains(&uuid))
        .unwrap_or_else(|| panic!("{uuid} not listed:\n{out}"));
    assert!(line.starts_with("unknown_team\t"), "{line}");
    assert!(line.contains("\"ops\""), "{line}");
    assert_eq!(
        env.queue_len(&env.dead_queue()).await,
        1,
        "dead list took the letter"
    );

    // The cause goes away: the keyring gains the team, and the worker is told to reload.
    env.team("ops").key(KEY).served_by(&standin);
    worker.signal("HUP");
    assert!(
        wait_until(SETTLE, || async { worker.logged("Keyring reloaded.") }).await,
        "{}",
        worker.log_tail(10)
    );
    let (code, out, err) = env.command(&["dead", "replay"], None);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("Replayed 1 dead letter"), "{out}");
    assert!(
        wait_until(SETTLE, || async {
            !env.stream().await.is_empty() && env.all_queues_empty().await
        })
        .await,
        "{}",
        worker.log_tail(10)
    );
    assert_eq!(standin.delivered(), 1);
    assert_eq!(env.stream().await.len(), 1);
    assert_eq!(env.stream_counts().await.get(&uuid), Some(&1));
    // Log lines are written in batches: wait for the second one rather than race it.
    wait_until(SETTLE, || async {
        outcomes(&[&worker]).get(&uuid).map_or(0, Vec::len) >= 2
    })
    .await;
    let outcomes = outcomes(&[&worker]);
    assert_eq!(
        outcomes[&uuid],
        ["dead_lettered", "delivered"],
        "{}",
        worker.log_tail(10)
    );

    worker.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Shutdown

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_jobs_in_flight_and_leaves_the_rest_queued() {
    const JOBS: i64 = 30;
    const DRAIN: Duration = Duration::from_secs(8);
    let env = TestEnv::new("drain").await;
    let standin = env
        .standin()
        .serving(TEAM, KEY)
        .delay(Duration::from_secs(1))
        .await;
    let jobs = env.publish_issue_jobs(TEAM, 1..=JOBS).await;
    let mut worker = env
        .worker()
        .flag("--prefetch", "6")
        .flag("--drain-timeout", "8s")
        .spawn();
    // The first round is done and the next is on its way to the stand-in.
    assert!(
        wait_until(SETTLE, || async {
            worker.job_lines().len() >= 6 && leases_held(&env).await >= 3
        })
        .await,
        "{}",
        worker.log_tail(20)
    );
    let finished_before = worker.job_lines().len();
    let in_flight = leases_held(&env).await;
    let asked = Instant::now();
    let status = worker.terminate(DRAIN + Duration::from_secs(10)).await;
    let took = asked.elapsed();
    println!(
        "SIGTERM with {in_flight} in flight after {finished_before} finished: exit {:?} after {took:?}",
        status.code()
    );
    assert_eq!(status.code(), Some(0), "{}", worker.log_tail(20));
    assert!(took < DRAIN, "the drain took {took:?}");

    let delivered = standin.delivered();
    assert!(
        delivered >= (finished_before + in_flight) as u64,
        "jobs in flight were cut off: {delivered} delivered"
    );
    let creates = creates(&standin);
    assert!(creates.values().all(|&n| n == 1), "a job was sent twice");
    let counts = env.stream_counts().await;
    assert_eq!(counts.len() as u64, delivered);
    assert!(counts.values().all(|&n| n == 1));
    // The rest waits in the work queue, untouched.
    let queued = env.queue_len(&env.queue).await;
    assert_eq!(delivered + u64::from(queued), JOBS as u64);
    for (group, uuid) in &jobs {
        let sent = creates.contains_key(&issue_alias(*group));
        assert_eq!(sent, counts.contains_key(uuid), "{uuid}");
    }
    assert_eq!(leases_held(&env).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_past_the_drain_timeout_returns_unfinished_jobs_to_the_queue() {
    const JOBS: i64 = 4;
    const DRAIN: Duration = Duration::from_secs(2);
    let env = TestEnv::new("draintimeout").await;
    // Opsgenie hangs far longer than the drain allows.
    let standin = env
        .standin()
        .serving(TEAM, KEY)
        .delay(Duration::from_secs(60))
        .await;
    let jobs = env.publish_issue_jobs(TEAM, 1..=JOBS).await;
    let mut worker = env
        .worker()
        .flag("--prefetch", "4")
        .flag("--request-timeout", "90s")
        .flag("--drain-timeout", "2s")
        .spawn();
    assert!(
        wait_until(SETTLE, || async {
            leases_held(&env).await == JOBS as usize
        })
        .await,
        "{}",
        worker.log_tail(20)
    );
    let asked = Instant::now();
    let status = worker.terminate(DRAIN + Duration::from_secs(20)).await;
    let took = asked.elapsed();
    println!(
        "SIGTERM past the drain time-out: exit {:?} after {took:?}",
        status.code()
    );
    assert_eq!(status.code(), Some(0), "{}", worker.log_tail(20));
    assert!(
        took < DRAIN + Duration::from_secs(3),
        "the drain took {took:?}"
    );
    // Back in the work queue as they were, to be sent by whichever worker comes next.
    assert!(
        wait_until(SETTLE, || async {
            env.queue_len(&env.queue).await == jobs.len() as u32
        })
        .await,
        "{} of {JOBS} jobs back in the queue",
        env.queue_len(&env.queue).await
    );
    assert!(env.stream().await.is_empty());
    assert_eq!(standin.delivered(), 0);
    assert_eq!(env.queue_len(&env.dead_queue()).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_started_while_the_broker_and_redis_are_down_catches_up_when_they_return() {
    const JOBS: i64 = 20;
    let env = TestEnv::new("colddown").await;
    let standin = env.standin().serving(TEAM, KEY).await;
    let broker = Relay::start("127.0.0.1:5672".parse().unwrap())
        .await
        .unwrap();
    let redis = Relay::start("127.0.0.1:6379".parse().unwrap())
        .await
        .unwrap();
    broker.cut().await;
    redis.cut().await;
    let jobs = env.publish_issue_jobs(TEAM, 1..=JOBS).await;
    let mut worker = env
        .worker()
        .amqp_url(&broker.amqp_url())
        .redis_url(&redis.redis_url())
        .spawn();
    // Both outages are seen (each logs its first failed attempt) before either comes back.
    assert!(
        wait_until(SETTLE, || async {
            let logs = worker.logs();
            logs.iter()
                .any(|l| l["message"] == "Cannot consume from RabbitMQ; trying again.")
        })
        .await,
        "{}",
        worker.log_tail(20)
    );
    assert_alive(&mut worker);
    broker.restore();
    // Jobs now reach the worker, which cannot tell whether they were delivered: it must wait.
    assert!(
        wait_until(SETTLE, || async {
            worker.logged("Redis is unreachable; waiting before checking the job.")
        })
        .await,
        "{}",
        worker.log_tail(20)
    );
    assert_eq!(standin.stats().received, 0, "sent without checking Redis");
    redis.restore();

    assert!(
        wait_until(SETTLE, || async {
            env.stream().await.len() >= JOBS as usize && env.all_queues_empty().await
        })
        .await,
        "stream has {} of {JOBS}:\n{}",
        env.stream().await.len(),
        worker.log_tail(30)
    );
    assert_eq!(env.stream().await.len(), JOBS as usize);
    let counts = env.stream_counts().await;
    let creates = creates(&standin);
    for (group, uuid) in &jobs {
        assert_eq!(counts.get(uuid), Some(&1), "stream entries of {uuid}");
        assert_eq!(creates.get(&issue_alias(*group)), Some(&1), "group {group}");
    }
    assert_alive(&mut worker);
    worker.stop().await;
}

//! `opsgenie-worker enqueue` end to end: jobs from files and from standard input are validated,
//! published as persistent JSON messages with publisher confirms, and delivered by a worker;
//! an invalid job is reported with its field path and never published.

use std::time::Duration;

use lapin::options::{BasicGetOptions, BasicNackOptions};
use opsgenie_e2e::fixtures::*;
use opsgenie_e2e::*;
use opsgenie_shared::{AlertJob, build_request};
use serde_json::{Value, json};

/// Generous: the machine is small and shared, and a passing run never waits this long.
const DEADLINE: Duration = Duration::from_secs(30);

/// Runs `enqueue` with `args` (and `stdin`) and checks it succeeded without complaint.
fn enqueue_ok(env: &TestEnv, args: &[&str], stdin: Option<&[u8]>) {
    let (code, stdout, stderr) = env.command(args, stdin);
    assert_eq!(code, 0, "stdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(!stderr.contains("invalid"), "{stderr}");
}

/// The jobs are waiting in the work queue before any worker runs: published, not lost.
async fn assert_queued(env: &TestEnv, n: u32) {
    assert!(
        wait_until(DEADLINE, || async { env.queue_len(&env.queue).await == n }).await,
        "expected {n} jobs in {}, found {}",
        env.queue,
        env.queue_len(&env.queue).await
    );
}

/// Starts a worker, lets it deliver `jobs`, stops it, and checks that the stand-in received
/// exactly one request per job, each the one docs/contract.md section 5 builds from it.
async fn deliver_and_check(env: &TestEnv, standin: &StandIn, key: &str, jobs: &[Value]) {
    let mut worker = env.worker().spawn();
    assert!(
        standin
            .wait_for_delivered(jobs.len() as u64, DEADLINE)
            .await,
        "{}",
        worker.raw_log()
    );
    assert!(
        wait_until(DEADLINE, || async {
            worker.job_lines().len() >= jobs.len()
        })
        .await,
        "{}",
        worker.raw_log()
    );
    let status = worker.terminate(DEADLINE).await;
    assert_eq!(status.code(), Some(0), "{}", worker.raw_log());
    let lines = worker.job_lines();
    assert_eq!(lines.len(), jobs.len(), "{}", worker.raw_log());
    assert!(
        lines.iter().all(|l| l["outcome"] == "delivered"),
        "{lines:?}"
    );

    let mut requests = standin.requests();
    assert_eq!(requests.len(), jobs.len());
    for job in jobs {
        let request = build_request(&AlertJob::parse(job.to_string().as_bytes()).expect("valid"));
        let body: Value = serde_json::from_slice(&request.body).expect("JSON body");
        let query = (!request.query.is_empty()).then(|| request.query.to_owned());
        let found = requests.iter().position(|r| {
            r.path == request.path
                && r.query == query
                && r.authorization.as_deref() == Some(format!("GenieKey {key}").as_str())
                && r.json.as_ref() == Some(&body)
        });
        let Some(found) = found else {
            panic!("no request for job {job}; expected body {body}");
        };
        requests.swap_remove(found);
    }
    let stream = env.stream().await;
    assert_eq!(stream.len(), jobs.len());
    for job in jobs {
        let uuid = job["notification_uuid"].as_str().expect("uuid");
        assert_eq!(
            stream
                .iter()
                .filter(|e| e.get("notification_uuid").map(String::as_str) == Some(uuid))
                .count(),
            1,
            "stream entries of {uuid}"
        );
    }
    assert_eq!(env.queue_len(&env.queue).await, 0);
    assert_eq!(env.queue_len(&env.dead_queue()).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_with_one_pretty_printed_job_is_published_and_delivered() {
    let env = TestEnv::new("enq-pretty").await;
    let standin = env.standin().serving("backend", "key-e1").await;
    let job = spec_issue_job(&new_uuid(), "backend");
    let file = env.write_file(
        "job.json",
        serde_json::to_string_pretty(&job).expect("json"),
    );
    enqueue_ok(&env, &["enqueue", file.to_str().expect("utf-8 path")], None);
    assert_queued(&env, 1).await;

    // docs/contract.md section 3: a persistent AMQP message, content type application/json.
    let message = env
        .channel
        .basic_get(env.queue.as_str().into(), BasicGetOptions { no_ack: false })
        .await
        .expect("basic.get")
        .expect("the job is in the queue");
    let properties = &message.delivery.properties;
    assert_eq!(*properties.delivery_mode(), Some(2));
    assert_eq!(
        properties.content_type().as_ref().map(|c| c.as_str()),
        Some("application/json")
    );
    let published: Value = serde_json::from_slice(&message.delivery.data).expect("JSON");
    assert_eq!(published, job);
    message
        .delivery
        .acker
        .nack(BasicNackOptions {
            multiple: false,
            requeue: true,
        })
        .await
        .expect("put it back");
    assert_queued(&env, 1).await;

    deliver_and_check(&env, &standin, "key-e1", &[job]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_of_json_lines_publishes_every_job() {
    let env = TestEnv::new("enq-lines").await;
    let standin = env.standin().serving("backend", "key-e2").await;
    let jobs = [
        spec_issue_job(&new_uuid(), "backend"),
        spec_metric_job(&new_uuid(), "backend", 501, "critical"),
        spec_metric_job(&new_uuid(), "backend", 502, "resolved"),
    ];
    let text: String = jobs.iter().map(|j| format!("{j}\n")).collect();
    let file = env.write_file("jobs.jsonl", text);
    enqueue_ok(&env, &["enqueue", file.to_str().expect("utf-8 path")], None);
    assert_queued(&env, 3).await;
    deliver_and_check(&env, &standin, "key-e2", &jobs).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standard_input_publishes_one_job_per_line() {
    let env = TestEnv::new("enq-stdin").await;
    let standin = env.standin().serving("backend", "key-e3").await;
    let jobs = [
        spec_metric_job(&new_uuid(), "backend", 601, "warning"),
        spec_issue_job(&new_uuid(), "backend"),
        spec_metric_job(&new_uuid(), "backend", 602, "critical"),
    ];
    let input: String = jobs.iter().map(|j| format!("{j}\n")).collect();
    enqueue_ok(&env, &["enqueue"], Some(input.as_bytes()));
    assert_queued(&env, 3).await;
    deliver_and_check(&env, &standin, "key-e3", &jobs).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_job_is_reported_with_its_field_path_and_not_published() {
    let env = TestEnv::new("enq-invalid").await;
    let standin = env.standin().serving("backend", "key-e4").await;
    let valid = [
        spec_issue_job(&new_uuid(), "backend"),
        spec_metric_job(&new_uuid(), "backend", 701, "critical"),
    ];
    let invalid_uuid = new_uuid();
    let mut invalid = spec_issue_job(&invalid_uuid, "backend");
    invalid["event"]["tags"] = json!([["level"]]);
    let input = format!("{}\n{invalid}\n{}\n", valid[0], valid[1]);
    let (code, stdout, stderr) = env.command(&["enqueue"], Some(input.as_bytes()));
    assert_ne!(code, 0, "stdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(stderr.contains("event.tags[0]"), "{stderr}");
    // Only the invalid job is reported.
    assert_eq!(
        stderr.lines().filter(|l| l.contains("event.tags")).count(),
        1,
        "{stderr}"
    );

    assert_queued(&env, 2).await;
    deliver_and_check(&env, &standin, "key-e4", &valid).await;
    assert!(
        standin
            .requests()
            .iter()
            .all(|r| !r.body.contains(&invalid_uuid)),
        "the invalid job reached Opsgenie"
    );
    assert!(
        env.stream()
            .await
            .iter()
            .all(|e| e.get("notification_uuid") != Some(&invalid_uuid))
    );
}

// ---------------------------------------------------------------------------------------------
// A producer touches only what it is told (docs/contract.md section 9).

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_only_an_exchange_no_queue_is_declared_and_an_unroutable_job_is_an_error() {
    let env = TestEnv::new("enq-lone").await;
    let exchange = env.another_exchange("lone");
    let default_queue_existed = env.queue_exists("opsgenie.alerts").await;
    let job = spec_issue_job(&new_uuid(), "backend");
    let (code, stdout, stderr) = run_worker(
        &["enqueue", "--amqp-url", AMQP_URL, "--exchange", &exchange],
        Some(format!("{job}\n").as_bytes()),
    );
    assert_ne!(code, 0, "stdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(
        stderr.contains(&format!(
            "no queue is bound to exchange \"{exchange}\" with routing key \"alert\""
        )),
        "{stderr}"
    );
    assert!(stdout.contains("published 0, failed 1"), "{stdout}");
    // The exchange was declared; the default work queue and its retry and dead queues were
    // not (had they been, they would be bound to the exchange and the job routed).
    let channel = env.connection.create_channel().await.expect("channel");
    channel
        .exchange_declare(
            exchange.as_str().into(),
            lapin::ExchangeKind::Direct,
            lapin::options::ExchangeDeclareOptions {
                passive: true,
                ..Default::default()
            },
            lapin::types::FieldTable::default(),
        )
        .await
        .expect("the exchange exists");
    if !default_queue_existed {
        assert!(!env.queue_exists("opsgenie.alerts").await);
        assert!(!env.queue_exists("opsgenie.alerts.dead").await);
        assert!(!env.queue_exists("opsgenie.alerts.retry.5s").await);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_only_an_exchange_a_job_reaches_the_queue_a_worker_declared() {
    let env = TestEnv::new("enq-bound").await;
    let job = spec_issue_job(&new_uuid(), "backend");
    let (code, stdout, stderr) = run_worker(
        &[
            "enqueue",
            "--amqp-url",
            AMQP_URL,
            "--exchange",
            &env.exchange,
        ],
        Some(format!("{job}\n").as_bytes()),
    );
    assert_eq!(code, 0, "stdout:\n{stdout}\nstderr:\n{stderr}");
    assert_queued(&env, 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_of_another_deployment_is_a_clear_error_naming_queue_and_argument() {
    // This test's topology stands for another deployment: its retry queues send expired
    // jobs back to its own exchange.
    let env = TestEnv::new("enq-clash").await;
    let exchange = env.another_exchange("other");
    let job = spec_issue_job(&new_uuid(), "backend");
    let (code, stdout, stderr) = run_worker(
        &[
            "enqueue",
            "--amqp-url",
            AMQP_URL,
            "--exchange",
            &exchange,
            "--queue",
            &env.queue,
            "--retry-delays",
            TEST_RETRY_DELAYS,
        ],
        Some(format!("{job}\n").as_bytes()),
    );
    assert_eq!(code, 2, "stdout:\n{stdout}\nstderr:\n{stderr}");
    let retry = format!("{}.retry.1s", env.queue);
    assert!(
        stderr.contains(&format!("the queue \"{retry}\" already exists")),
        "{stderr}"
    );
    assert!(stderr.contains("'x-dead-letter-exchange'"), "{stderr}");
    // The command's own message is the clear one, not the broker's code.
    let last = stderr.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("opsgenie-worker: cannot declare: the queue")
            && !last.contains("PRECONDITION"),
        "{stderr}"
    );
    // Nothing was published, and the other deployment's queue was not bound to this exchange.
    let confirm_channel = env.connection.create_channel().await.expect("channel");
    confirm_channel
        .confirm_select(Default::default())
        .await
        .expect("confirms");
    let confirm = confirm_channel
        .basic_publish(
            exchange.as_str().into(),
            "alert".into(),
            lapin::options::BasicPublishOptions {
                mandatory: true,
                ..Default::default()
            },
            b"{}",
            Default::default(),
        )
        .await
        .expect("publish")
        .await
        .expect("confirm");
    assert!(
        matches!(confirm, lapin::Confirmation::Ack(Some(_))),
        "returned as unroutable: {confirm:?}"
    );
    assert_eq!(env.queue_len(&env.queue).await, 0);

    // The same for the queue type, as `enqueue`, `check` and `dead` read it.
    let keyring = env.keyring();
    let keyring = keyring.to_str().expect("utf-8 path");
    for args in [
        vec!["enqueue", "--queue-type", "quorum"],
        vec![
            "check",
            "--queue-type",
            "quorum",
            "--keyring",
            keyring,
            "--redis-url",
            REDIS_URL,
        ],
        vec!["dead", "list", "--queue-type", "quorum"],
        vec!["dead", "replay", "--queue-type", "quorum"],
    ] {
        let (code, stdout, stderr) = env.command(&args, Some(format!("{job}\n").as_bytes()));
        assert_eq!(code, 2, "{args:?}\nstdout:\n{stdout}\nstderr:\n{stderr}");
        assert!(
            stderr.contains(&format!("the queue \"{}\" already exists", env.queue))
                && stderr.contains("'x-queue-type'"),
            "{args:?}: {stderr}"
        );
    }
    assert_eq!(env.queue_len(&env.queue).await, 0);
}

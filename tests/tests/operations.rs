//! What operators touch: /metrics, /healthz, /readyz, `check`, keyring reload on SIGHUP, the
//! summary line, a quorum queue, and no secret anywhere in what the worker prints.

use std::time::Duration;

use opsgenie_e2e::fixtures::*;
use opsgenie_e2e::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_health_and_readiness_while_it_works() {
    let env = TestEnv::new("ops-metrics").await;
    let standin = env.standin().serving("backend", "metrics-key-7f3a").await;
    let mut worker = env.worker().ready().await;
    let port = worker.metrics_port();
    assert_eq!(http_get(port, "/healthz").await.map(|r| r.0), Some(200));
    let uuid = new_uuid();
    env.publish_job(&spec_issue_job(&uuid, "backend")).await;
    assert!(standin.wait_for_delivered(1, Duration::from_secs(30)).await);
    let metrics_ready = wait_until(Duration::from_secs(10), || async {
        http_get(port, "/metrics").await.is_some_and(|(_, body)| {
            body.contains(r#"opsgenie_jobs_total{outcome="delivered",reason=""} 1"#)
        })
    })
    .await;
    let (status, body) = http_get(port, "/metrics").await.expect("metrics");
    assert!(metrics_ready, "{body}");
    assert_eq!(status, 200);
    for needle in [
        r#"opsgenie_responses_total{status="202"} 1"#,
        "opsgenie_delivery_duration_seconds_count 1",
        "opsgenie_request_duration_seconds_bucket",
        "opsgenie_jobs_in_flight 0",
        "opsgenie_keyring_teams 1",
        "opsgenie_keyring_reloaded_timestamp_seconds",
    ] {
        assert!(
            body.contains(needle),
            "{needle} missing from /metrics:\n{body}"
        );
    }
    assert!(!body.contains("metrics-key-7f3a"));
    assert_eq!(
        worker.terminate(Duration::from_secs(30)).await.code(),
        Some(0)
    );
    assert!(!worker.raw_log().contains("metrics-key-7f3a"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_names_redis_when_it_is_unreachable() {
    let env = TestEnv::new("ops-ready").await;
    let _standin = env.standin().serving("backend", "k").await;
    let dead_redis = format!("redis://127.0.0.1:{}", free_port());
    let mut worker = env.worker().redis_url(&dead_redis).metrics().spawn();
    let port = worker.metrics_port();
    assert!(
        wait_until(Duration::from_secs(30), || async {
            matches!(http_get(port, "/healthz").await, Some((200, _)))
        })
        .await
    );
    // Consuming, but without Redis: alive, not ready, and saying why.
    assert!(
        wait_until(Duration::from_secs(30), || async {
            worker.logged("Consuming.")
        })
        .await
    );
    let (status, body) = http_get(port, "/readyz").await.expect("readyz");
    assert_eq!(status, 503);
    assert!(body.contains("Redis"), "{body}");
    assert_eq!(
        worker.terminate(Duration::from_secs(30)).await.code(),
        Some(0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_adds_a_team_and_a_broken_keyring_keeps_the_old_one() {
    let env = TestEnv::new("ops-hup").await;
    let standin = env.standin().await;
    let base = standin.base_url();
    env.team("backend").key("key-one").at(&base);
    let mut worker = env.worker().spawn();
    let first = new_uuid();
    env.publish_job(&spec_issue_job(&first, "payments")).await;
    assert!(
        wait_until(Duration::from_secs(30), || async {
            env.queue_len(&env.dead_queue()).await == 1
        })
        .await,
        "the unknown team's job was not dead-lettered: {}",
        worker.raw_log()
    );

    // A broken file: the old keyring stays, and the log says why.
    std::fs::write(env.keyring(), "[[team]]\nid = \"backend\"\n").unwrap();
    worker.signal("HUP");
    assert!(
        wait_until(Duration::from_secs(20), || async {
            worker.logged("Keyring reload failed; keeping the previous keyring.")
        })
        .await
    );
    let still = new_uuid();
    env.publish_job(&spec_issue_job(&still, "backend")).await;
    assert!(standin.wait_for_delivered(1, Duration::from_secs(30)).await);

    // The new team applies to the very next job.
    env.team("payments").key("key-two").at(&base);
    worker.signal("HUP");
    assert!(
        wait_until(Duration::from_secs(20), || async {
            worker
                .logs()
                .iter()
                .any(|l| l["message"] == "Keyring reloaded." && l["teams"] == "backend,payments")
        })
        .await
    );
    let second = new_uuid();
    env.publish_job(&spec_issue_job(&second, "payments")).await;
    assert!(standin.wait_for_delivered(2, Duration::from_secs(30)).await);
    assert_eq!(
        standin.requests()[1].authorization.as_deref(),
        Some("GenieKey key-two")
    );

    // The dead letter from before the reload: listed, replayed, delivered once.
    let (code, out, _) = env.command(&["dead", "list"], None);
    assert_eq!(code, 0);
    assert!(
        out.contains("unknown_team") && out.contains(&first),
        "{out}"
    );
    let (code, out, err) = env.command(&["dead", "replay"], None);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("Replayed 1 dead letter"), "{out}");
    assert!(standin.wait_for_delivered(3, Duration::from_secs(30)).await);
    let replayed: Vec<_> = standin
        .requests()
        .into_iter()
        .filter(|r| r.body.contains(&first))
        .collect();
    assert_eq!(replayed.len(), 1);
    assert_eq!(env.queue_len(&env.dead_queue()).await, 0);
    assert_eq!(
        worker.terminate(Duration::from_secs(30)).await.code(),
        Some(0)
    );
    let log = worker.raw_log();
    assert!(
        !log.contains("key-one") && !log.contains("key-two"),
        "a key is in the log"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_passes_on_a_good_setup_and_names_what_is_wrong_otherwise() {
    let env = TestEnv::new("ops-check").await;
    env.team("backend")
        .key("chk-s3cret")
        .at("http://127.0.0.1:1");
    let keyring = env.keyring();
    let keyring_arg = keyring.to_string_lossy().to_string();
    let redis = [
        "--redis-url",
        REDIS_URL,
        "--redis-prefix",
        env.prefix.as_str(),
    ];
    let mut args = vec!["check", "--keyring", keyring_arg.as_str()];
    args.extend(redis);
    let (code, out, err) = env.command(&args, None);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("ok: keyring") && out.contains("1 team: backend"),
        "{out}"
    );
    assert!(
        out.contains("ok: RabbitMQ at amqp://guest:***@127.0.0.1:5672"),
        "{out}"
    );
    assert!(out.contains("ok: Redis"), "{out}");
    assert!(!out.contains("chk-s3cret") && !err.contains("chk-s3cret"));

    // Unreachable Redis: exit 2 and the address.
    let dead_redis = format!("redis://127.0.0.1:{}", free_port());
    let (code, out, err) = env.command(
        &[
            "check",
            "--keyring",
            keyring_arg.as_str(),
            "--redis-url",
            dead_redis.as_str(),
        ],
        None,
    );
    assert_eq!(code, 2, "{out}{err}");
    assert!(err.contains(&dead_redis), "{err}");

    // A broken keyring: exit 2 with file, line and field, no key.
    std::fs::write(
        &keyring,
        "[[team]]\nid = \"backend\"\nintegration_key = \"chk-s3cret\"\nregion = \"moon\"\n",
    )
    .unwrap();
    let (code, out, err) = env.command(&["check", "--keyring", keyring_arg.as_str()], None);
    assert_eq!(code, 2);
    assert!(
        err.contains(&format!("{keyring_arg}:2")) && err.contains("region"),
        "{err}"
    );
    assert!(!out.contains("chk-s3cret") && !err.contains("chk-s3cret"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_names_an_unreachable_broker_without_its_password() {
    let env = TestEnv::new("ops-check-amqp").await;
    env.team("backend").key("k").at("http://127.0.0.1:1");
    let keyring = env.keyring();
    let url = format!("amqp://guest:hunter2pw@127.0.0.1:{}/%2f", free_port());
    let (code, _, err) = run_worker(
        &[
            "check",
            "--amqp-url",
            &url,
            "--keyring",
            keyring.to_str().expect("utf-8 path"),
        ],
        None,
    );
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("amqp://guest:***@127.0.0.1"), "{err}");
    assert!(!err.contains("hunter2pw"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_summary_line_counts_what_happened() {
    let env = TestEnv::new("ops-summary").await;
    let standin = env.standin().serving("backend", "k").await;
    let mut worker = env.worker().flag("--summary-interval", "1s").spawn();
    for _ in 0..3 {
        let uuid = new_uuid();
        env.publish_job(&spec_issue_job(&uuid, "backend")).await;
    }
    assert!(standin.wait_for_delivered(3, Duration::from_secs(30)).await);
    assert!(
        wait_until(Duration::from_secs(20), || async {
            let delivered: u64 = worker
                .logs()
                .iter()
                .filter(|l| l["message"] == "Summary.")
                .filter_map(|l| l["delivered"].as_u64())
                .sum();
            delivered == 3
        })
        .await,
        "{}",
        worker.raw_log()
    );
    assert_eq!(
        worker.terminate(Duration::from_secs(30)).await.code(),
        Some(0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quorum_queue_carries_jobs_and_retries() {
    let env = TestEnv::new("ops-quorum").await;
    // The harness declared classic queues; this test's queues are quorum ones, of another name.
    let queue = env.another_queue("q");
    let standin = env.standin().serving("backend", "k").await;
    standin.push_faults(vec![Fault::new(503).times(1)]).unwrap();
    let mut worker = env
        .worker()
        .flag("--queue", &queue)
        .flag("--queue-type", "quorum")
        .flag("--quick-tries", "1")
        .spawn();
    assert!(
        wait_until(Duration::from_secs(30), || async {
            worker.logged("Consuming.")
        })
        .await,
        "{}",
        worker.raw_log()
    );
    let listed = std::process::Command::new("rabbitmqctl")
        .args(["-q", "list_queues", "name", "type"])
        .output()
        .expect("rabbitmqctl");
    let listed = String::from_utf8_lossy(&listed.stdout);
    for name in [
        queue.clone(),
        format!("{queue}.dead"),
        format!("{queue}.retry.1s"),
    ] {
        assert!(
            listed
                .lines()
                .any(|l| l.split_whitespace().collect::<Vec<_>>() == [name.as_str(), "quorum"]),
            "{name} is not a quorum queue:\n{listed}"
        );
    }
    let uuid = new_uuid();
    env.publish_job(&spec_issue_job(&uuid, "backend")).await;
    // First answer 503: the job goes through the quorum delay queue and comes back.
    assert!(
        standin.wait_for_delivered(1, Duration::from_secs(30)).await,
        "{}",
        worker.raw_log()
    );
    assert!(
        wait_until(Duration::from_secs(10), || async {
            env.stream().await.len() == 1
        })
        .await
    );
    assert_eq!(env.stream().await[0]["attempts"], "2");
    assert_eq!(
        worker.terminate(Duration::from_secs(30)).await.code(),
        Some(0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_logs_on_request_and_no_password_in_any_line() {
    let env = TestEnv::new("ops-text").await;
    let standin = env.standin().serving("backend", "text-key-91c").await;
    let mut worker = env.worker().flag("--log-format", "text").spawn();
    let uuid = new_uuid();
    env.publish_job(&spec_issue_job(&uuid, "backend")).await;
    assert!(standin.wait_for_delivered(1, Duration::from_secs(30)).await);
    assert!(
        wait_until(Duration::from_secs(10), || async {
            worker.raw_log().contains("Job finished.")
        })
        .await
    );
    assert_eq!(
        worker.terminate(Duration::from_secs(30)).await.code(),
        Some(0)
    );
    let log = worker.raw_log();
    assert!(
        worker.logs().is_empty(),
        "text lines expected, found JSON:\n{log}"
    );
    assert!(
        log.contains(&format!("notification_uuid={uuid}"))
            || log.contains(&format!("notification_uuid=\"{uuid}\"")),
        "{log}"
    );
    assert!(log.contains("amqp://guest:***@"), "{log}");
    assert!(
        !log.contains("guest:guest") && !log.contains("text-key-91c"),
        "{log}"
    );
}

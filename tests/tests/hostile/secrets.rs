//! Secrets and key files that try to stop the worker or to leak: a key file that is a FIFO or
//! far too large never holds the worker on a keyring reload, and a password full of URL
//! delimiters shows in no log line, standard output or standard error.

use std::process::Command;
use std::time::{Duration, Instant};

use opsgenie_e2e::fixtures::*;
use opsgenie_e2e::*;

const RELOAD_FAILED: &str = "Keyring reload failed; keeping the previous keyring.";

/// The resident set of process `pid`, in KiB.
fn vm_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/<pid>/status")
}

/// The errors of the failed reloads logged so far.
fn reload_failures(worker: &WorkerProcess) -> Vec<String> {
    worker
        .logs()
        .into_iter()
        .filter(|l| l["message"] == RELOAD_FAILED)
        .map(|l| l["error"].as_str().unwrap_or_default().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fifo_key_file_neither_stops_deliveries_nor_shutdown() {
    let env = TestEnv::new("hostile-fifo").await;
    let standin = env.standin().serving("backend", "old-key-5e1").await;
    let mut worker = env.worker().ready().await;
    let port = worker.metrics_port();

    // Nobody ever writes to this pipe: reading it would wait for ever.
    let fifo = env.dir.join("backend.key");
    let made = Command::new("mkfifo").arg(&fifo).status().expect("mkfifo");
    assert!(made.success(), "mkfifo failed");
    env.team("backend")
        .key_file("backend.key")
        .served_by(&standin);
    worker.signal("HUP");
    assert!(
        wait_until(Duration::from_secs(20), || async {
            !reload_failures(&worker).is_empty()
        })
        .await,
        "no reload failure logged: {}",
        worker.raw_log()
    );
    let error = &reload_failures(&worker)[0];
    assert!(
        error.contains("backend.key") && error.contains("named pipe (FIFO)"),
        "{error}"
    );

    // Alive, and delivering with the keyring from before.
    assert_eq!(http_get(port, "/healthz").await.map(|r| r.0), Some(200));
    let uuid = new_uuid();
    env.publish_job(&spec_issue_job(&uuid, "backend")).await;
    assert!(
        standin.wait_for_delivered(1, Duration::from_secs(30)).await,
        "not delivered after the reload: {}",
        worker.raw_log()
    );
    assert_eq!(
        standin.requests()[0].authorization.as_deref(),
        Some("GenieKey old-key-5e1")
    );
    assert_eq!(http_get(port, "/healthz").await.map(|r| r.0), Some(200));

    let asked = Instant::now();
    assert_eq!(
        worker.terminate(Duration::from_secs(15)).await.code(),
        Some(0)
    );
    assert!(asked.elapsed() < Duration::from_secs(15));
    assert!(!worker.raw_log().contains("old-key-5e1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_key_file_is_refused_without_being_read() {
    let env = TestEnv::new("hostile-huge").await;
    let standin = env.standin().serving("backend", "old-key-b72").await;
    let mut worker = env.worker().spawn();
    assert!(
        wait_until(Duration::from_secs(30), || async {
            worker.logged("Consuming.")
        })
        .await,
        "{}",
        worker.raw_log()
    );
    let rss_before = vm_rss_kib(worker.pid());

    // 2 MB written out.
    std::fs::write(env.dir.join("big.key"), vec![b'k'; 2 * 1024 * 1024]).expect("big key");
    env.team("backend").key_file("big.key").served_by(&standin);
    worker.signal("HUP");
    assert!(
        wait_until(Duration::from_secs(20), || async {
            !reload_failures(&worker).is_empty()
        })
        .await,
        "no reload failure logged: {}",
        worker.raw_log()
    );
    let error = &reload_failures(&worker)[0];
    assert!(
        error.contains("big.key") && error.contains("larger than 64 KiB"),
        "{error}"
    );

    // 256 MB, sparse: free to make, and what a worker that read it whole would hold.
    std::fs::File::create(env.dir.join("huge.key"))
        .and_then(|f| f.set_len(256 * 1024 * 1024))
        .expect("huge key");
    env.team("backend").key_file("huge.key").served_by(&standin);
    worker.signal("HUP");
    assert!(
        wait_until(Duration::from_secs(20), || async {
            reload_failures(&worker).len() >= 2
        })
        .await,
        "no second reload failure logged: {}",
        worker.raw_log()
    );
    let error = &reload_failures(&worker)[1];
    assert!(
        error.contains("huge.key") && error.contains("larger than 64 KiB"),
        "{error}"
    );
    let rss_after = vm_rss_kib(worker.pid());
    assert!(
        rss_after < rss_before + 20 * 1024,
        "RSS went from {rss_before} KiB to {rss_after} KiB"
    );

    // The old keyring still serves.
    let uuid = new_uuid();
    env.publish_job(&spec_issue_job(&uuid, "backend")).await;
    assert!(standin.wait_for_delivered(1, Duration::from_secs(30)).await);
    assert_eq!(
        standin.requests()[0].authorization.as_deref(),
        Some("GenieKey old-key-b72")
    );
    assert_eq!(
        worker.terminate(Duration::from_secs(15)).await.code(),
        Some(0)
    );
}

/// A URL whose password holds `/`, `#` and `?` unencoded, and the pieces of it that must never
/// be printed.
struct HostileUrl {
    url: String,
    secrets: Vec<String>,
}

impl HostileUrl {
    /// `scheme://user:password@127.0.0.1:port/tail`, secrets: the password, every piece of it
    /// between delimiters, and `:piece` for a piece that a parser may take for a port.
    fn new(scheme: &str, user: &str, password: &str, port: u16, tail: &str) -> HostileUrl {
        let mut secrets = vec![password.to_string()];
        for piece in password.split(['/', '#', '?']).filter(|p| p.len() >= 4) {
            secrets.push(piece.to_string());
            if piece.parse::<u16>().is_ok() {
                secrets.push(format!(":{piece}"));
            }
        }
        HostileUrl {
            url: format!("{scheme}://{user}:{password}@127.0.0.1:{port}{tail}"),
            secrets,
        }
    }

    fn assert_absent(&self, text: &str, what: &str) {
        for secret in &self.secrets {
            assert!(
                !text.contains(secret.as_str()),
                "{what} shows {secret:?} of {}:\n{text}",
                self.url
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passwords_with_url_delimiters_are_never_printed() {
    let env = TestEnv::new("hostile-urls").await;
    env.team("backend").key("k").at("http://127.0.0.1:1");
    let keyring_arg = env.keyring().to_string_lossy().to_string();
    let (amqp_port, redis_port) = (free_port(), free_port());

    // Passwords that begin like a port: parsed as written, the user becomes the host and the
    // start of the password its port, and the connects fail (on closed ports).
    let amqp_as_port = HostileUrl::new(
        "amqp",
        "localhost",
        &format!("{}/Amq2vh#Amq3fr?Amq4qy", free_port()),
        amqp_port,
        "/%2f",
    );
    let redis_as_port = HostileUrl::new(
        "redis",
        "localhost",
        &format!("{}/0?Red3qy#Red4fr", free_port()),
        redis_port,
        "",
    );
    // Passwords that make the URLs unparseable.
    let amqp_broken = HostileUrl::new(
        "amqp",
        "guest",
        "Amq1pw/Amq2vh#Amq3fr?Amq4qy",
        amqp_port,
        "/%2f",
    );
    let redis_broken = HostileUrl::new("redis", "", "Red1pw/Red2db?Red3qy#Red4fr", redis_port, "");
    let every = [&amqp_as_port, &redis_as_port, &amqp_broken, &redis_broken];
    let assert_clean = |text: &str, what: &str| {
        for url in every {
            url.assert_absent(text, what);
        }
    };

    // A worker that runs, and keeps failing to connect.
    let mut worker = env
        .worker()
        .amqp_url(&amqp_as_port.url)
        .redis_url(&redis_as_port.url)
        .spawn();
    assert!(
        wait_until(Duration::from_secs(30), || async {
            worker
                .logs()
                .iter()
                .filter(|l| l["message"] == "Cannot consume from RabbitMQ; trying again.")
                .count()
                >= 2
        })
        .await,
        "{}",
        worker.raw_log()
    );
    let logs = worker.logs();
    let start = logs
        .iter()
        .find(|l| l["amqp_url"].is_string())
        .expect("a start-up line");
    assert_eq!(start["amqp_url"], "amqp://***", "{start}");
    assert_eq!(start["redis_url"], "redis://***", "{start}");
    assert_eq!(
        worker.terminate(Duration::from_secs(30)).await.code(),
        Some(0)
    );
    assert_clean(&worker.raw_log(), "the log of run");
    assert_clean(&worker.stdout(), "the standard output of run");

    // A worker that cannot start: its Redis URL does not parse.
    let mut worker = env
        .worker()
        .amqp_url(&amqp_broken.url)
        .redis_url(&redis_broken.url)
        .spawn();
    let status = worker
        .wait_exit(Duration::from_secs(30))
        .await
        .expect("a worker with a broken Redis URL exits");
    let log = worker.raw_log();
    assert_eq!(status.code(), Some(2), "{log}");
    assert!(log.contains("--redis-url redis://***"), "{log}");
    assert_clean(&log, "the log of run");
    assert_clean(&worker.stdout(), "the standard output of run");

    // `check`, with each broken pair, and with the real broker before a hostile Redis URL.
    for (amqp, redis, names) in [
        (
            amqp_as_port.url.as_str(),
            redis_as_port.url.as_str(),
            "RabbitMQ at amqp://***",
        ),
        (
            amqp_broken.url.as_str(),
            redis_broken.url.as_str(),
            "RabbitMQ at amqp://***",
        ),
        (AMQP_URL, redis_as_port.url.as_str(), "Redis at redis://***"),
        (AMQP_URL, redis_broken.url.as_str(), "Redis at redis://***"),
    ] {
        let (code, out, err) = env.command(
            &[
                "check",
                "--keyring",
                keyring_arg.as_str(),
                "--amqp-url",
                amqp,
                "--redis-url",
                redis,
                "--redis-prefix",
                env.prefix.as_str(),
            ],
            None,
        );
        assert_eq!(code, 2, "{out}{err}");
        assert!(err.contains(names), "{err}");
        assert_clean(&out, "the standard output of check");
        assert_clean(&err, "the standard error of check");
    }

    // Without `//`, lapin quotes the URL it cannot parse in its error.
    let opaque = HostileUrl {
        url: format!("amqp:guest:Amq1pw/Amq2vh@127.0.0.1:{amqp_port}/%2f"),
        secrets: vec!["Amq1pw".into(), "Amq2vh".into()],
    };
    for args in [
        vec![
            "check",
            "--keyring",
            keyring_arg.as_str(),
            "--amqp-url",
            opaque.url.as_str(),
        ],
        vec!["dead", "list", "--amqp-url", opaque.url.as_str()],
    ] {
        let (code, out, err) = env.command(&args, None);
        assert_ne!(code, 0, "{out}{err}");
        assert!(err.contains("amqp://***"), "{err}");
        opaque.assert_absent(&out, "standard output");
        opaque.assert_absent(&err, "standard error");
    }
}

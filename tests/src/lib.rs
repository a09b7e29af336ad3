//! The end-to-end harness: each test gets its own exchange, queues and Redis prefix on the
//! machine's RabbitMQ and Redis, an Opsgenie stand-in, and real `opsgenie-worker` processes.
//! Everything it creates is removed when the `TestEnv` is dropped, whether the test passed or
//! panicked.
//!
//! ```ignore
//! use opsgenie_e2e::fixtures::*;
//!
//! let env = TestEnv::new("issue").await;
//! let standin = env.standin().serving("backend", "key-a").await;
//! let mut worker = env.worker().flag("--prefetch", "8").spawn();
//! env.publish_job(&spec_issue_job(&new_uuid(), "backend")).await;
//! assert!(standin.wait_for_delivered(1, Duration::from_secs(30)).await);
//! worker.stop_cleanly(&["key-a"]).await;
//! ```
//!
//! `env.team(..)` and `env.heartbeat(..)` edit the test's keyring, `env.standin()` starts a
//! stand-in (`StandInBuilder`), `env.worker()` starts a worker (`WorkerBuilder`), and the job
//! bodies come from `fixtures`.

use std::collections::HashMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use fred::prelude::*;
use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, ExchangeDeleteOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use opsgenie_shared::retry::parse_duration;
pub use opsgenie_standin::{Fault, LocalPki, StandIn, StandInConfig, StandInTls};
use opsgenie_worker::broker::Topology;
use opsgenie_worker::cli::QueueType;

pub mod fixtures;
mod keyring;
pub mod proxy;
pub mod relay;
pub mod sentinel;
mod standin;
mod worker;

use fixtures::{issue_job, new_uuid};
pub use keyring::{Heartbeat, Team};
pub use standin::StandInBuilder;
pub use worker::{WorkerBuilder, WorkerProcess};

pub const AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
pub const REDIS_URL: &str = "redis://127.0.0.1:6379";

/// The delays the tests give the retry queues, so that a retry comes back within seconds.
pub const TEST_RETRY_DELAYS: &str = "1s,2s,3s";

/// Proxy variables as curl and reqwest read them, in both cases. None of them reaches a worker
/// unless a test passes it: the machine's own proxy settings must not decide a test.
pub const PROXY_VARS: [&str; 8] = [
    "HTTPS_PROXY",
    "https_proxy",
    "HTTP_PROXY",
    "http_proxy",
    "NO_PROXY",
    "no_proxy",
    "ALL_PROXY",
    "all_proxy",
];

/// How long the harness's own waits (a worker ready, stream entries, log lines, an exit after
/// SIGTERM) may take. Generous: the machine is small and shared, and a passing run never
/// waits this long.
pub const HARNESS_DEADLINE: Duration = Duration::from_secs(60);

/// `opsgenie-worker`, built beside this test binary (`target/<profile>/`).
pub fn worker_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("the test binary has a path");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("the test binary sits in target/<profile>/deps");
    let bin = dir.join("opsgenie-worker");
    assert!(
        bin.exists(),
        "{} is missing: run the tests with `cargo test --workspace`, which builds it",
        bin.display()
    );
    bin
}

/// Runs `opsgenie-worker` with exactly `args` (no names added), `RUST_LOG=warn`, and no
/// `WORKER_QUEUE` or `WORKER_EXCHANGE` from the environment; returns its exit code (-1 when
/// a signal ended it), standard output and standard error.
pub fn run_worker(args: &[&str], stdin: Option<&[u8]>) -> (i32, String, String) {
    let mut child = Command::new(worker_binary())
        .args(args)
        .env("RUST_LOG", "warn")
        .env_remove("WORKER_QUEUE")
        .env_remove("WORKER_EXCHANGE")
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start opsgenie-worker");
    if let Some(input) = stdin {
        use std::io::Write;
        let mut pipe = child.stdin.take().expect("stdin");
        pipe.write_all(input).expect("write stdin");
    }
    let out = child.wait_with_output().expect("wait");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// One test's isolated world.
pub struct TestEnv {
    pub name: String,
    pub exchange: String,
    pub queue: String,
    pub prefix: String,
    pub dir: PathBuf,
    pub connection: Connection,
    pub channel: Channel,
    pub redis: Client,
    keyring: Mutex<keyring::Keyring>,
    /// Queues and exchanges beyond the topology's, removed with it.
    extra_queues: Mutex<Vec<String>>,
    extra_exchanges: Mutex<Vec<String>>,
    /// The log of every worker started, for failure messages.
    worker_logs: Mutex<Vec<PathBuf>>,
    files: AtomicUsize,
}

impl TestEnv {
    /// Creates unique names from `name`, connects to RabbitMQ and Redis, declares the
    /// topology and writes an empty keyring.
    pub async fn new(name: &str) -> TestEnv {
        let id = format!(
            "{name}-{}",
            &uuid::Uuid::new_v4().simple().to_string()[..10]
        );
        let dir = std::env::temp_dir().join(format!("opsgenie-e2e-{id}"));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let _ = rustls::crypto::ring::default_provider().install_default();
        let connection = Connection::connect(AMQP_URL, ConnectionProperties::default())
            .await
            .expect("RabbitMQ at 127.0.0.1:5672 (start it with `rabbitmq-server -detached`)");
        let channel = connection.create_channel().await.expect("channel");
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .expect("confirms");
        let redis = Builder::from_config(Config::from_url(REDIS_URL).expect("url"))
            .build()
            .expect("redis client");
        redis
            .init()
            .await
            .expect("Redis at 127.0.0.1:6379 (start it with redis-server)");
        let env = TestEnv {
            exchange: format!("e2e.{id}"),
            queue: format!("e2e.{id}.alerts"),
            prefix: format!("e2e:{id}:"),
            name: id,
            dir,
            connection,
            channel,
            redis,
            keyring: Mutex::default(),
            extra_queues: Mutex::default(),
            extra_exchanges: Mutex::default(),
            worker_logs: Mutex::default(),
            files: AtomicUsize::new(0),
        };
        env.edit_keyring(|_| {});
        env.topology()
            .declare(&env.channel)
            .await
            .expect("declare the topology");
        env
    }

    /// The worker's own topology for this test's names, declared up front so that jobs
    /// published before a worker starts are kept.
    pub fn topology(&self) -> Topology {
        let delays: Vec<Duration> = TEST_RETRY_DELAYS
            .split(',')
            .map(|d| parse_duration(d).expect("test delay"))
            .collect();
        Topology {
            exchange: self.exchange.clone(),
            routing_key: "alert".into(),
            queue: self.queue.clone(),
            queue_type: QueueType::Classic,
            retry_queues: TEST_RETRY_DELAYS
                .split(',')
                .zip(delays)
                .map(|(name, d)| (format!("{}.retry.{name}", self.queue), d))
                .collect(),
            dead_queue: self.dead_queue(),
        }
    }

    pub fn dead_queue(&self) -> String {
        format!("{}.dead", self.queue)
    }

    /// A work queue name of this test's beside its own (`<queue>.<suffix>`), for a worker
    /// given `--queue`: it, its dead-letter queue and its delay queues are removed with the
    /// test's own.
    pub fn another_queue(&self, suffix: &str) -> String {
        let queue = format!("{}.{suffix}", self.queue);
        let mut extra = lock(&self.extra_queues);
        extra.push(format!("{queue}.dead"));
        for delay in TEST_RETRY_DELAYS.split(',') {
            extra.push(format!("{queue}.retry.{delay}"));
        }
        extra.push(queue.clone());
        queue
    }

    /// An exchange name of this test's beside its own (`<exchange>.<suffix>`), deleted with it.
    pub fn another_exchange(&self, suffix: &str) -> String {
        let exchange = format!("{}.{suffix}", self.exchange);
        lock(&self.extra_exchanges).push(exchange.clone());
        exchange
    }

    /// The arguments every command of this test shares: its exchange, queue and delays.
    pub fn broker_args(&self) -> Vec<String> {
        vec![
            "--amqp-url".into(),
            AMQP_URL.into(),
            "--exchange".into(),
            self.exchange.clone(),
            "--queue".into(),
            self.queue.clone(),
            "--retry-delays".into(),
            TEST_RETRY_DELAYS.into(),
        ]
    }

    /// Runs another `opsgenie-worker` command with this test's names (`run_worker`); returns
    /// its exit code, standard output and standard error.
    pub fn command(&self, args: &[&str], stdin: Option<&[u8]>) -> (i32, String, String) {
        let broker = self.broker_args();
        let broker: Vec<&str> = broker.iter().map(String::as_str).collect();
        // `dead list` and `dead replay`: the names go after the subcommand's own.
        let at = if args[0] == "dead" { 2 } else { 1 };
        let all: Vec<&str> = args[..at]
            .iter()
            .chain(&broker)
            .chain(&args[at..])
            .copied()
            .collect();
        run_worker(&all, stdin)
    }

    /// Writes `contents` to `name` in the test's directory and returns its path.
    pub fn write_file(&self, name: &str, contents: impl AsRef<[u8]>) -> PathBuf {
        let path = self.dir.join(name);
        std::fs::write(&path, contents).unwrap_or_else(|e| panic!("write {name}: {e}"));
        path
    }

    /// A file name in the test's directory no other caller got: `<stem>-<n>.<extension>`.
    pub(crate) fn new_file(&self, stem: &str, extension: &str) -> PathBuf {
        let n = self.files.fetch_add(1, Ordering::SeqCst);
        self.dir.join(format!("{stem}-{n}.{extension}"))
    }

    // -----------------------------------------------------------------------------------------
    // Stand-ins and workers

    /// A stand-in to start: `env.standin().serving("backend", "key-a").await`.
    pub fn standin(&self) -> StandInBuilder<'_> {
        StandInBuilder::new(self)
    }

    /// A worker to start with this test's names and keyring: `env.worker().spawn()`.
    pub fn worker(&self) -> WorkerBuilder<'_> {
        WorkerBuilder::new(self)
    }

    pub(crate) fn track_worker_log(&self, log: &Path) {
        lock(&self.worker_logs).push(log.to_owned());
    }

    /// The last `n` lines of every worker's log, for a failure message.
    pub fn worker_log_tails(&self, n: usize) -> String {
        lock(&self.worker_logs)
            .iter()
            .map(|log| {
                let text = std::fs::read_to_string(log).unwrap_or_default();
                format!("--- {}\n{}", log.display(), tail_lines(&text, n))
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    // -----------------------------------------------------------------------------------------
    // The broker

    /// Publishes a job to the exchange with routing key `alert`, persistent, JSON, confirmed.
    pub async fn publish(&self, body: &[u8]) {
        self.publish_with(body, BasicProperties::default()).await;
    }

    pub async fn publish_with(&self, body: &[u8], properties: BasicProperties) {
        let confirm = publish_job(&self.channel, &self.exchange, body, properties)
            .await
            .expect("publish")
            .await
            .expect("confirm");
        assert!(confirm.is_ack(), "the broker refused a job");
    }

    /// Publishes `job` as JSON (`publish`).
    pub async fn publish_job(&self, job: &serde_json::Value) {
        self.publish(job.to_string().as_bytes()).await;
    }

    /// Publishes an `issue_job` for `team` per group of `groups`, in order, each with a fresh
    /// uuid; returns (group, uuid) of each.
    pub async fn publish_issue_jobs(
        &self,
        team: &str,
        groups: impl IntoIterator<Item = i64>,
    ) -> Vec<(i64, String)> {
        let mut jobs = Vec::new();
        for group in groups {
            let uuid = new_uuid();
            self.publish_job(&issue_job(&uuid, team, group)).await;
            jobs.push((group, uuid));
        }
        jobs
    }

    /// `publish_issue_jobs`, answering only the uuids (in the order of `groups`).
    pub async fn publish_issue_uuids(
        &self,
        team: &str,
        groups: impl IntoIterator<Item = i64>,
    ) -> Vec<String> {
        let jobs = self.publish_issue_jobs(team, groups).await;
        jobs.into_iter().map(|(_, uuid)| uuid).collect()
    }

    /// Whether `queue` exists on the broker (asked with a passive declare).
    pub async fn queue_exists(&self, queue: &str) -> bool {
        self.declare_passive(queue).await.is_some()
    }

    /// Messages ready in `queue` (0 when it does not exist).
    pub async fn queue_len(&self, queue: &str) -> u32 {
        self.declare_passive(queue).await.unwrap_or(0)
    }

    /// The message count of `queue`; `None` when it does not exist.
    async fn declare_passive(&self, queue: &str) -> Option<u32> {
        // A channel of its own: a failed passive declare closes the channel it was sent on.
        let channel = self.connection.create_channel().await.expect("channel");
        let declared = channel
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await;
        let _ = channel.close(200, "".into()).await;
        declared.ok().map(|q| q.message_count())
    }

    /// Every queue of the test is empty (work, delay and dead-letter queues).
    pub async fn all_queues_empty(&self) -> bool {
        for q in self.topology().queue_names() {
            if self.queue_len(q).await > 0 {
                return false;
            }
        }
        true
    }

    // -----------------------------------------------------------------------------------------
    // The deliveries stream

    /// The delivery entries of the stream (`event` = `delivered`), oldest first, as field maps.
    pub async fn stream(&self) -> Vec<HashMap<String, String>> {
        self.stream_events()
            .await
            .into_iter()
            .filter(|fields| fields.get("event").is_none_or(|e| e == "delivered"))
            .collect()
    }

    /// Every entry of the stream, deliveries and the confirmations that follow them
    /// (`event` = `confirmed`, `failed_async` or `unconfirmed`), oldest first.
    pub async fn stream_events(&self) -> Vec<HashMap<String, String>> {
        let entries: Vec<(String, HashMap<String, String>)> = self
            .redis
            .xrange(format!("{}deliveries", self.prefix), "-", "+", None)
            .await
            .expect("xrange");
        entries.into_iter().map(|(_, fields)| fields).collect()
    }

    /// How many delivery entries each notification_uuid has.
    pub async fn stream_counts(&self) -> HashMap<String, usize> {
        let mut counts = HashMap::new();
        for entry in self.stream().await {
            *counts
                .entry(entry.get("notification_uuid").cloned().unwrap_or_default())
                .or_default() += 1;
        }
        counts
    }

    /// Waits until the stream holds at least `n` deliveries; fails with the workers' logs.
    pub async fn wait_for_stream_len(&self, n: usize) {
        assert!(
            wait_until(HARNESS_DEADLINE, || async {
                self.stream().await.len() >= n
            })
            .await,
            "expected {n} stream entries, found {}:\n{}",
            self.stream().await.len(),
            self.worker_log_tails(30)
        );
    }
}

/// A message taken from the dead-letter queue.
pub struct TakenDeadLetter {
    pub body: Vec<u8>,
    pub properties: BasicProperties,
    /// Every header, rendered as text.
    pub headers: HashMap<String, String>,
}

impl TestEnv {
    /// Takes (and acks) every message in this test's dead-letter queue, oldest first.
    pub async fn take_dead_letters(&self) -> Vec<TakenDeadLetter> {
        let mut taken = Vec::new();
        while let Some(message) = self
            .channel
            .basic_get(
                self.dead_queue().as_str().into(),
                lapin::options::BasicGetOptions { no_ack: true },
            )
            .await
            .expect("basic.get on the dead-letter queue")
        {
            let properties = message.delivery.properties.clone();
            let names: Vec<String> = properties
                .headers()
                .as_ref()
                .map(|h| h.inner().keys().map(|k| k.to_string()).collect())
                .unwrap_or_default();
            let headers = names
                .into_iter()
                .filter_map(|name| {
                    opsgenie_worker::broker::header_str(&properties, &name).map(|v| (name, v))
                })
                .collect();
            taken.push(TakenDeadLetter {
                body: message.delivery.data,
                properties,
                headers,
            });
        }
        taken
    }
}

/// Deletes the exchanges, the queues, the Redis keys and the directory the test made. On a
/// thread and a runtime of its own, with connections of its own: a drop cannot wait on the
/// test's runtime, which may have a single thread.
impl Drop for TestEnv {
    fn drop(&mut self) {
        let mut queues: Vec<String> = self
            .topology()
            .queue_names()
            .into_iter()
            .map(str::to_owned)
            .collect();
        queues.extend(lock(&self.extra_queues).drain(..));
        let mut exchanges = vec![self.exchange.clone()];
        exchanges.extend(lock(&self.extra_exchanges).drain(..));
        let pattern = format!("{}*", self.prefix);
        let removal = std::thread::spawn(move || {
            let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            runtime.block_on(async {
                let _ = tokio::time::timeout(
                    Duration::from_secs(20),
                    remove_from_servers(queues, exchanges, pattern),
                )
                .await;
            });
        });
        let _ = removal.join();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

async fn remove_from_servers(queues: Vec<String>, exchanges: Vec<String>, pattern: String) {
    if let Ok(connection) = Connection::connect(AMQP_URL, ConnectionProperties::default()).await
        && let Ok(channel) = connection.create_channel().await
    {
        for q in queues {
            let _ = channel
                .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                .await;
        }
        for e in exchanges {
            let _ = channel
                .exchange_delete(e.as_str().into(), ExchangeDeleteOptions::default())
                .await;
        }
        let _ = connection.close(200, "".into()).await;
    }
    let Ok(config) = Config::from_url(REDIS_URL) else {
        return;
    };
    let Ok(redis) = Builder::from_config(config).build() else {
        return;
    };
    if redis.init().await.is_ok() {
        let keys: Vec<String> = redis
            .custom(fred::cmd!("KEYS"), vec![pattern])
            .await
            .unwrap_or_default();
        if !keys.is_empty() {
            let _: Result<i64, _> = redis.del(keys).await;
        }
        let _ = redis.quit().await;
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The last `n` lines of `text`.
pub(crate) fn tail_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Polls `condition` every 20 ms until it holds or `deadline` passes; returns whether it held.
pub async fn wait_until<F, Fut>(deadline: Duration, mut condition: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let end = tokio::time::Instant::now() + deadline;
    loop {
        if condition().await {
            return true;
        }
        if tokio::time::Instant::now() > end {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Milliseconds since the epoch, as the worker writes `delivered_at_ms`.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_millis() as u64
}

/// GET `http://127.0.0.1:<port><path>` on a connection of its own (none kept for the next):
/// status and body; `None` while nothing answers, or nothing answers within 2 s.
pub async fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(2))
        .build()
        .ok()?;
    let response = client
        .get(format!("http://127.0.0.1:{port}{path}"))
        .send()
        .await
        .ok()?;
    let status = response.status().as_u16();
    let body = response.text().await.ok()?;
    Some((status, body))
}

/// A port nobody listens on right now, for a worker's metrics endpoint.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// Publishes `body` as a producer does: to `exchange` with routing key `alert`, persistent,
/// JSON, with `properties` besides. Answers the broker's confirm, to await.
pub async fn publish_job(
    channel: &lapin::Channel,
    exchange: &str,
    body: &[u8],
    properties: BasicProperties,
) -> lapin::Result<lapin::PublisherConfirm> {
    channel
        .basic_publish(
            exchange.into(),
            "alert".into(),
            BasicPublishOptions::default(),
            body,
            properties
                .with_delivery_mode(2)
                .with_content_type("application/json".into()),
        )
        .await
}

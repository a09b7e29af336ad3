//! The end-to-end harness: each test gets its own exchange, queues and Redis prefix on the
//! machine's RabbitMQ and Redis, an Opsgenie stand-in, and real `opsgenie-worker` processes.
//! Everything it creates is removed when the `TestEnv` is dropped, whether the test passed or
//! panicked.

use std::collections::HashMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
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
pub use opsgenie_standin::{Fault, StandIn, StandInConfig};
use opsgenie_worker::amqp::Topology;
use opsgenie_worker::config::QueueType;

pub const AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
pub const REDIS_URL: &str = "redis://127.0.0.1:6379";

/// The delays the tests give the retry queues, so that a retry comes back within seconds.
pub const TEST_RETRY_DELAYS: &str = "1s,2s,3s";

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

/// A team in the keyring the test writes.
pub struct TeamSpec<'a> {
    pub id: &'a str,
    pub key: &'a str,
    pub api_url: &'a str,
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
    /// Queues and exchanges beyond the topology's, removed with it.
    extra_queues: Mutex<Vec<String>>,
    extra_exchanges: Mutex<Vec<String>>,
}

impl TestEnv {
    /// Creates unique names from `name` and connects to RabbitMQ and Redis.
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
            extra_queues: Mutex::default(),
            extra_exchanges: Mutex::default(),
        };
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

    /// Writes `keyring.toml` in the test's directory and returns its path.
    pub fn write_keyring(&self, teams: &[TeamSpec<'_>]) -> PathBuf {
        let mut text = String::new();
        for t in teams {
            text.push_str(&format!(
                "[[team]]\nid = \"{}\"\nintegration_key = \"{}\"\napi_url = \"{}\"\n\n",
                t.id, t.key, t.api_url
            ));
        }
        let path = self.dir.join("keyring.toml");
        std::fs::write(&path, text).expect("write keyring");
        path
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

    /// Starts `opsgenie-worker run` with this test's names, JSON logs to a file, no metrics
    /// endpoint unless `extra` asks for one, and `extra` flags last.
    pub fn spawn_worker(&self, keyring: &Path, extra: &[&str]) -> WorkerProcess {
        self.spawn_worker_via(keyring, AMQP_URL, REDIS_URL, extra)
    }

    /// Runs another `opsgenie-worker` command with this test's names; returns its exit code,
    /// standard output and standard error.
    pub fn command(&self, args: &[&str], stdin: Option<&[u8]>) -> (i32, String, String) {
        let mut cmd = Command::new(worker_binary());
        cmd.arg(args[0]);
        if args[0] == "dead" {
            cmd.arg(args[1]).args(self.broker_args()).args(&args[2..]);
        } else {
            cmd.args(self.broker_args()).args(&args[1..]);
        }
        cmd.env("RUST_LOG", "warn")
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("start opsgenie-worker");
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

    /// Messages ready in `queue` (0 when it does not exist).
    pub async fn queue_len(&self, queue: &str) -> u32 {
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
        declared.map(|q| q.message_count()).unwrap_or(0)
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

/// A running `opsgenie-worker run`; killed when dropped.
pub struct WorkerProcess {
    pub child: Child,
    pub log: PathBuf,
}

impl WorkerProcess {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args([format!("-{name}"), self.pid().to_string()])
            .status()
            .expect("kill");
        assert!(status.success(), "kill -{name} failed");
    }

    /// Sends SIGTERM and waits (up to `deadline`) for the exit status.
    pub async fn terminate(&mut self, deadline: Duration) -> ExitStatus {
        self.signal("TERM");
        self.wait_exit(deadline)
            .await
            .expect("the worker did not exit after SIGTERM")
    }

    /// Waits for the process to exit by itself.
    pub async fn wait_exit(&mut self, deadline: Duration) -> Option<ExitStatus> {
        let end = tokio::time::Instant::now() + deadline;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            if tokio::time::Instant::now() > end {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The log lines written so far, parsed (lines that are not JSON are skipped).
    pub fn logs(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    pub fn raw_log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The "Job finished." lines.
    pub fn job_lines(&self) -> Vec<serde_json::Value> {
        self.logs()
            .into_iter()
            .filter(|l| l["message"] == "Job finished.")
            .collect()
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
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

// ---------------------------------------------------------------------------------------------
// Stand-ins and dead letters shared by the delivery-pipeline suites (`delivery`, `enqueue`).
// Kept apart from the harness above so that each suite can grow its own block. The jobs they
// publish are in `fixtures`.

pub mod fixtures;

/// A stand-in that accepts only `key`, and a keyring in which `team` is served by it.
pub async fn standin_for_team(env: &TestEnv, team: &str, key: &str) -> (StandIn, PathBuf) {
    let standin = StandIn::start(StandInConfig {
        keys: vec![key.to_owned()],
        ..StandInConfig::default()
    })
    .await
    .expect("start the stand-in");
    let keyring = env.write_keyring(&[TeamSpec {
        id: team,
        key,
        api_url: &standin.base_url(),
    }]);
    (standin, keyring)
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

impl TestEnv {
    /// Starts a worker with a metrics endpoint on a port of its own (and `extra` flags), and
    /// waits until its `/readyz` answers 200: consuming, with Redis reachable.
    pub async fn spawn_ready_worker(&self, keyring: &Path, extra: &[&str]) -> (WorkerProcess, u16) {
        let port = free_port();
        let addr = format!("127.0.0.1:{port}");
        let mut flags = vec!["--metrics-addr", addr.as_str()];
        flags.extend_from_slice(extra);
        let worker = self.spawn_worker(keyring, &flags);
        assert!(
            wait_until(Duration::from_secs(30), || async {
                matches!(http_get(port, "/readyz").await, Some((200, _)))
            })
            .await,
            "never ready: {}",
            worker.raw_log()
        );
        (worker, port)
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
                    opsgenie_worker::amqp::header_str(&properties, &name).map(|v| (name, v))
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

// ---------------------------------------------------------------------------------------------
// Fault injection (`faults`): a relay to stage outages of RabbitMQ or Redis for one worker,
// and a way to start a worker that reaches them through it.

pub mod relay;

impl TestEnv {
    /// Like `spawn_worker`, but the worker reaches RabbitMQ at `amqp_url` and Redis at
    /// `redis_url` (a `relay::Relay` in front of the real ones, for example).
    pub fn spawn_worker_via(
        &self,
        keyring: &Path,
        amqp_url: &str,
        redis_url: &str,
        extra: &[&str],
    ) -> WorkerProcess {
        self.spawn_worker_via_with_env(keyring, amqp_url, redis_url, extra, &[])
    }
}

// ---------------------------------------------------------------------------------------------
// Transport (`transport`): TLS stand-ins with a private CA, teams with a `ca_file`, an egress
// proxy, and workers started with proxy variables of the test's choosing.

pub mod proxy;

pub use opsgenie_standin::{LocalPki, StandInTls};

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

impl TestEnv {
    /// Like `spawn_worker`, with `env` set in the worker's environment (after the proxy
    /// variables of `PROXY_VARS` are removed from it).
    pub fn spawn_worker_with_env(
        &self,
        keyring: &Path,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> WorkerProcess {
        self.spawn_worker_via_with_env(keyring, AMQP_URL, REDIS_URL, extra, env)
    }

    /// `spawn_worker_via` with `env` set in the worker's environment; the variables of
    /// `PROXY_VARS` are removed from it first.
    pub fn spawn_worker_via_with_env(
        &self,
        keyring: &Path,
        amqp_url: &str,
        redis_url: &str,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> WorkerProcess {
        let n = std::fs::read_dir(&self.dir).map(|d| d.count()).unwrap_or(0);
        let log = self.dir.join(format!("worker-{n}.log"));
        let mut broker = self.broker_args();
        if let Some(at) = broker.iter().position(|a| a == "--amqp-url") {
            broker[at + 1] = amqp_url.to_owned();
        }
        let mut cmd = Command::new(worker_binary());
        cmd.arg("run")
            .args(broker)
            .args(["--redis-url", redis_url, "--redis-prefix", &self.prefix])
            .arg("--keyring")
            .arg(keyring)
            .args(["--log-format", "json"]);
        if !extra.contains(&"--metrics-addr") {
            cmd.args(["--metrics-addr", "off"]);
        }
        for var in PROXY_VARS {
            cmd.env_remove(var);
        }
        cmd.args(extra)
            .env("RUST_LOG", "info")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log file"));
        let child = cmd.spawn().expect("start opsgenie-worker");
        WorkerProcess { child, log }
    }

    /// Writes `name` (a CA certificate, PEM) in the test's directory and returns its path.
    pub fn write_pem(&self, name: &str, pem: &str) -> PathBuf {
        let path = self.dir.join(name);
        std::fs::write(&path, pem).expect("write PEM");
        path
    }

    /// Like `write_keyring`, with a `ca_file` line for each team that has one.
    pub fn write_keyring_with_ca_files(&self, teams: &[(TeamSpec<'_>, Option<&Path>)]) -> PathBuf {
        let quoted = |s: &str| serde_json::to_string(s).expect("a string serializes");
        let mut text = String::new();
        for (t, ca_file) in teams {
            text.push_str(&format!(
                "[[team]]\nid = {}\nintegration_key = {}\napi_url = {}\n",
                quoted(t.id),
                quoted(t.key),
                quoted(t.api_url)
            ));
            if let Some(ca_file) = ca_file {
                let ca_file = ca_file.to_str().expect("a UTF-8 temp path");
                text.push_str(&format!("ca_file = {}\n", quoted(ca_file)));
            }
            text.push('\n');
        }
        let path = self.dir.join("keyring.toml");
        std::fs::write(&path, text).expect("write keyring");
        path
    }
}

/// A TLS stand-in (certificate from a fresh private CA) started with `config`, which accepts
/// only `key`, and a keyring in which `team` is served by it: with the CA as its `ca_file`
/// when `trust_ca`, without any `ca_file` otherwise.
pub async fn tls_standin_for_team(
    env: &TestEnv,
    team: &str,
    key: &str,
    config: StandInConfig,
    trust_ca: bool,
) -> (StandIn, PathBuf) {
    let pki = LocalPki::generate().expect("a private CA");
    let standin = StandIn::start(StandInConfig {
        keys: vec![key.to_owned()],
        tls: Some(pki.server.clone()),
        ..config
    })
    .await
    .expect("start the TLS stand-in");
    let ca_file = env.write_pem("ca.pem", &pki.ca_pem);
    let keyring = env.write_keyring_with_ca_files(&[(
        TeamSpec {
            id: team,
            key,
            api_url: &standin.base_url(),
        },
        trust_ca.then_some(ca_file.as_path()),
    )]);
    (standin, keyring)
}

/// The last `n` lines of a worker's log, for a failure message.
pub fn log_tail(worker: &WorkerProcess, n: usize) -> String {
    let log = worker.raw_log();
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

// ---------------------------------------------------------------------------------------------
// Redis behind Sentinel (`sentinel`): a primary, a replica and three Sentinels of the test's own.

pub mod sentinel;

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

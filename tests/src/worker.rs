//! `opsgenie-worker run` processes: how a test starts one (`WorkerBuilder`, from
//! `TestEnv::worker`) and what it reads of one (`WorkerProcess`).

use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use crate::{
    AMQP_URL, HARNESS_DEADLINE, PROXY_VARS, REDIS_URL, TestEnv, free_port, http_get, tail_lines,
    worker_binary,
};

/// A worker to start: the test's names, keyring and Redis prefix, JSON logs to a file, no
/// metrics endpoint unless asked for, none of the machine's proxy variables.
///
/// ```ignore
/// let mut worker = env.worker().flag("--prefetch", "8").spawn();
/// let worker = env.worker().redis_url(&relay.redis_url()).env("HTTPS_PROXY", &url).ready().await;
/// ```
pub struct WorkerBuilder<'e> {
    env: &'e TestEnv,
    amqp_url: String,
    redis_url: String,
    args: Vec<String>,
    vars: Vec<(String, String)>,
    metrics: bool,
}

impl<'e> WorkerBuilder<'e> {
    pub(crate) fn new(env: &'e TestEnv) -> Self {
        WorkerBuilder {
            env,
            amqp_url: AMQP_URL.to_owned(),
            redis_url: REDIS_URL.to_owned(),
            args: Vec::new(),
            vars: Vec::new(),
            metrics: false,
        }
    }

    /// `name value` on the command line, after the harness's own flags (so it wins over them).
    pub fn flag(mut self, name: &str, value: &str) -> Self {
        self.args.extend([name.to_owned(), value.to_owned()]);
        self
    }

    /// Several flags and their values at once, as written on a command line.
    pub fn flags(mut self, args: &[&str]) -> Self {
        self.args.extend(args.iter().map(|a| (*a).to_owned()));
        self
    }

    /// `name=value` in the worker's environment.
    pub fn env(mut self, name: &str, value: &str) -> Self {
        self.vars.push((name.to_owned(), value.to_owned()));
        self
    }

    /// The broker URL(s) instead of the machine's broker (a `Relay`, a cluster).
    pub fn amqp_url(mut self, url: &str) -> Self {
        self.amqp_url = url.to_owned();
        self
    }

    /// The Redis URL instead of the machine's Redis (a `Relay`, a Sentinel set).
    pub fn redis_url(mut self, url: &str) -> Self {
        self.redis_url = url.to_owned();
        self
    }

    /// A metrics endpoint on a free port of its own (`WorkerProcess::metrics_port`).
    pub fn metrics(mut self) -> Self {
        self.metrics = true;
        self
    }

    /// Starts the worker; its standard error is the log, its standard output a file beside it.
    pub fn spawn(self) -> WorkerProcess {
        let env = self.env;
        let log = env.new_file("worker", "log");
        let stdout = log.with_extension("stdout");
        let mut broker = env.broker_args();
        if let Some(at) = broker.iter().position(|a| a == "--amqp-url") {
            broker[at + 1] = self.amqp_url;
        }
        let mut cmd = Command::new(worker_binary());
        cmd.arg("run")
            .args(broker)
            .args([
                "--redis-url",
                &self.redis_url,
                "--redis-prefix",
                &env.prefix,
            ])
            .arg("--keyring")
            .arg(env.keyring())
            .args(["--log-format", "json"]);
        let metrics_port = self.metrics.then(free_port);
        match metrics_port {
            Some(port) => cmd.args(["--metrics-addr", &format!("127.0.0.1:{port}")]),
            None if !self.args.iter().any(|a| a == "--metrics-addr") => {
                cmd.args(["--metrics-addr", "off"])
            }
            None => &mut cmd,
        };
        for var in PROXY_VARS {
            cmd.env_remove(var);
        }
        cmd.args(&self.args)
            .env("RUST_LOG", "info")
            .envs(self.vars)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&stdout).expect("stdout file"))
            .stderr(std::fs::File::create(&log).expect("log file"));
        let child = cmd.spawn().expect("start opsgenie-worker");
        env.track_worker_log(&log);
        WorkerProcess {
            child,
            log,
            stdout,
            metrics_port,
        }
    }

    /// Starts the worker with a metrics endpoint and waits until its `/readyz` answers 200
    /// (consuming, with Redis reachable); fails at once, with its log, if it exits instead.
    pub async fn ready(self) -> WorkerProcess {
        let mut worker = self.metrics().spawn();
        let port = worker.metrics_port();
        let end = tokio::time::Instant::now() + HARNESS_DEADLINE;
        loop {
            if let Ok(Some(status)) = worker.child.try_wait() {
                panic!("the worker exited ({status}):\n{}", worker.log_tail(30));
            }
            if matches!(http_get(port, "/readyz").await, Some((200, _))) {
                return worker;
            }
            assert!(
                tokio::time::Instant::now() < end,
                "never ready:\n{}",
                worker.log_tail(30)
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// A running `opsgenie-worker run`; killed when dropped.
pub struct WorkerProcess {
    pub child: Child,
    pub log: PathBuf,
    stdout: PathBuf,
    metrics_port: Option<u16>,
}

impl WorkerProcess {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The port of its metrics endpoint (started with `metrics` or `ready`).
    pub fn metrics_port(&self) -> u16 {
        self.metrics_port
            .expect("a worker started with a metrics endpoint (`metrics()` or `ready()`)")
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

    /// SIGTERM, and the worker must exit with code 0.
    pub async fn stop(&mut self) {
        let status = self.terminate(HARNESS_DEADLINE).await;
        assert_eq!(
            status.code(),
            Some(0),
            "exit status after SIGTERM:\n{}",
            self.log_tail(40)
        );
    }

    /// `stop`, and none of `keys` may appear in the log.
    pub async fn stop_cleanly(&mut self, keys: &[&str]) {
        self.stop().await;
        let log = self.raw_log();
        for key in keys {
            assert!(!log.contains(key), "the key {key} appears in the log");
        }
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
        self.raw_log()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    pub fn raw_log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The last `n` lines of the log, for a failure message.
    pub fn log_tail(&self, n: usize) -> String {
        tail_lines(&self.raw_log(), n)
    }

    /// What it wrote to its standard output so far.
    pub fn stdout(&self) -> String {
        std::fs::read_to_string(&self.stdout).unwrap_or_default()
    }

    /// Whether a log line so far has `message`.
    pub fn logged(&self, message: &str) -> bool {
        self.logs().iter().any(|l| l["message"] == message)
    }

    /// The "Job finished." lines.
    pub fn job_lines(&self) -> Vec<serde_json::Value> {
        self.logs()
            .into_iter()
            .filter(|l| l["message"] == "Job finished.")
            .collect()
    }

    /// The "Job finished." lines of the job `uuid`.
    pub fn job_lines_for(&self, uuid: &str) -> Vec<serde_json::Value> {
        self.job_lines()
            .into_iter()
            .filter(|l| l["notification_uuid"] == uuid)
            .collect()
    }

    /// Waits until at least `n` "Job finished." lines are written.
    pub async fn wait_for_job_lines(&self, n: usize) {
        assert!(
            crate::wait_until(HARNESS_DEADLINE, || async { self.job_lines().len() >= n }).await,
            "expected {n} job lines:\n{}",
            self.raw_log()
        );
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

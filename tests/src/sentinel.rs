//! A Redis primary, one replica and three Sentinels on this machine, on ports and in a
//! directory of their own (the machine's Redis on 6379 is never touched), for the failover
//! test. Every process is killed and the directory removed when the `SentinelSet` is dropped,
//! whatever the test did.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::{free_port, wait_until};

/// Sentinel's failure detection, short so that a failover takes seconds.
const DOWN_AFTER_MS: u32 = 1000;
/// How long a failover may take before Sentinel tries another.
const FAILOVER_TIMEOUT_MS: u32 = 5000;

/// One `redis-server` process, a server or a Sentinel.
struct Node {
    port: u16,
    child: Option<Child>,
}

impl Node {
    /// SIGKILL: no shutdown, no last write, no goodbye to the replicas.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The processes, and where they keep their files.
pub struct SentinelSet {
    /// The service name Sentinel monitors.
    pub service: String,
    dir: PathBuf,
    /// `servers[0]` starts as the primary, `servers[1]` as its replica.
    servers: Vec<Node>,
    sentinels: Vec<Node>,
}

impl SentinelSet {
    /// Starts the primary, its replica and three Sentinels under `parent`, and waits until
    /// every Sentinel knows the replica and the two other Sentinels (a failover needs both).
    ///
    /// Panics when a process does not start or the set is not formed within 60 s.
    pub async fn start(parent: &Path) -> SentinelSet {
        let dir = parent.join("sentinel-set");
        std::fs::create_dir_all(&dir).expect("sentinel set dir");
        let service = format!("e2e-{:08x}", rand::random::<u32>());
        let mut set = SentinelSet {
            service,
            dir,
            servers: Vec::new(),
            sentinels: Vec::new(),
        };
        let primary = free_port();
        set.servers.push(set.start_server(primary, None));
        let replica = free_port();
        set.servers.push(set.start_server(replica, Some(primary)));
        for _ in 0..3 {
            let port = free_port();
            let node = set.start_sentinel(port, primary);
            set.sentinels.push(node);
        }
        let formed = wait_until(Duration::from_secs(60), || async {
            set.replica_link_up(replica)
                && set.sentinels.iter().all(|s| {
                    let master = sentinel_master(s.port, &set.service);
                    field(&master, "num-slaves") == Some("1")
                        && field(&master, "num-other-sentinels") == Some("2")
                })
        })
        .await;
        assert!(formed, "the Sentinel set did not form: {}", set.logs());
        set
    }

    /// `redis-server` on `port`, a replica of `primary` when given. No persistence: a killed
    /// node comes back empty, as the worst case of a lost disk.
    fn start_server(&self, port: u16, primary: Option<u16>) -> Node {
        let mut cmd = Command::new("redis-server");
        cmd.args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--protected-mode", "no"])
            // A replica that (re)joins is synced at once, not after the default 5 s.
            .args([
                "--repl-diskless-sync",
                "yes",
                "--repl-diskless-sync-delay",
                "0",
            ])
            .arg("--dir")
            .arg(&self.dir)
            .arg("--logfile")
            .arg(self.dir.join(format!("redis-{port}.log")));
        if let Some(primary) = primary {
            cmd.args(["--replicaof", "127.0.0.1", &primary.to_string()]);
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server");
        Node {
            port,
            child: Some(child),
        }
    }

    fn start_sentinel(&self, port: u16, primary: u16) -> Node {
        let name = &self.service;
        let conf = self.dir.join(format!("sentinel-{port}.conf"));
        // Sentinel rewrites its configuration file as it learns: it must be writable.
        std::fs::write(
            &conf,
            format!(
                "port {port}\nbind 127.0.0.1\nprotected-mode no\ndir {dir}\nlogfile {dir}/sentinel-{port}.log\n\
                 sentinel monitor {name} 127.0.0.1 {primary} 2\n\
                 sentinel down-after-milliseconds {name} {DOWN_AFTER_MS}\n\
                 sentinel failover-timeout {name} {FAILOVER_TIMEOUT_MS}\n\
                 sentinel parallel-syncs {name} 1\n",
                dir = self.dir.display(),
            ),
        )
        .expect("write the sentinel configuration");
        // `redis-server --sentinel`: the same binary, where no `redis-sentinel` link is installed.
        let child = Command::new("redis-server")
            .arg(&conf)
            .arg("--sentinel")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server --sentinel");
        Node {
            port,
            child: Some(child),
        }
    }

    /// The URL the worker is given: every Sentinel, the service name, database 0.
    pub fn url(&self) -> String {
        let mut url = format!(
            "redis-sentinel://127.0.0.1:{}/0?sentinelServiceName={}",
            self.sentinels[0].port, self.service
        );
        for s in &self.sentinels[1..] {
            url.push_str(&format!("&node=127.0.0.1:{}", s.port));
        }
        url
    }

    /// The port of the server that starts as the primary.
    pub fn first_primary(&self) -> u16 {
        self.servers[0].port
    }

    /// The port of the server that starts as its replica.
    pub fn first_replica(&self) -> u16 {
        self.servers[1].port
    }

    /// SIGKILL to the server on `port`.
    pub fn kill_server(&mut self, port: u16) {
        if let Some(node) = self.servers.iter_mut().find(|n| n.port == port) {
            node.kill();
        }
    }

    /// Starts the server on `port` again (killed before), empty and on its own: Sentinel
    /// finds it and makes it a replica of whichever server is the primary now.
    pub fn restart_server(&mut self, port: u16) {
        let node = self.start_server(port, None);
        if let Some(slot) = self.servers.iter_mut().find(|n| n.port == port) {
            *slot = node;
        }
    }

    /// The primary's port as the Sentinels agree on it: `None` until a majority (two of the
    /// three) names the same one.
    pub fn primary_by_sentinels(&self) -> Option<u16> {
        let named: Vec<u16> = self
            .sentinels
            .iter()
            .filter_map(|s| {
                let out = redis_cli(
                    s.port,
                    &["SENTINEL", "get-master-addr-by-name", &self.service],
                )?;
                out.lines().nth(1)?.trim().parse().ok()
            })
            .collect();
        named
            .iter()
            .copied()
            .find(|p| named.iter().filter(|q| *q == p).count() >= 2)
    }

    /// `INFO replication` of the server on `port`, as `field:value` lines.
    pub fn replication_info(&self, port: u16) -> String {
        redis_cli(port, &["INFO", "replication"]).unwrap_or_default()
    }

    /// Whether the server on `port` is a replica whose link to its primary is up.
    pub fn replica_link_up(&self, port: u16) -> bool {
        let info = self.replication_info(port);
        info.lines().any(|l| l.trim() == "role:slave")
            && info.lines().any(|l| l.trim() == "master_link_status:up")
    }

    /// The last lines of every log of the set, for a failure message.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        let mut paths: Vec<PathBuf> = std::fs::read_dir(&self.dir)
            .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
            .unwrap_or_default();
        paths.sort();
        for path in paths
            .iter()
            .filter(|p| p.extension().is_some_and(|e| e == "log"))
        {
            let text = std::fs::read_to_string(path).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            out.push_str(&format!(
                "\n--- {}\n{}",
                path.display(),
                lines[lines.len().saturating_sub(15)..].join("\n")
            ));
        }
        out
    }
}

impl Drop for SentinelSet {
    fn drop(&mut self) {
        // Sentinels first, so that none of them starts a failover while the servers go.
        for node in self.sentinels.iter_mut().chain(self.servers.iter_mut()) {
            node.kill();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `redis-cli -p <port> <args>`: its standard output, or `None` when it fails.
fn redis_cli(port: u16, args: &[&str]) -> Option<String> {
    let out = Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `SENTINEL master <service>` as redis-cli prints it: a name line, then its value line.
fn sentinel_master(port: u16, service: &str) -> Vec<String> {
    redis_cli(port, &["SENTINEL", "master", service])
        .unwrap_or_default()
        .lines()
        .map(|l| l.trim().to_owned())
        .collect()
}

fn field<'a>(pairs: &'a [String], name: &str) -> Option<&'a str> {
    pairs
        .chunks(2)
        .find(|pair| pair[0] == name)
        .and_then(|pair| pair.get(1))
        .map(String::as_str)
}

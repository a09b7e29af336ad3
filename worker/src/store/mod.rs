//! The Redis boundary (docs/contract.md section 7): the checks before a request (already
//! delivered? a stale incident status? another replica on this incident?) and the atomic
//! record after it, the pending confirmations, the fleet's cooldowns and heartbeat turns.
//! Each write is one Lua script, so one round trip and no half-written state. The scripts
//! live in `store/scripts/*.lua`, each with its KEYS/ARGV contract and answers at its top,
//! and every one runs the same way: by its digest, loaded again when Redis answers NOSCRIPT
//! (after a restart Redis has forgotten them; a script it did not know did not run, so
//! running it is safe).
//!
//! One file per concept: `keys.rs` names every key; `admission.rs` the pre-send check and
//! the poison counters; `records.rs` the record of a delivery; `steps.rs` the script call both
//! share, batched by `batch.rs`; `pending.rs` the pending confirmation's hash and
//! `confirmations.rs` its claim, read and settle; `cooldown.rs`, `heartbeat_turn.rs`;
//! `replication.rs` the `--redis-replicas` check; `error.rs` what can fail.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use fred::prelude::*;
use fred::types::scripts::Script;

use crate::support::pacing::Pacing;

mod admission;
mod batch;
mod confirmations;
mod cooldown;
mod error;
mod heartbeat_turn;
mod keys;
mod pending;
mod records;
mod replication;
mod steps;

pub(crate) use admission::Admission;
pub(crate) use confirmations::{Settle, Settled, Settlement};
pub(crate) use error::StoreError;
pub(crate) use keys::JobKeys;
pub(crate) use pending::{Pending, PendingConfirmation};
pub(crate) use records::Fields;

/// Keys and limits, from the command line.
#[derive(Debug, Clone)]
pub(crate) struct StoreSettings {
    pub(crate) prefix: String,
    pub(crate) stream_maxlen: u64,
    pub(crate) dedupe_ttl: Duration,
    /// How long an incident's lease lasts if its holder dies without releasing it.
    pub(crate) lease_ttl: Duration,
}

/// The scripts the store runs, by their digest.
#[derive(Clone)]
struct Scripts {
    steps: Script,
    release: Script,
    cool_down: Script,
    attempt_started: Script,
    confirm_claim: Script,
    confirm_settle: Script,
    confirm_read: Script,
}

/// The Redis client with the scripts it runs. Public because public items of the job and
/// heartbeat modules hold one.
#[derive(Clone)]
pub struct Store {
    client: Client,
    keys: Arc<keys::Keys>,
    /// The script arguments that are the same for every job, written once at start-up.
    fixed: Arc<steps::FixedArgs>,
    scripts: Scripts,
    /// The batching task of the admission checks and records.
    steps: batch::Batcher<steps::Steps>,
    /// Set by `quit`, so that `start`'s connect loop does not bring back a client that was
    /// shut down on purpose.
    quitting: Arc<AtomicBool>,
    /// `--redis-replicas`: the replicas a record must reach before the job is acked.
    replication: replication::Replication,
}

impl Store {
    /// Builds the client; it connects in the background and keeps reconnecting.
    ///
    /// Fails only when the URL cannot be used.
    pub(crate) fn new(url: &str, settings: StoreSettings) -> Result<Store, StoreError> {
        check_url(url)?;
        let config = Config::from_url(url)?;
        let client = Builder::from_config(config)
            .with_connection_config(|c| {
                c.connection_timeout = Duration::from_secs(5);
                c.internal_command_timeout = Duration::from_secs(5);
                c.max_command_attempts = 2;
            })
            .with_performance_config(|p| {
                p.default_command_timeout = Duration::from_secs(5);
            })
            .set_policy(ReconnectPolicy::new_exponential(0, 100, 5_000, 2))
            .build()?;
        Ok(Store {
            client,
            keys: Arc::new(keys::Keys::new(&settings.prefix)),
            fixed: Arc::new(steps::FixedArgs::new(&settings)),
            scripts: Scripts {
                steps: Script::from_lua(steps::STEPS),
                release: Script::from_lua(admission::RELEASE),
                cool_down: Script::from_lua(cooldown::COOL_DOWN),
                attempt_started: Script::from_lua(admission::ATTEMPT_STARTED),
                confirm_claim: Script::from_lua(confirmations::CONFIRM_CLAIM),
                confirm_settle: Script::from_lua(confirmations::CONFIRM_SETTLE),
                confirm_read: Script::from_lua(confirmations::CONFIRM_READ),
            },
            steps: batch::Batcher::new("batching", steps::MAX_BATCH),
            quitting: Arc::new(AtomicBool::new(false)),
            replication: replication::Replication::default(),
        })
    }

    /// Counts a record as written only once `replicas` replicas of the primary hold it
    /// (`WAIT`); 0, the default, takes the primary's word.
    pub(crate) fn with_replicas(mut self, replicas: u32) -> Store {
        self.replication = replication::Replication::new(replicas, self.keys.replication_probe());
        self
    }

    /// False while the replicas `--redis-replicas` asks for did not acknowledge the last check:
    /// no delivery can be acked then, whatever else Redis answers.
    pub(crate) fn writes_confirmed(&self) -> bool {
        self.replication.confirmed()
    }

    /// Waits until `keys` are on the primary and on the replicas `--redis-replicas` asks for;
    /// see `store/replication.rs`. Fails when they are not (yet): the caller tries again.
    fn replicated(&self, keys: &[&str]) -> impl Future<Output = Result<(), StoreError>> + use<> {
        let keys = keys.iter().map(|k| (*k).to_owned()).collect();
        self.replication.confirm(&self.client, keys)
    }

    /// Starts connecting in the background; commands wait for the connection (up to their
    /// time-out) and the client reconnects by itself whenever it is lost.
    ///
    /// fred follows its reconnect policy only once it has been connected: when the very
    /// first connection fails its connection task ends for good, and a worker started while
    /// Redis is away would wait on it forever. So the task is started again until it
    /// connects (or `quit` is called).
    pub(crate) fn start(&self) {
        let client = self.client.clone();
        let quitting = Arc::clone(&self.quitting);
        tokio::spawn(async move {
            let mut pacing = Pacing::new(Duration::from_millis(100), Duration::from_secs(5));
            while !quitting.load(Ordering::SeqCst) {
                let pause = pacing.next_pause();
                match client.connect().await {
                    Ok(Err(error)) => {
                        tracing::warn!(
                            error = %error,
                            retry_in_ms = pause.as_millis() as u64,
                            "Cannot connect to Redis; trying again."
                        );
                    }
                    // Ended by `quit`, or by the runtime going away.
                    Ok(Ok(())) | Err(_) => break,
                }
                tokio::time::sleep(pause).await;
            }
        });
    }

    /// Connects and waits for the first connection; for one-shot commands such as `check`.
    pub(crate) async fn connect(&self) -> Result<(), StoreError> {
        self.client.init().await?;
        Ok(())
    }

    /// Redis answers, and with `--redis-replicas` its replicas acknowledge a write: without
    /// them no delivery can be acked.
    pub(crate) async fn ping(&self) -> Result<(), StoreError> {
        self.client.ping::<String>(None).await?;
        self.replicated(&[]).await
    }

    pub(crate) async fn quit(&self) {
        self.quitting.store(true, Ordering::SeqCst);
        let _ = self.client.quit().await;
    }
}

/// Refuses a URL the client would misread.
fn check_url(url: &str) -> Result<(), StoreError> {
    // A cluster would split one job's keys across slots, which the scripts cannot span.
    let scheme = url.split_once("://").map_or("", |(s, _)| s);
    if !matches!(
        scheme,
        "redis" | "rediss" | "redis-sentinel" | "rediss-sentinel"
    ) {
        return Err(StoreError::Scheme(scheme.to_owned()));
    }
    // fred takes one Sentinel in the host and the others as `node` parameters; a host
    // list (the form some other clients read) would fail as a bad port, unexplained.
    let authority = url.split_once("://").map_or("", |(_, rest)| {
        rest.split(['/', '?']).next().unwrap_or_default()
    });
    // After the credentials, which may hold a comma of their own.
    let hosts = authority.rsplit('@').next().unwrap_or_default();
    if scheme.ends_with("-sentinel") && hosts.contains(',') {
        return Err(StoreError::SentinelHostList);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(super) fn settings() -> StoreSettings {
        StoreSettings {
            prefix: "t:".into(),
            stream_maxlen: 10,
            dedupe_ttl: Duration::from_secs(1),
            lease_ttl: Duration::from_secs(1),
        }
    }

    #[test]
    fn production_urls_are_understood() {
        crate::support::init_tls();
        for url in [
            "redis://127.0.0.1:6379",
            "rediss://user:pw@redis.internal:6380/2",
            "redis-sentinel://sentinel-a:26379/0?sentinelServiceName=mymaster&node=sentinel-b:26379",
            "rediss-sentinel://sentinel-a:26379/0?sentinelServiceName=mymaster",
        ] {
            assert!(Store::new(url, settings()).is_ok(), "{url}");
        }
        assert!(Store::new("http://nope", settings()).is_err());
        let listed = "redis-sentinel://:pw@s1:26379,s2:26379/0?sentinelServiceName=mymaster";
        let error = Store::new(listed, settings()).err().unwrap();
        assert!(error.to_string().contains("&node=host:port"), "{error}");
        assert!(!error.to_string().contains("pw"), "{error}");
        let comma_in_password = "redis-sentinel://:p,w@s1:26379/0?sentinelServiceName=mymaster";
        assert!(Store::new(comma_in_password, settings()).is_ok());
    }

    /// A store on the machine's Redis, not yet connected, under a prefix of its own that
    /// starts with `test:<kind>:`.
    pub(super) fn unconnected_live_store(kind: &str) -> (Store, String) {
        let prefix = format!("test:{kind}:{:x}:", rand::random::<u64>());
        let store = Store::new(
            "redis://127.0.0.1:6379",
            StoreSettings {
                prefix: prefix.clone(),
                stream_maxlen: 1000,
                dedupe_ttl: Duration::from_secs(60),
                lease_ttl: Duration::from_secs(60),
            },
        )
        .unwrap();
        (store, prefix)
    }

    /// Against the machine's Redis, under a prefix of its own.
    pub(super) async fn live_store() -> (Store, String) {
        let (store, prefix) = unconnected_live_store("store");
        store.connect().await.expect("Redis at 127.0.0.1:6379");
        (store, prefix)
    }

    /// Deletes every key under `prefix` and closes the client.
    pub(super) async fn clean(store: &Store, prefix: &str) {
        let keys: Vec<String> = store
            .client
            .custom(fred::cmd!("KEYS"), vec![format!("{prefix}*")])
            .await
            .unwrap();
        if !keys.is_empty() {
            let _: i64 = store.client.del(keys).await.unwrap();
        }
        store.quit().await;
    }

    pub(super) fn token() -> String {
        format!("{:032x}", rand::random::<u128>())
    }
}

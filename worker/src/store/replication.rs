//! `--redis-replicas N` (docs/contract.md section 7): a record counts as written only once N
//! replicas of the primary hold it. Redis replicates asynchronously, so a record the primary
//! has answered can vanish with it in a failover, and with it the stream entry and the marker
//! that stop a redelivery from paging twice; `WAIT N` says when N replicas have caught up.
//!
//! `WAIT` covers the writes of the connection it is sent on, and the client may have moved to
//! another connection (or, behind Sentinel, another primary) since the record. So a round
//! proves everything on one connection, and proves that it was one connection:
//!
//! ```text
//! CLIENT SETNAME <token>       names this connection for this round only
//! EXISTS <keys>                the records are on this server (not lost in a failover)
//! SET <prefix>replicated <token> PX 60000
//!                              a write on this connection after them: WAIT covers it, and a
//!                              replica that has it has everything the server held before it
//! WAIT <N> <timeout>           how many replicas have it
//! CLIENT GETNAME               still <token>: every command above ran on the same connection
//! ```
//!
//! A round answers every job that asked while the one before it ran, so one `WAIT` covers a
//! batch of records, as one script call writes them (both batched by `batch.rs`).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use fred::prelude::*;

use super::StoreError;
use super::batch::{Batch, Batcher};

/// How long one `WAIT` may block: the records of the round wait at most this long for their
/// replicas before the round fails and they are written again. Short enough that the
/// connection it blocks (the client's only one) is not held up for long while a replica is
/// away; long enough for a replica on a loaded machine.
const WAIT_TIMEOUT: Duration = Duration::from_millis(1000);

/// The most jobs one round confirms; the rest wait for the next.
const MAX_ROUND: usize = 256;

/// The replicas a record must reach, and the task that asks Redis in rounds.
#[derive(Clone)]
pub(super) struct Replication {
    /// `--redis-replicas`: 0 confirms nothing and costs nothing.
    replicas: u32,
    /// The key each round writes (one key, overwritten: nothing grows).
    probe_key: String,
    /// The task that runs the rounds: each ask is a job's keys whose replication it waits for.
    rounds: Batcher<Round>,
    /// Whether the last round succeeded: while it did not, no delivery can be acked, and
    /// readiness must not be restored by a Redis call that does not wait for replicas.
    confirmed: Arc<AtomicBool>,
}

impl Default for Replication {
    fn default() -> Replication {
        Replication::new(0, String::new())
    }
}

impl Replication {
    pub(super) fn new(replicas: u32, probe_key: String) -> Replication {
        Replication {
            replicas,
            probe_key,
            rounds: Batcher::new("replication", MAX_ROUND),
            confirmed: Arc::new(AtomicBool::new(replicas == 0)),
        }
    }

    /// True when no replica is asked for, or the last round found them.
    pub(super) fn confirmed(&self) -> bool {
        self.replicas == 0 || self.confirmed.load(Ordering::Relaxed)
    }

    /// Waits until `keys` are on the primary and `--redis-replicas` replicas of it.
    ///
    /// Fails when a key is missing (the record was lost, or written to another server), when
    /// fewer replicas than asked acknowledged within the time-out, or when Redis cannot be
    /// reached: the caller writes the record again (it is idempotent) and does not ack.
    pub(super) fn confirm(
        &self,
        client: &Client,
        keys: Vec<String>,
    ) -> impl Future<Output = Result<(), StoreError>> + use<> {
        let answer = (self.replicas > 0).then(|| {
            let rounds = self.rounds.started(|| Round {
                client: client.clone(),
                replicas: self.replicas,
                probe_key: self.probe_key.clone(),
                confirmed: Arc::clone(&self.confirmed),
            });
            rounds.call(keys)
        });
        async move {
            match answer {
                Some(answer) => answer.await,
                None => Ok(()),
            }
        }
    }
}

/// The rounds, run by the replication task: the asks waiting share one round and its answer.
struct Round {
    client: Client,
    replicas: u32,
    probe_key: String,
    confirmed: Arc<AtomicBool>,
}

impl Batch for Round {
    type Call = Vec<String>;
    type Answer = ();

    async fn run(&mut self, asks: &[Vec<String>]) -> Result<Vec<()>, StoreError> {
        let keys: Vec<String> = asks.iter().flatten().cloned().collect();
        let answer = confirm_round(&self.client, self.replicas, &self.probe_key, keys).await;
        self.confirmed.store(answer.is_ok(), Ordering::Relaxed);
        answer.map(|()| vec![(); asks.len()])
    }
}

/// One round: see the module's documentation.
pub(super) async fn confirm_round(
    client: &Client,
    replicas: u32,
    probe_key: &str,
    mut keys: Vec<String>,
) -> Result<(), StoreError> {
    keys.sort_unstable();
    keys.dedup();
    let token = format!("opsgenie-worker-{:016x}", rand::random::<u64>());
    let pipe = client.pipeline();
    let _: () = pipe
        .custom(fred::cmd!("CLIENT"), vec!["SETNAME", token.as_str()])
        .await?;
    if !keys.is_empty() {
        let _: () = pipe.exists(keys.clone()).await?;
    }
    let _: () = pipe
        .set(
            probe_key,
            token.as_str(),
            Some(Expiration::PX(60_000)),
            None,
            false,
        )
        .await?;
    let _: () = pipe
        .wait(i64::from(replicas), WAIT_TIMEOUT.as_millis() as i64)
        .await?;
    let _: () = pipe.custom(fred::cmd!("CLIENT"), vec!["GETNAME"]).await?;
    let mut answers: Vec<Value> = pipe.all().await?;
    let name = answers.pop();
    let acknowledged = answers.pop();
    if name.and_then(|n| n.as_string()).as_deref() != Some(token.as_str()) {
        return Err(StoreError::ConnectionChanged);
    }
    if !keys.is_empty() {
        let present = answers.get(1).and_then(Value::as_u64).unwrap_or(0);
        if present != keys.len() as u64 {
            return Err(StoreError::MissingRecords {
                missing: keys.len() as u64 - present.min(keys.len() as u64),
                asked: keys.len(),
            });
        }
    }
    let acknowledged = acknowledged.and_then(|n| n.as_u64()).unwrap_or(0);
    if acknowledged < u64::from(replicas) {
        return Err(StoreError::TooFewReplicas {
            acknowledged,
            required: replicas,
            within_ms: WAIT_TIMEOUT.as_millis(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use tokio::sync::{mpsc, oneshot};

    use super::*;
    use crate::store::batch::{self, Waiting};
    use crate::store::tests::{clean, unconnected_live_store};
    use crate::store::{Fields, Store};

    /// A store on the machine's Redis (a primary without replicas), under a prefix of its own.
    async fn lone_primary(replicas: u32) -> (Store, String) {
        crate::support::init_tls();
        let (store, prefix) = unconnected_live_store("replication");
        let store = store.with_replicas(replicas);
        store.connect().await.expect("Redis at 127.0.0.1:6379");
        (store, prefix)
    }

    /// The replicas the machine's Redis has (none, normally).
    async fn replicas_of_the_machines_redis() -> u32 {
        let (store, prefix) = lone_primary(0).await;
        let info: String = store
            .client
            .custom(fred::cmd!("INFO"), vec!["replication"])
            .await
            .unwrap();
        clean(&store, &prefix).await;
        info.lines()
            .find_map(|l| l.trim().strip_prefix("connected_slaves:"))
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    }

    /// With one replica fewer than asked for, a record is written on the primary but never
    /// reported as written, however often it is tried: the job is never acked. Written again,
    /// it adds nothing to the stream.
    #[tokio::test]
    async fn a_record_no_replica_holds_is_a_failed_write() {
        let have = replicas_of_the_machines_redis().await;
        let (store, prefix) = lone_primary(have + 1).await;
        let keys = store.keys("u-1", "ops", None, None, "tok".into());
        let fields: Fields = vec![("notification_uuid", "u-1".to_string())].into();
        for _ in 0..2 {
            let error = store.record(&keys, &fields).await.unwrap_err();
            let short = format!("{have} of the {} Redis replicas", have + 1);
            assert!(error.to_string().contains(&short), "{error}");
            assert!(!store.replication.confirmed());
        }
        let length: u64 = store.client.xlen(store.keys.stream()).await.unwrap();
        assert_eq!(length, 1);
        // Nor may a redelivery be acked as a duplicate on the strength of that record.
        let again = store.keys("u-1", "ops", None, None, "tok-2".into());
        assert!(store.admit(&again).await.is_err());
        // And the worker does not call itself ready.
        assert!(store.ping().await.is_err());
        clean(&store, &prefix).await;

        // Asking for none is the default: the primary's answer suffices.
        let (store, prefix) = lone_primary(0).await;
        let keys = store.keys("u-1", "ops", None, None, "tok".into());
        assert!(!store.record(&keys, &fields).await.unwrap().is_empty());
        store.ping().await.unwrap();
        assert!(store.replication.confirmed());
        clean(&store, &prefix).await;
    }

    /// A record the primary does not hold (it was written to a primary that was lost) fails the
    /// check even when every replica asked for has acknowledged.
    #[tokio::test]
    async fn a_record_missing_on_the_primary_is_a_failed_write() {
        let (store, prefix) = lone_primary(0).await;
        let present = format!("{prefix}present");
        let _: () = store
            .client
            .set(&present, "1", None, None, false)
            .await
            .unwrap();
        let probe = format!("{prefix}replicated");
        confirm_round(
            &store.client,
            0,
            &probe,
            vec![present.clone(), present.clone()],
        )
        .await
        .unwrap();
        let error = confirm_round(
            &store.client,
            0,
            &probe,
            vec![present.clone(), format!("{prefix}lost")],
        )
        .await
        .unwrap_err();
        assert!(
            error.to_string().contains("1 of 2 records are missing"),
            "{error}"
        );
        clean(&store, &prefix).await;
    }

    /// Asks that arrive together share a round, and each gets its answer.
    #[tokio::test]
    async fn asks_that_arrive_together_share_a_round() {
        let (store, prefix) = lone_primary(0).await;
        let present = format!("{prefix}present");
        let _: () = store
            .client
            .set(&present, "1", None, None, false)
            .await
            .unwrap();
        // `WAIT 0` is met at once, so only the rounds' bookkeeping is under test.
        let (inbox, asks) = mpsc::unbounded_channel();
        let round = Round {
            client: store.client.clone(),
            replicas: 0,
            probe_key: format!("{prefix}replicated"),
            confirmed: Arc::new(AtomicBool::new(false)),
        };
        let task = tokio::spawn(batch::run(round, MAX_ROUND, asks));
        let answers: Vec<_> = (0..50)
            .map(|_| {
                let (reply, answer) = oneshot::channel();
                inbox
                    .send(Waiting {
                        call: vec![present.clone()],
                        reply,
                    })
                    .unwrap();
                answer
            })
            .collect();
        for answer in answers {
            answer.await.unwrap().unwrap();
        }
        let (reply, answer) = oneshot::channel();
        inbox
            .send(Waiting {
                call: vec![format!("{prefix}lost")],
                reply,
            })
            .unwrap();
        assert!(answer.await.unwrap().is_err());
        drop(inbox);
        task.await.unwrap();
        clean(&store, &prefix).await;
    }
}

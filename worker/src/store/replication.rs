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
//! batch of records, as one script call writes them (see `run_batches`).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use fred::prelude::*;
use tokio::sync::{mpsc, oneshot};

/// How long one `WAIT` may block: the records of the round wait at most this long for their
/// replicas before the round fails and they are written again. Short enough that the
/// connection it blocks (the client's only one) is not held up for long while a replica is
/// away; long enough for a replica on a loaded machine.
const WAIT_TIMEOUT: Duration = Duration::from_millis(1000);

/// The most jobs one round confirms; the rest wait for the next.
const MAX_ROUND: usize = 256;

/// A job's keys whose replication it waits for, and where the answer goes.
struct Ask {
    keys: Vec<String>,
    reply: oneshot::Sender<Result<(), Error>>,
}

/// The replicas a record must reach, and the task that asks Redis in rounds.
#[derive(Clone, Default)]
pub struct Replication {
    /// `--redis-replicas`: 0 confirms nothing and costs nothing.
    replicas: u32,
    /// The key each round writes (one key, overwritten: nothing grows).
    probe_key: String,
    /// The rounds' inbox, started with the first ask (which runs on the runtime).
    rounds: Arc<OnceLock<mpsc::UnboundedSender<Ask>>>,
    /// Whether the last round succeeded: while it did not, no delivery can be acked, and
    /// readiness must not be restored by a Redis call that does not wait for replicas.
    confirmed: Arc<AtomicBool>,
}

impl Replication {
    pub fn new(replicas: u32, prefix: &str) -> Replication {
        Replication {
            replicas,
            probe_key: format!("{prefix}replicated"),
            rounds: Arc::new(OnceLock::new()),
            confirmed: Arc::new(AtomicBool::new(replicas == 0)),
        }
    }

    /// True when no replica is asked for, or the last round found them.
    pub fn confirmed(&self) -> bool {
        self.replicas == 0 || self.confirmed.load(Ordering::Relaxed)
    }

    /// Waits until `keys` are on the primary and `--redis-replicas` replicas of it.
    ///
    /// Fails when a key is missing (the record was lost, or written to another server), when
    /// fewer replicas than asked acknowledged within the time-out, or when Redis cannot be
    /// reached: the caller writes the record again (it is idempotent) and does not ack.
    pub async fn confirm(&self, client: &Client, keys: Vec<String>) -> Result<(), Error> {
        if self.replicas == 0 {
            return Ok(());
        }
        let inbox = self.rounds.get_or_init(|| {
            let (inbox, asks) = mpsc::unbounded_channel();
            tokio::spawn(run_rounds(
                client.clone(),
                self.replicas,
                self.probe_key.clone(),
                Arc::clone(&self.confirmed),
                asks,
            ));
            inbox
        });
        let gone = || Error::new(ErrorKind::Canceled, "the Redis replication task is gone");
        let (reply, answer) = oneshot::channel();
        inbox.send(Ask { keys, reply }).map_err(|_| gone())?;
        answer.await.map_err(|_| gone())?
    }
}

/// Answers the asks that are waiting with one round, and goes on.
async fn run_rounds(
    client: Client,
    replicas: u32,
    probe_key: String,
    confirmed: Arc<AtomicBool>,
    mut asks: mpsc::UnboundedReceiver<Ask>,
) {
    let mut round: Vec<Ask> = Vec::with_capacity(MAX_ROUND);
    while let Some(first) = asks.recv().await {
        round.push(first);
        while round.len() < MAX_ROUND {
            match asks.try_recv() {
                Ok(ask) => round.push(ask),
                Err(_) => break,
            }
        }
        let keys: Vec<String> = round.iter().flat_map(|a| a.keys.iter().cloned()).collect();
        let answer = confirm_round(&client, replicas, &probe_key, keys).await;
        confirmed.store(answer.is_ok(), Ordering::Relaxed);
        for ask in round.drain(..) {
            let _ = ask.reply.send(answer.clone());
        }
    }
}

/// One round: see the module's documentation.
pub(super) async fn confirm_round(
    client: &Client,
    replicas: u32,
    probe_key: &str,
    mut keys: Vec<String>,
) -> Result<(), Error> {
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
        return Err(Error::new(
            ErrorKind::IO,
            "the connection to Redis changed during the replication check",
        ));
    }
    if !keys.is_empty() {
        let present = answers.get(1).and_then(Value::as_u64).unwrap_or(0);
        if present != keys.len() as u64 {
            return Err(Error::new(
                ErrorKind::NotFound,
                format!(
                    "{} of {} records are missing on the Redis primary (lost in a failover?)",
                    keys.len() as u64 - present.min(keys.len() as u64),
                    keys.len()
                ),
            ));
        }
    }
    let acknowledged = acknowledged.and_then(|n| n.as_u64()).unwrap_or(0);
    if acknowledged < u64::from(replicas) {
        return Err(Error::new(
            ErrorKind::Timeout,
            format!(
                "{acknowledged} of the {replicas} Redis replicas required acknowledged the write within {} ms",
                WAIT_TIMEOUT.as_millis()
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
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
            assert!(error.details().contains(&short), "{error}");
            assert!(!store.replication.confirmed());
        }
        let length: u64 = store.client.xlen(store.stream_key()).await.unwrap();
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
            error.details().contains("1 of 2 records are missing"),
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
        let task = tokio::spawn(run_rounds(
            store.client.clone(),
            0,
            format!("{prefix}replicated"),
            Arc::new(AtomicBool::new(false)),
            asks,
        ));
        let answers: Vec<_> = (0..50)
            .map(|_| {
                let (reply, answer) = oneshot::channel();
                inbox
                    .send(Ask {
                        keys: vec![present.clone()],
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
            .send(Ask {
                keys: vec![format!("{prefix}lost")],
                reply,
            })
            .unwrap();
        assert!(answer.await.unwrap().is_err());
        drop(inbox);
        task.await.unwrap();
        clean(&store, &prefix).await;
    }
}

//! The Redis boundary (docs/contract.md section 7): the checks before a request (already delivered? a
//! stale incident status? another replica on this incident?) and the atomic record after it.
//! Each is one Lua script, so one round trip and no half-written state. The scripts live in
//! `store/*.lua`, each with its KEYS/ARGV contract and answers at its top, and every one runs
//! the same way: by its digest, loaded again when Redis answers NOSCRIPT (after a restart
//! Redis has forgotten them; a script it did not know did not run, so running it is safe).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use fred::prelude::*;
use fred::types::scripts::Script;
use tokio::sync::{mpsc, oneshot};

use crate::support::pacing::Pacing;

mod replication;

/// The most calls run by one script call.
const MAX_BATCH: usize = 128;

/// A stream entry's field/value pairs.
pub type Fields = Arc<[(&'static str, String)]>;

/// One job's admission check or record, waiting for the next batch.
struct Call {
    keys: Arc<JobKeys>,
    /// `None`: the admission check; else the record, with the stream entry's fields.
    record: Option<Fields>,
    /// With a record: the confirmation to ask for later, written with it.
    pending: Option<Arc<Pending>>,
    reply: oneshot::Sender<Result<String, Error>>,
}

/// A delivery's confirmation to come (docs/contract.md section 6.1), written by the same
/// script as its record so that a crash can never leave one without the other.
#[derive(Debug, Clone)]
pub struct Pending {
    /// The notification_uuid: the member of the due set, and the name of the hash.
    pub member: String,
    /// When to ask first, in ms since the epoch.
    pub due_ms: u64,
    /// How long the hash lives if it is never settled.
    pub ttl_ms: u64,
    /// The job's body, as the broker delivered it: the hash's `body`. Sent to Redis as an
    /// argument of its own, byte for byte, rather than escaped into the JSON word.
    pub body: bytes::Bytes,
    /// The rest of the hash: team, request id, delivery time, deadline, ...
    pub fields: Vec<(&'static str, String)>,
}

/// How a claimed confirmation is settled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Settle<'a> {
    /// Not processed yet (or the question failed): ask again at this time (ms).
    Again { due_ms: u64 },
    /// Ended: the stream entry; `failed` deletes the sent marker and rolls the incident's
    /// sequence back, so that the dead letter can be replayed.
    Done {
        fields: &'a [(&'static str, String)],
        failed: bool,
    },
}

/// What settling found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Settled {
    /// Rescheduled.
    Again,
    /// Ended; the stream entry's id.
    Done(String),
    /// The claim ran out and another confirmer has the member, or it was settled already.
    Lost,
}

/// One claimed confirmation to settle, for `Store::settle_confirmations`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settlement<'a> {
    /// The notification_uuid.
    pub member: &'a str,
    /// The claim's token: only its holder may settle it.
    pub token: &'a str,
    /// The incident whose sequence a failure rolls back (none for an issue alert).
    pub alias: Option<&'a str>,
    pub settle: Settle<'a>,
}

/// One settle as `confirm_settle.lua` reads it: `[member, token, op, due, failed, entry]`.
#[derive(Debug, serde::Serialize)]
struct SettleCall<'a>(
    &'a str,
    &'a str,
    &'static str,
    /// The next due time in ms as a decimal string ("" when done).
    String,
    &'static str,
    &'a [(&'static str, String)],
);

/// Keys and limits, from the command line.
#[derive(Debug, Clone)]
pub struct StoreSettings {
    pub prefix: String,
    pub stream_maxlen: u64,
    pub dedupe_ttl: Duration,
    /// How long an incident's lease lasts if its holder dies without releasing it.
    pub lease_ttl: Duration,
}

/// How long the last delivered sequence of an incident is kept (docs/contract.md section 7: 7 days).
const SEQUENCE_TTL_SECS: u64 = 7 * 24 * 3600;

/// The admission checks and records of a batch of jobs in one atomic step; its KEYS/ARGV
/// contract and answers are at the top of the file.
const STEPS: &str = include_str!("scripts/steps.lua");

/// Starts or lengthens a team's cooldown after a 429, for every replica.
const COOL_DOWN: &str = include_str!("scripts/cool_down.lua");

/// Counts an attempt at a message that has started; answers the count.
const ATTEMPT_STARTED: &str = include_str!("scripts/attempt_started.lua");

/// How long an unfinished attempt is remembered: past it, a message that killed its
/// attempts long ago is given a fresh count.
const ATTEMPTS_TTL_SECS: u64 = 24 * 3600;

/// Frees a lease this round of a job holds.
const RELEASE: &str = include_str!("scripts/release.lua");

/// Claims due confirmations for a while.
const CONFIRM_CLAIM: &str = include_str!("scripts/confirm_claim.lua");

/// Reschedules or ends claimed confirmations, a batch at a time.
const CONFIRM_SETTLE: &str = include_str!("scripts/confirm_settle.lua");

/// Reads the pending hashes of claimed confirmations, a batch at a time.
const CONFIRM_READ: &str = include_str!("scripts/confirm_read.lua");

/// What the pre-send check found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// The lease is ours; send.
    Go,
    /// Already delivered: ack without sending.
    Duplicate,
    /// An incident status at or below the last delivered one: ack without sending.
    Stale,
    /// Another request for the same incident is in flight: wait and ask again.
    Busy,
    /// Opsgenie rate-limited this team's key (seen by any replica): wait this long.
    Cooldown(Duration),
}

/// The Redis client with the scripts it runs.
#[derive(Clone)]
pub struct Store {
    client: Client,
    settings: StoreSettings,
    /// The script arguments that are the same for every job, written once at start-up.
    fixed: Arc<FixedArgs>,
    steps: Script,
    release: Script,
    cool_down: Script,
    attempt_started: Script,
    confirm_claim: Script,
    confirm_settle: Script,
    confirm_read: Script,
    /// The batching task's inbox, started with the first call (which runs on the runtime).
    batches: Arc<OnceLock<mpsc::UnboundedSender<Call>>>,
    /// Set by `quit`, so that `start`'s connect loop does not bring back a client that was
    /// shut down on purpose.
    quitting: Arc<AtomicBool>,
    /// `--redis-replicas`: the replicas a record must reach before the job is acked.
    replication: replication::Replication,
}

/// Keys and script arguments derived from the settings.
#[derive(Debug)]
struct FixedArgs {
    stream_key: String,
    /// The pending confirmations, by due time.
    due_key: String,
    lease_ms: String,
    stream_maxlen: String,
    dedupe_ttl_s: String,
    sequence_ttl_s: String,
}

/// One job's keys, computed once.
#[derive(Debug, Clone)]
pub struct JobKeys {
    sent: String,
    lease: String,
    sequence: String,
    cooldown: String,
    /// The pending confirmation's hash.
    pending: String,
    /// Unique per job round, so that only the holder frees the lease.
    token: String,
    /// The incident's sequence in decimal, or "" without one: the scripts compare sequences
    /// as text, exact across the whole 64-bit range.
    seq: String,
}

impl Store {
    /// Builds the client; it connects in the background and keeps reconnecting.
    ///
    /// Fails only when the URL cannot be parsed.
    pub fn new(url: &str, settings: StoreSettings) -> Result<Store, Error> {
        // A cluster would split one job's keys across slots, which the scripts cannot span.
        let scheme = url.split_once("://").map_or("", |(s, _)| s);
        if !matches!(
            scheme,
            "redis" | "rediss" | "redis-sentinel" | "rediss-sentinel"
        ) {
            return Err(Error::new(
                ErrorKind::Config,
                format!(
                    "scheme \"{scheme}\" is not one of redis, rediss, redis-sentinel, rediss-sentinel"
                ),
            ));
        }
        // fred takes one Sentinel in the host and the others as `node` parameters; a host
        // list (the form some other clients read) would fail as a bad port, unexplained.
        let authority = url.split_once("://").map_or("", |(_, rest)| {
            rest.split(['/', '?']).next().unwrap_or_default()
        });
        // After the credentials, which may hold a comma of their own.
        let hosts = authority.rsplit('@').next().unwrap_or_default();
        if scheme.ends_with("-sentinel") && hosts.contains(',') {
            return Err(Error::new(
                ErrorKind::Config,
                "name one Sentinel as the host and each other one as `&node=host:port` \
                 (a comma-separated host list is not understood)",
            ));
        }
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
        let fixed = Arc::new(FixedArgs {
            stream_key: format!("{}deliveries", settings.prefix),
            due_key: format!("{}confirm:due", settings.prefix),
            lease_ms: settings.lease_ttl.as_millis().to_string(),
            stream_maxlen: settings.stream_maxlen.to_string(),
            dedupe_ttl_s: settings.dedupe_ttl.as_secs().max(1).to_string(),
            sequence_ttl_s: SEQUENCE_TTL_SECS.to_string(),
        });
        Ok(Store {
            fixed,
            client,
            settings,
            steps: Script::from_lua(STEPS),
            release: Script::from_lua(RELEASE),
            cool_down: Script::from_lua(COOL_DOWN),
            attempt_started: Script::from_lua(ATTEMPT_STARTED),
            confirm_claim: Script::from_lua(CONFIRM_CLAIM),
            confirm_settle: Script::from_lua(CONFIRM_SETTLE),
            confirm_read: Script::from_lua(CONFIRM_READ),
            batches: Arc::new(OnceLock::new()),
            quitting: Arc::new(AtomicBool::new(false)),
            replication: replication::Replication::default(),
        })
    }

    /// Counts a record as written only once `replicas` replicas of the primary hold it
    /// (`WAIT`); 0, the default, takes the primary's word.
    pub fn with_replicas(mut self, replicas: u32) -> Store {
        self.replication = replication::Replication::new(replicas, &self.settings.prefix);
        self
    }

    /// False while the replicas `--redis-replicas` asks for did not acknowledge the last check:
    /// no delivery can be acked then, whatever else Redis answers.
    pub fn writes_confirmed(&self) -> bool {
        self.replication.confirmed()
    }

    /// Waits until `keys` are on the primary and on the replicas `--redis-replicas` asks for;
    /// see `store/replication.rs`. Fails when they are not (yet): the caller tries again.
    async fn replicated(&self, keys: &[&str]) -> Result<(), Error> {
        let keys = keys.iter().map(|k| (*k).to_owned()).collect();
        self.replication.confirm(&self.client, keys).await
    }

    /// Starts connecting in the background; commands wait for the connection (up to their
    /// time-out) and the client reconnects by itself whenever it is lost.
    ///
    /// fred follows its reconnect policy only once it has been connected: when the very
    /// first connection fails its connection task ends for good, and a worker started while
    /// Redis is away would wait on it forever. So the task is started again until it
    /// connects (or `quit` is called).
    pub fn start(&self) {
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
    pub async fn connect(&self) -> Result<(), Error> {
        self.client.init().await.map(|_| ())
    }

    /// Redis answers, and with `--redis-replicas` its replicas acknowledge a write: without
    /// them no delivery can be acked.
    pub async fn ping(&self) -> Result<(), Error> {
        self.client.ping::<String>(None).await?;
        self.replicated(&[]).await
    }

    pub async fn quit(&self) {
        self.quitting.store(true, Ordering::SeqCst);
        let _ = self.client.quit().await;
    }

    pub fn stream_key(&self) -> &str {
        &self.fixed.stream_key
    }

    /// The keys one job touches. A metric alert takes turns with its incident's other jobs
    /// (`lease:<alias>`, `seq:<alias>`); any other job only guards against two copies of
    /// itself (`lease:notification:<uuid>`). An incident alias is `incident_<int>_<int>` and
    /// never has a colon, so no notification uuid can name an incident's lease.
    pub fn keys(
        &self,
        notification_uuid: &str,
        team: &str,
        incident: Option<&str>,
        seq: Option<i64>,
        token: String,
    ) -> Arc<JobKeys> {
        // Joined rather than formatted: five keys a job, and `concat` sizes each string once.
        let p = self.settings.prefix.as_str();
        let (lease, sequence) = match incident {
            Some(alias) => ([p, "lease:", alias].concat(), [p, "seq:", alias].concat()),
            // No sequence without an incident: the script never reads or writes this key.
            None => (
                [p, "lease:notification:", notification_uuid].concat(),
                [p, "seq:notification:", notification_uuid].concat(),
            ),
        };
        Arc::new(JobKeys {
            sent: [p, "sent:", notification_uuid].concat(),
            lease,
            sequence,
            cooldown: [p, "cooldown:", team].concat(),
            pending: [p, "confirm:", notification_uuid].concat(),
            token,
            seq: seq.map(|n| n.to_string()).unwrap_or_default(),
        })
    }

    /// Checks whether the job may be sent now, taking the lease when it may.
    pub async fn admit(&self, keys: &Arc<JobKeys>) -> Result<Admission, Error> {
        let answer = self.batched(Arc::clone(keys), None, None).await?;
        let admission = admission(&answer)?;
        // Acked without a request on the strength of a record: that record must be as durable
        // as one this job would write.
        match admission {
            Admission::Duplicate => self.replicated(&[&keys.sent]).await?,
            Admission::Stale => self.replicated(&[&keys.sequence]).await?,
            _ => {}
        }
        Ok(admission)
    }

    /// Writes the stream entry, the sent marker and the incident's sequence, and frees the
    /// lease, atomically. Returns the stream entry id, or "" when the notification was
    /// already recorded (nothing is written then but the lease is freed).
    ///
    /// With `--redis-replicas N`, fails unless N replicas hold the record too; writing it
    /// again is safe (see `steps.lua`).
    pub async fn record(&self, keys: &Arc<JobKeys>, fields: &Fields) -> Result<String, Error> {
        self.record_confirming(keys, fields, None).await
    }

    /// `record`, and with `pending` the confirmation to ask for later, in the same script.
    /// With `--redis-replicas N`, fails unless N replicas hold the record too.
    pub async fn record_confirming(
        &self,
        keys: &Arc<JobKeys>,
        fields: &Fields,
        pending: Option<Arc<Pending>>,
    ) -> Result<String, Error> {
        let id = self
            .batched(Arc::clone(keys), Some(Arc::clone(fields)), pending)
            .await?;
        self.replicated(&[&keys.sent]).await?;
        Ok(id)
    }

    /// Runs an admission check or a record as part of the next batch. The calls of concurrent
    /// jobs share one script call, one write and one round trip instead of one each: per job,
    /// the Redis client's work was a large share of the worker's CPU. A batch is sent as soon
    /// as the one before it is answered, so a lone call waits for nothing.
    async fn batched(
        &self,
        keys: Arc<JobKeys>,
        record: Option<Fields>,
        pending: Option<Arc<Pending>>,
    ) -> Result<String, Error> {
        let inbox = self.batches.get_or_init(|| {
            let (inbox, calls) = mpsc::unbounded_channel();
            tokio::spawn(run_batches(
                self.client.clone(),
                self.steps.clone(),
                Arc::clone(&self.fixed),
                calls,
            ));
            inbox
        });
        let (reply, answer) = oneshot::channel();
        inbox
            .send(Call {
                keys,
                record,
                pending,
                reply,
            })
            .map_err(|_| Error::new(ErrorKind::Canceled, "the Redis batching task is gone"))?;
        answer
            .await
            .map_err(|_| Error::new(ErrorKind::Canceled, "the Redis batching task is gone"))?
    }

    /// Makes every replica wait `wait` before its next request for `team`.
    pub async fn cool_down(&self, team: &str, wait: Duration) -> Result<(), Error> {
        let key = format!("{}cooldown:{team}", self.settings.prefix);
        let ms = wait.as_millis().max(1).to_string();
        let _: i64 = Box::pin(self.cool_down.evalsha_with_reload(
            &self.client,
            vec![key],
            vec![ms],
        ))
        .await?;
        Ok(())
    }

    /// The key that counts the unfinished attempts at a message, named by a digest of its body
    /// (a message that cannot be parsed has no other name).
    pub fn attempts_key(&self, body: &[u8]) -> String {
        use sha2::Digest;
        format!(
            "{}attempts:{:x}",
            self.settings.prefix,
            sha2::Sha256::digest(body)
        )
    }

    /// Attempts at a message that started and never finished.
    pub async fn unfinished_attempts(&self, key: &str) -> Result<u32, Error> {
        let count: Option<u32> = Box::pin(self.client.get(key)).await?;
        Ok(count.unwrap_or(0))
    }

    /// Counts an attempt that starts now; answers the count with it.
    pub async fn attempt_started(&self, key: &str) -> Result<u32, Error> {
        Box::pin(self.attempt_started.evalsha_with_reload(
            &self.client,
            vec![key],
            vec![ATTEMPTS_TTL_SECS.to_string()],
        ))
        .await
    }

    /// The attempt finished, whatever its outcome: the message is not poison.
    pub async fn attempt_finished(&self, key: &str) -> Result<(), Error> {
        let _: i64 = Box::pin(self.client.del(key)).await?;
        Ok(())
    }

    /// Claims up to `limit` confirmations due at `now_ms` for `lease`; answers (member,
    /// token) pairs.
    pub async fn claim_confirmations(
        &self,
        now_ms: u64,
        lease: Duration,
        limit: usize,
    ) -> Result<Vec<(String, String)>, Error> {
        let flat: Vec<String> = Box::pin(self.confirm_claim.evalsha_with_reload(
            &self.client,
            vec![self.fixed.due_key.as_str()],
            vec![
                now_ms.to_string(),
                lease.as_millis().to_string(),
                limit.to_string(),
            ],
        ))
        .await?;
        let mut pairs = Vec::with_capacity(flat.len() / 2);
        let mut words = flat.into_iter();
        while let (Some(member), Some(token)) = (words.next(), words.next()) {
            pairs.push((member, token));
        }
        Ok(pairs)
    }

    /// The fields `names` of the pending confirmations of `members`, in their order, in one
    /// script call: `None` for a member whose hash is gone, else one value per name ("" for
    /// a field it lacks).
    pub async fn pending_confirmations(
        &self,
        members: &[String],
        names: &[&str],
    ) -> Result<Vec<Option<Vec<String>>>, Error> {
        if members.is_empty() {
            return Ok(Vec::new());
        }
        let keys: Vec<String> = members.iter().map(|m| self.confirm_key(m)).collect();
        let args: Vec<&str> = names.to_vec();
        let flat: Vec<String> = Box::pin(self.confirm_read.evalsha_with_reload(
            &self.client,
            keys,
            args,
        ))
        .await?;
        let stride = 1 + names.len();
        if flat.len() != stride * members.len() {
            return Err(Error::new(
                ErrorKind::Protocol,
                format!(
                    "{} words read for {} pending confirmations",
                    flat.len(),
                    members.len()
                ),
            ));
        }
        let mut words = flat.into_iter();
        let mut hashes = Vec::with_capacity(members.len());
        for _ in members {
            let exists = words.next().is_some_and(|w| w == "1");
            let values: Vec<String> = words.by_ref().take(names.len()).collect();
            hashes.push(exists.then_some(values));
        }
        Ok(hashes)
    }

    /// The job body kept with a pending confirmation; `None` when its hash is gone.
    pub async fn pending_body(&self, member: &str) -> Result<Option<String>, Error> {
        Box::pin(self.client.hget(self.confirm_key(member), "body")).await
    }

    fn confirm_key(&self, member: &str) -> String {
        [self.settings.prefix.as_str(), "confirm:", member].concat()
    }

    /// Confirmations waiting, due or not.
    pub async fn confirmations_waiting(&self) -> Result<u64, Error> {
        Box::pin(self.client.zcard(self.fixed.due_key.as_str())).await
    }

    /// Settles claimed confirmations, each only if its claim is still the caller's, in one
    /// script call; answers what each found, in their order. A failure leaves every one of
    /// them as it was (the script runs whole or not at all).
    pub async fn settle_confirmations(
        &self,
        settles: &[Settlement<'_>],
    ) -> Result<Vec<Settled>, Error> {
        if settles.is_empty() {
            return Ok(Vec::new());
        }
        let p = self.settings.prefix.as_str();
        let mut keys: Vec<String> = Vec::with_capacity(2 + 3 * settles.len());
        keys.push(self.fixed.due_key.clone());
        keys.push(self.fixed.stream_key.clone());
        let mut calls = Vec::with_capacity(settles.len());
        for settle in settles {
            let member = settle.member;
            keys.push(self.confirm_key(member));
            keys.push([p, "sent:", member].concat());
            keys.push(match settle.alias {
                Some(alias) => [p, "seq:", alias].concat(),
                None => [p, "seq:notification:", member].concat(),
            });
            calls.push(match &settle.settle {
                Settle::Again { due_ms } => {
                    SettleCall(member, settle.token, "again", due_ms.to_string(), "0", &[])
                }
                Settle::Done { fields, failed } => SettleCall(
                    member,
                    settle.token,
                    "done",
                    String::new(),
                    if *failed { "1" } else { "0" },
                    fields,
                ),
            });
        }
        let calls = serde_json::to_vec(&calls).map_err(|e| {
            Error::new(
                ErrorKind::Unknown,
                format!("cannot write the script arguments: {e}"),
            )
        })?;
        let args = vec![
            Value::from(self.fixed.stream_maxlen.as_str()),
            Value::Bytes(calls.into()),
        ];
        let answers: Vec<String> = Box::pin(self.confirm_settle.evalsha_with_reload(
            &self.client,
            keys,
            args,
        ))
        .await?;
        if answers.len() != settles.len() {
            return Err(Error::new(
                ErrorKind::Protocol,
                format!("{} answers to {} settles", answers.len(), settles.len()),
            ));
        }
        Ok(answers
            .into_iter()
            .map(|answer| match answer.as_str() {
                "lost" => Settled::Lost,
                "again" => Settled::Again,
                _ => Settled::Done(answer),
            })
            .collect())
    }

    /// Takes the fleet's turn to ping the heartbeat `name`: true for the one replica whose
    /// `SET NX` made the key, which then lives `interval`, so that the fleet pings about once
    /// per interval however many replicas ask.
    pub async fn take_heartbeat_turn(
        &self,
        name: &str,
        interval: Duration,
        replica: &str,
    ) -> Result<bool, Error> {
        use fred::types::{Expiration, SetOptions};
        let key = format!("{}heartbeat:{name}", self.settings.prefix);
        let ms = i64::try_from(interval.as_millis())
            .unwrap_or(i64::MAX)
            .max(1);
        let set: Option<String> = Box::pin(self.client.set(
            key,
            replica,
            Some(Expiration::PX(ms)),
            Some(SetOptions::NX),
            false,
        ))
        .await?;
        Ok(set.is_some())
    }

    /// Frees the lease after a round that delivered nothing.
    pub async fn release(&self, keys: &JobKeys) -> Result<(), Error> {
        let _: i64 = Box::pin(self.release.evalsha_with_reload(
            &self.client,
            vec![keys.lease.as_str()],
            vec![keys.token.as_str()],
        ))
        .await?;
        Ok(())
    }
}

/// Runs the calls that are waiting as one script call, answers each, and goes on.
async fn run_batches(
    client: Client,
    steps: Script,
    fixed: Arc<FixedArgs>,
    mut calls: mpsc::UnboundedReceiver<Call>,
) {
    let mut batch: Vec<Call> = Vec::with_capacity(MAX_BATCH);
    while let Some(first) = calls.recv().await {
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match calls.try_recv() {
                Ok(call) => batch.push(call),
                Err(_) => break,
            }
        }
        let answers: Result<Vec<String>, Error> = match step_words(&fixed, &batch) {
            Ok((keys, args)) => steps.evalsha_with_reload(&client, keys, args).await,
            Err(error) => Err(error),
        };
        match answers {
            Ok(answers) if answers.len() == batch.len() => {
                for (call, answer) in batch.drain(..).zip(answers) {
                    let _ = call.reply.send(Ok(answer));
                }
            }
            Ok(answers) => {
                let error = Error::new(
                    ErrorKind::Protocol,
                    format!("{} answers to {} calls", answers.len(), batch.len()),
                );
                for call in batch.drain(..) {
                    let _ = call.reply.send(Err(error.clone()));
                }
            }
            Err(error) => {
                for call in batch.drain(..) {
                    let _ = call.reply.send(Err(error.clone()));
                }
            }
        }
    }
}

/// Reads the script's answer to an admission check.
///
/// Fails on an answer this worker does not know: never "go and send" on what it cannot read.
fn admission(answer: &str) -> Result<Admission, Error> {
    if let Some(ms) = answer.strip_prefix("cooldown:")
        && let Ok(ms) = ms.parse()
    {
        return Ok(Admission::Cooldown(Duration::from_millis(ms)));
    }
    match answer {
        "ok" => Ok(Admission::Go),
        "duplicate" => Ok(Admission::Duplicate),
        "stale" => Ok(Admission::Stale),
        "busy" => Ok(Admission::Busy),
        _ => Err(Error::new(
            ErrorKind::Protocol,
            format!(
                "unexpected admission answer {:?}",
                opsgenie_shared::text::cap_bytes(answer, 64)
            ),
        )),
    }
}

/// One call of a batch as `steps.lua` reads it from ARGV[5]: a JSON array
/// `[op, token, sequence, [[name, value], ...], pending]`.
#[derive(Debug, serde::Serialize)]
struct StepCall<'a>(
    /// "a" (admission) or "r" (record).
    &'static str,
    /// The lease token of this round of the job.
    &'a str,
    /// The sequence as a decimal string, or "": never a JSON number, which Lua would read as a
    /// double.
    &'a str,
    /// A record's stream entry; empty for an admission.
    &'a [(&'static str, String)],
    /// A record's confirmation to come, or null.
    Option<PendingCall<'a>>,
);

/// A pending confirmation as `steps.lua` reads it: `[member, due ms, ttl ms, [[name, value],
/// ...], n]`, the numbers but `n` as decimal strings; the body is in ARGV[n].
#[derive(Debug, serde::Serialize)]
struct PendingCall<'a>(&'a str, String, String, &'a [(&'static str, String)], usize);

/// The keys and arguments of one `STEPS` call.
///
/// Fails only if serde_json cannot write the arguments, which strings and slices never cause.
fn step_words(fixed: &FixedArgs, batch: &[Call]) -> Result<(Vec<Key>, Vec<Value>), Error> {
    let mut keys: Vec<Key> = Vec::with_capacity(2 + 5 * batch.len());
    keys.push(fixed.stream_key.as_str().into());
    keys.push(fixed.due_key.as_str().into());
    let mut calls: Vec<StepCall<'_>> = Vec::with_capacity(batch.len());
    // The bodies of the pending confirmations follow the five fixed arguments.
    let mut bodies: Vec<Value> = Vec::new();
    for call in batch {
        let k = &call.keys;
        keys.extend([
            Key::from(k.sent.as_str()),
            Key::from(k.lease.as_str()),
            Key::from(k.sequence.as_str()),
            Key::from(k.cooldown.as_str()),
            Key::from(k.pending.as_str()),
        ]);
        calls.push(StepCall(
            if call.record.is_some() { "r" } else { "a" },
            &k.token,
            &k.seq,
            call.record.as_deref().unwrap_or_default(),
            call.pending.as_deref().map(|p| {
                bodies.push(Value::Bytes(p.body.clone()));
                PendingCall(
                    &p.member,
                    p.due_ms.to_string(),
                    p.ttl_ms.to_string(),
                    &p.fields,
                    5 + bodies.len(),
                )
            }),
        ));
    }
    // Every job's arguments in one JSON word: one string to build and send instead of a
    // dozen or more per job, which the client would each copy, frame and free.
    let calls = serde_json::to_vec(&calls).map_err(|e| {
        Error::new(
            ErrorKind::Unknown,
            format!("cannot write the script arguments: {e}"),
        )
    })?;
    let mut args = Vec::with_capacity(5 + bodies.len());
    args.extend([
        Value::from(fixed.lease_ms.as_str()),
        Value::from(fixed.stream_maxlen.as_str()),
        Value::from(fixed.dedupe_ttl_s.as_str()),
        Value::from(fixed.sequence_ttl_s.as_str()),
        Value::Bytes(calls.into()),
    ]);
    args.extend(bodies);
    Ok((keys, args))
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn settings() -> StoreSettings {
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
        assert!(error.details().contains("&node=host:port"), "{error}");
        assert!(!error.details().contains("pw"), "{error}");
        let comma_in_password = "redis-sentinel://:p,w@s1:26379/0?sentinelServiceName=mymaster";
        assert!(Store::new(comma_in_password, settings()).is_ok());
    }

    #[test]
    fn keys_carry_the_prefix() {
        let store = Store::new("redis://127.0.0.1:6379", settings()).unwrap();
        let keys = store.keys("u-1", "ops", Some("incident_1_2"), Some(5), "tok".into());
        assert_eq!(keys.sent, "t:sent:u-1");
        assert_eq!(keys.lease, "t:lease:incident_1_2");
        assert_eq!(keys.sequence, "t:seq:incident_1_2");
        assert_eq!(keys.cooldown, "t:cooldown:ops");
        assert_eq!(store.stream_key(), "t:deliveries");
    }

    #[test]
    fn an_admission_answer_this_worker_cannot_read_is_an_error() {
        for (answer, expected) in [
            ("ok", Admission::Go),
            ("duplicate", Admission::Duplicate),
            ("stale", Admission::Stale),
            ("busy", Admission::Busy),
            (
                "cooldown:1500",
                Admission::Cooldown(Duration::from_millis(1500)),
            ),
        ] {
            assert_eq!(admission(answer).unwrap(), expected, "{answer}");
        }
        for answer in [
            "",
            "OK",
            "go",
            "cooldown:",
            "cooldown:-1",
            "cooldown:soon",
            "ok ",
        ] {
            assert!(admission(answer).is_err(), "{answer:?}");
        }
    }

    /// What `steps.lua` decodes: one array per call, the sequence a string even past 2^53,
    /// a record's fields as pairs in order, and any text as it was.
    #[test]
    fn batch_arguments_are_one_json_array_with_sequences_as_strings() {
        let store = Store::new("redis://127.0.0.1:6379", settings()).unwrap();
        let hostile = "Quote \" back\\slash \u{0} nul, é, 🚨, \n";
        let call = |keys: Arc<JobKeys>, record: Option<Fields>| Call {
            keys,
            record,
            pending: None,
            reply: oneshot::channel().0,
        };
        let batch = [
            call(
                store.keys(
                    "u-1",
                    "ops",
                    Some("incident_1_2"),
                    Some(9_007_199_254_740_993),
                    "tok-1".into(),
                ),
                None,
            ),
            call(
                store.keys("u-2", "ops", None, None, "tok-2".into()),
                Some(
                    vec![
                        ("notification_uuid", "u-2".to_string()),
                        ("title", hostile.to_string()),
                    ]
                    .into(),
                ),
            ),
        ];
        let (keys, args) = step_words(&store.fixed, &batch).unwrap();
        assert_eq!(keys.len(), 2 + 5 * batch.len());
        assert_eq!(args.len(), 5);
        let Value::Bytes(calls) = &args[4] else {
            panic!("{:?}", args[4]);
        };
        let calls: serde_json::Value = serde_json::from_slice(calls).unwrap();
        assert_eq!(
            calls,
            serde_json::json!([
                ["a", "tok-1", "9007199254740993", [], null],
                [
                    "r",
                    "tok-2",
                    "",
                    [["notification_uuid", "u-2"], ["title", hostile]],
                    null
                ],
            ])
        );
    }

    /// Each pending confirmation's body is an argument of its own, byte for byte, and its
    /// call names that argument.
    #[test]
    fn the_bodies_of_pending_confirmations_follow_the_json_word() {
        let store = Store::new("redis://127.0.0.1:6379", settings()).unwrap();
        let record = |uuid: &str, body: &'static [u8]| Call {
            keys: store.keys(uuid, "ops", None, None, format!("tok-{uuid}")),
            record: Some(vec![("notification_uuid", uuid.to_string())].into()),
            pending: Some(Arc::new(Pending {
                member: uuid.into(),
                due_ms: 1_000,
                ttl_ms: 2_000,
                body: bytes::Bytes::from_static(body),
                fields: vec![("team", "ops".into())],
            })),
            reply: oneshot::channel().0,
        };
        let first: &[u8] = b"{\"title\": \"a \\\" quote\"}";
        let second: &[u8] = b"{\"title\": \"\xc3\xa9\"}";
        let batch = [record("u-1", first), record("u-2", second)];
        let (_, args) = step_words(&store.fixed, &batch).unwrap();
        assert_eq!(args.len(), 7);
        assert_eq!(args[5], Value::Bytes(bytes::Bytes::from_static(first)));
        assert_eq!(args[6], Value::Bytes(bytes::Bytes::from_static(second)));
        let Value::Bytes(calls) = &args[4] else {
            panic!("{:?}", args[4]);
        };
        let calls: serde_json::Value = serde_json::from_slice(calls).unwrap();
        assert_eq!(
            calls[0][4],
            serde_json::json!(["u-1", "1000", "2000", [["team", "ops"]], 6])
        );
        assert_eq!(calls[1][4][4], 7);
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
    async fn live_store() -> (Store, String) {
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

    fn token() -> String {
        format!("{:032x}", rand::random::<u128>())
    }

    #[tokio::test]
    async fn each_call_of_a_batch_gets_its_own_answer() {
        let (store, prefix) = live_store().await;
        let fields = |uuid: &str| -> Fields {
            vec![
                ("notification_uuid", uuid.to_string()),
                (
                    "title",
                    "Quote \" back\\slash \u{0} nul, é, 🚨, \n".to_string(),
                ),
            ]
            .into()
        };
        // Twenty notifications already recorded, twenty new ones, asked about all at once:
        // the answers must not be shuffled between the callers of one batch.
        let mut recorded = Vec::new();
        for i in 0..20 {
            let uuid = format!("old-{i}");
            let keys = store.keys(&uuid, "ops", None, None, token());
            assert_eq!(store.admit(&keys).await.unwrap(), Admission::Go);
            assert!(
                !store
                    .record(&keys, &fields(&uuid))
                    .await
                    .unwrap()
                    .is_empty()
            );
            recorded.push(uuid);
        }
        let mut asks = Vec::new();
        for (i, old) in recorded.iter().enumerate() {
            asks.push((format!("new-{i}"), Admission::Go));
            asks.push((old.clone(), Admission::Duplicate));
        }
        let answers = futures_util::future::join_all(asks.iter().map(|(uuid, _)| {
            let keys = store.keys(uuid, "ops", None, None, token());
            let store = store.clone();
            async move { store.admit(&keys).await.unwrap() }
        }))
        .await;
        for ((uuid, expected), answer) in asks.iter().zip(answers) {
            assert_eq!(&answer, expected, "{uuid}");
        }
        // The stream holds each recorded notification once, with its fields as they were.
        let entries: Vec<(String, HashMap<String, String>)> = store
            .client
            .xrange(store.stream_key(), "-", "+", None)
            .await
            .unwrap();
        assert_eq!(entries.len(), 20);
        assert_eq!(entries[3].1["notification_uuid"], "old-3");
        assert_eq!(entries[3].1["title"], fields("x")[1].1);
        clean(&store, &prefix).await;
    }

    #[tokio::test]
    async fn leases_sequences_cooldowns_and_a_repeated_record() {
        let (store, prefix) = live_store().await;
        let alias = "incident_1_9";
        let first = store.keys("m-1", "ops", Some(alias), Some(5), token());
        assert_eq!(store.admit(&first).await.unwrap(), Admission::Go);
        // Asked again by the same round (a step that ran twice): still ours.
        assert_eq!(store.admit(&first).await.unwrap(), Admission::Go);
        let rival = store.keys("m-2", "ops", Some(alias), Some(6), token());
        assert_eq!(store.admit(&rival).await.unwrap(), Admission::Busy);
        let fields: Fields = vec![("notification_uuid", "m-1".to_string())].into();
        let id = store.record(&first, &fields).await.unwrap();
        assert!(id.contains('-'), "{id}");
        // A record whose answer was lost is sent again: it adds nothing.
        assert_eq!(store.record(&first, &fields).await.unwrap(), "");
        let length: u64 = store.client.xlen(store.stream_key()).await.unwrap();
        assert_eq!(length, 1);
        // The lease is free again; an older or equal status of the incident is stale.
        let older = store.keys("m-0", "ops", Some(alias), Some(5), token());
        assert_eq!(store.admit(&older).await.unwrap(), Admission::Stale);
        assert_eq!(store.admit(&rival).await.unwrap(), Admission::Go);
        store.release(&rival).await.unwrap();
        // A 429 on the team's key holds every admission of the team.
        store
            .cool_down("ops", Duration::from_secs(30))
            .await
            .unwrap();
        let later = store.keys("u-9", "ops", None, None, token());
        match store.admit(&later).await.unwrap() {
            Admission::Cooldown(wait) => assert!(wait > Duration::from_secs(25), "{wait:?}"),
            other => panic!("{other:?}"),
        }
        let other_team = store.keys("u-9", "dev", None, None, token());
        assert_eq!(store.admit(&other_team).await.unwrap(), Admission::Go);
        clean(&store, &prefix).await;
    }

    /// A pending confirmation is written with its record; a claim is a lease that another
    /// confirmer takes over once it runs out, after which the first cannot settle it; a
    /// failure after the 202 deletes the sent marker and rolls the incident's sequence back.
    #[tokio::test]
    async fn confirmations_are_claimed_under_a_lease_and_settled_only_by_its_holder() {
        let (store, prefix) = live_store().await;
        let alias = "incident_1_42";
        let fields: Fields = vec![("notification_uuid", "c-1".to_string())].into();
        // An earlier status of the incident was delivered at sequence 3.
        let earlier = store.keys("c-0", "ops", Some(alias), Some(3), token());
        assert_eq!(store.admit(&earlier).await.unwrap(), Admission::Go);
        store.record(&earlier, &fields).await.unwrap();
        let keys = store.keys("c-1", "ops", Some(alias), Some(4), token());
        assert_eq!(store.admit(&keys).await.unwrap(), Admission::Go);
        let pending = Pending {
            member: "c-1".into(),
            due_ms: 1_000,
            ttl_ms: 60_000,
            body: bytes::Bytes::from_static("{\"job\": \"é\"}".as_bytes()),
            fields: vec![
                ("team", "ops".into()),
                ("seq", "4".into()),
                ("asks", "0".into()),
            ],
        };
        let fields: Fields = vec![("notification_uuid", "c-1".to_string())].into();
        store
            .record_confirming(&keys, &fields, Some(Arc::new(pending)))
            .await
            .unwrap();
        assert_eq!(store.confirmations_waiting().await.unwrap(), 1);
        // Not due before its time.
        assert!(
            store
                .claim_confirmations(999, Duration::from_secs(10), 8)
                .await
                .unwrap()
                .is_empty()
        );
        let first = store
            .claim_confirmations(1_000, Duration::from_secs(10), 8)
            .await
            .unwrap();
        assert_eq!(first.len(), 1);
        assert_eq!(first[0].0, "c-1");
        let read = |names: &'static [&'static str]| {
            let store = store.clone();
            async move {
                store
                    .pending_confirmations(&["c-1".to_string()], names)
                    .await
                    .unwrap()
                    .remove(0)
            }
        };
        assert_eq!(read(&["prev_seq"]).await, Some(vec!["3".to_string()]));
        assert_eq!(
            store.pending_body("c-1").await.unwrap().as_deref(),
            Some("{\"job\": \"é\"}")
        );
        let settle = |token: String, settle: Settle<'static>| {
            let store = store.clone();
            async move {
                store
                    .settle_confirmations(&[Settlement {
                        member: "c-1",
                        token: &token,
                        alias: Some("incident_1_42"),
                        settle,
                    }])
                    .await
                    .unwrap()
                    .remove(0)
            }
        };
        // Claimed: nobody else gets it while the lease lasts, another does once it ran out.
        assert!(
            store
                .claim_confirmations(10_999, Duration::from_secs(10), 8)
                .await
                .unwrap()
                .is_empty()
        );
        let second = store
            .claim_confirmations(11_000, Duration::from_secs(10), 8)
            .await
            .unwrap();
        assert_eq!(second.len(), 1);
        assert_ne!(first[0].1, second[0].1);
        let entry: &'static [(&'static str, String)] = Box::leak(Box::new([
            ("notification_uuid", "c-1".to_string()),
            ("event", "failed_async".to_string()),
        ]));
        let done = Settle::Done {
            fields: entry,
            failed: true,
        };
        assert_eq!(
            settle(first[0].1.clone(), done.clone()).await,
            Settled::Lost
        );
        // The holder asks again later, then ends it.
        assert_eq!(
            settle(second[0].1.clone(), Settle::Again { due_ms: 20_000 }).await,
            Settled::Again
        );
        let third = store
            .claim_confirmations(20_000, Duration::from_secs(10), 8)
            .await
            .unwrap();
        assert_eq!(third.len(), 1);
        assert_eq!(read(&["asks"]).await, Some(vec!["1".to_string()]));
        let Settled::Done(id) = settle(third[0].1.clone(), done.clone()).await else {
            panic!("not done");
        };
        assert!(id.contains('-'));
        assert_eq!(store.confirmations_waiting().await.unwrap(), 0);
        assert_eq!(read(&["asks"]).await, None);
        // Failed after its 202: the marker is gone and the incident is back at 3, so that a
        // replay of sequence 4 is admitted and sent.
        let replay = store.keys("c-1", "ops", Some(alias), Some(4), token());
        assert_eq!(store.admit(&replay).await.unwrap(), Admission::Go);
        // Settled twice is lost the second time: one stream entry per outcome.
        assert_eq!(settle(third[0].1.clone(), done).await, Settled::Lost);
        let length: u64 = store.client.xlen(store.stream_key()).await.unwrap();
        assert_eq!(length, 3);
        clean(&store, &prefix).await;
    }

    /// A claimed batch is read in one call (a gone hash reads as `None`) and settled in one
    /// call, each settle on its own: rescheduled, ended with its stream entry, or refused to
    /// a holder whose claim is no longer its own.
    #[tokio::test]
    async fn a_claimed_batch_is_read_and_settled_each_on_its_own() {
        let (store, prefix) = live_store().await;
        let due = format!("{prefix}confirm:due");
        for member in ["c-1", "c-2", "c-3"] {
            let _: () = store
                .client
                .hset(
                    format!("{prefix}confirm:{member}"),
                    vec![("team", "ops"), ("request_id", member), ("seq", "")],
                )
                .await
                .unwrap();
            let _: () = store
                .client
                .zadd(&due, None, None, false, false, (1.0, member))
                .await
                .unwrap();
        }
        let claims = store
            .claim_confirmations(10, Duration::from_secs(60), 10)
            .await
            .unwrap();
        assert_eq!(claims.len(), 3);
        let mut members: Vec<String> = claims.iter().map(|(m, _)| m.clone()).collect();
        members.push("gone".into());
        let read = store
            .pending_confirmations(&members, &["team", "request_id", "asks"])
            .await
            .unwrap();
        assert_eq!(read.len(), 4);
        for (member, fields) in members.iter().zip(&read).take(3) {
            assert_eq!(
                fields.as_deref(),
                Some(&["ops".to_string(), member.clone(), String::new()][..])
            );
        }
        assert_eq!(read[3], None);

        let entry = vec![
            ("notification_uuid", claims[1].0.clone()),
            ("event", "confirmed".to_string()),
        ];
        let settles = [
            Settlement {
                member: &claims[0].0,
                token: &claims[0].1,
                alias: None,
                settle: Settle::Again { due_ms: 5 },
            },
            Settlement {
                member: &claims[1].0,
                token: &claims[1].1,
                alias: None,
                settle: Settle::Done {
                    fields: &entry,
                    failed: false,
                },
            },
            Settlement {
                member: &claims[2].0,
                token: "1",
                alias: None,
                settle: Settle::Done {
                    fields: &entry,
                    failed: false,
                },
            },
        ];
        let answers = store.settle_confirmations(&settles).await.unwrap();
        assert_eq!(answers[0], Settled::Again);
        assert!(
            matches!(&answers[1], Settled::Done(id) if id.contains('-')),
            "{answers:?}"
        );
        assert_eq!(answers[2], Settled::Lost);
        // Rescheduled, and asked once more.
        let score: Option<f64> = store.client.zscore(&due, &claims[0].0).await.unwrap();
        assert_eq!(score, Some(5.0));
        let asks: Option<String> = store
            .client
            .hget(format!("{prefix}confirm:{}", claims[0].0), "asks")
            .await
            .unwrap();
        assert_eq!(asks.as_deref(), Some("1"));
        // Ended: out of the set, its hash gone, its entry in the stream.
        let score: Option<f64> = store.client.zscore(&due, &claims[1].0).await.unwrap();
        assert_eq!(score, None);
        let exists: i64 = store
            .client
            .exists(format!("{prefix}confirm:{}", claims[1].0))
            .await
            .unwrap();
        assert_eq!(exists, 0);
        let entries: Vec<(String, HashMap<String, String>)> = store
            .client
            .xrange(store.stream_key(), "-", "+", None)
            .await
            .unwrap();
        assert_eq!(entries.len(), 1);
        assert_eq!(entries[0].1["notification_uuid"], claims[1].0);
        assert_eq!(entries[0].1["event"], "confirmed");
        // Not the caller's: left as the claim left it.
        let score: Option<String> = store.client.zscore(&due, &claims[2].0).await.unwrap();
        assert_eq!(score.as_deref(), Some(claims[2].1.as_str()));
        clean(&store, &prefix).await;
    }

    /// Past 2^53 a double cannot tell neighbours apart; the script must.
    #[tokio::test]
    async fn sequences_compare_exactly_across_the_whole_64_bit_range() {
        let (store, prefix) = live_store().await;
        let fields: Fields = vec![("notification_uuid", "x".to_string())].into();
        // (delivered, then asked) -> expected answer for the second.
        let cases = [
            (9_007_199_254_740_992, 9_007_199_254_740_993, Admission::Go),
            (
                9_007_199_254_740_993,
                9_007_199_254_740_992,
                Admission::Stale,
            ),
            (i64::MAX - 1, i64::MAX, Admission::Go),
            (i64::MAX, i64::MAX, Admission::Stale),
            (-1, 0, Admission::Go),
            (-10, -9, Admission::Go),
            (-9, -10, Admission::Stale),
            (i64::MIN, i64::MIN + 1, Admission::Go),
            (99, 100, Admission::Go),
            (100, 99, Admission::Stale),
            (5, -5, Admission::Stale),
        ];
        for (i, (delivered, asked, expected)) in cases.into_iter().enumerate() {
            let alias = format!("incident_1_{i}");
            let first = store.keys(
                &format!("s-{i}-a"),
                "ops",
                Some(&alias),
                Some(delivered),
                token(),
            );
            assert_eq!(store.admit(&first).await.unwrap(), Admission::Go);
            store.record(&first, &fields).await.unwrap();
            let second = store.keys(
                &format!("s-{i}-b"),
                "ops",
                Some(&alias),
                Some(asked),
                token(),
            );
            assert_eq!(
                store.admit(&second).await.unwrap(),
                expected,
                "{asked} after {delivered}"
            );
            if expected == Admission::Go {
                store.record(&second, &fields).await.unwrap();
                let last: String = store.client.get(&second.sequence).await.unwrap();
                assert_eq!(last, asked.to_string());
            }
        }
        clean(&store, &prefix).await;
    }

    /// A script Redis does not know (it restarted, or never saw this one) is loaded and run on
    /// the same call: the caller never sees the NOSCRIPT.
    #[tokio::test]
    async fn a_script_redis_forgot_is_loaded_again() {
        let (mut store, prefix) = live_store().await;
        // A variant no Redis has seen: its digest is new.
        let unseen = |lua: &str| Script::from_lua(format!("{lua}\n-- {}", token()));
        store.steps = unseen(STEPS);
        store.release = unseen(RELEASE);
        let keys = store.keys("u-1", "ops", None, None, token());
        assert_eq!(store.admit(&keys).await.unwrap(), Admission::Go);
        store.release(&keys).await.unwrap();
        // Freed: the next round takes the lease with a token of its own.
        let next_round = store.keys("u-1", "ops", None, None, token());
        assert_eq!(store.admit(&next_round).await.unwrap(), Admission::Go);
        clean(&store, &prefix).await;
    }

    /// An issue alert whose uuid is spelled like an incident alias holds only its own lease.
    #[tokio::test]
    async fn a_notification_never_holds_an_incidents_lease() {
        let (store, prefix) = live_store().await;
        let alias = "incident_1_9001";
        let issue = store.keys(alias, "ops", None, None, token());
        assert_eq!(store.admit(&issue).await.unwrap(), Admission::Go);
        let metric = store.keys("m-1", "ops", Some(alias), Some(1), token());
        assert_eq!(store.admit(&metric).await.unwrap(), Admission::Go);
        assert_ne!(issue.lease, metric.lease);
        clean(&store, &prefix).await;
    }
}

//! The Redis boundary (SPEC section 7): the checks before a request (already delivered? a
//! stale incident status? another replica on this incident?) and the atomic record after it.
//! Each is one Lua script, so one round trip and no half-written state.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use fred::prelude::*;
use fred::types::scripts::Script;
use tokio::sync::{mpsc, oneshot};

/// The most calls run by one script call.
const MAX_BATCH: usize = 128;

/// A stream entry's field/value pairs.
pub type Fields = Arc<[(&'static str, String)]>;

/// One job's admission check or record, waiting for the next batch.
struct Call {
    keys: Arc<JobKeys>,
    /// `None`: the admission check; else the record, with the stream entry's fields.
    record: Option<Fields>,
    reply: oneshot::Sender<Result<String, Error>>,
}

/// Keys and limits, from the command line.
#[derive(Debug, Clone)]
pub struct BufferSettings {
    pub prefix: String,
    pub stream_maxlen: u64,
    pub dedupe_ttl: Duration,
    /// How long an incident's lease lasts if its holder dies without releasing it.
    pub lease_ttl: Duration,
}

/// How long the last delivered sequence of an incident is kept (SPEC section 7: 7 days).
const SEQUENCE_TTL_SECS: u64 = 7 * 24 * 3600;

/// The admission checks and records of a batch of jobs, in the order they came, in one
/// atomic step.
///
/// KEYS[1] is the deliveries stream; then four keys per job: its sent marker, its lease, its
/// incident's sequence and its team's cooldown. ARGV[1..4]: lease ms, stream maxlen, dedupe
/// ttl s, sequence ttl s. ARGV[5]: a JSON array with one array per job: `a` (admission) or
/// `r` (record), the lease token, the sequence or "", then a record's stream field/value
/// pairs.
///
/// An admission answers "duplicate", "cooldown:<ms>", "busy", "stale" or "ok" (the lease is
/// taken). A record writes the stream entry, the sent marker and the incident's sequence,
/// frees the lease, and answers the entry's id, or "" when the delivery was already recorded.
///
/// Running a step twice changes nothing the first run did not: a lease is taken again by its
/// own token, and a record whose answer was lost (the connection dropped after Redis ran it)
/// finds its sent marker and adds nothing, so the stream keeps one entry per notification.
const STEPS: &str = r#"
local lease_ms, maxlen, dedupe_ttl, seq_ttl = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local calls = cjson.decode(ARGV[5])
local out = {}
for i, call in ipairs(calls) do
  local k = 4 * i - 2
  local sent, lease, seqkey, cool = KEYS[k], KEYS[k + 1], KEYS[k + 2], KEYS[k + 3]
  local op, token, seq = call[1], call[2], call[3]
  local answer
  if op == 'a' then
    if redis.call('EXISTS', sent) == 1 then
      answer = 'duplicate'
    else
      local cooling = redis.call('PTTL', cool)
      if cooling > 0 then
        answer = 'cooldown:' .. cooling
      elseif not redis.call('SET', lease, token, 'NX', 'PX', lease_ms)
          and redis.call('GET', lease) ~= token then
        answer = 'busy'
      else
        -- Taken now, or already ours from a step that ran twice.
        redis.call('PEXPIRE', lease, lease_ms)
        answer = 'ok'
        if seq ~= '' then
          local last = redis.call('GET', seqkey)
          if last and tonumber(last) >= tonumber(seq) then
            redis.call('DEL', lease)
            answer = 'stale'
          end
        end
      end
    end
  else
    answer = ''
    if redis.call('EXISTS', sent) == 0 then
      answer = redis.call('XADD', KEYS[1], 'MAXLEN', '~', maxlen, '*', unpack(call, 4))
      redis.call('SET', sent, '1', 'EX', dedupe_ttl)
      if seq ~= '' then
        local last = redis.call('GET', seqkey)
        if (not last) or tonumber(last) < tonumber(seq) then
          redis.call('SET', seqkey, seq, 'EX', seq_ttl)
        end
      end
    end
    if redis.call('GET', lease) == token then redis.call('DEL', lease) end
  end
  out[i] = answer
end
return out
"#;

/// Starts or lengthens a team's cooldown after a 429, for every replica:
/// KEYS: cooldown. ARGV: ms.
const COOL_DOWN: &str = r#"
if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[1]) then
  redis.call('SET', KEYS[1], '1', 'PX', ARGV[1])
end
return 0
"#;

/// Frees a lease this worker holds: KEYS: lease. ARGV: token.
const RELEASE: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"#;

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
pub struct Buffer {
    client: Client,
    settings: BufferSettings,
    /// The script arguments that are the same for every job, written once at start-up.
    fixed: Arc<FixedArgs>,
    steps: Script,
    release: Script,
    cool_down: Script,
    /// The batching task's inbox, started with the first call (which runs on the runtime).
    batches: Arc<OnceLock<mpsc::UnboundedSender<Call>>>,
    /// Set by `quit`, so that `start`'s connect loop does not bring back a client that was
    /// shut down on purpose.
    quitting: Arc<AtomicBool>,
}

/// Keys and script arguments derived from the settings.
#[derive(Debug)]
struct FixedArgs {
    stream_key: String,
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
    /// Unique per job round, so that only the holder frees the lease.
    token: String,
    seq: Option<i64>,
}

impl Buffer {
    /// Builds the client; it connects in the background and keeps reconnecting.
    ///
    /// Fails only when the URL cannot be parsed.
    pub fn new(url: &str, settings: BufferSettings) -> Result<Buffer, Error> {
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
            lease_ms: settings.lease_ttl.as_millis().to_string(),
            stream_maxlen: settings.stream_maxlen.to_string(),
            dedupe_ttl_s: settings.dedupe_ttl.as_secs().max(1).to_string(),
            sequence_ttl_s: SEQUENCE_TTL_SECS.to_string(),
        });
        Ok(Buffer {
            fixed,
            client,
            settings,
            steps: Script::from_lua(STEPS),
            release: Script::from_lua(RELEASE),
            cool_down: Script::from_lua(COOL_DOWN),
            batches: Arc::new(OnceLock::new()),
            quitting: Arc::new(AtomicBool::new(false)),
        })
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
            let mut pause = Duration::from_millis(100);
            while !quitting.load(Ordering::SeqCst) {
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
                pause = (pause * 2).min(Duration::from_secs(5));
            }
        });
    }

    /// Connects and waits for the first connection; for one-shot commands such as `check`.
    pub async fn connect(&self) -> Result<(), Error> {
        self.client.init().await.map(|_| ())
    }

    pub async fn ping(&self) -> Result<(), Error> {
        self.client.ping::<String>(None).await.map(|_| ())
    }

    pub async fn quit(&self) {
        self.quitting.store(true, Ordering::SeqCst);
        let _ = self.client.quit().await;
    }

    pub fn stream_key(&self) -> &str {
        &self.fixed.stream_key
    }

    /// The keys one job touches. `lease_on` is the incident alias for a metric alert, else the
    /// notification uuid (so two copies of one notification are never sent at once).
    pub fn keys(
        &self,
        notification_uuid: &str,
        team: &str,
        lease_on: &str,
        seq: Option<i64>,
        token: String,
    ) -> Arc<JobKeys> {
        let p = &self.settings.prefix;
        Arc::new(JobKeys {
            sent: format!("{p}sent:{notification_uuid}"),
            lease: format!("{p}lease:{lease_on}"),
            sequence: format!("{p}seq:{lease_on}"),
            cooldown: format!("{p}cooldown:{team}"),
            token,
            seq,
        })
    }

    /// Checks whether the job may be sent now, taking the lease when it may.
    pub async fn admit(&self, keys: &Arc<JobKeys>) -> Result<Admission, Error> {
        let answer = self.batched(Arc::clone(keys), None).await?;
        if let Some(ms) = answer.strip_prefix("cooldown:") {
            return Ok(Admission::Cooldown(Duration::from_millis(
                ms.parse().unwrap_or(1000),
            )));
        }
        Ok(match answer.as_str() {
            "duplicate" => Admission::Duplicate,
            "stale" => Admission::Stale,
            "busy" => Admission::Busy,
            _ => Admission::Go,
        })
    }

    /// Writes the stream entry, the sent marker and the incident's sequence, and frees the
    /// lease, atomically. Returns the stream entry id, or "" when the notification was
    /// already recorded (nothing is written then but the lease is freed).
    pub async fn record(&self, keys: &Arc<JobKeys>, fields: &Fields) -> Result<String, Error> {
        self.batched(Arc::clone(keys), Some(Arc::clone(fields)))
            .await
    }

    /// Runs an admission check or a record as part of the next batch. The calls of concurrent
    /// jobs share one script call, one write and one round trip instead of one each: per job,
    /// the Redis client's work was a large share of the worker's CPU. A batch is sent as soon
    /// as the one before it is answered, so a lone call waits for nothing.
    async fn batched(&self, keys: Arc<JobKeys>, record: Option<Fields>) -> Result<String, Error> {
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
    // Loaded up front so that the first batch finds it (and again after a NOSCRIPT).
    let _ = steps.load(&client).await;
    while let Some(first) = calls.recv().await {
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match calls.try_recv() {
                Ok(call) => batch.push(call),
                Err(_) => break,
            }
        }
        let (keys, args) = step_words(&fixed, &batch);
        let answers: Result<Vec<String>, Error> =
            client.evalsha(steps.sha1().clone(), keys, args).await;
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
                // After a Redis restart the script is gone: load it; the callers try again.
                let reload = error.details().contains("NOSCRIPT");
                for call in batch.drain(..) {
                    let _ = call.reply.send(Err(error.clone()));
                }
                if reload {
                    let _ = steps.load(&client).await;
                }
            }
        }
    }
}

/// The keys and arguments of one `STEPS` call.
fn step_words(fixed: &FixedArgs, batch: &[Call]) -> (Vec<Key>, Vec<Value>) {
    let mut keys: Vec<Key> = Vec::with_capacity(1 + 4 * batch.len());
    keys.push(fixed.stream_key.as_str().into());
    // Every job's arguments in one JSON word: one string to build and send instead of a
    // dozen or more per job, which the client would each copy, frame and free.
    let mut calls: Vec<u8> = Vec::with_capacity(64 + 512 * batch.len());
    calls.push(b'[');
    for (i, call) in batch.iter().enumerate() {
        let k = &call.keys;
        keys.extend([
            Key::from(k.sent.as_str()),
            Key::from(k.lease.as_str()),
            Key::from(k.sequence.as_str()),
            Key::from(k.cooldown.as_str()),
        ]);
        if i > 0 {
            calls.push(b',');
        }
        calls.extend_from_slice(if call.record.is_some() {
            b"[\"r\","
        } else {
            b"[\"a\","
        });
        json_string(&mut calls, &k.token);
        calls.extend_from_slice(b",\"");
        if let Some(seq) = k.seq {
            calls.extend_from_slice(itoa::Buffer::new().format(seq).as_bytes());
        }
        calls.push(b'"');
        for (name, value) in call.record.as_deref().unwrap_or_default() {
            calls.push(b',');
            json_string(&mut calls, name);
            calls.push(b',');
            json_string(&mut calls, value);
        }
        calls.push(b']');
    }
    calls.push(b']');
    let args = vec![
        Value::from(fixed.lease_ms.as_str()),
        Value::from(fixed.stream_maxlen.as_str()),
        Value::from(fixed.dedupe_ttl_s.as_str()),
        Value::from(fixed.sequence_ttl_s.as_str()),
        Value::Bytes(calls.into()),
    ];
    (keys, args)
}

/// `s` as a JSON string.
fn json_string(out: &mut Vec<u8>, s: &str) {
    out.push(b'"');
    opsgenie_shared::text::json_escaped(s, |piece| out.extend_from_slice(piece.as_bytes()));
    out.push(b'"');
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn settings() -> BufferSettings {
        BufferSettings {
            prefix: "t:".into(),
            stream_maxlen: 10,
            dedupe_ttl: Duration::from_secs(1),
            lease_ttl: Duration::from_secs(1),
        }
    }

    #[test]
    fn production_urls_are_understood() {
        crate::init_tls();
        for url in [
            "redis://127.0.0.1:6379",
            "rediss://user:pw@redis.internal:6380/2",
            "redis-sentinel://sentinel-a:26379/0?sentinelServiceName=mymaster&node=sentinel-b:26379",
            "rediss-sentinel://sentinel-a:26379/0?sentinelServiceName=mymaster",
        ] {
            assert!(Buffer::new(url, settings()).is_ok(), "{url}");
        }
        assert!(Buffer::new("http://nope", settings()).is_err());
    }

    #[test]
    fn keys_carry_the_prefix() {
        let buffer = Buffer::new("redis://127.0.0.1:6379", settings()).unwrap();
        let keys = buffer.keys("u-1", "ops", "incident_1_2", Some(5), "tok".into());
        assert_eq!(keys.sent, "t:sent:u-1");
        assert_eq!(keys.lease, "t:lease:incident_1_2");
        assert_eq!(keys.sequence, "t:seq:incident_1_2");
        assert_eq!(keys.cooldown, "t:cooldown:ops");
        assert_eq!(buffer.stream_key(), "t:deliveries");
    }

    /// Against the machine's Redis, under a prefix of its own.
    async fn live_buffer() -> (Buffer, String) {
        let prefix = format!("test:buffer:{:x}:", rand::random::<u64>());
        let buffer = Buffer::new(
            "redis://127.0.0.1:6379",
            BufferSettings {
                prefix: prefix.clone(),
                stream_maxlen: 1000,
                dedupe_ttl: Duration::from_secs(60),
                lease_ttl: Duration::from_secs(60),
            },
        )
        .unwrap();
        buffer.connect().await.expect("Redis at 127.0.0.1:6379");
        (buffer, prefix)
    }

    async fn clean(buffer: &Buffer, prefix: &str) {
        let keys: Vec<String> = buffer
            .client
            .custom(fred::cmd!("KEYS"), vec![format!("{prefix}*")])
            .await
            .unwrap();
        if !keys.is_empty() {
            let _: i64 = buffer.client.del(keys).await.unwrap();
        }
        buffer.quit().await;
    }

    fn token() -> String {
        format!("{:032x}", rand::random::<u128>())
    }

    #[tokio::test]
    async fn each_call_of_a_batch_gets_its_own_answer() {
        let (buffer, prefix) = live_buffer().await;
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
            let keys = buffer.keys(&uuid, "ops", &uuid, None, token());
            assert_eq!(buffer.admit(&keys).await.unwrap(), Admission::Go);
            assert!(
                !buffer
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
            let keys = buffer.keys(uuid, "ops", uuid, None, token());
            let buffer = buffer.clone();
            async move { buffer.admit(&keys).await.unwrap() }
        }))
        .await;
        for ((uuid, expected), answer) in asks.iter().zip(answers) {
            assert_eq!(&answer, expected, "{uuid}");
        }
        // The stream holds each recorded notification once, with its fields as they were.
        let entries: Vec<(String, HashMap<String, String>)> = buffer
            .client
            .xrange(buffer.stream_key(), "-", "+", None)
            .await
            .unwrap();
        assert_eq!(entries.len(), 20);
        assert_eq!(entries[3].1["notification_uuid"], "old-3");
        assert_eq!(entries[3].1["title"], fields("x")[1].1);
        clean(&buffer, &prefix).await;
    }

    #[tokio::test]
    async fn leases_sequences_cooldowns_and_a_repeated_record() {
        let (buffer, prefix) = live_buffer().await;
        let alias = "incident_1_9";
        let first = buffer.keys("m-1", "ops", alias, Some(5), token());
        assert_eq!(buffer.admit(&first).await.unwrap(), Admission::Go);
        // Asked again by the same round (a step that ran twice): still ours.
        assert_eq!(buffer.admit(&first).await.unwrap(), Admission::Go);
        let rival = buffer.keys("m-2", "ops", alias, Some(6), token());
        assert_eq!(buffer.admit(&rival).await.unwrap(), Admission::Busy);
        let fields: Fields = vec![("notification_uuid", "m-1".to_string())].into();
        let id = buffer.record(&first, &fields).await.unwrap();
        assert!(id.contains('-'), "{id}");
        // A record whose answer was lost is sent again: it adds nothing.
        assert_eq!(buffer.record(&first, &fields).await.unwrap(), "");
        let length: u64 = buffer.client.xlen(buffer.stream_key()).await.unwrap();
        assert_eq!(length, 1);
        // The lease is free again; an older or equal status of the incident is stale.
        let older = buffer.keys("m-0", "ops", alias, Some(5), token());
        assert_eq!(buffer.admit(&older).await.unwrap(), Admission::Stale);
        assert_eq!(buffer.admit(&rival).await.unwrap(), Admission::Go);
        buffer.release(&rival).await.unwrap();
        // A 429 on the team's key holds every admission of the team.
        buffer
            .cool_down("ops", Duration::from_secs(30))
            .await
            .unwrap();
        let later = buffer.keys("u-9", "ops", "u-9", None, token());
        match buffer.admit(&later).await.unwrap() {
            Admission::Cooldown(wait) => assert!(wait > Duration::from_secs(25), "{wait:?}"),
            other => panic!("{other:?}"),
        }
        let other_team = buffer.keys("u-9", "dev", "u-9", None, token());
        assert_eq!(buffer.admit(&other_team).await.unwrap(), Admission::Go);
        clean(&buffer, &prefix).await;
    }
}

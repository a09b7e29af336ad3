//! The Redis boundary (SPEC section 7): the checks before a request (already delivered? a
//! stale incident status? another replica on this incident?) and the atomic record after it.
//! Each is one Lua script, so one round trip and no half-written state.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use fred::prelude::*;
use fred::types::scripts::Script;
use tokio::sync::{mpsc, oneshot};

/// The most calls sent in one pipeline.
const MAX_BATCH: usize = 128;

/// One script call waiting for a batch.
struct Call {
    record: bool,
    keys: Vec<String>,
    args: Vec<String>,
    reply: oneshot::Sender<Result<Value, Error>>,
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

/// Checks and takes the lease in one step:
/// KEYS: sent marker, lease, sequence, the team's cooldown. ARGV: lease token, lease ms,
/// sequence or "". Returns "duplicate", "cooldown:<ms>", "busy", "stale" or "ok" (lease taken).
const ACQUIRE: &str = r#"
if redis.call('EXISTS', KEYS[1]) == 1 then return 'duplicate' end
local cool = redis.call('PTTL', KEYS[4])
if cool > 0 then return 'cooldown:' .. cool end
if redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) == false then
  if redis.call('GET', KEYS[2]) ~= ARGV[1] then return 'busy' end
  redis.call('PEXPIRE', KEYS[2], ARGV[2])
end
if ARGV[3] ~= '' then
  local last = redis.call('GET', KEYS[3])
  if last and tonumber(last) >= tonumber(ARGV[3]) then
    redis.call('DEL', KEYS[2])
    return 'stale'
  end
end
return 'ok'
"#;

/// Records a delivery and frees the lease:
/// KEYS: stream, sent marker, sequence, lease. ARGV: maxlen, dedupe ttl s, sequence or "",
/// sequence ttl s, lease token, then the stream entry's field/value pairs.
/// Returns the new entry's id, or "" when the delivery was already recorded.
///
/// A record whose answer was lost (the connection dropped after Redis ran it) is sent again,
/// by the client's own retry or by ours; the sent marker makes that second run add nothing,
/// so that the stream keeps one entry per notification.
const RECORD: &str = r#"
if redis.call('EXISTS', KEYS[2]) == 1 then
  if redis.call('GET', KEYS[4]) == ARGV[5] then redis.call('DEL', KEYS[4]) end
  return ''
end
local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', unpack(ARGV, 6))
redis.call('SET', KEYS[2], '1', 'EX', ARGV[2])
if ARGV[3] ~= '' then
  local last = redis.call('GET', KEYS[3])
  if (not last) or tonumber(last) < tonumber(ARGV[3]) then
    redis.call('SET', KEYS[3], ARGV[3], 'EX', ARGV[4])
  end
end
if redis.call('GET', KEYS[4]) == ARGV[5] then redis.call('DEL', KEYS[4]) end
return id
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
    acquire: Script,
    record: Script,
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
            acquire: Script::from_lua(ACQUIRE),
            record: Script::from_lua(RECORD),
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
    ) -> JobKeys {
        let p = &self.settings.prefix;
        JobKeys {
            sent: format!("{p}sent:{notification_uuid}"),
            lease: format!("{p}lease:{lease_on}"),
            sequence: format!("{p}seq:{lease_on}"),
            cooldown: format!("{p}cooldown:{team}"),
            token,
            seq,
        }
    }

    // The client's futures are about 7 KiB each; boxed, every job's task stays small and is
    // not copied around whole on each call.

    /// Checks whether the job may be sent now, taking the lease when it may.
    pub async fn admit(&self, keys: &JobKeys) -> Result<Admission, Error> {
        let seq = keys.seq.map(|s| s.to_string()).unwrap_or_default();

        let answer: String = self
            .batched(
                false,
                vec![
                    keys.sent.clone(),
                    keys.lease.clone(),
                    keys.sequence.clone(),
                    keys.cooldown.clone(),
                ],
                vec![keys.token.clone(), self.fixed.lease_ms.clone(), seq],
            )
            .await?
            .convert()?;
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
    pub async fn record(
        &self,
        keys: &JobKeys,
        fields: &[(&'static str, String)],
    ) -> Result<String, Error> {
        let seq = keys.seq.map(|s| s.to_string()).unwrap_or_default();
        let mut args: Vec<String> = Vec::with_capacity(5 + fields.len() * 2);
        args.push(self.fixed.stream_maxlen.clone());
        args.push(self.fixed.dedupe_ttl_s.clone());
        args.push(seq);
        args.push(self.fixed.sequence_ttl_s.clone());
        args.push(keys.token.clone());
        for (name, value) in fields {
            args.push((*name).to_string());
            args.push(value.clone());
        }
        let keys = vec![
            self.fixed.stream_key.clone(),
            keys.sent.clone(),
            keys.sequence.clone(),
            keys.lease.clone(),
        ];
        self.batched(true, keys, args).await?.convert()
    }

    /// Runs the admission or the record script as part of the next pipeline. Concurrent jobs'
    /// calls share one write and one round trip instead of one each: per job, two writes
    /// to Redis were a large share of the worker's CPU. A batch is sent as soon as the one
    /// before it is answered, so a lone call waits for nothing.
    async fn batched(
        &self,
        record: bool,
        keys: Vec<String>,
        args: Vec<String>,
    ) -> Result<Value, Error> {
        let inbox = self.batches.get_or_init(|| {
            let (inbox, calls) = mpsc::unbounded_channel();
            tokio::spawn(run_batches(
                self.client.clone(),
                self.acquire.clone(),
                self.record.clone(),
                calls,
            ));
            inbox
        });
        let (reply, answer) = oneshot::channel();
        inbox
            .send(Call {
                record,
                keys,
                args,
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

/// Sends the calls that are waiting as one pipeline, answers each, and goes on.
async fn run_batches(
    client: Client,
    acquire: Script,
    record: Script,
    mut calls: mpsc::UnboundedReceiver<Call>,
) {
    let mut batch: Vec<Call> = Vec::with_capacity(MAX_BATCH);
    // A pipeline cannot load a script on demand: load them first (again after a NOSCRIPT).
    let _ = acquire.load(&client).await;
    let _ = record.load(&client).await;
    while let Some(first) = calls.recv().await {
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match calls.try_recv() {
                Ok(call) => batch.push(call),
                Err(_) => break,
            }
        }
        let pipeline = client.pipeline();
        let mut replies = Vec::with_capacity(batch.len());
        for call in batch.drain(..) {
            let script = if call.record { &record } else { &acquire };
            let mut words: Vec<String> = Vec::with_capacity(2 + call.keys.len() + call.args.len());
            words.push(script.sha1().to_string());
            words.push(call.keys.len().to_string());
            words.extend(call.keys);
            words.extend(call.args);
            // Queued, not sent: a pipeline answers at `try_all`.
            let queued: Result<(), Error> = pipeline.custom(fred::cmd!("EVALSHA"), words).await;
            match queued {
                Ok(()) => replies.push(call.reply),
                Err(error) => {
                    let _ = call.reply.send(Err(error));
                }
            }
        }
        if replies.is_empty() {
            continue;
        }
        let results = pipeline.try_all::<Value>().await;
        let mut reload = false;
        let mut results = results.into_iter();
        for reply in replies {
            let result = results.next().unwrap_or_else(|| {
                Err(Error::new(ErrorKind::Unknown, "no answer in the pipeline"))
            });
            if let Err(error) = &result {
                reload |= error.details().contains("NOSCRIPT");
            }
            let _ = reply.send(result);
        }
        // After a Redis restart the scripts are gone: load them; the callers try again.
        if reload {
            let _ = acquire.load(&client).await;
            let _ = record.load(&client).await;
        }
    }
}

#[cfg(test)]
mod tests {
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
}

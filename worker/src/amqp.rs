//! The RabbitMQ boundary (docs/contract.md section 8): the topology, consuming, and the confirmed
//! publishes that make a retry or a dead letter durable before the original is acked.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, ExchangeKind,
};
use opsgenie_shared::DeadReason;
use opsgenie_shared::retry::format_duration;
use opsgenie_shared::text::cap_bytes;
use sha2::{Digest, Sha256};

use crate::config::{BrokerArgs, QueueType};

pub const HEADER_ERROR: &str = "x-opsgenie-error";
pub const HEADER_ERROR_MESSAGE: &str = "x-opsgenie-error-message";
pub const HEADER_STATUS: &str = "x-opsgenie-status";
pub const HEADER_ATTEMPTS: &str = "x-opsgenie-attempts";
/// When a worker first saw the job (ms since the epoch), carried through retries for `--max-age`.
pub const HEADER_FIRST_SEEN: &str = "x-opsgenie-first-seen-ms";
/// When the job was dead-lettered (ms since the epoch), for `dead list`.
pub const HEADER_DEAD_AT: &str = "x-opsgenie-dead-at-ms";
/// Set (to the bytes they took) when a message's own headers were left off its copy because
/// the copy would not have fitted in one frame with them.
pub const HEADER_DROPPED: &str = "x-opsgenie-headers-dropped";

/// The most bytes a header value the worker writes holds (docs/contract.md section 8).
pub const HEADER_VALUE_LIMIT: usize = 1024;

/// A content header frame's bytes besides the properties: frame type, channel and size (7),
/// class, weight and body size (12), frame end (1).
const HEADER_FRAME_OVERHEAD: usize = 20;

/// The names of docs/contract.md section 8, derived once from the flags.
#[derive(Debug, Clone)]
pub struct Topology {
    pub exchange: String,
    pub routing_key: String,
    pub queue: String,
    pub queue_type: QueueType,
    /// `(name, delay)` per retry tier, shortest first.
    pub retry_queues: Vec<(String, Duration)>,
    pub dead_queue: String,
}

impl Topology {
    pub fn new(args: &BrokerArgs) -> Topology {
        let retry_queues = args
            .retry_delays
            .0
            .iter()
            .map(|d| (format!("{}.retry.{}", args.queue, format_duration(*d)), *d))
            .collect();
        Topology {
            exchange: args.exchange.clone(),
            routing_key: args.routing_key.clone(),
            queue: args.queue.clone(),
            queue_type: args.queue_type,
            retry_queues,
            dead_queue: format!("{}.dead", args.queue),
        }
    }

    /// Every queue this topology declares: work, delay and dead-letter queues.
    pub fn queue_names(&self) -> Vec<&str> {
        let mut names = vec![self.queue.as_str(), self.dead_queue.as_str()];
        names.extend(self.retry_queues.iter().map(|(name, _)| name.as_str()));
        names
    }

    fn queue_arguments(&self) -> FieldTable {
        let mut args = FieldTable::default();
        if self.queue_type == QueueType::Quorum {
            args.insert(
                "x-queue-type".into(),
                AMQPValue::LongString("quorum".into()),
            );
        }
        args
    }

    /// Declares the exchange, the work queue and its binding, the delay queues and the
    /// dead-letter queue. Idempotent; fails when an existing queue was declared with other
    /// arguments (for example another queue type).
    pub async fn declare(&self, channel: &Channel) -> lapin::Result<()> {
        let durable = QueueDeclareOptions {
            durable: true,
            ..QueueDeclareOptions::default()
        };
        channel
            .exchange_declare(
                self.exchange.as_str().into(),
                ExchangeKind::Direct,
                ExchangeDeclareOptions {
                    durable: true,
                    ..ExchangeDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await?;
        channel
            .queue_declare(self.queue.as_str().into(), durable, self.queue_arguments())
            .await?;
        channel
            .queue_bind(
                self.queue.as_str().into(),
                self.exchange.as_str().into(),
                self.routing_key.as_str().into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
        // One queue per delay, each with a single TTL: messages expire in the order they came,
        // so a short delay never waits behind a long one. Expired messages go back to the
        // exchange with the work queue's routing key.
        for (name, delay) in &self.retry_queues {
            let mut args = self.queue_arguments();
            args.insert(
                "x-message-ttl".into(),
                AMQPValue::LongLongInt(i64::try_from(delay.as_millis()).unwrap_or(i64::MAX)),
            );
            args.insert(
                "x-dead-letter-exchange".into(),
                AMQPValue::LongString(self.exchange.as_str().into()),
            );
            args.insert(
                "x-dead-letter-routing-key".into(),
                AMQPValue::LongString(self.routing_key.as_str().into()),
            );
            if self.queue_type == QueueType::Quorum {
                // Quorum queues drop dead-lettered messages unless told to keep them safe.
                args.insert(
                    "x-dead-letter-strategy".into(),
                    AMQPValue::LongString("at-least-once".into()),
                );
                args.insert(
                    "x-overflow".into(),
                    AMQPValue::LongString("reject-publish".into()),
                );
            }
            channel
                .queue_declare(name.as_str().into(), durable, args)
                .await?;
        }
        channel
            .queue_declare(
                self.dead_queue.as_str().into(),
                durable,
                self.queue_arguments(),
            )
            .await?;
        Ok(())
    }
}

/// Opens a connection; its heartbeat and name come from here so that every command agrees.
pub async fn connect(url: &str, name: &str) -> lapin::Result<Connection> {
    let props =
        ConnectionProperties::default().with_connection_name(LongString::from(name.to_string()));
    Connection::connect(url, props).await
}

/// How often `sample_queue_length` asks the broker.
pub const QUEUE_SAMPLE_INTERVAL: Duration = Duration::from_secs(15);

/// Sets `opsgenie_queue_messages{queue}` to the queue's ready messages now and every
/// `QUEUE_SAMPLE_INTERVAL`, by a passive declare on `channel` (which changes nothing), so
/// that a backlog nobody drains can be alerted on without the broker's own exporter. Ends at
/// shutdown, or when the channel fails (the consumer's reconnect starts a new sampler).
pub async fn sample_queue_length(
    channel: Channel,
    queue: String,
    shutdown: crate::shutdown::Shutdown,
) {
    let passive = QueueDeclareOptions {
        passive: true,
        ..QueueDeclareOptions::default()
    };
    loop {
        match channel
            .queue_declare(queue.as_str().into(), passive, FieldTable::default())
            .await
        {
            Ok(declared) => {
                metrics::gauge!(crate::catalogue::QUEUE_MESSAGES, "queue" => queue.clone())
                    .set(f64::from(declared.message_count()));
            }
            Err(error) => {
                tracing::debug!(error = %error, "Could not sample the queue's length.");
                return;
            }
        }
        let next = tokio::time::Instant::now() + QUEUE_SAMPLE_INTERVAL;
        if !shutdown.sleep_until(next).await {
            return;
        }
    }
}

/// A channel in confirm mode, shared by every task that republishes or dead-letters.
#[derive(Clone)]
pub struct Publisher {
    channel: Channel,
    /// The most bytes the properties of one message may take: the content header must fit
    /// in one frame of the size the broker negotiated, or the broker closes the connection
    /// (FRAME_ERROR) and with it the consumer that shares it.
    properties_budget: usize,
}

/// Why a publish did not become durable.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("broker error: {0}")]
    Broker(#[from] lapin::Error),
    #[error("the broker refused the message (nack)")]
    Nacked,
    #[error("the message could not be routed (no queue {0})")]
    Unroutable(String),
}

impl Publisher {
    pub async fn new(connection: &Connection) -> lapin::Result<Publisher> {
        let channel = connection.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        let frame_max =
            usize::try_from(connection.configuration().frame_max()).unwrap_or(usize::MAX);
        Ok(Publisher {
            channel,
            properties_budget: properties_budget(frame_max),
        })
    }

    /// Publishes and waits for the broker's confirm. `mandatory` so that a missing queue is an
    /// error rather than a silent drop.
    pub async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
    ) -> Result<(), PublishError> {
        let confirm = self
            .channel
            .basic_publish(
                exchange.into(),
                routing_key.into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                body,
                properties,
            )
            .await?
            .await?;
        match confirm {
            Confirmation::Ack(None) | Confirmation::NotRequested => Ok(()),
            Confirmation::Ack(Some(_)) => Err(PublishError::Unroutable(routing_key.to_string())),
            Confirmation::Nack(_) => Err(PublishError::Nacked),
        }
    }

    /// Sends a job to delay queue `queue` with its attempt count and first-seen time.
    pub async fn schedule_retry(
        &self,
        queue: &str,
        body: &[u8],
        properties: &BasicProperties,
        attempts: u32,
        first_seen_ms: u64,
    ) -> Result<(), PublishError> {
        let ours = [
            (HEADER_ATTEMPTS, AMQPValue::LongLongInt(attempts.into())),
            (
                HEADER_FIRST_SEEN,
                AMQPValue::LongLongInt(i64::try_from(first_seen_ms).unwrap_or(i64::MAX)),
            ),
        ];
        let copy = copy_properties(properties, &ours, self.properties_budget);
        self.publish("", queue, body, copy).await
    }

    /// Sends a job to the dead-letter queue with the original body and properties and the
    /// error headers of docs/contract.md section 8.
    pub async fn dead_letter(
        &self,
        queue: &str,
        body: &[u8],
        properties: &BasicProperties,
        letter: &DeadLetter,
    ) -> Result<(), PublishError> {
        let mut ours = vec![
            (
                HEADER_ERROR,
                AMQPValue::LongString(letter.reason.as_str().into()),
            ),
            (
                HEADER_ERROR_MESSAGE,
                AMQPValue::LongString(
                    cap_bytes(&letter.message, HEADER_VALUE_LIMIT)
                        .as_ref()
                        .into(),
                ),
            ),
            (
                HEADER_ATTEMPTS,
                AMQPValue::LongLongInt(letter.attempts.into()),
            ),
            (
                HEADER_DEAD_AT,
                AMQPValue::LongLongInt(i64::try_from(now_ms()).unwrap_or(i64::MAX)),
            ),
        ];
        if let Some(status) = letter.status {
            ours.push((HEADER_STATUS, AMQPValue::LongLongInt(status.into())));
        }
        let copy = copy_properties(properties, &ours, self.properties_budget);
        self.publish("", queue, body, copy).await
    }
}

/// The properties budget for a broker's `frame_max`, with room to spare.
fn properties_budget(frame_max: usize) -> usize {
    frame_max.saturating_sub(HEADER_FRAME_OVERHEAD + 64)
}

/// The properties of a job's copy (a retry or a dead letter): the original's, less RabbitMQ's
/// `x-death`, with `ours` added, persistent. When that would not fit in `budget` bytes, the
/// original's own headers are left off (`x-opsgenie-headers-dropped` says how many bytes they
/// took); when even that would not fit (other properties at their 255-byte maximum under a
/// tiny frame size), only the content type, the message id and `ours` are kept. A copy can
/// therefore always be published: a message can never come back because its dead letter was
/// too large.
pub fn copy_properties(
    properties: &BasicProperties,
    ours: &[(&str, AMQPValue)],
    budget: usize,
) -> BasicProperties {
    let with = |mut headers: FieldTable| {
        for (name, value) in ours {
            headers.insert((*name).into(), value.clone());
        }
        headers
    };
    let full = persistent(properties, with(job_headers(properties)));
    if encoded_size(&full) <= budget {
        return full;
    }
    let dropped = properties.headers().as_ref().map_or(0, |h| {
        encoded_size(&BasicProperties::default().with_headers(h.clone()))
    });
    let mut headers = with(FieldTable::default());
    headers.insert(
        HEADER_DROPPED.into(),
        AMQPValue::LongLongInt(i64::try_from(dropped).unwrap_or(i64::MAX)),
    );
    tracing::warn!(
        header_bytes = dropped,
        budget,
        "The message's own headers do not fit in one frame with ours; its copy goes without them."
    );
    let lean = persistent(properties, headers.clone());
    if encoded_size(&lean) <= budget {
        return lean;
    }
    let mut minimal = BasicProperties::default()
        .with_delivery_mode(2)
        .with_headers(headers);
    if let Some(content_type) = properties.content_type() {
        minimal = minimal.with_content_type(content_type.clone());
    }
    if let Some(message_id) = properties.message_id() {
        minimal = minimal.with_message_id(message_id.clone());
    }
    minimal
}

/// The bytes `properties` take in a content header frame, as the AMQP library writes them.
pub fn encoded_size(properties: &BasicProperties) -> usize {
    cookie_factory::gen_simple(
        lapin::protocol::basic::gen_properties(properties),
        Vec::new(),
    )
    .map_or(usize::MAX, |bytes| bytes.len())
}

/// What a dead letter says about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    pub reason: DeadReason,
    pub message: String,
    pub status: Option<u16>,
    pub attempts: u32,
}

/// The message's own headers, less RabbitMQ's `x-death` bookkeeping (which only grows).
pub fn job_headers(properties: &BasicProperties) -> FieldTable {
    let mut table = FieldTable::default();
    if let Some(headers) = properties.headers() {
        for (k, v) in headers.inner() {
            if k.as_str() != "x-death" {
                table.insert(k.clone(), v.clone());
            }
        }
    }
    table
}

fn persistent(properties: &BasicProperties, headers: FieldTable) -> BasicProperties {
    properties
        .clone()
        .with_delivery_mode(2)
        .with_headers(headers)
}

/// Returns a delivery to its queue now (it would return anyway once its channel closes).
pub async fn requeue(delivery: &lapin::message::Delivery) {
    let _ = delivery
        .acker
        .nack(lapin::options::BasicNackOptions {
            multiple: false,
            requeue: true,
        })
        .await;
}

/// A header as a whole number, whichever integer type the producer used.
pub fn header_u64(properties: &BasicProperties, name: &str) -> Option<u64> {
    let value = properties.headers().as_ref()?.inner().get(name)?;
    let n: i128 = match value {
        AMQPValue::ShortShortInt(v) => (*v).into(),
        AMQPValue::ShortShortUInt(v) => (*v).into(),
        AMQPValue::ShortInt(v) => (*v).into(),
        AMQPValue::ShortUInt(v) => (*v).into(),
        AMQPValue::LongInt(v) => (*v).into(),
        AMQPValue::LongUInt(v) => (*v).into(),
        AMQPValue::LongLongInt(v) => (*v).into(),
        AMQPValue::Timestamp(v) => (*v).into(),
        AMQPValue::LongString(s) => std::str::from_utf8(s.as_bytes()).ok()?.parse().ok()?,
        AMQPValue::ShortString(s) => s.as_str().parse().ok()?,
        _ => return None,
    };
    u64::try_from(n).ok()
}

/// A header as text.
pub fn header_str(properties: &BasicProperties, name: &str) -> Option<String> {
    let value = properties.headers().as_ref()?.inner().get(name)?;
    match value {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_string()),
        other => header_u64(properties, name)
            .map(|n| n.to_string())
            .or_else(|| Some(format!("{other:?}"))),
    }
}

/// Properties for a new job published by `enqueue` or a producer.
pub fn job_properties(notification_uuid: &str) -> BasicProperties {
    BasicProperties::default()
        .with_content_type(ShortString::from("application/json"))
        .with_delivery_mode(2)
        .with_message_id(job_message_id(notification_uuid))
        .with_timestamp(now_ms() / 1000)
}

/// The `message-id` of a job: its `notification_uuid` when that fits in an AMQP short string
/// (255 bytes), otherwise `sha256:` and the hex SHA-256 of it. A valid uuid can be 400 bytes
/// (100 four-byte characters); the hash keeps the id stable for it instead of refusing the job.
pub fn job_message_id(notification_uuid: &str) -> ShortString {
    ShortString::try_new(notification_uuid).unwrap_or_else(|_| {
        // 7 + 64 bytes: always a short string.
        ShortString::from(format!(
            "sha256:{:x}",
            Sha256::digest(notification_uuid.as_bytes())
        ))
    })
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Delays;

    #[test]
    fn names_follow_the_queue_flag() {
        let args = BrokerArgs {
            amqp_url: "amqps://user:pw@broker.internal:5671/prod".into(),
            exchange: "opsgenie".into(),
            queue: "team-a.alerts".into(),
            routing_key: "alert".into(),
            queue_type: QueueType::Quorum,
            retry_delays: Delays(vec![
                Duration::from_secs(5),
                Duration::from_secs(120),
                Duration::from_secs(1800),
            ]),
        };
        let t = Topology::new(&args);
        assert_eq!(t.dead_queue, "team-a.alerts.dead");
        let names: Vec<&str> = t.retry_queues.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "team-a.alerts.retry.5s",
                "team-a.alerts.retry.2m",
                "team-a.alerts.retry.30m"
            ]
        );
        assert!(
            args.amqp_url.parse::<lapin::uri::AMQPUri>().is_ok(),
            "amqps URLs parse"
        );
    }

    #[test]
    fn headers_of_any_integer_type_are_read() {
        let mut table = FieldTable::default();
        table.insert("a".into(), AMQPValue::LongInt(3));
        table.insert("b".into(), AMQPValue::LongString("17".into()));
        table.insert(
            "x-death".into(),
            AMQPValue::LongString("bookkeeping".into()),
        );
        let props = BasicProperties::default().with_headers(table);
        assert_eq!(header_u64(&props, "a"), Some(3));
        assert_eq!(header_u64(&props, "b"), Some(17));
        assert_eq!(header_u64(&props, "missing"), None);
        assert!(!job_headers(&props).inner().contains_key("x-death"));
    }

    fn big_headers(bytes: usize) -> FieldTable {
        let mut table = FieldTable::default();
        table.insert(
            "x-producer-trace".into(),
            AMQPValue::LongString("t".repeat(bytes).into()),
        );
        table.insert(
            "x-death".into(),
            AMQPValue::LongString("d".repeat(bytes).into()),
        );
        table
    }

    fn letter_headers(message: &str) -> Vec<(&'static str, AMQPValue)> {
        vec![
            (HEADER_ERROR, AMQPValue::LongString("invalid_job".into())),
            (
                HEADER_ERROR_MESSAGE,
                AMQPValue::LongString(cap_bytes(message, HEADER_VALUE_LIMIT).as_ref().into()),
            ),
        ]
    }

    #[test]
    fn a_copy_always_fits_the_negotiated_frame() {
        let budget = properties_budget(131_072);
        let long_id = ShortString::from("m".repeat(255));
        for (own, message) in [(0, "short"), (10_000, "x"), (130_000, "y"), (131_000, "z")] {
            let original = BasicProperties::default()
                .with_content_type("application/json".into())
                .with_message_id(long_id.clone())
                .with_headers(big_headers(own));
            let copy =
                copy_properties(&original, &letter_headers(&message.repeat(200_000)), budget);
            assert!(
                encoded_size(&copy) <= budget,
                "{own}: {}",
                encoded_size(&copy)
            );
            let headers = copy.headers().as_ref().unwrap().inner();
            assert!(!headers.contains_key("x-death"));
            let message_len = match &headers[HEADER_ERROR_MESSAGE] {
                AMQPValue::LongString(s) => s.as_bytes().len(),
                other => panic!("{other:?}"),
            };
            assert!(message_len <= HEADER_VALUE_LIMIT);
            // Kept when they fit, left off (and said so) when they do not.
            let kept = headers.contains_key("x-producer-trace");
            assert_eq!(kept, own < 100_000, "{own}");
            assert_eq!(headers.contains_key(HEADER_DROPPED), !kept);
            assert_eq!(copy.message_id().as_ref(), Some(&long_id));
            assert_eq!(copy.delivery_mode(), &Some(2));
        }
        // The smallest frame AMQP allows, and every other property at its largest.
        let budget = properties_budget(4096);
        let s = || ShortString::from("p".repeat(255));
        let crowded = BasicProperties::default()
            .with_content_type(s())
            .with_content_encoding(s())
            .with_correlation_id(s())
            .with_reply_to(s())
            .with_expiration(s())
            .with_message_id(s())
            .with_type(s())
            .with_user_id(s())
            .with_app_id(s())
            .with_cluster_id(s())
            .with_headers(big_headers(50));
        let copy = copy_properties(&crowded, &letter_headers(&"w".repeat(5000)), budget);
        assert!(encoded_size(&copy) <= budget, "{}", encoded_size(&copy));
        assert!(
            copy.headers()
                .as_ref()
                .unwrap()
                .inner()
                .contains_key(HEADER_ERROR)
        );
    }
}

//! The RabbitMQ boundary (docs/contract.md section 8): the topology, consuming, and the confirmed
//! publishes that make a retry or a dead letter durable before the original is acked.

use std::time::Duration;

use crate::support::clock::now_ms;

use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, ExchangeKind,
};
use opsgenie_shared::DeadReason;
use opsgenie_shared::retry::format_duration;
use opsgenie_shared::text::cap_bytes;
use sha2::{Digest, Sha256};

use crate::cli::{BrokerArgs, QueueType};
use crate::support::redact::{redact_error, redact_url};

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
    /// dead-letter queue. Idempotent; fails with `DeclareError::Conflict` when the broker has
    /// one of them with other properties or arguments (for example another queue type, or
    /// another deployment's dead-letter exchange).
    pub async fn declare(&self, channel: &Channel) -> Result<(), DeclareError> {
        self.declare_exchange(channel).await?;
        self.declare_queues(channel).await
    }

    /// Declares the exchange only: what a producer that names nothing else touches.
    pub async fn declare_exchange(&self, channel: &Channel) -> Result<(), DeclareError> {
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
            .await
            .map_err(|e| DeclareError::from_broker(e, "exchange", &self.exchange))
    }

    /// Declares the work queue and its binding, the delay queues and the dead-letter queue,
    /// with exactly the arguments the worker gives them. The exchange must exist.
    pub async fn declare_queues(&self, channel: &Channel) -> Result<(), DeclareError> {
        let durable = QueueDeclareOptions {
            durable: true,
            ..QueueDeclareOptions::default()
        };
        channel
            .queue_declare(self.queue.as_str().into(), durable, self.queue_arguments())
            .await
            .map_err(|e| DeclareError::from_broker(e, "queue", &self.queue))?;
        // One queue per delay, each with a single TTL: messages expire in the order they came,
        // so a short delay never waits behind a long one. Expired messages go back to the
        // exchange with the work queue's routing key.
        for (name, delay) in &self.retry_queues {
            channel
                .queue_declare(name.as_str().into(), durable, self.retry_arguments(*delay))
                .await
                .map_err(|e| DeclareError::from_broker(e, "queue", name))?;
        }
        channel
            .queue_declare(
                self.dead_queue.as_str().into(),
                durable,
                self.queue_arguments(),
            )
            .await
            .map_err(|e| DeclareError::from_broker(e, "queue", &self.dead_queue))?;
        // Bound last: a queue of another deployment that conflicts with ours is never bound
        // to this exchange.
        channel
            .queue_bind(
                self.queue.as_str().into(),
                self.exchange.as_str().into(),
                self.routing_key.as_str().into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
        Ok(())
    }

    /// The arguments of the delay queue for `delay`.
    fn retry_arguments(&self, delay: Duration) -> FieldTable {
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
        args
    }
}

/// Why the topology could not be declared.
#[derive(Debug, thiserror::Error)]
pub enum DeclareError {
    /// The broker already has the exchange or queue `name` with another value of `argument`
    /// (PRECONDITION_FAILED): a configuration problem for the operator, not a passing fault.
    #[error(
        "the {what} \"{name}\" already exists on the broker with another {argument}{detail}; \
         this command declares it with the worker's arguments. If another deployment uses \
         these names, give this one its own (--queue NAME, --exchange NAME); otherwise \
         delete the {what} or use the settings it was made with"
    )]
    Conflict {
        what: &'static str,
        name: String,
        /// `argument 'x-dead-letter-exchange'`, `argument 'durable'`, or `declaration` when the
        /// broker did not say.
        argument: String,
        /// ` (the broker: ...)`, or empty.
        detail: String,
    },
    #[error("{0}")]
    Broker(#[from] lapin::Error),
}

impl DeclareError {
    /// `error`, from declaring the `what` named `name`, as a conflict when it is one.
    pub fn from_broker(error: lapin::Error, what: &'static str, name: &str) -> DeclareError {
        let lapin::ErrorKind::ProtocolError(amqp) = error.kind() else {
            return DeclareError::Broker(error);
        };
        if *amqp.kind() != AMQPErrorKind::Soft(AMQPSoftError::PRECONDITIONFAILED) {
            return DeclareError::Broker(error);
        }
        let text = amqp.get_message().as_str();
        let argument = text
            .split_once("inequivalent arg '")
            .and_then(|(_, rest)| rest.split_once('\''))
            .map_or_else(
                || "declaration".to_string(),
                |(arg, _)| format!("argument '{arg}'"),
            );
        // "...in vhost '/': received the value 'a' of type 'longstr' but current is none"
        let detail = text
            .split_once("': ")
            .map_or_else(String::new, |(_, why)| format!(" (the broker: {why})"));
        DeclareError::Conflict {
            what,
            name: name.to_string(),
            argument,
            detail,
        }
    }

    pub fn is_conflict(&self) -> bool {
        matches!(self, DeclareError::Conflict { .. })
    }
}

/// The most a connection attempt to one node may take before the next is tried.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(20);

/// The node URLs of `--amqp-url`: one, or several separated by commas (a cluster).
pub fn node_urls(urls: &str) -> Vec<&str> {
    let nodes: Vec<&str> = urls
        .split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .collect();
    if nodes.is_empty() { vec![urls] } else { nodes }
}

/// Why no node of `--amqp-url` could be reached: each node tried, redacted, with its error.
#[derive(Debug, Clone)]
pub struct ConnectError {
    /// `(redacted URL, redacted error)` per node, in the order tried.
    pub failures: Vec<(String, String)>,
}

impl std::fmt::Display for ConnectError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.failures.as_slice() {
            [(_, error)] => f.write_str(error),
            failures => {
                write!(f, "no node answered: ")?;
                for (i, (url, error)) in failures.iter().enumerate() {
                    if i > 0 {
                        f.write_str("; ")?;
                    }
                    write!(f, "{url}: {error}")?;
                }
                Ok(())
            }
        }
    }
}

impl std::error::Error for ConnectError {}

/// Opens a connection to the first node of `urls` that answers, trying them in order.
pub async fn connect(urls: &str, name: &str) -> Result<Connection, ConnectError> {
    connect_from(urls, 0, name)
        .await
        .map(|(connection, _)| connection)
}

/// Opens a connection to the first node of `urls` that answers, trying them in turn from
/// node `first` (wrapping around); returns it with the index of its node. No error text
/// holds a password: lapin quotes a URL it cannot parse, so every error is redacted.
pub async fn connect_from(
    urls: &str,
    first: usize,
    name: &str,
) -> Result<(Connection, usize), ConnectError> {
    let nodes = node_urls(urls);
    let mut failures = Vec::with_capacity(nodes.len());
    for step in 0..nodes.len() {
        let index = (first + step) % nodes.len();
        let url = nodes[index];
        let error = match tokio::time::timeout(CONNECT_TIMEOUT, connect_one(url, name)).await {
            Ok(Ok(connection)) => return Ok((connection, index)),
            Ok(Err(error)) => redact_error(&error.to_string(), url),
            Err(_) => format!("no answer within {} s", CONNECT_TIMEOUT.as_secs()),
        };
        failures.push((redact_url(url), error));
    }
    Err(ConnectError { failures })
}

/// Opens a connection to one node; its heartbeat and name come from here so that every
/// command agrees.
async fn connect_one(url: &str, name: &str) -> lapin::Result<Connection> {
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
    shutdown: crate::support::shutdown::Shutdown,
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
                metrics::gauge!(crate::telemetry::catalogue::QUEUE_MESSAGES, "queue" => queue.clone())
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
    #[error("{}", unroutable(.exchange, .routing_key))]
    Unroutable {
        exchange: String,
        routing_key: String,
    },
}

/// What a mandatory publish the broker returned says.
fn unroutable(exchange: &str, routing_key: &str) -> String {
    if exchange.is_empty() {
        format!("the broker could not route it: there is no queue \"{routing_key}\"")
    } else {
        format!(
            "the broker could not route it: no queue is bound to exchange \"{exchange}\" with \
             routing key \"{routing_key}\" (start a worker with these names first, or pass \
             --queue to declare its queues)"
        )
    }
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
            Confirmation::Ack(Some(_)) => Err(PublishError::Unroutable {
                exchange: exchange.to_string(),
                routing_key: routing_key.to_string(),
            }),
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

impl DeadLetter {
    /// The dead letter of a job that ended for `reason`; `status` is Opsgenie's last HTTP
    /// status for it, if it answered.
    pub fn new(reason: DeadReason, message: String, status: Option<u16>, attempts: u32) -> Self {
        DeadLetter {
            reason,
            message,
            status,
            attempts,
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::Delays;

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

    fn precondition_failed(message: &str) -> lapin::Error {
        lapin::ErrorKind::ProtocolError(lapin::protocol::AMQPError::new(
            AMQPErrorKind::Soft(AMQPSoftError::PRECONDITIONFAILED),
            message.into(),
        ))
        .into()
    }

    #[test]
    fn a_conflicting_declaration_names_the_queue_and_the_argument() {
        let error = DeclareError::from_broker(
            precondition_failed(
                "PRECONDITION_FAILED - inequivalent arg 'x-dead-letter-exchange' for queue \
                 'opsgenie.alerts.retry.5s' in vhost '/': received the value 'team-b' of type \
                 'longstr' but current is the value 'opsgenie' of type 'longstr'",
            ),
            "queue",
            "opsgenie.alerts.retry.5s",
        );
        assert!(error.is_conflict());
        let text = error.to_string();
        for part in [
            "the queue \"opsgenie.alerts.retry.5s\" already exists",
            "another argument 'x-dead-letter-exchange'",
            "received the value 'team-b'",
            "--queue NAME",
        ] {
            assert!(text.contains(part), "{part}: {text}");
        }
        // The broker's wording is not relied on beyond the argument.
        let error = DeclareError::from_broker(
            precondition_failed("PRECONDITION_FAILED - something else"),
            "exchange",
            "opsgenie",
        );
        assert!(
            error.to_string().starts_with(
                "the exchange \"opsgenie\" already exists on the broker with another declaration;"
            ),
            "{error}"
        );
        // Any other broker error is not a conflict.
        let other: lapin::Error = lapin::ErrorKind::ProtocolError(lapin::protocol::AMQPError::new(
            AMQPErrorKind::Soft(AMQPSoftError::ACCESSREFUSED),
            "ACCESS_REFUSED - no".into(),
        ))
        .into();
        assert!(!DeclareError::from_broker(other, "queue", "q").is_conflict());
    }

    #[test]
    fn several_node_urls_are_tried_in_turn_and_reported_each_redacted() {
        assert_eq!(
            node_urls("amqp://a:p@n1:5672/%2f, amqp://a:p@n2:5672/%2f,"),
            ["amqp://a:p@n1:5672/%2f", "amqp://a:p@n2:5672/%2f"]
        );
        assert_eq!(node_urls("amqp://n1"), ["amqp://n1"]);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        // Ports nobody listens on: every node refuses, each is named in the error.
        let closed: Vec<u16> = (0..2)
            .map(|_| {
                std::net::TcpListener::bind("127.0.0.1:0")
                    .unwrap()
                    .local_addr()
                    .unwrap()
                    .port()
            })
            .collect();
        let urls = format!(
            "amqp://u:Secret1@127.0.0.1:{}/%2f,amqp://u:Secret2@127.0.0.1:{}/%2f",
            closed[0], closed[1]
        );
        let error = runtime
            .block_on(connect_from(&urls, 1, "test"))
            .map(|_| ())
            .expect_err("nothing listens");
        assert_eq!(error.failures.len(), 2);
        // Tried from node 1, then node 0.
        assert!(error.failures[0].0.contains(&closed[1].to_string()));
        assert!(error.failures[1].0.contains(&closed[0].to_string()));
        let text = error.to_string();
        assert!(text.starts_with("no node answered: "), "{text}");
        assert!(!text.contains("Secret"), "{text}");
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

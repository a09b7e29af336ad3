//! Confirmed publishes: a new job, a retry to a delay queue, a dead letter; and the requeue of
//! a delivery whose outcome did not become durable.

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, ShortString};
use lapin::{BasicProperties, Channel, Confirmation, Connection};
use opsgenie_shared::DeadReason;
use opsgenie_shared::text::cap_bytes;
use sha2::{Digest, Sha256};

use crate::broker::headers::{
    HEADER_ATTEMPTS, HEADER_DEAD_AT, HEADER_ERROR, HEADER_ERROR_MESSAGE, HEADER_FIRST_SEEN,
    HEADER_STATUS, HEADER_VALUE_LIMIT, copy_properties, properties_budget,
};
use crate::support::clock::now_ms;

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

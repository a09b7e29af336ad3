//! The work queue's length as a metric, sampled from the broker.

use std::time::Duration;

use lapin::Channel;
use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;

/// How often `sample_queue_length` asks the broker.
const QUEUE_SAMPLE_INTERVAL: Duration = Duration::from_secs(15);

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

//! The loop: take the next delivery (or notice shutdown), run `process` on it beside up to
//! `--prefetch` others, and turn each outcome into an ack, a confirmed retry or a confirmed
//! dead letter. Losing the broker only sends the loop back to connect.

use std::sync::Arc;
use std::time::{Duration, Instant};

use std::panic::AssertUnwindSafe;

use futures_util::{FutureExt, StreamExt};
use lapin::message::Delivery;
use lapin::options::{BasicCancelOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Connection};
use opsgenie_shared::DeadReason;
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use crate::job::acks::Settled;

use crate::broker::{
    self, DeadLetter, HEADER_ATTEMPTS, HEADER_FIRST_SEEN, PublishError, Publisher, Topology,
};
use crate::job::pipeline::{Admitted, Envelope, Outcome, Pipeline, Report};
use crate::support::pacing::Pacing;
use crate::support::shutdown::Shutdown;
use crate::telemetry::JobCounts;
use crate::telemetry::catalogue;

/// Where a job's task reports its delivery tag once settled.
type Acks = mpsc::UnboundedSender<Settled>;

/// What the loop needs besides the pipeline.
pub struct ConsumerSettings {
    pub amqp_url: String,
    /// Shared by every job's task, so it is cloned as a pointer, not as a dozen strings.
    pub topology: Arc<Topology>,
    pub prefetch: u16,
    pub drain_timeout: Duration,
    /// Counts for the periodic summary line.
    pub counts: Arc<JobCounts>,
}

/// Consumes until shutdown, reconnecting whenever the broker goes away, then drains.
pub async fn consume(settings: ConsumerSettings, pipeline: Arc<Pipeline>, shutdown: Shutdown) {
    let mut tasks: JoinSet<()> = JoinSet::new();
    let mut pacing = Pacing::new(Duration::from_millis(200), Duration::from_secs(10));
    // Kept at shutdown until the drain is over: the channel (and its acker) must outlive the
    // jobs in flight.
    let mut session: Option<(Connection, Channel, Acks, tokio::task::JoinHandle<()>)> = None;
    let nodes = broker::node_urls(&settings.amqp_url).len();
    // The node the next connect tries first: after losing a node, the next one in turn.
    let mut next_node = 0;
    while !shutdown.is_triggered() {
        let opened = open(&settings, next_node).await;
        let (connection, channel, publisher, mut consumer) = match opened {
            Ok((opened, node)) => {
                pacing.reset();
                next_node = (node + 1) % nodes;
                opened
            }
            Err((error, node)) => {
                // A node that took the connection but could not serve it (still booting, or
                // cut off from its cluster's majority) is not tried first again.
                if let Some(node) = node {
                    next_node = (node + 1) % nodes;
                }
                // lapin quotes a URL it cannot parse, password and all.
                let error = crate::support::redact::redact_error(&error, &settings.amqp_url);
                let pause = pacing.next_pause();
                tracing::error!(
                    error,
                    retry_in_ms = pause.as_millis() as u64,
                    "Cannot consume from RabbitMQ; trying again."
                );
                let _ = shutdown.sleep_until((Instant::now() + pause).into()).await;
                continue;
            }
        };
        let node = crate::support::redact::redact_url(
            broker::node_urls(&settings.amqp_url)[(next_node + nodes - 1) % nodes],
        );
        tracing::info!(
            queue = settings.topology.queue,
            prefetch = settings.prefetch,
            node,
            "Consuming."
        );
        let (acks, settled) = mpsc::unbounded_channel();
        let acker = tokio::spawn(crate::job::acks::run(
            channel.clone(),
            settled,
            settings.prefetch,
        ));
        pipeline.health.set_consuming(true);
        let sampler = match connection.create_channel().await {
            Ok(channel) => Some(tokio::spawn(broker::sample_queue_length(
                channel,
                settings.topology.queue.clone(),
                shutdown.clone(),
            ))),
            Err(error) => {
                tracing::warn!(error = %error, "Cannot sample the queue's length on this connection.");
                None
            }
        };
        loop {
            tokio::select! {
                () = shutdown.triggered() => break,
                Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
                next = consumer.next() => match next {
                    Some(Ok(delivery)) => {
                        let pipeline = Arc::clone(&pipeline);
                        let publisher = publisher.clone();
                        let shutdown = shutdown.clone();
                        let topology = Arc::clone(&settings.topology);
                        let counts = Arc::clone(&settings.counts);
                        let acks = acks.clone();
                        // Boxed: the task then holds a pointer, and the job's few KiB of
                        // state are written once instead of copied in and out of the task.
                        tasks.spawn(Box::pin(async move {
                            counts.started();
                            let outcome = handle(delivery, &pipeline, &publisher, &topology, &shutdown, &acks).await;
                            counts.finished(outcome);
                        }));
                    }
                    Some(Err(error)) => {
                        tracing::error!(error = %error, "Lost the RabbitMQ consumer; reconnecting.");
                        break;
                    }
                    None => {
                        tracing::warn!("The broker cancelled the consumer; reconnecting.");
                        break;
                    }
                },
            }
        }
        pipeline.health.set_consuming(false);
        if let Some(sampler) = sampler {
            sampler.abort();
        }
        if shutdown.is_triggered() {
            if let Err(error) = channel
                .basic_cancel(consumer.tag(), BasicCancelOptions::default())
                .await
            {
                tracing::warn!(error = %error, "Could not cancel the consumer.");
            }
            session = Some((connection, channel, acks, acker));
        } else {
            // In-flight jobs of the old connection cannot ack any more; the broker redelivers
            // them, and the Redis record makes a second delivery harmless.
            let _ = connection.close(320, "reconnecting".into()).await;
        }
    }
    drain(tasks, settings.drain_timeout).await;
    if let Some((connection, channel, acks, acker)) = session {
        // Every task's sender is gone with the drain; this last one lets the acker finish.
        drop(acks);
        let _ = acker.await;
        // Closing the channel returns every unacked job to the queue, as it was.
        let _ = channel.close(200, "shutting down".into()).await;
        let _ = connection.close(200, "shutting down".into()).await;
    }
}

/// A consuming session on the first node, from `first` on, that answers; with the index of
/// its node. The error is text fit for a log (redacted, and for a declaration that conflicts
/// with the broker's, one that names the queue and the argument), with the index of the node
/// when one took the connection.
async fn open(
    settings: &ConsumerSettings,
    first: usize,
) -> Result<((Connection, Channel, Publisher, lapin::Consumer), usize), (String, Option<usize>)> {
    let (connection, node) = broker::connect_from(&settings.amqp_url, first, "opsgenie-worker run")
        .await
        .map_err(|e| (e.to_string(), None))?;
    let session = async {
        let channel = connection.create_channel().await?;
        settings.topology.declare(&channel).await?;
        channel
            .basic_qos(settings.prefetch, BasicQosOptions::default())
            .await?;
        let publisher = Publisher::new(&connection).await?;
        let consumer = channel
            .basic_consume(
                settings.topology.queue.as_str().into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        Ok::<_, broker::DeclareError>((channel, publisher, consumer))
    };
    match session.await {
        Ok((channel, publisher, consumer)) => {
            Ok(((connection, channel, publisher, consumer), node))
        }
        Err(error) => {
            let _ = connection.close(200, "cannot consume".into()).await;
            Err((error.to_string(), Some(node)))
        }
    }
}

/// Lets jobs in flight finish until `timeout`; the rest are dropped unacked, so the broker
/// returns them to the queue when the channel closes.
async fn drain(mut tasks: JoinSet<()>, timeout: Duration) {
    let in_flight = tasks.len();
    if in_flight > 0 {
        tracing::info!(
            in_flight,
            timeout_s = timeout.as_secs(),
            "Waiting for jobs in flight."
        );
    }
    let finished = tokio::time::timeout(timeout, async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    if finished.is_err() {
        tracing::warn!(
            unfinished = tasks.len(),
            "Drain time-out: unfinished jobs return to the queue."
        );
        tasks.abort_all();
        while tasks.join_next().await.is_some() {}
    }
}

/// Runs one delivery through the pipeline and settles it with the broker.
async fn handle(
    delivery: Delivery,
    pipeline: &Pipeline,
    publisher: &Publisher,
    topology: &Topology,
    shutdown: &Shutdown,
    acks: &Acks,
) -> &'static str {
    let started = Instant::now();
    metrics::gauge!(catalogue::JOBS_IN_FLIGHT).increment(1.0);
    let now_ms = crate::support::clock::now_ms();
    let first_seen_ms =
        broker::header_u64(&delivery.properties, HEADER_FIRST_SEEN).unwrap_or(now_ms);
    let envelope = Envelope {
        previous_attempts: broker::header_u64(&delivery.properties, HEADER_ATTEMPTS)
            .map_or(0, |a| u32::try_from(a).unwrap_or(u32::MAX)),
        first_seen_ms,
        now_ms,
    };
    let admitted = pipeline
        .admit_delivery(&delivery.data, delivery.redelivered)
        .await;
    let report = match &admitted {
        Admitted::Poison { unfinished, .. } => Report::new(
            Outcome::dead_letter(
                DeadReason::Poison,
                format!(
                    "{unfinished} attempts at this message were started and never finished (the worker died or was cut off with it in hand)"
                ),
            ),
            envelope.attempt(),
        ),
        Admitted::Beside { .. } | Admitted::Alone { .. } => {
            // A panic is a bug, and most likely this message's: it must not leave the
            // message unacked in this channel for good. It goes back to the queue, and its
            // unfinished attempt stays counted, so a message that always panics ends as
            // poison.
            match AssertUnwindSafe(pipeline.process(&delivery.data, envelope, shutdown))
                .catch_unwind()
                .await
            {
                Ok(report) => report,
                Err(_) => {
                    drop(admitted);
                    tracing::error!("Processing a job panicked; the job returns to the queue.");
                    broker::requeue(&delivery).await;
                    let _ = acks.send(Settled::Nacked(delivery.delivery_tag));
                    metrics::gauge!(catalogue::JOBS_IN_FLIGHT).decrement(1.0);
                    metrics::counter!(catalogue::JOBS, "outcome" => "requeued", "reason" => "panic").increment(1);
                    return "requeued";
                }
            }
        }
    };
    let settled = settle(&delivery, &report, publisher, topology, first_seen_ms).await;
    if let Some(counter) = admitted.counter() {
        // Finished, whatever the outcome: not this message's fault if it comes back.
        if let Err(error) = pipeline.store.attempt_finished(counter).await {
            tracing::warn!(error = %error, "Could not clear a message's unfinished attempts.");
        }
    }
    drop(admitted);
    let tag = delivery.delivery_tag;
    // A send error means the acker is gone with its channel: the broker requeues the job.
    let _ = acks.send(if settled.is_ok() {
        Settled::Ack(tag)
    } else {
        Settled::Nacked(tag)
    });
    metrics::gauge!(catalogue::JOBS_IN_FLIGHT).decrement(1.0);
    let latency_ms = started.elapsed().as_millis() as u64;
    let reason = match &report.outcome {
        Outcome::DeadLetter { reason, .. } => reason.as_str(),
        _ => "",
    };
    metrics::counter!(catalogue::JOBS, "outcome" => report.outcome.as_str(), "reason" => reason)
        .increment(1);
    if report.outcome == Outcome::Delivered {
        metrics::histogram!(catalogue::DELIVERY_DURATION).record(started.elapsed().as_secs_f64());
    }
    log_report(&report, latency_ms, settled.as_ref().err())
}

/// Why a job's outcome did not become durable: the job goes back to the queue unacked.
#[derive(Debug, thiserror::Error)]
pub enum Unsettled {
    #[error("could not schedule the retry: {0}")]
    Retry(#[source] PublishError),
    #[error("could not dead-letter: {0}")]
    DeadLetter(#[source] PublishError),
    /// The job was not finished when shutdown came.
    #[error("shutting down")]
    ShuttingDown,
}

/// Makes the outcome durable (the ack follows, from `acks`).
///
/// Fails when the retry or the dead letter was not confirmed by the broker, or when the job
/// was not finished at shutdown; the job is then nacked back to the queue (or returns there
/// when the channel closes).
async fn settle(
    delivery: &Delivery,
    report: &Report,
    publisher: &Publisher,
    topology: &Topology,
    first_seen_ms: u64,
) -> Result<(), Unsettled> {
    let durable = match &report.outcome {
        Outcome::Delivered | Outcome::Duplicate | Outcome::Stale => Ok(()),
        Outcome::RetryLater { tier } => {
            metrics::counter!(catalogue::RETRIES, "kind" => "delayed").increment(1);
            let queue = &topology.retry_queues[(*tier).min(topology.retry_queues.len() - 1)].0;
            publisher
                .schedule_retry(
                    queue,
                    &delivery.data,
                    &delivery.properties,
                    report.attempt,
                    first_seen_ms,
                )
                .await
                .map_err(Unsettled::Retry)
        }
        Outcome::DeadLetter { reason, message } => {
            let letter = DeadLetter::new(
                *reason,
                message.clone(),
                report.facts.status,
                report.attempt,
            );
            publisher
                .dead_letter(
                    &topology.dead_queue,
                    &delivery.data,
                    &delivery.properties,
                    &letter,
                )
                .await
                .map_err(Unsettled::DeadLetter)
        }
        Outcome::Requeue => Err(Unsettled::ShuttingDown),
    };
    match durable {
        // Acked by the channel's acker, in a batch.
        Ok(()) => Ok(()),
        Err(why) => {
            broker::requeue(delivery).await;
            Err(why)
        }
    }
}

/// Returns the `outcome` label it logged.
fn log_report(report: &Report, latency_ms: u64, unsettled: Option<&Unsettled>) -> &'static str {
    let (reason, message) = match &report.outcome {
        Outcome::DeadLetter { reason, message } => (Some(reason.as_str()), Some(message.as_str())),
        _ => (None, None),
    };
    let retry_tier = match &report.outcome {
        Outcome::RetryLater { tier } => Some(*tier as u64),
        _ => None,
    };
    let outcome = if unsettled.is_some() {
        "requeued"
    } else {
        report.outcome.as_str()
    };
    tracing::info!(
        notification_uuid = report.facts.notification_uuid.as_deref(),
        team_id = report.facts.team_id.as_deref(),
        kind = report.facts.kind,
        action = report.facts.action,
        alias = report.facts.alias.as_deref().unwrap_or(""),
        outcome,
        status = report.facts.status,
        attempt = report.attempt,
        request_id = report.facts.request_id.as_deref(),
        latency_ms,
        reason,
        // Not `message`: that is the event's own text ("Job finished.") in JSON logs, and a
        // second `message` key would replace it.
        error_message = message,
        retry_tier,
        unsettled = unsettled.map(tracing::field::display),
        "Job finished."
    );
    outcome
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use crate::job::pipeline::{Envelope, Pipeline};
    use crate::store::{Store, StoreSettings};

    /// Every job is a task; a large task is allocated and copied per job. The Redis client's
    /// futures alone are about 7 KiB, so they are boxed; this keeps them so.
    #[test]
    fn a_jobs_future_stays_small() {
        fn size<F: std::future::Future>(_: &F) -> usize {
            std::mem::size_of::<F>()
        }
        crate::support::init_tls();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let (_trigger, shutdown) = crate::support::shutdown::Shutdown::new();
            let settings = StoreSettings {
                prefix: "size:".into(),
                stream_maxlen: 1,
                dedupe_ttl: Duration::from_secs(1),
                lease_ttl: Duration::from_secs(1),
            };
            let store = Store::new("redis://127.0.0.1:6379", settings).unwrap();
            let pipeline = Pipeline {
                keyring: Arc::new(arc_swap::ArcSwap::from_pointee(
                    crate::keyring::Keyring::default(),
                )),
                sender: crate::opsgenie::Sender::new(Duration::from_secs(1)).unwrap(),
                store: store.clone(),
                policy: Default::default(),
                health: Default::default(),
                poison_after: 3,
                quarantine: Default::default(),
                confirm_within: None,
            };
            let envelope = Envelope {
                previous_attempts: 0,
                first_seen_ms: 0,
                now_ms: 0,
            };
            let job = pipeline.process(b"{}", envelope, &shutdown);
            assert!(size(&job) < 4096, "process future: {} bytes", size(&job));
            let keys = store.keys("u", "team", None, None, "t".into());
            let fields: crate::store::Fields = Vec::new().into();
            assert!(size(&store.record(&keys, &fields)) < 256);
            assert!(size(&store.admit(&keys)) < 256);
        });
    }
}

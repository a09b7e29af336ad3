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
use crate::telemetry::{JobCounts, catalogue};

/// Where a job's task reports its delivery tag once settled.
type Acks = mpsc::UnboundedSender<Settled>;

/// What the loop needs besides the pipeline.
pub(crate) struct ConsumerSettings {
    pub(crate) amqp_url: String,
    /// Shared by every job's task, so it is cloned as a pointer, not as a dozen strings.
    pub(crate) topology: Arc<Topology>,
    pub(crate) prefetch: u16,
    pub(crate) drain_timeout: Duration,
    /// Counts for the periodic summary line.
    pub(crate) counts: Arc<JobCounts>,
}

/// Consumes until shutdown, reconnecting whenever the broker goes away, then drains.
pub(crate) async fn consume(
    settings: ConsumerSettings,
    pipeline: Arc<Pipeline>,
    shutdown: Shutdown,
) {
    let mut tasks: JoinSet<()> = JoinSet::new();
    let mut nodes = NodeTurns::new(&settings.amqp_url);
    // Kept at shutdown until the drain is over: the channel (and its acker) must outlive the
    // jobs in flight.
    let mut kept: Option<Session> = None;
    while !shutdown.is_triggered() {
        let Some(opened) = nodes.open(&settings, &shutdown).await else {
            continue;
        };
        let mut session = Session::start(opened, &settings, &pipeline, &shutdown).await;
        session
            .consume_until_lost(&mut tasks, &settings, &pipeline, &shutdown)
            .await;
        kept = session.end(&pipeline, &shutdown).await;
    }
    drain(tasks, settings.drain_timeout).await;
    if let Some(session) = kept {
        session.close().await;
    }
}

/// Which node of `--amqp-url` a connect tries first, and how long it waits after a failure.
struct NodeTurns {
    nodes: usize,
    /// After losing a node, the next one in turn.
    next: usize,
    pacing: Pacing,
}

impl NodeTurns {
    fn new(amqp_url: &str) -> NodeTurns {
        NodeTurns {
            nodes: broker::node_urls(amqp_url).len(),
            next: 0,
            pacing: Pacing::new(Duration::from_millis(200), Duration::from_secs(10)),
        }
    }

    /// A consuming session, or `None` after logging why not and waiting the next pause (or
    /// until shutdown).
    async fn open(&mut self, settings: &ConsumerSettings, shutdown: &Shutdown) -> Option<Opened> {
        match open(settings, self.next).await {
            Ok(opened) => {
                self.pacing.reset();
                self.next = (opened.node + 1) % self.nodes;
                Some(opened)
            }
            Err(error) => {
                // A node that took the connection but could not serve it (still booting, or
                // cut off from its cluster's majority) is not tried first again.
                if let Some(node) = error.node() {
                    self.next = (node + 1) % self.nodes;
                }
                // lapin quotes a URL it cannot parse, password and all.
                let error =
                    crate::support::redact::redact_error(&error.to_string(), &settings.amqp_url);
                let pause = self.pacing.next_pause();
                tracing::error!(
                    error,
                    retry_in_ms = pause.as_millis() as u64,
                    "Cannot consume from RabbitMQ; trying again."
                );
                let _ = shutdown.sleep_until((Instant::now() + pause).into()).await;
                None
            }
        }
    }
}

/// A connection that consumes the work queue, from node `node` of `--amqp-url`.
struct Opened {
    connection: Connection,
    channel: Channel,
    publisher: Publisher,
    consumer: lapin::Consumer,
    node: usize,
}

/// Why no consuming session could be opened.
#[derive(Debug, thiserror::Error)]
enum OpenError {
    #[error("{0}")]
    Connect(#[from] broker::ConnectError),
    /// Node `node` took the connection but could not serve it. The text of a declaration that
    /// conflicts with the broker's names the queue and the argument.
    #[error("{error}")]
    Serve {
        node: usize,
        error: broker::DeclareError,
    },
}

impl OpenError {
    /// The node that took the connection, if one did.
    fn node(&self) -> Option<usize> {
        match self {
            OpenError::Connect(_) => None,
            OpenError::Serve { node, .. } => Some(*node),
        }
    }
}

/// A consuming session on the first node, from `first` on, that answers.
async fn open(settings: &ConsumerSettings, first: usize) -> Result<Opened, OpenError> {
    let (connection, node) =
        broker::connect_from(&settings.amqp_url, first, "opsgenie-worker run").await?;
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
        Ok((channel, publisher, consumer)) => Ok(Opened {
            connection,
            channel,
            publisher,
            consumer,
            node,
        }),
        Err(error) => {
            let _ = connection.close(200, "cannot consume".into()).await;
            Err(OpenError::Serve { node, error })
        }
    }
}

/// One connection's consuming, with the tasks that serve it.
struct Session {
    opened: Opened,
    /// Each job's task reports its settled tag here; dropped last, so the acker finishes.
    acks: Acks,
    /// Acks this channel's settled tags in batches (`acks::run`).
    acker: tokio::task::JoinHandle<()>,
    /// Samples the queue's length while the session lasts.
    sampler: Option<tokio::task::JoinHandle<()>>,
}

impl Session {
    /// Starts the acker and the queue sampler, and says the worker is consuming.
    async fn start(
        opened: Opened,
        settings: &ConsumerSettings,
        pipeline: &Pipeline,
        shutdown: &Shutdown,
    ) -> Session {
        let node =
            crate::support::redact::redact_url(broker::node_urls(&settings.amqp_url)[opened.node]);
        tracing::info!(
            queue = settings.topology.queue,
            prefetch = settings.prefetch,
            node,
            "Consuming."
        );
        let (acks, settled) = mpsc::unbounded_channel();
        let acker = tokio::spawn(crate::job::acks::run(
            opened.channel.clone(),
            settled,
            settings.prefetch,
        ));
        pipeline.health.set_consuming(true);
        let sampler = match opened.connection.create_channel().await {
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
        Session {
            opened,
            acks,
            acker,
            sampler,
        }
    }

    /// Runs each delivery in a task of its own until shutdown or until the consumer is lost.
    async fn consume_until_lost(
        &mut self,
        tasks: &mut JoinSet<()>,
        settings: &ConsumerSettings,
        pipeline: &Arc<Pipeline>,
        shutdown: &Shutdown,
    ) {
        loop {
            tokio::select! {
                () = shutdown.triggered() => return,
                Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
                next = self.opened.consumer.next() => match next {
                    Some(Ok(delivery)) => self.spawn_job(tasks, delivery, settings, pipeline, shutdown),
                    Some(Err(error)) => {
                        tracing::error!(error = %error, "Lost the RabbitMQ consumer; reconnecting.");
                        return;
                    }
                    None => {
                        tracing::warn!("The broker cancelled the consumer; reconnecting.");
                        return;
                    }
                },
            }
        }
    }

    fn spawn_job(
        &self,
        tasks: &mut JoinSet<()>,
        delivery: Delivery,
        settings: &ConsumerSettings,
        pipeline: &Arc<Pipeline>,
        shutdown: &Shutdown,
    ) {
        let pipeline = Arc::clone(pipeline);
        let publisher = self.opened.publisher.clone();
        let shutdown = shutdown.clone();
        let topology = Arc::clone(&settings.topology);
        let counts = Arc::clone(&settings.counts);
        let acks = self.acks.clone();
        // Boxed: the task then holds a pointer, and the job's few KiB of state are written
        // once instead of copied in and out of the task.
        tasks.spawn(Box::pin(async move {
            counts.started();
            let finished =
                handle(delivery, &pipeline, &publisher, &topology, &shutdown, &acks).await;
            counts.finished(&finished);
        }));
    }

    /// Stops consuming. At shutdown, cancels the consumer and returns the session to keep
    /// until the drain is over; otherwise closes the connection.
    async fn end(self, pipeline: &Pipeline, shutdown: &Shutdown) -> Option<Session> {
        pipeline.health.set_consuming(false);
        if let Some(sampler) = &self.sampler {
            sampler.abort();
        }
        if shutdown.is_triggered() {
            let Opened {
                channel, consumer, ..
            } = &self.opened;
            if let Err(error) = channel
                .basic_cancel(consumer.tag(), BasicCancelOptions::default())
                .await
            {
                tracing::warn!(error = %error, "Could not cancel the consumer.");
            }
            Some(self)
        } else {
            // In-flight jobs of the old connection cannot ack any more; the broker redelivers
            // them, and the Redis record makes a second delivery harmless.
            let _ = self
                .opened
                .connection
                .close(320, "reconnecting".into())
                .await;
            None
        }
    }

    /// After the drain: lets the acker finish, then closes.
    async fn close(self) {
        let Session {
            opened,
            acks,
            acker,
            ..
        } = self;
        // Every task's sender is gone with the drain; this last one lets the acker finish.
        drop(acks);
        let _ = acker.await;
        // Closing the channel returns every unacked job to the queue, as it was.
        let _ = opened.channel.close(200, "shutting down".into()).await;
        let _ = opened.connection.close(200, "shutting down".into()).await;
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

/// Runs one delivery through the pipeline and settles it with the broker. Returns what became
/// of it: its outcome once durable, `Requeue` when it went back to the queue instead.
async fn handle(
    delivery: Delivery,
    pipeline: &Pipeline,
    publisher: &Publisher,
    topology: &Topology,
    shutdown: &Shutdown,
    acks: &Acks,
) -> Outcome {
    let started = Instant::now();
    metrics::gauge!(catalogue::JOBS_IN_FLIGHT).increment(1.0);
    let envelope = envelope_of(&delivery);
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
                    return requeue_after_panic(&delivery, acks).await;
                }
            }
        }
    };
    let settled = settle(
        &delivery,
        &report,
        publisher,
        topology,
        envelope.first_seen_ms,
    )
    .await;
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
    count(&report.outcome, started);
    let finished = match &settled {
        Ok(()) => report.outcome.clone(),
        Err(_) => Outcome::Requeue,
    };
    let latency_ms = started.elapsed().as_millis() as u64;
    log_report(&report, &finished, latency_ms, settled.as_ref().err());
    finished
}

/// What the broker's headers say about the job's earlier rounds.
fn envelope_of(delivery: &Delivery) -> Envelope {
    let now_ms = crate::support::clock::now_ms();
    let header = |name| broker::header_u64(&delivery.properties, name);
    Envelope {
        previous_attempts: header(HEADER_ATTEMPTS)
            .map_or(0, |a| u32::try_from(a).unwrap_or(u32::MAX)),
        first_seen_ms: header(HEADER_FIRST_SEEN).unwrap_or(now_ms),
        now_ms,
    }
}

/// Sends a job whose processing panicked back to the queue, and counts it.
async fn requeue_after_panic(delivery: &Delivery, acks: &Acks) -> Outcome {
    let requeued = Outcome::Requeue;
    tracing::error!("Processing a job panicked; the job returns to the queue.");
    broker::requeue(delivery).await;
    let _ = acks.send(Settled::Nacked(delivery.delivery_tag));
    metrics::gauge!(catalogue::JOBS_IN_FLIGHT).decrement(1.0);
    metrics::counter!(catalogue::JOBS, "outcome" => requeued.label(), "reason" => "panic")
        .increment(1);
    requeued
}

/// Counts the job's outcome (as the pipeline decided it, durable or not) and, for a delivery,
/// how long it took.
fn count(outcome: &Outcome, started: Instant) {
    let reason = match outcome {
        Outcome::DeadLetter { reason, .. } => reason.as_str(),
        _ => "",
    };
    metrics::counter!(catalogue::JOBS, "outcome" => outcome.label(), "reason" => reason)
        .increment(1);
    if *outcome == Outcome::Delivered {
        metrics::histogram!(catalogue::DELIVERY_DURATION).record(started.elapsed().as_secs_f64());
    }
}

/// Why a job's outcome did not become durable: the job goes back to the queue unacked.
#[derive(Debug, thiserror::Error)]
enum Unsettled {
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
            // The policy's tier indexes `--retry-delays`, which names these queues too.
            let (queue, _) = &topology.retry_queues[*tier];
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

/// The job's log line. `finished` is what became of it (its `outcome` field); what the
/// pipeline decided, durable or not, gives the rest.
fn log_report(report: &Report, finished: &Outcome, latency_ms: u64, unsettled: Option<&Unsettled>) {
    let (reason, message) = match &report.outcome {
        Outcome::DeadLetter { reason, message } => (Some(reason.as_str()), Some(message.as_str())),
        _ => (None, None),
    };
    let retry_tier = match &report.outcome {
        Outcome::RetryLater { tier } => Some(*tier as u64),
        _ => None,
    };
    tracing::info!(
        notification_uuid = report.facts.notification_uuid.as_deref(),
        team_id = report.facts.team_id.as_deref(),
        kind = report.facts.kind,
        action = report.facts.action,
        alias = report.facts.alias.as_deref().unwrap_or(""),
        outcome = finished.label(),
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

//! One job, end to end: parse, look up the team, check Redis, send, record. `process` returns
//! what happened; the consumer loop turns that into an ack, a retry or a dead letter.

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use opsgenie_shared::record::{Delivery, delivery_fields};
use opsgenie_shared::retry::{NextStep, RetryPolicy};
use opsgenie_shared::{AlertJob, DeadReason, JobError, build_request};
use tokio::time::Instant;

use crate::buffer::{Admission, Buffer};
use crate::health::Health;
use crate::keyring::Keyring;
use crate::opsgenie::{RoundResult, Sender};
use crate::shutdown::Shutdown;

/// What became of one job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Sent and recorded in Redis.
    Delivered,
    /// Already delivered before: not sent again.
    Duplicate,
    /// An incident status older than one already delivered: not sent.
    Stale,
    /// Not delivered this round: to delay queue `tier`.
    RetryLater { tier: usize },
    /// Never deliverable as it is.
    DeadLetter { reason: DeadReason, message: String },
    /// Shutdown came before the outcome was durable: back to the queue as it was.
    Requeue,
}

impl Outcome {
    /// The `outcome` log field and metric label.
    pub fn as_str(&self) -> &'static str {
        match self {
            Outcome::Delivered => "delivered",
            Outcome::Duplicate => "duplicate",
            Outcome::Stale => "stale",
            Outcome::RetryLater { .. } => "retry_scheduled",
            Outcome::DeadLetter { .. } => "dead_lettered",
            Outcome::Requeue => "requeued",
        }
    }
}

/// What the broker told us about the message, beyond its body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Envelope {
    /// Rounds before this one (from `x-opsgenie-attempts`).
    pub previous_attempts: u32,
    /// When a worker first saw the job, ms since the epoch.
    pub first_seen_ms: u64,
    /// Now, ms since the epoch.
    pub now_ms: u64,
}

/// The outcome and the fields of the job's log line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub outcome: Outcome,
    pub notification_uuid: Option<String>,
    pub team_id: Option<String>,
    pub kind: Option<&'static str>,
    pub action: Option<&'static str>,
    pub alias: Option<String>,
    pub status: Option<u16>,
    /// This round's number (1-based).
    pub attempt: u32,
    pub request_id: Option<String>,
}

/// Everything `process` needs, shared by every task.
pub struct Pipeline {
    pub keyring: Arc<ArcSwap<Keyring>>,
    pub sender: Sender,
    pub buffer: Buffer,
    pub policy: RetryPolicy,
    pub health: Arc<Health>,
}

impl Pipeline {
    /// Processes one job body. Never fails: every way a job can end is an `Outcome`.
    pub async fn process(&self, body: &[u8], envelope: Envelope, shutdown: &Shutdown) -> Report {
        let attempt = envelope.previous_attempts.saturating_add(1);
        let mut report = Report {
            outcome: Outcome::Requeue,
            notification_uuid: None,
            team_id: None,
            kind: None,
            action: None,
            alias: None,
            status: None,
            attempt,
            request_id: None,
        };
        let job = match AlertJob::parse(body) {
            Ok(job) => job,
            Err(error) => {
                let reason = match error {
                    JobError::TooLarge { .. } => DeadReason::TooLarge,
                    JobError::Invalid { .. } => DeadReason::InvalidJob,
                };
                report.outcome = Outcome::DeadLetter {
                    reason,
                    message: error.to_string(),
                };
                return report;
            }
        };
        let request = build_request(&job);
        report.notification_uuid = Some(job.notification_uuid.clone());
        report.team_id = Some(job.team_id.clone());
        report.kind = Some(job.kind().as_str());
        report.action = Some(request.action.as_str());
        report.alias = request.alias.clone();
        if let Some(priority) = &request.ignored_priority {
            tracing::warn!(
                notification_uuid = job.notification_uuid,
                priority = priority.as_str(),
                "The job's priority is not one of P1..P5; the default applies."
            );
        }

        let Some(team) = self.keyring.load().team(&job.team_id).cloned() else {
            report.outcome = Outcome::DeadLetter {
                reason: DeadReason::UnknownTeam,
                message: format!("team \"{}\" is not in the keyring", job.team_id),
            };
            return report;
        };

        // Metric alerts of one incident take turns through its alias; anything else only
        // guards against two copies of itself.
        let incident = match (&job.alert, &request.alias) {
            (opsgenie_shared::Alert::Metric(_), Some(alias)) => Some(alias.as_str()),
            _ => None,
        };
        // Random, so that only this round of this job can free the lease it takes.
        let token = format!("{:032x}", rand::random::<u128>());
        let keys = self.buffer.keys(
            &job.notification_uuid,
            &team.id,
            incident,
            job.sequence(),
            token,
        );

        let wait_deadline = Instant::now() + self.policy.quick_window;
        let mut pause = Duration::from_millis(20);
        loop {
            match self.buffer.admit(&keys).await {
                Ok(Admission::Go) => {
                    self.health.set_redis(true);
                    break;
                }
                Ok(Admission::Duplicate) => {
                    report.outcome = Outcome::Duplicate;
                    return report;
                }
                Ok(Admission::Stale) => {
                    report.outcome = Outcome::Stale;
                    return report;
                }
                Ok(Admission::Busy) if Instant::now() + pause > wait_deadline => {
                    report.outcome = self.retry_outcome(attempt, &envelope, None);
                    return report;
                }
                Ok(Admission::Busy) => {}
                Ok(Admission::Cooldown(wait)) => {
                    // Another replica (or this one) was told to slow down for this key.
                    if Instant::now() + wait > wait_deadline {
                        report.outcome = self.retry_outcome(attempt, &envelope, Some(wait));
                        return report;
                    }
                    if !shutdown.sleep_until(Instant::now() + wait).await {
                        return report;
                    }
                    continue;
                }
                Err(error) => {
                    // Without Redis we cannot know whether the job was delivered: wait for it.
                    self.health.set_redis(false);
                    tracing::warn!(error = %error, "Redis is unreachable; waiting before checking the job.");
                    pause = Duration::from_millis(500);
                }
            }
            if !shutdown.sleep_until(Instant::now() + jitter(pause)).await {
                return report;
            }
            pause = (pause * 2).min(Duration::from_millis(500));
        }

        let round = self
            .sender
            .deliver(&team, &request, &self.policy, shutdown)
            .await;
        match round {
            RoundResult::Delivered { status, request_id } => {
                report.status = Some(status);
                let fields: crate::buffer::Fields = delivery_fields(
                    &job,
                    &request,
                    &Delivery {
                        status,
                        request_id: &request_id,
                        attempts: attempt,
                        delivered_at_ms: crate::amqp::now_ms(),
                    },
                )
                .into();
                report.request_id = Some(request_id);
                // The request went out: the record must land before the ack, however long
                // Redis is away, or a redelivery would page twice.
                let mut pause = Duration::from_millis(100);
                loop {
                    match self.buffer.record(&keys, &fields).await {
                        Ok(_) => {
                            self.health.set_redis(true);
                            report.outcome = Outcome::Delivered;
                            return report;
                        }
                        Err(error) => {
                            self.health.set_redis(false);
                            tracing::error!(
                                notification_uuid = job.notification_uuid,
                                error = %error,
                                "Delivered, but the record could not be written to Redis; trying again."
                            );
                        }
                    }
                    // Not cut short by shutdown: only the drain deadline ends this wait
                    // (the job then returns to the queue unacked; see `consumer`).
                    tokio::time::sleep(jitter(pause)).await;
                    pause = (pause * 2).min(Duration::from_secs(5));
                }
            }
            RoundResult::Refused {
                reason,
                status,
                message,
            } => {
                self.release(&keys).await;
                report.status = Some(status);
                report.outcome = Outcome::DeadLetter { reason, message };
                report
            }
            RoundResult::Failed {
                status,
                wait,
                message,
            } => {
                self.release(&keys).await;
                report.status = status;
                tracing::debug!(
                    notification_uuid = job.notification_uuid,
                    message,
                    "Delivery round failed."
                );
                report.outcome = self.retry_outcome(attempt, &envelope, wait);
                if let Outcome::DeadLetter { message: m, .. } = &mut report.outcome {
                    m.push_str(": ");
                    m.push_str(&message);
                }
                report
            }
        }
    }

    fn retry_outcome(&self, attempt: u32, envelope: &Envelope, wait: Option<Duration>) -> Outcome {
        let age = Duration::from_millis(envelope.now_ms.saturating_sub(envelope.first_seen_ms));
        match self.policy.next_step(attempt, age, wait) {
            NextStep::Delay { tier } => Outcome::RetryLater { tier },
            NextStep::Exhausted => Outcome::DeadLetter {
                reason: DeadReason::Exhausted,
                message: format!(
                    "not delivered after {attempt} attempts over {} s",
                    age.as_secs()
                ),
            },
        }
    }

    async fn release(&self, keys: &crate::buffer::JobKeys) {
        if let Err(error) = self.buffer.release(keys).await {
            // The lease expires by itself; this only delays the incident's next job.
            tracing::warn!(error = %error, "Could not free the incident lease.");
        }
    }
}

/// `d` give or take a quarter, so that replicas waiting on the same thing do not wake together.
fn jitter(d: Duration) -> Duration {
    let f = 0.75 + rand::random::<f64>() * 0.5;
    d.mul_f64(f)
}

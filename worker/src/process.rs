//! One job, end to end: parse, look up the team, check Redis, send, record. `process` returns
//! what happened; the consumer loop turns that into an ack, a retry or a dead letter.

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use opsgenie_shared::record::{Delivery, delivery_fields};
use opsgenie_shared::retry::{NextStep, RetryPolicy};
use opsgenie_shared::text::cap_bytes;
use opsgenie_shared::{AlertJob, DeadReason, JobError, build_request};
use tokio::time::Instant;

use crate::amqp::HEADER_VALUE_LIMIT;
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
    /// A dead letter whose message is cut to what a header may hold (SPEC section 8), so that
    /// neither the dead letter nor the job's log line grows with the job.
    pub fn dead_letter(reason: DeadReason, message: impl AsRef<str>) -> Outcome {
        Outcome::DeadLetter {
            reason,
            message: cap_bytes(message.as_ref(), HEADER_VALUE_LIMIT).into_owned(),
        }
    }

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

/// The most bytes of a producer's team id that a log line repeats.
const LOGGED_TEAM_ID_BYTES: usize = 256;

impl Report {
    /// A report that knows nothing of the job yet.
    pub fn new(outcome: Outcome, attempt: u32) -> Report {
        Report {
            outcome,
            notification_uuid: None,
            team_id: None,
            kind: None,
            action: None,
            alias: None,
            status: None,
            attempt,
            request_id: None,
        }
    }
}

/// Everything `process` needs, shared by every task.
pub struct Pipeline {
    pub keyring: Arc<ArcSwap<Keyring>>,
    pub sender: Sender,
    pub buffer: Buffer,
    pub policy: RetryPolicy,
    pub health: Arc<Health>,
    /// Unfinished attempts after which a redelivered message is dead-lettered as poison.
    pub poison_after: u32,
    /// A redelivered message that was in hand when the worker died before runs alone (the
    /// write side), so that if it kills its attempt again it is the only one counted; every
    /// other job holds the read side while it runs.
    pub quarantine: tokio::sync::RwLock<()>,
}

/// How a delivery may proceed, decided by its count of unfinished attempts.
pub enum Admitted<'a> {
    /// Not counted (first delivery, or Redis unreachable) or counted with no attempt left
    /// unfinished: run beside the others.
    Beside {
        counter: Option<String>,
        _turn: tokio::sync::RwLockReadGuard<'a, ()>,
    },
    /// Attempts at it died before: run it alone.
    Alone {
        counter: String,
        _turn: tokio::sync::RwLockWriteGuard<'a, ()>,
    },
    /// It killed `poison_after` attempts: do not try again.
    Poison { counter: String, unfinished: u32 },
}

impl Admitted<'_> {
    /// The Redis key counting this message's unfinished attempts, if it is counted.
    pub fn counter(&self) -> Option<&str> {
        match self {
            Admitted::Beside { counter, .. } => counter.as_deref(),
            Admitted::Alone { counter, .. } | Admitted::Poison { counter, .. } => Some(counter),
        }
    }
}

impl Pipeline {
    /// Decides whether a delivery runs beside the others, alone, or not at all.
    ///
    /// Only redelivered messages are counted (the broker sets the flag when a message comes
    /// back unacked: its worker died, or lost its connection, with it in hand), so a first
    /// delivery costs nothing here. The count goes up when an attempt starts and is cleared
    /// when it finishes, whatever its outcome; what is left counts the attempts that died.
    /// A count goes up only once the attempt has its turn, so a message waiting behind a
    /// poison one is never charged for the poison's deaths.
    pub async fn admit_delivery(&self, body: &[u8], redelivered: bool) -> Admitted<'_> {
        if !redelivered {
            return Admitted::Beside {
                counter: None,
                _turn: self.quarantine.read().await,
            };
        }
        let counter = self.buffer.attempts_key(body);
        let unfinished = match self.buffer.unfinished_attempts(&counter).await {
            Ok(n) => n,
            Err(error) => {
                // Best effort: without Redis the job waits for it in `process` anyway.
                tracing::warn!(error = %error, "Could not read a redelivered message's unfinished attempts.");
                return Admitted::Beside {
                    counter: None,
                    _turn: self.quarantine.read().await,
                };
            }
        };
        if unfinished >= self.poison_after {
            return Admitted::Poison {
                counter,
                unfinished,
            };
        }
        let admitted = if unfinished == 0 {
            Admitted::Beside {
                counter: Some(counter.clone()),
                _turn: self.quarantine.read().await,
            }
        } else {
            tracing::warn!(
                unfinished,
                "A message whose earlier attempts never finished runs alone."
            );
            Admitted::Alone {
                counter: counter.clone(),
                _turn: self.quarantine.write().await,
            }
        };
        if let Err(error) = self.buffer.attempt_started(&counter).await {
            tracing::warn!(error = %error, "Could not count the attempt at a redelivered message.");
        }
        admitted
    }

    /// Processes one job body. Never fails: every way a job can end is an `Outcome`.
    pub async fn process(&self, body: &[u8], envelope: Envelope, shutdown: &Shutdown) -> Report {
        let attempt = envelope.previous_attempts.saturating_add(1);
        let mut report = Report::new(Outcome::Requeue, attempt);
        let job = match AlertJob::parse(body) {
            Ok(job) => job,
            Err(error) => {
                let reason = match error {
                    JobError::TooLarge { .. } => DeadReason::TooLarge,
                    JobError::Invalid { .. } => DeadReason::InvalidJob,
                };
                report.outcome = Outcome::dead_letter(reason, error.to_string());
                return report;
            }
        };
        let request = build_request(&job);
        report.notification_uuid = Some(job.notification_uuid.clone());
        report.team_id = Some(cap_bytes(&job.team_id, LOGGED_TEAM_ID_BYTES).into_owned());
        report.kind = Some(job.kind().as_str());
        report.action = Some(request.action.as_str());
        report.alias = request.alias.clone();
        if let Some(priority) = &request.ignored_priority {
            tracing::warn!(
                notification_uuid = job.notification_uuid,
                priority = cap_bytes(priority, 64).as_ref(),
                "The job's priority is not one of P1..P5; the default applies."
            );
        }

        let Some(team) = self.keyring.load().team(&job.team_id).cloned() else {
            report.outcome = Outcome::dead_letter(
                DeadReason::UnknownTeam,
                format!(
                    "team \"{}\" is not in the keyring",
                    cap_bytes(&job.team_id, LOGGED_TEAM_ID_BYTES)
                ),
            );
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
                report.outcome = Outcome::dead_letter(reason, message);
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
                report.outcome = match self.retry_outcome(attempt, &envelope, wait) {
                    Outcome::DeadLetter {
                        reason,
                        message: why,
                    } => Outcome::dead_letter(reason, format!("{why}: {message}")),
                    other => other,
                };
                report
            }
        }
    }

    fn retry_outcome(&self, attempt: u32, envelope: &Envelope, wait: Option<Duration>) -> Outcome {
        let age = Duration::from_millis(envelope.now_ms.saturating_sub(envelope.first_seen_ms));
        match self.policy.next_step(attempt, age, wait) {
            NextStep::Delay { tier } => Outcome::RetryLater { tier },
            NextStep::Exhausted => Outcome::dead_letter(
                DeadReason::Exhausted,
                format!(
                    "not delivered after {attempt} attempts over {} s",
                    age.as_secs()
                ),
            ),
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

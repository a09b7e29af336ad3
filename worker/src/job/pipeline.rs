//! One job, end to end: parse, look up the team, check Redis, send, record. `process` returns
//! what happened; the consumer loop turns that into an ack, a retry or a dead letter.

use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use opsgenie_shared::record::{Delivery, delivery_fields};
use opsgenie_shared::retry::{NextStep, RetryPolicy};
use opsgenie_shared::text::cap_bytes;
use opsgenie_shared::{AlertJob, DeadReason, JobError, OpsgenieRequest, build_request};
use tokio::time::Instant;
use tracing::Instrument as _;

use crate::broker::HEADER_VALUE_LIMIT;
use crate::keyring::{Keyring, Team};
use crate::opsgenie::{RoundResult, Sender};
use crate::store::{Admission, Fields, JobKeys, Store};
use crate::support::pacing::Pacing;
use crate::support::shutdown::Shutdown;
use crate::telemetry::health::Health;

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
    /// A dead letter whose message is cut to what a header may hold (docs/contract.md section 8), so that
    /// neither the dead letter nor the job's log line grows with the job.
    pub fn dead_letter(reason: DeadReason, message: impl AsRef<str>) -> Outcome {
        Outcome::DeadLetter {
            reason,
            message: cap_bytes(message.as_ref(), HEADER_VALUE_LIMIT).into_owned(),
        }
    }

    /// The `outcome` log field and metric label.
    pub(crate) fn label(&self) -> &'static str {
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
pub(crate) struct Envelope {
    /// Rounds before this one (from `x-opsgenie-attempts`).
    pub(crate) previous_attempts: u32,
    /// When a worker first saw the job, ms since the epoch.
    pub(crate) first_seen_ms: u64,
    /// Now, ms since the epoch.
    pub(crate) now_ms: u64,
}

impl Envelope {
    /// This round's number (1-based).
    pub(crate) fn attempt(&self) -> u32 {
        self.previous_attempts.saturating_add(1)
    }
}

/// The most bytes of a producer's team id that a log line repeats.
const LOGGED_TEAM_ID_BYTES: usize = 256;

/// What a job's log line says about it besides its outcome, filled in by the steps of
/// `process` as they learn it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct JobFacts {
    pub(crate) notification_uuid: Option<String>,
    pub(crate) team_id: Option<String>,
    pub(crate) kind: Option<&'static str>,
    pub(crate) action: Option<&'static str>,
    pub(crate) alias: Option<String>,
    pub(crate) status: Option<u16>,
    pub(crate) request_id: Option<String>,
}

/// The outcome and the fields of the job's log line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Report {
    pub(crate) outcome: Outcome,
    /// This round's number (1-based).
    pub(crate) attempt: u32,
    pub(crate) facts: JobFacts,
}

impl Report {
    /// The report of a job whose outcome was decided before it was read.
    pub(crate) fn new(outcome: Outcome, attempt: u32) -> Report {
        Report {
            outcome,
            attempt,
            facts: JobFacts::default(),
        }
    }
}

impl JobFacts {
    /// Takes what the job says about itself.
    fn describe(&mut self, job: &AlertJob, request: &OpsgenieRequest) {
        let team_id = cap_bytes(&job.team_id, LOGGED_TEAM_ID_BYTES).into_owned();
        self.notification_uuid = Some(job.notification_uuid.clone());
        self.team_id = Some(team_id);
        self.kind = Some(job.kind().as_str());
        self.action = Some(request.action.as_str());
        self.alias = request.alias.clone();
    }
}

/// A job read from its message, with the Opsgenie request it makes.
struct Prepared {
    job: AlertJob,
    request: OpsgenieRequest,
}

/// What Opsgenie answered to a delivered request.
struct Delivered {
    status: u16,
    request_id: String,
}

/// Reads the job and builds its request; a body that is not a job is a dead letter.
fn parse_and_build(body: &[u8]) -> Result<Prepared, Outcome> {
    match AlertJob::parse(body) {
        Ok(job) => {
            let request = build_request(&job);
            Ok(Prepared { job, request })
        }
        Err(error) => {
            let reason = match error {
                JobError::TooLarge { .. } => DeadReason::TooLarge,
                JobError::Invalid { .. } => DeadReason::InvalidJob,
            };
            Err(Outcome::dead_letter(reason, error.to_string()))
        }
    }
}

/// Everything `process` needs, shared by every task.
pub(crate) struct Pipeline {
    pub(crate) keyring: Arc<ArcSwap<Keyring>>,
    pub(crate) sender: Sender,
    pub(crate) store: Store,
    pub(crate) policy: RetryPolicy,
    pub(crate) health: Arc<Health>,
    /// Unfinished attempts after which a redelivered message is dead-lettered as poison.
    pub(crate) poison_after: u32,
    /// A redelivered message that was in hand when the worker died before runs alone (the
    /// write side), so that if it kills its attempt again it is the only one counted; every
    /// other job holds the read side while it runs.
    pub(crate) quarantine: tokio::sync::RwLock<()>,
    /// With confirmation on (docs/contract.md section 6.1): how long after its delivery a
    /// request may stay unprocessed.
    pub(crate) confirm_within: Option<Duration>,
}

/// How a delivery may proceed, decided by its count of unfinished attempts.
pub(crate) enum Admitted<'a> {
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
    pub(crate) fn counter(&self) -> Option<&str> {
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
    pub(crate) async fn admit_delivery(&self, body: &[u8], redelivered: bool) -> Admitted<'_> {
        if !redelivered {
            return Admitted::Beside {
                counter: None,
                _turn: self.quarantine.read().await,
            };
        }
        let counter = self.store.attempts_key(body);
        let unfinished = match self.store.unfinished_attempts(&counter).await {
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
        if let Err(error) = self.store.attempt_started(&counter).await {
            tracing::warn!(error = %error, "Could not count the attempt at a redelivered message.");
        }
        admitted
    }

    /// Processes one job body. Never fails: every way a job can end is an `Outcome`.
    ///
    /// Everything logged once the body is read, down to a Redis retry, is in the job's span,
    /// which names it. The span is opened with its fields rather than recording them later:
    /// the JSON log format parses and rewrites a span's fields on every later record, three
    /// times a job. It is at the error level so that it is on whenever any line is: a filter
    /// of `warn` must not strip the job's name from its warnings.
    pub(crate) async fn process(
        &self,
        body: &[u8],
        envelope: Envelope,
        shutdown: &Shutdown,
    ) -> Report {
        let mut facts = JobFacts::default();
        let outcome = match parse_and_build(body) {
            Ok(prepared) => {
                facts.describe(&prepared.job, &prepared.request);
                let span = tracing::error_span!(
                    "job",
                    notification_uuid = facts.notification_uuid.as_deref(),
                    team_id = facts.team_id.as_deref(),
                    alias = facts.alias.as_deref(),
                );
                self.steps(prepared, body, &envelope, shutdown, &mut facts)
                    .instrument(span)
                    .await
            }
            Err(dead_letter) => dead_letter,
        };
        Report {
            outcome,
            attempt: envelope.attempt(),
            facts,
        }
    }

    /// The steps of `process` in order; the first that decides the outcome ends the job.
    async fn steps(
        &self,
        prepared: Prepared,
        body: &[u8],
        envelope: &Envelope,
        shutdown: &Shutdown,
        facts: &mut JobFacts,
    ) -> Outcome {
        let Prepared { job, request } = &prepared;
        if let Some(priority) = &request.ignored_priority {
            // Named here as well as in the span: JSON log lines hold the event's own fields.
            tracing::warn!(
                notification_uuid = job.notification_uuid,
                priority = cap_bytes(priority, 64).as_ref(),
                "The job's priority is not one of P1..P5; the default applies."
            );
        }

        let Some(team) = self.keyring.load().team(&job.team_id).cloned() else {
            return Outcome::dead_letter(
                DeadReason::UnknownTeam,
                format!(
                    "team \"{}\" is not in the keyring",
                    cap_bytes(&job.team_id, LOGGED_TEAM_ID_BYTES)
                ),
            );
        };

        let keys = self.job_keys(job, request, &team);

        if let ControlFlow::Break(outcome) =
            self.wait_for_admission(&keys, envelope, shutdown).await
        {
            return outcome;
        }

        let delivered = match self
            .deliver_round(&team, request, &keys, envelope, shutdown, facts)
            .await
        {
            ControlFlow::Continue(delivered) => delivered,
            ControlFlow::Break(outcome) => return outcome,
        };
        self.record(body, &prepared, &keys, envelope, delivered, facts)
            .await;
        Outcome::Delivered
    }

    /// The job's Redis keys. Metric alerts of one incident take turns through its alias;
    /// anything else only guards against two copies of itself.
    fn job_keys(&self, job: &AlertJob, request: &OpsgenieRequest, team: &Team) -> Arc<JobKeys> {
        let incident = match (&job.alert, &request.alias) {
            (opsgenie_shared::Alert::Metric(_), Some(alias)) => Some(alias.as_str()),
            _ => None,
        };
        // Random, so that only this round of this job can free the lease it takes.
        let token = format!("{:032x}", rand::random::<u128>());
        self.store.keys(
            &job.notification_uuid,
            &team.id,
            incident,
            job.sequence(),
            token,
        )
    }

    /// Records a delivered request (and, with confirmation on, the question to ask about it)
    /// until the record is durable.
    async fn record(
        &self,
        body: &[u8],
        Prepared { job, request }: &Prepared,
        keys: &Arc<JobKeys>,
        envelope: &Envelope,
        delivered: Delivered,
        facts: &mut JobFacts,
    ) {
        let Delivered { status, request_id } = delivered;
        let delivery = Delivery {
            status,
            request_id: &request_id,
            attempts: envelope.attempt(),
            delivered_at_ms: crate::support::clock::now_ms(),
        };
        let fields: Fields = delivery_fields(job, request, &delivery).into();
        // Only an accepted request has a status to ask about: a 404 on a close did nothing.
        let pending = match self.confirm_within {
            Some(within) if (200..300).contains(&status) && !request_id.is_empty() => {
                Some(Arc::new(crate::confirm::pending(
                    body, job, request, &delivery, within,
                )))
            }
            _ => None,
        };
        facts.request_id = Some(request_id);
        self.record_until_durable(&job.notification_uuid, keys, &fields, pending)
            .await;
    }

    /// Asks Redis whether the job may be sent, within the quick window. Continues with the
    /// incident's lease taken; breaks with the outcome when the job is a duplicate or stale,
    /// must wait longer than the window (a retry), or shutdown came first (a requeue: nothing
    /// was sent).
    async fn wait_for_admission(
        &self,
        keys: &Arc<JobKeys>,
        envelope: &Envelope,
        shutdown: &Shutdown,
    ) -> ControlFlow<Outcome> {
        let deadline = Instant::now() + self.policy.quick_window;
        let mut pacing = Pacing::new(Duration::from_millis(20), Duration::from_millis(500));
        loop {
            let mut cooling = false;
            let pause = match self.store.admit(keys).await {
                Ok(Admission::Go) => {
                    // Not ready while records cannot reach the replicas asked for.
                    self.health.set_redis(self.store.writes_confirmed());
                    return ControlFlow::Continue(());
                }
                Ok(Admission::Duplicate) => return ControlFlow::Break(Outcome::Duplicate),
                Ok(Admission::Stale) => return ControlFlow::Break(Outcome::Stale),
                Ok(Admission::Busy) => {
                    let pause = pacing.next_pause();
                    if Instant::now() + pause > deadline {
                        return ControlFlow::Break(self.retry_outcome(envelope, None, None));
                    }
                    pause
                }
                Ok(Admission::Cooldown(wait)) => {
                    // Another replica (or this one) was told to slow down for this key.
                    if Instant::now() + wait > deadline {
                        return ControlFlow::Break(self.retry_outcome(envelope, Some(wait), None));
                    }
                    cooling = true;
                    wait
                }
                Err(error) => {
                    // Without Redis we cannot know whether the job was delivered: wait for it.
                    self.health.set_redis(false);
                    tracing::warn!(error = %error, "Redis is unreachable; waiting before checking the job.");
                    pacing.to_ceiling();
                    pacing.next_pause()
                }
            };
            let _waiting = cooling.then(crate::telemetry::catalogue::WaitingForCooldown::start);
            if !shutdown.sleep_until(Instant::now() + pause).await {
                // Nothing was sent: the job goes back to the queue as it was.
                return ControlFlow::Break(Outcome::Requeue);
            }
        }
    }

    /// Sends the request, with the sender's quick retries. Continues with Opsgenie's answer
    /// when it was delivered (the lease is still held: the record frees it); otherwise frees
    /// the lease and breaks with a dead letter or a retry.
    async fn deliver_round(
        &self,
        team: &Team,
        request: &OpsgenieRequest,
        keys: &JobKeys,
        envelope: &Envelope,
        shutdown: &Shutdown,
        facts: &mut JobFacts,
    ) -> ControlFlow<Outcome, Delivered> {
        match self
            .sender
            .deliver(team, request, &self.policy, shutdown)
            .await
        {
            RoundResult::Delivered { status, request_id } => {
                facts.status = Some(status);
                ControlFlow::Continue(Delivered { status, request_id })
            }
            RoundResult::Refused {
                reason,
                status,
                message,
            } => {
                self.release(keys).await;
                facts.status = Some(status);
                ControlFlow::Break(Outcome::dead_letter(reason, message))
            }
            RoundResult::Failed {
                status,
                wait,
                message,
            } => {
                self.release(keys).await;
                facts.status = status;
                tracing::debug!(
                    notification_uuid = facts.notification_uuid.as_deref(),
                    message,
                    "Delivery round failed."
                );
                ControlFlow::Break(self.retry_outcome(envelope, wait, Some(&message)))
            }
        }
    }

    /// Writes the delivery's record, trying until it lands: the request went out, so the
    /// record must be durable before the ack, however long Redis is away, or a redelivery
    /// would page twice. Not cut short by shutdown: only the drain deadline ends this wait
    /// (the job then returns to the queue unacked; see `consumer`). The lines it writes name
    /// the job in their own fields too, as JSON log lines hold only those.
    async fn record_until_durable(
        &self,
        notification_uuid: &str,
        keys: &Arc<JobKeys>,
        fields: &Fields,
        pending: Option<Arc<crate::store::Pending>>,
    ) {
        let mut pacing = Pacing::new(Duration::from_millis(100), Duration::from_secs(5));
        loop {
            match self
                .store
                .record_confirming(keys, fields, pending.clone())
                .await
            {
                Ok(_) => {
                    self.health.set_redis(true);
                    return;
                }
                Err(error) => {
                    self.health.set_redis(false);
                    tracing::error!(
                        notification_uuid,
                        error = %error,
                        "Delivered, but the record could not be written to Redis; trying again."
                    );
                }
            }
            tokio::time::sleep(pacing.next_pause()).await;
        }
    }

    /// A retry from a later delay queue, or a dead letter once attempts or age run out;
    /// `detail` (why this round failed) goes into the dead letter's message.
    fn retry_outcome(
        &self,
        envelope: &Envelope,
        wait: Option<Duration>,
        detail: Option<&str>,
    ) -> Outcome {
        let attempt = envelope.attempt();
        let age = Duration::from_millis(envelope.now_ms.saturating_sub(envelope.first_seen_ms));
        match self.policy.next_step(attempt, age, wait) {
            NextStep::Delay { tier } => Outcome::RetryLater { tier },
            NextStep::Exhausted => {
                let why = format!(
                    "not delivered after {attempt} attempts over {} s",
                    age.as_secs()
                );
                match detail {
                    Some(detail) => {
                        Outcome::dead_letter(DeadReason::Exhausted, format!("{why}: {detail}"))
                    }
                    None => Outcome::dead_letter(DeadReason::Exhausted, why),
                }
            }
        }
    }

    async fn release(&self, keys: &JobKeys) {
        if let Err(error) = self.store.release(keys).await {
            // The lease expires by itself; this only delays the incident's next job.
            tracing::warn!(error = %error, "Could not free the incident lease.");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use opsgenie_shared::DeadReason;

    use super::*;
    use crate::store::StoreSettings;

    /// What the log writes, kept for the test to read.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl Write for Captured {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// A pipeline with an empty keyring: every job that parses ends as `unknown_team` before
    /// it reaches Redis or Opsgenie.
    fn pipeline() -> Pipeline {
        crate::support::init_tls();
        let store = Store::new(
            "redis://127.0.0.1:6379",
            StoreSettings {
                prefix: "test:process:".into(),
                stream_maxlen: 1,
                dedupe_ttl: Duration::from_secs(1),
                lease_ttl: Duration::from_secs(1),
            },
        )
        .unwrap();
        Pipeline {
            keyring: Arc::new(ArcSwap::from_pointee(Keyring::default())),
            sender: Sender::new(Duration::from_secs(1)).unwrap(),
            store,
            policy: Default::default(),
            health: Default::default(),
            poison_after: 3,
            quarantine: Default::default(),
            confirm_within: None,
        }
    }

    const ENVELOPE: Envelope = Envelope {
        previous_attempts: 2,
        first_seen_ms: 0,
        now_ms: 0,
    };

    #[tokio::test]
    async fn every_line_written_while_a_job_is_processed_names_it() {
        let log = Captured::default();
        let writer = log.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .finish();
        let _default = tracing::subscriber::set_default(subscriber);
        tracing::callsite::rebuild_interest_cache();
        let team_id = "t".repeat(300);
        let body = serde_json::json!({
            "version": 1,
            "kind": "metric_alert",
            "notification_uuid": "b7e2d4c1-0a9f-4c3e-8d21-6f5a7b9c0e12",
            "team_id": team_id,
            "priority": "urgent",
            "organization": {"id": 1, "slug": "acme", "url": "https://acme.example"},
            "alert_rule": {"id": 9, "name": "p95 latency above 2s"},
            "incident": {"identifier": 314, "status": "critical", "sequence": 1},
        });
        let (_trigger, shutdown) = Shutdown::new();
        let report = pipeline()
            .process(body.to_string().as_bytes(), ENVELOPE, &shutdown)
            .await;

        assert!(
            matches!(
                report.outcome,
                Outcome::DeadLetter {
                    reason: DeadReason::UnknownTeam,
                    ..
                }
            ),
            "{report:?}"
        );
        assert_eq!(report.attempt, 3);
        // Cut, as everywhere a producer's text reaches a log line.
        let logged = cap_bytes(&team_id, LOGGED_TEAM_ID_BYTES);
        assert!(logged.len() <= LOGGED_TEAM_ID_BYTES);
        assert_eq!(report.facts.team_id.as_deref(), Some(logged.as_ref()));
        assert_eq!(report.facts.alias.as_deref(), Some("incident_1_314"));

        let log = String::from_utf8(log.0.lock().unwrap().clone()).unwrap();
        let line = log
            .lines()
            .find(|l| l.contains("priority is not one of P1..P5"))
            .unwrap_or_else(|| panic!("no priority warning in:\n{log}"));
        let span = &line[line.find("job{").expect(line)..line.find("}:").expect(line)];
        assert!(
            span.contains("b7e2d4c1-0a9f-4c3e-8d21-6f5a7b9c0e12"),
            "{span}"
        );
        assert!(span.contains("incident_1_314"), "{span}");
        assert!(span.contains(logged.as_ref()), "{span}");
        assert!(!span.contains(&team_id[..LOGGED_TEAM_ID_BYTES]), "{span}");

        a_body_that_is_not_a_job_is_a_dead_letter_that_names_nothing().await;
    }

    /// Not a test of its own: the job span's callsite must first be reached with the
    /// capturing subscriber in place, which a test on another thread could race.
    async fn a_body_that_is_not_a_job_is_a_dead_letter_that_names_nothing() {
        let (_trigger, shutdown) = Shutdown::new();
        let report = pipeline().process(b"{}", ENVELOPE, &shutdown).await;
        assert!(
            matches!(
                report.outcome,
                Outcome::DeadLetter {
                    reason: DeadReason::InvalidJob,
                    ..
                }
            ),
            "{report:?}"
        );
        assert_eq!(report.facts, JobFacts::default());
        assert_eq!(report.attempt, 3);
    }
}

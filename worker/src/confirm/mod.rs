//! Confirmation (docs/contract.md section 6.1): a 202 is not an alert. Opsgenie accepts a
//! request and processes it later, when it can still fail (a disabled integration, a policy, a
//! refused field). Every delivery answered with a `requestId` leaves a pending confirmation in
//! Redis, written by the same script as its record; a confirmer in every replica claims the
//! due ones (a claim is a lease, so a confirmer that dies leaves them to another), asks
//! `GET {api}/v2/alerts/requests/{requestId}`, and settles each:
//!
//! - processed with `isSuccess: true`: `event=confirmed` in the stream;
//! - processed with `isSuccess: false`: the job is dead-lettered as `failed_async` with
//!   Opsgenie's status text, its sent marker deleted (so that `dead replay` delivers it again)
//!   and `event=failed_async` appended;
//! - not processed yet (404), or the question failed: asked again later, less and less often;
//! - nothing said within `--confirm-within`: dead-lettered as `unconfirmed`, and
//!   `event=unconfirmed` appended.
//!
//! The ack of a job never waits for any of this.

mod decide;
mod status;

use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use futures_util::StreamExt as _;
use opsgenie_shared::record::Delivery;
use opsgenie_shared::text::{cap_bytes, seg};
use opsgenie_shared::{Alert, AlertJob, OpsgenieRequest};
use tokio::time::Instant;

use self::decide::Decision;
use self::status::{Status, read_status};
use crate::broker::{self, DeadLetter, Publisher, Topology};
use crate::keyring::Keyring;
use crate::opsgenie::{CallError, Sender};
use crate::store::{Pending, PendingConfirmation, Settle, Settled, Settlement, Store, StoreError};
use crate::support::shutdown::Shutdown;
use crate::telemetry::catalogue;
use crate::telemetry::health::Health;

/// How long a claim lasts beyond two request time-outs (the question, and a dead letter's
/// publish), so that a live confirmer settles what it claimed before another may take it,
/// and a dead one's claims pass to another soon.
const CLAIM_MARGIN: Duration = Duration::from_secs(5);
/// The most confirmations claimed at once.
const CLAIM_BATCH: usize = 64;
/// The most questions in flight at once per replica.
const CONCURRENCY: usize = 16;
/// How long an idle confirmer waits before looking for due confirmations again.
const IDLE_POLL: Duration = Duration::from_millis(250);
/// How long a pending confirmation outlives its deadline in Redis if nothing settles it.
const PENDING_MARGIN: Duration = Duration::from_secs(24 * 3600);

/// The pending confirmation of a delivery, for `Store::record_confirming`.
pub(crate) fn pending(
    body: &[u8],
    job: &AlertJob,
    request: &OpsgenieRequest,
    delivery: &Delivery<'_>,
    within: Duration,
) -> Pending {
    let delivered_at_ms = delivery.delivered_at_ms;
    let within_ms = u64::try_from(within.as_millis()).unwrap_or(u64::MAX);
    let incident = match (&job.alert, &request.alias) {
        (Alert::Metric(_), Some(alias)) => Some(alias.clone()),
        _ => None,
    };
    Pending {
        member: job.notification_uuid.clone(),
        due_ms: delivered_at_ms + u64::try_from(decide::FIRST_ASK.as_millis()).unwrap_or(0),
        ttl_ms: within_ms.saturating_add(u64::try_from(PENDING_MARGIN.as_millis()).unwrap_or(0)),
        body: bytes::Bytes::copy_from_slice(body),
        confirmation: PendingConfirmation {
            team: job.team_id.clone(),
            request_id: delivery.request_id.to_string(),
            status: delivery.status,
            attempts: delivery.attempts,
            delivered_at_ms,
            deadline_ms: delivered_at_ms.saturating_add(within_ms),
            incident,
            seq: job.sequence(),
            asks: 0,
        },
    }
}

/// The confirmer of one replica.
pub(crate) struct Confirmer {
    store: Store,
    sender: Sender,
    keyring: Arc<ArcSwap<Keyring>>,
    health: Arc<Health>,
    amqp_url: String,
    topology: Arc<Topology>,
    /// How long a claim lasts.
    lease: Duration,
    /// Dead letters go out on a connection of the confirmer's own, opened when the first
    /// one is needed.
    publisher: tokio::sync::Mutex<Option<(lapin::Connection, Publisher)>>,
}

/// A claimed confirmation, read from its hash.
struct Claimed {
    member: String,
    token: String,
    /// `None` when the hash is gone, or cannot be read.
    pending: Option<PendingConfirmation>,
}

impl Confirmer {
    pub(crate) fn new(
        store: Store,
        sender: Sender,
        keyring: Arc<ArcSwap<Keyring>>,
        health: Arc<Health>,
        amqp_url: String,
        topology: Arc<Topology>,
        request_timeout: Duration,
    ) -> Confirmer {
        Confirmer {
            lease: request_timeout.saturating_mul(2) + CLAIM_MARGIN,
            store,
            sender,
            keyring,
            health,
            amqp_url,
            topology,
            publisher: tokio::sync::Mutex::new(None),
        }
    }

    /// Claims and settles due confirmations until `shutdown`. What is claimed when shutdown
    /// comes is left to its lease: another replica (or this one, restarted) takes it over.
    pub(crate) async fn run(self, shutdown: Shutdown) {
        let work = async {
            let mut gauge_at = Instant::now();
            loop {
                if gauge_at <= Instant::now() {
                    gauge_at = Instant::now() + Duration::from_secs(2);
                    if let Ok(waiting) = self.store.confirmations_waiting().await {
                        metrics::gauge!(catalogue::CONFIRMATIONS_PENDING).set(waiting as f64);
                    }
                }
                let claimed = match self.claim().await {
                    Ok(claimed) => claimed,
                    Err(error) => {
                        tracing::debug!(error = %error, "Cannot claim confirmations; Redis is unreachable.");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        continue;
                    }
                };
                let full = claimed.len() == CLAIM_BATCH;
                let decided: Vec<(Claimed, Settle)> = futures_util::stream::iter(claimed)
                    .map(|claimed| self.confirm(claimed))
                    .buffer_unordered(CONCURRENCY)
                    .collect()
                    .await;
                self.settle(decided).await;
                if !full {
                    tokio::time::sleep(IDLE_POLL).await;
                }
            }
        };
        tokio::select! {
            () = work => {}
            () = shutdown.triggered() => {}
        }
        if let Some((connection, _)) = self.publisher.lock().await.take() {
            let _ = connection.close(200, "shutting down".into()).await;
        }
    }

    /// The due confirmations, claimed, with their hashes. A hash that cannot be read is
    /// settled as one that is gone: asking about it would rest on values it does not hold.
    async fn claim(&self) -> Result<Vec<Claimed>, StoreError> {
        let claims = self
            .store
            .claim_confirmations(crate::support::clock::now_ms(), self.lease, CLAIM_BATCH)
            .await?;
        if claims.is_empty() {
            return Ok(Vec::new());
        }
        let members: Vec<String> = claims.iter().map(|(m, _)| m.clone()).collect();
        let hashes = self.store.pending_confirmations(&members).await?;
        Ok(claims
            .into_iter()
            .zip(hashes)
            .map(|((member, token), hash)| {
                let pending = hash.and_then(|read| {
                    read.inspect_err(|error| {
                        tracing::warn!(
                            notification_uuid = member,
                            error = %error,
                            "A pending confirmation cannot be read; settling it as lost."
                        );
                    })
                    .ok()
                });
                Claimed {
                    member,
                    token,
                    pending,
                }
            })
            .collect())
    }

    /// Asks about one claimed confirmation (unless its hash is gone or its deadline passed),
    /// decides, and carries the decision out: how to settle it.
    async fn confirm(&self, claimed: Claimed) -> (Claimed, Settle) {
        let now = crate::support::clock::now_ms();
        let decision = match decide::before_asking(&claimed.member, claimed.pending.as_ref(), now) {
            ControlFlow::Break(decision) => decision,
            ControlFlow::Continue(pending) => {
                let status = self.ask(pending).await;
                decide::on_answer(&claimed.member, pending, status, now)
            }
        };
        let settle = self.carry_out(&claimed, decision).await;
        (claimed, settle)
    }

    /// Asks Opsgenie about the request of `pending`.
    async fn ask(&self, pending: &PendingConfirmation) -> Status {
        let Some(team) = self.keyring.load().team(&pending.team).cloned() else {
            return Status::Failed {
                message: format!(
                    "team \"{}\" is no longer in the keyring",
                    cap_bytes(&pending.team, 100)
                ),
                wait: None,
            };
        };
        let path = ["/v2/alerts/requests/", &seg(&pending.request_id)].concat();
        match self.sender.call(&team, reqwest::Method::GET, &path).await {
            Ok(reply) if (200..300).contains(&reply.status) => read_status(&reply.body),
            Ok(reply) if reply.status == 404 => Status::NotYet,
            Ok(reply) => Status::Failed {
                message: format!(
                    "Opsgenie answered {}: {}",
                    reply.status,
                    reply.excerpt(&team)
                ),
                wait: reply.wait,
            },
            Err(CallError::CoolingDown(wait)) => Status::Failed {
                message: "rate limited: the key is cooling down".into(),
                wait: Some(wait),
            },
            Err(CallError::Transport(message)) => Status::Failed {
                message: message.to_string(),
                wait: None,
            },
        }
    }

    /// Logs and counts the decision, publishes its dead letter if it has one, and answers how
    /// to settle the confirmation.
    async fn carry_out(&self, claimed: &Claimed, decision: Decision) -> Settle {
        let notification_uuid = claimed.member.as_str();
        let request_id = claimed.pending.as_ref().map_or("", |p| &p.request_id);
        match decision {
            Decision::Lost(settle) => {
                tracing::error!(
                    notification_uuid,
                    "A pending confirmation was lost before anyone settled it."
                );
                settle
            }
            Decision::Confirmed {
                alert_id,
                lag_ms,
                settle,
            } => {
                count("confirmed");
                record_lag(lag_ms);
                tracing::debug!(
                    notification_uuid,
                    request_id,
                    alert_id,
                    "Delivery confirmed."
                );
                settle
            }
            Decision::DeadLetter {
                letter,
                status_text,
                lag_ms,
                settle,
                otherwise,
            } => {
                match &status_text {
                    Some(status_text) => tracing::warn!(
                        notification_uuid,
                        request_id,
                        status_text,
                        "A delivered request failed after its 202; dead-lettering the job."
                    ),
                    None => tracing::warn!(
                        notification_uuid,
                        request_id,
                        "A delivered request was never confirmed; dead-lettering the job."
                    ),
                }
                if !self.dead_letter(notification_uuid, &letter).await {
                    return otherwise;
                }
                count(letter.reason.as_str());
                if let Some(lag_ms) = lag_ms {
                    record_lag(lag_ms);
                }
                settle
            }
            Decision::NotYet(settle) => {
                count("not_yet");
                settle
            }
            Decision::AskFailed { error, settle } => {
                count("error");
                tracing::warn!(
                    notification_uuid,
                    request_id,
                    error,
                    "Could not ask Opsgenie about a delivered request; asking again later."
                );
                settle
            }
        }
    }

    /// Settles the decisions of one claimed batch in one script call. A rescheduling that
    /// fails is let go (the claim runs out and the confirmation falls due again by itself);
    /// an end is tried until Redis takes it (or the claim was lost to another confirmer,
    /// which then writes it).
    async fn settle(&self, mut decided: Vec<(Claimed, Settle)>) {
        let mut pause = Duration::from_millis(100);
        while !decided.is_empty() {
            let settles: Vec<Settlement<'_>> = decided
                .iter()
                .map(|(claimed, settle)| Settlement {
                    member: &claimed.member,
                    token: &claimed.token,
                    alias: claimed.pending.as_ref().and_then(|p| p.incident.as_deref()),
                    settle,
                })
                .collect();
            let error = match self.store.settle_confirmations(&settles).await {
                Ok(answers) => {
                    for ((claimed, settle), answer) in decided.iter().zip(answers) {
                        if answer == Settled::Lost && matches!(settle, Settle::Done { .. }) {
                            tracing::debug!(
                                notification_uuid = claimed.member,
                                "A confirmation was settled by another replica."
                            );
                        }
                    }
                    return;
                }
                Err(error) => error,
            };
            drop(settles);
            let before = decided.len();
            decided.retain(|(_, settle)| matches!(settle, Settle::Done { .. }));
            if decided.len() < before {
                tracing::debug!(error = %error, "Could not reschedule confirmations.");
            }
            if decided.is_empty() {
                return;
            }
            self.health.set_redis(false);
            tracing::warn!(
                confirmations = decided.len(),
                error = %error,
                "Could not write confirmations to Redis; trying again."
            );
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(5));
        }
    }

    /// Publishes the job body to the dead-letter queue, confirmed. False when it could not
    /// be published now (the confirmation stays pending and is tried again).
    async fn dead_letter(&self, member: &str, letter: &DeadLetter) -> bool {
        let properties = broker::job_properties(member);
        let body = match self.store.pending_body(member).await {
            Ok(Some(body)) => body,
            // Gone since it was claimed: the next claim finds it gone and ends it.
            Ok(None) => return false,
            Err(error) => {
                tracing::warn!(error = %error, "Cannot read a job to dead-letter it from Redis; trying again later.");
                return false;
            }
        };
        let mut publisher = self.publisher.lock().await;
        if publisher
            .as_ref()
            .is_none_or(|(c, _)| !c.status().connected())
        {
            match open_publisher(&self.amqp_url).await {
                Ok(opened) => *publisher = Some(opened),
                Err(error) => {
                    tracing::warn!(error = %error, "Cannot reach RabbitMQ to dead-letter a job; trying again later.");
                    return false;
                }
            }
        }
        let Some((_, channel)) = publisher.as_ref() else {
            return false;
        };
        match channel
            .dead_letter(
                &self.topology.dead_queue,
                body.as_bytes(),
                &properties,
                letter,
            )
            .await
        {
            Ok(()) => true,
            Err(error) => {
                tracing::warn!(error = %error, "Could not dead-letter a job; trying again later.");
                *publisher = None;
                false
            }
        }
    }
}

/// A connection of the confirmer's own, to the first node of `urls` that answers, with a
/// publisher on it. The error names each node tried, passwords redacted.
async fn open_publisher(urls: &str) -> Result<(lapin::Connection, Publisher), String> {
    let connection = broker::connect(urls, "opsgenie-worker confirm")
        .await
        .map_err(|e| e.to_string())?;
    let publisher = Publisher::new(&connection)
        .await
        .map_err(|e| crate::support::redact::redact_error(&e.to_string(), urls))?;
    Ok((connection, publisher))
}

/// Counts one answer to "was this alert processed?".
fn count(result: &'static str) {
    metrics::counter!(catalogue::CONFIRMATIONS, "result" => result).increment(1);
}

/// Records how long after its delivery a request was found processed.
fn record_lag(lag_ms: u64) {
    metrics::histogram!(catalogue::CONFIRMATION_LAG).record(lag_ms as f64 / 1000.0);
}

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

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use futures_util::StreamExt as _;
use opsgenie_shared::record::{Confirmation, ConfirmationEvent, Delivery, confirmation_fields};
use opsgenie_shared::text::{cap_bytes, printable, seg};
use opsgenie_shared::{Alert, AlertJob, DeadReason, OpsgenieRequest};
use tokio::time::Instant;

use crate::broker::{self, DeadLetter, Publisher, Topology};
use crate::keyring::Keyring;
use crate::opsgenie::{CallError, Sender};
use crate::store::{Pending, Settle, Settled, Settlement, Store};
use crate::support::shutdown::Shutdown;
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
/// The first question goes this long after the delivery; each next one waits twice as long
/// as the one before, up to `LONGEST_GAP`.
const FIRST_ASK: Duration = Duration::from_secs(1);
const LONGEST_GAP: Duration = Duration::from_secs(60);
/// How long a pending confirmation outlives its deadline in Redis if nothing settles it.
const PENDING_MARGIN: Duration = Duration::from_secs(24 * 3600);
/// The most bytes of Opsgenie's status text and alert id kept.
const TEXT_LIMIT_BYTES: usize = 512;

/// The pending confirmation of a delivery, for `Store::record_confirming`.
pub fn pending(
    body: &[u8],
    job: &AlertJob,
    request: &OpsgenieRequest,
    delivery: &Delivery<'_>,
    within: Duration,
) -> Pending {
    let delivered_at_ms = delivery.delivered_at_ms;
    let within_ms = u64::try_from(within.as_millis()).unwrap_or(u64::MAX);
    let incident = match (&job.alert, &request.alias) {
        (Alert::Metric(_), Some(alias)) => alias.clone(),
        _ => String::new(),
    };
    Pending {
        member: job.notification_uuid.clone(),
        due_ms: delivered_at_ms + u64::try_from(FIRST_ASK.as_millis()).unwrap_or(0),
        ttl_ms: within_ms.saturating_add(u64::try_from(PENDING_MARGIN.as_millis()).unwrap_or(0)),
        body: bytes::Bytes::copy_from_slice(body),
        fields: vec![
            ("team", job.team_id.clone()),
            ("request_id", delivery.request_id.to_string()),
            ("status", delivery.status.to_string()),
            ("attempts", delivery.attempts.to_string()),
            ("delivered_at_ms", delivered_at_ms.to_string()),
            (
                "deadline_ms",
                delivered_at_ms.saturating_add(within_ms).to_string(),
            ),
            ("incident", incident),
            (
                "seq",
                job.sequence().map(|n| n.to_string()).unwrap_or_default(),
            ),
            ("asks", "0".to_string()),
        ],
    }
}

/// The confirmer of one replica.
pub struct Confirmer {
    pub store: Store,
    pub sender: Sender,
    pub keyring: Arc<ArcSwap<Keyring>>,
    pub health: Arc<Health>,
    pub amqp_url: String,
    pub topology: Arc<Topology>,
    /// How long a claim lasts.
    lease: Duration,
    /// Dead letters go out on a connection of the confirmer's own, opened when the first
    /// one is needed.
    publisher: tokio::sync::Mutex<Option<(lapin::Connection, Publisher)>>,
}

/// The fields of a pending hash the confirmer reads, in the order `Claimed::fields` holds
/// them (`seq` and `prev_seq` are only read by the settle script). The job's body is read
/// only to dead-letter it: a confirmed delivery, nearly all of them, never needs it.
const READ_FIELDS: [&str; 8] = [
    "team",
    "request_id",
    "status",
    "attempts",
    "delivered_at_ms",
    "deadline_ms",
    "incident",
    "asks",
];

/// A claimed confirmation, read from its hash.
struct Claimed {
    member: String,
    token: String,
    /// The values of `READ_FIELDS`, in order; `None` when the hash is gone.
    fields: Option<Vec<String>>,
}

/// How one claimed confirmation is to be settled, decided once Opsgenie was asked.
enum Decision {
    /// Ask again at this time (ms).
    Again { due_ms: u64 },
    /// End it with this stream entry.
    Done {
        fields: Vec<(&'static str, String)>,
        failed: bool,
    },
}

impl Claimed {
    fn text(&self, name: &str) -> &str {
        let at = READ_FIELDS.iter().position(|n| *n == name);
        match (&self.fields, at) {
            (Some(values), Some(at)) => values.get(at).map_or("", String::as_str),
            _ => "",
        }
    }

    fn number(&self, name: &str) -> u64 {
        self.text(name).parse().unwrap_or(0)
    }

    fn incident(&self) -> Option<&str> {
        Some(self.text("incident")).filter(|a| !a.is_empty())
    }
}

/// What Opsgenie said about a request.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Status {
    /// Processed; `success` is `isSuccess`.
    Processed {
        success: bool,
        text: String,
        alert_id: String,
    },
    /// Not processed yet (404, or an answer without `isSuccess`).
    NotYet,
    /// No usable answer; ask again at the earliest after `wait`.
    Failed {
        message: String,
        wait: Option<Duration>,
    },
}

impl Confirmer {
    pub fn new(
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
    pub async fn run(self, shutdown: Shutdown) {
        let work = async {
            let mut gauge_at = Instant::now();
            loop {
                if gauge_at <= Instant::now() {
                    gauge_at = Instant::now() + Duration::from_secs(2);
                    if let Ok(waiting) = self.store.confirmations_waiting().await {
                        metrics::gauge!("opsgenie_confirmations_pending").set(waiting as f64);
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
                let decided: Vec<(Claimed, Decision)> = futures_util::stream::iter(claimed)
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

    /// The due confirmations, claimed, with their hashes.
    async fn claim(&self) -> Result<Vec<Claimed>, fred::error::Error> {
        let claims = self
            .store
            .claim_confirmations(crate::support::clock::now_ms(), self.lease, CLAIM_BATCH)
            .await?;
        if claims.is_empty() {
            return Ok(Vec::new());
        }
        let members: Vec<String> = claims.iter().map(|(m, _)| m.clone()).collect();
        let hashes = self
            .store
            .pending_confirmations(&members, &READ_FIELDS)
            .await?;
        Ok(claims
            .into_iter()
            .zip(hashes)
            .map(|((member, token), fields)| Claimed {
                member,
                token,
                fields,
            })
            .collect())
    }

    /// Asks about one claimed confirmation and decides how to settle it.
    async fn confirm(&self, claimed: Claimed) -> (Claimed, Decision) {
        let decision = self.decide(&claimed).await;
        (claimed, decision)
    }

    async fn decide(&self, claimed: &Claimed) -> Decision {
        let now = crate::support::clock::now_ms();
        let request_id = claimed.text("request_id").to_string();
        if claimed.fields.is_none() {
            // Its hash outlived its deadline by a day without being settled: nothing is left
            // to ask about or to dead-letter.
            tracing::error!(
                notification_uuid = claimed.member,
                "A pending confirmation was lost before anyone settled it."
            );
            return finish(
                claimed,
                ConfirmationEvent::Unconfirmed,
                "the pending confirmation expired",
                "",
                false,
            );
        }
        if now >= claimed.number("deadline_ms") {
            return self.give_up(claimed).await;
        }
        let status = match self.keyring.load().team(claimed.text("team")).cloned() {
            None => Status::Failed {
                message: format!(
                    "team \"{}\" is no longer in the keyring",
                    cap_bytes(claimed.text("team"), 100)
                ),
                wait: None,
            },
            Some(team) => {
                let path = ["/v2/alerts/requests/", &seg(&request_id)].concat();
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
        };
        match status {
            Status::Processed {
                success: true,
                text,
                alert_id,
            } => {
                metrics::counter!("opsgenie_confirmations_total", "result" => "confirmed")
                    .increment(1);
                let lag_ms = now.saturating_sub(claimed.number("delivered_at_ms"));
                metrics::histogram!("opsgenie_confirmation_lag_seconds")
                    .record(lag_ms as f64 / 1000.0);
                tracing::debug!(
                    notification_uuid = claimed.member,
                    request_id,
                    alert_id,
                    "Delivery confirmed."
                );
                finish(
                    claimed,
                    ConfirmationEvent::Confirmed,
                    &text,
                    &alert_id,
                    false,
                )
            }
            Status::Processed {
                success: false,
                text,
                alert_id,
            } => {
                let message =
                    format!("Opsgenie accepted request {request_id} and then failed it: {text}");
                tracing::warn!(
                    notification_uuid = claimed.member,
                    request_id,
                    status_text = text,
                    "A delivered request failed after its 202; dead-lettering the job."
                );
                if self
                    .dead_letter(claimed, DeadReason::FailedAsync, &message)
                    .await
                {
                    metrics::counter!("opsgenie_confirmations_total", "result" => "failed_async")
                        .increment(1);
                    let lag_ms = now.saturating_sub(claimed.number("delivered_at_ms"));
                    metrics::histogram!("opsgenie_confirmation_lag_seconds")
                        .record(lag_ms as f64 / 1000.0);
                    finish(
                        claimed,
                        ConfirmationEvent::FailedAsync,
                        &text,
                        &alert_id,
                        true,
                    )
                } else {
                    again(claimed, now, None)
                }
            }
            Status::NotYet => {
                metrics::counter!("opsgenie_confirmations_total", "result" => "not_yet")
                    .increment(1);
                again(claimed, now, None)
            }
            Status::Failed { message, wait } => {
                metrics::counter!("opsgenie_confirmations_total", "result" => "error").increment(1);
                tracing::warn!(
                    notification_uuid = claimed.member,
                    request_id,
                    error = message,
                    "Could not ask Opsgenie about a delivered request; asking again later."
                );
                again(claimed, now, wait)
            }
        }
    }

    /// Past `--confirm-within` with no answer: dead-letter as `unconfirmed`.
    async fn give_up(&self, claimed: &Claimed) -> Decision {
        let request_id = claimed.text("request_id");
        let message = format!(
            "Opsgenie accepted request {request_id} but did not say it was processed within the confirmation window"
        );
        tracing::warn!(
            notification_uuid = claimed.member,
            request_id,
            "A delivered request was never confirmed; dead-lettering the job."
        );
        if self
            .dead_letter(claimed, DeadReason::Unconfirmed, &message)
            .await
        {
            metrics::counter!("opsgenie_confirmations_total", "result" => "unconfirmed")
                .increment(1);
            finish(
                claimed,
                ConfirmationEvent::Unconfirmed,
                "not processed within the confirmation window",
                "",
                false,
            )
        } else {
            // Nothing is lost: it stays pending and falls due again.
            again(
                claimed,
                crate::support::clock::now_ms(),
                Some(Duration::from_secs(5)),
            )
        }
    }

    /// Settles the decisions of one claimed batch in one script call. A rescheduling that
    /// fails is let go (the claim runs out and the confirmation falls due again by itself);
    /// an end is tried until Redis takes it (or the claim was lost to another confirmer,
    /// which then writes it).
    async fn settle(&self, mut decided: Vec<(Claimed, Decision)>) {
        let mut pause = Duration::from_millis(100);
        while !decided.is_empty() {
            let settles: Vec<Settlement<'_>> = decided
                .iter()
                .map(|(claimed, decision)| Settlement {
                    member: &claimed.member,
                    token: &claimed.token,
                    alias: claimed.incident(),
                    settle: match decision {
                        Decision::Again { due_ms } => Settle::Again { due_ms: *due_ms },
                        Decision::Done { fields, failed } => Settle::Done {
                            fields,
                            failed: *failed,
                        },
                    },
                })
                .collect();
            let error = match self.store.settle_confirmations(&settles).await {
                Ok(answers) => {
                    for ((claimed, decision), answer) in decided.iter().zip(answers) {
                        if answer == Settled::Lost && matches!(decision, Decision::Done { .. }) {
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
            decided.retain(|(_, decision)| matches!(decision, Decision::Done { .. }));
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
    async fn dead_letter(&self, claimed: &Claimed, reason: DeadReason, message: &str) -> bool {
        let letter = DeadLetter {
            reason,
            message: message.to_string(),
            status: claimed.text("status").parse().ok(),
            attempts: u32::try_from(claimed.number("attempts")).unwrap_or(u32::MAX),
        };
        let properties = broker::job_properties(&claimed.member);
        let body = match self.store.pending_body(&claimed.member).await {
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
                &letter,
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
        .map_err(|e| crate::cli::redact_error(&e.to_string(), urls))?;
    Ok((connection, publisher))
}

/// Asks again later: the gap doubles with each question, and the last one is at the deadline.
fn again(claimed: &Claimed, now: u64, wait: Option<Duration>) -> Decision {
    let asks = u32::try_from(claimed.number("asks"))
        .unwrap_or(u32::MAX)
        .min(16);
    let gap = FIRST_ASK
        .saturating_mul(1 << asks)
        .min(LONGEST_GAP)
        .max(wait.unwrap_or_default());
    let gap_ms = u64::try_from(gap.as_millis()).unwrap_or(u64::MAX);
    let due_ms = now
        .saturating_add(gap_ms)
        .min(claimed.number("deadline_ms").max(now));
    Decision::Again { due_ms }
}

/// Ends the confirmation with its stream entry.
fn finish(
    claimed: &Claimed,
    event: ConfirmationEvent,
    status_text: &str,
    alert_id: &str,
    failed: bool,
) -> Decision {
    let fields = confirmation_fields(
        &claimed.member,
        &Confirmation {
            event,
            request_id: claimed.text("request_id"),
            status_text,
            alert_id,
            confirmed_at_ms: crate::support::clock::now_ms(),
        },
    );
    Decision::Done { fields, failed }
}

/// A request status answer: Opsgenie wraps the status in `data`; the status itself, unwrapped,
/// is read too. Every other field is skipped unread, and strings are borrowed from the
/// answer unless they hold escapes.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(default)]
struct RequestStatus<'a> {
    #[serde(borrow)]
    data: Option<Box<RequestStatus<'a>>>,
    #[serde(rename = "isSuccess")]
    is_success: Option<bool>,
    success: Option<bool>,
    #[serde(borrow)]
    status: Option<std::borrow::Cow<'a, str>>,
    #[serde(rename = "alertId", borrow)]
    alert_id: Option<std::borrow::Cow<'a, str>>,
}

/// Reads a request status answer: Opsgenie wraps it in `data`; the unwrapped form is
/// accepted as well.
fn read_status(body: &[u8]) -> Status {
    let Ok(answer) = serde_json::from_slice::<RequestStatus<'_>>(body) else {
        return Status::Failed {
            message: "the request status answer is not a JSON object Opsgenie would send".into(),
            wait: None,
        };
    };
    let status = match answer.data {
        Some(data) => *data,
        None => answer,
    };
    let text = |value: Option<std::borrow::Cow<'_, str>>| {
        value
            .map(|s| printable(&cap_bytes(&s, TEXT_LIMIT_BYTES)).into_owned())
            .unwrap_or_default()
    };
    match status.is_success.or(status.success) {
        Some(success) => Status::Processed {
            success,
            text: text(status.status),
            alert_id: text(status.alert_id),
        },
        None => Status::NotYet,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_status_is_read_wrapped_or_not() {
        let cases = [
            (
                r#"{"data":{"success":true,"action":"Create","isSuccess":true,"status":"Created alert","alertId":"a-1","alias":"x"},"took":0.01,"requestId":"r"}"#,
                Status::Processed {
                    success: true,
                    text: "Created alert".into(),
                    alert_id: "a-1".into(),
                },
            ),
            (
                r#"{"isSuccess":false,"status":"Integration is disabled"}"#,
                Status::Processed {
                    success: false,
                    text: "Integration is disabled".into(),
                    alert_id: String::new(),
                },
            ),
            (r#"{"data":{"action":"Create"}}"#, Status::NotYet),
            (r#"{"message":"Request not processed yet"}"#, Status::NotYet),
            (
                r#"{"data":null,"took":1,"isSuccess":true,"status":"Closed \u0022x\u0022"}"#,
                Status::Processed {
                    success: true,
                    text: "Closed \"x\"".into(),
                    alert_id: String::new(),
                },
            ),
        ];
        for (body, expected) in cases {
            assert_eq!(read_status(body.as_bytes()), expected, "{body}");
        }
        assert!(matches!(read_status(b"<html>"), Status::Failed { .. }));
        assert!(matches!(
            read_status(br#"{"data":{"isSuccess":"yes"}}"#),
            Status::Failed { .. }
        ));
        let long = format!(
            r#"{{"isSuccess":false,"status":"{}\u001b[2J"}}"#,
            "x".repeat(5000)
        );
        let Status::Processed { text, .. } = read_status(long.as_bytes()) else {
            panic!("not processed");
        };
        assert!(
            text.len() <= TEXT_LIMIT_BYTES + 8 && !text.contains('\u{1b}'),
            "{}",
            text.len()
        );
    }
}

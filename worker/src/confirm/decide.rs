//! How one claimed confirmation is settled, from its pending hash, what Opsgenie said about
//! its request and the time: a pure step, so that every rule of docs/contract.md section 6.1
//! is tested without Redis, RabbitMQ or Opsgenie. The confirmer carries the decision out (a
//! dead letter, logs, metrics) and settles it.

use std::ops::ControlFlow;
use std::time::Duration;

use opsgenie_shared::DeadReason;
use opsgenie_shared::record::{Confirmation, ConfirmationEvent, confirmation_fields};

use super::status::Status;
use crate::broker::DeadLetter;
use crate::store::{PendingConfirmation, Settle};

/// The first question goes this long after the delivery; each next one waits twice as long
/// as the one before, up to `LONGEST_GAP`.
pub(super) const FIRST_ASK: Duration = Duration::from_secs(1);
const LONGEST_GAP: Duration = Duration::from_secs(60);
/// How long to wait before trying again a dead letter that could not be published.
const DEAD_LETTER_RETRY: Duration = Duration::from_secs(5);

/// What to do with one claimed confirmation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Decision {
    /// Its hash is gone (it outlived its deadline by a day without being settled): nothing is
    /// left to ask about or to dead-letter; end it.
    Lost(Settle),
    /// Processed successfully: end it.
    Confirmed {
        alert_id: String,
        /// From the delivery to now.
        lag_ms: u64,
        settle: Settle,
    },
    /// Processed and failed after its 202 (`lag_ms` after the delivery), or not processed
    /// within `--confirm-within` (no lag): dead-letter the job, then end it with `settle`;
    /// when the dead letter cannot be published, settle with `otherwise` (ask again).
    DeadLetter {
        letter: DeadLetter,
        /// Opsgenie's status text, for a request that failed.
        status_text: Option<String>,
        lag_ms: Option<u64>,
        settle: Settle,
        otherwise: Settle,
    },
    /// Not processed yet: ask again.
    NotYet(Settle),
    /// The question had no usable answer: ask again.
    AskFailed { error: String, settle: Settle },
}

impl Decision {
    /// How the confirmation is settled when the dead letter, if any, was published.
    #[cfg(test)]
    fn settle(&self) -> &Settle {
        match self {
            Decision::Lost(settle) | Decision::NotYet(settle) => settle,
            Decision::Confirmed { settle, .. }
            | Decision::DeadLetter { settle, .. }
            | Decision::AskFailed { settle, .. } => settle,
        }
    }
}

/// Decides what needs no question: a lost hash, or a deadline that passed. Continues with the
/// pending confirmation to ask Opsgenie about.
pub(super) fn before_asking<'a>(
    member: &str,
    pending: Option<&'a PendingConfirmation>,
    now: u64,
) -> ControlFlow<Decision, &'a PendingConfirmation> {
    let Some(pending) = pending else {
        let confirmation = confirmation(ConfirmationEvent::Unconfirmed, "", now);
        return ControlFlow::Break(Decision::Lost(finish(
            member,
            &Confirmation {
                status_text: "the pending confirmation expired",
                ..confirmation
            },
            false,
        )));
    };
    if now >= pending.deadline_ms {
        return ControlFlow::Break(unconfirmed(member, pending, now));
    }
    ControlFlow::Continue(pending)
}

/// Decides on Opsgenie's answer about the request of `pending`.
pub(super) fn on_answer(
    member: &str,
    pending: &PendingConfirmation,
    status: Status,
    now: u64,
) -> Decision {
    match status {
        Status::Processed {
            success: true,
            text,
            alert_id,
        } => {
            let settle = finish(
                member,
                &Confirmation {
                    status_text: &text,
                    alert_id: &alert_id,
                    ..confirmation(ConfirmationEvent::Confirmed, &pending.request_id, now)
                },
                false,
            );
            Decision::Confirmed {
                lag_ms: now.saturating_sub(pending.delivered_at_ms),
                alert_id,
                settle,
            }
        }
        Status::Processed {
            success: false,
            text,
            alert_id,
        } => failed_async(member, pending, text, &alert_id, now),
        Status::NotYet => Decision::NotYet(again(pending, now, None)),
        Status::Failed { message, wait } => Decision::AskFailed {
            error: message,
            settle: again(pending, now, wait),
        },
    }
}

/// Failed after its 202: dead-letter as `failed_async`, and roll the delivery back so that a
/// replay of the dead letter is delivered again.
fn failed_async(
    member: &str,
    pending: &PendingConfirmation,
    text: String,
    alert_id: &str,
    now: u64,
) -> Decision {
    let request_id = &pending.request_id;
    let message = format!("Opsgenie accepted request {request_id} and then failed it: {text}");
    let settle = finish(
        member,
        &Confirmation {
            status_text: &text,
            alert_id,
            ..confirmation(ConfirmationEvent::FailedAsync, request_id, now)
        },
        true,
    );
    Decision::DeadLetter {
        letter: dead_letter(pending, DeadReason::FailedAsync, message),
        status_text: Some(text),
        lag_ms: Some(now.saturating_sub(pending.delivered_at_ms)),
        settle,
        otherwise: again(pending, now, None),
    }
}

/// Past `--confirm-within` with no answer: dead-letter as `unconfirmed`.
fn unconfirmed(member: &str, pending: &PendingConfirmation, now: u64) -> Decision {
    let request_id = &pending.request_id;
    let message = format!(
        "Opsgenie accepted request {request_id} but did not say it was processed within the confirmation window"
    );
    let settle = finish(
        member,
        &Confirmation {
            status_text: "not processed within the confirmation window",
            ..confirmation(ConfirmationEvent::Unconfirmed, request_id, now)
        },
        false,
    );
    Decision::DeadLetter {
        letter: dead_letter(pending, DeadReason::Unconfirmed, message),
        status_text: None,
        lag_ms: None,
        settle,
        // Nothing is lost: it stays pending and falls due again.
        otherwise: again(pending, now, Some(DEAD_LETTER_RETRY)),
    }
}

fn dead_letter(pending: &PendingConfirmation, reason: DeadReason, message: String) -> DeadLetter {
    DeadLetter::new(reason, message, Some(pending.status), pending.attempts)
}

/// Asks again later: the gap doubles with each question, and the last one is at the deadline.
fn again(pending: &PendingConfirmation, now: u64, wait: Option<Duration>) -> Settle {
    let asks = u32::try_from(pending.asks).unwrap_or(u32::MAX).min(16);
    let gap = FIRST_ASK
        .saturating_mul(1 << asks)
        .min(LONGEST_GAP)
        .max(wait.unwrap_or_default());
    let gap_ms = u64::try_from(gap.as_millis()).unwrap_or(u64::MAX);
    let due_ms = now.saturating_add(gap_ms).min(pending.deadline_ms.max(now));
    Settle::Again { due_ms }
}

/// A confirmation's stream entry with no status text or alert id yet.
fn confirmation(event: ConfirmationEvent, request_id: &str, now: u64) -> Confirmation<'_> {
    Confirmation {
        event,
        request_id,
        status_text: "",
        alert_id: "",
        confirmed_at_ms: now,
    }
}

/// Ends the confirmation with its stream entry.
fn finish(member: &str, confirmation: &Confirmation<'_>, failed: bool) -> Settle {
    Settle::Done {
        fields: confirmation_fields(member, confirmation),
        failed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DELIVERED: u64 = 1_000_000;
    const DEADLINE: u64 = DELIVERED + 600_000;

    fn pending(asks: u64) -> PendingConfirmation {
        PendingConfirmation {
            team: "ops".into(),
            request_id: "r-1".into(),
            status: 202,
            attempts: 2,
            delivered_at_ms: DELIVERED,
            deadline_ms: DEADLINE,
            incident: None,
            seq: None,
            asks,
        }
    }

    fn processed(success: bool) -> Status {
        Status::Processed {
            success,
            text: "Created alert".into(),
            alert_id: "a-1".into(),
        }
    }

    fn event(settle: &Settle) -> Option<(String, bool)> {
        match settle {
            Settle::Done { fields, failed } => fields
                .iter()
                .find(|(name, _)| *name == "event")
                .map(|(_, value)| (value.clone(), *failed)),
            Settle::Again { .. } => None,
        }
    }

    #[test]
    fn no_question_is_asked_about_a_lost_hash_or_past_the_deadline() {
        let lost = before_asking("u-1", None, DELIVERED);
        let ControlFlow::Break(Decision::Lost(settle)) = lost else {
            panic!("{lost:?}");
        };
        assert_eq!(event(&settle), Some(("unconfirmed".into(), false)));

        let pending = pending(3);
        let late = before_asking("u-1", Some(&pending), DEADLINE);
        let ControlFlow::Break(Decision::DeadLetter {
            letter, otherwise, ..
        }) = late
        else {
            panic!("{late:?}");
        };
        assert_eq!(letter.reason, DeadReason::Unconfirmed);
        assert_eq!((letter.status, letter.attempts), (Some(202), 2));
        // Could not be dead-lettered: due again at once, the deadline having passed.
        assert_eq!(otherwise, Settle::Again { due_ms: DEADLINE });

        assert_eq!(
            before_asking("u-1", Some(&pending), DEADLINE - 1),
            ControlFlow::Continue(&pending)
        );
    }

    /// (asks so far, answer) -> (the stream entry's event and whether it failed, or the next
    /// question's due time, ms after now).
    #[test]
    fn each_answer_settles_as_the_contract_says() {
        let now = DELIVERED + 10_000;
        let cases = [
            (0, processed(true), Ok(("confirmed", false))),
            (0, processed(false), Ok(("failed_async", true))),
            (0, Status::NotYet, Err(1_000)),
            (3, Status::NotYet, Err(8_000)),
            (40, Status::NotYet, Err(60_000)),
            (
                0,
                Status::Failed {
                    message: "down".into(),
                    wait: Some(Duration::from_secs(30)),
                },
                Err(30_000),
            ),
            (
                0,
                Status::Failed {
                    message: "down".into(),
                    wait: None,
                },
                Err(1_000),
            ),
        ];
        for (asks, status, expected) in cases {
            let decision = on_answer("u-1", &pending(asks), status.clone(), now);
            let found = match decision.settle() {
                Settle::Again { due_ms } => Err(due_ms - now),
                done => event(done).ok_or(0),
            };
            let expected = expected.map(|(event, failed)| (event.to_string(), failed));
            assert_eq!(found, expected, "{asks} asks, {status:?}");
        }
    }

    #[test]
    fn a_question_is_never_due_past_the_deadline() {
        let now = DEADLINE - 500;
        let decision = on_answer("u-1", &pending(5), Status::NotYet, now);
        assert_eq!(
            decision,
            Decision::NotYet(Settle::Again { due_ms: DEADLINE })
        );
    }

    #[test]
    fn a_failure_after_the_202_is_dead_lettered_with_opsgenies_text() {
        let now = DELIVERED + 2_500;
        let Decision::DeadLetter {
            letter,
            status_text,
            lag_ms,
            otherwise,
            ..
        } = on_answer("u-1", &pending(0), processed(false), now)
        else {
            panic!("not a dead letter");
        };
        assert_eq!(letter.reason, DeadReason::FailedAsync);
        assert_eq!(
            letter.message,
            "Opsgenie accepted request r-1 and then failed it: Created alert"
        );
        assert_eq!(status_text.as_deref(), Some("Created alert"));
        assert_eq!(lag_ms, Some(2_500));
        assert_eq!(
            otherwise,
            Settle::Again {
                due_ms: now + 1_000
            }
        );
    }
}

//! The pending confirmation of a delivery (docs/contract.md section 6.1): a hash at
//! `Keys::pending`, written by `steps.lua` with the delivery's record and read back by the
//! confirmer. Its field names are spelled here once; the scripts spell the ones they touch
//! themselves, byte for byte the same:
//!
//! - `steps.lua` writes every field of `PendingConfirmation`, and `prev_seq` and `body`;
//! - `confirm_read.lua` reads the fields it is given (`PendingConfirmation::FIELDS`);
//! - `confirm_settle.lua` increments `asks`, and reads `seq` and `prev_seq` to roll an
//!   incident's sequence back.

use std::str::FromStr;

/// The job's body, as the broker delivered it; read only to dead-letter the job.
pub(super) const BODY: &str = "body";
const TEAM: &str = "team";
const REQUEST_ID: &str = "request_id";
const STATUS: &str = "status";
const ATTEMPTS: &str = "attempts";
const DELIVERED_AT_MS: &str = "delivered_at_ms";
const DEADLINE_MS: &str = "deadline_ms";
const INCIDENT: &str = "incident";
const SEQ: &str = "seq";
const ASKS: &str = "asks";

/// A delivery's confirmation to come, written by the same script as its record so that a
/// crash can never leave one without the other.
#[derive(Debug, Clone)]
pub(crate) struct Pending {
    /// The notification_uuid: the member of the due set, and the name of the hash.
    pub(crate) member: String,
    /// When to ask first, in ms since the epoch.
    pub(crate) due_ms: u64,
    /// How long the hash lives if it is never settled.
    pub(crate) ttl_ms: u64,
    /// The job's body: the hash's `body`. Sent to Redis as an argument of its own, byte for
    /// byte, rather than escaped into the JSON word.
    pub(crate) body: bytes::Bytes,
    pub(crate) confirmation: PendingConfirmation,
}

/// The fields of a pending confirmation's hash that the worker writes and reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PendingConfirmation {
    pub(crate) team: String,
    /// Opsgenie's `requestId`: what the confirmer asks about.
    pub(crate) request_id: String,
    /// The HTTP status of the delivery.
    pub(crate) status: u16,
    pub(crate) attempts: u32,
    pub(crate) delivered_at_ms: u64,
    /// Past it, the job is dead-lettered as unconfirmed.
    pub(crate) deadline_ms: u64,
    /// A metric alert's incident alias, whose sequence a failure rolls back.
    pub(crate) incident: Option<String>,
    /// The incident's sequence this delivery wrote.
    pub(crate) seq: Option<i64>,
    /// Questions asked so far; `confirm_settle.lua` counts them.
    pub(crate) asks: u64,
}

/// A field of a pending hash that does not hold what the worker writes there.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the pending confirmation's field {field} holds {value:?}, which is not a number")]
pub(crate) struct UnreadableField {
    field: &'static str,
    value: String,
}

impl PendingConfirmation {
    /// The hash's field names, in the order `values` writes them and `read` reads them.
    pub(super) const FIELDS: [&'static str; 9] = [
        TEAM,
        REQUEST_ID,
        STATUS,
        ATTEMPTS,
        DELIVERED_AT_MS,
        DEADLINE_MS,
        INCIDENT,
        SEQ,
        ASKS,
    ];

    /// The hash's fields as (name, value) pairs; an absent value is "".
    pub(super) fn fields(&self) -> Vec<(&'static str, String)> {
        let values = [
            self.team.clone(),
            self.request_id.clone(),
            self.status.to_string(),
            self.attempts.to_string(),
            self.delivered_at_ms.to_string(),
            self.deadline_ms.to_string(),
            self.incident.clone().unwrap_or_default(),
            self.seq.map(|n| n.to_string()).unwrap_or_default(),
            self.asks.to_string(),
        ];
        Self::FIELDS.into_iter().zip(values).collect()
    }

    /// Reads the values of `FIELDS`, in order.
    ///
    /// Fails on a number that does not parse: a default would mean a deadline long past, or a
    /// delivery at the epoch.
    pub(super) fn read(values: [String; 9]) -> Result<PendingConfirmation, UnreadableField> {
        let [
            team,
            request_id,
            status,
            attempts,
            delivered_at_ms,
            deadline_ms,
            incident,
            seq,
            asks,
        ] = values;
        Ok(PendingConfirmation {
            team,
            request_id,
            status: number(STATUS, status)?,
            attempts: number(ATTEMPTS, attempts)?,
            delivered_at_ms: number(DELIVERED_AT_MS, delivered_at_ms)?,
            deadline_ms: number(DEADLINE_MS, deadline_ms)?,
            incident: Some(incident).filter(|a| !a.is_empty()),
            seq: match seq.as_str() {
                "" => None,
                _ => Some(number(SEQ, seq)?),
            },
            asks: number(ASKS, asks)?,
        })
    }
}

fn number<N: FromStr>(field: &'static str, value: String) -> Result<N, UnreadableField> {
    value.parse().map_err(|_| UnreadableField { field, value })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn confirmation() -> PendingConfirmation {
        PendingConfirmation {
            team: "ops".into(),
            request_id: "r-1".into(),
            status: 202,
            attempts: 2,
            delivered_at_ms: 1_000,
            deadline_ms: 61_000,
            incident: Some("incident_1_2".into()),
            seq: Some(-9_007_199_254_740_993),
            asks: 0,
        }
    }

    #[test]
    fn a_pending_confirmation_reads_back_as_it_was_written() {
        for written in [
            confirmation(),
            PendingConfirmation {
                incident: None,
                seq: None,
                ..confirmation()
            },
        ] {
            let values = written.fields().into_iter().map(|(_, v)| v);
            let values: [String; 9] = values.collect::<Vec<_>>().try_into().unwrap();
            assert_eq!(PendingConfirmation::read(values), Ok(written));
        }
    }

    #[test]
    fn a_number_that_does_not_parse_is_an_error_not_zero() {
        for (at, value) in [
            (2, ""),
            (3, "-1"),
            (4, "soon"),
            (5, "1.5"),
            (7, "x"),
            (8, ""),
        ] {
            let mut values: [String; 9] = confirmation()
                .fields()
                .into_iter()
                .map(|(_, v)| v)
                .collect::<Vec<_>>()
                .try_into()
                .unwrap();
            values[at] = value.to_string();
            let error = PendingConfirmation::read(values).unwrap_err();
            assert_eq!(error.field, PendingConfirmation::FIELDS[at], "{value:?}");
        }
    }
}

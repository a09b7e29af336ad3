//! Pending confirmations (docs/contract.md section 6.1) from the confirmer's side: claim the
//! due ones under a lease, read their hashes, and settle each (ask again later, or end it
//! with its stream entry), a batch at a time. Each step is one script call, its KEYS/ARGV
//! contract and answers at the top of its file.

use std::time::Duration;

use fred::prelude::{HashesInterface as _, SortedSetsInterface as _, Value};

use super::error::Script as ScriptName;
use super::pending::{self, PendingConfirmation, UnreadableField};
use super::{Store, StoreError};

/// Claims due confirmations for a while.
pub(super) const CONFIRM_CLAIM: &str = include_str!("scripts/confirm_claim.lua");

/// Reschedules or ends claimed confirmations, a batch at a time.
pub(super) const CONFIRM_SETTLE: &str = include_str!("scripts/confirm_settle.lua");

/// Reads the pending hashes of claimed confirmations, a batch at a time.
pub(super) const CONFIRM_READ: &str = include_str!("scripts/confirm_read.lua");

/// How a claimed confirmation is settled: what the confirmer decides, and what
/// `confirm_settle.lua` writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Settle {
    /// Not processed yet (or the question failed): ask again at this time (ms).
    Again { due_ms: u64 },
    /// Ended: the stream entry; `failed` deletes the sent marker and rolls the incident's
    /// sequence back, so that the dead letter can be replayed.
    Done {
        fields: Vec<(&'static str, String)>,
        failed: bool,
    },
}

/// What settling found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Settled {
    /// Rescheduled.
    Again,
    /// Ended; the stream entry's id.
    Done(String),
    /// The claim ran out and another confirmer has the member, or it was settled already.
    Lost,
}

/// One claimed confirmation to settle, for `Store::settle_confirmations`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Settlement<'a> {
    /// The notification_uuid.
    pub(crate) member: &'a str,
    /// The claim's token: only its holder may settle it.
    pub(crate) token: &'a str,
    /// The incident whose sequence a failure rolls back (none for an issue alert).
    pub(crate) alias: Option<&'a str>,
    pub(crate) settle: &'a Settle,
}

/// One settle as `confirm_settle.lua` reads it: `[member, token, op, due, failed, entry]`.
#[derive(Debug, serde::Serialize)]
struct SettleCall<'a>(
    &'a str,
    &'a str,
    &'static str,
    /// The next due time in ms as a decimal string ("" when done).
    String,
    &'static str,
    &'a [(&'static str, String)],
);

impl Store {
    /// Claims up to `limit` confirmations due at `now_ms` for `lease`; answers (member,
    /// token) pairs.
    pub(crate) async fn claim_confirmations(
        &self,
        now_ms: u64,
        lease: Duration,
        limit: usize,
    ) -> Result<Vec<(String, String)>, StoreError> {
        let flat: Vec<String> = Box::pin(self.scripts.confirm_claim.evalsha_with_reload(
            &self.client,
            vec![self.keys.due()],
            vec![
                now_ms.to_string(),
                lease.as_millis().to_string(),
                limit.to_string(),
            ],
        ))
        .await?;
        let mut pairs = Vec::with_capacity(flat.len() / 2);
        let mut words = flat.into_iter();
        while let (Some(member), Some(token)) = (words.next(), words.next()) {
            pairs.push((member, token));
        }
        Ok(pairs)
    }

    /// The pending confirmations of `members`, in their order, in one script call: `None` for
    /// a member whose hash is gone, an error for one whose hash the worker cannot read.
    pub(crate) async fn pending_confirmations(
        &self,
        members: &[String],
    ) -> Result<Vec<Option<Result<PendingConfirmation, UnreadableField>>>, StoreError> {
        let hashes = self
            .pending_fields(members, &PendingConfirmation::FIELDS)
            .await?;
        Ok(hashes
            .into_iter()
            .map(|values| {
                values.map(|values| {
                    // `pending_fields` checked the count: one value per field.
                    let mut values = values.into_iter();
                    PendingConfirmation::read(std::array::from_fn(|_| {
                        values.next().unwrap_or_default()
                    }))
                })
            })
            .collect())
    }

    /// The fields `names` of the pending confirmations of `members`, in their order, in one
    /// script call: `None` for a member whose hash is gone, else one value per name ("" for
    /// a field it lacks).
    async fn pending_fields(
        &self,
        members: &[String],
        names: &[&str],
    ) -> Result<Vec<Option<Vec<String>>>, StoreError> {
        if members.is_empty() {
            return Ok(Vec::new());
        }
        let keys: Vec<String> = members.iter().map(|m| self.keys.pending(m)).collect();
        let args: Vec<&str> = names.to_vec();
        let flat: Vec<String> = Box::pin(self.scripts.confirm_read.evalsha_with_reload(
            &self.client,
            keys,
            args,
        ))
        .await?;
        let stride = 1 + names.len();
        if flat.len() != stride * members.len() {
            return Err(StoreError::AnswerCount {
                script: ScriptName::ConfirmRead,
                answered: flat.len(),
                asked: members.len(),
            });
        }
        let mut words = flat.into_iter();
        let mut hashes = Vec::with_capacity(members.len());
        for _ in members {
            let exists = words.next().is_some_and(|w| w == "1");
            let values: Vec<String> = words.by_ref().take(names.len()).collect();
            hashes.push(exists.then_some(values));
        }
        Ok(hashes)
    }

    /// The job body kept with a pending confirmation; `None` when its hash is gone.
    pub(crate) async fn pending_body(&self, member: &str) -> Result<Option<String>, StoreError> {
        let body = Box::pin(self.client.hget(self.keys.pending(member), pending::BODY)).await?;
        Ok(body)
    }

    /// Confirmations waiting, due or not.
    pub(crate) async fn confirmations_waiting(&self) -> Result<u64, StoreError> {
        let waiting = Box::pin(self.client.zcard(self.keys.due())).await?;
        Ok(waiting)
    }

    /// Settles claimed confirmations, each only if its claim is still the caller's, in one
    /// script call; answers what each found, in their order. A failure leaves every one of
    /// them as it was (the script runs whole or not at all).
    pub(crate) async fn settle_confirmations(
        &self,
        settles: &[Settlement<'_>],
    ) -> Result<Vec<Settled>, StoreError> {
        if settles.is_empty() {
            return Ok(Vec::new());
        }
        let mut keys: Vec<String> = Vec::with_capacity(2 + 3 * settles.len());
        keys.push(self.keys.due().to_owned());
        keys.push(self.keys.stream().to_owned());
        let mut calls = Vec::with_capacity(settles.len());
        for settle in settles {
            let member = settle.member;
            keys.push(self.keys.pending(member));
            keys.push(self.keys.sent(member));
            keys.push(self.keys.sequence(member, settle.alias));
            calls.push(match settle.settle {
                Settle::Again { due_ms } => {
                    SettleCall(member, settle.token, "again", due_ms.to_string(), "0", &[])
                }
                Settle::Done { fields, failed } => SettleCall(
                    member,
                    settle.token,
                    "done",
                    String::new(),
                    if *failed { "1" } else { "0" },
                    fields,
                ),
            });
        }
        let calls = serde_json::to_vec(&calls).map_err(|e| StoreError::Arguments(e.to_string()))?;
        let args = vec![
            Value::from(self.fixed.stream_maxlen()),
            Value::Bytes(calls.into()),
        ];
        let answers: Vec<String> = Box::pin(self.scripts.confirm_settle.evalsha_with_reload(
            &self.client,
            keys,
            args,
        ))
        .await?;
        if answers.len() != settles.len() {
            return Err(StoreError::AnswerCount {
                script: ScriptName::ConfirmSettle,
                answered: answers.len(),
                asked: settles.len(),
            });
        }
        Ok(answers
            .into_iter()
            .map(|answer| match answer.as_str() {
                "lost" => Settled::Lost,
                "again" => Settled::Again,
                _ => Settled::Done(answer),
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::sync::Arc;

    use fred::prelude::{KeysInterface as _, StreamsInterface as _};

    use super::super::tests::{clean, live_store, token};
    use super::*;
    use crate::store::admission::Admission;
    use crate::store::pending::Pending;
    use crate::store::records::Fields;

    /// A pending confirmation is written with its record; a claim is a lease that another
    /// confirmer takes over once it runs out, after which the first cannot settle it; a
    /// failure after the 202 deletes the sent marker and rolls the incident's sequence back.
    #[tokio::test]
    async fn confirmations_are_claimed_under_a_lease_and_settled_only_by_its_holder() {
        let (store, prefix) = live_store().await;
        let alias = "incident_1_42";
        let fields: Fields = vec![("notification_uuid", "c-1".to_string())].into();
        // An earlier status of the incident was delivered at sequence 3.
        let earlier = store.keys("c-0", "ops", Some(alias), Some(3), token());
        assert_eq!(store.admit(&earlier).await.unwrap(), Admission::Go);
        store.record(&earlier, &fields).await.unwrap();
        let keys = store.keys("c-1", "ops", Some(alias), Some(4), token());
        assert_eq!(store.admit(&keys).await.unwrap(), Admission::Go);
        let pending = Pending {
            member: "c-1".into(),
            due_ms: 1_000,
            ttl_ms: 60_000,
            body: bytes::Bytes::from_static("{\"job\": \"é\"}".as_bytes()),
            confirmation: PendingConfirmation {
                team: "ops".into(),
                request_id: "r-1".into(),
                status: 202,
                attempts: 1,
                delivered_at_ms: 0,
                deadline_ms: 60_000,
                incident: Some(alias.into()),
                seq: Some(4),
                asks: 0,
            },
        };
        let fields: Fields = vec![("notification_uuid", "c-1".to_string())].into();
        store
            .record_confirming(&keys, &fields, Some(Arc::new(pending)))
            .await
            .unwrap();
        assert_eq!(store.confirmations_waiting().await.unwrap(), 1);
        // Not due before its time.
        assert!(
            store
                .claim_confirmations(999, Duration::from_secs(10), 8)
                .await
                .unwrap()
                .is_empty()
        );
        let first = store
            .claim_confirmations(1_000, Duration::from_secs(10), 8)
            .await
            .unwrap();
        assert_eq!(first.len(), 1);
        assert_eq!(first[0].0, "c-1");
        let read = |names: &'static [&'static str]| {
            let store = store.clone();
            async move {
                store
                    .pending_fields(&["c-1".to_string()], names)
                    .await
                    .unwrap()
                    .remove(0)
            }
        };
        assert_eq!(read(&["prev_seq"]).await, Some(vec!["3".to_string()]));
        assert_eq!(
            store.pending_body("c-1").await.unwrap().as_deref(),
            Some("{\"job\": \"é\"}")
        );
        let settle = |token: String, settle: Settle| {
            let store = store.clone();
            async move {
                store
                    .settle_confirmations(&[Settlement {
                        member: "c-1",
                        token: &token,
                        alias: Some("incident_1_42"),
                        settle: &settle,
                    }])
                    .await
                    .unwrap()
                    .remove(0)
            }
        };
        // Claimed: nobody else gets it while the lease lasts, another does once it ran out.
        assert!(
            store
                .claim_confirmations(10_999, Duration::from_secs(10), 8)
                .await
                .unwrap()
                .is_empty()
        );
        let second = store
            .claim_confirmations(11_000, Duration::from_secs(10), 8)
            .await
            .unwrap();
        assert_eq!(second.len(), 1);
        assert_ne!(first[0].1, second[0].1);
        let done = Settle::Done {
            fields: vec![
                ("notification_uuid", "c-1".to_string()),
                ("event", "failed_async".to_string()),
            ],
            failed: true,
        };
        assert_eq!(
            settle(first[0].1.clone(), done.clone()).await,
            Settled::Lost
        );
        // The holder asks again later, then ends it.
        assert_eq!(
            settle(second[0].1.clone(), Settle::Again { due_ms: 20_000 }).await,
            Settled::Again
        );
        let third = store
            .claim_confirmations(20_000, Duration::from_secs(10), 8)
            .await
            .unwrap();
        assert_eq!(third.len(), 1);
        assert_eq!(read(&["asks"]).await, Some(vec!["1".to_string()]));
        let Settled::Done(id) = settle(third[0].1.clone(), done.clone()).await else {
            panic!("not done");
        };
        assert!(id.contains('-'));
        assert_eq!(store.confirmations_waiting().await.unwrap(), 0);
        assert_eq!(read(&["asks"]).await, None);
        // Failed after its 202: the marker is gone and the incident is back at 3, so that a
        // replay of sequence 4 is admitted and sent.
        let replay = store.keys("c-1", "ops", Some(alias), Some(4), token());
        assert_eq!(store.admit(&replay).await.unwrap(), Admission::Go);
        // Settled twice is lost the second time: one stream entry per outcome.
        assert_eq!(settle(third[0].1.clone(), done).await, Settled::Lost);
        let length: u64 = store.client.xlen(store.keys.stream()).await.unwrap();
        assert_eq!(length, 3);
        clean(&store, &prefix).await;
    }

    /// A claimed batch is read in one call (a gone hash reads as `None`) and settled in one
    /// call, each settle on its own: rescheduled, ended with its stream entry, or refused to
    /// a holder whose claim is no longer its own.
    #[tokio::test]
    async fn a_claimed_batch_is_read_and_settled_each_on_its_own() {
        let (store, prefix) = live_store().await;
        let due = format!("{prefix}confirm:due");
        for member in ["c-1", "c-2", "c-3"] {
            let _: () = store
                .client
                .hset(
                    format!("{prefix}confirm:{member}"),
                    vec![("team", "ops"), ("request_id", member), ("seq", "")],
                )
                .await
                .unwrap();
            let _: () = store
                .client
                .zadd(&due, None, None, false, false, (1.0, member))
                .await
                .unwrap();
        }
        let claims = store
            .claim_confirmations(10, Duration::from_secs(60), 10)
            .await
            .unwrap();
        assert_eq!(claims.len(), 3);
        let mut members: Vec<String> = claims.iter().map(|(m, _)| m.clone()).collect();
        members.push("gone".into());
        let read = store
            .pending_fields(&members, &["team", "request_id", "asks"])
            .await
            .unwrap();
        assert_eq!(read.len(), 4);
        for (member, fields) in members.iter().zip(&read).take(3) {
            assert_eq!(
                fields.as_deref(),
                Some(&["ops".to_string(), member.clone(), String::new()][..])
            );
        }
        assert_eq!(read[3], None);

        let entry = vec![
            ("notification_uuid", claims[1].0.clone()),
            ("event", "confirmed".to_string()),
        ];
        let settles = [
            Settlement {
                member: &claims[0].0,
                token: &claims[0].1,
                alias: None,
                settle: &Settle::Again { due_ms: 5 },
            },
            Settlement {
                member: &claims[1].0,
                token: &claims[1].1,
                alias: None,
                settle: &Settle::Done {
                    fields: entry.clone(),
                    failed: false,
                },
            },
            Settlement {
                member: &claims[2].0,
                token: "1",
                alias: None,
                settle: &Settle::Done {
                    fields: entry.clone(),
                    failed: false,
                },
            },
        ];
        let answers = store.settle_confirmations(&settles).await.unwrap();
        assert_eq!(answers[0], Settled::Again);
        assert!(
            matches!(&answers[1], Settled::Done(id) if id.contains('-')),
            "{answers:?}"
        );
        assert_eq!(answers[2], Settled::Lost);
        // Rescheduled, and asked once more.
        let score: Option<f64> = store.client.zscore(&due, &claims[0].0).await.unwrap();
        assert_eq!(score, Some(5.0));
        let asks: Option<String> = store
            .client
            .hget(format!("{prefix}confirm:{}", claims[0].0), "asks")
            .await
            .unwrap();
        assert_eq!(asks.as_deref(), Some("1"));
        // Ended: out of the set, its hash gone, its entry in the stream.
        let score: Option<f64> = store.client.zscore(&due, &claims[1].0).await.unwrap();
        assert_eq!(score, None);
        let exists: i64 = store
            .client
            .exists(format!("{prefix}confirm:{}", claims[1].0))
            .await
            .unwrap();
        assert_eq!(exists, 0);
        let entries: Vec<(String, HashMap<String, String>)> = store
            .client
            .xrange(store.keys.stream(), "-", "+", None)
            .await
            .unwrap();
        assert_eq!(entries.len(), 1);
        assert_eq!(entries[0].1["notification_uuid"], claims[1].0);
        assert_eq!(entries[0].1["event"], "confirmed");
        // Not the caller's: left as the claim left it.
        let score: Option<String> = store.client.zscore(&due, &claims[2].0).await.unwrap();
        assert_eq!(score.as_deref(), Some(claims[2].1.as_str()));
        clean(&store, &prefix).await;
    }
}

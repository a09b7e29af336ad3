//! Before a request (docs/contract.md section 7): may this job be sent now? Already delivered,
//! a stale incident status, another replica on the same incident, or the team's key cooling
//! down each say no; otherwise the job takes its lease. And before a redelivered message runs
//! at all: how many of its attempts started and never finished (a poison message kills them).

use std::sync::Arc;
use std::time::Duration;

use fred::prelude::KeysInterface as _;

use super::keys::JobKeys;
use super::steps::Call;
use super::{Store, StoreError};

/// Frees a lease this round of a job holds.
pub(super) const RELEASE: &str = include_str!("scripts/release.lua");

/// Counts an attempt at a message that has started; answers the count.
pub(super) const ATTEMPT_STARTED: &str = include_str!("scripts/attempt_started.lua");

/// How long an unfinished attempt is remembered: past it, a message that killed its
/// attempts long ago is given a fresh count.
const ATTEMPTS_TTL_SECS: u64 = 24 * 3600;

/// What the pre-send check found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Admission {
    /// The lease is ours; send.
    Go,
    /// Already delivered: ack without sending.
    Duplicate,
    /// An incident status at or below the last delivered one: ack without sending.
    Stale,
    /// Another request for the same incident is in flight: wait and ask again.
    Busy,
    /// Opsgenie rate-limited this team's key (seen by any replica): wait this long.
    Cooldown(Duration),
}

impl Store {
    /// Checks whether the job may be sent now, taking the lease when it may.
    ///
    /// Fails when Redis cannot be reached, answers what this worker cannot read, or (with
    /// `--redis-replicas`) the record a duplicate or stale answer rests on is not replicated.
    pub(crate) async fn admit(&self, keys: &Arc<JobKeys>) -> Result<Admission, StoreError> {
        let answer = self
            .step(Call {
                keys: Arc::clone(keys),
                record: None,
                pending: None,
            })
            .await?;
        let admission = admission(&answer)?;
        // Acked without a request on the strength of a record: that record must be as durable
        // as one this job would write.
        match admission {
            Admission::Duplicate => self.replicated(&[&keys.sent]).await?,
            Admission::Stale => self.replicated(&[&keys.sequence]).await?,
            _ => {}
        }
        Ok(admission)
    }

    /// Frees the lease after a round that delivered nothing.
    pub(crate) async fn release(&self, keys: &JobKeys) -> Result<(), StoreError> {
        let _: i64 = Box::pin(self.scripts.release.evalsha_with_reload(
            &self.client,
            vec![keys.lease.as_str()],
            vec![keys.token.as_str()],
        ))
        .await?;
        Ok(())
    }

    /// The key that counts the unfinished attempts at a message.
    pub(crate) fn attempts_key(&self, body: &[u8]) -> String {
        self.keys.attempts(body)
    }

    /// Attempts at a message that started and never finished.
    pub(crate) async fn unfinished_attempts(&self, key: &str) -> Result<u32, StoreError> {
        let count: Option<u32> = Box::pin(self.client.get(key)).await?;
        Ok(count.unwrap_or(0))
    }

    /// Counts an attempt that starts now; answers the count with it.
    pub(crate) async fn attempt_started(&self, key: &str) -> Result<u32, StoreError> {
        let count = Box::pin(self.scripts.attempt_started.evalsha_with_reload(
            &self.client,
            vec![key],
            vec![ATTEMPTS_TTL_SECS.to_string()],
        ))
        .await?;
        Ok(count)
    }

    /// The attempt finished, whatever its outcome: the message is not poison.
    pub(crate) async fn attempt_finished(&self, key: &str) -> Result<(), StoreError> {
        let _: i64 = Box::pin(self.client.del(key)).await?;
        Ok(())
    }
}

/// Reads the script's answer to an admission check.
///
/// Fails on an answer this worker does not know: never "go and send" on what it cannot read.
fn admission(answer: &str) -> Result<Admission, StoreError> {
    if let Some(ms) = answer.strip_prefix("cooldown:")
        && let Ok(ms) = ms.parse()
    {
        return Ok(Admission::Cooldown(Duration::from_millis(ms)));
    }
    match answer {
        "ok" => Ok(Admission::Go),
        "duplicate" => Ok(Admission::Duplicate),
        "stale" => Ok(Admission::Stale),
        "busy" => Ok(Admission::Busy),
        _ => Err(StoreError::UnreadableAdmission {
            answer: opsgenie_shared::text::cap_bytes(answer, 64).into_owned(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use fred::prelude::{KeysInterface as _, StreamsInterface as _};
    use fred::types::scripts::Script;

    use super::super::tests::{clean, live_store, token};
    use super::*;
    use crate::store::records::Fields;
    use crate::store::steps::STEPS;

    #[test]
    fn an_admission_answer_this_worker_cannot_read_is_an_error() {
        for (answer, expected) in [
            ("ok", Admission::Go),
            ("duplicate", Admission::Duplicate),
            ("stale", Admission::Stale),
            ("busy", Admission::Busy),
            (
                "cooldown:1500",
                Admission::Cooldown(Duration::from_millis(1500)),
            ),
        ] {
            assert_eq!(admission(answer).unwrap(), expected, "{answer}");
        }
        for answer in [
            "",
            "OK",
            "go",
            "cooldown:",
            "cooldown:-1",
            "cooldown:soon",
            "ok ",
        ] {
            assert!(admission(answer).is_err(), "{answer:?}");
        }
    }

    #[tokio::test]
    async fn each_call_of_a_batch_gets_its_own_answer() {
        let (store, prefix) = live_store().await;
        let fields = |uuid: &str| -> Fields {
            vec![
                ("notification_uuid", uuid.to_string()),
                (
                    "title",
                    "Quote \" back\\slash \u{0} nul, é, 🚨, \n".to_string(),
                ),
            ]
            .into()
        };
        // Twenty notifications already recorded, twenty new ones, asked about all at once:
        // the answers must not be shuffled between the callers of one batch.
        let mut recorded = Vec::new();
        for i in 0..20 {
            let uuid = format!("old-{i}");
            let keys = store.keys(&uuid, "ops", None, None, token());
            assert_eq!(store.admit(&keys).await.unwrap(), Admission::Go);
            assert!(
                !store
                    .record(&keys, &fields(&uuid))
                    .await
                    .unwrap()
                    .is_empty()
            );
            recorded.push(uuid);
        }
        let mut asks = Vec::new();
        for (i, old) in recorded.iter().enumerate() {
            asks.push((format!("new-{i}"), Admission::Go));
            asks.push((old.clone(), Admission::Duplicate));
        }
        let answers = futures_util::future::join_all(asks.iter().map(|(uuid, _)| {
            let keys = store.keys(uuid, "ops", None, None, token());
            let store = store.clone();
            async move { store.admit(&keys).await.unwrap() }
        }))
        .await;
        for ((uuid, expected), answer) in asks.iter().zip(answers) {
            assert_eq!(&answer, expected, "{uuid}");
        }
        // The stream holds each recorded notification once, with its fields as they were.
        let entries: Vec<(String, HashMap<String, String>)> = store
            .client
            .xrange(store.keys.stream(), "-", "+", None)
            .await
            .unwrap();
        assert_eq!(entries.len(), 20);
        assert_eq!(entries[3].1["notification_uuid"], "old-3");
        assert_eq!(entries[3].1["title"], fields("x")[1].1);
        clean(&store, &prefix).await;
    }

    #[tokio::test]
    async fn leases_sequences_cooldowns_and_a_repeated_record() {
        let (store, prefix) = live_store().await;
        let alias = "incident_1_9";
        let first = store.keys("m-1", "ops", Some(alias), Some(5), token());
        assert_eq!(store.admit(&first).await.unwrap(), Admission::Go);
        // Asked again by the same round (a step that ran twice): still ours.
        assert_eq!(store.admit(&first).await.unwrap(), Admission::Go);
        let rival = store.keys("m-2", "ops", Some(alias), Some(6), token());
        assert_eq!(store.admit(&rival).await.unwrap(), Admission::Busy);
        let fields: Fields = vec![("notification_uuid", "m-1".to_string())].into();
        let id = store.record(&first, &fields).await.unwrap();
        assert!(id.contains('-'), "{id}");
        // A record whose answer was lost is sent again: it adds nothing.
        assert_eq!(store.record(&first, &fields).await.unwrap(), "");
        let length: u64 = store.client.xlen(store.keys.stream()).await.unwrap();
        assert_eq!(length, 1);
        // The lease is free again; an older or equal status of the incident is stale.
        let older = store.keys("m-0", "ops", Some(alias), Some(5), token());
        assert_eq!(store.admit(&older).await.unwrap(), Admission::Stale);
        assert_eq!(store.admit(&rival).await.unwrap(), Admission::Go);
        store.release(&rival).await.unwrap();
        // A 429 on the team's key holds every admission of the team.
        store
            .cool_down("ops", Duration::from_secs(30))
            .await
            .unwrap();
        let later = store.keys("u-9", "ops", None, None, token());
        match store.admit(&later).await.unwrap() {
            Admission::Cooldown(wait) => assert!(wait > Duration::from_secs(25), "{wait:?}"),
            other => panic!("{other:?}"),
        }
        let other_team = store.keys("u-9", "dev", None, None, token());
        assert_eq!(store.admit(&other_team).await.unwrap(), Admission::Go);
        clean(&store, &prefix).await;
    }

    /// Past 2^53 a double cannot tell neighbours apart; the script must.
    #[tokio::test]
    async fn sequences_compare_exactly_across_the_whole_64_bit_range() {
        let (store, prefix) = live_store().await;
        let fields: Fields = vec![("notification_uuid", "x".to_string())].into();
        // (delivered, then asked) -> expected answer for the second.
        let cases = [
            (9_007_199_254_740_992, 9_007_199_254_740_993, Admission::Go),
            (
                9_007_199_254_740_993,
                9_007_199_254_740_992,
                Admission::Stale,
            ),
            (i64::MAX - 1, i64::MAX, Admission::Go),
            (i64::MAX, i64::MAX, Admission::Stale),
            (-1, 0, Admission::Go),
            (-10, -9, Admission::Go),
            (-9, -10, Admission::Stale),
            (i64::MIN, i64::MIN + 1, Admission::Go),
            (99, 100, Admission::Go),
            (100, 99, Admission::Stale),
            (5, -5, Admission::Stale),
        ];
        for (i, (delivered, asked, expected)) in cases.into_iter().enumerate() {
            let alias = format!("incident_1_{i}");
            let first = store.keys(
                &format!("s-{i}-a"),
                "ops",
                Some(&alias),
                Some(delivered),
                token(),
            );
            assert_eq!(store.admit(&first).await.unwrap(), Admission::Go);
            store.record(&first, &fields).await.unwrap();
            let second = store.keys(
                &format!("s-{i}-b"),
                "ops",
                Some(&alias),
                Some(asked),
                token(),
            );
            assert_eq!(
                store.admit(&second).await.unwrap(),
                expected,
                "{asked} after {delivered}"
            );
            if expected == Admission::Go {
                store.record(&second, &fields).await.unwrap();
                let last: String = store.client.get(&second.sequence).await.unwrap();
                assert_eq!(last, asked.to_string());
            }
        }
        clean(&store, &prefix).await;
    }

    /// A script Redis does not know (it restarted, or never saw this one) is loaded and run on
    /// the same call: the caller never sees the NOSCRIPT.
    #[tokio::test]
    async fn a_script_redis_forgot_is_loaded_again() {
        let (mut store, prefix) = live_store().await;
        // A variant no Redis has seen: its digest is new.
        let unseen = |lua: &str| Script::from_lua(format!("{lua}\n-- {}", token()));
        store.scripts.steps = unseen(STEPS);
        store.scripts.release = unseen(RELEASE);
        let keys = store.keys("u-1", "ops", None, None, token());
        assert_eq!(store.admit(&keys).await.unwrap(), Admission::Go);
        store.release(&keys).await.unwrap();
        // Freed: the next round takes the lease with a token of its own.
        let next_round = store.keys("u-1", "ops", None, None, token());
        assert_eq!(store.admit(&next_round).await.unwrap(), Admission::Go);
        clean(&store, &prefix).await;
    }

    /// An issue alert whose uuid is spelled like an incident alias holds only its own lease.
    #[tokio::test]
    async fn a_notification_never_holds_an_incidents_lease() {
        let (store, prefix) = live_store().await;
        let alias = "incident_1_9001";
        let issue = store.keys(alias, "ops", None, None, token());
        assert_eq!(store.admit(&issue).await.unwrap(), Admission::Go);
        let metric = store.keys("m-1", "ops", Some(alias), Some(1), token());
        assert_eq!(store.admit(&metric).await.unwrap(), Admission::Go);
        assert_ne!(issue.lease, metric.lease);
        clean(&store, &prefix).await;
    }
}

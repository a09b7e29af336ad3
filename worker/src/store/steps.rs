//! One job's admission check or record as a call of `steps.lua`, batched with the calls of
//! concurrent jobs (`batch.rs`): the script's KEYS/ARGV contract and answers are at the top of
//! its file.

use std::sync::Arc;

use fred::prelude::{Client, Key, Value};
use fred::types::scripts::Script;

use super::batch::Batch;
use super::error::Script as ScriptName;
use super::keys::{JobKeys, Keys};
use super::pending::Pending;
use super::records::Fields;
use super::{Store, StoreError, StoreSettings};

/// The admission checks and records of a batch of jobs in one atomic step.
pub(super) const STEPS: &str = include_str!("scripts/steps.lua");

/// The most calls run by one script call.
pub(super) const MAX_BATCH: usize = 128;

/// How long the last delivered sequence of an incident is kept (docs/contract.md section 7: 7 days).
const SEQUENCE_TTL_SECS: u64 = 7 * 24 * 3600;

/// One job's admission check or record, waiting for the next batch.
pub(super) struct Call {
    pub(super) keys: Arc<JobKeys>,
    /// `None`: the admission check; else the record, with the stream entry's fields.
    pub(super) record: Option<Fields>,
    /// With a record: the confirmation to ask for later, written with it.
    pub(super) pending: Option<Arc<Pending>>,
}

/// The script arguments that are the same for every job, written once at start-up.
#[derive(Debug)]
pub(super) struct FixedArgs {
    lease_ms: String,
    stream_maxlen: String,
    dedupe_ttl_s: String,
    sequence_ttl_s: String,
}

impl FixedArgs {
    pub(super) fn new(settings: &StoreSettings) -> FixedArgs {
        FixedArgs {
            lease_ms: settings.lease_ttl.as_millis().to_string(),
            stream_maxlen: settings.stream_maxlen.to_string(),
            dedupe_ttl_s: settings.dedupe_ttl.as_secs().max(1).to_string(),
            sequence_ttl_s: SEQUENCE_TTL_SECS.to_string(),
        }
    }

    /// The stream's maxlen, which `confirm_settle.lua` takes too.
    pub(super) fn stream_maxlen(&self) -> &str {
        &self.stream_maxlen
    }
}

/// The batches of `steps.lua` calls, run by the batching task.
pub(super) struct Steps {
    client: Client,
    script: Script,
    keys: Arc<Keys>,
    fixed: Arc<FixedArgs>,
}

impl Batch for Steps {
    type Call = Call;
    type Answer = String;

    async fn run(&mut self, calls: &[Call]) -> Result<Vec<String>, StoreError> {
        let (keys, args) = step_words(&self.keys, &self.fixed, calls)?;
        let answers: Vec<String> = self
            .script
            .evalsha_with_reload(&self.client, keys, args)
            .await?;
        if answers.len() != calls.len() {
            return Err(StoreError::AnswerCount {
                script: ScriptName::Steps,
                answered: answers.len(),
                asked: calls.len(),
            });
        }
        Ok(answers)
    }
}

impl Store {
    /// Runs an admission check or a record as part of the next batch of `steps.lua`; answers
    /// the script's answer to it.
    pub(super) fn step(
        &self,
        call: Call,
    ) -> impl Future<Output = Result<String, StoreError>> + use<> {
        let steps = self.steps.started(|| Steps {
            client: self.client.clone(),
            script: self.scripts.steps.clone(),
            keys: Arc::clone(&self.keys),
            fixed: Arc::clone(&self.fixed),
        });
        steps.call(call)
    }
}

/// One call of a batch as `steps.lua` reads it from ARGV[5]: a JSON array
/// `[op, token, sequence, [[name, value], ...], pending]`.
#[derive(Debug, serde::Serialize)]
struct StepCall<'a>(
    /// "a" (admission) or "r" (record).
    &'static str,
    /// The lease token of this round of the job.
    &'a str,
    /// The sequence as a decimal string, or "": never a JSON number, which Lua would read as a
    /// double.
    &'a str,
    /// A record's stream entry; empty for an admission.
    &'a [(&'static str, String)],
    /// A record's confirmation to come, or null.
    Option<PendingCall<'a>>,
);

/// A pending confirmation as `steps.lua` reads it: `[member, due ms, ttl ms, [[name, value],
/// ...], n]`, the numbers but `n` as decimal strings; the body is in ARGV[n].
#[derive(Debug, serde::Serialize)]
struct PendingCall<'a>(&'a str, String, String, Vec<(&'static str, String)>, usize);

/// The keys and arguments of one `STEPS` call.
///
/// Fails only if serde_json cannot write the arguments, which strings and slices never cause.
fn step_words(
    names: &Keys,
    fixed: &FixedArgs,
    batch: &[Call],
) -> Result<(Vec<Key>, Vec<Value>), StoreError> {
    let mut keys: Vec<Key> = Vec::with_capacity(2 + 5 * batch.len());
    keys.push(names.stream().into());
    keys.push(names.due().into());
    let mut calls: Vec<StepCall<'_>> = Vec::with_capacity(batch.len());
    // The bodies of the pending confirmations follow the five fixed arguments.
    let mut bodies: Vec<Value> = Vec::new();
    for call in batch {
        let k = &call.keys;
        keys.extend([
            Key::from(k.sent.as_str()),
            Key::from(k.lease.as_str()),
            Key::from(k.sequence.as_str()),
            Key::from(k.cooldown.as_str()),
            Key::from(k.pending.as_str()),
        ]);
        calls.push(StepCall(
            if call.record.is_some() { "r" } else { "a" },
            &k.token,
            &k.seq,
            call.record.as_deref().unwrap_or_default(),
            call.pending.as_deref().map(|p| {
                bodies.push(Value::Bytes(p.body.clone()));
                PendingCall(
                    &p.member,
                    p.due_ms.to_string(),
                    p.ttl_ms.to_string(),
                    p.confirmation.fields(),
                    5 + bodies.len(),
                )
            }),
        ));
    }
    // Every job's arguments in one JSON word: one string to build and send instead of a
    // dozen or more per job, which the client would each copy, frame and free.
    let calls = serde_json::to_vec(&calls).map_err(|e| StoreError::Arguments(e.to_string()))?;
    let mut args = Vec::with_capacity(5 + bodies.len());
    args.extend([
        Value::from(fixed.lease_ms.as_str()),
        Value::from(fixed.stream_maxlen.as_str()),
        Value::from(fixed.dedupe_ttl_s.as_str()),
        Value::from(fixed.sequence_ttl_s.as_str()),
        Value::Bytes(calls.into()),
    ]);
    args.extend(bodies);
    Ok((keys, args))
}

#[cfg(test)]
mod tests {
    use super::super::tests::settings;
    use super::*;
    use crate::store::pending::PendingConfirmation;

    /// What `steps.lua` decodes: one array per call, the sequence a string even past 2^53,
    /// a record's fields as pairs in order, and any text as it was.
    #[test]
    fn batch_arguments_are_one_json_array_with_sequences_as_strings() {
        let store = Store::new("redis://127.0.0.1:6379", settings()).unwrap();
        let hostile = "Quote \" back\\slash \u{0} nul, é, 🚨, \n";
        let call = |keys: Arc<JobKeys>, record: Option<Fields>| Call {
            keys,
            record,
            pending: None,
        };
        let batch = [
            call(
                store.keys(
                    "u-1",
                    "ops",
                    Some("incident_1_2"),
                    Some(9_007_199_254_740_993),
                    "tok-1".into(),
                ),
                None,
            ),
            call(
                store.keys("u-2", "ops", None, None, "tok-2".into()),
                Some(
                    vec![
                        ("notification_uuid", "u-2".to_string()),
                        ("title", hostile.to_string()),
                    ]
                    .into(),
                ),
            ),
        ];
        let (keys, args) = step_words(&store.keys, &store.fixed, &batch).unwrap();
        assert_eq!(keys.len(), 2 + 5 * batch.len());
        assert_eq!(args.len(), 5);
        let Value::Bytes(calls) = &args[4] else {
            panic!("{:?}", args[4]);
        };
        let calls: serde_json::Value = serde_json::from_slice(calls).unwrap();
        assert_eq!(
            calls,
            serde_json::json!([
                ["a", "tok-1", "9007199254740993", [], null],
                [
                    "r",
                    "tok-2",
                    "",
                    [["notification_uuid", "u-2"], ["title", hostile]],
                    null
                ],
            ])
        );
    }

    /// Each pending confirmation's body is an argument of its own, byte for byte, and its
    /// call names that argument.
    #[test]
    fn the_bodies_of_pending_confirmations_follow_the_json_word() {
        let store = Store::new("redis://127.0.0.1:6379", settings()).unwrap();
        let confirmation = PendingConfirmation {
            team: "ops".into(),
            request_id: "r".into(),
            status: 202,
            attempts: 1,
            delivered_at_ms: 0,
            deadline_ms: 1,
            incident: None,
            seq: None,
            asks: 0,
        };
        let record = |uuid: &str, body: &'static [u8]| Call {
            keys: store.keys(uuid, "ops", None, None, format!("tok-{uuid}")),
            record: Some(vec![("notification_uuid", uuid.to_string())].into()),
            pending: Some(Arc::new(Pending {
                member: uuid.into(),
                due_ms: 1_000,
                ttl_ms: 2_000,
                body: bytes::Bytes::from_static(body),
                confirmation: confirmation.clone(),
            })),
        };
        let first: &[u8] = b"{\"title\": \"a \\\" quote\"}";
        let second: &[u8] = b"{\"title\": \"\xc3\xa9\"}";
        let batch = [record("u-1", first), record("u-2", second)];
        let (_, args) = step_words(&store.keys, &store.fixed, &batch).unwrap();
        assert_eq!(args.len(), 7);
        assert_eq!(args[5], Value::Bytes(bytes::Bytes::from_static(first)));
        assert_eq!(args[6], Value::Bytes(bytes::Bytes::from_static(second)));
        let Value::Bytes(calls) = &args[4] else {
            panic!("{:?}", args[4]);
        };
        let calls: serde_json::Value = serde_json::from_slice(calls).unwrap();
        let fields = serde_json::json!([
            ["team", "ops"],
            ["request_id", "r"],
            ["status", "202"],
            ["attempts", "1"],
            ["delivered_at_ms", "0"],
            ["deadline_ms", "1"],
            ["incident", ""],
            ["seq", ""],
            ["asks", "0"]
        ]);
        assert_eq!(
            calls[0][4],
            serde_json::json!(["u-1", "1000", "2000", fields, 6])
        );
        assert_eq!(calls[1][4][4], 7);
    }
}

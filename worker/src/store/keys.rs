//! Every Redis key the worker names (docs/contract.md section 7), each spelled here once and
//! under `--redis-prefix`. The scripts name none of their own: each gets its keys as KEYS[].

use std::sync::Arc;

use super::Store;

/// The keys under one prefix.
#[derive(Debug)]
pub(super) struct Keys {
    prefix: String,
    /// The deliveries stream, written once: every batch names it.
    stream: String,
    /// The pending confirmations, by due time; every claim names it.
    due: String,
}

impl Keys {
    pub(super) fn new(prefix: &str) -> Keys {
        Keys {
            prefix: prefix.to_owned(),
            stream: [prefix, "deliveries"].concat(),
            due: [prefix, "confirm:due"].concat(),
        }
    }

    /// The deliveries stream: one entry per delivery and per settled confirmation.
    pub(super) fn stream(&self) -> &str {
        &self.stream
    }

    /// The sorted set of pending confirmations, scored by when each is due (ms).
    pub(super) fn due(&self) -> &str {
        &self.due
    }

    /// The hash of one pending confirmation (see `pending.rs` for its fields).
    pub(super) fn pending(&self, notification_uuid: &str) -> String {
        self.named("confirm:", notification_uuid)
    }

    /// The marker that a notification was delivered.
    pub(super) fn sent(&self, notification_uuid: &str) -> String {
        self.named("sent:", notification_uuid)
    }

    /// The lease a job holds while its request is in flight. A metric alert takes turns with
    /// its incident's other jobs; any other job only guards against two copies of itself. An
    /// incident alias is `incident_<int>_<int>` and never has a colon, so no notification uuid
    /// can name an incident's lease.
    pub(super) fn lease(&self, notification_uuid: &str, incident: Option<&str>) -> String {
        match incident {
            Some(alias) => self.named("lease:", alias),
            None => self.named("lease:notification:", notification_uuid),
        }
    }

    /// The last delivered sequence of an incident. A job without an incident gets a key of its
    /// own that no script reads or writes.
    pub(super) fn sequence(&self, notification_uuid: &str, incident: Option<&str>) -> String {
        match incident {
            Some(alias) => self.named("seq:", alias),
            None => self.named("seq:notification:", notification_uuid),
        }
    }

    /// A team's cooldown after a 429, shared by every replica.
    pub(super) fn cooldown(&self, team: &str) -> String {
        self.named("cooldown:", team)
    }

    /// The counter of unfinished attempts at a message, named by a digest of its body (a
    /// message that cannot be parsed has no other name).
    pub(super) fn attempts(&self, body: &[u8]) -> String {
        use sha2::Digest;
        format!("{}attempts:{:x}", self.prefix, sha2::Sha256::digest(body))
    }

    /// The fleet's turn to ping the heartbeat `name`.
    pub(super) fn heartbeat(&self, name: &str) -> String {
        self.named("heartbeat:", name)
    }

    /// The key each replication round writes (one key, overwritten: nothing grows).
    pub(super) fn replication_probe(&self) -> String {
        [self.prefix.as_str(), "replicated"].concat()
    }

    /// Joined rather than formatted: several keys a job, and `concat` sizes each string once.
    fn named(&self, kind: &str, name: &str) -> String {
        [self.prefix.as_str(), kind, name].concat()
    }
}

/// One job's keys, computed once.
#[derive(Debug, Clone)]
pub(crate) struct JobKeys {
    pub(super) sent: String,
    pub(super) lease: String,
    pub(super) sequence: String,
    pub(super) cooldown: String,
    /// The pending confirmation's hash.
    pub(super) pending: String,
    /// Unique per job round, so that only the holder frees the lease.
    pub(super) token: String,
    /// The incident's sequence in decimal, or "" without one: the scripts compare sequences
    /// as text, exact across the whole 64-bit range.
    pub(super) seq: String,
}

impl Store {
    /// The keys one job touches (see `Keys::lease` for which lease it takes).
    pub(crate) fn keys(
        &self,
        notification_uuid: &str,
        team: &str,
        incident: Option<&str>,
        seq: Option<i64>,
        token: String,
    ) -> Arc<JobKeys> {
        let keys = &self.keys;
        Arc::new(JobKeys {
            sent: keys.sent(notification_uuid),
            lease: keys.lease(notification_uuid, incident),
            sequence: keys.sequence(notification_uuid, incident),
            cooldown: keys.cooldown(team),
            pending: keys.pending(notification_uuid),
            token,
            seq: seq.map(|n| n.to_string()).unwrap_or_default(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::settings;
    use super::*;

    #[test]
    fn keys_carry_the_prefix() {
        let store = Store::new("redis://127.0.0.1:6379", settings()).unwrap();
        let keys = store.keys("u-1", "ops", Some("incident_1_2"), Some(5), "tok".into());
        assert_eq!(keys.sent, "t:sent:u-1");
        assert_eq!(keys.lease, "t:lease:incident_1_2");
        assert_eq!(keys.sequence, "t:seq:incident_1_2");
        assert_eq!(keys.cooldown, "t:cooldown:ops");
        assert_eq!(store.keys.stream(), "t:deliveries");
    }
}

//! What happens on a 429: every request with that key waits out the cooldown the answer asked
//! for, in this replica (the map, shared by every task, so that one 429 slows all requests
//! with the key, not only the one that got it) and in the fleet (each 429 of a delivery is
//! reported to Redis, off the job's path, where `Store::admit` answers `Cooldown` to every
//! replica).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::opsgenie::Sender;
use crate::store::Store;

/// Until when requests with a key must wait, by team id, and where a 429 is reported.
#[derive(Clone, Default)]
pub(super) struct Cooldowns {
    until: Arc<Mutex<HashMap<String, Instant>>>,
    /// Where a 429 is reported (team id, wait), so that other replicas wait as well.
    fleet: Option<mpsc::UnboundedSender<(String, Duration)>>,
}

impl Cooldowns {
    /// Until when `team`'s key cools down, if it does now.
    pub(super) fn until(&self, team: &str) -> Option<Instant> {
        let mut map = self.until.lock().unwrap_or_else(|p| p.into_inner());
        match map.get(team) {
            Some(until) if *until > Instant::now() => Some(*until),
            Some(_) => {
                map.remove(team);
                None
            }
            None => None,
        }
    }

    /// Makes this replica's requests with `team`'s key wait until `until`.
    pub(super) fn cool_down(&self, team: &str, until: Instant) {
        let mut map = self.until.lock().unwrap_or_else(|p| p.into_inner());
        let entry = map.entry(team.to_string()).or_insert(until);
        if *entry < until {
            *entry = until;
        }
    }

    /// A delivery was rate limited for `wait`: this replica waits, and so does the fleet.
    pub(super) fn rate_limited(&self, team: &str, wait: Duration) {
        self.cool_down(team, Instant::now() + wait);
        if let Some(fleet) = &self.fleet {
            let _ = fleet.send((team.to_string(), wait));
        }
    }
}

impl Sender {
    /// Shares every 429 a delivery gets with the other replicas through `store`, from a task
    /// of its own, so that a slow Redis never holds up a job.
    pub(crate) fn share_cooldowns(mut self, store: Store) -> Sender {
        let (fleet, mut reported) = mpsc::unbounded_channel::<(String, Duration)>();
        tokio::spawn(async move {
            while let Some((team, wait)) = reported.recv().await {
                if let Err(error) = store.cool_down(&team, wait).await {
                    tracing::warn!(team_id = team, error = %error, "Could not share the rate-limit cooldown.");
                }
            }
        });
        self.cooldowns.fleet = Some(fleet);
        self
    }
}

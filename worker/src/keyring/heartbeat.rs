//! The `[heartbeat]` table (docs/contract.md section 6.2): the fleet's heartbeat and how its
//! name and interval are checked.

use std::sync::Arc;
use std::time::Duration;

use super::Team;

/// The name the heartbeat's integration goes by in the sender's messages and cooldowns; no
/// team can clash with it in practice, and none would share its cooldown by accident.
pub(super) const HEARTBEAT_TEAM_ID: &str = "[heartbeat]";
/// The most bytes a heartbeat's name may hold.
const MAX_HEARTBEAT_NAME_BYTES: usize = 200;
/// How often the fleet pings without an `interval`.
pub(super) const DEFAULT_HEARTBEAT_INTERVAL: Duration = Duration::from_secs(60);

/// The fleet's heartbeat: pinged while the fleet is healthy.
#[derive(Debug)]
pub struct Heartbeat {
    /// Its name in Opsgenie / JSM.
    pub name: String,
    /// How often the fleet pings.
    pub interval: Duration,
    /// The integration that pings: its key and API base, as for a team.
    pub team: Arc<Team>,
}

/// The heartbeat's interval, after checking its name and interval. `at` names a field for
/// messages.
pub(super) fn heartbeat_interval(
    name: &str,
    interval: Option<&str>,
    at: &dyn Fn(&str) -> String,
) -> Result<Duration, String> {
    if name.trim().is_empty() {
        return Err(format!("{}: must not be empty", at("name")));
    }
    if name.len() > MAX_HEARTBEAT_NAME_BYTES || name.chars().any(char::is_control) {
        return Err(format!(
            "{}: must be at most {MAX_HEARTBEAT_NAME_BYTES} bytes without control characters",
            at("name")
        ));
    }
    let Some(interval) = interval else {
        return Ok(DEFAULT_HEARTBEAT_INTERVAL);
    };
    let interval = opsgenie_shared::retry::parse_duration(interval)
        .map_err(|e| format!("{}: \"{interval}\" is not a duration: {e}", at("interval")))?;
    if !(Duration::from_secs(1)..=Duration::from_secs(24 * 3600)).contains(&interval) {
        return Err(format!("{}: must be between 1s and 24h", at("interval")));
    }
    Ok(interval)
}

//! The heartbeat (docs/contract.md section 6.2): who pages when the pager pipeline is down?
//! With `[heartbeat]` in the keyring, the fleet pings `{api}/v2/heartbeats/{name}/ping` about
//! once per interval while it is healthy, and Opsgenie (or JSM) pages when the pings stop.
//!
//! The replicas take turns through one Redis key: the replica whose `SET NX PX interval`
//! makes it pings, and the key's life keeps the others (and itself) from pinging again within
//! the interval. So N replicas ping about once per interval, not N times. A replica that is
//! not ready (not consuming, or Redis unreachable) never asks for a turn, and without Redis no
//! turn can be had: a fleet that cannot work stops pinging. A failed ping is logged and
//! counted, never fatal. The keyring is read again every round, so SIGHUP adds, changes or
//! removes the heartbeat.

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use opsgenie_shared::text::seg;
use tokio::time::Instant;

use crate::keyring::{Heartbeat, Keyring};
use crate::opsgenie::Sender;
use crate::store::Store;
use crate::support::shutdown::Shutdown;
use crate::telemetry::catalogue;
use crate::telemetry::health::Health;

/// How often a replica without a heartbeat looks at the keyring again.
const WITHOUT_HEARTBEAT: Duration = Duration::from_secs(5);

/// How often a replica asks for its turn: a tenth of the interval, so that the fleet pings
/// within about 10% of the interval after the last ping's key ran out.
fn tick(interval: Duration) -> Duration {
    (interval / 10).clamp(Duration::from_millis(100), Duration::from_secs(10))
}

/// Pings while ready, in turn with the other replicas, until `shutdown`.
pub(crate) async fn run(
    keyring: Arc<ArcSwap<Keyring>>,
    store: Store,
    sender: Sender,
    health: Arc<Health>,
    shutdown: Shutdown,
) {
    // Names this replica's turns in Redis, for whoever looks at the key.
    let replica = format!(
        "{}-{}-{:08x}",
        hostname(),
        std::process::id(),
        rand::random::<u32>()
    );
    loop {
        let heartbeat = keyring.load().heartbeat.clone();
        let pause = match heartbeat {
            None => WITHOUT_HEARTBEAT,
            Some(heartbeat) => {
                if health.readiness().is_ok() {
                    round(&heartbeat, &store, &sender, &replica).await;
                }
                tick(heartbeat.interval)
            }
        };
        if !shutdown.sleep_until(Instant::now() + pause).await {
            return;
        }
    }
}

/// Takes the turn if it is free, and pings.
async fn round(heartbeat: &Heartbeat, store: &Store, sender: &Sender, replica: &str) {
    match store
        .take_heartbeat_turn(&heartbeat.name, heartbeat.interval, replica)
        .await
    {
        Ok(true) => ping(heartbeat, sender).await,
        Ok(false) => {}
        Err(error) => {
            tracing::debug!(error = %error, "Cannot take the heartbeat's turn; Redis is unreachable.");
        }
    }
}

async fn ping(heartbeat: &Heartbeat, sender: &Sender) {
    let path = format!("/v2/heartbeats/{}/ping", seg(&heartbeat.name));
    let failure = match sender
        .call(&heartbeat.team, reqwest::Method::POST, &path)
        .await
    {
        Ok(reply) if (200..300).contains(&reply.status) => None,
        Ok(reply) => Some(format!(
            "Opsgenie answered {}: {}",
            reply.status,
            reply.excerpt(&heartbeat.team)
        )),
        Err(error) => Some(error.to_string()),
    };
    match failure {
        None => {
            metrics::counter!(catalogue::HEARTBEAT_PINGS, "result" => "ok").increment(1);
            tracing::debug!(heartbeat = heartbeat.name, "Heartbeat pinged.");
        }
        Some(error) => {
            metrics::counter!(catalogue::HEARTBEAT_PINGS, "result" => "failed").increment(1);
            tracing::warn!(
                heartbeat = heartbeat.name,
                destination = heartbeat.team.destination(),
                error,
                "The heartbeat ping failed."
            );
        }
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| opsgenie_shared::text::cap_bytes(h.trim(), 64).into_owned())
        .unwrap_or_else(|_| "replica".into())
}

#[cfg(test)]
mod tests {
    use super::tick;
    use std::time::Duration;

    #[test]
    fn a_turn_is_asked_for_ten_times_per_interval_within_bounds() {
        assert_eq!(tick(Duration::from_secs(60)), Duration::from_secs(6));
        assert_eq!(tick(Duration::from_secs(1)), Duration::from_millis(100));
        assert_eq!(tick(Duration::from_millis(500)), Duration::from_millis(100));
        assert_eq!(
            tick(Duration::from_secs(24 * 3600)),
            Duration::from_secs(10)
        );
    }
}

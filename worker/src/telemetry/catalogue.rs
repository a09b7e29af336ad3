//! Every metric the worker exposes, in one list: its help text, and each series it is known
//! to have, registered at zero when `run` starts.
//!
//! A series that appears only with its first event defeats the alerts written on it: for
//! `increase()` the first dead letter of a replica is a series going from absent to 1, which
//! is no increase, and a dashboard panel over a name that does not exist yet is blank, which
//! looks the same as a renamed metric. So each counter is registered at zero for every label
//! value the code can give it, and each gauge and histogram is registered before anything
//! happens. The dashboard and the alerting rules in `deploy/` use these names; a test scrapes
//! a running worker and fails when one of them is missing.

use opsgenie_shared::DeadReason;

/// `opsgenie_jobs_total{outcome,reason}`: one per finished job (`consumer`).
pub const JOBS: &str = "opsgenie_jobs_total";
/// `opsgenie_responses_total{status}`: one per answer (or transport failure) from Opsgenie.
pub const RESPONSES: &str = "opsgenie_responses_total";
/// `opsgenie_retries_total{kind}`: `quick` (in-process) and `delayed` (through a delay queue).
pub const RETRIES: &str = "opsgenie_retries_total";
/// `opsgenie_confirmations_total{result}`: the answers to "was this alert processed?".
pub const CONFIRMATIONS: &str = "opsgenie_confirmations_total";
/// `opsgenie_heartbeat_pings_total{result}`: the worker's own heartbeat pings.
pub const HEARTBEAT_PINGS: &str = "opsgenie_heartbeat_pings_total";
pub const REQUEST_DURATION: &str = "opsgenie_request_duration_seconds";
pub const DELIVERY_DURATION: &str = "opsgenie_delivery_duration_seconds";
pub const CONFIRMATION_LAG: &str = "opsgenie_confirmation_lag_seconds";
pub const JOBS_IN_FLIGHT: &str = "opsgenie_jobs_in_flight";
pub const KEYRING_TEAMS: &str = "opsgenie_keyring_teams";
pub const KEYRING_RELOADED: &str = "opsgenie_keyring_reloaded_timestamp_seconds";
pub const CONFIRMATIONS_PENDING: &str = "opsgenie_confirmations_pending";
pub const READY: &str = "opsgenie_ready";
pub const JOBS_WAITING_COOLDOWN: &str = "opsgenie_jobs_waiting_cooldown";
/// `opsgenie_queue_messages{queue}`: sampled from the broker (`broker::sample_queue_length`),
/// so it is not registered here: a zero before the first sample would be a made-up figure.
pub const QUEUE_MESSAGES: &str = "opsgenie_queue_messages";

/// The job outcomes without a reason (`Outcome::label`); `dead_lettered` takes one of
/// `DeadReason::ALL`, and `requeued` is also counted with reason `panic`.
const PLAIN_OUTCOMES: [&str; 5] = [
    "delivered",
    "duplicate",
    "stale",
    "retry_scheduled",
    "requeued",
];
/// The statuses the dashboard and the alerts name: what a healthy worker sees (202, and 200
/// for a close), what a close of nothing gets (404), the rate limit (429), the usual outage
/// (503), and `error` for no answer at all. Others appear with their first occurrence.
const KNOWN_STATUSES: [&str; 6] = ["200", "202", "404", "429", "503", "error"];
const RETRY_KINDS: [&str; 2] = ["quick", "delayed"];
const CONFIRMATION_RESULTS: [&str; 5] = [
    "confirmed",
    "failed_async",
    "unconfirmed",
    "not_yet",
    "error",
];
const HEARTBEAT_RESULTS: [&str; 2] = ["ok", "failed"];

/// Describes every metric and registers its known series at zero. Called once the recorder
/// is installed; without one (`--metrics-addr off`) it does nothing.
pub fn register() {
    describe();
    for outcome in PLAIN_OUTCOMES {
        metrics::counter!(JOBS, "outcome" => outcome, "reason" => "").absolute(0);
    }
    metrics::counter!(JOBS, "outcome" => "requeued", "reason" => "panic").absolute(0);
    for reason in DeadReason::ALL {
        metrics::counter!(JOBS, "outcome" => "dead_lettered", "reason" => reason.as_str())
            .absolute(0);
    }
    for status in KNOWN_STATUSES {
        metrics::counter!(RESPONSES, "status" => status).absolute(0);
    }
    for kind in RETRY_KINDS {
        metrics::counter!(RETRIES, "kind" => kind).absolute(0);
    }
    for result in CONFIRMATION_RESULTS {
        metrics::counter!(CONFIRMATIONS, "result" => result).absolute(0);
    }
    for result in HEARTBEAT_RESULTS {
        metrics::counter!(HEARTBEAT_PINGS, "result" => result).absolute(0);
    }
    // A histogram handle, once registered, is rendered with empty buckets.
    for name in [REQUEST_DURATION, DELIVERY_DURATION, CONFIRMATION_LAG] {
        drop(metrics::histogram!(name));
    }
    for name in [
        JOBS_IN_FLIGHT,
        KEYRING_TEAMS,
        KEYRING_RELOADED,
        CONFIRMATIONS_PENDING,
        READY,
        JOBS_WAITING_COOLDOWN,
    ] {
        metrics::gauge!(name).set(0.0);
    }
}

fn describe() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_counter!(
        JOBS,
        "Jobs finished, by outcome (delivered, duplicate, stale, retry_scheduled, dead_lettered, requeued) and dead-letter reason."
    );
    describe_counter!(
        RESPONSES,
        "Answers from Opsgenie by HTTP status; `error` when no answer came."
    );
    describe_counter!(
        RETRIES,
        "Retries: `quick` within a delivery round, `delayed` through a delay queue."
    );
    describe_counter!(
        CONFIRMATIONS,
        "Asks whether Opsgenie processed a delivered alert, by result (confirmed, failed_async, unconfirmed, not_yet, error)."
    );
    describe_counter!(
        HEARTBEAT_PINGS,
        "The worker's own Opsgenie heartbeat pings, by result (ok, failed)."
    );
    describe_histogram!(
        REQUEST_DURATION,
        Unit::Seconds,
        "One HTTP request to Opsgenie, from send to answer or failure."
    );
    describe_histogram!(
        DELIVERY_DURATION,
        Unit::Seconds,
        "A delivered job, from its arrival to its durable outcome."
    );
    describe_histogram!(
        CONFIRMATION_LAG,
        Unit::Seconds,
        "From a delivery to Opsgenie's confirmation (confirmed or failed_async)."
    );
    describe_gauge!(JOBS_IN_FLIGHT, "Jobs being processed now.");
    describe_gauge!(KEYRING_TEAMS, "Teams in the loaded keyring.");
    describe_gauge!(
        KEYRING_RELOADED,
        Unit::Seconds,
        "When the keyring was last loaded, seconds since the epoch."
    );
    describe_gauge!(
        CONFIRMATIONS_PENDING,
        "Delivered alerts whose processing by Opsgenie is not confirmed yet."
    );
    describe_gauge!(
        READY,
        "1 while /readyz answers 200 (consuming, Redis reachable), else 0."
    );
    describe_gauge!(
        JOBS_WAITING_COOLDOWN,
        "Jobs waiting for a team's rate-limit (429) cooldown to end."
    );
    describe_gauge!(
        QUEUE_MESSAGES,
        "Ready messages in the work queue, as the broker last said (sampled every 15 s)."
    );
}

/// Counts one job in `opsgenie_jobs_waiting_cooldown` for as long as it is held, however the
/// wait ends (the cooldown over, shutdown, or the job's task dropped at the drain deadline).
#[must_use = "the job counts as waiting only while this is held"]
pub struct WaitingForCooldown(());

impl WaitingForCooldown {
    pub fn start() -> Self {
        metrics::gauge!(JOBS_WAITING_COOLDOWN).increment(1.0);
        WaitingForCooldown(())
    }
}

impl Drop for WaitingForCooldown {
    fn drop(&mut self) {
        metrics::gauge!(JOBS_WAITING_COOLDOWN).decrement(1.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::metrics::prometheus_builder;

    /// What `register` leaves in a Prometheus scrape, with a recorder of the test's own set
    /// up as the worker's.
    fn scrape(after: impl FnOnce()) -> String {
        let recorder = prometheus_builder().unwrap().build_recorder();
        let handle = recorder.handle();
        metrics::with_local_recorder(&recorder, after);
        handle.render()
    }

    #[test]
    fn every_series_exists_at_zero_before_any_event() {
        let text = scrape(register);
        for (name, kind) in [
            (JOBS, "counter"),
            (RESPONSES, "counter"),
            (RETRIES, "counter"),
            (CONFIRMATIONS, "counter"),
            (HEARTBEAT_PINGS, "counter"),
            (REQUEST_DURATION, "histogram"),
            (DELIVERY_DURATION, "histogram"),
            (CONFIRMATION_LAG, "histogram"),
            (JOBS_IN_FLIGHT, "gauge"),
            (KEYRING_TEAMS, "gauge"),
            (KEYRING_RELOADED, "gauge"),
            (CONFIRMATIONS_PENDING, "gauge"),
            (READY, "gauge"),
            (JOBS_WAITING_COOLDOWN, "gauge"),
        ] {
            let line = format!("# TYPE {name} {kind}");
            assert!(text.contains(&line), "{line} missing from:\n{text}");
            assert!(
                text.contains(&format!("# HELP {name} ")),
                "{name} has no help"
            );
        }
        for series in [
            r#"opsgenie_jobs_total{outcome="dead_lettered",reason="poison"} 0"#,
            r#"opsgenie_jobs_total{outcome="delivered",reason=""} 0"#,
            r#"opsgenie_confirmations_total{result="not_yet"} 0"#,
            r#"opsgenie_heartbeat_pings_total{result="failed"} 0"#,
            r#"opsgenie_retries_total{kind="delayed"} 0"#,
            r#"opsgenie_delivery_duration_seconds_count 0"#,
            r#"opsgenie_confirmation_lag_seconds_bucket{le="1800"} 0"#,
        ] {
            assert!(text.contains(series), "{series} missing from:\n{text}");
        }
    }

    #[test]
    fn the_cooldown_gauge_counts_only_while_held() {
        let recorder = prometheus_builder().unwrap().build_recorder();
        let handle = recorder.handle();
        metrics::with_local_recorder(&recorder, || {
            let first = WaitingForCooldown::start();
            let second = WaitingForCooldown::start();
            assert!(handle.render().contains("opsgenie_jobs_waiting_cooldown 2"));
            drop(first);
            assert!(handle.render().contains("opsgenie_jobs_waiting_cooldown 1"));
            drop(second);
            assert!(handle.render().contains("opsgenie_jobs_waiting_cooldown 0"));
        });
    }
}

//! The summary line: what the consumer finished since the last line, logged every
//! `--summary-interval`.

use crate::job::pipeline::Outcome;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use crate::support::shutdown::Shutdown;

/// Counts since the last summary line, written by the consumer, read by `spawn_summary`.
#[derive(Debug, Default)]
pub struct JobCounts {
    delivered: AtomicU64,
    retried: AtomicU64,
    dead_lettered: AtomicU64,
    skipped: AtomicU64,
    in_flight: AtomicI64,
}

impl JobCounts {
    pub fn started(&self) {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a finished job by its `outcome` label.
    pub fn finished(&self, outcome: &Outcome) {
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
        let counter = match outcome {
            Outcome::Delivered => &self.delivered,
            Outcome::RetryLater { .. } => &self.retried,
            Outcome::DeadLetter { .. } => &self.dead_lettered,
            Outcome::Duplicate | Outcome::Stale | Outcome::Requeue => &self.skipped,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// Logs one summary line every `every` (delivered, retried, dead-lettered, duplicate or
/// stale since the last line, and in flight now), and a last one at shutdown.
pub fn spawn_summary(
    counts: Arc<JobCounts>,
    every: Duration,
    shutdown: Shutdown,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            let go_on = shutdown
                .sleep_until(tokio::time::Instant::now() + every)
                .await;
            tracing::info!(
                delivered = counts.delivered.swap(0, Ordering::Relaxed),
                retried = counts.retried.swap(0, Ordering::Relaxed),
                dead_lettered = counts.dead_lettered.swap(0, Ordering::Relaxed),
                duplicate_or_stale = counts.skipped.swap(0, Ordering::Relaxed),
                in_flight = counts.in_flight.load(Ordering::Relaxed),
                interval_s = every.as_secs(),
                "Summary."
            );
            if !go_on {
                break;
            }
        }
    })
}

//! How long to wait before trying again. Every wait of the worker that grows with each failure
//! (the admission wait, the record retry, reconnecting to RabbitMQ and to Redis) doubles from a
//! first pause up to a ceiling, give or take a quarter so that replicas waiting on the same
//! thing do not wake together.
//!
//! The quick retries of a delivery round (`opsgenie`) grow faster, and with more jitter.
//!
//! The `backoff` crate has an unmaintained advisory: this module is the one place that uses
//! it, so that it can be swapped without touching any caller.

use std::time::Duration;

use backoff::ExponentialBackoff;
use backoff::backoff::Backoff;

/// Each pause is the nominal one give or take this share of it.
const JITTER: f64 = 0.25;

/// A growing pause between attempts at the same thing.
#[derive(Debug)]
pub struct Pacing {
    backoff: ExponentialBackoff,
}

impl Pacing {
    /// Pauses start near `initial` and double up to near `max` (never more than a quarter
    /// over it), for as long as they are asked for.
    pub fn new(initial: Duration, max: Duration) -> Pacing {
        Pacing::growing(initial, max, 2.0, JITTER)
    }

    /// Pauses that start near `initial` and grow `multiplier` times each, up to near `max`,
    /// each give or take `jitter` (a share of it).
    pub fn growing(initial: Duration, max: Duration, multiplier: f64, jitter: f64) -> Pacing {
        let initial = initial.min(max);
        Pacing {
            backoff: ExponentialBackoff {
                current_interval: initial,
                initial_interval: initial,
                randomization_factor: jitter,
                multiplier,
                max_interval: max,
                // Never gives up: whether to go on is the caller's decision.
                max_elapsed_time: None,
                ..ExponentialBackoff::default()
            },
        }
    }

    /// The pause before the next attempt; the one after it is twice as long, up to the ceiling.
    pub fn next_pause(&mut self) -> Duration {
        // `None` only comes past `max_elapsed_time`, which is unset.
        self.backoff
            .next_backoff()
            .unwrap_or(self.backoff.max_interval)
    }

    /// Back to the first pause, after a success.
    pub fn reset(&mut self) {
        self.backoff.reset();
    }

    /// Straight to the longest pause, for a failure that will not clear up in milliseconds.
    pub fn to_ceiling(&mut self) {
        self.backoff.current_interval = self.backoff.max_interval;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `nominal` give or take the jitter (and a microsecond for rounding).
    fn assert_near(pause: Duration, nominal: Duration) {
        let slack = Duration::from_micros(1);
        let low = nominal.mul_f64(1.0 - JITTER).saturating_sub(slack);
        let high = nominal.mul_f64(1.0 + JITTER) + slack;
        assert!(
            low <= pause && pause <= high,
            "{pause:?} is not within {low:?}..={high:?}"
        );
    }

    #[test]
    fn pauses_double_up_to_the_ceiling_with_jitter() {
        for _ in 0..200 {
            let mut pacing = Pacing::new(Duration::from_millis(20), Duration::from_millis(500));
            for nominal in [20, 40, 80, 160, 320, 500, 500, 500] {
                assert_near(pacing.next_pause(), Duration::from_millis(nominal));
            }
        }
    }

    #[test]
    fn pauses_are_not_all_the_same() {
        let mut pacing = Pacing::new(Duration::from_secs(5), Duration::from_secs(5));
        let pauses: Vec<Duration> = (0..20).map(|_| pacing.next_pause()).collect();
        assert!(pauses.iter().any(|p| *p != pauses[0]), "{pauses:?}");
    }

    #[test]
    fn reset_starts_again_from_the_first_pause() {
        let mut pacing = Pacing::new(Duration::from_millis(100), Duration::from_secs(5));
        for _ in 0..10 {
            pacing.next_pause();
        }
        assert_near(pacing.next_pause(), Duration::from_secs(5));
        pacing.reset();
        assert_near(pacing.next_pause(), Duration::from_millis(100));
        assert_near(pacing.next_pause(), Duration::from_millis(200));
    }

    #[test]
    fn to_ceiling_skips_to_the_longest_pause() {
        let mut pacing = Pacing::new(Duration::from_millis(20), Duration::from_millis(500));
        assert_near(pacing.next_pause(), Duration::from_millis(20));
        pacing.to_ceiling();
        assert_near(pacing.next_pause(), Duration::from_millis(500));
        assert_near(pacing.next_pause(), Duration::from_millis(500));
    }

    #[test]
    fn a_first_pause_above_the_ceiling_is_the_ceiling() {
        let mut pacing = Pacing::new(Duration::from_secs(60), Duration::from_secs(1));
        assert_near(pacing.next_pause(), Duration::from_secs(1));
    }

    /// The pauses are meant for `tokio::time::sleep`: with the clock paused, a run of them
    /// takes their sum.
    #[tokio::test(start_paused = true)]
    async fn sleeping_the_pauses_takes_their_sum() {
        let started = tokio::time::Instant::now();
        let mut pacing = Pacing::new(Duration::from_millis(100), Duration::from_secs(5));
        let mut total = Duration::ZERO;
        for _ in 0..8 {
            let pause = pacing.next_pause();
            total += pause;
            tokio::time::sleep(pause).await;
        }
        // The timer counts whole milliseconds, rounding each sleep up.
        let elapsed = started.elapsed();
        assert!(
            total <= elapsed && elapsed <= total + Duration::from_millis(8),
            "{elapsed:?} for {total:?}"
        );
        // 100 + 200 + ... + 5000 ms nominal, give or take a quarter.
        assert_near(
            total,
            Duration::from_millis(100 + 200 + 400 + 800 + 1600 + 3200 + 5000 + 5000),
        );
    }
}

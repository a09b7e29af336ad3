//! When a job that could not be delivered is tried again (docs/contract.md section 6).
//!
//! An *attempt* is one round of delivery: the job taken from the queue and tried up to
//! `quick_tries` times in process. After a failed round the job goes to a delay queue whose
//! delay grows with the number of rounds; past `max_attempts` rounds or `max_age` since it
//! was first seen, it is dead-lettered as `exhausted`.

use std::time::Duration;

/// The retry settings, from the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Rounds before the job is exhausted (default 20).
    pub max_attempts: u32,
    /// Age, from the first time a worker saw the job, past which it is exhausted (default 24 h).
    pub max_age: Duration,
    /// The delay queues' delays, shortest first (default 5 s, 30 s, 2 min, 10 min, 30 min).
    /// Round `n` (1-based) that failed waits `delays[min(n, len) - 1]`, or the first delay
    /// at least as long as a wait the server asked for.
    pub delays: Vec<Duration>,
    /// HTTP tries within one round (default 3).
    pub quick_tries: u32,
    /// The time one round's tries may take, waits included (default 10 s).
    pub quick_window: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 20,
            max_age: Duration::from_secs(24 * 3600),
            delays: vec![
                Duration::from_secs(5),
                Duration::from_secs(30),
                Duration::from_secs(120),
                Duration::from_secs(600),
                Duration::from_secs(1800),
            ],
            quick_tries: 3,
            quick_window: Duration::from_secs(10),
        }
    }
}

/// What to do with a job whose round `attempts` (1-based, this round included) failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NextStep {
    /// Republish to the delay queue with this index into `RetryPolicy::delays`.
    Delay { tier: usize },
    /// Dead-letter as `exhausted`.
    Exhausted,
}

impl RetryPolicy {
    /// Decides the next step after a failed round. `age` is the time since the job was first
    /// seen; `server_wait` is a wait the server asked for (429), if any.
    /// Exhausted when `attempts >= max_attempts` or when `age` plus the chosen delay would pass
    /// `max_age`, or when there are no delays. A server wait never shortens the schedule: the
    /// tier is the later of the round's own and the first one that covers the wait (the last
    /// tier when none does).
    pub fn next_step(
        &self,
        attempts: u32,
        age: Duration,
        server_wait: Option<Duration>,
    ) -> NextStep {
        if attempts >= self.max_attempts || self.delays.is_empty() {
            return NextStep::Exhausted;
        }
        let last = self.delays.len() - 1;
        let scheduled = (attempts.max(1) as usize - 1).min(last);
        let tier = match server_wait {
            Some(wait) => {
                let covering = self.delays.iter().position(|&d| d >= wait).unwrap_or(last);
                scheduled.max(covering)
            }
            None => scheduled,
        };
        match age.checked_add(self.delays[tier]) {
            Some(due) if due <= self.max_age => NextStep::Delay { tier },
            _ => NextStep::Exhausted,
        }
    }
}

/// A delay written short, as it names a delay queue: whole hours as `h`, whole minutes as `m`,
/// whole seconds as `s`, else `ms` (`5s`, `30s`, `2m`, `90s`, `24h`, `1500ms`). It reads back
/// through `parse_duration`.
///
/// Not `humantime::format_duration`: that one writes 90 s as `1m 30s` (a space in a queue
/// name), 1.5 s as `1s 500ms` and 24 h as `1day`, while the delay queues of running
/// deployments already carry these names; a new name would strand the jobs waiting in the
/// old queue.
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms == 0 {
        "0s".to_owned()
    } else if ms.is_multiple_of(3_600_000) {
        format!("{}h", ms / 3_600_000)
    } else if ms.is_multiple_of(60_000) {
        format!("{}m", ms / 60_000)
    } else if ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

/// Parses a duration as `humantime` does: `500ms`, `5s`, `2m`, `24h`, `1h 30m`, `2days`.
///
/// Fails on anything else (a bare number, a unit it does not know, a negative or fractional
/// number) and on a number too large for a `Duration`; the error says what it found.
pub fn parse_duration(s: &str) -> Result<Duration, humantime::DurationError> {
    humantime::parse_duration(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: u64 = 60;

    #[test]
    fn next_step_follows_the_schedule() {
        let policy = RetryPolicy::default();
        let young = Duration::from_secs(1);
        let table = [
            (0, 0),
            (1, 0),
            (2, 1),
            (3, 2),
            (4, 3),
            (5, 4),
            (6, 4),
            (19, 4),
        ];
        for (attempts, tier) in table {
            assert_eq!(
                policy.next_step(attempts, young, None),
                NextStep::Delay { tier },
                "{attempts}"
            );
        }
        assert_eq!(policy.next_step(20, young, None), NextStep::Exhausted);
        assert_eq!(policy.next_step(21, young, None), NextStep::Exhausted);
    }

    #[test]
    fn a_server_wait_picks_a_tier_that_covers_it() {
        let policy = RetryPolicy::default();
        let young = Duration::from_secs(1);
        let secs = Duration::from_secs;
        let table = [
            (1, secs(1), 0),
            (1, secs(5), 0),
            (1, secs(6), 1),
            (1, secs(60), 2),
            (1, secs(600), 3),
            (1, secs(601), 4),
            // Longer than every tier: the longest.
            (1, secs(3600), 4),
            // Never shorter than the round's own tier.
            (4, secs(1), 3),
        ];
        for (attempts, wait, tier) in table {
            assert_eq!(
                policy.next_step(attempts, young, Some(wait)),
                NextStep::Delay { tier },
                "{attempts} {wait:?}"
            );
        }
    }

    #[test]
    fn the_age_limit_counts_the_coming_delay() {
        let policy = RetryPolicy::default();
        let day = policy.max_age;
        // Round 5 waits 30 min.
        let fits = day - Duration::from_secs(30 * MIN);
        assert_eq!(policy.next_step(5, fits, None), NextStep::Delay { tier: 4 });
        let late = fits + Duration::from_millis(1);
        assert_eq!(policy.next_step(5, late, None), NextStep::Exhausted);
        // Round 1 waits 5 s and still fits.
        assert_eq!(policy.next_step(1, late, None), NextStep::Delay { tier: 0 });
        assert_eq!(
            policy.next_step(1, Duration::MAX, None),
            NextStep::Exhausted
        );
    }

    #[test]
    fn no_delays_means_exhausted() {
        let policy = RetryPolicy {
            delays: vec![],
            ..RetryPolicy::default()
        };
        assert_eq!(
            policy.next_step(1, Duration::ZERO, None),
            NextStep::Exhausted
        );
    }

    #[test]
    fn delay_queue_names() {
        let policy = RetryPolicy {
            delays: vec![
                Duration::from_secs(5),
                Duration::from_secs(30),
                Duration::from_secs(2 * MIN),
                Duration::from_secs(10 * MIN),
                Duration::from_secs(60 * MIN),
                Duration::from_millis(1500),
                Duration::from_secs(90),
                Duration::from_secs(2 * 3600),
                Duration::ZERO,
            ],
            ..RetryPolicy::default()
        };
        let names: Vec<String> = policy.delays.iter().map(|d| format_duration(*d)).collect();
        assert_eq!(
            names,
            ["5s", "30s", "2m", "10m", "1h", "1500ms", "90s", "2h", "0s"]
        );
    }

    #[test]
    fn parse_duration_table() {
        let secs = Duration::from_secs;
        let table = [
            ("5s", Some(secs(5))),
            ("30s", Some(secs(30))),
            ("2m", Some(secs(120))),
            ("1h", Some(secs(3600))),
            ("24h", Some(secs(86_400))),
            ("500ms", Some(Duration::from_millis(500))),
            ("1h 30m", Some(secs(5400))),
            ("1h30m", Some(secs(5400))),
            ("1m 30s", Some(secs(90))),
            ("2days", Some(secs(2 * 86_400))),
            ("10sec", Some(secs(10))),
            ("0s", Some(Duration::ZERO)),
            ("", None),
            ("5", None),
            ("s", None),
            ("-5s", None),
            ("1.5s", Some(Duration::from_millis(1500))),
            ("5x", None),
            ("soon", None),
            ("18446744073709551615h", None),
            ("99999999999999999999s", None),
        ];
        for (input, expected) in table {
            assert_eq!(parse_duration(input).ok(), expected, "{input:?}");
        }
    }

    #[test]
    fn a_bad_duration_says_what_is_wrong() {
        let error = parse_duration("5x").unwrap_err().to_string();
        assert!(error.contains("unknown time unit \"x\""), "{error}");
    }

    /// The delay queues of running deployments carry these names: they must never change.
    #[test]
    fn queue_names_of_whole_units_stay_as_they_are() {
        let secs = Duration::from_secs;
        let table = [
            (secs(5), "5s"),
            (secs(30), "30s"),
            (secs(120), "2m"),
            (secs(600), "10m"),
            (secs(1800), "30m"),
            (secs(90), "90s"),
            (secs(59), "59s"),
            (secs(61 * 60), "61m"),
            (secs(3600), "1h"),
            (secs(86_400), "24h"),
            (secs(7 * 86_400), "168h"),
            (Duration::from_millis(1500), "1500ms"),
        ];
        for (delay, name) in table {
            assert_eq!(format_duration(delay), name, "{delay:?}");
            assert_eq!(parse_duration(name).ok(), Some(delay), "{name}");
        }
    }

    #[test]
    fn whole_seconds_named_and_read_back() {
        for n in (1..=200_000u64).step_by(7) {
            let delay = Duration::from_secs(n);
            let name = format_duration(delay);
            assert!(!name.contains(' '), "{name}");
            assert_eq!(parse_duration(&name).ok(), Some(delay), "{name}");
        }
    }

    #[test]
    fn default_tier_names_parse_back() {
        let policy = RetryPolicy::default();
        for delay in &policy.delays {
            assert_eq!(parse_duration(&format_duration(*delay)).ok(), Some(*delay));
        }
    }
}

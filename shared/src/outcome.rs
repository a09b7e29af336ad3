//! What an Opsgenie answer means for the job (docs/contract.md section 6), decided once, here.

use std::time::Duration;

use crate::request::Action;

/// Why a job went to the dead-letter queue: the value of `x-opsgenie-error`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DeadReason {
    InvalidJob,
    TooLarge,
    UnknownTeam,
    Unauthorized,
    Rejected,
    Exhausted,
    /// Processing was started several times and never finished: the message keeps killing
    /// the attempt (the worker dies or is cut off with it in hand).
    Poison,
    /// Opsgenie accepted the request (202) and then failed to process it: the request status
    /// says `isSuccess: false` (a disabled integration, a policy, a refused field).
    FailedAsync,
    /// Accepted (202), but no request status said it was processed within `--confirm-within`.
    Unconfirmed,
}

impl DeadReason {
    pub const ALL: [DeadReason; 9] = [
        DeadReason::InvalidJob,
        DeadReason::TooLarge,
        DeadReason::UnknownTeam,
        DeadReason::Unauthorized,
        DeadReason::Rejected,
        DeadReason::Exhausted,
        DeadReason::Poison,
        DeadReason::FailedAsync,
        DeadReason::Unconfirmed,
    ];

    /// `invalid_job`, `too_large`, `unknown_team`, `unauthorized`, `rejected`, `exhausted`,
    /// `poison`, `failed_async`, `unconfirmed`.
    pub fn as_str(self) -> &'static str {
        match self {
            DeadReason::InvalidJob => "invalid_job",
            DeadReason::TooLarge => "too_large",
            DeadReason::UnknownTeam => "unknown_team",
            DeadReason::Unauthorized => "unauthorized",
            DeadReason::Rejected => "rejected",
            DeadReason::Exhausted => "exhausted",
            DeadReason::Poison => "poison",
            DeadReason::FailedAsync => "failed_async",
            DeadReason::Unconfirmed => "unconfirmed",
        }
    }

    /// The reverse of `as_str`.
    pub fn parse(s: &str) -> Option<DeadReason> {
        DeadReason::ALL.into_iter().find(|r| r.as_str() == s)
    }
}

/// The fate of one HTTP exchange.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// 2xx.
    Delivered,
    /// 404 on a close: nothing open to close; counts as delivered.
    NothingToClose,
    /// Try again. `wait` is the server's word on how long (429), else the backoff decides.
    /// `rate_limited` is true for 429: other requests with the same key wait as well.
    Retry {
        wait: Option<Duration>,
        rate_limited: bool,
    },
    /// Permanent: `unauthorized` (401, 403) or `rejected` (400, 402, 422, 501, other 4xx).
    DeadLetter(DeadReason),
}

/// Maps an HTTP answer to its verdict. `retry_after` and `rate_limit_period` are the raw
/// values of the `Retry-After` and `X-RateLimit-Period-In-Sec` headers when present
/// (whole or fractional seconds; anything else is ignored).
/// Statuses outside 200..=599 are treated like a 5xx (retry). A server wait is capped at
/// `MAX_SERVER_WAIT`.
pub fn classify_response(
    action: Action,
    status: u16,
    retry_after: Option<&str>,
    rate_limit_period: Option<&str>,
) -> Verdict {
    match status {
        200..=299 => Verdict::Delivered,
        404 if action == Action::Close => Verdict::NothingToClose,
        429 => Verdict::Retry {
            wait: retry_after
                .and_then(parse_seconds)
                .or_else(|| rate_limit_period.and_then(parse_seconds)),
            rate_limited: true,
        },
        401 | 403 => Verdict::DeadLetter(DeadReason::Unauthorized),
        408 => Verdict::Retry {
            wait: None,
            rate_limited: false,
        },
        400..=499 | 501 => Verdict::DeadLetter(DeadReason::Rejected),
        _ => Verdict::Retry {
            wait: None,
            rate_limited: false,
        },
    }
}

/// The longest wait a server may impose; past it a misbehaving header would park a job
/// (and, for a 429, its whole team) for an unbounded time.
pub const MAX_SERVER_WAIT: Duration = Duration::from_secs(3600);

/// Whole or fractional non-negative seconds. An HTTP date in `Retry-After` is not read:
/// that would need a clock, and Opsgenie sends seconds.
fn parse_seconds(raw: &str) -> Option<Duration> {
    let secs: f64 = raw.trim().parse().ok()?;
    if !secs.is_finite() || secs < 0.0 {
        return None;
    }
    Some(Duration::try_from_secs_f64(secs).map_or(MAX_SERVER_WAIT, |d| d.min(MAX_SERVER_WAIT)))
}

/// A request that got no HTTP answer (connection refused or reset, time-out): retry.
pub fn classify_transport_error() -> Verdict {
    Verdict::Retry {
        wait: None,
        rate_limited: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RETRY: Verdict = Verdict::Retry {
        wait: None,
        rate_limited: false,
    };

    fn rate_limited(secs: Option<f64>) -> Verdict {
        Verdict::Retry {
            wait: secs.map(Duration::from_secs_f64),
            rate_limited: true,
        }
    }

    #[test]
    fn every_row_of_the_status_table() {
        use Action::{Close, Create};
        use DeadReason::{Rejected, Unauthorized};
        use Verdict::{DeadLetter, Delivered, NothingToClose};
        let table = [
            // 2xx: delivered, whatever the action.
            (Create, 200, Delivered),
            (Create, 202, Delivered),
            (Close, 202, Delivered),
            (Create, 204, Delivered),
            (Create, 299, Delivered),
            // 429: retry, rate limited.
            (Create, 429, rate_limited(None)),
            (Close, 429, rate_limited(None)),
            // 408, 5xx other than 501: retry.
            (Create, 408, RETRY),
            (Create, 500, RETRY),
            (Create, 502, RETRY),
            (Close, 503, RETRY),
            (Create, 504, RETRY),
            (Create, 599, RETRY),
            // 404 on a close: nothing to close; on a create, rejected.
            (Close, 404, NothingToClose),
            (Create, 404, DeadLetter(Rejected)),
            // 401, 403: unauthorized.
            (Create, 401, DeadLetter(Unauthorized)),
            (Close, 403, DeadLetter(Unauthorized)),
            // 400, 402, 422, 501, any other 4xx: rejected.
            (Create, 400, DeadLetter(Rejected)),
            (Create, 402, DeadLetter(Rejected)),
            (Create, 422, DeadLetter(Rejected)),
            (Create, 501, DeadLetter(Rejected)),
            (Close, 409, DeadLetter(Rejected)),
            (Create, 413, DeadLetter(Rejected)),
            (Create, 499, DeadLetter(Rejected)),
            // Outside 200..=599 (and 1xx, 3xx): like a 5xx.
            (Create, 0, RETRY),
            (Create, 100, RETRY),
            (Create, 199, RETRY),
            (Create, 301, RETRY),
            (Create, 304, RETRY),
            (Create, 600, RETRY),
            (Create, 999, RETRY),
        ];
        for (action, status, expected) in table {
            assert_eq!(
                classify_response(action, status, None, None),
                expected,
                "{action:?} {status}"
            );
        }
    }

    #[test]
    fn rate_limit_wait_comes_from_the_headers() {
        let table = [
            (Some("7"), None, Some(7.0)),
            (Some("1.5"), None, Some(1.5)),
            (Some(" 3 "), Some("60"), Some(3.0)),
            (Some("0"), None, Some(0.0)),
            (None, Some("60"), Some(60.0)),
            // A value that is not seconds falls through to the next source.
            (
                Some("Wed, 21 Oct 2015 07:28:00 GMT"),
                Some("12"),
                Some(12.0),
            ),
            (Some("-1"), Some("2"), Some(2.0)),
            (Some("NaN"), None, None),
            (Some("inf"), None, None),
            (Some(""), Some("soon"), None),
            // Capped at an hour.
            (Some("86400"), None, Some(3600.0)),
            (Some("1e300"), None, Some(3600.0)),
        ];
        for (retry_after, period, expected) in table {
            assert_eq!(
                classify_response(Action::Create, 429, retry_after, period),
                rate_limited(expected),
                "{retry_after:?} {period:?}"
            );
        }
    }

    #[test]
    fn headers_only_matter_on_a_429() {
        assert_eq!(
            classify_response(Action::Create, 503, Some("5"), Some("5")),
            RETRY
        );
        assert_eq!(
            classify_response(Action::Create, 200, Some("5"), None),
            Verdict::Delivered
        );
    }

    #[test]
    fn transport_errors_retry() {
        assert_eq!(classify_transport_error(), RETRY);
    }

    #[test]
    fn dead_reasons_round_trip() {
        let names: Vec<&str> = DeadReason::ALL.iter().map(|r| r.as_str()).collect();
        assert_eq!(
            names,
            [
                "invalid_job",
                "too_large",
                "unknown_team",
                "unauthorized",
                "rejected",
                "exhausted",
                "poison",
                "failed_async",
                "unconfirmed"
            ]
        );
        for reason in DeadReason::ALL {
            assert_eq!(DeadReason::parse(reason.as_str()), Some(reason));
        }
        assert_eq!(DeadReason::parse("Rejected"), None);
    }
}

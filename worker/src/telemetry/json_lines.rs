//! JSON log lines, written straight into the line: `{"timestamp", "level", the event's
//! fields (`message` among them), "target"}`, the shape of tracing-subscriber's flattened
//! JSON. Its own JSON formatter went through serde and an io-to-fmt adapter that checked
//! every piece for UTF-8; at one line per job that was a sixth of the worker's work.

use std::fmt::{self, Write};
use std::time::{SystemTime, UNIX_EPOCH};

use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

/// The event formatter of `--log-format json`.
pub struct JsonLines;

impl<S, N> FormatEvent<S, N> for JsonLines
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        _ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let mut line = String::with_capacity(512);
        line.push_str("{\"timestamp\":\"");
        timestamp(SystemTime::now(), &mut line);
        line.push_str("\",\"level\":\"");
        line.push_str(event.metadata().level().as_str());
        line.push('"');
        let mut fields = Fields {
            line: &mut line,
            target: None,
        };
        event.record(&mut fields);
        let target = fields.target.take();
        line.push_str(",\"target\":");
        string(
            &mut line,
            target.as_deref().unwrap_or(event.metadata().target()),
        );
        line.push_str("}\n");
        writer.write_str(&line)
    }
}

/// Writes each field as `,"name":value`.
struct Fields<'a> {
    line: &'a mut String,
    /// The target a `log` record carries in its fields, which replaces the event's own.
    target: Option<String>,
}

impl Fields<'_> {
    /// `false` for the fields a `log` record brings along, which say nothing new.
    fn key(&mut self, field: &Field) -> bool {
        let name = field.name();
        if name.starts_with("log.") {
            return false;
        }
        self.line.push(',');
        string(self.line, name);
        self.line.push(':');
        true
    }
}

impl Visit for Fields<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "log.target" {
            self.target = Some(value.to_string());
        } else if self.key(field) {
            string(self.line, value);
        }
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        if self.key(field) {
            self.line.push_str(itoa::Buffer::new().format(value));
        }
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        if self.key(field) {
            self.line.push_str(itoa::Buffer::new().format(value));
        }
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        if self.key(field) {
            self.line.push_str(if value { "true" } else { "false" });
        }
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        if self.key(field) {
            if value.is_finite() {
                let _ = write!(self.line, "{value}");
            } else {
                self.line.push_str("null");
            }
        }
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        if self.key(field) {
            self.line.push('"');
            let _ = write!(Escaped(self.line), "{value}");
            self.line.push('"');
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if self.key(field) {
            self.line.push('"');
            let _ = write!(Escaped(self.line), "{value:?}");
            self.line.push('"');
        }
    }
}

/// `s` as a JSON string.
fn string(line: &mut String, s: &str) {
    line.push('"');
    escape_into(line, s);
    line.push('"');
}

/// Text written through it lands JSON-escaped (without the quotes).
struct Escaped<'a>(&'a mut String);

impl Write for Escaped<'_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        escape_into(self.0, s);
        Ok(())
    }
}

fn escape_into(line: &mut String, s: &str) {
    opsgenie_shared::text::json_escaped(s, |piece| line.push_str(piece));
}

/// `t` in RFC 3339, UTC, to the microsecond: `2026-11-27T05:36:42.123456Z`.
fn timestamp(t: SystemTime, line: &mut String) {
    let since = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let (year, month, day) = civil_from_days((secs / 86_400) as i64);
    let of_day = secs % 86_400;
    let _ = write!(
        line,
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:06}Z",
        of_day / 3600,
        of_day / 60 % 60,
        of_day % 60,
        since.subsec_micros()
    );
}

/// The proleptic Gregorian date of a count of days since 1970-01-01 (Howard Hinnant's
/// `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use super::*;

    #[test]
    fn dates_and_times_are_utc_rfc_3339() {
        let at = |secs: u64, micros: u32| {
            let mut s = String::new();
            timestamp(
                UNIX_EPOCH + Duration::from_secs(secs) + Duration::from_micros(micros.into()),
                &mut s,
            );
            s
        };
        assert_eq!(at(0, 0), "1970-01-01T00:00:00.000000Z");
        assert_eq!(at(951_782_400, 7), "2000-02-29T00:00:00.000007Z");
        assert_eq!(at(1_798_345_002, 123_456), "2026-12-27T04:16:42.123456Z");
        assert_eq!(at(4_102_444_799, 999_999), "2099-12-31T23:59:59.999999Z");
    }

    #[test]
    fn strings_are_escaped_as_json_wants() {
        let mut s = String::new();
        escape_into(&mut s, "a\"b\\c\nd\te\u{1}f é 🚨");
        assert_eq!(s, "a\\\"b\\\\c\\nd\\te\\u0001f é 🚨");
        let back: String = serde_json::from_str(&format!("\"{s}\"")).unwrap();
        assert_eq!(back, "a\"b\\c\nd\te\u{1}f é 🚨");
    }

    /// Lines written by a subscriber with this formatter, parsed back.
    fn lines_of(emit: impl FnOnce()) -> Vec<serde_json::Value> {
        #[derive(Clone, Default)]
        struct Sink(Arc<Mutex<Vec<u8>>>);
        impl std::io::Write for Sink {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let sink = Sink::default();
        let out = sink.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || out.clone())
            .event_format(JsonLines)
            .finish();
        tracing::subscriber::with_default(subscriber, emit);
        let bytes = sink.0.lock().unwrap().clone();
        String::from_utf8(bytes)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).expect(l))
            .collect()
    }

    #[test]
    fn a_line_carries_every_field_with_its_type() {
        let lines = lines_of(|| {
            let error = std::io::Error::other("broken \"pipe\"");
            tracing::info!(
                notification_uuid = "u-1",
                status = Some(202u16),
                missing = None::<u16>,
                latency_ms = 3u64,
                delta = -2i64,
                ok = true,
                error = %error,
                debug = ?("a", 1),
                "Job finished."
            );
            tracing::warn!(
                failure = &error as &(dyn std::error::Error + 'static),
                "Odd {}.",
                7
            );
        });
        assert_eq!(lines.len(), 2);
        let first = &lines[0];
        assert_eq!(first["level"], "INFO");
        assert_eq!(first["message"], "Job finished.");
        assert_eq!(first["notification_uuid"], "u-1");
        assert_eq!(first["status"], 202);
        assert!(first.get("missing").is_none());
        assert_eq!(first["latency_ms"], 3);
        assert_eq!(first["delta"], -2);
        assert_eq!(first["ok"], true);
        assert_eq!(first["error"], "broken \"pipe\"");
        assert_eq!(first["debug"], "(\"a\", 1)");
        assert_eq!(
            first["target"],
            "opsgenie_worker::telemetry::json_lines::tests"
        );
        let stamp = first["timestamp"].as_str().unwrap();
        assert_eq!((stamp.len(), &stamp[10..11], &stamp[26..]), (27, "T", "Z"));
        assert_eq!(lines[1]["level"], "WARN");
        assert_eq!(lines[1]["message"], "Odd 7.");
        assert_eq!(lines[1]["failure"], "broken \"pipe\"");
    }
}

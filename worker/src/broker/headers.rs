//! The headers the worker reads and writes (docs/contract.md section 8), and the properties
//! of a job's copy, which must fit in one frame.

use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable};

pub const HEADER_ERROR: &str = "x-opsgenie-error";
pub const HEADER_ERROR_MESSAGE: &str = "x-opsgenie-error-message";
pub const HEADER_STATUS: &str = "x-opsgenie-status";
pub const HEADER_ATTEMPTS: &str = "x-opsgenie-attempts";
/// When a worker first saw the job (ms since the epoch), carried through retries for `--max-age`.
pub const HEADER_FIRST_SEEN: &str = "x-opsgenie-first-seen-ms";
/// When the job was dead-lettered (ms since the epoch), for `dead list`.
pub const HEADER_DEAD_AT: &str = "x-opsgenie-dead-at-ms";
/// Set (to the bytes they took) when a message's own headers were left off its copy because
/// the copy would not have fitted in one frame with them.
const HEADER_DROPPED: &str = "x-opsgenie-headers-dropped";

/// The most bytes a header value the worker writes holds (docs/contract.md section 8).
pub const HEADER_VALUE_LIMIT: usize = 1024;

/// A content header frame's bytes besides the properties: frame type, channel and size (7),
/// class, weight and body size (12), frame end (1).
const HEADER_FRAME_OVERHEAD: usize = 20;

/// The properties budget for a broker's `frame_max`, with room to spare.
pub(super) fn properties_budget(frame_max: usize) -> usize {
    frame_max.saturating_sub(HEADER_FRAME_OVERHEAD + 64)
}

/// The properties of a job's copy (a retry or a dead letter): the original's, less RabbitMQ's
/// `x-death`, with `ours` added, persistent. When that would not fit in `budget` bytes, the
/// original's own headers are left off (`x-opsgenie-headers-dropped` says how many bytes they
/// took); when even that would not fit (other properties at their 255-byte maximum under a
/// tiny frame size), only the content type, the message id and `ours` are kept. A copy can
/// therefore always be published: a message can never come back because its dead letter was
/// too large.
pub fn copy_properties(
    properties: &BasicProperties,
    ours: &[(&str, AMQPValue)],
    budget: usize,
) -> BasicProperties {
    let with = |mut headers: FieldTable| {
        for (name, value) in ours {
            headers.insert((*name).into(), value.clone());
        }
        headers
    };
    let full = persistent(properties, with(job_headers(properties)));
    if encoded_size(&full) <= budget {
        return full;
    }
    let dropped = properties.headers().as_ref().map_or(0, |h| {
        encoded_size(&BasicProperties::default().with_headers(h.clone()))
    });
    let mut headers = with(FieldTable::default());
    headers.insert(
        HEADER_DROPPED.into(),
        AMQPValue::LongLongInt(i64::try_from(dropped).unwrap_or(i64::MAX)),
    );
    tracing::warn!(
        header_bytes = dropped,
        budget,
        "The message's own headers do not fit in one frame with ours; its copy goes without them."
    );
    let lean = persistent(properties, headers.clone());
    if encoded_size(&lean) <= budget {
        return lean;
    }
    let mut minimal = BasicProperties::default()
        .with_delivery_mode(2)
        .with_headers(headers);
    if let Some(content_type) = properties.content_type() {
        minimal = minimal.with_content_type(content_type.clone());
    }
    if let Some(message_id) = properties.message_id() {
        minimal = minimal.with_message_id(message_id.clone());
    }
    minimal
}

/// The bytes `properties` take in a content header frame, as the AMQP library writes them.
pub fn encoded_size(properties: &BasicProperties) -> usize {
    cookie_factory::gen_simple(
        lapin::protocol::basic::gen_properties(properties),
        Vec::new(),
    )
    .map_or(usize::MAX, |bytes| bytes.len())
}

/// The message's own headers, less RabbitMQ's `x-death` bookkeeping (which only grows).
pub fn job_headers(properties: &BasicProperties) -> FieldTable {
    let mut table = FieldTable::default();
    if let Some(headers) = properties.headers() {
        for (k, v) in headers.inner() {
            if k.as_str() != "x-death" {
                table.insert(k.clone(), v.clone());
            }
        }
    }
    table
}

fn persistent(properties: &BasicProperties, headers: FieldTable) -> BasicProperties {
    properties
        .clone()
        .with_delivery_mode(2)
        .with_headers(headers)
}

/// A header as a whole number, whichever integer type the producer used.
pub fn header_u64(properties: &BasicProperties, name: &str) -> Option<u64> {
    let value = properties.headers().as_ref()?.inner().get(name)?;
    let n: i128 = match value {
        AMQPValue::ShortShortInt(v) => (*v).into(),
        AMQPValue::ShortShortUInt(v) => (*v).into(),
        AMQPValue::ShortInt(v) => (*v).into(),
        AMQPValue::ShortUInt(v) => (*v).into(),
        AMQPValue::LongInt(v) => (*v).into(),
        AMQPValue::LongUInt(v) => (*v).into(),
        AMQPValue::LongLongInt(v) => (*v).into(),
        AMQPValue::Timestamp(v) => (*v).into(),
        AMQPValue::LongString(s) => std::str::from_utf8(s.as_bytes()).ok()?.parse().ok()?,
        AMQPValue::ShortString(s) => s.as_str().parse().ok()?,
        _ => return None,
    };
    u64::try_from(n).ok()
}

/// A header as text.
pub fn header_str(properties: &BasicProperties, name: &str) -> Option<String> {
    let value = properties.headers().as_ref()?.inner().get(name)?;
    match value {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_string()),
        other => header_u64(properties, name)
            .map(|n| n.to_string())
            .or_else(|| Some(format!("{other:?}"))),
    }
}

#[cfg(test)]
mod tests {
    use lapin::types::ShortString;
    use opsgenie_shared::text::cap_bytes;

    use super::*;

    #[test]
    fn headers_of_any_integer_type_are_read() {
        let mut table = FieldTable::default();
        table.insert("a".into(), AMQPValue::LongInt(3));
        table.insert("b".into(), AMQPValue::LongString("17".into()));
        table.insert(
            "x-death".into(),
            AMQPValue::LongString("bookkeeping".into()),
        );
        let props = BasicProperties::default().with_headers(table);
        assert_eq!(header_u64(&props, "a"), Some(3));
        assert_eq!(header_u64(&props, "b"), Some(17));
        assert_eq!(header_u64(&props, "missing"), None);
        assert!(!job_headers(&props).inner().contains_key("x-death"));
    }

    fn big_headers(bytes: usize) -> FieldTable {
        let mut table = FieldTable::default();
        table.insert(
            "x-producer-trace".into(),
            AMQPValue::LongString("t".repeat(bytes).into()),
        );
        table.insert(
            "x-death".into(),
            AMQPValue::LongString("d".repeat(bytes).into()),
        );
        table
    }

    fn letter_headers(message: &str) -> Vec<(&'static str, AMQPValue)> {
        vec![
            (HEADER_ERROR, AMQPValue::LongString("invalid_job".into())),
            (
                HEADER_ERROR_MESSAGE,
                AMQPValue::LongString(cap_bytes(message, HEADER_VALUE_LIMIT).as_ref().into()),
            ),
        ]
    }

    #[test]
    fn a_copy_always_fits_the_negotiated_frame() {
        let budget = properties_budget(131_072);
        let long_id = ShortString::from("m".repeat(255));
        for (own, message) in [(0, "short"), (10_000, "x"), (130_000, "y"), (131_000, "z")] {
            let original = BasicProperties::default()
                .with_content_type("application/json".into())
                .with_message_id(long_id.clone())
                .with_headers(big_headers(own));
            let copy =
                copy_properties(&original, &letter_headers(&message.repeat(200_000)), budget);
            assert!(
                encoded_size(&copy) <= budget,
                "{own}: {}",
                encoded_size(&copy)
            );
            let headers = copy.headers().as_ref().unwrap().inner();
            assert!(!headers.contains_key("x-death"));
            let message_len = match &headers[HEADER_ERROR_MESSAGE] {
                AMQPValue::LongString(s) => s.as_bytes().len(),
                other => panic!("{other:?}"),
            };
            assert!(message_len <= HEADER_VALUE_LIMIT);
            // Kept when they fit, left off (and said so) when they do not.
            let kept = headers.contains_key("x-producer-trace");
            assert_eq!(kept, own < 100_000, "{own}");
            assert_eq!(headers.contains_key(HEADER_DROPPED), !kept);
            assert_eq!(copy.message_id().as_ref(), Some(&long_id));
            assert_eq!(copy.delivery_mode(), &Some(2));
        }
        // The smallest frame AMQP allows, and every other property at its largest.
        let budget = properties_budget(4096);
        let s = || ShortString::from("p".repeat(255));
        let crowded = BasicProperties::default()
            .with_content_type(s())
            .with_content_encoding(s())
            .with_correlation_id(s())
            .with_reply_to(s())
            .with_expiration(s())
            .with_message_id(s())
            .with_type(s())
            .with_user_id(s())
            .with_app_id(s())
            .with_cluster_id(s())
            .with_headers(big_headers(50));
        let copy = copy_properties(&crowded, &letter_headers(&"w".repeat(5000)), budget);
        assert!(encoded_size(&copy) <= budget, "{}", encoded_size(&copy));
        assert!(
            copy.headers()
                .as_ref()
                .unwrap()
                .inner()
                .contains_key(HEADER_ERROR)
        );
    }
}

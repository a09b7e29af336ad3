//! `opsgenie-worker dead list` and `dead replay`: the dead-letter queue for operators.

use lapin::message::BasicGetMessage;
use lapin::options::{BasicAckOptions, BasicGetOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection};
use opsgenie_shared::AlertJob;

use crate::broker::{
    self, HEADER_ATTEMPTS, HEADER_DEAD_AT, HEADER_ERROR, HEADER_ERROR_MESSAGE, HEADER_FIRST_SEEN,
    HEADER_STATUS, Publisher, SetupError, Topology, check_names, header_str, header_u64,
    unreachable_broker,
};
use crate::cli::BrokerArgs;
use crate::cli::Fatal;
use crate::cli::enqueue::printable;
use crate::support::init_tls;

async fn open(broker: &BrokerArgs, name: &str) -> Result<(Connection, Channel, Topology), Fatal> {
    init_tls();
    let topology = Topology::new(broker);
    check_names(broker, &topology)?;
    let connection = broker::connect(&broker.amqp_url, name)
        .await
        .map_err(|e| unreachable_broker(&broker.amqp_url, &e))?;
    let channel = connection.create_channel().await.map_err(broker_error)?;
    topology
        .declare(&channel)
        .await
        .map_err(SetupError::Declare)?;
    Ok((connection, channel, topology))
}

/// A broker's error, whose text may quote names, as one printable line.
fn broker_error(error: lapin::Error) -> Fatal {
    Fatal::Other(printable(&error.to_string()).into_owned())
}

/// The next dead letter, unacked: closing the channel returns it, acking it removes it.
/// `None` when the queue is empty.
async fn next_letter(
    channel: &Channel,
    topology: &Topology,
) -> Result<Option<BasicGetMessage>, Fatal> {
    channel
        .basic_get(
            topology.dead_queue.as_str().into(),
            BasicGetOptions { no_ack: false },
        )
        .await
        .map_err(broker_error)
}

/// One line of `dead list`: tab-separated fields, each escaped (`printable`), so that a letter
/// is always exactly one row whatever its headers and body carry.
fn describe(body: &[u8], properties: &BasicProperties, now_ms: u64) -> String {
    let reason = header_str(properties, HEADER_ERROR).unwrap_or_else(|| "-".into());
    let message = header_str(properties, HEADER_ERROR_MESSAGE).unwrap_or_default();
    let status = header_u64(properties, HEADER_STATUS).map_or("-".to_string(), |s| s.to_string());
    let attempts = header_u64(properties, HEADER_ATTEMPTS).unwrap_or(0);
    let age = header_u64(properties, HEADER_DEAD_AT).map_or("-".to_string(), |at| {
        human_age(now_ms.saturating_sub(at) / 1000)
    });
    let job = AlertJob::parse(body).ok();
    let uuid = job
        .as_ref()
        .map(|j| j.notification_uuid.clone())
        .or_else(|| {
            properties
                .message_id()
                .as_ref()
                .map(|m| m.as_str().to_string())
        })
        .unwrap_or_else(|| "-".into());
    let team = job.map_or_else(|| "-".into(), |j| j.team_id);
    let (reason, uuid, team, message) = (
        printable(&reason),
        printable(&uuid),
        printable(&team),
        printable(&message),
    );
    format!("{reason}\t{uuid}\t{team}\tstatus={status}\tattempts={attempts}\tage={age}\t{message}")
}

fn human_age(secs: u64) -> String {
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s if s < 172_800 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86_400),
    }
}

/// Prints up to `limit` dead letters; they all stay in the queue.
///
/// Fails when the broker cannot be reached.
pub async fn list(broker: BrokerArgs, limit: u32) -> Result<(), Fatal> {
    let (connection, channel, topology) = open(&broker, "opsgenie-worker dead list").await?;
    let now = crate::support::clock::now_ms();
    let mut shown = 0u32;
    let mut remaining = 0;
    println!("reason\tnotification_uuid\tteam_id\tstatus\tattempts\tage\tmessage");
    while shown < limit {
        let Some(message) = next_letter(&channel, &topology).await? else {
            break;
        };
        println!(
            "{}",
            describe(&message.delivery.data, &message.delivery.properties, now)
        );
        shown += 1;
        remaining = message.message_count;
    }
    // Closing the channel returns every message we looked at to the queue.
    let _ = channel.close(200, "listed".into()).await;
    let _ = connection.close(200, "listed".into()).await;
    eprintln!(
        "{shown} dead letter{} shown from {}{}.",
        if shown == 1 { "" } else { "s" },
        printable(&topology.dead_queue),
        if remaining > 0 {
            format!(" ({remaining} more not shown)")
        } else {
            String::new()
        }
    );
    Ok(())
}

/// Moves up to `limit` dead letters (default: as many as the queue holds now) back to the
/// work exchange, without their error headers and with a fresh attempt count. Each is acked
/// only after the broker confirmed its copy.
///
/// Fails when the broker cannot be reached or a copy is not confirmed.
pub async fn replay(broker: BrokerArgs, limit: Option<u32>) -> Result<(), Fatal> {
    let (connection, channel, topology) = open(&broker, "opsgenie-worker dead replay").await?;
    let publisher = Publisher::new(&connection).await.map_err(broker_error)?;
    let mut moved = 0u32;
    // Bounded by what is there now, so that a job that dies again at once is not replayed in
    // a loop.
    let mut budget: Option<u32> = limit;
    loop {
        if budget == Some(0) {
            break;
        }
        let Some(message) = next_letter(&channel, &topology).await? else {
            break;
        };
        let left = message.message_count;
        budget = Some(budget.map_or(left, |b| b.saturating_sub(1).min(left)));
        let delivery = message.delivery;
        let properties = replay_properties(&delivery.properties);
        match publisher
            .publish(
                &topology.exchange,
                &topology.routing_key,
                &delivery.data,
                properties,
            )
            .await
        {
            Ok(()) => {
                delivery
                    .acker
                    .ack(BasicAckOptions::default())
                    .await
                    .map_err(broker_error)?;
                moved += 1;
            }
            Err(error) => {
                broker::requeue(&delivery).await;
                let message = format!("replayed {moved}, then: {error}");
                return Err(Fatal::Other(printable(&message).into_owned()));
            }
        }
    }
    let _ = connection.close(200, "replayed".into()).await;
    let replayed = format!(
        "Replayed {moved} dead letter{} from {} to exchange \"{}\".",
        if moved == 1 { "" } else { "s" },
        topology.dead_queue,
        topology.exchange
    );
    println!("{}", printable(&replayed));
    Ok(())
}

/// A dead letter's properties as it goes back to work: its error headers and attempt count
/// dropped (so it starts afresh), persistent.
fn replay_properties(dead: &BasicProperties) -> BasicProperties {
    let mut headers = FieldTable::default();
    for (k, v) in broker::job_headers(dead).inner() {
        if ![
            HEADER_ERROR,
            HEADER_ERROR_MESSAGE,
            HEADER_STATUS,
            HEADER_ATTEMPTS,
            HEADER_DEAD_AT,
            HEADER_FIRST_SEEN,
        ]
        .contains(&k.as_str())
        {
            headers.insert(k.clone(), v.clone());
        }
    }
    dead.clone().with_headers(headers).with_delivery_mode(2)
}

#[cfg(test)]
mod tests {
    use lapin::types::{AMQPValue, ShortString};

    use super::*;

    fn job(uuid: &str, team: &str) -> Vec<u8> {
        serde_json::json!({"version":1,"kind":"metric_alert","notification_uuid":uuid,
            "team_id":team,
            "organization":{"id":1,"slug":"acme","url":"https://acme.sentry.io"},
            "alert_rule":{"id":9,"name":"p95 latency above 2s"},
            "incident":{"identifier":314,"status":"critical"}})
        .to_string()
        .into_bytes()
    }

    fn letter(reason: &str, message: &str) -> BasicProperties {
        let mut headers = FieldTable::default();
        headers.insert(HEADER_ERROR.into(), AMQPValue::LongString(reason.into()));
        headers.insert(
            HEADER_ERROR_MESSAGE.into(),
            AMQPValue::LongString(message.into()),
        );
        headers.insert(HEADER_ATTEMPTS.into(), AMQPValue::LongLongInt(1));
        headers.insert(HEADER_DEAD_AT.into(), AMQPValue::LongLongInt(1_000));
        BasicProperties::default().with_headers(headers)
    }

    /// Seven fields, six tabs, no other control character: one row per letter.
    fn assert_one_row(row: &str) {
        assert_eq!(row.matches('\t').count(), 6, "{row:?}");
        assert!(!row.chars().any(|c| c.is_control() && c != '\t'), "{row:?}");
    }

    #[test]
    fn a_row_escapes_every_field_taken_from_the_letter() {
        let team = "ops\nunknown_team\tforged\x1b[2J";
        let row = describe(
            &job("uuid-1", team),
            &letter(
                "unknown_team",
                &format!("team \"{team}\" is not in the keyring"),
            ),
            61_000,
        );
        assert_one_row(&row);
        assert_eq!(
            row,
            "unknown_team\tuuid-1\tops\\nunknown_team\\tforged\\u{1b}[2J\tstatus=-\t\
             attempts=1\tage=60s\tteam \"ops\\nunknown_team\\tforged\\u{1b}[2J\" is not in the keyring"
        );
    }

    #[test]
    fn a_letter_that_is_not_a_job_is_named_by_its_escaped_message_id() {
        let properties = letter("invalid\x1b]0;x\x07", "not JSON\r\n")
            .with_message_id(ShortString::from("id\n\u{9b}31m"));
        let row = describe(b"\x1b[31m not json", &properties, 1_000);
        assert_one_row(&row);
        assert!(
            row.starts_with("invalid\\u{1b}]0;x\\u{7}\tid\\n\\u{9b}31m\t-\t"),
            "{row}"
        );
        assert!(row.ends_with("\tnot JSON\\r\\n"), "{row}");
    }
}

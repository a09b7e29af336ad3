//! `opsgenie-worker dead list` and `dead replay`: the dead-letter queue for operators.

use lapin::options::{BasicAckOptions, BasicGetOptions, BasicNackOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection};
use opsgenie_shared::AlertJob;

use crate::amqp::{
    self, HEADER_ATTEMPTS, HEADER_DEAD_AT, HEADER_ERROR, HEADER_ERROR_MESSAGE, HEADER_FIRST_SEEN,
    HEADER_STATUS, Publisher, Topology, header_str, header_u64,
};
use crate::config::BrokerArgs;
use crate::enqueue::unreachable_broker;
use crate::{Fatal, init_tls};

async fn open(broker: &BrokerArgs, name: &str) -> Result<(Connection, Channel, Topology), Fatal> {
    init_tls();
    let topology = Topology::new(broker);
    let connection = amqp::connect(&broker.amqp_url, name)
        .await
        .map_err(|e| unreachable_broker(&broker.amqp_url, &e))?;
    let channel = connection
        .create_channel()
        .await
        .map_err(|e| Fatal::Other(e.to_string()))?;
    topology
        .declare(&channel)
        .await
        .map_err(|e| Fatal::Other(format!("cannot declare the queues: {e}")))?;
    Ok((connection, channel, topology))
}

/// One line of `dead list`.
pub fn describe(body: &[u8], properties: &BasicProperties, now_ms: u64) -> String {
    let reason = header_str(properties, HEADER_ERROR).unwrap_or_else(|| "-".into());
    let message = header_str(properties, HEADER_ERROR_MESSAGE).unwrap_or_default();
    let status = header_u64(properties, HEADER_STATUS).map_or("-".to_string(), |s| s.to_string());
    let attempts = header_u64(properties, HEADER_ATTEMPTS).unwrap_or(0);
    let age = header_u64(properties, HEADER_DEAD_AT).map_or("-".to_string(), |at| {
        human_age(now_ms.saturating_sub(at) / 1000)
    });
    let uuid = AlertJob::parse(body)
        .map(|j| j.notification_uuid)
        .ok()
        .or_else(|| {
            properties
                .message_id()
                .as_ref()
                .map(|m| m.as_str().to_string())
        })
        .unwrap_or_else(|| "-".into());
    format!("{reason}\t{uuid}\tstatus={status}\tattempts={attempts}\tage={age}\t{message}")
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
    let now = amqp::now_ms();
    let mut shown = 0u32;
    let mut remaining = 0;
    println!("reason\tnotification_uuid\tstatus\tattempts\tage\tmessage");
    while shown < limit {
        let got = channel
            .basic_get(
                topology.dead_queue.as_str().into(),
                BasicGetOptions { no_ack: false },
            )
            .await
            .map_err(|e| Fatal::Other(e.to_string()))?;
        let Some(message) = got else { break };
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
        topology.dead_queue,
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
    let publisher = Publisher::new(&connection)
        .await
        .map_err(|e| Fatal::Other(e.to_string()))?;
    let mut moved = 0u32;
    // Bounded by what is there now, so that a job that dies again at once is not replayed in
    // a loop.
    let mut budget: Option<u32> = limit;
    loop {
        if budget == Some(0) {
            break;
        }
        let got = channel
            .basic_get(
                topology.dead_queue.as_str().into(),
                BasicGetOptions { no_ack: false },
            )
            .await
            .map_err(|e| Fatal::Other(e.to_string()))?;
        let Some(message) = got else { break };
        let left = message.message_count;
        budget = Some(budget.map_or(left, |b| b.saturating_sub(1).min(left)));
        let delivery = message.delivery;
        let mut headers = FieldTable::default();
        for (k, v) in amqp::job_headers(&delivery.properties).inner() {
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
        let properties = delivery
            .properties
            .clone()
            .with_headers(headers)
            .with_delivery_mode(2);
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
                    .map_err(|e| Fatal::Other(e.to_string()))?;
                moved += 1;
            }
            Err(error) => {
                let _ = delivery
                    .acker
                    .nack(BasicNackOptions {
                        multiple: false,
                        requeue: true,
                    })
                    .await;
                return Err(Fatal::Other(format!("replayed {moved}, then: {error}")));
            }
        }
    }
    let _ = connection.close(200, "replayed".into()).await;
    println!(
        "Replayed {moved} dead letter{} from {} to exchange \"{}\".",
        if moved == 1 { "" } else { "s" },
        topology.dead_queue,
        topology.exchange
    );
    Ok(())
}

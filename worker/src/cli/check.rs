//! `opsgenie-worker check`: is the configuration good, and are the broker and Redis there?

use std::time::Duration;

use crate::broker::{self, Topology, check_names};
use crate::cli::Fatal;
use crate::cli::enqueue::printable;
use crate::cli::{CheckArgs, redact_error, redact_url};
use crate::keyring::Keyring;
use crate::store::{Store, StoreSettings};
use crate::support::init_tls;

/// Prints each check as it passes. Every line, and the message of a failure, goes through
/// `printable`: team ids, file names and a server's error text are not the program's own.
///
/// Fails (exit 2) with the first problem: a keyring error with its file, line and field, a
/// name the broker cannot take, or the address that could not be reached. No message shows a
/// password: URLs are redacted, and so are the clients' errors, which may quote the URL they
/// were given.
pub async fn check(args: CheckArgs) -> Result<(), Fatal> {
    init_tls();
    let keyring = Keyring::load(&args.keyring).map_err(|e| problem(format!("keyring: {e}")))?;
    ok(format!(
        "keyring {} ({} team{}: {})",
        args.keyring.display(),
        keyring.len(),
        if keyring.len() == 1 { "" } else { "s" },
        keyring.team_ids().join(", ")
    ));
    // Where each team's alerts go: the region and base URL, never the key.
    for id in keyring.team_ids() {
        if let Some(team) = keyring.team(id) {
            ok(format!("team {id}: {}", team.destination()));
        }
    }
    if let Some(heartbeat) = &keyring.heartbeat {
        ok(format!(
            "heartbeat \"{}\" every {}: {}",
            heartbeat.name,
            humantime_like(heartbeat.interval),
            heartbeat.team.destination()
        ));
    }
    let topology = Topology::new(&args.broker);
    check_names(&args.broker, &topology)?;
    let amqp_url = redact_url(&args.broker.amqp_url);
    let amqp_error =
        |e: &dyn std::fmt::Display| redact_error(&e.to_string(), &args.broker.amqp_url);
    let connection = tokio::time::timeout(
        Duration::from_secs(10),
        broker::connect(&args.broker.amqp_url, "opsgenie-worker check"),
    )
    .await
    .map_err(|_| problem(format!("RabbitMQ at {amqp_url}: no answer within 10 s")))?
    .map_err(|e| problem(format!("RabbitMQ at {amqp_url}: {}", amqp_error(&e))))?;
    let channel = connection
        .create_channel()
        .await
        .map_err(|e| problem(format!("RabbitMQ at {amqp_url}: {}", amqp_error(&e))))?;
    topology.declare(&channel).await.map_err(|e| {
        problem(format!(
            "RabbitMQ at {amqp_url}: cannot declare: {}",
            amqp_error(&e)
        ))
    })?;
    let _ = connection.close(200, "checked".into()).await;
    ok(format!(
        "RabbitMQ at {amqp_url} (exchange {}, queue {})",
        topology.exchange, topology.queue
    ));
    let redis_url = redact_url(&args.redis.redis_url);
    let redis_error =
        |e: &dyn std::fmt::Display| redact_error(&e.to_string(), &args.redis.redis_url);
    let store = Store::new(
        &args.redis.redis_url,
        StoreSettings {
            prefix: args.redis.redis_prefix.clone(),
            stream_maxlen: 1,
            dedupe_ttl: Duration::from_secs(1),
            lease_ttl: Duration::from_secs(1),
        },
    )
    .map_err(|e| problem(format!("Redis at {redis_url}: {}", redis_error(&e))))?;
    tokio::time::timeout(Duration::from_secs(10), async {
        store.connect().await?;
        store.ping().await
    })
    .await
    .map_err(|_| problem(format!("Redis at {redis_url}: no answer within 10 s")))?
    .map_err(|e| problem(format!("Redis at {redis_url}: {}", redis_error(&e))))?;
    store.quit().await;
    ok(format!("Redis at {redis_url}"));
    Ok(())
}

/// `90s`, `1500ms`: short and exact.
fn humantime_like(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{}ms", d.as_millis())
    }
}

fn ok(line: String) {
    println!("ok: {}", printable(&line));
}

fn problem(message: String) -> Fatal {
    Fatal::Config(printable(&message).into_owned())
}

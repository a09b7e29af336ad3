//! `opsgenie-worker check`: is the configuration good, and are the broker and Redis there?

use std::path::Path;
use std::time::Duration;

use crate::broker::{self, Topology, check_names};
use crate::cli::Fatal;
use crate::cli::enqueue::printable;
use crate::cli::{BrokerArgs, CheckArgs, RedisArgs};
use crate::keyring::Keyring;
use crate::store::{Store, StoreSettings};
use crate::support::init_tls;

/// How long the broker and Redis each get to answer.
const ANSWER_WITHIN: Duration = Duration::from_secs(10);
use crate::support::redact::{redact_error, redact_url};

/// Prints each check as it passes. Every line, and the message of a failure, goes through
/// `printable`: team ids, file names and a server's error text are not the program's own.
///
/// Fails (exit 2) with the first problem: a keyring error with its file, line and field, a
/// name the broker cannot take, or the address that could not be reached. No message shows a
/// password: URLs are redacted, and so are the clients' errors, which may quote the URL they
/// were given.
pub async fn check(args: CheckArgs) -> Result<(), Fatal> {
    init_tls();
    check_keyring(&args.keyring)?;
    check_broker(&args.broker).await?;
    check_redis(&args.redis).await
}

/// Loads the keyring and prints its teams, where each team's alerts go (the region and base
/// URL, never the key), and the heartbeat.
fn check_keyring(path: &Path) -> Result<(), Fatal> {
    let keyring = Keyring::load(path).map_err(|e| problem("keyring", e))?;
    ok(format!(
        "keyring {} ({} team{}: {})",
        path.display(),
        keyring.len(),
        if keyring.len() == 1 { "" } else { "s" },
        keyring.team_ids().join(", ")
    ));
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
    Ok(())
}

/// Connects to RabbitMQ and declares the topology.
async fn check_broker(args: &BrokerArgs) -> Result<(), Fatal> {
    let topology = Topology::new(args);
    check_names(args, &topology)?;
    let step = format!("RabbitMQ at {}", redact_url(&args.amqp_url));
    let failed =
        |e: &dyn std::fmt::Display| problem(&step, redact_error(&e.to_string(), &args.amqp_url));
    let connection = tokio::time::timeout(
        ANSWER_WITHIN,
        broker::connect(&args.amqp_url, "opsgenie-worker check"),
    )
    .await
    .map_err(|_| problem(&step, "no answer within 10 s"))?
    .map_err(|e| failed(&e))?;
    let channel = connection.create_channel().await.map_err(|e| failed(&e))?;
    topology.declare(&channel).await.map_err(|e| {
        problem(
            &step,
            format!(
                "cannot declare: {}",
                redact_error(&e.to_string(), &args.amqp_url)
            ),
        )
    })?;
    let _ = connection.close(200, "checked".into()).await;
    ok(format!(
        "{step} (exchange {}, queue {})",
        topology.exchange, topology.queue
    ));
    Ok(())
}

/// Connects to Redis and pings it.
async fn check_redis(args: &RedisArgs) -> Result<(), Fatal> {
    let step = format!("Redis at {}", redact_url(&args.redis_url));
    let failed =
        |e: &dyn std::fmt::Display| problem(&step, redact_error(&e.to_string(), &args.redis_url));
    let store = Store::new(
        &args.redis_url,
        StoreSettings {
            prefix: args.redis_prefix.clone(),
            stream_maxlen: 1,
            dedupe_ttl: Duration::from_secs(1),
            lease_ttl: Duration::from_secs(1),
        },
    )
    .map_err(|e| failed(&e))?;
    tokio::time::timeout(ANSWER_WITHIN, async {
        store.connect().await?;
        store.ping().await
    })
    .await
    .map_err(|_| problem(&step, "no answer within 10 s"))?
    .map_err(|e| failed(&e))?;
    store.quit().await;
    ok(step);
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

/// The failure of `step`, printable: a server's error text is not the program's own.
fn problem(step: &str, why: impl std::fmt::Display) -> Fatal {
    Fatal::Check {
        step: printable(step).into_owned(),
        why: printable(&why.to_string()).into_owned(),
    }
}

use std::io::IsTerminal as _;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use opsgenie_standin::{StandIn, StandInConfig};
use tokio::signal::unix::{SignalKind, signal};
use tracing::{info, warn};
use tracing_subscriber::EnvFilter;

/// A local stand-in for the Opsgenie Alert API.
///
/// Answers `POST /v2/alerts` and `POST /v2/alerts/{alias}/close?identifierType=alias` like
/// Opsgenie (202 with a requestId, 401 on a wrong key, 422 over a field limit) and records what it
/// received; answers `GET /v2/alerts/requests/{id}` (404 RequestNotProcessed until the processing
/// delay has passed, then the outcome) and counts heartbeat pings (`/v2/heartbeats/{name}/ping`).
/// Inspect and script it under /_standin/: GET|DELETE requests, GET stats, GET alerts,
/// GET heartbeats, POST|DELETE faults (a JSON array of {"status", "headers", "count", "delay_ms",
/// "hang_up"}; a hang-up reads the request and closes the connection without answering),
/// POST|DELETE async-failures (a JSON array of {"contains", "status", "count"}: accepted requests
/// whose body contains the text fail after their 202 with that status text).
#[derive(Debug, Parser)]
#[command(version, about, long_about)]
struct Flags {
    /// Address to listen on; inside a container use 0.0.0.0:18080.
    #[arg(long, env = "STANDIN_LISTEN", default_value = "127.0.0.1:18080")]
    listen: String,

    /// API key to accept as `Authorization: GenieKey <KEY>`; repeat for more. Without any, every
    /// non-empty key is accepted.
    #[arg(
        long = "key",
        value_name = "KEY",
        env = "STANDIN_KEYS",
        value_delimiter = ',',
        hide_env_values = true
    )]
    keys: Vec<String>,

    /// Delay every Opsgenie API answer by this many milliseconds.
    #[arg(long, value_name = "N", env = "STANDIN_DELAY_MS", default_value_t = 0)]
    delay_ms: u64,

    /// How long after its 202 a request counts as not processed: until then, asking for its
    /// status (`GET /v2/alerts/requests/{id}`) answers 404 RequestNotProcessed.
    #[arg(
        long,
        value_name = "N",
        env = "STANDIN_PROCESSING_DELAY_MS",
        default_value_t = 0
    )]
    processing_delay_ms: u64,

    /// Keep only counts, statuses and alias state, not the requests, so a long benchmark does not
    /// grow memory.
    #[arg(long, env = "STANDIN_NO_RECORD_BODIES")]
    no_record_bodies: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let flags = Flags::parse();
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        // Colour codes would litter `docker compose logs` and redirected files.
        .with_ansi(std::io::stdout().is_terminal())
        .init();

    let keys = flags
        .keys
        .into_iter()
        .filter(|k| !k.is_empty())
        .collect::<Vec<_>>();
    let key_count = keys.len();
    let record_bodies = !flags.no_record_bodies;
    let standin = StandIn::start(StandInConfig {
        addr: flags.listen,
        keys,
        record_bodies,
        delay: Some(Duration::from_millis(flags.delay_ms)),
        processing_delay: Duration::from_millis(flags.processing_delay_ms),
        ..StandInConfig::default()
    })
    .await?;
    info!(
        addr = %standin.addr(),
        key_count,
        delay_ms = flags.delay_ms,
        record_bodies,
        "Opsgenie stand-in listening."
    );

    let mut terminate = signal(SignalKind::terminate()).context("cannot watch SIGTERM")?;
    tokio::select! {
        interrupted = tokio::signal::ctrl_c() => interrupted.context("cannot watch SIGINT")?,
        _ = terminate.recv() => {}
    }
    info!("Stopping.");
    // A scripted fault delay could hold a connection open for long; do not outwait it.
    match tokio::time::timeout(Duration::from_secs(5), standin.shutdown()).await {
        Ok(result) => result,
        Err(_) => {
            warn!("In-flight requests did not finish within 5 s; exiting anyway.");
            Ok(())
        }
    }
}

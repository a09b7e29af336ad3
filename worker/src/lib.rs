//! opsgenie-worker: the I/O shell around `opsgenie_shared`.
//!
//! A job's way through the worker: `job::consumer` takes it from RabbitMQ (`broker`), and
//! `job::pipeline` admits it in Redis (`store`), sends it to Opsgenie (`opsgenie`) and records
//! the delivery; `job::acks` settles it with the broker. `confirm` later asks Opsgenie whether
//! each accepted request became an alert. `keyring` holds the teams' keys, `heartbeat` pings
//! Opsgenie for the fleet, `telemetry` writes logs and serves metrics and health (its metric
//! names all in `telemetry::catalogue`). `app` wires the `run` command together; `cli` parses
//! the command line, holds the one-shot commands (`enqueue`, `dead`, `check`) and `Fatal`, the
//! error that sets the exit code. `support` holds the small pieces several of them share:
//! clock, pacing, shutdown, URL redaction, the open-file limit and TLS set-up.

pub mod app;
pub mod broker;
pub mod cli;
pub mod confirm;
pub mod heartbeat;
pub mod job;
pub mod keyring;
pub mod opsgenie;
pub mod store;
pub mod support;
pub mod telemetry;

pub use app::run;
pub use cli::Fatal;

//! opsgenie-worker: the I/O shell around `opsgenie_shared`.
//!
//! A job's way through the worker: `job::consumer` takes it from RabbitMQ (`broker`), and
//! `job::pipeline` admits it in Redis (`store`), sends it to Opsgenie (`opsgenie`) and records
//! the delivery; `job::acks` settles it with the broker. `confirm` later asks Opsgenie whether
//! each accepted request became an alert. `keyring` holds the teams' keys, `heartbeat` pings
//! Opsgenie for the fleet, `telemetry` serves logs, metrics and health. `app` wires the `run`
//! command together; `cli` parses the command line and holds the one-shot commands (`enqueue`,
//! `dead`, `check`). `support` holds the small pieces several of them share.

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

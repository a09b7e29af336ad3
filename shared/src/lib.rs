//! The contract of opsgenie-worker, with no I/O: what producers may send (`job`), what the
//! worker sends Opsgenie (`request`), how an answer decides a job's fate (`outcome`), when a
//! failed job is tried again (`retry`) and what a delivery leaves in Redis (`record`).
//! Everything here is a pure function of its arguments: no clock, no socket, no runtime.

pub mod job;
pub mod outcome;
pub mod record;
pub mod request;
pub mod retry;
pub mod text;

pub use job::{Alert, AlertJob, JobError, JobKind};
pub use outcome::{DeadReason, Verdict};
pub use request::{Action, OpsgenieRequest, build_request};

//! A job's way through the worker: the consumer loop, the pipeline that admits, sends and
//! records one job, and the acks that settle it with the broker.

mod acks;
pub(crate) mod consumer;
pub mod pipeline;

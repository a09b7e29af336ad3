//! The RabbitMQ boundary (docs/contract.md section 8): the topology, consuming, and the confirmed
//! publishes that make a retry or a dead letter durable before the original is acked.
//!
//! `topology` names and declares the exchange and queues (and checks every name fits),
//! `connect` reaches a node, `publish` makes a copy durable, `headers` reads and writes the
//! `x-opsgenie-*` headers and sizes a copy's properties, `queue_length` samples the backlog.

mod connect;
mod headers;
mod publish;
mod queue_length;
mod topology;

pub use connect::{ConnectError, connect, connect_from, node_urls};
pub use headers::{
    HEADER_ATTEMPTS, HEADER_DEAD_AT, HEADER_ERROR, HEADER_ERROR_MESSAGE, HEADER_FIRST_SEEN,
    HEADER_STATUS, HEADER_VALUE_LIMIT, copy_properties, encoded_size, header_str, header_u64,
    job_headers,
};
pub use publish::{DeadLetter, PublishError, Publisher, job_message_id, job_properties, requeue};
pub use queue_length::sample_queue_length;
pub use topology::{DeclareError, SetupError, Topology, check_names, unreachable_broker};

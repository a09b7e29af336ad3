//! The hostile-input suite: what an attacker, or an unlucky producer, can send the worker (a
//! message, a header, a keyring or key file, a URL, a connection to the metrics port) and what
//! it must not cost: the replica, the jobs queued behind, bounded memory and logs, a secret.
//! Each finding of the issue "No message can stop the fleet" is a test here, against the real
//! RabbitMQ and Redis and a real worker process.

mod endpoint;
mod messages;
mod producers;
mod secrets;

//! The names of docs/contract.md section 8 (exchange, work queue, delay queues, dead-letter
//! queue) and their declaration, with the check that every name fits the protocol.

use std::time::Duration;

use lapin::Channel;
use lapin::ExchangeKind;
use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use opsgenie_shared::retry::format_duration;

use opsgenie_shared::text::printable;

use crate::broker::ConnectError;
use crate::cli::{BrokerArgs, QueueType};
use crate::support::redact::{redact_error, redact_url};

/// The names of docs/contract.md section 8, derived once from the flags.
#[derive(Debug, Clone)]
pub struct Topology {
    pub exchange: String,
    pub routing_key: String,
    pub queue: String,
    pub queue_type: QueueType,
    /// `(name, delay)` per retry tier, shortest first.
    pub retry_queues: Vec<(String, Duration)>,
    pub dead_queue: String,
}

impl Topology {
    pub fn new(args: &BrokerArgs) -> Topology {
        let retry_queues = args
            .retry_delays
            .0
            .iter()
            .map(|d| (format!("{}.retry.{}", args.queue, format_duration(*d)), *d))
            .collect();
        Topology {
            exchange: args.exchange.clone(),
            routing_key: args.routing_key.clone(),
            queue: args.queue.clone(),
            queue_type: args.queue_type,
            retry_queues,
            dead_queue: format!("{}.dead", args.queue),
        }
    }

    /// Every queue this topology declares: work, delay and dead-letter queues.
    pub fn queue_names(&self) -> Vec<&str> {
        let mut names = vec![self.queue.as_str(), self.dead_queue.as_str()];
        names.extend(self.retry_queues.iter().map(|(name, _)| name.as_str()));
        names
    }

    fn queue_arguments(&self) -> FieldTable {
        let mut args = FieldTable::default();
        if self.queue_type == QueueType::Quorum {
            args.insert(
                "x-queue-type".into(),
                AMQPValue::LongString("quorum".into()),
            );
        }
        args
    }

    /// Declares the exchange, the work queue and its binding, the delay queues and the
    /// dead-letter queue. Idempotent; fails with `DeclareError::Conflict` when the broker has
    /// one of them with other properties or arguments (for example another queue type, or
    /// another deployment's dead-letter exchange).
    pub async fn declare(&self, channel: &Channel) -> Result<(), DeclareError> {
        self.declare_exchange(channel).await?;
        self.declare_queues(channel).await
    }

    /// Declares the exchange only: what a producer that names nothing else touches.
    pub async fn declare_exchange(&self, channel: &Channel) -> Result<(), DeclareError> {
        channel
            .exchange_declare(
                self.exchange.as_str().into(),
                ExchangeKind::Direct,
                ExchangeDeclareOptions {
                    durable: true,
                    ..ExchangeDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(|e| DeclareError::from_broker(e, "exchange", &self.exchange))
    }

    /// Declares the work queue and its binding, the delay queues and the dead-letter queue,
    /// with exactly the arguments the worker gives them. The exchange must exist.
    async fn declare_queues(&self, channel: &Channel) -> Result<(), DeclareError> {
        let durable = QueueDeclareOptions {
            durable: true,
            ..QueueDeclareOptions::default()
        };
        channel
            .queue_declare(self.queue.as_str().into(), durable, self.queue_arguments())
            .await
            .map_err(|e| DeclareError::from_broker(e, "queue", &self.queue))?;
        // One queue per delay, each with a single TTL: messages expire in the order they came,
        // so a short delay never waits behind a long one. Expired messages go back to the
        // exchange with the work queue's routing key.
        for (name, delay) in &self.retry_queues {
            channel
                .queue_declare(name.as_str().into(), durable, self.retry_arguments(*delay))
                .await
                .map_err(|e| DeclareError::from_broker(e, "queue", name))?;
        }
        channel
            .queue_declare(
                self.dead_queue.as_str().into(),
                durable,
                self.queue_arguments(),
            )
            .await
            .map_err(|e| DeclareError::from_broker(e, "queue", &self.dead_queue))?;
        // Bound last: a queue of another deployment that conflicts with ours is never bound
        // to this exchange.
        channel
            .queue_bind(
                self.queue.as_str().into(),
                self.exchange.as_str().into(),
                self.routing_key.as_str().into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
        Ok(())
    }

    /// The arguments of the delay queue for `delay`.
    fn retry_arguments(&self, delay: Duration) -> FieldTable {
        let mut args = self.queue_arguments();
        args.insert(
            "x-message-ttl".into(),
            AMQPValue::LongLongInt(i64::try_from(delay.as_millis()).unwrap_or(i64::MAX)),
        );
        args.insert(
            "x-dead-letter-exchange".into(),
            AMQPValue::LongString(self.exchange.as_str().into()),
        );
        args.insert(
            "x-dead-letter-routing-key".into(),
            AMQPValue::LongString(self.routing_key.as_str().into()),
        );
        if self.queue_type == QueueType::Quorum {
            // Quorum queues drop dead-lettered messages unless told to keep them safe.
            args.insert(
                "x-dead-letter-strategy".into(),
                AMQPValue::LongString("at-least-once".into()),
            );
            args.insert(
                "x-overflow".into(),
                AMQPValue::LongString("reject-publish".into()),
            );
        }
        args
    }
}

/// Why the topology could not be declared.
#[derive(Debug, thiserror::Error)]
pub enum DeclareError {
    /// The broker already has the exchange or queue `name` with another value of `argument`
    /// (PRECONDITION_FAILED): a configuration problem for the operator, not a passing fault.
    #[error(
        "the {what} \"{name}\" already exists on the broker with another {argument}{detail}; \
         this command declares it with the worker's arguments. If another deployment uses \
         these names, give this one its own (--queue NAME, --exchange NAME); otherwise \
         delete the {what} or use the settings it was made with"
    )]
    Conflict {
        what: &'static str,
        name: String,
        /// `argument 'x-dead-letter-exchange'`, `argument 'durable'`, or `declaration` when the
        /// broker did not say.
        argument: String,
        /// ` (the broker: ...)`, or empty.
        detail: String,
    },
    #[error("{0}")]
    Broker(#[from] lapin::Error),
}

impl DeclareError {
    /// `error`, from declaring the `what` named `name`, as a conflict when it is one.
    fn from_broker(error: lapin::Error, what: &'static str, name: &str) -> DeclareError {
        let lapin::ErrorKind::ProtocolError(amqp) = error.kind() else {
            return DeclareError::Broker(error);
        };
        if *amqp.kind() != AMQPErrorKind::Soft(AMQPSoftError::PRECONDITIONFAILED) {
            return DeclareError::Broker(error);
        }
        let text = amqp.get_message().as_str();
        let argument = text
            .split_once("inequivalent arg '")
            .and_then(|(_, rest)| rest.split_once('\''))
            .map_or_else(
                || "declaration".to_string(),
                |(arg, _)| format!("argument '{arg}'"),
            );
        // "...in vhost '/': received the value 'a' of type 'longstr' but current is none"
        let detail = text
            .split_once("': ")
            .map_or_else(String::new, |(_, why)| format!(" (the broker: {why})"));
        DeclareError::Conflict {
            what,
            name: name.to_string(),
            argument,
            detail,
        }
    }

    fn is_conflict(&self) -> bool {
        matches!(self, DeclareError::Conflict { .. })
    }
}

/// Why a command could not set up the broker it was given. `cli::Fatal` turns each into its
/// exit code: `is_config` is the operator's to fix (exit 2).
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// A name the flags give is over the 255 bytes of an AMQP short string.
    #[error("{what} is {len} bytes long; AMQP allows at most 255: {}", printable(.name))]
    NameTooLong {
        what: &'static str,
        len: usize,
        name: String,
    },
    /// No node of `--amqp-url` answered. Both parts are redacted: lapin quotes a URL it
    /// cannot parse in its error.
    #[error("{}", one_line(format_args!("cannot reach RabbitMQ at {url}: {error}")))]
    Unreachable { url: String, error: String },
    #[error("{}", one_line(format_args!("cannot declare: {}", .0)))]
    Declare(#[from] DeclareError),
}

impl SetupError {
    /// Whether the configuration is at fault: a name too long, or a declaration that
    /// conflicts with what the broker has.
    pub fn is_config(&self) -> bool {
        match self {
            SetupError::NameTooLong { .. } => true,
            SetupError::Unreachable { .. } => false,
            SetupError::Declare(error) => error.is_conflict(),
        }
    }
}

/// A message as one printable line: a broker's text may quote names from the flags.
fn one_line(message: std::fmt::Arguments) -> String {
    printable(&message.to_string()).into_owned()
}

/// Fails when a name the flags give could not be sent to the broker: an exchange, routing
/// key or queue name, or the virtual host of an AMQP URL, over the 255 bytes of an AMQP short
/// string. Checked before any of them is used, because the AMQP client panics on such a name.
pub fn check_names(broker: &BrokerArgs, topology: &Topology) -> Result<(), SetupError> {
    let vhosts = broker
        .amqp_url
        .split(',')
        .filter_map(|url| url.trim().parse::<lapin::uri::AMQPUri>().ok())
        .map(|uri| ("the virtual host of --amqp-url", uri.vhost));
    let names = [
        ("--exchange", topology.exchange.clone()),
        ("--routing-key", topology.routing_key.clone()),
    ]
    .into_iter()
    .chain(
        topology
            .queue_names()
            .into_iter()
            .map(|q| ("the queue name", q.to_string())),
    )
    .chain(vhosts);
    for (what, name) in names {
        if ShortString::try_new(name.as_str()).is_err() {
            return Err(SetupError::NameTooLong {
                what,
                len: name.len(),
                name,
            });
        }
    }
    Ok(())
}

/// No node of `url` answered.
pub fn unreachable_broker(url: &str, error: &ConnectError) -> SetupError {
    SetupError::Unreachable {
        url: redact_url(url),
        error: redact_error(&error.to_string(), url),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::Delays;

    #[test]
    fn names_follow_the_queue_flag() {
        let args = BrokerArgs {
            amqp_url: "amqps://user:pw@broker.internal:5671/prod".into(),
            exchange: "opsgenie".into(),
            queue: "team-a.alerts".into(),
            routing_key: "alert".into(),
            queue_type: QueueType::Quorum,
            retry_delays: Delays(vec![
                Duration::from_secs(5),
                Duration::from_secs(120),
                Duration::from_secs(1800),
            ]),
        };
        let t = Topology::new(&args);
        assert_eq!(t.dead_queue, "team-a.alerts.dead");
        let names: Vec<&str> = t.retry_queues.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "team-a.alerts.retry.5s",
                "team-a.alerts.retry.2m",
                "team-a.alerts.retry.30m"
            ]
        );
        assert!(
            args.amqp_url.parse::<lapin::uri::AMQPUri>().is_ok(),
            "amqps URLs parse"
        );
    }

    fn precondition_failed(message: &str) -> lapin::Error {
        lapin::ErrorKind::ProtocolError(lapin::protocol::AMQPError::new(
            AMQPErrorKind::Soft(AMQPSoftError::PRECONDITIONFAILED),
            message.into(),
        ))
        .into()
    }

    #[test]
    fn a_conflicting_declaration_names_the_queue_and_the_argument() {
        let error = DeclareError::from_broker(
            precondition_failed(
                "PRECONDITION_FAILED - inequivalent arg 'x-dead-letter-exchange' for queue \
                 'opsgenie.alerts.retry.5s' in vhost '/': received the value 'team-b' of type \
                 'longstr' but current is the value 'opsgenie' of type 'longstr'",
            ),
            "queue",
            "opsgenie.alerts.retry.5s",
        );
        assert!(error.is_conflict());
        let text = error.to_string();
        for part in [
            "the queue \"opsgenie.alerts.retry.5s\" already exists",
            "another argument 'x-dead-letter-exchange'",
            "received the value 'team-b'",
            "--queue NAME",
        ] {
            assert!(text.contains(part), "{part}: {text}");
        }
        // The broker's wording is not relied on beyond the argument.
        let error = DeclareError::from_broker(
            precondition_failed("PRECONDITION_FAILED - something else"),
            "exchange",
            "opsgenie",
        );
        assert!(
            error.to_string().starts_with(
                "the exchange \"opsgenie\" already exists on the broker with another declaration;"
            ),
            "{error}"
        );
        // Any other broker error is not a conflict.
        let other: lapin::Error = lapin::ErrorKind::ProtocolError(lapin::protocol::AMQPError::new(
            AMQPErrorKind::Soft(AMQPSoftError::ACCESSREFUSED),
            "ACCESS_REFUSED - no".into(),
        ))
        .into();
        assert!(!DeclareError::from_broker(other, "queue", "q").is_conflict());
    }
}

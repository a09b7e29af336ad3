//! Connecting to the broker: one node of `--amqp-url`, or the first of several that answers.

use std::time::Duration;

use lapin::types::LongString;
use lapin::{Connection, ConnectionProperties};

use crate::support::redact::{redact_error, redact_url};

/// The most a connection attempt to one node may take before the next is tried.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(20);

/// The node URLs of `--amqp-url`: one, or several separated by commas (a cluster).
pub fn node_urls(urls: &str) -> Vec<&str> {
    let nodes: Vec<&str> = urls
        .split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .collect();
    if nodes.is_empty() { vec![urls] } else { nodes }
}

/// Why no node of `--amqp-url` could be reached: each node tried, redacted, with its error.
#[derive(Debug, Clone)]
pub struct ConnectError {
    /// `(redacted URL, redacted error)` per node, in the order tried.
    pub failures: Vec<(String, String)>,
}

impl std::fmt::Display for ConnectError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.failures.as_slice() {
            [(_, error)] => f.write_str(error),
            failures => {
                write!(f, "no node answered: ")?;
                for (i, (url, error)) in failures.iter().enumerate() {
                    if i > 0 {
                        f.write_str("; ")?;
                    }
                    write!(f, "{url}: {error}")?;
                }
                Ok(())
            }
        }
    }
}

impl std::error::Error for ConnectError {}

/// Opens a connection to the first node of `urls` that answers, trying them in order.
pub async fn connect(urls: &str, name: &str) -> Result<Connection, ConnectError> {
    connect_from(urls, 0, name)
        .await
        .map(|(connection, _)| connection)
}

/// Opens a connection to the first node of `urls` that answers, trying them in turn from
/// node `first` (wrapping around); returns it with the index of its node. No error text
/// holds a password: lapin quotes a URL it cannot parse, so every error is redacted.
pub async fn connect_from(
    urls: &str,
    first: usize,
    name: &str,
) -> Result<(Connection, usize), ConnectError> {
    let nodes = node_urls(urls);
    let mut failures = Vec::with_capacity(nodes.len());
    for step in 0..nodes.len() {
        let index = (first + step) % nodes.len();
        let url = nodes[index];
        let error = match tokio::time::timeout(CONNECT_TIMEOUT, connect_one(url, name)).await {
            Ok(Ok(connection)) => return Ok((connection, index)),
            Ok(Err(error)) => redact_error(&error.to_string(), url),
            Err(_) => format!("no answer within {} s", CONNECT_TIMEOUT.as_secs()),
        };
        failures.push((redact_url(url), error));
    }
    Err(ConnectError { failures })
}

/// Opens a connection to one node; its heartbeat and name come from here so that every
/// command agrees.
async fn connect_one(url: &str, name: &str) -> lapin::Result<Connection> {
    let props =
        ConnectionProperties::default().with_connection_name(LongString::from(name.to_string()));
    Connection::connect(url, props).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn several_node_urls_are_tried_in_turn_and_reported_each_redacted() {
        assert_eq!(
            node_urls("amqp://a:p@n1:5672/%2f, amqp://a:p@n2:5672/%2f,"),
            ["amqp://a:p@n1:5672/%2f", "amqp://a:p@n2:5672/%2f"]
        );
        assert_eq!(node_urls("amqp://n1"), ["amqp://n1"]);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        // Ports nobody listens on: every node refuses, each is named in the error.
        let closed: Vec<u16> = (0..2)
            .map(|_| {
                std::net::TcpListener::bind("127.0.0.1:0")
                    .unwrap()
                    .local_addr()
                    .unwrap()
                    .port()
            })
            .collect();
        let urls = format!(
            "amqp://u:Secret1@127.0.0.1:{}/%2f,amqp://u:Secret2@127.0.0.1:{}/%2f",
            closed[0], closed[1]
        );
        let error = runtime
            .block_on(connect_from(&urls, 1, "test"))
            .map(|_| ())
            .expect_err("nothing listens");
        assert_eq!(error.failures.len(), 2);
        // Tried from node 1, then node 0.
        assert!(error.failures[0].0.contains(&closed[1].to_string()));
        assert!(error.failures[1].0.contains(&closed[0].to_string()));
        let text = error.to_string();
        assert!(text.starts_with("no node answered: "), "{text}");
        assert!(!text.contains("Secret"), "{text}");
    }
}

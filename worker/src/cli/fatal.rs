//! Why a command stopped, and the exit code it leaves.

use crate::opsgenie::SenderError;
use crate::{broker, keyring};

/// Why a command stopped; decides the exit code (docs/contract.md section 9): 2 for something the
/// operator must fix in the configuration, 1 for anything else.
#[derive(Debug, thiserror::Error)]
pub enum Fatal {
    /// Exit 2: the keyring cannot be loaded.
    #[error(transparent)]
    Keyring(#[from] keyring::KeyringError),
    /// Exit 2: the metrics address cannot be bound.
    #[error("--metrics-addr {addr}: {source}")]
    MetricsAddr {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    /// Exit 2: the Redis client cannot parse `--redis-url`. Both fields are redacted: the
    /// client's error quotes the URL, password and all.
    #[error("--redis-url {url}: {error}")]
    RedisUrl { url: String, error: String },
    /// Exit 2: the HTTP client cannot be built (no usable CA store, no crypto provider).
    #[error(transparent)]
    HttpClient(#[from] SenderError),
    /// Exit 2: a step of `check` failed: the step (`keyring`, `RabbitMQ at URL`, `Redis at
    /// URL`) and why, both printable and redacted.
    #[error("{step}: {why}")]
    Check { step: String, why: String },
    /// Exit 2: any other configuration problem, as text.
    #[error("{0}")]
    Config(String),
    /// Exit 1.
    #[error("{0}")]
    Other(String),
}

impl Fatal {
    pub fn exit_code(&self) -> u8 {
        match self {
            Fatal::Keyring(_)
            | Fatal::MetricsAddr { .. }
            | Fatal::RedisUrl { .. }
            | Fatal::HttpClient(_)
            | Fatal::Check { .. }
            | Fatal::Config(_) => 2,
            Fatal::Other(_) => 1,
        }
    }
}

impl From<broker::SetupError> for Fatal {
    fn from(error: broker::SetupError) -> Fatal {
        if error.is_config() {
            Fatal::Config(error.to_string())
        } else {
            Fatal::Other(error.to_string())
        }
    }
}

//! Why a command stopped, and the exit code it leaves.

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
    /// Exit 2: any other configuration problem, as text. A Redis URL the client cannot parse
    /// is one: the client's error quotes the URL, password and all, so only its redacted text
    /// may travel.
    #[error("{0}")]
    Config(String),
    /// Exit 1.
    #[error("{0}")]
    Other(String),
}

impl Fatal {
    pub fn exit_code(&self) -> u8 {
        match self {
            Fatal::Keyring(_) | Fatal::MetricsAddr { .. } | Fatal::Config(_) => 2,
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

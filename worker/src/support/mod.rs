//! Small pieces that several parts of the worker share.

pub mod clock;
pub mod open_files;
pub mod pacing;
pub mod redact;
pub mod shutdown;

/// Installs the TLS provider every client here uses; harmless when called twice.
pub fn init_tls() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

//! A private certificate authority made at test time, so that TLS tests need no certificate
//! files in the repository and no trust store on the machine.

use anyhow::Context as _;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

use crate::StandInTls;

/// A fresh CA and a server certificate it signed for `localhost` and `127.0.0.1`.
#[derive(Debug, Clone)]
pub struct LocalPki {
    /// The CA certificate (PEM): what a client must trust, a team's `ca_file`.
    pub ca_pem: String,
    /// The server's certificate chain and key, for [`crate::StandInConfig::tls`].
    pub server: StandInTls,
}

impl LocalPki {
    /// Makes a new CA key and certificate and a server key and certificate (ECDSA P-256).
    ///
    /// Fails only when rcgen cannot generate a key or sign, which would be a bug.
    pub fn generate() -> anyhow::Result<LocalPki> {
        let ca_key = KeyPair::generate().context("cannot generate the CA key")?;
        let mut ca_params = CertificateParams::new(Vec::<String>::new())
            .context("cannot make the CA parameters")?;
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "opsgenie-standin test CA");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_cert = ca_params
            .self_signed(&ca_key)
            .context("cannot self-sign the CA")?;
        let issuer = Issuer::new(ca_params, ca_key);

        let server_key = KeyPair::generate().context("cannot generate the server key")?;
        let mut server_params =
            CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
                .context("cannot make the server parameters")?;
        server_params
            .distinguished_name
            .push(DnType::CommonName, "localhost");
        server_params.is_ca = IsCa::ExplicitNoCa;
        server_params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        server_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let server_cert = server_params
            .signed_by(&server_key, &issuer)
            .context("cannot sign the server certificate")?;

        Ok(LocalPki {
            ca_pem: ca_cert.pem(),
            server: StandInTls {
                cert_chain_pem: server_cert.pem(),
                key_pem: server_key.serialize_pem(),
            },
        })
    }
}

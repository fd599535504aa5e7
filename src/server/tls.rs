//! TLS for Capstan's listeners (the API with its webhooks and dashboard, and each Docker
//! API proxy): one place that reads the certificate and key files and builds the
//! server configuration, so every listener speaks TLS the same way (ring provider, TLS
//! 1.2 and 1.3, HTTP/1.1) and names the wrong file the same way.

use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Why a listener's TLS files cannot be used: which file, and how it is wrong.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct TlsError(pub String);

/// A listener's TLS: its certificate chain and key, and the CA whose client certificates
/// it demands, if any (PEM files, read when the listener starts).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: Option<PathBuf>,
}

/// How a listener's banner describes its TLS: ` (TLS)`, with client certificates or not.
pub fn tls_note(tls: Option<&TlsFiles>) -> &'static str {
    match tls {
        Some(TlsFiles {
            client_ca: Some(_), ..
        }) => " (TLS, client certificates required)",
        Some(_) => " (TLS)",
        None => "",
    }
}

impl TlsFiles {
    /// Reads the files and builds the server configuration (ring provider, TLS 1.2 and
    /// 1.3), saying which file is wrong and how.
    pub fn acceptor(&self) -> Result<tokio_rustls::TlsAcceptor, TlsError> {
        use crate::docker::tls::{PemProblem, pem_certs, pem_roots};
        use rustls::pki_types::PrivateKeyDer;
        use rustls_pki_types::pem::PemObject;
        let tls = TlsError;
        let read = |path: &Path, what: &str| {
            std::fs::read(path)
                .map_err(|e| tls(format!("cannot read the {what} {}: {e}", path.display())))
        };
        let problem = |path: &Path, what: &str, p: PemProblem| {
            tls(match p {
                PemProblem::Unreadable(e) => format!("{} is not a PEM {what}: {e}", path.display()),
                PemProblem::Empty => format!(
                    "{} holds no certificate (expected a PEM {what})",
                    path.display()
                ),
                PemProblem::NotCa(e) => format!(
                    "{} holds a certificate that cannot be a CA: {e}",
                    path.display()
                ),
            })
        };
        let chain = pem_certs(&read(&self.cert, "certificate")?)
            .map_err(|p| problem(&self.cert, "certificate", p))?;
        let key_pem = read(&self.key, "private key")?;
        let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| {
            tls(format!(
                "{} is not a PEM private key: {e}",
                self.key.display()
            ))
        })?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| tls(e.to_string()))?;
        let builder = match &self.client_ca {
            Some(ca_file) => {
                let roots = pem_roots(&read(ca_file, "CA certificate")?)
                    .map_err(|p| problem(ca_file, "CA certificate", p))?;
                let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                    Arc::new(roots),
                    provider,
                )
                .build()
                .map_err(|e| tls(format!("client CA {}: {e}", ca_file.display())))?;
                builder.with_client_cert_verifier(verifier)
            }
            None => builder.with_no_client_auth(),
        };
        let mut config = builder.with_single_cert(chain, key).map_err(|e| {
            tls(format!(
                "the key {} does not go with the certificate {}: {e}",
                self.key.display(),
                self.cert.display()
            ))
        })?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
    }
}

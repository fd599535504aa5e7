//! A remote daemon over TCP with TLS client certificates (`dockerd --tlsverify`).
//!
//! The CA, the client certificate and its key come from the vault and go straight into
//! an in-memory rustls configuration (ring provider): they are never written to disk.
//! The daemon's certificate is verified against that CA only (not the system roots), for
//! the device's `tls_server_name`, or else its host.

use std::sync::Arc;

use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls_pki_types::pem::PemObject;

use super::{ConnectError, ConnectOptions, Io, Steps, connect_tcp, host_port, resolve, within};
use crate::device::{Device, DeviceSecrets, IpFamily, SecretField};

pub(crate) struct TlsTransport {
    device: String,
    host: String,
    port: u16,
    family: IpFamily,
    server_name: ServerName<'static>,
    connector: tokio_rustls::TlsConnector,
    connect_timeout: std::time::Duration,
}

impl TlsTransport {
    pub(crate) fn new(
        device: &Device,
        secrets: &DeviceSecrets,
        opts: &ConnectOptions,
    ) -> Result<Self, ConnectError> {
        let name = device.name.clone();
        let invalid = |detail: String| ConnectError::Invalid {
            device: name.clone(),
            detail,
        };
        let host = device
            .host
            .clone()
            .ok_or_else(|| invalid("a tls device needs a host".into()))?;
        let server_name_text = device.tls_server_name.clone().unwrap_or_else(|| {
            host.trim_start_matches('[')
                .trim_end_matches(']')
                .to_string()
        });
        let server_name = ServerName::try_from(server_name_text.clone()).map_err(|_| {
            invalid(format!(
                "{server_name_text:?} is not a valid TLS server name; set --tls-server-name"
            ))
        })?;
        let config = client_config(&device.name, secrets)?;
        Ok(TlsTransport {
            device: device.name.clone(),
            port: device.port_or_default(),
            host,
            family: device.ip_family,
            server_name,
            connector: tokio_rustls::TlsConnector::from(Arc::new(config)),
            connect_timeout: opts.connect_timeout,
        })
    }

    pub(crate) fn addr_label(&self) -> String {
        host_port(&self.host, self.port)
    }

    pub(crate) async fn connect(&self, steps: &Steps) -> Result<Io, ConnectError> {
        let device = self.device.as_str();
        let fut = async {
            let addrs = steps
                .run(
                    "resolve",
                    resolve(device, &self.host, self.port, self.family),
                )
                .await?;
            let tcp = steps
                .run(
                    "tcp-connect",
                    connect_tcp(device, &addrs, "Docker daemon (TLS)"),
                )
                .await?;
            steps
                .run("tls-handshake", async {
                    self.connector
                        .connect(self.server_name.clone(), tcp)
                        .await
                        .map_err(|e| {
                            classify_stream_error(device, &self.addr_label(), &e).unwrap_or_else(
                                || ConnectError::Tls {
                                    device: device.to_string(),
                                    addr: self.addr_label(),
                                    detail: e.to_string(),
                                },
                            )
                        })
                })
                .await
        };
        let s = within(device, self.connect_timeout, steps, fut).await?;
        Ok(Box::new(s))
    }
}

/// Builds the rustls client configuration from the device's PEM secrets.
fn client_config(
    device: &str,
    secrets: &DeviceSecrets,
) -> Result<rustls::ClientConfig, ConnectError> {
    let invalid = |detail: String| ConnectError::Invalid {
        device: device.to_string(),
        detail,
    };
    let get = |f: SecretField, flag: &str| {
        secrets
            .get(f)
            .ok_or_else(|| invalid(format!("no {flag} stored for this tls device")))
    };
    let ca = get(SecretField::TlsCa, "--tls-ca")?;
    let cert = get(SecretField::TlsCert, "--tls-cert")?;
    let key = get(SecretField::TlsKey, "--tls-key")?;

    let roots = pem_roots(ca.expose()).map_err(|p| {
        invalid(match p {
            PemProblem::Unreadable(e) => format!("the --tls-ca PEM is unreadable: {e}"),
            PemProblem::Empty => "the --tls-ca PEM holds no certificate".into(),
            PemProblem::NotCa(e) => format!("the --tls-ca certificate is unusable: {e}"),
        })
    })?;
    let chain = pem_certs(cert.expose()).map_err(|p| {
        invalid(match p {
            PemProblem::Empty => "the --tls-cert PEM holds no certificate".into(),
            PemProblem::Unreadable(e) | PemProblem::NotCa(e) => {
                format!("the --tls-cert PEM is unreadable: {e}")
            }
        })
    })?;
    let key = PrivateKeyDer::from_pem_slice(key.expose()).map_err(|e| {
        invalid(format!(
            "the --tls-key PEM holds no usable private key: {e}"
        ))
    })?;

    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| invalid(format!("TLS set-up failed: {e}")))?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .map_err(|e| {
            invalid(format!(
                "the client certificate and key do not go together or are unsupported: {e}"
            ))
        })?;
    // Connections are pooled, so a full handshake per connection costs little; and TLS
    // terminators built on OpenSSL that verify client certificates without a session id
    // context (socat, for one) abort a resumed handshake with an internal_error alert.
    config.resumption = rustls::client::Resumption::disabled();
    Ok(config)
}

/// What is wrong with PEM certificates; the caller names their source (a flag, a file).
pub(crate) enum PemProblem {
    Unreadable(String),
    Empty,
    NotCa(String),
}

/// The certificates in a PEM text, at least one.
pub(crate) fn pem_certs(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, PemProblem> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| PemProblem::Unreadable(e.to_string()))?;
    if certs.is_empty() {
        return Err(PemProblem::Empty);
    }
    Ok(certs)
}

/// A root store of the CA certificates in a PEM text, at least one.
pub(crate) fn pem_roots(pem: &[u8]) -> Result<rustls::RootCertStore, PemProblem> {
    let mut roots = rustls::RootCertStore::empty();
    for c in pem_certs(pem)? {
        roots.add(c).map_err(|e| PemProblem::NotCa(e.to_string()))?;
    }
    Ok(roots)
}

/// Finds a TLS failure in an I/O error (handshake, or the first read when the daemon
/// refuses the client certificate after a TLS 1.3 handshake) and says what it means.
pub(crate) fn classify_stream_error(
    device: &str,
    addr: &str,
    e: &std::io::Error,
) -> Option<ConnectError> {
    let tls = e.get_ref()?.downcast_ref::<rustls::Error>()?;
    Some(ConnectError::Tls {
        device: device.to_string(),
        addr: addr.to_string(),
        detail: describe(tls),
    })
}

fn describe(e: &rustls::Error) -> String {
    use rustls::{AlertDescription as A, CertificateError as C, Error as E};
    match e {
        E::InvalidCertificate(C::UnknownIssuer | C::BadSignature) => {
            "the daemon's certificate is not signed by the CA stored for this device; check --tls-ca".into()
        }
        E::InvalidCertificate(C::NotValidForName | C::NotValidForNameContext { .. }) => {
            "the daemon's certificate does not name this host; set --tls-server-name to a name the certificate holds".into()
        }
        E::InvalidCertificate(C::Expired | C::ExpiredContext { .. }) => {
            "the daemon's certificate has expired".into()
        }
        E::InvalidCertificate(C::NotValidYet | C::NotValidYetContext { .. }) => {
            "the daemon's certificate is not valid yet (check the clocks)".into()
        }
        E::AlertReceived(A::CertificateRequired) => {
            "the daemon requires a client certificate and did not accept the one sent".into()
        }
        E::AlertReceived(
            a @ (A::UnknownCA
            | A::BadCertificate
            | A::CertificateUnknown
            | A::UnsupportedCertificate
            | A::CertificateRevoked
            | A::CertificateExpired
            | A::AccessDenied
            | A::DecryptError),
        ) => format!(
            "the daemon rejected the client certificate ({a:?}): it is not signed by a CA the daemon trusts, or has expired; check --tls-cert and --tls-key"
        ),
        E::AlertReceived(a) => format!("the daemon ended the TLS handshake ({a:?})"),
        other => format!("{other}"),
    }
}

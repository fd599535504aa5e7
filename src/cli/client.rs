//! Talking to the engine's API: the commands that work on the data directory speak it,
//! to the running engine over HTTP when `capstan serve` holds the data directory, or to
//! the engine opened in this process when none runs: the same router, driven in memory
//! (`tower::ServiceExt::oneshot`). One client, two transports; each command is written
//! once against it.
//!
//! The engine writes its API address and a token for this host's CLI to
//! `DATA_DIR/cli.token` (see [`crate::app::cli_token`]); `CAPSTAN_API_TOKEN` overrides
//! the token. An engine serving TLS writes its certificate's SHA-256 there too, and the
//! CLI accepts that certificate and no other (it connects over loopback, where no name
//! in the certificate would match, and needs no CA for it). In process, requests are made as the CLI itself
//! ([`crate::api::in_process_router`]), with no token and no socket.

use std::sync::Arc;

use anyhow::{Context, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;

use crate::app::cli_token::{Endpoint, Pin};
use crate::config::Settings;
use crate::engine::{Engine, PassphraseInput};
use crate::scheduler::Scheduler;
use crate::store::StoreError;

fn is_locked(e: &anyhow::Error) -> bool {
    matches!(e.downcast_ref::<StoreError>(), Some(StoreError::Locked(_)))
}

/// A client for the engine's API.
pub struct ApiClient {
    transport: Transport,
}

enum Transport {
    /// The running engine's listener, with the CLI token (over TLS when it serves TLS).
    Http(Endpoint),
    /// The engine opened here: its API router, called in memory.
    InProcess {
        router: axum::Router,
        scheduler: Arc<Scheduler>,
    },
}

impl ApiClient {
    /// The running engine's API when one holds the data directory, else the engine
    /// opened here. Must be called within a tokio runtime.
    pub fn connect(settings: Settings, pass: &PassphraseInput) -> anyhow::Result<ApiClient> {
        Self::open(settings, pass, false)
    }

    /// [`ApiClient::connect`] for the commands that need the plugins (running one,
    /// listing the hooks): opened here, the installed plugins are loaded first. Must be
    /// called within a tokio runtime.
    pub fn connect_with_plugins(
        settings: Settings,
        pass: &PassphraseInput,
    ) -> anyhow::Result<ApiClient> {
        Self::open(settings, pass, true)
    }

    fn open(
        settings: Settings,
        pass: &PassphraseInput,
        load_plugins: bool,
    ) -> anyhow::Result<ApiClient> {
        match Engine::open(settings.clone(), pass) {
            Ok(engine) => ApiClient::in_process(engine, load_plugins),
            Err(e) if is_locked(&e) => ApiClient::for_running_engine(&settings),
            Err(e) => Err(e),
        }
    }

    /// The API of `engine`, opened in this process (see [`crate::app::open_in_process`]):
    /// with `load_plugins`, the installed plugins are loaded and can run; nothing that
    /// fires on its own is started. Must be called within a tokio runtime.
    pub fn in_process(engine: Engine, load_plugins: bool) -> anyhow::Result<ApiClient> {
        let scheduler = crate::app::open_in_process(engine, load_plugins)?;
        let router = crate::api::in_process_router(crate::api::AppState::new(scheduler.clone()));
        Ok(ApiClient {
            transport: Transport::InProcess { router, scheduler },
        })
    }

    /// Whether this is the engine opened here (no engine runs on the data directory).
    pub fn is_in_process(&self) -> bool {
        matches!(self.transport, Transport::InProcess { .. })
    }

    /// The engine running on this data directory: its listen address (a wildcard
    /// address is reached over loopback) and the CLI token it wrote.
    pub fn for_running_engine(settings: &Settings) -> anyhow::Result<ApiClient> {
        let endpoint =
            crate::app::cli_token::read(&settings.data_dir, settings.api_token.as_deref())?;
        Ok(ApiClient {
            transport: Transport::Http(endpoint),
        })
    }

    async fn send(
        &self,
        method: &str,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> anyhow::Result<hyper::Response<axum::body::Body>> {
        let mut req = Request::builder().method(method).uri(path);
        if body.is_some() {
            req = req.header("content-type", "application/json");
        }
        let body = Bytes::from(body.unwrap_or_default());
        match &self.transport {
            Transport::InProcess { router, .. } => {
                use tower::ServiceExt;
                let req = req
                    .body(axum::body::Body::from(body))
                    .context("building the request")?;
                let resp = router.clone().oneshot(req).await;
                Ok(resp.unwrap_or_else(|never| match never {}))
            }
            Transport::Http(Endpoint { addr, token, tls }) => {
                let stream = tokio::net::TcpStream::connect(addr)
                    .await
                    .with_context(|| format!("cannot reach the engine's API on {addr}"))?;
                let _ = stream.set_nodelay(true);
                let stream: Box<dyn Io> = match tls {
                    None => Box::new(stream),
                    Some(pin) => Box::new(
                        pinned_connector(*pin)
                            .connect(
                                rustls::pki_types::ServerName::IpAddress(addr.ip().into()),
                                stream,
                            )
                            .await
                            .with_context(|| {
                                format!("TLS handshake with the engine's API on {addr} failed")
                            })?,
                    ),
                };
                let (mut sender, conn) =
                    hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                        .await
                        .context("HTTP handshake with the engine failed")?;
                tokio::spawn(async move {
                    let _ = conn.await;
                });
                let token = token.expose_str().context("the API token is not text")?;
                let req = req
                    .header("host", addr.to_string())
                    .header("authorization", format!("Bearer {}", token.trim()))
                    .body(Full::new(body))
                    .context("building the request")?;
                let resp = sender
                    .send_request(req)
                    .await
                    .with_context(|| format!("{method} {path} on the engine failed"))?;
                Ok(resp.map(axum::body::Body::new))
            }
        }
    }

    /// Sends a request and returns the JSON answer; an error answer becomes an error
    /// carrying the engine's message.
    pub async fn json(
        &self,
        method: &str,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> anyhow::Result<serde_json::Value> {
        let (status, value) = self.call(method, path, body).await?;
        if !status.is_success() {
            return Err(Self::error_of(status, &value));
        }
        Ok(value)
    }

    /// Sends a request and returns the status and the JSON answer, whatever the status.
    pub async fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> anyhow::Result<(hyper::StatusCode, serde_json::Value)> {
        let body = body.map(|b| serde_json::to_vec(&b)).transpose()?;
        let resp = self.send(method, path, body).await?;
        let status = resp.status();
        let bytes = resp.into_body().collect().await?.to_bytes();
        let value: serde_json::Value = if bytes.is_empty() {
            serde_json::Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap_or_else(|_| {
                serde_json::Value::String(String::from_utf8_lossy(&bytes).into_owned())
            })
        };
        Ok((status, value))
    }

    /// The error an error answer stands for: the engine's message.
    pub fn error_of(status: hyper::StatusCode, value: &serde_json::Value) -> anyhow::Error {
        let message = value["error"]["message"]
            .as_str()
            .map(str::to_string)
            .unwrap_or_else(|| value.to_string());
        if status == hyper::StatusCode::UNAUTHORIZED {
            return anyhow::anyhow!("the engine refused the CLI token ({status}): {message}");
        }
        anyhow::anyhow!("{message} ({status})")
    }

    /// Reads a newline-delimited JSON stream, calling `each` per value until the stream
    /// ends or `each` returns false.
    pub async fn stream(
        &self,
        path: &str,
        mut each: impl FnMut(serde_json::Value) -> anyhow::Result<bool>,
    ) -> anyhow::Result<()> {
        let resp = self.send("GET", path, None).await?;
        if !resp.status().is_success() {
            let status = resp.status();
            let bytes = resp.into_body().collect().await?.to_bytes();
            bail!("{} ({status})", String::from_utf8_lossy(&bytes));
        }
        let mut body = resp.into_body();
        let mut buf: Vec<u8> = Vec::new();
        while let Some(frame) = body.frame().await {
            let frame = frame.context("the engine's stream broke off")?;
            let Some(data) = frame.data_ref() else {
                continue;
            };
            buf.extend_from_slice(data);
            while let Some(nl) = buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = buf.drain(..=nl).collect();
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                let value = serde_json::from_slice(&line)
                    .context("the engine sent a line that is not JSON")?;
                if !each(value)? {
                    return Ok(());
                }
            }
        }
        Ok(())
    }
}

/// A connection to the engine: plain TCP or TLS.
trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Io for T {}

/// A TLS connector that accepts the certificate `pin` names and no other.
fn pinned_connector(pin: Pin) -> tokio_rustls::TlsConnector {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .expect("the ring provider supports the default TLS versions")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(PinnedCert { pin, provider }))
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

/// Accepts the engine's own certificate (by its SHA-256, from the CLI token file);
/// signatures are checked as usual.
#[derive(Debug)]
struct PinnedCert {
    pin: Pin,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl rustls::client::danger::ServerCertVerifier for PinnedCert {
    fn verify_server_cert(
        &self,
        end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        if self.pin.matches(end_entity.as_ref()) {
            Ok(rustls::client::danger::ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(
                "the engine presented a certificate other than the one its CLI token file names"
                    .into(),
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

impl Drop for ApiClient {
    /// What the commands changed in the engine opened here is on disk when they end.
    fn drop(&mut self) {
        if let Transport::InProcess { scheduler, .. } = &self.transport
            && let Err(e) = scheduler.engine().store.flush()
        {
            tracing::error!(error = %e, "cannot flush the store");
        }
    }
}

//! Talking to a running engine: the commands that work on the data directory fall back
//! to the engine's HTTP API when `capstan serve` holds it.
//!
//! The engine writes its API address and a token for this host's CLI to
//! `DATA_DIR/cli.token` (mode 0600, replaced at every start, removed at a clean stop);
//! `CAPSTAN_API_TOKEN` overrides the token.

use std::net::SocketAddr;

use anyhow::{Context, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper::body::Incoming;

use crate::config::Settings;
use crate::engine::{Engine, PassphraseInput};
use crate::secret::Secret;
use crate::store::StoreError;

/// Where a command's work happens.
pub enum Target {
    /// The data directory, opened here.
    Local(Box<Engine>),
    /// The running engine that holds it.
    Remote(ApiClient),
}

impl Target {
    /// Opens the data directory, or, when a running engine holds it, its API.
    pub fn open(settings: Settings, pass: &PassphraseInput) -> anyhow::Result<Target> {
        match Engine::open(settings.clone(), pass) {
            Ok(e) => Ok(Target::Local(Box::new(e))),
            Err(e) if matches!(e.downcast_ref::<StoreError>(), Some(StoreError::Locked(_))) => {
                Ok(Target::Remote(ApiClient::for_running_engine(&settings)?))
            }
            Err(e) => Err(e),
        }
    }
}

/// A minimal HTTP/1.1 client for the engine's API.
pub struct ApiClient {
    addr: SocketAddr,
    token: Secret,
}

impl ApiClient {
    /// The engine running on this data directory: its listen address (a wildcard
    /// address is reached over loopback) and the CLI token it wrote.
    pub fn for_running_engine(settings: &Settings) -> anyhow::Result<ApiClient> {
        let path = settings.data_dir.join(super::serve::CLI_TOKEN_FILE);
        let file = Secret::from_file(&path).with_context(|| {
            format!(
                "the data directory is held by a running engine, but its CLI token file {} cannot be read (run as the engine's user, or wait until it listens)",
                path.display()
            )
        })?;
        let text = file
            .expose_str()
            .context("the CLI token file is not text")?;
        let mut lines = text.lines();
        let addr_line = lines.next().unwrap_or_default();
        let mut addr: SocketAddr = addr_line
            .trim()
            .parse()
            .with_context(|| format!("{} does not start with the API's address", path.display()))?;
        if addr.ip().is_unspecified() {
            addr.set_ip(match addr {
                SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
                SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
            });
        }
        let token = match std::env::var("CAPSTAN_API_TOKEN") {
            Ok(t) => Secret::from_str_owned(t),
            Err(_) => Secret::from_str_owned(lines.next().unwrap_or_default().trim().to_string()),
        };
        Ok(ApiClient { addr, token })
    }

    async fn send(
        &self,
        method: &str,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> anyhow::Result<hyper::Response<Incoming>> {
        let stream = tokio::net::TcpStream::connect(self.addr)
            .await
            .with_context(|| format!("cannot reach the engine's API on {}", self.addr))?;
        let _ = stream.set_nodelay(true);
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .context("HTTP handshake with the engine failed")?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let token = self
            .token
            .expose_str()
            .context("the API token is not text")?;
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header("host", self.addr.to_string())
            .header("authorization", format!("Bearer {}", token.trim()));
        if body.is_some() {
            req = req.header("content-type", "application/json");
        }
        let req = req
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .context("building the request")?;
        sender
            .send_request(req)
            .await
            .with_context(|| format!("{method} {path} on the engine failed"))
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

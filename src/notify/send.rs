//! One delivery attempt: an HTTPS (or, when the channel says so, plain HTTP) `POST` of
//! the service's payload, or a mail over SMTP with lettre. Each attempt is bounded by a
//! timeout; the answer says whether trying again can help.
//!
//! Nothing here names more of the channel than its [`Channel::display`]: the errors go
//! into logs and the audit, and the URL's path and headers hold the service's token.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;

use super::Message;
use super::channel::{Channel, Endpoint, HttpEndpoint, SmtpEndpoint, SmtpTls};
use crate::plugin::host::http::tls_config;

/// Why an attempt failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// Worth another attempt: unreachable, timed out, 5xx, 429.
    Retry(String),
    /// Not: the service refused the request (4xx), or the channel cannot work.
    Permanent(String),
}

impl Failure {
    pub fn message(&self) -> &str {
        match self {
            Failure::Retry(m) | Failure::Permanent(m) => m,
        }
    }
}

/// One attempt to deliver `m` on `channel`, within `timeout`.
pub async fn deliver(channel: &Channel, m: &Message, timeout: Duration) -> Result<(), Failure> {
    let at = channel.display();
    let attempt = async {
        match &channel.endpoint {
            Endpoint::Http(ep) => post(ep, channel, m, at).await,
            Endpoint::Smtp(ep) => mail(ep, m, at, timeout).await,
        }
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(r) => r,
        Err(_) => Err(Failure::Retry(format!(
            "{at} did not answer within {}",
            crate::trigger::units::format_duration(timeout)
        ))),
    }
}

async fn post(ep: &HttpEndpoint, channel: &Channel, m: &Message, at: &str) -> Result<(), Failure> {
    let tcp = tokio::net::TcpStream::connect((ep.host.as_str(), ep.port))
        .await
        .map_err(|e| Failure::Retry(format!("cannot connect to {at}: {e}")))?;
    let _ = tcp.set_nodelay(true);
    if ep.tls {
        let name = rustls::pki_types::ServerName::try_from(ep.host.clone())
            .map_err(|_| Failure::Permanent(format!("{at}: the host is not a TLS server name")))?;
        let tls = tokio_rustls::TlsConnector::from(tls_config())
            .connect(name, tcp)
            .await
            .map_err(|e| Failure::Retry(format!("TLS with {at} failed: {e}")))?;
        exchange(hyper_util::rt::TokioIo::new(tls), ep, channel, m, at).await
    } else {
        exchange(hyper_util::rt::TokioIo::new(tcp), ep, channel, m, at).await
    }
}

async fn exchange<I>(
    io: I,
    ep: &HttpEndpoint,
    channel: &Channel,
    m: &Message,
    at: &str,
) -> Result<(), Failure>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| Failure::Retry(format!("HTTP with {at} failed: {e}")))?;
    let conn = tokio::spawn(async move {
        let _ = conn.await;
    });
    let payload = channel.payload(m);
    let default_port = if ep.tls { 443 } else { 80 };
    let host = match (ep.host.contains(':'), ep.port == default_port) {
        (false, true) => ep.host.clone(),
        (false, false) => format!("{}:{}", ep.host, ep.port),
        (true, true) => format!("[{}]", ep.host),
        (true, false) => format!("[{}]:{}", ep.host, ep.port),
    };
    let mut req = hyper::Request::post(ep.path.as_str())
        .header("host", host)
        .header("user-agent", concat!("capstan/", env!("CARGO_PKG_VERSION")))
        .header("content-type", payload.content_type);
    for (k, v) in &payload.headers {
        req = req.header(*k, v.as_str());
    }
    if let Some((k, v)) = &ep.auth {
        let mut value = http::HeaderValue::from_str(v.as_str()).map_err(|_| {
            Failure::Permanent(format!("{at}: the credential cannot be sent as a header"))
        })?;
        value.set_sensitive(true);
        req = req.header(*k, value);
    }
    // The builder's errors name no value (the path holds a token for some services).
    let req = req
        .body(Full::new(Bytes::from(payload.body)))
        .map_err(|_| {
            Failure::Permanent(format!(
                "{at}: the request cannot be built from this channel URL"
            ))
        })?;
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| Failure::Retry(format!("{at} did not answer: {e}")))?;
    // The status is the answer: the body is not waited for (a slow one would make a
    // delivered notification look timed out, and be sent again).
    let status = resp.status();
    drop(resp);
    drop(sender);
    conn.abort();
    if status.is_success() {
        Ok(())
    } else if status.is_server_error()
        || status == http::StatusCode::TOO_MANY_REQUESTS
        || status == http::StatusCode::REQUEST_TIMEOUT
    {
        Err(Failure::Retry(format!("{at} answered {status}")))
    } else {
        Err(Failure::Permanent(format!("{at} answered {status}")))
    }
}

async fn mail(ep: &SmtpEndpoint, m: &Message, at: &str, timeout: Duration) -> Result<(), Failure> {
    use lettre::message::header::ContentType;
    use lettre::transport::smtp::authentication::Credentials;
    use lettre::{AsyncSmtpTransport, AsyncTransport, Tokio1Executor};

    let bad =
        |what: &str, e: &dyn std::fmt::Display| Failure::Permanent(format!("{at}: {what}: {e}"));
    let mut email = lettre::Message::builder()
        .from(ep.from.parse().map_err(|e| bad("the sender", &e))?)
        .subject(m.subject());
    for to in &ep.to {
        email = email.to(to.parse().map_err(|e| bad("a recipient", &e))?);
    }
    let email = email
        .header(ContentType::TEXT_PLAIN)
        .body(m.mail_body())
        .map_err(|e| bad("the mail cannot be built", &e))?;
    let builder = match ep.tls {
        SmtpTls::None => AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(&ep.host),
        SmtpTls::StartTls => AsyncSmtpTransport::<Tokio1Executor>::starttls_relay(&ep.host)
            .map_err(|e| bad("STARTTLS set-up failed", &e))?,
        SmtpTls::Tls => AsyncSmtpTransport::<Tokio1Executor>::relay(&ep.host)
            .map_err(|e| bad("TLS set-up failed", &e))?,
    };
    let mut builder = builder.port(ep.port).timeout(Some(timeout));
    if let Some((user, password)) = &ep.credentials {
        builder = builder.credentials(Credentials::new(user.to_string(), password.to_string()));
    }
    match builder.build().send(email).await {
        Ok(_) => Ok(()),
        Err(e) if e.is_permanent() => {
            Err(Failure::Permanent(format!("{at} refused the mail: {e}")))
        }
        Err(e) => Err(Failure::Retry(format!("mail to {at} failed: {e}"))),
    }
}

//! Channel URLs, in the style of shoutrrr and Apprise: one URL says which service a
//! notification goes to, where, and with which token. Parsed and checked when the
//! operator adds the channel (`capstan notifier add`), so a typo fails there, not when
//! the first alert is due; parsed again from the vault for every delivery.
//!
//! | URL | service | sends |
//! |---|---|---|
//! | `ntfy://[user:password@ \| :token@]host[:port]/topic` | ntfy | `POST /topic`, the message as body, `Title`, `Priority` (1–5), `Tags` headers |
//! | `slack://T000/B000/XXXX` or the webhook URL `https://hooks.slack.com/services/…` | Slack incoming webhook | `{"text"}` |
//! | `discord://TOKEN@WEBHOOK_ID` or `https://discord.com/api/webhooks/ID/TOKEN` | Discord webhook | `{"content"}` |
//! | `gotify://host[:port][/path]/APP_TOKEN` | Gotify | `POST /message`, `{"title","message","priority"}`, `X-Gotify-Key` |
//! | `teams+https://HOST/…` or a Workflows / connector webhook's `https://` URL | Microsoft Teams | an Adaptive Card (Workflows: `*.logic.azure.com`, `*.powerplatform.com`), else a MessageCard |
//! | `generic+https://host[:port]/path[?query]` | any JSON webhook | the whole notification as JSON |
//! | `smtp://[user:password@]host[:port]/?to=a@x,b@y&from=capstan@x[&tls=starttls\|none]`, `smtps://…` | email | a plain-text mail |
//!
//! HTTPS is the default everywhere. `SERVICE+https://host[:port]/path` gives a service's
//! full endpoint URL (a self-hosted ntfy or Gotify under a path, a Slack-compatible
//! server); `SERVICE+http://…` sends over plain HTTP — meant for a receiver on loopback
//! or a trusted network, since the token then crosses the wire in clear. Email uses
//! STARTTLS on port 587 by default (`smtp://`), TLS from the first byte on 465
//! (`smtps://`), or no TLS with `?tls=none` (port 25; for a relay on loopback).
//!
//! A channel URL is a secret: errors here never repeat it, and what the engine shows of a
//! channel is only its [`Channel::display`] (scheme, host and port).

use std::fmt;

use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use super::{Message, Priority};

/// The longest channel URL accepted, bytes.
pub const MAX_URL: usize = 4096;

/// The services a channel can reach.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Service {
    Ntfy,
    Slack,
    Discord,
    Gotify,
    Teams,
    Generic,
    Smtp,
}

impl Service {
    pub fn as_str(self) -> &'static str {
        match self {
            Service::Ntfy => "ntfy",
            Service::Slack => "slack",
            Service::Discord => "discord",
            Service::Gotify => "gotify",
            Service::Teams => "teams",
            Service::Generic => "generic",
            Service::Smtp => "smtp",
        }
    }

    fn from_name(name: &str) -> Option<Service> {
        Some(match name {
            "ntfy" => Service::Ntfy,
            "slack" => Service::Slack,
            "discord" => Service::Discord,
            "gotify" => Service::Gotify,
            "teams" => Service::Teams,
            "generic" => Service::Generic,
            "smtp" | "smtps" => Service::Smtp,
            _ => return None,
        })
    }
}

impl fmt::Display for Service {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a channel URL is refused. Never quotes the URL (it holds the token).
#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    #[error(
        "not a channel URL ({0}); write SERVICE://…, e.g. ntfy://ntfy.sh/alerts (the URL is not repeated here: it holds the service's token)"
    )]
    Malformed(String),
    #[error(
        "unknown service `{0}`: use ntfy, slack, discord, gotify, teams, generic or smtp/smtps (SERVICE+http://… for plain HTTP)"
    )]
    UnknownService(String),
    #[error("{service} channel URL: {message}")]
    Invalid {
        service: &'static str,
        message: String,
    },
}

fn invalid(service: Service, message: impl Into<String>) -> ChannelError {
    ChannelError::Invalid {
        service: service.as_str(),
        message: message.into(),
    }
}

/// How an email channel secures its connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SmtpTls {
    /// STARTTLS, required (port 587 by default).
    StartTls,
    /// TLS from the first byte (`smtps://`, port 465 by default).
    Tls,
    /// None (`?tls=none`, port 25 by default): for a relay on loopback.
    None,
}

/// An HTTP endpoint: where to `POST`, and the credential header, if any.
pub(crate) struct HttpEndpoint {
    pub tls: bool,
    pub host: String,
    pub port: u16,
    /// Path and query (origin form); may hold the token (Slack, Discord, Teams).
    pub path: Zeroizing<String>,
    /// A credential header: its name and value.
    pub auth: Option<(&'static str, Zeroizing<String>)>,
}

/// An SMTP server and the mail's envelope.
pub(crate) struct SmtpEndpoint {
    pub host: String,
    pub port: u16,
    pub tls: SmtpTls,
    pub credentials: Option<(Zeroizing<String>, Zeroizing<String>)>,
    pub from: String,
    pub to: Vec<String>,
}

pub(crate) enum Endpoint {
    Http(HttpEndpoint),
    Smtp(SmtpEndpoint),
}

/// A parsed channel URL. Its `Debug` shows only [`Channel::display`].
pub struct Channel {
    service: Service,
    display: String,
    pub(crate) endpoint: Endpoint,
}

impl fmt::Debug for Channel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Channel")
            .field("service", &self.service)
            .field("at", &self.display)
            .finish_non_exhaustive()
    }
}

/// A request body and its headers, as one service expects it.
pub(crate) struct HttpPayload {
    pub content_type: &'static str,
    pub headers: Vec<(&'static str, String)>,
    pub body: Vec<u8>,
}

impl Channel {
    /// Parses and checks a channel URL.
    pub fn parse(text: &str) -> Result<Channel, ChannelError> {
        let text = text.trim();
        if text.len() > MAX_URL {
            return Err(ChannelError::Malformed(format!(
                "longer than {MAX_URL} bytes"
            )));
        }
        let url = url::Url::parse(text).map_err(|e| ChannelError::Malformed(e.to_string()))?;
        let scheme = url.scheme().to_string();
        if scheme == "https" || scheme == "http" {
            let service = recognise_webhook(&url).ok_or_else(|| {
                ChannelError::Malformed(
                    "a bare http(s) URL is recognised only for Slack, Discord and Teams webhooks; \
                     write generic+https://… for any other JSON webhook"
                        .into(),
                )
            })?;
            return http_channel(service, &url, &scheme, scheme == "https");
        }
        let (name, transport) = match scheme.split_once('+') {
            Some((name, "https")) => (name, Some(true)),
            Some((name, "http")) => (name, Some(false)),
            Some((_, other)) => {
                return Err(ChannelError::Malformed(format!(
                    "`+{}` is not a transport: write SERVICE+https:// or SERVICE+http://",
                    bounded(other)
                )));
            }
            None => (scheme.as_str(), None),
        };
        let service =
            Service::from_name(name).ok_or_else(|| ChannelError::UnknownService(bounded(name)))?;
        match (service, transport) {
            (Service::Smtp, Some(_)) => Err(invalid(
                service,
                "email takes no +http/+https: write smtp:// (STARTTLS), smtps:// (TLS) or smtp://…?tls=none",
            )),
            (Service::Smtp, None) => smtp_channel(&url, &scheme),
            (_, Some(tls)) => http_channel(service, &url, &scheme, tls),
            (Service::Ntfy | Service::Gotify, None) => http_channel(service, &url, &scheme, true),
            (Service::Slack, None) => slack_short(&url),
            (Service::Discord, None) => discord_short(&url),
            (Service::Teams | Service::Generic, None) => Err(invalid(
                service,
                format!(
                    "give the full endpoint: {service}+https://host/path (or {service}+http:// for plain HTTP)"
                ),
            )),
        }
    }

    pub fn service(&self) -> Service {
        self.service
    }

    /// What may be shown of the channel: scheme, host and port — no path, user, token or
    /// query.
    pub fn display(&self) -> &str {
        &self.display
    }

    /// The HTTP payload this channel's service expects for `m`; `None` for email.
    pub(crate) fn payload(&self, m: &Message) -> HttpPayload {
        let json = |v: serde_json::Value| HttpPayload {
            content_type: "application/json",
            headers: Vec::new(),
            body: serde_json::to_vec(&v).expect("JSON values serialize"),
        };
        match self.service {
            Service::Ntfy => {
                let mut headers = vec![
                    ("title", header_text(&m.title)),
                    ("priority", ntfy_priority(m.priority).to_string()),
                ];
                if !m.tags.is_empty() {
                    headers.push(("tags", header_text(&m.tags.join(","))));
                }
                HttpPayload {
                    content_type: "text/plain; charset=utf-8",
                    headers,
                    body: m.message.clone().into_bytes(),
                }
            }
            Service::Slack => {
                json(serde_json::json!({ "text": format!("*{}*\n{}", m.title, m.message) }))
            }
            Service::Discord => json(serde_json::json!({
                "content": truncate(&format!("**{}**\n{}", m.title, m.message), DISCORD_MAX),
            })),
            Service::Gotify => json(serde_json::json!({
                "title": m.title,
                "message": m.message,
                "priority": gotify_priority(m.priority),
            })),
            Service::Teams if self.is_teams_workflow() => json(serde_json::json!({
                "type": "message",
                "attachments": [{
                    "contentType": "application/vnd.microsoft.card.adaptive",
                    "content": {
                        "$schema": "http://adaptivecards.io/schemas/adaptive-card.json",
                        "type": "AdaptiveCard",
                        "version": "1.4",
                        "body": [
                            {"type": "TextBlock", "text": m.title, "weight": "Bolder",
                             "size": "Medium", "wrap": true,
                             "color": teams_adaptive_colour(m.priority)},
                            {"type": "TextBlock", "text": m.message, "wrap": true},
                        ],
                    },
                }],
            })),
            Service::Teams => json(serde_json::json!({
                "@type": "MessageCard",
                "@context": "https://schema.org/extensions",
                "summary": m.title,
                "title": m.title,
                "text": m.message,
                "themeColor": teams_colour(m.priority),
            })),
            Service::Generic | Service::Smtp => {
                json(serde_json::to_value(m).expect("a message serializes"))
            }
        }
    }
}

impl Channel {
    /// A Teams *Workflows* webhook (Power Automate: `*.logic.azure.com`,
    /// `*.powerplatform.com`), which takes an Adaptive Card; the older connector URLs
    /// (`*.webhook.office.com`, and any other host) take a MessageCard.
    fn is_teams_workflow(&self) -> bool {
        match &self.endpoint {
            Endpoint::Http(ep) => {
                let host = ep.host.to_ascii_lowercase();
                host.ends_with(".logic.azure.com") || host.ends_with(".powerplatform.com")
            }
            Endpoint::Smtp(_) => false,
        }
    }
}

fn teams_adaptive_colour(p: Priority) -> &'static str {
    match p {
        Priority::Low | Priority::Normal => "Default",
        Priority::High => "Warning",
        Priority::Urgent => "Attention",
    }
}

/// Discord refuses content over 2000 characters.
const DISCORD_MAX: usize = 2000;

fn ntfy_priority(p: Priority) -> u8 {
    match p {
        Priority::Low => 2,
        Priority::Normal => 3,
        Priority::High => 4,
        Priority::Urgent => 5,
    }
}

fn gotify_priority(p: Priority) -> u8 {
    match p {
        Priority::Low => 2,
        Priority::Normal => 5,
        Priority::High => 8,
        Priority::Urgent => 10,
    }
}

fn teams_colour(p: Priority) -> &'static str {
    match p {
        Priority::Low => "808080",
        Priority::Normal => "0078D7",
        Priority::High => "FF8C00",
        Priority::Urgent => "D13438",
    }
}

fn truncate(s: &str, max_chars: usize) -> String {
    match s.char_indices().nth(max_chars) {
        Some((at, _)) => s[..at].to_string(),
        None => s.to_string(),
    }
}

/// A header value from text: control characters become spaces; non-ASCII text is
/// written as an RFC 2047 encoded word (ntfy decodes it).
fn header_text(s: &str) -> String {
    let clean: String = s
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if clean.is_ascii() {
        clean
    } else {
        use base64::Engine;
        format!(
            "=?UTF-8?B?{}?=",
            base64::engine::general_purpose::STANDARD.encode(clean.as_bytes())
        )
    }
}

/// At most 64 characters of what the user typed, for an error message.
fn bounded(s: &str) -> String {
    truncate(s, 64)
}

/// The service a bare `https://` webhook URL belongs to, by its host.
fn recognise_webhook(url: &url::Url) -> Option<Service> {
    let host = url.host_str()?.to_ascii_lowercase();
    if host == "hooks.slack.com" {
        Some(Service::Slack)
    } else if (host == "discord.com" || host == "discordapp.com")
        && url.path().starts_with("/api/webhooks/")
    {
        Some(Service::Discord)
    } else if host.ends_with(".webhook.office.com")
        || host.ends_with(".logic.azure.com")
        || host.ends_with(".powerplatform.com")
    {
        Some(Service::Teams)
    } else {
        None
    }
}

/// Percent-decodes a URL component (user names and passwords).
fn decode(s: &str) -> Zeroizing<String> {
    let bytes = s.as_bytes();
    let mut out = Zeroizing::new(Vec::with_capacity(bytes.len()));
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let (Some(hi), Some(lo)) = (hex(bytes[i + 1]), hex(bytes[i + 2]))
        {
            out.push((hi * 16 + lo) as u8);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    Zeroizing::new(String::from_utf8_lossy(&out).into_owned())
}

fn host_of(service: Service, url: &url::Url) -> Result<String, ChannelError> {
    match url.host_str() {
        Some(h) if !h.is_empty() => Ok(h.trim_start_matches('[').trim_end_matches(']').to_string()),
        _ => Err(invalid(service, "names no host")),
    }
}

fn display(scheme: &str, host: &str, port: Option<u16>) -> String {
    let host = if host.contains(':') {
        format!("[{host}]")
    } else {
        host.to_string()
    };
    match port {
        Some(p) => format!("{scheme}://{host}:{p}"),
        None => format!("{scheme}://{host}"),
    }
}

/// `SERVICE(+https|+http)://…`: an endpoint given in full (ntfy and Gotify derive theirs).
fn http_channel(
    service: Service,
    url: &url::Url,
    scheme: &str,
    tls: bool,
) -> Result<Channel, ChannelError> {
    let host = host_of(service, url)?;
    let port = url.port().unwrap_or(if tls { 443 } else { 80 });
    let user = decode(url.username());
    let password = url.password().map(decode);
    let path = url.path().to_string();
    let query = url.query().map(|q| format!("?{q}")).unwrap_or_default();
    if url.fragment().is_some() {
        return Err(invalid(service, "a channel URL takes no #fragment"));
    }
    let no_userinfo = |what: &str| -> Result<(), ChannelError> {
        if !user.is_empty() || password.is_some() {
            return Err(invalid(
                service,
                format!("takes no user or password (the token is {what})"),
            ));
        }
        Ok(())
    };
    let (path, auth) = match service {
        Service::Ntfy => {
            if path.trim_matches('/').is_empty() {
                return Err(invalid(service, "names no topic: write ntfy://host/TOPIC"));
            }
            if !query.is_empty() {
                return Err(invalid(service, "takes no ?options"));
            }
            let auth = match (user.is_empty(), password) {
                (true, None) => None,
                (true, Some(token)) => Some((
                    "authorization",
                    Zeroizing::new(format!("Bearer {}", token.as_str())),
                )),
                (false, Some(pw)) => Some(("authorization", basic(&user, &pw))),
                (false, None) => {
                    return Err(invalid(
                        service,
                        "a user needs a password (user:password@host), or give an access token as :TOKEN@host",
                    ));
                }
            };
            (path, auth)
        }
        Service::Gotify => {
            no_userinfo("the last path segment: gotify://host/APP_TOKEN")?;
            if !query.is_empty() {
                return Err(invalid(service, "takes no ?options"));
            }
            let trimmed = path.trim_end_matches('/');
            let (base, token) = trimmed.rsplit_once('/').unwrap_or(("", trimmed));
            if token.is_empty() {
                return Err(invalid(
                    service,
                    "names no application token: write gotify://host/APP_TOKEN",
                ));
            }
            (
                format!("{base}/message"),
                Some(("x-gotify-key", decode(token))),
            )
        }
        Service::Generic => {
            let auth = match password {
                Some(pw) => Some(("authorization", basic(&user, &pw))),
                None if !user.is_empty() => {
                    return Err(invalid(
                        service,
                        "a user needs a password (user:password@host)",
                    ));
                }
                None => None,
            };
            (format!("{path}{query}"), auth)
        }
        Service::Slack | Service::Discord | Service::Teams => {
            no_userinfo("in the webhook URL's path")?;
            if path.trim_matches('/').is_empty() {
                return Err(invalid(service, "names no webhook path"));
            }
            (format!("{path}{query}"), None)
        }
        Service::Smtp => unreachable!("email is not an HTTP channel"),
    };
    Ok(Channel {
        service,
        display: display(scheme, &host, url.port()),
        endpoint: Endpoint::Http(HttpEndpoint {
            tls,
            host,
            port,
            path: Zeroizing::new(path),
            auth,
        }),
    })
}

fn basic(user: &str, password: &str) -> Zeroizing<String> {
    use base64::Engine;
    let pair = Zeroizing::new(format!("{user}:{password}"));
    Zeroizing::new(format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(pair.as_bytes())
    ))
}

/// `slack://T000/B000/XXXX` → `https://hooks.slack.com/services/T000/B000/XXXX`.
fn slack_short(url: &url::Url) -> Result<Channel, ChannelError> {
    let service = Service::Slack;
    let first = url.host_str().unwrap_or_default();
    let rest: Vec<&str> = url.path().trim_matches('/').split('/').collect();
    if first.is_empty() || rest.len() != 2 || rest.iter().any(|s| s.is_empty()) {
        return Err(invalid(
            service,
            "write slack://T000/B000/XXXX (the three parts of the incoming webhook's URL after /services/), or the webhook URL itself",
        ));
    }
    if url.query().is_some() || !url.username().is_empty() || url.port().is_some() {
        return Err(invalid(
            service,
            "the short form takes no user, port or ?options",
        ));
    }
    Ok(public_endpoint(
        service,
        "hooks.slack.com",
        format!("/services/{first}/{}/{}", rest[0], rest[1]),
    ))
}

/// A short form's channel: the service's one public HTTPS endpoint, the token in `path`.
fn public_endpoint(service: Service, host: &str, path: String) -> Channel {
    Channel {
        service,
        display: display(service.as_str(), host, None),
        endpoint: Endpoint::Http(HttpEndpoint {
            tls: true,
            host: host.to_string(),
            port: 443,
            path: Zeroizing::new(path),
            auth: None,
        }),
    }
}

/// `discord://TOKEN@WEBHOOK_ID` → `https://discord.com/api/webhooks/ID/TOKEN`.
fn discord_short(url: &url::Url) -> Result<Channel, ChannelError> {
    let service = Service::Discord;
    let token = decode(url.username());
    let id = url.host_str().unwrap_or_default();
    if token.is_empty() || id.is_empty() || !url.path().trim_matches('/').is_empty() {
        return Err(invalid(
            service,
            "write discord://TOKEN@WEBHOOK_ID, or the webhook URL https://discord.com/api/webhooks/ID/TOKEN",
        ));
    }
    Ok(public_endpoint(
        service,
        "discord.com",
        format!("/api/webhooks/{id}/{}", token.as_str()),
    ))
}

/// `smtp://[user:password@]host[:port]/?to=…&from=…[&tls=starttls|none]`, `smtps://…`.
fn smtp_channel(url: &url::Url, scheme: &str) -> Result<Channel, ChannelError> {
    let service = Service::Smtp;
    let host = host_of(service, url)?;
    if !url.path().trim_matches('/').is_empty() {
        return Err(invalid(
            service,
            "takes no path: write smtp://host:port/?to=…&from=…",
        ));
    }
    let mut tls = if scheme == "smtps" {
        SmtpTls::Tls
    } else {
        SmtpTls::StartTls
    };
    let (mut to, mut from) = (Vec::new(), None);
    for (k, v) in url.query_pairs() {
        match k.as_ref() {
            "to" => to.extend(
                v.split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(str::to_string),
            ),
            "from" => from = Some(v.trim().to_string()),
            "tls" => {
                tls = match (scheme, v.as_ref()) {
                    ("smtp", "starttls") => SmtpTls::StartTls,
                    ("smtp", "none") => SmtpTls::None,
                    ("smtps", "tls") => SmtpTls::Tls,
                    _ => {
                        return Err(invalid(
                            service,
                            "tls is `starttls` (the default) or `none` for smtp://; smtps:// is always TLS",
                        ));
                    }
                }
            }
            other => {
                return Err(invalid(
                    service,
                    format!("unknown option `{}`: use to, from, tls", bounded(other)),
                ));
            }
        }
    }
    if to.is_empty() {
        return Err(invalid(
            service,
            "names no recipient: add ?to=someone@example.org",
        ));
    }
    let from =
        from.ok_or_else(|| invalid(service, "names no sender: add &from=capstan@example.org"))?;
    for addr in to.iter().chain(std::iter::once(&from)) {
        addr.parse::<lettre::message::Mailbox>().map_err(|e| {
            invalid(
                service,
                format!("`{}` is not an email address: {e}", bounded(addr)),
            )
        })?;
    }
    let user = decode(url.username());
    let credentials = match url.password() {
        Some(pw) if !user.is_empty() => Some((user, decode(pw))),
        None if user.is_empty() => None,
        _ => {
            return Err(invalid(
                service,
                "give both a user and a password (user:password@host), or neither",
            ));
        }
    };
    let port = url.port().unwrap_or(match tls {
        SmtpTls::StartTls => 587,
        SmtpTls::Tls => 465,
        SmtpTls::None => 25,
    });
    Ok(Channel {
        service,
        display: display(scheme, &host, url.port()),
        endpoint: Endpoint::Smtp(SmtpEndpoint {
            host,
            port,
            tls,
            credentials,
            from,
            to,
        }),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn http(c: &Channel) -> &HttpEndpoint {
        match &c.endpoint {
            Endpoint::Http(h) => h,
            Endpoint::Smtp(_) => panic!("not HTTP"),
        }
    }

    #[test]
    fn every_service_parses_from_its_documented_url_and_shows_only_scheme_and_host() {
        let cases = [
            (
                "ntfy://ntfy.sh/alerts",
                Service::Ntfy,
                "ntfy://ntfy.sh",
                "/alerts",
            ),
            (
                "ntfy+http://127.0.0.1:8080/t",
                Service::Ntfy,
                "ntfy+http://127.0.0.1:8080",
                "/t",
            ),
            (
                "slack://T000/B000/XXXX",
                Service::Slack,
                "slack://hooks.slack.com",
                "/services/T000/B000/XXXX",
            ),
            (
                "https://hooks.slack.com/services/T1/B1/Z",
                Service::Slack,
                "https://hooks.slack.com",
                "/services/T1/B1/Z",
            ),
            (
                "discord://tok3n@123456",
                Service::Discord,
                "discord://discord.com",
                "/api/webhooks/123456/tok3n",
            ),
            (
                "gotify://push.example.org/sub/AbC",
                Service::Gotify,
                "gotify://push.example.org",
                "/sub/message",
            ),
            (
                "teams+https://x.webhook.office.com/webhookb2/abc",
                Service::Teams,
                "teams+https://x.webhook.office.com",
                "/webhookb2/abc",
            ),
            (
                "generic+http://127.0.0.1:9/hook?k=v",
                Service::Generic,
                "generic+http://127.0.0.1:9",
                "/hook?k=v",
            ),
        ];
        for (url, service, shown, path) in cases {
            let c = Channel::parse(url).unwrap_or_else(|e| panic!("{url}: {e}"));
            assert_eq!(c.service(), service, "{url}");
            assert_eq!(c.display(), shown, "{url}");
            assert_eq!(http(&c).path.as_str(), path, "{url}");
        }
        let gotify = Channel::parse("gotify+http://127.0.0.1:7/AbC").unwrap();
        assert_eq!(http(&gotify).auth.as_ref().unwrap().1.as_str(), "AbC");
        assert!(!http(&gotify).tls);
    }

    #[test]
    fn ntfy_takes_a_token_or_a_user_and_password() {
        let c = Channel::parse("ntfy://:tk_secret@ntfy.sh/t").unwrap();
        assert_eq!(
            http(&c).auth.as_ref().unwrap().1.as_str(),
            "Bearer tk_secret"
        );
        let c = Channel::parse("ntfy://me:p%40ss@ntfy.sh/t").unwrap();
        assert_eq!(
            http(&c).auth.as_ref().unwrap().1.as_str(),
            format!("Basic {}", {
                use base64::Engine;
                base64::engine::general_purpose::STANDARD.encode("me:p@ss")
            })
        );
        assert!(!format!("{c:?}").contains("p%40ss"));
    }

    #[test]
    fn email_urls_name_recipients_sender_and_tls() {
        let c =
            Channel::parse("smtp://127.0.0.1:2525/?to=a@x.org,b@x.org&from=capstan@x.org&tls=none")
                .unwrap();
        let Endpoint::Smtp(s) = &c.endpoint else {
            panic!()
        };
        assert_eq!((s.port, s.tls, s.to.len()), (2525, SmtpTls::None, 2));
        assert_eq!(c.display(), "smtp://127.0.0.1:2525");
        let c = Channel::parse("smtps://u:pw@mail.example.org/?to=a@x.org&from=c@x.org").unwrap();
        let Endpoint::Smtp(s) = &c.endpoint else {
            panic!()
        };
        assert_eq!((s.port, s.tls), (465, SmtpTls::Tls));
        assert!(s.credentials.is_some());
    }

    #[test]
    fn bad_urls_are_refused_with_what_to_write_and_never_quote_the_token() {
        let cases = [
            ("ntfy://ntfy.sh/", "names no topic"),
            ("ntfy://me@ntfy.sh/t", "needs a password"),
            ("pushover://x/y", "unknown service `pushover`"),
            ("slack://T000/B000", "slack://T000/B000/XXXX"),
            ("teams://whatever", "teams+https://"),
            ("https://example.org/hook", "generic+https://"),
            ("ntfy+ftp://h/t", "not a transport"),
            ("smtp://h/?from=a@b.org", "names no recipient"),
            ("smtp://h/?to=a@b.org", "names no sender"),
            ("smtp://h/?to=a@b.org&from=c@d.org&tls=maybe", "tls is"),
            (
                "smtp://h/?to=a@b.org&from=c@d.org&cc=e@f.org",
                "unknown option `cc`",
            ),
            (
                "smtp://h/?to=not-an-address&from=c@d.org",
                "not an email address",
            ),
            ("gotify://h/", "names no application token"),
            ("not a url", "not a channel URL"),
        ];
        for (url, says) in cases {
            let e = Channel::parse(url).unwrap_err().to_string();
            assert!(e.contains(says), "{url}: {e}");
        }
        let e = Channel::parse("discord://SeCrEtToKeN@")
            .unwrap_err()
            .to_string();
        assert!(!e.contains("SeCrEtToKeN"), "{e}");
        let e = Channel::parse("slack+https://hooks.slack.com/")
            .unwrap_err()
            .to_string();
        assert!(e.contains("names no webhook path"), "{e}");
    }

    #[test]
    fn each_service_gets_its_documented_payload() {
        let m = Message {
            title: "Disk full".into(),
            message: "web1: / at 99%".into(),
            priority: Priority::High,
            tags: vec!["disk".into(), "web1".into()],
            dedup_key: None,
            plugin: "probe".into(),
            run_id: None,
            channel: "ops".into(),
            time: chrono::Utc::now(),
        };
        let body = |url: &str| {
            let p = Channel::parse(url).unwrap().payload(&m);
            serde_json::from_slice::<serde_json::Value>(&p.body).unwrap()
        };
        assert_eq!(body("slack://T/B/X")["text"], "*Disk full*\nweb1: / at 99%");
        assert_eq!(
            body("discord://t@1")["content"],
            "**Disk full**\nweb1: / at 99%"
        );
        let g = body("gotify://h/T");
        assert_eq!(
            (g["title"].as_str(), g["priority"].as_u64()),
            (Some("Disk full"), Some(8))
        );
        let w = body(
            "https://prod-01.westeurope.logic.azure.com/workflows/abc/triggers/manual/paths/invoke?sig=s",
        );
        let card = &w["attachments"][0]["content"];
        assert_eq!(
            (w["type"].as_str(), card["type"].as_str()),
            (Some("message"), Some("AdaptiveCard"))
        );
        assert_eq!(card["body"][0]["text"], "Disk full");
        assert_eq!(card["body"][1]["text"], "web1: / at 99%");
        let t = body("teams+https://x.webhook.office.com/w");
        assert_eq!(
            (t["@type"].as_str(), t["title"].as_str()),
            (Some("MessageCard"), Some("Disk full"))
        );
        let j = body("generic+https://h/p");
        assert_eq!(
            (j["priority"].as_str(), j["tags"][1].as_str()),
            (Some("high"), Some("web1"))
        );
        let n = Channel::parse("ntfy://h/t").unwrap().payload(&m);
        assert_eq!(n.body, b"web1: / at 99%");
        assert!(n.headers.contains(&("priority", "4".into())));
        assert!(n.headers.contains(&("tags", "disk,web1".into())));
        assert_eq!(header_text("Überhitzt\r\n"), "=?UTF-8?B?w5xiZXJoaXR6dCAg?=");
    }

    #[test]
    fn a_title_or_tag_cannot_add_a_header_line() {
        let mut m = Message {
            title: "ok\r\nX-Injected: 1".into(),
            message: String::new(),
            priority: Priority::Low,
            tags: vec!["a\nb".into()],
            dedup_key: None,
            plugin: "p".into(),
            run_id: None,
            channel: "c".into(),
            time: chrono::Utc::now(),
        };
        let p = Channel::parse("ntfy://h/t").unwrap().payload(&m);
        for (_, v) in &p.headers {
            assert!(http::HeaderValue::from_str(v).is_ok(), "{v:?}");
            assert!(!v.contains(['\r', '\n']), "{v:?}");
        }
        m.title = "\u{7f}\0".into();
        let p = Channel::parse("ntfy://h/t").unwrap().payload(&m);
        assert!(
            p.headers
                .iter()
                .all(|(_, v)| http::HeaderValue::from_str(v).is_ok())
        );
    }
}

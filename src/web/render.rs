//! The page frame and the small formatting helpers every page shares.

use axum::http::StatusCode;
use axum::response::{Html, IntoResponse, Response};
use chrono::{DateTime, Utc};
use maud::{DOCTYPE, Markup, html};

use super::session::Authed;

/// Static file URLs carry the version, so a new binary's files are fetched afresh
/// despite their long cache.
const ASSET_VERSION: &str = env!("CARGO_PKG_VERSION");

/// A page: nav with the logout form, the user's role on `body`, the content.
pub fn page(title: &str, authed: &Authed, content: Markup) -> Response {
    let doc = html! {
        (DOCTYPE)
        html lang="en" {
            (head(title))
            body data-role=(authed.token.role.as_str()) {
                nav {
                    a.brand href="/" { "Capstan" }
                    a href="/" { "Overview" }
                    a href="/runs" { "Runs" }
                    a href="/hooks" { "Hooks" }
                    a href="/notifiers" { "Notifiers" }
                    span.who { (authed.token.name) " · " (authed.token.role.as_str())
                        @if authed.token.is_device_scoped() {
                            " · devices " (authed.token.devices.join(", "))
                        }
                    }
                    form #logout method="post" action="/logout" {
                        (csrf_input(&authed.csrf))
                        button type="submit" { "Log out" }
                    }
                }
                main { (content) }
            }
        }
    };
    Html(doc.into_string()).into_response()
}

/// The page head: title and the embedded stylesheet and script.
pub fn head(title: &str) -> Markup {
    html! {
        head {
            meta charset="utf-8";
            meta name="viewport" content="width=device-width, initial-scale=1";
            title { (title) " · Capstan" }
            link rel="stylesheet" href=(format!("/static/app.css?v={ASSET_VERSION}"));
            script src=(format!("/static/app.js?v={ASSET_VERSION}")) defer {}
        }
    }
}

pub fn csrf_input(csrf: &str) -> Markup {
    html! { input type="hidden" name="csrf" value=(csrf); }
}

/// An error page with `status` and the message in `.error` (no session needed).
pub fn error_page(status: StatusCode, message: &str) -> Response {
    let doc = html! {
        (DOCTYPE)
        html lang="en" {
            (head(status.canonical_reason().unwrap_or("Error")))
            body {
                main {
                    h1 { (status.as_u16()) " " (status.canonical_reason().unwrap_or("")) }
                    p.error { (message) }
                    p { a href="/" { "Back to the overview" } }
                }
            }
        }
    };
    (status, Html(doc.into_string())).into_response()
}

/// Percent-encodes `s` for a query value.
pub fn url_encode(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

/// `12:34:56` today, else `2026-12-07 12:34`.
pub fn time(t: DateTime<Utc>) -> String {
    let now = Utc::now();
    if t.date_naive() == now.date_naive() {
        t.format("%H:%M:%S").to_string()
    } else {
        t.format("%Y-%m-%d %H:%M").to_string()
    }
}

/// `3 s ago`, `5 min ago`, `2 h ago`, `4 d ago`.
pub fn age(t: DateTime<Utc>) -> String {
    let s = (Utc::now() - t).num_seconds().max(0);
    match s {
        0..60 => format!("{s} s ago"),
        60..3600 => format!("{} min ago", s / 60),
        3600..86400 => format!("{} h ago", s / 3600),
        _ => format!("{} d ago", s / 86400),
    }
}

/// `in 3 s`, `in 5 min`, … (for next fire times).
pub fn until(t: DateTime<Utc>) -> String {
    let s = (t - Utc::now()).num_seconds().max(0);
    match s {
        0..60 => format!("in {s} s"),
        60..3600 => format!("in {} min", s / 60),
        3600..86400 => format!("in {} h", s / 3600),
        _ => format!("in {} d", s / 86400),
    }
}

/// `850 ms`, `1.2 s`, `3 min 5 s`.
pub fn millis(ms: i64) -> String {
    match ms {
        ..1000 => format!("{ms} ms"),
        1000..60_000 => format!("{:.1} s", ms as f64 / 1000.0),
        _ => format!("{} min {} s", ms / 60_000, (ms % 60_000) / 1000),
    }
}

/// A latency or step time: `0.42 ms`, `12 ms`.
pub fn ms_f(ms: f64) -> String {
    if ms < 10.0 {
        format!("{ms:.2} ms")
    } else {
        format!("{ms:.0} ms")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_naturally() {
        assert_eq!(millis(850), "850 ms");
        assert_eq!(millis(1250), "1.2 s");
        assert_eq!(millis(185_000), "3 min 5 s");
        assert_eq!(url_encode("/runs?plugin=a b"), "%2Fruns%3Fplugin%3Da+b");
    }
}

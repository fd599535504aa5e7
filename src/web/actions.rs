//! What the dashboard's forms do: log in and out, run a plugin now, check a device now.
//!
//! Run and check go through the engine calls the API's `POST /api/plugins/{name}/run`
//! and `GET /api/docker/check/{id}` use (the scheduler's `submit` with a manual event;
//! the stored-device check, which records the report in the device's history).

use axum::body::Bytes;
use axum::extract::{Extension, Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{Html, IntoResponse, Redirect, Response};
use maud::{DOCTYPE, html};
use serde::Deserialize;

use super::render::{self, head};
use super::session::{self, Authed, LOGIN_COOKIE, SESSION_COOKIE};
use super::{FormFields, MAX_FORM_BODY, WebState};
use crate::secret::Secret;

/// Where to go after login: a path on this site, else the overview.
fn safe_next(next: Option<&str>) -> &str {
    match next {
        Some(n)
            if n.starts_with('/')
                && !n.starts_with("//")
                && !n.contains('\\')
                && !n.chars().any(char::is_control)
                && !n.starts_with("/login")
                && !n.starts_with("/logout") =>
        {
            n
        }
        _ => "/",
    }
}

#[derive(Debug, Default, Deserialize)]
pub struct LoginQuery {
    next: Option<String>,
}

fn with_cookie(mut resp: Response, cookie: &str) -> Response {
    if let Ok(v) = HeaderValue::from_str(cookie) {
        resp.headers_mut().append(header::SET_COOKIE, v);
    }
    resp
}

/// The login form, with a fresh pre-session nonce in a cookie and the form.
fn login_form(web: &WebState, status: StatusCode, next: &str, error: Option<&str>) -> Response {
    let nonce = session::random_token();
    let doc = html! {
        (DOCTYPE)
        html lang="en" {
            (head("Log in"))
            body.login {
                main {
                    h1 { "Capstan" }
                    p { "Log in with an API token (" code { "capstan token create NAME --role viewer" } ")." }
                    @if let Some(e) = error { p.error { (e) } }
                    form #login method="post" action="/login" {
                        input type="hidden" name="csrf" value=(nonce);
                        input type="hidden" name="next" value=(next);
                        label for="token" { "API token" }
                        input #token type="password" name="token" autocomplete="current-password" required autofocus;
                        button type="submit" { "Log in" }
                    }
                }
            }
        }
    };
    let resp = (status, Html(doc.into_string())).into_response();
    with_cookie(
        resp,
        &session::set_cookie(LOGIN_COOKIE, &nonce, "/login", 3600, web.tls),
    )
}

pub async fn login_page(
    State(web): State<WebState>,
    headers: HeaderMap,
    Query(q): Query<LoginQuery>,
) -> Response {
    let next = safe_next(q.next.as_deref()).to_string();
    if session::cookie(&headers, SESSION_COOKIE)
        .and_then(|id| web.sessions.check(id, &web.app.tokens))
        .is_some()
    {
        return Redirect::to(&next).into_response();
    }
    login_form(&web, StatusCode::OK, &next, None)
}

pub async fn login(State(web): State<WebState>, headers: HeaderMap, body: Bytes) -> Response {
    if body.len() > MAX_FORM_BODY {
        return render::error_page(StatusCode::PAYLOAD_TOO_LARGE, "The form is too large.");
    }
    let form = FormFields::parse(&body);
    let next = safe_next(form.get("next")).to_string();
    let nonce_ok = match (session::cookie(&headers, LOGIN_COOKIE), form.get("csrf")) {
        (Some(c), Some(f)) => session::same_secret(c.as_bytes(), f.as_bytes()),
        _ => false,
    };
    if !nonce_ok {
        return render::error_page(
            StatusCode::FORBIDDEN,
            "The login form's CSRF token is missing or wrong (are cookies on?). Open the login page again.",
        );
    }
    // No lockout after failed logins: a token has 192 random bits, so guessing is hopeless
    // at any rate, and a lockout would let any stranger lock the operators out.
    let token = Secret::from_str_owned(form.get("token").unwrap_or_default().trim().to_string());
    let info = match web.app.tokens.verify(token.expose()) {
        Ok(i) => i,
        Err(e) => {
            tracing::warn!(error = %e, "dashboard login: cannot read the tokens");
            return render::error_page(
                StatusCode::INTERNAL_SERVER_ERROR,
                "Cannot check the token now; the engine's log says why.",
            );
        }
    };
    let Some(info) = info else {
        tracing::info!("dashboard login refused: unknown token");
        return login_form(
            &web,
            StatusCode::UNAUTHORIZED,
            &next,
            Some("That token is not valid (revoked, mistyped, or of another engine)."),
        );
    };
    let id = web.sessions.open(token);
    tracing::info!(token = %info.id, name = %info.name, role = %info.role, "dashboard login");
    let resp = Redirect::to(&next).into_response();
    let resp = with_cookie(
        resp,
        &session::set_cookie(
            SESSION_COOKIE,
            &id,
            "/",
            web.sessions.ttl().as_secs(),
            web.tls,
        ),
    );
    with_cookie(
        resp,
        &session::set_cookie(LOGIN_COOKIE, "", "/login", 0, web.tls),
    )
}

pub async fn logout(State(web): State<WebState>, Extension(authed): Extension<Authed>) -> Response {
    web.sessions.end(&authed.session);
    let resp = Redirect::to("/login").into_response();
    with_cookie(
        resp,
        &session::set_cookie(SESSION_COOKIE, "", "/", 0, web.tls),
    )
}

pub async fn run_now(
    State(web): State<WebState>,
    Extension(authed): Extension<Authed>,
    Extension(form): Extension<FormFields>,
    Path(name): Path<String>,
) -> Response {
    let installed = match web.app.scheduler.runtime().installed_plugin(&name) {
        Ok(p) => p,
        Err(_) => {
            return render::error_page(
                StatusCode::NOT_FOUND,
                &format!("No plugin {name} is installed."),
            );
        }
    };
    if crate::api::authz::authorize_plugin(&authed.token, &installed).is_err() {
        return render::error_page(
            StatusCode::NOT_FOUND,
            &format!("No plugin {name} is installed (or your token may not see it)."),
        );
    }
    let input = form.get("input").unwrap_or_default().to_string();
    let event = crate::trigger::manual::event(format!("web:{}", authed.token.name), input);
    match web.app.scheduler.submit(&name, event) {
        Ok(id) => Redirect::to(&format!("/runs/{id}")).into_response(),
        Err(e) => {
            let status = match e {
                crate::scheduler::SubmitError::NotInstalled(_) => StatusCode::NOT_FOUND,
                crate::scheduler::SubmitError::ShuttingDown
                | crate::scheduler::SubmitError::QueueFull { .. } => {
                    StatusCode::SERVICE_UNAVAILABLE
                }
                crate::scheduler::SubmitError::Store(_) => StatusCode::INTERNAL_SERVER_ERROR,
            };
            render::error_page(status, &format!("Cannot run {name}: {e}"))
        }
    }
}

pub async fn check_now(
    State(web): State<WebState>,
    Extension(authed): Extension<Authed>,
    Path(name): Path<String>,
) -> Response {
    if let Err(e) = crate::api::docker::check_device(&web.app, &authed.token, &name).await {
        let status = e.into_response().status();
        return render::error_page(
            status,
            &format!("Cannot check {name} (or your token may not see it)."),
        );
    }
    // The container counts too, for the overview.
    let _ = super::pages::list_containers(&web, &name).await;
    Redirect::to(&format!("/devices/{name}")).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn login_goes_back_only_to_pages_of_this_site() {
        assert_eq!(safe_next(Some("/runs?plugin=a")), "/runs?plugin=a");
        assert_eq!(safe_next(Some("//evil.example/")), "/");
        assert_eq!(safe_next(Some("https://evil.example/")), "/");
        assert_eq!(safe_next(Some("/\\evil")), "/");
        assert_eq!(safe_next(Some("/login")), "/");
        assert_eq!(safe_next(None), "/");
    }
}

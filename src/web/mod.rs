//! The web dashboard: server-rendered pages on the API's listener, for people.
//!
//! It renders what the API's handlers compute (the same engine calls, shared functions
//! where a handler's core is more than one call) and is not a second backend. Pages are
//! built with maud (HTML checked at compile time, escaped by default); the only script is
//! `/static/app.js`, which follows `/events/runs` (Server-Sent Events) to insert and
//! update runs without a reload. CSS and JS are embedded in the binary.
//!
//! Security, in one place: every route in [`PAGES`] passes [`gate`], which needs a live
//! session (else `303` to `/login?next=…`), checks the form's CSRF token on every `POST`
//! (else `403`), and the route's [`Role`] (else `403` naming the role). Device-scoped
//! tokens see only their devices and the plugins (and their runs and hooks) that cannot
//! reach other devices. Every response carries a strict CSP (no inline script or style),
//! `X-Frame-Options: DENY`, `Referrer-Policy: same-origin` and `nosniff`; pages are
//! `no-store`. No page shows a secret: hooks say which secrets they accept, notifiers
//! show only service, scheme and host.

mod actions;
mod charts;
mod events;
mod pages;
mod render;
pub mod session;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{MethodRouter, get, post};

use crate::api::AppState;
use crate::token::Role;
use session::{Authed, SESSION_COOKIE, Sessions};

/// The largest form body the dashboard reads (login, run input).
pub const MAX_FORM_BODY: usize = 16 * 1024;

/// The `Content-Security-Policy` of every dashboard response.
pub const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; frame-ancestors 'none'; base-uri 'none'; form-action 'self'";

/// How the dashboard is served (whether over TLS, the state's
/// [`ListenInfo`](crate::api::ListenInfo) says).
#[derive(Debug, Clone)]
pub struct WebOptions {
    /// How long a login lasts (`[dashboard] session_ttl`).
    pub session_ttl: Duration,
}

impl WebOptions {
    /// From the engine's settings.
    pub fn from_settings(settings: &crate::config::Settings) -> WebOptions {
        WebOptions {
            session_ttl: settings.dashboard.session_ttl,
        }
    }
}

/// What every dashboard handler works on.
#[derive(Clone)]
pub struct WebState {
    pub app: AppState,
    pub sessions: Arc<Sessions>,
    /// Served over TLS (the listener's [`ListenInfo`](crate::api::ListenInfo)): cookies
    /// get `Secure`.
    pub tls: bool,
    /// The last container listing of each device (counts for the overview).
    pub containers: Arc<pages::ContainerCounts>,
}

/// One dashboard route that needs a session.
pub struct Page {
    /// `GET` or `POST`.
    pub method: &'static str,
    pub path: &'static str,
    /// The path with its parameters filled, for tests that walk the pages.
    pub example: &'static str,
    /// The least role that may use it.
    pub role: Role,
    handler: fn() -> MethodRouter<WebState>,
}

/// Every dashboard route but the login page and the static files.
pub const PAGES: &[Page] = &[
    Page {
        method: "GET",
        path: "/",
        example: "/",
        role: Role::Viewer,
        handler: || get(pages::overview),
    },
    Page {
        method: "GET",
        path: "/devices/{name}",
        example: "/devices/local",
        role: Role::Viewer,
        handler: || get(pages::device),
    },
    Page {
        method: "POST",
        path: "/devices/{name}/check",
        example: "/devices/local/check",
        role: Role::Operator,
        handler: || post(actions::check_now),
    },
    Page {
        method: "GET",
        path: "/plugins/{name}",
        example: "/plugins/inventory",
        role: Role::Viewer,
        handler: || get(pages::plugin),
    },
    Page {
        method: "POST",
        path: "/plugins/{name}/run",
        example: "/plugins/inventory/run",
        role: Role::Operator,
        handler: || post(actions::run_now),
    },
    Page {
        method: "GET",
        path: "/runs",
        example: "/runs",
        role: Role::Viewer,
        handler: || get(pages::runs),
    },
    Page {
        method: "GET",
        path: "/runs/{id}",
        example: "/runs/0190b5c2-0000-7000-8000-000000000000",
        role: Role::Viewer,
        handler: || get(pages::run),
    },
    Page {
        method: "GET",
        path: "/events/runs",
        example: "/events/runs",
        role: Role::Viewer,
        handler: || get(events::runs),
    },
    Page {
        method: "GET",
        path: "/hooks",
        example: "/hooks",
        role: Role::Viewer,
        handler: || get(pages::hooks),
    },
    Page {
        method: "GET",
        path: "/notifiers",
        example: "/notifiers",
        role: Role::Viewer,
        handler: || get(pages::notifiers),
    },
    Page {
        method: "POST",
        path: "/logout",
        example: "/logout",
        role: Role::Viewer,
        handler: || post(actions::logout),
    },
];

/// The routes open without a session.
pub const OPEN_PATHS: &[&str] = &["/login", "/static/app.css", "/static/app.js"];

/// The dashboard's routes, to merge beside the API on the same listener. It sets no
/// fallback (the API's answers unknown paths).
pub fn router(state: AppState, opts: WebOptions) -> Router {
    let web = WebState {
        tls: state.listen.tls,
        app: state,
        sessions: Arc::new(Sessions::new(opts.session_ttl)),
        containers: Arc::default(),
    };
    let mut protected = Router::new();
    for p in PAGES {
        protected = protected.route(p.path, (p.handler)());
    }
    let protected = protected.layer(middleware::from_fn_with_state(web.clone(), gate));
    Router::new()
        .route(
            "/login",
            get(actions::login_page)
                .post(actions::login)
                .layer(DefaultBodyLimit::max(MAX_FORM_BODY)),
        )
        .route("/static/app.css", get(static_css))
        .route("/static/app.js", get(static_js))
        .merge(protected)
        .layer(middleware::map_response(security_headers))
        .with_state(web)
}

/// The form fields of a `POST` that passed [`gate`] (its CSRF token checked).
#[derive(Debug, Clone, Default)]
pub struct FormFields(pub Vec<(String, String)>);

impl FormFields {
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn parse(body: &[u8]) -> FormFields {
        FormFields(
            url::form_urlencoded::parse(body)
                .map(|(k, v)| (k.into_owned(), v.into_owned()))
                .collect(),
        )
    }
}

/// Session, CSRF and role, for every route in [`PAGES`].
async fn gate(State(web): State<WebState>, req: Request, next: Next) -> Response {
    let path = req
        .extensions()
        .get::<MatchedPath>()
        .map(|m| m.as_str().to_string())
        .unwrap_or_default();
    let method = req.method().clone();
    // HEAD is answered by the GET route.
    let as_method = if method == Method::HEAD {
        "GET"
    } else {
        method.as_str()
    };
    let Some(page) = PAGES
        .iter()
        .find(|p| p.path == path && p.method == as_method)
    else {
        // A method the route does not serve: routing answers 405 before this runs.
        return StatusCode::METHOD_NOT_ALLOWED.into_response();
    };
    let authed = session::cookie(req.headers(), SESSION_COOKIE)
        .and_then(|id| web.sessions.check(id, &web.app.tokens));
    let Some(authed) = authed else {
        let had_cookie = session::cookie(req.headers(), SESSION_COOKIE).is_some();
        let target = if as_method == "GET" {
            let here = req
                .uri()
                .path_and_query()
                .map(|p| p.as_str())
                .unwrap_or("/");
            if here == "/" {
                "/login".to_string()
            } else {
                format!("/login?next={}", render::url_encode(here))
            }
        } else {
            "/login".to_string()
        };
        let mut resp = Redirect::to(&target).into_response();
        if had_cookie {
            clear_session_cookie(&mut resp, web.tls);
        }
        return resp;
    };
    if method != Method::POST {
        return authorize(page, authed, req, next).await;
    }
    let (mut parts, body) = req.into_parts();
    let bytes: Bytes = match axum::body::to_bytes(body, MAX_FORM_BODY).await {
        Ok(b) => b,
        Err(_) => {
            return render::error_page(
                StatusCode::PAYLOAD_TOO_LARGE,
                &format!("The form is larger than {} KiB.", MAX_FORM_BODY / 1024),
            );
        }
    };
    let fields = FormFields::parse(&bytes);
    let ok = fields
        .get("csrf")
        .is_some_and(|c| session::same_secret(c.as_bytes(), authed.csrf.as_bytes()));
    if !ok {
        return render::error_page(
            StatusCode::FORBIDDEN,
            "The form's CSRF token is missing or wrong. Reload the page and submit it again.",
        );
    }
    parts.extensions.insert(fields);
    authorize(
        page,
        authed,
        Request::from_parts(parts, Body::from(bytes)),
        next,
    )
    .await
}

async fn authorize(page: &Page, authed: Authed, mut req: Request, next: Next) -> Response {
    let action = format!("{} {}", page.method, page.path);
    if let Err(e) = crate::api::authz::require_role(&authed.token, page.role, &action) {
        return render::error_page(StatusCode::FORBIDDEN, &format!("Refused: {e}."));
    }
    req.extensions_mut().insert(authed);
    next.run(req).await
}

fn clear_session_cookie(resp: &mut Response, tls: bool) {
    if let Ok(v) = HeaderValue::from_str(&session::set_cookie(SESSION_COOKIE, "", "/", 0, tls)) {
        resp.headers_mut().append(header::SET_COOKIE, v);
    }
}

/// The headers every dashboard response carries; pages (anything not marked cacheable)
/// are `no-store`.
async fn security_headers(mut resp: Response) -> Response {
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    if !h.contains_key(header::CACHE_CONTROL) {
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    resp
}

const APP_CSS: &str = include_str!("static/app.css");
const APP_JS: &str = include_str!("static/app.js");
/// Static files are embedded: they change only with the binary.
const STATIC_CACHE: &str = "public, max-age=31536000, immutable";

async fn static_css() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/css; charset=utf-8"),
            (header::CACHE_CONTROL, STATIC_CACHE),
        ],
        APP_CSS,
    )
        .into_response()
}

async fn static_js() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/javascript; charset=utf-8"),
            (header::CACHE_CONTROL, STATIC_CACHE),
        ],
        APP_JS,
    )
        .into_response()
}

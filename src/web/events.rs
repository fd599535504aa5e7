//! `GET /events/runs`: every change to a run record the session's token may see, as
//! Server-Sent Events whose `data:` is the run's row ([`RunRow`] as JSON). `app.js`
//! inserts and updates the runs tables from it. The stream ends when the session does
//! (logout, expiry, revoked token) or the engine stops; a follower that falls behind
//! skips to the newest updates.

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::{Extension, State};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use tokio::sync::broadcast::error::RecvError;

use super::WebState;
use super::pages::{PluginScopes, RunRow};
use super::session::Authed;

pub async fn runs(State(web): State<WebState>, Extension(authed): Extension<Authed>) -> Response {
    let rx = web.app.scheduler.runs().subscribe();
    let scopes = PluginScopes::load(&web);
    let state = (rx, scopes, web, authed);
    let stream =
        futures_util::stream::unfold(state, |(mut rx, mut scopes, web, authed)| async move {
            loop {
                let rec = match rx.recv().await {
                    Ok(rec) => rec,
                    Err(RecvError::Lagged(n)) => {
                        tracing::debug!(
                            skipped = n,
                            "a dashboard run stream lagged; updates skipped"
                        );
                        continue;
                    }
                    Err(RecvError::Closed) => return None,
                };
                if !web.sessions.is_live(&authed.session) {
                    return None;
                }
                if authed.token.is_device_scoped() {
                    if !scopes.knows(&rec.plugin) {
                        scopes = PluginScopes::load(&web);
                    }
                    if !scopes.sees(&authed.token, &rec.plugin) {
                        continue;
                    }
                }
                let Ok(json) = serde_json::to_string(&RunRow::of(&rec)) else {
                    continue;
                };
                let event = Event::default().event("run").data(json);
                return Some((Ok::<_, Infallible>(event), (rx, scopes, web, authed)));
            }
        });
    Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response()
}

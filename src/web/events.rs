//! `GET /events/runs`: every change to a run record the session's token may see, as
//! Server-Sent Events whose `data:` is the run's row ([`RunRow`] as JSON). `app.js`
//! inserts and updates the runs tables from it. The stream ends when the session does
//! (logout, expiry, revoked token: looked at on each update and every 10 s) or the
//! engine stops; a follower that falls behind skips to the newest updates.

use std::collections::HashSet;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Extension, State};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use tokio::sync::broadcast;
use tokio::sync::broadcast::error::RecvError;

use super::WebState;
use super::pages::{RunRow, filter_for};
use super::session::Authed;
use crate::api::authz::PluginFilter;
use crate::runs::RunRecord;

pub async fn runs(State(web): State<WebState>, Extension(authed): Extension<Authed>) -> Response {
    let rx = web.app.scheduler.runs().subscribe();
    let filter = match filter_for(&web, &authed.token) {
        Ok(f) => f,
        Err(e) => return super::pages::internal("the plugins", e),
    };
    let stream = Follow {
        rx,
        filter,
        hidden: HashSet::new(),
        web,
        authed,
    };
    let stream = futures_util::stream::unfold(stream, |mut f| async move {
        let event = f.next().await?;
        Some((Ok::<_, Infallible>(event), f))
    });
    Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response()
}

/// How often a quiet stream checks that its session still holds.
const SESSION_RECHECK: Duration = Duration::from_secs(10);

/// One session's follow of the run store.
struct Follow {
    rx: broadcast::Receiver<Arc<RunRecord>>,
    filter: PluginFilter,
    /// Plugins found hidden since the filter was last worked out (a plugin installed
    /// since then is looked at once more).
    hidden: HashSet<String>,
    web: WebState,
    authed: Authed,
}

impl Follow {
    /// The next event for the session; `None` when the session or the engine ends.
    async fn next(&mut self) -> Option<Event> {
        loop {
            // A quiet stream still notices a logout, an expiry or a revoked token.
            let rec = match tokio::time::timeout(SESSION_RECHECK, self.rx.recv()).await {
                Err(_) => {
                    let tokens = &self.web.app.tokens;
                    self.web.sessions.check(&self.authed.session, tokens)?;
                    continue;
                }
                Ok(Ok(rec)) => rec,
                Ok(Err(RecvError::Lagged(n))) => {
                    tracing::debug!(
                        skipped = n,
                        "a dashboard run stream lagged; updates skipped"
                    );
                    continue;
                }
                Ok(Err(RecvError::Closed)) => return None,
            };
            if !self.web.sessions.is_live(&self.authed.session) {
                return None;
            }
            if !self.filter.allows(&rec.plugin) {
                if self.hidden.contains(&rec.plugin) {
                    continue;
                }
                if let Ok(f) = filter_for(&self.web, &self.authed.token) {
                    self.filter = f;
                    self.hidden.clear();
                }
                if !self.filter.allows(&rec.plugin) {
                    self.hidden.insert(rec.plugin.clone());
                    continue;
                }
            }
            let Ok(json) = serde_json::to_string(&RunRow::of(&rec)) else {
                continue;
            };
            return Some(Event::default().event("run").data(json));
        }
    }
}

//! One byte budget for request bodies read before their request is authenticated.
//!
//! A webhook delivery can only be verified once its whole body is in memory (the
//! signature covers it), so anyone can make the engine hold `max_body` bytes per request
//! for as long as the body takes to arrive. Each hook's `max_body` bounds one request;
//! this bounds them all together: every byte such a body holds is taken from one budget
//! (`server.preauth_body_budget`) while it is read and held, and a body that would go
//! past it is refused with 503 and `Retry-After` — at once when its `Content-Length`
//! says so, else as soon as its bytes would overdraw the budget. A body larger than the
//! whole budget can never fit and is refused with 413.
//!
//! Applied as a layer ([`PreauthBudget::wrap`]) to the routes that read bodies before
//! authenticating; routes that authenticate by a header first never read an
//! unauthenticated body and need none.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use axum::Json;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::header::{CONTENT_LENGTH, RETRY_AFTER};
use axum::http::{HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use hyper::body::{Frame, SizeHint};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Seconds a refused sender is asked to wait.
const RETRY_AFTER_SECS: u32 = 1;

/// The shared budget. Cheap to clone.
#[derive(Clone)]
pub struct PreauthBudget {
    bytes: Arc<Semaphore>,
    total: u64,
}

impl PreauthBudget {
    pub fn new(total: u64) -> PreauthBudget {
        let total = total.min(Semaphore::MAX_PERMITS as u64);
        PreauthBudget {
            bytes: Arc::new(Semaphore::new(total as usize)),
            total,
        }
    }

    /// Bytes not held by any body now.
    pub fn available(&self) -> u64 {
        self.bytes.available_permits() as u64
    }

    /// `router` with every request body it reads taken from this budget.
    pub fn wrap<S: Clone + Send + Sync + 'static>(
        &self,
        router: axum::Router<S>,
    ) -> axum::Router<S> {
        router.layer(axum::middleware::from_fn_with_state(self.clone(), limit))
    }

    fn refuse(&self, status: StatusCode) -> Response {
        let message = if status == StatusCode::PAYLOAD_TOO_LARGE {
            format!(
                "the request body is larger than the {} bytes all unauthenticated request bodies may hold together (server.preauth_body_budget)",
                self.total
            )
        } else {
            format!(
                "too many request bodies are being received before authentication (server.preauth_body_budget, {} bytes); retry in {RETRY_AFTER_SECS}s",
                self.total
            )
        };
        let kind = if status == StatusCode::PAYLOAD_TOO_LARGE {
            "too-large"
        } else {
            "unavailable"
        };
        let mut resp = (
            status,
            Json(serde_json::json!({ "error": { "kind": kind, "message": message } })),
        )
            .into_response();
        if status == StatusCode::SERVICE_UNAVAILABLE {
            resp.headers_mut()
                .insert(RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECS));
        }
        resp
    }
}

async fn limit(State(budget): State<PreauthBudget>, req: Request, next: Next) -> Response {
    let declared = req
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    if let Some(len) = declared {
        if len > budget.total {
            return budget.refuse(StatusCode::PAYLOAD_TOO_LARGE);
        }
        if len > budget.available() {
            tracing::debug!(len, "pre-auth body budget exhausted");
            return budget.refuse(StatusCode::SERVICE_UNAVAILABLE);
        }
    }
    let overdrawn = Arc::new(AtomicBool::new(false));
    let req = req.map(|inner| {
        Body::new(Budgeted {
            inner,
            budget: budget.bytes.clone(),
            held: None,
            overdrawn: overdrawn.clone(),
        })
    });
    let resp = next.run(req).await;
    if overdrawn.load(Ordering::SeqCst) {
        tracing::debug!("pre-auth body budget exhausted while reading a body");
        return budget.refuse(StatusCode::SERVICE_UNAVAILABLE);
    }
    resp
}

/// Why a budgeted body stopped.
#[derive(Debug, thiserror::Error)]
enum BudgetError {
    #[error("the pre-auth body budget (server.preauth_body_budget) is used up; retry shortly")]
    Exhausted,
    #[error(transparent)]
    Read(axum::Error),
}

/// A body whose bytes are taken from the budget as they arrive, and given back when the
/// body (with what was collected from it) is dropped.
struct Budgeted {
    inner: Body,
    budget: Arc<Semaphore>,
    held: Option<OwnedSemaphorePermit>,
    overdrawn: Arc<AtomicBool>,
}

impl hyper::body::Body for Budgeted {
    type Data = Bytes;
    type Error = BudgetError;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BudgetError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                let len = frame.data_ref().map_or(0, Bytes::len);
                if len > 0 {
                    let permits = u32::try_from(len).unwrap_or(u32::MAX);
                    match this.budget.clone().try_acquire_many_owned(permits) {
                        Ok(p) => match &mut this.held {
                            Some(h) => h.merge(p),
                            None => this.held = Some(p),
                        },
                        Err(_) => {
                            this.overdrawn.store(true, Ordering::SeqCst);
                            return Poll::Ready(Some(Err(BudgetError::Exhausted)));
                        }
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(BudgetError::Read(e)))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }
    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }
    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::routing::post;
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    /// A route that reads the body's first frame, then waits until told, holding it.
    fn app(budget: &PreauthBudget, hold: Arc<tokio::sync::Notify>) -> axum::Router {
        budget.wrap(axum::Router::new().route(
            "/hooks/x",
            post(move |mut body: Body| {
                let hold = hold.clone();
                async move {
                    match body.frame().await {
                        Some(Ok(_)) => {
                            hold.notified().await;
                            drop(body);
                            StatusCode::ACCEPTED.into_response()
                        }
                        other => {
                            (StatusCode::UNPROCESSABLE_ENTITY, format!("{other:?}")).into_response()
                        }
                    }
                }
            }),
        ))
    }

    fn post_body(len: usize, declare: bool) -> Request {
        let mut b = axum::http::Request::post("/hooks/x");
        if declare {
            b = b.header(CONTENT_LENGTH, len);
        }
        b.body(Body::from(vec![b'x'; len])).unwrap()
    }

    #[tokio::test]
    async fn bodies_past_the_budget_are_refused_with_503_and_retry_after_and_the_bytes_come_back() {
        let budget = PreauthBudget::new(1000);
        let hold = Arc::new(tokio::sync::Notify::new());
        let app = app(&budget, hold.clone());
        // One body of 600 bytes is held by its handler.
        let first = tokio::spawn(app.clone().oneshot(post_body(600, true)));
        while budget.available() == 1000 {
            tokio::task::yield_now().await;
        }
        assert_eq!(budget.available(), 400);
        // A declared 600 does not fit: refused without being read.
        let resp = app.clone().oneshot(post_body(600, true)).await.unwrap();
        assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(resp.headers()[RETRY_AFTER], "1");
        let text = resp.into_body().collect().await.unwrap().to_bytes();
        assert!(
            String::from_utf8_lossy(&text).contains("server.preauth_body_budget"),
            "{text:?}"
        );
        // An undeclared one is refused as its bytes overdraw the budget.
        let resp = app.clone().oneshot(post_body(600, false)).await.unwrap();
        assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
        // Larger than the whole budget: 413.
        let resp = app.clone().oneshot(post_body(1001, true)).await.unwrap();
        assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);
        // When the first is answered its bytes are back.
        hold.notify_one();
        assert_eq!(first.await.unwrap().unwrap().status(), StatusCode::ACCEPTED);
        assert_eq!(budget.available(), 1000);
        let resp = tokio::spawn(app.clone().oneshot(post_body(900, true)));
        while budget.available() == 1000 {
            tokio::task::yield_now().await;
        }
        hold.notify_one();
        assert_eq!(resp.await.unwrap().unwrap().status(), StatusCode::ACCEPTED);
    }
}

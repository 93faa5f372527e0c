//! The HTTP door's authentication middleware: where each route takes its token from, and the
//! 401 answer in the HTTP API's error format.

use axum::extract::{Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::auth::{Authenticator, TokenFrom, admit};
use crate::metrics::Metrics;

/// HTTP middleware for protected routes that take the token from the `authorization` header
/// only (publishes, listings): a cookie would let a cross-site form publish (CSRF), and a query
/// string ends up in access logs. Authenticates and stores the [`Access`], or answers 401.
pub async fn http_guard(
    State((auth, metrics)): State<(Authenticator, Metrics)>,
    request: Request,
    next: Next,
) -> Response {
    guard_http(&auth, &metrics, request, next, TokenFrom::Header).await
}

/// HTTP middleware for the reads a browser's `EventSource` (or a plain link) makes, which cannot
/// send headers: the `access_token` cookie or query parameter is accepted too.
pub async fn http_browser_guard(
    State((auth, metrics)): State<(Authenticator, Metrics)>,
    request: Request,
    next: Next,
) -> Response {
    guard_http(
        &auth,
        &metrics,
        request,
        next,
        TokenFrom::HeaderCookieOrQuery,
    )
    .await
}

async fn guard_http(
    auth: &Authenticator,
    metrics: &Metrics,
    mut request: Request,
    next: Next,
    from: TokenFrom,
) -> Response {
    match admit(auth, metrics, &mut request, from) {
        Ok(()) => next.run(request).await,
        Err(error) => {
            let mut response = super::error::ApiError::from(error).into_response();
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer"),
            );
            response
        }
    }
}

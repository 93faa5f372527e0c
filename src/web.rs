//! The web page under `web/`, embedded in the binary so the broker is one file to deploy.

use axum::Router;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;

/// Files of `web/`: (route, content type, contents).
const ASSETS: &[(&str, &str, &str)] = &[
    (
        "/",
        "text/html; charset=utf-8",
        include_str!("../web/index.html"),
    ),
    (
        "/app.js",
        "text/javascript; charset=utf-8",
        include_str!("../web/app.js"),
    ),
    (
        "/ws.js",
        "text/javascript; charset=utf-8",
        include_str!("../web/ws.js"),
    ),
    (
        "/style.css",
        "text/css; charset=utf-8",
        include_str!("../web/style.css"),
    ),
    (
        "/grpc-web.html",
        "text/html; charset=utf-8",
        include_str!("../web/grpc-web.html"),
    ),
    (
        "/grpc-web.js",
        "text/javascript; charset=utf-8",
        include_str!("../web/grpc-web.js"),
    ),
];

/// Routes serving the embedded page.
pub fn router<S: Clone + Send + Sync + 'static>() -> Router<S> {
    ASSETS
        .iter()
        .fold(Router::new(), |router, &(path, content_type, body)| {
            router.route(
                path,
                get(move || async move {
                    (
                        [
                            (header::CONTENT_TYPE, content_type),
                            (header::CACHE_CONTROL, "no-cache"),
                        ],
                        body,
                    )
                        .into_response()
                }),
            )
        })
}

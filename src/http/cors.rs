//! CORS, for browsers on other origins (REST, SSE and gRPC-Web): the one definition the router's
//! layer and the publish lane's fixed response head are both taken from.

use std::convert::Infallible;
use std::time::Duration;

use axum::http::{HeaderMap, Method, Request, Response, header};
use futures_util::FutureExt as _;
use tower::{Layer as _, Service as _};
use tower_http::cors::{Any, CorsLayer};

/// How long a browser may cache a preflight's answer.
const PREFLIGHT_MAX_AGE: Duration = Duration::from_secs(24 * 3600);

/// The CORS layer around the whole application: any origin, any request header, and gRPC's
/// status trailers readable by gRPC-Web clients.
pub fn layer() -> CorsLayer {
    CorsLayer::new()
        .allow_origin(Any)
        .allow_methods([Method::GET, Method::POST, Method::DELETE, Method::OPTIONS])
        .allow_headers(Any)
        .expose_headers([
            header::HeaderName::from_static("grpc-status"),
            header::HeaderName::from_static("grpc-message"),
            header::HeaderName::from_static("grpc-status-details-bin"),
        ])
        .max_age(PREFLIGHT_MAX_AGE)
}

/// The headers [`layer`] adds to the answer of a `POST` (not a preflight), whatever its
/// `Origin`: found by running the layer itself once, so that an answer written without the
/// router (the publish lane's) cannot drift from one written through it.
pub(crate) fn simple_response_headers() -> HeaderMap {
    let mut service = layer().layer(tower::service_fn(|_: Request<()>| async {
        Ok::<_, Infallible>(Response::new(()))
    }));
    let request = Request::post("/").body(()).expect("a valid request");
    let response = service
        .call(request)
        .now_or_never()
        .expect("the CORS layer answers a simple request at once")
        .expect("infallible");
    response.headers().clone()
}

//! The gRPC door's authentication middleware: the `authorization` metadata, answered with
//! UNAUTHENTICATED in gRPC's own format.

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::Response;

use crate::auth::{Authenticator, TokenFrom, admit};
use crate::metrics::Metrics;

/// gRPC services open to everyone: health checks and reflection.
const OPEN_GRPC_SERVICES: [&str; 3] = [
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1.ServerReflection/",
    "/grpc.reflection.v1alpha.ServerReflection/",
];

/// gRPC middleware: authenticates calls to the pub/sub services from the `authorization`
/// metadata and stores the [`Access`], or answers UNAUTHENTICATED.
pub async fn grpc_guard(
    State((auth, metrics)): State<(Authenticator, Metrics)>,
    mut request: Request,
    next: Next,
) -> Response {
    let path = request.uri().path();
    if OPEN_GRPC_SERVICES.iter().any(|open| path.starts_with(open)) {
        return next.run(request).await;
    }
    match admit(&auth, &metrics, &mut request, TokenFrom::Metadata) {
        Ok(()) => next.run(request).await,
        Err(error) => tonic::Status::from(error).into_http(),
    }
}

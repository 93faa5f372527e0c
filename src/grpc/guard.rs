//! The gRPC door's gate: authentication from the `authorization` metadata (answered with
//! UNAUTHENTICATED in gRPC's own format) and the request-body deadline of [`super::deadline`].
//!
//! It is a plain tower layer rather than axum middleware (`axum::middleware::from_fn`): that
//! clones its inner service and boxes it and its future on every call, and each layer a router
//! applies wraps every route in one more boxed service that is cloned per call too. On the unary
//! `Publish` path those allocations were the largest user-space cost (see `bench/README.md`).

use std::convert::Infallible;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::extract::Request;
use axum::response::Response;
use bytes::Bytes;
use futures_util::future::{Either, Ready, ready};

use super::deadline;
use crate::auth::{Authenticator, TokenFrom, admit};
use crate::metrics::Metrics;

/// gRPC services open to everyone: health checks and reflection.
const OPEN_GRPC_SERVICES: [&str; 3] = [
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1.ServerReflection/",
    "/grpc.reflection.v1alpha.ServerReflection/",
];

/// Layer: authenticates calls to the pub/sub services from the `authorization` metadata and
/// stores the [`crate::auth::Access`], or answers UNAUTHENTICATED; then bounds the time the
/// request's messages take to arrive (`--http-body-timeout`).
#[derive(Clone)]
pub struct GateLayer {
    auth: Authenticator,
    metrics: Metrics,
    body_timeout: Duration,
}

impl GateLayer {
    /// The gate checking tokens with `auth` (failures counted in `metrics`) and request bodies
    /// against `body_timeout`.
    pub fn new(auth: Authenticator, metrics: Metrics, body_timeout: Duration) -> GateLayer {
        GateLayer {
            auth,
            metrics,
            body_timeout,
        }
    }
}

impl<S> tower::Layer<S> for GateLayer {
    type Service = Gate<S>;

    fn layer(&self, inner: S) -> Gate<S> {
        Gate {
            inner,
            gate: self.clone(),
        }
    }
}

/// The service [`GateLayer`] puts in front of the gRPC services.
#[derive(Clone)]
pub struct Gate<S> {
    inner: S,
    gate: GateLayer,
}

impl<S, B> tower::Service<http::Request<B>> for Gate<S>
where
    S: tower::Service<Request, Response = Response, Error = Infallible>,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<axum::BoxError>,
{
    type Response = Response;
    type Error = Infallible;
    type Future = Either<Ready<Result<Response, Infallible>>, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let mut request = request.map(Body::new);
        let path = request.uri().path();
        if !OPEN_GRPC_SERVICES.iter().any(|open| path.starts_with(open))
            && let Err(error) = admit(
                &self.gate.auth,
                &self.gate.metrics,
                &mut request,
                TokenFrom::Metadata,
            )
        {
            return Either::Left(ready(Ok(tonic::Status::from(error).into_http())));
        }
        Either::Right(
            self.inner
                .call(deadline::bound(request, self.gate.body_timeout)),
        )
    }
}

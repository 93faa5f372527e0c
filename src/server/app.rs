//! The application every connection serves: the gRPC services (tonic, with gRPC-Web, health and
//! reflection) and the HTTP routes (axum, with the WebSocket door) merged into one router, with
//! the layers every request passes: trace, CORS, the door count, panic guards.

use std::any::Any;

use axum::Router;
use axum::extract::Request;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use tokio_util::sync::CancellationToken;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::trace::TraceLayer;

use crate::auth::Authenticator;
use crate::config::ServerConfig;
use crate::error::Error;
use crate::grpc::seed::SeedService;
use crate::grpc::seed::server::pub_sub_service_server::PubSubServiceServer;
use crate::grpc::wire::v1::pub_sub_server::PubSubServer;
use crate::grpc::{self, PubSubService};
use crate::http::{self, AppState};
use crate::hub::Hub;
use crate::limits::{Connection, Limits};
use crate::metrics::{ConnectionDoor, Door};
use crate::proto;
use crate::ws;

/// the refusal (429 / RESOURCE_EXHAUSTED), and HTTP/1.1 clients are told to close.
pub(super) fn refused(refusal: Error) -> Router {
    let message = refusal.to_string();
    Router::new().fallback(move |request: Request| {
        let message = message.clone();
        async move {
            if is_grpc(&request) {
                tonic::Status::resource_exhausted(message).into_http()
            } else {
                http::error::ApiError::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    "RESOURCE_EXHAUSTED",
                    message,
                )
                .closing_connection()
                .into_response()
            }
        }
    })
}

/// The whole application: gRPC (+ gRPC-Web), REST, SSE, docs and the web page.
pub fn app(
    hub: Hub,
    auth: Authenticator,
    limits: Limits,
    config: &ServerConfig,
    shutdown: CancellationToken,
    health_service: tonic_health::pb::health_server::HealthServer<
        impl tonic_health::pb::health_server::Health,
    >,
) -> Router {
    let max_decoding = grpc::max_decoding_message_size(config.max_payload_bytes);
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection()
        .build_v1()
        .expect("the embedded descriptor sets are valid");
    let reflection_v1alpha = reflection()
        .build_v1alpha()
        .expect("the embedded descriptor sets are valid");

    // The gRPC services' names, for the routes that lead to them.
    fn name<S: tonic::server::NamedService>(_: &S) -> &'static str {
        S::NAME
    }
    let pubsub = PubSubServer::new(PubSubService::new(
        hub.clone(),
        limits.clone(),
        shutdown.clone(),
    ))
    .max_decoding_message_size(max_decoding);
    let seed = PubSubServiceServer::new(SeedService::new(
        hub.clone(),
        limits.clone(),
        shutdown.clone(),
    ))
    .max_decoding_message_size(max_decoding);
    let names = [
        name(&pubsub),
        name(&seed),
        name(&health_service),
        name(&reflection_v1),
        name(&reflection_v1alpha),
    ];
    let mut services = tonic::service::Routes::builder();
    services
        .add_service(pubsub)
        .add_service(seed)
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha);
    // The layers every gRPC call passes, composed as one service (outermost first): a
    // router's `layer` would box each of them per route and clone the boxes on every call.
    // gRPC-Web only on the gRPC routes: on plain HTTP/1 routes it would answer 400. The gate
    // runs inside gRPC-Web's translation: the body is gRPC-framed by then, for both kinds.
    let grpc_calls = tower::ServiceBuilder::new()
        .layer(CatchPanicLayer::custom(grpc_panic as fn(_) -> _))
        .layer(tonic_web::GrpcWebLayer::new())
        .layer(grpc::guard::GateLayer::new(
            auth.clone(),
            hub.metrics().clone(),
            config.http_body_timeout,
        ))
        .service(services.routes().into_axum_router());
    let grpc = names.into_iter().fold(Router::new(), |router, name| {
        router.route_service(&format!("/{name}/{{*method}}"), grpc_calls.clone())
    });

    let state = AppState {
        hub,
        auth,
        limits,
        http_body_timeout: config.http_body_timeout,
        shutdown,
        sse_keepalive: config.sse_keepalive,
    };
    // The WebSocket door's route sits in the HTTP router (behind its guard); what it needs
    // beyond the HTTP state travels in the request's extensions.
    let ws_door = ws::WsDoor {
        hub: state.hub.clone(),
        limits: state.limits.clone(),
        shutdown: state.shutdown.clone(),
        keepalive_interval: config.keepalive_interval,
        keepalive_timeout: config.keepalive_timeout,
    };
    let rest = http::router(state)
        .layer(axum::Extension(ws_door))
        .method_not_allowed_fallback(http::method_not_allowed)
        .layer(CatchPanicLayer::custom(http_panic));

    let routes = grpc
        .merge(rest)
        // `Routes` brings a gRPC fallback; ours answers both kinds of client.
        .fallback(fallback);
    // Around the whole router as one service, for the same reason as the gRPC layers.
    let layers = tower::ServiceBuilder::new()
        .layer(TraceLayer::new_for_http().make_span_with(request_span as fn(&Request) -> _))
        .layer(http::cors::layer())
        // Inside CORS: a preflight is not a request of any door.
        .layer(tower::util::MapRequestLayer::new(mark_door))
        .service(routes);
    Router::new().fallback_service(layers)
}

/// The span of a request, as tower-http's default one but with any `access_token` in the URI
/// blanked: debug logs must not hand out tokens.
fn request_span<B>(request: &Request<B>) -> tracing::Span {
    let connection = request.extensions().get::<Connection>();
    tracing::debug_span!(
        "request",
        method = %request.method(),
        uri = %crate::logging::uri(request.uri()),
        version = ?request.version(),
        peer = connection.map(|c| tracing::field::display(c.peer)),
        client = connection
            .and_then(|c| c.certificate_subject.as_deref())
            .map(tracing::field::display),
    )
}

/// Unknown routes: UNIMPLEMENTED for gRPC and gRPC-Web clients, a JSON 404 for everyone else.
async fn fallback(request: Request) -> Response {
    if is_grpc(&request) {
        tonic::Status::unimplemented("unknown service or method; list them with server reflection")
            .into_http()
    } else {
        http::not_found().await.into_response()
    }
}

/// Notes the door of every request: its connection is counted under the door of its first
/// one, and gRPC handlers learn that a call is gRPC-Web, which tonic-web's translation hides
/// from them. (A plain request map: nothing boxed per request.)
fn mark_door(mut request: Request) -> Request {
    let door = door_of(&request);
    if let Some(connection) = request.extensions().get::<Connection>() {
        connection.enter(door);
    }
    if door == ConnectionDoor::GrpcWeb {
        request.extensions_mut().insert(Door::GrpcWeb);
    }
    request
}

fn door_of(request: &Request) -> ConnectionDoor {
    let content_type = request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if content_type.starts_with("application/grpc-web") {
        ConnectionDoor::GrpcWeb
    } else if content_type.starts_with("application/grpc") {
        ConnectionDoor::Grpc
    } else if request.uri().path() == "/subscribe" {
        ConnectionDoor::Sse
    } else if request.uri().path() == "/ws" {
        ConnectionDoor::Ws
    } else {
        ConnectionDoor::Http
    }
}

pub(super) fn is_grpc(request: &Request) -> bool {
    request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"))
}

fn panic_message(panic: &(dyn Any + Send)) -> &str {
    panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(non-string panic)")
}

fn grpc_panic(panic: Box<dyn Any + Send + 'static>) -> Response {
    tracing::error!(panic = panic_message(&*panic), "gRPC handler panicked");
    tonic::Status::internal("internal error; the server logged the details").into_http()
}

fn http_panic(panic: Box<dyn Any + Send + 'static>) -> Response {
    tracing::error!(panic = panic_message(&*panic), "HTTP handler panicked");
    http::error::ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "INTERNAL",
        "internal error; the server logged the details",
    )
    .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::routing::{get, post};
    use tower::ServiceExt as _;

    async fn boom() -> &'static str {
        panic!("handler bug")
    }

    /// The panic guards `app` installs turn a handler panic into a clean error, and the router
    /// keeps serving the next request.
    #[tokio::test]
    async fn handler_panics_become_internal_errors_and_serving_continues() {
        let grpc: Router = Router::new()
            .route("/topichub.v1.PubSub/Publish", post(boom))
            .layer(CatchPanicLayer::custom(grpc_panic));
        let request = || {
            Request::post("/topichub.v1.PubSub/Publish")
                .header("content-type", "application/grpc")
                .body(Body::empty())
                .unwrap()
        };
        for _ in 0..2 {
            let response = grpc.clone().oneshot(request()).await.unwrap();
            assert_eq!(
                response.status(),
                StatusCode::OK,
                "gRPC carries errors in grpc-status"
            );
            assert_eq!(
                response.headers()["grpc-status"],
                (tonic::Code::Internal as i32).to_string()
            );
        }

        let rest: Router = Router::new()
            .route("/boom", get(boom))
            .route("/ok", get(|| async { "ok" }))
            .layer(CatchPanicLayer::custom(http_panic));
        let response = rest
            .clone()
            .oneshot(Request::get("/boom").body(Body::empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
        let body = axum::body::to_bytes(response.into_body(), 4096)
            .await
            .unwrap();
        let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(json["error"]["code"], "INTERNAL");
        assert!(
            !json["error"]["message"]
                .as_str()
                .unwrap()
                .contains("handler bug"),
            "details stay in the log"
        );
        let response = rest
            .oneshot(Request::get("/ok").body(Body::empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
    }
}

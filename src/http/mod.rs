//! HTTP/JSON doors (axum): publish, SSE subscribe, topics, history, health, the OpenAPI document,
//! Swagger UI and the web page. Handlers validate, call the hub and convert.

pub mod cors;
pub mod error;
mod guard;
pub mod json;
pub(crate) mod publish_conn;
pub mod sse;
pub(crate) mod sse_conn;

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::body::Body;
use axum::body::Bytes;
use axum::extract::{Extension, Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode, header};
use tokio_util::sync::CancellationToken;
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::auth::{self, Access, Authenticator};
use crate::cursor::Cursor;
use crate::hub::{Headers, Hub};
use crate::idempotency;
use crate::limits::{Connection, Limits};
use crate::metrics::{Door, Snapshot};
use crate::topic::{Pattern, Topic};
use error::{ApiError, ErrorBody};
use json::{DeletedJson, Health, HistoryJson, PresencePageJson, PublishBody, Published, TopicList};

/// The request header naming a publish for de-duplication (draft-ietf-httpapi-idempotency-key).
pub const IDEMPOTENCY_KEY: &str = "idempotency-key";

/// Most messages one history request returns.
pub const MAX_HISTORY_LIMIT: usize = 1000;

/// Most bytes of message JSON one history page carries; a page is cut before the message that
/// would take it over (`more: true`, and `next` continues from the last message sent). The first
/// message is always sent, so a page over one large message is that message alone.
pub const MAX_HISTORY_PAGE_BYTES: usize = 8 * 1024 * 1024;

/// What HTTP handlers share: the hub, the authenticator and the server's shutdown signal.
#[derive(Clone)]
pub struct AppState {
    /// The hub.
    pub hub: Hub,
    /// Verifies bearer tokens on the protected routes.
    pub auth: Authenticator,
    /// Per-client publish rate.
    pub limits: Limits,
    /// Time a client has to send a publish request's body.
    pub http_body_timeout: Duration,
    /// Cancelled on shutdown; SSE streams end with an `end` event.
    pub shutdown: CancellationToken,
    /// Interval of SSE keep-alive comments.
    pub sse_keepalive: Duration,
}

/// The OpenAPI document's fixed parts; paths come from the handlers.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "topichub HTTP API",
        description = "Publish over HTTP/JSON and subscribe over Server-Sent Events. The same hub serves gRPC (`topichub.v1.PubSub`) and gRPC-Web on the same port; a message published through any door reaches subscribers on every door. Errors are `{\"error\": {\"code\", \"message\"}}` with grpc-gateway's status mapping.",
        license(name = "MIT OR Apache-2.0")
    ),
    tags(
        (name = "publish", description = "Publish messages"),
        (name = "subscribe", description = "Follow topics over SSE"),
        (name = "topics", description = "Topics and retained history"),
        (name = "operations", description = "Health"),
    ),
    components(schemas(json::SubscribedJson, json::GapJson, json::LagJson, json::MessageJson, ErrorBody, json::TopicName, json::TopicPattern, json::CursorText))
)]
struct ApiDoc;

/// Where a protected route takes its token from.
enum Guard {
    /// The `authorization` header only.
    Header,
    /// Also the `access_token` cookie or query parameter.
    Browser,
}

/// The REST/SSE routes and their OpenAPI document.
fn api(state: AppState) -> (Router, utoipa::openapi::OpenApi) {
    // Everything but health needs a token when authentication is on. Only the requests a
    // browser's EventSource, WebSocket (neither can set headers) or a link makes may carry it as
    // a cookie or query parameter.
    let guard = |router: OpenApiRouter<AppState>, guard| {
        let paths: Vec<String> = router.get_openapi().paths.paths.keys().cloned().collect();
        let state = (state.auth.clone(), state.hub.metrics().clone());
        let router = match guard {
            Guard::Header => router.route_layer(axum::middleware::from_fn_with_state(
                state,
                guard::http_guard,
            )),
            Guard::Browser => router.route_layer(axum::middleware::from_fn_with_state(
                state,
                guard::http_browser_guard,
            )),
        };
        (router, paths)
    };
    let (header_only, header_paths) = guard(
        OpenApiRouter::new()
            .routes(routes!(publish))
            .routes(routes!(publish_raw, delete_topic))
            .routes(routes!(list_topics)),
        Guard::Header,
    );
    let (browser, browser_paths) = guard(
        OpenApiRouter::new()
            .routes(routes!(sse::subscribe))
            .routes(routes!(history))
            .routes(routes!(presence))
            .routes(routes!(crate::ws::connect)),
        Guard::Browser,
    );
    let protected = header_only.merge(browser);
    let (router, mut openapi) = OpenApiRouter::with_openapi(ApiDoc::openapi())
        .merge(protected)
        .routes(routes!(healthz))
        .routes(routes!(metrics))
        .split_for_parts();
    document_auth(&mut openapi, &header_paths, &browser_paths);
    json::document_publish_rule(&mut openapi);
    crate::ws::document(&mut openapi);
    let router = router.with_state(state);
    (router, openapi)
}

/// Adds the bearer-token security schemes, and to each protected operation its security
/// requirements (a token, or none when the server runs without keys), its 401/403 answers, the
/// 429 of the limits, and for publishes the 408 of a body that does not arrive in time. The
/// `access_token` cookie or query parameter is documented only on `browser_paths`.
fn document_auth(
    openapi: &mut utoipa::openapi::OpenApi,
    header_paths: &[String],
    browser_paths: &[String],
) {
    use utoipa::openapi::security::{
        ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme,
    };
    use utoipa::openapi::{ContentBuilder, Ref, ResponseBuilder};
    let components = openapi.components.get_or_insert_with(Default::default);
    components.add_security_scheme(
        "bearer",
        SecurityScheme::Http(
            HttpBuilder::new()
                .scheme(HttpAuthScheme::Bearer)
                .bearer_format("JWT")
                .description(Some(
                    "A JWT whose `topichub` claim lists `publish` and `subscribe` topic patterns. Required only when the server is started with a key (--jwt-secret, --jwt-public-key or --jwks).",
                ))
                .build(),
        ),
    );
    components.add_security_scheme(
        "access_token",
        SecurityScheme::ApiKey(ApiKey::Query(ApiKeyValue::with_description(
            auth::TOKEN_PARAM,
            "The same JWT as a query parameter (or cookie `access_token`), for browsers' EventSource, which cannot send headers. Accepted only by GET /subscribe and GET /topics/{topic}/messages; elsewhere it is refused with 401.",
        ))),
    );
    let error = |description: &str| {
        ResponseBuilder::new()
            .description(description)
            .content(
                "application/json",
                ContentBuilder::new()
                    .schema(Some(Ref::from_schema_name("ErrorBody")))
                    .build(),
            )
            .build()
    };
    let paths = header_paths.iter().map(|p| (p, false));
    for (path, browser) in paths.chain(browser_paths.iter().map(|p| (p, true))) {
        let Some(item) = openapi.paths.paths.get_mut(path) else {
            continue;
        };
        if let Some(post) = &mut item.post {
            post.responses.responses.insert(
                "408".into(),
                error("The request body did not arrive within --http-body-timeout").into(),
            );
        }
        for operation in [&mut item.get, &mut item.post, &mut item.delete]
            .into_iter()
            .flatten()
        {
            let mut security = vec![
                SecurityRequirement::default(),
                SecurityRequirement::new("bearer", Vec::<String>::new()),
            ];
            if browser {
                security.push(SecurityRequirement::new(
                    "access_token",
                    Vec::<String>::new(),
                ));
            }
            operation.security = Some(security);
            let responses = &mut operation.responses.responses;
            responses.insert(
                "401".into(),
                error("Missing, malformed or expired token, or a token where this route does not take it (only when authentication is on)")
                    .into(),
            );
            responses.insert(
                "403".into(),
                error("The token does not allow this topic or pattern (deleting a topic: the token has no admin claim)").into(),
            );
            responses.insert(
                "429".into(),
                error("A limit was reached (connections, subscriptions, topics per subscription, publish rate); the message names it").into(),
            );
        }
    }
}

/// The OpenAPI document of the HTTP API (committed as `openapi/openapi.json`).
pub fn openapi() -> utoipa::openapi::OpenApi {
    let state = AppState {
        hub: Hub::new(Default::default()),
        auth: Authenticator::default(),
        limits: Limits::new(
            crate::limits::LimitsConfig {
                max_connections: 0,
                max_subscriptions_per_connection: 0,
                publish_rate: 0,
                publish_burst: 0,
            },
            Default::default(),
        ),
        http_body_timeout: Duration::from_secs(30),
        shutdown: CancellationToken::new(),
        sse_keepalive: Duration::from_secs(15),
    };
    api(state).1
}

/// Every HTTP route: the API, `/openapi.json`, `/swagger-ui/` and the web page.
pub fn router(state: AppState) -> Router {
    let (api, openapi) = api(state);
    api.merge(utoipa_swagger_ui::SwaggerUi::new("/swagger-ui").url("/openapi.json", openapi))
        .merge(crate::web::router())
}

/// JSON 404 for unknown routes.
pub async fn not_found() -> ApiError {
    ApiError::not_found("no such route; see /openapi.json or /swagger-ui/ for the HTTP API")
}

/// JSON 405 for a known route called with the wrong method.
pub async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        crate::error::Kind::Unimplemented.code_name(),
        "method not allowed on this route; see /openapi.json",
    )
}

/// Publish a JSON message.
///
/// `payload` may be a string (published as its text) or any JSON value (published as JSON with
/// `content-type: application/json`); use `payload_base64` for binary bodies.
#[utoipa::path(
    post,
    path = "/publish",
    tag = "publish",
    params(IdempotencyKeyHeader),
    request_body(content = PublishBody, content_type = "application/json"),
    responses(
        (status = 200, description = "Accepted; `duplicate: true` when it answers a retry under an idempotency key", body = Published),
        (status = 400, description = "Malformed JSON, invalid topic, wildcard topic, bad base64, or an invalid idempotency key", body = ErrorBody),
        (status = 409, description = "The idempotency key was already used for another message (another topic or payload) within the window", body = ErrorBody),
        (status = 413, description = "Payload over the server limit", body = ErrorBody),
        (status = 503, description = "The log could not store the message (e.g. the disk is full); nothing was published", body = ErrorBody),
    )
)]
async fn publish(
    State(state): State<AppState>,
    Extension(access): Extension<Access>,
    Extension(connection): Extension<Connection>,
    request_headers: HeaderMap,
    body: Body,
) -> Result<Json<Published>, ApiError> {
    let body = read_body(&state, body).await?;
    let (topic, payload, headers) = PublishBody::parse(&body)?;
    let key = idempotency_key(&request_headers)?;
    access.check_publish(&topic)?;
    state.limits.check_publish(&access, &connection)?;
    publish_once(&state, topic, payload, headers, key).await
}

/// Publishes through the HTTP door and answers with the message's (or, for a retry, the
/// original's) place in history.
async fn publish_once(
    state: &AppState,
    topic: Topic,
    payload: Bytes,
    headers: Headers,
    key: Option<Arc<str>>,
) -> Result<Json<Published>, ApiError> {
    let publishing = state.hub.publish_once(topic, payload, headers, key);
    let (message, duplicate) = publishing.settled().await?;
    // A retry is answered, not published again.
    if !duplicate {
        state.hub.metrics().published(Door::Http);
    }
    Ok(Json(Published::of(&message, duplicate)))
}

/// The `Idempotency-Key` header of both publish routes, as the OpenAPI document describes it
/// (the handlers read it with [`idempotency_key`]).
#[derive(utoipa::IntoParams)]
#[into_params(parameter_in = Header)]
#[allow(dead_code)]
struct IdempotencyKeyHeader {
    // One line: it is the parameter's description in the OpenAPI document.
    /// Names this message so that a retry is not published twice: a retry with the same key, topic and payload within the server's window (--idempotency-window, 2 minutes by default) is answered with the original's cursor and `duplicate: true`; the same key for another topic or payload is refused (409)
    #[param(
        rename = "Idempotency-Key",
        nullable = false,
        min_length = 1,
        max_length = 128,
        pattern = "^[!-~]{1,128}$",
        example = "7c0e2f4a-5b1d-4f8e-9a3c-2d6b8e1f0a47"
    )]
    idempotency_key: Option<String>,
}

/// The request's idempotency key: its `Idempotency-Key` header.
fn idempotency_key(request_headers: &HeaderMap) -> Result<Option<Arc<str>>, ApiError> {
    let mut values = request_headers.get_all(IDEMPOTENCY_KEY).iter();
    // Not `to_str`: a value that is not ASCII gets the key rules' own message.
    match (values.next(), values.next()) {
        (None, _) => Ok(None),
        (Some(value), None) => Ok(Some(idempotency::parse_key(&String::from_utf8_lossy(
            value.as_bytes(),
        ))?)),
        (Some(_), Some(_)) => Err(ApiError::bad_request(
            "give one Idempotency-Key header, not several",
        )),
    }
}

/// Publish the request body as is.
///
/// The body becomes the payload byte for byte; the request's `Content-Type` travels with the
/// message as its `content-type` header.
#[utoipa::path(
    post,
    path = "/topics/{topic}",
    tag = "publish",
    params(
        ("topic" = json::TopicName, Path, description = "Concrete topic (no wildcards)"),
        IdempotencyKeyHeader,
    ),
    request_body(content = Option<String>, description = "The payload (may be empty)", content_type = "application/octet-stream"),
    responses(
        (status = 200, description = "Accepted; `duplicate: true` when it answers a retry under an idempotency key", body = Published),
        (status = 400, description = "Invalid topic, wildcard topic, or an invalid idempotency key", body = ErrorBody),
        (status = 409, description = "The idempotency key was already used for another message (another topic or payload) within the window", body = ErrorBody),
        (status = 413, description = "Payload over the server limit", body = ErrorBody),
        (status = 503, description = "The log could not store the message (e.g. the disk is full); nothing was published", body = ErrorBody),
    )
)]
async fn publish_raw(
    State(state): State<AppState>,
    Extension(access): Extension<Access>,
    Extension(connection): Extension<Connection>,
    Path(topic): Path<String>,
    request_headers: HeaderMap,
    body: Body,
) -> Result<Json<Published>, ApiError> {
    let topic = Topic::parse(&topic)?;
    let key = idempotency_key(&request_headers)?;
    access.check_publish(&topic)?;
    state.limits.check_publish(&access, &connection)?;
    let body = read_body(&state, body).await?;
    let mut headers = Headers::new();
    if let Some(content_type) = request_headers.get(header::CONTENT_TYPE) {
        let text = content_type
            .to_str()
            .map_err(|_| ApiError::bad_request("Content-Type must be ASCII"))?;
        headers.insert("content-type".into(), text.to_owned());
    }
    publish_once(&state, topic, body, headers, key).await
}

/// List topics that have retained messages or live subscribers, a page at a time.
///
/// Topics come in name order; when more follow, `next` names the last one listed: pass it as
/// `after` for the next page. With authentication on, only topics the token may subscribe to.
#[utoipa::path(
    get,
    path = "/topics",
    tag = "topics",
    params(
        ("pattern" = Option<String>, Query, description = "Only topics matching this topic or pattern (empty: all topics)", example = "demo.>", max_length = 255, pattern = r"^((([A-Za-z0-9_:-]+|\*)\.)*([A-Za-z0-9_:-]+|\*|>))?$"),
        ("after" = Option<String>, Query, description = "Only topics named after this one: the `next` of the previous page (absent or empty: from the first)", example = "demo.greetings", max_length = 255, pattern = r"^([A-Za-z0-9_:-]+(\.[A-Za-z0-9_:-]+)*)?$"),
        ("limit" = Option<usize>, Query, description = "At most this many topics (default 1000, at most 10000)", minimum = 1, maximum = 10000),
    ),
    responses(
        (status = 200, description = "A page of topics sorted by name", body = TopicList),
        (status = 400, description = "Invalid pattern, after or limit", body = ErrorBody),
    )
)]
async fn list_topics(
    State(state): State<AppState>,
    Extension(access): Extension<Access>,
    RawQuery(query): RawQuery,
) -> Result<Json<TopicList>, ApiError> {
    let mut pattern = String::new();
    let mut after = String::new();
    let mut limit = crate::connect::DEFAULT_TOPICS_LIMIT;
    for (key, value) in form_urlencoded::parse(query.as_deref().unwrap_or("").as_bytes()) {
        match &*key {
            "pattern" => pattern = value.into_owned(),
            "after" => after = value.into_owned(),
            "limit" => limit = page_limit(&value, crate::connect::MAX_TOPICS_LIMIT)?,
            auth::TOKEN_PARAM => {}
            other => {
                return Err(ApiError::bad_request(format!(
                    "unknown query parameter {other:?}; /topics takes pattern, after, limit"
                )));
            }
        }
    }
    let page = crate::connect::list_topics(&state.hub, &access, &pattern, &after, limit)?;
    Ok(Json(page.into()))
}

/// Read retained messages of a topic (or pattern), oldest first.
#[utoipa::path(
    get,
    path = "/topics/{topic}/messages",
    tag = "topics",
    params(
        ("topic" = json::TopicPattern, Path, description = "Topic or pattern", example = "demo.greetings"),
        ("after" = Option<json::CursorText>, Query, description = "Only messages after this cursor (`EPOCH-SEQ`); default: from the oldest retained"),
        ("limit" = Option<usize>, Query, description = "At most this many messages (default 100, at most 1000). A page also stops before the message that would take its messages' JSON over 8 MiB (always holding at least one); `more` is then true and `next` continues after the last message returned.", minimum = 1, maximum = 1000),
    ),
    responses(
        (status = 200, description = "A page of history: at most `limit` messages and 8 MiB of message JSON (at least one message). Pages over 64 KiB are streamed (chunked) as they are encoded.", body = HistoryJson),
        (status = 400, description = "Invalid topic, cursor or limit; or a cursor ahead of the hub", body = ErrorBody),
    )
)]
async fn history(
    State(state): State<AppState>,
    Extension(access): Extension<Access>,
    Path(topic): Path<String>,
    RawQuery(query): RawQuery,
) -> Result<axum::response::Response, ApiError> {
    let pattern = Pattern::parse(&topic)?;
    access.check_subscribe(std::slice::from_ref(&pattern))?;
    let mut after = None;
    let mut limit = 100;
    for (key, value) in form_urlencoded::parse(query.as_deref().unwrap_or("").as_bytes()) {
        match &*key {
            "after" => after = Some(value.parse::<Cursor>()?),
            auth::TOKEN_PARAM => {}
            "limit" => limit = page_limit(&value, MAX_HISTORY_LIMIT)?,
            other => {
                return Err(ApiError::bad_request(format!(
                    "unknown query parameter {other:?}; this route takes after, limit"
                )));
            }
        }
    }
    if let Some(cursor) = &after {
        state.hub.wait_applied(cursor).await;
    }
    let page = state.hub.history(&pattern, after.as_ref(), limit)?;
    use axum::response::IntoResponse as _;
    let mut pieces = json::HistoryPage::new(page, MAX_HISTORY_PAGE_BYTES);
    // A small page goes out whole, with its length; a larger one is streamed as it is encoded.
    let mut start = Vec::new();
    let mut size = 0;
    while size <= HISTORY_WHOLE_BYTES {
        let Some(piece) = pieces.next() else {
            let whole: Vec<u8> = start.concat();
            return Ok(([(header::CONTENT_TYPE, "application/json")], whole).into_response());
        };
        size += piece.len();
        start.push(piece);
    }
    let rest = start.into_iter().chain(pieces);
    Ok((
        [(header::CONTENT_TYPE, "application/json")],
        Body::from_stream(futures_util::stream::iter(
            rest.map(Ok::<_, std::convert::Infallible>),
        )),
    )
        .into_response())
}

/// List the live subscriptions of a topic or pattern.
///
/// For a topic: every subscription a message published to it would reach (those naming it and
/// those whose patterns match it). For a pattern: the subscriptions that named that pattern.
/// `subscribers` counts them all; `members` is one page, oldest first.
#[utoipa::path(
    get,
    path = "/topics/{topic}/presence",
    tag = "topics",
    params(
        ("topic" = json::TopicPattern, Path, description = "Topic or pattern", example = "demo.greetings"),
        ("after" = Option<i64>, Query, minimum = 0, description = "Where the page starts: the `next` of the previous page (absent or 0: the first page)"),
        ("limit" = Option<usize>, Query, description = "At most this many subscriptions (default 100, at most 1000)", minimum = 1, maximum = 1000),
    ),
    responses(
        (status = 200, description = "A page of the live subscriptions", body = PresencePageJson),
        (status = 400, description = "Invalid topic, pattern, position or limit", body = ErrorBody),
    )
)]
async fn presence(
    State(state): State<AppState>,
    Extension(access): Extension<Access>,
    Path(topic): Path<String>,
    RawQuery(query): RawQuery,
) -> Result<Json<PresencePageJson>, ApiError> {
    let mut after = 0;
    let mut limit = crate::connect::DEFAULT_PRESENCE_LIMIT;
    for (key, value) in form_urlencoded::parse(query.as_deref().unwrap_or("").as_bytes()) {
        match &*key {
            "after" => {
                // Positions fit an int64, as the document says; anything else is not one.
                after = value
                    .parse::<i64>()
                    .ok()
                    .and_then(|n| u64::try_from(n).ok())
                    .ok_or_else(|| {
                        ApiError::bad_request(format!(
                            "after must be the `next` of a previous page (a whole number), got {value:?}"
                        ))
                    })?;
            }
            "limit" => limit = page_limit(&value, crate::connect::MAX_PRESENCE_LIMIT)?,
            auth::TOKEN_PARAM => {}
            other => {
                return Err(ApiError::bad_request(format!(
                    "unknown query parameter {other:?}; this route takes after, limit"
                )));
            }
        }
    }
    let page = crate::connect::presence(&state.hub, &access, &topic, after, limit).await?;
    Ok(Json(PresencePageJson::of(topic, page)))
}

/// Delete a topic.
///
/// Purges its retained history (durably, with a data dir: a restart does not bring it back) and
/// ends the subscriptions that name it exactly: SSE streams with a `deleted` event, WebSocket
/// subscriptions with `deleted` then `unsubscribed`, gRPC streams with ABORTED. Subscriptions
/// that follow it through a pattern continue; a resume over the purged range gets a `gap`. With
/// authentication on, needs a token whose `topichub` claim has `"admin": true`. In cluster mode
/// every node applies the deletion; the answer comes once this node has, and counts what it did
/// (its own subscriptions).
#[utoipa::path(
    delete,
    path = "/topics/{topic}",
    tag = "topics",
    params(("topic" = json::TopicName, Path, description = "Concrete topic (no wildcards)")),
    responses(
        (status = 200, description = "Deleted", body = DeletedJson),
        (status = 400, description = "Invalid topic or wildcard topic", body = ErrorBody),
        (status = 404, description = "No such topic: it has no retained messages and no live subscribers", body = ErrorBody),
        (status = 503, description = "Cluster mode: NATS did not take the deletion, or this node did not apply it in time; retry", body = ErrorBody),
    )
)]
async fn delete_topic(
    State(state): State<AppState>,
    Extension(access): Extension<Access>,
    Path(topic): Path<String>,
) -> Result<Json<DeletedJson>, ApiError> {
    let deleted = crate::connect::delete_topic(&state.hub, &access, &topic).await?;
    Ok(Json(DeletedJson {
        topic,
        purged_messages: deleted.purged_messages,
        ended_subscriptions: deleted.ended_subscriptions,
    }))
}

/// A page's `limit` query parameter: 1 to `max`.
fn page_limit(value: &str, max: usize) -> Result<usize, ApiError> {
    value
        .parse::<usize>()
        .ok()
        .filter(|n| (1..=max).contains(n))
        .ok_or_else(|| {
            ApiError::bad_request(format!(
                "limit must be a whole number from 1 to {max}, got {value:?}"
            ))
        })
}

/// History pages up to this size are sent whole (with a `content-length`); larger ones are
/// streamed.
const HISTORY_WHOLE_BYTES: usize = 64 * 1024;

/// Liveness and a few facts about the hub.
#[utoipa::path(
    get,
    path = "/healthz",
    tag = "operations",
    responses((status = 200, description = "Serving", body = Health))
)]
async fn healthz(State(state): State<AppState>) -> Json<Health> {
    Json(Health {
        status: "serving".into(),
        epoch: state.hub.epoch().to_owned(),
        head: state.hub.head().seq,
        subscribers: state.hub.subscriber_count(),
        oldest_seq: state.hub.oldest_retained_seq(),
        log: state.hub.log_stats().map(|stats| json::LogHealth {
            bytes_on_disk: stats.bytes_on_disk,
            failing: stats.failing,
        }),
    })
}

/// Reads a publish request's body: at most what the largest payload needs, within
/// `--http-body-timeout` (a client trickling its body cannot hold a connection forever). A
/// `content-length` over that is refused at once, before any of the body is waited for.
async fn read_body(state: &AppState, body: Body) -> Result<Bytes, ApiError> {
    use http_body::Body as _;
    use http_body_util::BodyExt as _;
    let max_payload = state.hub.config().max_payload_bytes;
    let limit = body_limit(max_payload);
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "RESOURCE_EXHAUSTED",
            format!(
                "request body is too large: payloads are limited to {max_payload} bytes (server option --max-payload-bytes)"
            ),
        )
        .closing_connection()
    };
    if body.size_hint().lower() > limit as u64 {
        return Err(too_large());
    }
    let read = http_body_util::Limited::new(body, limit).collect();
    match tokio::time::timeout(state.http_body_timeout, read).await {
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
        Ok(Err(error)) if error.is::<http_body_util::LengthLimitError>() => Err(too_large()),
        Ok(Err(error)) => Err(ApiError::bad_request(format!(
            "could not read the request body: {error}"
        ))),
        Err(_) => Err(ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "DEADLINE_EXCEEDED",
            format!(
                "the request body did not arrive within {:?} (server option --http-body-timeout)",
                state.http_body_timeout
            ),
        )
        .closing_connection()),
    }
}

/// Prometheus metrics: publishes and deliveries by door, lag and gap notices, subscribers,
/// connections, retention, queue depths, publish -> deliver latency, auth failures, limit hits.
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "operations",
    responses((status = 200, description = "Prometheus text exposition format", content_type = "text/plain", body = String))
)]
async fn metrics(State(state): State<AppState>) -> axum::response::Response {
    use axum::response::IntoResponse as _;
    let snapshot = Snapshot {
        connections: state.limits.connections(),
        ..state.hub.snapshot()
    };
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.hub.metrics().render(&snapshot),
    )
        .into_response()
}

/// Largest request body read for a publish (the rule shared with the WebSocket door).
fn body_limit(max_payload: usize) -> usize {
    crate::json::max_request_bytes(max_payload)
}

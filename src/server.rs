//! One listener, every door: assembles the gRPC services (tonic, with gRPC-Web, health and
//! reflection) and the HTTP routes (axum) into one router, and serves it with hyper so that
//! HTTP/1.1, HTTP/2 (h2c) and keepalive pings work on the same port.

use std::any::Any;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::Router;
use axum::extract::Request;
use axum::http::{Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use hyper::server::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tower::Layer as _;
use tower::util::Either;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::cors::{Any as AnyOrigin, CorsLayer};
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
use crate::keepalive::PingPolicyStream;
use crate::limits::{Connection, Limits};
use crate::log::jetstream::{JetStreamLog, NatsConfig};
use crate::metrics::{ConnectionDoor, Door};
use crate::proto;
use crate::publish_conn;
use crate::sse_conn;
use crate::tls;
use crate::write_timeout::{WriteProgress, WriteTimeout};
use crate::ws;

/// How often aged messages are evicted and empty topics forgotten.
const EXPIRY_INTERVAL: Duration = Duration::from_secs(1);

/// Serves the broker on `listener` until `shutdown` is cancelled, then drains: live streams end
/// with a clean status (gRPC UNAVAILABLE, an SSE `end` event), connections get up to
/// `config.shutdown_grace` to finish, and the function returns.
pub async fn run(
    listener: TcpListener,
    config: ServerConfig,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let auth = Authenticator::new(&config.auth()).map_err(invalid_input)?;
    let auth_enabled = auth.is_enabled();
    if auth_enabled {
        tracing::info!("authentication on: pub/sub calls need a bearer token");
    }
    let (health, health_service) = tonic_health::server::health_reporter();
    // In cluster mode the hub exists once NATS answers; until then every door is served by a
    // stand-in that says so (`/healthz` 503, gRPC health NOT_SERVING).
    let opening = match config.nats() {
        None => Opening::Open(open_hub(&config)?),
        Some(nats) => open_cluster_hub(&config, &nats).await?,
    };
    let metrics = match &opening {
        Opening::Open(hub) => hub.metrics().clone(),
        Opening::Pending(..) => crate::metrics::Metrics::new(),
    };
    let limits = Limits::new(config.limits(), metrics.clone());
    let ready: Arc<OnceLock<Hub>> = Arc::new(OnceLock::new());
    let serve_hub = {
        let (health, health_service) = (health.clone(), health_service.clone());
        let (auth, limits, config, shutdown) = (
            auth.clone(),
            limits.clone(),
            config.clone(),
            shutdown.clone(),
        );
        let ready = ready.clone();
        move |hub: Hub| async move {
            let _ = ready.set(hub.clone());
            tokio::spawn(expire_periodically(
                hub.clone(),
                limits.clone(),
                shutdown.clone(),
            ));
            if !config.nats.is_empty() {
                tokio::spawn(follow_log_health(
                    hub.clone(),
                    health.clone(),
                    shutdown.clone(),
                ));
            }
            let app = app(hub, auth, limits, &config, shutdown, health_service);
            set_health(&health, true).await;
            app
        }
    };
    let (app, lane_hub) = match opening {
        Opening::Open(hub) => (serve_hub(hub.clone()).await, Some(hub)),
        Opening::Pending(nats, attempt, why) => {
            set_health(&health, false).await;
            let app: Arc<OnceLock<Router>> = Arc::new(OnceLock::new());
            let (hub_config, opened, shutdown) = (config.hub(), app.clone(), shutdown.clone());
            let metrics = metrics.clone();
            tokio::spawn(async move {
                let Some((log, recovered)) = retry_open(&nats, attempt, why, &shutdown).await
                else {
                    return;
                };
                let hub = Hub::with_log(hub_config, metrics, Box::new(log), recovered);
                let _ = opened.set(serve_hub(hub).await);
            });
            (starting(app, health_service), None)
        }
    };

    let tls = match config.tls() {
        Some(files) => Some(tls::Tls::load(files).map_err(invalid_input)?),
        None => None,
    };
    #[cfg(unix)]
    tokio::spawn(reload_on_hangup(
        auth.clone(),
        tls.clone(),
        shutdown.clone(),
    ));
    let mut h2 = http2::Builder::new(TokioExecutor::new());
    h2.timer(TokioTimer::new())
        .keep_alive_interval(config.keepalive_interval)
        .keep_alive_timeout(config.keepalive_timeout)
        // hyper's default (200 streams) would make the 201st Subscribe wait silently; allow
        // the per-connection subscription limit plus room for unary calls, so that limit's
        // clear error is what a client meets.
        .max_concurrent_streams(
            u32::try_from(config.max_subscriptions_per_connection.saturating_add(256))
                .unwrap_or(u32::MAX),
        );
    let mut h1 = http1::Builder::new();
    h1.timer(TokioTimer::new())
        .header_read_timeout(config.http_header_timeout);
    let protocols = Arc::new(Protocols {
        h1,
        h2,
        write_timeout: config.write_timeout,
        metrics,
    });
    let header_timeout = config.http_header_timeout;
    // Tokens are checked by the application's guard, so the lane is off with authentication;
    // it answers synchronously, so it is off with a durable log too.
    let lane = lane_hub
        .filter(|hub| !auth_enabled && !hub.is_durable())
        .map(|hub| {
            Arc::new(publish_conn::Lane {
                hub,
                limits: limits.clone(),
                idle_timeout: header_timeout,
            })
        });

    tracing::info!(
        addr = %listener.local_addr()?,
        epoch = ready.get().map_or("(waiting for NATS)", |hub| hub.epoch()),
        tls = tls.is_some(),
        client_certificates = tls.as_ref().is_some_and(tls::Tls::requires_client_certificates),
        "topichub listening (gRPC, gRPC-Web, HTTP and SSE on one port)"
    );
    let graceful = GracefulShutdown::new();
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = shutdown.cancelled() => break,
        };
        let _ = stream.set_nodelay(true);
        let (protocols, watcher) = (protocols.clone(), graceful.watcher());
        let tls = tls.as_ref().map(tls::Tls::acceptor);
        let shutdown = shutdown.clone();
        let mut admitted = limits.admit(peer);
        if let Err(refusal) = &admitted {
            tracing::warn!(%peer, %refusal, "connection refused");
        }
        let (lane, app) = (lane.clone(), app.clone());
        // Every request of the connection carries its `Connection` (peer, subscription count).
        let service = move |admitted: Result<Connection, Error>| match admitted {
            Ok(connection) => Either::Left(axum::Extension(connection).layer(app)),
            Err(refusal) => Either::Right(refused(refusal)),
        };
        let min_ping_interval = config.keepalive_min_ping_interval;
        tokio::spawn(async move {
            // A task is as large as its largest state, so the rarer TLS path is boxed: plain
            // connections, most of the idle subscribers, do not carry a TLS session's size.
            let served = match tls {
                None => {
                    let sniffing = sniff(&stream, header_timeout, &shutdown);
                    let Some(sniffed) = Box::pin(sniffing).await else {
                        tracing::debug!(%peer, "connection closed or silent before a request");
                        return;
                    };
                    let protocol = sniffed.protocol;
                    if protocol == Protocol::Http1
                        && let Some(taken) =
                            Box::pin(sse_conn::take(&stream, sniffed.first())).await
                    {
                        // Held until the stream ends: graceful shutdown waits for it.
                        let _watcher = watcher;
                        let app = service(admitted);
                        let write_timeout = protocols.write_timeout(Protocol::Http1);
                        let serving = sse_conn::serve(stream, taken, app, &shutdown, write_timeout);
                        if let Err(error) = serving.await {
                            tracing::debug!(%peer, %error, "SSE connection ended with an error");
                        }
                        return;
                    }
                    if protocol == Protocol::Http1
                        && let (Some(lane), Ok(connection)) = (lane, &admitted)
                        && publish_conn::takes(sniffed.first())
                    {
                        connection.enter(ConnectionDoor::Http);
                        // The watcher is held meanwhile: graceful shutdown waits for the lane,
                        // which closes the connection between requests once shutdown begins.
                        let publishing = publish_conn::serve(stream, &lane, connection, &shutdown);
                        match Box::pin(publishing).await {
                            Ok(publish_conn::Left::Closed) => Ok(()),
                            Ok(publish_conn::Left::Handover(io)) => {
                                let app = service(admitted);
                                protocols
                                    .serve(Protocol::Http1, (watcher, &shutdown), io, app)
                                    .await
                            }
                            Err(error) => Err(error.into()),
                        }
                    } else {
                        let io = PingPolicyStream::new(stream, min_ping_interval);
                        protocols
                            .serve(protocol, (watcher, &shutdown), io, service(admitted))
                            .await
                    }
                }
                Some(acceptor) => {
                    let tls_connection = async move {
                        let handshake =
                            tokio::time::timeout(tls::HANDSHAKE_TIMEOUT, acceptor.accept(stream));
                        let stream = match handshake.await {
                            Ok(Ok(stream)) => stream,
                            Ok(Err(error)) => {
                                tracing::debug!(%peer, %error, "TLS handshake failed");
                                return Ok(());
                            }
                            Err(_) => {
                                tracing::debug!(%peer, "TLS handshake timed out");
                                return Ok(());
                            }
                        };
                        // With mTLS the certificate, verified by the handshake, names the client.
                        if let Ok(connection) = &mut admitted
                            && let Some(subject) = tls::client_subject(stream.get_ref().1)
                        {
                            tracing::debug!(%peer, %subject, "client certificate accepted");
                            connection.certificate_subject = Some(subject.into());
                        }
                        // HTTP/2 over TLS is negotiated by ALPN (RFC 9113, section 3.2);
                        // without it the client speaks HTTP/1.1.
                        let protocol = match stream.get_ref().1.alpn_protocol() {
                            Some(b"h2") => Protocol::Http2,
                            _ => Protocol::Http1,
                        };
                        let io = PingPolicyStream::new(stream, min_ping_interval);
                        protocols
                            .serve(protocol, (watcher, &shutdown), io, service(admitted))
                            .await
                    };
                    Box::pin(tls_connection).await
                }
            };
            if let Err(error) = served {
                tracing::debug!(%peer, %error, "connection ended with an error");
            }
        });
    }

    drop(listener);
    // Before the drain, so that a load balancer stops routing here first.
    set_health(&health, false).await;
    tracing::info!(connections = graceful.count(), "draining connections");
    tokio::select! {
        () = graceful.shutdown() => tracing::info!("all connections closed"),
        () = tokio::time::sleep(config.shutdown_grace) => {
            tracing::warn!(grace = ?config.shutdown_grace, "connections still open after the grace period; closing them");
        }
    }
    if let Some(hub) = ready.get() {
        hub.close().await;
    }
    Ok(())
}

/// How long start-up waits for NATS before listening anyway (not serving until it answers).
const NATS_FIRST_WAIT: Duration = Duration::from_secs(3);

/// An attempt to open the JetStream log, under way.
type OpenAttempt = tokio::task::JoinHandle<
    Result<(JetStreamLog, crate::log::Recovered), crate::log::jetstream::OpenError>,
>;

/// In cluster mode, gRPC health follows the shared log: NOT_SERVING while it refuses publishes
/// (NATS lost), so that load balancers and watching clients move to a node that has it.
async fn follow_log_health(
    hub: Hub,
    health: tonic_health::server::HealthReporter,
    shutdown: CancellationToken,
) {
    let mut serving = true;
    let mut interval = tokio::time::interval(Duration::from_millis(250));
    loop {
        tokio::select! {
            _ = interval.tick() => {}
            () = shutdown.cancelled() => return,
        }
        let now = hub.log_stats().is_none_or(|stats| stats.failing.is_none());
        if now == serving || shutdown.is_cancelled() {
            continue;
        }
        serving = now;
        set_health(&health, serving).await;
    }
}

/// Sets every service, and the server as a whole (""), serving or not: a load balancer watching
/// any of them sees the same.
async fn set_health(health: &tonic_health::server::HealthReporter, serving: bool) {
    if serving {
        health.set_serving::<PubSubServer<PubSubService>>().await;
        health
            .set_serving::<PubSubServiceServer<SeedService>>()
            .await;
        health
            .set_service_status("", tonic_health::ServingStatus::Serving)
            .await;
    } else {
        health
            .set_not_serving::<PubSubServer<PubSubService>>()
            .await;
        health
            .set_not_serving::<PubSubServiceServer<SeedService>>()
            .await;
        health
            .set_service_status("", tonic_health::ServingStatus::NotServing)
            .await;
    }
}

/// The hub, or in cluster mode possibly not yet: NATS did not answer the first attempt (still
/// under way, or failed with the reason given).
enum Opening {
    Open(Hub),
    Pending(Box<NatsConfig>, Option<OpenAttempt>, String),
}

/// Cluster mode: the hub on the JetStream log if NATS answers soon; a configuration NATS refuses
/// (credentials, a stream with other subjects) is an error at once.
async fn open_cluster_hub(config: &ServerConfig, nats: &NatsConfig) -> std::io::Result<Opening> {
    let mut attempt: OpenAttempt = tokio::spawn({
        let nats = nats.clone();
        async move { JetStreamLog::open(&nats).await }
    });
    match tokio::time::timeout(NATS_FIRST_WAIT, &mut attempt).await {
        Ok(Ok(Ok((log, recovered)))) => {
            log_opened(nats, &recovered);
            Ok(Opening::Open(Hub::with_log(
                config.hub(),
                crate::metrics::Metrics::new(),
                Box::new(log),
                recovered,
            )))
        }
        Ok(Ok(Err(error))) if error.retry => Ok(Opening::Pending(
            Box::new(nats.clone()),
            None,
            error.message,
        )),
        Ok(Ok(Err(error))) => Err(invalid_input(error.message)),
        Ok(Err(panicked)) => Err(std::io::Error::other(panicked)),
        Err(_) => Ok(Opening::Pending(
            Box::new(nats.clone()),
            Some(attempt),
            format!("NATS did not answer within {NATS_FIRST_WAIT:?}"),
        )),
    }
}

/// Retries opening the JetStream log with back-off until it opens, NATS refuses the
/// configuration, or shutdown; `attempt` is one still under way.
async fn retry_open(
    nats: &NatsConfig,
    attempt: Option<OpenAttempt>,
    mut why: String,
    shutdown: &CancellationToken,
) -> Option<(JetStreamLog, crate::log::Recovered)> {
    if let Some(attempt) = attempt {
        tracing::warn!(error = %why, "NATS not ready yet; not serving until it is (/healthz 503, gRPC health NOT_SERVING)");
        let finished = tokio::select! {
            finished = attempt => finished,
            () = shutdown.cancelled() => return None,
        };
        match finished {
            Ok(Ok((log, recovered))) => {
                log_opened(nats, &recovered);
                return Some((log, recovered));
            }
            Ok(Err(error)) if !error.retry => {
                tracing::error!(error = %error.message, "NATS refused the configuration; fix it and restart");
                return None;
            }
            Ok(Err(error)) => why = error.message,
            Err(panicked) => why = panicked.to_string(),
        }
    }
    let mut backoff = Duration::from_millis(250);
    loop {
        tracing::warn!(error = %why, retry_in = ?backoff, "NATS not ready; not serving until it is (/healthz 503, gRPC health NOT_SERVING)");
        tokio::select! {
            () = tokio::time::sleep(backoff) => {}
            () = shutdown.cancelled() => return None,
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
        match JetStreamLog::open(nats).await {
            Ok((log, recovered)) => {
                log_opened(nats, &recovered);
                return Some((log, recovered));
            }
            Err(error) if error.retry => why = error.message,
            Err(error) => {
                tracing::error!(error = %error.message, "NATS refused the configuration; fix it and restart");
                return None;
            }
        }
    }
}

fn log_opened(nats: &NatsConfig, recovered: &crate::log::Recovered) {
    tracing::info!(
        stream = %nats.stream,
        epoch = %recovered.epoch,
        head = recovered.head,
        messages = recovered.messages.len(),
        "history loaded from JetStream"
    );
}

/// The application while the hub is not open yet: `/healthz` answers 503 and gRPC health
/// NOT_SERVING, every other request UNAVAILABLE; once `app` is set, everything goes there,
/// also on connections opened before.
fn starting(
    app: Arc<OnceLock<Router>>,
    health_service: tonic_health::pb::health_server::HealthServer<
        impl tonic_health::pb::health_server::Health,
    >,
) -> Router {
    let not_ready = "not serving yet: waiting for NATS JetStream (see the server log)";
    let stand_in = tonic::service::Routes::new(health_service)
        .into_axum_router()
        .route(
            "/healthz",
            axum::routing::get(move || async move {
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    axum::Json(serde_json::json!({ "status": "not_serving", "reason": not_ready })),
                )
            }),
        )
        .fallback(move |request: Request| async move {
            if is_grpc(&request) {
                grpc::status_response(tonic::Status::unavailable(not_ready))
            } else {
                http::error::ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "UNAVAILABLE",
                    not_ready.to_owned(),
                )
                .into_response()
            }
        });
    Router::new().fallback_service(tower::service_fn(move |request: Request| {
        let router = app.get().cloned().unwrap_or_else(|| stand_in.clone());
        tower::ServiceExt::oneshot(router, request)
    }))
}

/// The hub, on a disk log when `--data-dir` is set.
fn open_hub(config: &ServerConfig) -> std::io::Result<Hub> {
    let Some(dir) = &config.data_dir else {
        return Ok(Hub::new(config.hub()));
    };
    let metrics = crate::metrics::Metrics::new();
    let started = std::time::Instant::now();
    let (log, recovered) = crate::log::disk::DiskLog::open(dir, config.fsync, metrics.clone())
        .map_err(invalid_input)?;
    tracing::info!(
        data_dir = %dir.display(),
        epoch = %recovered.epoch,
        head = recovered.head,
        messages = recovered.messages.len(),
        elapsed = ?started.elapsed(),
        "history loaded from disk"
    );
    Ok(Hub::with_log(
        config.hub(),
        metrics,
        Box::new(log),
        recovered,
    ))
}

/// A configuration error, as `run` reports it.
fn invalid_input(message: String) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidInput, message)
}

/// The HTTP/2 connection preface (RFC 9113, section 3.4): an h2c client with prior knowledge
/// opens with it; an HTTP/1.1 request line never does.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// The protocol a connection speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Protocol {
    Http1,
    Http2,
}

/// What [`sniff`] saw: the protocol, and the first bytes it was told from.
struct Sniffed {
    protocol: Protocol,
    first: [u8; H2_PREFACE.len()],
    len: usize,
}

impl Sniffed {
    fn first(&self) -> &[u8] {
        &self.first[..self.len]
    }
}

/// Tells an h2c connection from an HTTP/1.1 one by its first bytes, without consuming them:
/// hyper reads them again from the socket. (Reading them into a side buffer, as a generic
/// detector must, doubles hyper's HTTP/1.1 read buffer to 16 KiB on every connection, since its
/// first read then returns only those bytes.) `None` if the peer closes, or sends nothing
/// decisive within `timeout`, or the server is shutting down.
async fn sniff(
    stream: &TcpStream,
    timeout: Duration,
    shutdown: &CancellationToken,
) -> Option<Sniffed> {
    let mut first = [0u8; H2_PREFACE.len()];
    let mut pause = Duration::from_millis(2);
    let decide = async {
        loop {
            let len = stream.peek(&mut first).await.ok()?;
            let protocol = if len == 0 {
                return None;
            } else if first[..len] != H2_PREFACE[..len] {
                Protocol::Http1
            } else if len == H2_PREFACE.len() {
                Protocol::Http2
            } else {
                // Part of the preface: the socket stays readable with the same bytes until
                // the rest arrives, so look again after a pause (growing, so that a peer
                // stalling here costs next to nothing) instead of spinning on it.
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_millis(100));
                continue;
            };
            return Some(Sniffed {
                protocol,
                first,
                len,
            });
        }
    };
    tokio::select! {
        decided = tokio::time::timeout(timeout, decide) => decided.ok().flatten(),
        // A connection that has not said anything yet does not hold up a graceful shutdown.
        () = shutdown.cancelled() => None,
    }
}

/// The configured HTTP/1.1 and HTTP/2 servers.
struct Protocols {
    h1: http1::Builder,
    h2: http2::Builder<TokioExecutor>,
    /// `--write-timeout`, applied to every connection.
    write_timeout: Duration,
    metrics: crate::metrics::Metrics,
}

impl Protocols {
    /// The write timeout of a connection speaking `protocol`. Which door an HTTP/2 connection
    /// serves is not known per connection; nearly all are gRPC's, and count there.
    fn write_timeout(&self, protocol: Protocol) -> WriteTimeout {
        let door = match protocol {
            Protocol::Http1 => Door::Http,
            Protocol::Http2 => Door::Grpc,
        };
        WriteTimeout::new(self.write_timeout, door, self.metrics.clone())
    }

    /// Serves one connection until it closes or the graceful shutdown completes. Each
    /// protocol's connection is boxed on its own, so that an HTTP/1.1 connection (most of the
    /// idle SSE subscribers) does not carry the size of an HTTP/2 one.
    async fn serve<IO, S>(
        &self,
        protocol: Protocol,
        (watcher, shutdown): (Watcher, &CancellationToken),
        io: IO,
        app: S,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>>
    where
        IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
        S: tower::Service<
                Request<hyper::body::Incoming>,
                Response = Response,
                Error = std::convert::Infallible,
            > + Clone
            + Send
            + 'static,
        S::Future: Send + 'static,
    {
        let service = TowerToHyperService::new(app);
        let io = TokioIo::new(WriteProgress::new(io, self.write_timeout(protocol)));
        match protocol {
            Protocol::Http1 => {
                // Upgrades hand the socket to `GET /ws`. hyper-util's watcher does not take an
                // upgradeable connection, so the graceful shutdown is driven here: the watcher
                // is held until the connection ends, and the shutdown signal starts its drain.
                let _watcher = watcher;
                let connection = self.h1.serve_connection(io, service).with_upgrades();
                let mut connection = Box::pin(connection);
                tokio::select! {
                    served = connection.as_mut() => served?,
                    () = shutdown.cancelled() => {
                        connection.as_mut().graceful_shutdown();
                        connection.await?;
                    }
                }
            }
            Protocol::Http2 => {
                Box::pin(watcher.watch(self.h2.serve_connection(io, service))).await?;
            }
        }
        Ok(())
    }
}

/// The application of a connection over the connection limit: every request is answered with
/// the refusal (429 / RESOURCE_EXHAUSTED), and HTTP/1.1 clients are told to close.
fn refused(refusal: Error) -> Router {
    let message = refusal.to_string();
    Router::new().fallback(move |request: Request| {
        let message = message.clone();
        async move {
            if is_grpc(&request) {
                grpc::status_response(tonic::Status::resource_exhausted(message))
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

    let mut services = tonic::service::Routes::builder();
    services
        .add_service(
            PubSubServer::new(PubSubService::new(
                hub.clone(),
                limits.clone(),
                shutdown.clone(),
            ))
            .max_decoding_message_size(max_decoding),
        )
        .add_service(
            PubSubServiceServer::new(SeedService::new(
                hub.clone(),
                limits.clone(),
                shutdown.clone(),
            ))
            .max_decoding_message_size(max_decoding),
        )
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha);
    let grpc = services
        .routes()
        .into_axum_router()
        // Inside gRPC-Web's translation: the body is gRPC-framed by then, for both kinds.
        .layer(axum::middleware::from_fn_with_state(
            config.http_body_timeout,
            grpc::deadline::guard,
        ))
        // gRPC-Web only on the gRPC routes: on plain HTTP/1 routes it would answer 400.
        .layer(axum::middleware::from_fn_with_state(
            (auth.clone(), hub.metrics().clone()),
            crate::grpc::guard::grpc_guard,
        ))
        .layer(tonic_web::GrpcWebLayer::new())
        .layer(CatchPanicLayer::custom(grpc_panic));

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

    grpc.merge(rest)
        // `Routes` brings a gRPC fallback; ours answers both kinds of client.
        .fallback(fallback)
        // Inside CORS: a preflight is not a request of any door.
        .layer(tower::util::MapRequestLayer::new(mark_door))
        .layer(cors())
        .layer(TraceLayer::new_for_http().make_span_with(request_span))
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

/// On SIGHUP, reads the JWT key file and the TLS certificate, key and client CA again: keys
/// rotate without a restart. A file that cannot be used keeps the old keys, and says why.
#[cfg(unix)]
async fn reload_on_hangup(auth: Authenticator, tls: Option<tls::Tls>, shutdown: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let mut hangups = match signal(SignalKind::hangup()) {
        Ok(hangups) => hangups,
        Err(error) => {
            tracing::warn!(%error, "cannot listen for SIGHUP; keys are not reloadable");
            return;
        }
    };
    loop {
        tokio::select! {
            Some(()) = hangups.recv() => {}
            () = shutdown.cancelled() => return,
        }
        match auth.reload() {
            Ok(true) => tracing::info!("SIGHUP: JWT keys reloaded"),
            Ok(false) => {}
            Err(error) => tracing::warn!(%error, "SIGHUP: keeping the old JWT keys"),
        }
        if let Some(tls) = &tls {
            match tls.reload() {
                Ok(()) => tracing::info!("SIGHUP: TLS certificate reloaded"),
                Err(error) => tracing::warn!(%error, "SIGHUP: keeping the old TLS certificate"),
            }
        }
    }
}

/// Unknown routes: UNIMPLEMENTED for gRPC and gRPC-Web clients, a JSON 404 for everyone else.
async fn fallback(request: Request) -> Response {
    if is_grpc(&request) {
        grpc::status_response(tonic::Status::unimplemented(
            "unknown service or method; list them with server reflection",
        ))
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

fn is_grpc(request: &Request) -> bool {
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
    grpc::status_response(tonic::Status::internal(
        "internal error; the server logged the details",
    ))
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

/// CORS for browsers on other origins: REST, SSE and gRPC-Web.
fn cors() -> CorsLayer {
    CorsLayer::new()
        .allow_origin(AnyOrigin)
        .allow_methods([Method::GET, Method::POST, Method::OPTIONS])
        .allow_headers(AnyOrigin)
        .expose_headers([
            header::HeaderName::from_static("grpc-status"),
            header::HeaderName::from_static("grpc-message"),
            header::HeaderName::from_static("grpc-status-details-bin"),
        ])
        .max_age(Duration::from_secs(24 * 3600))
}

async fn expire_periodically(hub: Hub, limits: Limits, shutdown: CancellationToken) {
    let mut interval = tokio::time::interval(EXPIRY_INTERVAL);
    loop {
        tokio::select! {
            _ = interval.tick() => {
                hub.expire();
                limits.forget_idle_clients();
            }
            () = shutdown.cancelled() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::routing::{get, post};
    use tower::ServiceExt as _;

    /// A connected pair: (client, server side).
    async fn connected() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        (client, server)
    }

    const PATIENCE: Duration = Duration::from_secs(5);

    #[tokio::test]
    async fn sniff_tells_http2_from_http1_by_the_whole_preface() {
        use tokio::io::AsyncWriteExt;

        let never = CancellationToken::new();
        let (mut client, server) = connected().await;
        client.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
        assert_eq!(
            sniff(&server, PATIENCE, &never).await.map(|s| s.protocol),
            Some(Protocol::Http1)
        );

        let (mut client, server) = connected().await;
        client.write_all(H2_PREFACE).await.unwrap();
        assert_eq!(
            sniff(&server, PATIENCE, &never).await.map(|s| s.protocol),
            Some(Protocol::Http2)
        );

        // "PRI" alone could still be either: sniff waits for the rest of the preface.
        let (mut client, server) = connected().await;
        client.write_all(&H2_PREFACE[..5]).await.unwrap();
        let mut seen = [0u8; 5];
        tokio::time::timeout(PATIENCE, async {
            while server.peek(&mut seen).await.unwrap() < seen.len() {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("the partial preface arrives");
        let sniffing = sniff(&server, PATIENCE, &never);
        tokio::pin!(sniffing);
        let first_poll = std::future::poll_fn(|cx| {
            std::task::Poll::Ready(std::future::Future::poll(sniffing.as_mut(), cx))
        })
        .await;
        assert!(first_poll.is_pending(), "a partial preface is not decided");
        client.write_all(&H2_PREFACE[5..]).await.unwrap();
        assert_eq!(sniffing.await.map(|s| s.protocol), Some(Protocol::Http2));

        // A peer that closes, or says nothing until the timeout, is let go.
        let (client, server) = connected().await;
        drop(client);
        assert!(sniff(&server, PATIENCE, &never).await.is_none());
        let (_client, server) = connected().await;
        assert!(
            sniff(&server, Duration::from_millis(50), &never)
                .await
                .is_none()
        );
        // Nor does a silent peer hold up a shutdown.
        let (_client, server) = connected().await;
        let shutdown = CancellationToken::new();
        shutdown.cancel();
        assert!(sniff(&server, PATIENCE, &shutdown).await.is_none());
    }

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

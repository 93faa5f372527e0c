//! Start-up in cluster mode (`--nats`): the hub exists once NATS answers. Until then the
//! listener serves a stand-in ([`starting`]) that says "not serving" on every door, and a task
//! retries with back-off; once serving, gRPC health follows the node's connection to NATS.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::Router;
use axum::extract::Request;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use tokio_util::sync::CancellationToken;

use super::{invalid_input, set_health};
use crate::config::ServerConfig;
use crate::http;
use crate::hub::Hub;
use crate::log::jetstream::{JetStreamLog, NatsConfig};

/// How long start-up waits for NATS before listening anyway (not serving until it answers).
const NATS_FIRST_WAIT: Duration = Duration::from_secs(3);

/// An attempt to open the JetStream log, under way.
type OpenAttempt = tokio::task::JoinHandle<
    Result<(JetStreamLog, crate::log::Recovered), crate::log::jetstream::OpenError>,
>;

/// The hub, or in cluster mode possibly not yet: NATS did not answer the first attempt (still
/// under way, or failed with the reason given).
pub(super) enum Opening {
    Open(Hub),
    Pending(Box<NatsConfig>, Option<OpenAttempt>, String),
}

/// Cluster mode: the hub on the JetStream log if NATS answers soon; a configuration NATS refuses
/// (credentials, a stream with other subjects) is an error at once.
pub(super) async fn open_hub(
    config: &ServerConfig,
    nats: &NatsConfig,
    shutdown: &CancellationToken,
) -> std::io::Result<Opening> {
    let mut attempt: OpenAttempt = tokio::spawn({
        let nats = nats.clone();
        async move { JetStreamLog::open(&nats).await }
    });
    match tokio::time::timeout(NATS_FIRST_WAIT, &mut attempt).await {
        Ok(Ok(Ok((log, recovered)))) => {
            log_opened(nats, &recovered);
            let metrics = crate::metrics::Metrics::new();
            let hub = hub_on(config.hub(), metrics, nats, (log, recovered), shutdown).await;
            Ok(Opening::Open(hub))
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
pub(super) async fn retry_open(
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

/// The hub on the JetStream log, among the other nodes: presence pages cover them all.
pub(super) async fn hub_on(
    config: crate::hub::HubConfig,
    metrics: crate::metrics::Metrics,
    nats: &NatsConfig,
    (log, recovered): (JetStreamLog, crate::log::Recovered),
    shutdown: &CancellationToken,
) -> Hub {
    let client = log.client();
    let hub = Hub::with_log(config, metrics, Box::new(log), recovered);
    if let Err(error) =
        crate::peers::NatsPeers::start(client, &nats.stream, hub.clone(), shutdown.clone()).await
    {
        tracing::warn!(%error, "cannot reach the other nodes over NATS; presence covers this node only");
    }
    hub
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
pub(super) fn starting(
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
            if super::app::is_grpc(&request) {
                tonic::Status::unavailable(not_ready).into_http()
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

/// In cluster mode, gRPC health follows the shared log: NOT_SERVING while it refuses publishes
/// (NATS lost), so that load balancers and watching clients move to a node that has it.
pub(super) async fn follow_log_health(
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

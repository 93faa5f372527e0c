//! One listener, every door. [`run`] opens the hub, builds the application (`app`), starts
//! the background tasks, and runs the [`listener::Listener`] until shutdown, then drains.
//!
//! - `app`: the router every connection serves (gRPC, gRPC-Web, REST, SSE, WebSocket, docs).
//! - `cluster`: start-up in cluster mode (`--nats`): the hub once NATS answers, a stand-in that
//!   says "not serving" until then, and health that follows the connection to NATS.
//! - `listener`: accepts, admits against the limits, and hands each connection to a handler
//!   that tells TLS / h2c / HTTP/1.1 apart and picks its path (direct SSE writer, publish lane,
//!   hyper).
//! - `sniff`: HTTP/1.1 or h2c, from a plain connection's first bytes.
//! - `protocols`: the configured hyper servers.

mod app;
mod cluster;
mod listener;
mod protocols;
mod sniff;

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use hyper::server::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use app::app;

use crate::auth::Authenticator;
use crate::config::ServerConfig;
use crate::grpc::PubSubService;
use crate::grpc::seed::SeedService;
use crate::grpc::seed::server::pub_sub_service_server::PubSubServiceServer;
use crate::grpc::wire::v1::pub_sub_server::PubSubServer;
use crate::http::publish_conn;
use crate::hub::Hub;
use crate::limits::Limits;
use crate::tls;
use listener::{Doors, Listener};
use protocols::Protocols;

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
    if auth.is_enabled() {
        tracing::info!("authentication on: pub/sub calls need a bearer token");
    }
    let tls = match config.tls() {
        Some(files) => Some(tls::Tls::load(files).map_err(invalid_input)?),
        None => None,
    };
    let (health, health_service) = tonic_health::server::health_reporter();
    let Started {
        app,
        lane_hub,
        metrics,
        limits,
        ready,
    } = start(&config, &auth, &health, health_service, &shutdown).await?;
    #[cfg(unix)]
    tokio::spawn(reload_on_hangup(
        auth.clone(),
        tls.clone(),
        shutdown.clone(),
    ));

    tracing::info!(
        addr = %listener.local_addr()?,
        epoch = ready.get().map_or("(waiting for NATS)", |hub| hub.epoch()),
        tls = tls.is_some(),
        client_certificates = tls.as_ref().is_some_and(tls::Tls::requires_client_certificates),
        "topichub listening (gRPC, gRPC-Web, HTTP, SSE and WebSocket on one port)"
    );
    let doors = Doors {
        app,
        lane: lane_hub.and_then(|hub| publish_lane(&config, &auth, &hub, &limits)),
        protocols: protocols(&config, metrics),
        header_timeout: config.http_header_timeout,
        min_ping_interval: config.keepalive_min_ping_interval,
    };
    let listener = Listener {
        tcp: listener,
        limits,
        tls,
        doors: Arc::new(doors),
        shutdown,
    };
    let graceful = listener.run().await;

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

/// What `run` serves: the application, and the hub once it is open.
struct Started {
    app: axum::Router,
    /// The hub, if it opened at once (the publish lane needs it from the start).
    lane_hub: Option<Hub>,
    metrics: crate::metrics::Metrics,
    limits: Limits,
    /// The hub once open (in cluster mode possibly later, when NATS answers).
    ready: Arc<OnceLock<Hub>>,
}

/// Opens the hub (memory, disk, or JetStream) and builds the application on it. In cluster mode
/// the hub exists once NATS answers; until then every door is served by a stand-in that says so
/// (`/healthz` 503, gRPC health NOT_SERVING), and the application replaces it when it opens.
async fn start(
    config: &ServerConfig,
    auth: &Authenticator,
    health: &tonic_health::server::HealthReporter,
    health_service: tonic_health::pb::health_server::HealthServer<
        impl tonic_health::pb::health_server::Health,
    >,
    shutdown: &CancellationToken,
) -> std::io::Result<Started> {
    let opening = match config.nats() {
        None => cluster::Opening::Open(open_hub(config)?),
        Some(nats) => cluster::open_hub(config, &nats, shutdown).await?,
    };
    let metrics = match &opening {
        cluster::Opening::Open(hub) => hub.metrics().clone(),
        cluster::Opening::Pending(..) => crate::metrics::Metrics::new(),
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
                tokio::spawn(cluster::follow_log_health(
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
        cluster::Opening::Open(hub) => (serve_hub(hub.clone()).await, Some(hub)),
        cluster::Opening::Pending(nats, attempt, why) => {
            set_health(health, false).await;
            let app: Arc<OnceLock<axum::Router>> = Arc::new(OnceLock::new());
            let (hub_config, opened, shutdown) = (config.hub(), app.clone(), shutdown.clone());
            let metrics = metrics.clone();
            tokio::spawn(async move {
                let Some(opened_log) = cluster::retry_open(&nats, attempt, why, &shutdown).await
                else {
                    return;
                };
                let hub = cluster::hub_on(hub_config, metrics, &nats, opened_log, &shutdown).await;
                let _ = opened.set(serve_hub(hub).await);
            });
            (cluster::starting(app, health_service), None)
        }
    };
    Ok(Started {
        app,
        lane_hub,
        metrics,
        limits,
        ready,
    })
}

/// The hyper servers, configured.
fn protocols(config: &ServerConfig, metrics: crate::metrics::Metrics) -> Protocols {
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
    Protocols {
        h1,
        h2,
        write_timeout: config.write_timeout,
        metrics,
    }
}

/// The HTTP/1.1 publish lane, unless something it does not do is on: tokens are checked by
/// the application's guard, so it is off with authentication; it answers synchronously, so it
/// is off with a durable log too.
fn publish_lane(
    config: &ServerConfig,
    auth: &Authenticator,
    hub: &Hub,
    limits: &Limits,
) -> Option<Arc<publish_conn::Lane>> {
    (!auth.is_enabled() && !hub.is_durable()).then(|| {
        Arc::new(publish_conn::Lane::new(
            hub.clone(),
            limits.clone(),
            config.http_header_timeout,
        ))
    })
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

/// Evicts aged messages and forgets idle clients' rate buckets, once per [`EXPIRY_INTERVAL`].
async fn expire_periodically(hub: Hub, limits: Limits, shutdown: CancellationToken) {
    let mut interval = tokio::time::interval(EXPIRY_INTERVAL);
    loop {
        tokio::select! {
            _ = interval.tick() => {
                // A batch at a time, yielding between: done in one go, a pass over many aged
                // topics held this task's worker thread (on a server with one core, the only
                // one) until it ended, every connection waiting.
                while hub.expire_some() {
                    tokio::task::yield_now().await;
                }
                limits.forget_idle_clients();
            }
            () = shutdown.cancelled() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::Clock;
    use crate::hub::{Headers, HubConfig};
    use crate::limits::LimitsConfig;
    use crate::metrics::Metrics;
    use crate::topic::Topic;

    /// Expiring many topics at once leaves room for the other tasks of its thread between
    /// batches: on a one-thread runtime, another task sees the topics part expired.
    #[tokio::test(start_paused = true)]
    async fn expiring_many_topics_lets_other_tasks_run_between_batches() {
        let hub = Hub::new(HubConfig {
            retain_age: Duration::from_secs(1),
            clock: Clock::tokio(),
            ..HubConfig::default()
        });
        let topics = 20_000;
        for i in 0..topics {
            let published = hub
                .publish(
                    Topic::parse(&format!("aging.{i}")).unwrap(),
                    bytes::Bytes::from_static(b"x"),
                    Headers::new(),
                )
                .now();
            assert!(matches!(published, Some(Ok(_))));
        }
        tokio::time::advance(Duration::from_secs(2)).await;
        let limits = Limits::new(
            LimitsConfig {
                max_connections: 10,
                max_subscriptions_per_connection: 10,
                publish_rate: 0,
                publish_burst: 0,
            },
            Metrics::new(),
        );
        let shutdown = CancellationToken::new();
        let expiring = tokio::spawn(expire_periodically(hub.clone(), limits, shutdown.clone()));
        let mut seen = Vec::new();
        while seen.last() != Some(&0) {
            tokio::task::yield_now().await;
            seen.push(hub.snapshot().topics);
        }
        shutdown.cancel();
        expiring.await.unwrap();
        assert!(
            seen.iter().any(|&left| left > 0 && left < topics),
            "never saw the topics part expired: {:?}",
            &seen[..seen.len().min(10)]
        );
    }
}

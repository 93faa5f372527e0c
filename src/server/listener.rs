//! Accepting connections: the [`Listener`] admits each one against the connection limits and
//! hands it to a [`Handler`] task, which tells its protocol (TLS by ALPN, plain by sniffing) and
//! serves it on the right path: the direct SSE writer, the publish lane, or hyper.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tower::Layer as _;
use tower::util::Either;

use super::app::refused;
use super::protocols::Protocols;
use super::sniff::{Protocol, sniff};
use crate::error::Error;
use crate::http::{publish_conn, sse_conn};
use crate::limits::{Connection, Limits};
use crate::metrics::ConnectionDoor;
use crate::net::keepalive::PingPolicyStream;
use crate::tls;

/// How long to wait before accepting again after `accept` failed (out of file descriptors and
/// the like), instead of spinning.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// What every connection's handler shares.
pub(super) struct Doors {
    /// The application: every door's routes.
    pub(super) app: Router,
    /// The HTTP/1.1 publish lane, when it is on.
    pub(super) lane: Option<Arc<publish_conn::Lane>>,
    /// The hyper servers.
    pub(super) protocols: Protocols,
    /// `--http-header-timeout`: also how long a new connection may stay silent.
    pub(super) header_timeout: Duration,
    /// `--keepalive-min-ping-interval`.
    pub(super) min_ping_interval: Duration,
}

/// The accept loop.
pub(super) struct Listener {
    pub(super) tcp: TcpListener,
    pub(super) limits: Limits,
    pub(super) tls: Option<tls::Tls>,
    pub(super) doors: Arc<Doors>,
    pub(super) shutdown: CancellationToken,
}

impl Listener {
    /// Accepts connections until shutdown, each served by its own task; returns the handle
    /// that drains the connections still open.
    pub(super) async fn run(self) -> GracefulShutdown {
        let graceful = GracefulShutdown::new();
        loop {
            let (stream, peer) = tokio::select! {
                accepted = self.tcp.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(error) => {
                        tracing::warn!(%error, "accept failed");
                        tokio::time::sleep(ACCEPT_BACKOFF).await;
                        continue;
                    }
                },
                () = self.shutdown.cancelled() => break,
            };
            let _ = stream.set_nodelay(true);
            let admitted = self.limits.admit(peer);
            if let Err(refusal) = &admitted {
                tracing::warn!(%peer, %refusal, "connection refused");
            }
            let handler = Handler {
                stream,
                peer,
                admitted,
                doors: self.doors.clone(),
                watcher: graceful.watcher(),
                shutdown: self.shutdown.clone(),
            };
            let tls = self.tls.as_ref().map(tls::Tls::acceptor);
            tokio::spawn(async move {
                // A task is as large as its largest state, so each path is boxed: plain
                // connections, most of the idle subscribers, do not carry a TLS session's size.
                let served = match tls {
                    None => Box::pin(handler.plain()).await,
                    Some(acceptor) => Box::pin(handler.tls(acceptor)).await,
                };
                if let Err(error) = served {
                    tracing::debug!(%peer, %error, "connection ended with an error");
                }
            });
        }
        graceful
    }
}

type Served = Result<(), Box<dyn std::error::Error + Send + Sync>>;

/// One accepted connection.
struct Handler {
    stream: TcpStream,
    peer: SocketAddr,
    /// The connection as the limits admitted it (peer, subscription count), or the refusal
    /// every request on it is answered with.
    admitted: Result<Connection, Error>,
    doors: Arc<Doors>,
    /// Held until the connection ends: graceful shutdown waits for it.
    watcher: Watcher,
    shutdown: CancellationToken,
}

impl Handler {
    /// A connection without TLS: HTTP/1.1 or h2c, told by its first bytes.
    async fn plain(self) -> Served {
        let sniffing = sniff(&self.stream, self.doors.header_timeout, &self.shutdown);
        let Some(sniffed) = Box::pin(sniffing).await else {
            tracing::debug!(peer = %self.peer, "connection closed or silent before a request");
            return Ok(());
        };
        if sniffed.protocol == Protocol::Http1 {
            if let Some(taken) = Box::pin(sse_conn::take(&self.stream, sniffed.first())).await {
                let write_timeout = self.doors.protocols.write_timeout(Protocol::Http1);
                let app = service(&self.doors.app, self.admitted);
                let serving =
                    sse_conn::serve(self.stream, taken, app, &self.shutdown, write_timeout);
                if let Err(error) = serving.await {
                    tracing::debug!(peer = %self.peer, %error, "SSE connection ended with an error");
                }
                return Ok(());
            }
            if let (Some(lane), Ok(connection)) = (&self.doors.lane, &self.admitted)
                && publish_conn::takes(sniffed.first())
            {
                connection.enter(ConnectionDoor::Http);
                // The watcher is still held: graceful shutdown waits for the lane, which
                // closes the connection between requests once shutdown begins.
                let publishing = publish_conn::serve(self.stream, lane, connection, &self.shutdown);
                return match Box::pin(publishing).await? {
                    publish_conn::Left::Closed => Ok(()),
                    publish_conn::Left::Handover(io) => {
                        let app = service(&self.doors.app, self.admitted);
                        let drain = (self.watcher, &self.shutdown);
                        self.doors
                            .protocols
                            .serve(Protocol::Http1, drain, io, app)
                            .await
                    }
                };
            }
        }
        let io = PingPolicyStream::new(self.stream, self.doors.min_ping_interval);
        let app = service(&self.doors.app, self.admitted);
        let drain = (self.watcher, &self.shutdown);
        self.doors
            .protocols
            .serve(sniffed.protocol, drain, io, app)
            .await
    }

    /// A TLS connection: HTTP/2 if ALPN chose it, HTTP/1.1 otherwise.
    async fn tls(mut self, acceptor: tokio_rustls::TlsAcceptor) -> Served {
        let peer = self.peer;
        let handshake = tokio::time::timeout(tls::HANDSHAKE_TIMEOUT, acceptor.accept(self.stream));
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
        if let Ok(connection) = &mut self.admitted
            && let Some(subject) = tls::client_subject(stream.get_ref().1)
        {
            tracing::debug!(%peer, %subject, "client certificate accepted");
            connection.certificate_subject = Some(subject.into());
        }
        // HTTP/2 over TLS is negotiated by ALPN (RFC 9113, section 3.2); without it the client
        // speaks HTTP/1.1.
        let protocol = match stream.get_ref().1.alpn_protocol() {
            Some(b"h2") => Protocol::Http2,
            _ => Protocol::Http1,
        };
        let io = PingPolicyStream::new(stream, self.doors.min_ping_interval);
        let app = service(&self.doors.app, self.admitted);
        let drain = (self.watcher, &self.shutdown);
        self.doors.protocols.serve(protocol, drain, io, app).await
    }
}

/// The application as one connection sees it: every request carries the connection's
/// `Connection` (peer, subscription count), or is answered with its refusal.
fn service(
    app: &Router,
    admitted: Result<Connection, Error>,
) -> Either<<axum::Extension<Connection> as tower::Layer<Router>>::Service, Router> {
    match admitted {
        Ok(connection) => Either::Left(axum::Extension(connection).layer(app.clone())),
        Err(refusal) => Either::Right(refused(refusal)),
    }
}

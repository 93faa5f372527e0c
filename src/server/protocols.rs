//! The hyper servers every connection is handed to once its protocol is known.

use std::time::Duration;

use axum::extract::Request;
use axum::response::Response;
use hyper::server::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::graceful::Watcher;
use hyper_util::service::TowerToHyperService;
use tokio_util::sync::CancellationToken;

use super::sniff::Protocol;
use crate::metrics::{Door, Metrics};
use crate::net::write_timeout::{WriteProgress, WriteTimeout};

/// The configured HTTP/1.1 and HTTP/2 servers.
pub(super) struct Protocols {
    pub(super) h1: http1::Builder,
    pub(super) h2: http2::Builder<TokioExecutor>,
    /// `--write-timeout`, applied to every connection.
    pub(super) write_timeout: Duration,
    pub(super) metrics: Metrics,
}

impl Protocols {
    /// The write timeout of a connection speaking `protocol`. Which door an HTTP/2 connection
    /// serves is not known per connection; nearly all are gRPC's, and count there.
    pub(super) fn write_timeout(&self, protocol: Protocol) -> WriteTimeout {
        let door = match protocol {
            Protocol::Http1 => Door::Http,
            Protocol::Http2 => Door::Grpc,
        };
        WriteTimeout::new(self.write_timeout, door, self.metrics.clone())
    }

    /// Serves one connection until it closes or the graceful shutdown completes. Each
    /// protocol's connection is boxed on its own, so that an HTTP/1.1 connection (most of the
    /// idle SSE subscribers) does not carry the size of an HTTP/2 one.
    pub(super) async fn serve<IO, S>(
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

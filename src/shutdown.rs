//! The one shutdown signal: ctrl-c or SIGTERM cancels a token that the accept loop, every
//! connection and every long-lived stream watch; [`StreamEnd`] is how streams watch it (and
//! their token's expiry).

use tokio_util::sync::CancellationToken;

use crate::error::Error;
use crate::hub::{Event, Subscription};

/// Resolves on ctrl-c (SIGINT) or SIGTERM.
pub async fn signal() {
    let ctrl_c = async {
        if let Err(error) = tokio::signal::ctrl_c().await {
            tracing::error!(%error, "cannot listen for ctrl-c");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut sigterm) => {
                sigterm.recv().await;
            }
            Err(error) => {
                tracing::error!(%error, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = terminate => {}
    }
}

/// A token cancelled when `signal()` resolves.
pub fn on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let trigger = token.clone();
    tokio::spawn(async move {
        signal().await;
        tracing::info!("shutdown signal received; draining");
        trigger.cancel();
    });
    token
}

/// What ends a long-lived stream besides its subscription: server shutdown, or the expiry of
/// the client's token.
pub struct StreamEnd {
    shutdown: CancellationToken,
    /// Armed once per stream, not per event.
    expiry: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
}

impl StreamEnd {
    /// Ends on `shutdown`, or at `expires_at` if the client's token expires.
    pub fn new(
        shutdown: CancellationToken,
        expires_at: Option<std::time::SystemTime>,
    ) -> StreamEnd {
        let expiry = expires_at.map(|at| {
            let left = at
                .duration_since(std::time::SystemTime::now())
                .unwrap_or_default();
            Box::pin(tokio::time::sleep(left))
        });
        StreamEnd { shutdown, expiry }
    }

    /// Resolves when the stream must end, with the reason.
    pub async fn ended(&mut self) -> Error {
        let expiry = async {
            match &mut self.expiry {
                Some(sleep) => sleep.await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            biased;
            () = self.shutdown.cancelled() => Error::ShuttingDown,
            () = expiry => Error::Unauthenticated("the token has expired; reconnect with a fresh token".into()),
        }
    }

    /// The next event of `subscription`: `None` when it ended cleanly, an error when it was
    /// closed by the hub, the server is shutting down, or the token expired.
    pub async fn next(&mut self, subscription: &mut Subscription) -> Option<Result<Event, Error>> {
        tokio::select! {
            biased;
            error = self.ended() => Some(Err(error)),
            event = subscription.next() => event,
        }
    }
}

//! The one shutdown signal: ctrl-c or SIGTERM cancels a token that the accept loop, every
//! connection and every long-lived stream watch; [`StreamEnd`] is how streams watch it (and
//! their token's expiry).

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

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
///
/// Both waits are registered once per stream, not once per event: a stream that delivers many
/// events polls them without building or tearing down a future each time.
pub struct StreamEnd {
    shutdown: CancellationToken,
    cancelled: Pin<Box<WaitForCancellationFutureOwned>>,
    /// The waker `cancelled` was last polled with; polled again only when it changes.
    registered: Option<Waker>,
    expiry: Option<Pin<Box<tokio::time::Sleep>>>,
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
        StreamEnd {
            cancelled: Box::pin(shutdown.clone().cancelled_owned()),
            shutdown,
            registered: None,
            expiry,
        }
    }

    /// Resolves when the stream must end, with the reason.
    pub async fn ended(&mut self) -> Error {
        std::future::poll_fn(|cx| self.poll_ended(cx)).await
    }

    /// [`StreamEnd::ended`], polled by hand.
    pub fn poll_ended(&mut self, cx: &mut Context<'_>) -> Poll<Error> {
        if self.shutdown.is_cancelled() {
            return Poll::Ready(Error::ShuttingDown);
        }
        if !self
            .registered
            .as_ref()
            .is_some_and(|w| w.will_wake(cx.waker()))
        {
            if self.cancelled.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Error::ShuttingDown);
            }
            self.registered = Some(cx.waker().clone());
        }
        if let Some(expiry) = &mut self.expiry
            && expiry.as_mut().poll(cx).is_ready()
        {
            return Poll::Ready(Error::Unauthenticated(
                "the token has expired; reconnect with a fresh token".into(),
            ));
        }
        Poll::Pending
    }

    /// The next event of `subscription`: `None` when it ended cleanly, an error when it was
    /// closed by the hub, the server is shutting down, or the token expired.
    pub async fn next(&mut self, subscription: &mut Subscription) -> Option<Result<Event, Error>> {
        std::future::poll_fn(|cx| self.poll_next(cx, subscription)).await
    }

    /// [`StreamEnd::next`], polled by hand.
    pub fn poll_next(
        &mut self,
        cx: &mut Context<'_>,
        subscription: &mut Subscription,
    ) -> Poll<Option<Result<Event, Error>>> {
        if let Poll::Ready(error) = self.poll_ended(cx) {
            return Poll::Ready(Some(Err(error)));
        }
        subscription.poll_next(cx)
    }
}

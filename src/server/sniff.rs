//! Which protocol a plain connection speaks, told from its first bytes without consuming them.

use std::time::Duration;

use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use crate::net::H2_PREFACE;

/// The protocol a connection speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Protocol {
    /// HTTP/1.1 (REST, SSE, gRPC-Web, the WebSocket upgrade).
    Http1,
    /// HTTP/2 with prior knowledge (gRPC, and every door over h2c).
    Http2,
}

/// What [`sniff`] saw: the protocol, and the first bytes it was told from.
pub(super) struct Sniffed {
    pub(super) protocol: Protocol,
    first: [u8; H2_PREFACE.len()],
    len: usize,
}

impl Sniffed {
    pub(super) fn first(&self) -> &[u8] {
        &self.first[..self.len]
    }
}

/// Tells an h2c connection from an HTTP/1.1 one by its first bytes, without consuming them:
/// hyper reads them again from the socket. (Reading them into a side buffer, as a generic
/// detector must, doubles hyper's HTTP/1.1 read buffer to 16 KiB on every connection, since its
/// first read then returns only those bytes.) `None` if the peer closes, or sends nothing
/// decisive within `timeout`, or the server is shutting down.
pub(super) async fn sniff(
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

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

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
}

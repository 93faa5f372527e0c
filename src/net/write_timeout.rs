//! Frozen readers are let go: a connection whose peer accepts no bytes for `--write-timeout`
//! while the server has bytes to send it is closed.
//!
//! A peer that keeps its socket open but never reads (a hung process, a stopped tab behind a
//! proxy) holds its connection, its subscriptions and what is queued for them until the socket
//! closes, which TCP alone may never do: the peer's kernel still acknowledges, it just advertises
//! a zero window. Keepalive pings do not help either: the peer's kernel answers for it.
//!
//! [`Progress`] is the rule, written once: a write that would block starts the clock, any
//! bytes the socket accepts stop it, and when it runs out the write fails with `TimedOut`, which
//! ends the connection. The direct SSE writer (`sse_conn`) applies it to its own writes;
//! [`WriteProgress`] applies it to every connection served by hyper (HTTP/1.1 and HTTP/2,
//! so SSE, gRPC and gRPC-Web streams alike). An idle connection, with nothing to send, is never
//! timed out here.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

use crate::metrics::{Door, Metrics};

/// What a stalled write is held to: the timeout (`None`: never), and where it is counted.
#[derive(Clone)]
pub struct WriteTimeout {
    timeout: Option<Duration>,
    door: Door,
    metrics: Metrics,
}

impl WriteTimeout {
    /// Stalls of `timeout` (zero: none is ever timed out) close the connection, counted under
    /// `door`.
    pub fn new(timeout: Duration, door: Door, metrics: Metrics) -> WriteTimeout {
        WriteTimeout {
            timeout: (!timeout.is_zero()).then_some(timeout),
            door,
            metrics,
        }
    }
}

/// The write progress of one connection.
pub(crate) struct Progress {
    config: WriteTimeout,
    /// Allocated at the first stall only: most connections never fill their socket.
    deadline: Option<Pin<Box<Sleep>>>,
    /// A write is blocked and the clock runs.
    stalled: bool,
    /// The deadline passed; every later write fails too.
    expired: bool,
}

impl Progress {
    pub(crate) fn new(config: WriteTimeout) -> Progress {
        Progress {
            config,
            deadline: None,
            stalled: false,
            expired: false,
        }
    }

    /// The socket accepted bytes.
    pub(crate) fn advanced(&mut self) {
        self.stalled = false;
    }

    /// A write would block: starts the clock if it is not running; an error once it has run
    /// out (counted and logged once per connection), else pending.
    pub(crate) fn poll_stalled(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        let Some(timeout) = self.config.timeout else {
            return Poll::Pending;
        };
        if !self.expired {
            if !self.stalled {
                self.stalled = true;
                let deadline = Instant::now() + timeout;
                match &mut self.deadline {
                    Some(sleep) => sleep.as_mut().reset(deadline),
                    None => self.deadline = Some(Box::pin(tokio::time::sleep_until(deadline))),
                }
            }
            let sleep = self.deadline.as_mut().expect("armed above");
            if sleep.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            self.expired = true;
            self.config.metrics.write_timed_out(self.config.door);
            tracing::info!(
                door = ?self.config.door,
                ?timeout,
                "peer accepted no bytes within the write timeout; closing the connection"
            );
        }
        Poll::Ready(io::Error::new(
            io::ErrorKind::TimedOut,
            "the peer stopped reading (--write-timeout)",
        ))
    }

    /// Follows one write's result: bytes accepted stop the clock; a blocked write runs it.
    pub(crate) fn follow(
        &mut self,
        cx: &mut Context<'_>,
        result: Poll<io::Result<usize>>,
    ) -> Poll<io::Result<usize>> {
        match result {
            Poll::Ready(Ok(n)) if n > 0 => {
                self.advanced();
                Poll::Ready(Ok(n))
            }
            Poll::Pending => self.poll_stalled(cx).map(Err),
            other => other,
        }
    }
}

/// A connection whose writes are held to a [`WriteTimeout`]; reads pass through.
pub struct WriteProgress<IO> {
    inner: IO,
    progress: Progress,
}

impl<IO> WriteProgress<IO> {
    /// Wraps `inner`.
    pub fn new(inner: IO, config: WriteTimeout) -> WriteProgress<IO> {
        WriteProgress {
            inner,
            progress: Progress::new(config),
        }
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for WriteProgress<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for WriteProgress<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let result = Pin::new(&mut this.inner).poll_write(cx, data);
        this.progress.follow(cx, result)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let result = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.progress.follow(cx, result)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        // A TLS session writes its buffered records here: blocked, it stalls like a write, and
        // done, everything buffered went out. (hyper and h2 flush only once their own buffers
        // are written, so on TCP a finished flush follows progress too.)
        match Pin::new(&mut this.inner).poll_flush(cx) {
            Poll::Pending => this.progress.poll_stalled(cx).map(Err),
            Poll::Ready(Ok(())) => {
                this.progress.advanced();
                Poll::Ready(Ok(()))
            }
            other => other,
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    const TIMEOUT: Duration = Duration::from_millis(300);

    /// A peer that never reads: writes fill the pipe, then stall, then fail after the timeout;
    /// the stall is counted once.
    #[tokio::test(start_paused = true)]
    async fn a_write_blocked_for_the_timeout_fails_and_is_counted_once() {
        let (_client, server) = tokio::io::duplex(1024);
        let metrics = Metrics::new();
        let config = WriteTimeout::new(TIMEOUT, Door::Http, metrics.clone());
        let mut io = WriteProgress::new(server, config);
        io.write_all(&[0; 1024]).await.unwrap();
        let started = Instant::now();
        let error = tokio::time::timeout(10 * TIMEOUT, io.write_all(&[0; 10]))
            .await
            .expect("the write fails within the bound")
            .unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::TimedOut);
        assert!(started.elapsed() >= TIMEOUT);
        assert!(io.write_all(&[0; 10]).await.is_err(), "it stays failed");
        let text = metrics.render(&Default::default());
        assert!(
            text.contains("topichub_write_timeouts_total{door=\"http\"} 1"),
            "{text}"
        );
    }

    /// A slow reader that takes a few bytes at intervals shorter than the timeout is kept,
    /// however long the whole write takes.
    #[tokio::test(start_paused = true)]
    async fn a_reader_that_makes_progress_is_kept() {
        let (mut client, server) = tokio::io::duplex(16);
        let config = WriteTimeout::new(TIMEOUT, Door::Http, Metrics::new());
        let mut io = WriteProgress::new(server, config);
        let reader = tokio::spawn(async move {
            let mut buf = [0; 16];
            let mut total = 0;
            while total < 96 {
                tokio::time::sleep(TIMEOUT / 3).await;
                total += client.read(&mut buf).await.unwrap();
            }
        });
        tokio::time::timeout(100 * TIMEOUT, io.write_all(&[0; 96]))
            .await
            .expect("within the bound")
            .expect("a reader that makes progress is not timed out");
        reader.await.unwrap();
    }
}

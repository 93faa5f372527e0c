//! `--http-body-timeout` for gRPC and gRPC-Web request bodies.
//!
//! hyper and tonic wait for a request body as long as the peer keeps the connection open, so a
//! client announcing a 1000-byte message and sending 8 would hold its call (and the message
//! buffer) indefinitely. [`bound`] wraps each gRPC request body in a [`DeadlineBody`] that follows
//! the gRPC message framing (a 5-byte prefix: flag and length) and ends the call with
//! DEADLINE_EXCEEDED when a request message that has begun is not whole within the timeout.
//! Calls whose request is one message (everything but the client-streaming publish calls) must
//! also begin it within the timeout. Idle time between messages of a stream is the client's to
//! take: that is what PublishBatch and Connect are for.

use std::future::Future as _;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::extract::Request;
use bytes::Bytes;
use http_body::{Frame, SizeHint};
use tokio::time::{Instant, Sleep};

/// Calls whose request is a stream of messages with idle time between them allowed.
const STREAMING_REQUESTS: [&str; 2] = [
    "/topichub.v1.PubSub/PublishBatch",
    "/topichub.v1.PubSub/Connect",
];

/// The length of a gRPC message prefix: a compression flag and a big-endian u32 length.
const PREFIX: usize = 5;

/// `request` with its body bounded in time (see the module docs); applied by the gRPC door's
/// gate, before the service.
pub fn bound(request: Request, timeout: Duration) -> Request {
    let streaming = STREAMING_REQUESTS.contains(&request.uri().path());
    request.map(|body| Body::new(DeadlineBody::new(body, timeout, !streaming)))
}

/// A gRPC request body whose messages must arrive within a timeout once begun.
pub struct DeadlineBody {
    inner: Body,
    timeout: Duration,
    /// When the message being waited for is due; `None` while none is.
    due: Option<Instant>,
    /// The timer, made the first time the body has to wait for a message that is due: a unary
    /// request arrives whole with its headers nearly always, and then costs no timer.
    deadline: Option<Pin<Box<Sleep>>>,
    /// Prefix bytes of the current message seen so far.
    prefix: [u8; PREFIX],
    prefix_len: usize,
    /// Bytes of the current message's payload still to come.
    payload_left: u64,
    /// Set when the timeout fired: the body has ended with an error.
    expired: bool,
}

impl DeadlineBody {
    /// Wraps `inner`; with `first_message_due`, the first message must also begin in time.
    pub fn new(inner: Body, timeout: Duration, first_message_due: bool) -> DeadlineBody {
        DeadlineBody {
            inner,
            timeout,
            due: first_message_due.then(|| Instant::now() + timeout),
            deadline: None,
            prefix: [0; PREFIX],
            prefix_len: 0,
            payload_left: 0,
            expired: false,
        }
    }

    /// Follows the message framing through `data`; arms the deadline when a message begins and
    /// disarms it when the message is whole.
    fn saw(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            if self.payload_left > 0 {
                let n = data
                    .len()
                    .min(usize::try_from(self.payload_left).unwrap_or(usize::MAX));
                self.payload_left -= n as u64;
                data = &data[n..];
            } else {
                if self.prefix_len == 0 && self.due.is_none() {
                    self.due = Some(Instant::now() + self.timeout);
                }
                let n = (PREFIX - self.prefix_len).min(data.len());
                self.prefix[self.prefix_len..self.prefix_len + n].copy_from_slice(&data[..n]);
                self.prefix_len += n;
                data = &data[n..];
                if self.prefix_len == PREFIX {
                    let p = &self.prefix;
                    self.payload_left = u64::from(u32::from_be_bytes([p[1], p[2], p[3], p[4]]));
                    self.prefix_len = 0;
                }
            }
            if self.prefix_len == 0 && self.payload_left == 0 {
                self.due = None;
            }
        }
    }
}

impl DeadlineBody {
    /// Whether a message is due and its time is up; if not, the timer wakes the task then.
    fn waited_too_long(&mut self, cx: &mut Context<'_>) -> bool {
        let Some(due) = self.due else {
            return false;
        };
        let deadline = self
            .deadline
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(due)));
        if deadline.deadline() != due {
            deadline.as_mut().reset(due);
        }
        deadline.as_mut().poll(cx).is_ready()
    }
}

impl http_body::Body for DeadlineBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let this = &mut *self;
        if this.expired {
            return Poll::Ready(None);
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.saw(data);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Pending if this.waited_too_long(cx) => {
                this.expired = true;
                tracing::debug!(timeout = ?this.timeout, "gRPC request message did not arrive in time");
                // tonic finds the status in the error's source chain and answers with it.
                Poll::Ready(Some(Err(axum::Error::new(
                    tonic::Status::deadline_exceeded(format!(
                        "the request message did not arrive within {:?} (server option --http-body-timeout)",
                        this.timeout
                    )),
                ))))
            }
            other => other,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn framed(payload: &[u8]) -> Vec<u8> {
        let mut out = vec![0];
        out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        out.extend_from_slice(payload);
        out
    }

    #[tokio::test]
    async fn the_deadline_is_armed_while_a_message_is_incomplete() {
        let body = || DeadlineBody::new(Body::empty(), Duration::from_secs(1), false);
        let mut stream = framed(b"hello");
        stream.extend(framed(b""));
        stream.extend(framed(b"world"));
        for chunk in [1, 2, 5, 7, 100] {
            let mut body = body();
            let mut seen = 0;
            for piece in stream.chunks(chunk) {
                body.saw(piece);
                seen += piece.len();
                let whole = [10, 15, 25].contains(&seen);
                assert_eq!(
                    body.due.is_some(),
                    !whole,
                    "after {seen} bytes in pieces of {chunk}"
                );
            }
        }
        let mut body = body();
        body.saw(&framed(&[7; 1000])[..13]);
        assert!(body.due.is_some(), "1000 bytes announced, 8 sent");
    }
}

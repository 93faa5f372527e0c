//! Keepalive enforcement: clients may not ping more often than a minimum interval.
//!
//! gRPC servers refuse clients that send HTTP/2 PINGs too often (grpc-go's
//! `EnforcementPolicy{MinTime}`, as in the seed): each ping that arrives sooner than the minimum
//! interval after the previous one is a strike, and after [`MAX_PING_STRIKES`] strikes the server
//! answers `GOAWAY(ENHANCE_YOUR_CALM, "too_many_pings")` and closes the connection. Like grpc-go,
//! strikes are forgiven whenever the server sends HEADERS or DATA, so clients that ping while
//! receiving (BDP estimation) are not punished. Pings are permitted without active streams (the
//! seed's `PermitWithoutStream: true`).
//!
//! Acknowledgements the server never asked for (a PING or SETTINGS ACK with no PING or SETTINGS
//! of the server's outstanding) cost the server work and h2 a log line each; more than
//! [`MAX_UNSOLICITED_ACKS`] of them close the connection the same way
//! (`GOAWAY(ENHANCE_YOUR_CALM, "unsolicited_acks")`).
//!
//! hyper answers pings itself and has no such policy, so [`PingPolicyStream`] wraps each accepted
//! TCP stream and follows the HTTP/2 frame headers going both ways. Only the 9-byte frame
//! headers are inspected; payloads are skipped by length. HTTP/1.1 connections (no HTTP/2
//! preface) pass through untouched. The GOAWAY is written through the wrapped stream, so it is
//! sent over TLS too.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::H2_PREFACE as PREFACE;

/// Strikes tolerated before the connection is closed (grpc-go's `maxPingStrikes`).
pub const MAX_PING_STRIKES: u32 = 2;

/// Unsolicited PING or SETTINGS acknowledgements tolerated before the connection is closed. A
/// conforming client sends none.
pub const MAX_UNSOLICITED_ACKS: u32 = 10;

const FRAME_HEADER: usize = 9;
const TYPE_DATA: u8 = 0x0;
const TYPE_HEADERS: u8 = 0x1;
const TYPE_SETTINGS: u8 = 0x4;
const TYPE_PING: u8 = 0x6;
const TYPE_GOAWAY: u8 = 0x7;
const FLAG_ACK: u8 = 0x1;
const ENHANCE_YOUR_CALM: u32 = 0xb;

/// A connection (TCP, or TLS over TCP) whose HTTP/2 client pings are held to a minimum interval.
pub struct PingPolicyStream<IO> {
    inner: IO,
    min_interval: Duration,
    /// What the client sends: preface, then frames.
    inbound: FrameScanner,
    /// What the server sends: frames only.
    outbound: FrameScanner,
    last_ping: Option<Instant>,
    strikes: u32,
    /// Highest stream id the client opened, for the GOAWAY.
    last_stream_id: u32,
    /// PINGs and SETTINGS the server sent that the client has not acknowledged yet.
    pings_unacked: u32,
    settings_unacked: u32,
    /// Acknowledgements of nothing the client sent.
    unsolicited_acks: u32,
    /// Set once the policy was broken: the GOAWAY still to write (and how much of it is
    /// written), then every read and write fails.
    closing: Option<Closing>,
}

/// A connection being closed for breaking the policy.
struct Closing {
    goaway: Vec<u8>,
    written: usize,
    reason: &'static str,
}

impl<IO: AsyncRead + AsyncWrite + Unpin> PingPolicyStream<IO> {
    /// Wraps `inner`; pings less than `min_interval` apart count as strikes.
    pub fn new(inner: IO, min_interval: Duration) -> PingPolicyStream<IO> {
        PingPolicyStream {
            inner,
            min_interval,
            inbound: FrameScanner::expecting_preface(),
            outbound: FrameScanner::default(),
            last_ping: None,
            strikes: 0,
            last_stream_id: 0,
            pings_unacked: 0,
            settings_unacked: 0,
            unsolicited_acks: 0,
            closing: None,
        }
    }

    /// Records a frame the client sent; the reason to close when it broke the policy.
    fn on_client_frame(&mut self, header: FrameHeader) -> Option<&'static str> {
        if header.kind == TYPE_HEADERS {
            self.last_stream_id = self.last_stream_id.max(header.stream_id);
        }
        let ack = header.flags & FLAG_ACK != 0;
        match (header.kind, ack) {
            (TYPE_PING, false) => self.on_client_ping(),
            (TYPE_PING, true) => self.on_ack(|s| &mut s.pings_unacked),
            (TYPE_SETTINGS, true) => self.on_ack(|s| &mut s.settings_unacked),
            _ => None,
        }
    }

    fn on_client_ping(&mut self) -> Option<&'static str> {
        let now = Instant::now();
        if self
            .last_ping
            .is_some_and(|last| now.duration_since(last) < self.min_interval)
        {
            self.strikes += 1;
        }
        self.last_ping = Some(now);
        if self.strikes > MAX_PING_STRIKES {
            tracing::info!(
                min_interval = ?self.min_interval,
                "client pings too often; closing the connection (too_many_pings)"
            );
            return Some("too_many_pings");
        }
        None
    }

    /// An acknowledgement: of one of the server's frames counted by `outstanding`, or of nothing.
    fn on_ack(&mut self, outstanding: fn(&mut Self) -> &mut u32) -> Option<&'static str> {
        let outstanding = outstanding(self);
        if *outstanding > 0 {
            *outstanding -= 1;
            return None;
        }
        self.unsolicited_acks += 1;
        if self.unsolicited_acks > MAX_UNSOLICITED_ACKS {
            tracing::info!(
                acks = self.unsolicited_acks,
                "client acknowledges frames the server never sent; closing the connection"
            );
            return Some("unsolicited_acks");
        }
        None
    }

    /// Starts closing the connection for `reason`: `GOAWAY(ENHANCE_YOUR_CALM)` is written first
    /// when the server is between frames (so it cannot split one of hyper's).
    fn close(&mut self, reason: &'static str) {
        let mut goaway = Vec::new();
        if self.outbound.at_frame_boundary() {
            let length = (8 + reason.len()) as u32;
            goaway.extend_from_slice(&length.to_be_bytes()[1..]);
            goaway.extend_from_slice(&[TYPE_GOAWAY, 0]);
            goaway.extend_from_slice(&0u32.to_be_bytes());
            goaway.extend_from_slice(&self.last_stream_id.to_be_bytes());
            goaway.extend_from_slice(&ENHANCE_YOUR_CALM.to_be_bytes());
            goaway.extend_from_slice(reason.as_bytes());
        }
        self.closing = Some(Closing {
            goaway,
            written: 0,
            reason,
        });
    }

    /// Writes what is left of the GOAWAY and flushes it (through TLS, when the stream is TLS);
    /// then the error that ends the connection. The GOAWAY is best effort: a write error ends
    /// the connection just the same.
    fn poll_closing(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        let closing = self.closing.as_mut().expect("closing");
        while closing.written < closing.goaway.len() {
            match ready!(
                Pin::new(&mut self.inner).poll_write(cx, &closing.goaway[closing.written..])
            ) {
                Ok(n) if n > 0 => closing.written += n,
                _ => {
                    closing.written = closing.goaway.len();
                    break;
                }
            }
        }
        if !closing.goaway.is_empty() {
            let _ = ready!(Pin::new(&mut self.inner).poll_flush(cx));
            closing.goaway.clear();
        }
        Poll::Ready(io::Error::new(
            io::ErrorKind::ConnectionAborted,
            closing.reason,
        ))
    }
}

impl<IO> PingPolicyStream<IO> {
    /// Follows the first `written` bytes of `bufs` (just sent): HEADERS or DATA forgive strikes.
    fn wrote(&mut self, bufs: &[io::IoSlice<'_>], written: usize) {
        if self.inbound.passthrough {
            return;
        }
        let (mut left, mut forgiven) = (written, false);
        let (mut pings, mut settings) = (0, 0);
        for buf in bufs {
            if left == 0 {
                break;
            }
            let n = left.min(buf.len());
            self.outbound.scan(&buf[..n], |h| {
                forgiven |= h.kind == TYPE_DATA || h.kind == TYPE_HEADERS;
                let asks = h.flags & FLAG_ACK == 0;
                pings += u32::from(asks && h.kind == TYPE_PING);
                settings += u32::from(asks && h.kind == TYPE_SETTINGS);
            });
            left -= n;
        }
        self.pings_unacked = self.pings_unacked.saturating_add(pings);
        self.settings_unacked = self.settings_unacked.saturating_add(settings);
        if forgiven {
            self.strikes = 0;
            self.last_ping = None;
        }
    }
}

impl<IO: AsyncRead + AsyncWrite + Unpin> AsyncRead for PingPolicyStream<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.closing.is_some() {
            return this.poll_closing(cx).map(Err);
        }
        let before = buf.filled().len();
        let result = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = result {
            let mut frames = Vec::new();
            this.inbound
                .scan(&buf.filled()[before..], |h| frames.push(h));
            if let Some(reason) = frames.into_iter().find_map(|h| this.on_client_frame(h)) {
                // What was read is dropped with the connection.
                buf.set_filled(before);
                this.close(reason);
                return this.poll_closing(cx).map(Err);
            }
        }
        result
    }
}

impl<IO: AsyncRead + AsyncWrite + Unpin> AsyncWrite for PingPolicyStream<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if this.closing.is_some() {
            return this.poll_closing(cx).map(Err);
        }
        let result = Pin::new(&mut this.inner).poll_write(cx, data);
        if let Poll::Ready(Ok(written)) = result {
            this.wrote(&[io::IoSlice::new(data)], written);
        }
        result
    }

    // Vectored writes pass through: without them hyper and h2 would copy every frame into a
    // flat buffer first.
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if this.closing.is_some() {
            return this.poll_closing(cx).map(Err);
        }
        let result = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(written)) = result {
            this.wrote(bufs, written);
        }
        result
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// The fields of an HTTP/2 frame header this module needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FrameHeader {
    kind: u8,
    flags: u8,
    stream_id: u32,
}

/// Follows frame boundaries in one direction of an HTTP/2 byte stream.
#[derive(Debug, Default)]
struct FrameScanner {
    /// Preface bytes still expected; `Some(0)` once matched.
    preface_left: Option<usize>,
    /// Not HTTP/2 (no preface): scanning is off.
    passthrough: bool,
    header: [u8; FRAME_HEADER],
    header_len: usize,
    payload_left: usize,
}

impl FrameScanner {
    fn expecting_preface() -> FrameScanner {
        FrameScanner {
            preface_left: Some(PREFACE.len()),
            ..Default::default()
        }
    }

    fn at_frame_boundary(&self) -> bool {
        !self.passthrough && self.header_len == 0 && self.payload_left == 0
    }

    /// Feeds bytes; calls `on_frame` for each complete frame header.
    fn scan(&mut self, mut bytes: &[u8], mut on_frame: impl FnMut(FrameHeader)) {
        while !bytes.is_empty() && !self.passthrough {
            if let Some(left) = self.preface_left.filter(|left| *left > 0) {
                let offset = PREFACE.len() - left;
                let n = left.min(bytes.len());
                if bytes[..n] != PREFACE[offset..offset + n] {
                    self.passthrough = true;
                    return;
                }
                self.preface_left = Some(left - n);
                bytes = &bytes[n..];
            } else if self.payload_left > 0 {
                let n = self.payload_left.min(bytes.len());
                self.payload_left -= n;
                bytes = &bytes[n..];
            } else {
                let n = (FRAME_HEADER - self.header_len).min(bytes.len());
                self.header[self.header_len..self.header_len + n].copy_from_slice(&bytes[..n]);
                self.header_len += n;
                bytes = &bytes[n..];
                if self.header_len == FRAME_HEADER {
                    let h = &self.header;
                    self.payload_left = u32::from_be_bytes([0, h[0], h[1], h[2]]) as usize;
                    self.header_len = 0;
                    on_frame(FrameHeader {
                        kind: h[3],
                        flags: h[4],
                        stream_id: u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & 0x7fff_ffff,
                    });
                }
            }
        }
    }
}

/// Scans `pieces`, in order, as what a client sends, for the fuzz target in `fuzz/`: the frame
/// headers found (type, flags, stream id), whether the bytes were let through as not HTTP/2, and
/// whether they end on a frame boundary.
#[doc(hidden)]
pub fn scan_client_bytes<'a>(
    pieces: impl IntoIterator<Item = &'a [u8]>,
) -> (Vec<(u8, u8, u32)>, bool, bool) {
    let mut scanner = FrameScanner::expecting_preface();
    let mut frames = Vec::new();
    for piece in pieces {
        scanner.scan(piece, |h| frames.push((h.kind, h.flags, h.stream_id)));
    }
    (frames, scanner.passthrough, scanner.at_frame_boundary())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let mut out = (payload.len() as u32).to_be_bytes()[1..].to_vec();
        out.extend_from_slice(&[kind, flags]);
        out.extend_from_slice(&stream.to_be_bytes());
        out.extend_from_slice(payload);
        out
    }

    #[test]
    fn scanner_finds_frames_however_the_bytes_are_split() {
        let mut stream = PREFACE.to_vec();
        stream.extend(frame(0x4, 0, 0, &[0; 6]));
        stream.extend(frame(TYPE_HEADERS, 0x4, 1, &[1, 2, 3]));
        stream.extend(frame(TYPE_PING, 0, 0, &[0; 8]));
        stream.extend(frame(TYPE_PING, FLAG_ACK, 0, &[0; 8]));
        for chunk in [1, 2, 5, 9, 1000] {
            let mut scanner = FrameScanner::expecting_preface();
            let mut seen = Vec::new();
            for piece in stream.chunks(chunk) {
                scanner.scan(piece, |h| seen.push((h.kind, h.flags, h.stream_id)));
            }
            assert_eq!(
                seen,
                [
                    (0x4, 0, 0),
                    (TYPE_HEADERS, 0x4, 1),
                    (TYPE_PING, 0, 0),
                    (TYPE_PING, FLAG_ACK, 0)
                ]
            );
            assert!(scanner.at_frame_boundary());
        }
    }

    #[test]
    fn http1_passes_through_unscanned() {
        let mut scanner = FrameScanner::expecting_preface();
        let mut seen = 0;
        scanner.scan(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n", |_| seen += 1);
        scanner.scan(&frame(TYPE_PING, 0, 0, &[0; 8]), |_| seen += 1);
        assert_eq!(seen, 0);
        assert!(scanner.passthrough);
    }
}

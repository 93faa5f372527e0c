//! HTTP/1.1 connections that open with `GET /subscribe`, written to directly.
//!
//! hyper keeps an 8 KiB read buffer and an 8 KiB write buffer for every HTTP/1.1 connection, for
//! the connection's whole life. An SSE subscriber's connection carries one request and then only
//! the server's frames, so those buffers were most of what an idle subscriber cost. When a plain
//! TCP connection's first bytes, as peeked, are a complete `GET /subscribe` head, the listener
//! serves the connection here instead: the request goes through the same application (auth,
//! limits, the SSE handler, tracing), and the response goes straight to the socket: the head
//! once, then the frames that are ready, gathered into one chunk and one vectored write. The
//! connection closes after that one response (`connection: close`).
//!
//! Anything else (another method or path, HTTP/1.0, a request with a body or an upgrade, a head
//! that is not complete in the first segment, TLS) is served by hyper.

use std::convert::Infallible;
use std::future::poll_fn;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::{Duration, SystemTime};

use axum::body::Body;
use axum::extract::Request;
use axum::http::{HeaderName, HeaderValue, Method, StatusCode, Version, header};
use axum::response::Response;
use bytes::Bytes;
use http_body::Body as _;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt as _;

use crate::net::write_timeout::{Progress, WriteTimeout};

/// The most of a request head looked at. Longer heads go to hyper.
const MAX_HEAD: usize = 8 * 1024;
/// The most headers a request may have to be taken here.
const MAX_HEADERS: usize = 64;
/// Frames gathered into one chunk (and one `writev`) at most.
const MAX_BATCH: usize = 16;
/// Bytes gathered into one chunk at most (a batch may exceed it by its last frame).
const MAX_BATCH_BYTES: usize = 64 * 1024;
/// How long a finished connection waits for the client to close first.
const LINGER: Duration = Duration::from_secs(1);
/// Bytes a client may send after its request (a pipelined request or two) before it is
/// disconnected.
const MAX_DISCARD: usize = 64 * 1024;

/// A request this module serves: its head's length on the socket and the parsed request.
pub(crate) struct Taken {
    head: Vec<u8>,
    request: Request,
}

/// The start of every request this module takes.
const REQUEST_LINE: &[u8] = b"GET /subscribe";

/// Peeks at the connection's first bytes; `Some` if they are a complete `GET /subscribe`
/// request head that this module serves. Consumes nothing. `first` is what the listener has
/// already peeked: any other request is turned away without looking further. (Boxed by the
/// caller, as is everything that lives only until the response head: the connection's task
/// keeps the size of its largest state for the life of the stream.)
pub(crate) async fn take(stream: &TcpStream, first: &[u8]) -> Option<Box<Taken>> {
    let known = first.len().min(REQUEST_LINE.len());
    if first[..known] != REQUEST_LINE[..known] {
        return None;
    }
    let mut head = vec![0; MAX_HEAD];
    let peeked = stream.peek(&mut head).await.ok()?;
    let (length, request) = parse(&head[..peeked])?;
    head.truncate(length);
    Some(Box::new(Taken { head, request }))
}

/// Parses a complete `GET /subscribe` HTTP/1.1 head with no body; `None` for anything else.
pub fn parse(bytes: &[u8]) -> Option<(usize, Request)> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut parsed = httparse::Request::new(&mut headers);
    let httparse::Status::Complete(length) = parsed.parse(bytes).ok()? else {
        return None;
    };
    let path = parsed.path?;
    let route = path.split_once('?').map_or(path, |(route, _)| route);
    if parsed.method? != "GET" || parsed.version? != 1 || route != "/subscribe" {
        return None;
    }
    let mut request = Request::new(Body::empty());
    *request.method_mut() = Method::GET;
    *request.version_mut() = Version::HTTP_11;
    *request.uri_mut() = path.parse().ok()?;
    for field in parsed.headers.iter() {
        let name = HeaderName::from_bytes(field.name.as_bytes()).ok()?;
        let value = HeaderValue::from_bytes(field.value).ok()?;
        let has_body =
            (name == header::CONTENT_LENGTH && value != "0") || name == header::TRANSFER_ENCODING;
        if has_body || name == header::UPGRADE || name == header::EXPECT {
            return None;
        }
        request.headers_mut().append(name, value);
    }
    Some((length, request))
}

/// Serves the taken request on `stream` and closes the connection when its response ends or
/// the client goes away.
pub(crate) async fn serve<S>(
    mut stream: TcpStream,
    taken: Box<Taken>,
    mut app: S,
    shutdown: &CancellationToken,
    write_timeout: WriteTimeout,
) -> io::Result<()>
where
    S: tower::Service<Request, Response = Response, Error = Infallible>,
{
    // `app` lives as long as the connection: it carries the connection's place in
    // --max-connections.
    let mut writer = Box::pin(respond(&mut stream, taken, &mut app, write_timeout)).await?;
    poll_fn(|cx| writer.poll_run(&stream, cx)).await?;
    drop(writer);
    stream.shutdown().await?;
    // A lingering close: the client may still have bytes in flight (a pipelined request), and
    // closing with unread bytes resets the connection, which can destroy the response before
    // the client has read it. Wait a little for the client's own close.
    let drain = async {
        let mut discard = [0u8; 512];
        while let Ok(1..) = stream.read(&mut discard).await {}
    };
    if !shutdown.is_cancelled() {
        // Boxed: only a closing connection needs the timer.
        let _ = Box::pin(tokio::time::timeout(LINGER, drain)).await;
    }
    Ok(())
}

/// Reads the request head off the socket, runs the application and writes the response head;
/// returns what writes the body.
async fn respond<S>(
    stream: &mut TcpStream,
    taken: Box<Taken>,
    app: &mut S,
    write_timeout: WriteTimeout,
) -> io::Result<BodyWriter>
where
    S: tower::Service<Request, Response = Response, Error = Infallible>,
{
    let Taken { mut head, request } = *taken;
    // The head was only peeked at; take it off the socket now.
    stream.read_exact(&mut head).await?;
    drop(head);
    let Ok(service) = app.ready().await;
    let Ok(response) = service.call(request).await;
    let (parts, body) = response.into_parts();
    // 1xx, 204 and 304 responses have no body and no length (RFC 9112, section 6.3).
    let status = parts.status;
    let bodiless = status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED;
    let length = body.size_hint().exact();

    let mut out = Vec::with_capacity(256);
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("Unknown").as_bytes());
    out.extend_from_slice(b"\r\n");
    for (name, value) in &parts.headers {
        if [
            header::CONNECTION,
            header::CONTENT_LENGTH,
            header::TRANSFER_ENCODING,
        ]
        .contains(name)
        {
            continue;
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if !parts.headers.contains_key(header::DATE) {
        out.extend_from_slice(b"date: ");
        out.extend_from_slice(httpdate::fmt_http_date(SystemTime::now()).as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    match length {
        _ if bodiless => {}
        Some(length) => out.extend_from_slice(format!("content-length: {length}\r\n").as_bytes()),
        None => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
    }
    out.extend_from_slice(b"connection: close\r\n\r\n");
    drop(parts);
    stream.write_all(&out).await?;

    Ok(BodyWriter {
        body: if bodiless { Body::empty() } else { body },
        chunked: length.is_none() && !bodiless,
        batch: Vec::new(),
        size_line: [0; 20],
        size_line_len: 0,
        tail: b"",
        written: 0,
        ended: bodiless,
        discarded: 0,
        progress: Progress::new(write_timeout),
    })
}

/// Writes a response body to the socket, a batch of ready frames per write.
struct BodyWriter {
    body: Body,
    chunked: bool,
    /// Data frames being written: one chunk when `chunked`.
    batch: Vec<Bytes>,
    /// The chunk's size line (`1a2b\r\n`), empty when not chunked or no data is batched.
    size_line: [u8; 20],
    size_line_len: usize,
    /// What follows the batch: the chunk's CRLF, and the last chunk once the body has ended.
    tail: &'static [u8],
    /// Bytes of size line, batch and tail already written.
    written: usize,
    ended: bool,
    /// Bytes the client sent after its request, read and dropped.
    discarded: usize,
    /// A client that accepts no bytes for the write timeout is let go.
    progress: Progress,
}

impl BodyWriter {
    /// Ready when the body has ended and is written; an error when the client is gone.
    fn poll_run(&mut self, stream: &TcpStream, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            if client_gone(stream, cx, &mut self.discarded) {
                return Poll::Ready(Err(io::ErrorKind::ConnectionAborted.into()));
            }
            if self.batch.is_empty() && self.tail.is_empty() {
                if self.ended {
                    return Poll::Ready(Ok(()));
                }
                ready!(self.poll_gather(cx))?;
            } else {
                ready!(self.poll_write(stream, cx))?;
            }
        }
    }

    /// Collects the frames that are ready into the batch and frames it; pending only if
    /// nothing is ready.
    fn poll_gather(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut bytes = 0;
        while self.batch.len() < MAX_BATCH && bytes < MAX_BATCH_BYTES {
            match Pin::new(&mut self.body).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    if let Ok(data) = frame.into_data()
                        && !data.is_empty()
                    {
                        bytes += data.len();
                        self.batch.push(data);
                    }
                }
                Poll::Ready(Some(Err(error))) => return Poll::Ready(Err(io::Error::other(error))),
                Poll::Ready(None) => {
                    self.ended = true;
                    break;
                }
                Poll::Pending if self.batch.is_empty() => return Poll::Pending,
                Poll::Pending => break,
            }
        }
        if self.chunked {
            let data = !self.batch.is_empty();
            self.size_line_len = if data {
                format_size_line(bytes, &mut self.size_line)
            } else {
                0
            };
            // The body has no trailers, so the last chunk is empty.
            self.tail = match (data, self.ended) {
                (true, false) => b"\r\n",
                (true, true) => b"\r\n0\r\n\r\n",
                (false, true) => b"0\r\n\r\n",
                (false, false) => b"",
            };
        }
        self.written = 0;
        Poll::Ready(Ok(()))
    }

    /// Writes (the rest of) the size line, batch and tail; ready when all of it is written.
    fn poll_write(&mut self, stream: &TcpStream, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut parts: [&[u8]; MAX_BATCH + 2] = [&[]; MAX_BATCH + 2];
        parts[0] = &self.size_line[..self.size_line_len];
        for (part, data) in parts[1..].iter_mut().zip(&self.batch) {
            *part = data;
        }
        parts[self.batch.len() + 1] = self.tail;
        let parts = &parts[..self.batch.len() + 2];
        let total: usize = parts.iter().map(|part| part.len()).sum();
        while self.written < total {
            let mut slices = [IoSlice::new(&[]); MAX_BATCH + 2];
            let mut skip = self.written;
            let mut used = 0;
            for part in parts {
                if skip >= part.len() {
                    skip -= part.len();
                    continue;
                }
                slices[used] = IoSlice::new(&part[skip..]);
                skip = 0;
                used += 1;
            }
            let written = poll_write_vectored(stream, cx, &slices[..used]);
            match ready!(self.progress.follow(cx, written)) {
                Ok(0) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Ok(n) => self.written += n,
                Err(error) => return Poll::Ready(Err(error)),
            }
        }
        self.batch.clear();
        if self.batch.capacity() > 4 {
            // An idle subscriber keeps no more than a small batch's worth after a burst.
            self.batch.shrink_to(4);
        }
        self.size_line_len = 0;
        self.tail = b"";
        Poll::Ready(Ok(()))
    }
}

/// Writes `{size:x}\r\n` into `buf`, returning its length.
fn format_size_line(size: usize, buf: &mut [u8; 20]) -> usize {
    use std::io::Write as _;
    let mut cursor = io::Cursor::new(&mut buf[..]);
    write!(cursor, "{size:x}\r\n").expect("a usize in hex fits in 20 bytes");
    cursor.position() as usize
}

/// Whether the client closed its side (or the connection failed). What it sends after the
/// request is read and dropped, since this connection carries one response; past
/// `MAX_DISCARD` bytes of that the client is not a subscriber, and is let go.
fn client_gone(stream: &TcpStream, cx: &mut Context<'_>, discarded: &mut usize) -> bool {
    let mut discard = [0u8; 512];
    loop {
        match stream.poll_read_ready(cx) {
            Poll::Pending => return false,
            Poll::Ready(Err(_)) => return true,
            Poll::Ready(Ok(())) => match stream.try_read(&mut discard) {
                Ok(0) => return true,
                Ok(n) => {
                    *discarded += n;
                    if *discarded > MAX_DISCARD {
                        return true;
                    }
                }
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => continue,
                Err(_) => return true,
            },
        }
    }
}

/// One vectored write to `stream`, waiting for it to be writable.
fn poll_write_vectored(
    stream: &TcpStream,
    cx: &mut Context<'_>,
    slices: &[IoSlice<'_>],
) -> Poll<io::Result<usize>> {
    loop {
        ready!(stream.poll_write_ready(cx))?;
        match stream.try_write_vectored(slices) {
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => continue,
            result => return Poll::Ready(result),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_complete_get_subscribe_without_a_body_is_taken() {
        let taken = |head: &str| parse(head.as_bytes()).map(|(length, _)| length);
        let simple =
            "GET /subscribe?topic=a HTTP/1.1\r\nhost: x\r\naccept: text/event-stream\r\n\r\n";
        assert_eq!(taken(simple), Some(simple.len()));
        let (_, request) = parse(simple.as_bytes()).unwrap();
        assert_eq!(request.uri(), "/subscribe?topic=a");
        assert_eq!(request.headers()["accept"], "text/event-stream");
        let bare = "GET /subscribe HTTP/1.1\r\n\r\n";
        assert_eq!(taken(bare), Some(bare.len()));

        for other in [
            "GET /subscribe?topic=a HTTP/1.1\r\nhost: x\r\n",
            "GET /subscribe HTTP/1.0\r\n\r\n",
            "GET /subscriber HTTP/1.1\r\n\r\n",
            "GET /topics HTTP/1.1\r\n\r\n",
            "POST /subscribe HTTP/1.1\r\ncontent-length: 2\r\n\r\nhi",
            "GET /subscribe HTTP/1.1\r\ncontent-length: 3\r\n\r\n",
            "GET /subscribe HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n",
            "GET /subscribe HTTP/1.1\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\n",
            "OPTIONS /subscribe HTTP/1.1\r\norigin: http://x\r\n\r\n",
        ] {
            assert_eq!(taken(other), None, "{other:?}");
        }
    }

    #[test]
    fn chunk_size_lines_are_hex() {
        let mut buf = [0; 20];
        let n = format_size_line(0x1a2b, &mut buf);
        assert_eq!(&buf[..n], b"1a2b\r\n");
        let n = format_size_line(usize::MAX, &mut buf);
        assert_eq!(&buf[..n], b"ffffffffffffffff\r\n");
    }
}

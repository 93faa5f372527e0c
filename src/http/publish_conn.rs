//! HTTP/1.1 connections that publish: the common `POST /topics/{topic}` answered without hyper.
//!
//! A publisher's keep-alive connection carries one small request after another. Through hyper,
//! axum and tower each one costs a request and response object, a header map, a routing pass,
//! the CORS and trace layers and a handful of allocations, several times what publishing it in
//! the hub costs. When a plain-TCP connection opens with `POST /topics/`, the listener serves it
//! here: every request that arrived whole, on that route, and that the broker would accept, is
//! published and answered straight from the bytes read, with the same status, headers and JSON
//! as the application's `publish_raw` handler. Several requests in one read (pipelining) get
//! their answers in one write.
//!
//! Anything else hands the connection to hyper, together with the bytes already read, and the
//! application answers it as always: another route or method, a query string, a body that did
//! not arrive in the same read, a header this lane does not read (`expect`, `transfer-encoding`,
//! `connection` other than keep-alive, `upgrade`, `idempotency-key`: a keyed publish is rare
//! and its retries need the application's answers), an invalid topic, a payload over the limit,
//! a refusal of the publish-rate limit. Errors are therefore always the application's. The lane
//! is off when authentication is on: tokens are checked by the application's guard.
//!
//! Like hyper's, an idle connection is closed after `--http-header-timeout`, and once shutdown
//! begins the connection closes between requests; a request read just as it began is answered
//! with `connection: close` first.

use std::io::{self, IoSlice, Write as _};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, UNIX_EPOCH};

use axum::body::Bytes;
use bytes::{Buf as _, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _, ReadBuf};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use crate::auth::Access;
use crate::http::json::Published;
use crate::hub::{Headers, Hub, Message};
use crate::limits::{Connection, Limits};
use crate::metrics::Door;
use crate::topic::Topic;

/// The start of every request this module takes.
const REQUEST_LINE: &[u8] = b"POST /topics/";
/// Headers a request may have to be taken here.
const MAX_HEADERS: usize = 32;
/// Room for one read: a request head and a small body, or a few pipelined ones.
const READ_BUFFER: usize = 4 * 1024;
/// What the lane publishes with; one for the server.
pub(crate) struct Lane {
    hub: Hub,
    limits: Limits,
    /// How long to wait for the next request (as hyper does: `--http-header-timeout`).
    idle_timeout: Duration,
    /// Every answer's head up to its length: the router's, with the headers its CORS layer adds.
    head: Vec<u8>,
}

impl Lane {
    /// The lane of a server on `hub`.
    pub(crate) fn new(hub: Hub, limits: Limits, idle_timeout: Duration) -> Lane {
        Lane {
            hub,
            limits,
            idle_timeout,
            head: response_head(),
        }
    }
}

/// The head of every answer up to its length: the router's, with the headers its CORS layer
/// adds to every answer.
fn response_head() -> Vec<u8> {
    let mut head = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n".to_vec();
    for (name, value) in &super::cors::simple_response_headers() {
        head.extend_from_slice(name.as_str().as_bytes());
        head.extend_from_slice(b": ");
        head.extend_from_slice(value.as_bytes());
        head.extend_from_slice(b"\r\n");
    }
    head.extend_from_slice(b"content-length: ");
    head
}

/// How a connection left the lane.
pub(crate) enum Left {
    /// Closed by the client, on a timeout, or because the server is shutting down.
    Closed,
    /// A request the lane does not answer: hyper serves the rest of the connection, starting
    /// with these bytes.
    Handover(Prefixed),
}

/// Whether a connection whose first bytes (as peeked) are `first` is served here.
pub(crate) fn takes(first: &[u8]) -> bool {
    first.starts_with(REQUEST_LINE)
}

/// Serves publishes on `stream` until it closes or a request needs the application.
pub(crate) async fn serve(
    mut stream: TcpStream,
    lane: &Lane,
    connection: &Connection,
    shutdown: &CancellationToken,
) -> io::Result<Left> {
    let access = Access::unrestricted();
    let mut buffer = BytesMut::with_capacity(READ_BUFFER);
    let mut out = Vec::with_capacity(512);
    let mut answers = Answers::default();
    let mut idle = Box::pin(tokio::time::sleep(lane.idle_timeout));
    let cancelled = shutdown.cancelled();
    tokio::pin!(cancelled);
    loop {
        // Once shutdown has begun, a request that has arrived is still answered, as hyper does:
        // one, with `connection: close`, and then the connection closes.
        let closing = shutdown.is_cancelled();
        // Answer every whole request at the front of the buffer, all in one write.
        while let Some(request) = parse(&buffer, lane.hub.config().max_payload_bytes) {
            let Some(message) = lane.publish(&access, connection, &request, &buffer) else {
                break;
            };
            answers.write(&lane.head, &message, closing, &mut out);
            buffer.advance(request.length);
            if closing {
                break;
            }
        }
        if !out.is_empty() {
            stream.write_all(&out).await?;
            out.clear();
        }
        if closing {
            return Ok(Left::Closed);
        }
        if !buffer.is_empty() {
            return Ok(Left::Handover(Prefixed {
                prefix: buffer.freeze(),
                stream,
            }));
        }
        if buffer.capacity() < READ_BUFFER {
            buffer.reserve(READ_BUFFER);
        }
        idle.as_mut()
            .reset(tokio::time::Instant::now() + lane.idle_timeout);
        // A request that has arrived is served before shutdown or the timeout close.
        tokio::select! {
            biased;
            read = stream.read_buf(&mut buffer) => if read? == 0 {
                return Ok(Left::Closed);
            },
            // Between requests: nothing is lost by closing.
            () = &mut cancelled => return Ok(Left::Closed),
            () = &mut idle => {
                tracing::debug!("idle HTTP/1.1 connection closed after --http-header-timeout");
                return Ok(Left::Closed);
            }
        }
    }
}

/// A whole publish request at the front of a buffer.
#[derive(Debug, PartialEq)]
struct Request {
    /// Where the topic is in the buffer.
    topic: (usize, usize),
    content_type: Option<(usize, usize)>,
    body: (usize, usize),
    /// Bytes of head and body.
    length: usize,
}

/// The publish request at the front of `bytes`, if it is whole and one this lane takes.
fn parse(bytes: &[u8], max_payload: usize) -> Option<Request> {
    if !bytes.starts_with(REQUEST_LINE) {
        return None;
    }
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut parsed = httparse::Request::new(&mut headers);
    let httparse::Status::Complete(head) = parsed.parse(bytes).ok()? else {
        return None;
    };
    if parsed.method? != "POST" || parsed.version? != 1 {
        return None;
    }
    let topic = parsed.path?.strip_prefix("/topics/")?;
    if topic
        .bytes()
        .any(|b| matches!(b, b'/' | b'?' | b'%' | b'#'))
    {
        return None;
    }
    let mut length = None;
    let mut content_type = None;
    for field in parsed.headers.iter() {
        let name = field.name;
        if name.eq_ignore_ascii_case("content-length") {
            if length.is_some() {
                return None;
            }
            length = Some(parse_length(field.value)?);
        } else if name.eq_ignore_ascii_case("content-type") {
            if content_type.is_some()
                || !field
                    .value
                    .iter()
                    .all(|&b| b == b'\t' || (b' '..=b'~').contains(&b))
            {
                return None;
            }
            content_type = Some(offset_of(bytes, field.value));
        } else if name.eq_ignore_ascii_case("connection") {
            if !field.value.eq_ignore_ascii_case(b"keep-alive") {
                return None;
            }
        } else if name.eq_ignore_ascii_case("transfer-encoding")
            || name.eq_ignore_ascii_case("expect")
            || name.eq_ignore_ascii_case("upgrade")
            || name.eq_ignore_ascii_case(crate::http::IDEMPOTENCY_KEY)
        {
            return None;
        }
    }
    let length = length?;
    if length > max_payload || bytes.len() - head < length {
        return None;
    }
    Some(Request {
        topic: offset_of(bytes, topic.as_bytes()),
        content_type,
        body: (head, head + length),
        length: head + length,
    })
}

/// A `content-length` value: digits only, as RFC 9110 allows.
fn parse_length(value: &[u8]) -> Option<usize> {
    if value.is_empty() || value.len() > 19 || !value.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(value).ok()?.parse().ok()
}

/// Where `part`, a slice of `whole`, starts and ends in it.
fn offset_of(whole: &[u8], part: &[u8]) -> (usize, usize) {
    let start = part.as_ptr() as usize - whole.as_ptr() as usize;
    (start, start + part.len())
}

/// [`parse`] for the fuzz target in `fuzz/`: where the topic, the content type and the body of
/// the request at the front of `bytes` are, if the lane takes it (the body ends the request).
#[doc(hidden)]
pub fn parse_publish(bytes: &[u8], max_payload: usize) -> Option<PublishParts> {
    parse(bytes, max_payload).map(|r| (r.topic, r.content_type, r.body))
}

/// What [`parse_publish`] finds: topic, content type and body, as (start, end) in the bytes.
pub type PublishParts = ((usize, usize), Option<(usize, usize)>, (usize, usize));

impl Lane {
    /// Publishes `request`, found in `bytes`; `None` if the application must answer it instead
    /// (invalid topic, a limit).
    fn publish(
        &self,
        access: &Access,
        connection: &Connection,
        request: &Request,
        bytes: &[u8],
    ) -> Option<Arc<Message>> {
        let text = |(start, end): (usize, usize)| std::str::from_utf8(&bytes[start..end]).ok();
        // The application's checks, in its order; a refusal is the application's to answer
        // and count.
        let topic = Topic::parse(text(request.topic)?).ok()?;
        access.check_publish(&topic).ok()?;
        if !self.limits.try_publish(access, connection) {
            return None;
        }
        let mut headers = Headers::new();
        if let Some(content_type) = request.content_type.and_then(text) {
            headers.insert("content-type".into(), content_type.to_owned());
        }
        // Copied, not split off the read buffer: a retained message must not keep a whole
        // 4 KiB buffer alive.
        let (start, end) = request.body;
        let payload = Bytes::copy_from_slice(&bytes[start..end]);
        // The lane is only on without a durable log, so the answer is known at once.
        let message = self.hub.publish(topic, payload, headers).now()?.ok()?;
        self.hub.metrics().published(Door::Http);
        tracing::debug!(topic = %message.topic, seq = message.seq, "published over HTTP/1.1");
        Some(message)
    }
}

/// Writes a connection's answers, keeping what one answer can lend the next: the `date`
/// header's value (formatted once a second) and the JSON body's buffer.
#[derive(Default)]
struct Answers {
    second: u64,
    date: String,
    body: Vec<u8>,
}

impl Answers {
    /// Appends the answer to a published message to `out`, starting with `head`, telling the
    /// client to close when the server is `closing`.
    fn write(&mut self, head: &[u8], message: &Message, closing: bool, out: &mut Vec<u8>) {
        self.body.clear();
        serde_json::to_writer(&mut self.body, &Published::of(message, false))
            .expect("serializable");
        out.extend_from_slice(head);
        let _ = write!(out, "{}\r\ndate: ", self.body.len());
        // The hub stamped the message just now: its time is the answer's date.
        let second = message
            .published_at
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        if second != self.second || self.date.is_empty() {
            self.second = second;
            self.date = httpdate::fmt_http_date(message.published_at);
        }
        out.extend_from_slice(self.date.as_bytes());
        if closing {
            out.extend_from_slice(b"\r\nconnection: close");
        }
        out.extend_from_slice(b"\r\n\r\n");
        out.extend_from_slice(&self.body);
    }
}

/// A connection handed to hyper: the bytes already read, then the socket.
pub(crate) struct Prefixed {
    prefix: Bytes,
    stream: TcpStream,
}

impl AsyncRead for Prefixed {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.prefix.is_empty() {
            return Pin::new(&mut self.stream).poll_read(cx, buf);
        }
        let n = self.prefix.len().min(buf.remaining());
        buf.put_slice(&self.prefix[..n]);
        self.prefix.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Prefixed {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: usize = 1024;

    /// The lane's task's end, failing the test instead of hanging if it does not come.
    async fn within(task: tokio::task::JoinHandle<io::Result<Left>>) -> io::Result<Left> {
        tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .expect("the lane ends within 10 s")
            .unwrap()
    }

    fn taken(bytes: &[u8]) -> Option<Request> {
        parse(bytes, MAX)
    }

    #[test]
    fn a_whole_publish_is_taken_with_its_topic_type_and_body() {
        let bytes = b"POST /topics/a.b HTTP/1.1\r\nhost: x\r\ncontent-type: text/csv\r\nconnection: Keep-Alive\r\ncontent-length: 3\r\n\r\n1,2POST";
        let request = taken(bytes).expect("taken");
        let at = |(start, end): (usize, usize)| &bytes[start..end];
        assert_eq!(at(request.topic), b"a.b");
        assert_eq!(request.content_type.map(at), Some(&b"text/csv"[..]));
        assert_eq!(at(request.body), b"1,2");
        assert_eq!(request.length, bytes.len() - 4, "the next request is left");
        let empty = taken(b"POST /topics/t HTTP/1.1\r\ncontent-length: 0\r\n\r\n").expect("taken");
        assert_eq!(empty.body.0, empty.body.1);
        assert_eq!(empty.content_type, None);
    }

    /// A connection to a lane on a fresh hub: the client's end, and the lane's task.
    async fn lane(
        idle_timeout: Duration,
        shutdown: &CancellationToken,
    ) -> (Hub, TcpStream, tokio::task::JoinHandle<io::Result<Left>>) {
        let hub = Hub::new(Default::default());
        let limits = Limits::new(
            crate::limits::LimitsConfig {
                max_connections: 10,
                max_subscriptions_per_connection: 10,
                publish_rate: 0,
                publish_burst: 0,
            },
            hub.metrics().clone(),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, peer) = listener.accept().await.unwrap();
        let connection = limits.admit(peer).unwrap();
        let lane = Lane::new(hub.clone(), limits, idle_timeout);
        let shutdown = shutdown.clone();
        let task = tokio::spawn(async move { serve(server, &lane, &connection, &shutdown).await });
        (hub, client, task)
    }

    #[tokio::test]
    async fn publishes_are_answered_here_and_the_rest_is_handed_over_intact() {
        let shutdown = CancellationToken::new();
        let (hub, mut client, task) = lane(Duration::from_secs(10), &shutdown).await;
        let next = b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n";
        let mut requests = b"POST /topics/t HTTP/1.1\r\ncontent-length: 1\r\n\r\n1".repeat(2);
        requests.extend_from_slice(next);
        client.write_all(&requests).await.unwrap();
        let Left::Handover(mut handed) = within(task).await.unwrap() else {
            panic!("the GET is handed over");
        };
        let mut rest = vec![0; next.len()];
        handed.read_exact(&mut rest).await.unwrap();
        assert_eq!(rest, next, "the handed-over bytes are the next request's");
        let mut answers = Vec::new();
        while !(answers.ends_with(b"}") && answers.windows(7).any(|w| w == br#""seq":2"#)) {
            assert!(client.read_buf(&mut answers).await.unwrap() > 0, "answered");
        }
        let answers = String::from_utf8_lossy(&answers);
        assert_eq!(
            answers.matches("HTTP/1.1 200 OK\r\n").count(),
            2,
            "{answers}"
        );
        assert!(answers.contains(r#""seq":2"#), "{answers}");
        assert_eq!(hub.topics(None)[0].retained_messages, 2);
    }

    #[tokio::test]
    async fn an_idle_or_shut_down_connection_is_closed_between_requests() {
        let shutdown = CancellationToken::new();
        let (_hub, _client, task) = lane(Duration::from_millis(50), &shutdown).await;
        assert!(
            matches!(within(task).await, Ok(Left::Closed)),
            "closed when idle"
        );

        let (_hub, mut client, task) = lane(Duration::from_secs(60), &shutdown).await;
        client
            .write_all(b"POST /topics/t HTTP/1.1\r\ncontent-length: 1\r\n\r\n1")
            .await
            .unwrap();
        let mut answer = vec![0; 4096];
        assert!(client.read(&mut answer).await.unwrap() > 0);
        shutdown.cancel();
        assert!(
            matches!(within(task).await, Ok(Left::Closed)),
            "closed on shutdown"
        );
    }

    #[test]
    fn answers_are_whole_responses_and_say_close_when_closing() {
        let hub = Hub::new(Default::default());
        let topic = Topic::parse("t").unwrap();
        let message = hub.publish(topic, Bytes::from_static(b"x"), Headers::new());
        let message = message.now().unwrap().unwrap();
        for closing in [false, true] {
            let mut out = Vec::new();
            Answers::default().write(&response_head(), &message, closing, &mut out);
            let mut fields = [httparse::EMPTY_HEADER; 16];
            let mut response = httparse::Response::new(&mut fields);
            let httparse::Status::Complete(head) = response.parse(&out).unwrap() else {
                panic!("a whole head: {}", String::from_utf8_lossy(&out));
            };
            assert_eq!(response.code, Some(200));
            let field = |name: &str| {
                let found = response.headers.iter().find(|h| h.name == name);
                found.map(|h| std::str::from_utf8(h.value).unwrap().to_owned())
            };
            let length: usize = field("content-length").unwrap().parse().unwrap();
            assert_eq!(out.len(), head + length, "the body is the rest");
            let json: serde_json::Value = serde_json::from_slice(&out[head..]).unwrap();
            assert_eq!(json["seq"], 1);
            assert!(field("date").is_some());
            assert_eq!(field("connection").as_deref(), closing.then_some("close"));
        }
    }

    #[test]
    fn anything_else_is_left_to_the_application() {
        let long = format!(
            "POST /topics/t HTTP/1.1\r\ncontent-length: {}\r\n\r\n{}",
            MAX + 1,
            "x".repeat(MAX + 1)
        );
        for bytes in [
            &b"GET /topics HTTP/1.1\r\n\r\n"[..],
            b"POST /publish HTTP/1.1\r\ncontent-length: 2\r\n\r\n{}",
            b"POST /topics/t HTTP/1.0\r\ncontent-length: 1\r\n\r\nx",
            b"POST /topics/t?access_token=x HTTP/1.1\r\ncontent-length: 1\r\n\r\nx",
            b"POST /topics/a%2Eb HTTP/1.1\r\ncontent-length: 1\r\n\r\nx",
            b"POST /topics/t/messages HTTP/1.1\r\ncontent-length: 1\r\n\r\nx",
            b"POST /topics/t HTTP/1.1\r\n\r\n",
            b"POST /topics/t HTTP/1.1\r\ncontent-length: 1\r\ncontent-length: 1\r\n\r\nx",
            b"POST /topics/t HTTP/1.1\r\ncontent-length: +1\r\n\r\nx",
            b"POST /topics/t HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n1\r\nx\r\n0\r\n\r\n",
            b"POST /topics/t HTTP/1.1\r\nexpect: 100-continue\r\ncontent-length: 1\r\n\r\n",
            b"POST /topics/t HTTP/1.1\r\nconnection: close\r\ncontent-length: 1\r\n\r\nx",
            b"POST /topics/t HTTP/1.1\r\nIdempotency-Key: k1\r\ncontent-length: 1\r\n\r\nx",
            b"POST /topics/t HTTP/1.1\r\ncontent-type: caf\xc3\xa9\r\ncontent-length: 1\r\n\r\nx",
            b"POST /topics/t HTTP/1.1\r\ncontent-length: 5\r\n\r\nonly",
            b"POST /topics/t HTTP/1.1\r\ncontent-len",
            long.as_bytes(),
        ] {
            assert_eq!(taken(bytes), None, "{}", String::from_utf8_lossy(bytes));
        }
    }
}

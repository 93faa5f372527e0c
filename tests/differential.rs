//! The HTTP/1.1 fast paths held to hyper. The publish lane (`POST /topics/{topic}` answered
//! without hyper) and the SSE lane (`GET /subscribe` written to the socket directly) take a
//! connection only when its first request is theirs; the same bytes sent after another request
//! on the connection are served by hyper and the application as usual. Every case of the corpus
//! below goes both ways, each to its own broker (same configuration, same history so far), and
//! the answers must match: status line, headers (except `date`), body, and what the broker
//! published. Epochs, subscription ids and publish times differ between brokers by design and
//! are masked before comparing.
//!
//! Pieces of a request are written separately (TCP_NODELAY) to exercise the lanes' handling of
//! requests split across reads; whether the pieces reach the server as one read or several, the
//! answer must be the same, so the test does not depend on it.

mod support;

use support::{Broker, WAIT, spawn_broker_with};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

/// The payload limit of both brokers, small so that the corpus can exceed it cheaply.
const LIMIT: usize = 1024;

/// The first request of a connection that hyper, not a lane, must serve.
const OPENER: &[u8] = b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n";

/// One HTTP/1.1 response as read off the socket.
#[derive(Debug, PartialEq)]
struct Answer {
    /// `HTTP/1.x NNN`: version and status.
    status: String,
    /// Lower-case name and value, sorted; `date` left out.
    headers: Vec<(String, String)>,
    /// The body, de-chunked, with the broker's own values masked (see [`mask`]).
    body: String,
}

/// What a case expects to read back on the connection.
#[derive(Clone, Copy)]
enum Expect {
    /// This many final (non-1xx) responses, each with a whole body.
    Answers(usize),
    /// One streaming response, read until its body holds this many SSE events.
    Events(usize),
}

/// A crafted request (or several): the pieces written one after the other.
struct Case {
    name: &'static str,
    pieces: Vec<Vec<u8>>,
    expect: Expect,
}

/// A request that gets one answer.
fn one(name: &'static str, request: impl Into<Vec<u8>>) -> Case {
    Case {
        name,
        pieces: vec![request.into()],
        expect: Expect::Answers(1),
    }
}

/// Requests that get `n` answers.
fn answers(n: usize, name: &'static str, request: impl Into<Vec<u8>>) -> Case {
    Case {
        expect: Expect::Answers(n),
        ..one(name, request)
    }
}

/// A request whose pieces are written one after the other, and the answers it gets.
fn split(name: &'static str, answers: usize, pieces: &[&[u8]]) -> Case {
    Case {
        name,
        pieces: pieces.iter().map(|p| p.to_vec()).collect(),
        expect: Expect::Answers(answers),
    }
}

/// `POST /topics/{topic}` with `headers` (each ending in CRLF) and a body with its length.
fn publish(topic: &str, headers: &str, body: &str) -> String {
    format!(
        "POST /topics/{topic} HTTP/1.1\r\nhost: x\r\n{headers}content-length: {}\r\n\r\n{body}",
        body.len()
    )
}

/// `POST /topics/{topic}` with exactly this `head` after the request line.
fn raw_publish(topic: &str, head: &str) -> String {
    format!("POST /topics/{topic} HTTP/1.1\r\n{head}")
}

// The corpora are tables, one case a line where it fits: kept as written.
#[rustfmt::skip]
fn publish_corpus() -> Vec<Case> {
    let max_topic = format!("d.{}", "t".repeat(253));
    let long_topic = format!("d.{}", "t".repeat(254));
    let many_headers: String = (0..40).map(|i| format!("x-h{i}: {i}\r\n")).collect();
    let binary = [&raw_publish("d.bin", "content-length: 3\r\n\r\n").into_bytes()[..], b"\0\xff\n"];
    let ct = |value: &str| format!("content-type: {value}\r\n");
    let pipelined_split =
        publish("d.pipe4", "", "1") + &raw_publish("d.pipe4", "content-length: 2\r\n\r\n");
    vec![
        one("plain", publish("d.plain", "", "hello")),
        one("empty body", publish("d.empty", "", "")),
        one("binary body", binary.concat()),
        one("content type", publish("d.type", &ct("text/plain; charset=utf-8"), "héllo")),
        one("JSON content type", publish("d.json", &ct("application/json"), "{\"a\":1}")),
        one("content type, trailing blanks", publish("d.type2", &ct("text/csv \t "), "1,2")),
        one("content type not ASCII", publish("d.type3", &ct("caf\u{e9}"), "x")),
        one("content type with a tab", publish("d.type4", &ct("text/plain;\tq=1"), "x")),
        one("content type with DEL", publish("d.type5", &ct("text/\x7fplain"), "x")),
        one("empty content type", publish("d.type6", "content-type:\r\n", "x")),
        one("two content types", publish("d.type7", &(ct("text/plain") + &ct("a/b")), "x")),
        one("keep-alive said", publish("d.ka", "connection: Keep-Alive\r\n", "x")),
        one("close said", publish("d.close", "connection: close\r\n", "x")),
        one("two hosts", publish("d.hosts", "host: y\r\n", "x")),
        one("no host", raw_publish("d.nohost", "content-length: 1\r\n\r\nx")),
        one("upper-case names",
            raw_publish("d.up", "CONTENT-LENGTH: 2\r\nCONTENT-TYPE: a/b\r\n\r\nhi")),
        one("bare LF line ends", "POST /topics/d.lf HTTP/1.1\ncontent-length: 2\n\nhi"),
        one("header value with obs-text", publish("d.obs", "x-note: caf\u{e9}\r\n", "x")),
        one("more headers than the lane reads", publish("d.many", &many_headers, "x")),
        one("longest topic", publish(&max_topic, "", "x")),
        one("topic too long", publish(&long_topic, "", "x")),
        one("invalid topic", publish("a..b", "", "x")),
        one("wildcard topic", publish("d.*", "", "x")),
        one("empty topic", publish("", "", "x")),
        one("trailing slash", publish("d.slash/", "", "x")),
        one("percent-encoded topic", publish("d%2Epct", "", "x")),
        one("percent-encoded wildcard", publish("d.%2A", "", "x")),
        one("query string", publish("d.query?x=1", "", "x")),
        one("fragment", publish("d.frag#x", "", "x")),
        one("absolute form", "POST http://x/topics/d.abs HTTP/1.1\r\ncontent-length: 1\r\n\r\nx"),
        one("HTTP/1.0", "POST /topics/d.old HTTP/1.0\r\ncontent-length: 1\r\n\r\nx"),
        one("HTTP/1.0 keep-alive",
            "POST /topics/d.old2 HTTP/1.0\r\nconnection: keep-alive\r\ncontent-length: 1\r\n\r\nx"),
        one("origin", publish("d.cors", "origin: https://a.example\r\n", "x")),
        one("origin, cookie and a preflight's header", publish("d.cors2",
            "origin: https://a.example\r\naccess-control-request-method: POST\r\ncookie: a=b\r\n",
            "x")),
        one("transfer-encoding and content-length", raw_publish("d.te",
            "transfer-encoding: chunked\r\ncontent-length: 5\r\n\r\n5\r\nhello\r\n0\r\n\r\n")),
        one("content-length and transfer-encoding", raw_publish("d.te2",
            "content-length: 3\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n")),
        one("chunked",
            raw_publish("d.chunked", "transfer-encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n")),
        one("duplicate equal lengths",
            raw_publish("d.dup", "content-length: 1\r\ncontent-length: 1\r\n\r\nx")),
        one("duplicate different lengths",
            raw_publish("d.dup2", "content-length: 1\r\ncontent-length: 2\r\n\r\nxy")),
        one("length list", raw_publish("d.list", "content-length: 1, 1\r\n\r\nx")),
        one("plus-signed length", raw_publish("d.plus", "content-length: +1\r\n\r\nx")),
        one("minus-signed length", raw_publish("d.minus", "content-length: -1\r\n\r\nx")),
        one("leading zeros in length", raw_publish("d.zeros", "content-length: 003\r\n\r\nabc")),
        one("length with blanks", raw_publish("d.blank", "content-length:  3 \r\n\r\nabc")),
        one("length past 64 bits",
            raw_publish("d.huge", "content-length: 18446744073709551616\r\n\r\nx")),
        one("no length", raw_publish("d.nolength", "host: x\r\n\r\n")),
        one("obs-fold",
            raw_publish("d.fold", "content-type: a/b;\r\n q=1\r\ncontent-length: 1\r\n\r\nx")),
        one("blank before colon", raw_publish("d.colon", "content-length : 1\r\n\r\nx")),
        one("expect 100-continue", publish("d.expect", "expect: 100-continue\r\n", "x")),
        one("upgrade", publish("d.upgrade", "connection: upgrade\r\nupgrade: websocket\r\n", "x")),
        one("payload over the limit", publish("d.big", "", &"x".repeat(LIMIT + 1))),
        one("payload at the limit", publish("d.limit", "", &"x".repeat(LIMIT))),
        split("split in the request line", 1,
            &[b"POST /topics/d.s", b"plit1 HTTP/1.1\r\ncontent-length: 1\r\n\r\nx"]),
        split("split mid-header", 1,
            &[b"POST /topics/d.split2 HTTP/1.1\r\ncontent-le", b"ngth: 3\r\n\r\nabc"]),
        split("split between head and body", 1,
            &[b"POST /topics/d.split3 HTTP/1.1\r\ncontent-length: 3\r\n\r\n", b"abc"]),
        split("split mid-body", 1,
            &[b"POST /topics/d.split4 HTTP/1.1\r\ncontent-length: 6\r\n\r\nabc", b"def"]),
        answers(3, "pipelined publishes", [
            publish("d.pipe", "", "1"),
            publish("d.pipe", &ct("text/plain"), "2"),
            publish("d.pipe", "", "3"),
        ].concat()),
        answers(2, "pipelined publish, then a read",
            publish("d.pipe2", "", "1") + "GET /topics/d.pipe2/messages HTTP/1.1\r\n\r\n"),
        answers(3, "pipelined publish, then a bad one, then a good one", [
            publish("d.pipe3", "", "1"),
            publish("a..b", "", "2"),
            publish("d.pipe3", "", "3"),
        ].concat()),
        split("pipelined, the second split", 2, &[pipelined_split.as_bytes(), b"22"]),
        one("pipelined, the first says close",
            publish("d.pipe5", "connection: close\r\n", "1") + &publish("d.pipe5", "", "2")),
    ]
}

#[rustfmt::skip]
fn subscribe_corpus() -> Vec<Case> {
    use Expect::{Answers, Events};
    let get = |name, target: &str, headers: &str, expect| Case {
        expect,
        ..one(name, format!("GET {target} HTTP/1.1\r\nhost: x\r\n{headers}\r\n"))
    };
    let stream = |name, request: &str| Case { expect: Events(1), ..one(name, request) };
    let browser =
        "accept: text/event-stream\r\norigin: https://a.example\r\ncache-control: no-cache\r\n";
    let (a, all) = ("/subscribe?topic=s.a", "/subscribe?topic=s.%3E");
    vec![
        get("plain", a, "", Events(1)),
        get("as a browser", "/subscribe?topic=s.a&topic=s.b.%3E", browser, Events(1)),
        get("from the earliest", "/subscribe?topic=s.%3E&from=earliest", "", Events(2)),
        get("percent-encoded topic", "/subscribe?topic=s%2Ea", "", Events(1)),
        get("keep-alive said", a, "connection: keep-alive\r\n", Events(1)),
        get("close said", a, "connection: close\r\n", Events(1)),
        get("zero length", a, "content-length: 0\r\n", Events(1)),
        get("no topic", "/subscribe", "", Answers(1)),
        get("invalid topic", "/subscribe?topic=s..a", "", Answers(1)),
        get("unknown parameter", "/subscribe?topics=s.a", "", Answers(1)),
        get("garbage Last-Event-ID", a, "last-event-id: x\r\n", Answers(1)),
        get("Last-Event-ID of another epoch", all, "last-event-id: other-1\r\n", Events(2)),
        get("obs-fold", a, "accept: text/event-stream,\r\n a/b\r\n", Answers(1)),
        get("absolute form", "http://x/subscribe?topic=s.a", "", Events(1)),
        get("fragment", "/subscribe?topic=s.a#x", "", Events(1)),
        stream("bare LF line ends", "GET /subscribe?topic=s.a HTTP/1.1\nhost: x\n\n"),
        stream("HTTP/1.0", "GET /subscribe?topic=s.a HTTP/1.0\r\n\r\n"),
        stream("pipelined after it",
            "GET /subscribe?topic=s.a HTTP/1.1\r\n\r\nGET /healthz HTTP/1.1\r\n\r\n"),
        Case {
            expect: Events(1),
            ..split("split mid-header", 1,
                &[b"GET /subscribe?topic=s.a HTTP/1.1\r\nho", b"st: x\r\n\r\n"])
        },
    ]
}

/// One broker per way in; both see the same requests in the same order.
struct Pair {
    fast: Broker,
    hyper: Broker,
    epochs: [String; 2],
}

impl Pair {
    async fn start() -> Pair {
        let configure = |c: &mut topichub::ServerConfig| c.max_payload_bytes = LIMIT;
        let fast = spawn_broker_with(configure).await;
        let hyper = spawn_broker_with(configure).await;
        let epochs = [fast.epoch().await, hyper.epoch().await];
        Pair {
            fast,
            hyper,
            epochs,
        }
    }

    /// Sends `case` to both brokers, the lane's way and hyper's, and compares the answers.
    async fn check(&self, case: &Case, allowed: &[(&str, &str)]) {
        let fast = exchange(&self.fast, false, case).await;
        let hyper = exchange(&self.hyper, true, case).await;
        let mask_all = |answers: Vec<Answer>, epoch: &str| -> Vec<Answer> {
            answers
                .into_iter()
                .map(|mut answer| {
                    answer.body = mask(&answer.body, epoch);
                    answer.headers.retain(|h| !allowed.contains(&(&h.0, &h.1)));
                    answer
                })
                .collect()
        };
        let fast = mask_all(fast, &self.epochs[0]);
        let hyper = mask_all(hyper, &self.epochs[1]);
        assert_eq!(
            fast, hyper,
            "case {:?}: lane (left) vs hyper (right)",
            case.name
        );
        let published = [
            history(&self.fast, &self.epochs[0]).await,
            history(&self.hyper, &self.epochs[1]).await,
        ];
        assert_eq!(
            published[0], published[1],
            "case {:?}: messages published through the lane (left) vs hyper (right)",
            case.name
        );
    }

    async fn stop(self) {
        self.fast.stop().await;
        self.hyper.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_publish_lane_answers_as_hyper_does() {
    let pair = Pair::start().await;
    for case in publish_corpus() {
        pair.check(&case, &[]).await;
    }
    pair.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sse_lane_answers_as_hyper_does() {
    let pair = Pair::start().await;
    // Something to replay for the cases that start from the earliest or from a gap.
    for broker in [&pair.fast, &pair.hyper] {
        support::http_publish(&broker.url(), "s.retained", "before").await;
    }
    // The SSE lane carries one response per connection and says so; hyper keeps an HTTP/1.1
    // connection open after a response it was not asked to close.
    let lane_closes = [("connection", "close")];
    for case in subscribe_corpus() {
        pair.check(&case, &lane_closes).await;
    }
    pair.stop().await;
}

/// Writes `case` on a new connection (after [`OPENER`] when `behind_another` is set, so that
/// hyper serves it) and reads what the case expects back.
async fn exchange(broker: &Broker, behind_another: bool, case: &Case) -> Vec<Answer> {
    let mut stream = TcpStream::connect(broker.addr).await.unwrap();
    stream.set_nodelay(true).unwrap();
    let mut buffer = Vec::new();
    if behind_another {
        stream.write_all(OPENER).await.unwrap();
        let opened = read_answers(&mut stream, &mut buffer, Expect::Answers(1), "opener").await;
        assert_eq!(opened.len(), 1, "the opener is answered");
        assert!(opened[0].status.ends_with(" 200"), "{opened:?}");
    }
    for piece in &case.pieces {
        stream.write_all(piece).await.unwrap();
    }
    let answers = read_answers(&mut stream, &mut buffer, case.expect, case.name).await;
    assert!(
        !answers.is_empty(),
        "case {:?}: no answer (behind another request: {behind_another})",
        case.name
    );
    answers
}

/// Reads responses until `expect` is met or the server closes the connection. Bytes past the
/// last response read stay in `buffer`.
async fn read_answers(
    stream: &mut TcpStream,
    buffer: &mut Vec<u8>,
    expect: Expect,
    what: &str,
) -> Vec<Answer> {
    let (finals, events) = match expect {
        Expect::Answers(n) => (n, None),
        Expect::Events(n) => (1, Some(n)),
    };
    let mut answers = Vec::new();
    let mut closed = false;
    tokio::time::timeout(WAIT, async {
        while answers.iter().filter(|a: &&Answer| !is_interim(a)).count() < finals {
            match parse_answer(buffer, events, closed) {
                Some((answer, used)) => {
                    buffer.drain(..used);
                    answers.push(answer);
                }
                None if closed => break,
                None => closed = stream.read_buf(buffer).await.unwrap_or(0) == 0,
            }
        }
    })
    .await
    .unwrap_or_else(|_| {
        panic!(
            "{what}: timed out reading answers; so far {answers:?}, then {:?}",
            String::from_utf8_lossy(buffer)
        )
    });
    answers
}

fn is_interim(answer: &Answer) -> bool {
    answer.status.as_bytes().get(9) == Some(&b'1')
}

/// The response at the front of `bytes` and its length, if it is all there. A streaming body is
/// complete once it holds `events` SSE events; a body without a length, once `closed`.
fn parse_answer(bytes: &[u8], events: Option<usize>, closed: bool) -> Option<(Answer, usize)> {
    let mut fields = [httparse::EMPTY_HEADER; 64];
    let mut response = httparse::Response::new(&mut fields);
    let httparse::Status::Complete(head) = response.parse(bytes).expect("a valid response") else {
        return None;
    };
    let code = response.code.unwrap();
    let status = format!("HTTP/1.{} {code}", response.version.unwrap());
    let mut headers: Vec<(String, String)> = response
        .headers
        .iter()
        .map(|h| {
            let value = String::from_utf8_lossy(h.value).into_owned();
            (h.name.to_ascii_lowercase(), value)
        })
        .filter(|(name, _)| name != "date")
        .collect();
    headers.sort();
    let field = |name: &str| headers.iter().find(|h| h.0 == name).map(|h| h.1.as_str());
    let bodiless = (100..200).contains(&code) || code == 204 || code == 304;
    let (body, used) = if bodiless {
        (Vec::new(), head)
    } else if field("transfer-encoding") == Some("chunked") {
        dechunk(&bytes[head..], events).map(|(body, used)| (body, head + used))?
    } else if let Some(length) = field("content-length") {
        let length: usize = length.parse().unwrap();
        let body = bytes.get(head..head + length)?;
        (body.to_vec(), head + length)
    } else if let Some(end) = events.and_then(|n| end_of_events(&bytes[head..], n)) {
        // A stream delimited by the connection's end (HTTP/1.0).
        (bytes[head..head + end].to_vec(), head + end)
    } else if closed {
        (bytes[head..].to_vec(), bytes.len())
    } else {
        return None;
    };
    let answer = Answer {
        status,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    };
    Some((answer, used))
}

/// A chunked body at the front of `bytes`: its data and the bytes it takes, once the last chunk
/// has arrived or the data holds `events` SSE events.
fn dechunk(bytes: &[u8], events: Option<usize>) -> Option<(Vec<u8>, usize)> {
    let mut body = Vec::new();
    let mut at = 0;
    loop {
        if let Some(end) = events.and_then(|n| end_of_events(&body, n)) {
            // Chunk boundaries are the writer's choice (the lane batches frames): compare
            // exactly the first events.
            body.truncate(end);
            return Some((body, at));
        }
        let line_end = at + bytes[at..].windows(2).position(|w| w == b"\r\n")?;
        let size = std::str::from_utf8(&bytes[at..line_end]).unwrap();
        let size = size.split(';').next().unwrap().trim();
        let size = usize::from_str_radix(size, 16).expect("a chunk size");
        let data = line_end + 2;
        if size == 0 {
            // No trailers: the last chunk ends with an empty line.
            return (bytes.get(data..data + 2)? == b"\r\n").then_some((body, data + 2));
        }
        body.extend_from_slice(bytes.get(data..data + size)?);
        bytes.get(data + size..data + size + 2)?;
        at = data + size + 2;
    }
}

/// Where the `n`th SSE event of `body` ends, if it has that many.
fn end_of_events(body: &[u8], n: usize) -> Option<usize> {
    let ends = body.windows(2).enumerate().filter(|(_, w)| w == b"\n\n");
    ends.map(|(at, _)| at + 2).nth(n.checked_sub(1)?)
}

/// `body` with the broker's own values masked: its epoch, and in JSON (a whole body, or an SSE
/// event's `data` line) publish times and subscription ids.
fn mask(body: &str, epoch: &str) -> String {
    let body = body.replace(epoch, "EPOCH");
    let mask_json = |text: &str| -> Option<String> {
        let mut json: serde_json::Value = serde_json::from_str(text).ok()?;
        mask_fields(&mut json);
        Some(json.to_string())
    };
    if let Some(masked) = mask_json(&body) {
        return masked;
    }
    body.split('\n')
        .map(
            |line| match line.strip_prefix("data: ").and_then(mask_json) {
                Some(masked) => format!("data: {masked}"),
                None => line.to_owned(),
            },
        )
        .collect::<Vec<_>>()
        .join("\n")
}

fn mask_fields(json: &mut serde_json::Value) {
    match json {
        serde_json::Value::Object(fields) => {
            for (name, value) in fields.iter_mut() {
                if ["published_at", "subscription_id"].contains(&name.as_str()) {
                    *value = "MASKED".into();
                } else {
                    mask_fields(value);
                }
            }
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(mask_fields),
        _ => {}
    }
}

/// Every message the broker retains, masked.
async fn history(broker: &Broker, epoch: &str) -> String {
    let response = reqwest::get(format!("{}/topics/%3E/messages?limit=1000", broker.url()))
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    mask(&response.text().await.unwrap(), epoch)
}

#[test]
fn the_reader_takes_lengths_chunks_and_event_streams() {
    let fixed = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ndate: x\r\n\r\nhiHTTP/1.1";
    let (answer, used) = parse_answer(fixed, None, false).unwrap();
    assert_eq!((answer.body.as_str(), used), ("hi", fixed.len() - 8));
    assert_eq!(answer.headers, [("content-length".into(), "2".into())]);
    let chunked =
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nhi\r\n1\r\n!\r\n0\r\n\r\n";
    let (answer, used) = parse_answer(chunked, None, false).unwrap();
    assert_eq!((answer.body.as_str(), used), ("hi!", chunked.len()));
    assert!(parse_answer(&chunked[..chunked.len() - 1], None, false).is_none());
    let stream = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n9\r\ndata: x\n\n\r\n";
    assert_eq!(
        parse_answer(stream, Some(1), false).unwrap().0.body,
        "data: x\n\n"
    );
    assert!(parse_answer(stream, Some(2), false).is_none());
}

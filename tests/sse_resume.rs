//! SSE resume as a real `EventSource` does it (the `eventsource` npm package under Node, a
//! WHATWG-conformant client), through a TCP proxy in the test that cuts the connection right
//! after the first events of a stream. The client reconnects by itself with `Last-Event-ID` =
//! the last id it saw; every message must still arrive exactly once, with no gap. Delivery
//! contract #4: no event carries an id ahead of a message not yet delivered on its stream.
//!
//! Both SSE paths are covered: a plain HTTP/1.1 `GET /subscribe` is written to directly
//! (`sse_conn`, answered with `connection: close`); the same request with a head longer than the
//! direct writer looks at (the proxy adds a padding header) is served by hyper, keep-alive.
//!
//! Prerequisites, installed by `scripts/deps-node.sh`: `node` and `web/node_modules`.

mod support;

use std::path::Path;
use std::process::Stdio;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::{Child, Command};

use support::{Broker, http_publish, spawn_broker, spawn_broker_with, within};

/// Which SSE path the proxy steers requests to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Writer {
    /// The direct HTTP/1.1 writer: the request head as the client sent it.
    Direct,
    /// hyper: the head padded past what the direct writer peeks at (8 KiB).
    Hyper,
}

/// What the proxy saw of one connection.
#[derive(Debug, Default, Clone)]
struct Seen {
    /// The response said `connection: close` (the direct writer always does, hyper never here).
    closing: bool,
    /// The client sent `Last-Event-ID`, with this value.
    last_event_id: Option<String>,
}

/// A TCP proxy in front of the broker. Connection `n` (from 0) is cut right after `cuts[n]`
/// complete SSE events of its response; connections past the list are left alone.
struct Proxy {
    addr: std::net::SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl Proxy {
    async fn start(upstream: std::net::SocketAddr, path: Writer, cuts: Vec<usize>) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let record = seen.clone();
        tokio::spawn(async move {
            for n in 0.. {
                let Ok((client, _)) = listener.accept().await else {
                    return;
                };
                let index = {
                    let mut seen = record.lock().unwrap();
                    seen.push(Seen::default());
                    seen.len() - 1
                };
                debug_assert_eq!(index, n);
                let cut = cuts.get(n).copied();
                tokio::spawn(relay(client, upstream, path, cut, record.clone(), index));
            }
        });
        Proxy { addr, seen }
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

/// Relays one connection; with `cut`, closes both sides right after that many SSE events.
async fn relay(
    client: TcpStream,
    upstream: std::net::SocketAddr,
    path: Writer,
    cut: Option<usize>,
    seen: Arc<Mutex<Vec<Seen>>>,
    index: usize,
) {
    let server = TcpStream::connect(upstream).await.unwrap();
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();

    // The request head, padded for hyper, then whatever else the client sends.
    let record = seen.clone();
    let upward = tokio::spawn(async move {
        let mut head = Vec::new();
        let mut buf = [0u8; 4096];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            match client_read.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => head.extend_from_slice(&buf[..n]),
            }
        }
        let text = String::from_utf8_lossy(&head).into_owned();
        record.lock().unwrap()[index].last_event_id = text
            .lines()
            .find_map(|line| {
                let (name, value) = line.split_once(':')?;
                name.eq_ignore_ascii_case("last-event-id")
                    .then(|| value.trim().to_owned())
            })
            .filter(|value| !value.is_empty());
        if path == Writer::Hyper {
            let line_end = head.windows(2).position(|w| w == b"\r\n").unwrap() + 2;
            let padding = format!("x-padding: {}\r\n", "p".repeat(9 * 1024));
            head.splice(line_end..line_end, padding.into_bytes());
        }
        if server_write.write_all(&head).await.is_err() {
            return;
        }
        let _ = tokio::io::copy(&mut client_read, &mut server_write).await;
    });

    // The response: relayed as it comes, up to the end of event number `cut`.
    let mut response = Vec::new();
    let mut body_at = None;
    let mut events = 0;
    let mut buf = [0u8; 16 * 1024];
    'relay: loop {
        let n = match server_read.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let start = response.len();
        response.extend_from_slice(&buf[..n]);
        if body_at.is_none()
            && let Some(at) = response.windows(4).position(|w| w == b"\r\n\r\n")
        {
            let head = String::from_utf8_lossy(&response[..at]).to_ascii_lowercase();
            seen.lock().unwrap()[index].closing = head.contains("\r\nconnection: close");
            body_at = Some(at + 4);
        }
        // Events end with a blank line; chunk framing only ever uses CRLF, so every `\n\n`
        // after the head ends an event.
        if let (Some(body), Some(cut)) = (body_at, cut) {
            for end in start.max(body + 1)..response.len() {
                if response[end - 1] == b'\n' && response[end] == b'\n' {
                    events += 1;
                    if events == cut {
                        let _ = client_write.write_all(&response[start..=end]).await;
                        break 'relay;
                    }
                }
            }
        }
        if client_write.write_all(&response[start..]).await.is_err() {
            break;
        }
    }
    // Dropping both halves closes both connections.
    upward.abort();
}

/// `node` running an `EventSource` on `url`; prints one JSON line per event.
struct Client {
    /// Killed when dropped.
    _child: Child,
    lines: tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
}

/// One line of the client's output.
#[derive(Debug, serde::Deserialize)]
struct ClientEvent {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    id: String,
    #[serde(default)]
    data: String,
}

const CLIENT: &str = r#"
import { createRequire } from "node:module";
const require = createRequire(process.env.WEB_DIR + "/package.json");
const { EventSource } = require("eventsource");
const source = new EventSource(process.env.URL);
const print = (event) => console.log(JSON.stringify({
  type: event.type, id: event.lastEventId ?? "", data: event.data ?? "",
}));
for (const name of ["subscribed", "message", "gap", "lag", "end"]) {
  source.addEventListener(name, print);
}
source.addEventListener("error", () => console.log(JSON.stringify({ type: "error" })));
source.addEventListener("open", () => console.log(JSON.stringify({ type: "open" })));
"#;

impl Client {
    fn start(url: &str) -> Client {
        let web = Path::new(env!("CARGO_MANIFEST_DIR")).join("web");
        assert!(
            web.join("node_modules/eventsource").is_dir(),
            "web/node_modules/eventsource is missing: run `scripts/deps-node.sh` (npm ci in web/)"
        );
        let mut child = Command::new("node")
            .args(["--input-type=module", "-e", CLIENT])
            .env("WEB_DIR", &web)
            .env("URL", url)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("`node` on PATH (Node.js 20); then run `scripts/deps-node.sh`");
        let lines = BufReader::new(child.stdout.take().unwrap()).lines();
        Client {
            _child: child,
            lines,
        }
    }

    async fn next(&mut self) -> ClientEvent {
        let line = within("the EventSource's next event", self.lines.next_line())
            .await
            .unwrap()
            .expect("the EventSource client exited");
        serde_json::from_str(&line).unwrap_or_else(|_| panic!("client output: {line}"))
    }

    /// Events until (and with) the `message` whose payload is `last`.
    async fn until_message(&mut self, last: &str) -> Vec<ClientEvent> {
        let mut events = Vec::new();
        loop {
            let event = self.next().await;
            let done = event.kind == "message" && payload(&event) == last;
            events.push(event);
            if done {
                return events;
            }
        }
    }
}

fn payload(event: &ClientEvent) -> String {
    let data: serde_json::Value = serde_json::from_str(&event.data).unwrap();
    data["payload"].as_str().unwrap().to_owned()
}

/// The payloads of the `message` events, in order, after checking that no gap was reported.
fn messages(events: &[ClientEvent]) -> Vec<String> {
    assert!(
        !events.iter().any(|e| e.kind == "gap" || e.kind == "end"),
        "no gap and no end: {events:?}"
    );
    events
        .iter()
        .filter(|e| e.kind == "message")
        .map(payload)
        .collect()
}

/// Publishes `m1..=mN` to `topic`; returns their cursors.
async fn publish(
    broker: &Broker,
    topic: &str,
    range: std::ops::RangeInclusive<u32>,
) -> Vec<String> {
    let mut cursors = Vec::new();
    for i in range {
        let ack = http_publish(&broker.url(), topic, &format!("m{i}")).await;
        cursors.push(ack["cursor"].as_str().unwrap().to_owned());
    }
    cursors
}

fn names(range: std::ops::RangeInclusive<u32>) -> Vec<String> {
    range.map(|i| format!("m{i}")).collect()
}

/// Resuming from a cursor: the stream replays m3..m5 after `subscribed`. The first connection is
/// cut right after `subscribed`, the second after `subscribed` and m3; each reconnect must
/// resume where the client really is.
async fn resume_from_a_cursor_survives_cuts(path: Writer) {
    let broker = spawn_broker().await;
    let cursors = publish(&broker, "t", 1..=5).await;
    let proxy = Proxy::start(broker.addr, path, vec![1, 2]).await;
    let mut client = Client::start(&format!(
        "http://{}/subscribe?topic=t&last_event_id={}",
        proxy.addr, cursors[1]
    ));

    let mut events = client.until_message("m5").await;
    // m6 arrives live on the third connection.
    publish(&broker, "t", 6..=6).await;
    events.extend(client.until_message("m6").await);
    assert_eq!(messages(&events), names(3..=6), "{events:?}");

    let seen = proxy.seen();
    assert_eq!(seen.len(), 3, "two cuts, two reconnects: {seen:?}");
    assert!(
        seen.iter().all(|s| s.closing == (path == Writer::Direct)),
        "every request took the {path:?} path: {seen:?}"
    );
    // After `subscribed` alone the client stands where it asked to start; after m3, at m3.
    assert_eq!(seen[1].last_event_id.as_deref(), Some(&*cursors[1]));
    assert_eq!(seen[2].last_event_id.as_deref(), Some(&*cursors[2]));
    drop(client);
    broker.stop().await;
}

/// `from=earliest`: `subscribed` carries no id, so a reconnect right after it starts from the
/// beginning again rather than from the head.
async fn from_earliest_survives_a_cut(path: Writer) {
    let broker = spawn_broker().await;
    publish(&broker, "t", 1..=3).await;
    let proxy = Proxy::start(broker.addr, path, vec![1]).await;
    let mut client = Client::start(&format!(
        "http://{}/subscribe?topic=t&from=earliest",
        proxy.addr
    ));
    let mut events = client.until_message("m3").await;
    publish(&broker, "t", 4..=4).await;
    events.extend(client.until_message("m4").await);
    assert_eq!(messages(&events), names(1..=4), "{events:?}");
    let seen = proxy.seen();
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert_eq!(seen[1].last_event_id, None, "{seen:?}");
    drop(client);
    broker.stop().await;
}

/// `from=latest`: `subscribed` carries the head, so what is published while the client is away
/// between `subscribed` and its reconnect is delivered.
async fn from_latest_survives_a_cut(path: Writer) {
    let broker = spawn_broker().await;
    publish(&broker, "t", 1..=2).await;
    let proxy = Proxy::start(broker.addr, path, vec![1]).await;
    let mut client = Client::start(&format!("http://{}/subscribe?topic=t", proxy.addr));
    let subscribed = within("subscribed", async {
        loop {
            let event = client.next().await;
            if event.kind == "subscribed" {
                return event;
            }
        }
    })
    .await;
    // The client is cut off now: published meanwhile, delivered after the reconnect.
    publish(&broker, "t", 3..=4).await;
    let events = client.until_message("m4").await;
    assert_eq!(messages(&events), names(3..=4), "{events:?}");
    let seen = proxy.seen();
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert_eq!(seen[1].last_event_id.as_deref(), Some(&*subscribed.id));
    drop(client);
    broker.stop().await;
}

#[tokio::test]
async fn direct_writer_resume_from_a_cursor_loses_nothing_when_cut() {
    resume_from_a_cursor_survives_cuts(Writer::Direct).await;
}

#[tokio::test]
async fn hyper_resume_from_a_cursor_loses_nothing_when_cut() {
    resume_from_a_cursor_survives_cuts(Writer::Hyper).await;
}

#[tokio::test]
async fn direct_writer_from_earliest_loses_nothing_when_cut() {
    from_earliest_survives_a_cut(Writer::Direct).await;
}

#[tokio::test]
async fn hyper_from_earliest_loses_nothing_when_cut() {
    from_earliest_survives_a_cut(Writer::Hyper).await;
}

#[tokio::test]
async fn direct_writer_from_latest_loses_nothing_when_cut() {
    from_latest_survives_a_cut(Writer::Direct).await;
}

#[tokio::test]
async fn hyper_from_latest_loses_nothing_when_cut() {
    from_latest_survives_a_cut(Writer::Hyper).await;
}

/// The shutdown notice is its own event (`end`), not `error`: `EventSource` fires its own
/// `error` for the closed connection, once, with no data.
#[tokio::test]
async fn shutdown_is_an_end_event_not_a_second_error() {
    let broker = spawn_broker().await;
    let mut client = Client::start(&format!("{}/subscribe?topic=t", broker.url()));
    loop {
        if client.next().await.kind == "subscribed" {
            break;
        }
    }
    let stopping = tokio::spawn(broker.stop());
    let end = client.next().await;
    assert_eq!(end.kind, "end", "{end:?}");
    let body: serde_json::Value = serde_json::from_str(&end.data).unwrap();
    assert_eq!(body["error"]["code"], "UNAVAILABLE", "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("shutting down"),
        "{body}"
    );
    let closed = client.next().await;
    assert_eq!(closed.kind, "error", "{closed:?}");
    assert!(closed.data.is_empty(), "the browser's error has no data");
    within("broker stop", stopping).await.unwrap();
}

/// A gap of a multi-topic subscription can end past messages still to be replayed (another
/// topic retains older ones), so it carries no id: cut right after the gap, the client resumes
/// from where it really is, is told of the gap again, and gets each replayed message once.
#[tokio::test]
async fn a_cut_after_a_gap_loses_none_of_the_replay() {
    let broker = spawn_broker_with(|c| c.retain_messages = 2).await;
    // b: seq 1, retained. a: seqs 2-5, of which 2 and 3 are evicted.
    let b = publish(&broker, "b", 1..=1).await;
    publish(&broker, "a", 1..=4).await;
    let (epoch, _) = b[0].rsplit_once('-').unwrap();
    let proxy = Proxy::start(broker.addr, Writer::Direct, vec![2]).await;
    let mut client = Client::start(&format!(
        "http://{}/subscribe?topic=a&topic=b&last_event_id={epoch}-0",
        proxy.addr
    ));
    let events = client.until_message("m4").await;
    let delivered: Vec<(String, String)> = events
        .iter()
        .filter(|e| e.kind == "message")
        .map(|e| {
            let data: serde_json::Value = serde_json::from_str(&e.data).unwrap();
            (data["topic"].as_str().unwrap().to_owned(), payload(e))
        })
        .collect();
    let expected = [("b", "m1"), ("a", "m3"), ("a", "m4")]
        .map(|(topic, payload)| (topic.to_owned(), payload.to_owned()));
    assert_eq!(delivered, expected, "{events:?}");
    let gaps: Vec<&ClientEvent> = events.iter().filter(|e| e.kind == "gap").collect();
    assert_eq!(
        gaps.len(),
        2,
        "the gap, and again after the reconnect: {events:?}"
    );
    let gap: serde_json::Value = serde_json::from_str(&gaps[0].data).unwrap();
    assert_eq!(
        (gap["from_seq"].as_u64(), gap["to_seq"].as_u64()),
        (Some(1), Some(3))
    );
    let seen = proxy.seen();
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert_eq!(seen[1].last_event_id, Some(format!("{epoch}-0")));
    drop(client);
    broker.stop().await;
}

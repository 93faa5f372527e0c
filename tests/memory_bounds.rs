//! Memory stays bounded whatever clients do: subscriber queues are bounded in bytes, history
//! pages are cut by bytes and streamed, and peers that stop reading are let go.
//!
//! Real brokers over real sockets: in-process where the test only talks to the broker, as a
//! child process (`topichub serve`) where the test measures the process's memory. Waits are
//! bounded; the write timeout is configured short instead of waiting for the default.

mod support;

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use http_body_util::BodyExt as _;
use support::{
    Broker, free_port, metric, proc_status_bytes, publish_request, spawn_broker_with,
    start_broker_process, stuck_sse_subscriber, wait_for, within,
};
use tokio::io::AsyncWriteExt as _;
use tonic::Code;
use topichub::proto::v1::pub_sub_client::PubSubClient;
use topichub::proto::v1::{self, SubscribeRequest, subscribe_response::Event};

const KIB: usize = 1024;
const MIB: usize = 1024 * 1024;

async fn subscribers_at(addr: SocketAddr) -> Option<u64> {
    let health: serde_json::Value = reqwest::get(format!("http://{addr}/healthz"))
        .await
        .ok()?
        .json()
        .await
        .ok()?;
    health["subscribers"].as_u64()
}

async fn wait_for_subscribers_at(addr: SocketAddr, n: u64) {
    wait_for(&format!("{n} subscribers at {addr}"), || async move {
        (subscribers_at(addr).await? == n).then_some(())
    })
    .await;
}

async fn grpc_at(addr: SocketAddr) -> PubSubClient<tonic::transport::Channel> {
    let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    PubSubClient::new(channel).max_decoding_message_size(4 * MIB)
}

// ---------------------------------------------------------------------------------------------
// 1. Subscriber queues are bounded in bytes.

/// Five subscribers that never read (two SSE, two gRPC `Subscribe`, one `Connect`) follow a
/// topic that receives 200 x 1 MiB. With a queue length of 1024 and no byte budget, each queue
/// held every message retention had long dropped (200 MiB pinned); with the 16 MiB default
/// budget, the broker's memory grows by retention + one budget (the queues share the messages)
/// + the Connect outbox + transport buffers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn never_reading_subscribers_are_held_to_the_queue_byte_budget() {
    const MESSAGES: usize = 200;
    const RETAIN: usize = 8 * MIB;
    let addr = free_port().await;
    let broker = start_broker_process(addr, &["--retain-bytes", &RETAIN.to_string()]).await;
    let pid = broker.id().unwrap();

    let _sse = [
        stuck_sse_subscriber(addr, "/subscribe?topic=bounds.flood").await,
        stuck_sse_subscriber(addr, "/subscribe?topic=bounds.flood").await,
    ];
    let mut grpc = Vec::new();
    for _ in 0..2 {
        let stream = grpc_at(addr)
            .await
            .subscribe(SubscribeRequest {
                topics: vec!["bounds.flood".into()],
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        grpc.push(stream);
    }
    // A Connect stream too: besides its subscription's queue, its outbox buffers events.
    let (requests, rx) = tokio::sync::mpsc::channel(1);
    let _connect = grpc_at(addr)
        .await
        .connect(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    requests
        .send(v1::ConnectRequest {
            request_id: 1,
            request: Some(v1::connect_request::Request::Subscribe(SubscribeRequest {
                topics: vec!["bounds.flood".into()],
                ..Default::default()
            })),
        })
        .await
        .unwrap();
    wait_for_subscribers_at(addr, 5).await;

    let mut publisher = grpc_at(addr).await;
    let payload = Bytes::from(vec![b'x'; MIB]);
    for _ in 0..4 {
        publisher
            .publish(publish_request("bounds.warm", payload.clone()))
            .await
            .unwrap();
    }
    let baseline = proc_status_bytes(pid, "VmRSS");
    within("publishing past never-reading subscribers", async {
        for _ in 0..MESSAGES {
            publisher
                .publish(publish_request("bounds.flood", payload.clone()))
                .await
                .unwrap();
        }
    })
    .await;
    let rss = proc_status_bytes(pid, "VmRSS");
    let peak = proc_status_bytes(pid, "VmHWM");
    let grown = rss.saturating_sub(baseline);
    eprintln!(
        "never-reading subscribers x5, {MESSAGES} x 1 MiB published: RSS {} -> {} MiB (peak {} MiB)",
        baseline / MIB as u64,
        rss / MIB as u64,
        peak / MIB as u64
    );
    // Retention (8 MiB) + one queue budget shared by all four (16 MiB + one message) + the
    // messages' cached encodings (each about one payload per wire form) + HTTP/2 and socket
    // buffers + allocator slack: well under 100 MiB; 200 MiB of queued payloads would not fit.
    assert!(
        grown < 100 * MIB as u64,
        "the broker grew by {} MiB for {MESSAGES} MiB published",
        grown / MIB as u64
    );
    assert!(
        metric_at(addr, "topichub_max_queue_bytes").await <= (16 * MIB + 2 * MIB) as f64,
        "no queue holds more than its budget and one message"
    );
    drop((grpc, requests));
}

async fn metric_at(addr: SocketAddr, series: &str) -> f64 {
    let text = reqwest::get(format!("http://{addr}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .map_or(0.0, |value| value.parse().unwrap())
}

/// A gRPC subscriber whose queue may hold 65 536 messages but only 256 KiB stops reading while
/// 16 MiB arrive: the byte budget, not the count, overflows, and catch-up follows as for a full
/// queue: a `lag` notice, then every message from retention, in order, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_over_its_byte_budget_lags_and_catches_up() {
    let broker = spawn_broker_with(|_| {}).await;
    let mut client = broker.grpc().await;
    let mut slow = client
        .subscribe(SubscribeRequest {
            topics: vec!["bounds.lag".into()],
            queue_size: 65_536,
            queue_bytes: 256 * KIB as u64,
            lag_policy: v1::LagPolicy::CatchUp as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let payload = Bytes::from(vec![b'x'; 64 * KIB]);
    let mut published = Vec::new();
    for _ in 0..256 {
        let cursor = client
            .publish(publish_request("bounds.lag", payload.clone()))
            .await
            .unwrap()
            .into_inner()
            .cursor
            .unwrap();
        published.push(cursor.seq);
    }
    let mut seqs = Vec::new();
    let mut lags = 0;
    while seqs.len() < published.len() {
        let item = within("catching up", slow.next()).await.unwrap().unwrap();
        match item.event.unwrap() {
            Event::Subscribed(_) => {}
            Event::Message(m) => seqs.push(m.cursor.unwrap().seq),
            Event::Lag(_) => lags += 1,
            Event::Gap(gap) => panic!("everything is retained, so no {gap:?}"),
            Event::Presence(p) => panic!("not asked for: {p:?}"),
            Event::Cluster(c) => panic!("not in cluster mode: {c:?}"),
        }
    }
    assert!(
        lags >= 1,
        "the byte budget overflowed and the subscriber was told"
    );
    assert_eq!(seqs, published, "every message, in order, once");
    broker.stop().await;
}

/// Under the `disconnect` policy the byte budget ends the stream: gRPC with RESOURCE_EXHAUSTED,
/// SSE with an `error` event, each saying it was the bytes. A budget over the server maximum is
/// refused up front.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_over_its_byte_budget_is_disconnected_under_that_policy() {
    let broker = spawn_broker_with(|c| c.max_queue_bytes = 4 * MIB).await;
    let mut client = broker.grpc().await;
    let mut slow = client
        .subscribe(SubscribeRequest {
            topics: vec!["bounds.cut".into()],
            queue_size: 65_536,
            queue_bytes: 256 * KIB as u64,
            lag_policy: v1::LagPolicy::Disconnect as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut sse = stuck_sse_subscriber(
        broker.addr,
        "/subscribe?topic=bounds.cut&queue_size=65536&queue_bytes=262144&lag_policy=disconnect",
    )
    .await;
    broker.wait_for_subscribers(2).await;
    let payload = Bytes::from(vec![b'x'; 64 * KIB]);
    for _ in 0..256 {
        client
            .publish(publish_request("bounds.cut", payload.clone()))
            .await
            .unwrap();
    }
    let status = loop {
        match within("gRPC disconnect", slow.next()).await.unwrap() {
            Ok(_) => continue,
            Err(status) => break status,
        }
    };
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert!(
        status
            .message()
            .contains("fell more than 262144 bytes behind"),
        "{status:?}"
    );
    let mut tail = Vec::new();
    while let Some(frame) = within("SSE disconnect", sse.body.frame()).await {
        if let Ok(data) = frame.unwrap().into_data() {
            tail.extend_from_slice(&data);
            tail.drain(..tail.len().saturating_sub(4 * KIB));
        }
    }
    let tail = String::from_utf8_lossy(&tail);
    assert!(
        tail.contains("event: end") && tail.contains("fell more than 262144 bytes behind"),
        "{tail}"
    );
    broker.wait_for_subscribers(0).await;

    let refused = client
        .subscribe(SubscribeRequest {
            topics: vec!["bounds.cut".into()],
            queue_bytes: 8 * MIB as u64,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument);
    assert!(
        refused.message().contains("--max-queue-bytes"),
        "{refused:?}"
    );
    let response = reqwest::get(format!(
        "{}/subscribe?topic=bounds.cut&queue_bytes=8388608",
        broker.url()
    ))
    .await
    .unwrap();
    assert_eq!(response.status(), 400);
    broker.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 2. History pages are bounded in bytes and streamed.

/// 20 messages of 1 MiB, asked for with `limit=1000`: each page stops at 8 MiB of message JSON
/// with `more: true`, is streamed (no `content-length`: nothing built whole), and following
/// `next` returns every message once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_pages_are_cut_by_bytes_and_streamed() {
    const MESSAGES: usize = 20;
    let broker = spawn_broker_with(|_| {}).await;
    let mut client = broker.grpc().await;
    let payload = Bytes::from(vec![b'h'; MIB]);
    for _ in 0..MESSAGES {
        client
            .publish(publish_request("bounds.history.a", payload.clone()))
            .await
            .unwrap();
    }
    let http = reqwest::Client::new();
    let mut seqs = Vec::new();
    let mut pages = 0;
    let mut query = "limit=1000".to_owned();
    loop {
        let response = http
            .get(format!(
                "{}/topics/bounds.history.%3E/messages?{query}",
                broker.url()
            ))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(response.headers()["content-type"], "application/json");
        assert_eq!(response.content_length(), None, "the page is streamed");
        let body = response.bytes().await.unwrap();
        let page: serde_json::Value = serde_json::from_slice(&body).unwrap();
        let messages = page["messages"].as_array().unwrap();
        assert!(!messages.is_empty());
        let json: usize = messages
            .iter()
            .map(|m| serde_json::to_vec(m).unwrap().len())
            .sum();
        assert!(
            json <= topichub::http::MAX_HISTORY_PAGE_BYTES,
            "{json} bytes of messages in one page"
        );
        seqs.extend(messages.iter().map(|m| m["seq"].as_u64().unwrap()));
        pages += 1;
        if !page["more"].as_bool().unwrap() {
            break;
        }
        assert_eq!(
            page["next"],
            messages.last().unwrap()["cursor"],
            "next continues after the last message"
        );
        query = format!("limit=1000&after={}", page["next"].as_str().unwrap());
    }
    assert!(
        pages >= 3,
        "20 MiB take at least three 8 MiB pages, got {pages}"
    );
    assert_eq!(seqs, (1..=MESSAGES as u64).collect::<Vec<_>>());

    // One message larger than a page still comes alone.
    let response = http
        .get(format!(
            "{}/topics/bounds.history.a/messages?limit=1",
            broker.url()
        ))
        .send()
        .await
        .unwrap();
    let page: serde_json::Value = response.json().await.unwrap();
    assert_eq!(page["messages"].as_array().unwrap().len(), 1);
    assert_eq!(page["more"], true);
    broker.stop().await;
}

/// Three concurrent `limit=1000` pages over 1 MiB messages: built whole, they took over 500 MB
/// of broker memory; streamed and cut at 8 MiB, the broker's peak hardly moves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_history_pages_over_large_messages_cost_little_memory() {
    const MESSAGES: usize = 60;
    let addr = free_port().await;
    let broker = start_broker_process(addr, &[]).await;
    let pid = broker.id().unwrap();
    let mut client = grpc_at(addr).await;
    let payload = Bytes::from(vec![b'h'; MIB]);
    for _ in 0..MESSAGES {
        client
            .publish(publish_request("bounds.pages", payload.clone()))
            .await
            .unwrap();
    }
    let url = format!("http://{addr}/topics/bounds.pages/messages?limit=1000");
    // Warm up the route with a small page (a large one would raise the peak being measured).
    reqwest::get(format!(
        "http://{addr}/topics/bounds.pages/messages?limit=1"
    ))
    .await
    .unwrap()
    .bytes()
    .await
    .unwrap();
    let baseline = proc_status_bytes(pid, "VmHWM");
    let pages = (0..3).map(|_| {
        let url = url.clone();
        tokio::spawn(async move { reqwest::get(&url).await.unwrap().bytes().await.unwrap() })
    });
    for page in pages {
        within("a page", page).await.unwrap();
    }
    let peak = proc_status_bytes(pid, "VmHWM");
    let grown = peak.saturating_sub(baseline);
    eprintln!(
        "3 concurrent history pages over {MESSAGES} x 1 MiB: peak RSS {} -> {} MiB",
        baseline / MIB as u64,
        peak / MIB as u64
    );
    assert!(
        grown < 48 * MIB as u64,
        "three pages raised the peak by {} MiB",
        grown / MIB as u64
    );
}

// ---------------------------------------------------------------------------------------------
// 3. Frozen readers are dropped.

/// A connection that reads nothing at all: a socket with a small receive buffer, a request
/// written, and nothing ever read.
async fn frozen_http1(addr: SocketAddr, request: &str) -> tokio::net::TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4 * KIB as u32).unwrap();
    let mut stream = socket.connect(addr).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    stream
}

/// A socket that stops reading once `frozen` is set, and stays open: what the broker sees of a
/// peer whose process hangs.
struct FreezableSocket {
    inner: tokio::net::TcpStream,
    frozen: Arc<AtomicBool>,
}

impl tokio::io::AsyncRead for FreezableSocket {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if self.frozen.load(Ordering::SeqCst) {
            return Poll::Pending;
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for FreezableSocket {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, data)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// A gRPC `Subscribe` over a raw HTTP/2 connection with wide-open flow-control windows, which
/// freezes once the response has begun: the server then has data to send and a peer that
/// takes none. Returns what keeps it open.
async fn frozen_grpc(
    addr: SocketAddr,
    topic: &str,
) -> (
    hyper::client::conn::http2::SendRequest<http_body_util::Full<Bytes>>,
    http::Response<hyper::body::Incoming>,
) {
    use prost::Message as _;
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4 * KIB as u32).unwrap();
    let frozen = Arc::new(AtomicBool::new(false));
    let stream = FreezableSocket {
        inner: socket.connect(addr).await.unwrap(),
        frozen: frozen.clone(),
    };
    let (mut sender, connection) =
        hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
            .initial_stream_window_size(1 << 30)
            .initial_connection_window_size(1 << 30)
            .handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(connection);
    let message = SubscribeRequest {
        topics: vec![topic.into()],
        ..Default::default()
    }
    .encode_to_vec();
    let body = support::grpc_frame(&message);
    let request = http::Request::post(format!("http://{addr}/topichub.v1.PubSub/Subscribe"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(http_body_util::Full::new(Bytes::from(body)))
        .unwrap();
    let response = within("frozen gRPC subscribe", sender.send_request(request))
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    frozen.store(true, Ordering::SeqCst);
    (sender, response)
}

/// Three peers stop reading while 1 MiB messages flow: an SSE subscriber on the direct writer,
/// one served by hyper (its `expect` header sends it there), and a gRPC `Subscribe` stream.
/// Each is disconnected once its socket has accepted nothing for the configured write timeout,
/// counted by door; a subscriber that reads receives every message meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frozen_readers_are_disconnected_after_the_write_timeout() {
    const MESSAGES: usize = 24;
    let broker: Broker = spawn_broker_with(|c| {
        c.write_timeout = Duration::from_millis(500);
        // Their queues must not be what ends them.
        c.lag_policy = topichub::hub::LagPolicy::CatchUp;
    })
    .await;
    let mut healthy = broker.grpc_subscribe(&["bounds.frozen"]).await;
    let request = |extra: &str| {
        format!("GET /subscribe?topic=bounds.frozen HTTP/1.1\r\nhost: x\r\n{extra}\r\n")
    };
    let _direct = frozen_http1(broker.addr, &request("")).await;
    let _hyper = frozen_http1(broker.addr, &request("expect: 100-continue\r\n")).await;
    let _grpc = frozen_grpc(broker.addr, "bounds.frozen").await;
    broker.wait_for_subscribers(4).await;

    let reader = tokio::spawn(async move {
        let mut seqs = Vec::new();
        while seqs.len() < MESSAGES {
            let item = within("healthy subscriber", healthy.next())
                .await
                .unwrap()
                .unwrap();
            match item.event.unwrap() {
                Event::Message(m) => seqs.push(m.cursor.unwrap().seq),
                Event::Subscribed(_) => {}
                other => panic!("the reading subscriber keeps up: {other:?}"),
            }
        }
        (seqs, healthy)
    });
    let mut client = broker.grpc().await;
    let payload = Bytes::from(vec![b'f'; MIB]);
    for _ in 0..MESSAGES {
        client
            .publish(publish_request("bounds.frozen", payload.clone()))
            .await
            .unwrap();
    }
    let (seqs, _healthy) = within("the reading subscriber", reader).await.unwrap();
    assert_eq!(seqs, (1..=MESSAGES as u64).collect::<Vec<_>>());
    // Only the reading subscriber is left.
    broker.wait_for_subscribers(1).await;
    assert_eq!(
        metric(&broker, "topichub_write_timeouts_total{door=\"http\"}").await,
        2.0
    );
    assert_eq!(
        metric(&broker, "topichub_write_timeouts_total{door=\"grpc\"}").await,
        1.0
    );
    broker.stop().await;
}

//! One client implementation per protocol, used for every target that speaks it: subscribers
//! report to a [`Sink`], publishers publish one payload at a time.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::{Context, bail, ensure};
use bytes::{BufMut, Bytes, BytesMut};
use futures_util::StreamExt;
use http_body_util::{BodyExt, Empty, Full};
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;
use tonic::transport::{Channel, Endpoint};
use topichub::proto::seed::pub_sub_service_client::PubSubServiceClient;
use topichub::proto::v1::pub_sub_client::PubSubClient;
use topichub::proto::v1::subscribe_response::Event;

use crate::floor::Layer;
use crate::servers::Kind;
use crate::stats::Sink;

/// A system under test, as a client reaches it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Target {
    /// topichub over gRPC, `topichub.v1.PubSub` (unary Publish, server-streaming Subscribe).
    Grpc,
    /// topichub over gRPC, the seed's `proto.PubSubService`.
    Seed,
    /// topichub over HTTP: `POST /topics/{topic}` and SSE `GET /subscribe`, HTTP/1.1.
    Sse,
    /// topichub SSE with many streams per HTTP/2 connection (idle memory and holding).
    SseH2,
    /// topichub gRPC `Subscribe` streams, many per HTTP/2 connection (idle memory, holding,
    /// fan-out).
    GrpcMux,
    /// The seed's `proto.PubSubService` `Subscribe` streams, many per HTTP/2 connection
    /// (fan-out).
    SeedMux,
    /// nats-server, async-nats client (publish + flush where an acknowledgement is needed).
    Nats,
    /// nginx + nchan: `POST /pub?id=` and EventSource `GET /sub?id=`.
    Nchan,
    /// mosquitto: MQTT 3.1.1, QoS 0 delivery, QoS 1 where an acknowledgement is needed.
    Mqtt,
    /// The raw-loopback ceiling: a minimal program writing the SSE bytes to every socket.
    Raw,
    /// topichub over gRPC with a durable log (`--data-dir`, `--fsync always`: group commit).
    GrpcDisk,
    /// topichub over gRPC with a durable log synced on an interval (`--fsync every=1s`).
    GrpcDiskEvery,
    /// nats-server with JetStream file storage: async-nats JetStream publish awaiting each
    /// PubAck, an ordered push consumer per subscriber.
    Jetstream,
    /// Three topichub nodes `serve --nats` on a three-node JetStream cluster, reached over
    /// gRPC as `topichub-grpc` is (cluster scenario).
    GrpcCluster,
    /// The floor of unary `Publish`: tonic's unary path over hyper, no broker behind
    /// (`floor-server --layer tonic`), reached as `topichub-grpc` is.
    TonicFloor,
    /// The floor of unary `Publish`: hyper's HTTP/2 server answering a fixed gRPC reply
    /// (`floor-server --layer h2`), reached as `topichub-grpc` is.
    H2Floor,
}

impl Target {
    pub fn kind(self) -> Kind {
        match self {
            Target::Grpc
            | Target::Seed
            | Target::Sse
            | Target::SseH2
            | Target::GrpcMux
            | Target::SeedMux => Kind::Topichub,
            Target::GrpcDisk => Kind::TopichubDisk,
            Target::GrpcDiskEvery => Kind::TopichubDiskEvery,
            Target::Jetstream => Kind::Jetstream,
            Target::GrpcCluster => Kind::ClusterTopichub,
            Target::Nats => Kind::Nats,
            Target::Nchan => Kind::Nchan,
            Target::Mqtt => Kind::Mosquitto,
            Target::Raw => Kind::Raw,
            Target::TonicFloor => Kind::Floor(Layer::Tonic),
            Target::H2Floor => Kind::Floor(Layer::H2),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Target::Grpc => "topichub-grpc",
            Target::Seed => "topichub-seed",
            Target::Sse => "topichub-sse",
            Target::SseH2 => "topichub-sse-h2",
            Target::GrpcMux => "topichub-grpc-mux",
            Target::SeedMux => "topichub-seed-mux",
            Target::Nats => "nats",
            Target::Nchan => "nchan",
            Target::Mqtt => "mosquitto",
            Target::Raw => "raw-loopback",
            Target::GrpcDisk => "topichub-grpc-disk",
            Target::GrpcDiskEvery => "topichub-grpc-disk-every",
            Target::Jetstream => "nats-jetstream",
            Target::GrpcCluster => "topichub-grpc-cluster",
            Target::TonicFloor => "tonic-floor",
            Target::H2Floor => "h2-floor",
        }
    }

    pub fn is_topichub(self) -> bool {
        matches!(
            self.kind(),
            Kind::Topichub | Kind::TopichubDisk | Kind::TopichubDiskEvery | Kind::ClusterTopichub
        )
    }
}

/// Runs one subscriber of `topic` until its stream ends or the task is aborted. It calls
/// `sink.mark_ready()` once the server has it registered, and `sink.deliver` per message.
pub async fn subscriber(target: Target, addr: SocketAddr, topic: String, sink: Arc<Sink>) {
    let result = match target {
        Target::Grpc | Target::GrpcDisk | Target::GrpcDiskEvery | Target::GrpcCluster => {
            grpc_subscriber(addr, &topic, &sink).await
        }
        Target::Jetstream => jetstream_subscriber(addr, &topic, &sink).await,
        Target::Seed => seed_subscriber(addr, &topic, &sink).await,
        Target::Sse | Target::Nchan | Target::Raw => {
            let path = sse_path(target, &topic);
            let stream = connect(addr).await;
            match stream {
                Ok(stream) => sse_http1(stream, addr, &path, target, &sink).await,
                Err(e) => Err(e),
            }
        }
        Target::SseH2 | Target::GrpcMux | Target::SeedMux => {
            Err(anyhow::anyhow!("use multiplexed() for {target:?}"))
        }
        Target::TonicFloor | Target::H2Floor => {
            Err(anyhow::anyhow!("{} answers Publish alone", target.name()))
        }
        Target::Nats => nats_subscriber(addr, &topic, &sink).await,
        Target::Mqtt => mqtt_subscriber(addr, &topic, &sink).await,
    };
    match result {
        Ok(()) => sink.fail(format!("{} stream ended", target.name())),
        Err(e) => sink.fail(format!("{}: {e:#}", target.name())),
    }
}

fn sse_path(target: Target, topic: &str) -> String {
    match target {
        Target::Nchan => format!("/sub?id={topic}"),
        Target::Raw => "/sub".into(),
        _ => format!("/subscribe?topic={topic}"),
    }
}

async fn connect(addr: SocketAddr) -> anyhow::Result<TcpStream> {
    let stream = TcpStream::connect(addr).await.context("connect")?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

pub fn endpoint(addr: SocketAddr) -> anyhow::Result<Endpoint> {
    Ok(Endpoint::from_shared(format!("http://{addr}"))?.tcp_nodelay(true))
}

async fn grpc_subscriber(addr: SocketAddr, topic: &str, sink: &Sink) -> anyhow::Result<()> {
    let client = PubSubClient::new(endpoint(addr)?.connect().await?);
    grpc_stream(client, topic, sink).await
}

async fn grpc_stream(
    mut client: PubSubClient<Channel>,
    topic: &str,
    sink: &Sink,
) -> anyhow::Result<()> {
    let request = topichub::proto::v1::SubscribeRequest {
        topics: vec![topic.to_owned()],
        ..Default::default()
    };
    let mut stream = client.subscribe(request).await?.into_inner();
    while let Some(event) = stream.message().await? {
        match event.event {
            Some(Event::Message(m)) => sink.deliver(&m.payload),
            Some(Event::Subscribed(_)) => sink.mark_ready(),
            Some(other) => bail!("unexpected event {other:?}"),
            None => {}
        }
    }
    Ok(())
}

async fn seed_subscriber(addr: SocketAddr, topic: &str, sink: &Sink) -> anyhow::Result<()> {
    let client = PubSubServiceClient::new(endpoint(addr)?.connect().await?);
    seed_stream(client, topic, sink).await
}

async fn seed_stream(
    mut client: PubSubServiceClient<Channel>,
    topic: &str,
    sink: &Sink,
) -> anyhow::Result<()> {
    let request = topichub::proto::seed::SubscribeRequest {
        topic: topic.to_owned(),
    };
    // The seed API has no "subscribed" event; the response headers come once the hub has the
    // subscription.
    let mut stream = client.subscribe(request).await?.into_inner();
    sink.mark_ready();
    while let Some(event) = stream.message().await? {
        sink.deliver(&event.payload);
    }
    Ok(())
}

/// Splits an SSE byte stream into events (blocks ending in a blank line).
#[derive(Default)]
struct SseParser {
    pending: Vec<u8>,
}

impl SseParser {
    fn feed(
        &mut self,
        data: &[u8],
        mut on_event: impl FnMut(&[u8]) -> anyhow::Result<()>,
    ) -> anyhow::Result<()> {
        let mut rest: &[u8] = data;
        if !self.pending.is_empty() {
            self.pending.extend_from_slice(data);
            let pending = std::mem::take(&mut self.pending);
            let mut at = 0;
            while let Some(end) = event_end(&pending[at..]) {
                on_event(&pending[at..at + end])?;
                at += end + 2;
            }
            self.pending = pending[at..].to_vec();
            return Ok(());
        }
        while let Some(end) = event_end(rest) {
            on_event(&rest[..end])?;
            rest = &rest[end + 2..];
        }
        self.pending.extend_from_slice(rest);
        Ok(())
    }
}

/// Offset of the `\n\n` that ends the first event in `data`.
fn event_end(data: &[u8]) -> Option<usize> {
    let mut from = 0;
    while let Some(nl) = data[from..].iter().position(|b| *b == b'\n') {
        let at = from + nl;
        match data.get(at + 1) {
            Some(b'\n') => return Some(at),
            Some(_) => from = at + 1,
            None => return None,
        }
    }
    None
}

/// What one SSE event means to the benchmark.
fn sse_event(block: &[u8], target: Target, sink: &Sink) -> anyhow::Result<()> {
    if block.starts_with(b":") {
        return Ok(()); // comment (keep-alive)
    }
    let event = block
        .split(|b| *b == b'\n')
        .find_map(|line| line.strip_prefix(b"event: "))
        .unwrap_or(b"message");
    match event {
        b"message" => sink.deliver(block),
        b"subscribed" if target.is_topichub() => sink.mark_ready(),
        other => bail!("unexpected SSE event {:?}", String::from_utf8_lossy(other)),
    }
    Ok(())
}

async fn sse_http1(
    stream: TcpStream,
    addr: SocketAddr,
    path: &str,
    target: Target,
    sink: &Sink,
) -> anyhow::Result<()> {
    let (mut sender, connection) = http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(connection);
    let request = http::Request::get(path)
        .header("host", addr.to_string())
        .header("accept", "text/event-stream")
        .body(Empty::<Bytes>::new())?;
    let response = sender.send_request(request).await?;
    read_sse(response, target, sink).await
}

async fn read_sse(
    response: http::Response<hyper::body::Incoming>,
    target: Target,
    sink: &Sink,
) -> anyhow::Result<()> {
    if !response.status().is_success() {
        bail!("subscribe answered {}", response.status());
    }
    if !target.is_topichub() {
        // nchan and the raw server register the subscriber before answering.
        sink.mark_ready();
    }
    let mut body = response.into_body();
    let mut parser = SseParser::default();
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame?.into_data() {
            parser.feed(&data, |block| sse_event(block, target, sink))?;
        }
    }
    Ok(())
}

/// `count` subscribers of `topic` multiplexed over one HTTP/2 connection: SSE streams
/// (`SseH2`, h2c with prior knowledge) or gRPC streams (`GrpcMux`, `SeedMux`).
pub async fn multiplexed(
    target: Target,
    addr: SocketAddr,
    topic: String,
    count: usize,
    sink: Arc<Sink>,
) {
    let result = match target {
        Target::SseH2 => sse_h2_subscribers(addr, topic, count, &sink).await,
        Target::GrpcMux => grpc_mux_subscribers(addr, topic, count, &sink).await,
        Target::SeedMux => seed_mux_subscribers(addr, topic, count, &sink).await,
        other => Err(anyhow::anyhow!("{other:?} is not multiplexed")),
    };
    match result {
        Ok(()) => sink.fail(format!("{} streams ended", target.name())),
        Err(e) => sink.fail(format!("{}: {e:#}", target.name())),
    }
}

/// `count` `Subscribe` streams on one HTTP/2 connection, as cheap for this process as they can
/// be, so that a million of them fit beside the broker: one task for the connection and all its
/// streams (no task, tonic decoder or 8 KiB read buffer per stream), each stream's body polled
/// only when the connection has data for it. Aborting the task closes the connection.
async fn grpc_mux_subscribers(
    addr: SocketAddr,
    topic: String,
    count: usize,
    sink: &Arc<Sink>,
) -> anyhow::Result<()> {
    let stream = connect(addr).await?;
    let (sender, connection) = http2::Builder::new(TokioExecutor::new())
        .initial_stream_window_size(16 * 1024)
        .handshake(TokioIo::new(stream))
        .await?;
    let request = grpc_frame(&topichub::proto::v1::SubscribeRequest {
        topics: vec![topic],
        ..Default::default()
    });
    let uri = format!("http://{addr}/topichub.v1.PubSub/Subscribe");
    let streams = async {
        let mut opening: futures_util::stream::FuturesUnordered<_> = (0..count)
            .map(|_| subscribe_stream(sender.clone(), &uri, request.clone()))
            .collect();
        let mut events = futures_util::stream::SelectAll::new();
        // The first response (the `subscribed` event) has been read: the stream is live.
        while let Some(body) = opening.next().await {
            events.push(GrpcEvents::new(body?));
            sink.mark_ready();
        }
        while let Some(event) = events.next().await {
            match event?.event {
                Some(Event::Message(m)) => sink.deliver(&m.payload),
                Some(other) => bail!("unexpected event {other:?}"),
                None => {}
            }
        }
        anyhow::Ok(())
    };
    tokio::select! {
        result = streams => result,
        result = connection => Err(match result {
            Ok(()) => anyhow::anyhow!("the connection closed"),
            Err(e) => e.into(),
        }),
    }
}

/// The `SubscribeResponse` messages of one gRPC response body.
struct GrpcEvents {
    body: hyper::body::Incoming,
    /// Bytes of a message whose frame has not all arrived (empty, unallocated, when idle).
    pending: bytes::BytesMut,
}

impl GrpcEvents {
    fn new(body: hyper::body::Incoming) -> Self {
        GrpcEvents {
            body,
            pending: bytes::BytesMut::new(),
        }
    }

    fn next_message(&mut self) -> anyhow::Result<Option<topichub::proto::v1::SubscribeResponse>> {
        use bytes::Buf as _;
        if self.pending.len() < 5 {
            return Ok(None);
        }
        let len = u32::from_be_bytes(self.pending[1..5].try_into().expect("4 bytes")) as usize;
        if self.pending.len() < 5 + len {
            return Ok(None);
        }
        anyhow::ensure!(self.pending[0] == 0, "compressed gRPC message");
        self.pending.advance(5);
        let message = self.pending.split_to(len);
        if self.pending.is_empty() {
            // Give the buffer back: an idle stream holds none.
            self.pending = bytes::BytesMut::new();
        }
        Ok(Some(prost::Message::decode(message.freeze())?))
    }
}

impl futures_util::Stream for GrpcEvents {
    type Item = anyhow::Result<topichub::proto::v1::SubscribeResponse>;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        use hyper::body::Body as _;
        use std::task::Poll;
        let this = &mut *self;
        loop {
            match this.next_message() {
                Ok(Some(message)) => return Poll::Ready(Some(Ok(message))),
                Ok(None) => {}
                Err(e) => return Poll::Ready(Some(Err(e))),
            }
            match std::pin::Pin::new(&mut this.body).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) => this.pending.extend_from_slice(&data),
                    // Trailers: the stream ended (with its status).
                    Err(_) => return Poll::Ready(None),
                },
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e.into()))),
                Poll::Ready(None) => return Poll::Ready(None),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

/// A gRPC request message with its 5-byte length prefix (uncompressed).
pub fn grpc_frame(message: &impl prost::Message) -> Bytes {
    let mut out = BytesMut::with_capacity(5 + message.encoded_len());
    out.put_u8(0);
    out.put_u32(message.encoded_len() as u32);
    message
        .encode(&mut out)
        .expect("a BytesMut grows as needed");
    out.freeze()
}

/// Opens one Subscribe stream and returns its body once the first response message (the
/// `subscribed` event) has arrived.
pub async fn subscribe_stream(
    mut sender: http2::SendRequest<Full<Bytes>>,
    uri: &str,
    request: Bytes,
) -> anyhow::Result<hyper::body::Incoming> {
    let request = http::Request::post(uri)
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(Full::new(request))?;
    sender.ready().await?;
    let response = sender.send_request(request).await?;
    ensure!(
        response.status().is_success(),
        "Subscribe answered HTTP {}",
        response.status()
    );
    if let Some(status) = response.headers().get("grpc-status") {
        bail!(
            "Subscribe answered grpc-status {status:?}: {:?}",
            response.headers().get("grpc-message")
        );
    }
    let mut body = response.into_body();
    match body.frame().await {
        Some(frame) => {
            let frame = frame?;
            ensure!(
                frame.is_data(),
                "Subscribe ended before its first response: {frame:?}"
            );
            Ok(body)
        }
        None => bail!("Subscribe ended before its first response"),
    }
}

async fn seed_mux_subscribers(
    addr: SocketAddr,
    topic: String,
    count: usize,
    sink: &Arc<Sink>,
) -> anyhow::Result<()> {
    let client = PubSubServiceClient::new(endpoint(addr)?.connect().await?);
    let mut streams = tokio::task::JoinSet::new();
    for _ in 0..count {
        let (client, topic, sink) = (client.clone(), topic.clone(), sink.clone());
        streams.spawn(async move { seed_stream(client, &topic, &sink).await });
    }
    while let Some(done) = streams.join_next().await {
        done??;
    }
    Ok(())
}

async fn sse_h2_subscribers(
    addr: SocketAddr,
    topic: String,
    count: usize,
    sink: &Arc<Sink>,
) -> anyhow::Result<()> {
    {
        let stream = connect(addr).await?;
        let (sender, connection) = http2::Builder::new(TokioExecutor::new())
            .initial_stream_window_size(16 * 1024)
            .handshake(TokioIo::new(stream))
            .await?;
        tokio::spawn(connection);
        let mut streams = tokio::task::JoinSet::new();
        for _ in 0..count {
            let mut sender = sender.clone();
            let sink = sink.clone();
            let path = sse_path(Target::Sse, &topic);
            let uri = format!("http://{addr}{path}");
            streams.spawn(async move {
                let request = http::Request::get(uri)
                    .header("accept", "text/event-stream")
                    .body(Empty::<Bytes>::new())?;
                sender.ready().await?;
                let response = sender.send_request(request).await?;
                read_sse(response, Target::SseH2, &sink).await
            });
        }
        while let Some(done) = streams.join_next().await {
            done??;
        }
        anyhow::Ok(())
    }
}

async fn nats_subscriber(addr: SocketAddr, topic: &str, sink: &Sink) -> anyhow::Result<()> {
    let client = async_nats::connect(addr.to_string()).await?;
    let mut subscription = client.subscribe(topic.to_owned()).await?;
    // The server has processed SUB once it has answered the PING that flush sends.
    client.flush().await?;
    sink.mark_ready();
    while let Some(message) = subscription.next().await {
        sink.deliver(&message.payload);
    }
    Ok(())
}

/// The JetStream stream every JetStream run publishes to (file storage, one replica).
pub const JETSTREAM_STREAM: &str = "BENCH";

async fn jetstream(addr: SocketAddr) -> anyhow::Result<async_nats::jetstream::Context> {
    let client = async_nats::connect(addr.to_string()).await?;
    let context = async_nats::jetstream::new(client);
    context
        .get_or_create_stream(async_nats::jetstream::stream::Config {
            name: JETSTREAM_STREAM.into(),
            subjects: vec!["bench.>".into()],
            storage: async_nats::jetstream::stream::StorageType::File,
            ..Default::default()
        })
        .await?;
    Ok(context)
}

async fn jetstream_subscriber(addr: SocketAddr, topic: &str, sink: &Sink) -> anyhow::Result<()> {
    use async_nats::jetstream::consumer::{DeliverPolicy, push::OrderedConfig};
    let context = jetstream(addr).await?;
    let stream = context.get_stream(JETSTREAM_STREAM).await?;
    let consumer = stream
        .create_consumer(OrderedConfig {
            deliver_subject: context.client().new_inbox(),
            filter_subject: topic.to_owned(),
            deliver_policy: DeliverPolicy::New,
            ..Default::default()
        })
        .await?;
    let mut messages = consumer.messages().await?;
    // The consumer exists on the server once create_consumer has been answered.
    sink.mark_ready();
    while let Some(message) = messages.next().await {
        sink.deliver(&message?.payload);
    }
    Ok(())
}

fn mqtt_options(addr: SocketAddr) -> rumqttc::MqttOptions {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let id = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut options = rumqttc::MqttOptions::new(
        format!("bench-{}-{id}", std::process::id()),
        addr.ip().to_string(),
        addr.port(),
    );
    options.set_keep_alive(std::time::Duration::from_secs(60));
    options.set_max_packet_size(1 << 20, 1 << 20);
    options
}

async fn mqtt_subscriber(addr: SocketAddr, topic: &str, sink: &Sink) -> anyhow::Result<()> {
    use rumqttc::{Event, Packet, QoS};
    let (client, mut events) = rumqttc::AsyncClient::new(mqtt_options(addr), 16);
    client.subscribe(topic, QoS::AtMostOnce).await?;
    loop {
        match events.poll().await? {
            Event::Incoming(Packet::Publish(p)) => sink.deliver(&p.payload),
            Event::Incoming(Packet::SubAck(_)) => sink.mark_ready(),
            _ => {}
        }
    }
}

/// A publishing connection.
pub enum Publisher {
    Grpc(PubSubClient<Channel>),
    Seed(PubSubServiceClient<Channel>),
    Http {
        sender: http1::SendRequest<Full<Bytes>>,
        authority: String,
        target: Target,
    },
    Nats(async_nats::Client),
    Jetstream(async_nats::jetstream::Context),
    Mqtt {
        client: rumqttc::AsyncClient,
        acks: tokio::sync::mpsc::Receiver<anyhow::Result<()>>,
    },
    /// A share of one connection other publishers use too; always acknowledged.
    Shared(SharedPublisher),
}

impl Publisher {
    pub async fn connect(target: Target, addr: SocketAddr) -> anyhow::Result<Publisher> {
        Ok(match target {
            Target::Grpc
            | Target::GrpcDisk
            | Target::GrpcDiskEvery
            | Target::GrpcCluster
            | Target::TonicFloor
            | Target::H2Floor => {
                Publisher::Grpc(PubSubClient::new(endpoint(addr)?.connect().await?))
            }
            Target::Jetstream => Publisher::Jetstream(jetstream(addr).await?),
            Target::Seed | Target::SeedMux => {
                Publisher::Seed(PubSubServiceClient::new(endpoint(addr)?.connect().await?))
            }
            Target::GrpcMux => Publisher::Grpc(PubSubClient::new(endpoint(addr)?.connect().await?)),
            Target::Sse | Target::SseH2 | Target::Nchan | Target::Raw => {
                let (sender, connection) =
                    http1::handshake(TokioIo::new(connect(addr).await?)).await?;
                tokio::spawn(connection);
                Publisher::Http {
                    sender,
                    authority: addr.to_string(),
                    target,
                }
            }
            Target::Nats => Publisher::Nats(async_nats::connect(addr.to_string()).await?),
            Target::Mqtt => {
                let (client, mut events) = rumqttc::AsyncClient::new(mqtt_options(addr), 64);
                let (tx, acks) = tokio::sync::mpsc::channel(64);
                tokio::spawn(async move {
                    loop {
                        match events.poll().await {
                            Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_))) => {
                                if tx.send(Ok(())).await.is_err() {
                                    return;
                                }
                            }
                            Ok(_) => {}
                            Err(e) => {
                                let _ = tx.send(Err(e.into())).await;
                                return;
                            }
                        }
                    }
                });
                Publisher::Mqtt { client, acks }
            }
        })
    }

    /// Publishes one message. With `acked`, returns once the server has acknowledged it (gRPC
    /// and HTTP always wait for their response; NATS flushes, a PING round trip; MQTT uses
    /// QoS 1 and waits for PUBACK); without, NATS and MQTT (QoS 0) return once it is queued.
    pub async fn publish(
        &mut self,
        topic: &str,
        payload: Bytes,
        acked: bool,
    ) -> anyhow::Result<()> {
        match self {
            Publisher::Grpc(client) => {
                client
                    .publish(topichub::proto::v1::PublishRequest {
                        topic: topic.to_owned(),
                        payload,
                        ..Default::default()
                    })
                    .await?;
            }
            Publisher::Seed(client) => {
                client
                    .publish(topichub::proto::seed::PublishRequest {
                        topic: topic.to_owned(),
                        payload,
                    })
                    .await?;
            }
            Publisher::Http {
                sender,
                authority,
                target,
            } => {
                let path = match target {
                    Target::Nchan => format!("/pub?id={topic}"),
                    Target::Raw => "/pub".into(),
                    _ => format!("/topics/{topic}"),
                };
                let request = http::Request::post(path)
                    .header("host", authority.as_str())
                    .header("content-type", "text/plain")
                    .body(Full::new(payload))?;
                sender.ready().await?;
                let response = sender.send_request(request).await?;
                let status = response.status();
                let body = response.into_body().collect().await?.to_bytes();
                if !status.is_success() {
                    bail!(
                        "publish answered {status}: {}",
                        String::from_utf8_lossy(&body)
                    );
                }
            }
            Publisher::Nats(client) => {
                client.publish(topic.to_owned(), payload).await?;
                if acked {
                    client.flush().await?;
                }
            }
            Publisher::Jetstream(context) => {
                // Always acknowledged: a JetStream publish is only meaningful with its PubAck.
                context.publish(topic.to_owned(), payload).await?.await?;
            }
            Publisher::Mqtt { client, acks } => {
                let qos = if acked {
                    rumqttc::QoS::AtLeastOnce
                } else {
                    rumqttc::QoS::AtMostOnce
                };
                client.publish_bytes(topic, qos, false, payload).await?;
                if acked {
                    match acks.recv().await {
                        Some(result) => result?,
                        None => bail!("MQTT connection closed"),
                    }
                }
            }
            Publisher::Shared(shared) => shared.publish(topic, payload).await?,
        }
        Ok(())
    }
}

/// Publishers sharing one connection, each awaiting its own acknowledgement while the others'
/// publishes are in flight: a topichub `Connect` stream (request ids match acks to publishes)
/// or one async-nats client's JetStream context (PubAcks matched by inbox).
#[derive(Clone)]
pub enum SharedPublisher {
    Connect(ConnectStream),
    Jetstream(async_nats::jetstream::Context),
}

impl SharedPublisher {
    pub async fn connect(target: Target, addr: SocketAddr) -> anyhow::Result<SharedPublisher> {
        Ok(match target {
            Target::Jetstream => SharedPublisher::Jetstream(jetstream(addr).await?),
            Target::Grpc | Target::GrpcDisk | Target::GrpcDiskEvery | Target::GrpcCluster => {
                SharedPublisher::Connect(ConnectStream::open(addr).await?)
            }
            other => bail!("{} has no shared-connection publisher", other.name()),
        })
    }

    /// Publishes one message and returns once the server has acknowledged it.
    pub async fn publish(&self, topic: &str, payload: Bytes) -> anyhow::Result<()> {
        match self {
            SharedPublisher::Connect(stream) => stream.publish(topic, payload).await,
            SharedPublisher::Jetstream(context) => {
                context.publish(topic.to_owned(), payload).await?.await?;
                Ok(())
            }
        }
    }
}

/// Waiting publishes of a [`ConnectStream`], by request id.
type Waiting = std::sync::Mutex<
    std::collections::HashMap<u64, tokio::sync::oneshot::Sender<anyhow::Result<()>>>,
>;

/// One `topichub.v1.PubSub/Connect` stream used for publishing only.
#[derive(Clone)]
pub struct ConnectStream {
    requests: tokio::sync::mpsc::Sender<topichub::proto::v1::ConnectRequest>,
    waiting: Arc<Waiting>,
    next_id: Arc<std::sync::atomic::AtomicU64>,
}

impl ConnectStream {
    async fn open(addr: SocketAddr) -> anyhow::Result<ConnectStream> {
        use topichub::proto::v1::connect_response::Event;
        let mut client = PubSubClient::new(endpoint(addr)?.connect().await?);
        let (requests, mut rx) = tokio::sync::mpsc::channel(1024);
        let outgoing = futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx));
        let mut responses = client.connect(outgoing).await?.into_inner();
        let waiting = Arc::new(Waiting::default());
        let answers = waiting.clone();
        tokio::spawn(async move {
            // Ends with the stream; the waiting publishers' senders are dropped with `answers`.
            while let Ok(Some(response)) = responses.message().await {
                let outcome = match response.event {
                    Some(Event::Ack(_)) => Ok(()),
                    Some(Event::Error(e)) => Err(anyhow::anyhow!("{}: {}", e.code, e.message)),
                    _ => continue,
                };
                let waiter = answers.lock().unwrap().remove(&response.request_id);
                if let Some(waiter) = waiter {
                    let _ = waiter.send(outcome);
                }
            }
            answers.lock().unwrap().clear();
        });
        Ok(ConnectStream {
            requests,
            waiting,
            next_id: Arc::default(),
        })
    }

    async fn publish(&self, topic: &str, payload: Bytes) -> anyhow::Result<()> {
        use topichub::proto::v1::{ConnectRequest, PublishRequest, connect_request::Request};
        let id = self
            .next_id
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            + 1;
        let (answer, answered) = tokio::sync::oneshot::channel();
        self.waiting.lock().unwrap().insert(id, answer);
        self.requests
            .send(ConnectRequest {
                request_id: id,
                request: Some(Request::Publish(PublishRequest {
                    topic: topic.to_owned(),
                    payload,
                    ..Default::default()
                })),
            })
            .await
            .context("the Connect stream is closed")?;
        answered
            .await
            .context("the Connect stream ended before the ack")?
    }
}

//! Shared helpers for the integration tests: a real broker on `127.0.0.1:0`, and real clients
//! for every door (gRPC, gRPC-Web over HTTP/1.1, HTTP/JSON, SSE).
#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::Duration;

use futures_util::StreamExt;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::Streaming;
use tonic::transport::Channel;
use topichub::ServerConfig;
use topichub::proto::v1::{self, pub_sub_client::PubSubClient};
use tower::Layer as _;

/// Upper bound for anything a test waits for; a hang fails the test instead of stalling CI.
pub const WAIT: Duration = Duration::from_secs(10);

/// A broker running in this test's runtime.
pub struct Broker {
    pub addr: SocketAddr,
    pub shutdown: CancellationToken,
    task: JoinHandle<std::io::Result<()>>,
}

/// Starts a broker with default settings on `127.0.0.1:0`.
pub async fn spawn_broker() -> Broker {
    spawn_broker_with(|_| {}).await
}

/// Starts a broker on `127.0.0.1:0` after `configure` adjusts the defaults.
pub async fn spawn_broker_with(configure: impl FnOnce(&mut ServerConfig)) -> Broker {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().unwrap();
    let mut config = ServerConfig::new(addr);
    configure(&mut config);
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(topichub::run(listener, config, shutdown.clone()));
    Broker {
        addr,
        shutdown,
        task,
    }
}

impl Broker {
    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A gRPC client (HTTP/2, h2c).
    pub async fn grpc(&self) -> PubSubClient<Channel> {
        let channel = Channel::from_shared(self.url())
            .unwrap()
            .connect()
            .await
            .expect("gRPC connect");
        PubSubClient::new(channel)
    }

    /// A gRPC `Subscribe` stream on its own connection to `topics` (a topic or pattern each),
    /// with default options; its first event is `subscribed`.
    pub async fn grpc_subscribe(&self, topics: &[&str]) -> Streaming<v1::SubscribeResponse> {
        self.grpc()
            .await
            .subscribe(v1::SubscribeRequest {
                topics: topics.iter().map(|t| t.to_string()).collect(),
                ..Default::default()
            })
            .await
            .expect("gRPC subscribe")
            .into_inner()
    }

    /// A `Connect` stream, with `token` as its bearer token if given, that has subscribed to
    /// `pattern` and received `subscribed`: the sender of its requests, and its events.
    pub async fn connect_subscribed(
        &self,
        pattern: &str,
        token: Option<&str>,
    ) -> (
        tokio::sync::mpsc::Sender<v1::ConnectRequest>,
        Streaming<v1::ConnectResponse>,
    ) {
        let (requests, rx) = tokio::sync::mpsc::channel(4);
        let mut request = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
        if let Some(token) = token {
            let value = format!("Bearer {token}").parse().unwrap();
            request.metadata_mut().insert("authorization", value);
        }
        let mut events = self
            .grpc()
            .await
            .connect(request)
            .await
            .expect("gRPC connect stream")
            .into_inner();
        requests
            .send(v1::ConnectRequest {
                request_id: 1,
                request: Some(v1::connect_request::Request::Subscribe(
                    v1::SubscribeRequest {
                        topics: vec![pattern.into()],
                        ..Default::default()
                    },
                )),
            })
            .await
            .unwrap();
        let first = within("subscribed", events.next()).await.unwrap().unwrap();
        assert!(
            matches!(
                first.event,
                Some(v1::connect_response::Event::Subscribed(_))
            ),
            "{first:?}"
        );
        (requests, events)
    }

    /// A channel for other generated clients (seed, health, reflection).
    pub async fn channel(&self) -> Channel {
        Channel::from_shared(self.url())
            .unwrap()
            .connect()
            .await
            .expect("gRPC connect")
    }

    /// Triggers graceful shutdown and waits for `run` to return; returns how long it took.
    pub async fn stop(self) -> Duration {
        let started = std::time::Instant::now();
        self.shutdown.cancel();
        tokio::time::timeout(WAIT, self.task)
            .await
            .expect("broker stops within the bound")
            .expect("broker task")
            .expect("broker run");
        started.elapsed()
    }

    /// Waits until the hub reports `n` live subscribers (all doors), via `/healthz`.
    pub async fn wait_for_subscribers(&self, n: usize) {
        let http = reqwest::Client::new();
        let url = format!("{}/healthz", self.url());
        wait_for(&format!("{n} subscribers"), || {
            let http = http.clone();
            let url = url.clone();
            async move {
                let health: serde_json::Value =
                    http.get(&url).send().await.ok()?.json().await.ok()?;
                (health["subscribers"].as_u64()? == n as u64).then_some(())
            }
        })
        .await;
    }
}

/// Polls `check` (every 10 ms) until it yields `Some`, failing the test after [`WAIT`].
pub async fn wait_for<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Awaits `future`, failing the test after [`WAIT`].
pub async fn within<T>(what: &str, future: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(WAIT, future)
        .await
        .unwrap_or_else(|_| panic!("timed out: {what}"))
}

/// One parsed SSE event.
#[derive(Debug, Clone, Default)]
pub struct SseEvent {
    pub event: String,
    pub id: Option<String>,
    pub data: String,
}

impl SseEvent {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.data).expect("SSE data is JSON")
    }
}

/// A real SSE client over `reqwest`: parses the event stream as a browser would.
pub struct Sse {
    body: std::pin::Pin<Box<dyn futures_util::Stream<Item = reqwest::Result<bytes::Bytes>> + Send>>,
    buffer: String,
    pub comments: usize,
}

impl Sse {
    /// Opens `GET {url}{path_and_query}` with optional extra headers; panics unless 200.
    pub async fn open(url: &str, path_and_query: &str, headers: &[(&str, &str)]) -> Sse {
        Sse::open_with(&reqwest::Client::new(), url, path_and_query, headers).await
    }

    /// The next event (skipping keep-alive comments), or `None` when the stream ends.
    pub async fn next(&mut self) -> Option<SseEvent> {
        within("next SSE event", async {
            loop {
                while let Some(end) = self.buffer.find("\n\n") {
                    let block: String = self.buffer.drain(..end + 2).collect();
                    let mut event = SseEvent {
                        event: "message".into(),
                        ..Default::default()
                    };
                    let mut any_field = false;
                    for line in block.lines() {
                        if line.starts_with(':') {
                            self.comments += 1;
                            continue;
                        }
                        let (field, value) = line.split_once(": ").unwrap_or((line, ""));
                        any_field = true;
                        match field {
                            "event" => event.event = value.to_owned(),
                            "id" => event.id = Some(value.to_owned()),
                            "data" => event.data.push_str(value),
                            _ => {}
                        }
                    }
                    if any_field && !event.data.is_empty() {
                        return Some(event);
                    }
                }
                match self.body.next().await {
                    Some(Ok(chunk)) => self
                        .buffer
                        .push_str(std::str::from_utf8(&chunk).expect("UTF-8")),
                    Some(Err(_)) | None => return None,
                }
            }
        })
        .await
    }

    /// The next event, which must be of kind `kind`.
    pub async fn expect(&mut self, kind: &str) -> SseEvent {
        let event = self
            .next()
            .await
            .unwrap_or_else(|| panic!("stream ended, expected {kind}"));
        assert_eq!(event.event, kind, "unexpected event {event:?}");
        event
    }
}

/// A `topichub.v1` publish of `payload` to `topic`, without headers.
pub fn publish_request(topic: &str, payload: impl Into<Vec<u8>>) -> v1::PublishRequest {
    v1::PublishRequest {
        topic: topic.into(),
        payload: payload.into().into(),
        headers: Default::default(),
    }
}

/// Publishes JSON over HTTP; returns the response body.
pub async fn http_publish(url: &str, topic: &str, payload: &str) -> serde_json::Value {
    let response = reqwest::Client::new()
        .post(format!("{url}/publish"))
        .json(&serde_json::json!({ "topic": topic, "payload": payload }))
        .send()
        .await
        .expect("publish request");
    assert_eq!(response.status(), 200);
    response.json().await.unwrap()
}

/// The transport of [`grpc_web`]: tonic-web's client layer over an HTTP/1.1-only client.
pub type GrpcWebTransport = tonic_web::GrpcWebClientService<
    hyper_util::client::legacy::Client<
        hyper_util::client::legacy::connect::HttpConnector,
        tonic_web::GrpcWebCall<tonic::body::Body>,
    >,
>;

/// A `topichub.v1` client speaking gRPC-Web over HTTP/1.1, as a browser would.
pub fn grpc_web(broker: &Broker) -> PubSubClient<GrpcWebTransport> {
    let http1 = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http();
    let service = tonic_web::GrpcWebClientLayer::new().layer(http1);
    PubSubClient::with_origin(service, broker.url().parse().unwrap())
}

/// An SSE subscriber that reads nothing until the caller polls `body`: its socket has a small,
/// fixed receive buffer (loopback buffers otherwise grow to tens of MiB), so a flood fills the
/// path to it quickly and the broker's lag policy is what gets tested.
pub struct StuckSse {
    pub body: hyper::body::Incoming,
    /// Dropping the sender would close the connection.
    _sender: hyper::client::conn::http1::SendRequest<http_body_util::Empty<bytes::Bytes>>,
}

/// Opens `GET {path}` on `addr` as a [`StuckSse`]; panics unless the answer is 200.
pub async fn stuck_sse_subscriber(addr: SocketAddr, path: &str) -> StuckSse {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(8 * 1024).unwrap();
    let stream = socket.connect(addr).await.unwrap();
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(connection);
    let request = http::Request::get(path)
        .header("host", addr.to_string())
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.status(), 200);
    StuckSse {
        body: response.into_body(),
        _sender: sender,
    }
}

/// The value of one sample line, `name{labels} value`, or 0 when absent.
pub async fn metric(broker: &Broker, series: &str) -> f64 {
    let response = reqwest::get(format!("{}/metrics", broker.url()))
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain")
    );
    let text = response.text().await.unwrap();
    text.lines()
        .find_map(|line| {
            line.strip_prefix(series)
                .and_then(|rest| rest.strip_prefix(' '))
        })
        .map_or(0.0, |value| value.parse().unwrap())
}

/// A self-signed certificate for `localhost` and 127.0.0.1, written to a fresh directory.
pub fn certificate() -> (std::path::PathBuf, std::path::PathBuf, String) {
    let certified =
        rcgen::generate_simple_self_signed(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
            .unwrap();
    // Cargo's scratch directory for integration tests, inside target/: nothing is left in /tmp.
    let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!(
        "tls-{}-{}",
        std::process::id(),
        fastrand::u64(..)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let pem = certified.cert.pem();
    std::fs::write(dir.join("cert.pem"), &pem).unwrap();
    std::fs::write(dir.join("key.pem"), certified.signing_key.serialize_pem()).unwrap();
    (dir.join("cert.pem"), dir.join("key.pem"), pem)
}

/// A WebSocket over TLS (ALPN http/1.1, as browsers open them) to `path` at `addr`, trusting only
/// the certificate `pem` for `localhost`.
pub async fn wss_connect(
    addr: SocketAddr,
    pem: &str,
    path: &str,
) -> tokio_tungstenite::WebSocketStream<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    use base64::Engine as _;
    use tokio_rustls::rustls;
    let der: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    let der = base64::engine::general_purpose::STANDARD
        .decode(der)
        .unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(der.into()).unwrap();
    let mut config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
        .connect("localhost".try_into().unwrap(), tcp)
        .await
        .unwrap();
    let url = format!("wss://localhost:{}{path}", addr.port());
    within(
        "WebSocket upgrade over TLS",
        tokio_tungstenite::client_async(url, tls),
    )
    .await
    .expect("upgrade")
    .0
}

impl Sse {
    /// Opens `GET {url}{path_and_query}` as an SSE stream with `client` (e.g. one trusting a test
    /// certificate).
    pub async fn open_with(
        client: &reqwest::Client,
        url: &str,
        path_and_query: &str,
        headers: &[(&str, &str)],
    ) -> Sse {
        let mut request = client.get(format!("{url}{path_and_query}"));
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let response = request.send().await.expect("SSE request");
        assert_eq!(response.status(), 200, "SSE status for {path_and_query}");
        assert_eq!(response.headers()["content-type"], "text/event-stream");
        Sse {
            body: Box::pin(response.bytes_stream()),
            buffer: String::new(),
            comments: 0,
        }
    }
}

//! Shared helpers for the integration tests: a real broker on `127.0.0.1:0`, and real clients
//! for every door (gRPC, gRPC-Web over HTTP/1.1, HTTP/JSON, SSE).
#![allow(dead_code)]

/// Defines each named `async fn NAME(backend: Backend)` of the test file as two tests,
/// `memory::NAME` and `disk::NAME`: one test body, proven on each log backend.
#[allow(unused_macros)]
macro_rules! on_every_backend {
    ($($name:ident),* $(,)?) => {
        mod memory {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::Backend::Memory).await
                }
            )*
        }
        mod disk {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::Backend::Disk).await
                }
            )*
        }
    };
}

pub mod reference;

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
        grpc_client(self.url()).await
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

    /// A `Connect` stream on its own connection, with `token` as its bearer token if given: the
    /// sender of its requests, and its events.
    pub async fn connect_stream(
        &self,
        token: Option<&str>,
    ) -> (
        tokio::sync::mpsc::Sender<v1::ConnectRequest>,
        Streaming<v1::ConnectResponse>,
    ) {
        let (requests, rx) = tokio::sync::mpsc::channel(16);
        let mut request = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
        if let Some(token) = token {
            let value = format!("Bearer {token}").parse().unwrap();
            request.metadata_mut().insert("authorization", value);
        }
        let events = self
            .grpc()
            .await
            .connect(request)
            .await
            .expect("gRPC connect stream")
            .into_inner();
        (requests, events)
    }

    /// A [`Broker::connect_stream`] that has subscribed to `pattern` and received `subscribed`.
    pub async fn connect_subscribed(
        &self,
        pattern: &str,
        token: Option<&str>,
    ) -> (
        tokio::sync::mpsc::Sender<v1::ConnectRequest>,
        Streaming<v1::ConnectResponse>,
    ) {
        let (requests, mut events) = self.connect_stream(token).await;
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

    /// The hub's epoch, as `/healthz` reports it.
    pub async fn epoch(&self) -> String {
        let health = get_json(&format!("{}/healthz", self.url())).await;
        health["epoch"].as_str().expect("an epoch").to_owned()
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

/// `GET url` as JSON; panics unless it answers with JSON.
pub async fn get_json(url: &str) -> serde_json::Value {
    let response = reqwest::get(url).await.expect("GET");
    response.json().await.expect("a JSON answer")
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

/// A free loopback port (bound, then released for a broker process to take).
pub async fn free_port() -> SocketAddr {
    tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap()
}

/// `topichub serve` on `addr` as a child process with extra `flags`, killed when dropped; ready
/// once `/healthz` answers.
pub async fn start_broker_process(addr: SocketAddr, flags: &[&str]) -> tokio::process::Child {
    let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_topichub"))
        .args(["serve", "--listen", &addr.to_string()])
        .args(flags)
        .env("RUST_LOG", "warn")
        .kill_on_drop(true)
        .spawn()
        .expect("start topichub serve");
    let url = format!("http://{addr}/healthz");
    wait_for("the broker process to answer /healthz", || {
        let url = url.clone();
        async move { reqwest::get(&url).await.ok().map(|_| ()) }
    })
    .await;
    child
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

    /// The next `message` event, skipping `cluster` events (a node under load may briefly lose
    /// NATS, which its subscribers are told of); panics on any other event.
    pub async fn next_message(&mut self) -> SseEvent {
        loop {
            let event = self.next().await.expect("the stream goes on");
            match event.event.as_str() {
                "cluster" => continue,
                "message" => return event,
                _ => panic!("expected a message event: {event:?}"),
            }
        }
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
        ..Default::default()
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

/// Where a test broker keeps its history: the same tests run against each.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// In memory (no `--data-dir`).
    Memory,
    /// On disk, in a fresh data dir.
    Disk,
}

/// Starts a broker on `backend` after `configure` adjusts the defaults.
pub async fn spawn_broker_on(
    backend: Backend,
    configure: impl FnOnce(&mut ServerConfig),
) -> Broker {
    spawn_broker_with(|config| {
        if backend == Backend::Disk {
            config.data_dir = Some(fresh_data_dir("broker"));
        }
        configure(config);
    })
    .await
}

/// A new, empty directory for a data dir, under cargo's scratch directory for integration tests.
/// Directories left by test processes that have exited are removed on the way.
pub fn fresh_data_dir(name: &str) -> std::path::PathBuf {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let root = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("data-dirs");
    std::fs::create_dir_all(&root).unwrap();
    for entry in std::fs::read_dir(&root).unwrap().flatten() {
        let file_name = entry.file_name();
        let pid = file_name.to_str().and_then(|n| n.split('-').next());
        if pid.is_some_and(|pid| !std::path::Path::new("/proc").join(pid).exists()) {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let dir = root.join(format!("{}-{n}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

impl Broker {
    /// Whether `run` is still going (it returns once the drain has ended).
    pub fn is_running(&self) -> bool {
        !self.task.is_finished()
    }
}

/// `topichub serve` as a child process on a free loopback port, its log (stderr) written to a
/// file the test can read. Killed when dropped.
pub struct BrokerProcess {
    pub addr: SocketAddr,
    pub child: tokio::process::Child,
    pub log: std::path::PathBuf,
}

impl BrokerProcess {
    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A gRPC client (HTTP/2, h2c) on a connection of its own.
    pub async fn grpc(&self) -> PubSubClient<Channel> {
        grpc_client(self.url()).await
    }

    /// Starts the broker with `args` after `serve --listen ADDR` and `RUST_LOG=rust_log`; ready
    /// once it logs that it is listening.
    pub async fn start(args: &[&str], rust_log: &str) -> BrokerProcess {
        let addr = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap()
            .local_addr()
            .unwrap();
        let log = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!(
            "broker-{}-{}.log",
            std::process::id(),
            fastrand::u64(..)
        ));
        let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_topichub"))
            .args(["serve", "--listen", &addr.to_string()])
            .args(args)
            .env("RUST_LOG", rust_log)
            .stderr(std::fs::File::create(&log).unwrap())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let broker = BrokerProcess { addr, child, log };
        wait_for("the broker process to listen", || async {
            broker.log().contains("topichub listening").then_some(())
        })
        .await;
        broker
    }

    /// What the broker logged so far.
    pub fn log(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.log).unwrap_or_default()).into_owned()
    }

    /// Sends `signal` (`HUP`, `TERM`, ...) to the broker.
    pub fn signal(&self, signal: &str) {
        let pid = self.child.id().expect("running").to_string();
        let status = std::process::Command::new("kill")
            .args([&format!("-{signal}"), &pid])
            .status()
            .unwrap();
        assert!(status.success(), "kill -{signal} {pid}");
    }

    /// Stops the broker with SIGTERM and returns its whole log.
    pub async fn stop(mut self) -> String {
        self.signal("TERM");
        let status = within("the broker process to exit", self.child.wait())
            .await
            .unwrap();
        assert!(status.success(), "graceful exit: {status:?}");
        self.log()
    }
}

/// A fresh directory for one test's files, in Cargo's scratch space inside target/ (nothing is
/// left in /tmp).
pub fn scratch_dir(name: &str) -> std::path::PathBuf {
    let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!(
        "{name}-{}-{}",
        std::process::id(),
        fastrand::u64(..)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A throwaway self-signed server certificate for `localhost` and 127.0.0.1:
/// (certificate PEM, private key PEM).
pub fn self_signed_certificate() -> (String, String) {
    let certified =
        rcgen::generate_simple_self_signed(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
            .unwrap();
    (certified.cert.pem(), certified.signing_key.serialize_pem())
}

/// A `kB` field of `/proc/PID/status` (`VmRSS`, `VmHWM`), in bytes.
pub fn proc_status_bytes(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc/PID/status");
    let line = status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .unwrap_or_else(|| panic!("{field} missing from /proc/{pid}/status"));
    let kib: u64 = line
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .expect("a number of kB");
    kib * 1024
}

/// A throwaway server certificate (see [`self_signed_certificate`]) written to a fresh scratch
/// directory: (certificate file, key file, certificate PEM).
pub fn certificate() -> (std::path::PathBuf, std::path::PathBuf, String) {
    let (pem, key) = self_signed_certificate();
    let dir = scratch_dir("tls");
    std::fs::write(dir.join("cert.pem"), &pem).unwrap();
    std::fs::write(dir.join("key.pem"), key).unwrap();
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

/// `topichub sub` as a child process (killed when dropped), its stdout and stderr read line by
/// line.
pub struct CliSub {
    _child: tokio::process::Child,
    stdout: tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>,
    stderr: tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStderr>>,
}

impl CliSub {
    /// Starts `topichub sub --server SERVERS --max-backoff 200ms ARGS...` (info logs).
    pub async fn start(servers: &str, args: &[&str]) -> CliSub {
        use tokio::io::AsyncBufReadExt as _;
        let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_topichub"))
            .args(["sub", "--server", servers, "--max-backoff", "200ms"])
            .args(args)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        CliSub {
            stdout: tokio::io::BufReader::new(child.stdout.take().unwrap()).lines(),
            stderr: tokio::io::BufReader::new(child.stderr.take().unwrap()).lines(),
            _child: child,
        }
    }

    /// The next line it printed on stdout.
    pub async fn line(&mut self) -> String {
        within("sub to print a line", self.stdout.next_line())
            .await
            .unwrap()
            .expect("sub is running")
    }

    /// Reads stderr until a line containing `needle`; that line.
    pub async fn stderr_until(&mut self, needle: &str) -> String {
        self.stderr_through(needle).await.pop().expect("a line")
    }

    /// Reads stderr until a line containing `needle`; every line read, that one last.
    pub async fn stderr_through(&mut self, needle: &str) -> Vec<String> {
        within(&format!("sub to log {needle:?}"), async {
            let mut seen = Vec::new();
            loop {
                let line = self.stderr.next_line().await.unwrap().expect("running");
                let found = line.contains(needle);
                seen.push(line);
                if found {
                    return seen;
                }
            }
        })
        .await
    }
}

/// A WebSocket to a broker's `GET /ws`, over plain TCP.
pub type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Opens `ws://ADDR/ws`.
pub async fn ws_open(broker: &Broker) -> Ws {
    let url = format!("ws://{}/ws", broker.addr);
    within("WebSocket handshake", tokio_tungstenite::connect_async(url))
        .await
        .expect("upgrade")
        .0
}

/// Sends `frame` as a JSON text frame.
pub async fn ws_send(ws: &mut Ws, frame: serde_json::Value) {
    use futures_util::SinkExt as _;
    ws.send(tokio_tungstenite::tungstenite::Message::Text(
        frame.to_string().into(),
    ))
    .await
    .expect("send");
}

/// The next JSON text frame (pings and pongs skipped); panics if the socket ends.
pub async fn ws_recv(ws: &mut Ws) -> serde_json::Value {
    use tokio_tungstenite::tungstenite::Message;
    within("a WebSocket frame", async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Text(text))) => {
                    return serde_json::from_str(text.as_str()).expect("JSON frame");
                }
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                other => panic!("socket ended: {other:?}"),
            }
        }
    })
    .await
}

/// Sends a `subscribe` request with the fields `subscribe` and waits for its `subscribed` answer.
pub async fn ws_subscribe(ws: &mut Ws, request_id: u64, subscribe: serde_json::Value) {
    ws_send(
        ws,
        serde_json::json!({"request_id": request_id, "subscribe": subscribe}),
    )
    .await;
    let answer = ws_recv(ws).await;
    assert!(answer.get("subscribed").is_some(), "{answer}");
}

/// An HS256 token signed with `secret` whose claims are `claims` plus `exp` an hour from now.
pub fn hs256_token(secret: &str, mut claims: serde_json::Value) -> String {
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 3600;
    claims["exp"] = exp.into();
    jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

/// Debian's `nats-server` (installed by `scripts/deps-nats.sh`), for the cluster-mode tests.
pub const NATS_SERVER: &str = "/usr/sbin/nats-server";

/// How long three new servers get to form a JetStream cluster (they take about 0.3 s).
const CLUSTER_FORMS: Duration = Duration::from_secs(15);
/// How many times [`NatsCluster::start`] starts a cluster that does not form before failing.
const CLUSTER_ATTEMPTS: usize = 3;

/// One `nats-server -js` of a [`NatsCluster`]: its ports and store survive a kill, so it can be
/// restarted as the same server.
pub struct NatsNode {
    pub name: String,
    pub port: u16,
    pub route_port: u16,
    pub store: std::path::PathBuf,
    child: Option<std::process::Child>,
}

/// Real `nats-server` processes with JetStream on free loopback ports, clustered when there are
/// several (one JetStream cluster); SIGKILLed when dropped.
pub struct NatsCluster {
    pub nodes: Vec<NatsNode>,
    dir: std::path::PathBuf,
    /// Further `nats-server` arguments (authentication, TLS).
    extra: Vec<String>,
}

impl NatsCluster {
    /// Starts `size` servers (1, or 3 for a cluster) and waits until each accepts clients.
    pub async fn start(size: usize) -> NatsCluster {
        NatsCluster::start_with(size, &[]).await
    }

    /// [`NatsCluster::start`] with further `nats-server` arguments, e.g. `--auth TOKEN`.
    ///
    /// A cluster is returned only once JetStream can place a stream on all its servers: now and
    /// then three servers started together do not form a JetStream cluster (every stream
    /// request answers "no suitable peers for placement" for a long time). Such a cluster is
    /// dropped, its servers' logs printed, and new servers are started on new ports, up to
    /// [`CLUSTER_ATTEMPTS`] times, so that the tests exercise topichub, not that start-up race.
    pub async fn start_with(size: usize, extra: &[&str]) -> NatsCluster {
        assert!(
            std::path::Path::new(NATS_SERVER).exists(),
            "{NATS_SERVER} not found: run scripts/deps-nats.sh (installs Debian's nats-server)"
        );
        for attempt in 1..=CLUSTER_ATTEMPTS {
            let cluster = NatsCluster::spawn_all(size, extra).await;
            if size == 1 || cluster.places_streams_on_every_server().await {
                return cluster;
            }
            eprintln!(
                "attempt {attempt}: {size} nats-server did not form a JetStream cluster within \
                 {CLUSTER_FORMS:?}; their logs:\n{}",
                cluster.logs()
            );
        }
        panic!(
            "{size} nats-server did not form a JetStream cluster in {CLUSTER_ATTEMPTS} attempts"
        );
    }

    async fn spawn_all(size: usize, extra: &[&str]) -> NatsCluster {
        let dir = scratch_dir("nats");
        let mut nodes = Vec::new();
        for i in 0..size {
            nodes.push(NatsNode {
                name: format!("n{}", i + 1),
                port: free_port().await.port(),
                route_port: free_port().await.port(),
                store: dir.join(format!("n{}", i + 1)),
                child: None,
            });
        }
        let mut cluster = NatsCluster {
            nodes,
            dir,
            extra: extra.iter().map(|a| a.to_string()).collect(),
        };
        for i in 0..size {
            cluster.spawn(i);
        }
        for i in 0..size {
            cluster.wait_accepting(i).await;
        }
        cluster
    }

    /// Whether a memory stream with one replica per server can be created (and is deleted
    /// again) within [`CLUSTER_FORMS`].
    async fn places_streams_on_every_server(&self) -> bool {
        let Ok(client) = self.client().await else {
            return false;
        };
        let mut jetstream = async_nats::jetstream::new(client);
        // Requests sent before the servers have elected a JetStream leader go unanswered.
        jetstream.set_timeout(Duration::from_millis(500));
        let probe = async_nats::jetstream::stream::Config {
            name: "READY_PROBE".into(),
            subjects: vec!["ready-probe".into()],
            num_replicas: self.nodes.len(),
            storage: async_nats::jetstream::stream::StorageType::Memory,
            ..Default::default()
        };
        let placed = tokio::time::timeout(CLUSTER_FORMS, async {
            while jetstream.create_stream(probe.clone()).await.is_err() {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
        .await
        .is_ok();
        placed && jetstream.delete_stream("READY_PROBE").await.is_ok()
    }

    /// The last lines each server wrote to its log.
    fn logs(&self) -> String {
        let mut out = String::new();
        for node in &self.nodes {
            let log = std::fs::read_to_string(self.dir.join(format!("{}.log", node.name)))
                .unwrap_or_default();
            let lines: Vec<&str> = log.lines().collect();
            out.push_str(&format!(
                "--- {} (port {}, route port {})\n",
                node.name, node.port, node.route_port
            ));
            for line in &lines[lines.len().saturating_sub(40)..] {
                out.push_str(line);
                out.push('\n');
            }
        }
        out
    }

    fn spawn(&mut self, i: usize) {
        let routes: Vec<String> = self
            .nodes
            .iter()
            .enumerate()
            .filter(|(j, _)| *j != i)
            .map(|(_, n)| format!("nats://127.0.0.1:{}", n.route_port))
            .collect();
        let node = &self.nodes[i];
        let mut command = std::process::Command::new(NATS_SERVER);
        command
            .args(["-js", "-a", "127.0.0.1", "-n", &node.name])
            .args(["-p", &node.port.to_string()])
            .arg("-sd")
            .arg(&node.store)
            .args(&self.extra)
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(self.dir.join(format!("{}.log", node.name))).unwrap());
        if self.nodes.len() > 1 {
            command
                .args(["--cluster_name", "C"])
                .args([
                    "--cluster",
                    &format!("nats://127.0.0.1:{}", node.route_port),
                ])
                .args(["--routes", &routes.join(",")]);
        }
        let child = command.spawn().expect("start nats-server");
        self.nodes[i].child = Some(child);
    }

    async fn wait_accepting(&self, i: usize) {
        let port = self.nodes[i].port;
        wait_for("nats-server to accept clients", || async move {
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .ok()
                .map(|_| ())
        })
        .await;
    }

    /// A NATS client of these servers.
    async fn client(&self) -> Result<async_nats::Client, async_nats::ConnectError> {
        let urls: Vec<String> = self.urls().split(',').map(str::to_owned).collect();
        async_nats::connect(urls).await
    }

    /// `nats://127.0.0.1:P1,nats://127.0.0.1:P2,...`: the value of `--nats`.
    pub fn urls(&self) -> String {
        self.nodes
            .iter()
            .map(|n| format!("nats://127.0.0.1:{}", n.port))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// SIGKILLs server `i` (its store stays for a restart).
    pub fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.nodes[i].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts server `i` again with the same name, ports and store.
    pub async fn restart(&mut self, i: usize) {
        self.kill(i);
        self.spawn(i);
        self.wait_accepting(i).await;
    }

    /// Index of the server leading `stream`, asked through NATS itself.
    pub async fn stream_leader(&self, stream: &str) -> usize {
        let client = self.client().await.expect("connect to NATS");
        let jetstream = async_nats::jetstream::new(client);
        let leader = wait_for("the stream to have a leader", || {
            let jetstream = jetstream.clone();
            async move {
                let mut stream = jetstream.get_stream(stream).await.ok()?;
                stream.info().await.ok()?.cluster.clone()?.leader
            }
        })
        .await;
        self.nodes
            .iter()
            .position(|n| n.name == leader)
            .expect("the leader is one of ours")
    }
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("nats-server logs of the failed test:\n{}", self.logs());
        }
        for i in 0..self.nodes.len() {
            self.kill(i);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Waits (up to `bound`) until the broker at `addr` answers `/healthz` with 200.
pub async fn wait_serving(addr: SocketAddr, bound: Duration) {
    let url = format!("http://{addr}/healthz");
    tokio::time::timeout(bound, async {
        loop {
            if let Ok(response) = reqwest::get(&url).await
                && response.status() == 200
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{addr} not serving within {bound:?}"));
}

/// The HTTP routes over `hub` with default settings (no authentication, no limits), for
/// measurements that fill a hub directly and then time requests with `tower::ServiceExt`.
pub fn http_router(hub: &topichub::hub::Hub) -> axum::Router {
    topichub::http::router(topichub::http::AppState {
        hub: hub.clone(),
        auth: Default::default(),
        limits: topichub::limits::Limits::new(
            topichub::limits::LimitsConfig {
                max_connections: 0,
                max_subscriptions_per_connection: 0,
                publish_rate: 0,
                publish_burst: 0,
            },
            hub.metrics().clone(),
        ),
        http_body_timeout: Duration::from_secs(30),
        shutdown: Default::default(),
        sse_keepalive: Duration::from_secs(15),
    })
}

/// Calls `f` 20 times; the mean time per call, and what the last call returned (for the
/// ignored measurement tests).
pub fn time_per_call<T>(f: &dyn Fn() -> T) -> (Duration, T) {
    const RUNS: u32 = 20;
    let started = std::time::Instant::now();
    let mut last = f();
    for _ in 1..RUNS {
        last = f();
    }
    (started.elapsed() / RUNS, last)
}

/// Bound for a topichub node in cluster mode to serve after start: a cold NATS cluster elects
/// its JetStream leaders first.
pub const CLUSTER_START: Duration = Duration::from_secs(30);

/// A topichub node on the NATS servers `urls` (cluster mode), serving, with `extra` arguments.
pub async fn cluster_node(urls: &str, extra: &[&str]) -> BrokerProcess {
    // The stream's size limit must fit the servers' storage, whatever the machine's memory.
    let mut args = vec!["--nats", urls, "--max-retained-bytes", "67108864"];
    args.extend_from_slice(extra);
    let node = BrokerProcess::start(&args, "info,topichub::log::jetstream=debug").await;
    wait_serving(node.addr, CLUSTER_START).await;
    node
}

/// An HS256 token for `secret` that may publish and subscribe everywhere: an operator's with
/// the admin claim when `admin`, a worker's without.
pub fn operator_or_worker_token(secret: &str, admin: bool) -> String {
    let claims = serde_json::json!({
        "sub": if admin { "operator" } else { "worker" },
        "topichub": {"publish": [">"], "subscribe": [">"], "admin": admin},
    });
    hs256_token(secret, claims)
}

/// A gRPC client (HTTP/2, h2c) of the broker at `url`, on a connection of its own.
pub async fn grpc_client(url: String) -> PubSubClient<Channel> {
    let channel = Channel::from_shared(url)
        .unwrap()
        .connect()
        .await
        .expect("gRPC connect");
    PubSubClient::new(channel)
}

/// `DELETE {url}/topics/{topic}`, with a bearer `token` if given: the status and the JSON answer.
pub async fn delete_topic(url: &str, topic: &str, token: Option<&str>) -> (u16, serde_json::Value) {
    let mut request = reqwest::Client::new().delete(format!("{url}/topics/{topic}"));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await.expect("DELETE");
    let status = response.status().as_u16();
    (status, response.json().await.expect("a JSON answer"))
}

/// `POST {url}/topics/{topic}` of `payload` with the bearer `token`: the answer's status.
pub async fn publish_as(url: &str, topic: &str, payload: &str, token: &str) -> u16 {
    reqwest::Client::new()
        .post(format!("{url}/topics/{topic}"))
        .bearer_auth(token)
        .body(payload.to_owned())
        .send()
        .await
        .expect("POST /topics/{topic}")
        .status()
        .as_u16()
}

/// `message` as one gRPC length-prefixed message (uncompressed), as a raw HTTP/2 client sends it.
pub fn grpc_frame(message: &[u8]) -> Vec<u8> {
    let mut body = vec![0];
    body.extend_from_slice(&(message.len() as u32).to_be_bytes());
    body.extend_from_slice(message);
    body
}

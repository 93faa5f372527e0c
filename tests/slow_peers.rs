//! Slow or odd peers cannot hold resources: stalled gRPC and gRPC-Web request bodies end with
//! DEADLINE_EXCEEDED after `--http-body-timeout`, a `content-length` no publish could have is
//! refused at once, and HTTP/2 acknowledgements of nothing close the connection (over TLS too,
//! where keepalive enforcement now sends its GOAWAY as well) without flooding the log.

mod support;

use std::time::Duration;

use bytes::Bytes;
use support::{BrokerProcess, spawn_broker_with, within};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::net::TcpStream;

/// Short enough for a test, far longer than any request here needs to arrive.
const BODY_TIMEOUT: Duration = Duration::from_millis(500);

/// A gRPC message prefix announcing `length` bytes.
fn grpc_prefix(length: u32) -> Vec<u8> {
    let mut prefix = vec![0];
    prefix.extend_from_slice(&length.to_be_bytes());
    prefix
}

/// Reads until `done` says the bytes so far are the whole answer, or the peer closes.
async fn read_until(
    stream: &mut (impl AsyncRead + Unpin),
    what: &str,
    done: impl Fn(&[u8]) -> bool,
) -> Vec<u8> {
    let mut received = Vec::new();
    within(what, async {
        let mut chunk = [0u8; 4096];
        while !done(&received) {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => received.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await;
    received
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// A gRPC-Web Publish whose message announces 1000 bytes and sends 8 is answered with
/// DEADLINE_EXCEEDED after the body timeout, not held open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_grpc_web_body_ends_with_deadline_exceeded() {
    let broker = spawn_broker_with(|c| c.http_body_timeout = BODY_TIMEOUT).await;
    let mut socket = TcpStream::connect(broker.addr).await.unwrap();
    let mut request = b"POST /topichub.v1.PubSub/Publish HTTP/1.1\r\nhost: x\r\ncontent-type: application/grpc-web+proto\r\nx-grpc-web: 1\r\ncontent-length: 1005\r\n\r\n".to_vec();
    request.extend(grpc_prefix(1000));
    request.extend_from_slice(&[0; 3]);
    socket.write_all(&request).await.unwrap();
    let answer = read_until(&mut socket, "the gRPC-Web answer", |a| {
        contains(a, b"grpc-status")
    })
    .await;
    let answer = String::from_utf8_lossy(&answer).to_ascii_lowercase();
    assert!(
        answer.contains("grpc-status: 4") || answer.contains("grpc-status:4"),
        "DEADLINE_EXCEEDED: {answer}"
    );
    assert!(answer.contains("http-body-timeout"), "{answer}");
    broker.stop().await;
}

/// The same over gRPC (HTTP/2): a unary call whose message never completes, and a Subscribe
/// whose request never begins, end with DEADLINE_EXCEEDED.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_grpc_body_ends_with_deadline_exceeded() {
    let broker = spawn_broker_with(|c| c.http_body_timeout = BODY_TIMEOUT).await;
    let stream = TcpStream::connect(broker.addr).await.unwrap();
    let (mut sender, connection) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .unwrap();
    tokio::spawn(connection);
    let mut held = Vec::new();
    for (path, first_bytes) in [
        ("/topichub.v1.PubSub/Publish", {
            let mut partial = grpc_prefix(1000);
            partial.extend_from_slice(&[0; 3]);
            partial
        }),
        ("/topichub.v1.PubSub/Subscribe", Vec::new()),
        ("/proto.PubSubService/Publish", grpc_prefix(50)),
    ] {
        let (body_tx, body_rx) =
            tokio::sync::mpsc::channel::<Result<http_body::Frame<Bytes>, std::io::Error>>(1);
        if !first_bytes.is_empty() {
            body_tx
                .send(Ok(http_body::Frame::data(Bytes::from(first_bytes))))
                .await
                .unwrap();
        }
        // Kept open (never ended) for the whole test.
        held.push(body_tx);
        let body =
            http_body_util::StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(body_rx));
        let request = http::Request::post(format!("http://{}{path}", broker.addr))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(body)
            .unwrap();
        let response = within(path, sender.send_request(request)).await.unwrap();
        let status = match response.headers().get("grpc-status") {
            Some(status) => status.clone(),
            None => {
                use http_body_util::BodyExt as _;
                let collected = within(path, response.into_body().collect()).await.unwrap();
                collected.trailers().expect("trailers")["grpc-status"].clone()
            }
        };
        assert_eq!(status, "4", "{path}: DEADLINE_EXCEEDED");
    }
    broker.stop().await;
}

/// A publish announcing 10^19 bytes is answered 413 at once, on the raw-publish route (whose
/// HTTP/1.1 fast path hands it over) and on the JSON route, not after the body timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_content_length_is_refused_at_once() {
    let broker = spawn_broker_with(|c| c.http_body_timeout = Duration::from_secs(3600)).await;
    for path in ["/topics/t", "/publish"] {
        let mut socket = TcpStream::connect(broker.addr).await.unwrap();
        let request = format!(
            "POST {path} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 10000000000000000000\r\n\r\n{{"
        );
        socket.write_all(request.as_bytes()).await.unwrap();
        let answer = read_until(&mut socket, "the 413", |a| contains(a, b"\r\n\r\n")).await;
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.starts_with("HTTP/1.1 413 "), "{path}: {answer}");
    }
    broker.stop().await;
}

fn frame(kind: u8, flags: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = (payload.len() as u32).to_be_bytes()[1..].to_vec();
    out.extend_from_slice(&[kind, flags, 0, 0, 0, 0]);
    out.extend_from_slice(payload);
    out
}

/// Sends the HTTP/2 preface and `frames`, then reads until the connection closes; the GOAWAY's
/// error code and debug data, if one came.
async fn goaway_after(
    mut stream: impl AsyncRead + AsyncWrite + Unpin,
    frames: &[Vec<u8>],
) -> Option<(u32, Vec<u8>)> {
    let mut hello = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    hello.extend(frame(0x4, 0, &[])); // SETTINGS
    stream.write_all(&hello).await.unwrap();
    for frame in frames {
        if stream.write_all(frame).await.is_err() {
            break; // closed by the server meanwhile
        }
    }
    let received = read_until(&mut stream, "the connection to close", |_| false).await;
    let mut rest = &received[..];
    let mut goaway = None;
    while rest.len() >= 9 {
        let length = u32::from_be_bytes([0, rest[0], rest[1], rest[2]]) as usize;
        if rest.len() < 9 + length {
            break;
        }
        let (kind, payload) = (rest[3], &rest[9..9 + length]);
        if kind == 0x7 {
            let code = u32::from_be_bytes(payload[4..8].try_into().unwrap());
            goaway = Some((code, payload[8..].to_vec()));
        }
        rest = &rest[9 + length..];
    }
    goaway
}

/// A flood of PING ACKs the server never asked for closes the connection with
/// GOAWAY(ENHANCE_YOUR_CALM), and h2's warning per frame does not reach the log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsolicited_ping_acks_close_the_connection_and_stay_out_of_the_log() {
    let broker = BrokerProcess::start(&[], "info").await;
    let acks: Vec<Vec<u8>> = (0..10_000u32)
        .map(|i| frame(0x6, 0x1, &u64::from(i).to_be_bytes()))
        .collect();
    let stream = TcpStream::connect(broker.addr).await.unwrap();
    let goaway = goaway_after(stream, &acks).await;
    assert_eq!(
        goaway,
        Some((0xb, b"unsolicited_acks".to_vec())),
        "GOAWAY(ENHANCE_YOUR_CALM)"
    );
    // Others are still served.
    let health = reqwest::get(format!("http://{}/healthz", broker.addr))
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
    let log = broker.stop().await;
    assert!(
        log.lines().count() < 20,
        "the log stays short: {} lines",
        log.lines().count()
    );
}

/// Over TLS, keepalive enforcement and the ACK-flood rule send their GOAWAY before closing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_tls_the_goaway_is_sent_before_the_close() {
    use tokio_rustls::rustls::pki_types::pem::PemObject as _;
    use tokio_rustls::rustls::{self, pki_types::CertificateDer, pki_types::ServerName};
    let (pem, key) = support::self_signed_certificate();
    let dir = support::scratch_dir("slow-peers-tls");
    std::fs::write(dir.join("cert.pem"), &pem).unwrap();
    std::fs::write(dir.join("key.pem"), key).unwrap();
    let broker = spawn_broker_with(|c| {
        c.tls_cert = Some(dir.join("cert.pem"));
        c.tls_key = Some(dir.join("key.pem"));
    })
    .await;
    let mut roots = rustls::RootCertStore::empty();
    let der = CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
    roots.add(der).unwrap();
    let mut config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let connect = || async {
        let tcp = TcpStream::connect(broker.addr).await.unwrap();
        let name = ServerName::try_from("127.0.0.1").unwrap();
        connector.connect(name, tcp).await.unwrap()
    };
    let pings: Vec<Vec<u8>> = (0..4u8).map(|i| frame(0x6, 0, &[i; 8])).collect();
    assert_eq!(
        goaway_after(connect().await, &pings).await,
        Some((0xb, b"too_many_pings".to_vec()))
    );
    let acks: Vec<Vec<u8>> = (0..20u8).map(|i| frame(0x6, 0x1, &[i; 8])).collect();
    assert_eq!(
        goaway_after(connect().await, &acks).await,
        Some((0xb, b"unsolicited_acks".to_vec()))
    );
    broker.stop().await;
}

//! The deployment recipe `deploy/nginx.conf`, tested with Debian's nginx in front of a broker:
//! an SSE stream and its resume, a gRPC Subscribe (HTTP/2 by ALPN, grpc_pass) and a WebSocket
//! round trip, all through nginx's one TLS port.
//!
//! Needs `/usr/sbin/nginx` (Debian's `nginx` package, installed by `scripts/deps-nginx.sh`);
//! without it the test fails with that hint.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use support::{Sse, certificate, spawn_broker, wait_for, within};
use tokio_tungstenite::tungstenite::Message;
use tonic::transport::{Certificate, Channel, ClientTlsConfig};
use topichub::proto::v1::{self, pub_sub_client::PubSubClient, subscribe_response};

const NGINX: &str = "/usr/sbin/nginx";

/// nginx running `deploy/nginx.conf` with the test's addresses; stopped when dropped.
struct Nginx {
    child: Child,
    port: u16,
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // SIGTERM: the master stops its workers (SIGKILL would orphan them).
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
    }
}

/// Starts nginx in front of `upstream` with the recipe, on a free port of 127.0.0.1.
async fn nginx(upstream: std::net::SocketAddr, cert: &Path, key: &Path) -> Nginx {
    assert!(
        Path::new(NGINX).exists(),
        "{NGINX} not found: run scripts/deps-nginx.sh (installs Debian's nginx)"
    );
    let recipe = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/nginx.conf"))
        .expect("deploy/nginx.conf");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("nginx-{}-{port}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let replace = |text: String, from: &str, to: &str| {
        assert!(
            text.contains(from),
            "deploy/nginx.conf no longer contains {from:?}"
        );
        text.replace(from, to)
    };
    let config = replace(
        recipe,
        "server 127.0.0.1:8080;",
        &format!("server {upstream};"),
    );
    let config = replace(
        config,
        "listen 443 ssl http2;",
        &format!("listen 127.0.0.1:{port} ssl http2;"),
    );
    let config = replace(config, "/etc/topichub/tls/cert.pem", cert.to_str().unwrap());
    let config = replace(config, "/etc/topichub/tls/key.pem", key.to_str().unwrap());
    let file = dir.join("nginx.conf");
    std::fs::write(&file, config).unwrap();
    let globals = format!(
        "daemon off; master_process on; pid {}; error_log {} info;",
        dir.join("nginx.pid").display(),
        dir.join("error.log").display()
    );
    let child = Command::new(NGINX)
        .arg("-p")
        .arg(&dir)
        .arg("-c")
        .arg(&file)
        .args(["-g", &globals])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("run nginx");
    let nginx = Nginx { child, port };
    wait_for("nginx to listen", || async {
        tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .ok()
            .map(drop)
    })
    .await;
    nginx
}

/// The next JSON frame of a WebSocket (pings skipped).
async fn next_json<S>(ws: &mut tokio_tungstenite::WebSocketStream<S>) -> Value
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    within("a WebSocket frame", async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Text(text))) => {
                    return serde_json::from_str(text.as_str()).unwrap();
                }
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                other => panic!("socket ended: {other:?}"),
            }
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_door_and_resume_work_through_nginx() {
    let (cert, key, pem) = certificate();
    let broker = spawn_broker().await;
    let proxy = nginx(broker.addr, &cert, &key).await;
    let https = format!("https://localhost:{}", proxy.port);
    let http = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(pem.as_bytes()).unwrap())
        .resolve("localhost", ([127, 0, 0, 1], proxy.port).into())
        .build()
        .unwrap();

    // SSE, unbuffered: the first event arrives before anything else is sent.
    let mut sse = Sse::open_with(&http, &https, "/subscribe?topic=px.%3E", &[]).await;
    sse.expect("subscribed").await;
    // gRPC Subscribe over HTTP/2 through grpc_pass.
    let channel = Channel::from_shared(https.clone())
        .unwrap()
        .tls_config(
            ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(&pem))
                .domain_name("localhost"),
        )
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut grpc = PubSubClient::new(channel);
    let mut stream = grpc
        .subscribe(v1::SubscribeRequest {
            topics: vec!["px.>".into()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    within("gRPC subscribed", stream.next())
        .await
        .unwrap()
        .unwrap();
    // A WebSocket through the upgrade.
    let mut ws = support::wss_connect(([127, 0, 0, 1], proxy.port).into(), &pem, "/ws").await;
    ws.send(Message::Text(
        json!({"request_id": 1, "subscribe": {"topics": ["px.>"]}})
            .to_string()
            .into(),
    ))
    .await
    .unwrap();
    assert!(next_json(&mut ws).await.get("subscribed").is_some());
    broker.wait_for_subscribers(3).await;

    // One publish over HTTPS reaches all three.
    let published: Value = http
        .post(format!("{https}/publish"))
        .json(&json!({"topic": "px.one", "payload": "through nginx"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let event = sse.expect("message").await;
    assert_eq!(event.id.as_deref(), published["cursor"].as_str());
    let item = within("gRPC message", stream.next())
        .await
        .unwrap()
        .unwrap();
    let Some(subscribe_response::Event::Message(m)) = item.event else {
        panic!("{item:?}")
    };
    assert_eq!(&m.payload[..], b"through nginx");
    assert_eq!(
        next_json(&mut ws).await["message"]["cursor"],
        published["cursor"]
    );

    // The WebSocket publishes and is acked; gRPC gets it.
    ws.send(Message::Text(
        json!({"request_id": 2, "publish": {"topic": "px.two", "payload": "from ws"}})
            .to_string()
            .into(),
    ))
    .await
    .unwrap();
    let mut acked = false;
    for _ in 0..2 {
        acked |= next_json(&mut ws).await.get("ack").is_some();
    }
    assert!(acked, "the publish was acked");
    let item = within("gRPC message", stream.next())
        .await
        .unwrap()
        .unwrap();
    let Some(subscribe_response::Event::Message(m)) = item.event else {
        panic!("{item:?}")
    };
    assert_eq!(&m.payload[..], b"from ws");

    // Resume through nginx: Last-Event-ID passes, and replay starts right after it.
    let mut resumed = Sse::open_with(
        &http,
        &https,
        "/subscribe?topic=px.%3E",
        &[("Last-Event-ID", published["cursor"].as_str().unwrap())],
    )
    .await;
    resumed.expect("subscribed").await;
    assert_eq!(resumed.expect("message").await.json()["payload"], "from ws");
    drop(proxy);
    broker.stop().await;
}

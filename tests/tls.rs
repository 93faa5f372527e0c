//! TLS on the single port: gRPC (HTTP/2 by ALPN), HTTPS publish, SSE and the CLI, with a
//! throwaway self-signed certificate; a plain-text client is refused without harming others.

mod support;

use std::path::PathBuf;

use futures_util::StreamExt;
use support::{certificate, spawn_broker_with, within};
use tonic::transport::{Certificate, Channel, ClientTlsConfig};
use topichub::proto::v1::{
    PublishRequest, SubscribeRequest, pub_sub_client::PubSubClient, subscribe_response,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_door_works_over_tls_on_one_port() {
    let (cert, key, pem) = certificate();
    let broker = spawn_broker_with(|c| {
        c.tls_cert = Some(cert.clone());
        c.tls_key = Some(key.clone());
    })
    .await;
    let https = format!("https://localhost:{}", broker.addr.port());

    // gRPC over TLS (HTTP/2 negotiated by ALPN).
    let channel = Channel::from_shared(https.clone())
        .unwrap()
        .tls_config(ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&pem)))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut grpc = PubSubClient::new(channel);
    let mut stream = grpc
        .subscribe(SubscribeRequest {
            topics: vec!["tls.>".into()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    within("subscribed", stream.next()).await.unwrap().unwrap();

    // HTTPS publish and SSE (reqwest over rustls, trusting only our certificate).
    let http = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(pem.as_bytes()).unwrap())
        .build()
        .unwrap();
    let mut sse = http
        .get(format!("{https}/subscribe?topic=tls.%3E"))
        .send()
        .await
        .unwrap();
    assert_eq!(sse.status(), 200);
    let published: serde_json::Value = http
        .post(format!("{https}/publish"))
        .json(&serde_json::json!({"topic": "tls.http", "payload": "over https"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    grpc.publish(PublishRequest {
        topic: "tls.grpc".into(),
        payload: b"over grpc".to_vec().into(),
        ..Default::default()
    })
    .await
    .unwrap();

    let mut payloads = Vec::new();
    while payloads.len() < 2 {
        let item = within("grpc over tls", stream.next())
            .await
            .unwrap()
            .unwrap();
        if let Some(subscribe_response::Event::Message(m)) = item.event {
            payloads.push(String::from_utf8(m.payload.to_vec()).unwrap());
        }
    }
    assert_eq!(payloads, ["over https", "over grpc"]);
    let mut text = String::new();
    while !text.contains("over grpc") {
        let chunk = within("sse over tls", sse.chunk()).await.unwrap().unwrap();
        text.push_str(std::str::from_utf8(&chunk).unwrap());
    }
    assert!(text.contains(&format!("id: {}", published["cursor"].as_str().unwrap())));

    // A plain-text client gets nothing from a TLS port; the broker keeps serving.
    let plain = reqwest::get(format!("http://127.0.0.1:{}/healthz", broker.addr.port())).await;
    assert!(
        plain.is_err(),
        "plain HTTP must not be answered on a TLS port"
    );
    let health = http.get(format!("{https}/healthz")).send().await.unwrap();
    assert_eq!(health.status(), 200);

    // The CLI talks TLS with --ca-cert.
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_topichub"))
        .args(["pub", "--server", &https, "--ca-cert"])
        .arg(&cert)
        .args(["tls.cli", "from the cli"])
        .output()
        .await
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_topichub"))
        .args(["pub", "--server", &https, "tls.cli", "untrusted"])
        .output()
        .await
        .unwrap();
    assert!(
        !output.status.success(),
        "a certificate the CLI does not trust is refused"
    );
    broker.stop().await;
}

#[tokio::test]
async fn unreadable_certificates_stop_the_server_with_a_clear_error() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut config = topichub::ServerConfig::new(listener.local_addr().unwrap());
    config.tls_cert = Some(PathBuf::from("/nonexistent/cert.pem"));
    config.tls_key = Some(PathBuf::from("/nonexistent/key.pem"));
    let error = topichub::run(listener, config, Default::default())
        .await
        .unwrap_err();
    assert!(
        error
            .to_string()
            .contains("cannot read certificates from /nonexistent/cert.pem"),
        "{error}"
    );
}

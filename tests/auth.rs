//! Authentication and authorization on every door: gRPC, gRPC-Web, the seed service, REST, SSE
//! (header, query parameter, cookie) and the CLI; HS256, RS256 (PEM) and ES256 (JWKS) keys;
//! expiry during a stream; and the routes that stay open.

mod support;

use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use futures_util::StreamExt;
use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
use reqwest::StatusCode;
use support::{Broker, Sse, publish_request, spawn_broker_with, within};
use tonic::Code;
use tonic::metadata::MetadataValue;
use topichub::proto::seed;
use topichub::proto::v1::{self, PublishRequest, SubscribeRequest, subscribe_response};

const SECRET: &str = "tests-only secret, long enough for HS256 use";

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// An HS256 token allowing `publish` and `subscribe` patterns.
fn token(publish: &[&str], subscribe: &[&str]) -> String {
    let claims = serde_json::json!({
        "sub": "tester",
        "exp": now() + 3600,
        "topichub": {"publish": publish, "subscribe": subscribe},
    });
    encode(
        &Header::default(),
        &claims,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

async fn broker() -> Broker {
    spawn_broker_with(|c| c.jwt_secret = Some(SECRET.into())).await
}

fn with_token<T>(message: T, token: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    let value: MetadataValue<_> = format!("Bearer {token}").parse().unwrap();
    request.metadata_mut().insert("authorization", value);
    request
}

fn assert_code<T: std::fmt::Debug>(result: Result<T, tonic::Status>, code: Code, needle: &str) {
    let status = result.expect_err("must be refused");
    assert_eq!(status.code(), code, "{status:?}");
    assert!(
        status.message().contains(needle),
        "{:?} should mention {needle:?}",
        status.message()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_grpc_web_and_seed_require_a_token_that_allows_the_topic() {
    let broker = broker().await;
    let good = token(&["orders.>"], &["orders.*"]);
    let mut grpc = broker.grpc().await;

    // gRPC: none, wrong, expired, allowed, not allowed.
    assert_code(
        grpc.publish(publish_request("orders.a", "x")).await,
        Code::Unauthenticated,
        "token is required",
    );
    assert_code(
        grpc.publish(with_token(publish_request("orders.a", "x"), "nonsense"))
            .await,
        Code::Unauthenticated,
        "malformed token",
    );
    let expired = encode(
        &Header::default(),
        &serde_json::json!({"exp": now() - 3600, "topichub": {"publish": [">"]}}),
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap();
    assert_code(
        grpc.publish(with_token(publish_request("orders.a", "x"), &expired))
            .await,
        Code::Unauthenticated,
        "expired",
    );
    grpc.publish(with_token(publish_request("orders.a", "x"), &good))
        .await
        .unwrap();
    assert_code(
        grpc.publish(with_token(publish_request("logs.a", "x"), &good))
            .await,
        Code::PermissionDenied,
        "may not publish to \"logs.a\"",
    );

    let subscribe = |topics: &[&str]| SubscribeRequest {
        topics: topics.iter().map(|t| t.to_string()).collect(),
        ..Default::default()
    };
    assert_code(
        grpc.subscribe(subscribe(&["orders.a"])).await,
        Code::Unauthenticated,
        "token",
    );
    assert_code(
        grpc.subscribe(with_token(subscribe(&["orders.>"]), &good))
            .await,
        Code::PermissionDenied,
        "may not subscribe to \"orders.>\"",
    );
    let mut stream = grpc
        .subscribe(with_token(subscribe(&["orders.*"]), &good))
        .await
        .unwrap()
        .into_inner();
    within("subscribed", stream.next()).await.unwrap().unwrap();
    grpc.publish(with_token(publish_request("orders.b", "x"), &good))
        .await
        .unwrap();
    let event = within("message", stream.next()).await.unwrap().unwrap();
    assert!(
        matches!(event.event, Some(subscribe_response::Event::Message(m)) if m.topic == "orders.b")
    );

    // A batch is checked message by message.
    let batch = futures_util::stream::iter([
        publish_request("orders.c", "x"),
        publish_request("secret.x", "x"),
    ]);
    assert_code(
        grpc.publish_batch(with_token(batch, &good)).await,
        Code::PermissionDenied,
        "message #2",
    );

    // Listing shows only what the token may subscribe to.
    broker
        .grpc()
        .await
        .publish(with_token(
            publish_request("orders.z.deep", "x"),
            &token(&[">"], &[]),
        ))
        .await
        .unwrap();
    let listed = grpc
        .list_topics(with_token(v1::ListTopicsRequest::default(), &good))
        .await
        .unwrap()
        .into_inner();
    assert!(
        listed.topics.iter().all(|t| t.name.split('.').count() == 2),
        "{listed:?}"
    );
    assert!(listed.topics.iter().any(|t| t.name == "orders.a"));

    // gRPC-Web carries the same metadata.
    let mut web = support::grpc_web(&broker);
    assert_code(
        web.publish(publish_request("orders.a", "x")).await,
        Code::Unauthenticated,
        "token",
    );
    web.publish(with_token(publish_request("orders.a", "x"), &good))
        .await
        .unwrap();

    // The seed service too.
    let mut seed_client =
        seed::pub_sub_service_client::PubSubServiceClient::new(broker.channel().await);
    let seed_publish = |topic: &str| seed::PublishRequest {
        topic: topic.into(),
        payload: b"s".to_vec().into(),
    };
    assert_code(
        seed_client.publish(seed_publish("orders.a")).await,
        Code::Unauthenticated,
        "token",
    );
    seed_client
        .publish(with_token(seed_publish("orders.a"), &good))
        .await
        .unwrap();
    assert_code(
        seed_client
            .publish(with_token(seed_publish("logs.a"), &good))
            .await,
        Code::PermissionDenied,
        "logs.a",
    );
    assert_code(
        seed_client
            .subscribe(with_token(
                seed::SubscribeRequest {
                    topic: "logs.*".into(),
                },
                &good,
            ))
            .await,
        Code::PermissionDenied,
        "logs.*",
    );

    // Health and reflection stay open.
    let mut health = tonic_health::pb::health_client::HealthClient::new(broker.channel().await);
    health
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap();
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_checks_each_request_against_the_stream_token() {
    use v1::connect_request::Request as Req;
    use v1::connect_response::Event as Ev;
    let broker = broker().await;
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let requests = tokio_stream::wrappers::ReceiverStream::new(rx);
    assert_code(
        broker
            .grpc()
            .await
            .connect(tokio_stream::wrappers::ReceiverStream::new(
                tokio::sync::mpsc::channel(1).1,
            ))
            .await,
        Code::Unauthenticated,
        "token",
    );
    let mut events = broker
        .grpc()
        .await
        .connect(with_token(requests, &token(&["a.>"], &["a.>"])))
        .await
        .unwrap()
        .into_inner();
    tx.send(v1::ConnectRequest {
        request_id: 1,
        request: Some(Req::Publish(publish_request("b.x", "x"))),
    })
    .await
    .unwrap();
    let answer = within("answer", events.next()).await.unwrap().unwrap();
    assert!(
        matches!(answer.event, Some(Ev::Error(ref e)) if e.code == "PERMISSION_DENIED"),
        "{answer:?}"
    );
    tx.send(v1::ConnectRequest {
        request_id: 2,
        request: Some(Req::Publish(publish_request("a.x", "x"))),
    })
    .await
    .unwrap();
    let answer = within("answer", events.next()).await.unwrap().unwrap();
    assert!(matches!(answer.event, Some(Ev::Ack(_))), "{answer:?}");
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rest_and_sse_accept_header_query_and_cookie_tokens() {
    let broker = broker().await;
    let url = broker.url();
    let http = reqwest::Client::new();
    let good = token(&["web.>"], &["web.*"]);
    let body = serde_json::json!({"topic": "web.a", "payload": "hi"});

    let response = http
        .post(format!("{url}/publish"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(response.headers()["www-authenticate"], "Bearer");
    let error: serde_json::Value = response.json().await.unwrap();
    assert_eq!(error["error"]["code"], "UNAUTHENTICATED");
    let response = http
        .post(format!("{url}/publish"))
        .bearer_auth(&good)
        .json(&serde_json::json!({"topic": "other", "payload": "x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::FORBIDDEN);
    let error: serde_json::Value = response.json().await.unwrap();
    assert_eq!(error["error"]["code"], "PERMISSION_DENIED");
    let response = http
        .post(format!("{url}/topics/other"))
        .bearer_auth(&good)
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::FORBIDDEN);
    // A new connection that opens with a raw publish and no token is refused too.
    let response = reqwest::Client::new()
        .post(format!("{url}/topics/web.a"))
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);

    // SSE: header, query parameter (EventSource) and cookie all work; a pattern the token does
    // not cover is refused before the stream starts.
    let mut by_header = Sse::open(
        &url,
        "/subscribe?topic=web.*",
        &[("authorization", &format!("Bearer {good}"))],
    )
    .await;
    let mut by_query = Sse::open(
        &url,
        &format!("/subscribe?topic=web.*&access_token={good}"),
        &[],
    )
    .await;
    let mut by_cookie = Sse::open(
        &url,
        "/subscribe?topic=web.*",
        &[("cookie", &format!("theme=dark; access_token={good}"))],
    )
    .await;
    for sse in [&mut by_header, &mut by_query, &mut by_cookie] {
        sse.expect("subscribed").await;
    }
    let refused = http
        .get(format!("{url}/subscribe?topic=web.%3E&access_token={good}"))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), StatusCode::FORBIDDEN);
    let refused = http
        .get(format!("{url}/subscribe?topic=web.a"))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), StatusCode::UNAUTHORIZED);

    let response = http
        .post(format!("{url}/publish"))
        .bearer_auth(&good)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    for sse in [&mut by_header, &mut by_query, &mut by_cookie] {
        assert_eq!(sse.expect("message").await.json()["payload"], "hi");
    }

    // History and listings follow the subscribe grants.
    let history = http
        .get(format!("{url}/topics/secret/messages"))
        .bearer_auth(&good)
        .send()
        .await
        .unwrap();
    assert_eq!(history.status(), StatusCode::FORBIDDEN);
    let history = http
        .get(format!("{url}/topics/web.a/messages?access_token={good}"))
        .send()
        .await
        .unwrap();
    assert_eq!(history.status(), StatusCode::OK);

    // Open routes.
    for path in ["/healthz", "/openapi.json", "/swagger-ui/", "/"] {
        assert_eq!(
            http.get(format!("{url}{path}"))
                .send()
                .await
                .unwrap()
                .status(),
            StatusCode::OK,
            "{path}"
        );
    }
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_ends_when_its_token_expires() {
    let broker = broker().await;
    // Past its `exp` by 3 s but inside the 5 s leeway: accepted, and it expires in 1 to 2 s
    // (`now()` is in whole seconds), time enough to open the three streams below first.
    let claims = serde_json::json!({"exp": now() - 3, "topichub": {"subscribe": [">"]}});
    let short = encode(
        &Header::default(),
        &claims,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap();
    let mut stream = broker
        .grpc()
        .await
        .subscribe(with_token(
            SubscribeRequest {
                topics: vec!["t".into()],
                ..Default::default()
            },
            &short,
        ))
        .await
        .unwrap()
        .into_inner();
    // A Connect stream with the same token, which the client half-closes (it sends nothing more).
    let (requests, mut connect) = broker.connect_subscribed("t", Some(&short)).await;
    drop(requests);
    // And a PublishBatch stream with the same token that sends nothing.
    let (messages, rx) = tokio::sync::mpsc::channel::<PublishRequest>(1);
    let mut client = broker.grpc().await;
    let requests = with_token(tokio_stream::wrappers::ReceiverStream::new(rx), &short);
    let batch = tokio::spawn(async move { client.publish_batch(requests).await });

    within("subscribed", stream.next()).await.unwrap().unwrap();
    let end = within("expiry", stream.next()).await.unwrap().unwrap_err();
    assert_eq!(end.code(), Code::Unauthenticated);
    assert!(end.message().contains("expired"), "{end:?}");
    // The half-closed Connect stream ends too.
    let end = within("expiry", connect.next()).await.unwrap().unwrap_err();
    assert_eq!(end.code(), Code::Unauthenticated);
    assert!(end.message().contains("expired"), "{end:?}");
    let end = within("expiry", batch).await.unwrap().unwrap_err();
    assert_eq!(end.code(), Code::Unauthenticated);
    assert!(
        end.message()
            .contains("the batch ended before message #1: unauthenticated: the token has expired"),
        "{end:?}"
    );
    drop(messages);

    let mut sse = Sse::open(
        &broker.url(),
        &format!("/subscribe?topic=t&access_token={short}"),
        &[],
    )
    .await;
    sse.expect("subscribed").await;
    assert_eq!(
        sse.expect("end").await.json()["error"]["code"],
        "UNAUTHENTICATED"
    );
    broker.stop().await;
}

fn key(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/keys")
        .join(name)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rs256_public_keys_and_es256_jwks_verify_tokens() {
    let claims = serde_json::json!({"exp": now() + 600, "topichub": {"publish": ["k.>"]}});

    let rsa = spawn_broker_with(|c| c.jwt_public_key = Some(key("rsa-public.pem"))).await;
    let signing =
        EncodingKey::from_rsa_pem(&std::fs::read(key("rsa-private.pem")).unwrap()).unwrap();
    let good = encode(&Header::new(Algorithm::RS256), &claims, &signing).unwrap();
    rsa.grpc()
        .await
        .publish(with_token(publish_request("k.rsa", "x"), &good))
        .await
        .unwrap();
    // An HS256 token signed with the public key text must not pass (algorithm confusion).
    let confused = encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(&std::fs::read(key("rsa-public.pem")).unwrap()),
    )
    .unwrap();
    assert_code(
        rsa.grpc()
            .await
            .publish(with_token(publish_request("k.rsa", "x"), &confused))
            .await,
        Code::Unauthenticated,
        "algorithm",
    );
    rsa.stop().await;

    let ec = spawn_broker_with(|c| c.jwks = Some(key("jwks.json"))).await;
    let signing = EncodingKey::from_ec_pem(&std::fs::read(key("ec-private.pem")).unwrap()).unwrap();
    let mut header = Header::new(Algorithm::ES256);
    header.kid = Some("test-ec".into());
    let good = encode(&header, &claims, &signing).unwrap();
    ec.grpc()
        .await
        .publish(with_token(publish_request("k.ec", "x"), &good))
        .await
        .unwrap();
    header.kid = Some("unknown".into());
    let wrong_kid = encode(&header, &claims, &signing).unwrap();
    assert_code(
        ec.grpc()
            .await
            .publish(with_token(publish_request("k.ec", "x"), &wrong_kid))
            .await,
        Code::Unauthenticated,
        "key id",
    );
    ec.stop().await;
}

#[tokio::test]
async fn a_bad_key_configuration_stops_the_server_with_a_clear_error() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut config = topichub::ServerConfig::new(listener.local_addr().unwrap());
    config.jwt_public_key = Some(key("README.md"));
    let error = topichub::run(listener, config, Default::default())
        .await
        .unwrap_err();
    assert!(
        error.to_string().contains("not an RSA or EC public key"),
        "{error}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_sends_its_token() {
    let broker = broker().await;
    let server = broker.url();
    let bin = env!("CARGO_BIN_EXE_topichub");
    let output = tokio::process::Command::new(bin)
        .args(["pub", "--server", &server, "cli.t", "x"])
        .output()
        .await
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("token is required"));
    let output = tokio::process::Command::new(bin)
        .args(["pub", "--server", &server, "cli.t", "x"])
        .env("TOPICHUB_TOKEN", token(&["cli.*"], &[]))
        .output()
        .await
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    broker.stop().await;
}

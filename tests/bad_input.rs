//! Bad input gets a precise error and hurts nobody: every case here runs while a subscriber is
//! live, and that subscriber afterwards receives the next good message with nothing in between.

mod support;

use reqwest::StatusCode;
use support::{Broker, Sse, spawn_broker_with};
use tonic::Code;
use topichub::proto::v1::{self, PublishRequest, SubscribeRequest, UnsubscribeRequest};

const LIMIT: usize = 1024;

async fn broker() -> Broker {
    spawn_broker_with(|c| c.max_payload_bytes = LIMIT).await
}

/// Asserts an HTTP error response: status, JSON `{"error": {"code", "message"}}`, and that the
/// message mentions `needle`.
async fn assert_http_error(
    response: reqwest::Response,
    status: StatusCode,
    code: &str,
    needle: &str,
) {
    assert_eq!(response.status(), status);
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/json")
    );
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], code, "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains(needle),
        "{message:?} should mention {needle:?}"
    );
}

fn assert_status(result: Result<impl std::fmt::Debug, tonic::Status>, code: Code, needle: &str) {
    let status = result.expect_err("the call must fail");
    assert_eq!(status.code(), code, "{status:?}");
    assert!(
        status.message().contains(needle),
        "{:?} should mention {needle:?}",
        status.message()
    );
}

/// A subscriber that must see exactly the good message published after the bad inputs.
async fn witness(broker: &Broker) -> Sse {
    let mut sse = Sse::open(&broker.url(), "/subscribe?topic=good", &[]).await;
    sse.expect("subscribed").await;
    sse
}

async fn assert_witness_unharmed(broker: &Broker, mut sse: Sse) {
    support::http_publish(&broker.url(), "good", "still serving").await;
    let event = sse.expect("message").await;
    assert_eq!(event.json()["payload"], "still serving");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_bad_input_gets_precise_json_errors() {
    let broker = broker().await;
    let sse = witness(&broker).await;
    let url = broker.url();
    let http = reqwest::Client::new();
    let publish = |body: serde_json::Value| http.post(format!("{url}/publish")).json(&body).send();

    let cases = [
        (
            serde_json::json!({"topic": "a..b", "payload": "x"}),
            StatusCode::BAD_REQUEST,
            "INVALID_ARGUMENT",
            "empty token",
        ),
        (
            serde_json::json!({"topic": "a b", "payload": "x"}),
            StatusCode::BAD_REQUEST,
            "INVALID_ARGUMENT",
            "not allowed",
        ),
        (
            serde_json::json!({"topic": "", "payload": "x"}),
            StatusCode::BAD_REQUEST,
            "INVALID_ARGUMENT",
            "must not be empty",
        ),
        (
            serde_json::json!({"topic": "x".repeat(300), "payload": "x"}),
            StatusCode::BAD_REQUEST,
            "INVALID_ARGUMENT",
            "at most 255",
        ),
        (
            serde_json::json!({"topic": "a.*", "payload": "x"}),
            StatusCode::BAD_REQUEST,
            "INVALID_ARGUMENT",
            "wildcards",
        ),
        (
            serde_json::json!({"topic": "a.>", "payload": "x"}),
            StatusCode::BAD_REQUEST,
            "INVALID_ARGUMENT",
            "wildcards",
        ),
        (
            serde_json::json!({"topic": "a", "payload": "x".repeat(LIMIT + 1)}),
            StatusCode::PAYLOAD_TOO_LARGE,
            "RESOURCE_EXHAUSTED",
            "over the limit of 1024",
        ),
        (
            serde_json::json!({"topic": "a", "payload": "x", "payload_base64": "eA=="}),
            StatusCode::BAD_REQUEST,
            "INVALID_ARGUMENT",
            "not both",
        ),
        (
            serde_json::json!({"topic": "a", "payload_base64": "not base64!"}),
            StatusCode::BAD_REQUEST,
            "INVALID_ARGUMENT",
            "base64",
        ),
        (
            serde_json::json!({"topic": "a", "paylod": "typo"}),
            StatusCode::BAD_REQUEST,
            "INVALID_ARGUMENT",
            "unknown field `paylod`",
        ),
        (
            serde_json::json!({"payload": "no topic"}),
            StatusCode::BAD_REQUEST,
            "INVALID_ARGUMENT",
            "missing field `topic`",
        ),
    ];
    for (body, status, code, needle) in cases {
        assert_http_error(publish(body).await.unwrap(), status, code, needle).await;
    }

    // Not an object (serde alone would take the fields as a positional array).
    let response = http
        .post(format!("{url}/publish"))
        .body(r#"["a", "positional", null]"#)
        .send()
        .await
        .unwrap();
    assert_http_error(
        response,
        StatusCode::BAD_REQUEST,
        "INVALID_ARGUMENT",
        "must be a JSON object",
    )
    .await;
    // Malformed JSON.
    let response = http
        .post(format!("{url}/publish"))
        .body("{\"topic\": ")
        .send()
        .await
        .unwrap();
    assert_http_error(
        response,
        StatusCode::BAD_REQUEST,
        "INVALID_ARGUMENT",
        "malformed JSON",
    )
    .await;
    // Raw publish: over the limit (checked by the hub) and far over it (by the body limit).
    let response = http
        .post(format!("{url}/topics/a"))
        .body(vec![b'x'; LIMIT + 1])
        .send()
        .await
        .unwrap();
    assert_http_error(
        response,
        StatusCode::PAYLOAD_TOO_LARGE,
        "RESOURCE_EXHAUSTED",
        "1025 bytes",
    )
    .await;
    let response = http
        .post(format!("{url}/topics/a"))
        .body(vec![b'x'; 1 << 20])
        .send()
        .await
        .unwrap();
    assert_eq!(
        response.headers()["connection"],
        "close",
        "the unread body makes the connection unusable"
    );
    assert_http_error(
        response,
        StatusCode::PAYLOAD_TOO_LARGE,
        "RESOURCE_EXHAUSTED",
        "limited to 1024",
    )
    .await;
    let response = http
        .post(format!("{url}/topics/a.*"))
        .body("x")
        .send()
        .await
        .unwrap();
    assert_http_error(
        response,
        StatusCode::BAD_REQUEST,
        "INVALID_ARGUMENT",
        "wildcards",
    )
    .await;
    // Subscribe and history parameters.
    for (path, needle) in [
        ("/subscribe", "at least one topic"),
        ("/subscribe?topic=a..b", "empty token"),
        ("/subscribe?topic=a.%3E.b", "last token"),
        ("/subscribe?topics=a", "unknown query parameter"),
        ("/subscribe?topic=a&from=yesterday", "from must be"),
        (
            "/subscribe?topic=a&last_event_id=nonsense",
            "invalid cursor",
        ),
        ("/subscribe?topic=a&lag_policy=drop", "lag_policy"),
        ("/subscribe?topic=a&queue_size=many", "queue_size"),
        (
            "/subscribe?topic=a&queue_size=100000000",
            "over the server maximum",
        ),
        ("/topics?pattern=a..b", "empty token"),
        ("/topics/a/messages?limit=0", "limit must be"),
        ("/topics/a/messages?after=x-y", "invalid cursor"),
    ] {
        let response = http.get(format!("{url}{path}")).send().await.unwrap();
        assert_http_error(
            response,
            StatusCode::BAD_REQUEST,
            "INVALID_ARGUMENT",
            needle,
        )
        .await;
    }
    // A cursor of this epoch but ahead of the hub is an error, never a hang.
    let epoch = http
        .get(format!("{url}/healthz"))
        .send()
        .await
        .unwrap()
        .json::<serde_json::Value>()
        .await
        .unwrap()["epoch"]
        .as_str()
        .unwrap()
        .to_owned();
    let response = http
        .get(format!("{url}/subscribe?topic=a&last_event_id={epoch}-999"))
        .send()
        .await
        .unwrap();
    assert_http_error(
        response,
        StatusCode::BAD_REQUEST,
        "INVALID_ARGUMENT",
        "ahead of this hub",
    )
    .await;
    let response = http
        .get(format!("{url}/subscribe?topic=a"))
        .header("Last-Event-ID", format!("{epoch}-999"))
        .send()
        .await
        .unwrap();
    assert_http_error(
        response,
        StatusCode::BAD_REQUEST,
        "INVALID_ARGUMENT",
        "ahead of this hub",
    )
    .await;
    // Unknown routes and methods.
    let response = http
        .get(format!("{url}/no/such/route"))
        .send()
        .await
        .unwrap();
    assert_http_error(
        response,
        StatusCode::NOT_FOUND,
        "NOT_FOUND",
        "no such route",
    )
    .await;
    let response = http.get(format!("{url}/publish")).send().await.unwrap();
    assert_http_error(
        response,
        StatusCode::METHOD_NOT_ALLOWED,
        "UNIMPLEMENTED",
        "method not allowed",
    )
    .await;

    assert_witness_unharmed(&broker, sse).await;
    broker.stop().await;
}

/// A message whose field 1 is a varint where `topic` (a string) is expected: valid protobuf
/// framing, wrong types.
#[derive(Clone, PartialEq, prost::Message)]
struct Malformed {
    #[prost(uint64, tag = "1")]
    topic: u64,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_bad_input_gets_precise_statuses() {
    let broker = broker().await;
    let sse = witness(&broker).await;
    let mut client = broker.grpc().await;
    let publish = |topic: &str, size: usize| PublishRequest {
        topic: topic.into(),
        payload: vec![b'x'; size].into(),
        headers: Default::default(),
    };

    assert_status(
        client.publish(publish("a..b", 1)).await,
        Code::InvalidArgument,
        "empty token",
    );
    assert_status(
        client.publish(publish("a.*", 1)).await,
        Code::InvalidArgument,
        "wildcards",
    );
    assert_status(
        client.publish(publish("a", LIMIT + 1)).await,
        Code::ResourceExhausted,
        "over the limit of 1024",
    );
    assert_status(
        client.subscribe(SubscribeRequest::default()).await,
        Code::InvalidArgument,
        "at least one topic",
    );
    assert_status(
        client
            .subscribe(SubscribeRequest {
                topics: vec!["a.>.b".into()],
                ..Default::default()
            })
            .await,
        Code::InvalidArgument,
        "last token",
    );
    assert_status(
        client
            .subscribe(SubscribeRequest {
                topics: vec!["a".into()],
                lag_policy: 7,
                ..Default::default()
            })
            .await,
        Code::InvalidArgument,
        "lag_policy",
    );
    let ahead = v1::StartPosition {
        position: Some(v1::start_position::Position::After(v1::Cursor {
            epoch: broker_epoch(&broker).await,
            seq: 1_000,
        })),
    };
    assert_status(
        client
            .subscribe(SubscribeRequest {
                topics: vec!["a".into()],
                start: Some(ahead),
                ..Default::default()
            })
            .await,
        Code::InvalidArgument,
        "ahead of this hub",
    );
    assert_status(
        client
            .unsubscribe(UnsubscribeRequest {
                subscription_id: "sub-nope-1".into(),
            })
            .await,
        Code::NotFound,
        "no subscription",
    );
    // A batch stops at its first bad message and says how many went through before it.
    let batch = futures_util::stream::iter([
        publish("good.batch", 1),
        publish("bad topic", 1),
        publish("good.batch", 1),
    ]);
    let rejected = client.publish_batch(batch).await.map(|r| r.into_inner());
    assert_status(
        rejected.clone(),
        Code::InvalidArgument,
        "message #2 of the batch was rejected: invalid topic",
    );
    assert_status(
        rejected,
        Code::InvalidArgument,
        "the 1 message before it was published",
    );

    // Malformed protobuf and unknown methods, with a raw gRPC client.
    let mut raw = tonic::client::Grpc::new(broker.channel().await);
    for (path, code, needle) in [
        (
            "/topichub.v1.PubSub/Publish",
            Code::InvalidArgument,
            "malformed protobuf",
        ),
        ("/topichub.v1.PubSub/NoSuchMethod", Code::Unimplemented, ""),
        ("/no.Such/Service", Code::Unimplemented, "unknown service"),
    ] {
        raw.ready().await.unwrap();
        let result = raw
            .unary::<Malformed, v1::PublishResponse, _>(
                tonic::Request::new(Malformed { topic: 7 }),
                http::uri::PathAndQuery::from_static(path),
                tonic_prost::ProstCodec::default(),
            )
            .await;
        assert_status(result, code, needle);
    }

    assert_witness_unharmed(&broker, sse).await;
    broker.stop().await;
}

async fn broker_epoch(broker: &Broker) -> String {
    let health: serde_json::Value = reqwest::get(format!("{}/healthz", broker.url()))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    health["epoch"].as_str().unwrap().to_owned()
}

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
    assert_eq!(
        response.status(),
        status,
        "the answer that should mention {needle:?}"
    );
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

/// What an HTTP case sends: a GET, or a POST of JSON or of raw bytes.
enum Input {
    Get,
    Json(serde_json::Value),
    Raw(Vec<u8>),
}

/// An HTTP request and the error it must get.
struct HttpCase {
    path: String,
    input: Input,
    headers: Vec<(&'static str, String)>,
    status: StatusCode,
    code: &'static str,
    needle: &'static str,
    /// Whether the answer must close the connection.
    closes: bool,
}

/// A 400 INVALID_ARGUMENT case mentioning `needle`.
fn invalid(path: impl Into<String>, input: Input, needle: &'static str) -> HttpCase {
    HttpCase {
        path: path.into(),
        input,
        headers: Vec::new(),
        status: StatusCode::BAD_REQUEST,
        code: "INVALID_ARGUMENT",
        needle,
        closes: false,
    }
}

fn too_large(path: &str, input: Input, needle: &'static str) -> HttpCase {
    HttpCase {
        status: StatusCode::PAYLOAD_TOO_LARGE,
        code: "RESOURCE_EXHAUSTED",
        ..invalid(path, input, needle)
    }
}

fn http_cases(epoch: &str) -> Vec<HttpCase> {
    use Input::{Get, Json, Raw};
    use serde_json::json;
    let publish = |body: serde_json::Value, needle| invalid("/publish", Json(body), needle);
    let get = |path: &str, needle| invalid(path, Get, needle);
    vec![
        publish(json!({"topic": "a..b", "payload": "x"}), "empty token"),
        publish(json!({"topic": "a b", "payload": "x"}), "not allowed"),
        publish(json!({"topic": "", "payload": "x"}), "must not be empty"),
        publish(
            json!({"topic": "x".repeat(300), "payload": "x"}),
            "at most 255",
        ),
        publish(json!({"topic": "a.*", "payload": "x"}), "wildcards"),
        publish(json!({"topic": "a.>", "payload": "x"}), "wildcards"),
        too_large(
            "/publish",
            Json(json!({"topic": "a", "payload": "x".repeat(LIMIT + 1)})),
            "over the limit of 1024",
        ),
        publish(
            json!({"topic": "a", "payload": "x", "payload_base64": "eA=="}),
            "not both",
        ),
        publish(
            json!({"topic": "a", "payload_base64": "not base64!"}),
            "base64",
        ),
        publish(
            json!({"topic": "a", "paylod": "typo"}),
            "unknown field `paylod`",
        ),
        publish(json!({"payload": "no topic"}), "missing field `topic`"),
        // Not an object (serde alone would take the fields as a positional array).
        invalid(
            "/publish",
            Raw(br#"["a", "positional", null]"#.to_vec()),
            "must be a JSON object",
        ),
        invalid("/publish", Raw(b"{\"topic\": ".to_vec()), "malformed JSON"),
        // Raw publish: over the limit (checked by the hub) and far over it (by the body limit,
        // which leaves the body unread and so closes the connection).
        too_large("/topics/a", Raw(vec![b'x'; LIMIT + 1]), "1025 bytes"),
        HttpCase {
            closes: true,
            ..too_large("/topics/a", Raw(vec![b'x'; 1 << 20]), "limited to 1024")
        },
        invalid("/topics/a.*", Raw(b"x".to_vec()), "wildcards"),
        // Subscribe and history parameters.
        get("/subscribe", "at least one topic"),
        get("/subscribe?topic=a..b", "empty token"),
        get("/subscribe?topic=a.%3E.b", "last token"),
        get("/subscribe?topics=a", "unknown query parameter"),
        get("/subscribe?topic=a&from=yesterday", "from must be"),
        get(
            "/subscribe?topic=a&last_event_id=nonsense",
            "invalid cursor",
        ),
        get("/subscribe?topic=a&lag_policy=drop", "lag_policy"),
        get("/subscribe?topic=a&queue_size=many", "queue_size"),
        get(
            "/subscribe?topic=a&queue_size=100000000",
            "over the server maximum",
        ),
        get("/topics?pattern=a..b", "empty token"),
        get("/topics/a/messages?limit=0", "limit must be"),
        get("/topics/a/messages?after=x-y", "invalid cursor"),
        // A cursor of this epoch but ahead of the hub is an error, never a hang.
        get(
            &format!("/subscribe?topic=a&last_event_id={epoch}-999"),
            "ahead of this hub",
        ),
        HttpCase {
            headers: vec![("last-event-id", format!("{epoch}-999"))],
            ..get("/subscribe?topic=a", "ahead of this hub")
        },
        // Unknown routes and methods.
        HttpCase {
            status: StatusCode::NOT_FOUND,
            code: "NOT_FOUND",
            ..get("/no/such/route", "no such route")
        },
        HttpCase {
            status: StatusCode::METHOD_NOT_ALLOWED,
            code: "UNIMPLEMENTED",
            ..get("/publish", "method not allowed")
        },
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_bad_input_gets_precise_json_errors() {
    let broker = broker().await;
    let sse = witness(&broker).await;
    let url = broker.url();
    let http = reqwest::Client::new();
    for case in http_cases(&broker.epoch().await) {
        let target = format!("{url}{}", case.path);
        let mut request = match case.input {
            Input::Get => http.get(&target),
            Input::Json(body) => http.post(&target).json(&body),
            Input::Raw(body) => http.post(&target).body(body),
        };
        for (name, value) in &case.headers {
            request = request.header(*name, value);
        }
        let response = request.send().await.unwrap();
        if case.closes {
            assert_eq!(
                response.headers()["connection"],
                "close",
                "{}: the unread body makes the connection unusable",
                case.path
            );
        }
        assert_http_error(response, case.status, case.code, case.needle).await;
    }
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

/// A gRPC call that must fail.
enum Call {
    Publish(PublishRequest),
    Subscribe(SubscribeRequest),
    Unsubscribe(&'static str),
    Batch(Vec<PublishRequest>),
    /// [`Malformed`] sent to this method path.
    Raw(&'static str),
}

fn publish(topic: &str, size: usize) -> PublishRequest {
    PublishRequest {
        topic: topic.into(),
        payload: vec![b'x'; size].into(),
        ..Default::default()
    }
}

fn subscribe(topics: &[&str]) -> SubscribeRequest {
    SubscribeRequest {
        topics: topics.iter().map(|t| t.to_string()).collect(),
        ..Default::default()
    }
}

/// Each call, the status code it must get, and what the message must mention.
fn grpc_cases(epoch: String) -> Vec<(Call, Code, &'static [&'static str])> {
    let ahead = v1::StartPosition {
        position: Some(v1::start_position::Position::After(v1::Cursor {
            epoch,
            seq: 1_000,
        })),
    };
    vec![
        (
            Call::Publish(publish("a..b", 1)),
            Code::InvalidArgument,
            &["empty token"],
        ),
        (
            Call::Publish(publish("a.*", 1)),
            Code::InvalidArgument,
            &["wildcards"],
        ),
        (
            Call::Publish(publish("a", LIMIT + 1)),
            Code::ResourceExhausted,
            &["over the limit of 1024"],
        ),
        (
            Call::Subscribe(subscribe(&[])),
            Code::InvalidArgument,
            &["at least one topic"],
        ),
        (
            Call::Subscribe(subscribe(&["a.>.b"])),
            Code::InvalidArgument,
            &["last token"],
        ),
        (
            Call::Subscribe(SubscribeRequest {
                lag_policy: 7,
                ..subscribe(&["a"])
            }),
            Code::InvalidArgument,
            &["lag_policy"],
        ),
        (
            Call::Subscribe(SubscribeRequest {
                start: Some(ahead),
                ..subscribe(&["a"])
            }),
            Code::InvalidArgument,
            &["ahead of this hub"],
        ),
        (
            Call::Unsubscribe("sub-nope-1"),
            Code::NotFound,
            &["no subscription"],
        ),
        // A batch stops at its first bad message and says how many went through before it.
        (
            Call::Batch(vec![
                publish("good.batch", 1),
                publish("bad topic", 1),
                publish("good.batch", 1),
            ]),
            Code::InvalidArgument,
            &[
                "message #2 of the batch was rejected: invalid topic",
                "the 1 message before it was published",
            ],
        ),
        // Malformed protobuf and unknown methods.
        (
            Call::Raw("/topichub.v1.PubSub/Publish"),
            Code::InvalidArgument,
            &["malformed protobuf"],
        ),
        (
            Call::Raw("/topichub.v1.PubSub/NoSuchMethod"),
            Code::Unimplemented,
            &[],
        ),
        (
            Call::Raw("/no.Such/Service"),
            Code::Unimplemented,
            &["unknown service"],
        ),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_bad_input_gets_precise_statuses() {
    let broker = broker().await;
    let sse = witness(&broker).await;
    let mut client = broker.grpc().await;
    let mut raw = tonic::client::Grpc::new(broker.channel().await);
    for (call, code, needles) in grpc_cases(broker.epoch().await) {
        let result = match call {
            Call::Publish(request) => client.publish(request).await.map(drop),
            Call::Subscribe(request) => client.subscribe(request).await.map(drop),
            Call::Unsubscribe(id) => client
                .unsubscribe(UnsubscribeRequest {
                    subscription_id: id.into(),
                })
                .await
                .map(drop),
            Call::Batch(requests) => client
                .publish_batch(futures_util::stream::iter(requests))
                .await
                .map(drop),
            Call::Raw(path) => {
                raw.ready().await.unwrap();
                raw.unary::<Malformed, v1::PublishResponse, _>(
                    tonic::Request::new(Malformed { topic: 7 }),
                    http::uri::PathAndQuery::from_static(path),
                    tonic_prost::ProstCodec::default(),
                )
                .await
                .map(drop)
            }
        };
        let status = result.expect_err("the call must fail");
        assert_eq!(status.code(), code, "{status:?}");
        for needle in needles {
            assert!(
                status.message().contains(needle),
                "{:?} should mention {needle:?}",
                status.message()
            );
        }
    }
    assert_witness_unharmed(&broker, sse).await;
    broker.stop().await;
}

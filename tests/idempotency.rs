//! Idempotent publish over the real doors: a retry under the same idempotency key (HTTP
//! `Idempotency-Key` header or body field, gRPC and Connect `idempotency_key`, WebSocket
//! `idempotency_key`) is answered with the original's cursor and `duplicate`, stores nothing
//! twice and reaches subscribers once; a key reused for another message is refused; bad keys
//! get a precise error; the window is bounded; concurrent retries of a publish still waiting for
//! the disk log get the same answer. The delivery tests run on memory and on disk.

#[macro_use]
mod support;

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use support::{Backend, Broker, BrokerProcess, spawn_broker_on, within};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tonic::Code;
use topichub::proto::v1;

/// `POST /topics/{topic}` with `body`, under `key` if given: the status and the JSON answer.
async fn publish_raw(url: &str, topic: &str, key: Option<&str>, body: &str) -> (u16, Value) {
    let mut request = reqwest::Client::new()
        .post(format!("{url}/topics/{topic}"))
        .header("content-type", "text/plain")
        .body(body.to_owned());
    if let Some(key) = key {
        request = request.header("Idempotency-Key", key);
    }
    let response = request.send().await.expect("publish request");
    let status = response.status().as_u16();
    (status, response.json().await.expect("a JSON answer"))
}

/// `POST /publish` with the JSON `body`, under the header `key` if given.
async fn publish_json(broker: &Broker, key: Option<&str>, body: Value) -> (u16, Value) {
    let mut request = reqwest::Client::new()
        .post(format!("{}/publish", broker.url()))
        .json(&body);
    if let Some(key) = key {
        request = request.header("Idempotency-Key", key);
    }
    let response = request.send().await.expect("publish request");
    let status = response.status().as_u16();
    (status, response.json().await.expect("a JSON answer"))
}

/// The payloads retained on `topic`, oldest first.
async fn retained(url: &str, topic: &str) -> Vec<String> {
    let page = support::get_json(&format!("{url}/topics/{topic}/messages?limit=1000")).await;
    page["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .map(|m| m["payload"].as_str().expect("a text payload").to_owned())
        .collect()
}

fn keyed(topic: &str, payload: &str, key: &str) -> v1::PublishRequest {
    v1::PublishRequest {
        topic: topic.into(),
        payload: payload.as_bytes().to_vec().into(),
        idempotency_key: key.into(),
        ..Default::default()
    }
}

/// The payload of the next message on a `Subscribe` stream.
async fn next_payload(stream: &mut tonic::Streaming<v1::SubscribeResponse>) -> String {
    loop {
        let event = within("a subscription event", stream.message())
            .await
            .expect("stream")
            .expect("open");
        if let Some(v1::subscribe_response::Event::Message(m)) = event.event {
            return String::from_utf8(m.payload.to_vec()).unwrap();
        }
    }
}

async fn http_retries_answer_with_the_original_and_deliver_once(backend: Backend) {
    let broker = spawn_broker_on(backend, |_| {}).await;
    let mut subscriber = broker.grpc_subscribe(&["idem.http"]).await;

    let (status, first) = publish_raw(&broker.url(), "idem.http", Some("order-1"), "hello").await;
    assert_eq!(status, 200, "{first}");
    assert!(first.get("duplicate").is_none(), "a first publish: {first}");
    let (status, retry) = publish_raw(&broker.url(), "idem.http", Some("order-1"), "hello").await;
    assert_eq!(status, 200, "{retry}");
    assert_eq!(retry["duplicate"], true, "{retry}");
    assert_eq!(retry["cursor"], first["cursor"]);
    assert_eq!(retry["seq"], first["seq"]);
    assert_eq!(retry["published_at"], first["published_at"]);
    assert_eq!(retry["topic"], "idem.http");

    // The same message through the JSON route: still the original (headers may differ between
    // doors; topic and payload name the message).
    let body = json!({ "topic": "idem.http", "payload": "hello" });
    let (status, json_retry) = publish_json(&broker, Some("order-1"), body).await;
    assert_eq!((status, &json_retry["duplicate"]), (200, &json!(true)));
    assert_eq!(json_retry["cursor"], first["cursor"]);

    // Another key is another message; no key publishes every time.
    let (_, other) = publish_raw(&broker.url(), "idem.http", Some("order-2"), "hello").await;
    assert!(other.get("duplicate").is_none());
    assert_ne!(other["cursor"], first["cursor"]);
    publish_raw(&broker.url(), "idem.http", None, "end").await;

    assert_eq!(
        retained(&broker.url(), "idem.http").await,
        ["hello", "hello", "end"]
    );
    for expected in ["hello", "hello", "end"] {
        assert_eq!(next_payload(&mut subscriber).await, expected);
    }
    broker.stop().await;
}

async fn grpc_and_connect_retries_say_duplicate(backend: Backend) {
    let broker = spawn_broker_on(backend, |_| {}).await;
    let mut grpc = broker.grpc().await;
    let first = grpc
        .publish(keyed("idem.grpc", "m", "g-1"))
        .await
        .unwrap()
        .into_inner();
    assert!(!first.duplicate);
    let retry = grpc
        .publish(keyed("idem.grpc", "m", "g-1"))
        .await
        .unwrap()
        .into_inner();
    assert!(retry.duplicate);
    assert_eq!(retry.cursor, first.cursor);

    let (requests, mut events) = broker.connect_stream(None).await;
    for request_id in [1, 2] {
        requests
            .send(v1::ConnectRequest {
                request_id,
                request: Some(v1::connect_request::Request::Publish(keyed(
                    "idem.grpc",
                    "m",
                    "g-1",
                ))),
            })
            .await
            .unwrap();
        let answer = within("an ack", events.next()).await.unwrap().unwrap();
        let Some(v1::connect_response::Event::Ack(ack)) = answer.event else {
            panic!("an ack: {answer:?}");
        };
        assert!(ack.duplicate, "a retry of the unary publish");
        assert_eq!(ack.cursor, first.cursor);
    }

    // A batch may carry retries too: they count as accepted, and are stored once.
    let batch = [
        keyed("idem.grpc", "b1", "b-1"),
        keyed("idem.grpc", "b1", "b-1"),
        keyed("idem.grpc", "b2", "b-2"),
        keyed("idem.grpc", "m", "g-1"),
    ];
    let answer = grpc
        .publish_batch(futures_util::stream::iter(batch))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(answer.accepted, 4);
    assert_eq!(answer.last_cursor, first.cursor, "the last was a retry");
    assert_eq!(
        retained(&broker.url(), "idem.grpc").await,
        ["m", "b1", "b2"]
    );
    broker.stop().await;
}

async fn websocket_retries_get_a_duplicate_ack(backend: Backend) {
    let broker = spawn_broker_on(backend, |_| {}).await;
    let url = format!("ws://{}/ws", broker.addr);
    let (mut ws, _) = within("WebSocket handshake", tokio_tungstenite::connect_async(url))
        .await
        .expect("upgrade");
    let mut answers = Vec::new();
    let publishes = [
        json!({ "topic": "idem.ws", "payload": "w", "idempotency_key": "w-1" }),
        json!({ "topic": "idem.ws", "payload": "w", "idempotency_key": "w-1" }),
        json!({ "topic": "idem.ws", "payload": "other", "idempotency_key": "w-1" }),
        json!({ "topic": "idem.ws", "payload": "w", "idempotency_key": "" }),
        json!({ "topic": "idem.ws", "payload": "w", "idempotency_key": "w-2", "extra": 1 }),
    ];
    for (request_id, publish) in publishes.into_iter().enumerate() {
        let frame = json!({ "request_id": request_id, "publish": publish });
        ws.send(WsMessage::Text(frame.to_string().into()))
            .await
            .unwrap();
        let answer = within("an answer", async {
            loop {
                match ws.next().await {
                    Some(Ok(WsMessage::Text(text))) => {
                        return serde_json::from_str::<Value>(text.as_str()).unwrap();
                    }
                    Some(Ok(_)) => continue,
                    other => panic!("socket ended: {other:?}"),
                }
            }
        })
        .await;
        assert_eq!(answer["request_id"], request_id, "{answer}");
        answers.push(answer);
    }
    let (first, retry) = (&answers[0]["ack"], &answers[1]["ack"]);
    assert!(first.get("duplicate").is_none(), "{first}");
    assert_eq!(retry["duplicate"], true, "{retry}");
    assert_eq!(retry["cursor"], first["cursor"]);
    let error = |i: usize| answers[i]["error"].clone();
    assert_eq!(error(2)["code"], "ALREADY_EXISTS", "{}", answers[2]);
    assert_eq!(error(3)["code"], "INVALID_ARGUMENT", "{}", answers[3]);
    assert!(
        error(3)["message"]
            .as_str()
            .unwrap()
            .contains("it is empty"),
        "{}",
        answers[3]
    );
    assert!(
        error(4)["message"]
            .as_str()
            .is_some_and(|m| m.contains("extra")),
        "unknown fields are still refused: {}",
        answers[4]
    );
    assert_eq!(retained(&broker.url(), "idem.ws").await, ["w"]);
    broker.stop().await;
}

async fn a_key_reused_for_another_message_is_refused_on_every_door(backend: Backend) {
    let broker = spawn_broker_on(backend, |_| {}).await;
    let (status, first) = publish_raw(&broker.url(), "idem.reuse", Some("r-1"), "one").await;
    assert_eq!(status, 200);
    let seq = first["seq"].as_u64().unwrap();

    for (topic, body, names) in [
        (
            "idem.reuse",
            "two",
            "another payload on topic idem.reuse".to_owned(),
        ),
        ("idem.other", "one", "topic idem.reuse".to_owned()),
    ] {
        let (status, error) = publish_raw(&broker.url(), topic, Some("r-1"), body).await;
        assert_eq!(status, 409, "{error}");
        assert_eq!(error["error"]["code"], "ALREADY_EXISTS");
        let message = error["error"]["message"].as_str().unwrap();
        assert!(message.contains("\"r-1\" was already used"), "{message}");
        assert!(message.contains(&names), "{message}");
        assert!(message.contains(&format!("seq {seq}")), "{message}");

        let status = broker
            .grpc()
            .await
            .publish(keyed(topic, body, "r-1"))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::AlreadyExists, "{status:?}");
        assert!(status.message().contains("already used"), "{status:?}");
    }
    assert_eq!(retained(&broker.url(), "idem.reuse").await, ["one"]);
    assert!(retained(&broker.url(), "idem.other").await.is_empty());
    broker.stop().await;
}

async fn concurrent_retries_store_one_copy(backend: Backend) {
    let broker = spawn_broker_on(backend, |_| {}).await;
    // Each on its own connection, all at once: on disk most of them arrive while the first is
    // still waiting for its fsync, and must wait for its answer rather than store a copy.
    let mut clients = Vec::new();
    for _ in 0..16 {
        clients.push(broker.grpc().await);
    }
    let answers = futures_util::future::join_all(clients.iter_mut().map(|client| async {
        client
            .publish(keyed("idem.race", "once", "race-1"))
            .await
            .expect("publish")
            .into_inner()
    }))
    .await;
    let originals = answers.iter().filter(|a| !a.duplicate).count();
    assert_eq!(originals, 1, "one publish stored it: {answers:?}");
    let cursor = &answers[0].cursor;
    assert!(answers.iter().all(|a| &a.cursor == cursor), "{answers:?}");
    assert_eq!(retained(&broker.url(), "idem.race").await, ["once"]);
    broker.stop().await;
}

on_every_backend!(
    http_retries_answer_with_the_original_and_deliver_once,
    grpc_and_connect_retries_say_duplicate,
    websocket_retries_get_a_duplicate_ack,
    a_key_reused_for_another_message_is_refused_on_every_door,
    concurrent_retries_store_one_copy,
);

#[tokio::test]
async fn bad_keys_get_a_precise_error_and_publish_nothing() {
    let broker = spawn_broker_on(Backend::Memory, |_| {}).await;
    let long = "k".repeat(129);
    for (key, says) in [
        ("has space", "contains ' '"),
        (long.as_str(), "129 bytes long"),
        ("", "it is empty"),
    ] {
        let (status, error) = publish_raw(&broker.url(), "idem.bad", Some(key), "x").await;
        assert_eq!(status, 400, "{key:?}: {error}");
        let message = error["error"]["message"].as_str().unwrap();
        assert!(message.contains("invalid idempotency key"), "{message}");
        assert!(message.contains(says), "{message}");
    }
    let status = broker
        .grpc()
        .await
        .publish(keyed("idem.bad", "x", "tab\tkey"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().contains("invalid idempotency key"),
        "{status:?}"
    );

    // Two keys for one request: which one would name it?
    let response = reqwest::Client::new()
        .post(format!("{}/topics/idem.bad", broker.url()))
        .header("Idempotency-Key", "a")
        .header("Idempotency-Key", "b")
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    assert!(retained(&broker.url(), "idem.bad").await.is_empty());
    broker.stop().await;
}

#[tokio::test]
async fn the_window_remembers_at_most_its_key_count() {
    let broker = spawn_broker_on(Backend::Memory, |config| config.idempotency_keys = 2).await;
    let mut grpc = broker.grpc().await;
    let mut first = Vec::new();
    for key in ["c-1", "c-2", "c-3"] {
        let answer = grpc.publish(keyed("idem.count", key, key)).await.unwrap();
        first.push(answer.into_inner().cursor);
    }
    // c-1 was forgotten to make room: its retry publishes again. c-3 is still known.
    let forgotten = grpc
        .publish(keyed("idem.count", "c-1", "c-1"))
        .await
        .unwrap()
        .into_inner();
    assert!(!forgotten.duplicate);
    assert_ne!(forgotten.cursor, first[0]);
    let known = grpc
        .publish(keyed("idem.count", "c-3", "c-3"))
        .await
        .unwrap()
        .into_inner();
    assert!(known.duplicate);
    assert_eq!(known.cursor, first[2]);
    broker.stop().await;
}

/// Keyed publishes on a keep-alive HTTP/1.1 connection (the publish lane's kind): the lane
/// hands them to the application, which answers the retry as a duplicate.
#[tokio::test]
async fn keyed_publishes_on_a_keep_alive_connection_are_answered_as_retries() {
    let broker = spawn_broker_on(Backend::Memory, |_| {}).await;
    let mut stream = tokio::net::TcpStream::connect(broker.addr).await.unwrap();
    let request = |key: &str| {
        format!(
            "POST /topics/idem.lane HTTP/1.1\r\nhost: x\r\nIdempotency-Key: {key}\r\ncontent-length: 4\r\n\r\nlane"
        )
    };
    let plain = "POST /topics/idem.lane HTTP/1.1\r\nhost: x\r\ncontent-length: 4\r\n\r\nlane";
    let mut answers = String::new();
    for (i, request) in [plain.to_owned(), request("l-1"), request("l-1")]
        .iter()
        .enumerate()
    {
        stream.write_all(request.as_bytes()).await.unwrap();
        // One answer per request, read whole before the next is sent.
        within("an answer", async {
            while answers.matches("\"cursor\"").count() <= i {
                let mut buffer = vec![0; 4096];
                let n = stream.read(&mut buffer).await.unwrap();
                assert!(n > 0, "the connection stays open: {answers}");
                answers.push_str(std::str::from_utf8(&buffer[..n]).unwrap());
            }
        })
        .await;
    }
    assert_eq!(answers.matches("HTTP/1.1 200 OK").count(), 3, "{answers}");
    assert_eq!(
        answers.matches("\"duplicate\":true").count(),
        1,
        "{answers}"
    );
    assert_eq!(retained(&broker.url(), "idem.lane").await, ["lane", "lane"]);
    broker.stop().await;
}

/// With a data dir, the window is rebuilt from the log at start: a retry after a restart is
/// still answered with the original.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_after_a_restart_on_disk_is_still_a_duplicate() {
    let dir = support::fresh_data_dir("idempotency-restart");
    let args = ["--data-dir", dir.to_str().unwrap()];
    let broker = BrokerProcess::start(&args, "info").await;
    let url = format!("http://{}", broker.addr);
    let (_, first) = publish_raw(&url, "idem.restart", Some("s-1"), "kept").await;
    broker.stop().await;

    let broker = BrokerProcess::start(&args, "info").await;
    let url = format!("http://{}", broker.addr);
    let (status, retry) = publish_raw(&url, "idem.restart", Some("s-1"), "kept").await;
    assert_eq!(status, 200, "{retry}");
    assert_eq!(retry["duplicate"], true, "{retry}");
    assert_eq!(retry["cursor"], first["cursor"]);
    assert_eq!(retained(&url, "idem.restart").await, ["kept"]);
    broker.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}

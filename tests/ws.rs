//! The WebSocket door, `GET /ws`, over a real WebSocket client: the `Connect` protocol in JSON
//! text frames and protobuf binary frames; acks, many subscriptions on one socket, resume with
//! the same gaps as SSE, every door reaching every other, auth on the upgrade, limits,
//! malformed frames and floods of them, keepalive pings, shutdown, and slow readers.

mod support;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::{SinkExt, StreamExt};
use jsonwebtoken::{EncodingKey, Header, encode};
use serde_json::{Value, json};
use support::{Broker, Sse, http_publish, spawn_broker, spawn_broker_with, wait_for, within};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use topichub::proto::v1;

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// What a WebSocket runs over: plain TCP or TLS.
trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin> Io for T {}

async fn open(broker: &Broker, query: &str) -> Ws {
    let url = format!("ws://{}/ws{query}", broker.addr);
    within("WebSocket handshake", tokio_tungstenite::connect_async(url))
        .await
        .expect("upgrade")
        .0
}

async fn send<S: Io>(ws: &mut WebSocketStream<S>, frame: Value) {
    ws.send(Message::Text(frame.to_string().into()))
        .await
        .expect("send");
}

/// The next data frame (pings and pongs are skipped).
async fn next_message<S: Io>(ws: &mut WebSocketStream<S>) -> Message {
    within("a frame", async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                Some(Ok(message)) => return message,
                other => panic!("socket ended: {other:?}"),
            }
        }
    })
    .await
}

/// The next JSON frame.
async fn recv<S: Io>(ws: &mut WebSocketStream<S>) -> Value {
    match next_message(ws).await {
        Message::Text(text) => serde_json::from_str(text.as_str()).expect("JSON frame"),
        other => panic!("expected a text frame, got {other:?}"),
    }
}

/// The close frame that ends the socket.
async fn closed<S: Io>(ws: &mut WebSocketStream<S>) -> CloseFrame {
    match next_message(ws).await {
        Message::Close(Some(frame)) => frame,
        other => panic!("expected a close frame, got {other:?}"),
    }
}

/// Subscribes to `topics` with `extra` subscribe fields; returns the subscription id.
async fn subscribe<S: Io>(
    ws: &mut WebSocketStream<S>,
    request_id: u64,
    topics: &[&str],
    extra: Value,
) -> String {
    let mut subscribe = json!({ "topics": topics });
    if let Value::Object(fields) = extra {
        subscribe.as_object_mut().unwrap().extend(fields);
    }
    send(
        ws,
        json!({"request_id": request_id, "subscribe": subscribe}),
    )
    .await;
    let answer = recv(ws).await;
    assert_eq!(answer["request_id"], request_id, "{answer}");
    let id = answer["subscribed"]["subscription_id"]
        .as_str()
        .unwrap_or_else(|| panic!("expected subscribed, got {answer}"))
        .to_owned();
    assert_eq!(answer["subscription_id"], id.as_str());
    id
}

/// Publishes `publish` (the request's fields) on a socket subscribed to its topic; returns the
/// ack and the delivered message frames, which may arrive in either order.
async fn publish_and_receive<S: Io>(
    ws: &mut WebSocketStream<S>,
    request_id: u64,
    publish: Value,
) -> (Value, Value) {
    send(ws, json!({"request_id": request_id, "publish": publish})).await;
    let (mut ack, mut message) = (None, None);
    for _ in 0..2 {
        let frame = recv(ws).await;
        if frame.get("ack").is_some() {
            ack = Some(frame);
        } else {
            message = Some(frame);
        }
    }
    let (ack, message) = (ack.expect("an ack"), message.expect("a message"));
    assert_eq!(ack["request_id"], request_id, "{ack}");
    assert!(message.get("message").is_some(), "{message}");
    (ack, message)
}

/// The next binary frame, as a protobuf `ConnectResponse`.
async fn recv_proto<S: Io>(ws: &mut WebSocketStream<S>) -> v1::ConnectResponse {
    use prost::Message as _;
    match next_message(ws).await {
        Message::Binary(bytes) => v1::ConnectResponse::decode(bytes).expect("a ConnectResponse"),
        other => panic!("expected a binary frame, got {other:?}"),
    }
}

fn seq(frame: &Value) -> u64 {
    frame["message"]["seq"]
        .as_u64()
        .unwrap_or_else(|| panic!("expected a message, got {frame}"))
}

#[tokio::test]
async fn subscribe_publish_ack_round_trip() {
    let broker = spawn_broker().await;
    let mut ws = open(&broker, "").await;
    let id = subscribe(&mut ws, 1, &["orders.>"], json!({})).await;
    // The ack and the delivery travel on one socket in either order.
    let (ack, message) = publish_and_receive(
        &mut ws,
        2,
        json!({"topic": "orders.eu", "payload": {"n": 1}, "headers": {"x-trace": "t1"}}),
    )
    .await;
    assert_eq!(ack["request_id"], 2);
    assert!(ack.get("subscription_id").is_none(), "{ack}");
    let cursor = ack["ack"]["cursor"].as_str().unwrap();
    assert!(
        cursor.ends_with(&format!("-{}", ack["ack"]["seq"])),
        "{ack}"
    );
    assert_eq!(message["request_id"], 0);
    assert_eq!(message["subscription_id"], id.as_str());
    let m = &message["message"];
    assert_eq!(m["topic"], "orders.eu");
    assert_eq!(m["payload"], json!({"n": 1}));
    assert_eq!(m["cursor"], cursor);
    assert_eq!(m["headers"]["x-trace"], "t1");
    assert_eq!(m["headers"]["content-type"], "application/json");

    // Text stays text; bytes that are not UTF-8 travel as base64 both ways.
    let (_, binary) = publish_and_receive(
        &mut ws,
        3,
        json!({"topic": "orders.bin", "payload_base64": "/wA="}),
    )
    .await;
    assert_eq!(binary["message"]["payload_base64"], "/wA=");
    broker.stop().await;
}

#[tokio::test]
async fn one_socket_carries_many_subscriptions_and_unsubscribes() {
    let broker = spawn_broker().await;
    let mut ws = open(&broker, "").await;
    let a = subscribe(&mut ws, 1, &["a.*"], json!({})).await;
    let b = subscribe(&mut ws, 2, &["b.x"], json!({})).await;
    let both = subscribe(&mut ws, 3, &["a.x", "b.x"], json!({})).await;
    broker.wait_for_subscribers(3).await;
    http_publish(&broker.url(), "a.x", "to a").await;
    http_publish(&broker.url(), "b.x", "to b").await;
    let mut got = Vec::new();
    for _ in 0..4 {
        let frame = recv(&mut ws).await;
        got.push((
            frame["subscription_id"].as_str().unwrap().to_owned(),
            frame["message"]["payload"].as_str().unwrap().to_owned(),
        ));
    }
    got.sort();
    let mut want = vec![
        (a.clone(), "to a".to_owned()),
        (b.clone(), "to b".to_owned()),
        (both.clone(), "to a".to_owned()),
        (both.clone(), "to b".to_owned()),
    ];
    want.sort();
    assert_eq!(got, want);

    send(
        &mut ws,
        json!({"request_id": 4, "unsubscribe": {"subscription_id": a}}),
    )
    .await;
    let frame = recv(&mut ws).await;
    assert_eq!(frame["subscription_id"], a.as_str());
    assert_eq!(frame["unsubscribed"]["reason"], "unsubscribed");
    broker.wait_for_subscribers(2).await;
    // An unknown id is an error answer; the socket stays open.
    send(
        &mut ws,
        json!({"request_id": 5, "unsubscribe": {"subscription_id": a}}),
    )
    .await;
    let frame = recv(&mut ws).await;
    assert_eq!(
        (frame["request_id"].clone(), frame["error"]["code"].clone()),
        (json!(5), json!("NOT_FOUND"))
    );
    http_publish(&broker.url(), "a.y", "only a.* matched this").await;
    http_publish(&broker.url(), "b.x", "again").await;
    let mut got = Vec::new();
    for _ in 0..2 {
        let frame = recv(&mut ws).await;
        got.push(frame["subscription_id"].as_str().unwrap().to_owned());
        assert_eq!(frame["message"]["payload"], "again", "{frame}");
    }
    got.sort();
    let mut want = vec![b, both];
    want.sort();
    assert_eq!(got, want);
    broker.stop().await;
}

#[tokio::test]
async fn resume_from_last_event_id_has_the_gaps_of_sse() {
    let broker = spawn_broker_with(|c| c.retain_messages = 5).await;
    let mut cursors = Vec::new();
    for i in 0..20 {
        cursors.push(http_publish(&broker.url(), "ret.t", &i.to_string()).await);
    }
    let epoch = cursors[0]["cursor"]
        .as_str()
        .unwrap()
        .split('-')
        .next()
        .unwrap()
        .to_owned();
    for (cursor, first_seq) in [
        (format!("{epoch}-3"), 16),
        ("oldepoch-41".to_owned(), 16),
        (format!("{epoch}-17"), 18),
    ] {
        let mut ws = open(&broker, "").await;
        subscribe(
            &mut ws,
            1,
            &["ret.t"],
            json!({"last_event_id": cursor, "from": "latest"}),
        )
        .await;
        let mut sse = Sse::open(
            &broker.url(),
            "/subscribe?topic=ret.t",
            &[("Last-Event-ID", &cursor)],
        )
        .await;
        sse.expect("subscribed").await;
        // Whatever cannot be replayed (evicted, or from another epoch) is told by the same gaps
        // on both doors, before the first message.
        let mut first = recv(&mut ws).await;
        let mut gaps = 0;
        while first.get("gap").is_some() {
            let sse_gap = sse.expect("gap").await.json();
            assert_eq!(first["gap"], sse_gap, "cursor {cursor}");
            gaps += 1;
            first = recv(&mut ws).await;
        }
        assert_eq!(gaps > 0, first_seq == 16, "cursor {cursor}");
        let mut seqs = vec![seq(&first)];
        for _ in seqs[0]..20 {
            seqs.push(seq(&recv(&mut ws).await));
        }
        assert_eq!(
            seqs,
            (first_seq..=20).collect::<Vec<_>>(),
            "cursor {cursor}"
        );
    }
    let mut ws = open(&broker, "").await;
    let gap = {
        subscribe(
            &mut ws,
            1,
            &["ret.t"],
            json!({"last_event_id": format!("{epoch}-3")}),
        )
        .await;
        recv(&mut ws).await
    };
    assert_eq!(
        gap["gap"],
        json!({"from_seq": 4, "to_seq": 15, "reason": "retention", "epoch": epoch})
    );
    // A cursor ahead of the hub is an error answer, never a hang.
    send(&mut ws, json!({"request_id": 9, "subscribe": {"topics": ["ret.t"], "last_event_id": format!("{epoch}-999")}})).await;
    loop {
        let frame = recv(&mut ws).await;
        if frame["request_id"] == 9 {
            assert_eq!(frame["error"]["code"], "INVALID_ARGUMENT", "{frame}");
            break;
        }
    }
    broker.stop().await;
}

#[tokio::test]
async fn every_door_reaches_the_socket_and_back() {
    let broker = spawn_broker().await;
    let mut ws = open(&broker, "").await;
    subscribe(&mut ws, 1, &["x.>"], json!({})).await;
    let mut sse = Sse::open(&broker.url(), "/subscribe?topic=x.>", &[]).await;
    sse.expect("subscribed").await;
    let mut grpc = broker.grpc_subscribe(&["x.>"]).await;
    within("gRPC subscribed", grpc.next())
        .await
        .unwrap()
        .unwrap();
    broker.wait_for_subscribers(3).await;

    // HTTP -> WebSocket.
    let published = http_publish(&broker.url(), "x.http", "from http").await;
    let frame = recv(&mut ws).await;
    assert_eq!(frame["message"]["payload"], "from http");
    assert_eq!(frame["message"]["cursor"], published["cursor"]);
    sse.expect("message").await;
    within("gRPC message", grpc.next()).await.unwrap().unwrap();

    // WebSocket -> SSE and gRPC, same seq everywhere.
    let (ack, _) =
        publish_and_receive(&mut ws, 2, json!({"topic": "x.ws", "payload": "from ws"})).await;
    let ack = &ack["ack"];
    let event = sse.expect("message").await;
    assert_eq!(event.id.as_deref(), ack["cursor"].as_str());
    assert_eq!(event.json()["payload"], "from ws");
    let item = within("gRPC message", grpc.next()).await.unwrap().unwrap();
    let Some(v1::subscribe_response::Event::Message(m)) = item.event else {
        panic!("{item:?}")
    };
    assert_eq!(&m.payload[..], b"from ws");
    assert_eq!(Some(m.cursor.unwrap().seq), ack["seq"].as_u64());
    broker.stop().await;
}

const SECRET: &str = "tests-only secret, long enough for HS256 use";

fn token(publish: &[&str], subscribe: &[&str]) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let claims = json!({
        "sub": "ws-tester",
        "exp": now + 3600,
        "topichub": {"publish": publish, "subscribe": subscribe},
    });
    encode(
        &Header::default(),
        &claims,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

#[tokio::test]
async fn the_upgrade_needs_a_token_from_the_header_query_or_cookie() {
    let broker = spawn_broker_with(|c| c.jwt_secret = Some(SECRET.into())).await;
    let url = format!("ws://{}/ws", broker.addr);
    match tokio_tungstenite::connect_async(url.clone()).await {
        Err(WsError::Http(response)) => {
            assert_eq!(response.status(), 401);
            let body: Value = serde_json::from_slice(response.body().as_deref().unwrap()).unwrap();
            assert_eq!(body["error"]["code"], "UNAUTHENTICATED");
        }
        other => panic!("a missing token must be refused with 401: {other:?}"),
    }
    let token = token(&["mine.>"], &["mine.>"]);
    // Query parameter (what a browser sends).
    let mut ws = open(&broker, &format!("?access_token={token}")).await;
    subscribe(&mut ws, 1, &["mine.>"], json!({})).await;
    // Each request is checked against the token; a refusal leaves the socket open.
    send(
        &mut ws,
        json!({"request_id": 2, "publish": {"topic": "theirs.x", "payload": "no"}}),
    )
    .await;
    let refused = recv(&mut ws).await;
    assert_eq!(refused["request_id"], 2);
    assert_eq!(refused["error"]["code"], "PERMISSION_DENIED");
    send(
        &mut ws,
        json!({"request_id": 3, "subscribe": {"topics": ["theirs.>"]}}),
    )
    .await;
    assert_eq!(recv(&mut ws).await["error"]["code"], "PERMISSION_DENIED");
    publish_and_receive(&mut ws, 4, json!({"topic": "mine.x", "payload": "yes"})).await;
    // Header and cookie.
    for (name, value) in [
        ("authorization", format!("Bearer {token}")),
        ("cookie", format!("access_token={token}")),
    ] {
        let mut request = url.clone().into_client_request().unwrap();
        request.headers_mut().insert(name, value.parse().unwrap());
        let (mut ws, _) = tokio_tungstenite::connect_async(request).await.expect(name);
        subscribe(&mut ws, 1, &["mine.x"], json!({})).await;
    }
    broker.stop().await;
}

#[tokio::test]
async fn limits_of_other_doors_apply_per_socket() {
    let broker = spawn_broker_with(|c| {
        c.max_subscriptions_per_connection = 2;
        c.max_payload_bytes = 1024;
    })
    .await;
    let mut ws = open(&broker, "").await;
    subscribe(&mut ws, 1, &["l.a"], json!({})).await;
    subscribe(&mut ws, 2, &["l.b"], json!({})).await;
    send(
        &mut ws,
        json!({"request_id": 3, "subscribe": {"topics": ["l.c"]}}),
    )
    .await;
    let refused = recv(&mut ws).await;
    assert_eq!(refused["error"]["code"], "RESOURCE_EXHAUSTED", "{refused}");
    assert!(
        refused["error"]["message"]
            .as_str()
            .unwrap()
            .contains("--max-subscriptions-per-connection 2")
    );
    send(
        &mut ws,
        json!({"request_id": 4, "publish": {"topic": "l.x", "payload": "x".repeat(2000)}}),
    )
    .await;
    let refused = recv(&mut ws).await;
    assert_eq!(refused["error"]["code"], "RESOURCE_EXHAUSTED", "{refused}");
    assert!(
        refused["error"]["message"]
            .as_str()
            .unwrap()
            .contains("--max-payload-bytes")
    );
    // A frame beyond what any publish needs is refused by the transport: the socket closes.
    ws.send(Message::Text("x".repeat(1024 * 1024).into()))
        .await
        .unwrap();
    let ended = within("the oversized frame closes the socket", async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Close(frame))) => return frame.map(|f| f.code),
                Some(Ok(_)) => continue,
                _ => return None,
            }
        }
    })
    .await;
    assert!(matches!(ended, None | Some(CloseCode::Size)), "{ended:?}");
    broker.stop().await;
}

#[tokio::test]
async fn a_malformed_frame_gets_an_error_and_the_socket_stays_open() {
    let broker = spawn_broker().await;
    let mut ws = open(&broker, "").await;
    ws.send(Message::Text("not json".into())).await.unwrap();
    let error = recv(&mut ws).await;
    assert_eq!(error["request_id"], 0);
    assert_eq!(error["error"]["code"], "INVALID_ARGUMENT");
    assert!(
        error["error"]["message"]
            .as_str()
            .unwrap()
            .contains("malformed JSON frame"),
        "{error}"
    );
    for (frame, needle) in [
        (json!({"request_id": 7, "bogus": {}}), "unknown field"),
        (json!({"request_id": 8}), "exactly one of"),
        (
            json!({"request_id": 9, "subscribe": {"topics": ["a..b"]}}),
            "invalid topic",
        ),
        (
            json!({"request_id": 10, "subscribe": {"topics": ["a"], "from": "yesterday"}}),
            "from must be",
        ),
        (
            json!({"request_id": 11, "publish": {"topic": "a.*", "payload": "x"}}),
            "wildcards",
        ),
    ] {
        let id = frame["request_id"].clone();
        send(&mut ws, frame).await;
        let error = recv(&mut ws).await;
        assert_eq!(error["request_id"], id);
        assert_eq!(error["error"]["code"], "INVALID_ARGUMENT");
        assert!(
            error["error"]["message"].as_str().unwrap().contains(needle),
            "{error} should mention {needle}"
        );
    }
    // A binary frame on a JSON socket is refused too.
    ws.send(Message::Binary(vec![1, 2, 3].into()))
        .await
        .unwrap();
    assert!(
        recv(&mut ws).await["error"]["message"]
            .as_str()
            .unwrap()
            .contains("speaks JSON")
    );
    send(
        &mut ws,
        json!({"request_id": 12, "publish": {"topic": "still.open", "payload": "ok"}}),
    )
    .await;
    let ack = recv(&mut ws).await;
    assert_eq!(ack["request_id"], 12);
    assert!(ack["ack"]["seq"].as_u64().is_some(), "{ack}");
    broker.stop().await;
}

#[tokio::test]
async fn a_flood_of_malformed_frames_closes_the_socket_with_policy_violation() {
    let broker = spawn_broker().await;
    let mut ws = open(&broker, "").await;
    for _ in 0..=topichub::ws::MAX_MALFORMED_FRAMES {
        ws.send(Message::Text("{".into())).await.unwrap();
    }
    for _ in 0..topichub::ws::MAX_MALFORMED_FRAMES {
        assert_eq!(recv(&mut ws).await["error"]["code"], "INVALID_ARGUMENT");
    }
    let close = closed(&mut ws).await;
    assert_eq!(close.code, CloseCode::Policy);
    assert!(
        close.reason.as_str().contains("malformed frames"),
        "{close:?}"
    );
    broker.stop().await;
}

#[tokio::test]
async fn binary_frames_carry_protobuf_connect_messages() {
    use prost::Message as _;
    use v1::connect_request::Request;
    use v1::connect_response::Event;
    let broker = spawn_broker().await;
    let mut ws = open(&broker, "").await;
    let request = |request_id, request| {
        Message::Binary(
            v1::ConnectRequest {
                request_id,
                request: Some(request),
            }
            .encode_to_vec()
            .into(),
        )
    };
    let subscribe = request(
        1,
        Request::Subscribe(v1::SubscribeRequest {
            topics: vec!["bin.>".into()],
            ..Default::default()
        }),
    );
    ws.send(subscribe).await.unwrap();
    let first = recv_proto(&mut ws).await;
    assert_eq!(first.request_id, 1);
    let Some(Event::Subscribed(subscribed)) = first.event else {
        panic!("{first:?}")
    };
    ws.send(request(
        2,
        Request::Publish(support::publish_request("bin.x", vec![0xff, 0])),
    ))
    .await
    .unwrap();
    let mut ack = None;
    let mut message = None;
    for _ in 0..2 {
        let response = recv_proto(&mut ws).await;
        match response.event {
            Some(Event::Ack(a)) => {
                assert_eq!(response.request_id, 2);
                ack = a.cursor;
            }
            Some(Event::Message(m)) => {
                assert_eq!(response.subscription_id, subscribed.subscription_id);
                message = Some(m);
            }
            other => panic!("{other:?}"),
        }
    }
    let message = message.unwrap();
    assert_eq!(&message.payload[..], [0xff, 0]);
    assert_eq!(message.cursor, ack);
    // A text frame on a protobuf socket is refused in protobuf.
    send(&mut ws, json!({"request_id": 3})).await;
    let refused = recv_proto(&mut ws).await;
    let Some(Event::Error(error)) = refused.event else {
        panic!("{refused:?}")
    };
    assert_eq!(error.code, "INVALID_ARGUMENT");
    broker.stop().await;
}

#[tokio::test]
async fn shutdown_closes_the_socket_with_a_reason() {
    let broker = spawn_broker().await;
    let mut ws = open(&broker, "").await;
    subscribe(&mut ws, 1, &["s.t"], json!({})).await;
    broker.shutdown.cancel();
    let close = closed(&mut ws).await;
    assert_eq!(close.code, CloseCode::Away);
    assert!(close.reason.as_str().contains("shutting down"), "{close:?}");
    broker.stop().await;
}

const WS_SUBSCRIBERS: &str = r#"topichub_subscribers{door="ws"}"#;

#[tokio::test]
async fn pings_keep_the_socket_alive_and_a_silent_peer_is_dropped() {
    let broker = spawn_broker_with(|c| {
        c.keepalive_interval = Duration::from_millis(100);
        c.keepalive_timeout = Duration::from_millis(100);
    })
    .await;
    let mut ws = open(&broker, "").await;
    subscribe(&mut ws, 1, &["k.t"], json!({})).await;
    // A reading client sees pings (and answers them by itself), so it stays.
    within("a ping", async {
        while !matches!(ws.next().await, Some(Ok(Message::Ping(_)))) {}
    })
    .await;
    for _ in 0..3 {
        within("a ping", async {
            while !matches!(ws.next().await, Some(Ok(Message::Ping(_)))) {}
        })
        .await;
    }
    // Four intervals is longer than an interval and a timeout: an answering peer stays.
    assert_eq!(support::metric(&broker, WS_SUBSCRIBERS).await, 1.0);
    drop(ws);
    let count = || async { support::metric(&broker, WS_SUBSCRIBERS).await };
    wait_for("the closed socket's subscription to end", || async {
        (count().await == 0.0).then_some(())
    })
    .await;
    // A client that stops reading never answers: the server drops it and its subscription.
    let mut silent = open(&broker, "").await;
    subscribe(&mut silent, 1, &["k.u"], json!({})).await;
    wait_for("the silent peer to be dropped", || async {
        (count().await == 0.0).then_some(())
    })
    .await;
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_reader_is_told_it_lagged_and_caught_up() {
    const COUNT: usize = 600;
    let broker = spawn_broker().await;
    // A small receive buffer so that the server's writes back up soon.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(8 * 1024).unwrap();
    let stream = socket.connect(broker.addr).await.unwrap();
    let (mut ws, _) = tokio_tungstenite::client_async(
        format!("ws://{}/ws", broker.addr),
        MaybeTlsStream::Plain(stream),
    )
    .await
    .unwrap();
    subscribe(
        &mut ws,
        1,
        &["lag.t"],
        json!({"queue_size": 4, "lag_policy": "catch-up"}),
    )
    .await;
    let payload = "x".repeat(16 * 1024);
    let mut published = Vec::new();
    for _ in 0..COUNT {
        published.push(
            http_publish(&broker.url(), "lag.t", &payload).await["seq"]
                .as_u64()
                .unwrap(),
        );
    }
    let mut seqs = Vec::new();
    let mut lags = 0;
    while seqs.len() < COUNT {
        let frame = recv(&mut ws).await;
        if let Some(lag) = frame.get("lag") {
            lags += 1;
            assert!(
                lag["from_seq"].as_u64().unwrap() > *seqs.last().unwrap_or(&0),
                "{lag}"
            );
        } else {
            seqs.push(seq(&frame));
        }
    }
    assert!(lags >= 1, "the reader was told it lagged");
    assert_eq!(
        seqs, published,
        "caught up with every message, in order, once"
    );
    broker.stop().await;
}

#[tokio::test]
async fn a_socket_closes_when_its_token_expires() {
    let broker = spawn_broker_with(|c| c.jwt_secret = Some(SECRET.into())).await;
    // Past its `exp` by 4 s but inside the 5 s leeway: accepted, and it expires in about 1 s.
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let claims = json!({"exp": now - 4, "topichub": {"subscribe": [">"]}});
    let short = encode(
        &Header::default(),
        &claims,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap();
    let mut ws = open(&broker, &format!("?access_token={short}")).await;
    subscribe(&mut ws, 1, &["t"], json!({})).await;
    let close = closed(&mut ws).await;
    assert_eq!(close.code, CloseCode::Policy);
    assert!(
        close.reason.as_str().contains("token has expired"),
        "{close:?}"
    );
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_socket_works_over_tls_on_the_same_port() {
    let (cert, key, pem) = support::certificate();
    let broker = spawn_broker_with(|c| {
        c.tls_cert = Some(cert.clone());
        c.tls_key = Some(key.clone());
    })
    .await;
    let mut ws = support::wss_connect(broker.addr, &pem, "/ws").await;
    subscribe(&mut ws, 1, &["tls.t"], json!({})).await;
    let (_, message) =
        publish_and_receive(&mut ws, 2, json!({"topic": "tls.t", "payload": "over wss"})).await;
    assert_eq!(message["message"]["payload"], "over wss");
    broker.stop().await;
}

#[tokio::test]
async fn a_socket_is_counted_under_the_ws_door() {
    let broker = spawn_broker().await;
    let mut ws = open(&broker, "").await;
    subscribe(&mut ws, 1, &["door.t"], json!({})).await;
    publish_and_receive(&mut ws, 2, json!({"topic": "door.t", "payload": "x"})).await;
    let by_door = r#"topichub_connections_by_door{door="ws"}"#;
    assert_eq!(support::metric(&broker, by_door).await, 1.0);
    assert_eq!(
        support::metric(&broker, r#"topichub_publishes_total{door="ws"}"#).await,
        1.0
    );
    assert_eq!(
        support::metric(&broker, r#"topichub_deliveries_total{door="ws"}"#).await,
        1.0
    );
    drop(ws);
    wait_for("the socket's connection to be uncounted", || async {
        (support::metric(&broker, by_door).await == 0.0).then_some(())
    })
    .await;
    broker.stop().await;
}

#[tokio::test]
async fn a_subscription_asks_for_its_queue_byte_budget() {
    let broker = spawn_broker_with(|c| c.max_queue_bytes = 1024 * 1024).await;
    let mut ws = open(&broker, "").await;
    subscribe(&mut ws, 1, &["qb.t"], json!({"queue_bytes": 1024 * 1024})).await;
    send(
        &mut ws,
        json!({"request_id": 2, "subscribe": {"topics": ["qb.t"], "queue_bytes": 1024 * 1024 + 1}}),
    )
    .await;
    let refused = recv(&mut ws).await;
    assert_eq!(refused["request_id"], 2);
    assert_eq!(refused["error"]["code"], "INVALID_ARGUMENT", "{refused}");
    assert!(
        refused["error"]["message"]
            .as_str()
            .unwrap()
            .contains("queue_bytes 1048577 is over the server maximum"),
        "{refused}"
    );
    broker.stop().await;
}

/// A socket whose peer stops reading while 1 MiB messages flow is closed after the write
/// timeout, like every connection; a reading subscriber gets every message meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_socket_is_disconnected_after_the_write_timeout() {
    const MESSAGES: usize = 24;
    let broker = spawn_broker_with(|c| {
        c.write_timeout = Duration::from_millis(500);
        // Its queue must not be what ends it.
        c.lag_policy = topichub::hub::LagPolicy::CatchUp;
    })
    .await;
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(8 * 1024).unwrap();
    let stream = socket.connect(broker.addr).await.unwrap();
    let (mut frozen, _) = tokio_tungstenite::client_async(
        format!("ws://{}/ws", broker.addr),
        MaybeTlsStream::Plain(stream),
    )
    .await
    .unwrap();
    subscribe(&mut frozen, 1, &["frozen.t"], json!({})).await;
    let mut reader = open(&broker, "").await;
    subscribe(&mut reader, 1, &["frozen.t"], json!({})).await;
    let payload = "f".repeat(1024 * 1024);
    let mut client = broker.grpc().await;
    for _ in 0..MESSAGES {
        client
            .publish(support::publish_request("frozen.t", payload.clone()))
            .await
            .unwrap();
        recv(&mut reader).await;
    }
    // Only the reading socket is left.
    broker.wait_for_subscribers(1).await;
    assert_eq!(
        support::metric(&broker, r#"topichub_write_timeouts_total{door="http"}"#).await,
        1.0
    );
    drop(frozen);
    broker.stop().await;
}

//! One hub behind every door: a message published through any door reaches subscribers on every
//! door, with the same seq.

mod support;

use std::collections::HashMap;

use futures_util::StreamExt;
use support::{Sse, metric, spawn_broker, within};
use topichub::proto::seed;
use topichub::proto::v1::{
    self, ConnectRequest, PublishRequest, SubscribeRequest, connect_request, connect_response,
    subscribe_response,
};

/// What a receiver saw of one message (the seed API carries only the payload).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Seen {
    topic: Option<String>,
    seq: Option<u64>,
    payload: Vec<u8>,
}

fn seen_v1(message: v1::Message) -> Seen {
    Seen {
        topic: Some(message.topic),
        seq: message.cursor.map(|c| c.seq),
        payload: message.payload.to_vec(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_door_publishes_to_every_door() {
    let broker = spawn_broker().await;
    let url = broker.url();
    let pattern = "matrix.>";
    let subscribe = || SubscribeRequest {
        topics: vec![pattern.into()],
        ..Default::default()
    };

    // Receivers: gRPC, gRPC-Web (HTTP/1.1), SSE, the seed service and a Connect stream.
    let mut grpc = broker
        .grpc()
        .await
        .subscribe(subscribe())
        .await
        .unwrap()
        .into_inner();
    let mut grpc_web = support::grpc_web(&broker)
        .subscribe(subscribe())
        .await
        .unwrap()
        .into_inner();
    let mut sse = Sse::open(&url, "/subscribe?topic=matrix.%3E", &[]).await;
    let mut seed_client =
        seed::pub_sub_service_client::PubSubServiceClient::new(broker.channel().await);
    let mut seed_stream = seed_client
        .subscribe(seed::SubscribeRequest {
            topic: pattern.into(),
        })
        .await
        .unwrap()
        .into_inner();
    let (connect_tx, mut connect) = broker.connect_stream(None).await;
    connect_tx
        .send(ConnectRequest {
            request_id: 1,
            request: Some(connect_request::Request::Subscribe(subscribe())),
        })
        .await
        .unwrap();
    broker.wait_for_subscribers(5).await;

    // Publishers: one message through each door.
    let http = reqwest::Client::new();
    let mut published: HashMap<&str, u64> = HashMap::new();
    let body: serde_json::Value = http
        .post(format!("{url}/publish"))
        .json(&serde_json::json!({"topic": "matrix.rest_json", "payload": "via rest json"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    published.insert("rest_json", body["seq"].as_u64().unwrap());
    let body: serde_json::Value = http
        .post(format!("{url}/topics/matrix.rest_raw"))
        .header("content-type", "application/octet-stream")
        .body("via rest raw")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    published.insert("rest_raw", body["seq"].as_u64().unwrap());
    let request = |topic: &str, payload: &str| PublishRequest {
        topic: topic.into(),
        payload: payload.as_bytes().to_vec().into(),
        ..Default::default()
    };
    let reply = broker
        .grpc()
        .await
        .publish(request("matrix.grpc", "via grpc"))
        .await
        .unwrap();
    published.insert("grpc", reply.into_inner().cursor.unwrap().seq);
    let reply = support::grpc_web(&broker)
        .publish(request("matrix.grpc_web", "via grpc-web"))
        .await
        .unwrap();
    published.insert("grpc_web", reply.into_inner().cursor.unwrap().seq);
    seed_client
        .publish(seed::PublishRequest {
            topic: "matrix.seed".into(),
            payload: b"via seed".to_vec().into(),
        })
        .await
        .unwrap();
    published.insert("seed", 0); // the seed API returns no seq; checked via the other receivers
    let reply = broker
        .grpc()
        .await
        .publish_batch(futures_util::stream::iter([request(
            "matrix.batch",
            "via batch",
        )]))
        .await
        .unwrap();
    published.insert("batch", reply.into_inner().last_cursor.unwrap().seq);

    let expected_payloads = [
        "via rest json",
        "via rest raw",
        "via grpc",
        "via grpc-web",
        "via seed",
        "via batch",
    ];
    let n = expected_payloads.len();

    // Collect n messages from each receiver.
    let mut from_grpc = Vec::new();
    while from_grpc.len() < n {
        let item = within("grpc", grpc.next()).await.unwrap().unwrap();
        match item.event.unwrap() {
            subscribe_response::Event::Message(m) => from_grpc.push(seen_v1(m)),
            subscribe_response::Event::Subscribed(_) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    let mut from_grpc_web = Vec::new();
    while from_grpc_web.len() < n {
        let item = within("grpc-web", grpc_web.next()).await.unwrap().unwrap();
        if let Some(subscribe_response::Event::Message(m)) = item.event {
            from_grpc_web.push(seen_v1(m));
        }
    }
    let mut from_sse = Vec::new();
    sse.expect("subscribed").await;
    while from_sse.len() < n {
        let event = sse.expect("message").await;
        let data = event.json();
        assert_eq!(
            event.id.as_deref(),
            data["cursor"].as_str(),
            "SSE id is the cursor"
        );
        from_sse.push(Seen {
            topic: Some(data["topic"].as_str().unwrap().into()),
            seq: data["seq"].as_u64(),
            payload: data["payload"].as_str().unwrap().as_bytes().to_vec(),
        });
    }
    let mut from_seed = Vec::new();
    while from_seed.len() < n {
        let item = within("seed", seed_stream.next()).await.unwrap().unwrap();
        from_seed.push(Seen {
            topic: None,
            seq: None,
            payload: item.payload.to_vec(),
        });
    }
    let mut from_connect = Vec::new();
    while from_connect.len() < n {
        let item = within("connect", connect.next()).await.unwrap().unwrap();
        if let Some(connect_response::Event::Message(m)) = item.event {
            from_connect.push(seen_v1(m));
        }
    }

    // Every door saw the same messages, in the same order, with the same seq.
    assert_eq!(from_grpc, from_grpc_web);
    assert_eq!(from_grpc, from_sse);
    assert_eq!(from_grpc, from_connect);
    let payloads: Vec<_> = from_grpc
        .iter()
        .map(|s| String::from_utf8(s.payload.clone()).unwrap())
        .collect();
    assert_eq!(payloads, expected_payloads);
    assert_eq!(
        from_seed.iter().map(|s| &s.payload).collect::<Vec<_>>(),
        from_grpc.iter().map(|s| &s.payload).collect::<Vec<_>>()
    );
    for (door, seq) in &published {
        if *seq != 0 {
            let seen = from_grpc
                .iter()
                .find(|s| s.topic.as_deref() == Some(&format!("matrix.{door}")))
                .unwrap();
            assert_eq!(
                seen.seq,
                Some(*seq),
                "{door}: the seq the publisher got is the seq subscribers see"
            );
        }
    }
    let seqs: Vec<u64> = from_grpc.iter().map(|s| s.seq.unwrap()).collect();
    assert!(
        seqs.windows(2).all(|w| w[0] < w[1]),
        "seqs strictly increase: {seqs:?}"
    );
    drop(connect_tx);
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_publish_keeps_content_type_and_json_payloads_stay_json() {
    let broker = spawn_broker().await;
    let url = broker.url();
    let mut sse = Sse::open(&url, "/subscribe?topic=ct.*", &[]).await;
    sse.expect("subscribed").await;
    let http = reqwest::Client::new();
    http.post(format!("{url}/topics/ct.raw"))
        .header("content-type", "text/csv")
        .body("a,b\n1,2")
        .send()
        .await
        .unwrap()
        .error_for_status()
        .unwrap();
    http.post(format!("{url}/publish"))
        .json(&serde_json::json!({"topic": "ct.json", "payload": {"n": 1, "list": [true, null]}}))
        .send()
        .await
        .unwrap()
        .error_for_status()
        .unwrap();
    http.post(format!("{url}/publish"))
        .json(&serde_json::json!({"topic": "ct.bin", "payload_base64": "AP/+"}))
        .send()
        .await
        .unwrap()
        .error_for_status()
        .unwrap();

    let raw = sse.expect("message").await.json();
    assert_eq!(raw["headers"]["content-type"], "text/csv");
    assert_eq!(raw["payload"], "a,b\n1,2");
    let json = sse.expect("message").await.json();
    assert_eq!(json["headers"]["content-type"], "application/json");
    assert_eq!(
        json["payload"],
        serde_json::json!({"n": 1, "list": [true, null]})
    );
    let bin = sse.expect("message").await.json();
    assert_eq!(bin["payload_base64"], "AP/+");
    assert!(bin.get("payload").is_none());

    // gRPC sees the same bytes and headers.
    let mut grpc = broker.grpc().await;
    let mut replay = grpc
        .subscribe(SubscribeRequest {
            topics: vec!["ct.raw".into()],
            start: Some(v1::StartPosition {
                position: Some(v1::start_position::Position::Earliest(true)),
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let message = loop {
        let item = within("grpc replay", replay.next()).await.unwrap().unwrap();
        if let Some(subscribe_response::Event::Message(m)) = item.event {
            break m;
        }
    };
    assert_eq!(&message.payload[..], b"a,b\n1,2");
    assert_eq!(message.headers["content-type"], "text/csv");
    broker.stop().await;
}

/// The HTTP door's open subscriptions on `/metrics`.
const HTTP_SUBSCRIBERS: &str = r#"topichub_subscribers{door="http"}"#;

/// Reads from `stream` into `seen` until `seen` contains `needle`.
async fn read_until(stream: &mut tokio::net::TcpStream, seen: &mut Vec<u8>, needle: &str) {
    while !String::from_utf8_lossy(seen).contains(needle) {
        read_more(stream, seen, needle).await;
    }
}

/// Reads what `stream` has next into `seen`; fails the test if it closes or sends nothing.
async fn read_more(stream: &mut tokio::net::TcpStream, seen: &mut Vec<u8>, awaited: &str) {
    use tokio::io::AsyncReadExt;
    let n = within(awaited, stream.read_buf(seen)).await.unwrap();
    assert!(
        n > 0,
        "closed before {awaited:?}: {}",
        String::from_utf8_lossy(seen)
    );
}

/// An HTTP/1.1 connection opened by `GET /subscribe` is written to directly, not by hyper: the
/// wire must still be exact HTTP/1.1 (a chunked stream, `connection: close`), pipelined bytes
/// must not disturb it, and a client that hangs up must be unsubscribed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_raw_http1_sse_connection_gets_a_chunked_stream_and_is_unsubscribed_on_close() {
    use tokio::io::AsyncWriteExt;

    let broker = spawn_broker().await;
    let url = broker.url();
    let mut stream = tokio::net::TcpStream::connect(broker.addr).await.unwrap();
    stream
        .write_all(b"GET /subscribe?topic=raw.h1 HTTP/1.1\r\nhost: x\r\naccept: text/event-stream\r\n\r\nGET /healthz HTTP/1.1\r\n\r\n")
        .await
        .unwrap();
    let mut seen = Vec::new();
    read_until(&mut stream, &mut seen, "event: subscribed").await;
    let text = String::from_utf8_lossy(&seen).to_string();
    let (head, body) = text.split_once("\r\n\r\n").expect("a complete head");
    let head = head.to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 200 ok\r\n"), "{head}");
    for field in [
        "content-type: text/event-stream",
        "cache-control: no-cache",
        "transfer-encoding: chunked",
        "connection: close",
        "date: ",
    ] {
        assert!(head.contains(field), "{field:?} in {head}");
    }
    assert!(!head.contains("content-length"), "{head}");
    // The first chunk: its hex size line, then exactly that many bytes and a CRLF.
    let (size, rest) = body.split_once("\r\n").expect("a chunk size line");
    let size = usize::from_str_radix(size, 16).expect("a hex chunk size");
    assert!(rest.len() >= size + 2, "{rest:?}");
    assert!(rest[..size].starts_with("retry:") || rest[..size].contains("event: subscribed"));
    assert_eq!(&rest[size..size + 2], "\r\n");
    assert_eq!(metric(&broker, HTTP_SUBSCRIBERS).await, 1.0);

    support::http_publish(&url, "raw.h1", "over the raw connection").await;
    read_until(&mut stream, &mut seen, "over the raw connection").await;
    assert_eq!(
        String::from_utf8_lossy(&seen).matches("HTTP/1.1 ").count(),
        1,
        "the pipelined request gets no response on this connection"
    );

    drop(stream);
    support::wait_for("the subscription to end with its connection", || async {
        (metric(&broker, HTTP_SUBSCRIBERS).await == 0.0).then_some(())
    })
    .await;
    broker.stop().await;
}

/// One HTTP/1.1 response read off a raw connection.
#[derive(Debug)]
struct RawResponse {
    status: u16,
    /// Lowercased names, in order.
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl RawResponse {
    fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).expect("a JSON body")
    }

    /// The fields that do not change from one answer to the next.
    fn fixed_headers(&self) -> Vec<(String, String)> {
        let mut fixed: Vec<_> = self
            .headers
            .iter()
            .filter(|(name, _)| name != "date" && name != "content-length")
            .cloned()
            .collect();
        fixed.sort();
        fixed
    }
}

/// Reads the next response (with a `content-length` body) from `stream`; `seen` keeps bytes
/// read past it.
async fn read_response(stream: &mut tokio::net::TcpStream, seen: &mut Vec<u8>) -> RawResponse {
    loop {
        let mut fields = [httparse::EMPTY_HEADER; 32];
        let mut response = httparse::Response::new(&mut fields);
        if let httparse::Status::Complete(head) = response.parse(seen).expect("a valid response") {
            let headers: Vec<(String, String)> = response
                .headers
                .iter()
                .map(|h| {
                    let value = String::from_utf8(h.value.to_vec()).unwrap();
                    (h.name.to_ascii_lowercase(), value)
                })
                .collect();
            let length: usize = headers
                .iter()
                .find(|(name, _)| name == "content-length")
                .map(|(_, value)| value.parse().unwrap())
                .expect("a content-length");
            if seen.len() >= head + length {
                let status = response.code.unwrap();
                let body = seen[head..head + length].to_vec();
                seen.drain(..head + length);
                return RawResponse {
                    status,
                    headers,
                    body,
                };
            }
        }
        read_more(stream, seen, "a whole response").await;
    }
}

/// A keep-alive HTTP/1.1 connection that opens with `POST /topics/` is answered without hyper
/// while it publishes: the answers, pipelined or not, must be the application's, byte for byte
/// but for the date and the message's own fields, and every other request on the connection
/// must still reach the application with none of its bytes lost. Shutdown closes such a
/// connection between requests.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishes_on_a_keep_alive_connection_are_answered_as_the_application_does() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let broker = spawn_broker().await;
    let url = broker.url();
    let mut sse = Sse::open(&url, "/subscribe?topic=lane.*", &[]).await;
    sse.expect("subscribed").await;

    let mut stream = tokio::net::TcpStream::connect(broker.addr).await.unwrap();
    let mut seen = Vec::new();
    // Two publishes in one write, the second without a content type.
    stream
        .write_all(b"POST /topics/lane.a HTTP/1.1\r\nhost: x\r\ncontent-type: text/csv\r\ncontent-length: 3\r\n\r\n1,2POST /topics/lane.a HTTP/1.1\r\nhost: x\r\ncontent-length: 3\r\n\r\ntwo")
        .await
        .unwrap();
    let first = read_response(&mut stream, &mut seen).await;
    let second = read_response(&mut stream, &mut seen).await;
    // Then a publish only the application answers (a query string), another route, and a
    // publish after them.
    stream
        .write_all(b"POST /topics/lane.b?via=app HTTP/1.1\r\nhost: x\r\ncontent-type: text/csv\r\ncontent-length: 5\r\n\r\nthreeGET /topics/lane.a/messages HTTP/1.1\r\nhost: x\r\n\r\nPOST /topics/lane.b HTTP/1.1\r\nhost: x\r\ncontent-length: 4\r\n\r\nfour")
        .await
        .unwrap();
    let third = read_response(&mut stream, &mut seen).await;
    let history = read_response(&mut stream, &mut seen).await;
    let fourth = read_response(&mut stream, &mut seen).await;

    let published = [&first, &second, &third, &fourth];
    for (i, (response, topic)) in published
        .iter()
        .zip(["lane.a", "lane.a", "lane.b", "lane.b"])
        .enumerate()
    {
        assert_eq!(response.status, 200, "{response:?}");
        let json = response.json();
        assert_eq!(json["seq"], i as u64 + 1, "{json}");
        assert_eq!(json["topic"], topic, "{json}");
        let keys: Vec<_> = json.as_object().unwrap().keys().cloned().collect();
        assert_eq!(keys, ["cursor", "published_at", "seq", "topic"], "{json}");
    }
    for response in [&first, &second, &fourth] {
        assert_eq!(response.fixed_headers(), third.fixed_headers());
    }
    assert_eq!(history.status, 200, "{history:?}");
    let messages = history.json()["messages"].clone();
    assert_eq!(messages[0]["payload"], "1,2", "{messages}");
    assert_eq!(messages[0]["headers"]["content-type"], "text/csv");
    assert_eq!(messages[1]["payload"], "two", "{messages}");
    assert!(
        messages[1]["headers"].get("content-type").is_none(),
        "{messages}"
    );
    for (payload, content_type) in [
        ("1,2", Some("text/csv")),
        ("two", None),
        ("three", Some("text/csv")),
        ("four", None),
    ] {
        let message = sse.expect("message").await.json();
        assert_eq!(message["payload"], payload, "{message}");
        assert_eq!(
            message["headers"]["content-type"].as_str(),
            content_type,
            "{message}"
        );
    }

    // A connection that only published, idle when shutdown begins, is closed promptly.
    let mut idle = tokio::net::TcpStream::connect(broker.addr).await.unwrap();
    idle.write_all(b"POST /topics/lane.c HTTP/1.1\r\nhost: x\r\ncontent-length: 4\r\n\r\nidle")
        .await
        .unwrap();
    let mut idle_seen = Vec::new();
    assert_eq!(read_response(&mut idle, &mut idle_seen).await.status, 200);
    let took = broker.stop().await;
    assert!(
        took < std::time::Duration::from_secs(3),
        "shutdown took {took:?}"
    );
    let mut rest = Vec::new();
    within("the idle connection closes", idle.read_to_end(&mut rest))
        .await
        .unwrap();
    assert!(rest.is_empty(), "{}", String::from_utf8_lossy(&rest));
}

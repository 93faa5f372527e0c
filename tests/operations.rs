//! Operating the broker: health, reflection, the committed OpenAPI document, freeing departed
//! subscribers, graceful shutdown with live streams, and slow subscribers never slowing
//! publishers.

mod support;

use std::time::Duration;

use futures_util::StreamExt;
use http_body_util::BodyExt as _;
use support::{Sse, publish_request, spawn_broker, spawn_broker_with, within};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
use topichub::proto::v1::{self, PublishRequest, SubscribeRequest, subscribe_response};

#[tokio::test]
async fn health_reports_serving_for_the_server_and_each_service() {
    let broker = spawn_broker().await;
    let mut health = HealthClient::new(broker.channel().await);
    for service in ["", "topichub.v1.PubSub", "proto.PubSubService"] {
        let response = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap();
        assert_eq!(
            response.into_inner().status(),
            ServingStatus::Serving,
            "{service:?}"
        );
    }
    let unknown = health
        .check(HealthCheckRequest {
            service: "nope.Service".into(),
        })
        .await;
    assert_eq!(unknown.unwrap_err().code(), Code::NotFound);
    let http = support::get_json(&format!("{}/healthz", broker.url())).await;
    assert_eq!(http["status"], "serving");
    broker.stop().await;
}

#[tokio::test]
async fn reflection_lists_every_service_in_v1_and_v1alpha() {
    use tonic_reflection::pb::{v1 as r1, v1alpha as r1a};
    let broker = spawn_broker().await;
    let expected = [
        "topichub.v1.PubSub",
        "proto.PubSubService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
    ];

    let mut v1_client =
        r1::server_reflection_client::ServerReflectionClient::new(broker.channel().await);
    let request = r1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(r1::server_reflection_request::MessageRequest::ListServices(
            String::new(),
        )),
    };
    let mut responses = v1_client
        .server_reflection_info(futures_util::stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let response = within("reflection v1", responses.next())
        .await
        .unwrap()
        .unwrap();
    let Some(r1::server_reflection_response::MessageResponse::ListServicesResponse(list)) =
        response.message_response
    else {
        panic!("unexpected {response:?}")
    };
    let names: Vec<_> = list.service.into_iter().map(|s| s.name).collect();
    for name in expected {
        assert!(
            names.iter().any(|n| n == name),
            "{name} missing from {names:?}"
        );
    }

    let mut alpha =
        r1a::server_reflection_client::ServerReflectionClient::new(broker.channel().await);
    let request = r1a::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            r1a::server_reflection_request::MessageRequest::FileContainingSymbol(
                "topichub.v1.PubSub".into(),
            ),
        ),
    };
    let mut responses = alpha
        .server_reflection_info(futures_util::stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let response = within("reflection v1alpha", responses.next())
        .await
        .unwrap()
        .unwrap();
    let Some(r1a::server_reflection_response::MessageResponse::FileDescriptorResponse(files)) =
        response.message_response
    else {
        panic!("unexpected {response:?}")
    };
    assert!(!files.file_descriptor_proto.is_empty());
    broker.stop().await;
}

#[tokio::test]
async fn committed_openapi_matches_the_generated_and_served_document() {
    let generated = topichub::http::openapi().to_pretty_json().unwrap();
    let committed =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/openapi/openapi.json"))
            .unwrap();
    assert!(
        generated.trim_end() == committed.trim_end(),
        "openapi/openapi.json is out of date; regenerate it with: cargo run -- openapi > openapi/openapi.json"
    );
    let broker = spawn_broker().await;
    let served: serde_json::Value = reqwest::get(format!("{}/openapi.json", broker.url()))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        served,
        serde_json::from_str::<serde_json::Value>(&committed).unwrap()
    );
    // Every HTTP route is documented.
    for path in [
        "/publish",
        "/topics/{topic}",
        "/subscribe",
        "/topics",
        "/topics/{topic}/messages",
        "/healthz",
    ] {
        assert!(
            served["paths"].get(path).is_some(),
            "{path} is not documented"
        );
    }
    let swagger = reqwest::get(format!("{}/swagger-ui/", broker.url()))
        .await
        .unwrap();
    assert_eq!(swagger.status(), 200);
    assert!(swagger.text().await.unwrap().contains("swagger-ui"));
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn departed_subscribers_are_freed_and_empty_topics_forgotten() {
    let broker = spawn_broker_with(|c| c.sse_keepalive = Duration::from_millis(100)).await;
    let topics = || async {
        let list: serde_json::Value = reqwest::get(format!("{}/topics", broker.url()))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        list["topics"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["name"].as_str().unwrap().to_owned())
            .collect::<Vec<_>>()
    };

    // gRPC: the client cancels its stream.
    let stream = broker.grpc_subscribe(&["leave.grpc"]).await;
    broker.wait_for_subscribers(1).await;
    assert_eq!(topics().await, ["leave.grpc"]);
    drop(stream);
    broker.wait_for_subscribers(0).await;
    assert!(
        topics().await.is_empty(),
        "a topic with no subscribers and no messages is forgotten"
    );

    // gRPC: the whole TCP connection goes away.
    let channel = broker.channel().await;
    let _stream = v1::pub_sub_client::PubSubClient::new(channel)
        .subscribe(SubscribeRequest {
            topics: vec!["leave.tcp".into()],
            ..Default::default()
        })
        .await
        .unwrap();
    broker.wait_for_subscribers(1).await;
    drop(_stream);
    broker.wait_for_subscribers(0).await;

    // SSE: the HTTP/1.1 client disconnects.
    let sse = Sse::open(&broker.url(), "/subscribe?topic=leave.sse", &[]).await;
    broker.wait_for_subscribers(1).await;
    drop(sse);
    broker.wait_for_subscribers(0).await;
    assert!(topics().await.is_empty());
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_ends_live_streams_cleanly_and_promptly() {
    let broker = spawn_broker().await;
    let mut grpc = broker.grpc_subscribe(&["bye"]).await;
    let mut seed = topichub::proto::seed::pub_sub_service_client::PubSubServiceClient::new(
        broker.channel().await,
    )
    .subscribe(topichub::proto::seed::SubscribeRequest {
        topic: "bye".into(),
    })
    .await
    .unwrap()
    .into_inner();
    let (_requests, mut connect) = broker.connect_stream(None).await;
    let mut sse = Sse::open(&broker.url(), "/subscribe?topic=bye", &[]).await;
    sse.expect("subscribed").await;
    broker.wait_for_subscribers(3).await;

    let took = broker.stop().await;
    assert!(
        took < Duration::from_secs(3),
        "shutdown took {took:?} with live streams attached"
    );

    let first = within("grpc end", grpc.next()).await.unwrap().unwrap();
    assert!(matches!(
        first.event,
        Some(subscribe_response::Event::Subscribed(_))
    ));
    let end = within("grpc end", grpc.next()).await.unwrap().unwrap_err();
    assert_eq!(end.code(), Code::Unavailable);
    assert!(end.message().contains("shutting down"), "{end:?}");
    assert_eq!(
        within("seed end", seed.next())
            .await
            .unwrap()
            .unwrap_err()
            .code(),
        Code::Unavailable
    );
    assert_eq!(
        within("connect end", connect.next())
            .await
            .unwrap()
            .unwrap_err()
            .code(),
        Code::Unavailable
    );
    let error = sse.expect("end").await.json();
    assert_eq!(error["error"]["code"], "UNAVAILABLE");
    assert!(
        sse.next().await.is_none(),
        "the SSE stream ends after its end event"
    );
}

/// A `PublishBatch` stream left open ends on shutdown like every other live stream, and its
/// status says how much of the batch was published.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_publish_batch_ends_on_shutdown_saying_what_was_published() {
    let broker = spawn_broker().await;
    let mut witness = broker.grpc_subscribe(&["batch"]).await;
    within("subscribed", witness.next()).await.unwrap().unwrap();
    let (messages, rx) = mpsc::channel(4);
    let mut client = broker.grpc().await;
    let batch = tokio::spawn(async move { client.publish_batch(ReceiverStream::new(rx)).await });
    for n in 0..2 {
        messages
            .send(publish_request("batch", format!("#{n}")))
            .await
            .unwrap();
        let delivered = within("delivery", witness.next()).await.unwrap().unwrap();
        assert!(
            matches!(delivered.event, Some(subscribe_response::Event::Message(_))),
            "{delivered:?}"
        );
    }

    // The publisher keeps its stream open and sends nothing more.
    let took = broker.stop().await;
    assert!(
        took < Duration::from_secs(3),
        "shutdown took {took:?} with a publish batch open"
    );
    let end = within("batch end", batch).await.unwrap().unwrap_err();
    assert_eq!(end.code(), Code::Unavailable, "{end:?}");
    assert!(end.message().contains("shutting down"), "{end:?}");
    assert!(
        end.message()
            .contains("the 2 messages before it were published"),
        "{end:?}"
    );
    drop(messages);
}

/// A client that half-closes its `Connect` stream (no more requests) keeps receiving on it;
/// shutdown still ends that stream with its status, and does not wait out the grace period.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_half_closed_connect_stream_keeps_delivering_and_still_ends_on_shutdown() {
    use v1::connect_response::Event as Ev;
    let broker = spawn_broker().await;
    let (requests, mut connect) = broker.connect_subscribed("half", None).await;
    drop(requests);

    // Still delivering after the half-close.
    broker
        .grpc()
        .await
        .publish(publish_request("half", "after half-close"))
        .await
        .unwrap();
    let delivered = within("message", connect.next()).await.unwrap().unwrap();
    let Some(Ev::Message(message)) = delivered.event else {
        panic!("expected the message, got {delivered:?}");
    };
    assert_eq!(&message.payload[..], b"after half-close");

    let took = broker.stop().await;
    assert!(
        took < Duration::from_secs(3),
        "shutdown took {took:?} with a half-closed Connect stream attached"
    );
    let end = within("connect end", connect.next())
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(end.code(), Code::Unavailable);
    assert!(end.message().contains("shutting down"), "{end:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_subscriber_never_blocks_publishers_or_other_subscribers() {
    const MESSAGES: usize = 3_000;
    let broker = spawn_broker_with(|c| c.queue_size = 16).await;
    let request = || SubscribeRequest {
        topics: vec!["flood".into()],
        ..Default::default()
    };
    // Opened, then never read: HTTP/2 windows fill, then its queue of 16, then it lags.
    let _stuck = broker
        .grpc()
        .await
        .subscribe(request())
        .await
        .unwrap()
        .into_inner();
    let mut stuck_sse = support::stuck_sse_subscriber(broker.addr, "/subscribe?topic=flood").await;
    let mut healthy = broker
        .grpc()
        .await
        .subscribe(SubscribeRequest {
            queue_size: 65_536,
            ..request()
        })
        .await
        .unwrap()
        .into_inner();
    broker.wait_for_subscribers(3).await;

    let payload = bytes::Bytes::from(vec![b'x'; 4096]);
    let mut client = broker.grpc().await;
    // A blocked publisher would wait forever; the bound only has to be far above 3,000
    // publishes of a debug build on a loaded 2-core machine (about 10 s at worst seen).
    let publishing = tokio::time::timeout(Duration::from_secs(60), async {
        for _ in 0..MESSAGES {
            client
                .publish(PublishRequest {
                    topic: "flood".into(),
                    payload: payload.clone(),
                    ..Default::default()
                })
                .await
                .unwrap();
        }
    });
    publishing
        .await
        .expect("publishing goes on past a stuck subscriber");

    let mut received = 0;
    let mut last_seq = 0;
    while received < MESSAGES {
        let item = within("healthy subscriber", healthy.next())
            .await
            .unwrap()
            .unwrap();
        match item.event {
            Some(subscribe_response::Event::Message(m)) => {
                let seq = m.cursor.unwrap().seq;
                assert!(seq > last_seq);
                last_seq = seq;
                received += 1;
            }
            Some(subscribe_response::Event::Subscribed(_)) => {}
            other => panic!("the healthy subscriber must not lag: {other:?}"),
        }
    }
    // The stuck SSE subscriber, once it reads, is told it lagged and is caught up from
    // retention: it ends up with every message, in order.
    let mut seqs = Vec::new();
    let mut lagged = false;
    let mut buffer = String::new();
    while seqs.len() < MESSAGES {
        let frame = within("stuck SSE catching up", stuck_sse.body.frame())
            .await
            .unwrap()
            .unwrap();
        let Ok(chunk) = frame.into_data() else {
            continue;
        };
        buffer.push_str(std::str::from_utf8(&chunk).unwrap());
        while let Some(end) = buffer.find("\n\n") {
            let block: String = buffer.drain(..end + 2).collect();
            if block.contains("event: lag") {
                lagged = true;
            }
            if block.contains("event: message") {
                let id = block.lines().find_map(|l| l.strip_prefix("id: ")).unwrap();
                seqs.push(id.rsplit_once('-').unwrap().1.parse::<u64>().unwrap());
            }
        }
    }
    assert!(lagged, "a subscriber that overflowed its queue is told so");
    assert!(
        seqs.windows(2).all(|w| w[0] + 1 == w[1]),
        "caught up with no gap and no duplicate"
    );
    broker.stop().await;
}

#[tokio::test]
async fn browsers_on_other_origins_may_call_grpc_web_and_the_http_api() {
    let broker = spawn_broker().await;
    let http = reqwest::Client::new();
    for (path, headers) in [
        (
            "/topichub.v1.PubSub/Publish",
            "content-type,x-grpc-web,x-user-agent",
        ),
        ("/publish", "content-type"),
    ] {
        let preflight = http
            .request(reqwest::Method::OPTIONS, format!("{}{path}", broker.url()))
            .header("origin", "https://app.example")
            .header("access-control-request-method", "POST")
            .header("access-control-request-headers", headers)
            .send()
            .await
            .unwrap();
        assert!(
            preflight.status().is_success(),
            "{path}: {}",
            preflight.status()
        );
        assert_eq!(
            preflight.headers()["access-control-allow-origin"],
            "*",
            "{path}"
        );
    }
    let response = http
        .post(format!("{}/publish", broker.url()))
        .header("origin", "https://app.example")
        .json(&serde_json::json!({"topic": "cors", "payload": "x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.headers()["access-control-allow-origin"], "*");
    broker.stop().await;
}

/// Keepalive enforcement like the seed's (`MinTime`): a client that pings too often gets
/// GOAWAY(ENHANCE_YOUR_CALM, "too_many_pings") and is disconnected; others are unaffected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_ping_too_often_are_sent_goaway_and_disconnected() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let broker = spawn_broker().await;
    let frame = |kind: u8, flags: u8, payload: &[u8]| {
        let mut out = (payload.len() as u32).to_be_bytes()[1..].to_vec();
        out.extend_from_slice(&[kind, flags, 0, 0, 0, 0]);
        out.extend_from_slice(payload);
        out
    };
    let mut stream = tokio::net::TcpStream::connect(broker.addr).await.unwrap();
    let mut hello = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    hello.extend(frame(0x4, 0, &[])); // SETTINGS
    stream.write_all(&hello).await.unwrap();
    for i in 0..4u8 {
        stream.write_all(&frame(0x6, 0, &[i; 8])).await.unwrap(); // PING, back to back
    }
    // Read frames until GOAWAY, then the connection must close.
    let mut received = Vec::new();
    within("goaway and close", async {
        let mut chunk = [0u8; 4096];
        loop {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => received.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await;
    let mut goaway = None;
    let mut rest = &received[..];
    while rest.len() >= 9 {
        let length = u32::from_be_bytes([0, rest[0], rest[1], rest[2]]) as usize;
        let (kind, payload) = (rest[3], &rest[9..9 + length]);
        if kind == 0x7 {
            goaway = Some(payload.to_vec());
        }
        rest = &rest[9 + length..];
    }
    let goaway = goaway.expect("a GOAWAY frame before the close");
    assert_eq!(
        u32::from_be_bytes(goaway[4..8].try_into().unwrap()),
        0xb,
        "ENHANCE_YOUR_CALM"
    );
    assert_eq!(&goaway[8..], b"too_many_pings");

    // Ordinary gRPC clients keep working.
    let mut health = HealthClient::new(broker.channel().await);
    let response = health
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap();
    assert_eq!(response.into_inner().status(), ServingStatus::Serving);
    broker.stop().await;
}

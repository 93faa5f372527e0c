//! Limits: connections, subscriptions per connection, topics per subscription, publish rate per
//! client, and slow (slowloris) clients. Every refusal is RESOURCE_EXHAUSTED / 429 (or 408 for a
//! body that never arrives) and names the limit's option; others keep being served.

mod support;

use std::time::Duration;

use futures_util::StreamExt;
use reqwest::StatusCode;
use support::{Sse, publish_request, spawn_broker_with, within};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::Code;
use topichub::proto::v1::SubscribeRequest;

fn subscribe(topics: &[&str]) -> SubscribeRequest {
    SubscribeRequest {
        topics: topics.iter().map(|t| t.to_string()).collect(),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_the_limit_are_told_why() {
    let broker = spawn_broker_with(|c| c.max_connections = 2).await;
    let url = broker.url();
    let first = Sse::open(&url, "/subscribe?topic=a", &[]).await;
    let second = Sse::open(&url, "/subscribe?topic=a", &[]).await;

    let response = reqwest::get(format!("{url}/healthz")).await.unwrap();
    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(response.headers()["connection"], "close");
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "RESOURCE_EXHAUSTED");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("--max-connections 2"),
        "{body}"
    );
    let grpc = broker.grpc().await.publish(publish_request("a", "x")).await;
    let status = grpc.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert!(status.message().contains("--max-connections"), "{status:?}");

    drop((first, second));
    support::wait_for("a free connection slot", || async {
        let response = reqwest::get(format!("{url}/healthz")).await.ok()?;
        (response.status() == StatusCode::OK).then_some(())
    })
    .await;
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriptions_per_connection_and_topics_per_subscription_are_bounded() {
    let broker = spawn_broker_with(|c| {
        c.max_subscriptions_per_connection = 2;
        c.max_topics_per_subscription = 3;
    })
    .await;
    let mut client = broker.grpc().await; // one HTTP/2 connection
    let first = client
        .subscribe(subscribe(&["s"]))
        .await
        .unwrap()
        .into_inner();
    let _second = client
        .subscribe(subscribe(&["s"]))
        .await
        .unwrap()
        .into_inner();
    let third = client.subscribe(subscribe(&["s"])).await.unwrap_err();
    assert_eq!(third.code(), Code::ResourceExhausted);
    assert!(
        third
            .message()
            .contains("--max-subscriptions-per-connection 2"),
        "{third:?}"
    );
    // Another connection has its own allowance.
    broker
        .grpc()
        .await
        .subscribe(subscribe(&["s"]))
        .await
        .unwrap();
    // A slot frees when its stream ends.
    drop(first);
    support::wait_for("a freed subscription slot", || {
        let mut client = client.clone();
        async move { client.subscribe(subscribe(&["s"])).await.ok() }
    })
    .await;

    let too_many = broker
        .grpc()
        .await
        .subscribe(subscribe(&["a", "b", "c", "d"]))
        .await
        .unwrap_err();
    assert_eq!(too_many.code(), Code::ResourceExhausted);
    assert!(
        too_many.message().contains("at most 3 topics"),
        "{too_many:?}"
    );
    let response = reqwest::get(format!(
        "{}/subscribe?topic=a&topic=b&topic=c&topic=d",
        broker.url()
    ))
    .await
    .unwrap();
    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishers_over_their_rate_are_refused_or_paced() {
    // One message a second: the allowance refills slowly enough that the steps below, run right
    // after the burst is spent, still find it empty on a loaded machine.
    let broker = spawn_broker_with(|c| {
        c.publish_rate = 1;
        c.publish_burst = 5;
    })
    .await;
    let mut client = broker.grpc().await;
    let mut refused = None;
    for _ in 0..6 {
        if let Err(status) = client.publish(publish_request("rate", "x")).await {
            refused = Some(status);
            break;
        }
    }
    let refused = refused.expect("the sixth publish in a burst of 5 is refused");
    assert_eq!(refused.code(), Code::ResourceExhausted);
    assert!(
        refused.message().contains("faster than 1 messages/s"),
        "{refused:?}"
    );
    assert!(refused.message().contains("--publish-rate"), "{refused:?}");
    // HTTP publishes from the same client share its allowance.
    let response = reqwest::Client::new()
        .post(format!("{}/publish", broker.url()))
        .json(&serde_json::json!({"topic": "rate", "payload": "x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    // So do raw publishes, on a connection of their own; each refusal is counted once.
    const RATE_HITS: &str = r#"topichub_limit_hits_total{limit="publish-rate"}"#;
    let hits = support::metric(&broker, RATE_HITS).await;
    let response = reqwest::Client::new()
        .post(format!("{}/topics/rate", broker.url()))
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    assert!(response.text().await.unwrap().contains("--publish-rate"));
    assert_eq!(support::metric(&broker, RATE_HITS).await, hits + 1.0);

    // A batch is paced, not failed: 3 messages at 1/s after an empty burst take >= 1.5 s.
    let started = std::time::Instant::now();
    let batch = futures_util::stream::iter((0..3).map(|_| publish_request("rate", "x")));
    let reply = within("paced batch", client.publish_batch(batch))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.accepted, 3);
    assert!(
        started.elapsed() >= Duration::from_millis(1500),
        "the limiter paced the batch"
    );
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_clients_cannot_hold_connections() {
    let broker = spawn_broker_with(|c| {
        c.http_header_timeout = Duration::from_millis(300);
        c.http_body_timeout = Duration::from_millis(300);
    })
    .await;
    // A connection that never sends a byte: closed too.
    let mut silent = tokio::net::TcpStream::connect(broker.addr).await.unwrap();
    let mut nothing = Vec::new();
    let read = within("silent connection closes", silent.read_to_end(&mut nothing)).await;
    assert!(read.is_ok() && nothing.is_empty(), "{read:?} {nothing:?}");

    // A keep-alive connection left idle after a publish: answered, then closed.
    let mut idle = tokio::net::TcpStream::connect(broker.addr).await.unwrap();
    idle.write_all(b"POST /topics/idle HTTP/1.1\r\nhost: x\r\ncontent-length: 1\r\n\r\nx")
        .await
        .unwrap();
    let mut answered = Vec::new();
    within("idle connection closes", idle.read_to_end(&mut answered))
        .await
        .unwrap();
    let answered = String::from_utf8_lossy(&answered);
    assert!(answered.starts_with("HTTP/1.1 200 OK"), "{answered}");

    // Headers that never finish: the connection is closed.
    let mut slow_headers = tokio::net::TcpStream::connect(broker.addr).await.unwrap();
    slow_headers
        .write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n")
        .await
        .unwrap();
    let mut buffer = Vec::new();
    within(
        "header timeout closes",
        slow_headers.read_to_end(&mut buffer),
    )
    .await
    .unwrap();

    // A body that never finishes: 408 naming the option.
    let mut slow_body = tokio::net::TcpStream::connect(broker.addr).await.unwrap();
    slow_body
        .write_all(b"POST /topics/slow HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\nonly part")
        .await
        .unwrap();
    let mut response = Vec::new();
    within("body timeout answers", slow_body.read_to_end(&mut response))
        .await
        .unwrap();
    let response = String::from_utf8_lossy(&response);
    assert!(response.starts_with("HTTP/1.1 408"), "{response}");
    assert!(response.contains("--http-body-timeout"), "{response}");

    let health = reqwest::get(format!("{}/healthz", broker.url()))
        .await
        .unwrap();
    assert_eq!(
        health.status(),
        StatusCode::OK,
        "others are served meanwhile"
    );
    broker.stop().await;
}

/// More than hyper's default of 200 concurrent HTTP/2 streams on one connection: the 250th
/// subscription opens, and the limit's own error comes only past the configured limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_connection_carries_hundreds_of_subscriptions_up_to_the_limit() {
    let broker = spawn_broker_with(|c| c.max_subscriptions_per_connection = 250).await;
    let mut client = broker.grpc().await;
    let mut streams = Vec::new();
    for _ in 0..250 {
        let stream = within("a subscription", client.subscribe(subscribe(&["many"])))
            .await
            .unwrap();
        streams.push(stream.into_inner());
    }
    let refused = within("the 251st", client.subscribe(subscribe(&["many"])))
        .await
        .unwrap_err();
    assert!(
        refused
            .message()
            .contains("--max-subscriptions-per-connection 250"),
        "{refused:?}"
    );
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_streams_count_against_their_connection() {
    let broker = spawn_broker_with(|c| c.max_subscriptions_per_connection = 1).await;
    // HTTP/1.1 carries one stream per connection, so SSE subscribers are never refused for it.
    let mut a = Sse::open(&broker.url(), "/subscribe?topic=x", &[]).await;
    let mut b = Sse::open(&broker.url(), "/subscribe?topic=x", &[]).await;
    a.expect("subscribed").await;
    b.expect("subscribed").await;
    let stream = broker
        .grpc()
        .await
        .subscribe(subscribe(&["x"]))
        .await
        .unwrap()
        .into_inner();
    let mut stream = stream;
    within("grpc subscribed", stream.next())
        .await
        .unwrap()
        .unwrap();
    broker.stop().await;
}

//! `/metrics`: Prometheus text with publishes and deliveries per door, subscribers, retention,
//! latency, limit hits and auth failures, each checked against what the test did.

mod support;

use futures_util::StreamExt;
use support::{Sse, metric, publish_request, spawn_broker_with, within};
use topichub::proto::seed;
use topichub::proto::v1::subscribe_response;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_what_every_door_did() {
    let broker = spawn_broker_with(|c| c.max_payload_bytes = 100).await;
    let url = broker.url();
    let mut grpc = broker.grpc_subscribe(&["m.>"]).await;
    let mut sse = Sse::open(&url, "/subscribe?topic=m.%3E", &[]).await;
    sse.expect("subscribed").await;
    let mut seed_client =
        seed::pub_sub_service_client::PubSubServiceClient::new(broker.channel().await);
    let _seed_stream = seed_client
        .subscribe(seed::SubscribeRequest {
            topic: "m.*".into(),
        })
        .await
        .unwrap();
    broker.wait_for_subscribers(3).await;
    assert_eq!(
        metric(&broker, r#"topichub_subscribers{door="grpc"}"#).await,
        1.0
    );
    assert_eq!(
        metric(&broker, r#"topichub_subscribers{door="http"}"#).await,
        1.0
    );
    assert_eq!(
        metric(&broker, r#"topichub_subscribers{door="seed"}"#).await,
        1.0
    );

    support::http_publish(&url, "m.http", "one").await;
    broker
        .grpc()
        .await
        .publish(publish_request("m.grpc", "two"))
        .await
        .unwrap();
    seed_client
        .publish(seed::PublishRequest {
            topic: "m.seed".into(),
            payload: b"three".to_vec().into(),
        })
        .await
        .unwrap();
    let mut got = 0;
    while got < 3 {
        if let Some(subscribe_response::Event::Message(_)) =
            within("grpc", grpc.next()).await.unwrap().unwrap().event
        {
            got += 1;
        }
    }
    for _ in 0..3 {
        sse.expect("message").await;
    }

    for door in ["grpc", "http", "seed"] {
        assert_eq!(
            metric(
                &broker,
                &format!(r#"topichub_publishes_total{{door="{door}"}}"#)
            )
            .await,
            1.0,
            "{door}"
        );
    }
    assert_eq!(
        metric(&broker, r#"topichub_deliveries_total{door="grpc"}"#).await,
        3.0
    );
    assert_eq!(
        metric(&broker, r#"topichub_deliveries_total{door="http"}"#).await,
        3.0
    );
    assert!(metric(&broker, "topichub_publish_to_deliver_seconds_count").await >= 6.0);
    assert_eq!(metric(&broker, "topichub_head_seq").await, 3.0);
    assert_eq!(metric(&broker, "topichub_retained_messages").await, 3.0);
    assert_eq!(metric(&broker, "topichub_topics").await, 3.0);
    assert!(metric(&broker, "topichub_connections").await >= 3.0);

    // A refusal by a limit is counted under the limit's option name.
    let response = reqwest::Client::new()
        .post(format!("{url}/topics/m.big"))
        .body(vec![b'x'; 101])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 413);
    assert_eq!(
        metric(
            &broker,
            r#"topichub_limit_hits_total{limit="max-payload-bytes"}"#
        )
        .await,
        1.0
    );

    // Subscribers that leave are no longer counted.
    drop(grpc);
    drop(sse);
    broker.wait_for_subscribers(1).await;
    assert_eq!(
        metric(&broker, r#"topichub_subscribers{door="grpc"}"#).await,
        0.0
    );
    assert_eq!(
        metric(&broker, r#"topichub_subscribers{door="http"}"#).await,
        0.0
    );
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_stay_open_and_count_auth_failures() {
    let broker =
        spawn_broker_with(|c| c.jwt_secret = Some("a secret of at least thirty-two bytes".into()))
            .await;
    let refused = reqwest::Client::new()
        .post(format!("{}/publish", broker.url()))
        .json(&serde_json::json!({"topic": "a", "payload": "x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 401);
    let refused = broker.grpc().await.publish(publish_request("a", "")).await;
    assert!(refused.is_err());
    assert_eq!(metric(&broker, "topichub_auth_failures_total").await, 2.0);
    broker.stop().await;
}

/// Connections are counted per door, by their first request; gRPC-Web is its own door, for
/// connections and for publishes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_and_grpc_web_are_counted_per_door() {
    let broker = spawn_broker_with(|_| {}).await;
    let url = broker.url();
    let door = |name: &str| format!(r#"topichub_connections_by_door{{door="{name}"}}"#);

    // gRPC (HTTP/2), gRPC-Web (HTTP/1.1), an SSE stream and a kept-alive HTTP client.
    let mut grpc = broker.grpc().await;
    grpc.publish(publish_request("c.grpc", "one"))
        .await
        .unwrap();
    let mut grpc_web = support::grpc_web(&broker);
    grpc_web
        .publish(publish_request("c.web", "two"))
        .await
        .unwrap();
    let mut sse = Sse::open(&url, "/subscribe?topic=c.%3E", &[]).await;
    sse.expect("subscribed").await;
    let http = reqwest::Client::new();
    let response = http
        .post(format!("{url}/publish"))
        .json(&serde_json::json!({ "topic": "c.http", "payload": "three" }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);

    assert_eq!(metric(&broker, &door("grpc")).await, 1.0);
    assert_eq!(metric(&broker, &door("grpc-web")).await, 1.0);
    assert_eq!(metric(&broker, &door("sse")).await, 1.0);
    // The kept-alive client, and the scrape's own connection.
    assert!(metric(&broker, &door("http")).await >= 1.0);
    assert_eq!(
        metric(&broker, r#"topichub_publishes_total{door="grpc-web"}"#).await,
        1.0
    );
    assert_eq!(
        metric(&broker, r#"topichub_publishes_total{door="grpc"}"#).await,
        1.0
    );

    // A closed connection leaves its door's count.
    drop(grpc);
    drop(grpc_web);
    drop(sse);
    for name in ["grpc", "grpc-web", "sse"] {
        support::wait_for(&format!("{name} connection closed"), || async {
            (metric(&broker, &door(name)).await == 0.0).then_some(())
        })
        .await;
    }
    drop(http);
    broker.stop().await;
}

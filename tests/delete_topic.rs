//! Deleting a topic (`DELETE /topics/{topic}`, the `DeleteTopic` RPC) over the real protocols:
//! its history is purged, the subscriptions naming it end with a clear `deleted` event (SSE,
//! WebSocket) or ABORTED (gRPC), pattern subscriptions continue and a resume over the purged
//! range gets a `gap`; on disk the deletion survives a restart; with authentication on it takes
//! the admin claim.

mod support;

use serde_json::{Value, json};
use support::{
    Backend, Broker, BrokerProcess, Sse, Ws, fresh_data_dir, get_json, http_publish, spawn_broker,
    spawn_broker_on, spawn_broker_with, within, ws_open, ws_recv, ws_subscribe,
};
use tonic::Code;
use topichub::proto::v1;

const SECRET: &str = "delete-topic-test-secret";

async fn history(broker: &Broker, topic: &str, query: &str) -> Value {
    get_json(&format!("{}/topics/{topic}/messages{query}", broker.url())).await
}

async fn ws_subscribed(broker: &Broker, topics: &[&str]) -> Ws {
    let mut ws = ws_open(broker).await;
    ws_subscribe(&mut ws, 1, json!({"topics": topics})).await;
    ws
}

#[tokio::test]
async fn deleting_a_topic_purges_it_and_ends_exact_subscribers_on_every_door() {
    for backend in [Backend::Memory, Backend::Disk] {
        let broker = spawn_broker_on(backend, |_| {}).await;
        let url = broker.url();
        for n in 1..=3 {
            http_publish(&url, "orders.doomed", &format!("m{n}")).await;
        }
        http_publish(&url, "orders.kept", "other").await;
        let mut sse = Sse::open(&url, "/subscribe?topic=orders.doomed", &[]).await;
        sse.expect("subscribed").await;
        let mut pattern = Sse::open(&url, "/subscribe?topic=orders.*", &[]).await;
        pattern.expect("subscribed").await;
        let mut grpc = broker.grpc_subscribe(&["orders.doomed"]).await;
        let first = within("subscribed", grpc.message()).await.unwrap().unwrap();
        assert!(matches!(
            first.event,
            Some(v1::subscribe_response::Event::Subscribed(_))
        ));
        let mut ws = ws_subscribed(&broker, &["orders.doomed"]).await;
        broker.wait_for_subscribers(4).await;

        let (status, body) = support::delete_topic(&broker.url(), "orders.doomed", None).await;
        assert_eq!(status, 200, "{backend:?}: {body}");
        assert_eq!(body["topic"], "orders.doomed");
        assert_eq!(body["purged_messages"], 3, "{backend:?}: {body}");
        assert_eq!(body["ended_subscriptions"], 3, "{backend:?}: {body}");

        // SSE: a `deleted` event, then the stream ends.
        let deleted = sse.expect("deleted").await.json();
        assert_eq!(deleted["topic"], "orders.doomed");
        assert!(
            deleted["message"].as_str().unwrap().contains("was deleted"),
            "{deleted}"
        );
        assert!(sse.next().await.is_none(), "the SSE stream ends");
        // gRPC: ABORTED, saying why.
        let status = within("the gRPC stream to end", grpc.message())
            .await
            .expect_err("the gRPC stream ends with a status");
        assert_eq!(status.code(), Code::Aborted, "{status:?}");
        assert!(status.message().contains("was deleted"), "{status:?}");
        // WebSocket: `deleted`, then `unsubscribed` with the reason.
        let frame = ws_recv(&mut ws).await;
        assert_eq!(frame["deleted"]["topic"], "orders.doomed", "{frame}");
        let frame = ws_recv(&mut ws).await;
        assert_eq!(frame["unsubscribed"]["reason"], "deleted", "{frame}");

        // The history is gone; the other topic is untouched.
        let page = history(&broker, "orders.doomed", "").await;
        assert_eq!(page["messages"], json!([]), "{backend:?}: {page}");
        let kept = history(&broker, "orders.kept", "").await;
        assert_eq!(kept["messages"].as_array().unwrap().len(), 1);

        // The pattern subscription continues, also on the deleted topic's name.
        let again = http_publish(&url, "orders.doomed", "reborn").await;
        let message = pattern.expect("message").await.json();
        assert_eq!(message["seq"], again["seq"], "{message}");

        // A resume over the purged range is told of it.
        let epoch = broker.epoch().await;
        let resumed = Sse::open(
            &url,
            &format!("/subscribe?topic=orders.*&last_event_id={epoch}-0"),
            &[],
        )
        .await;
        let mut resumed = resumed;
        resumed.expect("subscribed").await;
        let gap = resumed.expect("gap").await.json();
        assert_eq!(gap["from_seq"], 1, "{gap}");
        assert!(
            gap["to_seq"].as_u64().unwrap() >= 3,
            "covers seqs 1-3: {gap}"
        );
        broker.stop().await;
    }
}

/// A broker process on `dir`, as a client sees it.
struct OnDisk {
    process: BrokerProcess,
    url: String,
}

impl OnDisk {
    async fn start(dir: &std::path::Path) -> OnDisk {
        let process = BrokerProcess::start(&["--data-dir", dir.to_str().unwrap()], "info").await;
        let url = format!("http://{}", process.addr);
        OnDisk { process, url }
    }
}

#[tokio::test]
async fn a_deleted_topic_stays_deleted_after_a_restart_on_disk() {
    let dir = fresh_data_dir("delete-restart");
    let broker = OnDisk::start(&dir).await;
    for n in 1..=3 {
        http_publish(&broker.url, "gone", &format!("m{n}")).await;
    }
    let kept = http_publish(&broker.url, "stays", "s").await;
    let epoch = get_json(&format!("{}/healthz", broker.url)).await["epoch"]
        .as_str()
        .unwrap()
        .to_owned();
    let response = reqwest::Client::new()
        .delete(format!("{}/topics/gone", broker.url))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    broker.process.stop().await;

    let broker = OnDisk::start(&dir).await;
    let health = get_json(&format!("{}/healthz", broker.url)).await;
    assert_eq!(health["epoch"], epoch.as_str(), "the same history");
    let history = |query: String| {
        let url = format!("{}/topics/gone/messages{query}", broker.url);
        async move { get_json(&url).await }
    };
    let page = history(String::new()).await;
    assert_eq!(page["messages"], json!([]), "nothing comes back: {page}");
    let resumed = history(format!("?after={epoch}-0")).await;
    assert_eq!(resumed["gap"]["from_seq"], 1, "{resumed}");
    assert_eq!(resumed["gap"]["to_seq"], 3, "{resumed}");
    assert_eq!(resumed["messages"], json!([]), "{resumed}");
    let stays = get_json(&format!("{}/topics/stays/messages", broker.url)).await;
    assert_eq!(stays["messages"][0]["seq"], kept["seq"], "{stays}");
    broker.process.stop().await;
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn delete_topic_rpc_and_unknown_topics() {
    let broker = spawn_broker().await;
    let mut client = broker.grpc().await;
    client
        .publish(support::publish_request("rpc.t", "x"))
        .await
        .unwrap();
    let deleted = client
        .delete_topic(v1::DeleteTopicRequest {
            topic: "rpc.t".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(deleted.purged_messages, 1);
    assert_eq!(deleted.ended_subscriptions, 0);
    let again = client
        .delete_topic(v1::DeleteTopicRequest {
            topic: "rpc.t".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(again.code(), Code::NotFound, "{again:?}");
    let wildcard = client
        .delete_topic(v1::DeleteTopicRequest {
            topic: "rpc.*".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(wildcard.code(), Code::InvalidArgument, "{wildcard:?}");
    let (status, body) = support::delete_topic(&broker.url(), "never.seen", None).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (404, Some("NOT_FOUND"))
    );
    broker.stop().await;
}

fn token(admin: bool) -> String {
    support::operator_or_worker_token(SECRET, admin)
}

#[tokio::test]
async fn deleting_takes_the_admin_claim_when_authentication_is_on() {
    let broker = spawn_broker_with(|c| c.jwt_secret = Some(SECRET.into())).await;
    let (worker, operator) = (token(false), token(true));
    let published = support::publish_as(&broker.url(), "guarded", "x", &worker).await;
    assert_eq!(published, 200);

    let (status, body) = support::delete_topic(&broker.url(), "guarded", None).await;
    assert_eq!(status, 401, "{body}");
    let (status, body) = support::delete_topic(&broker.url(), "guarded", Some(&worker)).await;
    assert_eq!(status, 403, "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("\"admin\": true"), "{message}");

    let mut client = broker.grpc().await;
    let mut request = tonic::Request::new(v1::DeleteTopicRequest {
        topic: "guarded".into(),
    });
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {worker}").parse().unwrap());
    let refused = client.delete_topic(request).await.unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");

    let (status, body) = support::delete_topic(&broker.url(), "guarded", Some(&operator)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["purged_messages"], 1);
    broker.stop().await;
}

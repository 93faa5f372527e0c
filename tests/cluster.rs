//! Cluster mode (`--nats`): several topichub processes on one NATS JetStream stream act as one
//! hub. Real `nats-server -js` processes (a 3-node JetStream cluster where failover matters),
//! real topichub processes, SIGKILL for failures.
//!
//! Needs `/usr/sbin/nats-server` (Debian's `nats-server`, installed by `scripts/deps-nats.sh`).

mod support;

use std::time::Duration;

use futures_util::StreamExt as _;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use topichub::proto::v1;

use support::{BrokerProcess, NatsCluster, Sse, http_publish, wait_serving, within};

/// A topichub node on `nats` (urls), serving.
async fn node(urls: &str, extra: &[&str]) -> BrokerProcess {
    support::cluster_node(urls, extra).await
}

/// The gRPC health status of the server as a whole.
async fn grpc_health(node: &BrokerProcess) -> ServingStatus {
    let channel = tonic::transport::Channel::from_shared(node.url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .status()
}

/// Waits (bounded) until the node's gRPC health is `status`.
async fn wait_health(node: &BrokerProcess, status: ServingStatus) {
    support::wait_for(&format!("gRPC health {status:?}"), || async {
        (grpc_health(node).await == status).then_some(())
    })
    .await;
}

/// The next `message` event (seq, cursor), failing on anything else but `cluster` events (a
/// node that lost NATS for a while says so; tests/cluster_failures.rs covers them).
async fn next_message(sse: &mut Sse) -> (u64, String) {
    let json = sse.next_message().await.json();
    (
        json["seq"].as_u64().unwrap(),
        json["cursor"].as_str().unwrap().to_owned(),
    )
}

/// A publish that may fail (during failures): the answer, or `None`.
async fn try_publish(
    client: &reqwest::Client,
    url: &str,
    topic: &str,
    payload: &str,
) -> Option<serde_json::Value> {
    let response = client
        .post(format!("{url}/publish"))
        .json(&serde_json::json!({ "topic": topic, "payload": payload }))
        .timeout(Duration::from_secs(20))
        .send()
        .await
        .ok()?;
    if response.status() != 200 {
        return None;
    }
    response.json().await.ok()
}

#[tokio::test]
async fn a_message_published_on_one_node_has_the_same_seq_and_cursor_on_every_node() {
    let nats = NatsCluster::start(3).await;
    let urls = nats.urls();
    let replicas = ["--nats-replicas", "3"];
    let (a, b, c) = tokio::join!(
        node(&urls, &replicas),
        node(&urls, &replicas),
        node(&urls, &replicas)
    );
    let mut on_b = Sse::open(&b.url(), "/subscribe?topic=orders.%3E", &[]).await;
    on_b.expect("subscribed").await;
    let mut on_c = Sse::open(&c.url(), "/subscribe?topic=orders.%3E", &[]).await;
    on_c.expect("subscribed").await;

    let mut published = Vec::new();
    for i in 0..20 {
        let answer = http_publish(&a.url(), &format!("orders.{}", i % 3), &i.to_string()).await;
        published.push((
            answer["seq"].as_u64().unwrap(),
            answer["cursor"].as_str().unwrap().to_owned(),
        ));
    }
    let seqs: Vec<u64> = published.iter().map(|(s, _)| *s).collect();
    assert_eq!(seqs, (1..=20).collect::<Vec<_>>(), "stream sequences");
    for sse in [&mut on_b, &mut on_c] {
        for expected in &published {
            assert_eq!(&next_message(sse).await, expected);
        }
    }

    // A cursor from B resumes on C with nothing missing and nothing twice.
    let (_, cursor) = &published[9];
    let mut resumed = Sse::open(
        &c.url(),
        &format!("/subscribe?topic=orders.%3E&last_event_id={cursor}"),
        &[],
    )
    .await;
    resumed.expect("subscribed").await;
    for expected in &published[10..] {
        assert_eq!(&next_message(&mut resumed).await, expected);
    }

    // A cursor fresh from A is good on C at once: C waits until it applied it.
    let client = reqwest::Client::new();
    for i in 0..20 {
        let answer = http_publish(&a.url(), "orders.fresh", &i.to_string()).await;
        let cursor = answer["cursor"].as_str().unwrap();
        let read = client
            .get(format!(
                "{}/topics/orders.fresh/messages?after={cursor}",
                c.url()
            ))
            .send()
            .await
            .unwrap();
        assert_eq!(read.status(), 200, "{}", read.text().await.unwrap());
    }

    // A cursor beyond the stream is refused as such, on any node.
    let epoch = cursor.split('-').next().unwrap();
    let ahead = reqwest::get(format!(
        "{}/topics/orders.1/messages?after={epoch}-999",
        c.url()
    ))
    .await
    .unwrap();
    assert_eq!(ahead.status(), 400);
}

/// Nodes that create a new stream at the same moment end up on one epoch. (A create request for
/// a stream still electing its leader is applied again by nats-server, and the stream takes the
/// later request's time: a node must not take the first time it reads as the epoch.)
#[tokio::test]
async fn nodes_creating_a_new_stream_at_once_agree_on_its_epoch() {
    let nats = NatsCluster::start(3).await;
    let urls = nats.urls();
    for round in 0..3 {
        let (name, prefix) = (format!("FRESH{round}"), format!("fresh{round}"));
        let extra = [
            "--nats-replicas",
            "3",
            "--nats-stream",
            &name,
            "--nats-subject-prefix",
            &prefix,
        ];
        let nodes = tokio::join!(
            node(&urls, &extra),
            node(&urls, &extra),
            node(&urls, &extra)
        );
        let mut epochs = Vec::new();
        for node in [&nodes.0, &nodes.1, &nodes.2] {
            let answer = http_publish(&node.url(), "fresh", "x").await;
            let cursor = answer["cursor"].as_str().unwrap().to_owned();
            epochs.push(cursor.rsplit_once('-').unwrap().0.to_owned());
        }
        assert!(
            epochs.iter().all(|e| *e == epochs[0]),
            "round {round}: {epochs:?}"
        );
    }
}

#[tokio::test]
async fn killing_the_stream_leader_mid_stream_loses_no_acknowledged_message() {
    let mut nats = NatsCluster::start(3).await;
    let urls = nats.urls();
    let replicas = ["--nats-replicas", "3"];
    let (a, b) = tokio::join!(node(&urls, &replicas), node(&urls, &replicas));
    let mut on_b = Sse::open(&b.url(), "/subscribe?topic=t", &[]).await;
    on_b.expect("subscribed").await;

    let client = reqwest::Client::new();
    let mut acked = Vec::new();
    const TOTAL: usize = 120;
    for i in 0..TOTAL {
        if i == 40 {
            let leader = nats.stream_leader("TOPICHUB").await;
            nats.kill(leader);
        }
        if let Some(answer) = try_publish(&client, &a.url(), "t", &i.to_string()).await {
            acked.push(answer["seq"].as_u64().unwrap());
        }
    }
    assert!(
        acked.len() >= TOTAL - 10,
        "publishes stall for the election rather than fail: {} of {TOTAL} acknowledged",
        acked.len()
    );
    let last = *acked.last().unwrap();
    let mut received = Vec::new();
    while received.last() != Some(&last) {
        received.push(next_message(&mut on_b).await.0);
    }
    assert!(
        received.windows(2).all(|w| w[0] < w[1]),
        "in order, no duplicate: {received:?}"
    );
    let missing: Vec<_> = acked.iter().filter(|s| !received.contains(s)).collect();
    assert!(
        missing.is_empty(),
        "acknowledged but not delivered: {missing:?}"
    );
}

#[tokio::test]
async fn a_killed_node_s_subscriber_resumes_on_another_node_without_loss() {
    let nats = NatsCluster::start(1).await;
    let urls = nats.urls();
    let (a, mut b, c) = tokio::join!(node(&urls, &[]), node(&urls, &[]), node(&urls, &[]));
    let mut on_b = Sse::open(&b.url(), "/subscribe?topic=t", &[]).await;
    on_b.expect("subscribed").await;
    for i in 0..5 {
        http_publish(&a.url(), "t", &i.to_string()).await;
    }
    let mut last = String::new();
    for seq in 1..=5 {
        let (got, cursor) = next_message(&mut on_b).await;
        assert_eq!(got, seq);
        last = cursor;
    }
    b.child.start_kill().unwrap();
    b.child.wait().await.unwrap();
    // Published while the subscriber is away.
    for i in 5..10 {
        http_publish(&a.url(), "t", &i.to_string()).await;
    }
    let mut on_c = Sse::open(
        &c.url(),
        &format!("/subscribe?topic=t&last_event_id={last}"),
        &[],
    )
    .await;
    on_c.expect("subscribed").await;
    for seq in 6..=10 {
        assert_eq!(next_message(&mut on_c).await.0, seq);
    }

    // The same cursor through another door of C: gRPC.
    let (epoch, seq) = last.rsplit_once('-').unwrap();
    let mut grpc = c
        .grpc()
        .await
        .subscribe(v1::SubscribeRequest {
            topics: vec!["t".into()],
            start: Some(v1::StartPosition {
                position: Some(v1::start_position::Position::After(v1::Cursor {
                    epoch: epoch.into(),
                    seq: seq.parse().unwrap(),
                })),
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut seqs = Vec::new();
    while seqs.len() < 5 {
        let response = within("a gRPC event", grpc.next()).await.unwrap().unwrap();
        if let Some(v1::subscribe_response::Event::Message(m)) = response.event {
            seqs.push(m.cursor.unwrap().seq);
        }
    }
    assert_eq!(seqs, (6..=10).collect::<Vec<_>>());
}

#[tokio::test]
async fn a_node_started_before_nats_says_not_serving_then_serves() {
    let mut nats = NatsCluster::start(1).await;
    nats.kill(0);
    let a = BrokerProcess::start(&["--nats", &nats.urls()], "info").await;
    let health = reqwest::get(format!("{}/healthz", a.url())).await.unwrap();
    assert_eq!(health.status(), 503);
    let body: serde_json::Value = health.json().await.unwrap();
    assert_eq!(body["status"], "not_serving");
    let refused = reqwest::Client::new()
        .post(format!("{}/publish", a.url()))
        .json(&serde_json::json!({ "topic": "t", "payload": "x" }))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 503);
    assert!(a.log().contains("NATS not ready"), "{}", a.log());
    assert_eq!(grpc_health(&a).await, ServingStatus::NotServing);

    nats.restart(0).await;
    wait_serving(a.addr, support::CLUSTER_START).await;
    assert_eq!(grpc_health(&a).await, ServingStatus::Serving);
    let answer = http_publish(&a.url(), "t", "x").await;
    assert_eq!(answer["seq"], 1);
}

#[tokio::test]
async fn losing_nats_fails_publishes_fast_and_delivery_resumes_without_gap() {
    let mut nats = NatsCluster::start(1).await;
    let urls = nats.urls();
    let (a, b) = tokio::join!(node(&urls, &[]), node(&urls, &[]));
    let mut on_b = Sse::open(&b.url(), "/subscribe?topic=t", &[]).await;
    on_b.expect("subscribed").await;
    http_publish(&a.url(), "t", "before").await;
    assert_eq!(next_message(&mut on_b).await.0, 1);

    nats.kill(0);
    let client = reqwest::Client::new();
    let started = std::time::Instant::now();
    let refused = within("a refused publish", async {
        loop {
            let response = client
                .post(format!("{}/publish", a.url()))
                .json(&serde_json::json!({ "topic": "t", "payload": "lost" }))
                .send()
                .await
                .unwrap();
            if response.status() != 200 {
                return response;
            }
        }
    })
    .await;
    assert_eq!(refused.status(), 503);
    assert!(started.elapsed() < Duration::from_secs(5), "fails fast");
    let health: serde_json::Value = reqwest::get(format!("{}/healthz", a.url()))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(health["log"]["failing"].is_string(), "{health}");
    wait_health(&a, ServingStatus::NotServing).await;

    nats.restart(0).await;
    wait_health(&a, ServingStatus::Serving).await;
    let after = within("a publish once NATS is back", async {
        loop {
            if let Some(answer) = try_publish(&client, &a.url(), "t", "after").await {
                return answer["seq"].as_u64().unwrap();
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    // Whatever was stored while the connection was going down comes first, then this one;
    // nothing twice, no gap event.
    let mut seqs = Vec::new();
    while seqs.last() != Some(&after) {
        seqs.push(next_message(&mut on_b).await.0);
    }
    assert_eq!(seqs, (2..=after).collect::<Vec<_>>());
}

#[tokio::test]
async fn a_whole_cluster_restart_keeps_history_epoch_and_cursors() {
    let mut nats = NatsCluster::start(3).await;
    let urls = nats.urls();
    let replicas = ["--nats-replicas", "3"];
    let mut a = node(&urls, &replicas).await;
    let mut cursors = Vec::new();
    for i in 0..6 {
        let answer = http_publish(&a.url(), "t", &i.to_string()).await;
        cursors.push(answer["cursor"].as_str().unwrap().to_owned());
    }
    a.child.start_kill().unwrap();
    a.child.wait().await.unwrap();
    for i in 0..3 {
        nats.kill(i);
    }
    for i in 0..3 {
        nats.restart(i).await;
    }
    let b = node(&urls, &replicas).await;
    let mut resumed = Sse::open(
        &b.url(),
        &format!("/subscribe?topic=t&last_event_id={}", cursors[2]),
        &[],
    )
    .await;
    resumed.expect("subscribed").await;
    for cursor in &cursors[3..] {
        assert_eq!(&next_message(&mut resumed).await.1, cursor);
    }
    let answer = http_publish(&b.url(), "t", "next").await;
    assert_eq!(answer["seq"], 7);
}

/// JetStream evicts per subject and leaves holes; a node that starts afterwards tells a resume
/// exactly what its topic lost, as a node that saw every message does.
#[tokio::test]
async fn a_node_started_after_evictions_reports_the_same_gaps_as_one_that_saw_them() {
    let nats = NatsCluster::start(1).await;
    let urls = nats.urls();
    let limit = ["--retain-messages", "3"];
    let a = node(&urls, &limit).await;
    // b.1 = seq 1, a.1..a.5 = seqs 2..6: the stream keeps 1, 4, 5, 6.
    http_publish(&a.url(), "b", "1").await;
    for i in 1..=5 {
        http_publish(&a.url(), "a", &i.to_string()).await;
    }
    let fresh = node(&urls, &limit).await;
    for n in [&a, &fresh] {
        let epoch = reqwest::get(format!("{}/healthz", n.url()))
            .await
            .unwrap()
            .json::<serde_json::Value>()
            .await
            .unwrap()["epoch"]
            .as_str()
            .unwrap()
            .to_owned();
        for (topic, gap_to) in [("a", Some(3)), ("b", None)] {
            let page: serde_json::Value = reqwest::get(format!(
                "{}/topics/{topic}/messages?after={epoch}-0",
                n.url()
            ))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
            assert_eq!(
                page["gap"]["to_seq"].as_u64(),
                gap_to,
                "{topic} on {}: {page}",
                n.addr
            );
        }
    }
}

#[tokio::test]
async fn a_node_reaches_nats_over_tls_with_a_token() {
    let (cert, key, _) = support::certificate();
    let (cert, key) = (cert.to_str().unwrap(), key.to_str().unwrap());
    let nats = NatsCluster::start_with(
        1,
        &[
            "--auth",
            "s3cret",
            "--tls",
            "--tlscert",
            cert,
            "--tlskey",
            key,
        ],
    )
    .await;
    let urls = nats.urls().replace("nats://", "tls://");
    // Without the token: refused at start, saying what to set.
    let refused = tokio::process::Command::new(env!("CARGO_BIN_EXE_topichub"))
        .args(["serve", "--listen", "127.0.0.1:0", "--nats", &urls])
        .args(["--nats-tls-ca", cert])
        .kill_on_drop(true)
        .output();
    let refused = within("a node without the token to exit", refused)
        .await
        .unwrap();
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("--nats-token"), "{stderr}");

    let a = node(&urls, &["--nats-tls-ca", cert, "--nats-token", "s3cret"]).await;
    let answer = http_publish(&a.url(), "t", "over TLS").await;
    assert_eq!(answer["seq"], 1);
}

/// A message NATS refuses for its size is refused as such, and the node goes on serving.
#[tokio::test]
async fn a_message_over_nats_max_payload_is_refused_and_nothing_else_suffers() {
    let nats = NatsCluster::start(1).await;
    let a = node(&nats.urls(), &[]).await;
    assert!(
        a.log().contains("max_payload"),
        "warned at start: {}",
        a.log()
    );
    // At topichub's limit (1 MiB), so over NATS's once headers are added.
    let big = "x".repeat(1024 * 1024);
    let refused = reqwest::Client::new()
        .post(format!("{}/topics/t", a.url()))
        .header("content-type", "text/plain")
        .body(big)
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 429);
    assert!(
        refused.text().await.unwrap().contains("max_payload"),
        "says which limit"
    );
    let health: serde_json::Value = reqwest::get(format!("{}/healthz", a.url()))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(health["log"]["failing"].is_null(), "{health}");
    assert_eq!(http_publish(&a.url(), "t", "small").await["seq"], 1);
}

/// A stream deleted and created again is another history: a node still on the old one stops
/// publishing into it (and says why) instead of mixing two histories under one epoch.
#[tokio::test]
async fn a_node_whose_stream_is_recreated_refuses_to_mix_histories() {
    let nats = NatsCluster::start(1).await;
    let a = node(&nats.urls(), &[]).await;
    http_publish(&a.url(), "t", "old history").await;
    let client = async_nats::connect(nats.urls()).await.unwrap();
    let jetstream = async_nats::jetstream::new(client);
    jetstream.delete_stream("TOPICHUB").await.unwrap();
    jetstream
        .create_stream(async_nats::jetstream::stream::Config {
            name: "TOPICHUB".into(),
            subjects: vec!["topichub.>".into()],
            ..Default::default()
        })
        .await
        .unwrap();
    support::wait_for("the node to notice the new stream", || async {
        let health: serde_json::Value = reqwest::get(format!("{}/healthz", a.url()))
            .await
            .ok()?
            .json()
            .await
            .ok()?;
        health["log"]["failing"]
            .as_str()
            .is_some_and(|why| why.contains("created again"))
            .then_some(())
    })
    .await;
    let refused = reqwest::Client::new()
        .post(format!("{}/publish", a.url()))
        .json(&serde_json::json!({ "topic": "t", "payload": "new" }))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 503);

    // A node started now follows the new history, in a new epoch.
    let b = node(&nats.urls(), &[]).await;
    let answer = http_publish(&b.url(), "t", "new history").await;
    assert_eq!(answer["seq"], 1);
}

//! Topic deletion and presence in cluster mode (`--nats`): several topichub processes on one
//! NATS JetStream stream, real `nats-server -js` processes, every door spoken for real.
//!
//! Needs `/usr/sbin/nats-server` (Debian's `nats-server`, installed by `scripts/deps-nats.sh`).

mod support;

use futures_util::StreamExt as _;
use serde_json::{Value, json};
use tonic::Code;
use topichub::proto::v1;

use support::{BrokerProcess, NatsCluster, Sse, cluster_node, get_json, http_publish, within};

const SECRET: &str = "cluster-topics-test-secret";

/// The payloads of `topic`'s retained history on `node`.
async fn history(node: &BrokerProcess, topic: &str) -> Vec<String> {
    let page = get_json(&format!("{}/topics/{topic}/messages", node.url())).await;
    page["messages"]
        .as_array()
        .unwrap_or_else(|| panic!("{page}"))
        .iter()
        .map(|m| m["payload"].as_str().unwrap().to_owned())
        .collect()
}

/// The next `message` event as (topic, seq), failing on anything else.
async fn next_message(sse: &mut Sse) -> (String, u64) {
    let json = sse.next_message().await.json();
    (
        json["topic"].as_str().unwrap().to_owned(),
        json["seq"].as_u64().unwrap(),
    )
}

/// Messages JetStream holds on `subject`.
async fn stream_holds(nats: &NatsCluster, subject: &str) -> usize {
    let first = nats.urls().split(',').next().unwrap().to_owned();
    let client = async_nats::connect(first).await.unwrap();
    let stream = async_nats::jetstream::new(client)
        .get_stream("TOPICHUB")
        .await
        .unwrap();
    let mut subjects = stream.info_with_subjects(subject).await.unwrap();
    let mut held = 0;
    while let Some(entry) = subjects.next().await {
        held += entry.unwrap().1;
    }
    held
}

#[tokio::test]
async fn deleting_a_topic_on_one_node_ends_it_on_every_node_and_later_nodes_never_replay_it() {
    let nats = NatsCluster::start(3).await;
    let urls = nats.urls();
    let replicas = ["--nats-replicas", "3"];
    let (a, b) = tokio::join!(
        cluster_node(&urls, &replicas),
        cluster_node(&urls, &replicas)
    );
    let first = http_publish(&a.url(), "orders.doomed", "d1").await;
    let first = first["cursor"].as_str().unwrap().to_owned();
    http_publish(&a.url(), "orders.doomed", "d2").await;
    http_publish(&a.url(), "orders.doomed", "d3").await;
    let kept = http_publish(&a.url(), "orders.kept", "k1").await;
    assert_eq!(kept["seq"], 4);

    // On B: an exact subscription (SSE and gRPC) and a pattern one, both caught up from A's
    // first cursor, so B has applied everything.
    let resume = |topic: &str| format!("/subscribe?topic={topic}&last_event_id={first}");
    let mut exact = Sse::open(&b.url(), &resume("orders.doomed"), &[]).await;
    exact.expect("subscribed").await;
    for seq in [2, 3] {
        assert_eq!(
            next_message(&mut exact).await,
            ("orders.doomed".into(), seq)
        );
    }
    let mut pattern = Sse::open(&b.url(), &resume("orders.%3E"), &[]).await;
    pattern.expect("subscribed").await;
    for expected in [
        ("orders.doomed", 2),
        ("orders.doomed", 3),
        ("orders.kept", 4),
    ] {
        assert_eq!(
            next_message(&mut pattern).await,
            (expected.0.into(), expected.1)
        );
    }
    let mut on_grpc = b
        .grpc()
        .await
        .subscribe(v1::SubscribeRequest {
            topics: vec!["orders.doomed".into()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let subscribed = within("subscribed", on_grpc.next()).await.unwrap().unwrap();
    assert!(matches!(
        subscribed.event,
        Some(v1::subscribe_response::Event::Subscribed(_))
    ));

    // Deleted on A: answered once A applied it; B's exact subscriptions end as single-node
    // ones do.
    let (status, body) = support::delete_topic(&a.url(), "orders.doomed", None).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["purged_messages"], 3, "{body}");
    assert_eq!(history(&a, "orders.doomed").await, Vec::<String>::new());
    let deleted = exact.expect("deleted").await.json();
    assert_eq!(deleted["topic"], "orders.doomed", "{deleted}");
    assert!(exact.next().await.is_none(), "the SSE stream ends");
    let status = within("the gRPC stream to end", on_grpc.next())
        .await
        .unwrap()
        .expect_err("ends with a status");
    assert_eq!(status.code(), Code::Aborted, "{status:?}");
    assert!(status.message().contains("was deleted"), "{status:?}");
    assert_eq!(history(&b, "orders.doomed").await, Vec::<String>::new());
    assert_eq!(history(&b, "orders.kept").await, ["k1"]);

    // The pattern subscription goes on; the tombstone (seq 5) is never a message.
    let next = http_publish(&a.url(), "orders.kept", "k2").await;
    assert_eq!(next["seq"], 6);
    assert_eq!(next_message(&mut pattern).await, ("orders.kept".into(), 6));

    // JetStream no longer holds the deleted messages: only the tombstone is left.
    assert_eq!(stream_holds(&nats, "topichub.orders.doomed").await, 1);

    // A node started now does not replay them; resuming over them is a gap, on it and on B.
    let c = cluster_node(&urls, &replicas).await;
    assert_eq!(history(&c, "orders.doomed").await, Vec::<String>::new());
    assert_eq!(history(&c, "orders.kept").await, ["k1", "k2"]);
    for node in [&b, &c] {
        let mut resumed = Sse::open(&node.url(), &resume("orders.%3E"), &[]).await;
        resumed.expect("subscribed").await;
        let gap = resumed.expect("gap").await.json();
        assert_eq!(gap["from_seq"], 2, "{gap}");
        assert!(gap["to_seq"].as_u64().unwrap() >= 3, "{gap}");
        assert_eq!(next_message(&mut resumed).await, ("orders.kept".into(), 4));
        assert_eq!(next_message(&mut resumed).await, ("orders.kept".into(), 6));
    }
    let mut from_start =
        Sse::open(&c.url(), "/subscribe?topic=orders.%3E&from=earliest", &[]).await;
    from_start.expect("subscribed").await;
    assert_eq!(
        next_message(&mut from_start).await,
        ("orders.kept".into(), 4)
    );
    assert_eq!(
        next_message(&mut from_start).await,
        ("orders.kept".into(), 6)
    );

    // A deleted topic can be published to again, on every node.
    let reborn = http_publish(&c.url(), "orders.doomed", "again").await;
    assert_eq!(reborn["seq"], 7);
    let mut after = Sse::open(&b.url(), &resume("orders.doomed"), &[]).await;
    after.expect("subscribed").await;
    after.expect("gap").await;
    assert_eq!(next_message(&mut after).await, ("orders.doomed".into(), 7));
}

fn token(admin: bool) -> String {
    support::operator_or_worker_token(SECRET, admin)
}

#[tokio::test]
async fn deleting_in_cluster_mode_takes_the_admin_claim_and_unknown_topics_are_not_found() {
    let nats = NatsCluster::start(1).await;
    let (urls, auth) = (nats.urls(), ["--jwt-secret", SECRET]);
    let (a, b) = tokio::join!(cluster_node(&urls, &auth), cluster_node(&urls, &auth));
    let (worker, operator) = (token(false), token(true));
    let published = support::publish_as(&a.url(), "guarded", "x", &worker).await;
    assert_eq!(published, 200);

    let (status, body) = support::delete_topic(&a.url(), "guarded", Some(&worker)).await;
    assert_eq!(status, 403, "{body}");
    let mut request = tonic::Request::new(v1::DeleteTopicRequest {
        topic: "guarded".into(),
    });
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {worker}").parse().unwrap());
    let refused = b.grpc().await.delete_topic(request).await.unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    let (status, body) = support::delete_topic(&a.url(), "never.seen", Some(&operator)).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (404, Some("NOT_FOUND")),
        "{body}"
    );

    // Over gRPC on B, with the admin claim: B answers once it applied the deletion.
    let mut request = tonic::Request::new(v1::DeleteTopicRequest {
        topic: "guarded".into(),
    });
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {operator}").parse().unwrap(),
    );
    let deleted = b.grpc().await.delete_topic(request).await.unwrap();
    assert_eq!(deleted.into_inner().purged_messages, 1);
    assert_eq!(
        stream_holds(&nats, "topichub.guarded").await,
        1,
        "the tombstone"
    );
}

/// `GET /topics/{key}/presence` on `node`, from `after`, at most `limit`.
async fn presence(node: &BrokerProcess, key: &str, after: &str, limit: usize) -> Value {
    get_json(&format!(
        "{}/topics/{key}/presence?after={after}&limit={limit}",
        node.url()
    ))
    .await
}

/// Every member of `key`'s presence on `node`, page by page of `limit`: (clients, pages).
async fn every_member(node: &BrokerProcess, key: &str, limit: usize) -> (Vec<String>, usize) {
    let (mut clients, mut pages, mut after) = (Vec::new(), 0, "0".to_owned());
    loop {
        let page = presence(node, key, &after, limit).await;
        assert_eq!(page["partial"], false, "{page}");
        pages += 1;
        let members = page["members"].as_array().unwrap();
        assert!(members.len() <= limit, "{page}");
        clients.extend(
            members
                .iter()
                .map(|m| m["client"].as_str().unwrap().to_owned()),
        );
        match page["next"].as_str() {
            Some(next) => after = next.to_owned(),
            None => return (clients, pages),
        }
        assert!(pages < 20, "pages do not end: {page}");
    }
}

#[tokio::test]
async fn presence_counts_and_pages_the_subscriptions_of_every_node() {
    let nats = NatsCluster::start(1).await;
    let urls = nats.urls();
    let (a, b) = tokio::join!(cluster_node(&urls, &[]), cluster_node(&urls, &[]));
    let mut streams = Vec::new();
    for (node, path) in [
        (&a, "/subscribe?topic=room.1"),
        (&a, "/subscribe?topic=room.1"),
        (&b, "/subscribe?topic=room.1"),
        (&b, "/subscribe?topic=room.1"),
        (&b, "/subscribe?topic=room.1"),
        (&b, "/subscribe?topic=room.%2A"),
    ] {
        let mut sse = Sse::open(&node.url(), path, &[]).await;
        sse.expect("subscribed").await;
        streams.push(sse);
    }

    // Both nodes know each other (announced at start, within a heartbeat at most).
    support::wait_for("both nodes in the presence count", || async {
        let page = presence(&a, "room.1", "0", 100).await;
        (page["nodes"] == 2).then_some(())
    })
    .await;
    for node in [&a, &b] {
        let page = presence(node, "room.1", "0", 100).await;
        assert_eq!(page["subscribers"], 6, "{page}");
        assert_eq!(
            (page["nodes"].clone(), page["partial"].clone()),
            (json!(2), json!(false))
        );
        assert_eq!(page["members"].as_array().unwrap().len(), 6, "{page}");
        // Pages of 4, then 1, walk every member once, across nodes, from either node.
        for limit in [4, 1] {
            let (mut clients, pages) = every_member(node, "room.1", limit).await;
            assert_eq!(pages, 6usize.div_ceil(limit), "{clients:?}");
            clients.sort();
            clients.dedup();
            assert_eq!(clients.len(), 6, "each member once: {clients:?}");
        }
        let pattern = presence(node, "room.%2A", "0", 100).await;
        assert_eq!(pattern["subscribers"], 1, "{pattern}");
    }
    let answer = a
        .grpc()
        .await
        .presence(v1::PresenceRequest {
            topic: "room.1".into(),
            after: 0,
            limit: 2,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (answer.subscribers, answer.nodes, answer.partial),
        (6, 2, false)
    );
    assert_eq!(answer.members.len(), 2);
    assert_ne!(answer.next, 0);

    // A third node joins the count, and leaves it when it shuts down (it says goodbye).
    let c = cluster_node(&urls, &[]).await;
    let mut on_c = Sse::open(&c.url(), "/subscribe?topic=room.1", &[]).await;
    on_c.expect("subscribed").await;
    support::wait_for("three nodes in the presence count", || async {
        let page = presence(&b, "room.1", "0", 100).await;
        (page["nodes"] == 3 && page["subscribers"] == 7).then_some(())
    })
    .await;
    let (clients, _) = every_member(&a, "room.1", 3).await;
    assert_eq!(clients.len(), 7, "{clients:?}");
    c.stop().await;
    support::wait_for("the stopped node out of the count", || async {
        let page = presence(&a, "room.1", "0", 100).await;
        (page["partial"] == false && page["nodes"] == 2 && page["subscribers"] == 6).then_some(())
    })
    .await;

    // A node that stops answering (killed: no goodbye) makes the answer partial, in bounded
    // time, rather than hang.
    let mut b = b;
    b.child.kill().await.unwrap();
    let started = std::time::Instant::now();
    let page = presence(&a, "room.1", "0", 100).await;
    assert_eq!(
        (page["partial"].clone(), page["subscribers"].clone()),
        (json!(true), json!(2)),
        "{page}"
    );
    assert!(
        started.elapsed() < std::time::Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn a_deletion_during_a_stream_leader_election_waits_for_the_new_leader() {
    let mut nats = NatsCluster::start(3).await;
    let replicas = ["--nats-replicas", "3"];
    let creator = cluster_node(&nats.urls(), &replicas).await;
    // A node connected only to the servers that will survive: losing its own server is another
    // failure (deletions, like publishes, then fail fast with UNAVAILABLE).
    let leader = nats.stream_leader("TOPICHUB").await;
    let urls = nats.urls();
    let survivors: Vec<&str> = (urls.split(',').enumerate())
        .filter(|(i, _)| *i != leader)
        .map(|(_, url)| url)
        .collect();
    let a = cluster_node(&survivors.join(","), &replicas).await;
    http_publish(&a.url(), "doomed", "d1").await;
    http_publish(&a.url(), "doomed", "d2").await;

    // Killed just before the deletion: it reaches a stream with no leader, as a publish may.
    nats.kill(leader);
    let (status, body) = tokio::time::timeout(
        std::time::Duration::from_secs(30),
        support::delete_topic(&a.url(), "doomed", None),
    )
    .await
    .expect("answered within the retry window");
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["purged_messages"], 2, "{body}");
    assert_eq!(history(&a, "doomed").await, Vec::<String>::new());
    let next = http_publish(&a.url(), "doomed", "again").await;
    assert_eq!(next["seq"], 4, "the tombstone took seq 3: {next}");
    drop(creator);
}

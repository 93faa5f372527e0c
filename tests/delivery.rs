//! The delivery contract (docs/design.md, "Delivery contract"): order and no duplicates, exact
//! resume across the replay -> live hand-over under concurrent publishing, explicit gaps, lag
//! with catch-up, the disconnect policy, wildcards, Connect (pipelined publishes too), PublishBatch, Unsubscribe, and a
//! randomized interleaving checked against a model.
//!
//! Which test proves which rule of the contract:
//! 1. order, no duplicates: `per_topic_order_without_duplicates_under_concurrent_publishers`,
//!    `randomized_interleaving_matches_the_model`;
//! 2. nothing lost silently: `randomized_interleaving_matches_the_model`,
//!    `a_subscriber_that_stops_reading_is_told_it_lagged_and_caught_up`;
//! 3. exact resume: `grpc_resume_is_exact_across_the_handover_while_publishing_continues`,
//!    `sse_reconnect_with_last_event_id_loses_and_repeats_nothing`,
//!    `a_cursor_from_another_epoch_yields_a_gap_then_everything_retained`,
//!    `a_cursor_older_than_retention_yields_a_gap_for_exactly_the_evicted_range`,
//!    `history_pages_through_retention_with_next_cursors` (a cursor ahead of the hub:
//!    `tests/bad_input.rs`);
//! 4. positions never run ahead: `sse_reconnect_with_last_event_id_loses_and_repeats_nothing`
//!    (resuming from each id it was given loses nothing);
//! 5. publishers do not wait: `a_subscriber_that_stops_reading_is_told_it_lagged_and_caught_up`,
//!    `the_disconnect_policy_closes_a_slow_subscriber_with_a_clear_status`;
//! 6. bad input hurts only itself: `tests/bad_input.rs`, `tests/limits.rs`, `tests/differential.rs`.

#[macro_use]
mod support;

use std::collections::HashSet;

use futures_util::StreamExt;
use support::{Backend, Sse, publish_request, reference, spawn_broker_on, within};
use tonic::Code;
use tonic::transport::Channel;
use topichub::proto::v1::{
    self, ConnectRequest, Cursor, LagPolicy, StartPosition, SubscribeRequest, UnsubscribeRequest,
    connect_request, connect_response, pub_sub_client::PubSubClient, start_position::Position,
    subscribe_response::Event,
};

type Client = PubSubClient<Channel>;

async fn publish(client: &mut Client, topic: &str, payload: impl Into<Vec<u8>>) -> Cursor {
    client
        .publish(publish_request(topic, payload))
        .await
        .unwrap()
        .into_inner()
        .cursor
        .unwrap()
}

fn after(cursor: Cursor) -> Option<StartPosition> {
    Some(StartPosition {
        position: Some(Position::After(cursor)),
    })
}

fn earliest() -> Option<StartPosition> {
    Some(StartPosition {
        position: Some(Position::Earliest(true)),
    })
}

/// A gRPC subscription and its `subscribed` event.
async fn subscribe(
    client: &mut Client,
    request: SubscribeRequest,
) -> (tonic::Streaming<v1::SubscribeResponse>, v1::Subscribed) {
    let mut stream = client.subscribe(request).await.unwrap().into_inner();
    let first = within("subscribed", stream.next()).await.unwrap().unwrap();
    let Some(Event::Subscribed(subscribed)) = first.event else {
        panic!("first event must be subscribed: {first:?}")
    };
    (stream, subscribed)
}

async fn next_event(stream: &mut tonic::Streaming<v1::SubscribeResponse>) -> Event {
    within("next event", stream.next())
        .await
        .expect("stream open")
        .expect("no error")
        .event
        .unwrap()
}

async fn next_message(stream: &mut tonic::Streaming<v1::SubscribeResponse>) -> v1::Message {
    match next_event(stream).await {
        Event::Message(m) => m,
        other => panic!("expected a message, got {other:?}"),
    }
}

fn seq(message: &v1::Message) -> u64 {
    message.cursor.as_ref().unwrap().seq
}

async fn per_topic_order_without_duplicates_under_concurrent_publishers(backend: Backend) {
    let broker = spawn_broker_on(backend, |_| {}).await;
    let mut client = broker.grpc().await;
    let (mut all, _) = subscribe(
        &mut client,
        SubscribeRequest {
            topics: vec!["order.>".into()],
            ..Default::default()
        },
    )
    .await;
    const PER_TOPIC: usize = 300;
    let mut publishers = Vec::new();
    for topic in ["order.a", "order.b", "order.c"] {
        let mut client = broker.grpc().await;
        publishers.push(tokio::spawn(async move {
            let mut acked = Vec::new();
            for i in 0..PER_TOPIC {
                acked.push(
                    publish(&mut client, topic, format!("{topic}/{i}"))
                        .await
                        .seq,
                );
            }
            (topic, acked)
        }));
    }
    let mut acked = Vec::new();
    for p in publishers {
        acked.push(p.await.unwrap());
    }
    let mut seen = Vec::new();
    for _ in 0..3 * PER_TOPIC {
        seen.push(next_message(&mut all).await);
    }
    let seqs: Vec<u64> = seen.iter().map(seq).collect();
    assert!(
        seqs.windows(2).all(|w| w[0] < w[1]),
        "delivered in seq order, no duplicates"
    );
    for (topic, acked_seqs) in acked {
        let delivered: Vec<(u64, String)> = seen
            .iter()
            .filter(|m| m.topic == topic)
            .map(|m| (seq(m), String::from_utf8(m.payload.to_vec()).unwrap()))
            .collect();
        let expected: Vec<(u64, String)> = acked_seqs
            .iter()
            .enumerate()
            .map(|(i, s)| (*s, format!("{topic}/{i}")))
            .collect();
        assert_eq!(
            delivered, expected,
            "{topic}: publish order, each once, with the acked seq"
        );
    }
    broker.stop().await;
}

/// Publishes `count` messages to `topic` in the background, as fast as acks come back.
fn background_publisher(
    client: Client,
    topic: &'static str,
    count: usize,
) -> tokio::task::JoinHandle<Vec<u64>> {
    let mut client = client;
    tokio::spawn(async move {
        let mut seqs = Vec::with_capacity(count);
        for i in 0..count {
            seqs.push(publish(&mut client, topic, format!("m{i}")).await.seq);
        }
        seqs
    })
}

async fn grpc_resume_is_exact_across_the_handover_while_publishing_continues(backend: Backend) {
    const COUNT: usize = 2_000;
    let broker = spawn_broker_on(backend, |_| {}).await;
    let mut client = broker.grpc().await;
    let first = publish(&mut client, "resume.g", "m-first").await;
    let publisher = background_publisher(broker.grpc().await, "resume.g", COUNT);
    // Join while the publisher runs (a quarter is out): part of what follows is replayed, the
    // rest is live.
    let list = || async {
        let mut client = broker.grpc().await;
        let topics = client
            .list_topics(v1::ListTopicsRequest {
                pattern: "resume.g".into(),
                ..Default::default()
            })
            .await
            .unwrap();
        let last_seq = topics.into_inner().topics.first().map_or(0, |t| t.last_seq);
        (last_seq > (COUNT / 4) as u64).then_some(())
    };
    support::wait_for("a quarter published", list).await;
    let mut resumer = Vec::new();
    let (mut stream, subscribed) = subscribe(
        &mut client,
        SubscribeRequest {
            topics: vec!["resume.g".into()],
            start: after(first.clone()),
            ..Default::default()
        },
    )
    .await;
    let head = subscribed.head.unwrap().seq;
    let published = publisher.await.unwrap();
    assert!(
        head > first.seq && head < *published.last().unwrap(),
        "the resume overlapped publishing (head {head})"
    );
    while resumer.len() < COUNT {
        resumer.push(seq(&next_message(&mut stream).await));
    }
    assert_eq!(
        resumer, published,
        "exactly the missed messages, then live, no gap, no duplicate"
    );
    broker.stop().await;
}

async fn sse_reconnect_with_last_event_id_loses_and_repeats_nothing(backend: Backend) {
    const COUNT: usize = 1_500;
    let broker = spawn_broker_on(backend, |_| {}).await;
    let url = broker.url();
    let mut sse = Sse::open(&url, "/subscribe?topic=resume.s", &[]).await;
    sse.expect("subscribed").await;
    let publisher = background_publisher(broker.grpc().await, "resume.s", COUNT);
    let mut seen = Vec::new();
    let mut last_id = String::new();
    // Read some, drop the connection, reconnect with Last-Event-ID (as EventSource does), twice.
    for _ in 0..2 {
        for _ in 0..200 {
            let event = sse.expect("message").await;
            last_id = event.id.clone().unwrap();
            seen.push(event.json()["seq"].as_u64().unwrap());
        }
        drop(sse);
        sse = Sse::open(
            &url,
            "/subscribe?topic=resume.s",
            &[("Last-Event-ID", &last_id)],
        )
        .await;
        sse.expect("subscribed").await;
    }
    let published = publisher.await.unwrap();
    while seen.len() < COUNT {
        seen.push(sse.expect("message").await.json()["seq"].as_u64().unwrap());
    }
    assert_eq!(seen, published);
    // The query parameter works the same way for clients that cannot set headers.
    let last_seq: u64 = last_id.rsplit_once('-').unwrap().1.parse().unwrap();
    let mut again = Sse::open(
        &url,
        &format!("/subscribe?topic=resume.s&last_event_id={last_id}"),
        &[],
    )
    .await;
    again.expect("subscribed").await;
    let next = again.expect("message").await.json()["seq"]
        .as_u64()
        .unwrap();
    let position = published.iter().position(|s| *s == last_seq).unwrap();
    assert_eq!(next, published[position + 1]);
    broker.stop().await;
}

async fn a_cursor_from_another_epoch_yields_a_gap_then_everything_retained(backend: Backend) {
    let broker = spawn_broker_on(backend, |_| {}).await;
    let mut client = broker.grpc().await;
    for i in 0..3 {
        publish(&mut client, "epoch.t", format!("{i}")).await;
    }
    let stale = Cursor {
        epoch: "oldepoch".into(),
        seq: 41,
    };
    let (mut stream, _) = subscribe(
        &mut client,
        SubscribeRequest {
            topics: vec!["epoch.t".into()],
            start: after(stale),
            ..Default::default()
        },
    )
    .await;
    let Event::Gap(gap) = next_event(&mut stream).await else {
        panic!("expected a gap first")
    };
    assert_eq!(
        (
            gap.reason.as_str(),
            gap.epoch.as_str(),
            gap.from_seq,
            gap.to_seq
        ),
        ("epoch", "oldepoch", 42, 0)
    );
    for expected in 1..=3 {
        assert_eq!(seq(&next_message(&mut stream).await), expected);
    }
    // SSE: same gap, as an event.
    let mut sse = Sse::open(
        &broker.url(),
        "/subscribe?topic=epoch.t",
        &[("Last-Event-ID", "oldepoch-41")],
    )
    .await;
    sse.expect("subscribed").await;
    let gap = sse.expect("gap").await.json();
    assert_eq!(gap["reason"], "epoch");
    assert_eq!(gap["from_seq"], 42);
    assert_eq!(sse.expect("message").await.json()["seq"], 1);
    broker.stop().await;
}

async fn a_cursor_older_than_retention_yields_a_gap_for_exactly_the_evicted_range(
    backend: Backend,
) {
    let broker = spawn_broker_on(backend, |c| c.retain_messages = 5).await;
    let mut client = broker.grpc().await;
    let mut cursors = Vec::new();
    for i in 0..20 {
        cursors.push(publish(&mut client, "ret.t", format!("{i}")).await);
    }
    // Seqs 1..=15 were evicted; resuming after seq 3 misses 4..=15.
    let (mut stream, _) = subscribe(
        &mut client,
        SubscribeRequest {
            topics: vec!["ret.t".into()],
            start: after(cursors[2].clone()),
            ..Default::default()
        },
    )
    .await;
    let Event::Gap(gap) = next_event(&mut stream).await else {
        panic!("expected a gap")
    };
    assert_eq!(
        (gap.from_seq, gap.to_seq, gap.reason.as_str()),
        (4, 15, "retention")
    );
    for expected in 16..=20 {
        assert_eq!(seq(&next_message(&mut stream).await), expected);
    }
    // History over HTTP reports the same gap.
    let history: serde_json::Value = reqwest::get(format!(
        "{}/topics/ret.t/messages?after={}-3",
        broker.url(),
        cursors[0].epoch
    ))
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    assert_eq!(history["gap"]["from_seq"], 4);
    assert_eq!(history["gap"]["to_seq"], 15);
    assert_eq!(history["messages"].as_array().unwrap().len(), 5);
    // Resuming inside retention has no gap.
    let (mut stream, _) = subscribe(
        &mut client,
        SubscribeRequest {
            topics: vec!["ret.t".into()],
            start: after(cursors[16].clone()),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(seq(&next_message(&mut stream).await), 18);
    broker.stop().await;
}

async fn history_pages_through_retention_with_next_cursors(backend: Backend) {
    let broker = spawn_broker_on(backend, |_| {}).await;
    let mut client = broker.grpc().await;
    for i in 0..25 {
        publish(
            &mut client,
            if i % 2 == 0 { "hist.even" } else { "hist.odd" },
            format!("{i}"),
        )
        .await;
    }
    let http = reqwest::Client::new();
    let mut after = String::new();
    let mut seqs = Vec::new();
    loop {
        let query = if after.is_empty() {
            "limit=10".to_owned()
        } else {
            format!("limit=10&after={after}")
        };
        let page: serde_json::Value = http
            .get(format!("{}/topics/hist.*/messages?{query}", broker.url()))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        for m in page["messages"].as_array().unwrap() {
            seqs.push(m["seq"].as_u64().unwrap());
        }
        if !page["more"].as_bool().unwrap() {
            break;
        }
        after = page["next"].as_str().unwrap().to_owned();
    }
    assert_eq!(seqs, (1..=25).collect::<Vec<u64>>());
    broker.stop().await;
}

async fn a_subscriber_that_stops_reading_is_told_it_lagged_and_caught_up(backend: Backend) {
    const COUNT: usize = 600;
    let broker = spawn_broker_on(backend, |_| {}).await;
    let mut client = broker.grpc().await;
    let (mut slow, _) = subscribe(
        &mut client,
        SubscribeRequest {
            topics: vec!["lag.t".into()],
            queue_size: 4,
            lag_policy: LagPolicy::CatchUp as i32,
            ..Default::default()
        },
    )
    .await;
    // 600 x 16 KiB exceeds what HTTP/2 windows and socket buffers hold, so the queue overflows.
    let payload = vec![b'x'; 16 * 1024];
    let mut published = Vec::new();
    for _ in 0..COUNT {
        published.push(publish(&mut client, "lag.t", payload.clone()).await.seq);
    }
    let mut seqs = Vec::new();
    let mut lags = 0;
    while seqs.len() < COUNT {
        match next_event(&mut slow).await {
            Event::Message(m) => seqs.push(seq(&m)),
            Event::Lag(lag) => {
                lags += 1;
                assert!(
                    lag.from_seq > *seqs.last().unwrap_or(&0) && lag.to_seq >= lag.from_seq,
                    "{lag:?}"
                );
            }
            other => panic!("nothing is lost within retention, so no {other:?}"),
        }
    }
    assert!(lags >= 1, "the subscriber was told it lagged");
    assert_eq!(
        seqs, published,
        "caught up with every message, in order, once"
    );
    broker.stop().await;
}

async fn the_disconnect_policy_closes_a_slow_subscriber_with_a_clear_status(backend: Backend) {
    let broker = spawn_broker_on(backend, |_| {}).await;
    let mut client = broker.grpc().await;
    let (mut slow, _) = subscribe(
        &mut client,
        SubscribeRequest {
            topics: vec!["lag.d".into()],
            queue_size: 4,
            lag_policy: LagPolicy::Disconnect as i32,
            ..Default::default()
        },
    )
    .await;
    let payload = vec![b'x'; 16 * 1024];
    for _ in 0..600 {
        publish(&mut client, "lag.d", payload.clone()).await;
    }
    let status = loop {
        match within("disconnect", slow.next()).await.unwrap() {
            Ok(_) => continue,
            Err(status) => break status,
        }
    };
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert!(
        status
            .message()
            .contains("fell more than 4 messages behind"),
        "{status:?}"
    );
    broker.wait_for_subscribers(0).await;
    broker.stop().await;
}

async fn wildcards_match_on_every_door_and_resume_with_them(backend: Backend) {
    let broker = spawn_broker_on(backend, |_| {}).await;
    let mut client = broker.grpc().await;
    let topics = [
        "orders.eu.created",
        "orders.us.created",
        "orders.eu.deleted",
        "orders",
        "logs.a",
        "logs.a.b",
        "logsx",
    ];
    for topic in topics {
        publish(&mut client, topic, topic).await;
    }
    let patterns = vec!["orders.*.created".to_owned(), "logs.>".to_owned()];
    let expected = [
        "orders.eu.created",
        "orders.us.created",
        "logs.a",
        "logs.a.b",
    ];
    let (mut stream, _) = subscribe(
        &mut client,
        SubscribeRequest {
            topics: patterns.clone(),
            start: earliest(),
            ..Default::default()
        },
    )
    .await;
    for topic in expected {
        assert_eq!(next_message(&mut stream).await.topic, topic);
    }
    let mut sse = Sse::open(
        &broker.url(),
        "/subscribe?topic=orders.*.created&topic=logs.%3E&from=earliest",
        &[],
    )
    .await;
    sse.expect("subscribed").await;
    for topic in expected {
        assert_eq!(sse.expect("message").await.json()["topic"], topic);
    }
    // Live, too: a message matching both patterns of one subscription arrives once.
    let (mut both, _) = subscribe(
        &mut client,
        SubscribeRequest {
            topics: vec!["multi.*".into(), "multi.>".into(), "multi.x".into()],
            ..Default::default()
        },
    )
    .await;
    let cursor = publish(&mut client, "multi.x", "once").await;
    publish(&mut client, "multi.y.z", "deep").await;
    assert_eq!(seq(&next_message(&mut both).await), cursor.seq);
    assert_eq!(next_message(&mut both).await.topic, "multi.y.z");
    // Listing with a pattern.
    let list = client
        .list_topics(v1::ListTopicsRequest {
            pattern: "orders.>".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let names: Vec<_> = list.topics.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "orders.eu.created",
            "orders.eu.deleted",
            "orders.us.created"
        ]
    );
    let http = support::get_json(&format!("{}/topics?pattern=logs.*", broker.url())).await;
    assert_eq!(http["topics"].as_array().unwrap().len(), 1);
    broker.stop().await;
}

async fn unsubscribe_ends_exactly_that_stream_on_any_door(backend: Backend) {
    let broker = spawn_broker_on(backend, |_| {}).await;
    let mut client = broker.grpc().await;
    let (mut a, a_id) = subscribe(
        &mut client,
        SubscribeRequest {
            topics: vec!["unsub".into()],
            ..Default::default()
        },
    )
    .await;
    let (mut b, _) = subscribe(
        &mut client,
        SubscribeRequest {
            topics: vec!["unsub".into()],
            ..Default::default()
        },
    )
    .await;
    let mut sse = Sse::open(&broker.url(), "/subscribe?topic=unsub", &[]).await;
    let sse_id = sse.expect("subscribed").await.json()["subscription_id"]
        .as_str()
        .unwrap()
        .to_owned();

    client
        .unsubscribe(UnsubscribeRequest {
            subscription_id: a_id.subscription_id.clone(),
        })
        .await
        .unwrap();
    assert!(
        within("a ends", a.next()).await.is_none(),
        "the unsubscribed stream completes with OK"
    );
    client
        .unsubscribe(UnsubscribeRequest {
            subscription_id: sse_id,
        })
        .await
        .unwrap();
    assert!(
        sse.next().await.is_none(),
        "an SSE subscription can be ended by id too"
    );
    publish(&mut client, "unsub", "still here").await;
    assert_eq!(&next_message(&mut b).await.payload[..], b"still here");
    let again = client
        .unsubscribe(UnsubscribeRequest {
            subscription_id: a_id.subscription_id,
        })
        .await;
    assert_eq!(again.unwrap_err().code(), Code::NotFound);
    broker.stop().await;
}

/// Publishes pipelined on one Connect stream, more than may wait for a durable log at once:
/// each is acknowledged once, in the order sent, and delivered once, in seq order.
async fn pipelined_connect_publishes_are_each_acknowledged_once_and_delivered_in_seq_order(
    backend: Backend,
) {
    use connect_request::Request as Req;
    use connect_response::Event as Ev;
    const PUBLISHES: u64 = 2 * topichub::connect::MAX_PENDING_PUBLISHES as u64 + 100;
    // Room for every message in the subscription's queue: lagging is another test's subject.
    let broker = spawn_broker_on(backend, |c| {
        c.queue_size = PUBLISHES as usize;
        c.max_queue_size = c.max_queue_size.max(c.queue_size);
    })
    .await;
    let (tx, mut events) = broker.connect_stream(None).await;
    tx.send(ConnectRequest {
        request_id: 0,
        request: Some(Req::Subscribe(SubscribeRequest {
            topics: vec!["piped".into()],
            ..Default::default()
        })),
    })
    .await
    .unwrap();
    let subscribed = within("subscribed", events.next()).await.unwrap().unwrap();
    assert!(
        matches!(subscribed.event, Some(Ev::Subscribed(_))),
        "{subscribed:?}"
    );

    // Sent without waiting for any answer, while the answers are read.
    let sender = tokio::spawn(async move {
        for i in 1..=PUBLISHES {
            let request = Req::Publish(publish_request("piped", i.to_string()));
            tx.send(ConnectRequest {
                request_id: i,
                request: Some(request),
            })
            .await
            .unwrap();
        }
        tx
    });
    let mut acks = std::collections::BTreeMap::new();
    let mut delivered = Vec::new();
    while acks.len() < PUBLISHES as usize || delivered.len() < PUBLISHES as usize {
        let event = within("connect event", events.next())
            .await
            .unwrap()
            .unwrap();
        match event.event {
            Some(Ev::Ack(ack)) => {
                let seq = ack.cursor.expect("an ack carries its cursor").seq;
                let first = acks.insert(event.request_id, seq);
                assert!(
                    first.is_none(),
                    "request {} acknowledged twice",
                    event.request_id
                );
            }
            Some(Ev::Message(m)) => {
                let payload = String::from_utf8(m.payload.to_vec()).unwrap();
                delivered.push((m.cursor.unwrap().seq, payload));
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    let _tx = sender.await.unwrap();
    let ids: Vec<u64> = acks.keys().copied().collect();
    assert_eq!(ids, (1..=PUBLISHES).collect::<Vec<_>>());
    let seqs: Vec<u64> = acks.values().copied().collect();
    assert!(
        seqs.windows(2).all(|w| w[0] < w[1]),
        "stored in the order sent"
    );
    let expected: Vec<(u64, String)> = acks
        .iter()
        .map(|(id, seq)| (*seq, id.to_string()))
        .collect();
    assert_eq!(delivered, expected, "each delivered once, in seq order");
    broker.stop().await;
}

async fn connect_multiplexes_subscribe_publish_and_unsubscribe_on_one_stream(backend: Backend) {
    use connect_request::Request as Req;
    use connect_response::Event as Ev;
    let broker = spawn_broker_on(backend, |_| {}).await;
    let (tx, mut events) = broker.connect_stream(None).await;
    let send = |id: u64, request: Req| {
        let tx = tx.clone();
        async move {
            tx.send(ConnectRequest {
                request_id: id,
                request: Some(request),
            })
            .await
            .unwrap()
        }
    };
    let mut next = async || {
        within("connect event", events.next())
            .await
            .unwrap()
            .unwrap()
    };

    send(
        1,
        Req::Subscribe(SubscribeRequest {
            topics: vec!["conn.a".into()],
            ..Default::default()
        }),
    )
    .await;
    let sub_a = next().await;
    assert_eq!(sub_a.request_id, 1);
    let Some(Ev::Subscribed(a)) = sub_a.event else {
        panic!("{sub_a:?}")
    };
    send(
        2,
        Req::Subscribe(SubscribeRequest {
            topics: vec!["conn.*".into()],
            ..Default::default()
        }),
    )
    .await;
    let Some(Ev::Subscribed(b)) = next().await.event else {
        panic!()
    };

    send(3, Req::Publish(publish_request("conn.a", "hello"))).await;
    // One ack, and the message once per subscription, each tagged with its subscription.
    let mut ack = None;
    let mut deliveries = HashSet::new();
    for _ in 0..3 {
        let event = next().await;
        match event.event {
            Some(Ev::Ack(a)) => {
                assert_eq!(event.request_id, 3);
                ack = a.cursor;
            }
            Some(Ev::Message(m)) => {
                assert_eq!(&m.payload[..], b"hello");
                deliveries.insert((event.subscription_id, m.cursor.unwrap().seq));
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    let ack = ack.expect("publish acked with its cursor");
    assert_eq!(
        deliveries,
        HashSet::from([
            (a.subscription_id.clone(), ack.seq),
            (b.subscription_id.clone(), ack.seq)
        ])
    );

    // A bad request is answered with an error event; the stream stays open.
    send(4, Req::Publish(publish_request("bad topic", "x"))).await;
    let error = next().await;
    let Some(Ev::Error(e)) = error.event else {
        panic!("{error:?}")
    };
    assert_eq!((error.request_id, e.code.as_str()), (4, "INVALID_ARGUMENT"));

    send(
        5,
        Req::Unsubscribe(UnsubscribeRequest {
            subscription_id: a.subscription_id.clone(),
        }),
    )
    .await;
    let ended = next().await;
    assert_eq!(ended.subscription_id, a.subscription_id);
    assert!(matches!(ended.event, Some(Ev::Unsubscribed(ref u)) if u.reason == "unsubscribed"));
    send(6, Req::Publish(publish_request("conn.a", "after"))).await;
    let mut after = Vec::new();
    for _ in 0..2 {
        after.push(next().await);
    }
    assert!(after.iter().any(|e| matches!(e.event, Some(Ev::Ack(_)))));
    assert!(
        after
            .iter()
            .any(|e| e.subscription_id == b.subscription_id
                && matches!(e.event, Some(Ev::Message(_))))
    );
    assert!(after.iter().all(|e| e.subscription_id != a.subscription_id));
    drop(tx);
    broker.stop().await;
}

async fn publish_batch_streams_many_messages_and_reports_counts(backend: Backend) {
    const COUNT: usize = 20_000;
    let broker = spawn_broker_on(backend, |_| {}).await;
    let mut client = broker.grpc().await;
    let (mut sub, _) = subscribe(
        &mut client,
        SubscribeRequest {
            topics: vec!["batch".into()],
            queue_size: 65_536,
            ..Default::default()
        },
    )
    .await;
    let requests =
        futures_util::stream::iter((0..COUNT).map(|i| publish_request("batch", format!("{i}"))));
    let reply = client.publish_batch(requests).await.unwrap().into_inner();
    assert_eq!(reply.accepted, COUNT as u64);
    let last = reply.last_cursor.unwrap().seq;
    let mut received = 0;
    let mut previous = 0;
    while received < COUNT {
        let m = next_message(&mut sub).await;
        assert_eq!(
            String::from_utf8(m.payload.to_vec()).unwrap(),
            received.to_string()
        );
        assert!(seq(&m) > previous);
        previous = seq(&m);
        received += 1;
    }
    assert_eq!(previous, last);
    broker.stop().await;
}

/// Random publish / subscribe / unsubscribe / disconnect operations against the real server;
/// each subscriber must see exactly the matching messages published while it was live.
async fn randomized_interleaving_matches_the_model(backend: Backend) {
    let seed = std::env::var("TOPICHUB_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| fastrand::u64(..));
    println!("seed {seed} (rerun with TOPICHUB_TEST_SEED={seed})");
    let mut rng = fastrand::Rng::with_seed(seed);
    let broker = spawn_broker_on(backend, |_| {}).await;
    let mut client = broker.grpc().await;
    let topics = ["r.a", "r.b", "r.a.x", "r.b.y", "q"];
    let patterns = ["r.a", "r.*", "r.>", "q", "r.*.x", ">", "r.b.y"];

    struct Model {
        patterns: Vec<String>,
        stream: tonic::Streaming<v1::SubscribeResponse>,
        id: String,
        expected: Vec<u64>,
        live: bool,
    }
    let mut subs: Vec<Model> = Vec::new();
    let mut dropped = 0;
    for _ in 0..400 {
        match rng.u8(..10) {
            0..=5 => {
                let topic = topics[rng.usize(..topics.len())];
                let seq = publish(&mut client, topic, topic).await.seq;
                for sub in subs.iter_mut().filter(|s| s.live) {
                    if sub.patterns.iter().any(|p| reference::matches(p, topic)) {
                        sub.expected.push(seq);
                    }
                }
            }
            6 | 7 => {
                let chosen: Vec<String> = (0..rng.usize(1..=3))
                    .map(|_| patterns[rng.usize(..patterns.len())].to_owned())
                    .collect();
                let (stream, subscribed) = subscribe(
                    &mut client,
                    SubscribeRequest {
                        topics: chosen.clone(),
                        ..Default::default()
                    },
                )
                .await;
                subs.push(Model {
                    patterns: chosen,
                    stream,
                    id: subscribed.subscription_id,
                    expected: Vec::new(),
                    live: true,
                });
            }
            8 => {
                if let Some(sub) = subs.iter_mut().filter(|s| s.live).nth(rng.usize(..4)) {
                    client
                        .unsubscribe(UnsubscribeRequest {
                            subscription_id: sub.id.clone(),
                        })
                        .await
                        .unwrap();
                    sub.live = false;
                }
            }
            _ => {
                let live: Vec<usize> = (0..subs.len()).filter(|i| subs[*i].live).collect();
                if !live.is_empty() {
                    subs.remove(live[rng.usize(..live.len())]);
                    dropped += 1;
                }
            }
        }
    }
    let live_count = subs.iter().filter(|s| s.live).count();
    broker.wait_for_subscribers(live_count).await;
    for sub in &mut subs {
        let mut seen = Vec::new();
        while seen.len() < sub.expected.len() {
            match within("next event", sub.stream.next()).await {
                Some(Ok(v1::SubscribeResponse {
                    event: Some(Event::Message(m)),
                })) => seen.push(seq(&m)),
                other => panic!(
                    "seed {seed}: subscriber {:?} (live: {}) got {other:?} after {seen:?}; expected {:?}",
                    sub.patterns, sub.live, sub.expected
                ),
            }
        }
        assert_eq!(
            seen, sub.expected,
            "seed {seed}: subscriber {:?}",
            sub.patterns
        );
        if !sub.live {
            assert!(
                within("unsubscribed stream ends", sub.stream.next())
                    .await
                    .is_none(),
                "seed {seed}: nothing after unsubscribe"
            );
        }
    }
    println!(
        "{} subscriptions checked, {dropped} dropped, {live_count} live at the end",
        subs.len()
    );
    broker.stop().await;
}

on_every_backend!(
    per_topic_order_without_duplicates_under_concurrent_publishers,
    grpc_resume_is_exact_across_the_handover_while_publishing_continues,
    sse_reconnect_with_last_event_id_loses_and_repeats_nothing,
    a_cursor_from_another_epoch_yields_a_gap_then_everything_retained,
    a_cursor_older_than_retention_yields_a_gap_for_exactly_the_evicted_range,
    history_pages_through_retention_with_next_cursors,
    a_subscriber_that_stops_reading_is_told_it_lagged_and_caught_up,
    the_disconnect_policy_closes_a_slow_subscriber_with_a_clear_status,
    wildcards_match_on_every_door_and_resume_with_them,
    unsubscribe_ends_exactly_that_stream_on_any_door,
    connect_multiplexes_subscribe_publish_and_unsubscribe_on_one_stream,
    pipelined_connect_publishes_are_each_acknowledged_once_and_delivered_in_seq_order,
    publish_batch_streams_many_messages_and_reports_counts,
    randomized_interleaving_matches_the_model,
);

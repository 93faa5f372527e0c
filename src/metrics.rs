//! Prometheus metrics, served at `GET /metrics` (text exposition format).
//!
//! One [`Metrics`] per hub (no process-wide registry, so several brokers in one process, as in
//! the tests, keep their own counts). Transports count what only they know (deliveries per door,
//! publish -> deliver latency); hub state (topics, retained bytes, queue depths) is read at scrape
//! time.

use std::sync::Arc;
use std::time::SystemTime;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Which door a publish or delivery went through.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Door {
    /// `topichub.v1` over gRPC (unary, batch and Connect).
    Grpc = 0,
    /// The seed's `proto.PubSubService` (gRPC or gRPC-Web).
    Seed = 1,
    /// HTTP/JSON publish and SSE subscribe.
    Http = 2,
    /// `topichub.v1` over gRPC-Web (a browser, HTTP/1.1).
    GrpcWeb = 3,
    /// The WebSocket door (`GET /ws`).
    Ws = 4,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DoorLabel {
    door: &'static str,
}

impl Door {
    /// Every door.
    pub const ALL: [Door; 5] = [Door::Grpc, Door::Seed, Door::Http, Door::GrpcWeb, Door::Ws];

    /// The door named `name` (see [`Door::name`]).
    pub fn from_name(name: &str) -> Option<Door> {
        Door::ALL.into_iter().find(|door| door.name() == name)
    }

    /// The door's name, as metrics labels and presence lists show it.
    pub fn name(self) -> &'static str {
        match self {
            Door::Grpc => "grpc",
            Door::Seed => "seed",
            Door::Http => "http",
            Door::GrpcWeb => "grpc-web",
            Door::Ws => "ws",
        }
    }
}

impl From<Door> for DoorLabel {
    fn from(door: Door) -> DoorLabel {
        DoorLabel { door: door.name() }
    }
}

/// What a connection carries, told by its first request: the `door` label of
/// `topichub_connections_by_door`. `Grpc`: HTTP/2 gRPC (`topichub.v1`, the seed service, health,
/// reflection); `GrpcWeb`: gRPC-Web over HTTP/1.1 or HTTP/2; `Sse`: `GET /subscribe`; `Ws`:
/// `GET /ws`; `Http`: every other request (publish, history, topics, docs, metrics, the page).
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum ConnectionDoor {
    Grpc,
    GrpcWeb,
    Http,
    Sse,
    Ws,
}

impl ConnectionDoor {
    const ALL: [ConnectionDoor; 5] = [
        ConnectionDoor::Grpc,
        ConnectionDoor::GrpcWeb,
        ConnectionDoor::Http,
        ConnectionDoor::Sse,
        ConnectionDoor::Ws,
    ];

    fn label(self) -> DoorLabel {
        DoorLabel {
            door: match self {
                ConnectionDoor::Grpc => Door::Grpc.name(),
                ConnectionDoor::GrpcWeb => Door::GrpcWeb.name(),
                ConnectionDoor::Http => Door::Http.name(),
                ConnectionDoor::Sse => "sse",
                ConnectionDoor::Ws => Door::Ws.name(),
            },
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LimitLabel {
    limit: &'static str,
}

/// The broker's metrics; cheap to clone.
#[derive(Clone)]
pub struct Metrics {
    inner: Arc<Inner>,
}

/// One door's series, looked up in their families once, so counting a delivery is one atomic
/// add rather than a lock and a hash lookup per message.
struct DoorSeries {
    publishes: Counter,
    deliveries: Counter,
    lag_events: Counter,
    gap_events: Counter,
    subscribers: Gauge,
    write_timeouts: Counter,
}

const DOORS: [Door; 5] = [Door::Grpc, Door::Seed, Door::Http, Door::GrpcWeb, Door::Ws];

/// The gauges set at scrape time, one per [`Snapshot`] field.
#[derive(Default)]
struct Gauges {
    connections: Gauge,
    topics: Gauge,
    retained_messages: Gauge,
    retained_bytes: Gauge,
    queued_messages: Gauge,
    max_queue_depth: Gauge,
    queued_bytes: Gauge,
    max_queue_bytes: Gauge,
    head_seq: Gauge,
    oldest_retained_seq: Gauge,
    log_bytes_on_disk: Gauge,
}

struct Inner {
    registry: Registry,
    doors: [DoorSeries; 5],
    /// Open connections per [`ConnectionDoor`], in its order.
    door_connections: [Gauge; 5],
    latency: Histogram,
    auth_failures: Counter,
    limit_hits: Family<LimitLabel, Counter>,
    /// The scrape-time gauges, set from a [`Snapshot`].
    gauges: Gauges,
    log_commit: Histogram,
}

impl Default for Metrics {
    fn default() -> Metrics {
        Metrics::new()
    }
}

impl Metrics {
    /// A fresh set of metrics.
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("topichub");
        let publishes = Family::<DoorLabel, Counter>::default();
        let deliveries = Family::<DoorLabel, Counter>::default();
        let lag_events = Family::<DoorLabel, Counter>::default();
        let gap_events = Family::<DoorLabel, Counter>::default();
        let subscribers = Family::<DoorLabel, Gauge>::default();
        let write_timeouts = Family::<DoorLabel, Counter>::default();
        // 50 us .. ~13 s
        let latency = Histogram::new(exponential_buckets(0.000_05, 2.0, 19));
        let auth_failures = Counter::default();
        let limit_hits = Family::<LimitLabel, Counter>::default();
        // 50 us .. ~0.8 s
        let log_commit = Histogram::new(exponential_buckets(0.000_05, 2.0, 15));
        let gauges = Gauges::default();
        registry.register("publishes", "Messages accepted, by door", publishes.clone());
        registry.register(
            "deliveries",
            "Messages delivered to subscribers, by door",
            deliveries.clone(),
        );
        registry.register(
            "lag_events",
            "Lag notices sent to subscribers that fell behind",
            lag_events.clone(),
        );
        registry.register(
            "gap_events",
            "Gap notices sent (messages that cannot be replayed)",
            gap_events.clone(),
        );
        registry.register(
            "subscribers",
            "Live subscriptions, by door",
            subscribers.clone(),
        );
        registry.register(
            "write_timeouts",
            "Connections closed because the peer accepted no bytes within --write-timeout while data was pending, by door (HTTP/2 connections count under grpc)",
            write_timeouts.clone(),
        );
        registry.register(
            "publish_to_deliver_seconds",
            "Time from a message's acceptance to its hand-off to a subscriber's transport",
            latency.clone(),
        );
        registry.register(
            "auth_failures",
            "Requests refused for a missing or invalid token",
            auth_failures.clone(),
        );
        registry.register(
            "limit_hits",
            "Requests refused by a limit, by limit",
            limit_hits.clone(),
        );
        registry.register(
            "connections",
            "Open client connections",
            gauges.connections.clone(),
        );
        let connections_by_door = Family::<DoorLabel, Gauge>::default();
        registry.register(
            "connections_by_door",
            "Open client connections, by the door of their first request (grpc, grpc-web, http, sse); a connection that has sent no request yet is only in topichub_connections",
            connections_by_door.clone(),
        );
        let door_connections =
            ConnectionDoor::ALL.map(|door| connections_by_door.get_or_create_owned(&door.label()));
        registry.register(
            "topics",
            "Topics with retained messages or live subscribers",
            gauges.topics.clone(),
        );
        registry.register(
            "retained_messages",
            "Messages held for replay",
            gauges.retained_messages.clone(),
        );
        registry.register(
            "retained_bytes",
            "Bytes held for replay",
            gauges.retained_bytes.clone(),
        );
        registry.register(
            "queued_messages",
            "Messages waiting in subscriber queues",
            gauges.queued_messages.clone(),
        );
        registry.register(
            "max_queue_depth",
            "Longest subscriber queue",
            gauges.max_queue_depth.clone(),
        );
        registry.register(
            "queued_bytes",
            "Bytes of messages waiting in subscriber queues (a message in several queues counts in each)",
            gauges.queued_bytes.clone(),
        );
        registry.register(
            "max_queue_bytes",
            "Most bytes waiting in one subscriber queue",
            gauges.max_queue_bytes.clone(),
        );
        registry.register(
            "head_seq",
            "Seq of the newest message (messages accepted this epoch)",
            gauges.head_seq.clone(),
        );
        registry.register(
            "oldest_retained_seq",
            "Seq of the oldest message held for replay (0 when none)",
            gauges.oldest_retained_seq.clone(),
        );
        registry.register(
            "log_bytes_on_disk",
            "Bytes the log's files take on disk (0 without --data-dir)",
            gauges.log_bytes_on_disk.clone(),
        );
        registry.register(
            "log_fsync_seconds",
            "Time to write and fsync one group commit of the disk log",
            log_commit.clone(),
        );
        let doors = DOORS.map(|door| {
            let label = DoorLabel::from(door);
            DoorSeries {
                publishes: publishes.get_or_create_owned(&label),
                deliveries: deliveries.get_or_create_owned(&label),
                lag_events: lag_events.get_or_create_owned(&label),
                gap_events: gap_events.get_or_create_owned(&label),
                subscribers: subscribers.get_or_create_owned(&label),
                write_timeouts: write_timeouts.get_or_create_owned(&label),
            }
        });
        Metrics {
            inner: Arc::new(Inner {
                registry,
                doors,
                door_connections,
                latency,
                auth_failures,
                limit_hits,
                gauges,
                log_commit,
            }),
        }
    }

    fn series(&self, door: Door) -> &DoorSeries {
        &self.inner.doors[door as usize]
    }

    /// A message was accepted through `door`.
    pub fn published(&self, door: Door) {
        self.series(door).publishes.inc();
    }

    /// A message published at `published_at` was handed to a subscriber of `door`.
    pub fn delivered(&self, door: Door, published_at: SystemTime) {
        self.series(door).deliveries.inc();
        if let Ok(elapsed) = published_at.elapsed() {
            self.inner.latency.observe(elapsed.as_secs_f64());
        }
    }

    /// A lag notice went to a subscriber of `door`.
    pub fn lagged(&self, door: Door) {
        self.series(door).lag_events.inc();
    }

    /// A gap notice went to a subscriber of `door`.
    pub fn gapped(&self, door: Door) {
        self.series(door).gap_events.inc();
    }

    /// A connection of `door` was closed for accepting no bytes within the write timeout.
    pub fn write_timed_out(&self, door: Door) {
        self.series(door).write_timeouts.inc();
    }

    /// Counts a live subscription of `door` until the returned guard is dropped.
    pub fn subscriber(&self, door: Door) -> SubscriberGauge {
        let gauge = self.series(door).subscribers.clone();
        gauge.inc();
        SubscriberGauge(gauge)
    }

    /// Counts an open connection of `door` until the returned guard is dropped.
    pub fn connection(&self, door: ConnectionDoor) -> ConnectionGauge {
        let gauge = self.inner.door_connections[door as usize].clone();
        gauge.inc();
        ConnectionGauge(gauge)
    }

    /// A request was refused for its token.
    pub fn auth_failed(&self) {
        self.inner.auth_failures.inc();
    }

    /// A request was refused by `limit` (the option's name, e.g. `max-connections`).
    pub fn limit_hit(&self, limit: &'static str) {
        self.inner
            .limit_hits
            .get_or_create(&LimitLabel { limit })
            .inc();
    }

    /// The disk log made a commit that took `elapsed`; only fsynced ones are timed.
    pub fn log_committed(&self, elapsed: std::time::Duration, synced: bool) {
        if synced {
            self.inner.log_commit.observe(elapsed.as_secs_f64());
        }
    }

    /// The exposition text, after updating the scrape-time gauges.
    pub fn render(&self, state: &Snapshot) -> String {
        let inner = &self.inner;
        let gauges = &inner.gauges;
        gauges.connections.set(state.connections as i64);
        gauges.topics.set(state.topics as i64);
        gauges.retained_messages.set(state.retained_messages as i64);
        gauges.retained_bytes.set(state.retained_bytes as i64);
        gauges.queued_messages.set(state.queued_messages as i64);
        gauges.max_queue_depth.set(state.max_queue_depth as i64);
        gauges.queued_bytes.set(state.queued_bytes as i64);
        gauges.max_queue_bytes.set(state.max_queue_bytes as i64);
        gauges.head_seq.set(state.head_seq as i64);
        gauges
            .oldest_retained_seq
            .set(state.oldest_retained_seq as i64);
        gauges.log_bytes_on_disk.set(state.log_bytes_on_disk as i64);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &inner.registry)
            .expect("writing to a String cannot fail");
        text
    }
}

/// Hub and server state read at scrape time.
#[derive(Debug, Default, Clone)]
pub struct Snapshot {
    /// Open client connections.
    pub connections: usize,
    /// Known topics.
    pub topics: usize,
    /// Messages retained.
    pub retained_messages: usize,
    /// Bytes retained.
    pub retained_bytes: usize,
    /// Messages waiting in subscriber queues.
    pub queued_messages: usize,
    /// Longest subscriber queue.
    pub max_queue_depth: usize,
    /// Bytes of the messages waiting in subscriber queues, summed over queues (a message in
    /// several queues counts in each).
    pub queued_bytes: usize,
    /// Most bytes waiting in one subscriber queue.
    pub max_queue_bytes: usize,
    /// Seq of the newest message.
    pub head_seq: u64,
    /// Seq of the oldest retained message (0 when none).
    pub oldest_retained_seq: u64,
    /// Bytes the log's files take on disk (0 without a data dir).
    pub log_bytes_on_disk: u64,
}

/// Decrements a door's connection gauge when the connection closes.
pub struct ConnectionGauge(Gauge);

impl Drop for ConnectionGauge {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Decrements a door's subscriber gauge when the subscription ends.
pub struct SubscriberGauge(Gauge);

impl Drop for SubscriberGauge {
    fn drop(&mut self) {
        self.0.dec();
    }
}

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
    /// `topichub.v1` over gRPC or gRPC-Web (unary, batch and Connect).
    Grpc = 0,
    /// The seed's `proto.PubSubService`.
    Seed = 1,
    /// HTTP/JSON publish and SSE subscribe.
    Http = 2,
    /// The WebSocket door (`GET /ws`).
    Ws = 3,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DoorLabel {
    door: &'static str,
}

impl From<Door> for DoorLabel {
    fn from(door: Door) -> DoorLabel {
        DoorLabel {
            door: match door {
                Door::Grpc => "grpc",
                Door::Seed => "seed",
                Door::Http => "http",
                Door::Ws => "ws",
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
}

const DOORS: [Door; 4] = [Door::Grpc, Door::Seed, Door::Http, Door::Ws];

struct Inner {
    registry: Registry,
    doors: [DoorSeries; 4],
    latency: Histogram,
    auth_failures: Counter,
    limit_hits: Family<LimitLabel, Counter>,
    connections: Gauge,
    topics: Gauge,
    retained_messages: Gauge,
    retained_bytes: Gauge,
    queued_messages: Gauge,
    max_queue_depth: Gauge,
    head_seq: Gauge,
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
        // 50 us .. ~13 s
        let latency = Histogram::new(exponential_buckets(0.000_05, 2.0, 19));
        let auth_failures = Counter::default();
        let limit_hits = Family::<LimitLabel, Counter>::default();
        let gauges: [Gauge; 7] = Default::default();
        let [
            connections,
            topics,
            retained_messages,
            retained_bytes,
            queued_messages,
            max_queue_depth,
            head_seq,
        ] = gauges;
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
            connections.clone(),
        );
        registry.register(
            "topics",
            "Topics with retained messages or live subscribers",
            topics.clone(),
        );
        registry.register(
            "retained_messages",
            "Messages held for replay",
            retained_messages.clone(),
        );
        registry.register(
            "retained_bytes",
            "Bytes held for replay",
            retained_bytes.clone(),
        );
        registry.register(
            "queued_messages",
            "Messages waiting in subscriber queues",
            queued_messages.clone(),
        );
        registry.register(
            "max_queue_depth",
            "Longest subscriber queue",
            max_queue_depth.clone(),
        );
        registry.register(
            "head_seq",
            "Seq of the newest message (messages accepted this epoch)",
            head_seq.clone(),
        );
        let doors = DOORS.map(|door| {
            let label = DoorLabel::from(door);
            DoorSeries {
                publishes: publishes.get_or_create_owned(&label),
                deliveries: deliveries.get_or_create_owned(&label),
                lag_events: lag_events.get_or_create_owned(&label),
                gap_events: gap_events.get_or_create_owned(&label),
                subscribers: subscribers.get_or_create_owned(&label),
            }
        });
        Metrics {
            inner: Arc::new(Inner {
                registry,
                doors,
                latency,
                auth_failures,
                limit_hits,
                connections,
                topics,
                retained_messages,
                retained_bytes,
                queued_messages,
                max_queue_depth,
                head_seq,
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

    /// Counts an event handed to a subscriber of `door`.
    pub fn count_event(&self, door: Door, event: &crate::hub::Event) {
        match event {
            crate::hub::Event::Message(m) => self.delivered(door, m.published_at),
            crate::hub::Event::Gap(_) => self.gapped(door),
            crate::hub::Event::Lag(_) => self.lagged(door),
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

    /// Counts a live subscription of `door` until the returned guard is dropped.
    pub fn subscriber(&self, door: Door) -> SubscriberGauge {
        let gauge = self.series(door).subscribers.clone();
        gauge.inc();
        SubscriberGauge(gauge)
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

    /// The exposition text, after updating the scrape-time gauges.
    pub fn render(&self, state: &Snapshot) -> String {
        let inner = &self.inner;
        inner.connections.set(state.connections as i64);
        inner.topics.set(state.topics as i64);
        inner.retained_messages.set(state.retained_messages as i64);
        inner.retained_bytes.set(state.retained_bytes as i64);
        inner.queued_messages.set(state.queued_messages as i64);
        inner.max_queue_depth.set(state.max_queue_depth as i64);
        inner.head_seq.set(state.head_seq as i64);
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
    /// Seq of the newest message.
    pub head_seq: u64,
}

/// Decrements a door's subscriber gauge when the subscription ends.
pub struct SubscriberGauge(Gauge);

impl Drop for SubscriberGauge {
    fn drop(&mut self) {
        self.0.dec();
    }
}

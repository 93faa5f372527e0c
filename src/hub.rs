//! The hub: topics, subscriptions, sequence numbers, retained history and the lag policy.
//!
//! Every transport calls into one [`Hub`]. All state sits behind one mutex so that retaining a
//! message and handing it to subscriber queues is one atomic step; that is what makes resume
//! exact (a subscriber registers and snapshots history under the same lock, so each message is
//! either replayed or delivered live, never both, never neither).
//!
//! History lives in a log (see [`crate::log`]). Without a durable one, a publish assigns the seq
//! and delivers in the same critical section. With one, the seq is assigned and the message
//! handed to the log under the lock (so the log sees seq order), and the log calls back once the
//! message is durable to retain and deliver it, again under the lock; `head` is the newest
//! delivered seq, so nothing a subscriber sees can be lost by a crash.
//!
//! The lock is a `std::sync::Mutex`, not an async one: it is never held across an `.await`, and
//! every critical section is short and non-blocking (`try_send` into bounded queues), so the
//! publisher is never blocked by a slow subscriber.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use tokio::sync::oneshot;

use crate::cursor::Cursor;
use crate::error::{Behind, Error};
use crate::log::memory::{Retention, TopicLog};
use crate::log::{Log, Recovered};
pub use crate::message::{Headers, Message};
use crate::metrics::{Door, Metrics, Snapshot};
use crate::queue::{self, Bound, TrySendError, Weigh};
use crate::topic::{Pattern, Topic};

/// Most header bytes (keys + values) one message may carry.
pub const MAX_HEADER_BYTES: usize = 16 * 1024;

/// Default byte budget of a subscriber's queue (`--queue-bytes`).
pub const DEFAULT_QUEUE_BYTES: usize = 16 * 1024 * 1024;

/// Default of the largest byte budget a subscriber may ask for (`--max-queue-bytes`).
pub const DEFAULT_MAX_QUEUE_BYTES: usize = 64 * 1024 * 1024;

/// Limits and defaults of a hub. Every field is a server option (see `config`).
#[derive(Clone, Debug)]
pub struct HubConfig {
    /// Largest payload accepted, in bytes; larger publishes fail with `PayloadTooLarge`.
    pub max_payload_bytes: usize,
    /// Messages retained per topic; the oldest is evicted when a new one would exceed it.
    pub retain_messages: usize,
    /// Bytes (payload + headers + topic) retained per topic; oldest evicted first.
    pub retain_bytes: usize,
    /// Age after which retained messages are evicted.
    pub retain_age: Duration,
    /// Default queue length of a subscriber. A full queue triggers the subscriber's lag policy.
    pub queue_size: usize,
    /// Largest queue length a subscriber may ask for.
    pub max_queue_size: usize,
    /// Default byte budget of a subscriber's queue (see [`Message::queued_size`]). A message that
    /// would take a non-empty queue over it triggers the subscriber's lag policy.
    pub queue_bytes: usize,
    /// Largest byte budget a subscriber may ask for.
    pub max_queue_bytes: usize,
    /// Default lag policy.
    pub lag_policy: LagPolicy,
    /// Topics and patterns one subscription may name.
    pub max_topics_per_subscription: usize,
    /// Bytes retained across all topics; the oldest messages hub-wide are evicted first.
    pub max_retained_bytes: usize,
}

impl HubConfig {
    fn retention(&self) -> Retention {
        Retention {
            messages: self.retain_messages,
            bytes: self.retain_bytes,
            age: self.retain_age,
        }
    }
}

impl Default for HubConfig {
    fn default() -> Self {
        HubConfig {
            max_payload_bytes: 1024 * 1024,
            retain_messages: 10_000,
            retain_bytes: 64 * 1024 * 1024,
            retain_age: Duration::from_secs(3600),
            queue_size: 1024,
            max_queue_size: 65_536,
            queue_bytes: DEFAULT_QUEUE_BYTES,
            max_queue_bytes: DEFAULT_MAX_QUEUE_BYTES,
            lag_policy: LagPolicy::CatchUp,
            max_topics_per_subscription: 100,
            max_retained_bytes: 1024 * 1024 * 1024,
        }
    }
}

/// What happens to a subscriber whose queue overflows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LagPolicy {
    /// Send a `lag` notice and replay what is still retained, then continue live.
    CatchUp,
    /// End the subscription with a slow-consumer error.
    Disconnect,
}

impl Weigh for Arc<Message> {
    fn weight(&self) -> usize {
        self.queued_size()
    }
}

/// Where a new subscription starts.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Start {
    /// Only messages published from now on.
    #[default]
    Latest,
    /// Everything still retained, then live.
    Earliest,
    /// Everything retained after this cursor, then live.
    After(Cursor),
}

/// What a subscriber asks for.
#[derive(Clone, Debug, Default)]
pub struct SubscribeOptions {
    /// Topics and patterns; a message matching several is delivered once.
    pub patterns: Vec<Pattern>,
    /// Where to start.
    pub start: Start,
    /// Queue length (`None` = server default; capped by the server maximum).
    pub queue_size: Option<usize>,
    /// Queue byte budget (`None` = server default; capped by the server maximum).
    pub queue_bytes: Option<usize>,
    /// Lag policy (`None` = server default).
    pub lag_policy: Option<LagPolicy>,
}

/// Messages in a seq range that a subscriber will not get.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Gap {
    /// First seq that may be missing.
    pub from_seq: u64,
    /// Last seq that may be missing; `None` when the range runs to the end of an old epoch.
    pub to_seq: Option<u64>,
    /// Why the range cannot be replayed.
    pub reason: GapReason,
    /// Epoch the range belongs to.
    pub epoch: String,
}

/// Why a gap happened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GapReason {
    /// The cursor is from an earlier history of the hub (e.g. before a restart).
    Epoch,
    /// The messages were evicted from retention before they could be replayed.
    Retention,
}

impl GapReason {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            GapReason::Epoch => "epoch",
            GapReason::Retention => "retention",
        }
    }
}

/// A subscriber's queue overflowed; what follows catches it up.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lag {
    /// First seq its queue could not take.
    pub from_seq: u64,
    /// The hub's head when catch-up began.
    pub to_seq: u64,
}

/// One item of a subscription.
#[derive(Clone, Debug)]
pub enum Event {
    /// A message.
    Message(Arc<Message>),
    /// A range that will not be delivered.
    Gap(Gap),
    /// The subscriber fell behind; retained messages follow.
    Lag(Lag),
}

impl Event {
    /// Counts this event as handed to a subscriber of `door`.
    pub fn count(&self, metrics: &Metrics, door: Door) {
        match self {
            Event::Message(m) => metrics.delivered(door, m.published_at),
            Event::Gap(_) => metrics.gapped(door),
            Event::Lag(_) => metrics.lagged(door),
        }
    }
}

/// Counts and state of one topic, for listings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TopicInfo {
    /// Topic name.
    pub name: String,
    /// Messages retained.
    pub retained_messages: u64,
    /// Bytes retained.
    pub retained_bytes: u64,
    /// Live subscriptions matching it.
    pub subscribers: u64,
    /// Seq of its newest message (0 when none was ever published since it was created).
    pub last_seq: u64,
}

/// A page of retained history.
#[derive(Clone, Debug)]
pub struct History {
    /// A gap before the first message, when the cursor is older than what is retained.
    pub gap: Option<Gap>,
    /// Messages in seq order.
    pub messages: Vec<Arc<Message>>,
    /// Whether more retained messages follow the last one returned.
    pub more: bool,
}

/// The topic hub. Cheap to clone; all clones share one state.
#[derive(Clone)]
pub struct Hub {
    shared: Arc<Shared>,
}

struct Shared {
    epoch: Arc<str>,
    config: HubConfig,
    metrics: Metrics,
    /// The durable log, if any; without one the topics' in-memory logs are the whole history.
    log: Option<Box<dyn Log>>,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// Seq of the newest message retained and delivered (0 = none yet).
    head: u64,
    /// Seq of the newest message accepted; above `head` while the durable log writes it.
    assigned: u64,
    /// Bytes retained across all topics (for `max_retained_bytes`).
    retained_bytes: usize,
    topics: HashMap<Topic, TopicState>,
    subs: HashMap<u64, SubEntry>,
    /// Subscriptions with at least one wildcard pattern; new topics are matched against them.
    wildcard_subs: HashSet<u64>,
    next_sub_id: u64,
    /// Highest seq evicted from a topic that has since been forgotten entirely; a resume from
    /// before it may have missed messages there, so it is reported as a gap.
    forgotten_through: u64,
}

#[derive(Default)]
struct TopicState {
    /// Retained history.
    log: TopicLog,
    /// Live subscriptions matching this topic, each once.
    subscribers: Vec<u64>,
}

struct SubEntry {
    /// Random part of the subscription's id, so ids cannot be guessed to end others' streams.
    secret: u64,
    patterns: Vec<Pattern>,
    /// `None` while the subscriber is lagged and has not yet caught up: nothing is queued for
    /// it, so its queue cannot reorder with the replay.
    tx: Option<queue::Sender<Arc<Message>>>,
    /// First seq its queue could not take, while lagged.
    lagged_from: Option<u64>,
    queue_size: usize,
    queue_bytes: usize,
    policy: LagPolicy,
    /// Topics whose subscriber lists hold this subscription.
    topics: Vec<Topic>,
    ended: Arc<OnceLock<Ended>>,
}

/// A live subscription. Dropping it unsubscribes.
pub struct Subscription {
    hub: Hub,
    id: u64,
    secret: u64,
    rx: queue::Receiver<Arc<Message>>,
    /// Set by the hub when it ends the subscription (unsubscribe, disconnect policy).
    ended: Arc<OnceLock<Ended>>,
    /// Replayed messages and notices to hand out before reading the queue again.
    pending: VecDeque<Event>,
    /// Seq of the last message handed out, or the start position.
    last_seq: u64,
    head_at_start: u64,
}

/// Why the hub ended a subscription.
#[derive(Debug)]
enum Ended {
    /// `unsubscribe` was called (or the subscriber went away): the stream ends cleanly.
    Unsubscribed,
    /// The hub closed it, e.g. a slow consumer under the `disconnect` policy.
    Closed(Error),
}

impl Hub {
    /// A new, empty hub with a fresh epoch, its history in memory.
    pub fn new(config: HubConfig) -> Hub {
        let epoch: String = std::iter::repeat_with(fastrand::alphanumeric)
            .take(12)
            .collect();
        Hub::from_parts(config, Metrics::new(), Arc::from(epoch), None)
    }

    /// A hub on a durable `log`, starting from what it `recovered`; `metrics` are the ones the
    /// log reports to.
    pub fn with_log(
        config: HubConfig,
        metrics: Metrics,
        log: Box<dyn Log>,
        recovered: Recovered,
    ) -> Hub {
        let hub = Hub::from_parts(config, metrics, recovered.epoch, Some(log));
        let shared = &hub.shared;
        let log = shared.log.as_deref();
        {
            let mut state = hub.lock();
            state.forgotten_through = recovered.forgotten_through;
            for (topic, through) in recovered.watermarks {
                state.topics.insert(
                    topic,
                    TopicState {
                        log: TopicLog::with_watermark(through),
                        subscribers: Vec::new(),
                    },
                );
            }
            for message in &recovered.messages {
                state.deliver(message, &shared.config, log);
            }
            state.head = recovered.head;
            state.assigned = recovered.head;
        }
        // The log calls back with each durable batch; a weak handle, so that the hub (which
        // owns the log) can still be dropped.
        let weak: Weak<Shared> = Arc::downgrade(&hub.shared);
        hub.shared
            .log
            .as_ref()
            .expect("set above")
            .start(Box::new(move |batch| {
                let Some(shared) = weak.upgrade() else { return };
                let hub = Hub { shared };
                let log = hub.shared.log.as_deref();
                let numbered = log.is_some_and(|log| log.numbers_messages());
                let mut state = hub.lock();
                for message in batch {
                    if numbered && message.seq > state.head + 1 {
                        state.forgotten_through = state.forgotten_through.max(message.seq - 1);
                    }
                    state.deliver(message, &hub.shared.config, log);
                }
            }));
        hub
    }

    fn from_parts(
        config: HubConfig,
        metrics: Metrics,
        epoch: Arc<str>,
        log: Option<Box<dyn Log>>,
    ) -> Hub {
        Hub {
            shared: Arc::new(Shared {
                epoch,
                config,
                metrics,
                log,
                state: Mutex::new(State::default()),
            }),
        }
    }

    /// Whether publishes wait for a durable log (so they cannot be answered synchronously).
    pub fn is_durable(&self) -> bool {
        self.shared.log.is_some()
    }

    /// Waits (bounded) until this hub has applied `cursor`'s message, when it comes from another
    /// hub on the same shared log that is ahead of this one; then a resume or read from it
    /// proceeds as if it had been issued here. At once for any other cursor.
    pub async fn wait_applied(&self, cursor: &Cursor) {
        let Some(log) = &self.shared.log else { return };
        if cursor.epoch != *self.shared.epoch || cursor.seq <= self.lock().head {
            return;
        }
        log.until_applied(cursor.seq).await;
    }

    /// Writes out everything accepted so far and stops the log; publishes after this fail.
    pub async fn close(&self) {
        if let Some(log) = &self.shared.log {
            let _ = log.close().await;
        }
    }

    /// The history id of this hub.
    pub fn epoch(&self) -> &str {
        &self.shared.epoch
    }

    /// The hub's limits.
    pub fn config(&self) -> &HubConfig {
        &self.shared.config
    }

    /// The broker's metrics.
    pub fn metrics(&self) -> &Metrics {
        &self.shared.metrics
    }

    /// Hub state for a metrics scrape (everything but connections).
    pub fn snapshot(&self) -> Snapshot {
        let state = self.lock();
        let mut snapshot = Snapshot {
            topics: state.topics.len(),
            head_seq: state.head,
            ..Default::default()
        };
        let mut oldest = u64::MAX;
        for topic in state.topics.values() {
            snapshot.retained_messages += topic.log.len();
            snapshot.retained_bytes += topic.log.bytes();
            oldest = oldest.min(topic.log.oldest_seq().unwrap_or(u64::MAX));
        }
        snapshot.oldest_retained_seq = if oldest == u64::MAX { 0 } else { oldest };
        for entry in state.subs.values() {
            if let Some(tx) = &entry.tx {
                let (depth, bytes) = tx.depth();
                snapshot.queued_messages += depth;
                snapshot.max_queue_depth = snapshot.max_queue_depth.max(depth);
                snapshot.queued_bytes += bytes;
                snapshot.max_queue_bytes = snapshot.max_queue_bytes.max(bytes);
            }
        }
        drop(state);
        if let Some(log) = &self.shared.log {
            snapshot.log_bytes_on_disk = log.stats().bytes_on_disk;
        }
        snapshot
    }

    /// The durable log's state, if there is one.
    pub fn log_stats(&self) -> Option<crate::log::LogStats> {
        self.shared.log.as_ref().map(|log| log.stats())
    }

    /// Cursor of the newest message.
    pub fn head(&self) -> Cursor {
        Cursor {
            epoch: self.epoch().to_owned(),
            seq: self.lock().head,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the state half-updated in a way that
        // matters more than refusing all service would, so poisoning is ignored.
        self.shared
            .state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Checks a payload against the limits, so transports can refuse before decoding further.
    pub fn check_payload(&self, size: usize) -> Result<(), Error> {
        let limit = self.shared.config.max_payload_bytes;
        if size > limit {
            self.shared.metrics.limit_hit("max-payload-bytes");
            return Err(Error::PayloadTooLarge { size, limit });
        }
        Ok(())
    }

    /// Publishes a message: assigns its seq, retains it and queues it for every matching
    /// subscriber. Never waits for subscribers; with a durable log, the returned future waits
    /// for the log (and the message is delivered once it is durable).
    pub fn publish(&self, topic: Topic, payload: Bytes, headers: Headers) -> Publishing {
        if let Err(error) = self
            .check_payload(payload.len())
            .and_then(|()| check_headers(&headers))
        {
            return Publishing(Outcome::Done(Some(Err(error))));
        }
        let shared = &*self.shared;
        let published_at = SystemTime::now();
        let mut state = self.lock();
        state.assigned += 1;
        let message = Arc::new(Message::new(
            topic,
            payload,
            state.assigned,
            shared.epoch.clone(),
            published_at,
            headers,
        ));
        match &shared.log {
            None => {
                state.deliver(&message, &shared.config, None);
                Publishing(Outcome::Done(Some(Ok(message))))
            }
            Some(log) => {
                // Handed over under the lock, so the log receives messages in seq order.
                let (ack, acked) = oneshot::channel();
                log.append(message, ack);
                Publishing(Outcome::Waiting(acked))
            }
        }
    }

    /// Opens a subscription. Replay (if any) and live delivery join without gap or duplicate.
    pub fn subscribe(&self, options: SubscribeOptions) -> Result<Subscription, Error> {
        if options.patterns.is_empty() {
            return Err(Error::InvalidRequest(
                "name at least one topic or pattern to subscribe to".into(),
            ));
        }
        let config = &self.shared.config;
        if options.patterns.len() > config.max_topics_per_subscription {
            self.shared.metrics.limit_hit("max-topics-per-subscription");
            return Err(Error::LimitExceeded(format!(
                "a subscription may name at most {} topics or patterns (--max-topics-per-subscription), this one names {}",
                config.max_topics_per_subscription,
                options.patterns.len()
            )));
        }
        let queue_size = requested(
            options.queue_size,
            (config.queue_size, config.max_queue_size),
            "queue_size",
            "--max-queue-size",
        )?;
        let queue_bytes = requested(
            options.queue_bytes,
            (config.queue_bytes, config.max_queue_bytes),
            "queue_bytes",
            "--max-queue-bytes",
        )?;
        let mut patterns = options.patterns;
        patterns.sort_by(|a, b| a.as_str().cmp(b.as_str()));
        patterns.dedup();

        let mut guard = self.lock();
        let state = &mut *guard;
        let mut pending = VecDeque::new();
        let from = match &options.start {
            Start::Latest => state.head,
            Start::Earliest => 0,
            Start::After(cursor) if cursor.epoch == *self.shared.epoch => {
                if cursor.seq > state.head {
                    return Err(Error::CursorAhead {
                        cursor: cursor.to_string(),
                        head: state.head,
                    });
                }
                cursor.seq
            }
            Start::After(cursor) => {
                pending.push_back(Event::Gap(Gap {
                    from_seq: cursor.seq + 1,
                    to_seq: None,
                    reason: GapReason::Epoch,
                    epoch: cursor.epoch.clone(),
                }));
                0
            }
        };
        if from < state.head {
            // A resume from a cursor learns what retention no longer holds; `Earliest` asks for
            // what is retained and gets exactly that.
            if matches!(options.start, Start::After(_)) {
                pending.extend(
                    state
                        .retention_gap(&patterns, from, &self.shared.epoch)
                        .map(Event::Gap),
                );
            }
            pending.extend(
                state
                    .replay(&patterns, from)
                    .into_iter()
                    .map(Event::Message),
            );
        }

        let id = state.next_sub_id;
        state.next_sub_id += 1;
        let (tx, rx) = queue::bounded(queue_size, queue_bytes);
        let ended = Arc::new(OnceLock::new());
        let secret = fastrand::u64(..);
        let wildcard = patterns.iter().any(|p| p.as_topic().is_none());
        state.subs.insert(
            id,
            SubEntry {
                secret,
                patterns: patterns.clone(),
                tx: Some(tx),
                lagged_from: None,
                queue_size,
                queue_bytes,
                policy: options.lag_policy.unwrap_or(config.lag_policy),
                topics: Vec::new(),
                ended: ended.clone(),
            },
        );
        if wildcard {
            state.wildcard_subs.insert(id);
        }
        for pattern in &patterns {
            match pattern.as_topic() {
                // Creating the topic attaches every matching wildcard subscriber, this one too.
                Some(topic) => {
                    state.ensure_topic(&topic);
                    state.attach(&topic, id);
                }
                None => {
                    let matching: Vec<Topic> = state
                        .topics
                        .keys()
                        .filter(|name| pattern.matches(name.as_str()))
                        .cloned()
                        .collect();
                    for topic in matching {
                        state.attach(&topic, id);
                    }
                }
            }
        }
        let head_at_start = state.head;
        drop(guard);
        Ok(Subscription {
            hub: self.clone(),
            id,
            secret,
            rx,
            ended,
            pending,
            last_seq: from,
            head_at_start,
        })
    }

    /// Ends the subscription with this id (as shown in its `subscribed` event).
    pub fn unsubscribe(&self, id: &str) -> Result<(), Error> {
        let unknown = || Error::UnknownSubscription(id.to_owned());
        let (number, secret) = parse_subscription_id(id, self.epoch()).ok_or_else(unknown)?;
        let mut state = self.lock();
        if state
            .subs
            .get(&number)
            .is_none_or(|entry| entry.secret != secret)
        {
            return Err(unknown());
        }
        state.remove_sub(number, Ended::Unsubscribed);
        Ok(())
    }

    /// Known topics (retained messages or live subscribers), sorted, optionally filtered.
    pub fn topics(&self, filter: Option<&Pattern>) -> Vec<TopicInfo> {
        let state = self.lock();
        let mut topics: Vec<TopicInfo> = state
            .topics
            .iter()
            .filter(|(name, _)| filter.is_none_or(|p| p.matches(name.as_str())))
            .map(|(name, t)| TopicInfo {
                name: name.to_string(),
                retained_messages: t.log.len() as u64,
                retained_bytes: t.log.bytes() as u64,
                subscribers: t.subscribers.len() as u64,
                last_seq: t.log.last_seq(),
            })
            .collect();
        drop(state);
        topics.sort_by(|a, b| a.name.cmp(&b.name));
        topics
    }

    /// Retained messages matching `pattern` after `after` (default: the oldest retained), at
    /// most `limit`.
    pub fn history(
        &self,
        pattern: &Pattern,
        after: Option<&Cursor>,
        limit: usize,
    ) -> Result<History, Error> {
        let state = self.lock();
        let patterns = std::slice::from_ref(pattern);
        let mut gap = None;
        let from = match after {
            None => 0,
            Some(cursor) if cursor.epoch == *self.shared.epoch => {
                if cursor.seq > state.head {
                    return Err(Error::CursorAhead {
                        cursor: cursor.to_string(),
                        head: state.head,
                    });
                }
                cursor.seq
            }
            Some(cursor) => {
                gap = Some(Gap {
                    from_seq: cursor.seq + 1,
                    to_seq: None,
                    reason: GapReason::Epoch,
                    epoch: cursor.epoch.clone(),
                });
                0
            }
        };
        if gap.is_none() && after.is_some() {
            gap = state.retention_gap(patterns, from, &self.shared.epoch);
        }
        let mut messages = state.replay(patterns, from);
        drop(state);
        let more = messages.len() > limit;
        messages.truncate(limit);
        Ok(History {
            gap,
            messages,
            more,
        })
    }

    /// Evicts messages older than the retention age and forgets topics with nothing left.
    /// Called periodically by the server.
    pub fn expire(&self) {
        let retention = self.shared.config.retention();
        let log = self.shared.log.as_deref();
        let now = SystemTime::now();
        let mut guard = self.lock();
        let state = &mut *guard;
        let mut forgotten = state.forgotten_through;
        let mut freed = 0;
        state.topics.retain(|name, topic| {
            freed += topic.log.evict(&retention, now, &mut |seq| {
                if let Some(log) = log {
                    log.evict(name, seq);
                }
            });
            let keep = !topic.log.is_empty() || !topic.subscribers.is_empty();
            if !keep {
                forgotten = forgotten.max(topic.log.evicted_through());
            }
            keep
        });
        state.forgotten_through = forgotten;
        state.retained_bytes -= freed;
    }

    /// Live subscriptions (all doors).
    pub fn subscriber_count(&self) -> usize {
        self.lock().subs.len()
    }

    fn remove(&self, id: u64) {
        self.lock().remove_sub(id, Ended::Unsubscribed);
    }

    /// Called by a lagged subscriber once its queue is drained: reports the lag (and any gap),
    /// replays what is retained after `last_seq` and re-arms live delivery, atomically.
    fn catch_up(
        &self,
        id: u64,
        last_seq: u64,
        pending: &mut VecDeque<Event>,
    ) -> Option<queue::Receiver<Arc<Message>>> {
        let mut guard = self.lock();
        let state = &mut *guard;
        let entry = state.subs.get_mut(&id)?;
        let from_seq = entry.lagged_from.take()?;
        let (tx, rx) = queue::bounded(entry.queue_size, entry.queue_bytes);
        entry.tx = Some(tx);
        let patterns = entry.patterns.clone();
        pending.push_back(Event::Lag(Lag {
            from_seq,
            to_seq: state.head,
        }));
        pending.extend(
            state
                .retention_gap(&patterns, last_seq, &self.shared.epoch)
                .map(Event::Gap),
        );
        pending.extend(
            state
                .replay(&patterns, last_seq)
                .into_iter()
                .map(Event::Message),
        );
        Some(rx)
    }
}

impl State {
    /// Retains `message` (the newest) in its topic, enforces the retention limits and queues it
    /// for every matching subscriber. Messages come here in seq order: straight from `publish`
    /// without a durable log, from the log's writer once durable with one.
    fn deliver(&mut self, message: &Arc<Message>, config: &HubConfig, log: Option<&dyn Log>) {
        self.head = message.seq;
        let topic = &message.topic;
        self.ensure_topic(topic);
        let topic_state = self.topics.get_mut(topic).expect("ensured above");
        let (added, freed) = topic_state.log.append(
            message.clone(),
            &config.retention(),
            message.published_at,
            &mut |seq| {
                if let Some(log) = log {
                    log.evict(topic, seq);
                }
            },
        );
        self.retained_bytes = self.retained_bytes + added - freed;

        let mut overflowed = Vec::new();
        for id in &topic_state.subscribers {
            let entry = self.subs.get_mut(id).expect("topic subscribers are live");
            let Some(tx) = &entry.tx else { continue };
            match tx.try_send(message.clone()) {
                Ok(()) => {}
                Err(TrySendError::Full(bound)) => match entry.policy {
                    LagPolicy::CatchUp => {
                        // Dropping the sender wakes the subscriber once it has drained its
                        // queue; it then catches up from retention (see `Subscription::next`).
                        entry.tx = None;
                        entry.lagged_from = Some(message.seq);
                        tracing::debug!(
                            subscription = id,
                            seq = message.seq,
                            ?bound,
                            "subscriber lagged"
                        );
                    }
                    LagPolicy::Disconnect => overflowed.push((*id, bound)),
                },
                // The receiver is gone; its `Drop` is removing the subscription right now.
                Err(TrySendError::Closed) => {}
            }
        }
        for (id, bound) in overflowed {
            let entry = &self.subs[&id];
            let behind = match bound {
                Bound::Items => Behind::Messages(entry.queue_size),
                Bound::Bytes => Behind::Bytes(entry.queue_bytes),
            };
            tracing::info!(subscription = id, ?behind, "slow subscriber disconnected");
            self.remove_sub(id, Ended::Closed(Error::SlowConsumer(behind)));
        }
        if self.retained_bytes > config.max_retained_bytes {
            self.evict_hub_wide(config.max_retained_bytes, log);
        }
    }

    /// Evicts the oldest messages across all topics until the total is a sixteenth under `cap`,
    /// so that the topics are scanned once per sixteenth of the cap published, not per message.
    fn evict_hub_wide(&mut self, cap: usize, log: Option<&dyn Log>) {
        let target = cap - cap / 16;
        let mut oldest: BinaryHeap<Reverse<(u64, Topic)>> = self
            .topics
            .iter()
            .filter_map(|(name, t)| t.log.oldest_seq().map(|seq| Reverse((seq, name.clone()))))
            .collect();
        while self.retained_bytes > target {
            let Some(Reverse((_, name))) = oldest.pop() else {
                break;
            };
            let topic = self.topics.get_mut(&name).expect("listed above");
            self.retained_bytes -= topic.log.pop_oldest(&mut |seq| {
                if let Some(log) = log {
                    log.evict(&name, seq);
                }
            });
            if let Some(seq) = topic.log.oldest_seq() {
                oldest.push(Reverse((seq, name)));
            }
        }
    }

    /// Creates `topic` if it is new, attaching every wildcard subscriber that matches it. Every
    /// topic is created here, so no creation path can miss a wildcard subscriber.
    fn ensure_topic(&mut self, topic: &Topic) {
        if self.topics.contains_key(topic) {
            return;
        }
        self.topics.insert(topic.clone(), TopicState::default());
        let matching: Vec<u64> = self
            .wildcard_subs
            .iter()
            .copied()
            .filter(|id| {
                self.subs[id]
                    .patterns
                    .iter()
                    .any(|p| p.matches(topic.as_str()))
            })
            .collect();
        for id in matching {
            self.attach(topic, id);
        }
    }

    /// Adds subscription `id` to an existing topic's subscribers, once.
    fn attach(&mut self, topic: &Topic, id: u64) {
        let topic_state = self
            .topics
            .get_mut(topic)
            .expect("attach to an existing topic");
        if !topic_state.subscribers.contains(&id) {
            topic_state.subscribers.push(id);
            self.subs
                .get_mut(&id)
                .expect("attach a live subscription")
                .topics
                .push(topic.clone());
        }
    }

    /// Retained messages matching `patterns` with seq > `from`, in seq order.
    fn replay(&self, patterns: &[Pattern], from: u64) -> Vec<Arc<Message>> {
        let mut out = Vec::new();
        for (_, topic) in self.matching_topics(patterns) {
            out.extend(topic.log.read_after(from).cloned());
        }
        out.sort_unstable_by_key(|m| m.seq);
        out
    }

    /// The range after `from` that matching topics have evicted, if any.
    fn retention_gap(&self, patterns: &[Pattern], from: u64, epoch: &str) -> Option<Gap> {
        let evicted = self
            .matching_topics(patterns)
            .map(|(_, t)| t.log.evicted_through())
            .chain(std::iter::once(self.forgotten_through))
            .max()
            .unwrap_or(0);
        (evicted > from).then(|| Gap {
            from_seq: from + 1,
            to_seq: Some(evicted),
            reason: GapReason::Retention,
            epoch: epoch.to_owned(),
        })
    }

    fn matching_topics<'a>(
        &'a self,
        patterns: &'a [Pattern],
    ) -> impl Iterator<Item = (&'a Topic, &'a TopicState)> + 'a {
        let exact_only = patterns.iter().all(|p| p.as_topic().is_some());
        let exact = patterns
            .iter()
            .filter(move |_| exact_only)
            .filter_map(|p| self.topics.get_key_value(p.as_str()));
        let scanned = self
            .topics
            .iter()
            .filter(move |_| !exact_only)
            .filter(|(name, _)| patterns.iter().any(|p| p.matches(name.as_str())));
        exact.chain(scanned)
    }

    fn remove_sub(&mut self, id: u64, why: Ended) {
        let Some(entry) = self.subs.remove(&id) else {
            return;
        };
        let _ = entry.ended.set(why);
        self.wildcard_subs.remove(&id);
        for name in &entry.topics {
            let Some(topic) = self.topics.get_mut(name) else {
                continue;
            };
            topic.subscribers.retain(|s| *s != id);
            if topic.subscribers.is_empty() && topic.log.is_empty() {
                self.forgotten_through = self.forgotten_through.max(topic.log.evicted_through());
                self.topics.remove(name);
            }
        }
        // Dropping `entry.tx` here wakes the subscriber, which then finds `ended` set.
    }
}

/// A publish under way: resolves to the accepted message (its seq and time) or the error that
/// refused it. Without a durable log it is ready at once, and [`Publishing::now`] answers
/// without polling.
#[must_use = "a publish is only acknowledged once this resolves"]
pub struct Publishing(Outcome);

enum Outcome {
    Done(Option<Result<Arc<Message>, Error>>),
    Waiting(oneshot::Receiver<Result<Arc<Message>, Error>>),
}

impl Publishing {
    /// The outcome if it is already known (always, without a durable log).
    pub fn now(self) -> Option<Result<Arc<Message>, Error>> {
        match self.0 {
            Outcome::Done(done) => done,
            Outcome::Waiting(_) => None,
        }
    }
}

impl Future for Publishing {
    type Output = Result<Arc<Message>, Error>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match &mut self.0 {
            Outcome::Done(done) => Poll::Ready(done.take().expect("polled after completion")),
            Outcome::Waiting(acked) => Pin::new(acked).poll(cx).map(|answer| {
                answer.unwrap_or_else(|_| {
                    Err(Error::Unavailable(
                        "the log stopped before storing the message; it may not have been published".into(),
                    ))
                })
            }),
        }
    }
}

impl Subscription {
    /// The id to pass to `Hub::unsubscribe`.
    pub fn id(&self) -> String {
        format!("sub-{}-{}-{:016x}", self.hub.epoch(), self.id, self.secret)
    }

    /// The hub's head cursor when the subscription started.
    pub fn head_at_start(&self) -> Cursor {
        Cursor {
            epoch: self.hub.epoch().to_owned(),
            seq: self.head_at_start,
        }
    }

    /// The next event. `None` when the subscription was ended by `unsubscribe`; an error when
    /// the hub closed it (slow consumer under the `disconnect` policy).
    pub async fn next(&mut self) -> Option<Result<Event, Error>> {
        std::future::poll_fn(|cx| self.poll_next(cx)).await
    }

    /// [`Subscription::next`] for hand-written futures and bodies: no future is built per event.
    pub fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Event, Error>>> {
        loop {
            if let Some(event) = self.pending.pop_front() {
                if let Event::Message(m) = &event {
                    // Replay and queue can overlap only if a lag was handled; skip anything
                    // already handed out so delivery stays duplicate-free.
                    if m.seq <= self.last_seq {
                        continue;
                    }
                    self.last_seq = m.seq;
                }
                return Poll::Ready(Some(Ok(event)));
            }
            match std::task::ready!(self.rx.poll_recv(cx)) {
                Some(message) => {
                    if message.seq <= self.last_seq {
                        continue;
                    }
                    self.last_seq = message.seq;
                    return Poll::Ready(Some(Ok(Event::Message(message))));
                }
                None => match self.ended.get() {
                    Some(Ended::Unsubscribed) => return Poll::Ready(None),
                    Some(Ended::Closed(error)) => return Poll::Ready(Some(Err(error.clone()))),
                    None => match self.hub.catch_up(self.id, self.last_seq, &mut self.pending) {
                        Some(rx) => self.rx = rx,
                        None => return Poll::Ready(None),
                    },
                },
            }
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.hub.remove(self.id);
    }
}

/// A subscriber's requested queue bound `name`: the server's default when not given (or 0),
/// refused when over the server's maximum (set by `option`).
fn requested(
    value: Option<usize>,
    (default, max): (usize, usize),
    name: &str,
    option: &str,
) -> Result<usize, Error> {
    match value {
        None | Some(0) => Ok(default),
        Some(n) if n > max => Err(Error::InvalidRequest(format!(
            "{name} {n} is over the server maximum of {max} ({option})"
        ))),
        Some(n) => Ok(n),
    }
}

/// `sub-EPOCH-N-SECRET` -> (N, SECRET).
fn parse_subscription_id(id: &str, epoch: &str) -> Option<(u64, u64)> {
    let rest = id
        .strip_prefix("sub-")?
        .strip_prefix(epoch)?
        .strip_prefix('-')?;
    let (number, secret) = rest.split_once('-')?;
    Some((number.parse().ok()?, u64::from_str_radix(secret, 16).ok()?))
}

fn check_headers(headers: &Headers) -> Result<(), Error> {
    let size: usize = headers.iter().map(|(k, v)| k.len() + v.len()).sum();
    if size > MAX_HEADER_BYTES {
        return Err(Error::InvalidRequest(format!(
            "headers take {size} bytes, over the limit of {MAX_HEADER_BYTES}"
        )));
    }
    if headers.keys().any(|k| k.is_empty()) {
        return Err(Error::InvalidRequest(
            "header names must not be empty".into(),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hub(config: HubConfig) -> Hub {
        Hub::new(config)
    }

    fn publish(hub: &Hub, topic: &str, size: usize) -> Arc<Message> {
        hub.publish(
            Topic::parse(topic).unwrap(),
            Bytes::from(vec![0u8; size]),
            Headers::new(),
        )
        .now()
        .unwrap()
        .unwrap()
    }

    fn stats(hub: &Hub, topic: &str) -> TopicInfo {
        hub.topics(None)
            .into_iter()
            .find(|t| t.name == topic)
            .unwrap()
    }

    #[test]
    fn retention_is_bounded_by_count_and_bytes_whatever_the_volume() {
        let hub = hub(HubConfig {
            retain_messages: 100,
            retain_bytes: 10_000,
            ..Default::default()
        });
        for _ in 0..10_000 {
            publish(&hub, "t", 10);
        }
        let t = stats(&hub, "t");
        assert_eq!(t.retained_messages, 100, "count bound");
        for _ in 0..1_000 {
            publish(&hub, "t", 1_000);
        }
        let t = stats(&hub, "t");
        assert!(
            t.retained_bytes <= 10_000,
            "byte bound: {}",
            t.retained_bytes
        );
        assert_eq!(t.retained_messages, 9, "9 x (1000 + 1) bytes fit in 10 000");
    }

    #[test]
    fn aged_messages_expire_and_empty_topics_are_forgotten() {
        let hub = hub(HubConfig {
            retain_age: Duration::ZERO,
            ..Default::default()
        });
        publish(&hub, "old", 1);
        std::thread::sleep(Duration::from_millis(2));
        hub.expire();
        assert!(hub.topics(None).is_empty(), "expired and forgotten");
        // A resume from before the forgotten messages is told about the gap.
        let mut sub = hub
            .subscribe(SubscribeOptions {
                patterns: vec![Pattern::parse("old").unwrap()],
                start: Start::After(Cursor {
                    epoch: hub.epoch().to_owned(),
                    seq: 0,
                }),
                ..Default::default()
            })
            .unwrap();
        let event = futures_util::FutureExt::now_or_never(sub.next())
            .flatten()
            .unwrap()
            .unwrap();
        assert!(matches!(
            event,
            Event::Gap(Gap {
                from_seq: 1,
                to_seq: Some(1),
                reason: GapReason::Retention,
                ..
            })
        ));
    }

    #[test]
    fn a_topic_with_subscribers_but_no_messages_is_kept_until_they_leave() {
        let hub = hub(HubConfig::default());
        let sub = hub
            .subscribe(SubscribeOptions {
                patterns: vec![Pattern::parse("kept").unwrap()],
                ..Default::default()
            })
            .unwrap();
        hub.expire();
        assert_eq!(stats(&hub, "kept").subscribers, 1);
        drop(sub);
        assert!(hub.topics(None).is_empty());
        assert_eq!(hub.subscriber_count(), 0);
    }

    /// Regression: a topic created by an exact subscription (before any publish) must still
    /// reach wildcard subscribers that were already there.
    #[test]
    fn topics_created_by_a_subscription_reach_existing_wildcard_subscribers() {
        let hub = hub(HubConfig::default());
        let subscribe = |pattern: &str| {
            hub.subscribe(SubscribeOptions {
                patterns: vec![Pattern::parse(pattern).unwrap()],
                ..Default::default()
            })
            .unwrap()
        };
        let mut wildcard = subscribe(">");
        let mut exact = subscribe("fresh.topic");
        let sent = publish(&hub, "fresh.topic", 1);
        for sub in [&mut wildcard, &mut exact] {
            let event = futures_util::FutureExt::now_or_never(sub.next())
                .flatten()
                .unwrap()
                .unwrap();
            assert!(
                matches!(event, Event::Message(ref m) if m.seq == sent.seq),
                "{event:?}"
            );
        }
    }

    #[test]
    fn the_hub_wide_cap_evicts_the_oldest_messages_across_topics_first() {
        // Each message counts 100 payload bytes + 1 topic byte.
        let hub = hub(HubConfig {
            max_retained_bytes: 16 * 101,
            ..Default::default()
        });
        for seq in 1..=17 {
            let topic = if seq % 2 == 1 { "a" } else { "b" };
            publish(&hub, topic, 100);
        }
        let (a, b) = (stats(&hub, "a"), stats(&hub, "b"));
        assert!(
            a.retained_bytes + b.retained_bytes <= 16 * 101,
            "bounded hub-wide"
        );
        assert_eq!(
            hub.snapshot().oldest_retained_seq,
            3,
            "seqs 1 and 2 went first"
        );
        assert_eq!((a.retained_messages, b.retained_messages), (8, 7));
        // A resume from before them is told exactly what is gone.
        for (topic, evicted) in [("a", 1), ("b", 2)] {
            let history = hub
                .history(
                    &Pattern::parse(topic).unwrap(),
                    Some(&Cursor {
                        epoch: hub.epoch().to_owned(),
                        seq: 0,
                    }),
                    100,
                )
                .unwrap();
            assert_eq!(
                history.gap,
                Some(Gap {
                    from_seq: 1,
                    to_seq: Some(evicted),
                    reason: GapReason::Retention,
                    epoch: hub.epoch().to_owned(),
                })
            );
        }
    }

    #[test]
    fn headers_are_limited() {
        let hub = hub(HubConfig::default());
        let mut headers = Headers::new();
        headers.insert("big".into(), "x".repeat(MAX_HEADER_BYTES));
        let error = hub
            .publish(Topic::parse("h").unwrap(), Bytes::new(), headers)
            .now()
            .unwrap()
            .unwrap_err();
        assert!(error.to_string().contains("headers take"), "{error}");
    }
}

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
//!
//! Presence is kept in the same registry: each topic and each wildcard pattern has an ordered
//! set of its subscriptions (a count is O(1), a page a range) and counters of joins and leaves
//! that subscriptions watching presence read without the lock, once per `presence_interval`.
//! Deleting a topic purges its history through the log's eviction and ends the subscriptions
//! that named it exactly.

use std::cmp::Reverse;
use std::collections::{BTreeSet, BinaryHeap, HashMap, VecDeque};
use std::future::Future;
use std::num::NonZeroU64;
use std::ops;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use futures_util::FutureExt as _;
use futures_util::StreamExt as _;
use futures_util::future::Shared as SharedFuture;
use indexmap::IndexSet;
use tokio::sync::oneshot;

use crate::clock::Clock;
use crate::cursor::Cursor;
use crate::error::{Behind, Error};
use crate::idempotency::{self, Earlier, Fingerprint};
use crate::log::memory::{Retention, TopicLog};
use crate::log::{Known, Log, Purged, Recovered, Stored};
pub use crate::message::{Headers, Message};
use crate::metrics::{Door, Metrics, Snapshot};
use crate::pattern_index::PatternIndex;
use crate::queue::{self, Bound, TrySendError, Weigh};
use crate::topic::{Pattern, Topic};

/// Most header bytes (keys + values) one message may carry.
pub const MAX_HEADER_BYTES: usize = 16 * 1024;

/// Default byte budget of a subscriber's queue (`--queue-bytes`).
pub const DEFAULT_QUEUE_BYTES: usize = 16 * 1024 * 1024;

/// Default of the largest byte budget a subscriber may ask for (`--max-queue-bytes`).
pub const DEFAULT_MAX_QUEUE_BYTES: usize = 64 * 1024 * 1024;

/// Default of the shortest time between two presence events of one subscription
/// (`--presence-interval`).
pub const DEFAULT_PRESENCE_INTERVAL: Duration = Duration::from_secs(1);

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
    /// Where messages' times come from (publish time, age).
    pub clock: Clock,
    /// How long and how many idempotency keys are remembered (see [`crate::idempotency`]).
    pub idempotency: idempotency::Limits,
    /// Shortest time between two presence events of one subscription: joins and leaves within
    /// it are coalesced into one event.
    pub presence_interval: Duration,
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
            clock: Clock::System,
            idempotency: idempotency::Limits {
                age: idempotency::DEFAULT_WINDOW,
                keys: idempotency::DEFAULT_KEYS,
            },
            presence_interval: DEFAULT_PRESENCE_INTERVAL,
        }
    }
}

/// What happens to a subscriber whose queue overflows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LagPolicy {
    /// Send a `lag` notice and replay what is still retained, then continue live.
    CatchUp,
    /// End the subscription with a slow-consumer error.
    Disconnect,
}

impl std::str::FromStr for LagPolicy {
    type Err = Error;

    /// The names every text door and the command line use: `catch-up`, `disconnect`.
    fn from_str(text: &str) -> Result<LagPolicy, Error> {
        match text {
            "catch-up" => Ok(LagPolicy::CatchUp),
            "disconnect" => Ok(LagPolicy::Disconnect),
            other => Err(Error::InvalidRequest(format!(
                "lag_policy must be `catch-up` or `disconnect`, got {other:?}"
            ))),
        }
    }
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
    /// Who opens it, as presence lists show it (`None`: not shown by name).
    pub holder: Option<Holder>,
    /// Whether it receives [`Event::Presence`] when subscriptions join or leave its topics.
    pub presence: bool,
}

/// Who holds a subscription, as presence lists show it.
#[derive(Clone, Debug)]
pub struct Holder {
    /// The token's subject, or the client's address when authentication is off.
    pub client: Arc<str>,
    /// The door it came through.
    pub door: Door,
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
    /// Subscriptions joined or left topics this one follows (only when asked for).
    Presence(Vec<PresenceChange>),
    /// The log's servers (a cluster's NATS) became unreachable, so delivery pauses, or
    /// reachable again, so it resumes where it paused (see [`Log::reachable`]).
    Cluster {
        /// Whether this hub reaches them now.
        reachable: bool,
    },
}

/// How the live subscriptions of one topic or pattern changed since the previous presence event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PresenceChange {
    /// The topic or pattern, as the subscription named it.
    pub topic: String,
    /// Live subscriptions now.
    pub subscribers: u64,
    /// Subscriptions that joined since the previous event.
    pub joined: u64,
    /// Subscriptions that left since the previous event.
    pub left: u64,
}

/// One live subscription in a presence list.
#[derive(Clone, Debug)]
pub struct Member {
    /// Who holds it (`None`: opened without a holder).
    pub holder: Option<Holder>,
    /// When it started.
    pub since: SystemTime,
    /// Its place in this hub's order: a page from `position + 1` starts after it.
    pub position: u64,
}

/// A page of a topic's or pattern's presence.
#[derive(Clone, Debug)]
pub struct PresencePage {
    /// Live subscriptions in all (not only this page).
    pub subscribers: u64,
    /// Up to the page's limit of them, oldest first.
    pub members: Vec<Member>,
    /// Where the next page starts (pass it as `from`), when there is one.
    pub next: Option<u64>,
    /// In cluster mode, which nodes the page covers; `None` for a single hub.
    pub cluster: Option<Coverage>,
}

/// Which nodes of a cluster a presence page covers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Coverage {
    /// Nodes whose subscriptions are counted (this one included).
    pub nodes: u32,
    /// Some node known to be up did not answer in time: the page lacks its subscriptions.
    pub partial: bool,
}

/// The other hubs sharing this hub's log (cluster mode), asked for their presence.
pub trait Peers: Send + Sync {
    /// A page of `key`'s presence over every hub, `hub` (this one) included: `from` is a page's
    /// `next` (0: the first page), at most `limit` members.
    fn presence(
        &self,
        hub: &Hub,
        key: Pattern,
        from: u64,
        limit: usize,
    ) -> Pin<Box<dyn Future<Output = PresencePage> + Send>>;
}

/// What deleting a topic did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Deleted {
    /// Retained messages purged.
    pub purged_messages: u64,
    /// Subscriptions ended because they named the topic exactly.
    pub ended_subscriptions: u64,
}

impl Event {
    /// Counts this event as handed to a subscriber of `door`.
    pub fn count(&self, metrics: &Metrics, door: Door) {
        match self {
            Event::Message(m) => metrics.delivered(door, m.published_at),
            Event::Gap(_) => metrics.gapped(door),
            Event::Lag(_) => metrics.lagged(door),
            Event::Presence(_) | Event::Cluster { .. } => {}
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

/// A page of the topic listing.
#[derive(Clone, Debug)]
pub struct TopicPage {
    /// Topics in name order.
    pub topics: Vec<TopicInfo>,
    /// The last name on this page, to pass as `after`, when more topics follow.
    pub next: Option<String>,
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

/// Topic names a listing walks per hold of the hub's lock (see [`Hub::topic_page`]); as many
/// as the expiry pass visits, so that a publisher waits about as long behind either.
pub const NAMES_PER_LOCK: usize = 1024;

/// Whether no name lies between `from` and `to` (`BTreeSet::range` panics on such a range).
fn range_is_empty(from: &ops::Bound<String>, to: &ops::Bound<String>) -> bool {
    match (from, to) {
        (ops::Bound::Unbounded, _) | (_, ops::Bound::Unbounded) => false,
        (ops::Bound::Included(a), ops::Bound::Included(b)) => a > b,
        (
            ops::Bound::Included(a) | ops::Bound::Excluded(a),
            ops::Bound::Included(b) | ops::Bound::Excluded(b),
        ) => a >= b,
    }
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
    /// Whether a remote log's servers are reachable, when the log says.
    reachable: Option<tokio::sync::watch::Receiver<bool>>,
    state: Mutex<State>,
    /// The other hubs on the same log, once known (cluster mode).
    peers: OnceLock<Arc<dyn Peers>>,
    /// The other hubs' subscriptions per topic and pattern (cluster mode), folded in by
    /// [`Hub::fold_remote_presence`] and read by presence watchers. Its own lock, never taken
    /// while holding it: the hub's may be held when taking it, not the other way round.
    remote_presence: Mutex<RemoteTotals>,
    /// The same registry as [`State::queues`], read by a scrape without the hub's lock.
    queues: Queues,
}

/// The queue of every live subscription, by id, for the scrape-time queue gauges. Behind a lock
/// of its own so that a scrape walks the queues without holding the hub's lock: publishers
/// never wait for it; subscribe and unsubscribe take it briefly, under the hub's lock (always
/// in that order; a scrape holds only this one and, one at a time, a queue's).
type Queues = Arc<Mutex<HashMap<u64, queue::Gauge<Arc<Message>>>>>;

fn lock_queues(queues: &Queues) -> MutexGuard<'_, HashMap<u64, queue::Gauge<Arc<Message>>>> {
    // Inserts and removes cannot leave the map half-updated.
    queues
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Hub-wide totals of what the topics retain, kept in step with every change to a topic's log
/// (each goes through [`Retained::change`]), so that a metrics scrape reads three numbers
/// instead of walking every topic under the hub's lock.
#[derive(Default)]
struct Retained {
    /// Bytes retained across all topics (for `max_retained_bytes`).
    bytes: usize,
    messages: usize,
    /// The oldest retained seq of each topic that retains any; the first is the hub's oldest.
    oldest: BTreeSet<u64>,
}

impl Retained {
    /// Applies `change` to a topic's `log` and adds what it retained or evicted to the totals.
    fn change<R>(&mut self, log: &mut TopicLog, change: impl FnOnce(&mut TopicLog) -> R) -> R {
        let (bytes, messages, oldest) = (log.bytes(), log.len(), log.oldest_seq());
        let result = change(log);
        self.bytes = self.bytes + log.bytes() - bytes;
        self.messages = self.messages + log.len() - messages;
        let now_oldest = log.oldest_seq();
        if now_oldest != oldest {
            if let Some(seq) = oldest {
                self.oldest.remove(&seq);
            }
            if let Some(seq) = now_oldest {
                self.oldest.insert(seq);
            }
        }
        result
    }

    /// Seq of the oldest message retained anywhere (0 when none).
    fn oldest_seq(&self) -> u64 {
        self.oldest.first().copied().unwrap_or(0)
    }
}

#[derive(Default)]
struct State {
    /// Seq of the newest message retained and delivered (0 = none yet).
    head: u64,
    /// Seq of the newest message accepted; above `head` while the durable log writes it.
    assigned: u64,
    /// What all topics retain, in total.
    retained: Retained,
    topics: HashMap<Topic, TopicState>,
    /// The names of `topics` in order, so that a listing page walks O(log n + page) names
    /// instead of collecting and sorting them all; 34 bytes of RSS a topic (the name is shared;
    /// `memory_per_topic`: 1037 bytes a topic with it, 1003 without, debug build).
    /// Kept in step by [`State::add_topic`] and [`State::remove_topic`].
    names: BTreeSet<Topic>,
    subs: HashMap<u64, SubEntry>,
    /// The queues of `subs` (while not lagged), for metrics; kept in step with `subs`.
    queues: Queues,
    /// The wildcard patterns of live subscriptions; new topics are matched against them.
    wildcard_subs: PatternIndex,
    next_sub_id: u64,
    /// Subscriptions naming each wildcard pattern, for presence of a pattern (a topic's
    /// presence is its subscriber list).
    patterns: HashMap<Pattern, PatternMembers>,
    /// Highest seq evicted from a topic that has since been forgotten entirely; a resume from
    /// before it may have missed messages there, so it is reported as a gap to subscriptions
    /// that may name such a topic: wildcards, and topics created since (which inherit it).
    forgotten_through: u64,
    /// Seqs up to here may be missing from any topic, known or not: a shared log skipped them
    /// (evicted before this hub read them).
    lost_through: u64,
    /// Which topics may have aged messages, soonest first.
    expiry: ExpiryIndex,
    /// Recent idempotency keys, and keyed publishes waiting for the durable log.
    idempotency: idempotency::Window<InFlight>,
    /// In cluster mode, the topics and patterns whose joins or leaves the other hubs have not
    /// been told of yet (each once, however many joins); `None` on a single hub.
    presence_unsent: Option<Vec<(String, Arc<PresenceCounter>)>>,
}

/// When each topic's oldest message was published (or earlier: entries are not moved when other
/// limits evict), soonest first, so that the expiry pass visits only topics that may have aged
/// messages, not every topic. One live entry per topic, told by its generation; entries of
/// forgotten topics are dropped when they come up.
#[derive(Default)]
struct ExpiryIndex {
    heap: BinaryHeap<Reverse<(SystemTime, u64, Topic)>>,
    /// The generation of the newest entry.
    generation: u64,
}

impl ExpiryIndex {
    /// Gives `topic` (named `name`) its entry at its oldest message's time, if it has messages.
    fn schedule(&mut self, name: &Topic, topic: &mut TopicState) {
        if let Some(published_at) = topic.log.oldest_published_at() {
            self.generation += 1;
            topic.expiry_entry = NonZeroU64::new(self.generation);
            self.heap
                .push(Reverse((published_at, self.generation, name.clone())));
        }
    }

    /// Takes the soonest entry if `due` says its time has come.
    fn pop_due(&mut self, due: impl Fn(SystemTime) -> bool) -> Option<(u64, Topic)> {
        let Reverse((published_at, _, _)) = self.heap.peek()?;
        if !due(*published_at) {
            return None;
        }
        let Reverse((_, generation, name)) = self.heap.pop().expect("peeked");
        Some((generation, name))
    }
}

/// How long one batch of the expiry pass holds the hub's lock (and, on a one-core server, its
/// only thread), at most: see [`Hub::expire_some`].
const EXPIRY_HOLD: Duration = Duration::from_micros(200);

/// The expiry pass reads the time once per this many topics.
const EXPIRY_CLOCK_EVERY: usize = 16;

/// A publish waiting for the durable log, shared by its publisher and any retry under its key.
type InFlight = SharedFuture<oneshot::Receiver<Result<Stored, Error>>>;

#[derive(Default)]
struct TopicState {
    /// Retained history.
    log: TopicLog,
    /// The generation of this topic's one live entry in [`State::expiry`], if it has one (every
    /// topic with retained messages has). Generations start at 1, so that this takes 8 bytes.
    expiry_entry: Option<NonZeroU64>,
    /// Its subscriptions, from its first subscriber on. Most topics of a broker holding many
    /// have never had one; for them this is a null pointer instead of two empty sets and a
    /// presence counter (about 170 bytes a topic in the topic map and on the heap).
    subscribers: Option<Box<TopicSubscribers>>,
}

impl TopicState {
    /// The live subscriptions matching this topic, in the order they attached.
    fn subscriber_ids(&self) -> impl Iterator<Item = u64> + '_ {
        self.subscribers
            .iter()
            .flat_map(|subscribers| subscribers.ids.iter().copied())
    }

    fn subscriber_count(&self) -> usize {
        self.members().len()
    }

    /// The live subscriptions, ordered by id.
    fn members(&self) -> &BTreeSet<u64> {
        static NONE: BTreeSet<u64> = BTreeSet::new();
        self.subscribers
            .as_ref()
            .map_or(&NONE, |subscribers| &subscribers.members)
    }
}

/// The subscriptions of one topic. Kept once allocated, until the topic is forgotten: its
/// presence counter lives as long as the topic, as watchers and the other hubs expect.
#[derive(Default)]
struct TopicSubscribers {
    /// Live subscriptions matching this topic, each once: O(1) to add, find and remove (a
    /// storm of 100,000 subscribes or disconnects on one topic must not be quadratic), iterated
    /// like a `Vec`.
    ids: IndexSet<u64>,
    /// The same subscriptions, ordered: presence pages read a range of it, and attaching checks
    /// membership here.
    members: BTreeSet<u64>,
    /// Joins and leaves of `ids`, read by presence watchers without the lock.
    presence: Arc<PresenceCounter>,
}

/// The subscriptions that named one wildcard pattern.
#[derive(Default)]
struct PatternMembers {
    members: BTreeSet<u64>,
    presence: Arc<PresenceCounter>,
}

/// Joins and leaves of one topic's or pattern's subscriptions, ever. Written under the hub's
/// lock, one increment per join or leave; read without it by the subscriptions that watch
/// presence, so that churn costs O(1) per join whatever the number of watchers.
#[derive(Default)]
struct PresenceCounter {
    joined: AtomicU64,
    left: AtomicU64,
    /// Listed in [`State::presence_unsent`] (cluster mode). Written under the hub's lock.
    unsent: AtomicBool,
    /// (joined, left) as last told to the other hubs. Written under the hub's lock.
    sent: (AtomicU64, AtomicU64),
}

/// Marks `counter` (of topic or pattern `key`) as changed since the other hubs were last told,
/// when there are other hubs; O(1), each key listed once however many joins.
fn mark_unsent(
    unsent: &mut Option<Vec<(String, Arc<PresenceCounter>)>>,
    key: &str,
    counter: &Arc<PresenceCounter>,
) {
    if let Some(unsent) = unsent
        && !counter.unsent.swap(true, Ordering::Relaxed)
    {
        unsent.push((key.to_owned(), counter.clone()));
    }
}

/// The other hubs' subscriptions of one topic or pattern (cluster mode): their joins and
/// leaves so far, and how many are live. Written by the task that hears the other hubs, read
/// by presence watchers; neither takes the hub's lock.
#[derive(Default)]
pub struct RemotePresence {
    joined: AtomicU64,
    left: AtomicU64,
    live: AtomicU64,
}

/// One topic's or pattern's subscriptions on this hub, as told to the other hubs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalPresence {
    /// The topic or pattern.
    pub key: String,
    /// Live subscriptions now.
    pub live: u64,
    /// Joins since the previous report (0 in a full report).
    pub joined: u64,
    /// Leaves since the previous report (0 in a full report).
    pub left: u64,
}

impl PresenceCounter {
    fn join(&self) {
        self.joined.fetch_add(1, Ordering::Release);
    }

    fn leave(&self) {
        self.left.fetch_add(1, Ordering::Release);
    }

    /// (joined, left); `left` is read first, so it never exceeds `joined`.
    fn read(&self) -> (u64, u64) {
        let left = self.left.load(Ordering::Acquire);
        (self.joined.load(Ordering::Acquire), left)
    }
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
    holder: Option<Holder>,
    since: SystemTime,
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
    /// Presence events, when asked for.
    presence: Option<Box<PresenceWatch>>,
    /// Reachability of a remote log's servers, on a log that reports it.
    reachability: Option<Box<ReachabilityWatch>>,
}

/// What a subscription has told its subscriber about the log's reachability.
struct ReachabilityWatch {
    /// Yields the current value first, then every change.
    changes: tokio_stream::wrappers::WatchStream<bool>,
    /// What the subscriber was last told (a subscription starts out assuming reachable).
    told: bool,
}

impl ReachabilityWatch {
    /// The event to hand out, if the reachability changed since the subscriber was told; ends
    /// the watch (`None` in `slot`) when the log stops reporting.
    fn poll_change(slot: &mut Option<Box<Self>>, cx: &mut Context<'_>) -> Option<Event> {
        let watch = slot.as_mut()?;
        loop {
            match watch.changes.poll_next_unpin(cx) {
                Poll::Ready(Some(reachable)) if reachable != watch.told => {
                    watch.told = reachable;
                    return Some(Event::Cluster { reachable });
                }
                Poll::Ready(Some(_)) => continue,
                Poll::Ready(None) => {
                    *slot = None;
                    return None;
                }
                Poll::Pending => return None,
            }
        }
    }
}

/// The map of the other hubs' presence; a poisoned lock still holds consistent counters.
fn lock_remote(remote: &Mutex<RemoteTotals>) -> MutexGuard<'_, RemoteTotals> {
    remote.lock().unwrap_or_else(|p| p.into_inner())
}

/// The other hubs' presence per topic or pattern: those they have subscriptions of, and those
/// watched here.
#[derive(Default)]
struct RemoteTotals {
    keys: HashMap<String, Arc<RemotePresence>>,
    /// Size above which keys neither counted elsewhere nor watched any more are dropped.
    prune_at: usize,
}

impl RemoteTotals {
    /// Fewest keys before the first pruning.
    const PRUNE_FROM: usize = 1024;

    /// The totals of `key`, for a presence watcher. Keys watched once and then left alone are
    /// dropped when the map has doubled since it was last pruned: memory follows the keys
    /// counted and watched, at O(1) amortised per watch.
    fn watch(&mut self, key: &str) -> Arc<RemotePresence> {
        if let Some(totals) = self.keys.get(key) {
            return totals.clone();
        }
        if self.keys.len() >= self.prune_at.max(Self::PRUNE_FROM) {
            self.keys.retain(|_, totals| {
                totals.live.load(Ordering::Acquire) > 0 || Arc::strong_count(totals) > 1
            });
            self.prune_at = 2 * self.keys.len();
        }
        self.keys.entry(key.to_owned()).or_default().clone()
    }
}

/// What a subscription watching presence has reported so far, per topic or pattern it named.
struct PresenceWatch {
    keys: Vec<WatchedKey>,
    /// At most one presence event per tick.
    tick: tokio::time::Interval,
}

impl PresenceWatch {
    /// What changed since the last call, if anything.
    fn changes(&mut self) -> Vec<PresenceChange> {
        let mut changes = Vec::new();
        for watched in &mut self.keys {
            let now = watched.read();
            let seen = watched.seen;
            if now != seen {
                changes.push(PresenceChange {
                    topic: watched.key.as_str().to_owned(),
                    subscribers: now.2,
                    joined: now.0.saturating_sub(seen.0),
                    left: now.1.saturating_sub(seen.1),
                });
                watched.seen = now;
            }
        }
        changes
    }
}

/// One topic or pattern a presence watcher follows.
struct WatchedKey {
    key: Pattern,
    local: Arc<PresenceCounter>,
    /// The other hubs' subscriptions of it, in cluster mode.
    remote: Option<Arc<RemotePresence>>,
    /// (joined, left, live) at the previous event.
    seen: (u64, u64, u64),
}

impl WatchedKey {
    /// (joined, left, live) over this hub and, in cluster mode, the others.
    fn read(&self) -> (u64, u64, u64) {
        let (joined, left) = self.local.read();
        let mut now = (joined, left, joined - left);
        if let Some(remote) = &self.remote {
            let remote_left = remote.left.load(Ordering::Acquire);
            now.0 += remote.joined.load(Ordering::Acquire);
            now.1 += remote_left;
            now.2 += remote.live.load(Ordering::Acquire);
        }
        now
    }
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
            let mut watermarked = Vec::with_capacity(recovered.watermarks.len());
            for (topic, through) in recovered.watermarks {
                let log = TopicLog::with_watermark(through);
                state.add_topic(
                    &topic,
                    TopicState {
                        log,
                        ..TopicState::default()
                    },
                );
                watermarked.push(topic);
            }
            for message in &recovered.messages {
                state.deliver(message, &shared.config, log, None);
            }
            // Topics whose every message was evicted are remembered only as the gap they leave.
            for topic in &watermarked {
                state.forget_if_unused(topic);
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
            .on_delete(hub.apply_delete(weak.clone()));
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
                        state.lost_through = state.lost_through.max(message.seq - 1);
                    }
                    state.deliver(message, &hub.shared.config, log, None);
                }
            }));
        hub
    }

    /// How this hub applies a deletion that a shared log carries (cluster mode): at its place in
    /// the stream, with what a door's deletion does. The tombstone's seq is not a message: `head`
    /// moves past it, so that the next message is not taken for one this hub missed.
    fn apply_delete(&self, weak: Weak<Shared>) -> crate::log::ApplyDelete {
        Box::new(move |topic, seq| {
            let Some(shared) = weak.upgrade() else {
                return Purged::default();
            };
            let hub = Hub { shared };
            let log = hub.shared.log.as_deref();
            let mut state = hub.lock();
            if seq > state.head + 1 {
                state.forgotten_through = state.forgotten_through.max(seq - 1);
            }
            let purged = state.purge_topic(topic, log);
            state.head = state.head.max(seq);
            purged
        })
    }

    fn from_parts(
        config: HubConfig,
        metrics: Metrics,
        epoch: Arc<str>,
        log: Option<Box<dyn Log>>,
    ) -> Hub {
        let queues = Queues::default();
        let state = State {
            idempotency: idempotency::Window::new(config.idempotency),
            queues: queues.clone(),
            ..State::default()
        };
        let reachable = log.as_ref().and_then(|log| log.reachable());
        Hub {
            shared: Arc::new(Shared {
                epoch,
                config,
                metrics,
                reachable,
                log,
                state: Mutex::new(state),
                peers: OnceLock::new(),
                queues,
                remote_presence: Mutex::new(RemoteTotals::default()),
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

    /// Hub state for a metrics scrape (everything but connections). Under the hub's lock it
    /// reads only totals kept as the state changes: a scrape must not stall publishers however
    /// many topics there are. The queues are walked under their own lock.
    pub fn snapshot(&self) -> Snapshot {
        let state = self.lock();
        let mut snapshot = Snapshot {
            topics: state.topics.len(),
            head_seq: state.head,
            retained_messages: state.retained.messages,
            retained_bytes: state.retained.bytes,
            oldest_retained_seq: state.retained.oldest_seq(),
            ..Default::default()
        };
        drop(state);
        for gauge in lock_queues(&self.shared.queues).values() {
            if let Some((depth, bytes)) = gauge.depth() {
                snapshot.queued_messages += depth;
                snapshot.max_queue_depth = snapshot.max_queue_depth.max(depth);
                snapshot.queued_bytes += bytes;
                snapshot.max_queue_bytes = snapshot.max_queue_bytes.max(bytes);
            }
        }
        if let Some(log) = &self.shared.log {
            snapshot.log_bytes_on_disk = log.stats().bytes_on_disk;
        }
        snapshot
    }

    /// Seq of the oldest message retained anywhere (0 when none); O(1).
    pub fn oldest_retained_seq(&self) -> u64 {
        self.lock().retained.oldest_seq()
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
        self.publish_once(topic, payload, headers, None)
    }

    /// [`Hub::publish`] under an idempotency key (checked with [`idempotency::parse_key`]): while
    /// the key is in the window, a retry of the same message is answered with the original's
    /// outcome and [`Publishing::is_duplicate`] says so; a publish of another message under it
    /// is refused.
    pub fn publish_once(
        &self,
        topic: Topic,
        payload: Bytes,
        headers: Headers,
        key: Option<Arc<str>>,
    ) -> Publishing {
        if let Err(error) = self
            .check_payload(payload.len())
            .and_then(|()| check_headers(&headers))
        {
            return Publishing::done(Err(error));
        }
        let shared = &*self.shared;
        // Hashed before the lock is taken: payloads may be large.
        let fingerprint = key.as_ref().map(|_| Fingerprint::of(&topic, &payload));
        let published_at = shared.config.clock.now();
        let mut state = self.lock();
        if let (Some(key), Some(fingerprint)) = (&key, &fingerprint) {
            match state.idempotency.lookup(key, fingerprint, published_at) {
                Err(error) => return Publishing::done(Err(error)),
                Ok(Earlier::New) => {}
                Ok(Earlier::Delivered(seen)) => {
                    // The window keeps no payloads: the answer carries what a publisher is
                    // told (topic, cursor, time), not the body.
                    let original = Message::new(
                        topic,
                        Bytes::new(),
                        seen.seq,
                        shared.epoch.clone(),
                        seen.published_at,
                        Headers::new(),
                    )
                    .with_idempotency_key(Some(key.clone()));
                    return Publishing {
                        outcome: Outcome::Done(Some(Ok(Arc::new(original)))),
                        duplicate: true,
                    };
                }
                Ok(Earlier::InFlight(original)) => match original.clone().now_or_never() {
                    // It failed: nothing was published, so this retry publishes afresh.
                    Some(Err(_) | Ok(Err(_))) => state.idempotency.abandon(key),
                    // Not stored yet (or just now): the retry gets the original's outcome.
                    _ => {
                        return Publishing {
                            outcome: Outcome::Shared(original),
                            duplicate: true,
                        };
                    }
                },
            }
        }
        state.assigned += 1;
        let message = Arc::new(
            Message::new(
                topic,
                payload,
                state.assigned,
                shared.epoch.clone(),
                published_at,
                headers,
            )
            .with_idempotency_key(key.clone()),
        );
        match &shared.log {
            None => {
                state.deliver(&message, &shared.config, None, fingerprint);
                Publishing::done(Ok(message))
            }
            Some(log) => {
                // Handed over under the lock, so the log receives messages in seq order.
                let (ack, acked) = oneshot::channel();
                let known = state.known(&message.topic);
                log.append_known(message, known, ack);
                let (Some(key), Some(fingerprint)) = (key, fingerprint) else {
                    return Publishing {
                        outcome: Outcome::Waiting(acked),
                        duplicate: false,
                    };
                };
                // Failed publishes leave their entry until retried; sweep them once they are
                // as many as the window holds, so their count stays bounded.
                if state.idempotency.in_flight() >= shared.config.idempotency.keys.max(1024) {
                    state.idempotency.abandon_failed(|publish| {
                        matches!(publish.clone().now_or_never(), Some(Err(_) | Ok(Err(_))))
                    });
                }
                let acked = acked.shared();
                state.idempotency.start(key, fingerprint, acked.clone());
                Publishing {
                    outcome: Outcome::Shared(acked),
                    duplicate: false,
                }
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
        lock_queues(&state.queues).insert(id, tx.gauge());
        let ended = Arc::new(OnceLock::new());
        let secret = fastrand::u64(..);
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
                holder: options.holder,
                since: config.clock.now(),
            },
        );
        for pattern in patterns.iter().filter(|p| p.as_topic().is_none()) {
            state.wildcard_subs.insert(pattern, id);
            let members = state.patterns.entry(pattern.clone()).or_default();
            members.members.insert(id);
            members.presence.join();
            mark_unsent(
                &mut state.presence_unsent,
                pattern.as_str(),
                &members.presence,
            );
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
        let presence = options.presence.then(|| {
            state.presence_watch(
                &patterns,
                config.presence_interval,
                &self.shared.remote_presence,
            )
        });
        drop(guard);
        let reachability = self.shared.reachable.clone().map(|reachable| {
            Box::new(ReachabilityWatch {
                changes: tokio_stream::wrappers::WatchStream::new(reachable),
                told: true,
            })
        });
        Ok(Subscription {
            hub: self.clone(),
            id,
            secret,
            rx,
            ended,
            pending,
            last_seq: from,
            head_at_start,
            presence,
            reachability,
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

    /// Every known topic matching `filter`, in name order (for tests; doors list by pages).
    #[cfg(test)]
    pub fn topics(&self, filter: Option<&Pattern>) -> Vec<TopicInfo> {
        self.topic_page(filter, &|_| true, None, usize::MAX).topics
    }

    /// Known topics (retained messages or live subscribers) named after `after` (from the first
    /// when `None`) that match `filter` and that `visible` admits, in name order, at most
    /// `limit`; `next` says whether more follow.
    ///
    /// Walks the ordered names from `after`, within the filter's [`Pattern::name_range`], so a
    /// page costs O(log n + names walked): O(log n + limit) without a filter or with one that
    /// starts with a literal token, more when a filter such as `*.created` skips many names. The
    /// hub's lock is taken again every [`NAMES_PER_LOCK`] names walked, so that publishers wait
    /// for one batch at most however many topics there are; a topic created or forgotten
    /// meanwhile may or may not be listed, every other one is listed once.
    pub fn topic_page(
        &self,
        filter: Option<&Pattern>,
        visible: &dyn Fn(&str) -> bool,
        after: Option<&Topic>,
        limit: usize,
    ) -> TopicPage {
        let (mut from, to) = filter.map_or((ops::Bound::Unbounded, ops::Bound::Unbounded), |p| {
            p.name_range()
        });
        if let Some(after) = after
            && match &from {
                ops::Bound::Included(start) | ops::Bound::Excluded(start) => {
                    after.as_str() >= start.as_str()
                }
                ops::Bound::Unbounded => true,
            }
        {
            from = ops::Bound::Excluded(after.to_string());
        }
        let mut topics = Vec::new();
        let mut more = false;
        'walk: while !range_is_empty(&from, &to) {
            let state = self.lock();
            let mut walked = 0;
            let mut resume = None;
            let range = (
                from.as_ref().map(String::as_str),
                to.as_ref().map(String::as_str),
            );
            for name in state.names.range::<str, _>(range) {
                if filter.is_none_or(|p| p.matches(name.as_str())) && visible(name.as_str()) {
                    if topics.len() == limit {
                        more = true;
                        break 'walk;
                    }
                    let t = &state.topics[name];
                    topics.push(TopicInfo {
                        name: name.to_string(),
                        retained_messages: t.log.len() as u64,
                        retained_bytes: t.log.bytes() as u64,
                        subscribers: t.subscriber_count() as u64,
                        last_seq: t.log.last_seq(),
                    });
                }
                walked += 1;
                if walked == NAMES_PER_LOCK {
                    resume = Some(name.to_string());
                    break;
                }
            }
            drop(state);
            match resume {
                Some(name) => from = ops::Bound::Excluded(name),
                None => break,
            }
        }
        let next = more
            .then(|| topics.last().map(|t| t.name.clone()))
            .flatten();
        TopicPage { topics, next }
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

    /// Evicts messages older than the retention age and forgets topics with nothing left, all
    /// of them ([`Hub::expire_some`] until it is done).
    pub fn expire(&self) {
        while self.expire_some() {}
    }

    /// Evicts aged messages from a bounded number of topics under one hold of the hub's lock,
    /// so that publishers wait for at most one batch however many topics there are; true if
    /// more may be due. Called periodically by the server, which lets other tasks run between
    /// batches. Visits only the topics whose oldest message may have aged.
    ///
    /// A batch ends after [`EXPIRY_HOLD`] as well as after 1024 topics: the server runs its
    /// tasks on one thread when it has one core, and a client waiting for an answer gets one
    /// turn per batch. Bounded by count alone, a batch took 2-8 ms at 200,000 topics (more at a
    /// million, each topic a few cache misses), so a publisher sending one request at a time
    /// got one answer per batch and fell behind by most of the pass (bench README, "`topics` at
    /// full size").
    pub fn expire_some(&self) -> bool {
        self.expire_within(EXPIRY_HOLD)
    }

    /// [`Hub::expire_some`] with a batch ending after `hold` (checked every
    /// [`EXPIRY_CLOCK_EVERY`] topics, so a batch visits at least that many).
    fn expire_within(&self, hold: Duration) -> bool {
        const TOPICS_PER_LOCK: usize = 1024;
        let started = std::time::Instant::now();
        let retention = self.shared.config.retention();
        let log = self.shared.log.as_deref();
        let now = self.shared.config.clock.now();
        let due = |published_at: SystemTime| {
            now.duration_since(published_at)
                .is_ok_and(|age| age > retention.age)
        };
        let mut guard = self.lock();
        let state = &mut *guard;
        for visited in 1..=TOPICS_PER_LOCK {
            if visited % EXPIRY_CLOCK_EVERY == 0 && started.elapsed() >= hold {
                return true;
            }
            let Some((generation, name)) = state.expiry.pop_due(due) else {
                return false;
            };
            let Some(topic) = state.topics.get_mut(&name) else {
                continue;
            };
            if topic.expiry_entry.map(NonZeroU64::get) != Some(generation) {
                continue;
            }
            topic.expiry_entry = None;
            state.retained.change(&mut topic.log, |topic_log| {
                topic_log.evict(&retention, now, &mut |seq| {
                    if let Some(log) = log {
                        log.evict(&name, seq);
                    }
                })
            });
            state.expiry.schedule(&name, topic);
            state.forget_if_unused(&name);
        }
        true
    }

    /// The live subscriptions of `key`, at most `limit` from position `from` (0: the first; a
    /// page's `next` continues after it), in the order they started.
    ///
    /// For a topic: every subscription a message published to it would reach (those naming it,
    /// and those whose patterns match it). For a pattern: the subscriptions that named that
    /// pattern. Under the lock, the count is O(1) and a page O(log n + limit): both read an
    /// ordered member set. Only a topic that does not exist yet scans the wildcard
    /// subscriptions.
    pub fn presence(&self, key: &Pattern, from: u64, limit: usize) -> PresencePage {
        let state = self.lock();
        let page = |members: &BTreeSet<u64>| {
            let mut rest = members.range(from..).copied();
            let ids: Vec<u64> = rest.by_ref().take(limit).collect();
            (members.len() as u64, ids, rest.next().is_some())
        };
        let (subscribers, ids, more) = match key.as_topic() {
            None => match state.patterns.get(key) {
                Some(members) => page(&members.members),
                None => (0, Vec::new(), false),
            },
            Some(_) => match state.topics.get(key.as_str()) {
                Some(topic) => page(topic.members()),
                // A topic not created yet: only wildcard subscriptions would receive it.
                None => {
                    let mut matching = Vec::new();
                    state
                        .wildcard_subs
                        .matches(key.as_str(), &mut |id| matching.push(id));
                    matching.sort_unstable();
                    matching.dedup();
                    let (ids, more) = first_from(matching.iter().copied(), from, limit);
                    (matching.len() as u64, ids, more)
                }
            },
        };
        let members = ids
            .iter()
            .map(|id| {
                let entry = &state.subs[id];
                Member {
                    holder: entry.holder.clone(),
                    since: entry.since,
                    position: *id,
                }
            })
            .collect();
        drop(state);
        PresencePage {
            subscribers,
            members,
            next: ids.last().map(|id| id + 1).filter(|_| more),
            cluster: None,
        }
    }

    /// Lets presence pages cover the other hubs on the same log (cluster mode).
    pub fn set_peers(&self, peers: Arc<dyn Peers>) {
        let _ = self.shared.peers.set(peers);
    }

    /// Starts noting which topics' and patterns' subscriptions change, for
    /// [`Hub::presence_changes`] (cluster mode); until then joins and leaves cost nothing more.
    pub fn share_presence(&self) {
        let mut state = self.lock();
        if state.presence_unsent.is_none() {
            state.presence_unsent = Some(Vec::new());
        }
    }

    /// Up to `most` of the topics and patterns whose subscriptions changed on this hub since
    /// they were last returned, each once with its live count and the joins and leaves since
    /// then (fewer than `most`: none are left). O(`most`) under the lock, whatever the number
    /// of joins: at 100,000 changed keys call again rather than hold the lock for them all.
    pub fn presence_changes(&self, most: usize) -> Vec<LocalPresence> {
        let mut state = self.lock();
        let Some(unsent) = state.presence_unsent.as_mut() else {
            return Vec::new();
        };
        unsent
            .split_off(unsent.len().saturating_sub(most))
            .into_iter()
            .filter_map(|(key, counter)| {
                counter.unsent.store(false, Ordering::Relaxed);
                let (joined, left) = counter.read();
                let sent_joined = counter.sent.0.swap(joined, Ordering::Relaxed);
                let sent_left = counter.sent.1.swap(left, Ordering::Relaxed);
                ((joined, left) != (sent_joined, sent_left)).then(|| LocalPresence {
                    key,
                    live: joined - left,
                    joined: joined - sent_joined,
                    left: left - sent_left,
                })
            })
            .collect()
    }

    /// Every topic and pattern with live subscriptions on this hub and their count, for a hub
    /// that has just joined (joins and leaves 0: it counts from here).
    pub fn presence_counts(&self) -> Vec<LocalPresence> {
        let state = self.lock();
        let count = |key: &str, members: &BTreeSet<u64>| LocalPresence {
            key: key.to_owned(),
            live: members.len() as u64,
            joined: 0,
            left: 0,
        };
        let topics = state
            .topics
            .iter()
            .filter(|(_, t)| !t.members().is_empty())
            .map(|(name, t)| count(name.as_str(), t.members()));
        let patterns = state
            .patterns
            .iter()
            .filter(|(_, p)| !p.members.is_empty())
            .map(|(pattern, p)| count(pattern.as_str(), &p.members));
        topics.chain(patterns).collect()
    }

    /// The other hubs' (joined, left, live) for `key`, as folded in so far.
    #[cfg(test)]
    pub(crate) fn remote_presence_of(&self, key: &str) -> (u64, u64, u64) {
        lock_remote(&self.shared.remote_presence)
            .keys
            .get(key)
            .map_or((0, 0, 0), |r| {
                (
                    r.joined.load(Ordering::Acquire),
                    r.left.load(Ordering::Acquire),
                    r.live.load(Ordering::Acquire),
                )
            })
    }

    /// Folds another hub's figures for `key` into the remote totals presence watchers read:
    /// `joined` and `left` since its previous report, and the change of its live count.
    pub fn fold_remote_presence(&self, key: &str, joined: u64, left: u64, live_change: i64) {
        let mut remote = lock_remote(&self.shared.remote_presence);
        let entry = remote.keys.entry(key.to_owned()).or_default();
        entry.joined.fetch_add(joined, Ordering::Release);
        entry.left.fetch_add(left, Ordering::Release);
        let live = entry
            .live
            .load(Ordering::Acquire)
            .saturating_add_signed(live_change);
        entry.live.store(live, Ordering::Release);
        // Nobody watches it here and no other hub has any: forget it, so memory follows the
        // cluster's live keys.
        if live == 0 && Arc::strong_count(entry) == 1 {
            remote.keys.remove(key);
        }
    }

    /// [`Hub::presence`] over every hub on the same log in cluster mode (the others asked, within
    /// a bound); this hub's alone otherwise.
    pub async fn presence_everywhere(
        &self,
        key: &Pattern,
        from: u64,
        limit: usize,
    ) -> PresencePage {
        match self.shared.peers.get() {
            Some(peers) => peers.presence(self, key.clone(), from, limit).await,
            None => self.presence(key, from, limit),
        }
    }

    /// Deletes `topic`: purges its retained history (through the durable log too, so that a
    /// restart does not bring it back) and ends the subscriptions that name it exactly with
    /// [`Error::TopicDeleted`]. Subscriptions that follow it through a pattern continue; one
    /// that resumes over the purged range is told of it by a `gap`.
    ///
    /// On a log shared by several hubs (cluster mode) the deletion goes through the log, so
    /// that every hub applies it at the same place in the order; this answers once this hub
    /// applied it, and counts what it did here.
    pub async fn delete_topic(&self, topic: &Topic) -> Result<Deleted, Error> {
        let log = self.shared.log.as_deref();
        let unknown = || Err(Error::UnknownTopic(topic.to_string()));
        if let Some(log) = log.filter(|log| log.numbers_messages()) {
            // Every hub holds the same history, so one that does not know the topic speaks for
            // all (but for subscriptions to it without messages on other hubs).
            if !self.lock().topics.contains_key(topic.as_str()) {
                return unknown();
            }
            let (done, answer) = oneshot::channel();
            log.delete_topic(topic, done);
            let purged = answer.await.unwrap_or_else(|_| Err(log_stopped()))?;
            return Ok(Deleted {
                purged_messages: purged.messages,
                ended_subscriptions: purged.subscriptions,
            });
        }
        let mut state = self.lock();
        if !state.topics.contains_key(topic.as_str()) {
            return unknown();
        }
        let purged = state.purge_topic(topic, log);
        Ok(Deleted {
            purged_messages: purged.messages,
            ended_subscriptions: purged.subscriptions,
        })
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
        lock_queues(&state.queues).insert(id, tx.gauge());
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
    ///
    /// `fingerprint` is the message's idempotency fingerprint when the caller computed it
    /// already (a keyed publish delivered at once), so that it is not hashed again here.
    fn deliver(
        &mut self,
        message: &Arc<Message>,
        config: &HubConfig,
        log: Option<&dyn Log>,
        fingerprint: Option<Fingerprint>,
    ) {
        self.head = message.seq;
        // Every delivered message, whatever brought it (a publish here, recovery, another
        // node), fills the idempotency window.
        self.idempotency
            .record(message, fingerprint, config.clock.now());
        let topic = &message.topic;
        self.ensure_topic(topic);
        let topic_state = self.topics.get_mut(topic).expect("ensured above");
        self.retained.change(&mut topic_state.log, |topic_log| {
            topic_log.append(
                message.clone(),
                &config.retention(),
                message.published_at,
                &mut |seq| {
                    if let Some(log) = log {
                        log.evict(topic, seq);
                    }
                },
            )
        });
        if topic_state.expiry_entry.is_none() {
            self.expiry.schedule(topic, topic_state);
        }

        let mut overflowed = Vec::new();
        let subscribers = topic_state.subscribers.as_deref().map(|s| &s.ids);
        for id in subscribers.into_iter().flatten() {
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
        if self.retained.bytes > config.max_retained_bytes {
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
        while self.retained.bytes > target {
            let Some(Reverse((_, name))) = oldest.pop() else {
                break;
            };
            let topic = self.topics.get_mut(&name).expect("listed above");
            self.retained.change(&mut topic.log, |topic_log| {
                topic_log.pop_oldest(&mut |seq| {
                    if let Some(log) = log {
                        log.evict(&name, seq);
                    }
                })
            });
            if let Some(seq) = topic.log.oldest_seq() {
                oldest.push(Reverse((seq, name)));
            } else {
                self.forget_if_unused(&name);
            }
        }
    }

    /// What this hub knows of `topic` now (see [`Known`]).
    fn known(&self, topic: &Topic) -> Known {
        let previous = match self.topics.get(topic) {
            Some(t) => t.log.last_seq().max(t.log.evicted_through()),
            // It may have been forgotten.
            None => self.forgotten_through,
        };
        Known {
            // A skipped seq may have been the topic's.
            previous: previous.max(self.lost_through),
            head: self.head,
        }
    }

    /// Forgets `name` if nothing is retained there and nobody subscribes to it; a resume from
    /// before what it evicted is still told of the gap (`forgotten_through`).
    fn forget_if_unused(&mut self, name: &Topic) {
        if let Some(topic) = self.topics.get(name)
            && topic.log.is_empty()
            && topic.subscriber_count() == 0
        {
            self.forgotten_through = self.forgotten_through.max(topic.log.evicted_through());
            self.remove_topic(name);
        }
    }

    /// Adds a topic; every topic enters `topics` and `names` here.
    fn add_topic(&mut self, name: &Topic, topic: TopicState) {
        self.topics.insert(name.clone(), topic);
        self.names.insert(name.clone());
    }

    /// Removes a topic; every topic leaves `topics` and `names` here.
    fn remove_topic(&mut self, name: &Topic) {
        self.topics.remove(name);
        self.names.remove(name);
    }

    /// Creates `topic` if it is new, attaching every wildcard subscriber that matches it. Every
    /// topic is created here, so no creation path can miss a wildcard subscriber.
    fn ensure_topic(&mut self, topic: &Topic) {
        if self.topics.contains_key(topic) {
            return;
        }
        let topic_state = TopicState {
            log: TopicLog::inheriting(self.forgotten_through),
            ..TopicState::default()
        };
        self.add_topic(topic, topic_state);
        let mut matching = Vec::new();
        self.wildcard_subs
            .matches(topic.as_str(), &mut |id| matching.push(id));
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
        let subscribers = topic_state.subscribers.get_or_insert_default();
        if subscribers.members.insert(id) {
            subscribers.ids.insert(id);
            subscribers.presence.join();
            mark_unsent(
                &mut self.presence_unsent,
                topic.as_str(),
                &subscribers.presence,
            );
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
        // Topics known here were created after (and inherited) every forgetting that could
        // concern them; only a pattern or an unknown topic may name a forgotten one.
        let known = patterns
            .iter()
            .all(|p| p.as_topic().is_some() && self.topics.contains_key(p.as_str()));
        let forgotten = if known { 0 } else { self.forgotten_through };
        let evicted = self
            .matching_topics(patterns)
            .map(|(_, t)| t.log.evicted_through())
            .chain([forgotten, self.lost_through])
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

    /// Those of subscriptions `ids` that named a pattern for which `named` holds.
    fn naming(&self, ids: impl Iterator<Item = u64>, named: impl Fn(&Pattern) -> bool) -> Vec<u64> {
        ids.filter(|id| self.subs[id].patterns.iter().any(&named))
            .collect()
    }

    /// What a new subscription naming `patterns` watches for presence events.
    fn presence_watch(
        &self,
        patterns: &[Pattern],
        interval: Duration,
        remote: &Mutex<RemoteTotals>,
    ) -> Box<PresenceWatch> {
        let keys = patterns
            .iter()
            .filter_map(|p| {
                let local = match p.as_topic() {
                    Some(_) => self
                        .topics
                        .get(p.as_str())?
                        .subscribers
                        .as_ref()?
                        .presence
                        .clone(),
                    None => self.patterns.get(p)?.presence.clone(),
                };
                let remote = self
                    .presence_unsent
                    .is_some()
                    .then(|| lock_remote(remote).watch(p.as_str()));
                let mut watched = WatchedKey {
                    key: p.clone(),
                    local,
                    remote,
                    seen: (0, 0, 0),
                };
                watched.seen = watched.read();
                Some(watched)
            })
            .collect();
        let period = interval.max(Duration::from_millis(1));
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        Box::new(PresenceWatch { keys, tick })
    }

    /// Purges `topic`'s retained history and ends the subscriptions that name it exactly; the
    /// one deletion rule, whether the deletion came from a door or, in cluster mode, from the
    /// shared log. A topic this hub does not know has nothing to purge.
    fn purge_topic(&mut self, topic: &Topic, log: Option<&dyn Log>) -> Purged {
        let Some(topic_state) = self.topics.get_mut(topic.as_str()) else {
            return Purged::default();
        };
        let mut purged_messages = 0;
        while !topic_state.log.is_empty() {
            self.retained.change(&mut topic_state.log, |topic_log| {
                topic_log.pop_oldest(&mut |seq| {
                    if let Some(log) = log {
                        log.evict(topic, seq);
                    }
                })
            });
            purged_messages += 1;
        }
        let exact = self.naming(self.topics[topic.as_str()].subscriber_ids(), |p| {
            p.as_str() == topic.as_str()
        });
        for id in &exact {
            self.remove_sub(*id, Ended::Closed(Error::TopicDeleted(topic.to_string())));
        }
        // With pattern subscribers left the topic stays (empty, its watermark reporting the
        // purged range); otherwise it is forgotten like an expired one.
        if let Some(left) = self.topics.get(topic.as_str())
            && left.subscriber_count() == 0
        {
            self.forgotten_through = self.forgotten_through.max(left.log.evicted_through());
            self.remove_topic(topic);
        }
        tracing::info!(%topic, purged_messages, ended_subscriptions = exact.len(), "topic deleted");
        Purged {
            messages: purged_messages,
            subscriptions: exact.len() as u64,
        }
    }

    fn remove_sub(&mut self, id: u64, why: Ended) {
        let Some(entry) = self.subs.remove(&id) else {
            return;
        };
        lock_queues(&self.queues).remove(&id);
        let _ = entry.ended.set(why);
        for pattern in entry.patterns.iter().filter(|p| p.as_topic().is_none()) {
            self.wildcard_subs.remove(pattern, id);
            if let Some(members) = self.patterns.get_mut(pattern) {
                members.members.remove(&id);
                members.presence.leave();
                mark_unsent(
                    &mut self.presence_unsent,
                    pattern.as_str(),
                    &members.presence,
                );
                if members.members.is_empty() {
                    self.patterns.remove(pattern);
                }
            }
        }
        for name in &entry.topics {
            let Some(subscribers) = self
                .topics
                .get_mut(name)
                .and_then(|topic| topic.subscribers.as_deref_mut())
            else {
                continue;
            };
            subscribers.ids.swap_remove(&id);
            subscribers.members.remove(&id);
            subscribers.presence.leave();
            mark_unsent(
                &mut self.presence_unsent,
                name.as_str(),
                &subscribers.presence,
            );
            self.forget_if_unused(name);
        }
        // Dropping `entry.tx` here wakes the subscriber, which then finds `ended` set.
    }
}

/// A publish under way: resolves to the accepted message (its seq and time) or the error that
/// refused it. Without a durable log it is ready at once, and [`Publishing::now`] answers
/// without polling.
#[must_use = "a publish is only acknowledged once this resolves"]
pub struct Publishing {
    outcome: Outcome,
    duplicate: bool,
}

enum Outcome {
    Done(Option<Result<Arc<Message>, Error>>),
    Waiting(oneshot::Receiver<Result<Stored, Error>>),
    /// A keyed publish waiting for the log, which a retry may be waiting on too.
    Shared(InFlight),
}

impl Publishing {
    fn done(outcome: Result<Arc<Message>, Error>) -> Publishing {
        Publishing {
            outcome: Outcome::Done(Some(outcome)),
            duplicate: false,
        }
    }

    /// The outcome if it is already known (always, without a durable log).
    pub fn now(self) -> Option<Result<Arc<Message>, Error>> {
        match self.outcome {
            Outcome::Done(done) => done,
            Outcome::Waiting(_) | Outcome::Shared(_) => None,
        }
    }

    /// Whether this is a retry under an idempotency key whose message was already published (or
    /// is being published): the outcome is the original's, and nothing new is stored. A
    /// delivered original's answer carries its topic, cursor and time but not its payload.
    pub fn is_duplicate(&self) -> bool {
        self.duplicate
    }

    /// The outcome, and whether the publish was a duplicate: a retry [`Publishing::is_duplicate`]
    /// recognised at once, or one only the log recognised once it answered (a shared log that
    /// already held the key, stored through another node).
    pub async fn settled(mut self) -> Result<(Arc<Message>, bool), Error> {
        let stored = std::future::poll_fn(|cx| self.poll_stored(cx)).await?;
        Ok((stored.message, self.duplicate || stored.duplicate))
    }

    fn poll_stored(&mut self, cx: &mut Context<'_>) -> Poll<Result<Stored, Error>> {
        match &mut self.outcome {
            Outcome::Done(done) => Poll::Ready(
                done.take()
                    .expect("polled after completion")
                    .map(Stored::from),
            ),
            Outcome::Waiting(acked) => Pin::new(acked)
                .poll(cx)
                .map(|answer| answer.unwrap_or_else(|_| Err(log_stopped()))),
            Outcome::Shared(acked) => Pin::new(acked)
                .poll(cx)
                .map(|answer| answer.unwrap_or_else(|_| Err(log_stopped()))),
        }
    }
}

/// The answer of a log that went away without answering.
fn log_stopped() -> Error {
    Error::Unavailable(
        "the log stopped before storing the message; it may not have been published".into(),
    )
}

impl Future for Publishing {
    type Output = Result<Arc<Message>, Error>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.poll_stored(cx)
            .map(|stored| stored.map(|stored| stored.message))
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
        if let Some(watch) = &mut self.presence {
            while watch.tick.poll_tick(cx).is_ready() {
                let changes = watch.changes();
                if !changes.is_empty() {
                    return Poll::Ready(Some(Ok(Event::Presence(changes))));
                }
            }
        }
        if let Some(event) = ReachabilityWatch::poll_change(&mut self.reachability, cx) {
            return Poll::Ready(Some(Ok(event)));
        }
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

/// The `limit` smallest of `ids` from `from` on, ascending, and whether there are more.
fn first_from(ids: impl Iterator<Item = u64>, from: u64, limit: usize) -> (Vec<u64>, bool) {
    let mut kept = BinaryHeap::with_capacity(limit + 1);
    let mut above = 0;
    for id in ids.filter(|id| *id >= from) {
        above += 1;
        kept.push(id);
        if kept.len() > limit {
            kept.pop();
        }
    }
    (kept.into_sorted_vec(), above > limit)
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

    #[tokio::test(start_paused = true)]
    async fn aged_messages_expire_and_empty_topics_are_forgotten() {
        let hub = hub(HubConfig {
            retain_age: Duration::from_secs(60),
            clock: Clock::tokio(),
            ..Default::default()
        });
        publish(&hub, "old", 1);
        tokio::time::advance(Duration::from_secs(59)).await;
        hub.expire();
        assert_eq!(hub.topics(None).len(), 1, "not aged yet");
        tokio::time::advance(Duration::from_secs(2)).await;
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

    /// A forgotten topic's range concerns only subscriptions that may name it: a topic known all
    /// along is told of nothing, a topic created since inherits it, and so does a pattern.
    #[tokio::test(start_paused = true)]
    async fn a_forgotten_topic_s_gap_is_reported_only_where_it_may_concern() {
        let hub = hub(HubConfig {
            retain_age: Duration::from_secs(60),
            clock: Clock::tokio(),
            ..Default::default()
        });
        publish(&hub, "old", 1);
        tokio::time::advance(Duration::from_secs(30)).await;
        publish(&hub, "kept", 1);
        tokio::time::advance(Duration::from_secs(31)).await;
        hub.expire();
        publish(&hub, "new", 1);
        let first_event = |pattern: &str| {
            let mut sub = hub
                .subscribe(SubscribeOptions {
                    patterns: vec![Pattern::parse(pattern).unwrap()],
                    start: Start::After(Cursor {
                        epoch: hub.epoch().to_owned(),
                        seq: 0,
                    }),
                    ..Default::default()
                })
                .unwrap();
            futures_util::FutureExt::now_or_never(sub.next())
                .flatten()
                .unwrap()
                .unwrap()
        };
        assert!(
            matches!(first_event("kept"), Event::Message(m) if m.seq == 2),
            "known all along"
        );
        for pattern in ["new", "old", ">"] {
            assert!(
                matches!(
                    first_event(pattern),
                    Event::Gap(Gap {
                        from_seq: 1,
                        to_seq: Some(1),
                        ..
                    })
                ),
                "{pattern}"
            );
        }
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

    /// The expiry pass evicts by age in time order, topic by topic, and a topic forgotten and
    /// published to again keeps one entry in the expiry index, not one per life.
    #[tokio::test(start_paused = true)]
    async fn expiry_follows_each_topics_oldest_message() {
        let hub = hub(HubConfig {
            retain_age: Duration::from_secs(60),
            clock: Clock::tokio(),
            ..Default::default()
        });
        publish(&hub, "a", 1);
        tokio::time::advance(Duration::from_secs(30)).await;
        publish(&hub, "b", 1);
        tokio::time::advance(Duration::from_secs(31)).await;
        hub.expire();
        let names =
            |hub: &Hub| -> Vec<String> { hub.topics(None).into_iter().map(|t| t.name).collect() };
        assert_eq!(names(&hub), ["b"], "a aged, b not yet");
        tokio::time::advance(Duration::from_secs(30)).await;
        hub.expire();
        assert!(names(&hub).is_empty(), "b aged too");

        for _ in 0..100 {
            publish(&hub, "again", 1);
            tokio::time::advance(Duration::from_secs(61)).await;
            hub.expire();
        }
        assert!(names(&hub).is_empty());
        assert!(hub.lock().expiry.heap.is_empty(), "no entries left behind");

        // A later message keeps its topic after the first one ages out.
        publish(&hub, "c", 1);
        tokio::time::advance(Duration::from_secs(40)).await;
        publish(&hub, "c", 1);
        tokio::time::advance(Duration::from_secs(21)).await;
        hub.expire();
        assert_eq!(stats(&hub, "c").retained_messages, 1);
        assert_eq!(hub.lock().expiry.heap.len(), 1);
    }

    /// Subscribe and unsubscribe storms on one topic grow linearly: run with
    /// `cargo test --release --lib storms -- --ignored --nocapture` to print the times (a
    /// measurement, not a timed test).
    #[test]
    #[ignore = "a measurement; run it on purpose"]
    fn storms_on_one_topic_are_linear() {
        for n in [100_000, 200_000] {
            let hub = hub(HubConfig::default());
            let started = std::time::Instant::now();
            let subs: Vec<Subscription> = (0..n)
                .map(|_| {
                    hub.subscribe(SubscribeOptions {
                        patterns: vec![Pattern::parse("storm").unwrap()],
                        ..Default::default()
                    })
                    .unwrap()
                })
                .collect();
            let subscribed = started.elapsed();
            let started = std::time::Instant::now();
            drop(subs);
            let unsubscribed = started.elapsed();
            assert_eq!(hub.subscriber_count(), 0);
            println!("{n} subscriptions: subscribe {subscribed:?}, unsubscribe {unsubscribed:?}");
        }
    }

    /// Publishing to new topics costs the same with 10,000 wildcard subscriptions that do not
    /// match them as with none: run with
    /// `cargo test --release --lib wildcard_scale -- --ignored --nocapture`.
    #[test]
    #[ignore = "a measurement; run it on purpose"]
    fn wildcard_scale() {
        for wildcards in [0, 10_000] {
            let hub = hub(HubConfig::default());
            let _subs: Vec<Subscription> = (0..wildcards)
                .map(|i| {
                    hub.subscribe(SubscribeOptions {
                        patterns: vec![Pattern::parse(&format!("other{i}.*.>")).unwrap()],
                        ..Default::default()
                    })
                    .unwrap()
                })
                .collect();
            let started = std::time::Instant::now();
            for i in 0..100_000 {
                publish(&hub, &format!("new.topic{i}"), 8);
            }
            let per_publish = started.elapsed() / 100_000;
            println!(
                "{wildcards} wildcard subscriptions: {per_publish:?} per publish to a new topic"
            );
        }
    }

    /// Memory per topic holding one 64-byte message: run with
    /// `cargo test --release --lib memory_per_topic -- --ignored --nocapture`.
    #[test]
    #[ignore = "a measurement; run it on purpose"]
    fn memory_per_topic() {
        fn rss() -> usize {
            let status = std::fs::read_to_string("/proc/self/status").unwrap();
            let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
            line.split_whitespace()
                .nth(1)
                .unwrap()
                .parse::<usize>()
                .unwrap()
                * 1024
        }
        let hub = hub(HubConfig::default());
        let before = rss();
        let n = 300_000;
        for i in 0..n {
            publish(&hub, &format!("many.topic{i}"), 64);
        }
        let per_topic = (rss() - before) / n;
        println!("{per_topic} bytes of RSS per topic holding one 64-byte message");
    }

    /// The ordered names are the topics' names, whichever way topics come and go.
    fn assert_names_in_step(hub: &Hub) {
        let state = hub.lock();
        let mut keys: Vec<&Topic> = state.topics.keys().collect();
        keys.sort();
        let names: Vec<&Topic> = state.names.iter().collect();
        assert_eq!(keys, names);
    }

    /// A batch of the expiry pass ends when its time is up, not only after 1024 topics: with no
    /// time at all it still expires the topics visited before it first reads the clock, says
    /// more are due, and the batches together expire them all.
    #[tokio::test(start_paused = true)]
    async fn an_expiry_batch_ends_when_its_time_is_up() {
        let hub = hub(HubConfig {
            retain_age: Duration::from_secs(1),
            clock: Clock::tokio(),
            ..HubConfig::default()
        });
        for i in 0..100 {
            publish(&hub, &format!("aging.{i}"), 8);
        }
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(hub.expire_within(Duration::ZERO), "more are due");
        assert_eq!(hub.topics(None).len(), 100 - (EXPIRY_CLOCK_EVERY - 1));
        let mut batches = 1;
        while hub.expire_within(Duration::ZERO) {
            batches += 1;
        }
        assert!(hub.topics(None).is_empty());
        assert!(batches >= 100 / EXPIRY_CLOCK_EVERY, "{batches} batches");
        // With time to spare, one batch takes them all.
        for i in 0..100 {
            publish(&hub, &format!("aging.{i}"), 8);
        }
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(!hub.expire_within(Duration::from_secs(60)));
        assert!(hub.topics(None).is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn ordered_names_follow_topics_through_every_way_in_and_out() {
        let hub = hub(HubConfig {
            retain_age: Duration::from_secs(1),
            clock: Clock::tokio(),
            max_retained_bytes: 4096,
            ..HubConfig::default()
        });
        for i in 0..50 {
            publish(&hub, &format!("t.{i}"), 100);
        }
        assert_names_in_step(&hub);
        assert!(hub.topics(None).len() < 50, "the hub-wide cap forgot some");
        let sub = hub
            .subscribe(SubscribeOptions {
                patterns: vec![Pattern::parse("s.only").unwrap()],
                ..Default::default()
            })
            .unwrap();
        assert_names_in_step(&hub);
        hub.delete_topic(&Topic::parse("t.49").unwrap())
            .await
            .unwrap();
        assert_names_in_step(&hub);
        tokio::time::advance(Duration::from_secs(2)).await;
        hub.expire();
        assert_names_in_step(&hub);
        drop(sub);
        assert_names_in_step(&hub);
        assert!(hub.topics(None).is_empty());
    }

    #[test]
    fn topic_pages_list_every_admitted_topic_once_in_name_order() {
        let hub = hub(HubConfig::default());
        let n = 3 * NAMES_PER_LOCK + 7;
        let mut names: Vec<String> = (0..n)
            .map(|i| format!("{}.t{i}", ["a", "b", "c"][i % 3]))
            .collect();
        for name in &names {
            publish(&hub, name, 1);
        }
        names.sort();
        let page_through = |filter: Option<&Pattern>, visible: &dyn Fn(&str) -> bool, limit| {
            let mut listed = Vec::new();
            let mut after = None;
            loop {
                let page = hub.topic_page(filter, visible, after.as_ref(), limit);
                assert!(page.topics.len() <= limit);
                listed.extend(page.topics.into_iter().map(|t| t.name));
                match page.next {
                    Some(next) => {
                        assert_eq!(Some(&next), listed.last(), "next is the last name listed");
                        after = Some(Topic::parse(&next).unwrap());
                    }
                    None => return listed,
                }
            }
        };
        assert_eq!(page_through(None, &|_| true, 1000), names);
        assert_eq!(page_through(None, &|_| true, n), names, "one full page");
        let b = Pattern::parse("b.*").unwrap();
        let in_b: Vec<String> = names
            .iter()
            .filter(|t| t.starts_with("b."))
            .cloned()
            .collect();
        assert_eq!(page_through(Some(&b), &|_| true, 100), in_b);
        // Visibility thins pages out without shortening them: a page holds `limit` visible topics.
        let sevens = |name: &str| name.ends_with('7');
        let visible: Vec<String> = names.iter().filter(|t| sevens(t)).cloned().collect();
        assert!(visible.len() > 2 * NAMES_PER_LOCK / 10);
        assert_eq!(page_through(None, &sevens, 10), visible);
        let first = hub.topic_page(None, &sevens, None, 10);
        assert_eq!(first.topics.len(), 10);
        // A pattern whose first token is a wildcard, and an exact topic.
        let star = Pattern::parse("*.t1").unwrap();
        assert_eq!(page_through(Some(&star), &|_| true, 1), ["b.t1"]);
        let exact = Pattern::parse("c.t2").unwrap();
        assert_eq!(page_through(Some(&exact), &|_| true, 5), ["c.t2"]);
        // `after` outside the pattern's range, before and beyond it.
        let a = Topic::parse("a").unwrap();
        let z = Topic::parse("z").unwrap();
        assert_eq!(
            hub.topic_page(Some(&b), &|_| true, Some(&a), 1).topics[0].name,
            in_b[0]
        );
        assert!(
            hub.topic_page(Some(&b), &|_| true, Some(&z), 1)
                .topics
                .is_empty()
        );
        assert!(
            hub.topic_page(
                Some(&exact),
                &|_| true,
                Some(&Topic::parse("c.t2").unwrap()),
                1
            )
            .topics
            .is_empty()
        );
    }

    /// The scrape's figures as a walk of every topic and subscription computes them.
    fn walked(hub: &Hub) -> Snapshot {
        let state = hub.lock();
        let mut walked = Snapshot {
            topics: state.topics.len(),
            head_seq: state.head,
            ..Default::default()
        };
        for topic in state.topics.values() {
            walked.retained_messages += topic.log.len();
            walked.retained_bytes += topic.log.bytes();
            if let Some(seq) = topic.log.oldest_seq()
                && (walked.oldest_retained_seq == 0 || seq < walked.oldest_retained_seq)
            {
                walked.oldest_retained_seq = seq;
            }
        }
        for entry in state.subs.values() {
            if let Some((depth, bytes)) = entry.tx.as_ref().and_then(|tx| tx.gauge().depth()) {
                walked.queued_messages += depth;
                walked.max_queue_depth = walked.max_queue_depth.max(depth);
                walked.queued_bytes += bytes;
                walked.max_queue_bytes = walked.max_queue_bytes.max(bytes);
            }
        }
        walked
    }

    #[track_caller]
    fn assert_totals_in_step(hub: &Hub) -> Snapshot {
        let (kept, walked) = (hub.snapshot(), walked(hub));
        assert_eq!(
            format!("{kept:?}"),
            format!("{walked:?}"),
            "the totals a scrape reads agree with a walk"
        );
        assert_eq!(hub.oldest_retained_seq(), walked.oldest_retained_seq);
        kept
    }

    #[tokio::test(start_paused = true)]
    async fn scrape_totals_follow_every_way_messages_and_queues_come_and_go() {
        let hub = hub(HubConfig {
            retain_messages: 3,
            max_retained_bytes: 300,
            retain_age: Duration::from_secs(60),
            clock: Clock::tokio(),
            ..Default::default()
        });
        let empty = assert_totals_in_step(&hub);
        assert_eq!((empty.retained_messages, empty.oldest_retained_seq), (0, 0));
        // A reader that keeps up, one that lags (a queue of 2) and one on every topic.
        let sub = |pattern: &str, queue_size| {
            hub.subscribe(SubscribeOptions {
                patterns: vec![Pattern::parse(pattern).unwrap()],
                queue_size: Some(queue_size),
                ..Default::default()
            })
            .unwrap()
        };
        let (mut reader, mut lagging, all) = (sub("a", 64), sub("b", 2), sub(">", 1024));
        // Per-topic count limit: "a" keeps its last 3.
        for _ in 0..5 {
            publish(&hub, "a", 10);
        }
        let after_a = assert_totals_in_step(&hub);
        assert_eq!(after_a.retained_messages, 3);
        assert_eq!(after_a.oldest_retained_seq, 3);
        assert_eq!(after_a.max_queue_depth, 5);
        while let Some(Some(_)) = reader.next().now_or_never() {}
        assert_totals_in_step(&hub);
        // "b" overflows its reader's queue of 2: lagged, its queue no longer counts.
        for _ in 0..4 {
            publish(&hub, "b", 10);
        }
        assert_totals_in_step(&hub);
        tokio::time::advance(Duration::from_secs(30)).await;
        // Many topics: the hub-wide cap evicts the oldest across topics.
        for i in 0..30 {
            publish(&hub, &format!("many.{i}"), 10);
        }
        let capped = assert_totals_in_step(&hub);
        assert!(capped.retained_bytes <= 300, "{capped:?}");
        assert!(capped.oldest_retained_seq > 3, "{capped:?}");
        // The lagged reader catches up: its new queue counts again.
        while let Some(Some(_)) = lagging.next().now_or_never() {}
        assert_totals_in_step(&hub);
        // Age: the first messages expire, the later ones stay.
        tokio::time::advance(Duration::from_secs(31)).await;
        hub.expire();
        assert_totals_in_step(&hub);
        // Deletion purges a topic.
        hub.delete_topic(&Topic::parse("many.29").unwrap())
            .await
            .unwrap();
        assert_totals_in_step(&hub);
        // Everyone leaves; then everything expires.
        drop((reader, lagging, all));
        let left = assert_totals_in_step(&hub);
        assert_eq!((left.queued_messages, left.max_queue_bytes), (0, 0));
        tokio::time::advance(Duration::from_secs(61)).await;
        hub.expire();
        let gone = assert_totals_in_step(&hub);
        assert_eq!(
            (gone.topics, gone.retained_bytes, gone.oldest_retained_seq),
            (0, 0, 0)
        );
    }

    /// A scrape reads kept totals: with 200,000 topics it takes no longer than with none (a
    /// walk of them under the hub's lock took tens of milliseconds in a debug build, stalling
    /// every publisher meanwhile).
    #[test]
    fn a_scrape_does_not_walk_the_topics() {
        let hub = hub(HubConfig::default());
        for i in 0..200_000 {
            publish(&hub, &format!("scrape.{i}"), 8);
        }
        // The fastest of a few, so that a moment of a busy machine does not count.
        let fastest = (0..5)
            .map(|_| {
                let started = std::time::Instant::now();
                std::hint::black_box(hub.snapshot());
                started.elapsed()
            })
            .min()
            .unwrap();
        assert!(
            fastest < Duration::from_millis(2),
            "a scrape over 200,000 topics took {fastest:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn presence_reports_list_each_changed_key_once_and_remote_figures_reach_watchers() {
        let hub = hub(HubConfig {
            presence_interval: Duration::from_secs(1),
            ..Default::default()
        });
        let subscribe = |topic: &str, presence: bool| {
            hub.subscribe(SubscribeOptions {
                patterns: vec![Pattern::parse(topic).unwrap()],
                presence,
                ..Default::default()
            })
            .unwrap()
        };
        // Not shared yet (a single hub): nothing is noted.
        let _before = subscribe("t", false);
        hub.share_presence();
        assert!(hub.presence_changes(usize::MAX).is_empty());
        let mut watcher = subscribe("t", true);
        let crowd: Vec<Subscription> = (0..1000).map(|_| subscribe("t", false)).collect();
        let pattern = subscribe("t.*", false);
        let mut report = hub.presence_changes(usize::MAX);
        report.sort_by(|a, b| a.key.cmp(&b.key));
        let count = |key: &str, live, joined, left| LocalPresence {
            key: key.into(),
            live,
            joined,
            left,
        };
        assert_eq!(
            report,
            [count("t", 1002, 1002, 0), count("t.*", 1, 1, 0)],
            "1002 joins never told of (one before sharing began), one entry"
        );
        assert!(
            hub.presence_changes(usize::MAX).is_empty(),
            "nothing changed since"
        );
        drop(crowd);
        drop(pattern);
        let mut report = hub.presence_changes(usize::MAX);
        report.sort_by(|a, b| a.key.cmp(&b.key));
        assert_eq!(report, [count("t", 2, 0, 1000), count("t.*", 0, 0, 1)]);
        let mut counts = hub.presence_counts();
        counts.sort_by(|a, b| a.key.cmp(&b.key));
        assert_eq!(counts, [count("t", 2, 0, 0)]);

        // Another hub's figures: added to this hub's in the watcher's next event.
        hub.fold_remote_presence("t", 5, 1, 4);
        tokio::time::advance(Duration::from_secs(1)).await;
        let event = futures_util::FutureExt::now_or_never(watcher.next())
            .flatten()
            .unwrap()
            .unwrap();
        let Event::Presence(changes) = event else {
            panic!("{event:?}")
        };
        assert_eq!(
            changes,
            [PresenceChange {
                topic: "t".into(),
                subscribers: 6,
                joined: 1005,
                left: 1001,
            }]
        );
        // A key nobody here watches is forgotten once no other hub has any.
        hub.fold_remote_presence("u", 2, 0, 2);
        hub.fold_remote_presence("u", 0, 2, -2);
        assert!(
            !lock_remote(&hub.shared.remote_presence)
                .keys
                .contains_key("u")
        );
        assert!(
            lock_remote(&hub.shared.remote_presence)
                .keys
                .contains_key("t")
        );

        // Keys watched once and left alone do not pile up.
        drop(watcher);
        for n in 0..10_000 {
            drop(subscribe(&format!("w.{n}"), true));
        }
        let kept = lock_remote(&hub.shared.remote_presence).keys.len();
        assert!(kept <= 2 * RemoteTotals::PRUNE_FROM, "{kept} keys kept");
    }
}

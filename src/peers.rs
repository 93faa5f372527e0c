//! Presence across the nodes of a cluster (`--nats`): each node knows only its own
//! subscriptions, so a presence page asks the others over core NATS request/reply and merges
//! their answers.
//!
//! - **Who is up.** Every node announces itself on `_topichub.STREAM.nodes` every [`HEARTBEAT`]
//!   (at start with a hello that the others answer at once, at shutdown with a goodbye). A node
//!   not heard of for [`NODE_EXPIRY`] is no longer expected. Answers also say which nodes their
//!   sender knows, so a node that has just started waits for those too.
//! - **Asking.** A page is asked on `_topichub.STREAM.presence` (outside the topics' subjects,
//!   which live under the stream's prefix); the asking node answers for itself directly and waits
//!   for the others until all expected have answered or [`ANSWER_WAIT`] has passed. A node that
//!   did not answer makes the page `partial`, never makes it hang.
//! - **Presence events.** Once per presence interval each node publishes on
//!   `_topichub.STREAM.presence.changes` the topics and patterns whose subscriptions changed
//!   there since its previous report (each once, with its live count and the joins and leaves
//!   since; [`MOST_KEYS_SENT`] a message), nothing when none did. Every node folds the others'
//!   reports into remote totals that its presence watchers add to its own counts, so 10,000
//!   joins anywhere are one report a node and one event a watcher. A node answers a hello with
//!   all its live counts, so one that has just started knows them; a node that says goodbye or
//!   is not heard of for [`NODE_EXPIRY`] has its subscriptions counted as left. Reports are
//!   numbered: a node that misses one, or hears again of a node it counted as gone, says hello
//!   again so that all counts are sent anew (and counts no longer listed are dropped).
//! - **Order and pages.** Each node draws a number (1 to 32767); members are ordered by node
//!   number, then by their position on their node (oldest first there). A page's `next` is
//!   `number << 48 | position`, so it is one `u64` as in single-node mode and continues across
//!   nodes: a node numbered below it contributes no members, the node it names continues from the
//!   position, nodes numbered above start from their first. Two nodes that drew the same number
//!   notice it from the heartbeats and the one with the greater id draws again.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, UNIX_EPOCH};

use futures_util::StreamExt as _;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::hub::{Coverage, Holder, Hub, LocalPresence, Member, Peers, PresencePage};
use crate::metrics::Door;
use crate::topic::Pattern;

/// How often a node announces itself to the others.
pub const HEARTBEAT: Duration = Duration::from_secs(1);
/// A node not heard of for this long is no longer expected to answer.
pub const NODE_EXPIRY: Duration = Duration::from_secs(3);
/// How long a presence page waits for the other nodes' answers.
pub const ANSWER_WAIT: Duration = Duration::from_secs(1);
/// Most members one node sends for a request: far above what the doors let a page ask
/// for, it bounds what a malformed request on the NATS subject can cost.
const MOST_MEMBERS_SENT: usize = 10_000;
/// Most topics and patterns in one presence report: a busy node's report is cut into messages
/// well below NATS's default 1 MiB payload limit.
const MOST_KEYS_SENT: usize = 1000;
/// Bits of a page token that hold the position on one node; the bits above hold its number.
const POSITION_BITS: u32 = 48;

/// A node's announcement.
#[derive(Serialize, Deserialize)]
struct Beat {
    node: String,
    number: u16,
    /// Just started: the others announce themselves at once.
    #[serde(default)]
    hello: bool,
    /// Shutting down: no longer expected.
    #[serde(default)]
    leaving: bool,
}

/// A presence page asked of every node.
#[derive(Serialize, Deserialize)]
struct Ask {
    asker: String,
    key: String,
    from: u64,
    limit: usize,
}

/// One node's part of a page.
#[derive(Serialize, Deserialize)]
struct Part {
    node: String,
    number: u16,
    subscribers: u64,
    members: Vec<RemoteMember>,
    /// More members follow on this node.
    more: bool,
    /// The other nodes this one knows to be up.
    knows: Vec<String>,
}

/// A node's report of its subscriptions' changes (or, answering a hello, all its counts).
#[derive(Serialize, Deserialize)]
struct Counts {
    node: String,
    /// Numbers the sender's reports one by one, so that a receiver notices one it missed.
    seq: u64,
    keys: Vec<KeyCount>,
    /// Part of all the sender's live counts: keys it does not list between the part marked
    /// `first` and the one marked `last` have none there.
    #[serde(default)]
    full: bool,
    #[serde(default)]
    first: bool,
    #[serde(default)]
    last: bool,
}

#[derive(Serialize, Deserialize)]
struct KeyCount {
    key: String,
    live: u64,
    #[serde(default)]
    joined: u64,
    #[serde(default)]
    left: u64,
}

/// What this node counts of another node's subscriptions.
struct RemoteNode {
    /// Live subscriptions per topic or pattern, as last reported (none at 0).
    live: HashMap<String, u64>,
    heard: Instant,
    /// Its last report's number.
    seq: u64,
    /// The keys listed so far by the full report under way.
    listed: Option<HashSet<String>>,
}

/// The other nodes' subscriptions, as this node folded them into its hub's remote totals.
#[derive(Default)]
struct Remote {
    nodes: HashMap<String, RemoteNode>,
    /// Nodes whose subscriptions were counted as left because they fell silent: one heard of
    /// again (after a network partition) must send all its counts again.
    silenced: HashSet<String>,
}

#[derive(Serialize, Deserialize)]
struct RemoteMember {
    position: u64,
    client: String,
    door: String,
    since_nanos: u64,
}

/// This node among the others; presence pages through it cover every node.
pub struct NatsPeers {
    inner: Arc<Inner>,
}

struct Inner {
    client: async_nats::Client,
    node: String,
    number: AtomicU16,
    nodes_subject: String,
    ask_subject: String,
    counts_subject: String,
    /// Number of this node's latest presence report.
    reports: AtomicU64,
    /// Other nodes heard of: their number and when last heard. A std mutex: held for map
    /// operations only, never across an `.await`.
    known: Mutex<HashMap<String, (u16, Instant)>>,
}

impl NatsPeers {
    /// Joins the nodes of `stream` on `client`: answers their presence requests from `hub` and
    /// lets `hub`'s presence pages cover them, until `shutdown`.
    pub async fn start(
        client: async_nats::Client,
        stream: &str,
        hub: Hub,
        shutdown: CancellationToken,
    ) -> Result<(), async_nats::SubscribeError> {
        let inner = Arc::new(Inner {
            client,
            node: std::iter::repeat_with(fastrand::alphanumeric)
                .take(12)
                .collect(),
            number: AtomicU16::new(draw_number()),
            nodes_subject: format!("_topichub.{stream}.nodes"),
            ask_subject: format!("_topichub.{stream}.presence"),
            counts_subject: format!("_topichub.{stream}.presence.changes"),
            reports: AtomicU64::new(0),
            known: Mutex::new(HashMap::new()),
        });
        let beats = inner.client.subscribe(inner.nodes_subject.clone()).await?;
        let asks = inner.client.subscribe(inner.ask_subject.clone()).await?;
        let counts = inner.client.subscribe(inner.counts_subject.clone()).await?;
        hub.share_presence();
        hub.set_peers(Arc::new(NatsPeers {
            inner: inner.clone(),
        }));
        tokio::spawn(inner.run(hub, beats, asks, counts, shutdown));
        Ok(())
    }
}

impl Peers for NatsPeers {
    fn presence(
        &self,
        hub: &Hub,
        key: Pattern,
        from: u64,
        limit: usize,
    ) -> Pin<Box<dyn Future<Output = PresencePage> + Send>> {
        let (inner, hub) = (self.inner.clone(), hub.clone());
        Box::pin(async move { inner.gather(&hub, key, from, limit).await })
    }
}

impl Inner {
    fn number(&self) -> u16 {
        self.number.load(Ordering::Relaxed)
    }

    fn known(&self) -> std::sync::MutexGuard<'_, HashMap<String, (u16, Instant)>> {
        self.known.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The other nodes heard of within [`NODE_EXPIRY`].
    fn alive(&self) -> Vec<String> {
        let mut known = self.known();
        known.retain(|_, (_, seen)| seen.elapsed() < NODE_EXPIRY);
        known.keys().cloned().collect()
    }

    async fn announce(&self, hello: bool, leaving: bool) {
        let beat = Beat {
            node: self.node.clone(),
            number: self.number(),
            hello,
            leaving,
        };
        let json = serde_json::to_vec(&beat).unwrap_or_default();
        if let Err(error) = self
            .client
            .publish(self.nodes_subject.clone(), json.into())
            .await
        {
            tracing::debug!(%error, "cannot announce this node to the others");
        }
    }

    async fn run(
        self: Arc<Self>,
        hub: Hub,
        mut beats: async_nats::Subscriber,
        mut asks: async_nats::Subscriber,
        mut counts: async_nats::Subscriber,
        shutdown: CancellationToken,
    ) {
        self.announce(true, false).await;
        let mut heartbeat = tokio::time::interval(HEARTBEAT);
        let mut report = tokio::time::interval(
            hub.config()
                .presence_interval
                .max(Duration::from_millis(10)),
        );
        report.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut remote = Remote::default();
        // Some node's counts must be sent anew: the next heartbeat is a hello (at most one a
        // heartbeat, however many reports were missed).
        let mut resync = false;
        loop {
            tokio::select! {
                () = shutdown.cancelled() => {
                    self.announce(false, true).await;
                    let _ = self.client.flush().await;
                    return;
                }
                _ = heartbeat.tick() => {
                    self.announce(std::mem::take(&mut resync), false).await;
                    remote.silence(&hub, NODE_EXPIRY);
                }
                _ = report.tick() => loop {
                    // A part at a time: the hub's lock is held for one message's keys at most.
                    let changes = hub.presence_changes(MOST_KEYS_SENT);
                    let done = changes.len() < MOST_KEYS_SENT;
                    self.report(changes, false).await;
                    if done {
                        break;
                    }
                },
                Some(message) = counts.next() => {
                    let Ok(message) = serde_json::from_slice::<Counts>(&message.payload) else { continue };
                    if message.node != self.node && !remote.fold(&hub, message) {
                        // A report was missed: every node sends all its counts again, as to a
                        // node that has just started (rare: core NATS loses messages only when
                        // a connection or a slow subscriber does).
                        resync = true;
                    }
                }
                Some(beat) = beats.next() => {
                    let Ok(beat) = serde_json::from_slice::<Beat>(&beat.payload) else { continue };
                    if beat.node == self.node {
                        continue;
                    }
                    if beat.number == self.number() && beat.node < self.node {
                        // Pages would interleave the two nodes' members: the greater id moves.
                        self.number.store(draw_number(), Ordering::Relaxed);
                        self.announce(false, false).await;
                    }
                    if beat.leaving {
                        self.known().remove(&beat.node);
                        remote.depart(&hub, &beat.node);
                        continue;
                    }
                    let back = remote.heard(&beat.node);
                    self.known().insert(beat.node, (beat.number, Instant::now()));
                    if beat.hello {
                        self.announce(false, false).await;
                        // It has just started: it learns every node's counts from here.
                        self.report(hub.presence_counts(), true).await;
                    } else if back {
                        // Heard again after its subscriptions were counted as left: a hello
                        // has every node, that one included, send all its counts.
                        resync = true;
                    }
                }
                Some(ask) = asks.next() => {
                    let Some(reply) = ask.reply else { continue };
                    let Ok(ask) = serde_json::from_slice::<Ask>(&ask.payload) else { continue };
                    if ask.asker == self.node {
                        continue;
                    }
                    let Ok(key) = Pattern::parse(&ask.key) else { continue };
                    let part = self.part(&hub, &key, ask.from, ask.limit.min(MOST_MEMBERS_SENT));
                    let json = serde_json::to_vec(&part).unwrap_or_default();
                    if let Err(error) = self.client.publish(reply, json.into()).await {
                        tracing::debug!(%error, "cannot answer a presence request");
                    }
                }
            }
        }
    }

    /// Tells the other nodes of `keys`, [`MOST_KEYS_SENT`] a message; `full`: all this node's
    /// live counts (sent even when there are none, so that stale ones are dropped).
    async fn report(&self, keys: Vec<LocalPresence>, full: bool) {
        let chunks: Vec<&[LocalPresence]> = if keys.is_empty() && full {
            vec![&[]]
        } else {
            keys.chunks(MOST_KEYS_SENT).collect()
        };
        let parts = chunks.len();
        for (i, chunk) in chunks.into_iter().enumerate() {
            let counts = Counts {
                node: self.node.clone(),
                seq: self.reports.fetch_add(1, Ordering::Relaxed) + 1,
                full,
                first: full && i == 0,
                last: full && i + 1 == parts,
                keys: chunk
                    .iter()
                    .map(|k| KeyCount {
                        key: k.key.clone(),
                        live: k.live,
                        joined: k.joined,
                        left: k.left,
                    })
                    .collect(),
            };
            let json = serde_json::to_vec(&counts).unwrap_or_default();
            if let Err(error) = self
                .client
                .publish(self.counts_subject.clone(), json.into())
                .await
            {
                tracing::debug!(%error, "cannot report presence changes to the other nodes");
            }
        }
    }

    /// This node's part of the page from token `from`.
    fn part(&self, hub: &Hub, key: &Pattern, from: u64, limit: usize) -> Part {
        let number = self.number();
        let (from_number, position) = split(from);
        let page = match number.cmp(&from_number) {
            // Before the page's start: counted, no members.
            std::cmp::Ordering::Less => hub.presence(key, u64::MAX, 0),
            std::cmp::Ordering::Equal => hub.presence(key, position, limit),
            std::cmp::Ordering::Greater => hub.presence(key, 0, limit),
        };
        Part {
            node: self.node.clone(),
            number,
            subscribers: page.subscribers,
            more: page.next.is_some(),
            members: page
                .members
                .into_iter()
                .map(|m| {
                    let (client, door) = m.holder.map_or_else(Default::default, |h| {
                        (h.client.to_string(), h.door.name().to_owned())
                    });
                    RemoteMember {
                        position: m.position,
                        client,
                        door,
                        since_nanos: m
                            .since
                            .duration_since(UNIX_EPOCH)
                            .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)),
                    }
                })
                .collect(),
            knows: self.alive(),
        }
    }

    /// Asks every node for its part of the page and merges the parts.
    async fn gather(&self, hub: &Hub, key: Pattern, from: u64, limit: usize) -> PresencePage {
        let mut parts = vec![self.part(hub, &key, from, limit)];
        let mut expected: HashSet<String> = self.alive().into_iter().collect();
        let mut answered = HashSet::new();
        if !expected.is_empty() {
            let ask = Ask {
                asker: self.node.clone(),
                key: key.as_str().to_owned(),
                from,
                limit,
            };
            match self.ask(&ask).await {
                Ok(mut answers) => {
                    let deadline = tokio::time::Instant::now() + ANSWER_WAIT;
                    while !expected.is_subset(&answered) {
                        let Ok(Some(answer)) =
                            tokio::time::timeout_at(deadline, answers.next()).await
                        else {
                            break;
                        };
                        let Ok(part) = serde_json::from_slice::<Part>(&answer.payload) else {
                            continue;
                        };
                        if part.node == self.node || !answered.insert(part.node.clone()) {
                            continue;
                        }
                        expected.extend(part.knows.iter().filter(|n| **n != self.node).cloned());
                        parts.push(part);
                    }
                }
                Err(error) => {
                    tracing::warn!(%error, "cannot ask the other nodes for presence; answering for this node only")
                }
            }
        }
        let partial = !expected.is_subset(&answered);
        merge(parts, limit, partial)
    }

    /// Sends `ask` to every node; their answers arrive on the returned subscription.
    async fn ask(&self, ask: &Ask) -> Result<async_nats::Subscriber, String> {
        let inbox = self.client.new_inbox();
        let answers = self
            .client
            .subscribe(inbox.clone())
            .await
            .map_err(|e| e.to_string())?;
        let json = serde_json::to_vec(ask).unwrap_or_default();
        self.client
            .publish_with_reply(self.ask_subject.clone(), inbox, json.into())
            .await
            .map_err(|e| e.to_string())?;
        Ok(answers)
    }
}

impl Remote {
    /// Folds another node's report into the remote totals; `false` when a report of that node
    /// was missed before this one, or its subscriptions had been counted as left for its
    /// silence: it should send all its counts. Live counts are absolute, so a report repeated
    /// or answering a hello never counts twice.
    fn fold(&mut self, hub: &Hub, counts: Counts) -> bool {
        let revived = self.silenced.remove(&counts.node);
        let node = self.nodes.entry(counts.node).or_insert_with(|| RemoteNode {
            live: HashMap::new(),
            heard: Instant::now(),
            seq: counts.seq.saturating_sub(1),
            listed: None,
        });
        node.heard = Instant::now();
        let in_order = counts.seq == node.seq + 1;
        node.seq = counts.seq;
        if counts.first {
            node.listed = Some(HashSet::new());
        }
        for k in counts.keys {
            if let Some(listed) = node.listed.as_mut().filter(|_| counts.full) {
                listed.insert(k.key.clone());
            }
            set_live(hub, node, &k.key, k.live, k.joined, k.left);
        }
        if counts.last
            && let Some(listed) = node.listed.take()
        {
            // Not listed in all its counts: they left (a report saying so was missed).
            let stale: Vec<(String, u64)> = node
                .live
                .iter()
                .filter(|(key, _)| !listed.contains(*key))
                .map(|(key, live)| (key.clone(), *live))
                .collect();
            for (key, live) in stale {
                set_live(hub, node, &key, 0, 0, live);
            }
        }
        in_order && !revived
    }

    /// Notes that `node` was heard of; `true` when its subscriptions had been counted as left
    /// for its silence.
    fn heard(&mut self, node: &str) -> bool {
        if let Some(known) = self.nodes.get_mut(node) {
            known.heard = Instant::now();
        }
        self.silenced.remove(node)
    }

    /// Counts the subscriptions of the nodes not heard of for `expiry` as left.
    fn silence(&mut self, hub: &Hub, expiry: Duration) {
        let silent: Vec<String> = self
            .nodes
            .iter()
            .filter(|(_, n)| n.heard.elapsed() >= expiry)
            .map(|(node, _)| node.clone())
            .collect();
        for node in silent {
            self.depart(hub, &node);
            self.silenced.insert(node);
        }
    }

    /// Counts every subscription of a node that left or fell silent as left.
    fn depart(&mut self, hub: &Hub, node: &str) {
        let Some(gone) = self.nodes.remove(node) else {
            return;
        };
        for (key, live) in gone.live {
            hub.fold_remote_presence(&key, 0, live, -i64::try_from(live).unwrap_or(i64::MAX));
        }
    }
}

/// Sets `node`'s live count of `key` and folds the change into the hub's remote totals.
fn set_live(hub: &Hub, node: &mut RemoteNode, key: &str, live: u64, joined: u64, left: u64) {
    let before = if live == 0 {
        node.live.remove(key)
    } else {
        node.live.insert(key.to_owned(), live)
    }
    .unwrap_or(0);
    let change =
        i64::try_from(live).unwrap_or(i64::MAX) - i64::try_from(before).unwrap_or(i64::MAX);
    hub.fold_remote_presence(key, joined, left, change);
}

/// One page out of every node's part: members by node number, then position; `next` after the
/// last member shown when any are left.
fn merge(mut parts: Vec<Part>, limit: usize, partial: bool) -> PresencePage {
    parts.sort_by(|a, b| (a.number, &a.node).cmp(&(b.number, &b.node)));
    let subscribers = parts.iter().map(|p| p.subscribers).sum();
    let nodes = u32::try_from(parts.len()).unwrap_or(u32::MAX);
    let more = parts.iter().any(|p| p.more);
    let mut all = parts
        .into_iter()
        .flat_map(|p| p.members.into_iter().map(move |m| (p.number, m)));
    let members: Vec<(u16, RemoteMember)> = all.by_ref().take(limit).collect();
    let left = all.next().is_some() || more;
    let next = members
        .last()
        .filter(|_| left)
        .map(|(number, m)| token(*number, m.position + 1));
    PresencePage {
        subscribers,
        members: members
            .into_iter()
            .map(|(_, m)| Member {
                holder: Door::from_name(&m.door).map(|door| Holder {
                    client: m.client.into(),
                    door,
                }),
                since: UNIX_EPOCH + Duration::from_nanos(m.since_nanos),
                position: m.position,
            })
            .collect(),
        next,
        cluster: Some(Coverage { nodes, partial }),
    }
}

/// A page token: node `number`, `position` on it.
fn token(number: u16, position: u64) -> u64 {
    (u64::from(number) << POSITION_BITS) | position.min((1 << POSITION_BITS) - 1)
}

/// A page token as (node number, position); a single node's `next` has number 0.
fn split(token: u64) -> (u16, u64) {
    (
        u16::try_from(token >> POSITION_BITS).unwrap_or(u16::MAX),
        token & ((1 << POSITION_BITS) - 1),
    )
}

/// A node number: 1 to 32767, so that every token fits an int64 as the HTTP API documents.
fn draw_number() -> u16 {
    fastrand::u16(1..=i16::MAX as u16)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn part(node: &str, number: u16, positions: &[u64], more: bool) -> Part {
        Part {
            node: node.into(),
            number,
            subscribers: positions.len() as u64 + u64::from(more),
            members: positions
                .iter()
                .map(|&position| RemoteMember {
                    position,
                    client: format!("{node}-{position}"),
                    door: "http".into(),
                    since_nanos: 0,
                })
                .collect(),
            more,
            knows: Vec::new(),
        }
    }

    fn clients(page: &PresencePage) -> Vec<String> {
        page.members
            .iter()
            .map(|m| m.holder.as_ref().unwrap().client.to_string())
            .collect()
    }

    #[test]
    fn pages_run_node_by_node_and_the_token_continues_on_the_node_it_names() {
        let page = merge(
            vec![part("b", 9, &[4, 7], false), part("a", 3, &[1, 2], false)],
            3,
            false,
        );
        assert_eq!(clients(&page), ["a-1", "a-2", "b-4"]);
        assert_eq!(page.subscribers, 4);
        assert_eq!(page.next.map(split), Some((9, 5)));
        assert_eq!(
            page.cluster,
            Some(Coverage {
                nodes: 2,
                partial: false
            })
        );

        // A node with more than it sent keeps the page going even when the rest fit.
        let page = merge(vec![part("a", 3, &[1], true)], 5, true);
        assert_eq!(page.next.map(split), Some((3, 2)));
        let last = merge(vec![part("a", 3, &[1], false)], 1, false);
        assert_eq!(last.next, None);
    }

    #[test]
    fn tokens_fit_an_int64_and_a_single_node_token_starts_every_node_at_its_first() {
        assert!(token(i16::MAX as u16, u64::MAX) <= i64::MAX as u64);
        assert_eq!(split(token(7, 42)), (7, 42));
        assert_eq!(split(18), (0, 18));
    }

    fn counts(node: &str, seq: u64, keys: &[(&str, u64, u64, u64)]) -> Counts {
        Counts {
            node: node.into(),
            seq,
            keys: keys
                .iter()
                .map(|&(key, live, joined, left)| KeyCount {
                    key: key.into(),
                    live,
                    joined,
                    left,
                })
                .collect(),
            full: false,
            first: false,
            last: false,
        }
    }

    #[test]
    fn reports_fold_into_remote_totals_and_a_missed_one_is_noticed_and_mended() {
        let hub = Hub::new(crate::hub::HubConfig::default());
        hub.share_presence();
        let mut remote = Remote::default();
        assert!(remote.fold(&hub, counts("b", 1, &[("t", 3, 3, 0), ("u", 1, 1, 0)])));
        assert!(remote.fold(&hub, counts("c", 7, &[("t", 2, 2, 0)])));
        assert_eq!(hub.remote_presence_of("t"), (5, 0, 5));
        assert!(remote.fold(&hub, counts("b", 2, &[("t", 1, 0, 2)])));
        assert_eq!(hub.remote_presence_of("t"), (5, 2, 3));

        // b's report 3 (u: none left) is lost: report 4 is out of order, and b's full report
        // drops the count it no longer lists, as leaves.
        assert!(!remote.fold(&hub, counts("b", 4, &[("t", 2, 1, 0)])));
        assert_eq!(hub.remote_presence_of("u"), (1, 0, 1));
        let mut full = counts("b", 5, &[("t", 2, 0, 0)]);
        (full.full, full.first, full.last) = (true, true, true);
        assert!(remote.fold(&hub, full));
        assert_eq!(hub.remote_presence_of("u"), (0, 0, 0), "forgotten");
        assert_eq!(hub.remote_presence_of("t"), (6, 2, 4));

        // A node gone: its subscriptions leave; heard of again, it must send all its counts.
        remote.depart(&hub, "c");
        assert_eq!(hub.remote_presence_of("t"), (6, 4, 2));
        remote.silence(&hub, Duration::ZERO);
        assert_eq!(hub.remote_presence_of("t"), (0, 0, 0));
        assert!(remote.heard("b"), "b was silenced");
        assert!(!remote.heard("b"));
        remote.silence(&hub, Duration::ZERO);
        assert!(!remote.heard("c"), "c said goodbye");
    }
}

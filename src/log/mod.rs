//! The hub's history: an ordered log of messages behind one small interface.
//!
//! The hub assigns seqs and does fan-out, subscriptions, lag and gaps; a log keeps what the hub
//! accepted and says when it is safe to acknowledge. Three backends:
//! - no [`Log`] at all (`memory`, the default): the hub's in-memory [`memory::TopicLog`]s are the
//!   whole history, and a publish is acknowledged as soon as it is retained;
//! - [`disk::DiskLog`] (`--data-dir`): every message is written to an embedded store before the
//!   hub retains it, delivers it and acknowledges it; the in-memory logs stay in front as the
//!   index and cache, so reads and resumes never wait for the disk;
//! - [`jetstream::JetStreamLog`] (`--nats`): a JetStream stream shared by several hubs, which
//!   numbers the messages itself; every hub applies the whole stream.
//!
//! The interface is asynchronous on purpose: [`Log::append`] only hands a message over, and the
//! log calls the hub back ([`Apply`]) with whole batches once they are durable, in seq order. A
//! remote log (a JetStream stream whose PubAck arrives later) fits the same shape: publishing
//! waits for the log, never for subscribers, and subscribers never see what the log may lose.

pub mod disk;
pub mod jetstream;
pub mod memory;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use tokio::sync::{oneshot, watch};

use crate::error::Error;
use crate::message::Message;
use crate::topic::Topic;

/// Tells one publisher how its message ended: durable and delivered, or refused by the log.
pub type Ack = oneshot::Sender<Result<Stored, Error>>;

/// A message the log holds, as its publisher is told.
#[derive(Clone, Debug)]
pub struct Stored {
    /// The message as stored (with the log's seq).
    pub message: Arc<Message>,
    /// The log already held a message under the same idempotency key, stored by an earlier
    /// publish this hub's window no longer (or never) knew of, e.g. one that reached another
    /// node of a cluster: `message` is that original, and nothing new was stored.
    pub duplicate: bool,
}

impl From<Arc<Message>> for Stored {
    /// A message stored by this very publish.
    fn from(message: Arc<Message>) -> Stored {
        Stored {
            message,
            duplicate: false,
        }
    }
}

/// Called by the log with each batch once it is durable, in seq order, before the batch's
/// publishers are acknowledged: the hub retains the messages and delivers them.
pub type Apply = Box<dyn Fn(&[Arc<Message>]) + Send + Sync>;

/// Called by a shared log when it applies the deletion of a topic (a tombstone at `seq` of the
/// stream), in stream order with the batches: the hub purges the topic and ends the
/// subscriptions naming it, as single-node deletion does, and says what it did.
pub type ApplyDelete = Box<dyn Fn(&Topic, u64) -> Purged + Send + Sync>;

/// What deleting a topic did on one node.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Purged {
    /// Retained messages purged.
    pub messages: u64,
    /// Subscriptions ended because they named the topic exactly.
    pub subscriptions: u64,
}

/// A durable history under the hub.
pub trait Log: Send + Sync {
    /// Starts the log's writer; `apply` receives every durable batch.
    fn start(&self, apply: Apply);

    /// Hands `message` to the log. Called under the hub's lock, so messages arrive in seq
    /// order; must not block. `ack` is answered once the message is durable and applied, or
    /// with the error that kept it from being stored.
    ///
    /// A log that numbers messages itself (a JetStream stream, shared by several hubs) treats
    /// the hub's seq as a local order only: it applies and acknowledges the message re-stamped
    /// with its own seq, and applies other nodes' messages through the same [`Apply`].
    fn append(&self, message: Arc<Message>, ack: Ack);

    /// [`Log::append`], told what the hub knows of the message's topic (see [`Known`]). A log
    /// shared by several hubs records it with the message, so that a hub started after the
    /// topic's older messages were evicted can tell how far its gap reaches.
    fn append_known(&self, message: Arc<Message>, known: Known, ack: Ack) {
        let _ = known;
        self.append(message, ack);
    }

    /// Retention evicted `seq` of `topic`: the log may drop it. Also called under the hub's lock.
    fn evict(&self, topic: &Topic, seq: u64);

    /// Writes out everything handed over so far, durably, and stops the writer.
    fn close(&self) -> oneshot::Receiver<()>;

    /// The log's state, for `/healthz` and `/metrics`.
    fn stats(&self) -> LogStats;

    /// Whether the log numbers messages itself (a shared stream): then a seq it skips is a
    /// message this hub never saw (evicted before it was read), which resumes must be told of.
    /// Otherwise a skipped seq is a publish the log refused, which never existed.
    fn numbers_messages(&self) -> bool {
        false
    }

    /// Resolves once the log has applied `seq`, or as soon as it is clear it will not (the
    /// shared log ends before it), within a bound of the log's choosing. A log shared by several
    /// hubs needs it: a cursor may come from a hub that is ahead of this one. Otherwise at once.
    fn until_applied(&self, seq: u64) -> Pin<Box<dyn Future<Output = ()> + Send>> {
        let _ = seq;
        Box::pin(std::future::ready(()))
    }

    /// Registers, before [`Log::start`], how this hub applies a deletion that comes through the
    /// log. Only a log shared by several hubs ([`Log::numbers_messages`]) carries deletions:
    /// each hub keeps its own copy of the history, so a deletion must reach every copy at the
    /// same place in the order. Others delete through [`Log::evict`] and ignore this.
    fn on_delete(&self, apply: ApplyDelete) {
        let _ = apply;
    }

    /// Deletes `topic` everywhere the log is shared: records the deletion in the log, where
    /// every hub applies it through its [`ApplyDelete`]. `done` is answered once this hub applied
    /// it, with what it did here.
    fn delete_topic(&self, topic: &Topic, done: oneshot::Sender<Result<Purged, Error>>) {
        let _ = done.send(Err(Error::Unsupported(format!(
            "this log does not carry deletions; {topic} was not deleted"
        ))));
    }

    /// Whether the servers holding a remote log are reachable (false while this hub cannot
    /// apply what others publish): the hub tells every subscription when it changes. `None` for
    /// a log on this machine.
    fn reachable(&self) -> Option<watch::Receiver<bool>> {
        None
    }
}

/// What a hub knew of a message's topic when it handed the message to the log: no message of
/// the topic has a seq in `(previous, head]`. `previous` is the topic's newest seq the hub knew
/// of (or a bound above it, when the hub forgot the topic or skipped seqs); `head` is the highest
/// seq the hub had applied. When `head` is just below the message's seq, `previous` is exactly
/// the topic's previous message.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Known {
    /// The topic's newest seq as the hub knew it (0: none).
    pub previous: u64,
    /// The highest seq the hub had applied.
    pub head: u64,
}

/// What a log reports about itself.
#[derive(Clone, Debug, Default)]
pub struct LogStats {
    /// Bytes its files take on disk.
    pub bytes_on_disk: u64,
    /// The last write failed (e.g. the disk is full): publishes are refused until one succeeds.
    pub failing: Option<String>,
}

/// What a log held when it was opened: the hub starts from here.
pub struct Recovered {
    /// The history id, kept across restarts.
    pub epoch: Arc<str>,
    /// Highest seq ever assigned (possibly above the newest message kept).
    pub head: u64,
    /// Seqs up to here may be missing from topics the log no longer knows.
    pub forgotten_through: u64,
    /// Per topic, the highest seq retention evicted.
    pub watermarks: Vec<(Topic, u64)>,
    /// Every retained message, in seq order.
    pub messages: Vec<Arc<Message>>,
}

//! The JetStream log (`--nats`): the hub's history is a NATS JetStream stream shared by every
//! topichub node, so that several nodes act as one hub.
//!
//! - **One order.** A message's seq is its stream sequence. Each node applies the whole stream,
//!   in order, through one ordered consumer and hands every message to the hub ([`Apply`]); the
//!   hub keeps fan-out, lag and replay as in single-node mode. So every node reports the same seq
//!   and cursor for a message.
//! - **Publish.** [`Log::append`] publishes to the stream and waits for the PubAck, then for this
//!   node to have applied that sequence (read-your-writes), and answers with the applied
//!   message. Every publish carries a `Nats-Msg-Id` (the publisher's idempotency key, or an id of
//!   this node's own), so a publish retried while a stream leader is elected is stored once; a
//!   PubAck saying "duplicate" is answered with the original message.
//! - **Epoch.** The stream's creation time: stable across leader changes, restarts and purges;
//!   a deleted and recreated stream is a new history.
//! - **Gaps.** The hub mirrors JetStream's per-subject eviction with its own retention while it
//!   runs (same limits). At start, what the stream no longer holds is derived from its state and
//!   from what each topic's oldest message says: every message carries what its publishing node
//!   knew of its topic ([`Known`]: the topic's newest seq, and the head it had applied), so a
//!   topic whose oldest message's publisher had applied everything before it has an exact
//!   watermark. Otherwise what it may have lost is bounded by the stream's state: any sequence
//!   below the first (age and size limits evict stream-wide) and, for a topic at the per-subject
//!   limit, the holes below its oldest message (the stream does not say which subject a hole
//!   belonged to). A topic the stream holds nothing of may have been evicted entirely: a resume
//!   on it is told of everything below the first sequence. Conservative, never the reverse: a
//!   resume may be told of a gap that held nothing of its topics, never miss one. A hole met
//!   while running (a message evicted before this node read it) may have been any topic's (see
//!   [`Log::numbers_messages`]).
//!
//! Topics map to subjects under a prefix (`topichub.orders.eu`); topichub's `*` and `>` are
//! NATS's own. Headers travel as one JSON header, so any header name topichub accepts survives.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, UNIX_EPOCH};

use async_nats::jetstream::{self, consumer, stream};
use async_nats::{HeaderMap, connection::State as Connection};
use bytes::Bytes;
use futures_util::StreamExt as _;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

use super::{Ack, Apply, ApplyDelete, Known, Log, LogStats, Purged, Recovered, Stored};
use crate::error::Error;
use crate::message::{Headers, Message};
use crate::topic::Topic;

/// Default stream name (`--nats-stream`).
pub const DEFAULT_STREAM: &str = "TOPICHUB";
/// Default subject prefix (`--nats-subject-prefix`).
pub const DEFAULT_SUBJECT_PREFIX: &str = "topichub";
/// How long JetStream remembers a `Nats-Msg-Id`: a publish retried within it is stored once.
pub const DUPLICATE_WINDOW: Duration = Duration::from_secs(120);
/// How long a publish is retried (same `Nats-Msg-Id`) while JetStream has no stream leader,
/// e.g. during an election after a server died; then it fails with UNAVAILABLE.
pub const PUBLISH_RETRY_WINDOW: Duration = Duration::from_secs(15);
/// How long a publish under way keeps being retried while the connection to NATS is lost.
const RECONNECT_GRACE: Duration = Duration::from_secs(2);
/// Wait for one PubAck before retrying.
const PUBACK_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a stored message may take to come back through this node's consumer before the
/// publisher is answered from the PubAck alone.
const APPLY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a resume from a cursor this node has not applied yet (issued by a node ahead of
/// it) waits for this node to catch up.
pub const CATCH_UP_WAIT: Duration = Duration::from_secs(5);
/// Messages handed to the hub in one batch at most.
const MAX_BATCH: usize = 1024;
/// Silence while reading the stream at start after which the read is retried.
const LOAD_STALL: Duration = Duration::from_secs(10);
/// After this long without a message, the stream's last sequence is checked: a consumer that
/// lost its server without noticing is replaced.
const IDLE_CHECK: Duration = Duration::from_secs(2);
/// A new clustered stream's state is read this often until it has settled (see [`settled`]).
const SETTLE_READS: Duration = Duration::from_millis(250);
/// How long a new clustered stream must keep a leader and its creation time to have settled.
const SETTLE_STABLE: Duration = Duration::from_secs(1);
/// How long a new clustered stream may take to settle before the open is retried.
const SETTLE_WAIT: Duration = Duration::from_secs(15);
/// Why a node whose stream was recreated under it refuses publishes.
const STREAM_RECREATED: &str = "the JetStream stream was deleted and created again; restart this node to follow the new history";
/// Header carrying topichub's headers, as a JSON object.
const HEADERS_HEADER: &str = "Topichub-Headers";
/// `Nats-Msg-Id`s that topichub made up (no idempotency key given) start with this.
const OWN_ID_PREFIX: &str = "topichub~";
/// Header carrying what the publishing node knew of the message's topic ([`Known`]) as
/// `PREVIOUS/HEAD`: a node started after the topic's older messages were evicted reads from it how
/// far the topic's gap reaches.
const KNOWN_HEADER: &str = "Topichub-Known";
/// Header naming the one publish (node and number) that sent a keyed message: a PubAck saying
/// "duplicate" to a retry of that very publish is its own message, not another's.
const PUBLISH_HEADER: &str = "Topichub-Publish";

/// How to reach NATS and which stream to use. Built from the `--nats*` options.
#[derive(Clone, Debug)]
pub struct NatsConfig {
    /// Server URLs; the client fails over between them (and servers the cluster announces).
    pub urls: Vec<String>,
    /// Stream name.
    pub stream: String,
    /// Subjects are `PREFIX.TOPIC`.
    pub subject_prefix: String,
    /// Replicas of a stream this node creates.
    pub replicas: usize,
    /// A `.creds` file (JWT + NKey seed).
    pub creds: Option<PathBuf>,
    /// User and password.
    pub user: Option<(String, String)>,
    /// Token.
    pub token: Option<String>,
    /// PEM CA certificate(s) to verify the servers with; implies TLS.
    pub tls_ca: Option<PathBuf>,
    /// PEM client certificate and key, for servers that verify clients.
    pub tls_client: Option<(PathBuf, PathBuf)>,
    /// Limits of a stream this node creates, from the hub's retention options.
    pub limits: StreamLimits,
}

/// Limits of a stream topichub creates.
#[derive(Clone, Copy, Debug)]
pub struct StreamLimits {
    /// `--retain-messages`: messages kept per subject.
    pub messages_per_subject: usize,
    /// `--retain-age`.
    pub age: Duration,
    /// `--max-retained-bytes`: bytes kept stream-wide.
    pub bytes: usize,
    /// `--max-payload-bytes` plus the most header bytes: the largest message NATS must take.
    pub max_message_bytes: usize,
}

/// Why the log could not be opened; `retry` when it may work later (NATS not reachable yet).
#[derive(Debug)]
pub struct OpenError {
    /// Worth retrying.
    pub retry: bool,
    /// What is wrong, and what to do.
    pub message: String,
}

impl OpenError {
    fn retry(message: String) -> OpenError {
        OpenError {
            retry: true,
            message,
        }
    }

    fn fatal(message: String) -> OpenError {
        OpenError {
            retry: false,
            message,
        }
    }
}

/// The JetStream log. See the module documentation.
pub struct JetStreamLog {
    shared: Arc<Shared>,
    publishes: mpsc::UnboundedSender<(Arc<Message>, Option<Known>, Ack)>,
    /// Taken by `start`.
    startup: Mutex<Option<Startup>>,
}

struct Startup {
    messages: consumer::pull::Ordered,
    publishes: mpsc::UnboundedReceiver<(Arc<Message>, Option<Known>, Ack)>,
}

/// What the log's tasks share. The std mutexes are never held across an `.await`, and `append`
/// (under the hub's lock) only sends on a channel, so no async mutex is needed.
struct Shared {
    client: async_nats::Client,
    context: jetstream::Context,
    stream: stream::Stream,
    subject_prefix: String,
    epoch: Arc<str>,
    /// Distinguishes this process's own message ids from other nodes'.
    node: String,
    next_id: AtomicU64,
    /// Highest stream seq applied (through the hub) by this node.
    applied: watch::Sender<u64>,
    /// Publishers waiting for the message with this `Nats-Msg-Id` to be acknowledged and applied.
    waiting: Mutex<HashMap<String, Waiting>>,
    /// Why publishes are refused right now, if they are; also set by the connection's events.
    failing: Arc<Mutex<Option<String>>>,
    bytes: AtomicU64,
    /// Woken when the connection comes back: the consumer is replaced at once rather than
    /// waiting for it to notice its server is gone.
    reconnected: Arc<tokio::sync::Notify>,
    /// The stream was deleted and created again while this node ran (a new history): nothing
    /// more is published or applied here until a restart.
    recreated: std::sync::atomic::AtomicBool,
    /// Whether NATS is reachable, as subscribers are told.
    reachable: Arc<Reachability>,
    stop: CancellationToken,
    /// Topic deletions: how the hub applies them, and who waits for theirs.
    deletions: Deletions,
}

impl JetStreamLog {
    /// Connects, finds or creates the stream, and reads back what it holds.
    pub async fn open(config: &NatsConfig) -> Result<(JetStreamLog, Recovered), OpenError> {
        let failing = Arc::new(Mutex::new(None::<String>));
        let reconnected = Arc::new(tokio::sync::Notify::new());
        let reachable = Arc::new(Reachability::default());
        let client = connect(
            config,
            failing.clone(),
            reconnected.clone(),
            reachable.clone(),
        )
        .await?;
        let max_payload = client.server_info().max_payload;
        if max_payload < config.limits.max_message_bytes {
            tracing::warn!(
                nats_max_payload = max_payload,
                needed = config.limits.max_message_bytes,
                "the NATS servers' max_payload is below --max-payload-bytes plus headers; larger publishes are refused"
            );
        }
        let mut context = jetstream::new(client.clone());
        context.set_timeout(PUBACK_TIMEOUT);
        let subjects = format!("{}.>", config.subject_prefix);
        context
            .get_or_create_stream(stream::Config {
                name: config.stream.clone(),
                subjects: vec![subjects.clone()],
                max_messages_per_subject: i64::try_from(config.limits.messages_per_subject)
                    .unwrap_or(i64::MAX),
                max_age: config.limits.age,
                max_bytes: i64::try_from(config.limits.bytes).unwrap_or(i64::MAX),
                discard: stream::DiscardPolicy::Old,
                storage: stream::StorageType::File,
                num_replicas: config.replicas,
                duplicate_window: DUPLICATE_WINDOW,
                ..Default::default()
            })
            .await
            .map_err(|e| {
                let no_room = matches!(
                    e.kind(),
                    jetstream::context::CreateStreamErrorKind::JetStream(ref js)
                        if js.error_code() == jetstream::ErrorCode::STORAGE_RESOURCES_EXCEEDED
                );
                if no_room {
                    return OpenError::fatal(format!(
                        "JetStream has less storage than the stream {:?} may take ({} bytes, from --max-retained-bytes, times {} replica(s)); lower --max-retained-bytes or give JetStream more storage (max_file_store)",
                        config.stream, config.limits.bytes, config.replicas
                    ));
                }
                OpenError::retry(format!(
                    "cannot find or create the JetStream stream {:?} ({e}); is JetStream enabled on the NATS servers (`nats-server -js`), with enough of them up for {} replica(s)?",
                    config.stream, config.replicas
                ))
            })?;
        // Asked again, not taken from the creation's answer: when several nodes create the stream
        // at once, each answer carries its own request's time, while the stream (as its leader
        // reports it) has one.
        let stream = context
            .get_stream(&config.stream)
            .await
            .map_err(|e| unreadable(&e))?;
        let info = settled(&stream).await?;
        if !info.config.subjects.contains(&subjects) {
            return Err(OpenError::fatal(format!(
                "the stream {:?} exists but does not hold the subjects {subjects:?} (it holds {:?}); choose another --nats-stream or --nats-subject-prefix",
                config.stream, info.config.subjects
            )));
        }
        let epoch = epoch_of(info.created.unix_timestamp_nanos());
        let (first, last) = (info.state.first_sequence, info.state.last_sequence);

        let consumer = stream
            .create_consumer(consumer::pull::OrderedConfig {
                filter_subject: subjects,
                deliver_policy: consumer::DeliverPolicy::All,
                ..Default::default()
            })
            .await
            .map_err(|e| OpenError::retry(format!("cannot create the stream's consumer: {e}")))?;
        let mut messages = consumer
            .messages()
            .await
            .map_err(|e| OpenError::retry(format!("cannot read the stream: {e}")))?;
        let per_subject = u64::try_from(info.config.max_messages_per_subject).ok();
        let recovered = load(
            &mut messages,
            (&epoch, &config.subject_prefix),
            (first, last),
            per_subject.filter(|n| *n > 0),
        )
        .await?;

        let (publishes_tx, publishes_rx) = mpsc::unbounded_channel();
        let node: String = std::iter::repeat_with(fastrand::alphanumeric)
            .take(12)
            .collect();
        let shared = Arc::new(Shared {
            client,
            context,
            stream,
            subject_prefix: config.subject_prefix.clone(),
            epoch: recovered.epoch.clone(),
            node,
            next_id: AtomicU64::new(0),
            applied: watch::Sender::new(recovered.head),
            waiting: Mutex::new(HashMap::new()),
            failing,
            bytes: AtomicU64::new(info.state.bytes),
            reconnected,
            recreated: std::sync::atomic::AtomicBool::new(false),
            reachable,
            stop: CancellationToken::new(),
            deletions: Deletions::default(),
        });
        Ok((
            JetStreamLog {
                shared,
                publishes: publishes_tx,
                startup: Mutex::new(Some(Startup {
                    messages,
                    publishes: publishes_rx,
                })),
            },
            recovered,
        ))
    }
}

// Cluster-wide presence (the peers module, above the hub) talks over this log's NATS connection.
impl JetStreamLog {
    /// The connection to NATS, for requests between nodes outside the stream.
    pub fn client(&self) -> async_nats::Client {
        self.shared.client.clone()
    }
}

impl Log for JetStreamLog {
    fn start(&self, apply: Apply) {
        let Some(startup) = self
            .startup
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        else {
            return;
        };
        tokio::spawn(self.shared.clone().apply_stream(startup.messages, apply));
        tokio::spawn(self.shared.clone().publish_all(startup.publishes));
    }

    fn append(&self, message: Arc<Message>, ack: Ack) {
        if let Err(mpsc::error::SendError((_, _, ack))) = self.publishes.send((message, None, ack))
        {
            let _ = ack.send(Err(Error::Unavailable(
                "the log is closed; topichub is shutting down".into(),
            )));
        }
    }

    fn append_known(&self, message: Arc<Message>, known: Known, ack: Ack) {
        let sent = self.publishes.send((message, Some(known), ack));
        if let Err(mpsc::error::SendError((_, _, ack))) = sent {
            let _ = ack.send(Err(Error::Unavailable(
                "the log is closed; topichub is shutting down".into(),
            )));
        }
    }

    fn evict(&self, _topic: &Topic, _seq: u64) {
        // JetStream evicts by the stream's own limits.
    }

    fn close(&self) -> oneshot::Receiver<()> {
        let (done, closed) = oneshot::channel();
        let shared = self.shared.clone();
        tokio::spawn(async move {
            shared.stop.cancel();
            let _ = shared.client.flush().await;
            let waiting =
                std::mem::take(&mut *shared.waiting.lock().unwrap_or_else(|p| p.into_inner()));
            for ack in waiting.into_values().flat_map(|w| w.acks) {
                let _ = ack.send(Err(Error::Unavailable(
                    "topichub is shutting down; the message may have been published, retry with the same idempotency key".into(),
                )));
            }
            let _ = done.send(());
        });
        closed
    }

    fn stats(&self) -> LogStats {
        LogStats {
            bytes_on_disk: self.shared.bytes.load(Ordering::Relaxed),
            failing: self
                .shared
                .failing
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
        }
    }

    fn numbers_messages(&self) -> bool {
        true
    }

    fn reachable(&self) -> Option<watch::Receiver<bool>> {
        Some(self.shared.reachable.state.subscribe())
    }

    fn until_applied(&self, seq: u64) -> Pin<Box<dyn Future<Output = ()> + Send>> {
        let shared = self.shared.clone();
        Box::pin(async move {
            if *shared.applied.borrow() >= seq {
                return;
            }
            // Beyond the stream's end it never comes: the hub refuses the cursor at once.
            let info = tokio::time::timeout(CATCH_UP_WAIT, shared.stream.get_info()).await;
            if let Ok(Ok(info)) = info
                && info.state.last_sequence < seq
            {
                return;
            }
            let mut applied = shared.applied.subscribe();
            let _ = tokio::time::timeout(CATCH_UP_WAIT, applied.wait_for(|a| *a >= seq)).await;
        })
    }

    fn on_delete(&self, apply: ApplyDelete) {
        let _ = self.shared.deletions.apply.set(apply);
    }

    fn delete_topic(&self, topic: &Topic, done: oneshot::Sender<Result<Purged, Error>>) {
        tokio::spawn(self.shared.clone().delete(topic.clone(), done));
    }
}

impl Shared {
    /// Takes the publishers waiting for the message with `id`, if any are left.
    fn take_waiting(&self, id: &str) -> Option<Vec<Ack>> {
        self.waiting
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id)
            .map(|w| w.acks)
    }

    /// Answers every publisher waiting for the message with `id` with `error`.
    fn fail_waiting(&self, id: &str, error: Error) {
        for ack in self.take_waiting(id).into_iter().flatten() {
            let _ = ack.send(Err(error.clone()));
        }
    }

    fn set_failing(&self, why: Option<String>) {
        if why.is_none() && self.recreated.load(Ordering::Relaxed) {
            return;
        }
        let mut failing = self.failing.lock().unwrap_or_else(|p| p.into_inner());
        if *failing != why {
            match &why {
                Some(why) => {
                    tracing::warn!(reason = %why, "JetStream log failing; publishes are refused")
                }
                None => tracing::info!("JetStream log serving again"),
            }
            *failing = why;
        }
    }

    /// Applies the stream, in order, for as long as the log runs. The ordered consumer recreates
    /// itself after a server or connection loss from the last sequence it delivered; if it gives
    /// up, a new one starts after the last applied sequence.
    async fn apply_stream(self: Arc<Self>, mut messages: consumer::pull::Ordered, apply: Apply) {
        let mut backoff = Duration::from_millis(100);
        loop {
            let mut chunks = (&mut messages).ready_chunks(MAX_BATCH);
            let mut idle =
                tokio::time::interval_at(tokio::time::Instant::now() + IDLE_CHECK, IDLE_CHECK);
            let mut progressed = false;
            loop {
                let chunk = tokio::select! {
                    () = self.stop.cancelled() => return,
                    () = self.reconnected.notified() => {
                        tracing::debug!("reconnected to NATS; replacing the stream's consumer");
                        break;
                    }
                    _ = idle.tick() => {
                        if std::mem::take(&mut progressed) || !self.behind().await {
                            continue;
                        }
                        tracing::debug!("the stream's consumer is behind and idle; replacing it");
                        break;
                    }
                    chunk = chunks.next() => chunk,
                };
                let Some(chunk) = chunk else { break };
                progressed = true;
                let mut batch = Vec::with_capacity(chunk.len());
                let mut ids = Vec::with_capacity(chunk.len());
                let mut last = *self.applied.borrow();
                for item in chunk {
                    let message = match item {
                        Ok(message) => message,
                        Err(error) => {
                            tracing::debug!(%error, "JetStream consumer error; it resumes by itself");
                            continue;
                        }
                    };
                    let Ok(info) = message.info() else { continue };
                    let seq = info.stream_sequence;
                    if seq <= last {
                        continue;
                    }
                    last = seq;
                    if let Some((topic, id)) = tombstone(&self.subject_prefix, &message) {
                        // At its place in the stream: what came before it is applied first.
                        self.apply_batch(
                            &apply,
                            std::mem::take(&mut batch),
                            std::mem::take(&mut ids),
                        );
                        self.apply_tombstone(&topic, seq, id);
                        continue;
                    }
                    let published = info.published.unix_timestamp_nanos();
                    match decode(&self.subject_prefix, &self.epoch, seq, published, &message) {
                        Some((decoded, id)) => {
                            batch.push(Arc::new(decoded));
                            ids.push(id);
                        }
                        None => tracing::warn!(
                            seq,
                            subject = %message.subject,
                            "skipping a stream message topichub did not write"
                        ),
                    }
                }
                backoff = Duration::from_millis(100);
                if self.recreated.load(Ordering::Relaxed) {
                    // Another history's sequences: not this hub's.
                    continue;
                }
                self.apply_batch(&apply, batch, ids);
                self.applied.send_replace(last);
            }
            // The consumer ended: start another after what was applied.
            loop {
                tokio::select! {
                    () = self.stop.cancelled() => return,
                    () = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
                let after = *self.applied.borrow();
                match self.consumer_after(after).await {
                    Ok(next) => {
                        messages = next;
                        break;
                    }
                    Err(error) => {
                        tracing::warn!(%error, after, "cannot resume reading the stream; retrying")
                    }
                }
            }
        }
    }

    /// Hands a batch to the hub, then answers the publishers waiting for its messages.
    fn apply_batch(&self, apply: &Apply, batch: Vec<Arc<Message>>, ids: Vec<Option<String>>) {
        if batch.is_empty() || self.recreated.load(Ordering::Relaxed) {
            return;
        }
        apply(&batch);
        self.applied_for_waiting(&batch, ids);
    }

    /// Whether the stream holds sequences this node has not applied.
    async fn behind(&self) -> bool {
        let info = tokio::time::timeout(IDLE_CHECK, self.stream.get_info()).await;
        match info {
            Ok(Ok(info)) => {
                self.bytes.store(info.state.bytes, Ordering::Relaxed);
                if epoch_of(info.created.unix_timestamp_nanos()) != self.epoch {
                    // Its sequences start over: this node's history no longer matches it.
                    self.recreated.store(true, Ordering::Relaxed);
                    self.set_failing(Some(STREAM_RECREATED.into()));
                    return false;
                }
                info.state.last_sequence > *self.applied.borrow()
            }
            _ => false,
        }
    }

    async fn consumer_after(&self, after: u64) -> Result<consumer::pull::Ordered, String> {
        self.stream
            .create_consumer(consumer::pull::OrderedConfig {
                filter_subject: format!("{}.>", self.subject_prefix),
                deliver_policy: consumer::DeliverPolicy::ByStartSequence {
                    start_sequence: after + 1,
                },
                ..Default::default()
            })
            .await
            .map_err(|e| e.to_string())?
            .messages()
            .await
            .map_err(|e| e.to_string())
    }

    /// Publishes what the hub hands over, in the hub's order; each PubAck is awaited in a task of
    /// its own so that publishes pipeline.
    async fn publish_all(
        self: Arc<Self>,
        mut publishes: mpsc::UnboundedReceiver<(Arc<Message>, Option<Known>, Ack)>,
    ) {
        loop {
            let (message, known, ack) = tokio::select! {
                () = self.stop.cancelled() => return,
                next = publishes.recv() => match next {
                    Some(next) => next,
                    None => return,
                },
            };
            if self.client.connection_state() != Connection::Connected {
                let _ = ack.send(Err(Error::Unavailable(
                    "NATS is unreachable; nothing was published, retry later".into(),
                )));
                continue;
            }
            if self.recreated.load(Ordering::Relaxed) {
                let _ = ack.send(Err(Error::Unavailable(format!(
                    "{STREAM_RECREATED}; nothing was published"
                ))));
                continue;
            }
            let id = match &message.idempotency_key {
                Some(key) => key.to_string(),
                None => format!(
                    "{OWN_ID_PREFIX}{}-{}",
                    self.node,
                    self.next_id.fetch_add(1, Ordering::Relaxed)
                ),
            };
            self.waiting
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .entry(id.clone())
                .or_default()
                .acks
                .push(ack);
            let subject = format!("{}.{}", self.subject_prefix, message.topic.as_str());
            let mut headers = HeaderMap::new();
            headers.insert(async_nats::header::NATS_MESSAGE_ID, id.as_str());
            if message.idempotency_key.is_some() {
                let publish = format!(
                    "{}-{}",
                    self.node,
                    self.next_id.fetch_add(1, Ordering::Relaxed)
                );
                headers.insert(PUBLISH_HEADER, publish.as_str());
            }
            if !message.headers.is_empty() {
                let json = serde_json::to_string(&message.headers).unwrap_or_default();
                headers.insert(HEADERS_HEADER, json.as_str());
            }
            if let Some(known) = known {
                headers.insert(KNOWN_HEADER, encode_known(known).as_str());
            }
            let sent = self
                .context
                .publish_with_headers(subject.clone(), headers.clone(), message.payload.clone())
                .await;
            let this = self.clone();
            tokio::spawn(async move {
                this.confirm(sent, (subject, headers), message, id).await;
            });
        }
    }

    /// Awaits the PubAck of `sent`, publishing again with the same headers (the same
    /// `Nats-Msg-Id`, so JetStream stores it once) while the stream has no leader or the
    /// connection fails over to another server, for at most [`PUBLISH_RETRY_WINDOW`]. Also says
    /// how many attempts it took.
    async fn until_acknowledged(
        &self,
        mut sent: Result<jetstream::context::PublishAckFuture, jetstream::context::PublishError>,
        subject: &str,
        headers: &HeaderMap,
        payload: &Bytes,
    ) -> (
        Result<jetstream::publish::PublishAck, jetstream::context::PublishError>,
        u32,
    ) {
        use jetstream::context::PublishErrorKind as Kind;
        let started = tokio::time::Instant::now();
        let mut backoff = Duration::from_millis(50);
        let mut disconnected_since = None;
        let mut attempts = 0;
        loop {
            attempts += 1;
            let result = match sent {
                Ok(future) => future.await,
                Err(error) => Err(error),
            };
            let error = match result {
                Ok(ack) => return (Ok(ack), attempts),
                Err(error) => error,
            };
            // A lost connection usually comes back within moments (another server of the
            // cluster); one that stays lost fails the publish rather than holding it.
            let connected = self.client.connection_state() == Connection::Connected;
            let lost_for = match (connected, disconnected_since) {
                (true, _) => {
                    disconnected_since = None;
                    Duration::ZERO
                }
                (false, None) => {
                    disconnected_since = Some(tokio::time::Instant::now());
                    Duration::ZERO
                }
                (false, Some(since)) => since.elapsed(),
            };
            let retry = matches!(
                error.kind(),
                Kind::TimedOut | Kind::StreamNotFound | Kind::BrokenPipe | Kind::Other
            ) && started.elapsed() + backoff < PUBLISH_RETRY_WINDOW
                && lost_for < RECONNECT_GRACE
                && !self.stop.is_cancelled();
            if !retry {
                return (Err(error), attempts);
            }
            tracing::debug!(%error, subject, "not acknowledged by JetStream; publishing again with the same id");
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(1));
            sent = self
                .context
                .publish_with_headers(subject.to_owned(), headers.clone(), payload.clone())
                .await;
        }
    }

    /// Waits for the PubAck (retrying with the same `Nats-Msg-Id` while JetStream elects a
    /// leader), then for this node to apply the sequence, and answers whoever still waits.
    async fn confirm(
        &self,
        sent: Result<jetstream::context::PublishAckFuture, jetstream::context::PublishError>,
        (subject, headers): (String, HeaderMap),
        message: Arc<Message>,
        id: String,
    ) {
        let (acked, attempts) = self
            .until_acknowledged(sent, &subject, &headers, &message.payload)
            .await;
        if let Err(error) = &acked
            && error.kind() == jetstream::context::PublishErrorKind::MaxPayloadExceeded
        {
            let limit = self.client.server_info().max_payload;
            self.fail_waiting(&id, Error::LimitExceeded(format!(
                "the message ({} payload bytes plus headers) is over the NATS servers' max_payload of {limit} bytes; raise max_payload on the NATS servers to --max-payload-bytes plus 16 KiB of headers",
                message.payload.len()
            )));
            return;
        }
        let ack = match acked {
            Ok(ack) => ack,
            Err(error) => {
                let why = format!("JetStream did not acknowledge the message ({error})");
                if self.client.connection_state() == Connection::Connected {
                    self.set_failing(Some(why.clone()));
                }
                self.fail_waiting(
                    &id,
                    Error::Unavailable(format!(
                        "{why}; it may have been published: retry with the same idempotency key"
                    )),
                );
                return;
            }
        };
        if self.client.connection_state() == Connection::Connected {
            self.set_failing(None);
        }
        let duplicate = ack.duplicate
            && !(attempts > 1
                && self
                    .stored_by(ack.sequence, headers.get(PUBLISH_HEADER))
                    .await);
        if !self.acknowledged(&id, duplicate) {
            return;
        }
        // Read-your-writes: answered once this node applied the sequence (normally by the
        // applier itself, which answers everyone waiting for the id).
        let mut applied = self.applied.subscribe();
        let reached = tokio::time::timeout(APPLY_TIMEOUT, applied.wait_for(|a| *a >= ack.sequence));
        let reached = matches!(reached.await, Ok(Ok(_)));
        let Some(acks) = self.take_waiting(&id) else {
            return;
        };
        // Still waiting: a duplicate of a message applied before this publish began, or a
        // message evicted before this node read it, or not applied in time.
        let answer = if reached {
            let original = match self.stream.get_raw_message(ack.sequence).await {
                Ok(raw) => decode_raw(&self.subject_prefix, &self.epoch, &raw).map(|(m, _)| m),
                Err(_) => None,
            };
            let message = Arc::new(original.unwrap_or_else(|| {
                Message::new(
                    message.topic.clone(),
                    message.payload.clone(),
                    ack.sequence,
                    self.epoch.clone(),
                    message.published_at,
                    message.headers.clone(),
                )
                .with_idempotency_key(message.idempotency_key.clone())
            }));
            Ok(Stored { message, duplicate })
        } else {
            Err(Error::Unavailable(format!(
                "the message was stored as seq {} but this node has not caught up with the stream yet; retry with the same idempotency key",
                ack.sequence
            )))
        };
        for ack in acks {
            let _ = ack.send(answer.clone());
        }
    }
}

/// Publishers of one `Nats-Msg-Id`: answered once both its PubAck (which says whether
/// JetStream already held the id) and this node's applying of the message are in, whichever
/// comes last.
#[derive(Default)]
struct Waiting {
    acks: Vec<Ack>,
    /// The PubAck's word, once it arrived: whether the message was a duplicate.
    duplicate: Option<bool>,
    /// The message, when this node applied it before the PubAck arrived.
    applied: Option<Arc<Message>>,
}

impl Shared {
    /// The applier's side of [`Waiting`]: answers the publishers of `batch`'s messages whose
    /// PubAck is in, and keeps the message for the others.
    fn applied_for_waiting(&self, batch: &[Arc<Message>], ids: Vec<Option<String>>) {
        let mut waiting = self.waiting.lock().unwrap_or_else(|p| p.into_inner());
        for (message, id) in batch.iter().zip(ids) {
            let Some(id) = id else { continue };
            let Some(entry) = waiting.get_mut(&id) else {
                continue;
            };
            match entry.duplicate {
                Some(duplicate) => {
                    for ack in waiting.remove(&id).into_iter().flat_map(|w| w.acks) {
                        let _ = ack.send(Ok(Stored {
                            message: message.clone(),
                            duplicate,
                        }));
                    }
                }
                None => entry.applied = Some(message.clone()),
            }
        }
    }

    /// The PubAck's side of [`Waiting`]: answers the publishers of `id` if this node applied the
    /// message already, else records the PubAck's word for the applier. Whether anyone is
    /// still waiting.
    fn acknowledged(&self, id: &str, duplicate: bool) -> bool {
        let mut waiting = self.waiting.lock().unwrap_or_else(|p| p.into_inner());
        let Some(entry) = waiting.get_mut(id) else {
            return false;
        };
        let Some(message) = entry.applied.take() else {
            entry.duplicate = Some(duplicate);
            return true;
        };
        for ack in waiting.remove(id).into_iter().flat_map(|w| w.acks) {
            let _ = ack.send(Ok(Stored {
                message: message.clone(),
                duplicate,
            }));
        }
        false
    }

    /// Whether the stream's message at `seq` was sent by the publish `token` names: then a
    /// "duplicate" PubAck to a retry of it is that publish's own first attempt, stored after all.
    async fn stored_by(&self, seq: u64, token: Option<&async_nats::HeaderValue>) -> bool {
        let Some(token) = token else { return false };
        match self.stream.get_raw_message(seq).await {
            Ok(raw) => raw.headers.get(PUBLISH_HEADER) == Some(token),
            // Unknown: the retry was this node's, so the likelier author is this publish.
            Err(_) => true,
        }
    }
}

/// Connects to NATS with the configured credentials and TLS. The connection's state is mirrored
/// into `failing` (set while disconnected).
async fn connect(
    config: &NatsConfig,
    failing: Arc<Mutex<Option<String>>>,
    reconnected: Arc<tokio::sync::Notify>,
    reachable: Arc<Reachability>,
) -> Result<async_nats::Client, OpenError> {
    // The first connection is no reconnection.
    let connected_before = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut options = async_nats::ConnectOptions::new()
        .name("topichub")
        .connection_timeout(Duration::from_secs(2))
        .event_callback(move |event| {
            let failing = failing.clone();
            let reconnected = reconnected.clone();
            let connected_before = connected_before.clone();
            let reachable = reachable.clone();
            async move {
                reachable.connection_event(&event);
                let mut failing = failing.lock().unwrap_or_else(|p| p.into_inner());
                match event {
                    async_nats::Event::Disconnected => {
                        tracing::warn!(
                            "connection to NATS lost; publishes are refused until it is back"
                        );
                        *failing = Some("the connection to NATS is lost; reconnecting".into())
                    }
                    async_nats::Event::Connected => {
                        tracing::info!("connected to NATS");
                        if connected_before.swap(true, Ordering::Relaxed) {
                            reconnected.notify_one();
                        }
                        *failing = None
                    }
                    other => tracing::debug!(event = %other, "NATS connection event"),
                }
            }
        });
    if let Some(creds) = &config.creds {
        options = options.credentials_file(creds).await.map_err(|e| {
            OpenError::fatal(format!(
                "cannot read the NATS credentials file {}: {e}",
                creds.display()
            ))
        })?;
    }
    if let Some((user, password)) = &config.user {
        options = options.user_and_password(user.clone(), password.clone());
    }
    if let Some(token) = &config.token {
        options = options.token(token.clone());
    }
    if let Some(ca) = &config.tls_ca {
        options = options.add_root_certificates(ca.clone()).require_tls(true);
    }
    if let Some((cert, key)) = &config.tls_client {
        options = options
            .add_client_certificate(cert.clone(), key.clone())
            .require_tls(true);
    }
    let mut servers = Vec::new();
    for url in &config.urls {
        servers.push(url.parse::<async_nats::ServerAddr>().map_err(|e| {
            OpenError::fatal(format!(
                "--nats: {url:?} is not a NATS server URL ({e}); expected e.g. nats://127.0.0.1:4222"
            ))
        })?);
    }
    let urls = config.urls.join(",");
    options.connect(servers).await.map_err(|e| {
        use async_nats::ConnectErrorKind as Kind;
        let mut message = format!("cannot connect to NATS at {urls}: {e}");
        if matches!(
            e.kind(),
            Kind::Authentication | Kind::AuthorizationViolation
        ) {
            message.push_str("; check --nats-creds, --nats-user/--nats-password or --nats-token");
        }
        match e.kind() {
            Kind::Authentication | Kind::AuthorizationViolation | Kind::ServerParse => {
                OpenError::fatal(message)
            }
            _ => OpenError::retry(message),
        }
    })
}

/// Whether this node reaches NATS, as subscribers are told: unreachable once the connection has
/// been lost for [`RECONNECT_GRACE`] (a failover to another server of the cluster takes less,
/// and is no news to subscribers), reachable again as soon as it is back.
struct Reachability {
    state: watch::Sender<bool>,
    /// Counts connections, so that a check after the grace knows whether the connection it was
    /// started for is still the lost one.
    connections: AtomicU64,
}

impl Default for Reachability {
    fn default() -> Reachability {
        Reachability {
            state: watch::Sender::new(true),
            connections: AtomicU64::new(0),
        }
    }
}

impl Reachability {
    fn connection_event(self: &Arc<Self>, event: &async_nats::Event) {
        match event {
            async_nats::Event::Connected => {
                self.connections.fetch_add(1, Ordering::Relaxed);
                self.state
                    .send_if_modified(|reachable| !std::mem::replace(reachable, true));
            }
            async_nats::Event::Disconnected => {
                let lost = self.connections.load(Ordering::Relaxed);
                let this = self.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(RECONNECT_GRACE).await;
                    if this.connections.load(Ordering::Relaxed) == lost {
                        this.state
                            .send_if_modified(|reachable| std::mem::replace(reachable, false));
                    }
                });
            }
            _ => {}
        }
    }
}

/// Why the stream's state could not be read at start (retried).
fn unreadable(e: &dyn std::fmt::Display) -> OpenError {
    OpenError::retry(format!("cannot read the stream's state: {e}"))
}

/// The stream's state once its creation time, the epoch, can no longer change.
///
/// In a NATS cluster, a create request for a stream that exists but has no leader yet (it was
/// just created and is electing one) is applied again, and the stream takes that later request's
/// time; once the stream has a leader, such requests are answered as info requests. So when
/// several nodes create the stream at once, the time one of them reads first may not last. A
/// new (empty) clustered stream is therefore read every [`SETTLE_READS`] until it has had a
/// leader and the same time for [`SETTLE_STABLE`]: long enough for creates sent before the
/// leader was elected to be applied. A stream holding messages has had a leader, and a
/// standalone server answers creates one at a time: both are read once.
async fn settled(stream: &stream::Stream) -> Result<stream::Info, OpenError> {
    let deadline = tokio::time::Instant::now() + SETTLE_WAIT;
    let mut info = stream.get_info().await.map_err(|e| unreadable(&e))?;
    let clustered = info
        .cluster
        .as_ref()
        .is_some_and(|c| c.name.as_deref().is_some_and(|n| !n.is_empty()));
    if info.state.last_sequence > 0 || !clustered {
        return Ok(info);
    }
    // Since when the stream has had a leader and its current creation time.
    let mut stable_since = None;
    loop {
        let now = tokio::time::Instant::now();
        let led = info.cluster.as_ref().is_some_and(|c| c.leader.is_some());
        if !led {
            stable_since = None;
        } else if now - *stable_since.get_or_insert(now) >= SETTLE_STABLE {
            return Ok(info);
        }
        if now >= deadline {
            return Err(OpenError::retry(format!(
                "the new stream {:?} has not settled (no leader elected, or its creation time still changing) within {SETTLE_WAIT:?}",
                info.config.name
            )));
        }
        tokio::time::sleep(SETTLE_READS).await;
        let again = stream.get_info().await.map_err(|e| unreadable(&e))?;
        if again.created != info.created {
            stable_since = None;
        }
        info = again;
    }
}

/// The epoch of a stream created at `nanos` (Unix time): lowercase hex, 1-32 alphanumerics as
/// cursors require.
fn epoch_of(nanos: i128) -> Arc<str> {
    Arc::from(format!("n{:x}", nanos.max(0) as u128))
}

/// Reads the stream from its start up to `last` (its last sequence when the log was opened), and
/// derives what resumes need: the watermarks of what it no longer holds (see the module
/// documentation).
async fn load(
    messages: &mut consumer::pull::Ordered,
    (epoch, prefix): (&Arc<str>, &str),
    (first, last): (u64, u64),
    per_subject: Option<u64>,
) -> Result<Recovered, OpenError> {
    let mut loaded = Vec::new();
    // Ends of the runs of sequences the stream no longer holds, ascending.
    let mut holes: Vec<u64> = Vec::new();
    let mut previous = first.saturating_sub(1).min(last);
    let below_first = previous;
    // Per topic: its oldest message's seq, what its publisher knew then, and how many it has.
    let mut first_of: HashMap<Topic, (u64, Option<Known>, u64)> = HashMap::new();
    // Per deleted topic: the seq of its latest tombstone.
    let mut deleted: HashMap<Topic, u64> = HashMap::new();
    while previous < last {
        let next = tokio::time::timeout(LOAD_STALL, messages.next())
            .await
            .map_err(|_| OpenError::retry("reading the stream stalled".into()))?;
        let message = match next {
            Some(Ok(message)) => message,
            Some(Err(error)) => {
                tracing::debug!(%error, "JetStream consumer error while loading; it resumes by itself");
                continue;
            }
            None => return Err(OpenError::retry("the stream's consumer ended".into())),
        };
        let Ok(info) = message.info() else { continue };
        let seq = info.stream_sequence;
        if seq <= previous {
            continue;
        }
        if seq > previous + 1 {
            holes.push(seq - 1);
        }
        previous = seq;
        let published = info.published.unix_timestamp_nanos();
        if let Some((topic, _)) = tombstone(prefix, &message) {
            forget_deleted(&mut loaded, &mut first_of, &mut deleted, topic, seq);
        } else if let Some((decoded, _)) = decode(prefix, epoch, seq, published, &message) {
            first_of
                .entry(decoded.topic.clone())
                .or_insert_with(|| (seq, decode_known(&message), 0))
                .2 += 1;
            loaded.push(Arc::new(decoded));
        }
        if info.pending == 0 {
            break;
        }
    }
    if previous < last {
        // The newest sequences were deleted.
        holes.push(last);
    }
    // Below the first sequence, anything may have been anyone's (age and byte limits evict
    // stream-wide). Above it, holes are left by the per-subject limit, so they belong to a topic
    // that is at that limit and whose oldest message is above the hole; a hole no such topic
    // explains (a deleted message) may have been anyone's too.
    let full = |count: u64| per_subject.is_some_and(|limit| count >= limit);
    let explained = first_of
        .values()
        .filter(|(_, _, count)| full(*count))
        .map(|(oldest, _, _)| *oldest)
        .max()
        .unwrap_or(0);
    let unexplained = holes
        .iter()
        .copied()
        .filter(|&end| end > explained)
        .max()
        .unwrap_or(0);
    // Every topic gets its watermark (0 too): a topic without one would be taken for one that
    // may have been forgotten.
    let mut watermarks: Vec<(Topic, u64)> = first_of
        .iter()
        .map(|(topic, &(oldest, known, count))| {
            // The highest sequence below `oldest` and above `after` that the stream no longer
            // holds and that may have been this topic's.
            let missing_above = |after: u64| {
                let below = holes.partition_point(|&end| end < oldest);
                let hole = if below > 0 && full(count) {
                    holes[below - 1]
                } else {
                    0
                };
                [below_first, hole]
                    .into_iter()
                    .filter(|&seq| seq > after)
                    .max()
                    .unwrap_or(0)
            };
            let through = match known {
                // Its publisher knew every message below `head` and the topic's newest of them.
                Some(known) if known.previous < oldest && known.head < oldest => {
                    known.previous.max(missing_above(known.head))
                }
                _ => missing_above(0),
            };
            (topic.clone(), through.max(unexplained))
        })
        .collect();
    let forgotten_through = below_first.max(unexplained);
    merge_deleted(&mut watermarks, deleted);
    Ok(Recovered {
        epoch: epoch.clone(),
        head: last.max(previous),
        forgotten_through,
        watermarks,
        messages: loaded,
    })
}

/// [`KNOWN_HEADER`]'s value.
fn encode_known(known: Known) -> String {
    format!("{}/{}", known.previous, known.head)
}

/// [`KNOWN_HEADER`] of a stream message, if it carries a well-formed one.
fn decode_known(message: &async_nats::Message) -> Option<Known> {
    let value = message.headers.as_ref()?.get(KNOWN_HEADER)?.as_str();
    let (previous, head) = value.split_once('/')?;
    Some(Known {
        previous: previous.parse().ok()?,
        head: head.parse().ok()?,
    })
}

/// A stream message as the hub's message, with its `Nats-Msg-Id`; `None` for a message topichub
/// did not write (a foreign subject).
fn decode(
    prefix: &str,
    epoch: &Arc<str>,
    seq: u64,
    published_nanos: i128,
    message: &async_nats::Message,
) -> Option<(Message, Option<String>)> {
    let name = message
        .subject
        .as_str()
        .strip_prefix(prefix)?
        .strip_prefix('.')?;
    let topic = Topic::parse(name).ok()?;
    let headers = message.headers.as_ref();
    Some(build(
        topic,
        message.payload.clone(),
        seq,
        epoch,
        published_nanos,
        headers,
    ))
}

fn decode_raw(
    prefix: &str,
    epoch: &Arc<str>,
    raw: &jetstream::message::StreamMessage,
) -> Option<(Message, Option<String>)> {
    let name = raw
        .subject
        .as_str()
        .strip_prefix(prefix)?
        .strip_prefix('.')?;
    let topic = Topic::parse(name).ok()?;
    Some(build(
        topic,
        raw.payload.clone(),
        raw.sequence,
        epoch,
        raw.time.unix_timestamp_nanos(),
        Some(&raw.headers),
    ))
}

fn build(
    topic: Topic,
    payload: Bytes,
    seq: u64,
    epoch: &Arc<str>,
    published_nanos: i128,
    nats_headers: Option<&HeaderMap>,
) -> (Message, Option<String>) {
    let header = |name: &str| {
        nats_headers
            .and_then(|h| h.get(name))
            .map(|v| v.as_str().to_owned())
    };
    let headers: Headers = header(HEADERS_HEADER)
        .and_then(|json| serde_json::from_str::<BTreeMap<String, String>>(&json).ok())
        .map(|map| map.into_iter().collect())
        .unwrap_or_default();
    let id = header(async_nats::header::NATS_MESSAGE_ID.as_ref());
    let key = id
        .as_deref()
        .filter(|id| !id.starts_with(OWN_ID_PREFIX))
        .map(Arc::from);
    let published_at = UNIX_EPOCH + Duration::from_nanos(published_nanos.max(0) as u64);
    let message = Message::new(topic, payload, seq, epoch.clone(), published_at, headers)
        .with_idempotency_key(key);
    (message, id)
}

// Topic deletion in cluster mode. A deletion is a tombstone in the stream: an empty message on
// the topic's subject with the `Topichub-Delete` header, published through JetStream like any
// message, so every node applies it at the same seq (the hub purges its copy of the topic and
// ends the subscriptions naming it) and a node started later meets it while loading. The node
// that took the deletion then purges the subject's older messages from the stream (keeping the
// tombstone), so the stream stops holding what was deleted; a node that loads before the purge
// (or after one that failed) drops them itself when it reaches the tombstone. A tombstone is
// never delivered as a message.

/// Header marking a stream message as the deletion of its subject's topic.
const DELETE_HEADER: &str = "Topichub-Delete";

/// Topic deletions as the log's tasks share them.
#[derive(Default)]
struct Deletions {
    /// How the hub applies a deletion; set before the log starts.
    apply: std::sync::OnceLock<ApplyDelete>,
    /// Deletions of this node waiting to be applied here, by `Nats-Msg-Id`.
    waiting: Mutex<HashMap<String, oneshot::Sender<Result<Purged, Error>>>>,
}

impl Shared {
    /// Publishes the tombstone of `topic`, purges what the stream holds of it below the tombstone,
    /// and answers `done` once this node applied the tombstone.
    async fn delete(self: Arc<Self>, topic: Topic, done: oneshot::Sender<Result<Purged, Error>>) {
        if self.client.connection_state() != Connection::Connected {
            let _ = done.send(Err(Error::Unavailable(format!(
                "NATS is unreachable; {topic} was not deleted, retry later"
            ))));
            return;
        }
        if self.recreated.load(Ordering::Relaxed) {
            let _ = done.send(Err(Error::Unavailable(format!(
                "{STREAM_RECREATED}; {topic} was not deleted"
            ))));
            return;
        }
        let id = format!(
            "{OWN_ID_PREFIX}{}-{}",
            self.node,
            self.next_id.fetch_add(1, Ordering::Relaxed)
        );
        self.deletions
            .waiting
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id.clone(), done);
        let fail = |why: String| {
            let waiting = self
                .deletions
                .waiting
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&id);
            if let Some(done) = waiting {
                let _ = done.send(Err(Error::Unavailable(why)));
            }
        };
        let subject = format!("{}.{}", self.subject_prefix, topic.as_str());
        let mut headers = HeaderMap::new();
        headers.insert(async_nats::header::NATS_MESSAGE_ID, id.as_str());
        headers.insert(DELETE_HEADER, "1");
        // Like a publish, a deletion waits through a leader election rather than failing.
        let sent = self
            .context
            .publish_with_headers(subject.clone(), headers.clone(), Bytes::new())
            .await;
        let (acked, _) = self
            .until_acknowledged(sent, &subject, &headers, &Bytes::new())
            .await;
        let ack = match acked {
            Ok(ack) => ack,
            Err(error) => {
                return fail(format!(
                    "JetStream did not acknowledge the deletion of {topic} ({error}); it may have been recorded: retry"
                ));
            }
        };
        // The tombstone stays: a node loading later must meet it. (JetStream reads a purge up to
        // sequence 1 as "all of the subject": with nothing below it there is nothing to purge.)
        if ack.sequence > 1
            && let Err(error) = self
                .stream
                .purge()
                .filter(subject)
                .sequence(ack.sequence)
                .await
        {
            tracing::warn!(%topic, %error, seq = ack.sequence, "cannot purge the deleted topic from the stream; nodes skip its messages when they load");
        }
        let mut applied = self.applied.subscribe();
        let _ = tokio::time::timeout(APPLY_TIMEOUT, applied.wait_for(|a| *a >= ack.sequence)).await;
        fail(format!(
            "the deletion of {topic} was recorded as seq {} but this node has not applied it yet; it takes effect on every node as it catches up",
            ack.sequence
        ));
    }

    /// Applies the tombstone of `topic` at `seq` (see [`ApplyDelete`]) and answers this node's
    /// deleter, if the tombstone is its (`id`).
    fn apply_tombstone(&self, topic: &Topic, seq: u64, id: Option<String>) {
        if self.recreated.load(Ordering::Relaxed) {
            return;
        }
        let purged = self
            .deletions
            .apply
            .get()
            .map(|apply| apply(topic, seq))
            .unwrap_or_default();
        let waiting = id.and_then(|id| {
            self.deletions
                .waiting
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&id)
        });
        if let Some(done) = waiting {
            let _ = done.send(Ok(purged));
        }
    }
}

/// The topic a stream message deletes, with its `Nats-Msg-Id`, if it is a tombstone.
fn tombstone(prefix: &str, message: &async_nats::Message) -> Option<(Topic, Option<String>)> {
    let headers = message.headers.as_ref()?;
    headers.get(DELETE_HEADER)?;
    let name = message
        .subject
        .as_str()
        .strip_prefix(prefix)?
        .strip_prefix('.')?;
    let id = headers
        .get(async_nats::header::NATS_MESSAGE_ID)
        .map(|v| v.as_str().to_owned());
    Some((Topic::parse(name).ok()?, id))
}

/// While loading: the tombstone of `topic` at `seq` drops what was loaded of it (messages the
/// purge had not removed yet) and starts its count afresh.
fn forget_deleted(
    loaded: &mut Vec<Arc<Message>>,
    first_of: &mut HashMap<Topic, (u64, Option<Known>, u64)>,
    deleted: &mut HashMap<Topic, u64>,
    topic: Topic,
    seq: u64,
) {
    if first_of.remove(&topic).is_some() {
        loaded.retain(|m| m.topic != topic);
    }
    deleted.insert(topic, seq);
}

/// A deleted topic's history ends at its tombstone: a resume from before it is told of a gap.
fn merge_deleted(watermarks: &mut Vec<(Topic, u64)>, deleted: HashMap<Topic, u64>) {
    for (topic, seq) in deleted {
        match watermarks.iter_mut().find(|(t, _)| *t == topic) {
            Some((_, through)) => *through = (*through).max(seq),
            None => watermarks.push((topic, seq)),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use super::*;

    /// A single `nats-server -js` on a free port, with its store in a scratch directory;
    /// killed when dropped.
    struct Server {
        child: std::process::Child,
        dir: PathBuf,
        url: String,
    }

    impl Drop for Server {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    async fn nats_server() -> Server {
        const NATS_SERVER: &str = "/usr/sbin/nats-server";
        assert!(
            std::path::Path::new(NATS_SERVER).exists(),
            "{NATS_SERVER} not found: run scripts/deps-nats.sh (installs Debian's nats-server)"
        );
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let dir = std::env::temp_dir().join(format!("topichub-nats-{}-{port}", std::process::id()));
        let child = std::process::Command::new(NATS_SERVER)
            .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
            .arg(&dir)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start nats-server");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            assert!(
                tokio::time::Instant::now() < deadline,
                "nats-server did not start"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Server {
            child,
            dir,
            url: format!("nats://127.0.0.1:{port}"),
        }
    }

    fn config(url: &str) -> NatsConfig {
        NatsConfig {
            urls: vec![url.to_owned()],
            stream: DEFAULT_STREAM.into(),
            subject_prefix: DEFAULT_SUBJECT_PREFIX.into(),
            replicas: 1,
            creds: None,
            user: None,
            token: None,
            tls_ca: None,
            tls_client: None,
            limits: StreamLimits {
                messages_per_subject: 100,
                age: Duration::from_secs(3600),
                bytes: 1 << 20,
                max_message_bytes: 1 << 20,
            },
        }
    }

    fn message(key: Option<&str>) -> Arc<Message> {
        let mut headers = Headers::new();
        headers.insert("a header".into(), "any: value\r\n".into());
        Arc::new(
            Message::new(
                Topic::parse("t").unwrap(),
                Bytes::from_static(b"payload"),
                0,
                Arc::from("local"),
                SystemTime::now(),
                headers,
            )
            .with_idempotency_key(key.map(Arc::from)),
        )
    }

    async fn append(log: &JetStreamLog, message: Arc<Message>) -> Stored {
        let (ack, acked) = oneshot::channel();
        log.append(message, ack);
        tokio::time::timeout(Duration::from_secs(10), acked)
            .await
            .expect("answered in time")
            .expect("answered")
            .expect("stored")
    }

    #[tokio::test]
    async fn a_retried_key_is_stored_once_and_answered_with_the_original() {
        let server = nats_server().await;
        let (log, recovered) = JetStreamLog::open(&config(&server.url)).await.unwrap();
        let applied = Arc::new(Mutex::new(Vec::new()));
        let sink = applied.clone();
        log.start(Box::new(move |batch| {
            sink.lock().unwrap().extend(batch.iter().map(|m| m.seq));
        }));

        let first = append(&log, message(Some("order-7"))).await;
        let again = append(&log, message(Some("order-7"))).await;
        assert!(!first.duplicate, "the original is no duplicate");
        assert!(again.duplicate, "JetStream's word reaches the publisher");
        let (first, again) = (first.message, again.message);
        let other = append(&log, message(None)).await.message;
        let another = append(&log, message(None)).await.message;
        assert_eq!((first.seq, again.seq), (1, 1), "the retry is the original");
        assert_eq!(again.idempotency_key.as_deref(), Some("order-7"));
        assert_eq!(
            (other.seq, another.seq),
            (2, 3),
            "no key: each publish is stored"
        );
        assert_eq!(other.idempotency_key, None);
        assert_eq!(
            first.headers,
            message(None).headers,
            "headers survive as they were"
        );
        assert_eq!(&*first.epoch, &*recovered.epoch);
        assert_eq!(*applied.lock().unwrap(), vec![1, 2, 3], "applied once each");
    }

    #[tokio::test]
    async fn a_node_loading_a_tombstone_the_purge_missed_does_not_load_what_it_deleted() {
        let server = nats_server().await;
        let (log, _) = JetStreamLog::open(&config(&server.url)).await.unwrap();
        log.start(Box::new(|_| {}));
        append(&log, message(None)).await;
        append(&log, message(None)).await;
        // A tombstone, as a node publishes it, but no purge after it (that node died first).
        let mut headers = HeaderMap::new();
        headers.insert(DELETE_HEADER, "1");
        let context = jetstream::new(log.client());
        let tombstone = context
            .publish_with_headers("topichub.t", headers, Bytes::new())
            .await
            .unwrap()
            .await
            .unwrap();
        let other = Message::new(
            Topic::parse("other").unwrap(),
            Bytes::from_static(b"kept"),
            0,
            Arc::from("local"),
            SystemTime::now(),
            Headers::new(),
        );
        append(&log, Arc::new(other)).await;

        let (_, recovered) = JetStreamLog::open(&config(&server.url)).await.unwrap();
        let loaded: Vec<(String, u64)> = recovered
            .messages
            .iter()
            .map(|m| (m.topic.to_string(), m.seq))
            .collect();
        assert_eq!(
            loaded,
            [("other".to_owned(), 4)],
            "nothing of t, no tombstone"
        );
        assert_eq!(tombstone.sequence, 3);
        assert!(
            recovered
                .watermarks
                .contains(&(Topic::parse("t").unwrap(), 3)),
            "a resume over t's deleted messages is told of them: {:?}",
            recovered.watermarks
        );
        assert_eq!(recovered.head, 4);
    }
}

//! The disk log (`--data-dir`): messages in a fjall store (an LSM tree in front of a write-ahead
//! journal), written by one thread that turns all appends waiting at a time into one write batch
//! (group commit: concurrent publishes share one journal write and, with `--fsync always`, one
//! fdatasync).
//!
//! Files in the data dir:
//! - `FORMAT`: `topichub-log N`, the layout version; any other one is refused rather than misread.
//! - `store/`: the fjall database, with keyspaces `messages` (big-endian seq -> record), `topics`
//!   (topic -> highest evicted seq) and `meta` (epoch, head seq, reserved seq and boot id).
//! - `SYNCED`: `EPOCH SEQ`, a seq known to be on stable storage, replaced (write, fsync, rename)
//!   at most once a second after a sync, and on close.
//!
//! Why fjall rather than redb (format 1): a redb commit copies and writes every B-tree page it
//! touches, while a fjall batch is one checksummed append to the journal; for the same batches of
//! 16 200-byte records here fjall committed 2-3x as many records per second, synced and not. And
//! handing the journal bytes to the OS (no fsync) makes an acknowledged message survive a process
//! crash, so `--fsync every` loses data only with the machine; redb keeps only synced commits.
//!
//! Why the `SYNCED` marker: fjall's journal recovery keeps the longest valid prefix and cuts the
//! rest, as it must for a tail torn by a crash; damage in the middle of a journal would be cut
//! the same way, silently taking acknowledged messages with it. The marker lives outside the
//! journal: a store that ends before the seq it names lost synced data and is refused.

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode};
use tokio::sync::oneshot;

use super::{Ack, Apply, Log, LogStats, Recovered};
use crate::error::Error;
use crate::message::{Headers, Message};
use crate::metrics::Metrics;
use crate::topic::Topic;

/// The layout this build writes and reads. Format 1 was a redb file (`log.redb`).
pub const FORMAT_VERSION: u32 = 2;
/// Name of the layout marker in the data dir.
const FORMAT_FILE: &str = "FORMAT";
/// Name of the store's directory in the data dir.
pub const STORE_DIR: &str = "store";
/// Name of the synced-seq marker in the data dir.
const SYNCED_FILE: &str = "SYNCED";
/// The single file of a format 1 data dir.
const REDB_FILE: &str = "log.redb";

/// Appends committed together at most; more wait for the next commit.
const MAX_BATCH: usize = 4096;
/// With `--fsync every=...`, seqs are reserved durably this far ahead of what is synced, so a
/// power loss that takes unsynced messages cannot make a restarted hub reuse their seqs.
const SEQ_RESERVATION: u64 = 1 << 20;
/// Memory fjall may use as a block cache: the hub keeps retained messages in memory itself.
const CACHE_BYTES: u64 = 32 * 1024 * 1024;
/// Journal bytes kept before fjall flushes memtables to tables and deletes journals: fjall's
/// smallest allowed value, as the hub (not the store) serves reads.
const MAX_JOURNAL_BYTES: u64 = 64 * 1024 * 1024;
/// Bytes written to a keyspace before its memtable is flushed to a table, letting fjall delete
/// the journal that held them: with fjall's default (64 MiB) the journal and the memtable (a
/// second in-memory copy of what the hub retains) were often larger than the retained messages.
const MEMTABLE_BYTES: u64 = 8 * 1024 * 1024;
/// How often, at most, the `SYNCED` marker is replaced: damage to the journal is detected for
/// everything synced more than this long before the last stop.
const SYNCED_EVERY: Duration = Duration::from_secs(1);
/// Where Linux tells which boot this is: messages handed to the OS but not yet synced are lost
/// only if the machine went down, i.e. if the boot changed.
const BOOT_ID: &str = "/proc/sys/kernel/random/boot_id";

/// When a publish is acknowledged relative to fsync.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fsync {
    /// After its batch is fsynced; concurrent publishes share one batch.
    Always,
    /// After its batch is handed to the OS; an fsync follows within the interval.
    Every(Duration),
}

impl FromStr for Fsync {
    type Err = String;

    fn from_str(text: &str) -> Result<Fsync, String> {
        if text == "always" {
            return Ok(Fsync::Always);
        }
        let interval = text.strip_prefix("every=").ok_or_else(|| {
            format!("expected `always` or `every=DURATION` (e.g. every=100ms), got {text:?}")
        })?;
        let interval =
            humantime::parse_duration(interval).map_err(|e| format!("{interval:?}: {e}"))?;
        if interval.is_zero() {
            return Err(
                "the fsync interval must be above zero; use `always` to sync every commit".into(),
            );
        }
        Ok(Fsync::Every(interval))
    }
}

enum Command {
    Append(Arc<Message>, Ack),
    Evict(Topic, u64),
    Close(oneshot::Sender<()>),
    /// Commands queued during one turn of the runtime, in order (see [`Outbox`]).
    Many(Vec<Command>),
}

impl Command {
    /// Answers a command the writer will never see: publishers are told the log is closed.
    fn refuse(self) {
        match self {
            Command::Append(_, ack) => {
                let _ = ack.send(Err(Error::Unavailable(
                    "the log is closed; topichub is shutting down".into(),
                )));
            }
            Command::Evict(..) => {}
            Command::Close(done) => {
                let _ = done.send(());
            }
            Command::Many(commands) => commands.into_iter().for_each(Command::refuse),
        }
    }
}

/// Commands from the async runtime, handed to the writer's thread once per turn of the runtime
/// rather than one at a time. Waking the writer is a syscall and, with the runtime on the same
/// core, a context switch that preempts the runtime before the other publishers of the same
/// turn have appended: sent one by one, batches held about one record each (measured: 1.4
/// context switches of the writer per publish with 16 concurrent publishers and
/// `--fsync every=1s`).
struct Outbox {
    queue: Mutex<Vec<Command>>,
    /// Wakes the hand-over task when the queue stops being empty, or when the log is dropped.
    ready: tokio::sync::Notify,
    /// Set when the log is dropped: the task hands over what is left and ends, and with it
    /// its sender, so that the writer ends too.
    dropped: std::sync::atomic::AtomicBool,
}

impl Outbox {
    /// Starts the hand-over task on `runtime`: it runs after the tasks woken before it, so
    /// everything they append goes to the writer in one command.
    fn start(runtime: &tokio::runtime::Handle, tx: mpsc::Sender<Command>) -> Arc<Outbox> {
        let outbox = Arc::new(Outbox {
            queue: Mutex::new(Vec::new()),
            ready: tokio::sync::Notify::new(),
            dropped: std::sync::atomic::AtomicBool::new(false),
        });
        let handing = outbox.clone();
        runtime.spawn(async move {
            loop {
                handing.ready.notified().await;
                let commands = std::mem::take(&mut *handing.lock());
                if !commands.is_empty()
                    && let Err(mpsc::SendError(unsent)) = tx.send(Command::Many(commands))
                {
                    unsent.refuse();
                }
                if handing.dropped.load(std::sync::atomic::Ordering::Acquire) {
                    return;
                }
            }
        });
        outbox
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Command>> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn push(&self, command: Command) {
        let mut queue = self.lock();
        queue.push(command);
        let first = queue.len() == 1;
        drop(queue);
        if first {
            self.ready.notify_one();
        }
    }
}

/// A durable batch on its way to the hub: applied, then its publishers acknowledged.
struct Durable {
    messages: Vec<Arc<Message>>,
    acks: Vec<Ack>,
}

impl Durable {
    fn settle(self, apply: &Apply) {
        apply(&self.messages);
        for (message, ack) in self.messages.into_iter().zip(self.acks) {
            let _ = ack.send(Ok(message.into()));
        }
    }
}

/// What the writer hands on, in order: durable batches, then the answer to `close`.
enum Settle {
    Batch(Durable),
    Closed(oneshot::Sender<()>),
}

/// Where durable batches are applied and acknowledged.
enum Settler {
    /// A task on the async runtime the log was started from. Acknowledging a publisher or
    /// delivering to a subscriber from the writer's thread wakes one task each, and each such
    /// wake-up from outside the runtime is a syscall and, with the runtime on the same core, often
    /// a context switch; the task takes a whole batch with one wake-up, and the wake-ups it
    /// causes are local to the runtime.
    Task(tokio::sync::mpsc::UnboundedSender<Settle>),
    /// Started outside a runtime: the writer applies and acknowledges itself.
    Inline(Apply),
}

impl Settler {
    /// Settles on a task of the current runtime if there is one.
    fn new(apply: Apply) -> Settler {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return Settler::Inline(apply);
        };
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        runtime.spawn(async move {
            while let Some(step) = rx.recv().await {
                match step {
                    Settle::Batch(durable) => durable.settle(&apply),
                    Settle::Closed(done) => {
                        let _ = done.send(());
                    }
                }
            }
        });
        Settler::Task(tx)
    }

    /// Applies and acknowledges `durable`, after every batch handed on before it. If the
    /// runtime is gone, its publishers are told the log stopped (their acks are dropped).
    fn batch(&self, durable: Durable) {
        match self {
            Settler::Task(tx) => {
                let _ = tx.send(Settle::Batch(durable));
            }
            Settler::Inline(apply) => durable.settle(apply),
        }
    }

    /// Answers `close` once every batch handed on before has been settled.
    fn closed(&self, done: oneshot::Sender<()>) {
        match self {
            Settler::Task(tx) => {
                if let Err(unsent) = tx.send(Settle::Closed(done))
                    && let Settle::Closed(done) = unsent.0
                {
                    let _ = done.send(());
                }
            }
            Settler::Inline(_) => {
                let _ = done.send(());
            }
        }
    }
}

/// The disk log. See the module documentation.
pub struct DiskLog {
    dir: PathBuf,
    tx: mpsc::Sender<Command>,
    /// Set by `start` when started on an async runtime: commands go through it, in order.
    outbox: OnceLock<Arc<Outbox>>,
    /// Taken by `start`.
    writer: Mutex<Option<Writer>>,
    failing: Arc<Mutex<Option<String>>>,
}

/// An open fjall database and its keyspaces. Dropped after a failed write (fjall refuses
/// further writes until reopened) and opened again by the next commit.
struct Store {
    db: Database,
    messages: Keyspace,
    topics: Keyspace,
    meta: Keyspace,
}

struct Writer {
    store: Option<Store>,
    dir: PathBuf,
    rx: mpsc::Receiver<Command>,
    fsync: Fsync,
    epoch: Arc<str>,
    head: u64,
    reserved: u64,
    /// Per topic, the highest evicted seq written.
    watermarks: HashMap<Topic, u64>,
    /// Seqs of batches that failed: their bytes may still reach the journal when the failed
    /// store is dropped, so the next commit deletes them (their publishers were told no).
    refused: Vec<u64>,
    /// The newest seq synced, and the one the `SYNCED` marker names.
    synced: u64,
    marked: u64,
    /// When the `SYNCED` marker was last replaced.
    marked_at: Option<Instant>,
    metrics: Metrics,
    failing: Arc<Mutex<Option<String>>>,
}

impl DiskLog {
    /// Opens (or creates) the log in `dir` and reads back what it holds. Errors say which file
    /// is at fault and what to do.
    pub fn open(
        dir: &Path,
        fsync: Fsync,
        metrics: Metrics,
    ) -> Result<(DiskLog, Recovered), String> {
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("cannot create the data dir {}: {e}", dir.display()))?;
        check_format(dir)?;
        let store = Store::open(dir)?;
        let recovered = recover(&store, dir)?;
        let (tx, rx) = mpsc::channel();
        let failing = Arc::new(Mutex::new(None));
        let writer = Writer {
            store: Some(store),
            dir: dir.to_owned(),
            rx,
            fsync,
            epoch: recovered.epoch.clone(),
            head: recovered.head,
            reserved: recovered.head,
            watermarks: recovered.watermarks.iter().cloned().collect(),
            refused: Vec::new(),
            synced: recovered.head,
            marked: recovered.head,
            marked_at: None,
            metrics,
            failing: failing.clone(),
        };
        Ok((
            DiskLog {
                dir: dir.to_owned(),
                tx,
                outbox: OnceLock::new(),
                writer: Mutex::new(Some(writer)),
                failing,
            },
            recovered,
        ))
    }
}

impl DiskLog {
    /// Hands `command` to the writer, through the outbox once started on a runtime.
    fn send(&self, command: Command) {
        match self.outbox.get() {
            Some(outbox) => outbox.push(command),
            None => {
                if let Err(mpsc::SendError(unsent)) = self.tx.send(command) {
                    unsent.refuse();
                }
            }
        }
    }
}

impl Drop for DiskLog {
    fn drop(&mut self) {
        if let Some(outbox) = self.outbox.get() {
            outbox
                .dropped
                .store(true, std::sync::atomic::Ordering::Release);
            outbox.ready.notify_one();
        }
    }
}

impl Log for DiskLog {
    fn start(&self, apply: Apply) {
        let Some(writer) = self.writer.lock().unwrap_or_else(|p| p.into_inner()).take() else {
            return;
        };
        let settler = Settler::new(apply);
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let _ = self.outbox.set(Outbox::start(&runtime, self.tx.clone()));
        }
        std::thread::Builder::new()
            .name("topichub-log".into())
            .spawn(move || writer.run(settler))
            .expect("spawn the log writer thread");
    }

    fn append(&self, message: Arc<Message>, ack: Ack) {
        self.send(Command::Append(message, ack));
    }

    fn evict(&self, topic: &Topic, seq: u64) {
        self.send(Command::Evict(topic.clone(), seq));
    }

    fn close(&self) -> oneshot::Receiver<()> {
        let (done, closed) = oneshot::channel();
        self.send(Command::Close(done));
        closed
    }

    fn stats(&self) -> LogStats {
        LogStats {
            bytes_on_disk: dir_bytes(&self.dir),
            failing: self
                .failing
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
        }
    }
}

/// Bytes taken by the files under `dir`, recursively: blocks allocated, as fjall preallocates
/// its journal as a sparse file.
fn dir_bytes(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|entry| match entry.metadata() {
            Ok(meta) if meta.is_dir() => dir_bytes(&entry.path()),
            Ok(meta) => allocated(&meta),
            Err(_) => 0,
        })
        .sum()
}

#[cfg(unix)]
fn allocated(meta: &std::fs::Metadata) -> u64 {
    use std::os::unix::fs::MetadataExt as _;
    meta.blocks() * 512
}

#[cfg(not(unix))]
fn allocated(meta: &std::fs::Metadata) -> u64 {
    meta.len()
}

impl Writer {
    fn run(mut self, settler: Settler) {
        let mut evictions: Vec<(Topic, u64)> = Vec::new();
        // Commands received in a `Many` and not yet taken, ahead of anything in the channel.
        let mut backlog: VecDeque<Command> = VecDeque::new();
        // Set while batches were written without fsync (`every=`): when the next sync is due.
        let mut sync_due: Option<Instant> = None;
        loop {
            // The marker lags the last sync by at most SYNCED_EVERY, even when publishing stops.
            let mark_due = (self.marked < self.synced)
                .then(|| self.marked_at.map(|at| at + SYNCED_EVERY))
                .flatten();
            let wake = match (sync_due, mark_due) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            let first = match backlog.pop_front() {
                Some(command) => Some(command),
                None => match wake {
                    Some(due) => match self
                        .rx
                        .recv_timeout(due.saturating_duration_since(Instant::now()))
                    {
                        Ok(command) => Some(command),
                        Err(RecvTimeoutError::Timeout) => None,
                        Err(RecvTimeoutError::Disconnected) => break,
                    },
                    None => match self.rx.recv() {
                        Ok(command) => Some(command),
                        Err(_) => break,
                    },
                },
            };
            let mut appends = Durable {
                messages: Vec::new(),
                acks: Vec::new(),
            };
            let mut close = None;
            let mut next = first;
            while let Some(command) = next.take() {
                match command {
                    Command::Append(message, ack) => {
                        appends.messages.push(message);
                        appends.acks.push(ack);
                    }
                    Command::Evict(topic, seq) => evictions.push((topic, seq)),
                    Command::Close(done) => {
                        close = Some(done);
                        break;
                    }
                    Command::Many(commands) => backlog.extend(commands),
                }
                if appends.messages.len() < MAX_BATCH {
                    next = backlog.pop_front().or_else(|| self.rx.try_recv().ok());
                }
            }
            let last = appends.messages.last().map_or(self.head, |m| m.seq);
            // Without fsync per batch, the seqs handed out must be reserved durably first (see
            // SEQ_RESERVATION); on a clean close nothing is lost, so the reservation is released.
            let reserve = match self.fsync {
                Fsync::Always => None,
                Fsync::Every(_) if close.is_some() => Some(last),
                Fsync::Every(_) if last > self.reserved => Some(last + SEQ_RESERVATION),
                Fsync::Every(_) => None,
            };
            // Evictions alone are not synced: if a power loss takes them, the messages reappear
            // at restart and retention evicts them again.
            let sync = close.is_some()
                || reserve.is_some()
                || match self.fsync {
                    Fsync::Always => !appends.messages.is_empty(),
                    Fsync::Every(_) => sync_due.is_some_and(|due| due <= Instant::now()),
                };
            if appends.messages.is_empty() && evictions.is_empty() && !sync {
                self.mark_synced(false);
                continue;
            }
            let started = Instant::now();
            let written = self.commit(&appends.messages, &evictions, last, reserve, sync);
            match written {
                Ok(()) => {
                    self.metrics.log_committed(started.elapsed(), sync);
                    evictions.clear();
                    self.head = last;
                    if let Some(reserved) = reserve {
                        self.reserved = reserved;
                    }
                    *self.failing.lock().unwrap_or_else(|p| p.into_inner()) = None;
                    sync_due = match self.fsync {
                        Fsync::Every(interval) if !sync => {
                            sync_due.or_else(|| Some(Instant::now() + interval))
                        }
                        _ => None,
                    };
                    if !appends.messages.is_empty() {
                        settler.batch(appends);
                    }
                    // After the acknowledgements: the marker's fsync is not theirs to wait for.
                    if sync {
                        self.synced = last;
                        self.mark_synced(close.is_some());
                    }
                }
                Err(why) => {
                    tracing::warn!(data_dir = %self.dir.display(), error = %why, "log write failed; publishes are refused until one succeeds");
                    let error = Error::Unavailable(format!(
                        "the message could not be stored ({why}); nothing was published, retry later"
                    ));
                    *self.failing.lock().unwrap_or_else(|p| p.into_inner()) = Some(why);
                    for (message, ack) in appends.messages.iter().zip(appends.acks) {
                        self.refused.push(message.seq);
                        let _ = ack.send(Err(error.clone()));
                    }
                    // After an I/O error fjall refuses further writes until reopened.
                    self.store = None;
                }
            }
            if let Some(done) = close {
                // Dropping the store waits for fjall's background threads.
                self.store = None;
                settler.closed(done);
                backlog.into_iter().for_each(Command::refuse);
                return;
            }
        }
    }

    /// Writes one batch: the appended records, deletions of evicted (and refused) seqs, the
    /// eviction watermarks and the counters; `sync` waits for fdatasync, otherwise the journal
    /// bytes are handed to the OS, which keeps them across a crash of this process.
    fn commit(
        &mut self,
        appends: &[Arc<Message>],
        evictions: &[(Topic, u64)],
        head: u64,
        reserve: Option<u64>,
        sync: bool,
    ) -> Result<(), String> {
        if self.store.is_none() {
            self.store = Some(Store::open(&self.dir)?);
        }
        let store = self.store.as_ref().expect("opened above");
        let mode = if sync {
            PersistMode::SyncData
        } else {
            PersistMode::Buffer
        };
        let mut batch = store.db.batch().durability(Some(mode));
        let mut record = Vec::new();
        for message in appends {
            record.clear();
            encode(message, &mut record);
            batch.insert(
                &store.messages,
                message.seq.to_be_bytes(),
                record.as_slice(),
            );
        }
        for seq in &self.refused {
            batch.remove(&store.messages, seq.to_be_bytes());
        }
        let mut watermarks = Vec::new();
        for (topic, seq) in evictions {
            batch.remove(&store.messages, seq.to_be_bytes());
            let through = self.watermarks.get(topic).copied().unwrap_or(0);
            if *seq > through {
                batch.insert(&store.topics, topic.as_str(), seq.to_le_bytes());
                watermarks.push((topic, *seq));
            }
        }
        batch.insert(&store.meta, "head", head.to_le_bytes());
        if let Some(reserved) = reserve {
            batch.insert(&store.meta, "reserved", reserved.to_le_bytes());
            batch.insert(&store.meta, "boot", boot_id().unwrap_or_default());
        }
        batch.commit().map_err(|e| describe(&e))?;
        self.refused.clear();
        for (topic, seq) in watermarks {
            self.watermarks.insert(topic.clone(), seq);
        }
        Ok(())
    }

    /// Records the synced head in `SYNCED`, at most every [`SYNCED_EVERY`] (at once when
    /// `closing`); the writer's wait wakes up for a deferred one. A failure only weakens the
    /// damage check, so it is logged.
    fn mark_synced(&mut self, closing: bool) {
        let recent = self.marked_at.is_some_and(|at| at.elapsed() < SYNCED_EVERY);
        if self.marked == self.synced || (recent && !closing) {
            return;
        }
        self.marked_at = Some(Instant::now());
        self.marked = self.synced;
        if let Err(e) = write_synced(&self.dir, &self.epoch, self.synced) {
            tracing::warn!(data_dir = %self.dir.display(), error = %e, "cannot update the synced-seq marker");
        }
    }
}

impl Store {
    fn open(dir: &Path) -> Result<Store, String> {
        let path = dir.join(STORE_DIR);
        let db = Database::builder(&path)
            .cache_size(CACHE_BYTES)
            .max_journaling_size(MAX_JOURNAL_BYTES)
            // Batches say how durable they are; nothing is persisted behind the writer's back.
            .manual_journal_persist(true)
            .open()
            .map_err(|error| match &error {
                fjall::Error::Locked => format!(
                    "the data dir {} is in use by another running topichub ({} is locked); stop it or choose another --data-dir",
                    dir.display(),
                    path.join("lock").display()
                ),
                fjall::Error::Io(e) => format!("cannot open {}: {e}", path.display()),
                fjall::Error::InvalidVersion(version) => format!(
                    "{} has a store layout ({version:?}) this topichub does not read; run the topichub that wrote it",
                    path.display()
                ),
                // A damaged journal batch (its checksum fails): name the journal files.
                fjall::Error::JournalRecovery(_) => corrupt(&journals(dir), dir, &describe(&error)),
                other => corrupt(&path.display().to_string(), dir, &describe(other)),
            })?;
        let keyspace = |name: &str| {
            db.keyspace(name, || {
                KeyspaceCreateOptions::default().max_memtable_size(MEMTABLE_BYTES)
            })
            .map_err(|e| corrupt(&path.display().to_string(), dir, &describe(&e)))
        };
        Ok(Store {
            messages: keyspace("messages")?,
            topics: keyspace("topics")?,
            meta: keyspace("meta")?,
            db,
        })
    }

    fn counter(&self, key: &str) -> Result<Option<u64>, fjall::Error> {
        Ok(self
            .meta
            .get(key)?
            .and_then(|v| <[u8; 8]>::try_from(&v[..]).ok())
            .map(u64::from_le_bytes))
    }
}

/// fjall's errors, said plainly: an I/O error is shown as the OS says it (e.g. "No space left
/// on device").
fn describe(error: &fjall::Error) -> String {
    match error {
        fjall::Error::Io(e) => e.to_string(),
        fjall::Error::Storage(fjall::LsmError::Io(e)) => e.to_string(),
        other => format!("{other:?}"),
    }
}

/// The current boot's id, where the OS says it.
fn boot_id() -> Option<String> {
    std::fs::read_to_string(BOOT_ID)
        .ok()
        .map(|id| id.trim().to_owned())
        .filter(|id| !id.is_empty())
}

/// Replaces `SYNCED` with `epoch seq`: written to a temporary file, fsynced, renamed over.
fn write_synced(dir: &Path, epoch: &str, seq: u64) -> std::io::Result<()> {
    use std::io::Write as _;
    let path = dir.join(SYNCED_FILE);
    let temporary = dir.join(format!("{SYNCED_FILE}.new"));
    let mut file = std::fs::File::create(&temporary)?;
    file.write_all(format!("{epoch} {seq}\n").as_bytes())?;
    file.sync_data()?;
    std::fs::rename(&temporary, &path)
}

/// The `SYNCED` marker's epoch and seq, if there is one.
fn read_synced(dir: &Path) -> Result<Option<(String, u64)>, String> {
    let path = dir.join(SYNCED_FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let parsed = text
                .split_once(' ')
                .and_then(|(epoch, seq)| Some((epoch.to_owned(), seq.trim().parse().ok()?)));
            parsed.map(Some).ok_or_else(|| {
                format!(
                    "{} is damaged (expected `EPOCH SEQ`); run `topichub repair --data-dir {}`",
                    path.display(),
                    dir.display()
                )
            })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("cannot read {}: {e}", path.display())),
    }
}

/// Reads or writes the `FORMAT` marker; refuses a layout this build does not know.
fn check_format(dir: &Path) -> Result<(), String> {
    let path = dir.join(FORMAT_FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let version = text
                .trim()
                .strip_prefix("topichub-log ")
                .and_then(|v| v.parse::<u32>().ok())
                .ok_or_else(|| format!("{} is not a topichub format marker (expected `topichub-log N`); is {} a topichub data dir?", path.display(), dir.display()))?;
            if version > FORMAT_VERSION {
                return Err(format!(
                    "the data dir {} was written by a newer topichub (format {version}; this one reads format {FORMAT_VERSION}); run that version, or start with another --data-dir",
                    dir.display()
                ));
            }
            if version < FORMAT_VERSION {
                return Err(format!(
                    "the data dir {} was written by an older topichub (format {version}, a redb file {}); this one reads format {FORMAT_VERSION} only and cannot convert it. Keep serving it with the topichub that wrote it until its clients have caught up, then start this one on an empty --data-dir (a new epoch: resuming clients are told with a gap)",
                    dir.display(),
                    REDB_FILE
                ));
            }
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let known = [STORE_DIR, SYNCED_FILE, REDB_FILE];
            if let Some(name) = known.iter().find(|name| dir.join(name).exists()) {
                return Err(format!(
                    "{} is missing next to {name}; is {} a topichub data dir?",
                    path.display(),
                    dir.display()
                ));
            }
            std::fs::write(&path, format!("topichub-log {FORMAT_VERSION}\n"))
                .map_err(|e| format!("cannot write {}: {e}", path.display()))
        }
        Err(e) => Err(format!("cannot read {}: {e}", path.display())),
    }
}

/// `what` (a file or the store) is damaged: the message names it and the recovery command.
fn corrupt(what: &str, dir: &Path, error: &str) -> String {
    format!(
        "{what} is damaged ({error}); nothing was changed. Keep a copy of the data dir, then run `topichub repair --data-dir {}` to check it",
        dir.display()
    )
}

/// The journal files of the store, for messages about damage.
fn journals(dir: &Path) -> String {
    let path = dir.join(STORE_DIR);
    let mut names: Vec<String> = std::fs::read_dir(&path)
        .into_iter()
        .flatten()
        .flatten()
        .map(|entry| entry.path())
        .filter(|p| p.extension().is_some_and(|ext| ext == "jnl"))
        .map(|p| p.display().to_string())
        .collect();
    names.sort();
    if names.is_empty() {
        path.display().to_string()
    } else {
        names.join(", ")
    }
}

/// Reads the epoch, counters, watermarks and retained messages, creating the epoch on first use.
fn recover(store: &Store, dir: &Path) -> Result<Recovered, String> {
    let path = dir.join(STORE_DIR).display().to_string();
    let bad = |e: &dyn std::fmt::Display| corrupt(&path, dir, &e.to_string());
    let fjall_bad = |e: fjall::Error| corrupt(&path, dir, &describe(&e));
    let synced = read_synced(dir)?;
    let stored_epoch = store
        .meta
        .get("epoch")
        .map_err(fjall_bad)?
        .map(|v| String::from_utf8_lossy(&v).into_owned());
    let epoch = match (stored_epoch, &synced) {
        (Some(epoch), _) => epoch,
        (None, Some(_)) => {
            return Err(lost(dir, "holds no history at all"));
        }
        (None, None) => {
            let epoch: String = std::iter::repeat_with(fastrand::alphanumeric)
                .take(12)
                .collect();
            let mut batch = store.db.batch().durability(Some(PersistMode::SyncAll));
            batch.insert(&store.meta, "epoch", epoch.as_str());
            batch.commit().map_err(fjall_bad)?;
            write_synced(dir, &epoch, 0)
                .map_err(|e| format!("cannot write {}: {e}", dir.join(SYNCED_FILE).display()))?;
            epoch
        }
    };
    if !crate::cursor::is_epoch(&epoch) {
        return Err(bad(&format!("the stored epoch {epoch:?} is malformed")));
    }
    let epoch: Arc<str> = Arc::from(epoch);

    let stored_head = store.counter("head").map_err(fjall_bad)?.unwrap_or(0);
    let reserved = store.counter("reserved").map_err(fjall_bad)?.unwrap_or(0);
    let forgotten = store.counter("forgotten").map_err(fjall_bad)?.unwrap_or(0);
    let mut watermarks = Vec::new();
    for entry in store.topics.iter() {
        let (topic, through) = entry.into_inner().map_err(fjall_bad)?;
        let topic = std::str::from_utf8(&topic)
            .ok()
            .and_then(|t| Topic::parse(t).ok())
            .ok_or_else(|| bad(&"a topic name is malformed"))?;
        let through = <[u8; 8]>::try_from(&through[..])
            .map_err(|_| bad(&format!("the watermark of {topic} is malformed")))?;
        watermarks.push((topic, u64::from_le_bytes(through)));
    }
    let mut messages = Vec::new();
    // One allocation per topic, not per message: a million retained messages load in well
    // under a second.
    let mut topics = std::collections::HashSet::new();
    for entry in store.messages.iter() {
        let (key, record) = entry.into_inner().map_err(fjall_bad)?;
        let seq = <[u8; 8]>::try_from(&key[..])
            .map(u64::from_be_bytes)
            .map_err(|_| bad(&"a message key is malformed"))?;
        let message = decode(seq, &record, &epoch, &mut topics)
            .ok_or_else(|| bad(&format!("the record of seq {seq} is malformed")))?;
        messages.push(Arc::new(message));
    }
    let newest = messages.last().map_or(0, |m| m.seq);
    let written = stored_head.max(newest);
    if let Some((synced_epoch, synced_seq)) = synced {
        if synced_epoch != *epoch {
            return Err(lost(
                dir,
                &format!("is of epoch {epoch}, {SYNCED_FILE} names epoch {synced_epoch}"),
            ));
        }
        if written < synced_seq {
            return Err(lost(
                dir,
                &format!("ends at seq {written}, yet seq {synced_seq} was synced"),
            ));
        }
    }
    // Seqs reserved but not written may have been acknowledged, unsynced, before the machine
    // went down: they are skipped, and a resume from inside them is told they are gone. If the
    // machine did not go down (the same boot), the OS kept every byte it was handed.
    let same_boot = match (store.meta.get("boot").map_err(fjall_bad)?, boot_id()) {
        (Some(stored), Some(current)) => !stored.is_empty() && *stored == *current.as_bytes(),
        _ => false,
    };
    let (head, forgotten_through) = after_restart(written, reserved, forgotten, same_boot);
    if forgotten_through > forgotten {
        tracing::warn!(
            from = written + 1,
            to = reserved,
            "the machine went down since the last sync; messages in this range may be lost"
        );
        let mut batch = store.db.batch().durability(Some(PersistMode::SyncAll));
        batch.insert(&store.meta, "forgotten", forgotten_through.to_le_bytes());
        batch.insert(&store.meta, "head", head.to_le_bytes());
        batch.commit().map_err(fjall_bad)?;
    }
    Ok(Recovered {
        epoch,
        head,
        forgotten_through,
        watermarks,
        messages,
    })
}

/// The head and forgotten-through seq to restart from: seqs `written+1..=reserved` may have
/// been acknowledged without being synced, so unless the OS kept them (`same_boot`) they are
/// never reused and count as forgotten.
fn after_restart(written: u64, reserved: u64, forgotten: u64, same_boot: bool) -> (u64, u64) {
    if reserved > written && !same_boot {
        (reserved, forgotten.max(reserved))
    } else {
        (written, forgotten)
    }
}

/// The store has less than `SYNCED` says was synced.
fn lost(dir: &Path, what: &str) -> String {
    format!(
        "the store in {} {what}: a journal file ({}) is damaged and fjall's recovery cut it short, so acknowledged messages are missing. Restore the data dir from a backup, or run `topichub repair --data-dir {} --discard` to start an empty history",
        dir.join(STORE_DIR).display(),
        journals(dir),
        dir.display()
    )
}

/// `published_at` (ns, u64) | topic (u16 len) | headers (u16 count; u16 len key, u32 len value)
/// | idempotency key (u8 0 = none, or 1 and u32 len) | payload (the rest). Little-endian.
fn encode(message: &Message, out: &mut Vec<u8>) {
    let nanos = message
        .published_at
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    out.extend_from_slice(&nanos.to_le_bytes());
    let topic = message.topic.as_str().as_bytes();
    out.extend_from_slice(&(topic.len() as u16).to_le_bytes());
    out.extend_from_slice(topic);
    out.extend_from_slice(&(message.headers.len() as u16).to_le_bytes());
    for (key, value) in &message.headers {
        out.extend_from_slice(&(key.len() as u16).to_le_bytes());
        out.extend_from_slice(key.as_bytes());
        out.extend_from_slice(&(value.len() as u32).to_le_bytes());
        out.extend_from_slice(value.as_bytes());
    }
    match &message.idempotency_key {
        None => out.push(0),
        Some(key) => {
            out.push(1);
            out.extend_from_slice(&(key.len() as u32).to_le_bytes());
            out.extend_from_slice(key.as_bytes());
        }
    }
    out.extend_from_slice(&message.payload);
}

fn decode(
    seq: u64,
    mut record: &[u8],
    epoch: &Arc<str>,
    topics: &mut std::collections::HashSet<Topic>,
) -> Option<Message> {
    fn take<'a>(record: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
        let (head, rest) = record.split_at_checked(n)?;
        *record = rest;
        Some(head)
    }
    let nanos = u64::from_le_bytes(take(&mut record, 8)?.try_into().ok()?);
    let len = u16::from_le_bytes(take(&mut record, 2)?.try_into().ok()?) as usize;
    let name = std::str::from_utf8(take(&mut record, len)?).ok()?;
    let topic = match topics.get(name) {
        Some(topic) => topic.clone(),
        None => {
            let topic = Topic::parse(name).ok()?;
            topics.insert(topic.clone());
            topic
        }
    };
    let count = u16::from_le_bytes(take(&mut record, 2)?.try_into().ok()?);
    let mut headers = Headers::new();
    for _ in 0..count {
        let len = u16::from_le_bytes(take(&mut record, 2)?.try_into().ok()?) as usize;
        let key = std::str::from_utf8(take(&mut record, len)?)
            .ok()?
            .to_owned();
        let len = u32::from_le_bytes(take(&mut record, 4)?.try_into().ok()?) as usize;
        let value = std::str::from_utf8(take(&mut record, len)?)
            .ok()?
            .to_owned();
        headers.insert(key, value);
    }
    let idempotency_key = match take(&mut record, 1)? {
        [0] => None,
        [1] => {
            let len = u32::from_le_bytes(take(&mut record, 4)?.try_into().ok()?) as usize;
            Some(Arc::from(
                std::str::from_utf8(take(&mut record, len)?).ok()?,
            ))
        }
        _ => return None,
    };
    Some(
        Message::new(
            topic,
            Bytes::copy_from_slice(record),
            seq,
            epoch.clone(),
            UNIX_EPOCH + Duration::from_nanos(nanos),
            headers,
        )
        .with_idempotency_key(idempotency_key),
    )
}

/// `topichub repair --data-dir DIR [--discard]`, on a stopped broker's data dir: opens the
/// store (fjall drops a journal tail torn by a crash), reads every record back (checking every
/// block's checksum) and compares the result with the `SYNCED` marker. When that fails,
/// `discard` moves the store and the marker aside (never deletes them) so that the broker can
/// start with an empty history, in a new epoch. Returns a summary.
pub fn repair(dir: &Path, discard: bool) -> Result<String, String> {
    let path = dir.join(STORE_DIR);
    if !path.exists() {
        return Err(format!("{} does not exist", path.display()));
    }
    check_format(dir)?;
    let checked = Store::open(dir).and_then(|store| recover(&store, dir));
    match checked {
        Ok(recovered) => Ok(format!(
            "{} is intact: epoch {}, {} retained messages, newest seq {}",
            path.display(),
            recovered.epoch,
            recovered.messages.len(),
            recovered.head
        )),
        Err(why) if why.contains("in use by another running topichub") => Err(why),
        Err(why) if discard => {
            let stamp = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            let aside = dir.join(format!("{STORE_DIR}.damaged-{stamp}"));
            std::fs::rename(&path, &aside)
                .map_err(|e| format!("cannot move {} aside: {e}", path.display()))?;
            let marker = dir.join(SYNCED_FILE);
            if marker.exists() {
                let marker_aside = dir.join(format!("{SYNCED_FILE}.damaged-{stamp}"));
                std::fs::rename(&marker, &marker_aside)
                    .map_err(|e| format!("cannot move {} aside: {e}", marker.display()))?;
            }
            Ok(format!(
                "{why}\nmoved it to {}; the next start begins an empty history in a new epoch (resuming clients are told with a gap)",
                aside.display()
            ))
        }
        Err(why) => Err(format!(
            "{why}\nit cannot be repaired in place: restore the data dir from a backup, or run `topichub repair --data-dir {} --discard` to move the store aside and start an empty history",
            dir.display()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_truncated_ones_are_refused() {
        let mut headers = Headers::new();
        headers.insert("content-type".into(), "text/plain".into());
        headers.insert("k".into(), String::new());
        let epoch: Arc<str> = Arc::from("e");
        let message = Message::new(
            Topic::parse("a.b").unwrap(),
            Bytes::from_static(b"payload"),
            7,
            epoch.clone(),
            UNIX_EPOCH + Duration::from_nanos(1_234_567_891),
            headers,
        );
        let mut record = Vec::new();
        encode(&message, &mut record);
        let mut topics = std::collections::HashSet::new();
        let back = decode(7, &record, &epoch, &mut topics).unwrap();
        assert_eq!(back.idempotency_key, None);
        assert_eq!(back.topic, message.topic);
        assert_eq!(back.payload, message.payload);
        assert_eq!(back.headers, message.headers);
        assert_eq!(back.published_at, message.published_at);
        // Any cut inside the framing is detected (the payload is the rest, so cuts there are
        // not: the journal's checksummed, atomic batches keep records whole).
        let framing = record.len() - message.payload.len();
        for cut in 0..framing {
            assert!(
                decode(7, &record[..cut], &epoch, &mut topics).is_none(),
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn the_idempotency_key_is_kept() {
        let epoch: Arc<str> = Arc::from("e");
        let message = Message::new(
            Topic::parse("a").unwrap(),
            Bytes::from_static(b"p"),
            3,
            epoch.clone(),
            UNIX_EPOCH,
            Headers::new(),
        )
        .with_idempotency_key(Some(Arc::from("order-17")));
        let mut record = Vec::new();
        encode(&message, &mut record);
        let mut topics = std::collections::HashSet::new();
        let back = decode(3, &record, &epoch, &mut topics).unwrap();
        assert_eq!(back.idempotency_key.as_deref(), Some("order-17"));
        assert_eq!(back.payload, message.payload);
    }

    #[test]
    fn unsynced_seqs_are_skipped_only_when_the_machine_went_down() {
        // A process crash on the same boot: the OS kept everything, nothing to skip.
        assert_eq!(after_restart(40, 40 + SEQ_RESERVATION, 0, true), (40, 0));
        // Another boot: seqs up to the reservation may have been acknowledged and lost.
        let reserved = 40 + SEQ_RESERVATION;
        assert_eq!(after_restart(40, reserved, 0, false), (reserved, reserved));
        // A clean close released the reservation.
        assert_eq!(after_restart(40, 40, 7, false), (40, 7));
    }

    #[test]
    fn fsync_policies_parse_with_clear_errors() {
        assert_eq!("always".parse(), Ok(Fsync::Always));
        assert_eq!(
            "every=100ms".parse(),
            Ok(Fsync::Every(Duration::from_millis(100)))
        );
        for bad in ["sometimes", "every=", "every=0s", "every=soon"] {
            assert!(bad.parse::<Fsync>().is_err(), "{bad}");
        }
    }
}

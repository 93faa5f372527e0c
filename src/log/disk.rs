//! The disk log (`--data-dir`): messages in a redb database, written by one thread that commits
//! concurrent appends together (group commit: many publishes share one fsync).
//!
//! Files in the data dir:
//! - `FORMAT`: `topichub-log N`, the layout version; a newer one is refused rather than misread.
//! - `log.redb`: tables `messages` (seq -> record), `topics` (topic -> highest evicted seq) and
//!   `meta` (epoch, head seq, reserved seq, forgotten-through seq).
//!
//! redb is a copy-on-write B-tree: a commit is atomic, a torn write after a crash is rolled back
//! to the last commit, and a corrupt page fails its checksum instead of being misread. redb's
//! quick repair is off: it makes every commit two fsyncs (halving group-commit throughput), while
//! the full repair after a SIGKILL of a file with a million messages measured no slower to
//! start (about 2 s either way, loading included).

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use redb::{Database, DatabaseError, Durability, ReadableDatabase, ReadableTable, TableDefinition};
use tokio::sync::oneshot;

use super::{Ack, Apply, Log, LogStats, Recovered};
use crate::error::Error;
use crate::message::{Headers, Message};
use crate::metrics::Metrics;
use crate::topic::Topic;

/// The layout this build writes and reads.
pub const FORMAT_VERSION: u32 = 1;
/// Name of the layout marker in the data dir.
const FORMAT_FILE: &str = "FORMAT";
/// Name of the database file in the data dir.
pub const DB_FILE: &str = "log.redb";

const MESSAGES: TableDefinition<u64, &[u8]> = TableDefinition::new("messages");
const TOPICS: TableDefinition<&str, u64> = TableDefinition::new("topics");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");

/// Appends committed together at most; more wait for the next commit.
const MAX_BATCH: usize = 4096;
/// With `--fsync every=...`, seqs are reserved durably this far ahead of what is written, so a
/// crash that loses unsynced messages cannot make a restarted hub reuse their seqs.
const SEQ_RESERVATION: u64 = 1 << 20;
/// Memory redb may use as a read cache: the hub keeps retained messages in memory itself.
const CACHE_BYTES: usize = 32 * 1024 * 1024;

/// When a publish is acknowledged relative to fsync.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fsync {
    /// After its commit is fsynced; concurrent publishes share one commit.
    Always,
    /// After its commit is written; an fsync follows within the interval.
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
}

/// The disk log. See the module documentation.
pub struct DiskLog {
    dir: PathBuf,
    tx: mpsc::Sender<Command>,
    /// Taken by `start`.
    writer: Mutex<Option<Writer>>,
    failing: Arc<Mutex<Option<String>>>,
}

struct Writer {
    db: Option<Database>,
    path: PathBuf,
    rx: mpsc::Receiver<Command>,
    fsync: Fsync,
    head: u64,
    reserved: u64,
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
        let path = dir.join(DB_FILE);
        check_format(dir, path.exists())?;
        let db = open_db(&path, dir)?;
        let recovered = recover(&db, &path, dir)?;
        let (tx, rx) = mpsc::channel();
        let failing = Arc::new(Mutex::new(None));
        let reserved = recovered.head;
        let writer = Writer {
            db: Some(db),
            path,
            rx,
            fsync,
            head: recovered.head,
            reserved,
            metrics,
            failing: failing.clone(),
        };
        Ok((
            DiskLog {
                dir: dir.to_owned(),
                tx,
                writer: Mutex::new(Some(writer)),
                failing,
            },
            recovered,
        ))
    }
}

impl Log for DiskLog {
    fn start(&self, apply: Apply) {
        let Some(writer) = self.writer.lock().unwrap_or_else(|p| p.into_inner()).take() else {
            return;
        };
        std::thread::Builder::new()
            .name("topichub-log".into())
            .spawn(move || writer.run(apply))
            .expect("spawn the log writer thread");
    }

    fn append(&self, message: Arc<Message>, ack: Ack) {
        if let Err(mpsc::SendError(Command::Append(_, ack))) =
            self.tx.send(Command::Append(message, ack))
        {
            let _ = ack.send(Err(Error::Unavailable(
                "the log is closed; topichub is shutting down".into(),
            )));
        }
    }

    fn evict(&self, topic: &Topic, seq: u64) {
        let _ = self.tx.send(Command::Evict(topic.clone(), seq));
    }

    fn close(&self) -> oneshot::Receiver<()> {
        let (done, closed) = oneshot::channel();
        let _ = self.tx.send(Command::Close(done));
        closed
    }

    fn stats(&self) -> LogStats {
        LogStats {
            bytes_on_disk: std::fs::metadata(self.dir.join(DB_FILE)).map_or(0, |m| m.len()),
            failing: self
                .failing
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
        }
    }
}

impl Writer {
    fn run(mut self, apply: Apply) {
        let mut evictions: Vec<(Topic, u64)> = Vec::new();
        // Set while commits were made without fsync (`every=`): when the next sync is due.
        let mut sync_due: Option<Instant> = None;
        loop {
            let first = match sync_due {
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
            };
            let mut appends: Vec<(Arc<Message>, Ack)> = Vec::new();
            let mut close = None;
            let mut next = first;
            while let Some(command) = next.take() {
                match command {
                    Command::Append(message, ack) => appends.push((message, ack)),
                    Command::Evict(topic, seq) => evictions.push((topic, seq)),
                    Command::Close(done) => {
                        close = Some(done);
                        break;
                    }
                }
                if appends.len() < MAX_BATCH {
                    next = self.rx.try_recv().ok();
                }
            }
            // Evictions alone are committed without fsync: if a crash loses them, the messages
            // reappear at restart and retention evicts them again.
            let durable = close.is_some()
                || match self.fsync {
                    Fsync::Always => !appends.is_empty(),
                    Fsync::Every(_) => sync_due.is_some_and(|due| due <= Instant::now()),
                };
            if appends.is_empty() && evictions.is_empty() && !durable {
                continue;
            }
            let last = appends.last().map_or(self.head, |(m, _)| m.seq);
            // Without fsync, the seqs handed out must be reserved durably first (see
            // SEQ_RESERVATION); on a clean close nothing is lost, so the reservation is released.
            let reserve = match self.fsync {
                Fsync::Always => None,
                Fsync::Every(_) if close.is_some() => Some(last),
                Fsync::Every(_) if last > self.reserved => Some(last + SEQ_RESERVATION),
                Fsync::Every(_) => None,
            };
            let started = Instant::now();
            let written = self.commit(
                &appends,
                &evictions,
                last,
                reserve,
                durable || reserve.is_some(),
            );
            match written {
                Ok(()) => {
                    self.metrics.log_committed(started.elapsed(), durable);
                    evictions.clear();
                    self.head = last;
                    if let Some(reserved) = reserve {
                        self.reserved = reserved;
                    }
                    *self.failing.lock().unwrap_or_else(|p| p.into_inner()) = None;
                    sync_due = match self.fsync {
                        Fsync::Every(interval) if !durable => {
                            sync_due.or_else(|| Some(Instant::now() + interval))
                        }
                        _ => None,
                    };
                    if !appends.is_empty() {
                        let messages: Vec<Arc<Message>> =
                            appends.iter().map(|(m, _)| m.clone()).collect();
                        apply(&messages);
                        for (message, ack) in appends {
                            let _ = ack.send(Ok(message));
                        }
                    }
                }
                Err(why) => {
                    tracing::warn!(file = %self.path.display(), error = %why, "log write failed; publishes are refused until one succeeds");
                    let error = Error::Unavailable(format!(
                        "the message could not be stored ({why}); nothing was published, retry later"
                    ));
                    *self.failing.lock().unwrap_or_else(|p| p.into_inner()) = Some(why);
                    for (_, ack) in appends {
                        let _ = ack.send(Err(error.clone()));
                    }
                    // After an I/O error redb refuses further writes until reopened.
                    self.db = None;
                }
            }
            if let Some(done) = close {
                let _ = done.send(());
                return;
            }
        }
    }

    fn commit(
        &mut self,
        appends: &[(Arc<Message>, Ack)],
        evictions: &[(Topic, u64)],
        head: u64,
        reserve: Option<u64>,
        durable: bool,
    ) -> Result<(), String> {
        if self.db.is_none() {
            let dir = self.path.parent().unwrap_or(Path::new("."));
            self.db = Some(open_db(&self.path, dir)?);
        }
        let db = self.db.as_ref().expect("opened above");
        let text = |e: &dyn std::fmt::Display| e.to_string();
        let mut txn = db.begin_write().map_err(|e| text(&e))?;
        txn.set_durability(if durable {
            Durability::Immediate
        } else {
            Durability::None
        })
        .map_err(|e| text(&e))?;
        {
            let mut messages = txn.open_table(MESSAGES).map_err(|e| text(&e))?;
            let mut record = Vec::new();
            for (message, _) in appends {
                record.clear();
                encode(message, &mut record);
                messages
                    .insert(message.seq, record.as_slice())
                    .map_err(|e| text(&e))?;
            }
            if !evictions.is_empty() {
                let mut topics = txn.open_table(TOPICS).map_err(|e| text(&e))?;
                for (topic, seq) in evictions {
                    messages.remove(*seq).map_err(|e| text(&e))?;
                    let through = topics
                        .get(topic.as_str())
                        .map_err(|e| text(&e))?
                        .map_or(0, |v| v.value());
                    if *seq > through {
                        topics.insert(topic.as_str(), *seq).map_err(|e| text(&e))?;
                    }
                }
            }
            let mut meta = txn.open_table(META).map_err(|e| text(&e))?;
            meta.insert("head", head.to_le_bytes().as_slice())
                .map_err(|e| text(&e))?;
            if let Some(reserved) = reserve {
                meta.insert("reserved", reserved.to_le_bytes().as_slice())
                    .map_err(|e| text(&e))?;
            }
        }
        txn.commit().map_err(|e| text(&e))
    }
}

/// Reads or writes the `FORMAT` marker; refuses a layout this build does not know.
fn check_format(dir: &Path, has_data: bool) -> Result<(), String> {
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
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !has_data => {
            std::fs::write(&path, format!("topichub-log {FORMAT_VERSION}\n"))
                .map_err(|e| format!("cannot write {}: {e}", path.display()))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(format!(
            "{} is missing next to {}; is {} a topichub data dir?",
            path.display(),
            DB_FILE,
            dir.display()
        )),
        Err(e) => Err(format!("cannot read {}: {e}", path.display())),
    }
}

fn open_db(path: &Path, dir: &Path) -> Result<Database, String> {
    let mut builder = Database::builder();
    builder.set_cache_size(CACHE_BYTES);
    builder.create(path).map_err(|error| match error {
        DatabaseError::DatabaseAlreadyOpen => format!(
            "the data dir {} is in use by another running topichub ({} is locked); stop it or choose another --data-dir",
            dir.display(),
            path.display()
        ),
        DatabaseError::UpgradeRequired(version) => format!(
            "{} has a newer file layout ({version}) than this topichub reads; run the topichub that wrote it",
            path.display()
        ),
        DatabaseError::Storage(redb::StorageError::Io(e)) => {
            format!("cannot open {}: {e}", path.display())
        }
        other => corrupt(path, dir, &other),
    })
}

fn corrupt(path: &Path, dir: &Path, error: &dyn std::fmt::Display) -> String {
    format!(
        "{} is damaged ({error}); nothing was changed. Keep a copy of the file, then run `topichub repair --data-dir {}` to check and repair it",
        path.display(),
        dir.display()
    )
}

/// Reads the epoch, counters, watermarks and retained messages, creating the epoch on first use.
fn recover(db: &Database, path: &Path, dir: &Path) -> Result<Recovered, String> {
    let bad = |e: &dyn std::fmt::Display| corrupt(path, dir, e);
    let txn = db.begin_write().map_err(|e| bad(&e))?;
    let epoch = {
        let mut meta = txn.open_table(META).map_err(|e| bad(&e))?;
        let existing = meta
            .get("epoch")
            .map_err(|e| bad(&e))?
            .map(|v| String::from_utf8_lossy(v.value()).into_owned());
        match existing {
            Some(epoch) => epoch,
            None => {
                let epoch: String = std::iter::repeat_with(fastrand::alphanumeric)
                    .take(12)
                    .collect();
                meta.insert("epoch", epoch.as_bytes())
                    .map_err(|e| bad(&e))?;
                epoch
            }
        }
    };
    txn.open_table(MESSAGES).map_err(|e| bad(&e))?;
    txn.open_table(TOPICS).map_err(|e| bad(&e))?;
    txn.commit().map_err(|e| bad(&e))?;
    if !crate::cursor::is_epoch(&epoch) {
        return Err(bad(&format!("the stored epoch {epoch:?} is malformed")));
    }
    let epoch: Arc<str> = Arc::from(epoch);

    let txn = db.begin_read().map_err(|e| bad(&e))?;
    let meta = txn.open_table(META).map_err(|e| bad(&e))?;
    let counter = |key: &str| -> Result<u64, String> {
        Ok(meta
            .get(key)
            .map_err(|e| bad(&e))?
            .and_then(|v| v.value().try_into().ok().map(u64::from_le_bytes))
            .unwrap_or(0))
    };
    let (stored_head, reserved, forgotten) = (
        counter("head")?,
        counter("reserved")?,
        counter("forgotten")?,
    );
    let mut watermarks = Vec::new();
    for entry in txn
        .open_table(TOPICS)
        .map_err(|e| bad(&e))?
        .iter()
        .map_err(|e| bad(&e))?
    {
        let (topic, through) = entry.map_err(|e| bad(&e))?;
        let topic = Topic::parse(topic.value()).map_err(|e| bad(&e))?;
        watermarks.push((topic, through.value()));
    }
    let mut messages = Vec::new();
    // One allocation per topic, not per message: a million retained messages load in well
    // under a second.
    let mut topics = std::collections::HashSet::new();
    for entry in txn
        .open_table(MESSAGES)
        .map_err(|e| bad(&e))?
        .iter()
        .map_err(|e| bad(&e))?
    {
        let (seq, record) = entry.map_err(|e| bad(&e))?;
        let message = decode(seq.value(), record.value(), &epoch, &mut topics)
            .ok_or_else(|| bad(&format!("the record of seq {} is malformed", seq.value())))?;
        messages.push(Arc::new(message));
    }
    let newest = messages.last().map_or(0, |m| m.seq);
    let written = stored_head.max(newest);
    // Seqs reserved but never synced may have been acknowledged before a crash: they are
    // skipped, and a resume from inside them is told they are gone.
    let head = written.max(reserved);
    let forgotten_through = if reserved > written {
        forgotten.max(reserved)
    } else {
        forgotten
    };
    if reserved > written {
        tracing::warn!(
            from = written + 1,
            to = reserved,
            "the last run ended without a final sync; messages in this range may be lost"
        );
    }
    Ok(Recovered {
        epoch,
        head,
        forgotten_through,
        watermarks,
        messages,
    })
}

/// `published_at` (ns, u64) | topic (u16 len) | headers (u16 count; u16 len key, u32 len value)
/// | payload (the rest). Little-endian.
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
    Some(Message::new(
        topic,
        Bytes::copy_from_slice(record),
        seq,
        epoch.clone(),
        UNIX_EPOCH + Duration::from_nanos(nanos),
        headers,
    ))
}

/// `topichub repair --data-dir DIR [--discard]`, on a stopped broker's data dir: opens the
/// database (redb rolls back a torn last commit on open), checks every page's checksum and reads
/// every record back. When that fails, `discard` moves the damaged file aside (never deletes it)
/// so that the broker can start with an empty history, in a new epoch. Returns a summary.
pub fn repair(dir: &Path, discard: bool) -> Result<String, String> {
    let path = dir.join(DB_FILE);
    if !path.exists() {
        return Err(format!("{} does not exist", path.display()));
    }
    check_format(dir, true)?;
    let checked = open_db(&path, dir).and_then(|mut db| {
        let clean = db.check_integrity().map_err(|e| corrupt(&path, dir, &e))?;
        let recovered = recover(&db, &path, dir)?;
        Ok((clean, recovered))
    });
    match checked {
        Ok((clean, recovered)) => Ok(format!(
            "{} is {}: epoch {}, {} retained messages, newest seq {}",
            path.display(),
            if clean { "intact" } else { "repaired" },
            recovered.epoch,
            recovered.messages.len(),
            recovered.head
        )),
        Err(why) if discard => {
            let aside = dir.join(format!(
                "{DB_FILE}.damaged-{}",
                SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs())
            ));
            std::fs::rename(&path, &aside)
                .map_err(|e| format!("cannot move {} aside: {e}", path.display()))?;
            Ok(format!(
                "{why}\nmoved it to {}; the next start begins an empty history in a new epoch (resuming clients are told with a gap)",
                aside.display()
            ))
        }
        Err(why) => Err(format!(
            "{why}\nit cannot be repaired in place: restore the data dir from a backup, or run `topichub repair --data-dir {} --discard` to move the file aside and start an empty history",
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
        assert_eq!(back.topic, message.topic);
        assert_eq!(back.payload, message.payload);
        assert_eq!(back.headers, message.headers);
        assert_eq!(back.published_at, message.published_at);
        // Any cut inside the framing is detected (the payload is the rest, so cuts there are
        // not: redb's checksums and atomic commits keep records whole).
        let framing = record.len() - message.payload.len();
        for cut in 0..framing {
            assert!(
                decode(7, &record[..cut], &epoch, &mut topics).is_none(),
                "cut at {cut}"
            );
        }
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

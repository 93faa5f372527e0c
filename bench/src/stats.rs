//! What the client counts (deliveries, latencies) and what it reads about the server from /proc.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

/// Every payload starts with `@@` and the send time in microseconds (20 digits), then padding.
const MARK: &[u8] = b"@@";
const DIGITS: usize = 20;

fn clock() -> Instant {
    static START: OnceLock<Instant> = OnceLock::new();
    *START.get_or_init(Instant::now)
}

/// Microseconds since the client started (one monotonic clock for publisher and subscribers).
pub fn now_us() -> u64 {
    clock().elapsed().as_micros() as u64
}

/// A payload of `size` bytes stamped with the current time.
pub fn stamped_payload(size: usize) -> bytes::Bytes {
    let mut out = format!("@@{:020}", now_us()).into_bytes();
    out.resize(size.max(MARK.len() + DIGITS), b'x');
    out.into()
}

/// The send time stamped into a payload, wherever the protocol put the payload in `data`
/// (SSE frames wrap it in JSON or `data:` lines; NATS, MQTT and gRPC deliver it as is).
pub fn stamp_of(data: &[u8]) -> Option<u64> {
    let at = data.windows(2).position(|w| w == MARK)? + MARK.len();
    let digits = data.get(at..at + DIGITS)?;
    std::str::from_utf8(digits).ok()?.parse().ok()
}

/// Latency histogram in microseconds: 32 linear sub-buckets per power of two (about 3 %
/// resolution), lock-free so that a thousand subscriber tasks can record into one.
pub struct Histogram {
    buckets: Vec<AtomicU64>,
}

const SUB: u32 = 32;

impl Histogram {
    pub fn new() -> Self {
        Self {
            buckets: (0..(64 * SUB as usize))
                .map(|_| AtomicU64::new(0))
                .collect(),
        }
    }

    fn index(us: u64) -> usize {
        if us < SUB as u64 {
            return us as usize;
        }
        let power = 63 - us.leading_zeros(); // >= 5
        let shift = power - SUB.trailing_zeros();
        let sub = (us >> shift) as u32 - SUB; // 0..SUB
        ((power - SUB.trailing_zeros() + 1) * SUB + sub) as usize
    }

    /// The middle of bucket `index`, in microseconds.
    fn value(index: usize) -> f64 {
        let index = index as u32;
        if index < SUB {
            return index as f64;
        }
        let shift = index / SUB - 1;
        let sub = index % SUB + SUB;
        ((sub as u64) << shift) as f64 + ((1u64 << shift) as f64 - 1.0) / 2.0
    }

    pub fn record(&self, us: u64) {
        self.buckets[Self::index(us)].fetch_add(1, Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.buckets.iter().map(|b| b.load(Relaxed)).sum()
    }

    pub fn reset(&self) {
        self.buckets.iter().for_each(|b| b.store(0, Relaxed));
    }

    /// The `q` quantile in milliseconds (None when empty).
    pub fn quantile_ms(&self, q: f64) -> Option<f64> {
        let counts: Vec<u64> = self.buckets.iter().map(|b| b.load(Relaxed)).collect();
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return None;
        }
        let rank = ((total as f64) * q).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, c) in counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return Some(Self::value(i) / 1000.0);
            }
        }
        None
    }
}

/// Where every subscriber of a scenario reports: deliveries, latencies, readiness, failures.
pub struct Sink {
    pub delivered: AtomicU64,
    pub latency: Histogram,
    /// Latencies are recorded only while this is set (after warm-up).
    pub recording: AtomicBool,
    /// Subscribers known to be live at the server.
    pub ready: AtomicUsize,
    pub ready_changed: Notify,
    /// Woken each time the delivery count reaches a multiple of `per_message`: one message has
    /// (on count) reached every subscriber.
    pub progress: Notify,
    pub per_message: AtomicU64,
    pub failures: AtomicUsize,
    pub first_failure: Mutex<Option<String>>,
}

impl Sink {
    pub fn new() -> Self {
        Self {
            delivered: AtomicU64::new(0),
            latency: Histogram::new(),
            recording: AtomicBool::new(false),
            ready: AtomicUsize::new(0),
            ready_changed: Notify::new(),
            progress: Notify::new(),
            per_message: AtomicU64::new(1),
            failures: AtomicUsize::new(0),
            first_failure: Mutex::new(None),
        }
    }

    /// One message arrived at one subscriber; `data` holds the payload somewhere.
    pub fn deliver(&self, data: &[u8]) {
        let n = self.delivered.fetch_add(1, Relaxed) + 1;
        if n.is_multiple_of(self.per_message.load(Relaxed)) {
            self.progress.notify_one();
        }
        if self.recording.load(Relaxed)
            && let Some(sent) = stamp_of(data)
        {
            self.latency.record(now_us().saturating_sub(sent));
        }
    }

    pub fn mark_ready(&self) {
        self.ready.fetch_add(1, Relaxed);
        self.ready_changed.notify_waiters();
    }

    pub fn fail(&self, what: String) {
        self.failures.fetch_add(1, Relaxed);
        self.ready_changed.notify_waiters();
        let mut first = self.first_failure.lock().unwrap();
        first.get_or_insert(what);
    }

    pub fn first_failure(&self) -> Option<String> {
        self.first_failure.lock().unwrap().clone()
    }

    /// Waits until `n` subscribers are live; fails on the first subscriber failure or timeout.
    pub async fn wait_ready(&self, n: usize, timeout: Duration) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let changed = self.ready_changed.notified();
            if self.failures.load(Relaxed) > 0 {
                anyhow::bail!(
                    "{} of {n} subscribers failed; first: {}",
                    self.failures.load(Relaxed),
                    self.first_failure().unwrap_or_default()
                );
            }
            let ready = self.ready.load(Relaxed);
            if ready >= n {
                return Ok(());
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                anyhow::bail!("only {ready} of {n} subscribers were live after {timeout:?}");
            }
        }
    }
}

/// Clock ticks per second of /proc/PID/stat times.
fn ticks_per_second() -> f64 {
    static TICKS: OnceLock<f64> = OnceLock::new();
    *TICKS.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// `pid` and every process below it (nginx's workers run under its master).
pub fn process_tree(pid: u32) -> Vec<u32> {
    let mut tree = vec![pid];
    let mut i = 0;
    let all: Vec<(u32, u32)> = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|p| {
            let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).ok()?;
            let after = &stat[stat.rfind(')')? + 2..];
            let ppid = after.split(' ').nth(1)?.parse().ok()?;
            Some((p, ppid))
        })
        .collect();
    while i < tree.len() {
        let parent = tree[i];
        tree.extend(all.iter().filter(|(_, pp)| *pp == parent).map(|(p, _)| *p));
        i += 1;
    }
    tree
}

/// CPU seconds used so far by a process tree, in user space and in the kernel.
#[derive(Clone, Copy, Default)]
pub struct CpuSeconds {
    pub user: f64,
    /// System time: the process's system calls. Unless the kernel accounts IRQ time on its own
    /// (`CONFIG_IRQ_TIME_ACCOUNTING`), this includes the softirq work done inside them; over
    /// loopback that is the delivery into the receiving socket that each write sets off.
    pub system: f64,
}

impl CpuSeconds {
    pub fn total(self) -> f64 {
        self.user + self.system
    }
}

impl std::ops::Add for CpuSeconds {
    type Output = CpuSeconds;
    fn add(self, other: CpuSeconds) -> CpuSeconds {
        CpuSeconds {
            user: self.user + other.user,
            system: self.system + other.system,
        }
    }
}

impl std::ops::Sub for CpuSeconds {
    type Output = CpuSeconds;
    fn sub(self, earlier: CpuSeconds) -> CpuSeconds {
        CpuSeconds {
            user: self.user - earlier.user,
            system: self.system - earlier.system,
        }
    }
}

/// CPU time used so far by the process tree at `pid`.
pub fn cpu_seconds(pid: u32) -> CpuSeconds {
    process_tree(pid)
        .iter()
        .filter_map(|p| stat_cpu(&format!("/proc/{p}/stat")))
        .fold(CpuSeconds::default(), |a, b| CpuSeconds {
            user: a.user + b.user,
            system: a.system + b.system,
        })
}

/// CPU time used so far by this client process alone (every thread; not the servers it
/// started, which are its children).
pub fn client_cpu_seconds() -> CpuSeconds {
    stat_cpu("/proc/self/stat").unwrap_or_default()
}

/// CPU time used by the children of this process that have ended and been waited for: the
/// load tools (`h2load`, `wrk`) once they finished, and servers once stopped.
fn waited_children_cpu_seconds() -> CpuSeconds {
    stat_fields("/proc/self/stat", 13).unwrap_or_default()
}

fn stat_cpu(path: &str) -> Option<CpuSeconds> {
    stat_fields(path, 11)
}

/// Two clock-tick fields of a `/proc/.../stat` from `at` on, as user and system seconds. After
/// the command: state(0) ppid(1) ... utime(11) stime(12) cutime(13) cstime(14).
fn stat_fields(path: &str, at: usize) -> Option<CpuSeconds> {
    let tick = ticks_per_second();
    let stat = std::fs::read_to_string(path).ok()?;
    let after = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = after.split(' ').collect();
    let user: u64 = fields.get(at)?.parse().ok()?;
    let system: u64 = fields.get(at + 1)?.parse().ok()?;
    Some(CpuSeconds {
        user: user as f64 / tick,
        system: system as f64 / tick,
    })
}

/// Whose CPU time is the client's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Client {
    /// This process, every thread (the Rust clients).
    This,
    /// The load tools this process ran and waited for within the window (`h2load`, `wrk`).
    Tools,
}

impl Client {
    fn cpu_seconds(self) -> CpuSeconds {
        match self {
            Client::This => client_cpu_seconds(),
            Client::Tools => waited_children_cpu_seconds(),
        }
    }
}

/// CPU used by the client and by the server's processes over a stretch of wall time.
pub struct CpuWindow {
    started: Instant,
    whose: Client,
    client: CpuSeconds,
    pids: Vec<u32>,
    server: CpuSeconds,
}

/// What a [`CpuWindow`] measured.
pub struct CpuUse {
    pub seconds: f64,
    /// Fractions of one core.
    pub client_share: f64,
    pub server_share: f64,
    /// Server CPU seconds in the window, all and the kernel's part.
    pub server_cpu: f64,
    pub server_kernel: f64,
}

impl CpuWindow {
    /// This process as the client, the process tree at `pid` as the server.
    pub fn start(pid: u32) -> Self {
        Self::over(&[pid], Client::This)
    }

    /// `whose` CPU as the client's, the process trees at `pids` together as the server.
    pub fn over(pids: &[u32], whose: Client) -> Self {
        CpuWindow {
            started: Instant::now(),
            whose,
            client: whose.cpu_seconds(),
            pids: pids.to_vec(),
            server: Self::servers(pids),
        }
    }

    fn servers(pids: &[u32]) -> CpuSeconds {
        pids.iter()
            .map(|&pid| cpu_seconds(pid))
            .fold(CpuSeconds::default(), |a, b| a + b)
    }

    pub fn finish(&self) -> CpuUse {
        let seconds = self.started.elapsed().as_secs_f64();
        let client = (self.whose.cpu_seconds() - self.client).total();
        let server = Self::servers(&self.pids) - self.server;
        CpuUse {
            seconds,
            client_share: client / seconds,
            server_share: server.total() / seconds,
            server_cpu: server.total(),
            server_kernel: server.system,
        }
    }
}

impl CpuUse {
    /// The CPU figures of `count` operations (`what`: `publish`, `delivery`) done in the window,
    /// as every scenario that reports CPU names them: `server_cpu_us_per_{what}` (user + system)
    /// and `server_kernel_us_per_{what}`, and `client_cpu_share` and `server_cpu_share` (of one
    /// core; a client near 1.0 was the limit, and the figures say little about the server).
    pub fn figures(&self, what: &str, count: f64) -> Vec<(String, f64)> {
        let per = |seconds: f64| {
            if count > 0.0 {
                seconds * 1e6 / count
            } else {
                0.0
            }
        };
        vec![
            (format!("server_cpu_us_per_{what}"), per(self.server_cpu)),
            (
                format!("server_kernel_us_per_{what}"),
                per(self.server_kernel),
            ),
            ("client_cpu_share".into(), self.client_share),
            ("server_cpu_share".into(), self.server_share),
        ]
    }
}

/// Resident set size of the process `pid` alone (`VmRSS` in /proc/PID/status), in KiB.
pub fn rss_kib(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Proportional set size of the process tree at `pid`, in KiB.
pub fn pss_kib(pid: u32) -> f64 {
    process_tree(pid)
        .iter()
        .filter_map(|p| {
            let rollup = std::fs::read_to_string(format!("/proc/{p}/smaps_rollup")).ok()?;
            let line = rollup.lines().find(|l| l.starts_with("Pss:"))?;
            line.split_whitespace().nth(1)?.parse::<f64>().ok()
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_ordered_and_close() {
        let mut last = 0;
        for us in [
            0,
            1,
            31,
            32,
            33,
            63,
            64,
            100,
            1000,
            12_345,
            1_000_000,
            u32::MAX as u64,
        ] {
            let i = Histogram::index(us);
            assert!(i >= last, "{us}");
            last = i;
            let v = Histogram::value(i);
            assert!(
                (v - us as f64).abs() <= us as f64 * 0.04 + 1.0,
                "{us} -> {v}"
            );
        }
    }

    #[test]
    fn quantiles() {
        let h = Histogram::new();
        for us in 1..=1000 {
            h.record(us * 10);
        }
        let p50 = h.quantile_ms(0.5).unwrap();
        let p99 = h.quantile_ms(0.99).unwrap();
        assert!((p50 - 5.0).abs() < 0.2, "{p50}");
        assert!((p99 - 9.9).abs() < 0.4, "{p99}");
    }

    #[test]
    fn stamps_are_found_inside_frames() {
        let payload = stamped_payload(256);
        assert_eq!(payload.len(), 256);
        let sent = stamp_of(&payload).unwrap();
        let framed = [
            b"id: 1\ndata: {\"payload\":\"".as_slice(),
            &payload,
            b"\"}\n\n",
        ]
        .concat();
        assert_eq!(stamp_of(&framed), Some(sent));
        assert_eq!(stamp_of(b"no stamp"), None);
    }
}

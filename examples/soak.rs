//! Soak test against a running broker: many concurrent subscribers, a steady publish stream,
//! exact delivery accounting, and the broker's RSS sampled every second.
//!
//! `scripts/soak.sh` builds the release binary, starts a broker and runs this; by hand:
//!
//! ```sh
//! cargo run --release --example soak -- --url http://127.0.0.1:8080 --broker-pid PID
//! ```
//!
//! # What it does
//! 1. Opens `--subscribers` subscriptions (default 10 000) and waits until every one has received
//!    its first event (`subscribed`, carrying the hub's head cursor: the subscription is live for
//!    every message after it).
//!    - `--sse-percent` (default 20 %) are SSE streams, each on its own HTTP/1.1 connection, as
//!      browsers and `curl` subscribe;
//!    - the rest are gRPC `Subscribe` streams multiplexed over a few HTTP/2 connections, as
//!      backend services subscribe: `--streams-per-connection` (default 160) each, so 8 000
//!      streams share 50 connections. The broker (hyper's default) accepts at most 200
//!      concurrent streams per HTTP/2 connection; a client asking for more waits for a free slot.
//!
//!    The mix keeps both doors loaded (SSE: one socket, one task and one write per delivery;
//!    gRPC: frames of many streams batched per connection) within a modest file-descriptor
//!    budget (~2 100 sockets on each side).
//! 2. Publishes `--rate` messages per second (default 20) round-robin over 16 topics
//!    `soak.g{0-3}.t{0-3}`, for `--seconds` (default 60). Each subscriber follows some of them:
//!    5 % `soak.>` (all 16), 20 % a group wildcard `soak.gN.*` (4), 25 % two exact topics, 50 %
//!    one exact topic; on average a message goes to ~1 600 subscribers (~33 000 deliveries/s at
//!    20 msg/s).
//! 3. Stops publishing, waits (bounded) until every subscriber has what it should, and checks
//!    each one: the messages published to its topics after its `subscribed` head, exactly, in
//!    order (count, strictly increasing seq, and an order-independent hash of the seqs; nothing
//!    here is old enough to leave retention, so nothing may be missing).
//! 4. Every second it prints a row (broker RSS and open fds, broker-reported subscribers, head,
//!    deliveries/s, delivery latency) and at the end a JSON summary. RSS is "flat" when the RSS
//!    at the end of publishing is within `--max-rss-growth-percent` of the RSS after the warm-up.
//!
//! Exits 1 on any loss, duplicate, reordering, early stream end, publish error, or RSS growth
//! over the threshold.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU8, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Parser;
use http_body_util::BodyExt as _;
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tonic::transport::{Channel, Endpoint};
use topichub::proto::v1::pub_sub_client::PubSubClient;
use topichub::proto::v1::{PublishRequest, SubscribeRequest, subscribe_response::Event};

/// Topics: `soak.g{G}.t{T}`, G and T in 0..4; topic index = 4 G + T.
const GROUPS: usize = 4;
const PER_GROUP: usize = 4;
const TOPICS: usize = GROUPS * PER_GROUP;
/// Subscriptions being opened at once.
const OPENING_CONCURRENCY: usize = 256;
/// Digits of the send timestamp (microseconds since start) at the head of each payload.
const STAMP: usize = 20;

#[derive(Parser, Debug, Clone)]
#[command(about = "Soak a running topichub broker with many subscribers")]
struct Args {
    /// Broker URL.
    #[arg(long, env = "SOAK_URL", default_value = "http://127.0.0.1:8080")]
    url: String,
    /// PID of the broker, for its RSS (default: found in /proc by its --listen address).
    #[arg(long, env = "SOAK_BROKER_PID")]
    broker_pid: Option<u32>,
    /// Concurrent subscriptions.
    #[arg(long, env = "SOAK_SUBSCRIBERS", default_value_t = 10_000)]
    subscribers: usize,
    /// Share of subscriptions that are SSE streams (the rest are gRPC streams).
    #[arg(long, env = "SOAK_SSE_PERCENT", default_value_t = 20)]
    sse_percent: usize,
    /// gRPC streams per HTTP/2 connection (the broker allows 200).
    #[arg(long, env = "SOAK_STREAMS_PER_CONNECTION", default_value_t = 160)]
    streams_per_connection: usize,
    /// Seconds of publishing.
    #[arg(long, env = "SOAK_SECONDS", default_value_t = 60)]
    seconds: u64,
    /// Messages published per second.
    #[arg(long, env = "SOAK_RATE", default_value_t = 20)]
    rate: u32,
    /// Payload size in bytes (at least 20: a send timestamp leads each payload).
    #[arg(long, env = "SOAK_PAYLOAD_BYTES", default_value_t = 256)]
    payload_bytes: usize,
    /// Seconds of publishing after which the reference RSS is taken (default: 30, or half of
    /// --seconds when that is shorter). 30 s is the `--retain-age` scripts/soak.sh gives the
    /// broker: by then its retention is full, so its legitimate memory has stopped growing.
    #[arg(long, env = "SOAK_WARMUP_SECONDS")]
    warmup_seconds: Option<u64>,
    /// Largest accepted growth of RSS from the warm-up to the end of publishing, in percent.
    #[arg(long, env = "SOAK_MAX_RSS_GROWTH_PERCENT", default_value_t = 10.0)]
    max_rss_growth_percent: f64,
    /// Publish one message to each topic before the subscribers open. Works around a hub bug
    /// (a wildcard subscription misses every message of a topic that an exact subscription
    /// brought into the hub after the wildcard subscribed); off by default, so the soak finds it.
    #[arg(
        long,
        env = "SOAK_PRECREATE_TOPICS",
        action = clap::ArgAction::SetTrue,
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    precreate_topics: bool,
    /// Also write the JSON summary to this file.
    #[arg(long, env = "SOAK_SUMMARY")]
    summary: Option<PathBuf>,
}

fn start() -> Instant {
    static START: OnceLock<Instant> = OnceLock::new();
    *START.get_or_init(Instant::now)
}

fn now_us() -> u64 {
    start().elapsed().as_micros() as u64
}

/// Order-independent fingerprint of a set of seqs: the wrapping sum of a strong 64-bit mix.
fn mix(seq: u64) -> u64 {
    // splitmix64's finalizer.
    let mut z = seq.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn topic_name(index: usize) -> String {
    format!("soak.g{}.t{}", index / PER_GROUP, index % PER_GROUP)
}

/// The patterns of subscriber `i` and the topics they match (bit k = topic index k).
fn assignment(i: usize) -> (Vec<String>, u32) {
    let round = i / 20;
    match i % 20 {
        0 => (vec!["soak.>".into()], (1 << TOPICS) - 1),
        kind @ 1..=4 => {
            let group = (round + kind) % GROUPS;
            (
                vec![format!("soak.g{group}.*")],
                ((1 << PER_GROUP) - 1) << (group * PER_GROUP),
            )
        }
        5..=9 => {
            let a = (i * 7) % TOPICS;
            let b = (a + 1 + round % (TOPICS - 1)) % TOPICS;
            (vec![topic_name(a), topic_name(b)], (1 << a) | (1 << b))
        }
        _ => {
            let a = (i * 3 + round) % TOPICS;
            (vec![topic_name(a)], 1 << a)
        }
    }
}

/// What one subscriber has seen. Written only by its own task.
struct SubStats {
    /// Head seq of its `subscribed` event; `u64::MAX` until then.
    head: AtomicU64,
    count: AtomicU64,
    hash: AtomicU64,
    last: AtomicU64,
    out_of_order: AtomicU64,
    lags: AtomicU64,
    gaps: AtomicU64,
}

impl Default for SubStats {
    fn default() -> Self {
        SubStats {
            head: AtomicU64::new(u64::MAX),
            count: AtomicU64::new(0),
            hash: AtomicU64::new(0),
            last: AtomicU64::new(0),
            out_of_order: AtomicU64::new(0),
            lags: AtomicU64::new(0),
            gaps: AtomicU64::new(0),
        }
    }
}

/// Upper bounds (µs) of the latency histogram's buckets; the last bucket is everything above.
const LATENCY_BOUNDS_US: [u64; 14] = [
    250, 500, 1_000, 2_000, 5_000, 10_000, 20_000, 50_000, 100_000, 200_000, 500_000, 1_000_000,
    2_000_000, 5_000_000,
];

#[derive(Default)]
struct Latency {
    buckets: [AtomicU64; LATENCY_BOUNDS_US.len() + 1],
    max_us: AtomicU64,
}

impl Latency {
    fn record(&self, us: u64) {
        let bucket = LATENCY_BOUNDS_US
            .iter()
            .position(|bound| us <= *bound)
            .unwrap_or(LATENCY_BOUNDS_US.len());
        self.buckets[bucket].fetch_add(1, Relaxed);
        self.max_us.fetch_max(us, Relaxed);
    }

    fn snapshot(&self) -> [u64; LATENCY_BOUNDS_US.len() + 1] {
        std::array::from_fn(|i| self.buckets[i].load(Relaxed))
    }

    /// Upper bound (ms) of the bucket holding quantile `q` of `counts`.
    fn quantile_ms(counts: &[u64], q: f64) -> f64 {
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return 0.0;
        }
        let rank = (q * total as f64).ceil() as u64;
        let mut seen = 0;
        for (i, count) in counts.iter().enumerate() {
            seen += count;
            if seen >= rank {
                return LATENCY_BOUNDS_US
                    .get(i)
                    .map_or(f64::INFINITY, |b| *b as f64 / 1e3);
            }
        }
        f64::INFINITY
    }
}

/// Shared by every task.
struct Ctx {
    args: Args,
    authority: String,
    subs: Vec<SubStats>,
    subscribed: AtomicUsize,
    delivered: AtomicU64,
    latency: Latency,
    /// Streams that ended (or failed to open) before the soak was over.
    ended_early: AtomicUsize,
    errors: Mutex<Vec<String>>,
    phase: AtomicU8,
}

const CONNECTING: u8 = 0;
const PUBLISHING: u8 = 1;
const DRAINING: u8 = 2;
const DONE: u8 = 3;

impl Ctx {
    fn deliver(&self, i: usize, seq: u64, sent_us: Option<u64>) {
        let s = &self.subs[i];
        if seq <= s.last.load(Relaxed) {
            s.out_of_order.fetch_add(1, Relaxed);
        }
        s.last.fetch_max(seq, Relaxed);
        s.count.fetch_add(1, Relaxed);
        s.hash.fetch_add(mix(seq), Relaxed);
        self.delivered.fetch_add(1, Relaxed);
        if let Some(sent) = sent_us {
            self.latency.record(now_us().saturating_sub(sent));
        }
    }

    fn subscribed(&self, i: usize, head: u64) {
        self.subs[i].head.store(head, Relaxed);
        self.subscribed.fetch_add(1, Relaxed);
    }

    fn failed(&self, i: usize, what: String) {
        if self.phase.load(Relaxed) >= DONE {
            return;
        }
        self.ended_early.fetch_add(1, Relaxed);
        let mut errors = self.errors.lock().unwrap();
        if errors.len() < 20 {
            errors.push(format!("subscriber {i}: {what}"));
        }
    }
}

fn parse_stamp(payload: &[u8]) -> Option<u64> {
    std::str::from_utf8(payload.get(..STAMP)?)
        .ok()?
        .parse()
        .ok()
}

fn seq_of_cursor(cursor: &[u8]) -> Option<u64> {
    let text = std::str::from_utf8(cursor).ok()?;
    text.rsplit_once('-')?.1.trim().parse().ok()
}

/// One SSE subscriber: its own HTTP/1.1 connection, parsed as an `EventSource` would.
async fn sse_subscriber(
    ctx: Arc<Ctx>,
    i: usize,
    patterns: Vec<String>,
    opening: Arc<Semaphore>,
) -> Result<(), String> {
    let permit = opening.acquire_owned().await.map_err(|e| e.to_string())?;
    let query: String = patterns
        .iter()
        .map(|p| format!("topic={}", p.replace('>', "%3E").replace('*', "%2A")))
        .collect::<Vec<_>>()
        .join("&");
    let stream = TcpStream::connect(&ctx.authority)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let _ = stream.set_nodelay(true);
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| format!("handshake: {e}"))?;
    tokio::spawn(connection);
    let request = http::Request::get(format!("/subscribe?{query}"))
        .header("host", &ctx.authority)
        .body(http_body_util::Empty::<Bytes>::new())
        .unwrap();
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| format!("request: {e}"))?;
    if response.status() != 200 {
        return Err(format!("status {}", response.status()));
    }
    let mut body = response.into_body();
    let mut permit = Some(permit);
    let mut buffer: Vec<u8> = Vec::with_capacity(4096);
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| format!("body: {e}"))?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        buffer.extend_from_slice(&data);
        let mut consumed = 0;
        while let Some(end) = find(&buffer[consumed..], b"\n\n") {
            let block = &buffer[consumed..consumed + end];
            consumed += end + 2;
            let (mut id, mut event, mut payload) = (None, &b""[..], &b""[..]);
            for line in block.split(|b| *b == b'\n') {
                if let Some(v) = line.strip_prefix(b"id: ") {
                    id = Some(v);
                } else if let Some(v) = line.strip_prefix(b"event: ") {
                    event = v;
                } else if let Some(v) = line.strip_prefix(b"data: ") {
                    payload = v;
                }
            }
            match event {
                b"message" => {
                    let seq = id.and_then(seq_of_cursor).ok_or("message without id")?;
                    let stamp = find(payload, b"\"payload\":\"")
                        .and_then(|at| parse_stamp(&payload[at + 11..]));
                    ctx.deliver(i, seq, stamp);
                }
                b"subscribed" => {
                    let head = id.and_then(seq_of_cursor).ok_or("subscribed without id")?;
                    ctx.subscribed(i, head);
                    permit.take();
                }
                b"lag" => {
                    ctx.subs[i].lags.fetch_add(1, Relaxed);
                }
                b"gap" => {
                    ctx.subs[i].gaps.fetch_add(1, Relaxed);
                }
                b"end" => return Err(String::from_utf8_lossy(payload).into_owned()),
                _ => {}
            }
        }
        buffer.drain(..consumed);
    }
    drop(sender);
    Err("SSE stream ended".into())
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// One gRPC subscriber: a `Subscribe` stream on a shared HTTP/2 connection.
async fn grpc_subscriber(
    ctx: Arc<Ctx>,
    i: usize,
    patterns: Vec<String>,
    channel: Channel,
    opening: Arc<Semaphore>,
) -> Result<(), String> {
    let permit = opening.acquire_owned().await.map_err(|e| e.to_string())?;
    let mut stream = PubSubClient::new(channel)
        .subscribe(SubscribeRequest {
            topics: patterns,
            ..Default::default()
        })
        .await
        .map_err(|s| format!("subscribe: {s}"))?
        .into_inner();
    let mut permit = Some(permit);
    while let Some(item) = stream.message().await.map_err(|s| format!("stream: {s}"))? {
        match item.event {
            Some(Event::Message(m)) => {
                let seq = m.cursor.ok_or("message without cursor")?.seq;
                ctx.deliver(i, seq, parse_stamp(&m.payload));
            }
            Some(Event::Subscribed(s)) => {
                ctx.subscribed(i, s.head.ok_or("subscribed without head")?.seq);
                permit.take();
            }
            Some(Event::Lag(_)) => {
                ctx.subs[i].lags.fetch_add(1, Relaxed);
            }
            Some(Event::Gap(_)) => {
                ctx.subs[i].gaps.fetch_add(1, Relaxed);
            }
            // Not asked for; not in cluster mode.
            Some(Event::Presence(_) | Event::Cluster(_)) | None => {}
        }
    }
    Err("gRPC stream ended".into())
}

/// `kB` field of `/proc/PID/status`, in MiB.
fn proc_status_mib(pid: u32, field: &str) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib / 1024.0)
}

fn open_fds(pid: u32) -> Option<usize> {
    Some(std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count())
}

/// The broker's PID: the process whose command line is `... serve ... --listen AUTHORITY`.
fn find_broker(authority: &str) -> Option<u32> {
    let me = std::process::id();
    std::fs::read_dir("/proc").ok()?.find_map(|entry| {
        let pid: u32 = entry.ok()?.file_name().to_str()?.parse().ok()?;
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        let serves = args.iter().any(|a| *a == b"serve");
        let listens = args
            .windows(2)
            .any(|w| w[0] == b"--listen" && w[1] == authority.as_bytes())
            || args
                .iter()
                .any(|a| *a == format!("--listen={authority}").as_bytes());
        (pid != me && serves && listens).then_some(pid)
    })
}

#[derive(Clone, Debug)]
struct Sample {
    /// Seconds since the soak started.
    t: f64,
    phase: u8,
    /// Seconds since publishing started (negative before).
    t_publish: f64,
    rss_mib: f64,
    fds: usize,
    subscribers: Option<u64>,
    head: Option<u64>,
    deliveries_per_s: f64,
    p99_ms: f64,
    soak_rss_mib: f64,
}

fn phase_name(phase: u8) -> &'static str {
    match phase {
        CONNECTING => "connect",
        PUBLISHING => "publish",
        DRAINING => "drain",
        _ => "done",
    }
}

async fn sampler(
    ctx: Arc<Ctx>,
    pid: u32,
    publish_started: Arc<OnceLock<Instant>>,
    samples: Arc<Mutex<Vec<Sample>>>,
) {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()
        .unwrap();
    let health_url = format!("{}/healthz", ctx.args.url.trim_end_matches('/'));
    let mut ticker = tokio::time::interval(Duration::from_secs(1));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_delivered = 0;
    let mut last_latency = ctx.latency.snapshot();
    let mut last_tick = Instant::now();
    println!(
        "{:>6} {:>6} {:>8} {:>8} {:>6} {:>6} {:>7} {:>9} {:>9} {:>9}",
        "t_s", "pub_s", "phase", "rss_MiB", "fds", "subs", "head", "deliv/s", "p99_ms", "soak_MiB"
    );
    loop {
        ticker.tick().await;
        let phase = ctx.phase.load(Relaxed);
        if phase == DONE {
            return;
        }
        let health: Option<serde_json::Value> = match http.get(&health_url).send().await {
            Ok(r) => r.json().await.ok(),
            Err(_) => None,
        };
        let now = Instant::now();
        let delivered = ctx.delivered.load(Relaxed);
        let latency = ctx.latency.snapshot();
        let window: Vec<u64> = latency
            .iter()
            .zip(last_latency.iter())
            .map(|(a, b)| a - b)
            .collect();
        let sample = Sample {
            t: start().elapsed().as_secs_f64(),
            phase,
            t_publish: publish_started
                .get()
                .map_or(-1.0, |s| now.duration_since(*s).as_secs_f64()),
            rss_mib: proc_status_mib(pid, "VmRSS").unwrap_or(f64::NAN),
            fds: open_fds(pid).unwrap_or(0),
            subscribers: health.as_ref().and_then(|h| h["subscribers"].as_u64()),
            head: health.as_ref().and_then(|h| h["head"].as_u64()),
            deliveries_per_s: (delivered - last_delivered) as f64
                / now.duration_since(last_tick).as_secs_f64(),
            p99_ms: Latency::quantile_ms(&window, 0.99),
            soak_rss_mib: proc_status_mib(std::process::id(), "VmRSS").unwrap_or(f64::NAN),
        };
        println!(
            "{:>6.0} {:>6} {:>8} {:>8.1} {:>6} {:>6} {:>7} {:>9.0} {:>9.1} {:>9.1}",
            sample.t,
            if sample.t_publish < 0.0 {
                "-".to_owned()
            } else {
                format!("{:.0}", sample.t_publish)
            },
            phase_name(phase),
            sample.rss_mib,
            sample.fds,
            sample.subscribers.map_or("?".into(), |s| s.to_string()),
            sample.head.map_or("?".into(), |s| s.to_string()),
            sample.deliveries_per_s,
            sample.p99_ms,
            sample.soak_rss_mib
        );
        samples.lock().unwrap().push(sample);
        last_delivered = delivered;
        last_latency = latency;
        last_tick = now;
    }
}

/// Least-squares slope of `(x, y)` points.
fn slope(points: &[(f64, f64)]) -> f64 {
    let n = points.len() as f64;
    if n < 2.0 {
        return 0.0;
    }
    let mean_x = points.iter().map(|p| p.0).sum::<f64>() / n;
    let mean_y = points.iter().map(|p| p.1).sum::<f64>() / n;
    let cov: f64 = points.iter().map(|p| (p.0 - mean_x) * (p.1 - mean_y)).sum();
    let var: f64 = points.iter().map(|p| (p.0 - mean_x).powi(2)).sum();
    if var == 0.0 { 0.0 } else { cov / var }
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    start();
    let args = Args::parse();
    anyhow::ensure!(
        args.payload_bytes > STAMP,
        "--payload-bytes must be over {STAMP}"
    );
    anyhow::ensure!(
        args.rate > 0 && args.seconds > 0,
        "--rate and --seconds must be positive"
    );
    let uri: http::Uri = args.url.parse()?;
    let authority = uri
        .authority()
        .ok_or_else(|| anyhow::anyhow!("--url needs host:port"))?
        .to_string();
    let pid = match args.broker_pid {
        Some(pid) => pid,
        None => find_broker(&authority).ok_or_else(|| {
            anyhow::anyhow!("no broker process listening on {authority} found; pass --broker-pid")
        })?,
    };
    anyhow::ensure!(
        proc_status_mib(pid, "VmRSS").is_some(),
        "cannot read /proc/{pid}/status"
    );
    let warmup = args.warmup_seconds.unwrap_or(30.min(args.seconds / 2));
    let n = args.subscribers;
    let sse: Vec<bool> = (0..n).map(|i| i % 100 < args.sse_percent).collect();
    let grpc_count = sse.iter().filter(|s| !**s).count();
    let connections = grpc_count.div_ceil(args.streams_per_connection.max(1));
    eprintln!(
        "soak: {n} subscribers ({} SSE connections, {grpc_count} gRPC streams over {connections} HTTP/2 connections), \
         {} msg/s x {} s over {TOPICS} topics, broker pid {pid}, warm-up {warmup} s",
        n - grpc_count,
        args.rate,
        args.seconds
    );

    let ctx = Arc::new(Ctx {
        authority,
        subs: (0..n).map(|_| SubStats::default()).collect(),
        subscribed: AtomicUsize::new(0),
        delivered: AtomicU64::new(0),
        latency: Latency::default(),
        ended_early: AtomicUsize::new(0),
        errors: Mutex::new(Vec::new()),
        phase: AtomicU8::new(CONNECTING),
        args: args.clone(),
    });
    let samples = Arc::new(Mutex::new(Vec::new()));
    let publish_started = Arc::new(OnceLock::new());
    let sampler_task = tokio::spawn(sampler(
        ctx.clone(),
        pid,
        publish_started.clone(),
        samples.clone(),
    ));
    // Let the first sample show the broker before any subscriber.
    tokio::time::sleep(Duration::from_millis(1100)).await;

    // 1. Subscribers.
    let endpoint = Endpoint::from_shared(args.url.clone())?
        .tcp_nodelay(true)
        .initial_connection_window_size(8 * 1024 * 1024)
        .connect_timeout(Duration::from_secs(10));
    let mut channels = Vec::with_capacity(connections);
    for _ in 0..connections {
        channels.push(endpoint.connect().await?);
    }
    if args.precreate_topics {
        let mut publisher = PubSubClient::new(endpoint.connect().await?);
        for topic in 0..TOPICS {
            publisher
                .publish(PublishRequest {
                    topic: topic_name(topic),
                    payload: format!("{:0width$}", now_us(), width = STAMP + 1).into(),
                    ..Default::default()
                })
                .await?;
        }
    }
    let opening = Arc::new(Semaphore::new(OPENING_CONCURRENCY));
    let mut tasks = tokio::task::JoinSet::new();
    let masks: Vec<u32> = (0..n).map(|i| assignment(i).1).collect();
    let connect_started = Instant::now();
    let mut grpc_index = 0;
    for (i, is_sse) in sse.iter().enumerate() {
        let (patterns, _) = assignment(i);
        let ctx = ctx.clone();
        let opening = opening.clone();
        if *is_sse {
            tasks.spawn(async move {
                if let Err(e) = sse_subscriber(ctx.clone(), i, patterns, opening).await {
                    ctx.failed(i, e);
                }
            });
        } else {
            let channel = channels[grpc_index / args.streams_per_connection.max(1)].clone();
            grpc_index += 1;
            tasks.spawn(async move {
                if let Err(e) = grpc_subscriber(ctx.clone(), i, patterns, channel, opening).await {
                    ctx.failed(i, e);
                }
            });
        }
    }
    let connect_deadline = Instant::now() + Duration::from_secs(60 + n as u64 / 100);
    while ctx.subscribed.load(Relaxed) < n {
        anyhow::ensure!(
            ctx.ended_early.load(Relaxed) == 0,
            "subscribers failed while opening: {:?}",
            ctx.errors.lock().unwrap()
        );
        anyhow::ensure!(
            Instant::now() < connect_deadline,
            "only {} of {n} subscribers were live after {:?}",
            ctx.subscribed.load(Relaxed),
            connect_started.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let connect_seconds = connect_started.elapsed().as_secs_f64();
    eprintln!("soak: {n} subscribers live after {connect_seconds:.1} s; publishing");

    // 2. Publish.
    let mut publisher = PubSubClient::new(endpoint.connect().await?);
    let _ = publish_started.set(Instant::now());
    ctx.phase.store(PUBLISHING, Relaxed);
    let mut ticker = tokio::time::interval(Duration::from_secs(1) / args.rate);
    let total = args.seconds * args.rate as u64;
    let mut log: Vec<(u64, usize)> = Vec::with_capacity(total as usize);
    let mut publish_errors = 0u64;
    let padding = "x".repeat(args.payload_bytes - STAMP);
    for k in 0..total {
        ticker.tick().await;
        let topic = (k as usize) % TOPICS;
        let payload = format!("{:0width$}{padding}", now_us(), width = STAMP);
        match publisher
            .publish(PublishRequest {
                topic: topic_name(topic),
                payload: payload.into(),
                ..Default::default()
            })
            .await
        {
            Ok(response) => {
                let seq = response.into_inner().cursor.map_or(0, |c| c.seq);
                log.push((seq, topic));
            }
            Err(status) => {
                publish_errors += 1;
                eprintln!("soak: publish failed: {status}");
            }
        }
    }
    let publish_seconds = publish_started.get().unwrap().elapsed().as_secs_f64();
    ctx.phase.store(DRAINING, Relaxed);

    // 3. Expected deliveries per subscriber: per topic, the published seqs and a suffix hash.
    let mut per_topic: Vec<Vec<u64>> = vec![Vec::new(); TOPICS];
    for (seq, topic) in &log {
        per_topic[*topic].push(*seq);
    }
    let suffix_hash: Vec<Vec<u64>> = per_topic
        .iter()
        .map(|seqs| {
            let mut out = vec![0u64; seqs.len() + 1];
            for j in (0..seqs.len()).rev() {
                out[j] = out[j + 1].wrapping_add(mix(seqs[j]));
            }
            out
        })
        .collect();
    let expected: Vec<(u64, u64)> = (0..n)
        .map(|i| {
            let head = ctx.subs[i].head.load(Relaxed);
            let (mut count, mut hash) = (0u64, 0u64);
            for (t, seqs) in per_topic.iter().enumerate() {
                if masks[i] & (1 << t) != 0 {
                    let from = seqs.partition_point(|s| *s <= head);
                    count += (seqs.len() - from) as u64;
                    hash = hash.wrapping_add(suffix_hash[t][from]);
                }
            }
            (count, hash)
        })
        .collect();
    let drain_started = Instant::now();
    let drain_deadline = drain_started + Duration::from_secs(30);
    loop {
        let behind = (0..n)
            .filter(|i| ctx.subs[*i].count.load(Relaxed) < expected[*i].0)
            .count();
        if behind == 0 || Instant::now() > drain_deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let drain_seconds = drain_started.elapsed().as_secs_f64();
    ctx.phase.store(DONE, Relaxed);
    let _ = sampler_task.await;
    tasks.abort_all();

    // 4. Verdict.
    let mut expected_total = 0u64;
    let mut delivered_total = 0u64;
    let mut losses = 0u64;
    let mut extra = 0u64;
    let mut mismatched = 0u64;
    let (mut out_of_order, mut lags, mut gaps) = (0u64, 0u64, 0u64);
    let mut examples: VecDeque<String> = VecDeque::new();
    for (i, (count, hash)) in expected.iter().enumerate() {
        let s = &ctx.subs[i];
        let got = s.count.load(Relaxed);
        expected_total += count;
        delivered_total += got;
        losses += count.saturating_sub(got);
        extra += got.saturating_sub(*count);
        out_of_order += s.out_of_order.load(Relaxed);
        lags += s.lags.load(Relaxed);
        gaps += s.gaps.load(Relaxed);
        if got != *count || s.hash.load(Relaxed) != *hash {
            mismatched += 1;
            if examples.len() < 5 {
                examples.push_back(format!(
                    "subscriber {i} ({}, {:?}): expected {count}, got {got}",
                    if sse[i] { "SSE" } else { "gRPC" },
                    assignment(i).0
                ));
            }
        }
    }
    let samples = samples.lock().unwrap().clone();
    let publishing: Vec<&Sample> = samples.iter().filter(|s| s.phase == PUBLISHING).collect();
    let rss_idle = samples.first().map_or(f64::NAN, |s| s.rss_mib);
    let rss_start = publishing.first().map_or(f64::NAN, |s| s.rss_mib);
    let warm = publishing
        .iter()
        .find(|s| s.t_publish >= warmup as f64)
        .or(publishing.last())
        .map_or(f64::NAN, |s| s.rss_mib);
    let rss_end = publishing.last().map_or(f64::NAN, |s| s.rss_mib);
    let rss_min = publishing
        .iter()
        .map(|s| s.rss_mib)
        .fold(f64::INFINITY, f64::min);
    let rss_max = publishing.iter().map(|s| s.rss_mib).fold(0.0, f64::max);
    let after_warmup: Vec<(f64, f64)> = publishing
        .iter()
        .filter(|s| s.t_publish >= warmup as f64)
        .map(|s| (s.t_publish / 60.0, s.rss_mib))
        .collect();
    let slope_mib_per_min = slope(&after_warmup);
    let growth_percent = (rss_end - warm) / warm * 100.0;
    let fds_max = samples.iter().map(|s| s.fds).max().unwrap_or(0);
    let latency = ctx.latency.snapshot();
    let ended_early = ctx.ended_early.load(Relaxed);
    let rss_ok = growth_percent <= args.max_rss_growth_percent;
    let pass = losses == 0
        && extra == 0
        && mismatched == 0
        && out_of_order == 0
        && ended_early == 0
        && publish_errors == 0
        && rss_ok;
    let summary = serde_json::json!({
        "pass": pass,
        "subscribers": n,
        "sse_subscribers": n - grpc_count,
        "grpc_subscribers": grpc_count,
        "grpc_connections": connections,
        "topics": TOPICS,
        "rate_per_s": args.rate,
        "payload_bytes": args.payload_bytes,
        "precreate_topics": args.precreate_topics,
        "seconds": args.seconds,
        "connect_seconds": round2(connect_seconds),
        "publish_seconds": round2(publish_seconds),
        "drain_seconds": round2(drain_seconds),
        "published": log.len(),
        "publish_errors": publish_errors,
        "deliveries_expected": expected_total,
        "deliveries": delivered_total,
        "losses": losses,
        "extra": extra,
        "subscribers_mismatched": mismatched,
        "out_of_order": out_of_order,
        "lag_events": lags,
        "gap_events": gaps,
        "ended_early": ended_early,
        "latency_ms": {
            "p50_le": Latency::quantile_ms(&latency, 0.50),
            "p99_le": Latency::quantile_ms(&latency, 0.99),
            "p999_le": Latency::quantile_ms(&latency, 0.999),
            "max": round2(ctx.latency.max_us.load(Relaxed) as f64 / 1e3),
        },
        "rss_mib": {
            "idle": round2(rss_idle),
            "start": round2(rss_start),
            "warm": round2(warm),
            "min": round2(rss_min),
            "max": round2(rss_max),
            "end": round2(rss_end),
        },
        "warmup_seconds": warmup,
        "rss_growth_percent": round2(growth_percent),
        "max_rss_growth_percent": args.max_rss_growth_percent,
        "rss_slope_mib_per_min": round2(slope_mib_per_min),
        "broker_fds_max": fds_max,
    });
    for e in ctx.errors.lock().unwrap().iter() {
        eprintln!("soak: {e}");
    }
    for e in &examples {
        eprintln!("soak: {e}");
    }
    if !rss_ok {
        eprintln!(
            "soak: broker RSS grew {growth_percent:.1} % after the warm-up ({warm:.1} -> {rss_end:.1} MiB), over {} %",
            args.max_rss_growth_percent
        );
    }
    let line = serde_json::to_string(&summary)?;
    println!("SUMMARY {line}");
    if let Some(path) = &args.summary {
        std::fs::write(path, serde_json::to_string_pretty(&summary)? + "\n")?;
    }
    eprintln!("soak: {}", if pass { "PASS" } else { "FAIL" });
    std::process::exit(if pass { 0 } else { 1 });
}

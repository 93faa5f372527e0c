//! The scenarios, each measured by one client program against one running server.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::task::JoinSet;
use tokio::time::{Instant, MissedTickBehavior, sleep, timeout};

use crate::clients::{Publisher, Target, multiplexed, subscriber};
use crate::stats::{Client, CpuWindow, Histogram, Sink, pss_kib, stamped_payload};

/// Named figures of one run, e.g. `deliveries_per_s`.
pub type Figures = BTreeMap<String, f64>;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Scenario {
    /// Unary publish: `--concurrency` connections, each publishing and waiting for the ack.
    Publish,
    /// One subscriber, `--e2e-rate` messages/s: publish -> deliver latency.
    E2e,
    /// `--subscribers` on one topic, closed loop (at most `--window` messages not yet at every
    /// subscriber): deliveries/s and server CPU per delivery.
    Fanout,
    /// `--subscribers` on one topic at `--rate` messages/s: publish -> deliver latency.
    Rate,
    /// `--idle-subscribers` idle subscribers: server memory (PSS) per subscriber.
    Idle,
    /// Opens idle subscribers until one fails or `--max-idle` are held.
    MaxIdle,
}

#[derive(Clone, Debug, clap::Args)]
pub struct Params {
    /// Measured seconds per run.
    #[arg(long, default_value_t = 5.0)]
    pub seconds: f64,
    /// Seconds of load before measuring.
    #[arg(long, default_value_t = 1.0)]
    pub warmup: f64,
    /// Payload bytes.
    #[arg(long, default_value_t = 256)]
    pub payload: usize,
    /// Subscribers of the fan-out and rate scenarios.
    #[arg(long, default_value_t = 1000)]
    pub subscribers: usize,
    /// Messages not yet delivered to every subscriber, at most (fan-out).
    #[arg(long, default_value_t = 1)]
    pub window: usize,
    /// Messages per second (rate scenario).
    #[arg(long, default_value_t = 20.0)]
    pub rate: f64,
    /// Messages per second (e2e scenario).
    #[arg(long, default_value_t = 1000.0)]
    pub e2e_rate: f64,
    /// Concurrent publishing connections (publish scenario).
    #[arg(long, default_value_t = 16)]
    pub concurrency: usize,
    /// Subscribers of the idle-memory scenario.
    #[arg(long, default_value_t = 5000)]
    pub idle_subscribers: usize,
    /// Upper bound of the max-idle scenario.
    #[arg(long, default_value_t = 100_000)]
    pub max_idle: usize,
    /// Streams per HTTP/2 connection (topichub-sse-h2, topichub-grpc-mux).
    #[arg(long, default_value_t = 100)]
    pub streams_per_connection: usize,
    /// Messages retained before the broker is killed (restart scenario).
    #[arg(long, default_value_t = 1_000_000)]
    pub restart_messages: usize,
    /// Subscribe streams of the storm scenario, one point each (each on a fresh server).
    #[arg(long, value_delimiter = ',', default_values_t = [100_000usize, 200_000])]
    pub storm_streams: Vec<usize>,
    /// HTTP/2 connections the storm's streams share.
    #[arg(long, default_value_t = 100)]
    pub storm_connections: usize,
    /// Wildcard subscriptions matching nothing published, one point each (wildcards scenario,
    /// each on a fresh server).
    #[arg(long, value_delimiter = ',', default_values_t = [0usize, 1000, 10_000])]
    pub wildcard_subscriptions: Vec<usize>,
    /// Publishes at each point of the wildcards scenario, each to a topic that did not exist.
    #[arg(long, default_value_t = 100_000)]
    pub wildcard_topics: usize,
    /// Topics held at each point of the topics scenario (one server, filled in steps).
    #[arg(long, value_delimiter = ',', default_values_t = [0usize, 100_000, 1_000_000])]
    pub topic_counts: Vec<usize>,
    /// The topics scenario's broker's `--retain-age`, in seconds: long enough to fill and
    /// measure every step, after which the topics expire while the probe publishes.
    #[arg(long, default_value_t = 60.0)]
    pub topics_retain_age: f64,
    /// Subscribers of the cluster scenario, spread over the nodes that do not publish.
    #[arg(long, default_value_t = 1000)]
    pub cluster_subscribers: usize,
    /// Replicas of the JetStream stream in the cluster scenario (topichub's `--nats-replicas`
    /// and the JetStream-alone stream's alike).
    #[arg(long, default_value_t = 1)]
    pub cluster_replicas: usize,
    /// Publishes per second of the latency probe (storm and topics scenarios), each to a topic
    /// of its own, from a thread of its own.
    #[arg(long, default_value_t = 1000.0)]
    pub probe_rate: f64,
}

const TOPIC: &str = "bench.fanout";
/// Subscriptions being opened at once.
const OPENING: usize = 200;

pub async fn run(
    scenario: Scenario,
    target: Target,
    addr: SocketAddr,
    pid: u32,
    p: &Params,
) -> anyhow::Result<Figures> {
    match scenario {
        Scenario::Publish => publish(target, addr, Some(pid), p).await,
        Scenario::E2e => latency(target, addr, 1, p.e2e_rate, p).await,
        Scenario::Rate => latency(target, addr, p.subscribers, p.rate, p).await,
        Scenario::Fanout => fanout(target, addr, &[addr], &[pid], p).await,
        Scenario::Idle => idle(target, addr, pid, p.idle_subscribers, p).await,
        Scenario::MaxIdle => max_idle(target, addr, pid, p).await,
    }
}

/// Subscribers of one run; aborted when dropped.
struct Subscribers {
    sink: Arc<Sink>,
    tasks: JoinSet<()>,
    opened: usize,
}

impl Subscribers {
    fn new() -> Self {
        Subscribers {
            sink: Arc::new(Sink::new()),
            tasks: JoinSet::new(),
            opened: 0,
        }
    }

    /// Opens `n` more subscribers and waits until they are live.
    async fn open(
        &mut self,
        target: Target,
        addr: SocketAddr,
        n: usize,
        p: &Params,
    ) -> anyhow::Result<()> {
        self.open_across(target, &[addr], n, p).await
    }

    /// Opens `n` more subscribers, each at the next of `addrs` in turn (the nodes of a
    /// cluster), and waits until they are live.
    async fn open_across(
        &mut self,
        target: Target,
        addrs: &[SocketAddr],
        n: usize,
        p: &Params,
    ) -> anyhow::Result<()> {
        anyhow::ensure!(!addrs.is_empty(), "no server to subscribe at");
        let want = self.opened + n;
        if matches!(target, Target::SseH2 | Target::GrpcMux | Target::SeedMux) {
            let mut left = n;
            while left > 0 {
                let count = left.min(p.streams_per_connection);
                self.tasks.spawn(multiplexed(
                    target,
                    addrs[self.tasks.len() % addrs.len()],
                    TOPIC.into(),
                    count,
                    self.sink.clone(),
                ));
                self.opened += count;
                left -= count;
                if self.opened % (OPENING * 10) < count {
                    self.sink
                        .wait_ready(self.opened, Duration::from_secs(60))
                        .await?;
                }
            }
        } else {
            for _ in 0..n {
                let addr = addrs[self.opened % addrs.len()];
                self.tasks
                    .spawn(subscriber(target, addr, TOPIC.into(), self.sink.clone()));
                self.opened += 1;
                if self.opened.is_multiple_of(OPENING) {
                    self.sink
                        .wait_ready(self.opened, Duration::from_secs(60))
                        .await?;
                }
            }
        }
        self.sink.wait_ready(want, Duration::from_secs(60)).await
    }

    fn check(&self) -> anyhow::Result<()> {
        match self.sink.first_failure() {
            Some(failure) => bail!("subscriber failed: {failure}"),
            None => Ok(()),
        }
    }
}

/// Publishes one message and waits until `expected` deliveries in all have arrived.
async fn deliver_one(
    target: Target,
    addr: SocketAddr,
    subs: &Subscribers,
    expected: u64,
    p: &Params,
) -> anyhow::Result<()> {
    let mut publisher = Publisher::connect(target, addr).await?;
    publisher
        .publish(TOPIC, stamped_payload(p.payload), true)
        .await?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while subs.sink.delivered.load(Relaxed) < expected {
        subs.check()?;
        if Instant::now() > deadline {
            bail!(
                "{} of {expected} deliveries after 60 s",
                subs.sink.delivered.load(Relaxed)
            );
        }
        sleep(Duration::from_millis(10)).await;
    }
    Ok(())
}

/// [`closed_loop`] with `--concurrency` publishers, a connection each; `pid` is the server's.
pub async fn publish(
    target: Target,
    addr: SocketAddr,
    pid: Option<u32>,
    p: &Params,
) -> anyhow::Result<Figures> {
    let mut publishers = Vec::with_capacity(p.concurrency);
    for _ in 0..p.concurrency {
        publishers.push(Publisher::connect(target, addr).await?);
    }
    closed_loop(publishers, pid, p).await
}

/// Each of `publishers` publishing in a loop, awaiting each acknowledgement: publishes/s and
/// publish -> ack latency over the measured seconds, and with the server's `pid` the CPU
/// figures ([`crate::stats::CpuUse::figures`]) per publish.
pub async fn closed_loop(
    publishers: Vec<Publisher>,
    pid: Option<u32>,
    p: &Params,
) -> anyhow::Result<Figures> {
    let latency = Arc::new(Histogram::new());
    let done = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut workers = JoinSet::new();
    for mut publisher in publishers {
        let (latency, done, stop, size) = (latency.clone(), done.clone(), stop.clone(), p.payload);
        workers.spawn(async move {
            while !stop.load(Relaxed) {
                let started = Instant::now();
                publisher
                    .publish(TOPIC, stamped_payload(size), true)
                    .await?;
                latency.record(started.elapsed().as_micros() as u64);
                done.fetch_add(1, Relaxed);
            }
            anyhow::Ok(())
        });
    }
    sleep(Duration::from_secs_f64(p.warmup)).await;
    latency.reset();
    let window = CpuWindow::over(pid.as_slice(), Client::This);
    let (start, before) = (Instant::now(), done.load(Relaxed));
    sleep(Duration::from_secs_f64(p.seconds)).await;
    let (elapsed, after) = (start.elapsed().as_secs_f64(), done.load(Relaxed));
    let used = window.finish();
    stop.store(true, Relaxed);
    while let Some(result) = workers.join_next().await {
        result??;
    }
    let mut figures = Figures::from([
        ("publish_per_s".into(), (after - before) as f64 / elapsed),
        (
            "publish_p50_ms".into(),
            latency.quantile_ms(0.5).unwrap_or(0.0),
        ),
        (
            "publish_p99_ms".into(),
            latency.quantile_ms(0.99).unwrap_or(0.0),
        ),
    ]);
    if pid.is_some() {
        figures.extend(used.figures("publish", (after - before) as f64));
    }
    Ok(figures)
}

/// `subscribers` subscribers, messages at `rate`/s for the measured seconds: latency quantiles.
async fn latency(
    target: Target,
    addr: SocketAddr,
    subscribers: usize,
    rate: f64,
    p: &Params,
) -> anyhow::Result<Figures> {
    latency_across(target, addr, &[addr], subscribers, rate, p).await
}

/// [`latency`] with the publisher at `publish` and the subscribers spread over `subscribe`.
pub async fn latency_across(
    target: Target,
    publish: SocketAddr,
    subscribe: &[SocketAddr],
    subscribers: usize,
    rate: f64,
    p: &Params,
) -> anyhow::Result<Figures> {
    let mut subs = Subscribers::new();
    subs.open_across(target, subscribe, subscribers, p).await?;
    let mut publisher = Publisher::connect(target, publish).await?;
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
    tick.set_missed_tick_behavior(MissedTickBehavior::Burst);
    let warmup_end = Instant::now() + Duration::from_secs_f64(p.warmup);
    let end = warmup_end + Duration::from_secs_f64(p.seconds);
    let mut published = 0u64;
    let mut recorded_from = 0u64;
    loop {
        let now = tick.tick().await;
        if now >= end {
            break;
        }
        if now >= warmup_end && !subs.sink.recording.load(Relaxed) {
            subs.sink.recording.store(true, Relaxed);
            recorded_from = published;
        }
        publisher
            .publish(TOPIC, stamped_payload(p.payload), false)
            .await?;
        published += 1;
        subs.check()?;
    }
    // Everything published must arrive, and soon.
    let expected = published * subscribers as u64;
    let deadline = Instant::now() + Duration::from_secs(10);
    while subs.sink.delivered.load(Relaxed) < expected && Instant::now() < deadline {
        sleep(Duration::from_millis(5)).await;
    }
    subs.check()?;
    let delivered = subs.sink.delivered.load(Relaxed);
    let recorded = subs.sink.latency.count();
    Ok(Figures::from([
        (
            "p50_ms".into(),
            subs.sink
                .latency
                .quantile_ms(0.5)
                .context("no latency recorded")?,
        ),
        (
            "p99_ms".into(),
            subs.sink.latency.quantile_ms(0.99).unwrap_or(0.0),
        ),
        (
            "max_ms".into(),
            subs.sink.latency.quantile_ms(1.0).unwrap_or(0.0),
        ),
        (
            "messages_per_s".into(),
            (published - recorded_from) as f64 / p.seconds,
        ),
        ("lost".into(), expected.saturating_sub(delivered) as f64),
        ("recorded".into(), recorded as f64),
    ]))
}

/// The fan-out closed loop, publishing at `publish` to subscribers spread over `subscribe`; the
/// server CPU is that of every process in `pids` (the nodes of a cluster).
pub async fn fanout(
    target: Target,
    publish: SocketAddr,
    subscribe: &[SocketAddr],
    pids: &[u32],
    p: &Params,
) -> anyhow::Result<Figures> {
    let mut subs = Subscribers::new();
    subs.sink.per_message.store(p.subscribers as u64, Relaxed);
    subs.open_across(target, subscribe, p.subscribers, p)
        .await?;
    let mut publisher = Publisher::connect(target, publish).await?;
    let sink = subs.sink.clone();
    let stop = Arc::new(AtomicBool::new(false));
    let published = Arc::new(AtomicU64::new(0));
    let (window, size, per) = (p.window as u64, p.payload, p.subscribers as u64);
    let publishing = tokio::spawn({
        let (stop, published) = (stop.clone(), published.clone());
        async move {
            while !stop.load(Relaxed) {
                publisher
                    .publish(TOPIC, stamped_payload(size), false)
                    .await?;
                let n = published.fetch_add(1, Relaxed) + 1;
                loop {
                    let progressed = sink.progress.notified();
                    if n < window + sink.delivered.load(Relaxed) / per {
                        break;
                    }
                    if timeout(Duration::from_secs(5), progressed).await.is_err() {
                        bail!(
                            "no progress for 5 s: {n} published, {} delivered to {per}",
                            sink.delivered.load(Relaxed)
                        );
                    }
                }
            }
            anyhow::Ok(())
        }
    });
    sleep(Duration::from_secs_f64(p.warmup)).await;
    let window = CpuWindow::over(pids, Client::This);
    let (start, delivered0, published0) = (
        Instant::now(),
        subs.sink.delivered.load(Relaxed),
        published.load(Relaxed),
    );
    sleep(Duration::from_secs_f64(p.seconds)).await;
    let (elapsed, delivered1, published1) = (
        start.elapsed().as_secs_f64(),
        subs.sink.delivered.load(Relaxed),
        published.load(Relaxed),
    );
    let used = window.finish();
    stop.store(true, Relaxed);
    if publishing.is_finished() {
        publishing.await??;
    } else {
        publishing.abort();
    }
    subs.check()?;
    let deliveries = (delivered1 - delivered0) as f64;
    if deliveries == 0.0 {
        bail!("no deliveries");
    }
    let mut figures = Figures::from([
        ("deliveries_per_s".into(), deliveries / elapsed),
        (
            "messages_per_s".into(),
            (published1 - published0) as f64 / elapsed,
        ),
    ]);
    figures.extend(used.figures("delivery", deliveries));
    Ok(figures)
}

async fn idle(
    target: Target,
    addr: SocketAddr,
    pid: u32,
    n: usize,
    p: &Params,
) -> anyhow::Result<Figures> {
    // The topic exists and the server has served a publish before the baseline.
    let mut warm = Subscribers::new();
    warm.open(target, addr, 1, p).await?;
    deliver_one(target, addr, &warm, 1, p).await?;
    settle().await;
    let before = pss_kib(pid);
    let mut subs = Subscribers::new();
    subs.open(target, addr, n, p).await?;
    // Each has received one message: buffers a live subscriber needs are allocated.
    deliver_one(target, addr, &subs, n as u64, p).await?;
    settle().await;
    let after = pss_kib(pid);
    Ok(Figures::from([
        ("subscribers".into(), n as f64),
        ("pss_before_mib".into(), before / 1024.0),
        ("pss_after_mib".into(), after / 1024.0),
        ("kib_per_subscriber".into(), (after - before) / n as f64),
    ]))
}

async fn max_idle(
    target: Target,
    addr: SocketAddr,
    pid: u32,
    p: &Params,
) -> anyhow::Result<Figures> {
    let before = pss_kib(pid);
    let mut subs = Subscribers::new();
    let step = 1000.min(p.max_idle);
    // One socket per subscriber in this process too: stop short of its open-file limit, or it
    // could no longer read the server's memory from /proc.
    let limit = rlimit_nofile();
    let budget = if matches!(target, Target::SseH2 | Target::GrpcMux | Target::SeedMux) {
        p.max_idle
    } else {
        p.max_idle.min((limit as usize).saturating_sub(200))
    };
    while subs.opened < budget {
        let n = step.min(budget - subs.opened);
        if let Err(e) = subs.open(target, addr, n, p).await {
            eprint!("[stopped: {e:#}] ");
            break;
        }
    }
    settle().await;
    let held = subs.sink.ready.load(Relaxed);
    // Held means live: every one of them gets the next message. (The subscribers left room
    // for this connection.)
    let mut publisher = Publisher::connect(target, addr).await?;
    publisher
        .publish(TOPIC, stamped_payload(p.payload), true)
        .await?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while subs.sink.delivered.load(Relaxed) < held as u64 && Instant::now() < deadline {
        sleep(Duration::from_millis(10)).await;
    }
    let live = subs.sink.delivered.load(Relaxed);
    settle().await;
    let after = pss_kib(pid);
    Ok(Figures::from([
        ("held".into(), held as f64),
        ("held_live".into(), live as f64),
        ("pss_mib".into(), after / 1024.0),
        (
            "kib_per_subscriber".into(),
            (after - before) / held.max(1) as f64,
        ),
        ("open_files_limit".into(), limit),
    ]))
}

/// This process's open-file limit (the broker's is the same: it inherits it).
fn rlimit_nofile() -> f64 {
    std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|l| {
            l.lines()
                .find(|l| l.starts_with("Max open files"))?
                .split_whitespace()
                .nth(3)?
                .parse()
                .ok()
        })
        .unwrap_or(0.0)
}

/// Lets the server finish what it is doing before memory is read.
async fn settle() {
    sleep(Duration::from_millis(500)).await;
}

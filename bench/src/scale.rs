//! Scale scenarios: costs that must grow linearly, or not at all, with the number of streams,
//! wildcard subscriptions or topics. Each starts its own server(s) (a fresh one per point where
//! points must not share state) and reports one figure per point, named `..._at_{n}`.
//!
//! A latency probe publishes on a thread (and runtime) of its own at `--probe-rate`, so that a
//! storm the client itself is busy with (dropping 200k streams) does not delay the probe's
//! publishes. Its latency is taken from each publish's scheduled time, not from when it was
//! sent: a publish the broker held back also delays the ones scheduled after it, and those
//! count as late too.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use bytes::Bytes;
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::{Instant, MissedTickBehavior, sleep};
use topichub::proto::v1::pub_sub_client::PubSubClient;
use topichub::proto::v1::subscribe_response::Event;

use crate::clients::{Publisher, Target, grpc_frame, subscribe_stream};
use crate::scenarios::{Figures, Params};
use crate::servers::{Launch, Server};
use crate::stats::{CpuWindow, Histogram, Sink, now_us, rss_kib, stamped_payload};

const STORM_TOPIC: &str = "bench.storm";
const PROBE_TOPIC: &str = "bench.probe";
/// Patterns per wildcard Subscribe call: the broker's default `--max-topics-per-subscription`.
const PATTERNS_PER_STREAM: usize = 100;
/// Payload of each message that creates a topic in the topics scenario.
const TOPIC_PAYLOAD: usize = 64;

/// Runs `point` once per value of `points`, each on a freshly started server with a client
/// runtime of its own, and merges the figures.
fn per_point(
    target: Target,
    launch: &Launch,
    points: &[usize],
    mut point: impl AsyncFnMut(SocketAddr, u32, usize) -> anyhow::Result<Figures>,
) -> anyhow::Result<Figures> {
    let mut figures = Figures::new();
    for &n in points {
        let server = Server::start(target.kind(), launch)?;
        let runtime = crate::client_runtime()?;
        let result = runtime.block_on(point(server.addr, server.pid(), n));
        runtime.shutdown_timeout(Duration::from_secs(2));
        drop(server);
        figures.extend(result.with_context(|| format!("at {n}"))?);
    }
    Ok(figures)
}

/// `name_at_{n}`: a figure of one point.
fn at(name: &str, n: usize) -> String {
    format!("{name}_at_{n}")
}

/// The figure at the last point over the figure at the first: how a cost grew.
fn growth(figures: &mut Figures, name: &str, points: &[usize]) {
    let (Some(&first), Some(&last)) = (points.first(), points.last()) else {
        return;
    };
    if first == last {
        return;
    }
    if let (Some(a), Some(b)) = (figures.get(&at(name, first)), figures.get(&at(name, last)))
        && *a > 0.0
    {
        let ratio = b / a;
        figures.insert(format!("{name}_growth"), ratio);
    }
}

/// Publishes to one topic at a fixed rate from a thread of its own, recording each publish's
/// latency (from its scheduled time to its acknowledgement) into the histogram of the phase
/// its scheduled time falls in, or nowhere between phases.
struct Probe {
    shared: Arc<ProbeShared>,
    rate: f64,
    thread: Option<std::thread::JoinHandle<anyhow::Result<()>>>,
}

struct ProbeShared {
    /// Per phase: when it began and ended (`now_us`; `u64::MAX` for not yet).
    phases: Vec<(AtomicU64, AtomicU64)>,
    histograms: Vec<Histogram>,
    /// The phase under way, if any.
    current: AtomicUsize,
    /// The scheduled time of the newest publish acknowledged.
    done_until: AtomicU64,
    stop: AtomicBool,
}

impl ProbeShared {
    fn phase_of(&self, scheduled_us: u64) -> Option<usize> {
        self.phases.iter().position(|(start, end)| {
            (start.load(Relaxed)..end.load(Relaxed)).contains(&scheduled_us)
        })
    }
}

const NO_PHASE: usize = usize::MAX;

impl Probe {
    fn start(
        target: Target,
        addr: SocketAddr,
        rate: f64,
        payload: usize,
        phases: usize,
    ) -> anyhow::Result<Probe> {
        ensure!(rate > 0.0, "--probe-rate must be positive");
        let shared = Arc::new(ProbeShared {
            phases: (0..phases)
                .map(|_| (AtomicU64::new(u64::MAX), AtomicU64::new(u64::MAX)))
                .collect(),
            histograms: (0..phases).map(|_| Histogram::new()).collect(),
            current: AtomicUsize::new(NO_PHASE),
            done_until: AtomicU64::new(0),
            stop: AtomicBool::new(false),
        });
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = std::thread::spawn({
            let shared = shared.clone();
            move || {
                crate::client_runtime()?.block_on(async move {
                    let connected = async {
                        let mut publisher = Publisher::connect(target, addr).await?;
                        // The first publish on a connection is slower; not a figure.
                        publisher
                            .publish(PROBE_TOPIC, stamped_payload(payload), true)
                            .await?;
                        anyhow::Ok(publisher)
                    };
                    let mut publisher = match connected.await {
                        Ok(publisher) => {
                            let _ = ready_tx.send(Ok(()));
                            publisher
                        }
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                            return Ok(());
                        }
                    };
                    // Burst: publishes a stall held back go out at once afterwards, each
                    // counting its lateness from its own scheduled time.
                    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
                    tick.set_missed_tick_behavior(MissedTickBehavior::Burst);
                    while !shared.stop.load(Relaxed) {
                        let scheduled = tick.tick().await;
                        let scheduled_us =
                            now_us().saturating_sub(scheduled.elapsed().as_micros() as u64);
                        publisher
                            .publish(PROBE_TOPIC, stamped_payload(payload), true)
                            .await?;
                        if let Some(phase) = shared.phase_of(scheduled_us) {
                            shared.histograms[phase].record(scheduled.elapsed().as_micros() as u64);
                        }
                        shared.done_until.store(scheduled_us, Relaxed);
                    }
                    anyhow::Ok(())
                })
            }
        });
        ready_rx
            .recv()
            .context("the probe publisher's thread ended")??;
        Ok(Probe {
            shared,
            rate,
            thread: Some(thread),
        })
    }

    fn record(&self, phase: usize) {
        let (start, end) = &self.shared.phases[phase];
        end.store(u64::MAX, Relaxed);
        start.store(now_us(), Relaxed);
        self.shared.current.store(phase, Relaxed);
    }

    fn pause(&self) {
        let phase = self.shared.current.swap(NO_PHASE, Relaxed);
        if let Some((_, end)) = self.shared.phases.get(phase) {
            end.store(now_us(), Relaxed);
        }
    }

    /// Waits until the probe is on time again (its newest publish scheduled at most two
    /// intervals ago) after a stall held it back, so that its lateness does not spill into the
    /// next phase; at most 10 s (a probe slower than its rate is never on time).
    async fn catch_up(&self) {
        let slack = (2.0 * 1e6 / self.rate) as u64;
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.shared.done_until.load(Relaxed) + slack < now_us() && Instant::now() < deadline {
            sleep(Duration::from_millis(5)).await;
        }
    }

    /// p99 and max (ms) and the publishes recorded in `phase`, once every publish scheduled
    /// in it is done.
    async fn figures(&self, phase: usize) -> (f64, f64, f64) {
        let end = self.shared.phases[phase].1.load(Relaxed);
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.shared.done_until.load(Relaxed) < end && Instant::now() < deadline {
            sleep(Duration::from_millis(5)).await;
        }
        let h = &self.shared.histograms[phase];
        (
            h.quantile_ms(0.99).unwrap_or(0.0),
            h.quantile_ms(1.0).unwrap_or(0.0),
            h.count() as f64,
        )
    }

    /// Stops the probe; fails if one of its publishes failed.
    fn finish(mut self) -> anyhow::Result<()> {
        self.shared.stop.store(true, Relaxed);
        match self.thread.take().map(|t| t.join()) {
            Some(Ok(result)) => result.context("probe publisher"),
            Some(Err(_)) => bail!("the probe publisher panicked"),
            None => Ok(()),
        }
    }
}

impl Drop for Probe {
    fn drop(&mut self) {
        self.shared.stop.store(true, Relaxed);
    }
}

/// GET requests on one HTTP/1.1 keep-alive connection: `/healthz` and `/metrics`. The broker
/// closes a keep-alive connection idle for `--http-header-timeout` (10 s), as while a million
/// topics are filled; the next request then opens a new one.
pub struct Http {
    sender: http1::SendRequest<Empty<Bytes>>,
    addr: SocketAddr,
}

impl Http {
    pub async fn connect(addr: SocketAddr) -> anyhow::Result<Http> {
        Ok(Http {
            sender: Self::open(addr).await?,
            addr,
        })
    }

    async fn open(addr: SocketAddr) -> anyhow::Result<http1::SendRequest<Empty<Bytes>>> {
        let stream = tokio::net::TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let (sender, connection) = http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(connection);
        Ok(sender)
    }

    pub async fn get(&mut self, path: &str) -> anyhow::Result<Bytes> {
        match self.try_get(path).await {
            Ok(body) => Ok(body),
            // The broker closed the idle connection (perhaps just as the request went out):
            // a GET is safe to send again, on a new connection.
            Err(_) => {
                self.sender = Self::open(self.addr).await?;
                self.try_get(path).await
            }
        }
    }

    async fn try_get(&mut self, path: &str) -> anyhow::Result<Bytes> {
        let request = http::Request::get(path)
            .header("host", self.addr.to_string())
            .body(Empty::new())?;
        self.sender.ready().await?;
        let response = self.sender.send_request(request).await?;
        let status = response.status();
        let body = response.into_body().collect().await?.to_bytes();
        ensure!(status.is_success(), "GET {path} answered {status}");
        Ok(body)
    }

    /// Live subscriptions of one topic, from its presence page: O(log n) at the broker, where
    /// `/healthz` and `/metrics` walk every subscription and topic under the hub's lock, which
    /// would stall the very publishes the probe measures.
    async fn subscribers(&mut self, topic: &str) -> anyhow::Result<u64> {
        let page: serde_json::Value = serde_json::from_slice(
            &self
                .get(&format!("/topics/{topic}/presence?limit=1"))
                .await?,
        )?;
        page["subscribers"]
            .as_u64()
            .context("no `subscribers` in the presence page")
    }

    /// Whether `topic` still retains a message (one topic's history: no walk of the others).
    async fn retains(&mut self, topic: &str) -> anyhow::Result<bool> {
        let page: serde_json::Value = serde_json::from_slice(
            &self
                .get(&format!("/topics/{topic}/messages?limit=1"))
                .await?,
        )?;
        let messages = page["messages"]
            .as_array()
            .context("no `messages` in the history page")?;
        Ok(!messages.is_empty())
    }

    /// One unlabelled gauge or counter from `/metrics`, e.g. `topichub_topics`. The broker
    /// walks every topic for it: not while the probe records.
    async fn metric(&mut self, name: &str) -> anyhow::Result<f64> {
        let text = self.get("/metrics").await?;
        let text = std::str::from_utf8(&text)?;
        text.lines()
            .find_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
            .and_then(|value| value.trim().parse().ok())
            .with_context(|| format!("no {name} in /metrics"))
    }
}

/// `--storm-streams` Subscribe streams on one topic over `--storm-connections` HTTP/2
/// connections, per point on a fresh server: the time until each has its first response
/// (the `subscribed` event), then the time until the broker holds none of them after the
/// client closes every connection at once, with the probe's publish latency during both.
pub fn storm(target: Target, launch: &Launch, p: &Params) -> anyhow::Result<Figures> {
    ensure!(
        matches!(target, Target::GrpcMux | Target::H2Floor),
        "the storm runs on topichub-grpc-mux (and on h2-floor, hyper and h2 alone)"
    );
    let points = &p.storm_streams;
    let mut figures = per_point(target, launch, points, async |addr, pid, n| {
        let count = if target == Target::H2Floor {
            StreamCount::Floor(FloorStreams::connect(addr).await?)
        } else {
            StreamCount::Broker(Http::connect(addr).await?)
        };
        storm_point(addr, pid, n, count, p).await
    })?;
    growth(&mut figures, "subscribe_s", points);
    growth(&mut figures, "unsubscribe_s", points);
    if let (Some(first), Some(last)) = (points.first(), points.last()) {
        figures.insert("streams_growth".into(), *last as f64 / *first as f64);
    }
    Ok(figures)
}

/// One connection's streams: the connection's task (aborting it closes the socket) and the
/// task that opened the streams and holds their response bodies.
struct StormConnection {
    connection: JoinHandle<()>,
    streams: JoinHandle<()>,
}

impl StormConnection {
    async fn open(
        addr: SocketAddr,
        count: usize,
        request: Bytes,
        sink: Arc<Sink>,
    ) -> anyhow::Result<StormConnection> {
        let stream = tokio::net::TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let (sender, connection) = http2::Builder::new(TokioExecutor::new())
            .initial_stream_window_size(16 * 1024)
            .handshake(TokioIo::new(stream))
            .await?;
        let connection = tokio::spawn(async move {
            let _ = connection.await;
        });
        let uri = format!("http://{addr}/topichub.v1.PubSub/Subscribe");
        let streams = tokio::spawn(async move {
            let mut opening: FuturesUnordered<_> = (0..count)
                .map(|_| subscribe_stream(sender.clone(), &uri, request.clone()))
                .collect();
            let mut held = Vec::with_capacity(count);
            while let Some(result) = opening.next().await {
                match result {
                    Ok(body) => {
                        held.push(body);
                        sink.mark_ready();
                    }
                    Err(e) => sink.fail(format!("storm stream: {e:#}")),
                }
            }
            // Held until this task is aborted: the streams stay open, nothing is read.
            std::future::pending::<()>().await;
            drop(held);
        });
        Ok(StormConnection {
            connection,
            streams,
        })
    }
}

/// Who tells how many storm streams the server holds: the broker's presence page of the storm
/// topic, or the h2 floor's count.
enum StreamCount {
    Broker(Http),
    Floor(FloorStreams),
}

impl StreamCount {
    async fn streams(&mut self) -> anyhow::Result<u64> {
        match self {
            StreamCount::Broker(http) => http.subscribers(STORM_TOPIC).await,
            StreamCount::Floor(floor) => floor.held().await,
        }
    }
}

/// `GET /streams` of the h2 floor, which speaks HTTP/2 only.
pub(crate) struct FloorStreams {
    sender: http2::SendRequest<Empty<Bytes>>,
    uri: String,
}

impl FloorStreams {
    pub(crate) async fn connect(addr: SocketAddr) -> anyhow::Result<FloorStreams> {
        let stream = tokio::net::TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let (sender, connection) = http2::Builder::new(TokioExecutor::new())
            .handshake(TokioIo::new(stream))
            .await?;
        tokio::spawn(connection);
        Ok(FloorStreams {
            sender,
            uri: format!("http://{addr}{}", crate::floor::STREAMS),
        })
    }

    pub(crate) async fn held(&mut self) -> anyhow::Result<u64> {
        self.sender.ready().await?;
        let response = self
            .sender
            .send_request(http::Request::get(&self.uri).body(Empty::new())?)
            .await?;
        let body = response.into_body().collect().await?.to_bytes();
        Ok(std::str::from_utf8(&body)?.trim().parse()?)
    }
}

async fn storm_point(
    addr: SocketAddr,
    pid: u32,
    n: usize,
    mut count: StreamCount,
    p: &Params,
) -> anyhow::Result<Figures> {
    ensure!(n > 0, "--storm-streams must be positive");
    let request = grpc_frame(&topichub::proto::v1::SubscribeRequest {
        topics: vec![STORM_TOPIC.into()],
        ..Default::default()
    });
    let probe = Probe::start(Target::Grpc, addr, p.probe_rate, p.payload, 2)?;
    let sink = Arc::new(Sink::new());
    let connections = p.storm_connections.clamp(1, n);
    let limit = Duration::from_secs(120 + n as u64 / 1000);

    let window = CpuWindow::start(pid);
    probe.record(0);
    let mut opened = Vec::with_capacity(connections);
    for i in 0..connections {
        let count = n / connections + usize::from(i < n % connections);
        opened.push(StormConnection::open(addr, count, request.clone(), sink.clone()).await?);
    }
    sink.wait_ready(n, limit).await?;
    let subscribe = window.finish();
    probe.pause();
    let held = count.streams().await?;
    ensure!(held >= n as u64, "the server reports {held} streams of {n}");

    // The disconnect storm: every connection closes at once, once the probe has caught up.
    probe.catch_up().await;
    let window = CpuWindow::start(pid);
    probe.record(1);
    for c in &opened {
        c.connection.abort();
    }
    for c in &opened {
        c.streams.abort();
    }
    drop(opened);
    let deadline = Instant::now() + limit;
    loop {
        let left = count.streams().await?;
        if left == 0 {
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "{left} of {n} subscriptions still held {limit:?} after their connections closed"
            );
        }
        sleep(Duration::from_millis(2)).await;
    }
    let unsubscribe = window.finish();
    probe.pause();
    let (sub_p99, sub_max, sub_count) = probe.figures(0).await;
    let (unsub_p99, unsub_max, unsub_count) = probe.figures(1).await;
    probe.finish()?;
    Ok(Figures::from([
        (at("subscribe_s", n), subscribe.seconds),
        (at("subscribe_client_cpu_share", n), subscribe.client_share),
        (at("subscribe_server_cpu_share", n), subscribe.server_share),
        (at("subscribe_publish_p99_ms", n), sub_p99),
        (at("subscribe_publish_max_ms", n), sub_max),
        (at("subscribe_publishes", n), sub_count),
        (at("unsubscribe_s", n), unsubscribe.seconds),
        (
            at("unsubscribe_client_cpu_share", n),
            unsubscribe.client_share,
        ),
        (
            at("unsubscribe_server_cpu_share", n),
            unsubscribe.server_share,
        ),
        (at("unsubscribe_publish_p99_ms", n), unsub_p99),
        (at("unsubscribe_publish_max_ms", n), unsub_max),
        (at("unsubscribe_publishes", n), unsub_count),
    ]))
}

/// `--wildcard-subscriptions` patterns that match nothing published (`other{i}.*.>`), then
/// `--wildcard-topics` publishes, each to a topic that did not exist, from `--concurrency`
/// connections, per point on a fresh server: the publish rate and latency, and the server's
/// CPU per publish.
pub fn wildcards(target: Target, launch: &Launch, p: &Params) -> anyhow::Result<Figures> {
    ensure!(target == Target::Grpc, "the wildcards run on topichub-grpc");
    let points = &p.wildcard_subscriptions;
    let mut figures = per_point(target, launch, points, async |addr, pid, n| {
        wildcards_point(addr, pid, n, p).await
    })?;
    growth(&mut figures, "publish_p99_ms", points);
    growth(&mut figures, "server_cpu_us_per_publish", points);
    growth(&mut figures, "publish_per_s", points);
    Ok(figures)
}

async fn wildcards_point(
    addr: SocketAddr,
    pid: u32,
    n: usize,
    p: &Params,
) -> anyhow::Result<Figures> {
    ensure!(p.wildcard_topics > 0, "--wildcard-topics must be positive");
    // The wildcard subscriptions: streams of up to 100 patterns on one connection.
    let sink = Arc::new(Sink::new());
    let mut subscriptions = JoinSet::new();
    let streams = n.div_ceil(PATTERNS_PER_STREAM);
    if n > 0 {
        let channel = crate::clients::endpoint(addr)?.connect().await?;
        for s in 0..streams {
            let topics: Vec<String> = (s * PATTERNS_PER_STREAM
                ..((s + 1) * PATTERNS_PER_STREAM).min(n))
                .map(|i| format!("other{i}.*.>"))
                .collect();
            let (mut client, sink) = (PubSubClient::new(channel.clone()), sink.clone());
            subscriptions.spawn(async move {
                let result = async {
                    let request = topichub::proto::v1::SubscribeRequest {
                        topics,
                        ..Default::default()
                    };
                    let mut stream = client.subscribe(request).await?.into_inner();
                    while let Some(event) = stream.message().await? {
                        match event.event {
                            Some(Event::Subscribed(_)) => sink.mark_ready(),
                            Some(Event::Message(m)) => sink.deliver(&m.payload),
                            _ => {}
                        }
                    }
                    anyhow::Ok(())
                }
                .await;
                match result {
                    Ok(()) => sink.fail("wildcard stream ended".into()),
                    Err(e) => sink.fail(format!("wildcard stream: {e:#}")),
                }
            });
        }
        sink.wait_ready(streams, Duration::from_secs(60)).await?;
    }

    let mut publishers = Vec::with_capacity(p.concurrency);
    for _ in 0..p.concurrency.max(1) {
        publishers.push(Publisher::connect(Target::Grpc, addr).await?);
    }
    let latency = Arc::new(Histogram::new());
    let next = Arc::new(AtomicUsize::new(0));
    let (topics, size) = (p.wildcard_topics, p.payload);
    let window = CpuWindow::start(pid);
    let mut workers = JoinSet::new();
    for mut publisher in publishers {
        let (latency, next) = (latency.clone(), next.clone());
        workers.spawn(async move {
            loop {
                let k = next.fetch_add(1, Relaxed);
                if k >= topics {
                    return anyhow::Ok(());
                }
                let started = Instant::now();
                publisher
                    .publish(&format!("fresh{k}.x.y"), stamped_payload(size), true)
                    .await?;
                latency.record(started.elapsed().as_micros() as u64);
            }
        });
    }
    while let Some(result) = workers.join_next().await {
        result??;
    }
    let used = window.finish();
    if let Some(failure) = sink.first_failure() {
        bail!("{failure}");
    }
    let matched = sink.delivered.load(Relaxed);
    ensure!(
        matched == 0,
        "{matched} messages reached wildcard subscriptions that match none of their topics"
    );
    let mut figures = Figures::from([
        (at("publish_per_s", n), topics as f64 / used.seconds),
        (
            at("publish_p50_ms", n),
            latency.quantile_ms(0.5).context("no publish recorded")?,
        ),
        (
            at("publish_p99_ms", n),
            latency.quantile_ms(0.99).unwrap_or(0.0),
        ),
    ]);
    for (key, value) in used.figures("publish", topics as f64) {
        figures.insert(at(&key, n), value);
    }
    Ok(figures)
}

/// One server with `--retain-age` `--topics-retain-age`, filled in steps to each of
/// `--topic-counts` topics holding one 64-byte message each: its RSS per topic, and the
/// probe's publish latency to an unrelated topic over `--seconds` at each step (the once-a-
/// second expiry pass runs with all those topics held), then while the topics expire.
pub fn topics(target: Target, launch: &Launch, p: &Params) -> anyhow::Result<Figures> {
    ensure!(
        target == Target::Sse,
        "the topics scenario runs on topichub-sse"
    );
    let mut counts = p.topic_counts.clone();
    counts.sort_unstable();
    counts.dedup();
    ensure!(!counts.is_empty(), "--topic-counts is empty");
    let retain_age = format!("{}ms", (p.topics_retain_age * 1000.0).round() as u64);
    let server = Server::start_with(target.kind(), launch, &["--retain-age".into(), retain_age])?;
    let runtime = crate::client_runtime()?;
    let result = runtime.block_on(topics_run(server.addr, server.pid(), &counts, p));
    runtime.shutdown_timeout(Duration::from_secs(2));
    drop(server);
    result
}

async fn topics_run(
    addr: SocketAddr,
    pid: u32,
    counts: &[usize],
    p: &Params,
) -> anyhow::Result<Figures> {
    let mut figures = Figures::new();
    let mut http = Http::connect(addr).await?;
    let probe = Probe::start(Target::Sse, addr, p.probe_rate, p.payload, counts.len() + 1)?;
    // The probe's own topic exists before the baseline.
    settle().await;
    let (mut filled, mut fill_seconds) = (0usize, 0.0);
    let (mut fill_client, mut fill_server) = (0.0, 0.0);
    let mut baseline: Option<(usize, f64)> = None;
    for (i, &n) in counts.iter().enumerate() {
        if n > filled {
            let window = CpuWindow::start(pid);
            fill(addr, p.concurrency, filled, n).await?;
            let used = window.finish();
            fill_seconds += used.seconds;
            fill_client += used.client_share * used.seconds;
            fill_server += used.server_share * used.seconds;
            filled = n;
            settle().await;
        }
        let held = http.metric("topichub_topics").await?;
        ensure!(
            held >= n as f64,
            "the broker holds {held} topics, not {n}: they expired before being measured \
             (raise --topics-retain-age)"
        );
        let rss = rss_kib(pid).context("reading the broker's VmRSS")?;
        figures.insert(at("rss_mib", n), rss / 1024.0);
        match baseline {
            None => baseline = Some((n, rss)),
            Some((n0, rss0)) => {
                figures.insert(
                    at("bytes_per_topic", n),
                    (rss - rss0) * 1024.0 / (n - n0) as f64,
                );
            }
        }
        probe.catch_up().await;
        probe.record(i);
        sleep(Duration::from_secs_f64(p.seconds)).await;
        probe.pause();
        let (p99, max, _) = probe.figures(i).await;
        figures.insert(at("probe_p99_ms", n), p99);
        figures.insert(at("probe_max_ms", n), max);
    }
    growth(&mut figures, "probe_p99_ms", counts);
    growth(&mut figures, "probe_max_ms", counts);
    if fill_seconds > 0.0 {
        figures.insert("fill_per_s".into(), filled as f64 / fill_seconds);
        figures.insert("fill_client_cpu_share".into(), fill_client / fill_seconds);
        figures.insert("fill_server_cpu_share".into(), fill_server / fill_seconds);
    }
    // The expiry: topics age in the order they were filled, so from the first topic's message
    // gone until the last one's, and one more pass.
    if filled > 0 {
        let expiring = counts.len();
        let (first, last) = (topic_name(0), topic_name(filled - 1));
        let deadline = Instant::now() + Duration::from_secs_f64(p.topics_retain_age + 60.0);
        while http.retains(&first).await? {
            ensure!(
                Instant::now() < deadline,
                "no topic expired within --topics-retain-age + 60 s"
            );
            sleep(Duration::from_millis(10)).await;
        }
        let window = CpuWindow::start(pid);
        probe.record(expiring);
        while http.retains(&last).await? {
            ensure!(
                Instant::now() < deadline,
                "{last} still retained after --topics-retain-age + 60 s"
            );
            sleep(Duration::from_millis(10)).await;
        }
        let expiry_s = window.finish().seconds;
        sleep(Duration::from_secs(1)).await;
        probe.pause();
        let (p99, max, _) = probe.figures(expiring).await;
        figures.insert("expiry_s".into(), expiry_s);
        figures.insert("expiry_probe_p99_ms".into(), p99);
        figures.insert("expiry_probe_max_ms".into(), max);
        if let Some(calm) = figures.get(&at("probe_p99_ms", counts[0])).copied()
            && calm > 0.0
        {
            figures.insert("expiry_probe_p99_growth".into(), p99 / calm);
        }
        figures.insert(
            "topics_after_expiry".into(),
            http.metric("topichub_topics").await?,
        );
        figures.insert(
            "rss_mib_after_expiry".into(),
            rss_kib(pid).unwrap_or(0.0) / 1024.0,
        );
    }
    probe.finish()?;
    Ok(figures)
}

/// Publishes one 64-byte message to each of topics `from..to` over `concurrency` connections,
/// opened for this step: kept from the last one, they would have sat idle while the probe
/// recorded, and the broker closes a keep-alive connection idle for `--http-header-timeout`.
async fn fill(addr: SocketAddr, concurrency: usize, from: usize, to: usize) -> anyhow::Result<()> {
    let next = Arc::new(AtomicUsize::new(from));
    let mut workers = JoinSet::new();
    for _ in 0..concurrency.max(1) {
        let mut publisher = Publisher::connect(Target::Sse, addr).await?;
        let next = next.clone();
        workers.spawn(async move {
            loop {
                let k = next.fetch_add(1, Relaxed);
                if k >= to {
                    return anyhow::Ok(());
                }
                publisher
                    .publish(&topic_name(k), stamped_payload(TOPIC_PAYLOAD), true)
                    .await?;
            }
        });
    }
    while let Some(result) = workers.join_next().await {
        result??;
    }
    Ok(())
}

fn topic_name(k: usize) -> String {
    format!("bench.topic.{k}")
}

/// Lets the server finish what it is doing before memory is read.
async fn settle() {
    sleep(Duration::from_millis(500)).await;
}

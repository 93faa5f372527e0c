//! The cluster scenario: three topichub nodes on a three-node NATS JetStream cluster, against
//! that JetStream cluster alone, driven by the same client in the same run.
//!
//! Each system gets a fresh three-node `nats-server -js` cluster (the command line of the
//! tests' `NatsCluster`) with one stream of `--cluster-replicas`. Messages are published on node
//! A and `--cluster-subscribers` subscribe on nodes B and C, alternately: for topichub, gRPC
//! `topichub.v1` Subscribe streams on topichub nodes B and C (each node applies the stream and
//! fans out locally); for JetStream alone, async-nats ordered push consumers on nats-server B
//! and C. Three measurements each, in this order: unary publish from `--concurrency`
//! connections with nobody subscribed (publish throughput: gRPC Publish answered once
//! JetStream acknowledged it, against a JetStream publish awaiting its PubAck), publish ->
//! deliver latency at `--rate` messages/s, and the fan-out closed loop (deliveries/s, and the
//! CPU per delivery of the two server processes the subscribers are connected to: for
//! topichub, what a node costs per delivery, to hold against one node's in the fanout
//! scenario). JetStream alone then publishes once more with an ordered pull consumer on each
//! nats-server reading the whole stream, the reading every topichub node does in cluster mode.
//!
//! Every server process (three nats-server, three topichub) is pinned to the server CPUs (one
//! core on a two-core machine, the client having the other): the cluster as a whole gets what
//! one broker gets in the single-node scenarios.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, ensure};
use tokio::time::{Instant, sleep};

use crate::clients::{JETSTREAM_STREAM, Target};
use crate::scale::Http;
use crate::scenarios::{self, Figures, Params};
use crate::servers::{Kind, Launch, Server, free_port, path};

/// Nodes of each cluster: nats-server nodes, and topichub nodes on them.
const NODES: usize = 3;
/// How long a fresh cluster may take to elect its JetStream leaders.
const READY_WITHIN: Duration = Duration::from_secs(60);

pub fn cluster(target: Target, launch: &Launch, p: &Params) -> anyhow::Result<Figures> {
    ensure!(
        target == Target::GrpcCluster,
        "the cluster scenario runs on topichub-grpc-cluster"
    );
    let p = Params {
        subscribers: p.cluster_subscribers,
        ..p.clone()
    };
    let mut figures = Figures::new();

    // JetStream alone.
    let nats = NatsCluster::start(launch, "jetstream")?;
    let runtime = crate::client_runtime()?;
    let alone = runtime.block_on(async {
        create_stream(nats.addrs()[0], p.cluster_replicas).await?;
        let mut figures = measure(Target::Jetstream, &nats.addrs(), &nats.pids()[1..], &p).await?;
        figures.extend(publish_with_readers(&nats.addrs(), &p).await?);
        anyhow::Ok(figures)
    });
    runtime.shutdown_timeout(Duration::from_secs(2));
    drop(nats);
    for (key, value) in alone.context("JetStream alone")? {
        figures.insert(format!("jetstream_{key}"), value);
    }

    // topichub nodes on a JetStream cluster of their own.
    let nats = NatsCluster::start(launch, "topichub")?;
    let runtime = crate::client_runtime()?;
    let clustered = runtime.block_on(async {
        let nodes = start_topichub_nodes(launch, &nats, p.cluster_replicas).await?;
        let addrs: Vec<SocketAddr> = nodes.iter().map(|n| n.addr).collect();
        let pids: Vec<u32> = nodes[1..].iter().map(Server::pid).collect();
        let measured = measure(Target::Grpc, &addrs, &pids, &p).await;
        drop(nodes);
        measured
    });
    runtime.shutdown_timeout(Duration::from_secs(2));
    drop(nats);
    for (key, value) in clustered.context("topichub cluster")? {
        figures.insert(format!("topichub_{key}"), value);
    }

    // The goals' ratios, and the fan-out each subscribing node did.
    let ratio = |figures: &Figures, key: &str| {
        let (a, b) = (
            figures.get(&format!("topichub_{key}"))?,
            figures.get(&format!("jetstream_{key}"))?,
        );
        (*b > 0.0).then(|| a / b)
    };
    for key in ["p99_ms", "p50_ms", "publish_per_s", "deliveries_per_s"] {
        if let Some(r) = ratio(&figures, key) {
            figures.insert(format!("{key}_ratio"), r);
        }
    }
    // topichub's publishing against JetStream's while every nats-server also feeds a reader.
    if let (Some(a), Some(b)) = (
        figures.get("topichub_publish_per_s"),
        figures.get("jetstream_readers_publish_per_s"),
    ) && *b > 0.0
    {
        figures.insert("readers_publish_per_s_ratio".into(), a / b);
    }
    if let Some(&d) = figures.get("topichub_deliveries_per_s") {
        figures.insert(
            "topichub_deliveries_per_s_per_node".into(),
            d / (NODES - 1) as f64,
        );
    }
    Ok(figures)
}

/// Publish throughput (nobody subscribed), then latency at `--rate`, then the fan-out closed
/// loop: publishing at `addrs[0]`, subscribing at the others, whose processes are `pids`.
async fn measure(
    target: Target,
    addrs: &[SocketAddr],
    pids: &[u32],
    p: &Params,
) -> anyhow::Result<Figures> {
    let (publish, subscribe) = (addrs[0], &addrs[1..]);
    let mut figures = Figures::new();
    let published = scenarios::publish(target, publish, None, p).await?;
    for key in ["publish_per_s", "publish_p50_ms", "publish_p99_ms"] {
        figures.insert(key.into(), published[key]);
    }
    let latency =
        scenarios::latency_across(target, publish, subscribe, p.subscribers, p.rate, p).await?;
    for key in ["p50_ms", "p99_ms", "max_ms", "lost", "recorded"] {
        figures.insert(key.into(), latency[key]);
    }
    // The ordered consumers (or streams) of the latency run are gone once their connections
    // close; JetStream forgets ordered consumers a few seconds later.
    let fanout = scenarios::fanout(target, publish, subscribe, pids, p).await?;
    for key in [
        "deliveries_per_s",
        "server_cpu_us_per_delivery",
        "server_cpu_share",
    ] {
        figures.insert(key.into(), fanout[key]);
    }
    Ok(figures)
}

/// Three `nats-server -js` processes forming one JetStream cluster on loopback, each with a
/// fresh store; stopped when dropped.
struct NatsCluster {
    nodes: Vec<Server>,
}

impl NatsCluster {
    fn start(launch: &Launch, name: &str) -> anyhow::Result<NatsCluster> {
        let ports = (0..NODES)
            .map(|_| Ok((free_port()?, free_port()?)))
            .collect::<anyhow::Result<Vec<(u16, u16)>>>()?;
        let mut nodes = Vec::with_capacity(NODES);
        for (i, &(port, route_port)) in ports.iter().enumerate() {
            let dir = launch
                .work_dir
                .join("cluster")
                .join(format!("{name}-nats{i}"));
            let _ = std::fs::remove_dir_all(&dir);
            let routes: Vec<String> = ports
                .iter()
                .enumerate()
                .filter(|&(j, _)| j != i)
                .map(|(_, &(_, r))| format!("nats://127.0.0.1:{r}"))
                .collect();
            let args: Vec<String> = [
                "-js",
                "-a",
                "127.0.0.1",
                "-n",
                &format!("n{i}"),
                "-p",
                &port.to_string(),
                "-sd",
                &path(&dir.join("data")),
                "--cluster_name",
                "C",
                "--cluster",
                &format!("nats://127.0.0.1:{route_port}"),
                "--routes",
                &routes.join(","),
            ]
            .map(String::from)
            .to_vec();
            let addr = ([127, 0, 0, 1], port).into();
            nodes.push(Server::spawn(
                Kind::ClusterNats,
                addr,
                &dir,
                Path::new("nats-server"),
                &args,
                launch,
            )?);
        }
        Ok(NatsCluster { nodes })
    }

    fn addrs(&self) -> Vec<SocketAddr> {
        self.nodes.iter().map(|n| n.addr).collect()
    }

    fn pids(&self) -> Vec<u32> {
        self.nodes.iter().map(Server::pid).collect()
    }
}

/// JetStream's publish throughput again, now with an ordered pull consumer on each
/// nats-server reading the whole stream as it grows, as every topichub node does in cluster
/// mode: what JetStream alone does under the reading a topichub cluster asks of it.
/// `readers_publish_per_s` and `readers_read_per_s` (messages each reader got per second, the
/// slowest's).
async fn publish_with_readers(addrs: &[SocketAddr], p: &Params) -> anyhow::Result<Figures> {
    use async_nats::jetstream::consumer;
    use futures_util::StreamExt;
    let mut readers = tokio::task::JoinSet::new();
    let counts: Vec<_> = addrs
        .iter()
        .map(|_| std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0)))
        .collect();
    for (addr, count) in addrs.iter().zip(&counts) {
        let context = async_nats::jetstream::new(async_nats::connect(addr.to_string()).await?);
        let stream = context.get_stream(JETSTREAM_STREAM).await?;
        let consumer = stream
            .create_consumer(consumer::pull::OrderedConfig {
                filter_subject: "bench.>".into(),
                deliver_policy: consumer::DeliverPolicy::New,
                ..Default::default()
            })
            .await?;
        let mut messages = consumer.messages().await?;
        let count = count.clone();
        readers.spawn(async move {
            while let Some(Ok(_)) = messages.next().await {
                count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        });
    }
    let started = Instant::now();
    let published = scenarios::publish(Target::Jetstream, addrs[0], None, p).await?;
    let seconds = started.elapsed().as_secs_f64();
    readers.abort_all();
    let slowest = counts
        .iter()
        .map(|c| c.load(std::sync::atomic::Ordering::Relaxed))
        .min()
        .unwrap_or(0);
    Ok(Figures::from([
        ("readers_publish_per_s".into(), published["publish_per_s"]),
        ("readers_read_per_s".into(), slowest as f64 / seconds),
    ]))
}

/// The stream the JetStream-alone run publishes to, with `replicas`, once the new cluster has
/// elected its JetStream leader.
async fn create_stream(addr: SocketAddr, replicas: usize) -> anyhow::Result<()> {
    let client = async_nats::connect(addr.to_string()).await?;
    let context = async_nats::jetstream::new(client);
    let deadline = Instant::now() + READY_WITHIN;
    loop {
        let created = context
            .create_stream(async_nats::jetstream::stream::Config {
                name: JETSTREAM_STREAM.into(),
                subjects: vec!["bench.>".into()],
                storage: async_nats::jetstream::stream::StorageType::File,
                num_replicas: replicas,
                ..Default::default()
            })
            .await;
        match created {
            Ok(_) => return Ok(()),
            // Refused while the cluster elects its JetStream leader: try again shortly.
            Err(_) if Instant::now() < deadline => sleep(Duration::from_millis(200)).await,
            Err(e) => return Err(e).context("creating the JetStream stream"),
        }
    }
}

/// Three topichub nodes `serve --nats`, node i naming nats-server i first; node A first, so
/// that it creates the stream, then B and C. Each is ready once its `/healthz` answers 200.
async fn start_topichub_nodes(
    launch: &Launch,
    nats: &NatsCluster,
    replicas: usize,
) -> anyhow::Result<Vec<Server>> {
    let urls: Vec<String> = nats.addrs().iter().map(|a| format!("nats://{a}")).collect();
    let mut nodes = Vec::with_capacity(NODES);
    for i in 0..NODES {
        let port = free_port()?;
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let dir = launch.work_dir.join("cluster").join(format!("topichub{i}"));
        let mut own_first = urls.clone();
        own_first.rotate_left(i);
        let args: Vec<String> = vec![
            "serve".into(),
            "--listen".into(),
            addr.to_string(),
            "--max-subscriptions-per-connection".into(),
            "100000".into(),
            "--nats".into(),
            own_first.join(","),
            "--nats-replicas".into(),
            replicas.to_string(),
        ];
        let node = Server::spawn(
            Kind::ClusterTopichub,
            addr,
            &dir,
            &launch.topichub_bin,
            &args,
            launch,
        )?;
        wait_serving(addr).await.with_context(|| {
            let log = std::fs::read_to_string(dir.join("server.log")).unwrap_or_default();
            format!("topichub node {i} at {addr}:\n{log}")
        })?;
        nodes.push(node);
    }
    Ok(nodes)
}

/// Until `/healthz` answers 200: the node has opened its log on JetStream.
async fn wait_serving(addr: SocketAddr) -> anyhow::Result<()> {
    let deadline = Instant::now() + READY_WITHIN;
    loop {
        let answer = async { Http::connect(addr).await?.get("/healthz").await }.await;
        match answer {
            Ok(_) => return Ok(()),
            Err(e) if Instant::now() > deadline => {
                return Err(e).context("not serving within 60 s");
            }
            Err(_) => sleep(Duration::from_millis(100)).await,
        }
    }
}

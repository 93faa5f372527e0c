//! The durable-log scenarios: publishing against a log that must reach the disk before the
//! acknowledgement, and how long a broker takes to serve again after a crash with a full log.

use std::time::Duration;

use anyhow::{Context, bail};
use futures_util::StreamExt;
use tokio::time::{Instant, timeout};
use tonic::transport::Endpoint;
use topichub::proto::v1::pub_sub_client::PubSubClient;
use topichub::proto::v1::start_position::Position;
use topichub::proto::v1::subscribe_response::Event;
use topichub::proto::v1::{PublishRequest, StartPosition, SubscribeRequest};

use crate::clients::{Publisher, SharedPublisher, Target};
use crate::scenarios::{self, Figures, Params, Scenario};
use crate::servers::{Launch, Server};
use crate::stats::stamped_payload;

/// Topics the restart scenario spreads its messages over (each within the default per-topic
/// retention of 10,000 messages).
const RESTART_TOPICS: usize = 100;
/// PublishBatch streams filling the log at once.
const FILL_STREAMS: usize = 4;

/// Unary publish throughput (`--concurrency` publishers, each awaiting its acknowledgement,
/// each on a connection of its own), the same publishers sharing one connection (`stream_`
/// figures: a topichub `Connect` stream, or one NATS connection for JetStream), then publish ->
/// deliver latency at `--e2e-rate`, on one server.
pub async fn publish_and_deliver(
    target: Target,
    addr: std::net::SocketAddr,
    pid: u32,
    p: &Params,
) -> anyhow::Result<Figures> {
    let mut figures = scenarios::run(Scenario::Publish, target, addr, pid, p).await?;
    let shared = SharedPublisher::connect(target, addr).await?;
    let publishers = (0..p.concurrency)
        .map(|_| Publisher::Shared(shared.clone()))
        .collect();
    for (key, value) in scenarios::closed_loop(publishers, Some(pid), p).await? {
        figures.insert(format!("stream_{key}"), value);
    }
    let e2e = scenarios::run(Scenario::E2e, target, addr, pid, p).await?;
    for (key, value) in e2e {
        figures.insert(format!("e2e_{key}"), value);
    }
    Ok(figures)
}

/// Fills a `--data-dir` broker with `--restart-messages` messages, SIGKILLs it, starts it again
/// on the same data and measures until a subscription from the earliest retained message of
/// the first topic receives that message: the time a crashed broker needs to serve again.
pub fn restart(target: Target, launch: &Launch, p: &Params) -> anyhow::Result<Figures> {
    if !matches!(target, Target::GrpcDisk | Target::GrpcDiskEvery) {
        bail!("the restart scenario needs a durable topichub target");
    }
    let kind = target.kind();
    let server = Server::start(kind, launch)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let fill_started = Instant::now();
    runtime.block_on(fill(server.addr, p.restart_messages, p.payload))?;
    let fill_s = fill_started.elapsed().as_secs_f64();
    server.kill();
    let disk_bytes = dir_bytes(&Server::dir(kind, launch).join("data"))?;

    let started = Instant::now();
    let server = Server::start_with(kind, launch, &[])?;
    let listening_s = started.elapsed().as_secs_f64();
    runtime.block_on(first_message(server.addr))?;
    let ready_s = started.elapsed().as_secs_f64();
    drop(server);
    let payload_bytes = (p.restart_messages * p.payload) as f64;
    Ok(Figures::from([
        ("retained_messages".into(), p.restart_messages as f64),
        ("fill_per_s".into(), p.restart_messages as f64 / fill_s),
        ("restart_listening_s".into(), listening_s),
        ("restart_ready_s".into(), ready_s),
        ("disk_bytes".into(), disk_bytes as f64),
        (
            "disk_bytes_per_payload_byte".into(),
            disk_bytes as f64 / payload_bytes,
        ),
    ]))
}

fn topic(i: usize) -> String {
    format!("bench.restart.t{i}")
}

async fn client(
    addr: std::net::SocketAddr,
) -> anyhow::Result<PubSubClient<tonic::transport::Channel>> {
    let channel = Endpoint::from_shared(format!("http://{addr}"))?
        .connect()
        .await?;
    Ok(PubSubClient::new(channel))
}

/// Publishes `total` messages round-robin over the topics on a few PublishBatch streams and
/// waits for every batch's answer (each message acknowledged, so durable).
async fn fill(addr: std::net::SocketAddr, total: usize, size: usize) -> anyhow::Result<()> {
    let mut batches = tokio::task::JoinSet::new();
    for stream in 0..FILL_STREAMS {
        let mut client = client(addr).await?;
        let count = total / FILL_STREAMS + usize::from(stream < total % FILL_STREAMS);
        batches.spawn(async move {
            let requests = futures_util::stream::iter((0..count).map(move |i| PublishRequest {
                topic: topic((i * FILL_STREAMS + stream) % RESTART_TOPICS),
                payload: stamped_payload(size),
                ..Default::default()
            }));
            let answer = client.publish_batch(requests).await?.into_inner();
            anyhow::ensure!(
                answer.accepted == count as u64,
                "{} of {count} accepted",
                answer.accepted
            );
            anyhow::Ok(())
        });
    }
    while let Some(done) = batches.join_next().await {
        done??;
    }
    Ok(())
}

/// Retries until the broker answers a subscription from the earliest message with a message.
async fn first_message(addr: std::net::SocketAddr) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let attempt = async {
            let mut client = client(addr).await?;
            let request = SubscribeRequest {
                topics: vec![topic(0)],
                start: Some(StartPosition {
                    position: Some(Position::Earliest(true)),
                }),
                ..Default::default()
            };
            let mut stream = client.subscribe(request).await?.into_inner();
            while let Some(event) = stream.next().await {
                if let Some(Event::Message(_)) = event?.event {
                    return anyhow::Ok(());
                }
            }
            bail!("stream ended before a message")
        };
        match timeout(Duration::from_secs(30), attempt).await {
            Ok(Ok(())) => return Ok(()),
            // Not listening or not serving yet: the broker is still opening its log.
            Ok(Err(_)) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Ok(Err(e)) => return Err(e.context("no message after the restart")),
            Err(_) => bail!("no message within 30 s of subscribing after the restart"),
        }
    }
}

fn dir_bytes(dir: &std::path::Path) -> anyhow::Result<u64> {
    let mut total = 0;
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let entry = entry?;
        let meta = entry.metadata()?;
        total += if meta.is_dir() {
            dir_bytes(&entry.path())?
        } else {
            meta.len()
        };
    }
    Ok(total)
}

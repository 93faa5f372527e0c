//! The raw-loopback ceiling: the least a fan-out server can do. `GET /sub` answers with SSE
//! headers and keeps the socket; `POST /pub` frames the body as one SSE event and answers; one
//! writer task writes the frames pending at each turn to every subscriber socket, one `write`
//! per socket (no per-subscriber queues or tasks, no parsing, no history). Whatever topichub
//! spends beyond this is the overhead of a real broker.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::{Context, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Mutex, Notify};

/// Bytes of envelope added around each payload, so that frames are as long as topichub's SSE
/// `message` events for the same payload (id, event name, topic, cursor, timestamp in JSON).
pub const ENVELOPE: usize = 170;

pub async fn serve(listen: SocketAddr) -> anyhow::Result<()> {
    let listener = TcpListener::bind(listen).await?;
    let shared = Arc::new(Shared::default());
    tokio::spawn(writer(shared.clone()));
    loop {
        let (socket, _) = listener.accept().await?;
        socket.set_nodelay(true)?;
        let shared = shared.clone();
        tokio::spawn(async move {
            if let Err(e) = connection(socket, shared).await {
                eprintln!("raw-server: {e:#}");
            }
        });
    }
}

#[derive(Default)]
struct Shared {
    subscribers: Mutex<Vec<OwnedWriteHalf>>,
    /// Frames published and not yet written.
    pending: std::sync::Mutex<Vec<u8>>,
    wake: Notify,
}

/// Writes whatever frames are pending, all of them in one `write` per subscriber socket: the
/// batching a broker can do when several messages wait for the same subscriber.
async fn writer(shared: Arc<Shared>) {
    loop {
        shared.wake.notified().await;
        let batch = std::mem::take(&mut *shared.pending.lock().unwrap());
        if batch.is_empty() {
            continue;
        }
        let mut all = shared.subscribers.lock().await;
        let mut alive = Vec::with_capacity(all.len());
        for (i, mut subscriber) in all.drain(..).enumerate() {
            if subscriber.write_all(&batch).await.is_ok() {
                alive.push(subscriber);
            }
            if i % 64 == 63 {
                // Let publishes in meanwhile: they join the next batch.
                tokio::task::yield_now().await;
            }
        }
        *all = alive;
        if !shared.pending.lock().unwrap().is_empty() {
            shared.wake.notify_one();
        }
    }
}

async fn connection(socket: TcpStream, shared: Arc<Shared>) -> anyhow::Result<()> {
    let (mut read, mut write) = socket.into_split();
    let mut buffer = Vec::with_capacity(4096);
    let mut seq = 0u64;
    loop {
        let head_end = loop {
            if let Some(at) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
                break at + 4;
            }
            if read.read_buf(&mut buffer).await? == 0 {
                return Ok(());
            }
        };
        let head = std::str::from_utf8(&buffer[..head_end]).context("request head")?;
        let is_sub = head.starts_with("GET /sub");
        let length: usize = head
            .lines()
            .find_map(|l| {
                let (name, value) = l.split_once(':')?;
                name.eq_ignore_ascii_case("content-length")
                    .then(|| value.trim().parse().ok())?
            })
            .unwrap_or(0);
        if is_sub {
            write
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n\r\n")
                .await?;
            shared.subscribers.lock().await.push(write);
            // Hold the read side until the subscriber goes away.
            let mut sink = [0u8; 64];
            while read.read(&mut sink).await? > 0 {}
            return Ok(());
        }
        if !head.starts_with("POST /pub") {
            bail!("unexpected request {:?}", head.lines().next());
        }
        while buffer.len() < head_end + length {
            if read.read_buf(&mut buffer).await? == 0 {
                return Ok(());
            }
        }
        seq += 1;
        let payload = &buffer[head_end..head_end + length];
        {
            let mut frame = shared.pending.lock().unwrap();
            frame.extend_from_slice(format!("id: {seq}\nevent: message\ndata: ").as_bytes());
            frame.extend_from_slice(payload);
            let padded = frame.len() + ENVELOPE.saturating_sub(30);
            frame.resize(padded, b' ');
            frame.extend_from_slice(b"\n\n");
        }
        shared.wake.notify_one();
        buffer.drain(..head_end + length);
        write
            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
            .await?;
    }
}

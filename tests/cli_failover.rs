//! `topichub pub` and `topichub sub` with several `--server` URLs, as real processes against
//! real broker processes: `sub` skips a dead server and, when its server dies, resumes on the
//! next one after its last message, with no loss and no duplicate; `pub` moves on to the next
//! server, and a retry after an answer that was lost is answered as a duplicate, not stored
//! twice.

mod support;

use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use support::{BrokerProcess, CliSub, free_port, fresh_data_dir, wait_for, within};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::Command;
use tokio_util::sync::CancellationToken;

const BIN: &str = env!("CARGO_BIN_EXE_topichub");

/// `POST /topics/{topic}` straight to a broker; the answer.
async fn publish(addr: SocketAddr, topic: &str, payload: &str) -> serde_json::Value {
    let response = reqwest::Client::new()
        .post(format!("http://{addr}/topics/{topic}"))
        .body(payload.to_owned())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    response.json().await.unwrap()
}

/// The cursors of the messages retained on `topic` whose payload is `payload`.
async fn retained(addr: SocketAddr, topic: &str, payload: &str) -> Vec<String> {
    let page = support::get_json(&format!("http://{addr}/topics/{topic}/messages")).await;
    page["messages"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["payload"] == payload)
        .map(|m| m["cursor"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sub_skips_a_dead_server_and_takes_the_next() {
    let dead = free_port().await;
    let live = BrokerProcess::start(&[], "info").await;
    let servers = format!("http://{dead},http://{}", live.addr);
    let mut sub = CliSub::start(&servers, &["fo.skip", "--from", "earliest"]).await;
    let log = sub.stderr_through("subscribed").await;
    assert!(
        log.iter().any(|l| l.contains(&dead.to_string())),
        "says which server failed: {log:?}"
    );
    publish(live.addr, "fo.skip", "reached").await;
    assert_eq!(sub.line().await, "reached");
    drop(sub);
    live.stop().await;
}

/// Two nodes of one hub, one after the other: the first is killed, the second opens the same
/// data dir on another port. `sub` fails over to it and resumes after the last message it
/// printed: nothing lost, nothing twice, no gap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sub_fails_over_to_the_next_server_and_resumes_from_its_cursor() {
    let dir = fresh_data_dir("cli-failover");
    let args = ["--data-dir", dir.to_str().unwrap()];
    let mut first = BrokerProcess::start(&args, "info").await;
    let second_addr = free_port().await;
    let servers = format!("http://{},http://{second_addr}", first.addr);
    let mut sub = CliSub::start(&servers, &["fo.resume"]).await;
    sub.stderr_until("subscribed").await;
    for i in 1..=3 {
        publish(first.addr, "fo.resume", &format!("m{i}")).await;
    }
    for i in 1..=3 {
        assert_eq!(sub.line().await, format!("m{i}"));
    }

    first.signal("KILL");
    first.child.wait().await.unwrap();
    sub.stderr_until(&format!("trying http://{second_addr}"))
        .await;
    let second = support::start_broker_process(second_addr, &args).await;
    let log = sub.stderr_through("subscribed").await;
    assert!(!log.iter().any(|l| l.contains("gap")), "{log:?}");
    for i in 4..=6 {
        publish(second_addr, "fo.resume", &format!("m{i}")).await;
    }
    for i in 4..=6 {
        assert_eq!(sub.line().await, format!("m{i}"), "no loss, no repeat");
    }
    drop(sub);
    drop(second);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A TCP proxy in front of a broker that loses the answer to a publish: once the request
/// carrying `marker` has gone through, nothing more comes back, and `cut` closes the
/// connection.
async fn answer_losing_proxy(
    upstream: SocketAddr,
    marker: &'static [u8],
    cut: CancellationToken,
) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (inbound, _) = listener.accept().await.unwrap();
            let outbound = TcpStream::connect(upstream).await.unwrap();
            let cut = cut.clone();
            let holding = Arc::new(AtomicBool::new(false));
            let (mut client_read, mut client_write) = inbound.into_split();
            let (mut broker_read, mut broker_write) = outbound.into_split();
            let seen = holding.clone();
            let requests = async move {
                let mut window = Vec::new();
                let mut buffer = vec![0; 16 * 1024];
                loop {
                    let n = client_read.read(&mut buffer).await?;
                    if n == 0 {
                        return Ok::<_, std::io::Error>(());
                    }
                    window.extend_from_slice(&buffer[..n]);
                    if window.windows(marker.len()).any(|w| w == marker) {
                        seen.store(true, Ordering::SeqCst);
                    }
                    let keep = window.len().saturating_sub(marker.len());
                    window.drain(..keep);
                    broker_write.write_all(&buffer[..n]).await?;
                }
            };
            let answers = async move {
                let mut buffer = vec![0; 16 * 1024];
                loop {
                    let n = broker_read.read(&mut buffer).await?;
                    if n == 0 {
                        return Ok::<_, std::io::Error>(());
                    }
                    // Once the publish went through, its answer is lost on the way.
                    if !holding.load(Ordering::SeqCst) {
                        client_write.write_all(&buffer[..n]).await?;
                    }
                }
            };
            tokio::spawn(async move {
                tokio::select! {
                    _ = async { tokio::join!(requests, answers) } => {}
                    () = cut.cancelled() => {}
                }
                // Dropping the halves closes both connections.
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pub_retries_on_the_next_server_and_a_lost_answer_is_not_published_twice() {
    let broker = BrokerProcess::start(&[], "info").await;
    let cut = CancellationToken::new();
    let proxy = answer_losing_proxy(broker.addr, b"published-once", cut.clone()).await;
    let publisher = Command::new(BIN)
        .args(["pub", "--server"])
        .arg(format!("http://{proxy},http://{}", broker.addr))
        .args(["fo.once", "published-once"])
        .env("NO_COLOR", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    // The broker stored it, but the answer never reaches `pub`; then its connection drops.
    let stored = wait_for("the first attempt to be stored", || async {
        let cursors = retained(broker.addr, "fo.once", "published-once").await;
        cursors.first().cloned()
    })
    .await;
    cut.cancel();
    let output = within("pub to finish", publisher.wait_with_output())
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert_eq!(
        stdout.trim(),
        stored,
        "the original's cursor; stderr: {stderr}"
    );
    assert!(
        stderr.contains("earlier attempt had published it"),
        "{stderr}"
    );
    assert_eq!(
        retained(broker.addr, "fo.once", "published-once").await,
        [stored],
        "stored once"
    );
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pub_sends_stdin_lines_through_the_next_server_when_the_first_is_dead() {
    let dead = free_port().await;
    let broker = BrokerProcess::start(&[], "info").await;
    let mut publisher = Command::new(BIN)
        .args(["pub", "--server"])
        .arg(format!("http://{dead},http://{}", broker.addr))
        .arg("fo.lines")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let lines: String = (1..=2500).map(|i| format!("line {i}\n")).collect();
    let mut stdin = publisher.stdin.take().unwrap();
    stdin.write_all(lines.as_bytes()).await.unwrap();
    drop(stdin);
    let output = within("pub to finish", publisher.wait_with_output())
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(stderr.contains("published 2500 messages"), "{stderr}");
    let topics = support::get_json(&format!("http://{}/topics", broker.addr)).await;
    let topic = &topics["topics"][0];
    assert_eq!(topic["name"], "fo.lines");
    assert_eq!(topic["retained_messages"], 2500, "each line once");
    assert_eq!(
        String::from_utf8_lossy(&output.stdout).trim(),
        format!("{}-2500", topic_epoch(broker.addr).await),
        "the last line's cursor"
    );
    broker.stop().await;
}

#[tokio::test]
async fn pub_gives_up_after_retry_for_with_the_last_error() {
    let (a, b) = (free_port().await, free_port().await);
    let output = Command::new(BIN)
        .args(["pub", "--retry-for", "300ms", "--server"])
        .arg(format!("http://{a},http://{b}"))
        .args(["fo.none", "x"])
        .output();
    let output = within("pub to give up", output).await.unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(
        stderr.contains("no server answered within --retry-for"),
        "{stderr}"
    );
    assert!(stderr.contains("cannot connect"), "{stderr}");
}

async fn topic_epoch(addr: SocketAddr) -> String {
    let health = support::get_json(&format!("http://{addr}/healthz")).await;
    health["epoch"].as_str().unwrap().to_owned()
}

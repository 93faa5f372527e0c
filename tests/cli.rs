//! The `topichub pub` and `topichub sub` command-line clients, run as real processes against a
//! real broker process.

mod support;

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;

use support::{CliSub, free_port, start_broker_process};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio::process::{Child, Command};

const BIN: &str = env!("CARGO_BIN_EXE_topichub");
const WAIT: Duration = Duration::from_secs(15);

async fn stop_broker(mut child: Child) {
    // SIGTERM, as an orchestrator would: the broker drains and exits by itself.
    let pid = child.id().unwrap() as i32;
    unsafe_kill(pid);
    let status = tokio::time::timeout(WAIT, child.wait())
        .await
        .expect("broker exits after SIGTERM")
        .unwrap();
    assert!(status.success(), "graceful exit: {status:?}");
}

fn unsafe_kill(pid: i32) {
    std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
}

async fn publish(addr: SocketAddr, topic: &str, payload: &str) -> u64 {
    let response: serde_json::Value = reqwest::Client::new()
        .post(format!("http://{addr}/publish"))
        .json(&serde_json::json!({"topic": topic, "payload": payload}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    response["seq"].as_u64().unwrap()
}

/// A TCP proxy that can be cut and restored, to drop a client's connection while the broker
/// stays up.
struct Proxy {
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

async fn start_proxy(addr: SocketAddr, upstream: SocketAddr) -> Proxy {
    let listener = TcpListener::bind(addr).await.unwrap();
    let task = tokio::spawn(async move {
        let mut connections = tokio::task::JoinSet::new();
        loop {
            let (mut inbound, _) = listener.accept().await.unwrap();
            connections.spawn(async move {
                if let Ok(mut outbound) = tokio::net::TcpStream::connect(upstream).await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                }
            });
        }
        // Aborting this task drops the JoinSet, which aborts (closes) every proxied connection.
    });
    Proxy { addr, task }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pub_and_sub_work_from_the_command_line() {
    let addr = free_port().await;
    let broker = start_broker_process(addr, &[]).await;
    let server = format!("http://{addr}");
    let mut sub = CliSub::start(&server, &["cli.*"]).await;
    sub.stderr_until("subscribed").await;

    let output = Command::new(BIN)
        .args(["pub", "--server", &server, "cli.one", "hello from the CLI"])
        .output()
        .await
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    assert!(
        String::from_utf8(output.stdout)
            .unwrap()
            .trim()
            .ends_with("-1"),
        "prints the cursor"
    );
    assert_eq!(sub.line().await, "hello from the CLI");

    // Lines from stdin go through one PublishBatch stream.
    let mut publisher = Command::new(BIN)
        .args(["pub", "--server", &server, "cli.lines"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    publisher
        .stdin
        .take()
        .unwrap()
        .write_all(b"first\nsecond\nthird\n")
        .await
        .unwrap();
    let output = publisher.wait_with_output().await.unwrap();
    assert!(output.status.success());
    assert!(
        String::from_utf8(output.stderr)
            .unwrap()
            .contains("published 3 messages")
    );
    for expected in ["first", "second", "third"] {
        assert_eq!(sub.line().await, expected);
    }

    // Errors are one clear line and a failing exit status.
    let output = Command::new(BIN)
        .args(["pub", "--server", &server, "cli.*", "x"])
        .output()
        .await
        .unwrap();
    assert!(!output.status.success());
    assert!(
        String::from_utf8(output.stderr)
            .unwrap()
            .contains("wildcards")
    );
    let output = Command::new(BIN)
        .args(["sub", "--server", &server, "bad topic"])
        .output()
        .await
        .unwrap();
    assert!(
        !output.status.success(),
        "an invalid topic is not retried forever"
    );
    assert!(
        String::from_utf8(output.stderr)
            .unwrap()
            .contains("invalid topic")
    );
    drop(sub);
    stop_broker(broker).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sub_resumes_after_a_dropped_connection_without_losing_anything() {
    let broker_addr = free_port().await;
    let broker = start_broker_process(broker_addr, &[]).await;
    let proxy_addr = free_port().await;
    let proxy = start_proxy(proxy_addr, broker_addr).await;
    let mut sub = CliSub::start(&format!("http://{}", proxy.addr), &["drop.t"]).await;
    sub.stderr_until("subscribed").await;

    publish(broker_addr, "drop.t", "before").await;
    assert_eq!(sub.line().await, "before");
    // Cut the connection; the broker keeps running and keeps accepting messages.
    proxy.task.abort();
    let _ = proxy.task.await;
    sub.stderr_until("reconnecting").await;
    for i in 0..5 {
        publish(broker_addr, "drop.t", &format!("while away {i}")).await;
    }
    let _proxy = start_proxy(proxy_addr, broker_addr).await;
    for i in 0..5 {
        assert_eq!(
            sub.line().await,
            format!("while away {i}"),
            "replayed from its last cursor"
        );
    }
    publish(broker_addr, "drop.t", "after").await;
    assert_eq!(sub.line().await, "after");
    drop(sub);
    stop_broker(broker).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sub_reconnects_with_backoff_across_a_broker_restart_and_reports_the_gap() {
    let addr = free_port().await;
    let broker = start_broker_process(addr, &[]).await;
    let mut sub = CliSub::start(&format!("http://{addr}"), &["restart.t"]).await;
    sub.stderr_until("subscribed").await;
    publish(addr, "restart.t", "first life").await;
    assert_eq!(sub.line().await, "first life");

    stop_broker(broker).await;
    sub.stderr_until("reconnecting in").await;
    // Keeps retrying while the broker is away.
    sub.stderr_until("reconnecting in").await;
    let broker = start_broker_process(addr, &[]).await;
    let gap = sub.stderr_until("gap").await;
    // The gap follows `subscribed`, so the new subscription is live by now.
    assert!(
        gap.contains("epoch"),
        "a restart without durable storage is a new epoch: {gap}"
    );
    publish(addr, "restart.t", "second life").await;
    assert_eq!(sub.line().await, "second life");
    drop(sub);
    stop_broker(broker).await;
}

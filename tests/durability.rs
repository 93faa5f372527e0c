//! Durable history (`--data-dir`): the broker runs as a real process and is stopped, killed with
//! SIGKILL, refused bad data dirs and starved of disk, and what it acknowledged must survive.

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use futures_util::StreamExt as _;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tonic::transport::Channel;
use topichub::proto::v1::{self, pub_sub_client::PubSubClient};

use support::{free_port, fresh_data_dir, publish_request};

const BIN: &str = env!("CARGO_BIN_EXE_topichub");
const WAIT: Duration = Duration::from_secs(30);

/// `topichub serve --data-dir DIR` as a child process, ready once `/healthz` answers.
struct Broker {
    child: Child,
    addr: SocketAddr,
}

impl Broker {
    async fn start(addr: SocketAddr, dir: &Path, extra: &[&str]) -> Broker {
        let mut child = serve(addr, dir, extra).spawn().unwrap();
        let url = format!("http://{addr}/healthz");
        let deadline = tokio::time::Instant::now() + WAIT;
        while reqwest::get(&url).await.is_err() {
            if let Ok(Some(status)) = child.try_wait() {
                panic!("broker exited at start: {status}");
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "broker did not start"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Broker { child, addr }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    async fn grpc(&self) -> PubSubClient<Channel> {
        let channel = Channel::from_shared(self.url())
            .unwrap()
            .connect()
            .await
            .unwrap();
        PubSubClient::new(channel)
    }

    /// A live `Subscribe` stream to `topic`.
    async fn subscribe(
        &self,
        topic: &str,
        queue_size: u32,
    ) -> tonic::Streaming<v1::SubscribeResponse> {
        self.grpc()
            .await
            .subscribe(v1::SubscribeRequest {
                topics: vec![topic.into()],
                queue_size,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
    }

    async fn health(&self) -> serde_json::Value {
        reqwest::get(format!("{}/healthz", self.url()))
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// SIGTERM, as an orchestrator would; the broker drains, syncs its log and exits.
    async fn stop(mut self) {
        signal(&self.child, "TERM");
        let status = tokio::time::timeout(WAIT, self.child.wait())
            .await
            .expect("broker exits after SIGTERM")
            .unwrap();
        assert!(status.success(), "graceful exit: {status:?}");
    }

    /// SIGKILL: no chance to flush anything.
    async fn kill(mut self) {
        signal(&self.child, "KILL");
        let _ = tokio::time::timeout(WAIT, self.child.wait()).await;
    }
}

fn serve(addr: SocketAddr, dir: &Path, extra: &[&str]) -> Command {
    let mut command = Command::new(BIN);
    command
        .args(["serve", "--listen", &addr.to_string(), "--data-dir"])
        .arg(dir)
        .args(extra)
        .env("RUST_LOG", "warn")
        .env("NO_COLOR", "1")
        .kill_on_drop(true);
    command
}

fn signal(child: &Child, name: &str) {
    let pid = child.id().expect("running");
    std::process::Command::new("kill")
        .args([&format!("-{name}"), &pid.to_string()])
        .status()
        .unwrap();
}

/// Starting the broker on `dir` fails; returns what it printed.
async fn refused_start(dir: &Path) -> String {
    let addr = free_port().await;
    let output = tokio::time::timeout(
        WAIT,
        serve(addr, dir, &[])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .output(),
    )
    .await
    .expect("the broker exits")
    .unwrap();
    assert!(!output.status.success(), "must refuse to start");
    String::from_utf8(output.stderr).unwrap()
}

/// Every retained message of `pattern` (seq, payload), through the HTTP history pages.
async fn history(broker: &Broker, pattern: &str) -> Vec<(u64, String)> {
    let client = reqwest::Client::new();
    let mut out = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let mut url = format!(
            "{}/topics/{}/messages?limit=1000",
            broker.url(),
            pattern.replace('>', "%3E")
        );
        if let Some(after) = &after {
            url.push_str(&format!("&after={after}"));
        }
        let page: serde_json::Value = client.get(url).send().await.unwrap().json().await.unwrap();
        assert!(page["gap"].is_null(), "no gap in {page}");
        for message in page["messages"].as_array().unwrap() {
            out.push((
                message["seq"].as_u64().unwrap(),
                message["payload"].as_str().unwrap().to_owned(),
            ));
        }
        if page["more"] != true {
            return out;
        }
        after = Some(page["next"].as_str().unwrap().to_owned());
    }
}

async fn publish(client: &mut PubSubClient<Channel>, topic: &str, payload: &str) -> v1::Cursor {
    client
        .publish(publish_request(topic, payload))
        .await
        .unwrap()
        .into_inner()
        .cursor
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cursor_taken_before_a_restart_resumes_with_exactly_the_missed_messages() {
    let dir = fresh_data_dir("restart");
    let addr = free_port().await;
    let broker = Broker::start(addr, &dir, &[]).await;
    let mut client = broker.grpc().await;
    let mut cursors = Vec::new();
    for i in 1..=10 {
        cursors.push(publish(&mut client, "keep.t", &format!("m{i}")).await);
    }
    let health = broker.health().await;
    let epoch = health["epoch"].as_str().unwrap().to_owned();
    assert!(
        health["log"]["bytes_on_disk"].as_u64().unwrap() > 0,
        "{health}"
    );
    assert_eq!(health["oldest_seq"], 1, "{health}");
    let metrics = reqwest::get(format!("{}/metrics", broker.url()))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for series in [
        "topichub_log_bytes_on_disk ",
        "topichub_oldest_retained_seq 1",
        "topichub_log_fsync_seconds_count ",
    ] {
        assert!(metrics.contains(series), "{series} in {metrics}");
    }
    broker.stop().await;

    let broker = Broker::start(addr, &dir, &[]).await;
    let health = broker.health().await;
    assert_eq!(health["epoch"], epoch.as_str(), "the epoch survives");
    assert_eq!(health["head"], 10, "the seq counter survives");
    let mut client = broker.grpc().await;
    let next = publish(&mut client, "keep.t", "m11").await;
    assert_eq!((next.epoch.as_str(), next.seq), (epoch.as_str(), 11));

    let mut stream = client
        .subscribe(v1::SubscribeRequest {
            topics: vec!["keep.t".into()],
            start: Some(v1::StartPosition {
                position: Some(v1::start_position::Position::After(cursors[4].clone())),
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut seen = Vec::new();
    while seen.len() < 6 {
        let event = tokio::time::timeout(WAIT, stream.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        match event.event.unwrap() {
            v1::subscribe_response::Event::Subscribed(_) => {}
            v1::subscribe_response::Event::Message(m) => seen.push((
                m.cursor.unwrap().seq,
                String::from_utf8(m.payload.to_vec()).unwrap(),
            )),
            other => panic!("no gap or lag expected: {other:?}"),
        }
    }
    let expected: Vec<(u64, String)> = (6..=11).map(|i| (i, format!("m{i}"))).collect();
    assert_eq!(seen, expected);
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_a_publish_batch_keeps_a_whole_prefix_in_order() {
    const BATCH: usize = 100_000;
    let dir = fresh_data_dir("kill-batch");
    let addr = free_port().await;
    let retain = ["--retain-messages", "1000000"];
    let broker = Broker::start(addr, &dir, &retain).await;
    // What a subscriber received was durable before it was delivered.
    let mut delivered = broker.subscribe("batch.t", 65_536).await;
    let mut client = broker.grpc().await;
    let batch = tokio::spawn(async move {
        let requests = futures_util::stream::iter(
            (0..BATCH).map(|i| publish_request("batch.t", format!("b{i:06}"))),
        );
        client.publish_batch(requests).await
    });
    let mut seen = 0u64;
    while seen < 20_000 {
        let event = tokio::time::timeout(WAIT, delivered.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        if let Some(v1::subscribe_response::Event::Message(m)) = event.event {
            seen = m.cursor.unwrap().seq;
        }
    }
    broker.kill().await;
    // Had the whole batch been acknowledged before the kill, all of it must be kept.
    let acknowledged = match batch.await.unwrap() {
        Ok(response) => response.into_inner().accepted,
        Err(_) => 0,
    };

    let broker = Broker::start(addr, &dir, &retain).await;
    let kept = history(&broker, "batch.t").await;
    assert!(
        kept.len() as u64 >= seen.max(acknowledged),
        "{} kept, {seen} were delivered, {acknowledged} acknowledged",
        kept.len()
    );
    for (i, (seq, payload)) in kept.iter().enumerate() {
        assert_eq!(*seq, i as u64 + 1, "in order, once each");
        assert_eq!(*payload, format!("b{i:06}"), "whole, never half-written");
    }
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_concurrent_publishers_keeps_every_acknowledged_message_once() {
    let dir = fresh_data_dir("kill-unary");
    let addr = free_port().await;
    let broker = Broker::start(addr, &dir, &[]).await;
    let acked: Vec<(u64, String)> = publish_concurrently_then_kill(broker, "unary.t", 3_000)
        .await
        .into_iter()
        .map(|(cursor, payload)| (cursor.seq, payload))
        .collect();

    let broker = Broker::start(addr, &dir, &[]).await;
    let kept = history(&broker, "unary.t").await;
    let mut previous = 0;
    for (seq, _) in &kept {
        assert!(*seq > previous, "in seq order, each once");
        previous = *seq;
    }
    let kept: std::collections::HashMap<u64, String> = kept.into_iter().collect();
    for (seq, payload) in &acked {
        assert_eq!(
            kept.get(seq),
            Some(payload),
            "acknowledged seq {seq} is kept whole"
        );
    }
    // Per publisher, what was kept is in the order it was published.
    let mut by_publisher: std::collections::BTreeMap<&str, Vec<(u64, &str)>> = Default::default();
    for (seq, payload) in &kept {
        by_publisher
            .entry(&payload[..3])
            .or_default()
            .push((*seq, payload));
    }
    for messages in by_publisher.values_mut() {
        messages.sort();
        assert!(
            messages.windows(2).all(|w| w[0].1 < w[1].1),
            "publisher order kept"
        );
    }
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_data_dirs_are_refused_at_start_with_a_clear_message() {
    // A newer format.
    let dir = fresh_data_dir("newer");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("FORMAT"), "topichub-log 99\n").unwrap();
    let error = refused_start(&dir).await;
    assert!(error.contains("newer topichub"), "{error}");

    // Format 1: the redb file of an older topichub, which this one cannot read.
    let dir = fresh_data_dir("older");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("FORMAT"), "topichub-log 1\n").unwrap();
    std::fs::write(dir.join("log.redb"), "").unwrap();
    let error = refused_start(&dir).await;
    assert!(error.contains("older topichub"), "{error}");
    assert!(
        error.contains("empty --data-dir"),
        "says what to do: {error}"
    );

    // Not a directory.
    let file = fresh_data_dir("file");
    std::fs::write(&file, "not a dir").unwrap();
    let error = refused_start(&file).await;
    assert!(error.contains("cannot create the data dir"), "{error}");

    // In use by another running broker.
    let dir = fresh_data_dir("locked");
    let broker = Broker::start(free_port().await, &dir, &[]).await;
    let error = refused_start(&dir).await;
    assert!(
        error.contains("in use by another running topichub"),
        "{error}"
    );
    broker.stop().await;

    // Corrupt: the file is overwritten with garbage past its header.
    let dir = fresh_data_dir("corrupt");
    let broker = Broker::start(free_port().await, &dir, &[]).await;
    let mut client = broker.grpc().await;
    for i in 0..100 {
        publish(&mut client, "c.t", &format!("{i:0100}")).await;
    }
    broker.stop().await;
    // The journal holds what was written since the last flush to tables: all of it here.
    let path = dir.join("store").join("0.jnl");
    let mut bytes = std::fs::read(&path).unwrap();
    for byte in bytes.iter_mut().skip(64) {
        *byte = 0xA5;
    }
    std::fs::write(&path, bytes).unwrap();
    let error = refused_start(&dir).await;
    assert!(
        error.contains(&path.display().to_string()),
        "names the file: {error}"
    );
    assert!(
        error.contains("topichub repair --data-dir"),
        "says how to recover: {error}"
    );
    // The recovery command says what it can do, and moves the file aside only when told to.
    let repair = |discard: bool| {
        let mut command = std::process::Command::new(BIN);
        command.args(["repair", "--data-dir"]).arg(&dir);
        if discard {
            command.arg("--discard");
        }
        command.output().unwrap()
    };
    let output = repair(false);
    assert!(!output.status.success());
    let said = String::from_utf8_lossy(&output.stderr);
    assert!(said.contains("--discard"), "{said}");
    assert!(path.exists(), "nothing moved without --discard");
    let output = repair(true);
    assert!(output.status.success(), "{output:?}");
    assert!(!path.exists(), "moved aside");
    let broker = Broker::start(free_port().await, &dir, &[]).await;
    assert_eq!(broker.health().await["head"], 0, "an empty history");
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sub_resumes_across_a_restart_with_a_data_dir_without_a_gap() {
    let dir = fresh_data_dir("cli");
    let addr = free_port().await;
    let broker = Broker::start(addr, &dir, &[]).await;
    let mut sub = Command::new(BIN)
        .args([
            "sub",
            "--server",
            &broker.url(),
            "--max-backoff",
            "200ms",
            "cli.t",
        ])
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(sub.stdout.take().unwrap()).lines();
    let mut stderr = BufReader::new(sub.stderr.take().unwrap()).lines();
    let mut stderr_until = async |needle: &str| {
        tokio::time::timeout(WAIT, async {
            loop {
                let line = stderr.next_line().await.unwrap().expect("sub is running");
                assert!(!line.contains("gap"), "no gap expected: {line}");
                if line.contains(needle) {
                    return;
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("sub never logged {needle:?}"))
    };
    stderr_until("subscribed").await;
    let mut client = broker.grpc().await;
    publish(&mut client, "cli.t", "before").await;
    let line = tokio::time::timeout(WAIT, stdout.next_line())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(line.as_deref(), Some("before"));
    broker.stop().await;
    stderr_until("reconnecting in").await;

    let broker = Broker::start(addr, &dir, &[]).await;
    stderr_until("subscribed").await;
    let mut client = broker.grpc().await;
    publish(&mut client, "cli.t", "after").await;
    let line = tokio::time::timeout(WAIT, stdout.next_line())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        line.as_deref(),
        Some("after"),
        "nothing replayed twice, nothing lost"
    );
    drop(stdout);
    broker.stop().await;
}

/// A small tmpfs mounted at a fresh directory; unmounted on drop. `None` where mounting is not
/// allowed.
struct SmallFs(std::path::PathBuf);

impl SmallFs {
    fn mount(size: &str) -> Option<SmallFs> {
        let dir = fresh_data_dir("small-fs");
        std::fs::create_dir_all(&dir).unwrap();
        let mounted = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&dir)
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        mounted.then(|| SmallFs(dir))
    }

    fn resize(&self, size: &str) {
        let status = std::process::Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(&self.0)
            .status()
            .unwrap();
        assert!(status.success());
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_refuses_publishes_clearly_and_recovers_by_itself() {
    let Some(fs) = SmallFs::mount("4m") else {
        eprintln!(
            "SKIPPED: cannot mount a small tmpfs here (needs root); disk-full handling untested"
        );
        return;
    };
    let dir = fs.0.join("data");
    let addr = free_port().await;
    let broker = Broker::start(addr, &dir, &[]).await;
    let mut delivered = broker.subscribe("full.t", 4096).await;
    let http = reqwest::Client::new();
    let payload = "x".repeat(64 * 1024);
    let publish = |payload: String| {
        http.post(format!("{}/topics/full.t", broker.url()))
            .body(payload)
            .send()
    };
    // Fill the file system.
    let mut accepted = 0;
    let refusal = loop {
        let response = publish(payload.clone()).await.unwrap();
        if response.status() != 200 {
            break response;
        }
        accepted += 1;
        assert!(accepted < 1000, "a 4 MiB file system cannot take 64 MiB");
    };
    assert_eq!(refusal.status(), 503);
    let body: serde_json::Value = refusal.json().await.unwrap();
    assert_eq!(body["error"]["code"], "UNAVAILABLE");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("could not be stored"), "{message}");
    assert!(message.contains("No space left"), "says why: {message}");
    let health = broker.health().await;
    assert!(health["log"]["failing"].is_string(), "{health}");
    // gRPC publishers get UNAVAILABLE. (After a failed write the store reopens and drops the
    // torn batch, which may free room for one more message before the disk is full again.)
    let mut client = broker.grpc().await;
    let status = loop {
        match client
            .publish(publish_request("full.t", payload.clone()))
            .await
        {
            Ok(_) => accepted += 1,
            Err(status) => break status,
        }
        assert!(accepted < 1000, "the disk stays full");
    };
    assert_eq!(status.code(), tonic::Code::Unavailable);

    // The subscriber received every accepted message and is still served.
    let mut received = 0;
    while received < accepted {
        let event = tokio::time::timeout(WAIT, delivered.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        if let Some(v1::subscribe_response::Event::Message(_)) = event.event {
            received += 1;
        }
    }

    // Space returns: publishing resumes by itself and reaches the subscriber.
    fs.resize("64m");
    let response = publish("back".into()).await.unwrap();
    assert_eq!(response.status(), 200, "{:?}", response.text().await);
    loop {
        let event = tokio::time::timeout(WAIT, delivered.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        if let Some(v1::subscribe_response::Event::Message(m)) = event.event {
            assert_eq!(&m.payload[..], b"back");
            break;
        }
    }
    assert!(broker.health().await["log"]["failing"].is_null());
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_fsync_every_a_graceful_stop_loses_nothing() {
    let dir = fresh_data_dir("every");
    let addr = free_port().await;
    // An interval long enough that nothing is synced on its account during the test.
    let every = ["--fsync", "every=1h"];
    let broker = Broker::start(addr, &dir, &every).await;
    let mut client = broker.grpc().await;
    for i in 1..=20 {
        publish(&mut client, "every.t", &format!("m{i}")).await;
    }
    broker.stop().await;
    let broker = Broker::start(addr, &dir, &every).await;
    let kept = history(&broker, "every.t").await;
    let expected: Vec<(u64, String)> = (1..=20).map(|i| (i, format!("m{i}"))).collect();
    assert_eq!(kept, expected, "a graceful stop syncs first");
    let mut client = broker.grpc().await;
    let next = publish(&mut client, "every.t", "m21").await;
    assert_eq!(next.seq, 21, "the seq counter goes on");
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_fsync_every_a_sigkill_loses_nothing_acknowledged() {
    let dir = fresh_data_dir("every-kill");
    let addr = free_port().await;
    // No sync is due during the test: only what the OS was handed can survive the kill.
    let every = ["--fsync", "every=1h"];
    let broker = Broker::start(addr, &dir, &every).await;
    let acked = publish_concurrently_then_kill(broker, "every.t", 2_000).await;
    let epoch = acked[0].0.epoch.clone();
    let newest = acked.iter().map(|(c, _)| c.seq).max().unwrap();

    let broker = Broker::start(addr, &dir, &every).await;
    assert_eq!(broker.health().await["epoch"], epoch.as_str());
    let kept: std::collections::HashMap<u64, String> =
        history(&broker, "every.t").await.into_iter().collect();
    for (cursor, payload) in &acked {
        assert_eq!(
            kept.get(&cursor.seq),
            Some(payload),
            "acknowledged seq {} survives the kill",
            cursor.seq
        );
    }
    // A cursor from before the kill resumes without a gap: nothing is presumed lost.
    let page: serde_json::Value = reqwest::get(format!(
        "{}/topics/every.t/messages?after={epoch}-{}&limit=10",
        broker.url(),
        newest / 2
    ))
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    assert!(page["gap"].is_null(), "{page}");
    assert_eq!(page["messages"][0]["seq"], newest / 2 + 1, "{page}");
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_evicts_on_disk_and_gaps_stay_exact_across_a_sigkill() {
    let dir = fresh_data_dir("retention");
    let addr = free_port().await;
    let retain = ["--retain-messages", "10"];
    let broker = Broker::start(addr, &dir, &retain).await;
    let mut client = broker.grpc().await;
    let mut epoch = String::new();
    for i in 1..=30 {
        epoch = publish(&mut client, "ret.a", &format!("a{i}")).await.epoch;
    }
    for i in 31..=35 {
        publish(&mut client, "ret.b", &format!("b{i}")).await;
    }
    broker.kill().await;

    // A larger retention now: what was evicted must be gone from disk, not merely evicted again.
    let broker = Broker::start(addr, &dir, &["--retain-messages", "1000"]).await;
    let kept = history(&broker, "ret.a").await;
    let expected: Vec<(u64, String)> = (21..=30).map(|i| (i, format!("a{i}"))).collect();
    assert_eq!(kept, expected, "evicted messages stay evicted");
    assert_eq!(history(&broker, "ret.b").await.len(), 5);
    // The eviction mark survives: a cursor before it is told exactly what is gone.
    let page: serde_json::Value = reqwest::get(format!(
        "{}/topics/ret.a/messages?after={epoch}-5",
        broker.url()
    ))
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    assert_eq!(page["gap"]["reason"], "retention", "{page}");
    assert_eq!(page["gap"]["from_seq"], 6, "{page}");
    assert_eq!(page["gap"]["to_seq"], 20, "{page}");
    broker.stop().await;
}

/// Runs [`PUBLISHERS`] concurrent unary publishers on `topic` until `at_least` publishes are
/// acknowledged, SIGKILLs the broker mid-stream, and returns every acknowledgement (those
/// already on their way when it died count too) with the payload it acknowledged.
async fn publish_concurrently_then_kill(
    broker: Broker,
    topic: &'static str,
    at_least: usize,
) -> Vec<(v1::Cursor, String)> {
    let (acked_tx, mut acked_rx) = tokio::sync::mpsc::unbounded_channel();
    for p in 0..PUBLISHERS {
        let mut client = broker.grpc().await;
        let acked = acked_tx.clone();
        tokio::spawn(async move {
            for i in 0.. {
                let payload = format!("p{p:02}-{i:06}");
                match client
                    .publish(publish_request(topic, payload.clone()))
                    .await
                {
                    Ok(response) => {
                        let cursor = response.into_inner().cursor.unwrap();
                        if acked.send((cursor, payload)).is_err() {
                            return;
                        }
                    }
                    Err(_) => return,
                }
            }
        });
    }
    drop(acked_tx);
    let mut acked = Vec::new();
    while acked.len() < at_least {
        acked.push(
            tokio::time::timeout(WAIT, acked_rx.recv())
                .await
                .unwrap()
                .unwrap(),
        );
    }
    broker.kill().await;
    while let Some(ack) = acked_rx.recv().await {
        acked.push(ack);
    }
    acked
}

/// Concurrent publishers in the SIGKILL tests.
const PUBLISHERS: usize = 16;

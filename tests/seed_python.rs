//! The seed's `proto.PubSubService` with a client generated only from proto/seed/pubsub.proto, in
//! another language: tests/python/seed_client.py (grpcio), run against a broker in this test.
//!
//! The script does the seed-side checks itself (reflection, bad input, seed round trips, wildcard,
//! binary payloads) and announces every seed publish to `seed.py`; this test checks that each one
//! reaches a topichub.v1 subscriber and an SSE subscriber byte for byte, then publishes through
//! HTTP/JSON and topichub.v1 and has the script confirm its seed subscriptions received them. The
//! line protocol is described at the top of the script.
//!
//! Needs the Python client installed by `scripts/deps-python.sh` (into `.venv`); without it the
//! test fails rather than skips, so CI cannot pass without running it.

mod support;

use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use base64::Engine as _;
use support::{Sse, SseEvent, WAIT, spawn_broker, within};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};
use tokio::task::JoinHandle;
use tonic::Streaming;
use topichub::proto::v1::{self, PublishRequest, SubscribeRequest, subscribe_response};

/// The topic the script publishes to and subscribes to (exactly, and as `seed.*`).
const TOPIC: &str = "seed.py";

/// How long to wait for the script's next line: longer than its own 10 s bounds, so that its
/// precise assertion arrives before this test gives up on it.
const SCRIPT_WAIT: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_seed_client_interoperates_with_every_door() {
    let python = venv_python();
    let broker = spawn_broker().await;
    let url = broker.url();

    // Watchers of the script's topic on the other doors.
    let mut v1_stream = broker
        .grpc()
        .await
        .subscribe(SubscribeRequest {
            topics: vec![TOPIC.into()],
            ..Default::default()
        })
        .await
        .expect("topichub.v1 Subscribe")
        .into_inner();
    match within("topichub.v1 subscribed", v1_stream.message()).await {
        Ok(Some(v1::SubscribeResponse {
            event: Some(subscribe_response::Event::Subscribed(_)),
        })) => {}
        other => panic!("expected the subscribed event first, got {other:?}"),
    }
    let mut sse = Sse::open(&url, &format!("/subscribe?topic={TOPIC}"), &[]).await;
    sse.expect("subscribed").await;
    broker.wait_for_subscribers(2).await;

    let mut script = Script::spawn(&python, &broker.addr.to_string());

    // Seed publishes (Python) -> topichub.v1 and SSE (Rust), until the script is READY.
    let mut published = Vec::new();
    let mut subscribed = Vec::new();
    loop {
        let line = script.next_line().await;
        let words: Vec<&str> = line.split(' ').collect();
        match words[..] {
            ["PASS", ..] => {}
            ["SUBSCRIBED", pattern] => subscribed.push(pattern.to_owned()),
            ["PUBLISHED", topic, hex] => {
                assert_eq!(
                    topic, TOPIC,
                    "the script announces only publishes to {TOPIC}"
                );
                let payload = unhex(hex);
                let v1_message = next_v1_message(&mut v1_stream).await;
                assert_eq!(v1_message.topic, TOPIC);
                assert_eq!(
                    v1_message.payload.as_ref(),
                    payload,
                    "topichub.v1 received a different payload than the seed client published"
                );
                let sse_message = next_sse_message(&mut sse).await;
                assert_eq!(sse_message.json()["topic"], TOPIC);
                assert_eq!(
                    sse_payload(&sse_message),
                    payload,
                    "SSE payload of {sse_message:?}"
                );
                let seq = v1_message.cursor.expect("cursor").seq;
                assert_eq!(
                    sse_message.json()["seq"],
                    seq,
                    "one message, one seq on every door"
                );
                published.push(payload);
            }
            ["READY"] => break,
            _ => script.fail(&format!("unexpected line {line:?}")).await,
        }
    }
    assert_eq!(
        subscribed,
        ["seed.py", "seed.*"],
        "the script's seed subscriptions"
    );
    assert!(
        published.len() >= 3,
        "text, binary and marker publishes, got {published:?}"
    );
    assert!(
        published.iter().any(|p| std::str::from_utf8(p).is_err()),
        "a non-UTF-8 payload went through the seed Publish"
    );

    // HTTP/JSON and topichub.v1 publishes (Rust) -> the script's seed subscriptions.
    broker.wait_for_subscribers(4).await;
    let http_payload = "published over HTTP/JSON";
    support::http_publish(&url, TOPIC, http_payload).await;
    script.expect_received(http_payload.as_bytes()).await;

    let v1_payload: &[u8] = b"\xfftopichub.v1 binary\x00\xc3\x28";
    broker
        .grpc()
        .await
        .publish(PublishRequest {
            topic: TOPIC.into(),
            payload: v1_payload.to_vec().into(),
            ..Default::default()
        })
        .await
        .expect("topichub.v1 Publish");
    script.expect_received(v1_payload).await;

    // The Rust watchers saw the same two, in order, and nothing of the script's other topics.
    for expected in [http_payload.as_bytes(), v1_payload] {
        assert_eq!(
            next_v1_message(&mut v1_stream).await.payload.as_ref(),
            expected
        );
        assert_eq!(sse_payload(&next_sse_message(&mut sse).await), expected);
    }

    let output = script.finish().await;
    assert!(
        output.ends_with("DONE\n"),
        "the script ends with DONE:\n{output}"
    );
    // The script's seed streams were cancelled, and the hub let go of them.
    broker.wait_for_subscribers(2).await;
    broker.stop().await;
}

/// `.venv/bin/python` of this repository; fails (never skips) when it is missing.
fn venv_python() -> PathBuf {
    let python = repo().join(".venv/bin/python");
    assert!(
        python.exists(),
        "{} is missing: run scripts/deps-python.sh to install the Python gRPC client this test runs",
        python.display()
    );
    python
}

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The next topichub.v1 message (no gap or lag notices are expected here).
async fn next_v1_message(stream: &mut Streaming<v1::SubscribeResponse>) -> v1::Message {
    match within("topichub.v1 message", stream.message()).await {
        Ok(Some(v1::SubscribeResponse {
            event: Some(subscribe_response::Event::Message(m)),
        })) => m,
        other => panic!("expected a topichub.v1 message, got {other:?}"),
    }
}

/// The next SSE event, which must be a message.
async fn next_sse_message(sse: &mut Sse) -> SseEvent {
    sse.expect("message").await
}

/// The payload of an SSE message: text as `payload`, anything not UTF-8 as `payload_base64`.
fn sse_payload(event: &SseEvent) -> Vec<u8> {
    let data = event.json();
    match (&data["payload"], &data["payload_base64"]) {
        (serde_json::Value::String(text), serde_json::Value::Null) => text.as_bytes().to_vec(),
        (serde_json::Value::Null, serde_json::Value::String(b64)) => {
            base64::engine::general_purpose::STANDARD
                .decode(b64)
                .expect("payload_base64 is base64")
        }
        _ => panic!("an SSE message has either payload (a string here) or payload_base64: {data}"),
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Vec<u8> {
    assert!(text.len().is_multiple_of(2), "odd-length hex {text:?}");
    (0..text.len())
        .step_by(2)
        .map(|i| {
            u8::from_str_radix(&text[i..i + 2], 16).unwrap_or_else(|_| panic!("bad hex {text:?}"))
        })
        .collect()
}

/// tests/python/seed_client.py as a child process, spoken to in lines over stdin/stdout. Every
/// failure shows everything it printed, stderr included.
struct Script {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: Lines<BufReader<ChildStdout>>,
    stderr: Option<JoinHandle<String>>,
    transcript: String,
}

impl Script {
    fn spawn(python: &Path, target: &str) -> Script {
        let mut child = Command::new(python)
            .arg(repo().join("tests/python/seed_client.py"))
            .arg(target)
            .env("PYTHONUNBUFFERED", "1")
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", python.display()));
        let mut stderr = child.stderr.take().unwrap();
        let stderr = tokio::spawn(async move {
            let mut text = String::new();
            let _ = stderr.read_to_string(&mut text).await;
            text
        });
        Script {
            stdin: child.stdin.take(),
            stdout: BufReader::new(child.stdout.take().unwrap()).lines(),
            stderr: Some(stderr),
            child,
            transcript: String::new(),
        }
    }

    /// The script's next stdout line; fails the test if it ends or stalls instead.
    async fn next_line(&mut self) -> String {
        match tokio::time::timeout(SCRIPT_WAIT, self.stdout.next_line()).await {
            Ok(Ok(Some(line))) => {
                self.transcript.push_str(&line);
                self.transcript.push('\n');
                line
            }
            Ok(Ok(None)) => self.fail("the script ended early").await,
            Ok(Err(e)) => {
                self.fail(&format!("reading the script's output: {e}"))
                    .await
            }
            Err(_) => {
                self.fail(&format!("the script printed nothing for {SCRIPT_WAIT:?}"))
                    .await
            }
        }
    }

    /// Tells the script that `payload` was published to its topic, and waits until each of its
    /// two seed subscriptions reports receiving it.
    async fn expect_received(&mut self, payload: &[u8]) {
        let command = format!("EXPECT {}\n", hex(payload));
        let written = self
            .stdin
            .as_mut()
            .expect("stdin open")
            .write_all(command.as_bytes())
            .await;
        if let Err(e) = written {
            self.fail(&format!("writing to the script: {e}")).await;
        }
        for pattern in ["seed.py", "seed.*"] {
            let line = self.next_line().await;
            if line != format!("RECEIVED {pattern} {}", hex(payload)) {
                self.fail(&format!(
                    "expected {pattern} to receive {}, got {line:?}",
                    hex(payload)
                ))
                .await;
            }
        }
    }

    /// Closes stdin, reads the rest of the output and requires exit status 0; returns the output.
    async fn finish(mut self) -> String {
        drop(self.stdin.take());
        loop {
            match tokio::time::timeout(SCRIPT_WAIT, self.stdout.next_line()).await {
                Ok(Ok(Some(line))) => {
                    self.transcript.push_str(&line);
                    self.transcript.push('\n');
                }
                Ok(Ok(None)) => break,
                _ => {
                    self.fail("the script did not finish after stdin closed")
                        .await
                }
            }
        }
        let (status, stderr) = self.exit().await;
        assert!(
            status.is_some_and(|s| s.success()),
            "the Python seed client failed ({status:?})\n--- stdout ---\n{}--- stderr ---\n{stderr}",
            self.transcript
        );
        self.transcript
    }

    /// Fails the test with `why` and everything the script printed.
    async fn fail(&mut self, why: &str) -> ! {
        let (status, stderr) = self.exit().await;
        panic!(
            "Python seed client: {why} (exit: {status:?})\n--- stdout ---\n{}--- stderr ---\n{stderr}",
            self.transcript
        );
    }

    /// Waits (bounded) for the script to exit, killing it if it does not; returns its status and stderr.
    async fn exit(&mut self) -> (Option<ExitStatus>, String) {
        drop(self.stdin.take());
        let status = match tokio::time::timeout(WAIT, self.child.wait()).await {
            Ok(status) => status.ok(),
            Err(_) => {
                let _ = self.child.kill().await;
                None
            }
        };
        let stderr = match self.stderr.take() {
            Some(task) => within("the script's stderr", task)
                .await
                .unwrap_or_default(),
            None => String::new(),
        };
        (status, stderr)
    }
}

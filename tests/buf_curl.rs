//! `buf curl`, a real third-party gRPC client (HTTP/2 with prior knowledge, schema from server
//! reflection), against a broker: list services and methods, unary Publish, a server stream read
//! until the expected messages arrive, and the health check.
//!
//! `buf` comes from `web/node_modules` (`@bufbuild/buf`, pinned in `web/package-lock.json`;
//! `web/node_modules/.bin/buf` or `npx buf` from `web/`); install it with
//! `scripts/deps-node.sh`. The command lines are defined once, in [`CALLS`], and
//! printed before they run; with the broker on its default address they read:
//!
//! ```text
//! buf curl --protocol grpc --http2-prior-knowledge --list-services http://127.0.0.1:8080
//! buf curl --protocol grpc --http2-prior-knowledge --list-methods http://127.0.0.1:8080
//! buf curl --protocol grpc --http2-prior-knowledge -d '{"topic":"buf.demo","payload":"aGVsbG8="}' http://127.0.0.1:8080/topichub.v1.PubSub/Publish
//! buf curl --protocol grpc --http2-prior-knowledge -d '{"topics":["buf.>"],"start":{"earliest":true}}' http://127.0.0.1:8080/topichub.v1.PubSub/Subscribe
//! buf curl --protocol grpc --http2-prior-knowledge -d '{"topic":"buf.seed","payload":"aGk="}' http://127.0.0.1:8080/proto.PubSubService/Publish
//! buf curl --protocol grpc --http2-prior-knowledge http://127.0.0.1:8080/grpc.health.v1.Health/Check
//! ```

mod support;

use std::path::PathBuf;
use std::process::{Output, Stdio};

use base64::Engine as _;
use serde_json::Value;
use support::{http_publish, spawn_broker, within};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

/// Flags shared by every call: gRPC over cleartext HTTP/2 (h2c, prior knowledge).
const PROTOCOL: [&str; 4] = ["curl", "--protocol", "grpc", "--http2-prior-knowledge"];

/// One `buf curl` invocation: extra flags, and the path after the base URL.
struct Call {
    flags: &'static [&'static str],
    path: &'static str,
}

const LIST_SERVICES: Call = Call {
    flags: &["--list-services"],
    path: "",
};
const LIST_METHODS: Call = Call {
    flags: &["--list-methods"],
    path: "",
};
const PUBLISH: Call = Call {
    flags: &["-d", r#"{"topic":"buf.demo","payload":"aGVsbG8="}"#],
    path: "/topichub.v1.PubSub/Publish",
};
const SUBSCRIBE: Call = Call {
    flags: &["-d", r#"{"topics":["buf.>"],"start":{"earliest":true}}"#],
    path: "/topichub.v1.PubSub/Subscribe",
};
const SEED_PUBLISH: Call = Call {
    flags: &["-d", r#"{"topic":"buf.seed","payload":"aGk="}"#],
    path: "/proto.PubSubService/Publish",
};
const HEALTH: Call = Call {
    flags: &[],
    path: "/grpc.health.v1.Health/Check",
};

/// Every call, in the order the README shows them.
const CALLS: [&Call; 6] = [
    &LIST_SERVICES,
    &LIST_METHODS,
    &PUBLISH,
    &SUBSCRIBE,
    &SEED_PUBLISH,
    &HEALTH,
];

/// The native `buf` binary that npm installed under `web/node_modules` (`@bufbuild/buf` pulls
/// in the package for this platform, e.g. `@bufbuild/buf-linux-x64`). Not `node_modules/.bin/buf`:
/// unless npm ran the package's install script, that is a node wrapper that spawns the binary,
/// and killing the wrapper would leave a streaming `buf curl` running. Fails the test with the
/// install command when buf is missing.
fn buf() -> PathBuf {
    let os = match std::env::consts::OS {
        "macos" => "darwin",
        other => other,
    };
    let arch = match (os, std::env::consts::ARCH) {
        (_, "x86_64") => "x64",
        ("darwin", "aarch64") => "arm64",
        (_, other) => other,
    };
    let buf = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(format!(
        "web/node_modules/@bufbuild/buf-{os}-{arch}/bin/buf"
    ));
    assert!(
        buf.exists(),
        "{} not found: run `scripts/deps-node.sh` (or `npm ci` in web/) to install buf",
        buf.display()
    );
    buf
}

impl Call {
    /// The arguments after `buf`, for a broker at `base` (`http://HOST:PORT`).
    fn args(&self, base: &str) -> Vec<String> {
        PROTOCOL
            .iter()
            .chain(self.flags)
            .map(|s| s.to_string())
            .chain([format!("{base}{}", self.path)])
            .collect()
    }

    /// The command line as one would type it in a shell.
    fn shell(&self, base: &str) -> String {
        std::iter::once("buf".to_string())
            .chain(self.args(base).into_iter().map(|a| shell_quote(&a)))
            .collect::<Vec<_>>()
            .join(" ")
    }

    fn command(&self, base: &str) -> Command {
        println!("$ {}", self.shell(base));
        let mut command = Command::new(buf());
        command
            .args(self.args(base))
            .stdin(Stdio::null())
            .kill_on_drop(true);
        command
    }

    /// Runs a call that ends by itself; returns stdout, failing the test on a non-zero exit.
    async fn run(&self, base: &str) -> String {
        let output: Output = within(
            "buf curl",
            self.command(base).stderr(Stdio::piped()).output(),
        )
        .await
        .expect("run buf");
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        assert!(
            output.status.success(),
            "`{}` failed ({}):\nstdout: {stdout}\nstderr: {}",
            self.shell(base),
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
        print!("{stdout}");
        stdout
    }

    /// Runs a unary call and parses its JSON answer.
    async fn json(&self, base: &str) -> Value {
        let stdout = self.run(base).await;
        serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {stdout}"))
    }
}

fn shell_quote(arg: &str) -> String {
    if arg
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "-_./:=".contains(c))
    {
        arg.to_string()
    } else {
        format!("'{}'", arg.replace('\'', r"'\''"))
    }
}

fn b64(text: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(text)
}

/// The README's command lines (default address), so they can be copied from the test output.
#[test]
fn print_readme_commands() {
    for call in CALLS {
        println!("{}", call.shell("http://127.0.0.1:8080"));
    }
    assert!(
        SUBSCRIBE
            .shell("http://127.0.0.1:8080")
            .contains(r#"'{"topics":["buf.>"],"#)
    );
}

#[tokio::test]
async fn reflection_lists_every_service_and_method() {
    let broker = spawn_broker().await;
    let services = LIST_SERVICES.run(&broker.url()).await;
    let services: Vec<&str> = services.lines().collect();
    for expected in [
        "topichub.v1.PubSub",
        "proto.PubSubService",
        "grpc.health.v1.Health",
    ] {
        assert!(
            services.contains(&expected),
            "{expected} missing from {services:?}"
        );
    }

    let methods = LIST_METHODS.run(&broker.url()).await;
    let methods: Vec<&str> = methods.lines().collect();
    for expected in [
        "topichub.v1.PubSub/Publish",
        "topichub.v1.PubSub/PublishBatch",
        "topichub.v1.PubSub/Subscribe",
        "topichub.v1.PubSub/Connect",
        "topichub.v1.PubSub/Unsubscribe",
        "topichub.v1.PubSub/ListTopics",
        "proto.PubSubService/Publish",
        "proto.PubSubService/Subscribe",
        "grpc.health.v1.Health/Check",
    ] {
        assert!(
            methods.contains(&expected),
            "{expected} missing from {methods:?}"
        );
    }
    broker.stop().await;
}

#[tokio::test]
async fn unary_publish_returns_a_cursor() {
    let broker = spawn_broker().await;
    let answer = PUBLISH.json(&broker.url()).await;
    let epoch = answer["cursor"]["epoch"].as_str().expect("cursor.epoch");
    assert!(!epoch.is_empty());
    // uint64 is a JSON string in the protobuf JSON mapping.
    assert_eq!(answer["cursor"]["seq"], "1", "{answer}");

    // The seed service's Publish too (answers google.protobuf.Empty).
    assert_eq!(
        SEED_PUBLISH.json(&broker.url()).await,
        serde_json::json!({})
    );

    // Both reached the hub: read them back over HTTP.
    for (topic, payload) in [("buf.demo", "hello"), ("buf.seed", "hi")] {
        let history: Value = reqwest::get(format!("{}/topics/{topic}/messages", broker.url()))
            .await
            .expect("history request")
            .json()
            .await
            .expect("history JSON");
        assert_eq!(history["messages"][0]["payload"], payload, "{history}");
    }
    broker.stop().await;
}

#[tokio::test]
async fn server_stream_replays_then_follows_live() {
    let broker = spawn_broker().await;
    let url = broker.url();
    PUBLISH.run(&url).await; // buf.demo "hello", replayed by `earliest`

    // Subscribe streams until killed: read its stdout (one pretty-printed JSON document per
    // event) until the expected messages have arrived.
    let mut child = SUBSCRIBE
        .command(&url)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn buf curl");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut buffer = String::new();
    let mut next_event = async || -> Value {
        within("next event from buf curl", async {
            loop {
                // Complete documents so far; an unfinished one waits for more lines.
                let mut documents =
                    serde_json::Deserializer::from_str(&buffer).into_iter::<Value>();
                if let Some(Ok(event)) = documents.next() {
                    let used = documents.byte_offset();
                    buffer.drain(..used);
                    return event;
                }
                let line = lines
                    .next_line()
                    .await
                    .expect("read buf curl output")
                    .expect("buf curl ended before the expected events");
                println!("{line}");
                buffer.push_str(&line);
                buffer.push('\n');
            }
        })
        .await
    };

    let subscribed = next_event().await;
    assert!(
        subscribed["subscribed"]["subscriptionId"].is_string(),
        "{subscribed}"
    );
    let replayed = next_event().await;
    assert_eq!(replayed["message"]["topic"], "buf.demo", "{replayed}");
    assert_eq!(replayed["message"]["payload"], b64("hello"));
    assert_eq!(replayed["message"]["cursor"]["seq"], "1");

    // Live: published over HTTP while the stream is open.
    let published = http_publish(&url, "buf.live", "world").await;
    let live = next_event().await;
    assert_eq!(live["message"]["topic"], "buf.live", "{live}");
    assert_eq!(live["message"]["payload"], b64("world"));
    assert_eq!(
        live["message"]["cursor"]["seq"],
        published["seq"].to_string()
    );

    child.kill().await.expect("kill buf curl");
    broker.stop().await;
}

#[tokio::test]
async fn health_check_is_serving() {
    let broker = spawn_broker().await;
    assert_eq!(
        HEALTH.json(&broker.url()).await,
        serde_json::json!({"status": "SERVING"})
    );
    broker.stop().await;
}

//! API conformance: schemathesis fuzzes the HTTP API of a broker from the OpenAPI document the
//! broker serves (`/openapi.json`, the committed openapi/openapi.json) and checks every response
//! against it, with all of its checks: no server errors, documented status codes, content types,
//! headers and response schemas (SSE events included), schema-valid requests accepted and
//! schema-violating ones rejected, unsupported methods answered 405, and more. A failure here is a
//! mismatch between the API and its documentation: fix whichever side is wrong.
//!
//! The run is reproducible: a fixed seed and a fixed example budget per operation, nothing kept
//! between runs (tests/python/schemathesis.toml, which also explains how the never-ending SSE
//! stream of `GET /subscribe` is tested). For a longer exploration set `SCHEMATHESIS_MAX_EXAMPLES`
//! (e.g. 300) and `SCHEMATHESIS_SEED`.
//!
//! Needs schemathesis installed by `scripts/deps-python.sh` (into `.venv`); without it the test
//! fails rather than skips, so CI cannot pass without running it.

mod support;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use support::spawn_broker;

/// Examples per operation and phase: the default budget finishes in well under a minute.
const MAX_EXAMPLES: &str = "50";
/// Any fixed seed makes the run repeatable; change it to explore other inputs.
const SEED: &str = "1";
/// Upper bound of the whole schemathesis run, so a hang fails the test instead of stalling CI.
const RUN_LIMIT: Duration = Duration::from_secs(600);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_api_conforms_to_its_openapi_document() {
    let schemathesis = venv_schemathesis();
    let broker = spawn_broker().await;
    let max_examples = env_or("SCHEMATHESIS_MAX_EXAMPLES", MAX_EXAMPLES);
    let seed = env_or("SCHEMATHESIS_SEED", SEED);
    // schemathesis and Hypothesis write their working files into the current directory.
    let work = Path::new(env!("CARGO_TARGET_TMPDIR")).join("schemathesis");
    std::fs::create_dir_all(&work).expect("create the schemathesis working directory");

    let run = tokio::process::Command::new(&schemathesis)
        .arg("--config-file")
        .arg(repo().join("tests/python/schemathesis.toml"))
        .arg("--no-color")
        .arg("run")
        .arg(format!("{}/openapi.json", broker.url()))
        .args(["--checks", "all"])
        // A deleted topic's name stays valid: see tests/python/schemathesis.toml.
        .args(["--exclude-checks", "use_after_free"])
        .args(["--seed", &seed])
        .args(["--max-examples", &max_examples])
        .current_dir(&work)
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(RUN_LIMIT, run)
        .await
        .unwrap_or_else(|_| panic!("schemathesis did not finish within {RUN_LIMIT:?}"))
        .unwrap_or_else(|e| panic!("start {}: {e}", schemathesis.display()));
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    let report = format!("--- stdout ---\n{stdout}--- stderr ---\n{stderr}");
    assert!(
        output.status.success(),
        "schemathesis failed ({}): below, each mismatch between the HTTP API and its OpenAPI \
         document comes with a curl command that reproduces it\n{report}",
        output.status
    );
    let (operations, upgrades) = operation_count();
    let total = operations + upgrades;
    assert!(
        stdout.contains(&format!("Selected: {operations}/{total}"))
            && stdout.contains(&format!("Tested: {operations}\n")),
        "schemathesis should test all {operations} HTTP operations of the document\n{report}"
    );
    // The totals, for the log (`cargo test -- --nocapture`).
    if let Some(cases) = stdout.lines().find(|l| l.contains(" generated, ")) {
        println!(
            "schemathesis (seed {seed}, {max_examples} examples): {}",
            cases.trim()
        );
    }
    broker.stop().await;
}

/// `.venv/bin/schemathesis` of this repository; fails (never skips) when it is missing.
fn venv_schemathesis() -> PathBuf {
    let schemathesis = repo().join(".venv/bin/schemathesis");
    assert!(
        schemathesis.exists(),
        "{} is missing: run scripts/deps-python.sh to install schemathesis (tests/python/requirements-api.txt), which this test runs",
        schemathesis.display()
    );
    schemathesis
}

/// Operations (path and method pairs) in the OpenAPI document: those schemathesis tests, and the
/// WebSocket upgrades (answered 101), which the configuration leaves to tests/ws.rs.
fn operation_count() -> (usize, usize) {
    let document = serde_json::to_value(topichub::http::openapi()).expect("OpenAPI as JSON");
    const METHODS: [&str; 8] = [
        "get", "put", "post", "delete", "options", "head", "patch", "trace",
    ];
    let operations: Vec<&serde_json::Value> = document["paths"]
        .as_object()
        .expect("paths")
        .values()
        .flat_map(|item| METHODS.iter().filter_map(|m| item.get(*m)))
        .collect();
    let upgrades = operations
        .iter()
        .filter(|o| o["responses"].get("101").is_some())
        .count();
    (operations.len() - upgrades, upgrades)
}

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_owned())
}

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

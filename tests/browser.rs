//! Real-browser tests: runs `tests/browser/browser.test.mjs` (node + playwright-core driving
//! Debian's Chromium) against the `topichub` binary of this build, and fails if it fails.
//!
//! The JS test starts the broker itself as a child process on a free port (it has to restart it
//! on the same port to check that pages reconnect), so this wrapper only passes the binary path
//! and the artifacts directory, bounds the run, and forwards the output.
//!
//! Prerequisites, installed by `scripts/deps-node.sh`: `/usr/bin/chromium` (Debian package) and
//! `web/node_modules` (`npm ci` in `web/`). Missing prerequisites fail the test with that hint.
//! Screenshots (one per step), the browser console and the broker log end up in
//! `target/test-artifacts/browser/` (override with `ARTIFACTS_DIR`).

use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

/// Upper bound for the whole browser run (the JS side gives up by itself at 150 s).
const TIMEOUT: Duration = Duration::from_secs(180);
/// How to install what is missing.
const INSTALL_HINT: &str =
    "run `scripts/deps-node.sh` (as root: installs Debian chromium and runs `npm ci` in web/)";

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Fails the test with an install hint unless chromium, node and web/node_modules are there.
fn check_prerequisites() {
    let chromium = std::env::var_os("CHROMIUM")
        .map_or_else(|| PathBuf::from("/usr/bin/chromium"), PathBuf::from);
    assert!(
        chromium.exists(),
        "browser test: {} not found; {INSTALL_HINT}",
        chromium.display()
    );
    let node = Command::new("node").arg("--version").output();
    assert!(
        node.as_ref().is_ok_and(|o| o.status.success()),
        "browser test: `node` not found on PATH (Node.js 20 is needed); then {INSTALL_HINT}"
    );
    let web = root().join("web");
    for package in [
        "playwright-core",
        "@connectrpc/connect-node",
        "@bufbuild/protobuf",
    ] {
        let dir = web.join("node_modules").join(package);
        assert!(
            dir.is_dir(),
            "browser test: {} is missing; {INSTALL_HINT}",
            dir.display()
        );
    }
    // npm writes node_modules/.package-lock.json on every install: older than the lock file
    // means the lock changed since (a pull); the test may still pass, so only warn.
    let modified = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    if let (Some(installed), Some(locked)) = (
        modified(&web.join("node_modules/.package-lock.json")),
        modified(&web.join("package-lock.json")),
    ) && installed < locked
    {
        eprintln!(
            "browser test: warning: web/node_modules is older than web/package-lock.json; {INSTALL_HINT}"
        );
    }
}

/// Copies a child's output into the test's output, line by line (captured by the test harness
/// like any `println!`, shown on failure or with `--nocapture`).
fn forward(stream: impl Read + Send + 'static, to_stderr: bool) -> thread::JoinHandle<()> {
    thread::spawn(move || {
        for line in BufReader::new(stream).lines() {
            let Ok(line) = line else { break };
            if to_stderr {
                eprintln!("{line}");
            } else {
                println!("{line}");
            }
        }
    })
}

/// Signals the child's whole process group (node and the broker it started).
fn signal_group(child: &Child, signal: &str) {
    let _ = Command::new("kill")
        .args([signal, "--", &format!("-{}", child.id())])
        .status();
}

#[test]
fn browser() {
    check_prerequisites();
    let artifacts = std::env::var_os("ARTIFACTS_DIR").map_or_else(
        || root().join("target/test-artifacts/browser"),
        PathBuf::from,
    );
    let script = root().join("tests/browser/browser.test.mjs");
    println!(
        "browser test: node {} (artifacts: {})",
        script.display(),
        artifacts.display()
    );

    let started = Instant::now();
    let mut child = Command::new("node")
        .arg(&script)
        .current_dir(root())
        .env("TOPICHUB_BIN", env!("CARGO_BIN_EXE_topichub"))
        .env("ARTIFACTS_DIR", &artifacts)
        .env_remove("TOPICHUB_URL")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own process group, so a timeout can stop node and the broker it spawned together.
        .process_group(0)
        .spawn()
        .unwrap_or_else(|e| panic!("browser test: cannot run node: {e}; {INSTALL_HINT}"));
    let out = forward(child.stdout.take().unwrap(), false);
    let err = forward(child.stderr.take().unwrap(), true);

    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for node") {
            break Some(status);
        }
        if started.elapsed() > TIMEOUT {
            break None;
        }
        thread::sleep(Duration::from_millis(100));
    };
    let Some(status) = status else {
        // SIGTERM first: the JS test then kills the broker and Playwright closes Chromium.
        signal_group(&child, "-TERM");
        let grace = Instant::now();
        while child.try_wait().ok().flatten().is_none() && grace.elapsed() < Duration::from_secs(5)
        {
            thread::sleep(Duration::from_millis(100));
        }
        signal_group(&child, "-KILL");
        let _ = child.wait();
        let _ = (out.join(), err.join());
        panic!(
            "browser test: timed out after {TIMEOUT:?}; screenshots and logs in {}",
            artifacts.display()
        );
    };
    let _ = (out.join(), err.join());
    println!("browser test: finished in {:?}", started.elapsed());
    assert!(
        status.success(),
        "browser test failed ({status}); screenshots, console.log and broker.log in {}",
        artifacts.display()
    );
}

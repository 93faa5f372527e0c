//! Unary publish load from the C load generators: `h2load` for gRPC, `wrk` for HTTP POST.
//!
//! The CPU figures cover the tool's whole run (its warm-up too, at the same load): the server's
//! process tree over that time, and the tool's own CPU, which this process reads once it has
//! waited for the tool. Server CPU per publish divides by the tool's rate times that time.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;

use anyhow::{Context, bail};
use prost::Message as _;

use crate::clients::Target;
use crate::scenarios::{Figures, Params};
use crate::stats::{Client, CpuUse, CpuWindow, stamped_payload};

/// Runs the load tool for `target` against the server at `addr`, whose process is `pid`.
pub fn publish_tool(
    target: Target,
    addr: SocketAddr,
    pid: u32,
    p: &Params,
    dir: &Path,
) -> anyhow::Result<Figures> {
    std::fs::create_dir_all(dir)?;
    let payload = stamped_payload(p.payload);
    match target {
        Target::Grpc | Target::TonicFloor | Target::H2Floor => {
            let request = topichub::proto::v1::PublishRequest {
                topic: "bench.tool".into(),
                payload,
                ..Default::default()
            }
            .encode_to_vec();
            let mut frame = vec![0u8];
            frame.extend_from_slice(&(request.len() as u32).to_be_bytes());
            frame.extend_from_slice(&request);
            let body = dir.join("publish.grpc");
            std::fs::write(&body, frame)?;
            let mut h2load = Command::new("h2load");
            h2load
                .args(["-t", "1", "-m", "1"])
                .args(["-c", &p.concurrency.to_string()])
                .args(["-D", &format!("{}", p.seconds.ceil() as u64)])
                .args(["--warm-up-time", &format!("{}", p.warmup.ceil() as u64)])
                .args(["-H", "content-type: application/grpc", "-H", "te: trailers"])
                .arg("-d")
                .arg(&body)
                .arg(format!("http://{addr}/topichub.v1.PubSub/Publish"));
            let (text, cpu) = run(h2load, pid, "h2load (apt-get install nghttp2-client)")?;
            with_cpu(parse_h2load(&text)?, &cpu)
        }
        Target::Sse | Target::Nchan | Target::Raw => {
            let path = match target {
                Target::Nchan => "/pub?id=bench.tool",
                Target::Raw => "/pub",
                _ => "/topics/bench.tool",
            };
            let script = dir.join("post.lua");
            std::fs::write(
                &script,
                format!(
                    "wrk.method = \"POST\"\nwrk.body = \"{}\"\nwrk.headers[\"Content-Type\"] = \"text/plain\"\n",
                    String::from_utf8_lossy(&payload)
                ),
            )?;
            let mut wrk = Command::new("wrk");
            wrk.args(["-t", "1", "--latency"])
                .args(["-c", &p.concurrency.to_string()])
                .args(["-d", &format!("{}s", (p.seconds + p.warmup).ceil() as u64)])
                .arg("-s")
                .arg(&script)
                .arg(format!("http://{addr}{path}"));
            let (text, cpu) = run(wrk, pid, "wrk (apt-get install wrk)")?;
            with_cpu(parse_wrk(&text)?, &cpu)
        }
        other => bail!("no load tool for {}", other.name()),
    }
}

/// Runs a load tool to its end: its standard output, and the CPU it and the server at `pid`
/// used meanwhile.
fn run(mut tool: Command, pid: u32, what: &str) -> anyhow::Result<(String, CpuUse)> {
    let window = CpuWindow::over(&[pid], Client::Tools);
    let output = tool.output().with_context(|| format!("running {what}"))?;
    let cpu = window.finish();
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    if !output.status.success() {
        bail!(
            "{what} failed: {text}{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok((text, cpu))
}

/// The tool's figures and the CPU figures of its publishes.
fn with_cpu(mut figures: Figures, cpu: &CpuUse) -> anyhow::Result<Figures> {
    let publishes = figures["publish_per_s"] * cpu.seconds;
    figures.extend(cpu.figures("publish", publishes));
    Ok(figures)
}

/// `finished in 5.00s, 36001.20 req/s, ...`, `requests: ... 0 failed, 0 errored`, status codes.
fn parse_h2load(text: &str) -> anyhow::Result<Figures> {
    let rate = text
        .lines()
        .find_map(|l| l.strip_prefix("finished in "))
        .and_then(|l| l.split(", ").nth(1))
        .and_then(|r| r.strip_suffix(" req/s"))
        .and_then(|r| r.parse::<f64>().ok())
        .with_context(|| format!("no rate in h2load output:\n{text}"))?;
    let requests = text
        .lines()
        .find(|l| l.starts_with("requests:"))
        .context("no requests line")?;
    let count = |what: &str| -> u64 {
        requests
            .split(", ")
            .find(|part| part.ends_with(what))
            .and_then(|part| part.split_whitespace().rev().nth(1)?.parse().ok())
            .unwrap_or(0)
    };
    let (failed, errored) = (count("failed"), count("errored"));
    if failed + errored > 0 {
        bail!("h2load: {failed} failed, {errored} errored:\n{text}");
    }
    let mean_ms = text
        .lines()
        .find(|l| l.starts_with("time for request:"))
        .and_then(|l| l.split_whitespace().nth(5))
        .map(duration_ms)
        .unwrap_or(0.0);
    Ok(Figures::from([
        ("publish_per_s".into(), rate),
        ("publish_mean_ms".into(), mean_ms),
    ]))
}

/// `Requests/sec:  66720.12`, the `--latency` distribution, and any non-2xx count.
fn parse_wrk(text: &str) -> anyhow::Result<Figures> {
    if let Some(line) = text.lines().find(|l| l.contains("Non-2xx")) {
        bail!("wrk: {}:\n{text}", line.trim());
    }
    let rate = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("Requests/sec:"))
        .and_then(|r| r.trim().parse::<f64>().ok())
        .with_context(|| format!("no Requests/sec in wrk output:\n{text}"))?;
    let percentile = |p: &str| {
        text.lines()
            .map(str::trim)
            .find_map(|l| l.strip_prefix(p))
            .map(|v| duration_ms(v.trim()))
            .unwrap_or(0.0)
    };
    Ok(Figures::from([
        ("publish_per_s".into(), rate),
        ("publish_p50_ms".into(), percentile("50%")),
        ("publish_p99_ms".into(), percentile("99%")),
    ]))
}

/// `1.23ms`, `456.00us`, `2.00s` -> milliseconds.
fn duration_ms(text: &str) -> f64 {
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: f64 = number.parse().unwrap_or(0.0);
    match unit {
        "us" => number / 1000.0,
        "s" => number * 1000.0,
        "m" => number * 60_000.0,
        _ => number,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrk_output() {
        let text = "Running 5s test @ http://127.0.0.1:1/pub\n  Latency Distribution\n     50%  235.00us\n     75%  300.00us\n     90%  1.20ms\n     99%    2.50ms\n  333 requests in 5.00s, 1 MB read\nRequests/sec:  66720.12\nTransfer/sec:      1.00MB\n";
        let f = parse_wrk(text).unwrap();
        assert_eq!(f["publish_per_s"], 66720.12);
        assert_eq!(f["publish_p50_ms"], 0.235);
        assert_eq!(f["publish_p99_ms"], 2.5);
        assert!(parse_wrk("  Non-2xx or 3xx responses: 12\nRequests/sec: 1\n").is_err());
    }

    #[test]
    fn h2load_output() {
        let text = "finished in 5.00s, 36001.20 req/s, 4.00MB/s\nrequests: 180006 total, 180006 started, 180006 done, 180006 succeeded, 0 failed, 0 errored, 0 timeout\nstatus codes: 180006 2xx, 0 3xx, 0 4xx, 0 5xx\n                     min         max         mean         sd        +/- sd\ntime for request:    100us     10.00ms    440us     100us    90.00%\n";
        let f = parse_h2load(text).unwrap();
        assert_eq!(f["publish_per_s"], 36001.2);
        assert_eq!(f["publish_mean_ms"], 0.44);
        assert!(parse_h2load(&text.replace("0 failed", "3 failed")).is_err());
    }
}

//! Medians, the topichub/peer ratios against the targets, and their output: a table on stdout
//! and in results.md, results.json, and ratios.svg.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use anyhow::bail;
use serde::{Deserialize, Serialize};

use crate::SuiteScenario;
use crate::clients::Target;
use crate::scenarios::{Figures, Params};

#[derive(Serialize, Deserialize)]
pub struct Result {
    pub scenario: String,
    pub target: String,
    pub runs: Vec<Figures>,
    pub median: Figures,
}

impl Result {
    pub fn new(scenario: SuiteScenario, target: Target, runs: Vec<Figures>) -> Self {
        let mut median = Figures::new();
        if let Some(first) = runs.first() {
            for key in first.keys() {
                let mut values: Vec<f64> =
                    runs.iter().filter_map(|r| r.get(key).copied()).collect();
                values.sort_by(f64::total_cmp);
                median.insert(key.clone(), values[values.len() / 2]);
            }
        }
        Result {
            scenario: scenario.name().into(),
            target: target.name().into(),
            runs,
            median,
        }
    }
}

#[derive(Serialize, Deserialize)]
pub struct Comparison {
    /// What is compared, e.g. "fan-out deliveries/s".
    pub what: String,
    pub topichub: String,
    pub value: f64,
    /// The best peer (or "target" for absolute goals).
    pub peer: String,
    pub peer_value: f64,
    /// value / peer_value.
    pub ratio: f64,
    /// The goal for the ratio, e.g. ">= 1.5".
    pub goal: String,
    pub met: Option<bool>,
    /// True when the ratio is against a peer (charted); false for absolute goals.
    pub versus_peer: bool,
    pub higher_is_better: bool,
}

impl Comparison {
    /// `value` against a peer's `peer_value` (charted); `goal` is the ratio to reach, or NaN
    /// for a row with no goal.
    fn versus_peer(
        what: &str,
        (topichub, value): (&str, f64),
        (peer, peer_value): (&str, f64),
        higher: bool,
        goal: f64,
    ) -> Comparison {
        let ratio = value / peer_value;
        Comparison {
            what: what.into(),
            topichub: topichub.into(),
            value,
            peer: peer.into(),
            peer_value,
            ratio,
            goal: if goal.is_nan() {
                "-".into()
            } else {
                format!("{} {goal}", if higher { ">=" } else { "<=" })
            },
            met: (!goal.is_nan()).then_some(if higher { ratio >= goal } else { ratio <= goal }),
            versus_peer: true,
            higher_is_better: higher,
        }
    }
}

/// What a peer-relative goal leaves a server per delivery, against the least kernel time any
/// server spent per delivery in the same fan-out runs. Every server here makes one write per
/// subscriber per message on one core, so a goal whose budget is below that kernel time is out
/// of reach even for a server that spends nothing in user space.
#[derive(Serialize, Deserialize)]
pub struct Budget {
    pub goal: String,
    /// How the budget follows from the goal and the best peer's figure.
    pub derivation: String,
    pub budget_us: f64,
    pub kernel_us: f64,
    /// The server that spent `kernel_us`.
    pub kernel_of: String,
    pub within_reach: bool,
    /// What topichub's SSE door spent per delivery in the fan-out, all of it and in the kernel.
    pub topichub_us: Option<f64>,
    pub topichub_kernel_us: Option<f64>,
}

#[derive(Serialize, Deserialize)]
pub struct Results {
    pub machine: BTreeMap<String, String>,
    pub runs: usize,
    pub params: BTreeMap<String, f64>,
    pub results: Vec<Result>,
    pub comparisons: Vec<Comparison>,
    /// Empty for results recorded before the fan-out scenario measured kernel time.
    #[serde(default)]
    pub budgets: Vec<Budget>,
}

const PEERS: [&str; 3] = ["nats", "nchan", "mosquitto"];

impl Results {
    pub fn new(results: Vec<Result>, p: &Params, runs: usize) -> Self {
        let params = BTreeMap::from([
            ("seconds".into(), p.seconds),
            ("warmup".into(), p.warmup),
            ("payload_bytes".into(), p.payload as f64),
            ("subscribers".into(), p.subscribers as f64),
            ("window".into(), p.window as f64),
            ("rate".into(), p.rate),
            ("e2e_rate".into(), p.e2e_rate),
            ("concurrency".into(), p.concurrency as f64),
            ("idle_subscribers".into(), p.idle_subscribers as f64),
            ("max_idle".into(), p.max_idle as f64),
            ("restart_messages".into(), p.restart_messages as f64),
            ("storm_connections".into(), p.storm_connections as f64),
            ("wildcard_topics".into(), p.wildcard_topics as f64),
            ("topics_retain_age_s".into(), p.topics_retain_age),
            ("probe_rate".into(), p.probe_rate),
        ]);
        let mut out = Results {
            machine: machine(),
            runs,
            params,
            results,
            comparisons: Vec::new(),
            budgets: Vec::new(),
        };
        out.compare_again();
        out
    }

    /// Computes the comparisons and budgets again from the medians (after the report's rules
    /// changed).
    pub fn compare_again(&mut self) {
        self.comparisons = self.compare();
        self.budgets = self.budgets();
    }

    /// The three per-delivery goals as CPU budgets, against the kernel's cost of a delivery.
    fn budgets(&self) -> Vec<Budget> {
        let Some((kernel_of, kernel_us)) = self
            .results
            .iter()
            .filter(|r| r.scenario == "fanout")
            .filter_map(|r| {
                Some((
                    r.target.clone(),
                    *r.median.get("server_kernel_us_per_delivery")?,
                ))
            })
            .filter(|(_, us)| *us > 0.0)
            .reduce(|a, b| if b.1 < a.1 { b } else { a })
        else {
            return Vec::new();
        };
        let topichub_us = self.figure("fanout", "topichub-sse", "server_cpu_us_per_delivery");
        let topichub_kernel_us =
            self.figure("fanout", "topichub-sse", "server_kernel_us_per_delivery");
        let mut out = Vec::new();
        let mut budget = |goal: &str, derivation: String, budget_us: f64| {
            out.push(Budget {
                goal: goal.into(),
                derivation,
                budget_us,
                kernel_us,
                kernel_of: kernel_of.clone(),
                within_reach: budget_us >= kernel_us,
                topichub_us,
                topichub_kernel_us,
            });
        };
        if let Some((peer, rate)) = self.best_peer("fanout", "deliveries_per_s", true) {
            budget(
                "fan-out >= 1.5 x best peer",
                format!(
                    "one core-second over 1.5 x {} deliveries/s ({peer})",
                    number(rate)
                ),
                1e6 / (1.5 * rate),
            );
        }
        if let Some((peer, cpu)) = self.best_peer("fanout", "server_cpu_us_per_delivery", false) {
            budget(
                "CPU per delivery <= 0.5 x best peer",
                format!("0.5 x {} us ({peer})", number(cpu)),
                0.5 * cpu,
            );
        }
        let subscribers = self.params.get("subscribers").copied().unwrap_or(1000.0);
        if let Some((peer, p99)) = self.best_peer("rate", "p99_ms", false) {
            // A message's 99th-percentile delivery comes after that many writes, one at a time.
            let writes = (0.99 * subscribers).ceil();
            budget(
                "p99 at 1000 subscribers <= 0.5 x best peer",
                format!(
                    "0.5 x {} ms ({peer}) over the {writes} writes before a message's 99th-percentile delivery",
                    number(p99)
                ),
                0.5 * p99 * 1000.0 / writes,
            );
        }
        out
    }

    fn figure(&self, scenario: &str, target: &str, key: &str) -> Option<f64> {
        self.results
            .iter()
            .find(|r| r.scenario == scenario && r.target == target)?
            .median
            .get(key)
            .copied()
    }

    /// A scale scenario's figure `{base}_at_{n}` at each of its points, by n.
    fn points(&self, scenario: &str, target: &str, base: &str) -> Vec<(usize, f64)> {
        let Some(r) = self
            .results
            .iter()
            .find(|r| r.scenario == scenario && r.target == target)
        else {
            return Vec::new();
        };
        let mut points: Vec<(usize, f64)> = r
            .median
            .iter()
            .filter_map(|(key, value)| Some((point_of(key, base)?, *value)))
            .collect();
        points.sort_by_key(|(n, _)| *n);
        points
    }

    /// The best peer for a figure: the highest or the lowest value.
    fn best_peer(&self, scenario: &str, key: &str, higher: bool) -> Option<(String, f64)> {
        PEERS
            .iter()
            .filter_map(|p| Some((p.to_string(), self.figure(scenario, p, key)?)))
            .reduce(|a, b| if (b.1 > a.1) == higher { b } else { a })
    }

    fn compare(&self) -> Vec<Comparison> {
        let mut out = Vec::new();
        let doors = [
            "topichub-sse",
            "topichub-grpc",
            "topichub-grpc-mux",
            "topichub-seed",
            "topichub-seed-mux",
        ];
        // Each door's figure against one peer's: `peer`, or the best peer when None.
        let against = |what: &str,
                       scenario: &str,
                       key: &str,
                       higher: bool,
                       goal: f64,
                       (peer, doors): (Option<&str>, &[&str]),
                       out: &mut Vec<Comparison>| {
            let peer = match peer {
                Some(peer) => self
                    .figure(scenario, peer, key)
                    .map(|value| (peer.to_string(), value)),
                None => self.best_peer(scenario, key, higher),
            };
            let Some((peer, peer_value)) = peer else {
                return;
            };
            for &door in doors {
                if let Some(value) = self.figure(scenario, door, key) {
                    out.push(Comparison::versus_peer(
                        what,
                        (door, value),
                        (&peer, peer_value),
                        higher,
                        goal,
                    ));
                }
            }
        };
        against(
            "fan-out deliveries/s",
            "fanout",
            "deliveries_per_s",
            true,
            1.5,
            (None, &doors),
            &mut out,
        );
        against(
            "server CPU per delivery",
            "fanout",
            "server_cpu_us_per_delivery",
            false,
            0.5,
            (None, &doors),
            &mut out,
        );
        against(
            "p99 latency, 1000 subscribers at 20 msg/s",
            "rate",
            "p99_ms",
            false,
            0.5,
            (None, &doors),
            &mut out,
        );
        against(
            "e2e p99 latency, 1 subscriber at 1000 msg/s",
            "e2e",
            "p99_ms",
            false,
            f64::NAN,
            (None, &doors),
            &mut out,
        );
        against(
            "unary publish, this harness's client",
            "publish",
            "publish_per_s",
            true,
            f64::NAN,
            (None, &doors),
            &mut out,
        );
        if let (Some(value), Some(peer_value)) = (
            self.figure("publish-tool", "topichub-sse", "publish_per_s"),
            self.figure("publish-tool", "nchan", "publish_per_s"),
        ) {
            out.push(Comparison::versus_peer(
                "unary POST /publish with wrk",
                ("topichub-sse", value),
                ("nchan", peer_value),
                true,
                1.0,
            ));
        }
        // Goal 1 of the gRPC door: fan-out against nats-server (one connection per subscriber
        // for `topichub-grpc` and `topichub-seed`; the `-mux` doors share connections).
        let grpc_doors = (Some("nats"), &doors[1..]);
        against(
            "gRPC fan-out deliveries/s against nats-server",
            "fanout",
            "deliveries_per_s",
            true,
            0.8,
            grpc_doors,
            &mut out,
        );
        against(
            "gRPC fan-out server CPU per delivery against nats-server",
            "fanout",
            "server_cpu_us_per_delivery",
            false,
            1.25,
            grpc_doors,
            &mut out,
        );
        // Goal 2 of unary gRPC publish, and the same ratio for the floors (servers answering
        // Publish with no broker behind): what hyper/h2 and tonic alone leave within reach.
        if let Some(nats) = self.figure("publish", "nats", "publish_per_s") {
            for door in ["topichub-grpc", "tonic-floor", "h2-floor"] {
                let Some(value) = self.figure("publish", door, "publish_per_s") else {
                    continue;
                };
                out.push(Comparison::versus_peer(
                    "unary gRPC publish/s against nats (PUB + flush), 16 connections",
                    (door, value),
                    ("nats", nats),
                    true,
                    if door == "topichub-grpc" {
                        0.5
                    } else {
                        f64::NAN
                    },
                ));
            }
        }
        // The durable log against JetStream's file store and against the in-memory hub.
        let pair = |what: &str,
                    key: &str,
                    door: &str,
                    peer: &str,
                    higher: bool,
                    goal: f64,
                    out: &mut Vec<Comparison>| {
            if let (Some(value), Some(peer_value)) = (
                self.figure("durable", door, key),
                self.figure("durable", peer, key),
            ) {
                out.push(Comparison::versus_peer(
                    what,
                    (door, value),
                    (peer, peer_value),
                    higher,
                    goal,
                ));
            }
        };
        let shapes = [
            ("unary", "16 connections, 1 in flight each", "publish_per_s"),
            (
                "stream",
                "1 connection, 16 in flight",
                "stream_publish_per_s",
            ),
        ];
        for door in ["topichub-grpc-disk", "topichub-grpc-disk-every"] {
            for (shape, how, key) in shapes {
                pair(
                    &format!("durable {shape} publish/s ({how})"),
                    key,
                    door,
                    "nats-jetstream",
                    true,
                    1.0,
                    &mut out,
                );
                pair(
                    &format!("durable {shape} publish/s, against in-memory topichub"),
                    key,
                    door,
                    "topichub-grpc",
                    true,
                    0.5,
                    &mut out,
                );
            }
        }
        pair(
            "in-memory stream publish/s (1 connection, 16 in flight)",
            "stream_publish_per_s",
            "topichub-grpc",
            "nats-jetstream",
            true,
            1.0,
            &mut out,
        );
        pair(
            "durable publish -> deliver p99, against in-memory topichub",
            "e2e_p99_ms",
            "topichub-grpc-disk",
            "topichub-grpc",
            false,
            2.0,
            &mut out,
        );
        let absolute = |what: &str,
                        scenario: &str,
                        door: &str,
                        key: &str,
                        limit: f64,
                        higher: bool,
                        out: &mut Vec<Comparison>| {
            if let Some(value) = self.figure(scenario, door, key) {
                out.push(Comparison {
                    what: what.into(),
                    topichub: door.into(),
                    value,
                    peer: "target".into(),
                    peer_value: limit,
                    ratio: value / limit,
                    goal: format!("{} {limit}", if higher { ">=" } else { "<=" }),
                    met: Some(if higher {
                        value >= limit
                    } else {
                        value <= limit
                    }),
                    versus_peer: false,
                    higher_is_better: higher,
                });
            }
        };
        absolute(
            "restart with the retained messages, seconds until serving",
            "restart",
            "topichub-grpc-disk",
            "restart_ready_s",
            2.0,
            false,
            &mut out,
        );
        absolute(
            "idle KiB per SSE subscriber, HTTP/1.1",
            "idle",
            "topichub-sse",
            "kib_per_subscriber",
            4.0,
            false,
            &mut out,
        );
        absolute(
            "idle KiB per gRPC stream, one connection each",
            "idle",
            "topichub-grpc",
            "kib_per_subscriber",
            8.0,
            false,
            &mut out,
        );
        absolute(
            "idle KiB per SSE subscriber, HTTP/2",
            "idle",
            "topichub-sse-h2",
            "kib_per_subscriber",
            4.0,
            false,
            &mut out,
        );
        absolute(
            "idle KiB per gRPC stream, multiplexed",
            "idle",
            "topichub-grpc-mux",
            "kib_per_subscriber",
            8.0,
            false,
            &mut out,
        );
        absolute(
            "idle gRPC streams held (multiplexed)",
            "max-idle",
            "topichub-grpc-mux",
            "held_live",
            100_000.0,
            true,
            &mut out,
        );
        absolute(
            "idle SSE subscribers held (HTTP/1.1)",
            "max-idle",
            "topichub-sse",
            "held_live",
            100_000.0,
            true,
            &mut out,
        );
        absolute(
            "idle SSE subscribers held (HTTP/2)",
            "max-idle",
            "topichub-sse-h2",
            "held_live",
            100_000.0,
            true,
            &mut out,
        );
        // The scale scenarios: how a cost grew from the smallest point to the largest.
        let grew = |what: &str,
                    unit: &str,
                    scenario: &str,
                    door: &str,
                    base: &str,
                    limit: f64,
                    higher: bool,
                    out: &mut Vec<Comparison>| {
            let points = self.points(scenario, door, base);
            let (Some(&(first, _)), Some(&(last, _))) = (points.first(), points.last()) else {
                return;
            };
            if let Some(value) = self.figure(scenario, door, &format!("{base}_growth")) {
                out.push(Comparison {
                    what: format!("{what}, {last} / {first} {unit}"),
                    topichub: door.into(),
                    value,
                    peer: format!("at {first}"),
                    peer_value: 1.0,
                    ratio: value,
                    goal: format!("{} {limit}", if higher { ">=" } else { "<=" }),
                    met: Some(if higher {
                        value >= limit
                    } else {
                        value <= limit
                    }),
                    versus_peer: false,
                    higher_is_better: higher,
                });
            }
        };
        let storm = "topichub-grpc-mux";
        grew(
            "subscribe storm time",
            "streams",
            "storm",
            storm,
            "subscribe_s",
            2.2,
            false,
            &mut out,
        );
        grew(
            "disconnect storm time",
            "streams",
            "storm",
            storm,
            "unsubscribe_s",
            2.2,
            false,
            &mut out,
        );
        if let Some(&(n, _)) = self.points("storm", storm, "unsubscribe_s").last() {
            absolute(
                &format!("disconnect storm of {n} streams, seconds"),
                "storm",
                storm,
                &format!("unsubscribe_s_at_{n}"),
                1.0,
                false,
                &mut out,
            );
        }
        for (n, _) in self.points("storm", storm, "unsubscribe_publish_p99_ms") {
            absolute(
                &format!("publish p99 during the disconnect storm of {n} streams, ms"),
                "storm",
                storm,
                &format!("unsubscribe_publish_p99_ms_at_{n}"),
                10.0,
                false,
                &mut out,
            );
            // The same storm on hyper's HTTP/2 server alone: the part of the stall that is
            // not the broker's.
            against(
                &format!(
                    "publish p99 during the disconnect storm of {n} streams, against hyper and h2 alone"
                ),
                "storm",
                &format!("unsubscribe_publish_p99_ms_at_{n}"),
                false,
                f64::NAN,
                (Some("h2-floor"), &[storm]),
                &mut out,
            );
        }
        // Noise between runs on this machine is about 15 %: "does not grow" within that.
        grew(
            "server CPU per publish to a new topic",
            "wildcards",
            "wildcards",
            "topichub-grpc",
            "server_cpu_us_per_publish",
            1.15,
            false,
            &mut out,
        );
        grew(
            "publishes/s to new topics",
            "wildcards",
            "wildcards",
            "topichub-grpc",
            "publish_per_s",
            0.85,
            true,
            &mut out,
        );
        if let Some(&(n, _)) = self
            .points("topics", "topichub-sse", "bytes_per_topic")
            .last()
        {
            absolute(
                &format!("RSS per topic holding one 64-byte message, {n} topics, bytes"),
                "topics",
                "topichub-sse",
                &format!("bytes_per_topic_at_{n}"),
                1024.0 + 64.0,
                false,
                &mut out,
            );
        }
        // Latency tails are noisier than rates: independent within half again.
        grew(
            "publish p99, unrelated topic",
            "topics",
            "topics",
            "topichub-sse",
            "probe_p99_ms",
            1.5,
            false,
            &mut out,
        );
        grew(
            "slowest publish, unrelated topic",
            "topics",
            "topics",
            "topichub-sse",
            "probe_max_ms",
            1.5,
            false,
            &mut out,
        );
        absolute(
            "publish p99 to an unrelated topic while the topics expire, over with none held",
            "topics",
            "topichub-sse",
            "expiry_probe_p99_growth",
            1.5,
            false,
            &mut out,
        );
        // Cluster mode against JetStream alone, same run, same client.
        let cluster = "topichub-grpc-cluster";
        for (what, key, peer_key, higher, goal) in [
            (
                "cluster: publish -> deliver p99 across nodes, over JetStream's own",
                "p99_ms",
                "p99_ms",
                false,
                2.0,
            ),
            (
                "cluster: publishes/s (acknowledged), over JetStream's own",
                "publish_per_s",
                "publish_per_s",
                true,
                0.5,
            ),
            // JetStream publishing while an ordered consumer on each server reads the whole
            // stream, as every topichub node does: no goal, the like-for-like floor.
            (
                "cluster: publishes/s (acknowledged), over JetStream's own with a reader per server",
                "publish_per_s",
                "readers_publish_per_s",
                true,
                f64::NAN,
            ),
        ] {
            if let (Some(value), Some(peer_value)) = (
                self.figure("cluster", cluster, &format!("topichub_{key}")),
                self.figure("cluster", cluster, &format!("jetstream_{peer_key}")),
            ) && peer_value > 0.0
            {
                out.push(Comparison::versus_peer(
                    what,
                    (cluster, value),
                    ("nats-jetstream (3 nodes)", peer_value),
                    higher,
                    goal,
                ));
            }
        }
        // What a subscribing node spends per delivery against one node alone (the fanout
        // scenario's topichub-grpc): with every server process on one core, the cluster's
        // deliveries/s share that core, but a node's cost per delivery must stay the same
        // (within the run-to-run noise).
        if let (Some(value), Some(single)) = (
            self.figure("cluster", cluster, "topichub_server_cpu_us_per_delivery"),
            self.figure("fanout", "topichub-grpc", "server_cpu_us_per_delivery"),
        ) && single > 0.0
        {
            out.push(Comparison {
                what: "cluster: server CPU per delivery of a subscribing node, over one node's"
                    .into(),
                topichub: cluster.into(),
                value,
                peer: "topichub-grpc (fanout)".into(),
                peer_value: single,
                ratio: value / single,
                goal: "<= 1.15".into(),
                met: Some(value / single <= 1.15),
                versus_peer: false,
                higher_is_better: false,
            });
        }
        // The same figures against the raw-loopback program: how far from the least any server
        // can do each scenario's writes with. (wrk drives only the SSE door's HTTP POST.)
        let all = &doors[..];
        let sse = &doors[..1];
        for (what, scenario, key, higher, doors) in [
            (
                "fan-out deliveries/s",
                "fanout",
                "deliveries_per_s",
                true,
                all,
            ),
            (
                "server CPU per delivery",
                "fanout",
                "server_cpu_us_per_delivery",
                false,
                all,
            ),
            (
                "p99 latency, 1000 subscribers at 20 msg/s",
                "rate",
                "p99_ms",
                false,
                all,
            ),
            (
                "unary POST with wrk",
                "publish-tool",
                "publish_per_s",
                true,
                sse,
            ),
        ] {
            let Some(ceiling) = self.figure(scenario, "raw-loopback", key) else {
                continue;
            };
            for &door in doors {
                if let Some(value) = self.figure(scenario, door, key) {
                    out.push(Comparison::versus_peer(
                        &format!("{what}, against raw-loopback"),
                        (door, value),
                        ("raw-loopback", ceiling),
                        higher,
                        f64::NAN,
                    ));
                }
            }
        }
        out
    }
}

/// The point n of a figure named `{base}_at_{n}`.
fn point_of(key: &str, base: &str) -> Option<usize> {
    key.strip_prefix(base)?.strip_prefix("_at_")?.parse().ok()
}

/// A figure named `{base}_at_{n}`, split.
fn split_point(key: &str) -> Option<(&str, usize)> {
    let (base, n) = key.rsplit_once("_at_")?;
    Some((base, n.parse().ok()?))
}

fn machine() -> BTreeMap<String, String> {
    let run = |program: &str, args: &[&str]| -> String {
        std::process::Command::new(program)
            .args(args)
            .output()
            .map(|o| {
                let text = if o.stdout.is_empty() {
                    o.stderr
                } else {
                    o.stdout
                };
                String::from_utf8_lossy(&text)
                    .lines()
                    .next()
                    .unwrap_or("")
                    .trim()
                    .to_owned()
            })
            .unwrap_or_else(|_| "not found".into())
    };
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
        })
        .unwrap_or_default();
    BTreeMap::from([
        ("cpu".into(), cpu),
        (
            "cpus".into(),
            std::thread::available_parallelism()
                .map(|n| n.to_string())
                .unwrap_or_default(),
        ),
        ("kernel".into(), run("uname", &["-r"])),
        (
            "topichub".into(),
            run("git", &["describe", "--always", "--dirty"]),
        ),
        ("nats-server".into(), run("nats-server", &["--version"])),
        ("nginx".into(), run("nginx", &["-v"])),
        ("mosquitto".into(), run("mosquitto", &["-h"])),
        ("open-files limit".into(), run("sh", &["-c", "ulimit -n"])),
    ])
}

/// One line per run for the progress log.
pub fn brief(figures: &Figures) -> String {
    figures
        .iter()
        .map(|(k, v)| format!("{k}={}", number(*v)))
        .collect::<Vec<_>>()
        .join(" ")
}

fn number(v: f64) -> String {
    if v.abs() >= 1000.0 {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.3}")
    }
}

/// The table of medians and the comparisons, as Markdown.
pub fn table(results: &Results) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "## Medians of {} runs\n", results.runs);
    let mut scenarios: Vec<&str> = Vec::new();
    for r in &results.results {
        if !scenarios.contains(&r.scenario.as_str()) {
            scenarios.push(&r.scenario);
        }
    }
    for scenario in scenarios {
        let rows: Vec<&Result> = results
            .results
            .iter()
            .filter(|r| r.scenario == scenario)
            .collect();
        // Figures of scale scenarios' points (`{base}_at_{n}`) get a table of their own, a row
        // per point.
        let mut keys: Vec<&String> = Vec::new();
        let mut bases: Vec<&str> = Vec::new();
        for r in &rows {
            for k in r.median.keys() {
                match split_point(k) {
                    Some((base, _)) if !bases.contains(&base) => bases.push(base),
                    Some(_) => {}
                    None if !keys.contains(&k) => keys.push(k),
                    None => {}
                }
            }
        }
        let _ = writeln!(out, "### {scenario}\n");
        if !keys.is_empty() || bases.is_empty() {
            let _ = writeln!(
                out,
                "| target | {} |",
                keys.iter()
                    .map(|k| k.as_str())
                    .collect::<Vec<_>>()
                    .join(" | ")
            );
            let _ = writeln!(out, "|---|{}", "---:|".repeat(keys.len()));
            for r in &rows {
                let cells: Vec<String> = keys
                    .iter()
                    .map(|k| {
                        r.median.get(*k).map(|v| number(*v)).unwrap_or_else(|| {
                            if r.runs.is_empty() {
                                "failed".into()
                            } else {
                                "-".into()
                            }
                        })
                    })
                    .collect();
                let _ = writeln!(out, "| {} | {} |", r.target, cells.join(" | "));
            }
            let _ = writeln!(out);
        }
        if !bases.is_empty() {
            let _ = writeln!(out, "| target | n | {} |", bases.join(" | "));
            let _ = writeln!(out, "|---|---:|{}", "---:|".repeat(bases.len()));
            for r in &rows {
                let mut points: Vec<usize> = r
                    .median
                    .keys()
                    .filter_map(|k| Some(split_point(k)?.1))
                    .collect();
                points.sort_unstable();
                points.dedup();
                for n in points {
                    let cells: Vec<String> = bases
                        .iter()
                        .map(|base| {
                            r.median
                                .get(&format!("{base}_at_{n}"))
                                .map(|v| number(*v))
                                .unwrap_or_else(|| "-".into())
                        })
                        .collect();
                    let _ = writeln!(out, "| {} | {n} | {} |", r.target, cells.join(" | "));
                }
            }
            let _ = writeln!(out);
        }
    }
    let _ = writeln!(out, "## topichub against the best peer and the targets\n");
    let _ = writeln!(
        out,
        "| comparison | topichub door | value | best peer | peer value | ratio | goal | met |"
    );
    let _ = writeln!(out, "|---|---|---:|---|---:|---:|---|---|");
    for c in &results.comparisons {
        let met = match c.met {
            Some(true) => "yes",
            Some(false) => "**no**",
            None => "-",
        };
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {:.2} | {} | {met} |",
            c.what,
            c.topichub,
            number(c.value),
            c.peer,
            number(c.peer_value),
            c.ratio,
            c.goal
        );
    }
    if !results.budgets.is_empty() {
        let _ = writeln!(
            out,
            "\n## The goals as CPU per delivery, against the kernel's share of one\n"
        );
        let _ = writeln!(
            out,
            "| goal | leaves per delivery, us | from | least kernel time per delivery, us | spent by | left for user space, us | topichub-sse spent, us (kernel) |"
        );
        let _ = writeln!(out, "|---|---:|---|---:|---|---:|---:|");
        for b in &results.budgets {
            let spent = match (b.topichub_us, b.topichub_kernel_us) {
                (Some(all), Some(kernel)) => format!("{} ({})", number(all), number(kernel)),
                _ => "-".into(),
            };
            let room = if b.within_reach {
                number(b.budget_us - b.kernel_us)
            } else {
                "**none**".into()
            };
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} | {room} | {spent} |",
                b.goal,
                number(b.budget_us),
                b.derivation,
                number(b.kernel_us),
                b.kernel_of,
            );
        }
    }
    out
}

pub fn render(results: &Results, dir: &Path) -> anyhow::Result<()> {
    let table = table(results);
    println!("{table}");
    std::fs::write(dir.join("results.md"), &table)?;
    std::fs::write(dir.join("ratios.svg"), svg(results))?;
    Ok(())
}

/// Horizontal bars: topichub's advantage over the best peer (higher is better; for
/// lower-is-better figures the inverse ratio), with each goal marked.
fn svg(results: &Results) -> String {
    let bars: Vec<(&Comparison, f64, Option<f64>)> = results
        .comparisons
        .iter()
        .filter(|c| (c.versus_peer || is_growth(c)) && c.ratio.is_finite() && c.ratio > 0.0)
        .map(|c| {
            let goal: Option<f64> = c
                .goal
                .split_whitespace()
                .nth(1)
                .and_then(|g| g.parse().ok());
            if c.higher_is_better {
                (c, c.ratio, goal)
            } else {
                (c, 1.0 / c.ratio, goal.map(|g| 1.0 / g))
            }
        })
        .collect();
    let (label_w, bar_w, row_h, top) = (430.0, 420.0, 26.0, 60.0);
    let max = bars
        .iter()
        .map(|(_, a, g)| a.max(g.unwrap_or(0.0)))
        .fold(1.0f64, f64::max)
        * 1.1;
    let height = top + row_h * bars.len() as f64 + 40.0;
    let width = label_w + bar_w + 80.0;
    let x = |v: f64| label_w + v / max * bar_w;
    let mut out = String::new();
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(out, r##"<rect width="100%" height="100%" fill="#fff"/>"##);
    let _ = writeln!(
        out,
        r#"<text x="10" y="20" font-size="15" font-weight="bold">topichub vs the best peer (x times better; medians of {} runs)</text>"#,
        results.runs
    );
    let _ = writeln!(
        out,
        r#"<text x="10" y="40" fill="gray">bar: topichub's advantage (lower-is-better figures inverted; scale rows: smallest point over largest); black tick: the goal; grey line: parity</text>"#
    );
    let _ = writeln!(
        out,
        r##"<line x1="{0}" y1="{1}" x2="{0}" y2="{2}" stroke="#999" stroke-dasharray="4 3"/>"##,
        x(1.0),
        top - 6.0,
        height - 34.0
    );
    for (i, (c, advantage, goal)) in bars.iter().enumerate() {
        let y = top + row_h * i as f64;
        let color = match c.met {
            Some(true) => "#2a9d5c",
            Some(false) => "#d0573f",
            None => "#6c8ebf",
        };
        let _ = writeln!(
            out,
            r#"<text x="{}" y="{}" text-anchor="end">{} · {}</text>"#,
            label_w - 8.0,
            y + 14.0,
            escape(&c.what),
            c.topichub.trim_start_matches("topichub-")
        );
        let _ = writeln!(
            out,
            r#"<rect x="{label_w}" y="{}" width="{:.1}" height="{}" fill="{color}"/>"#,
            y + 3.0,
            (x(*advantage) - label_w).max(1.0),
            row_h - 8.0
        );
        let _ = writeln!(
            out,
            r#"<text x="{:.1}" y="{}">{:.2}x</text>"#,
            x(*advantage) + 4.0,
            y + 14.0,
            advantage
        );
        if let Some(g) = goal {
            let _ = writeln!(
                out,
                r##"<line x1="{0:.1}" y1="{1}" x2="{0:.1}" y2="{2}" stroke="#000" stroke-width="2"/>"##,
                x(*g),
                y + 1.0,
                y + row_h - 3.0
            );
        }
    }
    let _ = writeln!(out, "</svg>");
    out
}

/// A scale scenario's figure at its largest point over its smallest (peer "at N").
fn is_growth(c: &Comparison) -> bool {
    c.peer.starts_with("at ")
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// For CI smoke runs: every scenario produced figures, and they make sense.
pub fn check(results: &Results) -> anyhow::Result<()> {
    for r in &results.results {
        let name = format!("{} on {}", r.scenario, r.target);
        if r.runs.is_empty() {
            bail!("{name}: no successful run");
        }
        for (key, value) in &r.median {
            // RSS per topic at a small point may be below the baseline's allocator slack.
            let may_be_negative = point_of(key, "bytes_per_topic").is_some();
            if !value.is_finite() || (*value < 0.0 && !may_be_negative) {
                bail!("{name}: {key} = {value}");
            }
        }
        let positive = |key: &str| -> anyhow::Result<()> {
            match r.median.get(key) {
                Some(v) if *v > 0.0 => Ok(()),
                other => bail!("{name}: {key} should be positive, is {other:?}"),
            }
        };
        match r.scenario.as_str() {
            "publish" | "publish-tool" => positive("publish_per_s")?,
            "fanout" => {
                positive("deliveries_per_s")?;
                positive("server_cpu_us_per_delivery")?;
                positive("server_kernel_us_per_delivery")?;
            }
            "e2e" | "rate" => {
                positive("p50_ms")?;
                if r.median.get("lost") != Some(&0.0) {
                    bail!("{name}: messages lost: {:?}", r.median.get("lost"));
                }
            }
            "idle" => positive("kib_per_subscriber")?,
            "durable" => {
                positive("publish_per_s")?;
                positive("e2e_p50_ms")?;
            }
            "restart" => positive("restart_ready_s")?,
            "max-idle" => positive("held_live")?,
            "cluster" => {
                for system in ["topichub", "jetstream"] {
                    for key in ["publish_per_s", "p50_ms", "deliveries_per_s"] {
                        positive(&format!("{system}_{key}"))?;
                    }
                    if system == "jetstream" {
                        positive("jetstream_readers_publish_per_s")?;
                    }
                    let lost = format!("{system}_lost");
                    if r.median.get(&lost) != Some(&0.0) {
                        bail!("{name}: messages lost: {:?}", r.median.get(&lost));
                    }
                }
            }
            "storm" | "wildcards" | "topics" => {
                let bases: &[&str] = match r.scenario.as_str() {
                    "storm" => &["subscribe_s", "unsubscribe_s"],
                    "wildcards" => &["publish_per_s", "publish_p50_ms"],
                    _ => &["rss_mib"],
                };
                for base in bases {
                    let points: Vec<&String> = r
                        .median
                        .keys()
                        .filter(|k| point_of(k, base).is_some())
                        .collect();
                    if points.is_empty() {
                        bail!("{name}: no {base}_at_* figure");
                    }
                    for key in points {
                        positive(key)?;
                    }
                }
                if r.scenario == "topics" {
                    // Memory of the largest point: a few topics can hide in the allocator's
                    // slack, many cannot.
                    if let Some(key) = r
                        .median
                        .keys()
                        .filter_map(|k| Some((point_of(k, "bytes_per_topic")?, k)))
                        .max()
                        .map(|(_, k)| k)
                    {
                        positive(key)?;
                    }
                    positive("fill_per_s")?;
                }
            }
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(scenario: &str, target: &str, figures: &[(&str, f64)]) -> Result {
        let median: Figures = figures.iter().map(|(k, v)| (k.to_string(), *v)).collect();
        Result {
            scenario: scenario.into(),
            target: target.into(),
            runs: vec![median.clone()],
            median,
        }
    }

    #[test]
    fn goals_become_cpu_budgets_against_the_least_kernel_time() {
        let fanout = |target, rate, cpu, kernel| {
            result(
                "fanout",
                target,
                &[
                    ("deliveries_per_s", rate),
                    ("server_cpu_us_per_delivery", cpu),
                    ("server_kernel_us_per_delivery", kernel),
                ],
            )
        };
        let mut results = Results {
            machine: BTreeMap::new(),
            runs: 1,
            params: BTreeMap::from([("subscribers".into(), 1000.0)]),
            results: vec![
                fanout("topichub-sse", 110_000.0, 8.0, 6.0),
                fanout("nchan", 100_000.0, 10.0, 7.0),
                fanout("mosquitto", 80_000.0, 12.0, 8.0),
                fanout("raw-loopback", 150_000.0, 6.0, 5.5),
                result("rate", "nchan", &[("p99_ms", 9.9)]),
                result("rate", "nats", &[("p99_ms", 20.0)]),
            ],
            comparisons: Vec::new(),
            budgets: Vec::new(),
        };
        results.compare_again();
        let budgets: Vec<(&str, f64, bool)> = results
            .budgets
            .iter()
            .map(|b| (b.goal.as_str(), b.budget_us, b.within_reach))
            .collect();
        // 1 s / (1.5 × 100,000); 0.5 × 10 µs; 0.5 × 9.9 ms over 990 writes.
        let expected = [(6.667, true), (5.0, false), (5.0, false)];
        assert_eq!(budgets.len(), 3, "{budgets:?}");
        for ((goal, budget, reach), (want, want_reach)) in budgets.iter().zip(expected) {
            assert!((budget - want).abs() < 0.001, "{goal}: {budget} != {want}");
            assert_eq!(*reach, want_reach, "{goal}");
        }
        for b in &results.budgets {
            assert_eq!((b.kernel_of.as_str(), b.kernel_us), ("raw-loopback", 5.5));
            assert_eq!(
                (b.topichub_us, b.topichub_kernel_us),
                (Some(8.0), Some(6.0))
            );
        }
        assert!(table(&results).contains("| **none** | 8.000 (6.000) |"));

        // Results recorded without kernel time have no budgets.
        for r in &mut results.results {
            r.median.remove("server_kernel_us_per_delivery");
        }
        results.compare_again();
        assert!(results.budgets.is_empty());
        assert!(!table(&results).contains("kernel"));
    }

    #[test]
    fn scale_points_get_a_row_each_and_their_growth_is_checked() {
        let mut results = Results {
            machine: BTreeMap::new(),
            runs: 1,
            params: BTreeMap::new(),
            results: vec![result(
                "storm",
                "topichub-grpc-mux",
                &[
                    ("subscribe_s_at_100000", 2.0),
                    ("subscribe_s_at_200000", 5.0),
                    ("subscribe_s_growth", 2.5),
                    ("unsubscribe_s_at_100000", 0.4),
                    ("unsubscribe_s_at_200000", 0.8),
                    ("unsubscribe_s_growth", 2.0),
                    ("unsubscribe_publish_p99_ms_at_100000", 4.0),
                    ("unsubscribe_publish_p99_ms_at_200000", 12.0),
                ],
            )],
            comparisons: Vec::new(),
            budgets: Vec::new(),
        };
        results.compare_again();
        let met: Vec<(&str, Option<bool>)> = results
            .comparisons
            .iter()
            .map(|c| (c.what.as_str(), c.met))
            .collect();
        assert_eq!(
            met,
            [
                ("subscribe storm time, 200000 / 100000 streams", Some(false)),
                ("disconnect storm time, 200000 / 100000 streams", Some(true)),
                ("disconnect storm of 200000 streams, seconds", Some(true)),
                (
                    "publish p99 during the disconnect storm of 100000 streams, ms",
                    Some(true)
                ),
                (
                    "publish p99 during the disconnect storm of 200000 streams, ms",
                    Some(false)
                ),
            ]
        );
        let table = table(&results);
        assert!(table.contains("| target | subscribe_s_growth | unsubscribe_s_growth |"));
        assert!(table.contains("| topichub-grpc-mux | 200000 | 5.000 | 12.0 | 0.800 |"));
        // The growth rows are charted; the absolute limits are not.
        assert_eq!(svg(&results).matches("<rect x=").count(), 2);
        check(&results).unwrap();
    }
}

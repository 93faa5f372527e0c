//! topichub-bench: measures topichub against nats-server, nginx + nchan and mosquitto with one
//! client implementation per protocol, in one process, on loopback.
//!
//! `bench/run.sh` installs the peers, builds everything and runs `suite`; see bench/README.md
//! for the scenarios and what each figure means.

mod clients;
mod cluster;
mod durable;
mod floor;
mod raw;
mod report;
mod scale;
mod scenarios;
mod servers;
mod stats;
mod tools;

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};

use clients::Target;
use scenarios::{Figures, Params, Scenario};
use servers::{Launch, Server};

#[derive(Parser)]
#[command(about = "Benchmarks topichub against real peers on loopback")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Every scenario against every target it applies to: medians, ratios, JSON and a chart.
    Suite(SuiteArgs),
    /// One scenario against one target, once; prints the figures as JSON.
    Run {
        #[arg(long, value_enum)]
        scenario: SuiteScenario,
        #[arg(long, value_enum)]
        target: Target,
        /// Use a server that is already running at this address (e.g. under a profiler)
        /// instead of starting one; needs --pid.
        #[arg(long, requires = "pid")]
        attach: Option<SocketAddr>,
        /// PID of the attached server (for its CPU time and memory).
        #[arg(long)]
        pid: Option<u32>,
        #[command(flatten)]
        launch: LaunchArgs,
        #[command(flatten)]
        params: Params,
    },
    /// Computes the comparisons again from a results JSON file's medians (rewriting it) and
    /// renders the table and chart again.
    Report {
        /// results.json written by `suite`.
        input: PathBuf,
    },
    /// The raw-loopback fan-out server (started by the suite for the ceiling).
    RawServer {
        #[arg(long)]
        listen: SocketAddr,
    },
    /// A floor of unary gRPC `Publish` (started by the suite for `tonic-floor` and `h2-floor`):
    /// answers `topichub.v1.PubSub/Publish` with a constant and does no broker work.
    FloorServer {
        #[arg(long)]
        listen: SocketAddr,
        /// Which layers answer: hyper's HTTP/2 server alone, or tonic over it.
        #[arg(long, value_enum)]
        layer: floor::Layer,
    },
}

#[derive(clap::Args, Clone)]
struct LaunchArgs {
    /// The topichub binary to benchmark.
    #[arg(
        long,
        env = "BENCH_TOPICHUB",
        default_value = "target/release/topichub"
    )]
    topichub: PathBuf,
    /// CPUs the servers are pinned to (`taskset -c`); "none" to not pin.
    #[arg(long, env = "BENCH_SERVER_CPUS", default_value = "0")]
    server_cpus: String,
    /// Scratch directory (configuration files, logs).
    #[arg(long, env = "BENCH_WORK", default_value = "target/bench/work")]
    work: PathBuf,
}

impl LaunchArgs {
    fn launch(&self) -> anyhow::Result<Launch> {
        Ok(Launch {
            topichub_bin: self.topichub.clone(),
            self_bin: std::env::current_exe()?,
            server_cpus: (self.server_cpus != "none").then(|| self.server_cpus.clone()),
            work_dir: std::path::absolute(&self.work)?,
        })
    }
}

#[derive(clap::Args)]
struct SuiteArgs {
    /// Runs per scenario and target; the report gives the median.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Scenarios to run (default: all).
    #[arg(long, value_enum, value_delimiter = ',')]
    scenarios: Vec<SuiteScenario>,
    /// Targets to run (default: all).
    #[arg(long, value_enum, value_delimiter = ',')]
    targets: Vec<Target>,
    /// Where results.json, results.md and ratios.svg go.
    #[arg(long, default_value = "target/bench")]
    out: PathBuf,
    /// Fails unless every figure is present and sane (for CI smoke runs).
    #[arg(long)]
    check: bool,
    #[command(flatten)]
    launch: LaunchArgs,
    #[command(flatten)]
    params: Params,
}

/// A scenario of the suite: the client scenarios plus the C load tools.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum SuiteScenario {
    Publish,
    /// Unary publish driven by h2load (gRPC) and wrk (HTTP POST).
    PublishTool,
    E2e,
    Fanout,
    Rate,
    Idle,
    MaxIdle,
    /// Unary publish and publish -> deliver latency against durable logs: topichub with
    /// `--data-dir` (both fsync policies) and in memory, and nats-server JetStream.
    Durable,
    /// A crashed `--data-dir` broker holding `--restart-messages`: time until it serves again.
    Restart,
    /// `--storm-streams` gRPC Subscribe streams over `--storm-connections` connections: time
    /// to subscribe them all, and to drop them all, with publish latency during both.
    Storm,
    /// Publishes to new topics with `--wildcard-subscriptions` that match none of them.
    Wildcards,
    /// `--topic-counts` topics with one 64-byte message each: RSS per topic, publish latency
    /// while they are held and while they expire.
    Topics,
    /// Three topichub nodes on a three-node JetStream cluster (publish on one, subscribe on the
    /// two others) against that JetStream cluster alone.
    Cluster,
}

impl SuiteScenario {
    const ALL: [SuiteScenario; 13] = [
        SuiteScenario::Publish,
        SuiteScenario::PublishTool,
        SuiteScenario::E2e,
        SuiteScenario::Fanout,
        SuiteScenario::Rate,
        SuiteScenario::Idle,
        SuiteScenario::MaxIdle,
        SuiteScenario::Durable,
        SuiteScenario::Restart,
        SuiteScenario::Storm,
        SuiteScenario::Wildcards,
        SuiteScenario::Topics,
        SuiteScenario::Cluster,
    ];

    /// The targets this scenario is measured on.
    fn targets(self) -> &'static [Target] {
        use Target::*;
        match self {
            SuiteScenario::Publish => &[Grpc, TonicFloor, H2Floor, Seed, Sse, Nats, Nchan, Mqtt],
            SuiteScenario::E2e => &[Grpc, Seed, Sse, Nats, Nchan, Mqtt],
            SuiteScenario::Rate => &[Grpc, Seed, Sse, Nats, Nchan, Mqtt, Raw],
            SuiteScenario::PublishTool => &[Grpc, TonicFloor, H2Floor, Sse, Nchan, Raw],
            SuiteScenario::Fanout => &[Grpc, GrpcMux, Seed, SeedMux, Sse, Nats, Nchan, Mqtt, Raw],
            SuiteScenario::Idle => &[Grpc, Sse, SseH2, GrpcMux, Nats, Nchan, Mqtt],
            SuiteScenario::MaxIdle => &[Sse, SseH2, GrpcMux],
            SuiteScenario::Durable => &[Grpc, GrpcDisk, GrpcDiskEvery, Jetstream],
            SuiteScenario::Restart => &[GrpcDisk],
            SuiteScenario::Storm => &[GrpcMux, H2Floor],
            SuiteScenario::Wildcards => &[Grpc],
            SuiteScenario::Topics => &[Sse],
            SuiteScenario::Cluster => &[GrpcCluster],
        }
    }

    /// Runs of this scenario: max-idle is slow and its answer is a count, so it runs once; so
    /// do topics, which waits for a million topics to expire, and cluster, which starts two
    /// clusters.
    fn runs(self, runs: usize) -> usize {
        if matches!(
            self,
            SuiteScenario::MaxIdle
                | SuiteScenario::Restart
                | SuiteScenario::Topics
                | SuiteScenario::Cluster
        ) {
            1
        } else {
            runs
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            SuiteScenario::Publish => "publish",
            SuiteScenario::PublishTool => "publish-tool",
            SuiteScenario::E2e => "e2e",
            SuiteScenario::Fanout => "fanout",
            SuiteScenario::Rate => "rate",
            SuiteScenario::Idle => "idle",
            SuiteScenario::MaxIdle => "max-idle",
            SuiteScenario::Durable => "durable",
            SuiteScenario::Restart => "restart",
            SuiteScenario::Storm => "storm",
            SuiteScenario::Wildcards => "wildcards",
            SuiteScenario::Topics => "topics",
            SuiteScenario::Cluster => "cluster",
        }
    }
}

/// One run on a freshly started server, with a client runtime of its own: dropping the runtime
/// ends every task the clients spawned (connection tasks, reconnect loops), so nothing of one
/// run (sockets, CPU) outlives it.
fn run_once(
    scenario: SuiteScenario,
    target: Target,
    launch: &Launch,
    params: &Params,
) -> anyhow::Result<Figures> {
    match scenario {
        // Starts, kills and restarts its own server.
        SuiteScenario::Restart => return durable::restart(target, launch, params),
        // A fresh server for each point, or one with options of its own.
        SuiteScenario::Storm => return scale::storm(target, launch, params),
        SuiteScenario::Wildcards => return scale::wildcards(target, launch, params),
        SuiteScenario::Topics => return scale::topics(target, launch, params),
        SuiteScenario::Cluster => return cluster::cluster(target, launch, params),
        _ => {}
    }
    let server = Server::start(target.kind(), launch)?;
    let runtime = client_runtime()?;
    let figures = runtime.block_on(measure(
        scenario,
        target,
        server.addr,
        server.pid(),
        launch,
        params,
    ));
    runtime.shutdown_timeout(std::time::Duration::from_secs(2));
    drop(server);
    figures
}

/// One thread: the client gets one core, as the server does.
fn client_runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
}

async fn measure(
    scenario: SuiteScenario,
    target: Target,
    addr: SocketAddr,
    pid: u32,
    launch: &Launch,
    params: &Params,
) -> anyhow::Result<Figures> {
    match scenario {
        SuiteScenario::PublishTool => {
            tools::publish_tool(target, addr, pid, params, &launch.work_dir.join("tools"))
        }
        SuiteScenario::Durable => durable::publish_and_deliver(target, addr, pid, params).await,
        SuiteScenario::Restart
        | SuiteScenario::Storm
        | SuiteScenario::Wildcards
        | SuiteScenario::Topics
        | SuiteScenario::Cluster => {
            anyhow::bail!(
                "the {} scenario starts its own servers (not with --attach)",
                scenario.name()
            )
        }
        other => {
            let scenario = match other {
                SuiteScenario::Publish => Scenario::Publish,
                SuiteScenario::E2e => Scenario::E2e,
                SuiteScenario::Fanout => Scenario::Fanout,
                SuiteScenario::Rate => Scenario::Rate,
                SuiteScenario::Idle => Scenario::Idle,
                SuiteScenario::MaxIdle => Scenario::MaxIdle,
                SuiteScenario::PublishTool
                | SuiteScenario::Durable
                | SuiteScenario::Restart
                | SuiteScenario::Storm
                | SuiteScenario::Wildcards
                | SuiteScenario::Topics
                | SuiteScenario::Cluster => unreachable!(),
            };
            scenarios::run(scenario, target, addr, pid, params).await
        }
    }
}

fn suite(args: SuiteArgs) -> anyhow::Result<()> {
    let launch = args.launch.launch()?;
    anyhow::ensure!(
        launch.topichub_bin.exists(),
        "no topichub binary at {} (cargo build --release)",
        launch.topichub_bin.display()
    );
    let scenarios = if args.scenarios.is_empty() {
        SuiteScenario::ALL.to_vec()
    } else {
        args.scenarios.clone()
    };
    let mut results = Vec::new();
    for scenario in scenarios {
        for &target in scenario.targets() {
            if !args.targets.is_empty() && !args.targets.contains(&target) {
                continue;
            }
            let mut runs = Vec::new();
            for run in 1..=scenario.runs(args.runs) {
                eprint!("{:>12} {:<16} run {run}: ", scenario.name(), target.name());
                match run_once(scenario, target, &launch, &args.params) {
                    Ok(figures) => {
                        eprintln!("{}", report::brief(&figures));
                        runs.push(figures);
                    }
                    Err(e) => {
                        eprintln!("FAILED: {e:#}");
                        if args.check {
                            return Err(e.context(format!(
                                "{} on {}",
                                scenario.name(),
                                target.name()
                            )));
                        }
                    }
                }
            }
            results.push(report::Result::new(scenario, target, runs));
        }
    }
    let results = report::Results::new(results, &args.params, args.runs);
    std::fs::create_dir_all(&args.out)?;
    let json = args.out.join("results.json");
    std::fs::write(&json, serde_json::to_string_pretty(&results)?)?;
    report::render(&results, &args.out)?;
    eprintln!("wrote {}, results.md and ratios.svg", json.display());
    if args.check {
        report::check(&results)?;
        eprintln!("check: every figure present and sane");
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Suite(args) => suite(args),
        Command::Run {
            scenario,
            target,
            attach,
            pid,
            launch,
            params,
        } => {
            let launch = launch.launch()?;
            let figures = match (attach, pid) {
                (Some(addr), Some(pid)) => client_runtime()?
                    .block_on(measure(scenario, target, addr, pid, &launch, &params))?,
                _ => run_once(scenario, target, &launch, &params)?,
            };
            println!("{}", serde_json::to_string_pretty(&figures)?);
            Ok(())
        }
        Command::Report { input } => {
            let text = std::fs::read_to_string(&input)
                .with_context(|| format!("reading {}", input.display()))?;
            let mut results: report::Results = serde_json::from_str(&text)?;
            results.compare_again();
            std::fs::write(&input, serde_json::to_string_pretty(&results)?)?;
            let dir = input.parent().unwrap_or(std::path::Path::new("."));
            report::render(&results, dir)
        }
        Command::RawServer { listen } => client_runtime()?.block_on(raw::serve(listen)),
        Command::FloorServer { listen, layer } => floor::serve(listen, layer),
    }
}

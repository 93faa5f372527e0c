//! The `topichub` binary: `serve`, `pub`, `sub`.

use anyhow::Context as _;
use clap::Parser as _;

use topichub::config::{Cli, Command};

/// mimalloc rather than the system allocator: see Cargo.toml.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let runtime = match topichub::runtime::build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("topichub: cannot start the async runtime: {error}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            // `{:#}` prints the whole cause chain on one line, without a backtrace.
            eprintln!("topichub: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    topichub::logging::init();
    match cli.command {
        Command::Serve(config) => {
            let listener = tokio::net::TcpListener::bind(config.listen)
                .await
                .with_context(|| format!("cannot listen on {}", config.listen))?;
            let shutdown = topichub::shutdown::on_signal();
            topichub::run(listener, *config, shutdown).await?;
        }
        Command::Pub(args) => topichub::client::publish(args).await?,
        Command::Sub(args) => topichub::client::subscribe(args).await?,
        Command::Repair(args) => {
            let summary = topichub::log::disk::repair(&args.data_dir, args.discard)
                .map_err(anyhow::Error::msg)?;
            println!("{summary}");
        }
        Command::Openapi => {
            println!("{}", topichub::http::openapi().to_pretty_json()?);
        }
    }
    Ok(())
}

//! What the process logs: the default filter.
//!
//! h2 logs a WARN line for each odd frame a peer sends (an unsolicited PING ACK, say), so a
//! peer could fill the disk with them; unless `RUST_LOG` names h2, its events below ERROR are
//! filtered out (the connection itself is closed by [`crate::keepalive`]).

/// Filter directives used when `RUST_LOG` is not set.
pub const DEFAULT_FILTER: &str = "info";

/// Installs the process's log subscriber: `RUST_LOG` (else [`DEFAULT_FILTER`]) plus `h2=error`
/// unless `RUST_LOG` says otherwise about h2, formatted to stderr.
pub fn init() {
    let directives = std::env::var("RUST_LOG").unwrap_or_else(|_| DEFAULT_FILTER.to_owned());
    let directives = if directives.contains("h2") {
        directives
    } else {
        format!("{directives},h2=error")
    };
    let filter = tracing_subscriber::EnvFilter::try_new(&directives).unwrap_or_else(|error| {
        eprintln!("topichub: ignoring RUST_LOG={directives:?}: {error}");
        tracing_subscriber::EnvFilter::new(format!("{DEFAULT_FILTER},h2=error"))
    });
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

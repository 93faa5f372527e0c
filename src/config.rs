//! Command line and environment: `topichub serve | pub | sub`.

use std::net::SocketAddr;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::auth::AuthConfig;
use crate::hub::{HubConfig, LagPolicy};
use crate::limits::LimitsConfig;
use crate::log::disk::Fsync;
use crate::log::jetstream::{NatsConfig, StreamLimits};

/// topichub: a topic-based publish/subscribe broker (gRPC, gRPC-Web, HTTP/JSON and SSE on one port).
#[derive(Debug, Parser)]
#[command(name = "topichub", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the broker.
    Serve(Box<ServerConfig>),
    /// Publish MESSAGE (or each line of stdin) to TOPIC.
    Pub(PubArgs),
    /// Print messages of one or more topics or patterns, one per line; reconnects and resumes.
    Sub(SubArgs),
    /// Print the OpenAPI document of the HTTP API (as committed in openapi/openapi.json).
    Openapi,
    /// Check and repair a stopped broker's data dir: rolls back a torn last commit, verifies
    /// every checksum and reads every retained message back.
    Repair(RepairArgs),
}

/// Broker options. Every option can also be set through the environment variable shown.
#[derive(Debug, Clone, Args)]
pub struct ServerConfig {
    /// Address to listen on; gRPC, gRPC-Web, HTTP and SSE all share this port.
    #[arg(long, env = "TOPICHUB_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,

    /// Largest payload accepted, in bytes (larger: HTTP 413 / RESOURCE_EXHAUSTED).
    #[arg(long, env = "TOPICHUB_MAX_PAYLOAD_BYTES", default_value_t = 1024 * 1024)]
    pub max_payload_bytes: usize,

    /// Messages retained per topic for replay and resume.
    #[arg(long, env = "TOPICHUB_RETAIN_MESSAGES", default_value_t = 10_000)]
    pub retain_messages: usize,

    /// Bytes retained per topic (payload + headers + topic name).
    #[arg(long, env = "TOPICHUB_RETAIN_BYTES", default_value_t = 64 * 1024 * 1024)]
    pub retain_bytes: usize,

    /// How long messages are retained, e.g. `90s`, `15m`, `1h`.
    #[arg(long, env = "TOPICHUB_RETAIN_AGE", default_value = "1h", value_parser = humantime::parse_duration)]
    pub retain_age: Duration,

    /// Default subscriber queue length; a full queue triggers the lag policy.
    #[arg(long, env = "TOPICHUB_QUEUE_SIZE", default_value_t = 1024)]
    pub queue_size: usize,

    /// Largest queue length a subscriber may request.
    #[arg(long, env = "TOPICHUB_MAX_QUEUE_SIZE", default_value_t = 65_536)]
    pub max_queue_size: usize,

    /// Default byte budget of a subscriber queue (payload + headers + topic of the queued
    /// messages); a message that would take a non-empty queue over it triggers the lag policy,
    /// like a full queue.
    #[arg(long, env = "TOPICHUB_QUEUE_BYTES", default_value_t = crate::hub::DEFAULT_QUEUE_BYTES)]
    pub queue_bytes: usize,

    /// Largest byte budget a subscriber may ask for (`queue_bytes`).
    #[arg(long, env = "TOPICHUB_MAX_QUEUE_BYTES", default_value_t = crate::hub::DEFAULT_MAX_QUEUE_BYTES)]
    pub max_queue_bytes: usize,

    /// What happens to a subscriber whose queue overflows.
    #[arg(
        long,
        env = "TOPICHUB_LAG_POLICY",
        default_value = "catch-up",
        value_parser = |text: &str| text.parse::<LagPolicy>().map_err(|e| e.to_string()),
    )]
    pub lag_policy: LagPolicy,

    /// Bytes retained across all topics together; when over, the oldest messages hub-wide are
    /// evicted first (resumes from before them get a `gap`). Default: a quarter of the
    /// machine's memory or of the container's limit (1 GiB when neither can be read).
    #[arg(long, env = "TOPICHUB_MAX_RETAINED_BYTES")]
    pub max_retained_bytes: Option<usize>,

    /// How long an idempotency key is remembered after its publish, e.g. `2m`: a retry under it
    /// within this window is answered with the original's cursor (`duplicate: true`) instead
    /// of publishing again.
    #[arg(long, env = "TOPICHUB_IDEMPOTENCY_WINDOW", default_value = "2m", value_parser = humantime::parse_duration)]
    pub idempotency_window: Duration,

    /// Most idempotency keys remembered at once (each costs about its length plus 170 bytes);
    /// beyond it the oldest is forgotten first, shortening the window under heavy keyed traffic.
    #[arg(long, env = "TOPICHUB_IDEMPOTENCY_KEYS", default_value_t = crate::idempotency::DEFAULT_KEYS)]
    pub idempotency_keys: usize,

    /// Keep history in this directory: the epoch, the seq counter and retained messages survive
    /// restarts and crashes. Without it, history is in memory only and a restart starts afresh.
    #[arg(long, env = "TOPICHUB_DATA_DIR")]
    pub data_dir: Option<std::path::PathBuf>,

    /// With --data-dir, when a publish is acknowledged: `always` (after an fsync shared by
    /// concurrent publishes; survives power loss) or `every=DURATION`, e.g. `every=100ms`
    /// (after the write, fsync at most that interval later; faster, may lose the last interval
    /// on a crash).
    #[arg(long, env = "TOPICHUB_FSYNC", default_value = "always", value_parser = parse_fsync)]
    pub fsync: Fsync,

    /// Cluster mode: keep history in a NATS JetStream stream shared by every topichub node
    /// started with the same servers and stream, so that they act as one hub. Comma-separated
    /// URLs, e.g. `nats://n1:4222,nats://n2:4222`. Not with --data-dir.
    #[arg(
        long = "nats",
        env = "TOPICHUB_NATS_URL",
        value_name = "URL[,URL...]",
        value_delimiter = ',',
        conflicts_with = "data_dir"
    )]
    pub nats: Vec<String>,

    /// With --nats, the JetStream stream holding the history (created if missing).
    #[arg(long, env = "TOPICHUB_NATS_STREAM", default_value = crate::log::jetstream::DEFAULT_STREAM)]
    pub nats_stream: String,

    /// With --nats, topics are the subjects `PREFIX.TOPIC` of the stream.
    #[arg(long, env = "TOPICHUB_NATS_SUBJECT_PREFIX", default_value = crate::log::jetstream::DEFAULT_SUBJECT_PREFIX)]
    pub nats_subject_prefix: String,

    /// With --nats, replicas of the stream when this node creates it (3 in production: a
    /// message is acknowledged once a majority stored it; an existing stream keeps its own).
    #[arg(long, env = "TOPICHUB_NATS_REPLICAS", default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=5))]
    pub nats_replicas: u8,

    /// NATS credentials file (`.creds`: user JWT and NKey seed).
    #[arg(long, env = "TOPICHUB_NATS_CREDS")]
    pub nats_creds: Option<std::path::PathBuf>,

    /// NATS user (with --nats-password).
    #[arg(long, env = "TOPICHUB_NATS_USER", requires = "nats_password")]
    pub nats_user: Option<String>,

    /// NATS password (with --nats-user).
    #[arg(
        long,
        env = "TOPICHUB_NATS_PASSWORD",
        requires = "nats_user",
        hide_env_values = true
    )]
    pub nats_password: Option<String>,

    /// NATS token.
    #[arg(
        long,
        env = "TOPICHUB_NATS_TOKEN",
        hide_env_values = true,
        conflicts_with = "nats_user"
    )]
    pub nats_token: Option<String>,

    /// PEM CA certificate(s) the NATS servers' certificates must chain to; connects with TLS.
    #[arg(long, env = "TOPICHUB_NATS_TLS_CA")]
    pub nats_tls_ca: Option<std::path::PathBuf>,

    /// PEM client certificate for NATS servers that verify clients (with --nats-tls-key).
    #[arg(long, env = "TOPICHUB_NATS_TLS_CERT", requires = "nats_tls_key")]
    pub nats_tls_cert: Option<std::path::PathBuf>,

    /// PEM private key of --nats-tls-cert.
    #[arg(long, env = "TOPICHUB_NATS_TLS_KEY", requires = "nats_tls_cert")]
    pub nats_tls_key: Option<std::path::PathBuf>,

    /// Interval of HTTP/2 and WebSocket keepalive pings to clients (detects dead peers).
    #[arg(long, env = "TOPICHUB_KEEPALIVE_INTERVAL", default_value = "30s", value_parser = humantime::parse_duration)]
    pub keepalive_interval: Duration,

    /// How long to wait for a keepalive ping's answer before closing the connection.
    #[arg(long, env = "TOPICHUB_KEEPALIVE_TIMEOUT", default_value = "20s", value_parser = humantime::parse_duration)]
    pub keepalive_timeout: Duration,

    /// Minimum interval between a client's HTTP/2 pings; a client that pings more often is sent
    /// GOAWAY(too_many_pings) and disconnected after 2 strikes (gRPC's keepalive enforcement).
    #[arg(long, env = "TOPICHUB_KEEPALIVE_MIN_PING_INTERVAL", default_value = "5s", value_parser = humantime::parse_duration)]
    pub keepalive_min_ping_interval: Duration,

    /// How long a connection may have data pending while its peer accepts no bytes (a frozen
    /// reader: socket open, nothing read) before it is closed; SSE, gRPC and gRPC-Web alike.
    /// `0s` turns it off.
    #[arg(long, env = "TOPICHUB_WRITE_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub write_timeout: Duration,

    /// Shortest time between two presence events of one subscription (`presence=true`): joins
    /// and leaves within it are coalesced into one event with counts.
    #[arg(long, env = "TOPICHUB_PRESENCE_INTERVAL", default_value = "1s", value_parser = humantime::parse_duration)]
    pub presence_interval: Duration,

    /// Interval of SSE keep-alive comments (keeps proxies from closing idle streams).
    #[arg(long, env = "TOPICHUB_SSE_KEEPALIVE", default_value = "15s", value_parser = humantime::parse_duration)]
    pub sse_keepalive: Duration,

    /// PEM certificate chain: serve every door over TLS (with --tls-key).
    #[arg(long, env = "TOPICHUB_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<std::path::PathBuf>,

    /// PEM private key of --tls-cert.
    #[arg(long, env = "TOPICHUB_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<std::path::PathBuf>,

    /// PEM CA certificate(s): require every client to present a certificate signed by one of
    /// them (mTLS, every door). The certificate's subject names the client in limits and logs;
    /// with JWT keys configured too, a client needs both.
    #[arg(long, env = "TOPICHUB_TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<std::path::PathBuf>,

    /// Open connections at most; more are answered with 429 / RESOURCE_EXHAUSTED.
    #[arg(long, env = "TOPICHUB_MAX_CONNECTIONS", default_value_t = 65_536)]
    pub max_connections: usize,

    /// Live subscriptions one connection may hold (gRPC streams, Connect and WebSocket
    /// subscriptions).
    #[arg(
        long,
        env = "TOPICHUB_MAX_SUBSCRIPTIONS_PER_CONNECTION",
        default_value_t = 1_000
    )]
    pub max_subscriptions_per_connection: usize,

    /// Topics and patterns one subscription may name.
    #[arg(
        long,
        env = "TOPICHUB_MAX_TOPICS_PER_SUBSCRIPTION",
        default_value_t = 100
    )]
    pub max_topics_per_subscription: usize,

    /// Messages per second one client may publish, 0 for no limit. A client is its certificate's
    /// subject with --tls-client-ca, else its token's subject when authentication is on, else its
    /// IP address. Unary and HTTP publishes over the
    /// rate get 429 / RESOURCE_EXHAUSTED; PublishBatch streams are slowed down instead.
    #[arg(long, env = "TOPICHUB_PUBLISH_RATE", default_value_t = 0)]
    pub publish_rate: u32,

    /// Messages a client may publish in a burst above --publish-rate (default: the rate).
    #[arg(long, env = "TOPICHUB_PUBLISH_BURST", default_value_t = 0)]
    pub publish_burst: u32,

    /// Time a new connection has to send its first bytes, and an HTTP/1.1 client a request's
    /// headers or, on an idle keep-alive connection, its next request (slowloris protection).
    #[arg(long, env = "TOPICHUB_HTTP_HEADER_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub http_header_timeout: Duration,

    /// Time an HTTP client has to send a publish request's whole body.
    #[arg(long, env = "TOPICHUB_HTTP_BODY_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub http_body_timeout: Duration,

    /// HS256 secret for JWT bearer tokens. Setting a key (this, --jwt-public-key or --jwks)
    /// turns authentication on for every door except health, reflection, docs and the page.
    #[arg(long, env = "TOPICHUB_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,

    /// PEM file with the RSA or EC public key that verifies tokens (RS256/PS256, ES256/ES384).
    #[arg(long, env = "TOPICHUB_JWT_PUBLIC_KEY")]
    pub jwt_public_key: Option<std::path::PathBuf>,

    /// JWKS file (`{"keys": [...]}`) whose keys verify tokens, chosen by the token's `kid`.
    #[arg(long, env = "TOPICHUB_JWKS")]
    pub jwks: Option<std::path::PathBuf>,

    /// Audience (`aud`) tokens must carry, if set.
    #[arg(long, env = "TOPICHUB_JWT_AUDIENCE")]
    pub jwt_audience: Option<String>,

    /// Issuer (`iss`) tokens must carry, if set.
    #[arg(long, env = "TOPICHUB_JWT_ISSUER")]
    pub jwt_issuer: Option<String>,

    /// How long a graceful shutdown waits for connections to finish before closing them.
    #[arg(long, env = "TOPICHUB_SHUTDOWN_GRACE", default_value = "5s", value_parser = humantime::parse_duration)]
    pub shutdown_grace: Duration,
}

impl ServerConfig {
    /// Defaults for everything, listening on `listen`.
    pub fn new(listen: SocketAddr) -> ServerConfig {
        let cli = Cli::parse_from(["topichub", "serve", "--listen", &listen.to_string()]);
        match cli.command {
            Command::Serve(config) => *config,
            _ => unreachable!("parsed a serve command"),
        }
    }

    /// The authentication part of the configuration.
    pub fn auth(&self) -> AuthConfig {
        AuthConfig {
            secret: self.jwt_secret.clone(),
            public_key: self.jwt_public_key.clone(),
            jwks: self.jwks.clone(),
            audience: self.jwt_audience.clone(),
            issuer: self.jwt_issuer.clone(),
        }
    }

    /// The TLS files, when TLS is configured.
    pub fn tls(&self) -> Option<crate::tls::TlsFiles> {
        Some(crate::tls::TlsFiles {
            cert: self.tls_cert.clone()?,
            key: self.tls_key.clone()?,
            client_ca: self.tls_client_ca.clone(),
        })
    }

    /// The hub's part of the configuration.
    pub fn hub(&self) -> HubConfig {
        HubConfig {
            max_payload_bytes: self.max_payload_bytes,
            retain_messages: self.retain_messages,
            retain_bytes: self.retain_bytes,
            retain_age: self.retain_age,
            queue_size: self.queue_size,
            max_queue_size: self.max_queue_size,
            queue_bytes: self.queue_bytes,
            max_queue_bytes: self.max_queue_bytes,
            lag_policy: self.lag_policy,
            max_topics_per_subscription: self.max_topics_per_subscription,
            max_retained_bytes: self
                .max_retained_bytes
                .unwrap_or_else(default_max_retained_bytes),
            clock: crate::clock::Clock::System,
            idempotency: crate::idempotency::Limits {
                age: self.idempotency_window,
                keys: self.idempotency_keys,
            },
            presence_interval: self.presence_interval,
        }
    }

    /// The JetStream log's configuration, in cluster mode (`--nats`).
    pub fn nats(&self) -> Option<NatsConfig> {
        if self.nats.is_empty() {
            return None;
        }
        let hub = self.hub();
        Some(NatsConfig {
            urls: self.nats.clone(),
            stream: self.nats_stream.clone(),
            subject_prefix: self.nats_subject_prefix.clone(),
            replicas: usize::from(self.nats_replicas),
            creds: self.nats_creds.clone(),
            user: self.nats_user.clone().zip(self.nats_password.clone()),
            token: self.nats_token.clone(),
            tls_ca: self.nats_tls_ca.clone(),
            tls_client: self.nats_tls_cert.clone().zip(self.nats_tls_key.clone()),
            limits: StreamLimits {
                messages_per_subject: hub.retain_messages,
                age: hub.retain_age,
                bytes: hub.max_retained_bytes,
                // Headers travel as one JSON header: a little more than their raw size.
                max_message_bytes: hub.max_payload_bytes + 2 * crate::hub::MAX_HEADER_BYTES,
            },
        })
    }

    /// The server-wide limits.
    pub fn limits(&self) -> LimitsConfig {
        LimitsConfig {
            max_connections: self.max_connections,
            max_subscriptions_per_connection: self.max_subscriptions_per_connection,
            publish_rate: self.publish_rate,
            publish_burst: self.publish_burst,
        }
    }
}

/// Where the CLI clients connect.
#[derive(Debug, Clone, Args)]
pub struct ClientArgs {
    /// Broker URL (gRPC). Give several (repeat the flag, or separate them with commas) to fail
    /// over: `pub` and `sub` move on to the next when one does not answer. They should be nodes
    /// of one hub (a cluster, or one data dir): a cursor or idempotency key from one node then
    /// means the same on the others.
    #[arg(
        long = "server",
        env = "TOPICHUB_SERVER",
        default_value = "http://127.0.0.1:8080",
        value_delimiter = ','
    )]
    pub servers: Vec<String>,
    /// PEM CA certificate to trust for an `https://` server, in addition to the system roots
    /// (e.g. a self-signed broker certificate).
    #[arg(long, env = "TOPICHUB_CA_CERT")]
    pub ca_cert: Option<std::path::PathBuf>,
    /// JWT to send as `authorization: Bearer` (needed when the broker has authentication on).
    #[arg(long, env = "TOPICHUB_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
}

/// `topichub repair`.
#[derive(Debug, Clone, Args)]
pub struct RepairArgs {
    /// The data dir of a stopped broker.
    #[arg(long, env = "TOPICHUB_DATA_DIR")]
    pub data_dir: std::path::PathBuf,
    /// If the log cannot be repaired, move its file aside so that the broker starts with an
    /// empty history (a new epoch); the file is kept for inspection.
    #[arg(long)]
    pub discard: bool,
}

/// `topichub pub`.
#[derive(Debug, Clone, Args)]
pub struct PubArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// Topic to publish to.
    pub topic: String,
    /// Message to publish; without it, each line of stdin is published as one message.
    pub message: Option<String>,
    /// A header `NAME=VALUE` to send with every message (repeatable).
    #[arg(long = "header", short = 'H', value_parser = parse_header)]
    pub headers: Vec<(String, String)>,
    /// How long to keep retrying a publish that got no answer, trying each `--server` in turn
    /// with back-off; every message carries an idempotency key, so a retry of one that was
    /// stored after all is answered as a duplicate, not published twice.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub retry_for: Duration,
    /// How long one attempt (one message, or one batch of stdin lines) may take before the next
    /// server is tried.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
}

/// `topichub sub`.
#[derive(Debug, Clone, Args)]
pub struct SubArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// Topics or patterns (`*` = one token, `>` = one or more trailing tokens).
    #[arg(required = true)]
    pub topics: Vec<String>,
    /// Where to start: `latest` (only new), `earliest` (all retained), or a cursor `EPOCH-SEQ`.
    #[arg(long, default_value = "latest")]
    pub from: String,
    /// Print each message as a JSON line (topic, cursor, payload) instead of its payload.
    #[arg(long)]
    pub json: bool,
    /// Longest wait between reconnect attempts.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub max_backoff: Duration,
}

fn parse_fsync(text: &str) -> Result<Fsync, String> {
    text.parse()
}

/// A quarter of the memory this process may use: the machine's (`MemTotal` of /proc/meminfo),
/// or the container's limit (cgroup v2 `memory.max`) when lower; 1 GiB when neither is known.
fn default_max_retained_bytes() -> usize {
    let machine = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| {
            let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
            let kib: usize = line.split_whitespace().nth(1)?.parse().ok()?;
            Some(kib.saturating_mul(1024))
        });
    let container = std::fs::read_to_string("/sys/fs/cgroup/memory.max")
        .ok()
        .and_then(|text| text.trim().parse::<usize>().ok());
    let total = match (machine, container) {
        (Some(m), Some(c)) => Some(m.min(c)),
        (m, c) => m.or(c),
    };
    total.map_or(1024 * 1024 * 1024, |bytes| bytes / 4)
}

fn parse_header(text: &str) -> Result<(String, String), String> {
    let (name, value) = text
        .split_once('=')
        .ok_or_else(|| format!("expected NAME=VALUE, got {text:?}"))?;
    Ok((name.trim().to_ascii_lowercase(), value.to_owned()))
}

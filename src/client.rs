//! The command-line clients: `topichub pub` and `topichub sub`, speaking `topichub.v1` gRPC.
//!
//! Both take several `--server` URLs and fail over between them: `sub` resumes on the next
//! server after the last message it printed, and `pub` retries on the next server under the
//! message's idempotency key, so a retry after a lost answer is answered as a duplicate rather
//! than published twice. Both guarantees need the servers to be one hub (cluster nodes, or one
//! data dir): cursors and keys are a hub's own.

use std::future::Future;
use std::time::Duration;

use anyhow::{Context as _, bail};
use tokio::io::AsyncBufReadExt as _;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use tonic::{Code, Status};

use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;

use crate::config::{ClientArgs, PubArgs, SubArgs};
use crate::proto::v1::{
    self, Cursor, PublishRequest, StartPosition, SubscribeRequest, pub_sub_client::PubSubClient,
    start_position::Position, subscribe_response::Event,
};

/// First reconnect delay of `sub`; doubled after each failed attempt up to `--max-backoff`.
const INITIAL_BACKOFF: Duration = Duration::from_millis(100);

/// The broker's endpoint at `server`; `https://` URLs use TLS with the system roots plus
/// `--ca-cert`.
fn endpoint(server: &str, args: &ClientArgs) -> anyhow::Result<Endpoint> {
    let endpoint = Endpoint::from_shared(server.to_owned())
        .with_context(|| {
            format!("invalid --server URL {server:?} (expected e.g. http://127.0.0.1:8080)")
        })?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true);
    if !server.starts_with("https://") {
        return Ok(endpoint);
    }
    let mut tls = ClientTlsConfig::new().with_native_roots();
    if let Some(path) = &args.ca_cert {
        let pem = std::fs::read(path)
            .with_context(|| format!("cannot read --ca-cert {}", path.display()))?;
        tls = tls.ca_certificate(Certificate::from_pem(pem));
    }
    endpoint.tls_config(tls).context("TLS setup")
}

/// A client of the broker that sends `authorization: Bearer <token>` when a token is given.
pub type Client = PubSubClient<InterceptedService<Channel, BearerToken>>;

/// Adds the bearer token to every call.
#[derive(Clone)]
pub struct BearerToken(Option<MetadataValue<Ascii>>);

impl BearerToken {
    fn new(token: Option<&str>) -> anyhow::Result<BearerToken> {
        let value = token
            .map(|t| format!("Bearer {t}").parse())
            .transpose()
            .map_err(|_| anyhow::anyhow!("--token must be printable ASCII (a JWT)"))?;
        Ok(BearerToken(value))
    }
}

impl tonic::service::Interceptor for BearerToken {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

fn client(channel: Channel, token: &BearerToken) -> Client {
    PubSubClient::with_interceptor(channel, token.clone()).max_decoding_message_size(usize::MAX)
}

/// The `--server` URLs, tried in turn: one is current, and a failure moves on to the next.
struct Servers {
    urls: Vec<String>,
    endpoints: Vec<Endpoint>,
    token: BearerToken,
    current: usize,
    /// A connection to the current server, kept while it answers.
    connected: Option<Client>,
    /// Failures since the last success: once every server has failed in a row, back off.
    failures: usize,
    backoff: Duration,
}

impl Servers {
    fn new(args: &ClientArgs) -> anyhow::Result<Servers> {
        let urls: Vec<String> = args
            .servers
            .iter()
            .map(|url| url.trim().to_owned())
            .filter(|url| !url.is_empty())
            .collect();
        if urls.is_empty() {
            bail!("give at least one --server URL");
        }
        let endpoints = urls
            .iter()
            .map(|url| endpoint(url, args))
            .collect::<anyhow::Result<_>>()?;
        Ok(Servers {
            urls,
            endpoints,
            token: BearerToken::new(args.token.as_deref())?,
            current: 0,
            connected: None,
            failures: 0,
            backoff: INITIAL_BACKOFF,
        })
    }

    fn url(&self) -> &str {
        &self.urls[self.current]
    }

    /// A client of the current server, connecting if needed.
    async fn client(&mut self) -> Result<Client, Status> {
        if let Some(client) = &self.connected {
            return Ok(client.clone());
        }
        let channel = self.endpoints[self.current].connect().await.map_err(|e| {
            Status::unavailable(format!(
                "cannot connect to {}: {}; is `topichub serve` running there?",
                self.urls[self.current],
                error_chain(&e)
            ))
        })?;
        let client = client(channel, &self.token);
        self.connected = Some(client.clone());
        Ok(client)
    }

    /// The current server answered.
    fn succeeded(&mut self) {
        self.failures = 0;
        self.backoff = INITIAL_BACKOFF;
    }

    /// The current server failed with `status`: moves on to the next one, after a back-off
    /// with jitter once every server has failed in a row (so that a fleet of clients does not
    /// hammer, in lock-step, brokers that are all away), at most `max_backoff`.
    async fn failed(&mut self, status: &Status, max_backoff: Duration) {
        self.connected = None;
        self.failures += 1;
        let failed = self.url().to_owned();
        self.current = (self.current + 1) % self.urls.len();
        if !self.failures.is_multiple_of(self.urls.len()) {
            eprintln!(
                "topichub: {failed}: {}; trying {}",
                status.message(),
                self.url()
            );
            return;
        }
        eprintln!(
            "topichub: {}; reconnecting in {:?}",
            status.message(),
            self.backoff
        );
        // Full jitter: a fleet of clients does not reconnect in lock-step after a restart.
        let delay = self.backoff.mul_f64(0.5 + fastrand::f64() / 2.0);
        tokio::time::sleep(delay).await;
        self.backoff = (self.backoff * 2).min(max_backoff);
    }

    /// Runs `call` on the current server, moving on through the others on failures that a
    /// retry may fix (including no answer within `timeout`), until it succeeds or `retry_for`
    /// has passed. `call` must be safe to repeat: `pub` sends idempotency keys.
    async fn retry<T, F, Fut>(
        &mut self,
        (retry_for, timeout): (Duration, Duration),
        mut call: F,
    ) -> anyhow::Result<T>
    where
        F: FnMut(Client) -> Fut,
        Fut: Future<Output = Result<T, Status>>,
    {
        let deadline = tokio::time::Instant::now() + retry_for;
        loop {
            let attempt = async {
                let client = self.client().await?;
                call(client).await
            };
            let outcome = tokio::time::timeout(timeout, attempt)
                .await
                .unwrap_or_else(|_| {
                    Err(Status::deadline_exceeded(format!(
                        "no answer within --timeout {timeout:?}"
                    )))
                });
            match outcome {
                Ok(answer) => {
                    self.succeeded();
                    return Ok(answer);
                }
                Err(status) if is_fatal(status.code()) || is_refusal(status.code()) => {
                    bail!("publish failed: {}", status.message())
                }
                Err(status) if tokio::time::Instant::now() >= deadline => bail!(
                    "publish failed: no server answered within --retry-for {retry_for:?}; last error: {}",
                    status.message()
                ),
                Err(status) => self.failed(&status, RETRY_MAX_BACKOFF).await,
            }
        }
    }
}

/// A connection error with its causes, which say what actually went wrong (refused, timed out).
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Longest back-off of `pub` between rounds over its servers.
const RETRY_MAX_BACKOFF: Duration = Duration::from_secs(2);

/// Lines of stdin published through one `PublishBatch` call: the batch is kept until it is
/// acknowledged, to be sent again (under the same keys) to the next server if it is not.
const BATCH_LINES: usize = 1000;

/// Bytes of stdin lines in one batch, at most (a longer line goes alone).
const BATCH_BYTES: usize = 4 * 1024 * 1024;

/// How long a batch waits for more lines once it has one: lines typed by hand are published at
/// once, piped ones in batches.
const BATCH_LINGER: Duration = Duration::from_millis(20);

/// The idempotency keys of one `pub` run: a random prefix, and the message's number.
struct Keys {
    prefix: String,
    next: u64,
}

impl Keys {
    fn new() -> Keys {
        Keys {
            prefix: format!("{:016x}{:016x}", fastrand::u64(..), fastrand::u64(..)),
            next: 0,
        }
    }

    fn next(&mut self) -> String {
        self.next += 1;
        format!("{}-{}", self.prefix, self.next)
    }
}

/// `topichub pub`: one message, or each line of stdin through `PublishBatch` streams. Every
/// message carries an idempotency key, and a publish that gets no answer is retried (with the
/// same key) on the next `--server`.
pub async fn publish(args: PubArgs) -> anyhow::Result<()> {
    let mut servers = Servers::new(&args.client)?;
    let mut keys = Keys::new();
    let headers: std::collections::HashMap<String, String> = args.headers.into_iter().collect();
    let topic = args.topic.clone();
    let mut request = move |payload: Vec<u8>| PublishRequest {
        topic: topic.clone(),
        payload: payload.into(),
        headers: headers.clone(),
        idempotency_key: keys.next(),
    };
    let limits = (args.retry_for, args.timeout);
    match args.message {
        Some(message) => {
            let message = request(message.into_bytes());
            let response = servers
                .retry(limits, |mut client| {
                    let message = message.clone();
                    async move { client.publish(message).await }
                })
                .await?
                .into_inner();
            if response.duplicate {
                eprintln!("topichub: an earlier attempt had published it; this is its cursor");
            }
            println!("{}", text_cursor(response.cursor.as_ref()));
        }
        None => {
            let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
            let (mut accepted, mut last) = (0, None);
            loop {
                let batch: Vec<PublishRequest> = read_batch(&mut lines)
                    .await?
                    .into_iter()
                    .map(&mut request)
                    .collect();
                if batch.is_empty() {
                    break;
                }
                let response = servers
                    .retry(limits, |mut client| {
                        let batch = tokio_stream::iter(batch.clone());
                        async move { client.publish_batch(batch).await }
                    })
                    .await
                    .map_err(|e| match accepted {
                        0 => e,
                        n => e.context(format!("{n} earlier lines were published")),
                    })?
                    .into_inner();
                accepted += response.accepted;
                last = response.last_cursor.or(last);
            }
            eprintln!("published {accepted} messages");
            if accepted > 0 {
                println!("{}", text_cursor(last.as_ref()));
            }
        }
    }
    Ok(())
}

/// The next batch of stdin lines: up to [`BATCH_LINES`] lines and [`BATCH_BYTES`] bytes, or
/// what arrived until the input paused for [`BATCH_LINGER`]; empty at the end of the input.
async fn read_batch(
    lines: &mut tokio::io::Lines<tokio::io::BufReader<tokio::io::Stdin>>,
) -> anyhow::Result<Vec<Vec<u8>>> {
    let mut batch = Vec::new();
    let mut bytes = 0;
    while batch.len() < BATCH_LINES && bytes < BATCH_BYTES {
        let next = if batch.is_empty() {
            lines.next_line().await
        } else {
            match tokio::time::timeout(BATCH_LINGER, lines.next_line()).await {
                Ok(next) => next,
                Err(_) => break,
            }
        };
        match next.context("reading stdin")? {
            Some(line) => {
                bytes += line.len();
                batch.push(line.into_bytes());
            }
            None => break,
        }
    }
    Ok(batch)
}

fn text_cursor(cursor: Option<&Cursor>) -> String {
    cursor
        .map(|c| format!("{}-{}", c.epoch, c.seq))
        .unwrap_or_default()
}

/// `topichub sub`: prints messages until interrupted. When its server goes away it moves on to
/// the next `--server` (with exponential back-off and jitter once all have failed in a row),
/// resuming after the last message it printed.
pub async fn subscribe(args: SubArgs) -> anyhow::Result<()> {
    let mut start = match args.from.as_str() {
        "latest" => Position::Latest(true),
        "earliest" => Position::Earliest(true),
        text => {
            let cursor: crate::cursor::Cursor =
                text.parse().map_err(|e| anyhow::anyhow!("--from: {e}"))?;
            Position::After(Cursor {
                epoch: cursor.epoch,
                seq: cursor.seq,
            })
        }
    };
    let mut servers = Servers::new(&args.client)?;
    let stdout = std::io::stdout();
    loop {
        let request = SubscribeRequest {
            topics: args.topics.clone(),
            start: Some(StartPosition {
                position: Some(start.clone()),
            }),
            ..Default::default()
        };
        let outcome = async {
            let mut client = servers.client().await?;
            let mut stream = client.subscribe(request).await?.into_inner();
            while let Some(response) = stream.message().await? {
                match response.event {
                    Some(Event::Subscribed(subscribed)) => {
                        servers.succeeded();
                        // Resume from here if nothing arrives before the connection drops.
                        if let (Position::Latest(_), Some(head)) = (&start, subscribed.head) {
                            start = Position::After(head);
                        }
                        tracing::info!(server = %servers.url(), "subscribed");
                    }
                    Some(Event::Message(message)) => {
                        print_message(&mut stdout.lock(), &message, args.json)
                            .map_err(|e| tonic::Status::aborted(format!("stdout: {e}")))?;
                        if let Some(cursor) = message.cursor {
                            start = Position::After(cursor);
                        }
                    }
                    Some(Event::Gap(gap)) => {
                        let to = if gap.to_seq == 0 {
                            "end of that epoch".to_owned()
                        } else {
                            gap.to_seq.to_string()
                        };
                        eprintln!(
                            "topichub: gap: messages {}..{to} of epoch {} cannot be delivered ({})",
                            gap.from_seq, gap.epoch, gap.reason
                        );
                    }
                    Some(Event::Lag(lag)) => {
                        eprintln!(
                            "topichub: fell behind at seq {}; catching up to {}",
                            lag.from_seq, lag.to_seq
                        );
                    }
                    Some(Event::Cluster(status)) => eprintln!("topichub: {}", status.message),
                    // Not asked for.
                    Some(Event::Presence(_)) | None => {}
                }
            }
            Ok::<(), tonic::Status>(())
        }
        .await;
        let status = match outcome {
            Ok(()) => Status::unavailable("stream ended"),
            Err(status) if is_fatal(status.code()) => {
                bail!("subscribe failed: {}", status.message())
            }
            Err(status) => status,
        };
        servers.failed(&status, args.max_backoff).await;
    }
}

/// Errors that retrying cannot fix.
fn is_fatal(code: Code) -> bool {
    matches!(
        code,
        Code::InvalidArgument
            | Code::NotFound
            | Code::PermissionDenied
            | Code::Unauthenticated
            | Code::Unimplemented
            | Code::Aborted
    )
}

/// Publishes the broker refused for good: a retry, anywhere, gets the same answer.
fn is_refusal(code: Code) -> bool {
    matches!(
        code,
        Code::ResourceExhausted | Code::AlreadyExists | Code::OutOfRange | Code::FailedPrecondition
    )
}

fn print_message(
    out: &mut impl std::io::Write,
    message: &v1::Message,
    json: bool,
) -> std::io::Result<()> {
    if json {
        let payload = String::from_utf8_lossy(&message.payload);
        let line = serde_json::json!({
            "topic": message.topic,
            "cursor": text_cursor(message.cursor.as_ref()),
            "payload": payload,
            "headers": message.headers,
        });
        writeln!(out, "{line}")?;
    } else {
        out.write_all(&message.payload)?;
        out.write_all(b"\n")?;
    }
    out.flush()
}

//! The command-line clients: `topichub pub` and `topichub sub`, speaking `topichub.v1` gRPC.

use std::time::Duration;

use anyhow::{Context as _, bail};
use tokio::io::AsyncBufReadExt as _;
use tokio_stream::StreamExt as _;
use tokio_stream::wrappers::LinesStream;
use tonic::Code;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;

use crate::config::{ClientArgs, PubArgs, SubArgs};
use crate::proto::v1::{
    self, Cursor, PublishRequest, StartPosition, SubscribeRequest, pub_sub_client::PubSubClient,
    start_position::Position, subscribe_response::Event,
};

/// First reconnect delay of `sub`; doubled after each failed attempt up to `--max-backoff`.
const INITIAL_BACKOFF: Duration = Duration::from_millis(100);

/// The broker's endpoint; `https://` URLs use TLS with the system roots plus `--ca-cert`.
fn endpoint(args: &ClientArgs) -> anyhow::Result<Endpoint> {
    let server = &args.server;
    let endpoint = Endpoint::from_shared(server.clone())
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

async fn connect(args: &ClientArgs) -> anyhow::Result<Client> {
    let server = &args.server;
    let channel = endpoint(args)?.connect().await.with_context(|| {
        format!("cannot connect to {server}; is `topichub serve` running there?")
    })?;
    Ok(client(channel, &BearerToken::new(args.token.as_deref())?))
}

/// `topichub pub`: one message, or each line of stdin through one `PublishBatch` stream.
pub async fn publish(args: PubArgs) -> anyhow::Result<()> {
    let mut client = connect(&args.client).await?;
    let headers: std::collections::HashMap<String, String> = args.headers.into_iter().collect();
    let topic = args.topic.clone();
    let request = move |payload: Vec<u8>| PublishRequest {
        topic: topic.clone(),
        payload: payload.into(),
        headers: headers.clone(),
    };
    match args.message {
        Some(message) => {
            let response = client
                .publish(request(message.into_bytes()))
                .await
                .map_err(|s| anyhow::anyhow!("publish failed: {}", s.message()))?;
            println!("{}", text_cursor(response.get_ref().cursor.as_ref()));
        }
        None => {
            let lines = LinesStream::new(tokio::io::BufReader::new(tokio::io::stdin()).lines());
            let requests = lines
                .map_while(Result::ok)
                .map(move |line| request(line.into_bytes()));
            let response = client
                .publish_batch(requests)
                .await
                .map_err(|s| anyhow::anyhow!("publish failed: {}", s.message()))?;
            let response = response.into_inner();
            eprintln!("published {} messages", response.accepted);
            if response.accepted > 0 {
                println!("{}", text_cursor(response.last_cursor.as_ref()));
            }
        }
    }
    Ok(())
}

fn text_cursor(cursor: Option<&Cursor>) -> String {
    cursor
        .map(|c| format!("{}-{}", c.epoch, c.seq))
        .unwrap_or_default()
}

/// `topichub sub`: prints messages until interrupted; reconnects with exponential back-off and
/// jitter while the broker is away, resuming after the last message it printed.
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
    let endpoint = endpoint(&args.client)?;
    let token = BearerToken::new(args.client.token.as_deref())?;
    let mut backoff = INITIAL_BACKOFF;
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
            let channel = endpoint
                .connect()
                .await
                .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
            let mut client = client(channel, &token);
            let mut stream = client.subscribe(request).await?.into_inner();
            while let Some(response) = stream.message().await? {
                match response.event {
                    Some(Event::Subscribed(subscribed)) => {
                        backoff = INITIAL_BACKOFF;
                        // Resume from here if nothing arrives before the connection drops.
                        if let (Position::Latest(_), Some(head)) = (&start, subscribed.head) {
                            start = Position::After(head);
                        }
                        tracing::info!(server = %args.client.server, "subscribed");
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
                    // Not asked for.
                    Some(Event::Presence(_)) | None => {}
                }
            }
            Ok::<(), tonic::Status>(())
        }
        .await;
        match outcome {
            Ok(()) => eprintln!("topichub: stream ended; reconnecting"),
            Err(status) if is_fatal(status.code()) => {
                bail!("subscribe failed: {}", status.message())
            }
            Err(status) => eprintln!(
                "topichub: {}; reconnecting in {backoff:?}",
                status.message()
            ),
        }
        // Full jitter: a fleet of clients does not reconnect in lock-step after a broker restart.
        let delay = backoff.mul_f64(0.5 + fastrand::f64() / 2.0);
        tokio::time::sleep(delay).await;
        backoff = (backoff * 2).min(args.max_backoff);
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

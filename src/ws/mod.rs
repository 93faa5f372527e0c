//! `GET /ws`: the `Connect` protocol over WebSocket, for browsers (which cannot stream both ways
//! over gRPC-Web). One socket carries many subscriptions, publishes with per-message acks, and
//! unsubscribes.
//!
//! The door only moves frames: text frames are JSON ([`frames`]), binary frames the protobuf
//! `ConnectRequest` / `ConnectResponse`; every request goes to a [`Session`] below the doors,
//! the one the gRPC `Connect` call uses too. A socket speaks the format of its first request
//! frame; its answers and events use it.
//!
//! Authentication and limits are the HTTP door's (the route sits behind its guard, so the token
//! comes from the `authorization` header or, for browsers, the `access_token` query parameter or
//! cookie of the upgrade request). Keepalive pings follow `--keepalive-interval` and
//! `--keepalive-timeout`; shutdown and token expiry close the socket with a reason.

pub mod frames;

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::Json;
use axum::extract::Extension;
use axum::extract::ws::{
    CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade, close_code,
    rejection::WebSocketUpgradeRejection,
};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use futures_util::{SinkExt, StreamExt};
use tokio::sync::mpsc;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use crate::auth::Access;
use crate::connect::{Outbox, Outgoing, Session};
use crate::error::{Error, Kind};
use crate::hub::Hub;
use crate::json::{ErrorBody, ErrorDetail};
use crate::limits::{Connection, Limits};
use crate::metrics::Door;
use crate::wire::v1;

/// Malformed frames (undecodable, or a request that is not one of the three) a socket may send
/// within [`MALFORMED_WINDOW`]; each gets an `error` answer, and the next one closes the socket
/// with a policy-violation code. Enough for a client bug to be seen, not enough to keep the
/// server parsing garbage.
pub const MAX_MALFORMED_FRAMES: u32 = 10;

/// The window [`MAX_MALFORMED_FRAMES`] is counted in.
pub const MALFORMED_WINDOW: Duration = Duration::from_secs(10);

/// Longest close reason a close frame can carry (RFC 6455, section 5.5: 125-byte control
/// payload, 2 of them the code).
const MAX_CLOSE_REASON: usize = 123;

/// What the WebSocket door needs from the server; added to every request's extensions by the
/// server, so the route can sit in the HTTP router behind its guard.
#[derive(Clone)]
pub struct WsDoor {
    /// The hub.
    pub hub: Hub,
    /// Limits shared with every door (subscriptions per connection, publish rate).
    pub limits: Limits,
    /// The server's shutdown signal: sockets close with a reason.
    pub shutdown: CancellationToken,
    /// Interval of pings to the client (`--keepalive-interval`).
    pub keepalive_interval: Duration,
    /// How long a ping may go unanswered before the peer counts as dead (`--keepalive-timeout`).
    pub keepalive_timeout: Duration,
}

/// Connect over WebSocket.
///
/// Upgrades to a WebSocket speaking the `Connect` protocol. Text frames are JSON: requests are
/// `WsRequest` (`request_id` and one of `subscribe`, `publish`, `unsubscribe`), answers and
/// events are `WsResponse` (`request_id`, `subscription_id` and one of `subscribed`, `message`,
/// `gap`, `lag`, `ack`, `unsubscribed`, `error`). Binary frames carry the protobuf
/// `topichub.v1.ConnectRequest` / `ConnectResponse`. A socket answers in the format of its
/// first request. A malformed frame gets an `error` answer and the socket stays open; too many
/// close it (1008). Shutdown closes with 1001 and token expiry with 1008, each with a reason.
/// Browsers pass their token as `access_token` (query or cookie).
#[utoipa::path(
    get,
    path = "/ws",
    tag = "subscribe",
    responses(
        (status = 101, description = "Switching to the WebSocket protocol; frames are WsRequest (client) and WsResponse (server) as JSON text, or protobuf ConnectRequest / ConnectResponse as binary"),
        (status = 400, description = "Not a WebSocket upgrade request (HTTP/1.1 `Connection: upgrade`, `Upgrade: websocket`, `Sec-WebSocket-Key`)", body = ErrorBody),
        (status = 426, description = "The connection cannot be upgraded", body = ErrorBody),
    )
)]
pub async fn connect(
    Extension(door): Extension<WsDoor>,
    Extension(access): Extension<Access>,
    Extension(connection): Extension<Connection>,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    let upgrade = match upgrade {
        Ok(upgrade) => upgrade,
        Err(rejection) => return refusal(&rejection),
    };
    // No frame or message may exceed what the largest publish needs.
    let limit = crate::json::max_request_bytes(door.hub.config().max_payload_bytes);
    upgrade
        .max_message_size(limit)
        .max_frame_size(limit)
        .on_upgrade(move |socket| serve(socket, door, access, connection))
}

/// Adds the frame schemas of `GET /ws` to the OpenAPI document's components (an upgrade's
/// frames are not a request or response body, so no operation names them).
pub fn document(openapi: &mut utoipa::openapi::OpenApi) {
    use utoipa::ToSchema;
    let mut schemas = Vec::new();
    <frames::WsRequest as ToSchema>::schemas(&mut schemas);
    <frames::WsResponse as ToSchema>::schemas(&mut schemas);
    use utoipa::PartialSchema as _;
    schemas.extend([
        (
            frames::WsRequest::name().into(),
            frames::WsRequest::schema(),
        ),
        (
            frames::WsResponse::name().into(),
            frames::WsResponse::schema(),
        ),
    ]);
    let components = openapi.components.get_or_insert_with(Default::default);
    for (name, schema) in schemas {
        components.schemas.entry(name).or_insert(schema);
    }
}

/// A request that cannot be upgraded, as a JSON error like every other HTTP answer.
fn refusal(rejection: &WebSocketUpgradeRejection) -> Response {
    let status = rejection.status();
    let code = match status {
        StatusCode::METHOD_NOT_ALLOWED => Kind::Unimplemented.code_name(),
        StatusCode::UPGRADE_REQUIRED => "FAILED_PRECONDITION",
        _ => Kind::InvalidArgument.code_name(),
    };
    let body = ErrorBody {
        error: ErrorDetail {
            code: code.into(),
            message: format!(
                "{}; GET /ws is a WebSocket upgrade over HTTP/1.1",
                rejection.body_text()
            ),
        },
    };
    (status, Json(body)).into_response()
}

/// The format of a socket's frames, set by its first request frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Format {
    Json,
    Protobuf,
}

/// Serves one socket: this task reads frames into the session; a writer task writes the
/// session's answers and events, and the pings.
async fn serve(socket: WebSocket, door: WsDoor, access: Access, connection: Connection) {
    let (sink, mut stream) = socket.split();
    let (outbox, answers) = Outbox::new();
    let format = Arc::new(OnceLock::new());
    let writer = tokio::spawn(write(
        sink,
        answers,
        format.clone(),
        door.keepalive_interval,
    ));
    let mut session = Session::new(
        (access, connection),
        (door.hub.clone(), door.limits.clone(), door.shutdown.clone()),
        Door::Ws,
        outbox,
    );
    let mut end = session.end();
    let mut malformed = Strikes::default();
    // A live peer answers each ping within the timeout, so silence for longer than an interval
    // and a timeout means it is gone.
    let silence = door.keepalive_interval + door.keepalive_timeout;
    let ended = loop {
        let frame = tokio::select! {
            frame = tokio::time::timeout(silence, stream.next()) => frame,
            error = end.ended() => break Some(error),
            () = session.gone() => break None,
        };
        let request = match frame {
            Err(_) => {
                tracing::debug!("WebSocket peer stopped answering pings");
                break None;
            }
            Ok(None | Some(Err(_)) | Some(Ok(Message::Close(_)))) => break None,
            Ok(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => continue,
            Ok(Some(Ok(Message::Text(text)))) => {
                decode(&format, Format::Json, || frames::decode(text.as_str()))
            }
            Ok(Some(Ok(Message::Binary(bytes)))) => decode(&format, Format::Protobuf, || {
                use prost::Message as _;
                v1::ConnectRequest::decode(bytes).map_err(|e| {
                    (
                        0,
                        Error::InvalidRequest(format!(
                            "a binary frame must be a protobuf topichub.v1.ConnectRequest: {e}"
                        )),
                    )
                })
            }),
        };
        let handled = match request {
            Ok(request) => tokio::select! {
                handled = session.handle(request) => handled,
                error = end.ended() => break Some(error),
            },
            Err((request_id, error)) => {
                if malformed.strike(Instant::now()) {
                    break Some(Error::InvalidRequest(format!(
                        "more than {MAX_MALFORMED_FRAMES} malformed frames within {MALFORMED_WINDOW:?}"
                    )));
                }
                session.reject(request_id, &error).await
            }
        };
        if handled.is_err() {
            break None;
        }
    };
    // The reason goes through the outbox, after the answers queued before it; the writer turns
    // it into the close frame.
    // A client that stopped reading cannot be told, and is not waited for longer than it has
    // to answer a ping; neither is the writer, whose socket may be full for good.
    let patience = door.keepalive_timeout;
    if let Some(error) = ended {
        let _ = tokio::time::timeout(patience, session.fail(error)).await;
    }
    // Ends every subscription of the socket.
    drop(session);
    let mut writer = writer;
    if tokio::time::timeout(patience, &mut writer).await.is_err() {
        writer.abort();
    }
}

/// Decodes one request frame of `kind`; the first frame fixes the socket's format and a frame of
/// the other kind is refused.
fn decode(
    format: &OnceLock<Format>,
    kind: Format,
    decode: impl FnOnce() -> Result<v1::ConnectRequest, (u64, Error)>,
) -> Result<v1::ConnectRequest, (u64, Error)> {
    let chosen = *format.get_or_init(|| kind);
    if chosen != kind {
        let (speaks, other) = match chosen {
            Format::Json => ("JSON text frames", "binary"),
            Format::Protobuf => ("protobuf binary frames", "text"),
        };
        return Err((
            0,
            Error::InvalidRequest(format!(
                "this socket speaks {speaks} (set by its first request); a {other} frame is not accepted: open another socket for the other format"
            )),
        ));
    }
    decode()
}

/// Counts malformed frames within a sliding window.
#[derive(Default)]
struct Strikes {
    times: std::collections::VecDeque<Instant>,
}

impl Strikes {
    /// Records one; `true` when the socket has now sent more than the limit within the window.
    fn strike(&mut self, now: Instant) -> bool {
        while self
            .times
            .front()
            .is_some_and(|t| now.duration_since(*t) > MALFORMED_WINDOW)
        {
            self.times.pop_front();
        }
        self.times.push_back(now);
        self.times.len() > MAX_MALFORMED_FRAMES as usize
    }
}

/// The close frame for what ended the stream: shutdown (going away), or token expiry or a flood
/// of malformed frames (policy violation).
fn closing(error: &Error) -> CloseFrame {
    let code = match error {
        Error::ShuttingDown => close_code::AWAY,
        _ => close_code::POLICY,
    };
    close_frame(code, &error.to_string())
}

fn close_frame(code: u16, reason: &str) -> CloseFrame {
    let mut end = reason.len().min(MAX_CLOSE_REASON);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    CloseFrame {
        code,
        reason: Utf8Bytes::from(&reason[..end]),
    }
}

/// Writes the session's answers and events in the socket's format and pings every
/// `ping_every`; the error that ends the session becomes the close frame.
async fn write(
    mut sink: futures_util::stream::SplitSink<WebSocket, Message>,
    mut answers: mpsc::Receiver<Outgoing>,
    format: Arc<OnceLock<Format>>,
    ping_every: Duration,
) {
    let mut ping = tokio::time::interval_at(Instant::now() + ping_every, ping_every);
    ping.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        // An event's share of the outbox's byte budget is held until the socket has taken it.
        let (message, _share) = tokio::select! {
            answer = answers.recv() => match answer {
                Some((Ok(response), share)) => (encode(response, format.get().copied()), share),
                Some((Err(error), _)) => {
                    let _ = sink.send(Message::Close(Some(closing(&error)))).await;
                    break;
                }
                // The client left, or the session ended without a reason.
                None => break,
            },
            _ = ping.tick() => (Message::Ping(Default::default()), None),
        };
        if sink.send(message).await.is_err() {
            break;
        }
    }
    let _ = sink.close().await;
}

fn encode(response: v1::ConnectResponse, format: Option<Format>) -> Message {
    match format {
        Some(Format::Protobuf) => {
            use prost::Message as _;
            Message::Binary(response.encode_to_vec().into())
        }
        _ => Message::Text(frames::encode(response).into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn malformed_frames_are_counted_in_a_sliding_window() {
        let mut strikes = Strikes::default();
        let start = Instant::now();
        for _ in 0..MAX_MALFORMED_FRAMES {
            assert!(!strikes.strike(start));
        }
        assert!(strikes.strike(start), "one over the limit closes");
        let mut strikes = Strikes::default();
        for _ in 0..MAX_MALFORMED_FRAMES {
            assert!(!strikes.strike(start));
        }
        let later = start + MALFORMED_WINDOW + Duration::from_millis(1);
        assert!(!strikes.strike(later), "old strikes expire");
    }

    #[test]
    fn close_reasons_fit_a_control_frame_and_stay_utf8() {
        let frame = close_frame(close_code::POLICY, &"é".repeat(100));
        assert!(frame.reason.as_str().len() <= MAX_CLOSE_REASON);
        assert_eq!(frame.reason.as_str().chars().count(), 61);
    }
}

//! JSON shapes shared by the JSON doors (HTTP/SSE and WebSocket): a message to publish and how
//! its payload becomes bytes, a delivered message, the `subscribed`, `gap` and `lag` notices,
//! the error body, and schema-only types for the OpenAPI document. One rule for each, below
//! both doors.

use std::collections::BTreeMap;

use base64::Engine as _;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::error::Error;
use crate::hub::{self, Headers, Message};
use crate::wire::v1;

/// A message to publish. Give the body as `payload` (a JSON string is published as its text; any
/// other JSON value is published as JSON with `content-type: application/json`) or as
/// `payload_base64` (raw bytes); neither publishes an empty body.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PublishBody {
    /// Concrete topic (no wildcards), e.g. `orders.eu.created`.
    #[schema(value_type = TopicName)]
    pub topic: String,
    /// The body: a string, or any JSON value.
    #[schema(example = json!("hello, topichub"))]
    pub payload: Option<serde_json::Value>,
    /// The body as base64 (standard alphabet, padded), for binary payloads.
    // What the STANDARD engine decodes: canonical padding, and no stray bits in the last symbol.
    #[schema(
        pattern = r"^([A-Za-z0-9+/]{4})*([A-Za-z0-9+/][AQgw]==|[A-Za-z0-9+/]{2}[AEIMQUYcgkosw048]=)?$"
    )]
    pub payload_base64: Option<String>,
    /// Headers delivered with the message, e.g. `content-type`.
    #[serde(default)]
    #[schema(value_type = BTreeMap<HeaderName, String>)]
    pub headers: BTreeMap<String, String>,
}

impl PublishBody {
    /// The payload and headers to publish: a JSON string as its text, any other JSON value as
    /// JSON (with `content-type: application/json` unless given), `payload_base64` as bytes.
    pub fn into_payload(self) -> Result<(Bytes, Headers), Error> {
        let mut headers = self.headers;
        let payload = match (self.payload, self.payload_base64) {
            (Some(_), Some(_)) => {
                return Err(Error::InvalidRequest(
                    "give either payload or payload_base64, not both".into(),
                ));
            }
            (Some(serde_json::Value::String(text)), None) => Bytes::from(text),
            (Some(value), None) => {
                headers
                    .entry("content-type".into())
                    .or_insert_with(|| "application/json".into());
                Bytes::from(serde_json::to_vec(&value).expect("a JSON value serializes"))
            }
            (None, Some(encoded)) => base64::engine::general_purpose::STANDARD
                .decode(encoded.as_bytes())
                .map_err(|e| {
                    Error::InvalidRequest(format!("payload_base64 is not valid base64: {e}"))
                })?
                .into(),
            (None, None) => Bytes::new(),
        };
        Ok((payload, headers.into_iter().collect()))
    }
}

/// Largest JSON request that can carry a payload of `max_payload` bytes: the payload as base64
/// (4/3 larger) plus the envelope. Requests between the payload limit and this get the hub's
/// precise "payload too large" answer rather than a transport error.
pub fn max_request_bytes(max_payload: usize) -> usize {
    max_payload / 3 * 4 + 64 * 1024
}

/// A delivered message: the `data` of an SSE `message` event, and an item of history.
///
/// The body appears as `payload` when it is JSON (content-type `application/json`: the JSON
/// value) or UTF-8 text (a string), and as `payload_base64` otherwise.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct MessageJson {
    /// Topic it was published to.
    pub topic: String,
    /// Its sequence number.
    pub seq: u64,
    /// Its cursor (`EPOCH-SEQ`), also the SSE event id.
    pub cursor: String,
    /// When the hub accepted it (RFC 3339).
    pub published_at: String,
    /// Headers given by the publisher.
    pub headers: BTreeMap<String, String>,
    /// The body as JSON or text (absent for binary bodies).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub payload: Option<serde_json::Value>,
    /// The body as base64 (only for bodies that are not UTF-8).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub payload_base64: Option<String>,
}

impl MessageJson {
    /// The JSON form of a hub message.
    pub fn of(message: &Message) -> MessageJson {
        let is_json = message
            .headers
            .get("content-type")
            .is_some_and(|t| t.starts_with("application/json") || t.contains("+json"));
        let (payload, payload_base64) = match std::str::from_utf8(&message.payload) {
            Ok(text) => {
                let value = is_json
                    .then(|| serde_json::from_str(text).ok())
                    .flatten()
                    .unwrap_or_else(|| serde_json::Value::String(text.to_owned()));
                (Some(value), None)
            }
            Err(_) => (
                None,
                Some(base64::engine::general_purpose::STANDARD.encode(&message.payload)),
            ),
        };
        MessageJson {
            topic: message.topic.to_string(),
            seq: message.seq,
            cursor: message.cursor().to_string(),
            published_at: rfc3339(message),
            headers: message
                .headers
                .iter()
                .map(|(name, value)| (name.clone(), value.clone()))
                .collect(),
            payload,
            payload_base64,
        }
    }
}

/// `data` of the SSE `subscribed` event (first event of every stream).
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct SubscribedJson {
    /// The subscription's id.
    pub subscription_id: String,
    /// The hub's newest cursor when the stream started (this event's id for `from=latest`).
    pub head: String,
}

/// `data` of the SSE `gap` event: messages in this seq range will not be delivered.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct GapJson {
    /// First seq that may be missing.
    pub from_seq: u64,
    /// Last seq that may be missing; absent when the range runs to the end of an old epoch.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub to_seq: Option<u64>,
    /// `epoch` (cursor from an earlier history) or `retention` (evicted before replay).
    pub reason: String,
    /// Epoch the range belongs to.
    pub epoch: String,
}

impl From<hub::Gap> for GapJson {
    fn from(gap: hub::Gap) -> GapJson {
        GapJson {
            from_seq: gap.from_seq,
            to_seq: gap.to_seq,
            reason: gap.reason.as_str().into(),
            epoch: gap.epoch,
        }
    }
}

/// `data` of the SSE `lag` event: the subscriber fell behind and is caught up from retention.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct LagJson {
    /// First seq its queue could not take.
    pub from_seq: u64,
    /// The hub's head when catch-up began.
    pub to_seq: u64,
}

impl From<hub::Lag> for LagJson {
    fn from(lag: hub::Lag) -> LagJson {
        LagJson {
            from_seq: lag.from_seq,
            to_seq: lag.to_seq,
        }
    }
}

/// `data` of the SSE `presence` event (and the WebSocket `presence` field): subscriptions joined
/// or left topics or patterns the subscription follows since its previous presence event. At
/// most one per `--presence-interval` (1 s by default): churn is coalesced into counts.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct PresenceJson {
    /// Each topic or pattern of the subscription whose subscriptions changed.
    pub topics: Vec<PresenceChangeJson>,
}

/// How the live subscriptions of one topic or pattern changed.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct PresenceChangeJson {
    /// The topic or pattern, as the subscription named it.
    pub topic: String,
    /// Live subscriptions now.
    pub subscribers: u64,
    /// Subscriptions that joined since the previous presence event.
    pub joined: u64,
    /// Subscriptions that left since the previous presence event.
    pub left: u64,
}

impl From<v1::PresenceEvent> for PresenceJson {
    fn from(event: v1::PresenceEvent) -> PresenceJson {
        PresenceJson {
            topics: event
                .topics
                .into_iter()
                .map(|c| PresenceChangeJson {
                    topic: c.topic,
                    subscribers: c.subscribers,
                    joined: c.joined,
                    left: c.left,
                })
                .collect(),
        }
    }
}

/// `data` of the SSE `deleted` event (and the WebSocket `deleted` field): a topic the
/// subscription named was deleted, and the subscription has ended.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct TopicDeletedJson {
    /// The deleted topic.
    pub topic: String,
    /// What happened, for people.
    pub message: String,
}

impl From<v1::TopicDeleted> for TopicDeletedJson {
    fn from(deleted: v1::TopicDeleted) -> TopicDeletedJson {
        TopicDeletedJson {
            topic: deleted.topic,
            message: deleted.message,
        }
    }
}

/// `data` of the SSE `cluster` event (and the WebSocket `cluster` field), in cluster mode: the
/// node serving the stream lost the NATS cluster (`reachable: false`; delivery pauses, nothing is
/// lost) or regained it (`reachable: true`; delivery continues where it paused, with no gap and
/// no duplicate).
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ClusterStatusJson {
    /// false: delivery is paused, the node cannot reach the cluster; true: it resumed.
    pub reachable: bool,
    /// What happened, for people.
    pub message: String,
}

impl From<v1::ClusterStatus> for ClusterStatusJson {
    fn from(status: v1::ClusterStatus) -> ClusterStatusJson {
        ClusterStatusJson {
            reachable: status.reachable,
            message: status.message,
        }
    }
}

/// The JSON body of every error response.
#[derive(Debug, Serialize, serde::Deserialize, ToSchema)]
pub struct ErrorBody {
    /// What went wrong.
    pub error: ErrorDetail,
}

/// Details of an error.
#[derive(Debug, Serialize, serde::Deserialize, ToSchema)]
pub struct ErrorDetail {
    /// The gRPC status code name, e.g. `INVALID_ARGUMENT`.
    #[schema(example = "INVALID_ARGUMENT")]
    pub code: String,
    /// What went wrong and how to fix it.
    #[schema(
        example = "invalid topic \"a..b\": empty token: tokens are separated by single dots, with none at either end"
    )]
    pub message: String,
}

/// A concrete topic (no wildcards): dot-separated tokens of letters, digits, `_`, `-` and `:`,
/// at most 255 bytes. Only a schema: handlers validate with `Topic::parse`.
#[derive(ToSchema)]
#[schema(
    pattern = r"^[A-Za-z0-9_:-]+(\.[A-Za-z0-9_:-]+)*$",
    max_length = 255,
    example = "demo.greetings"
)]
pub struct TopicName(pub String);

/// A topic or a pattern: a topic whose tokens may also be `*` (exactly one token) or, as the last
/// token, `>` (one or more tokens); at most 255 bytes. Only a schema: handlers validate with
/// `Pattern::parse`.
#[derive(ToSchema)]
#[schema(
    pattern = r"^(([A-Za-z0-9_:-]+|\*)\.)*([A-Za-z0-9_:-]+|\*|>)$",
    max_length = 255,
    example = "demo.>"
)]
pub struct TopicPattern(pub String);

/// An idempotency key: 1-128 visible ASCII characters (e.g. a UUID). Only a schema: handlers
/// validate with `idempotency::parse_key`.
#[derive(ToSchema)]
#[schema(
    pattern = r"^[!-~]{1,128}$",
    min_length = 1,
    max_length = 128,
    example = "7c0e2f4a-5b1d-4f8e-9a3c-2d6b8e1f0a47"
)]
pub struct IdempotencyKey(pub String);

/// A message header's name: not empty. Only a schema.
#[derive(ToSchema)]
#[schema(min_length = 1)]
pub struct HeaderName(pub String);

/// A position in the hub's history, `EPOCH-SEQ`: a message's `cursor`, an SSE event's `id`.
/// Only a schema: handlers parse it as a `Cursor`.
#[derive(ToSchema)]
#[schema(
    as = Cursor,
    pattern = r"^[A-Za-z0-9]{1,32}-(0|[1-9][0-9]{0,19})$",
    example = "k3J9xQ2mPz0a-42"
)]
pub struct CursorText(pub String);

/// A message's publish time in RFC 3339 (milliseconds), as every JSON shape shows it.
pub(crate) fn rfc3339(message: &Message) -> String {
    humantime::format_rfc3339_millis(message.published_at).to_string()
}

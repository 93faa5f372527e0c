//! JSON shapes of the HTTP API (request bodies, responses, SSE event data), shared by handlers
//! and the OpenAPI document.

use std::collections::BTreeMap;

use base64::Engine as _;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use bytes::Bytes;

use super::error::{ApiError, ErrorBody};
use crate::hub::{self, Headers, Message};
use crate::topic::Topic;

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
    /// Parses a `POST /publish` body into what the hub publishes.
    pub fn parse(body: &[u8]) -> Result<(Topic, Bytes, Headers), ApiError> {
        // serde would also take the fields as a positional array; the API documents an object.
        if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
            return Err(ApiError::bad_request(
                "the body must be a JSON object: {\"topic\": \"...\", \"payload\": ...}",
            ));
        }
        let request: PublishBody = serde_json::from_slice(body).map_err(|e| {
            ApiError::bad_request(format!(
                "malformed JSON body: {e}; expected {{\"topic\": \"...\", \"payload\": ...}}"
            ))
        })?;
        let topic = Topic::parse(&request.topic)?;
        let mut headers = request.headers;
        let payload = match (request.payload, request.payload_base64) {
            (Some(_), Some(_)) => {
                return Err(ApiError::bad_request(
                    "give either payload or payload_base64, not both",
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
                    ApiError::bad_request(format!("payload_base64 is not valid base64: {e}"))
                })?
                .into(),
            (None, None) => Bytes::new(),
        };
        Ok((topic, payload, headers))
    }
}

/// The hub accepted a message.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Published {
    /// Topic it was published to.
    pub topic: String,
    /// Its sequence number.
    pub seq: u64,
    /// Its cursor (`EPOCH-SEQ`): resume after it with `last_event_id` (SSE) or `after` (history).
    #[schema(example = "k3J9xQ2mPz0a-42")]
    pub cursor: String,
    /// When the hub accepted it (RFC 3339).
    pub published_at: String,
}

impl Published {
    /// The answer for an accepted message.
    pub fn of(message: &Message) -> Published {
        Published {
            topic: message.topic.to_string(),
            seq: message.seq,
            cursor: message.cursor().to_string(),
            published_at: rfc3339(message),
        }
    }
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
            headers: message.headers.clone(),
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

/// A topic and its state.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct TopicJson {
    /// Topic name.
    pub name: String,
    /// Messages retained.
    pub retained_messages: u64,
    /// Bytes retained.
    pub retained_bytes: u64,
    /// Live subscriptions matching it.
    pub subscribers: u64,
    /// Seq of its newest message.
    pub last_seq: u64,
}

impl From<hub::TopicInfo> for TopicJson {
    fn from(topic: hub::TopicInfo) -> TopicJson {
        TopicJson {
            name: topic.name,
            retained_messages: topic.retained_messages,
            retained_bytes: topic.retained_bytes,
            subscribers: topic.subscribers,
            last_seq: topic.last_seq,
        }
    }
}

/// Known topics.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct TopicList {
    /// Topics sorted by name.
    pub topics: Vec<TopicJson>,
}

/// A page of retained history.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct HistoryJson {
    /// Present when messages after `after` are no longer retained (or `after` is from another
    /// epoch): the range that cannot be returned.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gap: Option<GapJson>,
    /// Messages in seq order.
    pub messages: Vec<MessageJson>,
    /// Cursor to pass as `after` for the next page (absent when the page is empty).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next: Option<String>,
    /// Whether more retained messages follow: the page stopped at `limit` messages or at 8 MiB
    /// of message JSON; continue with `after` = `next`.
    pub more: bool,
}

/// A [`HistoryJson`] written piece by piece, for a streamed response body: the head (and gap),
/// then one message at a time, then `next` and `more`. Only one message's JSON exists at a time,
/// so a page over large messages costs one message of memory rather than the whole page (a page
/// of 1000 1 MiB messages, built whole, took over 100 MB per request). Messages stop before the
/// one that would take the page over `max_bytes`, keeping at least one.
pub struct HistoryPage {
    head: Option<Bytes>,
    messages: std::vec::IntoIter<std::sync::Arc<Message>>,
    max_bytes: usize,
    /// Bytes of message JSON written so far.
    written: usize,
    /// Cursor of the last message written.
    next: Option<String>,
    more: bool,
    /// The tail has been written.
    done: bool,
}

impl HistoryPage {
    /// The pieces of `page`, with its messages cut at `max_bytes` of JSON.
    pub fn new(page: hub::History, max_bytes: usize) -> HistoryPage {
        let mut head = String::from("{");
        if let Some(gap) = page.gap {
            head.push_str("\"gap\":");
            head.push_str(
                &serde_json::to_string(&GapJson::from(gap)).expect("JSON shapes serialize"),
            );
            head.push(',');
        }
        head.push_str("\"messages\":[");
        HistoryPage {
            head: Some(Bytes::from(head)),
            messages: page.messages.into_iter(),
            max_bytes,
            written: 0,
            next: None,
            more: page.more,
            done: false,
        }
    }

    fn tail(&mut self) -> Bytes {
        self.done = true;
        let mut tail = String::from("]");
        if let Some(next) = &self.next {
            tail.push_str(",\"next\":");
            tail.push_str(&serde_json::to_string(next).expect("a string serializes"));
        }
        tail.push_str(if self.more {
            ",\"more\":true}"
        } else {
            ",\"more\":false}"
        });
        Bytes::from(tail)
    }
}

impl Iterator for HistoryPage {
    type Item = Bytes;

    fn next(&mut self) -> Option<Bytes> {
        if let Some(head) = self.head.take() {
            return Some(head);
        }
        if self.done {
            return None;
        }
        let Some(message) = self.messages.next() else {
            return Some(self.tail());
        };
        let first = self.next.is_none();
        let mut json = Vec::with_capacity(message.payload.len() + 256);
        if !first {
            json.push(b',');
        }
        serde_json::to_writer(&mut json, &MessageJson::of(&message))
            .expect("JSON shapes serialize");
        if !first && self.written + json.len() > self.max_bytes {
            self.more = true;
            return Some(self.tail());
        }
        self.written += json.len();
        self.next = Some(message.cursor().to_string());
        Some(Bytes::from(json))
    }
}

/// `GET /healthz`.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Health {
    /// `serving`.
    pub status: String,
    /// The hub's epoch.
    pub epoch: String,
    /// Seq of the newest message.
    pub head: u64,
    /// Live subscriptions over all doors.
    pub subscribers: usize,
    /// Seq of the oldest retained message (0 when none).
    pub oldest_seq: u64,
    /// The durable log (`--data-dir`); absent when history is in memory.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log: Option<LogHealth>,
}

/// The state of the durable log, in `GET /healthz`.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct LogHealth {
    /// Bytes its files take on disk.
    pub bytes_on_disk: u64,
    /// Why the last write failed (e.g. the disk is full); absent while writes succeed.
    /// Publishes are refused with 503 meanwhile; subscribers keep receiving.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failing: Option<String>,
}

/// What an event's `id` field holds, in [`SseEvent`]'s schema.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Id {
    /// Always a cursor.
    Cursor,
    /// A cursor, or absent.
    MaybeCursor,
    /// No id of its own: a parser reports the last one seen.
    Repeated,
}

/// One event of the `GET /subscribe` stream as an SSE client parses it (`event`, `id`, `retry`,
/// `data`): the schema of each item of the `text/event-stream` body (OpenAPI 3.2's `itemSchema`;
/// in 3.1 tools such as schemathesis read the media type's `schema` this way). `data` is JSON of
/// the schema named for each event. Only a schema: frames are written in `sse.rs`.
pub struct SseEvent;

impl utoipa::PartialSchema for SseEvent {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::openapi::schema::{ObjectBuilder, OneOfBuilder, Type};
        use utoipa::openapi::{Ref, RefOr};
        // `id` is a cursor on `message` and (unless the stream starts at `from=earliest`) on
        // `subscribed`; a parser repeats the last id on the other events, so there it is any
        // string.
        let event = |name: &str, data: &str, id: Id, description: &str| {
            let id_schema: RefOr<_> = match id {
                Id::Cursor | Id::MaybeCursor => Ref::from_schema_name("Cursor").into(),
                Id::Repeated => ObjectBuilder::new().schema_type(Type::String).into(),
            };
            let mut event = ObjectBuilder::new()
                .schema_type(Type::Object)
                .description(Some(description))
                .property(
                    "event",
                    ObjectBuilder::new()
                        .schema_type(Type::String)
                        .enum_values(Some([name])),
                )
                .required("event")
                .property("id", id_schema)
                .property(
                    "retry",
                    ObjectBuilder::new()
                        .schema_type(Type::Integer)
                        .description(Some("Reconnect delay for browsers, in milliseconds")),
                )
                .property(
                    "data",
                    ObjectBuilder::new()
                        .schema_type(Type::String)
                        .content_media_type("application/json")
                        .content_schema(Some(Ref::from_schema_name(data))),
                )
                .required("data");
            if id == Id::Cursor {
                event = event.required("id");
            }
            event
        };
        OneOfBuilder::new()
            .item(event(
                "subscribed",
                "SubscribedJson",
                Id::MaybeCursor,
                "First event of every stream; id: the position the stream starts after (the resume cursor, or the head for `from=latest`; none for `from=earliest`), so that a reconnect before the first message resumes there",
            ))
            .item(event(
                "message",
                "MessageJson",
                Id::Cursor,
                "A message; id: its cursor",
            ))
            .item(event(
                "gap",
                "GapJson",
                Id::Repeated,
                "Messages in a seq range will not be delivered",
            ))
            .item(event(
                "lag",
                "LagJson",
                Id::Repeated,
                "The subscriber fell behind and is caught up from retention",
            ))
            .item(event(
                "end",
                "ErrorBody",
                Id::Repeated,
                "Why the server ends the stream: UNAVAILABLE (shutdown: reconnect and resume), UNAUTHENTICATED (the token expired), RESOURCE_EXHAUSTED (slow consumer under the `disconnect` policy); the last event. Named `end`, not `error`, which is EventSource's own event for a failed connection",
            ))
            .description(Some(
                "One event of the stream as an SSE client parses it; `data` is JSON of the schema named for each event.",
            ))
            .into()
    }
}

impl ToSchema for SseEvent {
    fn schemas(
        schemas: &mut Vec<(
            String,
            utoipa::openapi::RefOr<utoipa::openapi::schema::Schema>,
        )>,
    ) {
        use utoipa::PartialSchema as _;
        schemas.extend([
            (SubscribedJson::name().into(), SubscribedJson::schema()),
            (MessageJson::name().into(), MessageJson::schema()),
            (GapJson::name().into(), GapJson::schema()),
            (LagJson::name().into(), LagJson::schema()),
            (ErrorBody::name().into(), ErrorBody::schema()),
            (CursorText::name().into(), CursorText::schema()),
        ]);
        <ErrorBody as ToSchema>::schemas(schemas);
    }
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

/// Adds to the `PublishBody` schema the rule its derived schema cannot state: `payload` and
/// `payload_base64` are not both given (`null` counts as not given). The component becomes
/// `allOf: [the fields, anyOf: [payload_base64 absent or null, payload absent or null]]`.
pub(super) fn document_publish_rule(openapi: &mut utoipa::openapi::OpenApi) {
    use utoipa::openapi::schema::{AllOfBuilder, AnyOfBuilder, ObjectBuilder, SchemaType, Type};
    let Some(schema) = openapi
        .components
        .as_mut()
        .and_then(|c| c.schemas.get_mut("PublishBody"))
    else {
        return;
    };
    let absent_or_null = |field: &str| {
        ObjectBuilder::new()
            .schema_type(SchemaType::AnyValue)
            .property(field, ObjectBuilder::new().schema_type(Type::Null))
    };
    let one_payload = AnyOfBuilder::new()
        .item(absent_or_null("payload_base64"))
        .item(absent_or_null("payload"));
    let fields = schema.clone();
    *schema = AllOfBuilder::new().item(fields).item(one_payload).into();
}

fn rfc3339(message: &Message) -> String {
    humantime::format_rfc3339_millis(message.published_at).to_string()
}

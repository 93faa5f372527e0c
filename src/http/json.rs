//! JSON shapes of the HTTP API (request bodies, responses, SSE event data), shared by handlers
//! and the OpenAPI document.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use bytes::Bytes;

use super::error::{ApiError, ErrorBody};
use crate::hub::{self, Headers, Message};
use crate::json::rfc3339;
// The shapes the WebSocket door shares live below both doors.
pub use crate::json::{
    ClusterStatusJson, CursorText, GapJson, HeaderName, LagJson, MessageJson, PresenceJson,
    PublishBody, SubscribedJson, TopicDeletedJson, TopicName, TopicPattern,
};
use crate::topic::Topic;

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
        let (payload, headers) = request.into_payload()?;
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
    /// Present and true when the request was a retry under an idempotency key whose message
    /// was already published: the answer is the original's, and nothing new was stored.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub duplicate: bool,
}

impl Published {
    /// The answer for an accepted message; `duplicate` when it answers a retry.
    pub fn of(message: &Message, duplicate: bool) -> Published {
        Published {
            topic: message.topic.to_string(),
            seq: message.seq,
            cursor: message.cursor().to_string(),
            published_at: rfc3339(message),
            duplicate,
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

/// A page of the known topics.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct TopicList {
    /// Topics sorted by name.
    pub topics: Vec<TopicJson>,
    /// Pass as `after` for the next page (absent on the last page).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(example = "orders.eu.created")]
    pub next: Option<String>,
}

impl From<hub::TopicPage> for TopicList {
    fn from(page: hub::TopicPage) -> TopicList {
        TopicList {
            topics: page.topics.into_iter().map(TopicJson::from).collect(),
            next: page.next,
        }
    }
}

/// A page of the live subscriptions of a topic or pattern.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct PresencePageJson {
    /// The topic or pattern asked about.
    pub topic: String,
    /// Live subscriptions in all (not only this page).
    pub subscribers: u64,
    /// This page of them, oldest first.
    pub members: Vec<SubscriberJson>,
    /// Pass as `after` for the next page (absent on the last page).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next: Option<String>,
    /// Cluster mode only: the nodes whose subscriptions are counted (the one asked included).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nodes: Option<u32>,
    /// Cluster mode only: `true` when a node known to be up did not answer in time, so its
    /// subscriptions are missing from the count and the pages.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub partial: Option<bool>,
}

impl PresencePageJson {
    /// The JSON form of a presence page of `topic`.
    pub fn of(topic: String, page: hub::PresencePage) -> PresencePageJson {
        PresencePageJson {
            topic,
            subscribers: page.subscribers,
            members: page
                .members
                .into_iter()
                .map(|m| {
                    let (client, door) = crate::wire::holder(m.holder.as_ref());
                    SubscriberJson {
                        client,
                        door,
                        since: humantime::format_rfc3339_millis(m.since).to_string(),
                    }
                })
                .collect(),
            next: page.next.map(|n| n.to_string()),
            nodes: page.cluster.map(|c| c.nodes),
            partial: page.cluster.map(|c| c.partial),
        }
    }
}

/// One live subscription.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct SubscriberJson {
    /// Who opened it: the token's subject, or the client's address when authentication is off.
    #[schema(example = "billing")]
    pub client: String,
    /// The door it came through: `http` (SSE), `ws`, `grpc`, `grpc-web` or `seed`.
    #[schema(example = "http")]
    pub door: String,
    /// When it started (RFC 3339).
    pub since: String,
}

/// A topic was deleted.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct DeletedJson {
    /// The deleted topic.
    pub topic: String,
    /// Retained messages purged.
    pub purged_messages: u64,
    /// Subscriptions ended because they named the topic.
    pub ended_subscriptions: u64,
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
                "presence",
                "PresenceJson",
                Id::Repeated,
                "Only with `presence=true`: subscriptions joined or left the topics or patterns of this stream since the previous presence event (at most one per --presence-interval)",
            ))
            .item(event(
                "deleted",
                "TopicDeletedJson",
                Id::Repeated,
                "A topic this stream named was deleted; the last event, the stream ends after it",
            ))
            .item(event(
                "cluster",
                "ClusterStatusJson",
                Id::Repeated,
                "Cluster mode: the node lost the NATS cluster (`reachable: false`: delivery pauses, nothing is lost) or regained it (`reachable: true`: delivery continues where it paused, with no gap and no duplicate)",
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
            (PresenceJson::name().into(), PresenceJson::schema()),
            (TopicDeletedJson::name().into(), TopicDeletedJson::schema()),
            (
                ClusterStatusJson::name().into(),
                ClusterStatusJson::schema(),
            ),
            (ErrorBody::name().into(), ErrorBody::schema()),
            (CursorText::name().into(), CursorText::schema()),
        ]);
        <ErrorBody as ToSchema>::schemas(schemas);
        <PresenceJson as ToSchema>::schemas(schemas);
    }
}

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

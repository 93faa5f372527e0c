//! JSON text frames of `GET /ws`: the `Connect` protocol's requests and responses in the HTTP
//! API's style, converted to and from `topichub.v1.ConnectRequest` / `ConnectResponse` so that
//! the session below both doors is the only one that acts on them.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::cursor::Cursor;
use crate::error::Error;
use crate::hub::LagPolicy;
use crate::json::{
    ClusterStatusJson, CursorText, ErrorDetail, GapJson, IdempotencyKey, LagJson, MessageJson,
    PresenceJson, PublishBody, SubscribedJson, TopicDeletedJson, TopicPattern,
};
use crate::wire::v1;

/// A request frame: a client-chosen `request_id` (echoed in the answer) and exactly one of
/// `subscribe`, `publish`, `unsubscribe`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct WsRequest {
    /// Echoed in the answer to this request (`subscribed`, `ack`, `error`).
    #[serde(default)]
    pub request_id: u64,
    /// Open a subscription on this socket.
    pub subscribe: Option<WsSubscribe>,
    /// Publish a message; answered with an `ack`.
    #[schema(value_type = Option<WsPublish>)]
    pub publish: Option<PublishBody>,
    /// End a subscription of this socket.
    pub unsubscribe: Option<WsUnsubscribe>,
}

/// Open a subscription.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct WsSubscribe {
    /// Topics or patterns to follow (at least one).
    #[schema(value_type = Vec<TopicPattern>, min_items = 1)]
    pub topics: Vec<String>,
    /// `latest` (default: only new messages) or `earliest` (everything retained first).
    #[schema(pattern = "^(latest|earliest)$")]
    pub from: Option<String>,
    /// Resume after this cursor (`EPOCH-SEQ`); takes precedence over `from`.
    #[schema(value_type = Option<CursorText>)]
    pub last_event_id: Option<String>,
    /// Queue length for this subscription (default or 0: the server's --queue-size; at most the
    /// server's --max-queue-size).
    pub queue_size: Option<u32>,
    /// Byte budget of this subscription's queue: payload + headers + topic of the messages
    /// waiting for it (default or 0: the server's --queue-bytes; at most the server's
    /// --max-queue-bytes). A message that would take a non-empty queue over it triggers the lag
    /// policy, as a full queue does.
    pub queue_bytes: Option<u64>,
    /// `catch-up` (default) or `disconnect`.
    #[schema(pattern = "^(catch-up|disconnect)$")]
    pub lag_policy: Option<String>,
    /// `true`: also receive `presence` events when subscriptions join or leave the topics and
    /// patterns of this subscription, at most one per --presence-interval, with counts.
    pub presence: Option<bool>,
}

/// Publish a message: the fields of `POST /publish`, and an optional idempotency key. Only a
/// schema: [`decode`] takes the key out of the frame and the rest is a `PublishBody`, which
/// refuses unknown fields (as a flattened one would not).
#[derive(ToSchema)]
pub struct WsPublish {
    /// The message, as `POST /publish` takes it.
    #[serde(flatten)]
    pub message: PublishBody,
    /// Names this message, so that a retry is not published twice: a retry with the same key,
    /// topic and payload within the server's window (`--idempotency-window`, 2 minutes by
    /// default) is acknowledged with the original's cursor and `duplicate: true`. Reusing a key
    /// in the window for another topic or payload is refused (`ALREADY_EXISTS`).
    #[schema(value_type = Option<IdempotencyKey>)]
    pub idempotency_key: Option<String>,
}

/// End a subscription.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct WsUnsubscribe {
    /// The id from its `subscribed` answer.
    pub subscription_id: String,
}

/// A response frame: the `request_id` it answers (0 for events of a subscription), the
/// `subscription_id` an event belongs to, and exactly one of the other fields.
#[derive(Debug, Default, Serialize, Deserialize, ToSchema)]
pub struct WsResponse {
    /// The request this answers; 0 for subscription events.
    pub request_id: u64,
    /// The subscription this event belongs to (absent for publish answers).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subscription_id: Option<String>,
    /// A subscription opened.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subscribed: Option<SubscribedJson>,
    /// A message of a subscription (the same envelope as SSE's `message` data).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<MessageJson>,
    /// Messages of a subscription that will not be delivered.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gap: Option<GapJson>,
    /// A subscription fell behind; retained messages follow.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lag: Option<LagJson>,
    /// A publish was accepted.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ack: Option<WsAck>,
    /// A subscription ended.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unsubscribed: Option<WsUnsubscribed>,
    /// Subscriptions joined or left the topics of a subscription (only with `presence`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub presence: Option<PresenceJson>,
    /// A topic the subscription named was deleted; `unsubscribed` (reason `deleted`) follows.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub deleted: Option<TopicDeletedJson>,
    /// Cluster mode: the node lost (or regained) the NATS cluster; the subscription's delivery
    /// pauses meanwhile.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster: Option<ClusterStatusJson>,
    /// A request failed; the socket stays open.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorDetail>,
}

/// The acknowledgement of a publish.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct WsAck {
    /// Cursor of the accepted message (`EPOCH-SEQ`).
    #[schema(value_type = CursorText)]
    pub cursor: String,
    /// Its sequence number.
    pub seq: u64,
    /// Present and true when the publish was a retry under an idempotency key whose message was
    /// already published: `cursor` is the original's, and nothing new was stored.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub duplicate: bool,
}

/// Why a subscription ended.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct WsUnsubscribed {
    /// `unsubscribed` (asked for), `lagged` (its lag policy is `disconnect`) or `deleted` (its
    /// topic was deleted).
    pub reason: String,
}

/// Decodes a text frame into a `ConnectRequest`; on failure, the request id to answer (when the
/// frame had one) and what is wrong.
pub fn decode(text: &str) -> Result<v1::ConnectRequest, (u64, Error)> {
    let value: serde_json::Value = serde_json::from_str(text).map_err(|e| {
        (
            0,
            Error::InvalidRequest(format!(
                "malformed JSON frame: {e}; expected {{\"request_id\": N, \"subscribe\" | \"publish\" | \"unsubscribe\": {{...}}}}"
            )),
        )
    })?;
    let mut value = value;
    let request_id = value
        .get("request_id")
        .and_then(serde_json::Value::as_u64)
        .unwrap_or(0);
    let key = value
        .get_mut("publish")
        .and_then(serde_json::Value::as_object_mut)
        .and_then(|publish| publish.remove("idempotency_key"));
    let key = match key {
        None | Some(serde_json::Value::Null) => String::new(),
        // Checked here too: an empty key is a mistake, not "no key".
        Some(serde_json::Value::String(key)) => crate::idempotency::parse_key(&key)
            .map_err(|e| (request_id, e))?
            .to_string(),
        Some(other) => {
            return Err((
                request_id,
                Error::InvalidRequest(format!(
                    "invalid request: publish.idempotency_key must be a string, got {other}"
                )),
            ));
        }
    };
    let frame: WsRequest = serde_json::from_value(value).map_err(|e| {
        (
            request_id,
            Error::InvalidRequest(format!("invalid request: {e}")),
        )
    })?;
    frame.into_request(key).map_err(|e| (request_id, e))
}

impl WsRequest {
    /// The request, a publish under `idempotency_key` (empty: none).
    fn into_request(self, idempotency_key: String) -> Result<v1::ConnectRequest, Error> {
        use v1::connect_request::Request;
        let request = match (self.subscribe, self.publish, self.unsubscribe) {
            (Some(subscribe), None, None) => Request::Subscribe(subscribe.into_request()?),
            (None, Some(publish), None) => {
                let topic = publish.topic.clone();
                let (payload, headers) = publish.into_payload()?;
                Request::Publish(v1::PublishRequest {
                    topic,
                    payload,
                    headers: headers.into_iter().collect(),
                    idempotency_key,
                })
            }
            (None, None, Some(unsubscribe)) => Request::Unsubscribe(v1::UnsubscribeRequest {
                subscription_id: unsubscribe.subscription_id,
            }),
            _ => {
                return Err(Error::InvalidRequest(
                    "a request frame needs exactly one of subscribe, publish or unsubscribe".into(),
                ));
            }
        };
        Ok(v1::ConnectRequest {
            request_id: self.request_id,
            request: Some(request),
        })
    }
}

impl WsSubscribe {
    fn into_request(self) -> Result<v1::SubscribeRequest, Error> {
        use v1::start_position::Position;
        // Every field given is checked, also one another overrides (as on SSE).
        let from = match self.from.as_deref() {
            None | Some("latest") => Position::Latest(true),
            Some("earliest") => Position::Earliest(true),
            Some(other) => {
                return Err(Error::InvalidRequest(format!(
                    "from must be `latest` or `earliest` (or resume with last_event_id), got {other:?}"
                )));
            }
        };
        let position = match self.last_event_id {
            Some(text) => {
                let cursor = text.parse::<Cursor>()?;
                Position::After(v1::Cursor {
                    epoch: cursor.epoch,
                    seq: cursor.seq,
                })
            }
            None => from,
        };
        let lag_policy = match self.lag_policy.as_deref().map(str::parse).transpose()? {
            None => v1::LagPolicy::Unspecified,
            Some(LagPolicy::CatchUp) => v1::LagPolicy::CatchUp,
            Some(LagPolicy::Disconnect) => v1::LagPolicy::Disconnect,
        };
        Ok(v1::SubscribeRequest {
            topics: self.topics,
            start: Some(v1::StartPosition {
                position: Some(position),
            }),
            queue_size: self.queue_size.unwrap_or(0),
            queue_bytes: self.queue_bytes.unwrap_or(0),
            lag_policy: lag_policy as i32,
            presence: self.presence.unwrap_or(false),
        })
    }
}

/// The JSON frame of a `ConnectResponse`.
pub fn encode(response: v1::ConnectResponse) -> String {
    use v1::connect_response::Event;
    let cursor = |c: Option<v1::Cursor>| c.map(|c| format!("{}-{}", c.epoch, c.seq));
    let mut frame = WsResponse {
        request_id: response.request_id,
        subscription_id: Some(response.subscription_id).filter(|id| !id.is_empty()),
        ..WsResponse::default()
    };
    match response.event {
        Some(Event::Subscribed(s)) => {
            frame.subscribed = Some(SubscribedJson {
                subscription_id: s.subscription_id,
                head: cursor(s.head).unwrap_or_default(),
            })
        }
        Some(Event::Message(m)) => frame.message = m.message().map(MessageJson::of),
        Some(Event::Gap(g)) => {
            frame.gap = Some(GapJson {
                from_seq: g.from_seq,
                // 0 stands for "to the end of an earlier epoch" in protobuf.
                to_seq: (g.to_seq != 0).then_some(g.to_seq),
                reason: g.reason,
                epoch: g.epoch,
            })
        }
        Some(Event::Lag(l)) => {
            frame.lag = Some(LagJson {
                from_seq: l.from_seq,
                to_seq: l.to_seq,
            })
        }
        Some(Event::Ack(a)) => {
            frame.ack = a.cursor.map(|c| WsAck {
                seq: c.seq,
                cursor: format!("{}-{}", c.epoch, c.seq),
                duplicate: a.duplicate,
            })
        }
        Some(Event::Error(e)) => {
            frame.error = Some(ErrorDetail {
                code: e.code,
                message: e.message,
            })
        }
        Some(Event::Unsubscribed(u)) => {
            frame.unsubscribed = Some(WsUnsubscribed { reason: u.reason })
        }
        Some(Event::Presence(p)) => frame.presence = Some(PresenceJson::from(p)),
        Some(Event::Deleted(d)) => frame.deleted = Some(TopicDeletedJson::from(d)),
        Some(Event::Cluster(c)) => frame.cluster = Some(ClusterStatusJson::from(c)),
        None => {}
    }
    serde_json::to_string(&frame).expect("JSON shapes serialize")
}

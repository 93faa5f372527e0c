//! `GET /subscribe`: a subscription as a Server-Sent Events stream.
//!
//! Frames are written as pre-encoded `Bytes` rather than through `axum::response::Sse`: a
//! message's SSE frame is built once (cached on the hub message) and shared by every SSE
//! subscriber, where `Sse` would re-serialize per subscriber.

use std::convert::Infallible;

use axum::body::Body;
use axum::extract::{Extension, RawQuery, State};
use axum::http::{HeaderMap, header};
use axum::response::{IntoResponse, Response};
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use serde::Serialize;
use tokio::time::{Instant, Interval, MissedTickBehavior};

use super::AppState;
use super::error::ApiError;
use super::json::{
    ClusterStatusJson, GapJson, LagJson, MessageJson, PresenceJson, SubscribedJson,
    TopicDeletedJson,
};
use crate::auth::Access;
use crate::cursor::Cursor;
use crate::error::Error;
use crate::hub::{Event, LagPolicy, Message, Start, SubscribeOptions, Subscription};
use crate::limits::{Connection, SubscriptionSlot};
use crate::metrics::{Door, Metrics, SubscriberGauge};
use crate::shutdown::StreamEnd;
use crate::topic::Pattern;

/// Reconnect delay suggested to browsers (`retry:` field), in milliseconds.
const RETRY_MS: u64 = 1000;

/// The name of the last event of a stream the server ends (see [`end_frame`]).
const END_EVENT: &str = "end";

/// Query parameters of `GET /subscribe`.
pub(crate) const PARAMS: [&str; 8] = [
    "topic",
    "last_event_id",
    "from",
    "queue_size",
    "queue_bytes",
    "lag_policy",
    "presence",
    crate::auth::TOKEN_PARAM,
];

/// Subscribe over SSE.
///
/// Streams `subscribed` (first; its id, when it has one, is the position the stream starts
/// after), then `message` events (id = the message cursor; data = the message as JSON), `gap`
/// and `lag` notices (no id), and an `end` event before the server closes the stream (shutdown,
/// token expiry, slow consumer; data says which). Keep-alive comments are sent while idle. A
/// browser `EventSource` resumes by itself after a reconnect: it sends the last event id as
/// `Last-Event-ID`, and replay continues exactly after it. No event carries an id ahead of a
/// message not yet delivered on the stream, so a reconnect at any point loses nothing.
#[utoipa::path(
    get,
    path = "/subscribe",
    tag = "subscribe",
    params(
        ("topic" = Vec<super::json::TopicPattern>, Query, description = "Topic or pattern to follow (repeatable; `*` = one token, `>` = one or more trailing tokens)", example = "demo.>", min_items = 1),
        ("last_event_id" = Option<super::json::CursorText>, Query, description = "Resume after this cursor (`EPOCH-SEQ`); the `Last-Event-ID` header takes precedence"),
        ("from" = Option<String>, Query, description = "`latest` (default: only new messages) or `earliest` (everything retained first)", pattern = "^(latest|earliest)$"),
        ("queue_size" = Option<u32>, Query, description = "Queue length for this subscriber (default or 0: the server's --queue-size; at most the server's --max-queue-size, 65536 by default)", maximum = 65536),
        ("queue_bytes" = Option<u64>, Query, description = "Byte budget of this subscriber's queue: payload + headers + topic of the messages waiting for it (default or 0: the server's --queue-bytes, 16 MiB by default; at most the server's --max-queue-bytes, 64 MiB by default). A message that would take a non-empty queue over it triggers the lag policy, as a full queue does.", maximum = 67108864),
        ("lag_policy" = Option<String>, Query, description = "`catch-up` (default) or `disconnect`", pattern = "^(catch-up|disconnect)$"),
        ("presence" = Option<bool>, Query, description = "`true`: also send `presence` events when subscriptions join or leave the topics and patterns of this stream, at most one per --presence-interval (1 s by default) with counts"),
        ("Last-Event-ID" = Option<String>, Header, description = "Cursor to resume after (sent by EventSource on reconnect; empty: none)", nullable = false, pattern = "^([A-Za-z0-9]{1,32}-(0|[1-9][0-9]{0,19}))?$"),
    ),
    responses(
        (status = 200, description = "An SSE stream. Events: `subscribed` (data: SubscribedJson), `message` (data: MessageJson), `gap` (data: GapJson), `lag` (data: LagJson), `end` (data: ErrorBody saying why the server ends the stream: UNAVAILABLE on shutdown, UNAUTHENTICATED when the token expires, RESOURCE_EXHAUSTED for a slow consumer; the last event), with `presence=true` also `presence` (data: PresenceJson), `deleted` (data: TopicDeletedJson; the last event) when a topic the stream names exactly is deleted, and in cluster mode `cluster` (data: ClusterStatusJson) when the node loses the NATS cluster (`reachable: false`: delivery pauses, nothing is lost) and when it is back (`reachable: true`: delivery continues where it paused, no gap, no duplicate). Only `subscribed` and `message` carry an id (a cursor), and never one ahead of a message not yet delivered: resuming from the last id seen loses nothing.", content_type = "text/event-stream", body = super::json::SseEvent),
        (status = 400, description = "Invalid topic, pattern, cursor or parameter; or a cursor ahead of the hub", body = super::error::ErrorBody),
    )
)]
pub async fn subscribe(
    State(state): State<AppState>,
    Extension(access): Extension<Access>,
    Extension(connection): Extension<Connection>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let slot = connection.open_subscription()?;
    let mut options = options(query.as_deref().unwrap_or(""), &headers)?;
    options.holder = Some(crate::connect::holder(&access, &connection, Door::Http));
    access.check_subscribe(&options.patterns)?;
    let start = options.start.clone();
    if let Start::After(cursor) = &start {
        state.hub.wait_applied(cursor).await;
    }
    let subscription = state.hub.subscribe(options)?;
    let subscribed = SubscribedJson {
        subscription_id: subscription.id(),
        head: subscription.head_at_start().to_string(),
    };
    let resume = resume_position(&start, &subscription);
    let first = frame("subscribed", resume.as_deref(), &subscribed, true);
    let mut keepalive =
        tokio::time::interval_at(Instant::now() + state.sse_keepalive, state.sse_keepalive);
    keepalive.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let stream = SseStream {
        subscription,
        end: StreamEnd::new(state.shutdown.clone(), access.expires_at()),
        keepalive,
        _slot: slot,
        _gauge: state.hub.metrics().subscriber(Door::Http),
        metrics: state.hub.metrics().clone(),
    };
    let body = SseBody {
        first: Some(first),
        stream: Some(stream),
    };
    Ok((
        [
            (header::CONTENT_TYPE, "text/event-stream"),
            (header::CACHE_CONTROL, "no-cache"),
            (header::HeaderName::from_static("x-accel-buffering"), "no"),
        ],
        Body::new(body),
    )
        .into_response())
}

/// The `id` of the `subscribed` event: the position this stream starts after, so that an
/// `EventSource` that loses the connection before the first message resumes exactly where the
/// stream began (delivery contract #4: no id ahead of an undelivered message).
///
/// - Resuming after a cursor: that cursor. Replayed messages (and any gap) follow, so the
///   head would skip them; a cursor of another epoch is repeated as given, so a resume is told
///   of the epoch gap again rather than never.
/// - `latest`: the head. Nothing at or before it belongs to this stream, and a resume from it
///   gets what was published while the client was away; without an id it would start at the
///   new head and lose that.
/// - `earliest`: no id. Reconnecting repeats `from=earliest` (everything retained), where a
///   cursor before the first message would also report the range retention had already
///   dropped before the stream began.
///
/// The other events carry no id, so the browser keeps the last one it saw: a `gap` range can
/// end past messages still to be replayed (another topic of the same subscription keeps older
/// ones), and a `lag` notice precedes the catch-up replay of everything it names.
fn resume_position(start: &Start, subscription: &Subscription) -> Option<String> {
    match start {
        Start::After(cursor) => Some(cursor.to_string()),
        Start::Latest => Some(subscription.head_at_start().to_string()),
        Start::Earliest => None,
    }
}

struct SseStream {
    subscription: Subscription,
    /// Shutdown and token expiry end the stream with an `end` event.
    end: StreamEnd,
    keepalive: Interval,
    /// This stream's place in its connection's subscription count.
    _slot: SubscriptionSlot,
    _gauge: SubscriberGauge,
    metrics: Metrics,
}

/// The response body: the `subscribed` frame, then one frame per event. Hand-written rather
/// than a stream combinator so that nothing is built per event but the event's bytes (which
/// are shared: see [`message_frame`]). Events that are ready at once are not concatenated here:
/// hyper already gathers the frames it is given in a row into one vectored write.
struct SseBody {
    first: Option<Bytes>,
    /// `None` once the stream has ended.
    stream: Option<SseStream>,
}

impl http_body::Body for SseBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Infallible>>> {
        let this = self.get_mut();
        if let Some(first) = this.first.take() {
            return Poll::Ready(Some(Ok(http_body::Frame::data(first))));
        }
        let Some(s) = this.stream.as_mut() else {
            return Poll::Ready(None);
        };
        let frame = match s.end.poll_next(cx, &mut s.subscription) {
            Poll::Ready(Some(Ok(event))) => {
                event.count(&s.metrics, Door::Http);
                event_frame(event)
            }
            Poll::Ready(Some(Err(Error::TopicDeleted(topic)))) => {
                this.stream = None;
                let data = TopicDeletedJson::from(crate::wire::topic_deleted(topic));
                frame("deleted", None, &data, false)
            }
            Poll::Ready(Some(Err(error))) => {
                this.stream = None;
                end_frame(&error.into())
            }
            Poll::Ready(None) => {
                this.stream = None;
                return Poll::Ready(None);
            }
            Poll::Pending => {
                // Keep-alive comments only matter while idle; the timer is polled only then.
                std::task::ready!(s.keepalive.poll_tick(cx));
                Bytes::from_static(b": keep-alive\n\n")
            }
        };
        Poll::Ready(Some(Ok(http_body::Frame::data(frame))))
    }

    fn is_end_stream(&self) -> bool {
        self.first.is_none() && self.stream.is_none()
    }
}

fn event_frame(event: Event) -> Bytes {
    match event {
        Event::Message(m) => message_frame(&m),
        Event::Gap(gap) => frame("gap", None, &GapJson::from(gap), false),
        Event::Lag(lag) => frame("lag", None, &LagJson::from(lag), false),
        Event::Presence(changes) => {
            let data = PresenceJson::from(crate::wire::presence_event(changes));
            frame("presence", None, &data, false)
        }
        Event::Cluster { reachable } => {
            let data = ClusterStatusJson::from(crate::wire::cluster_status(reachable));
            frame("cluster", None, &data, false)
        }
    }
}

/// The `message` event of a hub message, built once per message.
fn message_frame(message: &Message) -> Bytes {
    message
        .encoded
        .sse()
        .get_or_init(|| {
            frame(
                "message",
                Some(&message.cursor().to_string()),
                &MessageJson::of(message),
                false,
            )
        })
        .clone()
}

/// The `end` event: why the server ends the stream. Not `error`, which is `EventSource`'s own
/// event for a failed connection: a page listening for it would run its handler twice.
fn end_frame(error: &ApiError) -> Bytes {
    frame(END_EVENT, None, &error.body(), false)
}

/// One SSE event. JSON never contains raw newlines, so `data` is a single line.
fn frame(event: &str, id: Option<&str>, data: &impl Serialize, retry: bool) -> Bytes {
    let mut out = String::with_capacity(256);
    if retry {
        out.push_str(&format!("retry: {RETRY_MS}\n"));
    }
    if let Some(id) = id {
        out.push_str("id: ");
        out.push_str(id);
        out.push('\n');
    }
    out.push_str("event: ");
    out.push_str(event);
    out.push_str("\ndata: ");
    out.push_str(&serde_json::to_string(data).expect("JSON shapes serialize"));
    out.push_str("\n\n");
    Bytes::from(out)
}

/// The whole number `value` of query parameter `name`.
fn whole_number(name: &str, value: &str) -> Result<usize, ApiError> {
    value
        .parse()
        .map_err(|_| ApiError::bad_request(format!("{name} must be a whole number, got {value:?}")))
}

/// Parses the query and `Last-Event-ID` into subscription options.
fn options(query: &str, headers: &HeaderMap) -> Result<SubscribeOptions, ApiError> {
    let mut options = SubscribeOptions::default();
    let mut last_event_id = None;
    let mut from = None;
    for (key, value) in form_urlencoded::parse(query.as_bytes()) {
        match &*key {
            "topic" => options.patterns.push(Pattern::parse(&value)?),
            "last_event_id" => last_event_id = Some(value.into_owned()),
            "from" => from = Some(value.into_owned()),
            "queue_size" => options.queue_size = Some(whole_number("queue_size", &value)?),
            "queue_bytes" => options.queue_bytes = Some(whole_number("queue_bytes", &value)?),
            "presence" => {
                options.presence = match &*value {
                    "true" => true,
                    "false" => false,
                    other => {
                        return Err(ApiError::bad_request(format!(
                            "presence must be `true` or `false`, got {other:?}"
                        )));
                    }
                }
            }
            crate::auth::TOKEN_PARAM => {}
            "lag_policy" => {
                options.lag_policy = Some(value.parse::<LagPolicy>()?);
            }
            other => {
                return Err(ApiError::bad_request(format!(
                    "unknown query parameter {other:?}; /subscribe takes {}",
                    PARAMS.join(", ")
                )));
            }
        }
    }
    if options.patterns.is_empty() {
        return Err(ApiError::bad_request(
            "name at least one topic: /subscribe?topic=NAME (repeatable; wildcards * and > allowed)",
        ));
    }
    // Every parameter given is checked, also one that another overrides (a bad `from` next to a
    // cursor, a bad query cursor next to the header): an invalid request is never served.
    let from = match from.as_deref() {
        None | Some("latest") => Start::Latest,
        Some("earliest") => Start::Earliest,
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "from must be `latest` or `earliest` (or resume with last_event_id=CURSOR), got {other:?}"
            )));
        }
    };
    let last_event_id = last_event_id
        .map(|cursor| cursor.parse::<Cursor>())
        .transpose()?;
    // On reconnect a browser repeats the original URL and sends its newest position in the
    // header, so the header wins over the query.
    let header = headers
        .get("last-event-id")
        .map(|v| v.to_str().map(str::to_owned))
        .transpose()
        .map_err(|_| ApiError::bad_request("Last-Event-ID must be ASCII (a cursor EPOCH-SEQ)"))?
        .filter(|v| !v.is_empty())
        .map(|cursor| cursor.parse::<Cursor>())
        .transpose()?;
    options.start = match header.or(last_event_id) {
        Some(cursor) => Start::After(cursor),
        None => from,
    };
    Ok(options)
}

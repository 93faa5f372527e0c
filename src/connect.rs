//! The `Connect` protocol below its doors: one stream (a gRPC bidi call, a WebSocket) carrying
//! many subscriptions, publishes with per-message acks, and unsubscribes, in
//! `topichub.v1.ConnectRequest` / `ConnectResponse` form.
//!
//! A door only reads requests off its transport, feeds them to [`Session::handle`] and writes
//! what arrives on the session's outbox; the rules (limits, access, acks, one forwarding task
//! per subscription, what ends a subscription) are written here once. The publish and
//! subscribe checks are shared with gRPC's unary and server-streaming calls too.

use std::collections::HashMap;
use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_util::sync::CancellationToken;

use crate::auth::Access;
use crate::cursor::Cursor;
use crate::error::Error;
use crate::hub::{
    self, Deleted, Holder, Hub, LagPolicy, PresencePage, Publishing, Start, SubscribeOptions,
    Subscription, TopicPage,
};
use crate::idempotency;
use crate::limits::{Connection, Limits, SubscriptionSlot};
use crate::metrics::{Door, Metrics};
use crate::shutdown::StreamEnd;
use crate::topic::{Pattern, Topic};
use crate::wire::{self, v1};

/// Answers and events buffered per Connect stream between the hub and the client's transport
/// (HTTP/2 window, WebSocket). A client that stops reading fills it, then its subscriptions'
/// own queues, whose lag policy applies.
pub const OUTBOX: usize = 64;

/// Bytes of messages (payload + headers + topic) buffered per Connect stream, besides the count
/// above: with 1 MiB payloads, 64 buffered events alone held 64 MiB per stream on top of its
/// subscriptions' queues. A message larger than this waits for an empty outbox and goes alone.
pub const OUTBOX_BYTES: usize = 4 * 1024 * 1024;

/// What a session writes for its door: an answer or event, or the error that ends the stream,
/// with the share of the outbox's byte budget it holds. The door drops the share once it has
/// handed the event to its transport.
pub type Outgoing = (
    Result<v1::ConnectResponse, Error>,
    Option<OwnedSemaphorePermit>,
);

/// The sending side of a Connect stream, shared by its session and forwarding tasks; bounded in
/// events ([`OUTBOX`]) and in message bytes ([`OUTBOX_BYTES`]).
#[derive(Clone)]
pub struct Outbox {
    tx: mpsc::Sender<Outgoing>,
    budget: Arc<Semaphore>,
}

impl Outbox {
    /// The outbox, and the receiver its door drains into the transport.
    pub fn new() -> (Outbox, mpsc::Receiver<Outgoing>) {
        let (tx, rx) = mpsc::channel(OUTBOX);
        let budget = Arc::new(Semaphore::new(OUTBOX_BYTES));
        (Outbox { tx, budget }, rx)
    }

    /// Sends an event that carries no message, or the error that ends the stream.
    async fn send(&self, event: Result<v1::ConnectResponse, Error>) -> Result<(), Gone> {
        self.tx.send((event, None)).await.map_err(|_| Gone)
    }

    /// Sends an event carrying a message of `bytes`, once the byte budget has room for it.
    async fn send_message(&self, event: v1::ConnectResponse, bytes: usize) -> Result<(), Gone> {
        let share = u32::try_from(bytes.min(OUTBOX_BYTES)).unwrap_or(u32::MAX);
        // Events left in the channel when the client goes away are dropped with it, giving
        // their shares back, so this wait ends then too.
        let held = self.budget.clone().acquire_many_owned(share).await;
        self.tx.send((Ok(event), held.ok())).await.map_err(|_| Gone)
    }

    async fn closed(&self) {
        self.tx.closed().await
    }
}

/// The client went away (its door's outbox is closed).
#[derive(Debug)]
pub struct Gone;

/// Checks a `PublishRequest` and hands it to the hub (shared by every publish of the
/// `topichub.v1` doors); the publish is done when the returned future resolves.
pub fn start_publish(
    hub: &Hub,
    access: &Access,
    request: v1::PublishRequest,
) -> Result<Publishing, Error> {
    hub.check_payload(request.payload.len())?;
    let topic = Topic::parse(&request.topic)?;
    access.check_publish(&topic)?;
    let key = match request.idempotency_key.as_str() {
        "" => None,
        key => Some(idempotency::parse_key(key)?),
    };
    Ok(hub.publish_once(
        topic,
        request.payload,
        request.headers.into_iter().collect(),
        key,
    ))
}

/// Publishes a `PublishRequest` through `door` and waits until it is acknowledged: its cursor,
/// and whether it was a retry of a message already published (see [`Publishing::settled`]).
pub async fn publish(
    hub: &Hub,
    access: &Access,
    door: Door,
    request: v1::PublishRequest,
) -> Result<(v1::Cursor, bool), Error> {
    acknowledged(hub, door, start_publish(hub, access, request)?).await
}

/// Waits for a started publish's outcome: its cursor, and whether it was a retry of a message
/// already published.
async fn acknowledged(
    hub: &Hub,
    door: Door,
    publishing: Publishing,
) -> Result<(v1::Cursor, bool), Error> {
    let (message, duplicate) = publishing.settled().await?;
    // A retry is answered, not published again.
    if !duplicate {
        hub.metrics().published(door);
    }
    Ok((wire::cursor(&message.cursor()), duplicate))
}

/// Publishes of one Connect stream waiting for a durable log at once, at most. Each is answered
/// by a task of its own, so that a client with many publishes in flight on one stream gets them
/// into the same commit (group commit) instead of paying a commit each in turn; the next publish
/// is read off the stream once one of these is answered.
pub const MAX_PENDING_PUBLISHES: usize = 1024;

/// Most subscriptions one presence page lists.
pub const MAX_PRESENCE_LIMIT: usize = 1000;

/// Subscriptions a presence page lists when the request does not say.
pub const DEFAULT_PRESENCE_LIMIT: usize = 100;

/// Who a client's subscriptions belong to, as presence lists show them: its token's subject, or
/// its address when authentication is off (or the token names no subject).
pub fn holder(access: &Access, connection: &Connection, door: Door) -> Holder {
    let client = match access.subject() {
        Some(subject) => subject.into(),
        None => connection.peer.to_string().into(),
    };
    Holder { client, door }
}

/// A page of the presence of `topic` (a topic or pattern) the token may see; `limit` 0 is the
/// default, over [`MAX_PRESENCE_LIMIT`] refused.
pub async fn presence(
    hub: &Hub,
    access: &Access,
    topic: &str,
    after: u64,
    limit: usize,
) -> Result<PresencePage, Error> {
    let pattern = Pattern::parse(topic)?;
    access.check_subscribe(std::slice::from_ref(&pattern))?;
    let limit = page_limit(limit, DEFAULT_PRESENCE_LIMIT, MAX_PRESENCE_LIMIT)?;
    Ok(hub.presence_everywhere(&pattern, after, limit).await)
}

/// A page's size as a request gives it: 0 is `default`, over `max` refused.
fn page_limit(limit: usize, default: usize, max: usize) -> Result<usize, Error> {
    match limit {
        0 => Ok(default),
        n if n > max => Err(Error::InvalidRequest(format!(
            "limit must be at most {max}, got {n}; page with `after`"
        ))),
        n => Ok(n),
    }
}

/// Most topics one listing page holds.
pub const MAX_TOPICS_LIMIT: usize = 10_000;

/// Topics a listing page holds when the request does not say.
pub const DEFAULT_TOPICS_LIMIT: usize = 1000;

/// A page of the topics the token may see: those matching `pattern` (empty: all) named after
/// `after` (empty: from the first; a page's `next` continues after it), in name order. `limit`
/// 0 is the default, over [`MAX_TOPICS_LIMIT`] refused. The one listing rule of every door.
pub fn list_topics(
    hub: &Hub,
    access: &Access,
    pattern: &str,
    after: &str,
    limit: usize,
) -> Result<TopicPage, Error> {
    let filter = match pattern {
        "" => None,
        pattern => Some(Pattern::parse(pattern)?),
    };
    let after = match after {
        "" => None,
        after => Some(Topic::parse(after).map_err(|e| {
            Error::InvalidRequest(format!(
                "after must be a topic name (the `next` of a previous page): {e}"
            ))
        })?),
    };
    let limit = page_limit(limit, DEFAULT_TOPICS_LIMIT, MAX_TOPICS_LIMIT)?;
    Ok(hub.topic_page(
        filter.as_ref(),
        &|name| access.may_see(name),
        after.as_ref(),
        limit,
    ))
}

/// Deletes `topic` if the token is an admin's.
pub async fn delete_topic(hub: &Hub, access: &Access, topic: &str) -> Result<Deleted, Error> {
    let topic = Topic::parse(topic)?;
    access.check_admin(&topic)?;
    hub.delete_topic(&topic).await
}

/// Validates a `SubscribeRequest` of `holder` into hub options the token allows.
pub fn subscribe_options(
    access: &Access,
    holder: Holder,
    request: v1::SubscribeRequest,
) -> Result<SubscribeOptions, Error> {
    let patterns = request
        .topics
        .iter()
        .map(|t| Pattern::parse(t))
        .collect::<Result<Vec<_>, _>>()?;
    access.check_subscribe(&patterns)?;
    use v1::start_position::Position;
    let start = match request.start.and_then(|s| s.position) {
        None | Some(Position::Latest(_)) => Start::Latest,
        Some(Position::Earliest(_)) => Start::Earliest,
        Some(Position::After(c)) => {
            let text = format!("{}-{}", c.epoch, c.seq);
            if !crate::cursor::is_epoch(&c.epoch) {
                return Err(Error::InvalidCursor {
                    cursor: text,
                    reason: "the epoch must be 1-32 letters or digits".into(),
                });
            }
            Start::After(Cursor {
                epoch: c.epoch,
                seq: c.seq,
            })
        }
    };
    let lag_policy = match v1::LagPolicy::try_from(request.lag_policy) {
        Ok(v1::LagPolicy::Unspecified) => None,
        Ok(v1::LagPolicy::CatchUp) => Some(LagPolicy::CatchUp),
        Ok(v1::LagPolicy::Disconnect) => Some(LagPolicy::Disconnect),
        Err(_) => {
            return Err(Error::InvalidRequest(format!(
                "unknown lag_policy {}; use LAG_POLICY_CATCH_UP or LAG_POLICY_DISCONNECT",
                request.lag_policy
            )));
        }
    };
    Ok(SubscribeOptions {
        patterns,
        start,
        queue_size: (request.queue_size > 0).then_some(request.queue_size as usize),
        queue_bytes: (request.queue_bytes > 0)
            .then(|| usize::try_from(request.queue_bytes).unwrap_or(usize::MAX)),
        lag_policy,
        holder: Some(holder),
        presence: request.presence,
    })
}

/// The `subscribed` event of a new subscription.
pub fn subscribed(subscription: &Subscription) -> v1::Subscribed {
    v1::Subscribed {
        subscription_id: subscription.id(),
        head: Some(wire::cursor(&subscription.head_at_start())),
    }
}

/// A request's failure as a `ConnectResponse` event; the stream stays open.
pub fn request_error(error: &Error) -> v1::connect_response::Event {
    v1::connect_response::Event::Error(v1::RequestError {
        code: error.kind().code_name().to_owned(),
        message: error.to_string(),
    })
}

/// One Connect stream: handles its requests and runs one forwarding task per subscription that
/// writes into the stream's outbox. Dropping it ends every subscription it opened.
pub struct Session {
    /// The stream's token and connection apply to each of its requests.
    access: Access,
    connection: Connection,
    limits: Limits,
    hub: Hub,
    shutdown: CancellationToken,
    door: Door,
    outbox: Outbox,
    /// Subscriptions opened on this stream, by id.
    subscriptions: HashMap<String, tokio::task::AbortHandle>,
    /// Room for publishes waiting for a durable log ([`MAX_PENDING_PUBLISHES`]).
    pending: Arc<Semaphore>,
}

impl Session {
    /// A session of a client with `access` on `connection`, answering into `outbox`.
    pub fn new(
        (access, connection): (Access, Connection),
        (hub, limits, shutdown): (Hub, Limits, CancellationToken),
        door: Door,
        outbox: Outbox,
    ) -> Session {
        Session {
            access,
            connection,
            limits,
            hub,
            shutdown,
            door,
            outbox,
            subscriptions: HashMap::new(),
            pending: Arc::new(Semaphore::new(MAX_PENDING_PUBLISHES)),
        }
    }

    /// What ends the whole stream, with all its subscriptions: shutdown or token expiry.
    pub fn end(&self) -> StreamEnd {
        StreamEnd::new(self.shutdown.clone(), self.access.expires_at())
    }

    /// Resolves when the door stopped reading the outbox (the client is gone).
    pub async fn gone(&self) {
        self.outbox.closed().await
    }

    /// Ends the stream with `error` (the door reports it its own way).
    pub async fn fail(&self, error: Error) {
        let _ = self.outbox.send(Err(error)).await;
    }

    /// Answers request `request_id` with `error` (a request the door could not decode).
    pub async fn reject(&self, request_id: u64, error: &Error) -> Result<(), Gone> {
        let response = v1::ConnectResponse {
            request_id,
            subscription_id: String::new(),
            event: Some(request_error(error)),
        };
        self.outbox.send(Ok(response)).await
    }

    /// Handles one request.
    pub async fn handle(&mut self, request: v1::ConnectRequest) -> Result<(), Gone> {
        use v1::connect_request::Request as Req;
        use v1::connect_response::Event;
        let request_id = request.request_id;
        let reply = |subscription_id: String, event: Event| v1::ConnectResponse {
            request_id,
            subscription_id,
            event: Some(event),
        };
        let response = match request.request {
            Some(Req::Publish(publish_request)) => {
                // Taken before the publish starts, so a client that never reads its acks is held
                // back here rather than queueing without bound; never closed.
                let permit = if self.hub.is_durable() {
                    self.pending.clone().acquire_owned().await.ok()
                } else {
                    None
                };
                let started = self
                    .limits
                    .check_publish(&self.access, &self.connection)
                    .and_then(|()| start_publish(&self.hub, &self.access, publish_request));
                match (started, permit) {
                    // Waiting for the log: answered by a task while the next requests are read.
                    (Ok(publishing), Some(permit)) => {
                        let (hub, door, outbox) =
                            (self.hub.clone(), self.door, self.outbox.clone());
                        tokio::spawn(async move {
                            let published = acknowledged(&hub, door, publishing).await;
                            let _ = outbox.send(Ok(publish_answer(request_id, published))).await;
                            drop(permit);
                        });
                        return Ok(());
                    }
                    (Ok(publishing), None) => publish_answer(
                        request_id,
                        acknowledged(&self.hub, self.door, publishing).await,
                    ),
                    (Err(error), _) => publish_answer(request_id, Err(error)),
                }
            }
            Some(Req::Subscribe(subscribe)) => {
                let holder = holder(&self.access, &self.connection, self.door);
                let options = subscribe_options(&self.access, holder, subscribe);
                if let Ok(options) = &options
                    && let Start::After(cursor) = &options.start
                {
                    self.hub.wait_applied(cursor).await;
                }
                let opened = self.connection.open_subscription().and_then(|slot| {
                    let options = options?;
                    Ok((slot, self.hub.subscribe(options)?))
                });
                match opened {
                    Ok((slot, subscription)) => {
                        let id = subscription.id();
                        let first = reply(id.clone(), Event::Subscribed(subscribed(&subscription)));
                        self.outbox.send(Ok(first)).await?;
                        let task = tokio::spawn(forward(
                            subscription,
                            id.clone(),
                            self.outbox.clone(),
                            StreamEnd::new(self.shutdown.clone(), None),
                            slot,
                            (self.hub.metrics().clone(), self.door),
                        ));
                        self.subscriptions.retain(|_, t| !t.is_finished());
                        self.subscriptions.insert(id, task.abort_handle());
                        return Ok(());
                    }
                    Err(error) => reply(String::new(), request_error(&error)),
                }
            }
            Some(Req::Unsubscribe(unsubscribe)) => {
                let id = unsubscribe.subscription_id;
                if self.subscriptions.contains_key(&id) {
                    // The forwarding task sees the subscription end and reports `unsubscribed`.
                    match self.hub.unsubscribe(&id) {
                        Ok(()) => return Ok(()),
                        Err(error) => reply(id, request_error(&error)),
                    }
                } else {
                    reply(id.clone(), request_error(&Error::UnknownSubscription(id)))
                }
            }
            None => reply(
                String::new(),
                request_error(&Error::InvalidRequest(
                    "a ConnectRequest needs one of subscribe, unsubscribe or publish".into(),
                )),
            ),
        };
        self.outbox.send(Ok(response)).await
    }
}

/// The answer to publish `request_id` of a Connect stream: its ack, or why it failed.
fn publish_answer(
    request_id: u64,
    published: Result<(v1::Cursor, bool), Error>,
) -> v1::ConnectResponse {
    let event = match published {
        Ok((cursor, duplicate)) => v1::connect_response::Event::Ack(v1::PublishAck {
            cursor: Some(cursor),
            duplicate,
        }),
        Err(error) => request_error(&error),
    };
    v1::ConnectResponse {
        request_id,
        subscription_id: String::new(),
        event: Some(event),
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        for (_, task) in self.subscriptions.drain() {
            task.abort();
        }
    }
}

/// Forwards one Connect subscription into the stream's outbox until it ends, the client leaves
/// or the server shuts down.
async fn forward(
    mut subscription: Subscription,
    id: String,
    outbox: Outbox,
    mut end: StreamEnd,
    // Held until the subscription ends, freeing its place in the connection's count.
    _slot: SubscriptionSlot,
    (metrics, door): (Metrics, Door),
) {
    use v1::connect_response::Event;
    let _gauge = metrics.subscriber(door);
    let event = |event| v1::ConnectResponse {
        request_id: 0,
        subscription_id: id.clone(),
        event: Some(event),
    };
    let unsubscribed = |reason: &str| {
        event(Event::Unsubscribed(v1::Unsubscribed {
            reason: reason.into(),
        }))
    };
    loop {
        let next = tokio::select! {
            next = end.next(&mut subscription) => next,
            () = outbox.closed() => return,
        };
        if let Some(Ok(delivered)) = &next {
            delivered.count(&metrics, door);
        }
        let response = match next {
            Some(Ok(hub::Event::Message(m))) => {
                let bytes = m.queued_size();
                let message = event(Event::Message(wire::SharedMessage::new(m)));
                if outbox.send_message(message, bytes).await.is_err() {
                    return;
                }
                continue;
            }
            Some(Ok(hub::Event::Gap(g))) => event(Event::Gap(wire::gap(g))),
            Some(Ok(hub::Event::Lag(l))) => event(Event::Lag(wire::lag(l))),
            Some(Ok(hub::Event::Presence(p))) => event(Event::Presence(wire::presence_event(p))),
            Some(Ok(hub::Event::Cluster { reachable })) => {
                event(Event::Cluster(wire::cluster_status(reachable)))
            }
            Some(Err(Error::ShuttingDown)) => {
                // The door reports it once for the whole stream.
                return;
            }
            Some(Err(Error::TopicDeleted(topic))) => {
                let deleted = Event::Deleted(wire::topic_deleted(topic));
                let _ = outbox.send(Ok(event(deleted))).await;
                let _ = outbox.send(Ok(unsubscribed("deleted"))).await;
                return;
            }
            Some(Err(error)) => {
                let _ = outbox.send(Ok(event(request_error(&error)))).await;
                let _ = outbox.send(Ok(unsubscribed("lagged"))).await;
                return;
            }
            None => {
                let _ = outbox.send(Ok(unsubscribed("unsubscribed"))).await;
                return;
            }
        };
        if outbox.send(Ok(response)).await.is_err() {
            return;
        }
    }
}

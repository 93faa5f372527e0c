//! gRPC doors: `topichub.v1.PubSub` (all four call shapes) and the seed's `proto.PubSubService`,
//! plus health and reflection (assembled in `server`). Handlers validate, call the hub and
//! convert; the hub holds all state.

pub mod codec;
pub mod deadline;
pub mod seed;
pub mod wire;

use std::collections::{HashMap, VecDeque};
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;

use futures_util::{Stream, StreamExt};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Code, Request, Response, Status, Streaming};

use crate::auth::Access;
use crate::cursor::Cursor;
use crate::error::{Error, Kind};
use crate::hub::{self, Hub, LagPolicy, Publishing, Start, SubscribeOptions, Subscription};
use crate::limits::{Connection, Limits, SubscriptionSlot};
use crate::metrics::{Door, Metrics};
use crate::shutdown::StreamEnd;
use crate::topic::{Pattern, Topic};
use wire::v1;

/// Events buffered per Connect stream between the hub and the client's HTTP/2 window. A client
/// that stops reading fills it, then its subscriptions' own queues, whose lag policy applies.
const CONNECT_OUTBOX: usize = 64;

/// Bytes of messages (payload + headers + topic) buffered per Connect stream, besides the count
/// above: with 1 MiB payloads, 64 buffered events alone held 64 MiB per stream on top of its
/// subscriptions' queues. A message larger than this waits for an empty outbox and goes alone.
const CONNECT_OUTBOX_BYTES: usize = 4 * 1024 * 1024;

/// An event for the client, with the share of the outbox's byte budget it holds until the
/// response stream hands it to tonic.
type Outgoing = (
    Result<v1::ConnectResponse, Status>,
    Option<OwnedSemaphorePermit>,
);

/// The sending side of a Connect stream, shared by its session and forwarding tasks.
#[derive(Clone)]
struct Outbox {
    tx: mpsc::Sender<Outgoing>,
    budget: Arc<Semaphore>,
}

impl Outbox {
    /// The outbox, and the response stream that drains it.
    fn new() -> (
        Outbox,
        impl Stream<Item = Result<v1::ConnectResponse, Status>> + Send,
    ) {
        let (tx, rx) = mpsc::channel(CONNECT_OUTBOX);
        let budget = Arc::new(Semaphore::new(CONNECT_OUTBOX_BYTES));
        let events = ReceiverStream::new(rx).map(|(event, _budget)| event);
        (Outbox { tx, budget }, events)
    }

    /// Sends an event that carries no message; `Err` when the client is gone.
    async fn send(&self, event: Result<v1::ConnectResponse, Status>) -> Result<(), ()> {
        self.tx.send((event, None)).await.map_err(drop)
    }

    /// Sends an event carrying a message of `bytes`, once the byte budget has room for it.
    async fn send_message(&self, event: v1::ConnectResponse, bytes: usize) -> Result<(), ()> {
        let share = u32::try_from(bytes.min(CONNECT_OUTBOX_BYTES)).unwrap_or(u32::MAX);
        // Events left in the channel when the client goes away are dropped with it, giving
        // their shares back, so this wait ends then too.
        let held = self.budget.clone().acquire_many_owned(share).await;
        self.tx.send((Ok(event), held.ok())).await.map_err(drop)
    }

    async fn closed(&self) {
        self.tx.closed().await
    }
}

impl From<Error> for Status {
    fn from(error: Error) -> Status {
        let code = match error.kind() {
            Kind::InvalidArgument => Code::InvalidArgument,
            Kind::ResourceExhausted => Code::ResourceExhausted,
            Kind::NotFound => Code::NotFound,
            Kind::Unavailable => Code::Unavailable,
            Kind::Unauthenticated => Code::Unauthenticated,
            Kind::PermissionDenied => Code::PermissionDenied,
        };
        Status::new(code, error.to_string())
    }
}

/// A boxed stream of gRPC items.
pub type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// `topichub.v1.PubSub`.
#[derive(Clone)]
pub struct PubSubService {
    hub: Hub,
    limits: Limits,
    shutdown: CancellationToken,
}

impl PubSubService {
    /// The service over `hub`; its streams end when `shutdown` is cancelled.
    pub fn new(hub: Hub, limits: Limits, shutdown: CancellationToken) -> PubSubService {
        PubSubService {
            hub,
            limits,
            shutdown,
        }
    }
}

/// Who is calling: what the token allows (from `auth::grpc_guard`) and the connection (from the
/// server's per-connection layer).
#[derive(Clone)]
pub(crate) struct Caller {
    pub(crate) access: Access,
    pub(crate) connection: Connection,
    /// `topichub.v1`'s door for this call: gRPC, or gRPC-Web when the listener marked it so.
    pub(crate) door: Door,
}

/// The caller of `request`; fails closed when the middlewares did not run.
pub(crate) fn caller<T>(request: &Request<T>) -> Result<Caller, Status> {
    let extensions = request.extensions();
    match (extensions.get::<Access>(), extensions.get::<Connection>()) {
        (Some(access), Some(connection)) => Ok(Caller {
            access: access.clone(),
            connection: connection.clone(),
            door: extensions.get::<Door>().copied().unwrap_or(Door::Grpc),
        }),
        _ => Err(Status::unauthenticated(
            "no credentials were checked for this call",
        )),
    }
}

/// Checks a `PublishRequest` and hands it to the hub (shared by `Publish`, `PublishBatch` and
/// `Connect`); the publish is done when the returned future resolves.
fn start_publish(
    hub: &Hub,
    access: &Access,
    request: v1::PublishRequest,
) -> Result<Publishing, Error> {
    hub.check_payload(request.payload.len())?;
    let topic = Topic::parse(&request.topic)?;
    access.check_publish(&topic)?;
    Ok(hub.publish(
        topic,
        request.payload,
        request.headers.into_iter().collect(),
    ))
}

/// Publishes a `PublishRequest` and waits until it is acknowledged.
async fn publish(
    hub: &Hub,
    access: &Access,
    door: Door,
    request: v1::PublishRequest,
) -> Result<v1::Cursor, Error> {
    let message = start_publish(hub, access, request)?.await?;
    hub.metrics().published(door);
    Ok(wire::cursor(&message.cursor()))
}

/// Publishes of one `PublishBatch` handed to a durable log and not yet acknowledged: a batch
/// keeps up to this many in flight, so that they share group commits instead of each waiting
/// for its own fsync.
const BATCH_IN_FLIGHT: usize = 1024;

/// A batch's publishes in flight, settled in order.
struct Pipeline {
    hub: Hub,
    door: Door,
    in_flight: VecDeque<Publishing>,
    accepted: u64,
    last: Option<v1::Cursor>,
}

impl Pipeline {
    /// Waits for publishes in flight until at most `keep` remain.
    async fn settle(&mut self, keep: usize) -> Result<(), Error> {
        while self.in_flight.len() > keep {
            let message = self.in_flight.pop_front().expect("more than keep").await?;
            self.hub.metrics().published(self.door);
            self.accepted += 1;
            self.last = Some(wire::cursor(&message.cursor()));
        }
        Ok(())
    }
}

/// Validates a `SubscribeRequest` into hub options the token allows.
fn subscribe_options(
    access: &Access,
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
    })
}

/// Turns a subscription into a stream of `f(event)` that ends after the first error (including
/// shutdown and token expiry).
pub(crate) fn subscription_stream<T: Send + 'static>(
    subscription: Subscription,
    end: StreamEnd,
    slot: SubscriptionSlot,
    (metrics, door): (Metrics, Door),
    f: fn(hub::Event) -> Option<T>,
) -> impl Stream<Item = Result<T, Status>> + Send + 'static {
    // The slot and the gauge travel with the stream and are released at its end.
    let held = (slot, metrics.subscriber(door), metrics);
    futures_util::stream::unfold(Some((subscription, end, held)), move |state| async move {
        let (mut subscription, mut end, held) = state?;
        loop {
            let event = match end.next(&mut subscription).await? {
                Ok(event) => event,
                Err(error) => return Some((Err(error.into()), None)),
            };
            held.2.count_event(door, &event);
            if let Some(item) = f(event) {
                return Some((Ok(item), Some((subscription, end, held))));
            }
        }
    })
}

#[tonic::async_trait]
impl v1::pub_sub_server::PubSub for PubSubService {
    async fn publish(
        &self,
        request: Request<v1::PublishRequest>,
    ) -> Result<Response<v1::PublishResponse>, Status> {
        let caller = caller(&request)?;
        self.limits
            .check_publish(&caller.access, &caller.connection)?;
        let cursor = publish(&self.hub, &caller.access, caller.door, request.into_inner()).await?;
        Ok(Response::new(v1::PublishResponse {
            cursor: Some(cursor),
        }))
    }

    async fn publish_batch(
        &self,
        request: Request<Streaming<v1::PublishRequest>>,
    ) -> Result<Response<v1::PublishBatchResponse>, Status> {
        // One message is decoded at a time and published before the next is read, so HTTP/2
        // flow control holds a fast publisher back and memory stays flat for any batch size. The
        // publish rate limit paces the stream the same way rather than failing it.
        let caller = caller(&request)?;
        let mut stream = request.into_inner();
        let window = if self.hub.is_durable() {
            BATCH_IN_FLIGHT
        } else {
            0
        };
        let mut pipeline = Pipeline {
            hub: self.hub.clone(),
            door: caller.door,
            in_flight: VecDeque::new(),
            accepted: 0,
            last: None,
        };
        // Like every live stream, a batch ends when the server shuts down or its token expires;
        // the status says how much of it was published.
        let mut end = StreamEnd::new(self.shutdown.clone(), caller.access.expires_at());
        let failed = |error: Error, accepted: u64, what: &str| {
            let status = Status::from(error);
            let before = match accepted {
                1 => "the 1 message before it was published".to_string(),
                n => format!("the {n} messages before it were published"),
            };
            Status::new(
                status.code(),
                format!("{what}: {}; {before}", status.message()),
            )
        };
        loop {
            // The end is checked first, so a publisher that never pauses still sees it.
            let next = std::future::poll_fn(|cx| match end.poll_ended(cx) {
                Poll::Ready(error) => Poll::Ready(Err(error)),
                Poll::Pending => stream.poll_next_unpin(cx).map(Ok),
            });
            let item = match next.await {
                Ok(Some(item)) => Ok(item),
                Ok(None) => break,
                Err(error) => Err(error),
            };
            // Whatever ends the batch, the publishes in flight are settled first, so the
            // answer counts exactly what was published.
            let number = pipeline.accepted + pipeline.in_flight.len() as u64 + 1;
            let stop = match item {
                Ok(Ok(item)) => {
                    self.limits
                        .pace_publish(&caller.access, &caller.connection)
                        .await;
                    match start_publish(&self.hub, &caller.access, item) {
                        Ok(publishing) => {
                            pipeline.in_flight.push_back(publishing);
                            None
                        }
                        Err(error) => Some((
                            error,
                            format!("message #{number} of the batch was rejected"),
                        )),
                    }
                }
                Ok(Err(status)) => {
                    pipeline.settle(0).await.ok();
                    return Err(status);
                }
                Err(error) => Some((error, format!("the batch ended before message #{number}"))),
            };
            let keep = if stop.is_some() { 0 } else { window };
            if let Err(error) = pipeline.settle(keep).await {
                let what = format!(
                    "message #{} of the batch was rejected",
                    pipeline.accepted + 1
                );
                return Err(failed(error, pipeline.accepted, &what));
            }
            if let Some((error, what)) = stop {
                return Err(failed(error, pipeline.accepted, &what));
            }
        }
        if let Err(error) = pipeline.settle(0).await {
            let what = format!(
                "message #{} of the batch was rejected",
                pipeline.accepted + 1
            );
            return Err(failed(error, pipeline.accepted, &what));
        }
        Ok(Response::new(v1::PublishBatchResponse {
            accepted: pipeline.accepted,
            last_cursor: pipeline.last,
        }))
    }

    type SubscribeStream = BoxStream<v1::SubscribeResponse>;

    async fn subscribe(
        &self,
        request: Request<v1::SubscribeRequest>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        let caller = caller(&request)?;
        let slot = caller.connection.open_subscription()?;
        let subscription = self
            .hub
            .subscribe(subscribe_options(&caller.access, request.into_inner())?)?;
        let subscribed = v1::SubscribeResponse {
            event: Some(v1::subscribe_response::Event::Subscribed(subscribed(
                &subscription,
            ))),
        };
        let end = StreamEnd::new(self.shutdown.clone(), caller.access.expires_at());
        let metrics = (self.hub.metrics().clone(), caller.door);
        let events = subscription_stream(subscription, end, slot, metrics, |event| {
            Some(wire::subscribe_event(event))
        });
        Ok(Response::new(Box::pin(
            futures_util::stream::once(async { Ok(subscribed) }).chain(events),
        )))
    }

    type ConnectStream = BoxStream<v1::ConnectResponse>;

    async fn connect(
        &self,
        request: Request<Streaming<v1::ConnectRequest>>,
    ) -> Result<Response<Self::ConnectStream>, Status> {
        let (outbox, events) = Outbox::new();
        let session = ConnectSession {
            caller: caller(&request)?,
            limits: self.limits.clone(),
            hub: self.hub.clone(),
            shutdown: self.shutdown.clone(),
            outbox,
            subscriptions: HashMap::new(),
        };
        tokio::spawn(session.run(request.into_inner()));
        Ok(Response::new(Box::pin(events)))
    }

    async fn unsubscribe(
        &self,
        request: Request<v1::UnsubscribeRequest>,
    ) -> Result<Response<v1::UnsubscribeResponse>, Status> {
        self.hub
            .unsubscribe(&request.into_inner().subscription_id)?;
        Ok(Response::new(v1::UnsubscribeResponse {}))
    }

    async fn list_topics(
        &self,
        request: Request<v1::ListTopicsRequest>,
    ) -> Result<Response<v1::ListTopicsResponse>, Status> {
        let access = caller(&request)?.access;
        let pattern = request.into_inner().pattern;
        let filter = if pattern.is_empty() {
            None
        } else {
            Some(Pattern::parse(&pattern)?)
        };
        let topics = self
            .hub
            .topics(filter.as_ref())
            .into_iter()
            .filter(|t| access.may_see(&t.name))
            .map(wire::topic_info)
            .collect();
        Ok(Response::new(v1::ListTopicsResponse { topics }))
    }
}

fn subscribed(subscription: &Subscription) -> v1::Subscribed {
    v1::Subscribed {
        subscription_id: subscription.id(),
        head: Some(wire::cursor(&subscription.head_at_start())),
    }
}

/// One `Connect` stream: reads requests, and runs one forwarding task per subscription that
/// writes into the shared outbox. Everything ends when the client goes away (the outbox closes)
/// or the server shuts down.
struct ConnectSession {
    /// Who opened the stream: its token and connection apply to each of its requests.
    caller: Caller,
    limits: Limits,
    hub: Hub,
    shutdown: CancellationToken,
    outbox: Outbox,
    /// Subscriptions opened on this stream, by id.
    subscriptions: HashMap<String, tokio::task::AbortHandle>,
}

impl ConnectSession {
    async fn run(mut self, mut requests: Streaming<v1::ConnectRequest>) {
        // Shutdown and token expiry end the whole stream, with all its subscriptions.
        let mut end = StreamEnd::new(self.shutdown.clone(), self.caller.access.expires_at());
        let mut half_closed = false;
        loop {
            let request = tokio::select! {
                request = requests.message(), if !half_closed => request,
                () = self.outbox.closed() => break,
                error = end.ended() => {
                    let _ = self.outbox.send(Err(error.into())).await;
                    break;
                }
            };
            match request {
                Ok(Some(request)) => {
                    if self.handle(request).await.is_err() {
                        break;
                    }
                }
                // The client half-closed: keep delivering to its subscriptions until it leaves,
                // the server shuts down or its token expires.
                Ok(None) => half_closed = true,
                Err(status) => {
                    tracing::debug!(%status, "connect stream ended by the client");
                    break;
                }
            }
        }
        for (_, task) in self.subscriptions.drain() {
            task.abort();
        }
    }

    /// Handles one request; `Err` when the client is gone.
    async fn handle(&mut self, request: v1::ConnectRequest) -> Result<(), ()> {
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
                let published = self
                    .limits
                    .check_publish(&self.caller.access, &self.caller.connection)
                    .and_then(|()| start_publish(&self.hub, &self.caller.access, publish_request));
                let published = match published {
                    Ok(publishing) => publishing.await.map(|message| {
                        self.hub.metrics().published(self.caller.door);
                        wire::cursor(&message.cursor())
                    }),
                    Err(error) => Err(error),
                };
                match published {
                    Ok(cursor) => reply(
                        String::new(),
                        Event::Ack(v1::PublishAck {
                            cursor: Some(cursor),
                        }),
                    ),
                    Err(error) => reply(String::new(), request_error(error.into())),
                }
            }
            Some(Req::Subscribe(subscribe)) => {
                let opened = self.caller.connection.open_subscription().and_then(|slot| {
                    let options = subscribe_options(&self.caller.access, subscribe)?;
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
                            (self.hub.metrics().clone(), self.caller.door),
                        ));
                        self.subscriptions.retain(|_, t| !t.is_finished());
                        self.subscriptions.insert(id, task.abort_handle());
                        return Ok(());
                    }
                    Err(error) => reply(String::new(), request_error(error.into())),
                }
            }
            Some(Req::Unsubscribe(unsubscribe)) => {
                let id = unsubscribe.subscription_id;
                if self.subscriptions.contains_key(&id) {
                    // The forwarding task sees the subscription end and reports `unsubscribed`.
                    match self.hub.unsubscribe(&id) {
                        Ok(()) => return Ok(()),
                        Err(error) => reply(id, request_error(error.into())),
                    }
                } else {
                    reply(
                        id.clone(),
                        request_error(Error::UnknownSubscription(id).into()),
                    )
                }
            }
            None => reply(
                String::new(),
                request_error(Status::invalid_argument(
                    "a ConnectRequest needs one of subscribe, unsubscribe or publish",
                )),
            ),
        };
        self.outbox.send(Ok(response)).await
    }
}

fn request_error(status: Status) -> v1::connect_response::Event {
    v1::connect_response::Event::Error(v1::RequestError {
        code: code_name(status.code()).to_owned(),
        message: status.message().to_owned(),
    })
}

/// The canonical upper-case name of a status code, as in the gRPC spec.
fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
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
    loop {
        let next = tokio::select! {
            next = end.next(&mut subscription) => next,
            () = outbox.closed() => return,
        };
        if let Some(Ok(delivered)) = &next {
            metrics.count_event(door, delivered);
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
            Some(Err(Error::ShuttingDown)) => {
                // The session reports it once for the whole stream.
                return;
            }
            Some(Err(error)) => {
                let _ = outbox.send(Ok(event(request_error(error.into())))).await;
                let _ = outbox
                    .send(Ok(event(Event::Unsubscribed(v1::Unsubscribed {
                        reason: "lagged".into(),
                    }))))
                    .await;
                return;
            }
            None => {
                let _ = outbox
                    .send(Ok(event(Event::Unsubscribed(v1::Unsubscribed {
                        reason: "unsubscribed".into(),
                    }))))
                    .await;
                return;
            }
        };
        if outbox.send(Ok(response)).await.is_err() {
            return;
        }
    }
}

/// Decoded-message ceiling for gRPC: room for the largest payload plus headers and framing, with
/// headroom so that moderately oversized publishes reach the hub and get its precise
/// RESOURCE_EXHAUSTED answer (the codec answers OUT_OF_RANGE beyond this).
pub fn max_decoding_message_size(max_payload_bytes: usize) -> usize {
    max_payload_bytes
        .saturating_mul(2)
        .saturating_add(1024 * 1024)
}

/// A trailers-only gRPC response carrying `status`, for answers given before a service runs
/// (authentication, unknown methods, panics); valid for gRPC and gRPC-Web clients.
pub fn status_response(status: Status) -> axum::response::Response {
    use axum::http::{HeaderValue, header};
    let mut response = axum::response::Response::new(axum::body::Body::empty());
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    headers.insert("grpc-status", HeaderValue::from(status.code() as i32));
    if let Ok(message) = HeaderValue::from_str(&percent_encode(status.message())) {
        headers.insert("grpc-message", message);
    }
    response
}

/// grpc-message is percent-encoded (gRPC spec).
fn percent_encode(text: &str) -> String {
    text.bytes()
        .map(|b| {
            if (0x20..0x7f).contains(&b) && b != b'%' {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn grpc_messages_are_percent_encoded() {
        assert_eq!(super::percent_encode("50% ünits"), "50%25 %C3%BCnits");
    }
}

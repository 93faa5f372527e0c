//! gRPC doors: `topichub.v1.PubSub` (all four call shapes) and the seed's `proto.PubSubService`,
//! plus health and reflection (assembled in `server`). Handlers validate, call the hub and
//! convert; the hub holds all state.

pub mod codec;
pub mod deadline;
pub mod guard;
pub mod seed;
pub use crate::wire;

use std::collections::VecDeque;
use std::pin::Pin;
use std::task::Poll;

use futures_util::{Stream, StreamExt};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Code, Request, Response, Status, Streaming};

use crate::auth::Access;
use crate::connect::{
    Outbox, Session, delete_topic, holder, list_topics, presence, publish, start_publish,
    subscribe_options, subscribed,
};
use crate::error::{Error, Kind};
use crate::hub::{self, Hub, Publishing, Subscription};
use crate::limits::{Connection, Limits, SubscriptionSlot};
use crate::metrics::{Door, Metrics};
use crate::shutdown::StreamEnd;
use wire::v1;

impl From<Error> for Status {
    fn from(error: Error) -> Status {
        let code = match error.kind() {
            Kind::InvalidArgument => Code::InvalidArgument,
            Kind::ResourceExhausted => Code::ResourceExhausted,
            Kind::NotFound => Code::NotFound,
            Kind::Unavailable => Code::Unavailable,
            Kind::Unauthenticated => Code::Unauthenticated,
            Kind::PermissionDenied => Code::PermissionDenied,
            Kind::AlreadyExists => Code::AlreadyExists,
            Kind::Aborted => Code::Aborted,
            Kind::Unimplemented => Code::Unimplemented,
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

/// Who is calling: what the token allows (from `guard::Gate`) and the connection (from the
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
            let publishing = self.in_flight.pop_front().expect("more than keep");
            let (message, duplicate) = publishing.settled().await?;
            // A retry is answered, not published again.
            if !duplicate {
                self.hub.metrics().published(self.door);
            }
            self.accepted += 1;
            self.last = Some(wire::cursor(&message.cursor()));
        }
        Ok(())
    }
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
            event.count(&held.2, door);
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
        let (cursor, duplicate) =
            publish(&self.hub, &caller.access, caller.door, request.into_inner()).await?;
        Ok(Response::new(v1::PublishResponse {
            cursor: Some(cursor),
            duplicate,
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
        let holder = holder(&caller.access, &caller.connection, caller.door);
        let options = subscribe_options(&caller.access, holder, request.into_inner())?;
        if let hub::Start::After(cursor) = &options.start {
            self.hub.wait_applied(cursor).await;
        }
        let subscription = self.hub.subscribe(options)?;
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
        let Caller {
            access,
            connection,
            door,
        } = caller(&request)?;
        let (outbox, events) = Outbox::new();
        let session = Session::new(
            (access, connection),
            (self.hub.clone(), self.limits.clone(), self.shutdown.clone()),
            door,
            outbox,
        );
        tokio::spawn(run_connect(session, request.into_inner()));
        // An event's share of the outbox's byte budget is given back as tonic takes it.
        Ok(Response::new(Box::pin(
            ReceiverStream::new(events).map(|(event, _share)| event.map_err(Status::from)),
        )))
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
        let request = request.into_inner();
        let page = list_topics(
            &self.hub,
            &access,
            &request.pattern,
            &request.after,
            request.limit as usize,
        )?;
        Ok(Response::new(v1::ListTopicsResponse {
            topics: page.topics.into_iter().map(wire::topic_info).collect(),
            next: page.next.unwrap_or_default(),
        }))
    }

    async fn presence(
        &self,
        request: Request<v1::PresenceRequest>,
    ) -> Result<Response<v1::PresenceResponse>, Status> {
        let access = caller(&request)?.access;
        let request = request.into_inner();
        let page = presence(
            &self.hub,
            &access,
            &request.topic,
            request.after,
            request.limit as usize,
        )
        .await?;
        Ok(Response::new(wire::presence_page(page)))
    }

    async fn delete_topic(
        &self,
        request: Request<v1::DeleteTopicRequest>,
    ) -> Result<Response<v1::DeleteTopicResponse>, Status> {
        let access = caller(&request)?.access;
        let deleted = delete_topic(&self.hub, &access, &request.into_inner().topic).await?;
        Ok(Response::new(v1::DeleteTopicResponse {
            purged_messages: deleted.purged_messages,
            ended_subscriptions: deleted.ended_subscriptions,
        }))
    }
}

/// Reads a `Connect` stream's requests into its session until the client leaves, the server
/// shuts down or the token expires.
async fn run_connect(mut session: Session, mut requests: Streaming<v1::ConnectRequest>) {
    let mut end = session.end();
    let mut half_closed = false;
    loop {
        let request = tokio::select! {
            request = requests.message(), if !half_closed => request,
            () = session.gone() => break,
            error = end.ended() => {
                session.fail(error).await;
                break;
            }
        };
        match request {
            Ok(Some(request)) => {
                if session.handle(request).await.is_err() {
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
}

/// Decoded-message ceiling for gRPC: room for the largest payload plus headers and framing, with
/// headroom so that moderately oversized publishes reach the hub and get its precise
/// RESOURCE_EXHAUSTED answer (the codec answers OUT_OF_RANGE beyond this).
pub fn max_decoding_message_size(max_payload_bytes: usize) -> usize {
    max_payload_bytes
        .saturating_mul(2)
        .saturating_add(1024 * 1024)
}

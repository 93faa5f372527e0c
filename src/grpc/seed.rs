//! The seed's `proto.PubSubService`, served unchanged over the same hub.
//!
//! The seed API has no place for cursors or gap notices. Subscribers use the hub's default lag
//! policy, so a slow seed subscriber is caught up from retention like any other; gap and lag
//! notices, which it cannot receive, are logged.
//!
//! A message's `SubscribeResponse` is encoded once and shared by every seed subscriber
//! ([`SharedPayload`]), as `topichub.v1` and SSE encodings are.

use std::sync::OnceLock;

use bytes::Bytes;
use futures_util::StreamExt as _;
use tokio_util::sync::CancellationToken;
use tonic::{Code, Request, Response, Status};

use crate::grpc::BoxStream;
use crate::grpc::wire::{Encoding, Preencoded};
use crate::hub::{self, Hub, Start, SubscribeOptions};
use crate::limits::Limits;
use crate::metrics::Door;
use crate::proto::seed;
use crate::shutdown::StreamEnd;
use crate::topic::{Pattern, Topic};

/// The server side of `proto.PubSubService` (generated; `SubscribeResponse` is
/// [`SharedPayload`]).
pub mod server {
    #![allow(missing_docs, clippy::all)]
    include!(concat!(env!("OUT_DIR"), "/seed_server/proto.rs"));
}

/// The seed's `SubscribeResponse { bytes payload = 1; }` encoding of a hub message.
pub enum SeedResponse {}

impl Encoding for SeedResponse {
    fn cache(message: &hub::Message) -> &OnceLock<Bytes> {
        message.encoded.seed()
    }

    fn encode(message: &hub::Message) -> Bytes {
        use prost::Message as _;
        seed::SubscribeResponse {
            payload: message.payload.clone(),
        }
        .encode_to_vec()
        .into()
    }
}

/// A hub message as the seed's `SubscribeResponse`, encoded once for every seed subscriber.
pub type SharedPayload = Preencoded<SeedResponse>;

/// `proto.PubSubService`.
#[derive(Clone)]
pub struct SeedService {
    hub: Hub,
    limits: Limits,
    shutdown: CancellationToken,
}

impl SeedService {
    /// The service over `hub`; its streams end when `shutdown` is cancelled.
    pub fn new(hub: Hub, limits: Limits, shutdown: CancellationToken) -> SeedService {
        SeedService {
            hub,
            limits,
            shutdown,
        }
    }
}

#[tonic::async_trait]
impl server::pub_sub_service_server::PubSubService for SeedService {
    async fn publish(
        &self,
        request: Request<server::PublishRequest>,
    ) -> Result<Response<()>, Status> {
        let super::Caller {
            access, connection, ..
        } = super::caller(&request)?;
        self.limits.check_publish(&access, &connection)?;
        let request = request.into_inner();
        self.hub.check_payload(request.payload.len())?;
        let topic = Topic::parse(&request.topic)?;
        access.check_publish(&topic)?;
        self.hub
            .publish(topic, request.payload, Default::default())
            .await?;
        self.hub.metrics().published(Door::Seed);
        Ok(Response::new(()))
    }

    type SubscribeStream = BoxStream<SharedPayload>;

    async fn subscribe(
        &self,
        request: Request<server::SubscribeRequest>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        let super::Caller {
            access, connection, ..
        } = super::caller(&request)?;
        let slot = connection.open_subscription()?;
        let patterns = vec![Pattern::parse(&request.into_inner().topic)?];
        access.check_subscribe(&patterns)?;
        let subscription = self.hub.subscribe(SubscribeOptions {
            patterns,
            start: Start::Latest,
            holder: Some(crate::connect::holder(&access, &connection, Door::Seed)),
            ..Default::default()
        })?;
        let end = StreamEnd::new(self.shutdown.clone(), access.expires_at());
        let metrics = (self.hub.metrics().clone(), Door::Seed);
        let stream =
            super::subscription_stream(subscription, end, slot, metrics, |event| match event {
                hub::Event::Message(m) => Some(SharedPayload::new(m)),
                hub::Event::Gap(gap) => {
                    tracing::warn!(
                        ?gap,
                        "seed subscriber missed messages it cannot be told about"
                    );
                    None
                }
                hub::Event::Lag(lag) => {
                    tracing::debug!(?lag, "seed subscriber lagged; catching up");
                    None
                }
                // Never asked for by the seed service.
                hub::Event::Presence(_) => None,
                // The seed's messages carry only a payload: its subscribers see a pause, then
                // the messages, and nothing twice.
                hub::Event::Cluster { reachable } => {
                    tracing::debug!(
                        reachable,
                        "seed subscriber not told of the NATS cluster's reachability"
                    );
                    None
                }
            });
        // Seed clients have no cursors, so the generic "resume from your cursor" advice is
        // replaced.
        let stream = stream.map(|item| {
            item.map_err(|status| match status.code() {
                Code::Unavailable => Status::unavailable("topichub is shutting down; reconnect"),
                _ => status,
            })
        });
        Ok(Response::new(Box::pin(stream)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message as _;

    /// Every seed subscriber of a message writes the same bytes, encoded once: a second
    /// response for the message shares the first one's buffer instead of copying the payload.
    #[test]
    fn a_message_is_encoded_once_for_every_seed_subscriber() {
        let hub = Hub::new(Default::default());
        let payload = Bytes::from(vec![7u8; 4096]);
        let message = hub
            .publish(
                Topic::parse("t").unwrap(),
                payload.clone(),
                Default::default(),
            )
            .now()
            .expect("the in-memory hub publishes at once")
            .unwrap();
        let (a, b) = (
            SharedPayload::new(message.clone()),
            SharedPayload::new(message.clone()),
        );
        let (first, second) = (a.encode_to_vec(), b.encode_to_vec());
        assert_eq!(first, second);
        assert_eq!(
            a.encoded().as_ptr(),
            b.encoded().as_ptr(),
            "one shared encoding"
        );
        assert_eq!(a.encoded_len(), first.len());
        // What a seed client decodes: exactly the payload, as before.
        let decoded = seed::SubscribeResponse::decode(&first[..]).unwrap();
        assert_eq!(decoded.payload, payload);
        assert_eq!(SharedPayload::default().encode_to_vec(), Vec::<u8>::new());
    }
}

//! The seed's `proto.PubSubService`, served unchanged over the same hub.
//!
//! The seed API has no place for cursors or gap notices. Subscribers use the hub's default lag
//! policy, so a slow seed subscriber is caught up from retention like any other; gap and lag
//! notices, which it cannot receive, are logged.

use futures_util::StreamExt as _;
use tokio_util::sync::CancellationToken;
use tonic::{Code, Request, Response, Status};

use crate::grpc::BoxStream;
use crate::hub::{self, Hub, Start, SubscribeOptions};
use crate::limits::Limits;
use crate::metrics::Door;
use crate::proto::seed;
use crate::shutdown::StreamEnd;
use crate::topic::{Pattern, Topic};

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
impl seed::pub_sub_service_server::PubSubService for SeedService {
    async fn publish(
        &self,
        request: Request<seed::PublishRequest>,
    ) -> Result<Response<()>, Status> {
        let super::Caller { access, connection } = super::caller(&request)?;
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

    type SubscribeStream = BoxStream<seed::SubscribeResponse>;

    async fn subscribe(
        &self,
        request: Request<seed::SubscribeRequest>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        let super::Caller { access, connection } = super::caller(&request)?;
        let slot = connection.open_subscription()?;
        let patterns = vec![Pattern::parse(&request.into_inner().topic)?];
        access.check_subscribe(&patterns)?;
        let subscription = self.hub.subscribe(SubscribeOptions {
            patterns,
            start: Start::Latest,
            ..Default::default()
        })?;
        let end = StreamEnd::new(self.shutdown.clone(), access.expires_at());
        let metrics = (self.hub.metrics().clone(), Door::Seed);
        let stream =
            super::subscription_stream(subscription, end, slot, metrics, |event| match event {
                hub::Event::Message(m) => Some(seed::SubscribeResponse {
                    payload: m.payload.clone(),
                }),
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

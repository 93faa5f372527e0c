//! The gRPC health service follows shutdown: every service, and the server as a whole (""),
//! turns NOT_SERVING as soon as shutdown starts, so that load balancers stop routing here before
//! the drain ends.

mod support;

use support::{spawn_broker, within};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};

#[tokio::test]
async fn shutdown_marks_every_service_and_the_server_not_serving_before_the_drain_ends() {
    let broker = spawn_broker().await;
    let channel = broker.channel().await;
    let services = ["", "topichub.v1.PubSub", "proto.PubSubService"];
    let mut watches = Vec::new();
    for service in services {
        let mut watch = HealthClient::new(channel.clone())
            .watch(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner();
        let first: HealthCheckResponse = within("first status", watch.message())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(first.status(), ServingStatus::Serving, "{service:?}");
        watches.push(watch);
    }

    broker.shutdown.cancel();
    for (service, watch) in services.iter().zip(&mut watches) {
        let next = within(&format!("{service:?} not serving"), watch.message())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(next.status(), ServingStatus::NotServing, "{service:?}");
    }
    // The open watches hold their connection, so the drain has not ended: the status changed
    // while the server was still up.
    assert!(broker.is_running());
    drop(watches);
    drop(channel);
    broker.stop().await;
}

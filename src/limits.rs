//! Limits that keep one client from starving the others: connections, subscriptions per
//! connection, publish rate per client (topics per subscription and payload size live in the
//! hub's config). Every refusal is RESOURCE_EXHAUSTED / HTTP 429 and names the limit and the
//! option that sets it.

use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use governor::{DefaultKeyedRateLimiter, Quota};

use crate::auth::Access;
use crate::error::Error;
use crate::metrics::{ConnectionDoor, ConnectionGauge, Metrics};

/// The server-wide limits (see the `--max-*` and `--publish-rate` options).
#[derive(Clone, Debug)]
pub struct LimitsConfig {
    /// Open connections at most; further ones are answered with 429 / RESOURCE_EXHAUSTED.
    pub max_connections: usize,
    /// Live subscriptions one connection may hold (gRPC streams, Connect subscriptions).
    pub max_subscriptions_per_connection: usize,
    /// Messages per second one client may publish (0: no limit). A client is its certificate's
    /// subject with mTLS, else its token's subject when authentication is on, else its IP address.
    pub publish_rate: u32,
    /// Messages a client may publish in a burst above the rate.
    pub publish_burst: u32,
}

/// Limit state shared by every door; cheap to clone.
#[derive(Clone)]
pub struct Limits {
    inner: Arc<Inner>,
}

struct Inner {
    config: LimitsConfig,
    metrics: Metrics,
    connections: Arc<AtomicUsize>,
    publish: Option<DefaultKeyedRateLimiter<String>>,
}

impl Limits {
    /// Limits with this configuration, counting refusals in `metrics`.
    pub fn new(config: LimitsConfig, metrics: Metrics) -> Limits {
        let publish = NonZeroU32::new(config.publish_rate).map(|rate| {
            let burst = NonZeroU32::new(config.publish_burst).unwrap_or(rate);
            DefaultKeyedRateLimiter::keyed(Quota::per_second(rate).allow_burst(burst))
        });
        Limits {
            inner: Arc::new(Inner {
                config,
                metrics,
                connections: Arc::new(AtomicUsize::new(0)),
                publish,
            }),
        }
    }

    /// Admits a new connection, or says why not. The returned [`Connection`] goes into the
    /// extensions of each of its requests; the count drops when the last clone is gone.
    pub fn admit(&self, peer: SocketAddr) -> Result<Connection, Error> {
        let limit = self.inner.config.max_connections;
        let open = self.inner.connections.fetch_add(1, Ordering::AcqRel);
        let counted = Arc::new(ConnectionCount {
            open: self.inner.connections.clone(),
            door: OnceLock::new(),
        });
        if open >= limit {
            self.inner.metrics.limit_hit("max-connections");
            return Err(Error::LimitExceeded(format!(
                "the server has {open} open connections, its limit (--max-connections {limit}); try again later"
            )));
        }
        Ok(Connection {
            peer,
            certificate_subject: None,
            subscriptions: Arc::new(AtomicUsize::new(0)),
            max_subscriptions: self.inner.config.max_subscriptions_per_connection,
            metrics: self.inner.metrics.clone(),
            counted,
        })
    }

    /// Open connections.
    pub fn connections(&self) -> usize {
        self.inner.connections.load(Ordering::Acquire)
    }

    /// Takes one message from the client's publish allowance, or refuses.
    pub fn check_publish(&self, access: &Access, connection: &Connection) -> Result<(), Error> {
        if self.try_publish(access, connection) {
            Ok(())
        } else {
            Err(self.publish_refusal(&client_key(access, connection)))
        }
    }

    /// [`Limits::check_publish`] without recording a refusal in the metrics: for a caller that
    /// lets the application refuse (and count) the same publish.
    pub(crate) fn try_publish(&self, access: &Access, connection: &Connection) -> bool {
        self.inner
            .publish
            .as_ref()
            .is_none_or(|limiter| limiter.check_key(&client_key(access, connection)).is_ok())
    }

    /// Waits until the client may publish one more message (client-streaming publishes are slowed
    /// down, through HTTP/2 flow control, instead of failed).
    pub async fn pace_publish(&self, access: &Access, connection: &Connection) {
        if let Some(limiter) = &self.inner.publish {
            limiter
                .until_key_ready(&client_key(access, connection))
                .await;
        }
    }

    fn publish_refusal(&self, client: &str) -> Error {
        self.inner.metrics.limit_hit("publish-rate");
        let c = &self.inner.config;
        Error::LimitExceeded(format!(
            "{client} publishes faster than {} messages/s (burst {}; --publish-rate, --publish-burst); slow down and retry",
            c.publish_rate,
            c.publish_burst.max(c.publish_rate)
        ))
    }

    /// Forgets rate-limit state of clients that have been quiet (called periodically).
    pub fn forget_idle_clients(&self) {
        if let Some(limiter) = &self.inner.publish {
            limiter.retain_recent();
        }
    }
}

/// The rate-limit identity of a client: its certificate's subject (mTLS), else its token's
/// subject, else its IP address.
fn client_key(access: &Access, connection: &Connection) -> String {
    match (&connection.certificate_subject, access.subject()) {
        (Some(subject), _) => format!("certificate subject {subject:?}"),
        (None, Some(subject)) => format!("token subject {subject:?}"),
        (None, None) => format!("client {}", connection.peer.ip()),
    }
}

/// Decrements the open-connection count (and its door's) when the connection's last handle is
/// dropped.
struct ConnectionCount {
    open: Arc<AtomicUsize>,
    /// The door of the connection's first request, counted in the metrics while it is open
    /// (kept here rather than in an `Arc` of its own: one allocation per connection).
    door: OnceLock<ConnectionGauge>,
}

impl Drop for ConnectionCount {
    fn drop(&mut self) {
        self.open.fetch_sub(1, Ordering::AcqRel);
    }
}

/// One accepted connection: who it is and how many subscriptions it holds.
#[derive(Clone)]
pub struct Connection {
    /// The client's address.
    pub peer: SocketAddr,
    /// The subject of the client's certificate, over TLS with client certificates (mTLS).
    pub certificate_subject: Option<Arc<str>>,
    subscriptions: Arc<AtomicUsize>,
    max_subscriptions: usize,
    metrics: Metrics,
    counted: Arc<ConnectionCount>,
}

impl Connection {
    /// Records the door of the connection's first request; later requests change nothing.
    pub fn enter(&self, door: ConnectionDoor) {
        let counted = &self.counted.door;
        if counted.get().is_none() {
            let _ = counted.set(self.metrics.connection(door));
        }
    }

    /// Reserves a subscription slot on this connection; freed when the slot is dropped.
    pub fn open_subscription(&self) -> Result<SubscriptionSlot, Error> {
        let held = self.subscriptions.fetch_add(1, Ordering::AcqRel);
        let slot = SubscriptionSlot(self.subscriptions.clone());
        if held >= self.max_subscriptions {
            self.metrics.limit_hit("max-subscriptions-per-connection");
            return Err(Error::LimitExceeded(format!(
                "this connection already holds {held} subscriptions, its limit (--max-subscriptions-per-connection {}); close some or open another connection",
                self.max_subscriptions
            )));
        }
        Ok(slot)
    }
}

/// A subscription's place in its connection's count.
pub struct SubscriptionSlot(Arc<AtomicUsize>);

impl Drop for SubscriptionSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(max_connections: usize, max_subscriptions: usize, rate: u32) -> Limits {
        Limits::new(
            LimitsConfig {
                max_connections,
                max_subscriptions_per_connection: max_subscriptions,
                publish_rate: rate,
                publish_burst: rate,
            },
            Metrics::new(),
        )
    }

    #[test]
    fn connections_and_subscriptions_are_counted_and_released() {
        let limits = limits(2, 1, 0);
        let peer = "127.0.0.1:1".parse().unwrap();
        let a = limits.admit(peer).unwrap();
        let b = limits.admit(peer).unwrap();
        let refused = limits.admit(peer).err().unwrap();
        assert!(
            refused.to_string().contains("--max-connections 2"),
            "{refused}"
        );
        drop(b);
        assert_eq!(limits.connections(), 1);
        let slot = a.open_subscription().unwrap();
        assert!(
            a.open_subscription()
                .err()
                .unwrap()
                .to_string()
                .contains("--max-subscriptions-per-connection 1")
        );
        drop(slot);
        assert!(a.open_subscription().is_ok());
    }

    #[test]
    fn publish_rate_is_per_client() {
        let limits = limits(10, 10, 3);
        let open = Access::unrestricted();
        let one = limits.admit("10.0.0.1:1".parse().unwrap()).unwrap();
        let two = limits.admit("10.0.0.2:1".parse().unwrap()).unwrap();
        for _ in 0..3 {
            limits.check_publish(&open, &one).unwrap();
        }
        let refused = limits.check_publish(&open, &one).unwrap_err();
        assert!(
            refused
                .to_string()
                .contains("client 10.0.0.1 publishes faster than 3 messages/s"),
            "{refused}"
        );
        limits.check_publish(&open, &two).unwrap();
    }
}

//! Idempotent publish: the window of recent idempotency keys that turns a retried publish into
//! the original's answer instead of a second copy.
//!
//! A publisher that did not get an answer (a lost connection, a timeout, a node that died) cannot
//! tell whether its message was stored. With an idempotency key it simply retries: while the key
//! is in the window, the hub answers with the original message's cursor and says it was a
//! duplicate. The window is filled from every message the hub delivers, so messages recovered
//! from a durable log at start and messages applied from other nodes count too, and it also
//! knows the publishes still waiting for a durable log: a retry that arrives meanwhile waits for
//! the same outcome.
//!
//! A key names one message: a retry must name the same topic with the same payload (headers may
//! differ, e.g. a retry through another door). Reusing a key within the window for anything else
//! is refused with ALREADY_EXISTS (HTTP 409 Conflict), naming the original, rather than silently
//! answered with a cursor that is not the caller's message.
//!
//! Memory is bounded by count ([`Limits::keys`], oldest first out) and by age ([`Limits::age`]);
//! each key costs its text, its topic's handle and a few words.

use std::collections::{HashMap, VecDeque};
use std::hash::{Hash as _, Hasher as _};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::error::Error;
use crate::message::Message;
use crate::topic::Topic;

/// Longest idempotency key, in bytes.
pub const MAX_KEY_BYTES: usize = 128;

/// Default of `--idempotency-window`: how long a key is remembered. JetStream's default
/// de-duplication window is the same, so a key means the same on every deployment.
pub const DEFAULT_WINDOW: Duration = Duration::from_secs(120);

/// Default of `--idempotency-keys`: most keys remembered at once.
pub const DEFAULT_KEYS: usize = 100_000;

/// How much the window remembers.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// How long after its publish a key is remembered.
    pub age: Duration,
    /// Most keys remembered; the oldest is forgotten first.
    pub keys: usize,
}

/// Checks an idempotency key: 1 to [`MAX_KEY_BYTES`] bytes of visible ASCII (no spaces or
/// control characters), so that it travels unchanged in an HTTP header, a NATS header and JSON.
pub fn parse_key(key: &str) -> Result<Arc<str>, Error> {
    let invalid = |reason: &str| {
        Error::InvalidRequest(format!(
            "invalid idempotency key: {reason}; use 1-{MAX_KEY_BYTES} visible ASCII characters, e.g. a UUID"
        ))
    };
    if key.is_empty() {
        return Err(invalid("it is empty"));
    }
    if key.len() > MAX_KEY_BYTES {
        return Err(invalid(&format!("it is {} bytes long", key.len())));
    }
    if let Some(c) = key.chars().find(|c| !c.is_ascii_graphic()) {
        return Err(invalid(&format!("it contains {c:?}")));
    }
    Ok(Arc::from(key))
}

/// What identifies a key's message: its topic and a hash of its payload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Fingerprint {
    topic: Topic,
    payload: u64,
}

impl Fingerprint {
    /// The fingerprint of a message of `topic` with `payload`. The hash is fixed-keyed, and only
    /// compared within this process (the window is rebuilt from messages at start).
    pub(crate) fn of(topic: &Topic, payload: &[u8]) -> Fingerprint {
        let mut hasher = std::hash::DefaultHasher::new();
        payload.hash(&mut hasher);
        Fingerprint {
            topic: topic.clone(),
            payload: hasher.finish(),
        }
    }
}

/// A message the window knows under a key.
#[derive(Clone, Debug)]
pub(crate) struct Seen {
    fingerprint: Fingerprint,
    /// Its seq.
    pub(crate) seq: u64,
    /// When it was published; the key is forgotten [`Limits::age`] later.
    pub(crate) published_at: SystemTime,
}

/// What a key was used for, if the window knows it.
pub(crate) enum Earlier<T> {
    /// Not known: publish.
    New,
    /// A message delivered under it.
    Delivered(Seen),
    /// A publish under it still waiting for the log: its handle.
    InFlight(T),
}

/// Recent keys and the publishes in flight under a key. `T` is the hub's handle on a publish in
/// flight, which a retry waits on.
pub(crate) struct Window<T> {
    limits: Limits,
    seen: HashMap<Arc<str>, Seen>,
    /// Keys in delivery order, for forgetting the oldest first.
    order: VecDeque<Arc<str>>,
    in_flight: HashMap<Arc<str>, (Fingerprint, T)>,
}

impl<T> Default for Window<T> {
    fn default() -> Window<T> {
        Window::new(Limits {
            age: DEFAULT_WINDOW,
            keys: DEFAULT_KEYS,
        })
    }
}

impl<T> Window<T> {
    pub(crate) fn new(limits: Limits) -> Window<T> {
        Window {
            limits,
            seen: HashMap::new(),
            order: VecDeque::new(),
            in_flight: HashMap::new(),
        }
    }
}

impl<T: Clone> Window<T> {
    /// What `key` was used for, checked against the message now published under it; an error
    /// when the key named another message.
    pub(crate) fn lookup(
        &mut self,
        key: &str,
        fingerprint: &Fingerprint,
        now: SystemTime,
    ) -> Result<Earlier<T>, Error> {
        self.forget_old(now);
        let (earlier, seq) = if let Some(seen) = self.seen.get(key) {
            (&seen.fingerprint, Some(seen.seq))
        } else if let Some((earlier, _)) = self.in_flight.get(key) {
            (earlier, None)
        } else {
            return Ok(Earlier::New);
        };
        if earlier != fingerprint {
            let what = if earlier.topic != fingerprint.topic {
                format!("topic {}", earlier.topic)
            } else {
                format!("another payload on topic {}", earlier.topic)
            };
            let which = seq.map_or_else(
                || "a publish still in progress".to_owned(),
                |seq| format!("seq {seq}"),
            );
            return Err(Error::KeyReused {
                key: key.to_owned(),
                what,
                original: which,
            });
        }
        Ok(match (self.seen.get(key), self.in_flight.get(key)) {
            (Some(seen), _) => Earlier::Delivered(seen.clone()),
            (None, Some((_, handle))) => Earlier::InFlight(handle.clone()),
            (None, None) => unreachable!("found above"),
        })
    }

    /// Notes a publish under `key` handed to the log, until it is delivered or [`abandon`]ed.
    ///
    /// [`abandon`]: Window::abandon
    pub(crate) fn start(&mut self, key: Arc<str>, fingerprint: Fingerprint, handle: T) {
        self.in_flight.insert(key, (fingerprint, handle));
    }

    /// Forgets a publish in flight that failed, so that a retry publishes afresh.
    pub(crate) fn abandon(&mut self, key: &str) {
        self.in_flight.remove(key);
    }

    /// Forgets the publishes in flight for which `failed` holds (run when many accumulated).
    pub(crate) fn abandon_failed(&mut self, failed: impl Fn(&T) -> bool) {
        self.in_flight.retain(|_, (_, handle)| !failed(handle));
    }

    /// Publishes in flight under a key.
    pub(crate) fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// Remembers the key of `message`, just delivered (in seq order), if it has one. The first
    /// message delivered under a key stays its answer.
    ///
    /// `fingerprint` is the message's own when the caller already has it (a publish delivered
    /// at once); otherwise the payload is hashed here, under the hub's lock, from the delivered
    /// message itself (a message applied from another node may differ from a local publish under
    /// the same key): unkeyed messages cost nothing, a keyed one about 0.7 ms per MiB (SipHash).
    /// `now` is the hub's clock.
    pub(crate) fn record(
        &mut self,
        message: &Message,
        fingerprint: Option<Fingerprint>,
        now: SystemTime,
    ) {
        let Some(key) = &message.idempotency_key else {
            return;
        };
        self.in_flight.remove(&**key);
        if self.limits.keys == 0 || self.seen.contains_key(&**key) {
            return;
        }
        if self.expired(message.published_at, now) {
            // Recovered from a log, older than the window.
            return;
        }
        self.seen.insert(
            key.clone(),
            Seen {
                fingerprint: fingerprint
                    .unwrap_or_else(|| Fingerprint::of(&message.topic, &message.payload)),
                seq: message.seq,
                published_at: message.published_at,
            },
        );
        self.order.push_back(key.clone());
        while self.order.len() > self.limits.keys {
            self.pop_oldest();
        }
        self.forget_old(now);
    }

    fn expired(&self, published_at: SystemTime, now: SystemTime) -> bool {
        now.duration_since(published_at)
            .is_ok_and(|age| age >= self.limits.age)
    }

    fn forget_old(&mut self, now: SystemTime) {
        while let Some(key) = self.order.front() {
            let published_at = self.seen[key].published_at;
            if !self.expired(published_at, now) {
                break;
            }
            self.pop_oldest();
        }
    }

    fn pop_oldest(&mut self) {
        if let Some(key) = self.order.pop_front() {
            self.seen.remove(&key);
        }
    }

    /// Keys remembered.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.seen.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn message(key: &str, topic: &str, payload: &str, seq: u64, at: SystemTime) -> Message {
        Message::new(
            Topic::parse(topic).unwrap(),
            Bytes::from(payload.to_owned()),
            seq,
            Arc::from("e"),
            at,
            Default::default(),
        )
        .with_idempotency_key(Some(Arc::from(key)))
    }

    fn fingerprint(topic: &str, payload: &str) -> Fingerprint {
        Fingerprint::of(&Topic::parse(topic).unwrap(), payload.as_bytes())
    }

    fn window(keys: usize, age: Duration) -> Window<u32> {
        Window::new(Limits { age, keys })
    }

    #[test]
    fn a_delivered_key_answers_a_retry_and_refuses_another_message() {
        let mut window = window(10, Duration::from_secs(60));
        let now = SystemTime::now();
        window.record(&message("k", "t", "p", 7, now), None, now);
        let found = window.lookup("k", &fingerprint("t", "p"), now).unwrap();
        assert!(matches!(found, Earlier::Delivered(Seen { seq: 7, .. })));
        for (topic, payload, says) in [("u", "p", "topic t"), ("t", "q", "another payload")] {
            let Err(error) = window.lookup("k", &fingerprint(topic, payload), now) else {
                panic!("reuse refused");
            };
            assert!(error.to_string().contains(says), "{error}");
            assert!(error.to_string().contains("seq 7"), "{error}");
        }
        assert!(matches!(
            window.lookup("other", &fingerprint("t", "p"), now),
            Ok(Earlier::New)
        ));
    }

    #[test]
    fn a_key_in_flight_is_answered_by_its_handle_until_delivered_or_abandoned() {
        let mut window = window(10, Duration::from_secs(60));
        let now = SystemTime::now();
        window.start(Arc::from("k"), fingerprint("t", "p"), 42);
        assert!(matches!(
            window.lookup("k", &fingerprint("t", "p"), now),
            Ok(Earlier::InFlight(42))
        ));
        assert!(window.lookup("k", &fingerprint("t", "x"), now).is_err());
        window.abandon("k");
        assert!(matches!(
            window.lookup("k", &fingerprint("t", "p"), now),
            Ok(Earlier::New)
        ));
        window.start(Arc::from("k"), fingerprint("t", "p"), 43);
        window.record(&message("k", "t", "p", 1, now), None, now);
        assert_eq!(window.in_flight(), 0);
        assert!(matches!(
            window.lookup("k", &fingerprint("t", "p"), now),
            Ok(Earlier::Delivered(_))
        ));
    }

    #[test]
    fn the_window_is_bounded_by_count_and_age() {
        let mut window = window(3, Duration::from_secs(60));
        let now = SystemTime::now();
        for seq in 1..=10 {
            window.record(&message(&format!("k{seq}"), "t", "p", seq, now), None, now);
        }
        assert_eq!(window.len(), 3, "count bound");
        assert!(matches!(
            window.lookup("k7", &fingerprint("t", "p"), now),
            Ok(Earlier::New)
        ));
        assert!(matches!(
            window.lookup("k8", &fingerprint("t", "p"), now),
            Ok(Earlier::Delivered(_))
        ));
        let later = now + Duration::from_secs(60);
        assert!(matches!(
            window.lookup("k10", &fingerprint("t", "p"), later),
            Ok(Earlier::New)
        ));
        assert_eq!(window.len(), 0, "aged out");
        let old = now - Duration::from_secs(61);
        window.record(&message("recovered", "t", "p", 11, old), None, now);
        assert_eq!(
            window.len(),
            0,
            "a message older than the window is not remembered"
        );
    }

    #[test]
    fn the_first_message_under_a_key_stays_its_answer() {
        let mut window = window(10, Duration::from_secs(60));
        let now = SystemTime::now();
        window.record(&message("k", "t", "p", 1, now), None, now);
        window.record(&message("k", "t", "p", 2, now), None, now);
        assert!(matches!(
            window.lookup("k", &fingerprint("t", "p"), now),
            Ok(Earlier::Delivered(Seen { seq: 1, .. }))
        ));
    }

    /// Messages handed to a [`HeldLog`], with their publishers' acks.
    type Held = Vec<(Arc<Message>, crate::log::Ack)>;

    /// A log that holds every message until the test stores or fails what it holds.
    #[derive(Clone, Default)]
    struct HeldLog {
        held: Arc<std::sync::Mutex<Held>>,
        apply: Arc<std::sync::OnceLock<crate::log::Apply>>,
    }

    impl HeldLog {
        fn store(&self) {
            let held = std::mem::take(&mut *self.held.lock().unwrap());
            let batch: Vec<_> = held.iter().map(|(m, _)| m.clone()).collect();
            (self.apply.get().unwrap())(&batch);
            for (message, ack) in held {
                let _ = ack.send(Ok(message.into()));
            }
        }

        fn fail(&self) {
            for (_, ack) in std::mem::take(&mut *self.held.lock().unwrap()) {
                let _ = ack.send(Err(Error::Unavailable("the disk is full".into())));
            }
        }
    }

    impl crate::log::Log for HeldLog {
        fn start(&self, apply: crate::log::Apply) {
            let _ = self.apply.set(apply);
        }
        fn append(&self, message: Arc<Message>, ack: crate::log::Ack) {
            self.held.lock().unwrap().push((message, ack));
        }
        fn evict(&self, _: &Topic, _: u64) {}
        fn close(&self) -> tokio::sync::oneshot::Receiver<()> {
            tokio::sync::oneshot::channel().1
        }
        fn stats(&self) -> crate::log::LogStats {
            Default::default()
        }
    }

    fn held_hub() -> (crate::hub::Hub, HeldLog) {
        let log = HeldLog::default();
        let recovered = crate::log::Recovered {
            epoch: Arc::from("e"),
            head: 0,
            forgotten_through: 0,
            watermarks: Vec::new(),
            messages: Vec::new(),
        };
        let hub = crate::hub::Hub::with_log(
            Default::default(),
            crate::metrics::Metrics::new(),
            Box::new(log.clone()),
            recovered,
        );
        (hub, log)
    }

    fn publish(hub: &crate::hub::Hub, payload: &str) -> crate::hub::Publishing {
        hub.publish_once(
            Topic::parse("t").unwrap(),
            Bytes::from(payload.to_owned()),
            Default::default(),
            Some(Arc::from("k")),
        )
    }

    #[tokio::test]
    async fn a_retry_while_the_original_waits_for_the_log_shares_its_outcome() {
        let (hub, log) = held_hub();
        let original = publish(&hub, "p");
        let retry = publish(&hub, "p");
        assert!(!original.is_duplicate());
        assert!(retry.is_duplicate(), "joined the publish in flight");
        assert!(
            matches!(publish(&hub, "q").now(), Some(Err(Error::KeyReused { .. }))),
            "another payload under the key is refused at once"
        );
        log.store();
        let (original, retry) = (original.await.unwrap(), retry.await.unwrap());
        assert!(Arc::ptr_eq(&original, &retry), "the same message");
        assert_eq!(hub.head().seq, 1, "stored once");
        let later = publish(&hub, "p");
        assert!(later.is_duplicate());
        assert_eq!(later.await.unwrap().seq, 1);
    }

    #[tokio::test]
    async fn after_the_original_failed_a_retry_publishes_afresh() {
        let (hub, log) = held_hub();
        let original = publish(&hub, "p");
        let retry = publish(&hub, "p");
        log.fail();
        assert!(original.await.is_err());
        assert!(retry.await.is_err(), "the same outcome");
        let again = publish(&hub, "p");
        assert!(!again.is_duplicate(), "nothing was stored: publish again");
        log.store();
        assert_eq!(again.await.unwrap().seq, 2, "seq 1 was never stored");
        assert_eq!(hub.head().seq, 2);
    }

    #[test]
    fn keys_are_bounded_visible_ascii() {
        assert!(parse_key("3f2a-uuid_like:1").is_ok());
        assert!(parse_key(&"k".repeat(MAX_KEY_BYTES)).is_ok());
        for bad in ["", "a b", "tab\t", "é", &"k".repeat(MAX_KEY_BYTES + 1)] {
            let error = parse_key(bad).unwrap_err();
            assert!(
                error.to_string().contains("invalid idempotency key"),
                "{error}"
            );
        }
    }
}

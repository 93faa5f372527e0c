//! An accepted message, shared by the hub (fan-out, subscriber queues) and the log (history).

use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};
use std::time::SystemTime;

use bytes::Bytes;

use crate::cursor::Cursor;
use crate::topic::Topic;

/// Message headers, e.g. `content-type`. Sorted, so every transport shows them in one order.
pub type Headers = BTreeMap<String, String>;

/// An accepted message. Shared (`Arc`) between retention and every subscriber queue.
#[derive(Debug)]
pub struct Message {
    /// Topic it was published to.
    pub topic: Topic,
    /// Body, exactly as published.
    pub payload: Bytes,
    /// Position in the hub's history.
    pub seq: u64,
    /// History id of the hub that accepted it.
    pub epoch: Arc<str>,
    /// When the hub accepted it.
    pub published_at: SystemTime,
    /// Publisher-supplied headers.
    pub headers: Headers,
    /// The publisher's idempotency key, if it gave one: a retried publish with the same key is
    /// answered with this message's cursor instead of being stored twice.
    pub idempotency_key: Option<Arc<str>>,
    /// Each transport's encoding of this message, computed by the first subscriber that needs it
    /// and shared by all others ("encode once per transport, not once per subscriber").
    pub(crate) encoded: Encodings,
}

/// Lazily computed wire encodings of one message.
#[derive(Debug, Default)]
pub(crate) struct Encodings {
    /// Protobuf encoding of `topichub.v1.Message`.
    pub(crate) proto: OnceLock<Bytes>,
    /// A complete SSE `message` event.
    pub(crate) sse: OnceLock<Bytes>,
    /// Protobuf encoding of the seed's `proto.SubscribeResponse`.
    pub(crate) seed: OnceLock<Bytes>,
}

impl Message {
    /// A message with no encodings computed yet.
    pub(crate) fn new(
        topic: Topic,
        payload: Bytes,
        seq: u64,
        epoch: Arc<str>,
        published_at: SystemTime,
        headers: Headers,
    ) -> Message {
        Message {
            topic,
            payload,
            seq,
            epoch,
            published_at,
            headers,
            idempotency_key: None,
            encoded: Encodings::default(),
        }
    }

    /// The same message, carrying the publisher's idempotency key.
    pub fn with_idempotency_key(mut self, key: Option<Arc<str>>) -> Message {
        self.idempotency_key = key;
        self
    }

    /// The cursor pointing at this message.
    pub fn cursor(&self) -> Cursor {
        Cursor {
            epoch: self.epoch.to_string(),
            seq: self.seq,
        }
    }

    /// Bytes this message counts for against retention limits.
    pub(crate) fn retained_size(&self) -> usize {
        self.queued_size()
    }

    /// Bytes this message counts for against a subscriber queue's byte budget: payload, headers
    /// and topic, as for retention. The message is shared, so this is what one queue can keep
    /// alive after retention let go of it; the wire encodings cached on it once subscribers have
    /// taken it (SSE: up to 4/3 of a binary payload as base64; gRPC: about the payload) are not
    /// counted, as they are shared by every queue and subscriber holding the message.
    pub fn queued_size(&self) -> usize {
        self.payload.len()
            + self.topic.as_str().len()
            + self
                .headers
                .iter()
                .map(|(k, v)| k.len() + v.len())
                .sum::<usize>()
    }
}

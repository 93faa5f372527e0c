//! An accepted message, shared by the hub (fan-out, subscriber queues) and the log (history).

use std::sync::{Arc, OnceLock};
use std::time::SystemTime;

use bytes::Bytes;

use crate::cursor::Cursor;
use crate::topic::Topic;

/// Message headers, e.g. `content-type`: each name once, sorted by name, so every transport
/// shows them in one order.
///
/// A vector sorted by name, of exactly its length, rather than a `BTreeMap`: a message nearly
/// always has none or one, and a `BTreeMap<String, String>` takes a 544-byte node for its first
/// entry, which was a third of what a topic holding one small message cost the broker (bench
/// README, "`topics` at full size"). Lookups are a binary search.
#[derive(Clone, Default, PartialEq, Eq, Hash)]
pub struct Headers(Vec<(String, String)>);

impl Headers {
    /// No headers.
    pub fn new() -> Headers {
        Headers(Vec::new())
    }

    /// Sets `name` to `value`; returns the value it had. The strings are kept at their length.
    pub fn insert(&mut self, mut name: String, mut value: String) -> Option<String> {
        value.shrink_to_fit();
        match self.position(&name) {
            Ok(i) => Some(std::mem::replace(&mut self.0[i].1, value)),
            Err(i) => {
                name.shrink_to_fit();
                self.0.reserve_exact(1);
                self.0.insert(i, (name, value));
                None
            }
        }
    }

    /// The value of `name`.
    pub fn get(&self, name: &str) -> Option<&String> {
        self.position(name).ok().map(|i| &self.0[i].1)
    }

    /// Whether `name` is set.
    pub fn contains_key(&self, name: &str) -> bool {
        self.position(name).is_ok()
    }

    /// The names, in order.
    pub fn keys(&self) -> impl Iterator<Item = &String> {
        self.0.iter().map(|(name, _)| name)
    }

    /// (name, value) pairs, in name order.
    pub fn iter(&self) -> Iter<'_> {
        Iter(self.0.iter())
    }

    /// How many headers.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn position(&self, name: &str) -> Result<usize, usize> {
        self.0.binary_search_by(|(have, _)| have.as_str().cmp(name))
    }
}

impl std::fmt::Debug for Headers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

impl std::ops::Index<&str> for Headers {
    type Output = String;

    fn index(&self, name: &str) -> &String {
        self.get(name).expect("no such header")
    }
}

/// Later pairs win over earlier ones of the same name, as inserting them one by one would.
impl FromIterator<(String, String)> for Headers {
    fn from_iter<I: IntoIterator<Item = (String, String)>>(pairs: I) -> Headers {
        let mut headers = Headers::new();
        for (name, value) in pairs {
            headers.insert(name, value);
        }
        headers
    }
}

impl IntoIterator for Headers {
    type Item = (String, String);
    type IntoIter = std::vec::IntoIter<(String, String)>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.into_iter()
    }
}

impl<'a> IntoIterator for &'a Headers {
    type Item = (&'a String, &'a String);
    type IntoIter = Iter<'a>;

    fn into_iter(self) -> Iter<'a> {
        self.iter()
    }
}

/// The (name, value) pairs of [`Headers`], in name order.
pub struct Iter<'a>(std::slice::Iter<'a, (String, String)>);

impl<'a> Iterator for Iter<'a> {
    type Item = (&'a String, &'a String);

    fn next(&mut self) -> Option<Self::Item> {
        self.0.next().map(|(name, value)| (name, value))
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        self.0.size_hint()
    }
}

impl ExactSizeIterator for Iter<'_> {}

/// A JSON object, as a `BTreeMap<String, String>` was.
impl serde::Serialize for Headers {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_map(self.iter())
    }
}

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

/// Lazily computed wire encodings of one message, allocated when the first is: a message that
/// no subscriber takes (most retained ones, on a broker with many idle topics) carries one
/// pointer for them instead of three empty slots (104 bytes more a message).
#[derive(Debug, Default)]
pub(crate) struct Encodings(OnceLock<Box<Encoded>>);

#[derive(Debug, Default)]
struct Encoded {
    proto: OnceLock<Bytes>,
    sse: OnceLock<Bytes>,
    seed: OnceLock<Bytes>,
}

impl Encodings {
    fn slots(&self) -> &Encoded {
        self.0.get_or_init(Box::default)
    }

    /// Protobuf encoding of `topichub.v1.Message`.
    pub(crate) fn proto(&self) -> &OnceLock<Bytes> {
        &self.slots().proto
    }

    /// A complete SSE `message` event.
    pub(crate) fn sse(&self) -> &OnceLock<Bytes> {
        &self.slots().sse
    }

    /// Protobuf encoding of the seed's `proto.SubscribeResponse`.
    pub(crate) fn seed(&self) -> &OnceLock<Bytes> {
        &self.slots().seed
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Headers behave as the sorted map they replaced: one value a name (the last given), name
    /// order whatever the insertion order, a JSON object.
    #[test]
    fn headers_keep_one_value_a_name_in_name_order() {
        let mut headers = Headers::new();
        assert_eq!(headers.insert("z".into(), "1".into()), None);
        assert_eq!(headers.insert("a".into(), "2".into()), None);
        assert_eq!(headers.insert("m".into(), "3".into()), None);
        assert_eq!(headers.insert("a".into(), "4".into()), Some("2".into()));
        let pairs: Vec<(&String, &String)> = headers.iter().collect();
        assert_eq!(
            pairs,
            [
                (&"a".to_string(), &"4".to_string()),
                (&"m".to_string(), &"3".to_string()),
                (&"z".to_string(), &"1".to_string()),
            ]
        );
        assert_eq!(headers.len(), 3);
        assert_eq!(headers.get("m").map(String::as_str), Some("3"));
        assert!(headers.contains_key("z") && !headers.contains_key("b"));
        assert_eq!(
            serde_json::to_string(&headers).unwrap(),
            r#"{"a":"4","m":"3","z":"1"}"#
        );
        let collected: Headers = [("b", "1"), ("a", "2"), ("b", "3")]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        assert_eq!(
            collected.into_iter().collect::<Vec<_>>(),
            [("a".into(), "2".into()), ("b".into(), "3".into())]
        );
    }
}

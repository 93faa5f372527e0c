//! Protobuf shapes for the server side of `topichub.v1`, and conversions from hub types.
//!
//! `topichub.v1.Message` is bound (in `build.rs`) to [`SharedMessage`], a [`Preencoded`]: it
//! writes the message's encoding computed once and cached on the hub message, so a fan-out to N
//! gRPC subscribers encodes once and copies N times. The seed service's response is another
//! [`Preencoded`] (see `seed.rs`).

use std::marker::PhantomData;
use std::sync::{Arc, OnceLock};

use bytes::{Buf, BufMut, Bytes};
use prost::encoding::{DecodeContext, WireType};

use crate::hub;
use crate::proto;

/// Server-side `topichub.v1` types (generated; `Message` is [`SharedMessage`]).
pub mod v1 {
    #![allow(missing_docs, clippy::all)]
    include!(concat!(env!("OUT_DIR"), "/server/topichub.v1.rs"));
}

/// Which of a hub message's cached encodings a [`Preencoded`] writes.
pub trait Encoding: 'static {
    /// Where the encoding is cached on the message.
    fn cache(message: &hub::Message) -> &OnceLock<Bytes>;
    /// Encodes the message; called once per hub message.
    fn encode(message: &hub::Message) -> Bytes;
}

/// A hub message as a protobuf message whose bytes are encoded once per hub message, cached on
/// it, and copied into each subscriber's stream: a fan-out to N subscribers encodes once.
pub struct Preencoded<E>(Option<Arc<hub::Message>>, PhantomData<fn() -> E>);

impl<E> Preencoded<E> {
    /// The encoding of `message`.
    pub fn new(message: Arc<hub::Message>) -> Self {
        Preencoded(Some(message), PhantomData)
    }

    /// The hub message (none in a decoded default), for doors that write it in another form.
    pub fn message(&self) -> Option<&hub::Message> {
        self.0.as_deref()
    }
}

impl<E: Encoding> Preencoded<E> {
    pub(crate) fn encoded(&self) -> &[u8] {
        match &self.0 {
            Some(message) => E::cache(message).get_or_init(|| E::encode(message)),
            None => &[],
        }
    }
}

impl<E> Clone for Preencoded<E> {
    fn clone(&self) -> Self {
        Preencoded(self.0.clone(), PhantomData)
    }
}

impl<E> Default for Preencoded<E> {
    fn default() -> Self {
        Preencoded(None, PhantomData)
    }
}

impl<E> std::fmt::Debug for Preencoded<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Preencoded").field(&self.0).finish()
    }
}

impl<E> PartialEq for Preencoded<E> {
    fn eq(&self, other: &Self) -> bool {
        match (&self.0, &other.0) {
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            (None, None) => true,
            _ => false,
        }
    }
}

impl<E: Encoding> prost::Message for Preencoded<E> {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        buf.put_slice(self.encoded());
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), prost::DecodeError> {
        // The server only sends these; should one ever arrive, its fields are skipped.
        prost::encoding::skip_field(wire_type, tag, buf, ctx)
    }

    fn encoded_len(&self) -> usize {
        self.encoded().len()
    }

    fn clear(&mut self) {
        self.0 = None;
    }
}

/// The `topichub.v1.Message` encoding.
pub enum V1Message {}

impl Encoding for V1Message {
    fn cache(message: &hub::Message) -> &OnceLock<Bytes> {
        message.encoded.proto()
    }

    fn encode(message: &hub::Message) -> Bytes {
        use prost::Message as _;
        proto::v1::Message {
            topic: message.topic.to_string(),
            payload: message.payload.clone(),
            cursor: Some(proto::v1::Cursor {
                epoch: message.epoch.to_string(),
                seq: message.seq,
            }),
            published_at: Some(message.published_at.into()),
            headers: message
                .headers
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        }
        .encode_to_vec()
        .into()
    }
}

/// A hub message in its `topichub.v1.Message` encoding.
pub type SharedMessage = Preencoded<V1Message>;

/// A hub cursor in protobuf form.
pub fn cursor(cursor: &crate::cursor::Cursor) -> v1::Cursor {
    v1::Cursor {
        epoch: cursor.epoch.clone(),
        seq: cursor.seq,
    }
}

/// A hub gap in protobuf form.
pub fn gap(gap: hub::Gap) -> v1::Gap {
    v1::Gap {
        from_seq: gap.from_seq,
        to_seq: gap.to_seq.unwrap_or(0),
        reason: gap.reason.as_str().to_owned(),
        epoch: gap.epoch,
    }
}

/// A hub lag notice in protobuf form.
pub fn lag(lag: hub::Lag) -> v1::Lag {
    v1::Lag {
        from_seq: lag.from_seq,
        to_seq: lag.to_seq,
    }
}

/// A topic's state in protobuf form.
pub fn topic_info(topic: hub::TopicInfo) -> v1::TopicInfo {
    v1::TopicInfo {
        name: topic.name,
        retained_messages: topic.retained_messages,
        retained_bytes: topic.retained_bytes,
        subscribers: topic.subscribers,
        last_seq: topic.last_seq,
    }
}

/// A presence event in protobuf form.
pub fn presence_event(changes: Vec<hub::PresenceChange>) -> v1::PresenceEvent {
    v1::PresenceEvent {
        topics: changes
            .into_iter()
            .map(|c| v1::PresenceChange {
                topic: c.topic,
                subscribers: c.subscribers,
                joined: c.joined,
                left: c.left,
            })
            .collect(),
    }
}

/// The `deleted` event of a subscription whose topic was deleted.
pub fn topic_deleted(topic: String) -> v1::TopicDeleted {
    let message = crate::error::Error::TopicDeleted(topic.clone()).to_string();
    v1::TopicDeleted { topic, message }
}

/// A presence page in protobuf form.
pub fn presence_page(page: hub::PresencePage) -> v1::PresenceResponse {
    v1::PresenceResponse {
        subscribers: page.subscribers,
        members: page
            .members
            .into_iter()
            .map(|m| {
                let (client, door) = holder(m.holder.as_ref());
                v1::Subscriber {
                    client,
                    door,
                    since: Some(m.since.into()),
                }
            })
            .collect(),
        next: page.next.unwrap_or(0),
        nodes: page.cluster.map_or(0, |c| c.nodes),
        partial: page.cluster.is_some_and(|c| c.partial),
    }
}

/// What a subscriber is told when this node loses or regains the NATS cluster (cluster mode).
pub fn cluster_status(reachable: bool) -> v1::ClusterStatus {
    let message = if reachable {
        "this node reaches the NATS cluster again; delivery continues where it paused, with nothing missed"
    } else {
        "this node cannot reach the NATS cluster; delivery is paused (nothing is lost: it continues where it paused once the cluster is back, or resume from your last cursor on another node)"
    };
    v1::ClusterStatus {
        reachable,
        message: message.into(),
    }
}

/// A subscription's holder as (client, door) names; empty when it was opened without one.
pub fn holder(holder: Option<&hub::Holder>) -> (String, String) {
    holder.map_or_else(Default::default, |h| {
        (h.client.to_string(), h.door.name().to_owned())
    })
}

/// A subscription event as a `Subscribe` stream item.
pub fn subscribe_event(event: hub::Event) -> v1::SubscribeResponse {
    use v1::subscribe_response::Event;
    let event = match event {
        hub::Event::Message(m) => Event::Message(SharedMessage::new(m)),
        hub::Event::Gap(g) => Event::Gap(gap(g)),
        hub::Event::Lag(l) => Event::Lag(lag(l)),
        hub::Event::Presence(p) => Event::Presence(presence_event(p)),
        hub::Event::Cluster { reachable } => Event::Cluster(cluster_status(reachable)),
    };
    v1::SubscribeResponse { event: Some(event) }
}

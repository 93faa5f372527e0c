//! Protobuf shapes for the server side of `topichub.v1`, and conversions from hub types.
//!
//! `topichub.v1.Message` is bound (in `build.rs`) to [`SharedMessage`]: it writes the message's
//! encoding computed once and cached on the hub message, so a fan-out to N gRPC subscribers
//! encodes once and copies N times.

use std::sync::Arc;

use bytes::{Buf, BufMut, Bytes};
use prost::encoding::{DecodeContext, WireType};

use crate::hub;
use crate::proto;

/// Server-side `topichub.v1` types (generated; `Message` is [`SharedMessage`]).
pub mod v1 {
    #![allow(missing_docs, clippy::all)]
    include!(concat!(env!("OUT_DIR"), "/server/topichub.v1.rs"));
}

/// A hub message in its `topichub.v1.Message` encoding.
#[derive(Clone, Debug, Default)]
pub struct SharedMessage(pub Option<Arc<hub::Message>>);

impl PartialEq for SharedMessage {
    fn eq(&self, other: &Self) -> bool {
        match (&self.0, &other.0) {
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            (None, None) => true,
            _ => false,
        }
    }
}

impl SharedMessage {
    fn encoded(&self) -> &[u8] {
        match &self.0 {
            Some(message) => message.encoded.proto.get_or_init(|| encode(message)),
            None => &[],
        }
    }
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

impl prost::Message for SharedMessage {
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
        // The server only sends messages; should one ever arrive, its fields are skipped.
        prost::encoding::skip_field(wire_type, tag, buf, ctx)
    }

    fn encoded_len(&self) -> usize {
        self.encoded().len()
    }

    fn clear(&mut self) {
        self.0 = None;
    }
}

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

/// A subscription event as a `Subscribe` stream item.
pub fn subscribe_event(event: hub::Event) -> v1::SubscribeResponse {
    use v1::subscribe_response::Event;
    let event = match event {
        hub::Event::Message(m) => Event::Message(SharedMessage(Some(m))),
        hub::Event::Gap(g) => Event::Gap(gap(g)),
        hub::Event::Lag(l) => Event::Lag(lag(l)),
    };
    v1::SubscribeResponse { event: Some(event) }
}

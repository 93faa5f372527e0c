//! The protobuf codec of our gRPC services: prost's, except that a request that does not decode
//! is answered with INVALID_ARGUMENT instead of INTERNAL, and responses start in a small buffer.
//!
//! The gRPC library convention reports unparseable requests as INTERNAL, which tells a caller
//! the server broke; here the caller sent bad bytes and can fix them, so it is told so.

use prost::Message;
use tonic::Status;
use tonic::codec::{BufferSettings, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

/// A [`ProstCodec`] whose decode errors are INVALID_ARGUMENT.
#[derive(Debug)]
pub struct Codec<T, U>(ProstCodec<T, U>);

impl<T, U> Default for Codec<T, U> {
    fn default() -> Self {
        Codec(ProstCodec::default())
    }
}

impl<T, U> tonic::codec::Codec for Codec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ResponseEncoder<T>;
    type Decoder = RequestDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ResponseEncoder(self.0.encoder())
    }

    fn decoder(&mut self) -> Self::Decoder {
        RequestDecoder(self.0.decoder())
    }
}

/// Initial encode buffer of a response (tonic's default: 8 KiB). Every live `Subscribe` stream
/// holds one, so it is sized for a typical event rather than for the largest; bigger messages
/// grow it as needed.
const RESPONSE_BUFFER: usize = 1024;
/// tonic's default: a stream hands over what it has encoded once it holds this much.
const YIELD_THRESHOLD: usize = 32 * 1024;

/// Encodes responses with prost, in a small initial buffer.
#[derive(Debug)]
pub struct ResponseEncoder<T>(ProstEncoder<T>);

impl<T: Message> Encoder for ResponseEncoder<T> {
    type Item = T;
    type Error = Status;

    fn encode(&mut self, item: T, buf: &mut EncodeBuf<'_>) -> Result<(), Status> {
        self.0.encode(item, buf)
    }

    fn buffer_settings(&self) -> BufferSettings {
        BufferSettings::new(RESPONSE_BUFFER, YIELD_THRESHOLD)
    }
}

/// Decodes requests; malformed bytes are the caller's error.
#[derive(Debug)]
pub struct RequestDecoder<U>(ProstDecoder<U>);

impl<U: Message + Default> Decoder for RequestDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        self.0.decode(buf).map_err(|status| {
            Status::invalid_argument(format!(
                "malformed protobuf request ({}); send a message of the method's request type",
                status.message()
            ))
        })
    }

    fn buffer_settings(&self) -> BufferSettings {
        self.0.buffer_settings()
    }
}

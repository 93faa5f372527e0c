//! Arbitrary bytes as every gRPC request message the broker accepts, decoded three ways:
//!
//! 1. with prost, as the public client types (`topichub::proto::v1`, `topichub::proto::seed`):
//!    never panics, and a decoded message re-encodes to bytes that decode to an equal message;
//! 2. as the server-side types (`topichub::grpc::wire::v1`, generated separately): they accept
//!    exactly what the client types accept, and mean the same;
//! 3. through the server's own decoder, `topichub::grpc::codec::Codec`, driven by
//!    `tonic::codec::Streaming::new_request` (tonic's `DecodeBuf` cannot be built outside tonic,
//!    but `Streaming` builds one from an HTTP body): the input framed as one gRPC message decodes
//!    to the same message as with prost, or fails with INVALID_ARGUMENT; the input taken as a
//!    raw gRPC request body (frame headers and all) never panics.
#![no_main]

use std::fmt::Debug;
use std::pin::pin;
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use prost::Message;
use tonic::codec::{Codec as _, Streaming};
use tonic::{Code, Status};
use topichub::grpc::codec::Codec;
use topichub::grpc::wire::v1 as server;
use topichub::proto::{seed, v1};

fuzz_target!(|data: &[u8]| {
    both::<v1::PublishRequest, server::PublishRequest>(data);
    both::<v1::SubscribeRequest, server::SubscribeRequest>(data);
    both::<v1::ConnectRequest, server::ConnectRequest>(data);
    both::<v1::UnsubscribeRequest, server::UnsubscribeRequest>(data);
    both::<v1::ListTopicsRequest, server::ListTopicsRequest>(data);
    served::<seed::PublishRequest>(data);
    served::<seed::SubscribeRequest>(data);
});

/// A `topichub.v1` request: the client type and the server type agree; the server type is served.
fn both<C, S>(data: &[u8])
where
    C: Message + Default + PartialEq + Debug,
    S: Message + Default + PartialEq + Debug + Send + 'static,
{
    let client = round_trip::<C>(data);
    let served = served::<S>(data);
    assert_eq!(
        client.is_some(),
        served.is_some(),
        "client and server types disagree"
    );
    if let (Some(client), Some(served)) = (client, served) {
        let again = C::decode(&served.encode_to_vec()[..]).expect("server encoding decodes");
        assert_eq!(
            again, client,
            "client and server types read different messages"
        );
    }
}

/// Decodes with prost; a decoded message survives re-encoding.
fn round_trip<M: Message + Default + PartialEq + Debug>(data: &[u8]) -> Option<M> {
    let message = M::decode(data).ok()?;
    let encoded = message.encode_to_vec();
    let again = M::decode(&encoded[..]).expect("a re-encoded message decodes");
    assert_eq!(again, message, "re-encoding changed the message");
    Some(message)
}

/// Decodes with prost and through the server's codec, which must agree; returns the message.
fn served<M: Message + Default + PartialEq + Debug + Send + 'static>(data: &[u8]) -> Option<M> {
    let expected = round_trip::<M>(data);

    let mut framed = Vec::with_capacity(data.len() + 5);
    framed.push(0); // not compressed
    framed.extend_from_slice(&u32::try_from(data.len()).unwrap().to_be_bytes());
    framed.extend_from_slice(data);
    let mut stream = request_stream::<M>(framed);
    match (ready(stream.message()), &expected) {
        (Ok(Some(decoded)), Some(expected)) => {
            assert_eq!(&decoded, expected);
            let next = ready(stream.message());
            assert!(matches!(next, Ok(None)), "one frame, then {next:?}");
        }
        (Err(status), None) => assert_eq!(status.code(), Code::InvalidArgument, "{status:?}"),
        (got, expected) => panic!("server codec gave {got:?}, prost {expected:?}"),
    }

    // The input as a whole request body: any number of frames, any headers.
    let mut stream = request_stream::<M>(data.to_vec());
    for _ in 0..=data.len() {
        match ready(stream.message()) {
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => break,
        }
    }
    expected
}

fn request_stream<M: Message + Default + Send + 'static>(body: Vec<u8>) -> Streaming<M> {
    let body = http_body_util::Full::new(Bytes::from(body));
    Streaming::new_request(Codec::<M, M>::default().decoder(), body, None, None)
}

/// Polls once: an in-memory body never makes the decoder wait.
fn ready<T>(future: impl Future<Output = Result<Option<T>, Status>>) -> Result<Option<T>, Status> {
    match pin!(future).poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(result) => result,
        Poll::Pending => panic!("decoding an in-memory body waited"),
    }
}

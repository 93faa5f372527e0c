//! The floors of unary gRPC `Publish`: servers that answer `topichub.v1.PubSub/Publish` as the
//! broker does on the wire and do no broker work, so that what a publish costs the broker can
//! be split into what HTTP/2 itself costs (hyper and h2), what tonic adds over it, and what is
//! the broker's own.
//!
//! - `--layer h2`: a hyper HTTP/2 connection and a `service_fn` that reads the request body to
//!   its end and answers a fixed, framed `PublishResponse` with `grpc-status: 0` in trailers.
//! - `--layer tonic`: the same connection serving tonic's unary path (`tonic::server::Grpc`
//!   with the prost codec: the request decoded, the reply encoded, as generated servers do) for
//!   `Publish` alone; every other path answers UNIMPLEMENTED.
//!
//! The h2 floor also holds `Subscribe` streams open (one response frame, then nothing, as a
//! subscription nobody publishes to) and tells how many it holds at `GET /streams`: the storm
//! scenario on it shows what a mass subscribe and disconnect cost hyper and h2 alone.
//!
//! Both use hyper's HTTP/2 server with its defaults (the broker changes only keep-alive and the
//! stream limit, neither of which a unary call meets) and the broker's runtime flavour.

use std::convert::Infallible;
use std::future::{Ready, ready};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body_util::{BodyExt, Either, Full};
use hyper::body::{Frame, Incoming};
use hyper::server::conn::http2;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpListener;
use topichub::proto::v1::{Cursor, PublishRequest, PublishResponse, SubscribeResponse};

use crate::clients::grpc_frame;

/// The path of the one method the floors serve, as the `grpc` target's publisher calls it.
const PUBLISH: &str = "/topichub.v1.PubSub/Publish";
/// The streams the h2 floor holds open.
const SUBSCRIBE: &str = "/topichub.v1.PubSub/Subscribe";
/// Where the h2 floor tells how many `Subscribe` streams it holds.
pub const STREAMS: &str = "/streams";

/// `Subscribe` streams one connection may hold: as many as the storm puts on one.
const STREAMS_PER_CONNECTION: u32 = 1 << 16;

/// `Subscribe` answers the h2 floor holds now.
static HELD: AtomicUsize = AtomicUsize::new(0);

/// Which layers answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Layer {
    /// hyper's HTTP/2 server and a fixed gRPC response.
    H2,
    /// tonic's unary path over the same hyper server.
    Tonic,
}

impl Layer {
    pub fn name(self) -> &'static str {
        match self {
            Layer::H2 => "h2",
            Layer::Tonic => "tonic",
        }
    }
}

/// The reply every publish gets: as long as the broker's (an epoch and a seq).
fn reply() -> PublishResponse {
    PublishResponse {
        cursor: Some(Cursor {
            epoch: "019ad3f2c6b87e4f9a1d2c3b4a596877".into(),
            seq: 1_234_567,
        }),
        duplicate: false,
    }
}

/// Serves `layer` at `listen` until killed, on the runtime the broker would choose.
pub fn serve(listen: SocketAddr, layer: Layer) -> anyhow::Result<()> {
    topichub::runtime::build()?.block_on(accept(listen, layer))
}

async fn accept(listen: SocketAddr, layer: Layer) -> anyhow::Result<()> {
    let listener = TcpListener::bind(listen).await?;
    let mut builder = http2::Builder::new(TokioExecutor::new());
    // As the broker, room for many `Subscribe` streams per connection (hyper's default is
    // 200); a unary call never meets the limit.
    builder
        .timer(TokioTimer::new())
        .max_concurrent_streams(STREAMS_PER_CONNECTION);
    let framed = grpc_frame(&reply());
    loop {
        let (socket, _) = listener.accept().await?;
        socket.set_nodelay(true)?;
        let io = TokioIo::new(socket);
        let builder = builder.clone();
        let framed = framed.clone();
        tokio::spawn(async move {
            let served = match layer {
                Layer::H2 => {
                    builder
                        .serve_connection(
                            io,
                            service_fn(move |request| fixed(request, framed.clone())),
                        )
                        .await
                }
                Layer::Tonic => {
                    builder
                        .serve_connection(io, service_fn(tonic_publish))
                        .await
                }
            };
            if let Err(e) = served {
                eprintln!("floor-server: {e}");
            }
        });
    }
}

type Reply = http::Response<
    Either<
        http_body_util::combinators::WithTrailers<
            Full<Bytes>,
            Ready<Option<Result<http::HeaderMap, Infallible>>>,
        >,
        Held,
    >,
>;

/// A `Subscribe` answer held open: its first response frame, then nothing until the client
/// goes away; counted in [`HELD`] while it lives.
pub struct Held(Option<Bytes>);

impl Held {
    fn new() -> Held {
        HELD.fetch_add(1, Relaxed);
        Held(Some(grpc_frame(&SubscribeResponse::default())))
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        HELD.fetch_sub(1, Relaxed);
    }
}

impl hyper::body::Body for Held {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match self.0.take() {
            Some(first) => Poll::Ready(Some(Ok(Frame::data(first)))),
            // Never woken by the body: the stream ends when its connection does.
            None => Poll::Pending,
        }
    }
}

/// The h2 floor: the body read to its end, `framed` and `grpc-status: 0` sent back; a
/// `Subscribe` held open; the count of those at [`STREAMS`].
async fn fixed(request: http::Request<Incoming>, framed: Bytes) -> Result<Reply, hyper::Error> {
    let path = request.uri().path();
    if path == SUBSCRIBE {
        request.into_body().collect().await?;
        return Ok(http::Response::builder()
            .header("content-type", "application/grpc")
            .body(Either::Right(Held::new()))
            .expect("a valid response"));
    }
    if path == STREAMS {
        let held = HELD.load(Relaxed).to_string();
        return Ok(http::Response::new(Either::Left(
            Full::new(Bytes::from(held)).with_trailers(ready(None)),
        )));
    }
    let ok = path == PUBLISH;
    request.into_body().collect().await?;
    let mut trailers = http::HeaderMap::new();
    let (body, status) = if ok {
        (framed, "0")
    } else {
        (Bytes::new(), "12") // UNIMPLEMENTED
    };
    trailers.insert("grpc-status", http::HeaderValue::from_static(status));
    Ok(http::Response::builder()
        .header("content-type", "application/grpc")
        .body(Either::Left(
            Full::new(body).with_trailers(ready(Some(Ok(trailers)))),
        ))
        .expect("a valid response"))
}

/// The tonic floor: `Publish` through tonic's unary server path, answering [`reply`].
async fn tonic_publish(
    request: http::Request<Incoming>,
) -> Result<http::Response<tonic::body::Body>, Infallible> {
    if request.uri().path() != PUBLISH {
        return Ok(tonic::Status::unimplemented("").into_http());
    }
    let mut grpc = tonic::server::Grpc::new(tonic_prost::ProstCodec::default());
    Ok(grpc.unary(Publish, request).await)
}

/// `Publish` answering a constant, as a generated server's handler would be called.
struct Publish;

impl tonic::server::UnaryService<PublishRequest> for Publish {
    type Response = PublishResponse;
    type Future = Ready<Result<tonic::Response<PublishResponse>, tonic::Status>>;

    fn call(&mut self, _request: tonic::Request<PublishRequest>) -> Self::Future {
        ready(Ok(tonic::Response::new(reply())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Both floors answer the `grpc` target's client as the broker would: a decodable reply.
    #[tokio::test]
    async fn both_layers_answer_the_grpc_publisher() {
        for layer in [Layer::H2, Layer::Tonic] {
            let port = crate::servers::free_port().unwrap();
            let addr: SocketAddr = ([127, 0, 0, 1], port).into();
            let server = tokio::spawn(accept(addr, layer));
            let channel = loop {
                match crate::clients::endpoint(addr).unwrap().connect().await {
                    Ok(channel) => break channel,
                    Err(_) => tokio::time::sleep(std::time::Duration::from_millis(10)).await,
                }
            };
            let mut client = topichub::proto::v1::pub_sub_client::PubSubClient::new(channel);
            let request = PublishRequest {
                topic: "bench.floor".into(),
                payload: Bytes::from_static(b"x"),
                ..Default::default()
            };
            let response = client.publish(request.clone()).await.unwrap();
            assert_eq!(response.into_inner(), reply(), "{layer:?}");
            let other = client
                .unsubscribe(topichub::proto::v1::UnsubscribeRequest::default())
                .await
                .unwrap_err();
            assert_eq!(other.code(), tonic::Code::Unimplemented, "{layer:?}");
            server.abort();
        }
    }

    /// The h2 floor holds a `Subscribe` open after its first frame, counts it, and lets it go
    /// with its connection.
    #[tokio::test]
    async fn the_h2_floor_holds_subscribe_streams_until_their_connection_closes() {
        let port = crate::servers::free_port().unwrap();
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let server = tokio::spawn(accept(addr, Layer::H2));
        let stream = loop {
            match tokio::net::TcpStream::connect(addr).await {
                Ok(stream) => break stream,
                Err(_) => tokio::time::sleep(std::time::Duration::from_millis(10)).await,
            }
        };
        let (sender, connection) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
                .await
                .unwrap();
        let connection = tokio::spawn(connection);
        let request = grpc_frame(&topichub::proto::v1::SubscribeRequest::default());
        let uri = format!("http://{addr}{SUBSCRIBE}");
        let mut bodies = Vec::new();
        for _ in 0..3 {
            let body = crate::clients::subscribe_stream(sender.clone(), &uri, request.clone());
            bodies.push(body.await.unwrap());
        }
        let mut streams = crate::scale::FloorStreams::connect(addr).await.unwrap();
        assert_eq!(streams.held().await.unwrap(), 3);
        connection.abort();
        drop(bodies);
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
        while streams.held().await.unwrap() != 0 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the floor still holds streams of a closed connection"
            );
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        server.abort();
    }
}

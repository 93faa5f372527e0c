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
//! Both use hyper's HTTP/2 server with its defaults (the broker changes only keep-alive and the
//! stream limit, neither of which a unary call meets) and the broker's runtime flavour.

use std::convert::Infallible;
use std::future::{Ready, ready};
use std::net::SocketAddr;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http2;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpListener;
use topichub::proto::v1::{Cursor, PublishRequest, PublishResponse};

use crate::clients::grpc_frame;

/// The path of the one method the floors serve, as the `grpc` target's publisher calls it.
const PUBLISH: &str = "/topichub.v1.PubSub/Publish";

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
    builder.timer(TokioTimer::new());
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
    http_body_util::combinators::WithTrailers<
        Full<Bytes>,
        Ready<Option<Result<http::HeaderMap, Infallible>>>,
    >,
>;

/// The h2 floor: the body read to its end, `framed` and `grpc-status: 0` sent back.
async fn fixed(request: http::Request<Incoming>, framed: Bytes) -> Result<Reply, hyper::Error> {
    let ok = request.uri().path() == PUBLISH;
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
        .body(Full::new(body).with_trailers(ready(Some(Ok(trailers)))))
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
}

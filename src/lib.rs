//! topichub: a topic-based publish/subscribe broker.
//!
//! One process, one port, every way in: gRPC (`topichub.v1.PubSub` and the seed-compatible
//! `proto.PubSubService`), gRPC-Web, HTTP/JSON publish, Server-Sent Events subscribe, an OpenAPI
//! document with Swagger UI, and a small web page. All of them are thin adapters over one
//! [`Hub`], so a message published through any door reaches subscribers on every door, with the
//! same sequence number.
//!
//! # Layout
//! - [`hub`]: topics, subscriptions, sequence numbers, retention, lag policy. The only shared state.
//! - [`message`]: an accepted message, shared by the hub and the log.
//! - [`log`]: the hub's history behind one interface: in memory, on disk (`--data-dir`), or in a
//!   NATS JetStream stream shared by several nodes (`--nats`, cluster mode).
//! - `queue`: the bounded queue from the hub to each subscription.
//! - [`auth`]: JWT bearer tokens and the topic patterns they allow; the middleware of every door.
//! - [`topic`]: topic names and wildcard patterns.
//! - [`cursor`]: `EPOCH-SEQ` positions for resume.
//! - [`error`]: the hub's error type, mapped once per transport.
//! - [`wire`]: protobuf shapes of `topichub.v1` and conversions from hub types.
//! - [`json`]: JSON shapes shared by the HTTP and WebSocket doors (messages, notices, errors).
//! - [`connect`]: the `Connect` protocol (many subscriptions, acked publishes) below its doors.
//! - [`grpc`]: the gRPC services (`seed`: the seed service).
//! - [`http`]: REST and SSE routes, the HTTP error type, the OpenAPI document.
//! - [`ws`]: `GET /ws`, the `Connect` protocol over WebSocket for browsers.
//! - [`web`]: the embedded web page.
//! - [`server`]: assembles every door on one listener; keepalive and graceful shutdown.
//! - `sse_conn`: HTTP/1.1 connections opened by `GET /subscribe`, written to without hyper.
//! - `publish_conn`: HTTP/1.1 keep-alive connections that only `POST /topics/{topic}`, answered
//!   without hyper.
//! - [`tls`]: TLS on the same port (rustls), HTTP/2 and HTTP/1.1 by ALPN.
//! - [`metrics`]: Prometheus counters, gauges and the latency histogram behind `/metrics`.
//! - [`limits`]: connections, subscriptions per connection, publish rate per client.
//! - [`keepalive`]: refuses clients that send HTTP/2 pings too often (gRPC's enforcement policy).
//! - [`write_timeout`]: closes connections whose peer stops reading while data is pending.
//! - [`logging`]: the log filter's defaults; bearer tokens blanked from every line.
//! - [`shutdown`]: the one shutdown signal (ctrl-c, SIGTERM).
//! - [`config`]: command line and environment.
//! - [`client`]: the `pub` and `sub` command-line clients.
//! - [`proto`]: generated protobuf types and gRPC clients.

pub mod auth;
pub mod client;
pub mod config;
pub mod connect;
pub mod cursor;
pub mod error;
pub mod grpc;
pub mod http;
pub mod hub;
pub mod json;
pub mod keepalive;
pub mod limits;
pub mod log;
pub mod logging;
pub mod message;
pub mod metrics;
pub mod proto;
mod publish_conn;
mod queue;
pub mod server;
pub mod shutdown;
mod sse_conn;
pub mod tls;
pub mod topic;
pub mod web;
pub mod wire;
pub mod write_timeout;
pub mod ws;

/// The private request parsers, reachable from the fuzz targets in `fuzz/`; not an API.
#[doc(hidden)]
pub mod fuzzing {
    pub use crate::keepalive::scan_client_bytes as scan_http2_client_bytes;
    pub use crate::publish_conn::{PublishParts, parse_publish};
    pub use crate::sse_conn::parse as parse_subscribe;
}

pub use config::ServerConfig;
pub use hub::Hub;
pub use server::run;

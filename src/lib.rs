//! topichub: a topic-based publish/subscribe broker.
//!
//! One process, one port, every way in: gRPC (`topichub.v1.PubSub` and the seed-compatible
//! `proto.PubSubService`), gRPC-Web, HTTP/JSON publish, Server-Sent Events subscribe, an OpenAPI
//! document with Swagger UI, and a small web page. All of them are thin adapters over one
//! [`Hub`], so a message published through any door reaches subscribers on every door, with the
//! same sequence number.
//!
//! # Layout
//! Layers, each importing only those below it (see `docs/architecture.md`):
//!
//! 1. Core: [`clock`] the hub's time (tokio's in tests); [`topic`] names and wildcard patterns;
//!    `pattern_index` wildcard subscriptions by pattern (a subject trie); [`cursor`] `EPOCH-SEQ`
//!    positions; [`message`] an accepted message; [`idempotency`] the window of recent
//!    idempotency keys (a retried publish answers with the original); [`log`] the history
//!    behind one interface (memory, disk, a NATS JetStream stream shared by several nodes); `queue`, the
//!    bounded queue to each subscription; [`hub`] topics, subscriptions, seqs, retention, lag,
//!    presence, topic deletion, the only shared state; [`error`] the hub's error type;
//!    [`peers`] presence across the nodes of a cluster (they answer each other over NATS).
//! 2. Policy: [`auth`] turns a credential into an `Access` (knows no transport); [`limits`]
//!    connections, subscriptions, publish rates; [`metrics`] Prometheus, a leaf everyone reports
//!    to; [`logging`] the log filter, tokens blanked; [`tls`] certificates, reloadable;
//!    [`shutdown`] the one shutdown signal and how a stream ends on it.
//! 3. Shapes and streams: [`wire`] protobuf shapes of `topichub.v1`; [`json`] JSON shapes of the
//!    HTTP and WebSocket doors; [`proto`] generated types; [`net`] wrappers of a connection's
//!    bytes (HTTP/2 ping policy, write timeout).
//! 4. Doors, each owning its guard and error mapping: [`grpc`] (`seed`: the seed service);
//!    [`http`] REST, SSE, OpenAPI, and its HTTP/1.1 fast paths (`sse_conn`, the direct SSE
//!    writer; `publish_conn`, the publish lane); [`connect`] the `Connect` protocol under [`ws`],
//!    the WebSocket door; [`web`] the embedded page.
//! 5. [`server`]: the application (every door on one router), the listener (admit, sniff, TLS,
//!    one handler per path) and the drain; [`config`], the command line and environment it runs
//!    with.
//! 6. Entry points: [`client`] the `pub` and `sub` command-line clients; `main`.

pub mod auth;
pub mod client;
pub mod clock;
pub mod config;
pub mod connect;
pub mod cursor;
pub mod error;
pub mod grpc;
pub mod http;
pub mod hub;
pub mod idempotency;
pub mod json;
pub mod limits;
pub mod log;
pub mod logging;
pub mod message;
pub mod metrics;
pub mod net;
mod pattern_index;
pub mod peers;
pub mod proto;
mod queue;
pub mod runtime;
pub mod server;
pub mod shutdown;
pub mod tls;
pub mod topic;
pub mod web;
pub mod wire;
pub mod ws;

/// The private request parsers, reachable from the fuzz targets in `fuzz/`; not an API.
#[doc(hidden)]
pub mod fuzzing {
    pub use crate::http::publish_conn::{PublishParts, parse_publish};
    pub use crate::http::sse_conn::parse as parse_subscribe;
    pub use crate::net::keepalive::scan_client_bytes as scan_http2_client_bytes;
}

pub use config::ServerConfig;
pub use hub::Hub;
pub use server::run;

//! Generated protobuf types and gRPC clients, for the CLI, tests and library users.

/// `topichub.v1`: the native API (messages and the `PubSubClient`).
pub mod v1 {
    #![allow(missing_docs, clippy::all)]
    include!(concat!(env!("OUT_DIR"), "/client/topichub.v1.rs"));
}

/// `proto`: the seed-compatible `PubSubService` (messages and client).
pub mod seed {
    #![allow(missing_docs, clippy::all)]
    include!(concat!(env!("OUT_DIR"), "/seed/proto.rs"));
}

/// Descriptor set of every proto file, as served by reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/topichub_descriptor.bin"));

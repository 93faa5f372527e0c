//! Compiles `proto/` with protox (pure Rust, no system `protoc`) and tonic-prost-build.
//!
//! Four passes share one descriptor set:
//! - `client/`: plain types and clients for `topichub.v1` (used by the CLI, tests and library users);
//! - `server/`: the same package for the server, where `topichub.v1.Message` is bound to
//!   `crate::wire::SharedMessage`, which writes a message's protobuf encoding computed once
//!   per message instead of once per subscriber;
//! - `seed/`: the seed-compatible `proto.PubSubService`: types and client;
//! - `seed_server/`: its server, where `proto.SubscribeResponse` is bound to
//!   `crate::grpc::seed::SharedPayload`, encoded once per message as well.
//!
//! The descriptor set is also written to `OUT_DIR/topichub_descriptor.bin` for server reflection.
//! `compile_fds` prints no `rerun-if-changed` lines, so they are printed here.

use std::{env, fs, path::PathBuf};

use prost::Message as _;

const PROTOS: [&str; 2] = [
    "proto/topichub/v1/topichub.proto",
    "proto/seed/pubsub.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    for proto in PROTOS {
        println!("cargo:rerun-if-changed={proto}");
    }

    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    let fds = protox::compile(PROTOS, ["proto"])?;
    fs::write(out_dir.join("topichub_descriptor.bin"), fds.encode_to_vec())?;

    let pass = |dir: &str| -> std::io::Result<tonic_prost_build::Builder> {
        let dir = out_dir.join(dir);
        fs::create_dir_all(&dir)?;
        // Payloads as `bytes::Bytes`: cloning a message for fan-out is a reference-count bump.
        Ok(tonic_prost_build::configure().out_dir(dir).bytes("."))
    };

    // `build_transport(false)`: the generated `connect` constructor would collide with the
    // `Connect` rpc; clients are built with `PubSubClient::new(channel)`.
    pass("client")?
        .build_server(false)
        .build_transport(false)
        .compile_fds(only(&fds, "topichub/v1/topichub.proto"))?;
    pass("server")?
        .build_client(false)
        .codec_path("crate::grpc::codec::Codec")
        .extern_path(".topichub.v1.Message", "crate::wire::SharedMessage")
        .compile_fds(only(&fds, "topichub/v1/topichub.proto"))?;
    pass("seed")?
        .build_server(false)
        .compile_fds(only(&fds, "seed/pubsub.proto"))?;
    pass("seed_server")?
        .build_client(false)
        .codec_path("crate::grpc::codec::Codec")
        .extern_path(
            ".proto.SubscribeResponse",
            "crate::grpc::seed::SharedPayload",
        )
        .compile_fds(only(&fds, "seed/pubsub.proto"))?;
    Ok(())
}

/// The descriptor set restricted to `file` plus everything it imports, so each pass generates
/// exactly one package.
fn only(fds: &prost_types::FileDescriptorSet, file: &str) -> prost_types::FileDescriptorSet {
    let target = fds
        .file
        .iter()
        .find(|f| f.name() == file)
        .expect("proto compiled");
    let mut keep: Vec<&str> = target.dependency.iter().map(String::as_str).collect();
    keep.push(file);
    prost_types::FileDescriptorSet {
        file: fds
            .file
            .iter()
            .filter(|f| keep.contains(&f.name()))
            .cloned()
            .collect(),
    }
}

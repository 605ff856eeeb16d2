//! Generates Rust code for every protocol in `proto/`.
//!
//! The protobuf compiler comes from `protoc-bin-vendored`, so a fresh machine needs no system `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    let protos = [
        "proto/raft.proto",
        "proto/rsm.proto",
        "proto/kv.proto",
        "proto/mr.proto",
        "proto/ctrler.proto",
        "proto/shardkv.proto",
    ];
    for proto in protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    // The compiler is handed to prost's config rather than through the PROTOC variable, which would
    // take an `unsafe` set_var.
    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc);
    // Maps decode into BTreeMaps: encoding then follows key order, so replicas with the same state
    // write byte-identical snapshots (a HashMap's order differs between processes and even maps).
    tonic_prost_build::configure()
        .bytes(".")
        .btree_map(".")
        .compile_with_config(config, &protos, &["proto"])?;
    Ok(())
}

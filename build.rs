//! Generates Rust code for every protocol in `proto/`.
//!
//! The protobuf compiler comes from `protoc-bin-vendored`, so a fresh machine needs no system `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY: build scripts are single-threaded; nothing else reads the environment concurrently.
    unsafe { std::env::set_var("PROTOC", protoc) };
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
    tonic_prost_build::configure()
        .bytes(".")
        .compile_protos(&protos, &["proto"])?;
    Ok(())
}

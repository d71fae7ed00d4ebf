//! Compiles `proto/` with protox (pure Rust), so a build needs no system `protoc`.
//!
//! The encoded descriptor set is kept in `OUT_DIR` for gRPC reflection (`pb::FILE_DESCRIPTOR_SET`).

use std::{env, fs, path::PathBuf};

use prost::Message;

/// The API's protos, relative to [`PROTO_ROOT`].
const PROTOS: &[&str] = &["imageservice/v1/image_service.proto"];
/// The include root: proto imports are resolved from here, as `buf` does.
const PROTO_ROOT: &str = "proto";

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed={PROTO_ROOT}");
    let descriptors = protox::compile(PROTOS, [PROTO_ROOT])?;
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    fs::write(
        out_dir.join("imageservice_descriptor.bin"),
        descriptors.encode_to_vec(),
    )?;
    tonic_prost_build::configure()
        .emit_rerun_if_changed(false)
        // Request decode errors become INVALID_ARGUMENT with the field (src/codec.rs).
        .codec_path("crate::transport::codec::Codec")
        .compile_fds(descriptors)?;
    Ok(())
}

//! The only home of generated protobuf code: `imageservice.v1` messages, client and server.

#![allow(missing_docs, clippy::all, clippy::pedantic)]

tonic::include_proto!("imageservice.v1");

/// The encoded `FileDescriptorSet` of `proto/`, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    tonic::include_file_descriptor_set!("imageservice_descriptor");

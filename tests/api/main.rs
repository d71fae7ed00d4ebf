//! Integration tests: a real gRPC client over a real loopback socket, and the service's real
//! `aws-sdk-ecr` client speaking HTTP to the moto emulator or to recorded ECR responses.

mod cache;
mod ecr_errors;
mod emulator;
mod seed;
mod support;
mod validation;

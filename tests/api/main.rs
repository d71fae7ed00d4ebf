//! Integration tests: a real gRPC client over a real loopback socket, and the service's real
//! `aws-sdk-ecr` client speaking HTTP to the moto emulator or to recorded ECR responses.

mod cache;
mod ecr_errors;
mod emulator;
mod faults;
mod observability;
mod seed;
mod sidecar;
#[allow(dead_code)] // shared with tests/rate_budget.rs, which uses other parts
mod support;
mod validation;

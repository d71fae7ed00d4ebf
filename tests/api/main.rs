//! Integration tests: a real gRPC client over a real loopback socket, and the service's real
//! `aws-sdk-ecr` client speaking HTTP to the moto emulator or to recorded ECR responses.

mod access;
mod accounts;
mod cache;
mod clients;
mod conformance;
mod dashboards;
mod delete;
mod ecr_errors;
mod faults;
mod fleet;
mod hostile;
mod listing;
mod mtls;
mod observability;
mod platforms;
mod registries;
mod retries;
mod sidecar;
#[allow(dead_code)] // shared with tests/rate_budget.rs, which uses other parts
mod support;
mod validation;
mod verify;
mod watch;

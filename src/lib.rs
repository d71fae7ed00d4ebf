#![warn(missing_docs)]

//! ecr-image-service: a gRPC facade over Amazon ECR.
//!
//! Clients call one protobuf-defined `ImageService` (`proto/imageservice/v1`) instead of each
//! carrying the AWS SDK, credentials and retry logic. The data path reads top to bottom:
//!
//! - [`server`]: the listener, health, reflection, HTTP/2 limits, the SIGTERM drain;
//! - [`connection`]: the connection cap, handshake timeout and accept back-off of both ports;
//! - [`admission`]: bodies received in time and within a byte budget, then a request slot;
//!   what finds none is shed with UNAVAILABLE;
//! - [`service`]: one span per RPC; request -> [`validate`] -> [`registry`] -> response;
//! - [`validate`]: proto requests into value types ([`image`]), every bad field reported;
//! - [`registry`]: the seam; [`registry::cached`] keeps hot reads off ECR (caches, coalescing,
//!   batching); [`registry::ecr`] implements it with `aws-sdk-ecr`, behind the rate budgets of
//!   [`registry::budget`];
//! - [`error`]: the error enum and its single mapping to a `tonic::Status`.
//!
//! [`metrics`] counts for Prometheus and [`admin`] serves them on `/metrics`;
//! [`codec`] is prost's codec with request decode errors reported as field violations;
//! [`deadline`] carries the caller's deadline down the path; [`config`] parses flags and env
//! twins; [`telemetry`] installs logging; [`pb`] holds the
//! generated code.

pub mod admin;
pub mod admission;
pub mod app;
pub mod authz;
pub mod call;
pub mod cli;
pub mod codec;
pub mod config;
pub mod connection;
pub mod error;
pub mod fleet;
pub mod health_check;
pub mod identity;
pub mod image;
pub mod memory;
pub mod methods;
pub mod metrics;
pub mod paging;
pub mod pb;
pub mod platform;
pub mod registry;
pub mod reload;
pub mod retag;
pub mod server;
pub mod service;
pub mod shutdown;
pub mod telemetry;
pub mod text;
pub mod tls;
pub mod validate;
pub mod watch;

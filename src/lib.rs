#![warn(missing_docs)]

//! ecr-image-service: a gRPC facade over Amazon ECR.
//!
//! Clients call one protobuf-defined `ImageService` (`proto/imageservice/v1`) instead of each
//! carrying the AWS SDK, credentials and retry logic. The modules by layer, top to bottom; a
//! layer uses the ones below it, never one above:
//!
//! - **transport**: [`server`] (the listener, health, reflection, the SIGTERM drain;
//!   [`shutdown`] the signal), [`http2`] (each connection served by hyper, its quick answers
//!   written in batches; keepalive, stream limit, connection age), [`connection`] (connection cap, handshake timeout,
//!   accept back-off), [`tls`] (the `mtls` acceptor, rotated without a restart), [`admission`]
//!   (bodies in time and within a byte budget, a request slot, and the call's context, made
//!   once), [`codec`] (prost's, with decode errors as field violations), [`admin`] (`/metrics`);
//! - **api**: [`service`] (every RPC through one skeleton: caller -> [`validate`] ->
//!   authorization -> registry -> response), [`methods`] (the method table: size limits,
//!   actions, idempotency), [`error`] (the API's errors and their one mapping to a
//!   `tonic::Status`), [`audit`] (one event per write and denial), [`paging`] (signed page tokens), [`platform`] (an index's child for a
//!   platform), [`retag`], [`watch`] (WatchTag's hub, pollers and streams), [`pb`] (the
//!   generated code);
//! - **access**: [`identity`] (the caller's principal from the one configured source),
//!   [`authz`] (the per-repository policy);
//! - **registry**: [`registry`] (the seam; [`registry::cached`] keeps hot reads off ECR,
//!   [`registry::ecr`] calls it through `aws-sdk-ecr` behind its rate budgets, a client per
//!   account and region, [`registry::accounts`] says which registries are served,
//!   [`registry::local`] is the embedded store);
//! - **domain**: [`image`] (value types: names, tags, digests, manifests as exact bytes),
//!   [`call`] (the call context: deadline, caller, registry), [`text`] (bounded messages),
//!   [`random`](domain::random) (spreading work in time).
//!
//! Beside them: [`fleet`] (replicas sharing budgets, tag moves and polls through Redis),
//! [`app`] (the wiring: builds the stack and serves it), [`config`] (flags and env twins),
//! [`cli`] and [`health_check`] (the client subcommands), [`telemetry`] (logs and traces),
//! [`metrics`] (Prometheus), [`memory`] (memory given back after a herd), [`reload`] (the one
//! file-reload loop), [`runtime`] (the scheduler's threads).

pub mod access;
pub mod api;
pub mod app;
pub mod cli;
pub mod config;
pub mod domain;
pub mod fleet;
pub mod health_check;
pub mod memory;
pub mod metrics;
pub mod registry;
pub mod reload;
pub mod runtime;
pub mod telemetry;
pub mod transport;

// Flat re-exports: one name per concern, as the modules were known before they were grouped
// by layer (tests, benchmarks and the binary use these).
pub use access::{authz, identity};
pub use api::{audit, error, methods, paging, pb, platform, retag, service, validate, watch};
pub use domain::{call, image, text};
pub use transport::{admin, admission, codec, connection, http2, server, shutdown, tls};

//! What every integration test needs: the emulator, recorded ECR, the service on a real socket
//! with a real gRPC client, and readers for the rich error details.

pub mod backend;
pub mod certs;
pub mod ecr_ext;
pub mod fair_shares;
pub mod fault_proxy;
pub mod moto;
pub mod nginx;
pub mod process;
pub mod recorded;
pub mod redis;
pub mod replicas;
pub mod requests;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use aws_config::{BehaviorVersion, Region, SdkConfig};
use aws_credential_types::Credentials;
use aws_credential_types::provider::SharedCredentialsProvider;
use aws_sdk_ecr::config::retry::RetryPartition;
use ecr_image_service::error::ERROR_DOMAIN;
use ecr_image_service::pb::image_service_client::ImageServiceClient;
use ecr_image_service::registry::cached::{CacheSettings, CachedRegistry};
use ecr_image_service::registry::ecr::calls::UpstreamCalls;
use ecr_image_service::registry::ecr::{EcrRegistry, EcrSettings, client_config};
use ecr_image_service::registry::{Registry, SharedRegistry};
use ecr_image_service::server::{self, ServerSettings};
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};
use tonic_types::{ErrorDetail, ErrorInfo, StatusExt};

/// The seed manifest exactly as ECR returned it (`../shared/fixtures/seed`).
pub const SEED: &str = include_str!("../../fixtures/hello-world.manifest.json");
/// The same document as printed in the AWS docs: other bytes, so another digest.
pub const SEED_DOC_FORM: &str = include_str!("../../fixtures/hello-world.manifest.doc-form.json");
/// The AWS CLI's output for the seed put.
pub const SEED_EXPECTED_OUTPUT: &str =
    include_str!("../../fixtures/put-image.expected-output.json");
/// SHA-256 of [`SEED`].
pub const SEED_DIGEST: &str =
    "sha256:8ece96b74f87652876199d83bd107d0435a196133af383ac54cb82b6cc5283ae";
/// SHA-256 of [`SEED_DOC_FORM`].
pub const SEED_DOC_FORM_DIGEST: &str =
    "sha256:21c4b7549f00071eee1e70a84fbef06f92689539cb76dfdbe91a46b418bad8af";
/// The region every test client signs for (moto keeps one backend per region).
pub const REGION: &str = "us-east-1";
/// The account moto reports for test credentials.
pub const MOTO_ACCOUNT: &str = "123456789012";

/// Test settings: the production defaults, but for what is named here. Short backoffs and
/// long timeouts make retry tests quick and never flaky; generous budgets keep set-up puts
/// unpaced (the budget itself is tested on purpose in `faults.rs` and `rate_budget.rs`).
pub fn settings() -> EcrSettings {
    EcrSettings {
        region: Some(REGION.into()),
        initial_backoff: Duration::from_millis(5),
        max_backoff: Duration::from_millis(20),
        attempt_timeout: Duration::from_secs(10),
        operation_timeout: Duration::from_secs(30),
        put_image_rate: 10_000.0,
        batch_get_image_rate: 10_000.0,
        ..EcrSettings::default()
    }
}

/// Server settings for tests: the production defaults, on loopback ports of the OS's choosing
/// and with no shutdown delay.
pub fn server_settings() -> ServerSettings {
    ServerSettings {
        listen: "127.0.0.1:0".parse().unwrap(),
        admin_listen: "127.0.0.1:0".parse().unwrap(),
        shutdown_delay: Duration::ZERO,
        // The emulator's account, as the credentials would name it in production.
        own_registry_id: Some(MOTO_ACCOUNT.into()),
        ..ServerSettings::default()
    }
}

/// The repository's root.
pub fn root() -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Installs `what` with `scripts/test-deps.sh` (pinned, idempotent, quick when in place).
pub fn install(what: &str) {
    let status = std::process::Command::new(root().join("scripts/test-deps.sh"))
        .arg(what)
        .status()
        .expect("run scripts/test-deps.sh");
    assert!(status.success(), "scripts/test-deps.sh {what}: {status}");
}

/// A name no other test in this binary uses.
pub fn unique(prefix: &str) -> String {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    format!("{prefix}-{}", NEXT.fetch_add(1, Ordering::Relaxed))
}

/// Static test credentials: the tests never read the host's AWS environment.
fn sdk_config() -> SdkConfig {
    sdk_config_at(None)
}

/// [`sdk_config`] with every service's endpoint at `endpoint` (STS, for the accounts tests;
/// ECR clients set their own).
pub fn sdk_config_at(endpoint: Option<&str>) -> SdkConfig {
    let mut builder = SdkConfig::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new(REGION))
        .credentials_provider(SharedCredentialsProvider::new(Credentials::new(
            "testing", "testing", None, None, "tests",
        )));
    builder.set_endpoint_url(endpoint.map(str::to_owned));
    builder.build()
}

/// The service's own ECR client configuration pointed at `endpoint`, in a retry partition of
/// its own so one test's exhausted retry budget cannot change another's behaviour.
pub fn registry(endpoint: &str, settings: EcrSettings) -> EcrRegistry {
    let settings = EcrSettings {
        endpoint_url: Some(endpoint.to_owned()),
        ..settings
    };
    let config = client_config(&sdk_config(), &settings)
        .retry_partition(RetryPartition::new(unique("test-partition")));
    EcrRegistry::from_config(config, settings.batch_window)
}

/// The production stack against `endpoint`: the cache (on its defaults) over the ECR backend,
/// and the backend's call counters (shared, so they keep counting after the stack moves into
/// the server).
pub fn cached(endpoint: &str) -> (SharedRegistry, UpstreamCalls) {
    let ecr = registry(endpoint, settings());
    let calls = ecr.calls().clone();
    let stack = CachedRegistry::new(Arc::new(ecr), CacheSettings::default());
    (Arc::new(stack), calls)
}

/// A plain ECR client for test set-up (creating repositories), bypassing the service.
pub fn admin(endpoint: &str) -> aws_sdk_ecr::Client {
    let config = aws_sdk_ecr::config::Builder::from(&sdk_config())
        .endpoint_url(endpoint)
        .build();
    aws_sdk_ecr::Client::from_conf(config)
}

/// An ECR client acting in `account` of the emulator (its AssumeRole needs no existing role,
/// and the credentials it returns act in the role's account), for set-up and checks.
pub async fn admin_in(account: &str) -> aws_sdk_ecr::Client {
    let sdk = sdk_config_at(Some(moto::endpoint()));
    let assumed = aws_sdk_sts::Client::new(&sdk)
        .assume_role()
        .role_arn(format!("arn:aws:iam::{account}:role/test-setup"))
        .role_session_name("test-setup")
        .send()
        .await
        .unwrap_or_else(|e| panic!("assume a role in {account}: {e:?}"));
    let given = assumed
        .credentials()
        .expect("AssumeRole answers with credentials");
    let credentials = Credentials::new(
        given.access_key_id(),
        given.secret_access_key(),
        Some(given.session_token().to_owned()),
        None,
        "test-setup",
    );
    let config = aws_sdk_ecr::config::Builder::from(&sdk)
        .credentials_provider(credentials)
        .build();
    aws_sdk_ecr::Client::from_conf(config)
}

/// Creates a repository in the emulator.
pub async fn create_repository(endpoint: &str, name: &str, immutable: bool) {
    let mutability = if immutable {
        aws_sdk_ecr::types::ImageTagMutability::Immutable
    } else {
        aws_sdk_ecr::types::ImageTagMutability::Mutable
    };
    admin(endpoint)
        .create_repository()
        .repository_name(name)
        .image_tag_mutability(mutability)
        .send()
        .await
        .unwrap_or_else(|e| {
            panic!(
                "create {name}: {}",
                aws_sdk_ecr::error::DisplayErrorContext(e)
            )
        });
}

/// Starts the service over `registry` on 127.0.0.1:0 and connects a real gRPC client to it.
pub async fn start(registry: impl Registry) -> ImageServiceClient<Channel> {
    ImageServiceClient::new(start_channel(registry).await)
        .max_decoding_message_size(16 << 20)
        .max_encoding_message_size(16 << 20)
}

/// Starts the service and returns a raw channel to it, for hand-built requests. The server task
/// lives as long as the test's runtime.
pub async fn start_channel(registry: impl Registry) -> Channel {
    start_channel_with(registry, server_settings()).await
}

/// [`start`] with server settings of the test's choosing.
pub async fn start_with(
    registry: impl Registry,
    settings: ServerSettings,
) -> ImageServiceClient<Channel> {
    ImageServiceClient::new(start_channel_with(registry, settings).await)
}

/// [`start_channel`] with server settings of the test's choosing.
pub async fn start_channel_with(registry: impl Registry, settings: ServerSettings) -> Channel {
    let address = serve_on_loopback(registry, settings).await;
    // The listener is bound before the server task starts, so the connection cannot race it.
    Endpoint::from_shared(format!("http://{address}"))
        .unwrap()
        .connect()
        .await
        .unwrap()
}

/// A raw HTTP/2 connection to `address` (the `h2` crate, no gRPC library between the test and
/// the frames), driven in the background.
pub async fn h2_connection(address: SocketAddr) -> h2::client::SendRequest<bytes::Bytes> {
    let tcp = tokio::net::TcpStream::connect(address).await.unwrap();
    let (sender, connection) = h2::client::handshake(tcp).await.expect("HTTP/2 handshake");
    tokio::spawn(connection);
    sender
}

/// Serves the service over `registry` through the production serve path, on the loopback
/// addresses of `settings`, for the test's runtime; its gRPC address.
pub async fn serve_on_loopback(registry: impl Registry, settings: ServerSettings) -> SocketAddr {
    serve_with_admin(registry, settings).await.0
}

/// [`serve_on_loopback`], also returning where `/metrics` is served.
pub async fn serve_with_admin(
    registry: impl Registry,
    settings: ServerSettings,
) -> (SocketAddr, SocketAddr) {
    let bound = server::bind(settings).await.expect("bind on loopback");
    let addresses = (bound.address(), bound.admin_address());
    tokio::spawn(bound.serve(Arc::new(registry), std::future::pending()));
    addresses
}

/// Recorded ECR answering `script`, and the service (its ECR backend, no cache) in front of it.
pub async fn start_on_recorded(
    script: Vec<(&str, recorded::Reply)>,
) -> (recorded::RecordedEcr, ImageServiceClient<Channel>) {
    let ecr = recorded::RecordedEcr::start(script).await;
    let client = start(registry(&ecr.endpoint, settings())).await;
    (ecr, client)
}

/// The service in front of the emulator, and the emulator's endpoint for set-up calls.
pub async fn start_on_moto() -> (ImageServiceClient<Channel>, &'static str) {
    let endpoint = moto::endpoint();
    (start(registry(endpoint, settings())).await, endpoint)
}

/// The status's one `ErrorInfo`, asserting there is exactly one and that it is ours.
pub fn error_info(status: &Status) -> ErrorInfo {
    let infos: Vec<ErrorInfo> = status
        .get_error_details_vec()
        .into_iter()
        .filter_map(|d| match d {
            ErrorDetail::ErrorInfo(info) => Some(info),
            _ => None,
        })
        .collect();
    assert_eq!(infos.len(), 1, "exactly one ErrorInfo in {status:?}");
    assert_eq!(infos[0].domain, ERROR_DOMAIN);
    infos[0].clone()
}

/// The fields a `google.rpc.BadRequest` names.
pub fn violated_fields(status: &Status) -> Vec<String> {
    status
        .get_details_bad_request()
        .map(|b| b.field_violations.into_iter().map(|v| v.field).collect())
        .unwrap_or_default()
}

/// Asserts the status's code and `ErrorInfo.reason`.
pub fn assert_status(status: &Status, code: Code, reason: &str) {
    assert_eq!(status.code(), code, "{status:?}");
    assert_eq!(error_info(status).reason, reason, "{status:?}");
}

/// `sha256:` + the SHA-256 of `text`, as ECR computes a manifest's digest.
pub fn digest_of(text: &str) -> String {
    use sha2::Digest as _;
    format!("sha256:{:x}", sha2::Sha256::digest(text.as_bytes()))
}

//! The ECR client: the SDK's shared configuration, our retries, timeouts and endpoint, and the
//! rate budgets in front of its HTTP client. Built once; clones share its connection pool.

use std::sync::Arc;
use std::time::Duration;

use aws_config::{BehaviorVersion, Region, SdkConfig};
use aws_sdk_ecr::config::StalledStreamProtectionConfig;
use aws_sdk_ecr::config::retry::RetryConfig;
use aws_sdk_ecr::config::timeout::TimeoutConfig;
use aws_smithy_http_client::proxy::ProxyConfig;
use aws_smithy_http_client::{ConnectorBuilder, tls};
use aws_smithy_runtime_api::client::http::SharedHttpClient;

use super::budget::{BudgetedHttpClient, RateBudgets, SharedSlots};
use super::retry::QuotaIsNotThrottling;
use super::slots::{
    DEFAULT_MAX_UPSTREAM_CALLS, DEFAULT_MAX_UPSTREAM_CALLS_PER_CALLER, UpstreamSlots,
};

/// The SDK's standard: two retries ride out a throttling blip or a dropped connection, and a
/// throttled account sees at most three times the load, not more.
pub const DEFAULT_MAX_ATTEMPTS: u32 = 3;
/// ECR's rate budgets refill every second; retries jittered over 0-100 ms, then 0-200 ms, spread
/// out without making an interactive caller wait the SDK's default of up to 1 s.
pub const DEFAULT_INITIAL_BACKOFF: Duration = Duration::from_millis(100);
/// Caps the wait between two attempts well inside a typical 10-30 s caller deadline.
pub const DEFAULT_MAX_BACKOFF: Duration = Duration::from_secs(2);
/// A regional or VPC endpoint connects in milliseconds: two seconds means it is unreachable.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// ECR answers these calls in well under a second; five allows a 4 MiB manifest upload on a
/// slow link, and abandons (then retries) an attempt that is stuck.
pub const DEFAULT_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(5);
/// Bounds a whole call, retries included, so no request outlives a sensible caller deadline.
pub const DEFAULT_OPERATION_TIMEOUT: Duration = Duration::from_secs(15);
/// ECR's default PutImage quota per account and region (quota L-AD52DFB2).
pub const DEFAULT_PUT_IMAGE_RATE: f64 = 10.0;
/// ECR's default BatchGetImage quota per account and region (quota L-16E70933).
pub const DEFAULT_BATCH_GET_IMAGE_RATE: f64 = 2000.0;
/// ECR publishes no quota for BatchDeleteImage (ecr-facts §3), yet throttles it: 10 calls a
/// second (up to 1,000 ids) is conservative, and clean-up jobs are not latency-bound.
pub const DEFAULT_BATCH_DELETE_IMAGE_RATE: f64 = 10.0;
/// ListImages and DescribeImages have no published quota either: 20 pages a second each keeps
/// a clean-up job's walk quick without taking ECR's unpublished share from deploys.
pub const DEFAULT_LISTING_RATE: f64 = 20.0;
/// No wait for a lone miss: batching comes from misses arriving while a call is in flight.
pub const DEFAULT_BATCH_WINDOW: Duration = Duration::ZERO;

/// How the service talks to ECR: where, and how hard it tries.
#[derive(Debug, Clone, PartialEq)]
pub struct EcrSettings {
    /// The AWS region; `None` leaves it to the SDK's chain (`AWS_REGION`, profile, IMDS).
    pub region: Option<String>,
    /// An ECR endpoint override (emulator, VPC endpoint); `None` leaves it to the SDK
    /// (`AWS_ENDPOINT_URL_ECR`, `AWS_ENDPOINT_URL`, or the regional endpoint).
    pub endpoint_url: Option<String>,
    /// Attempts per ECR call, the first included (SDK standard retry mode).
    pub max_attempts: u32,
    /// The first retry's backoff ceiling; the SDK doubles it per attempt, with full jitter.
    pub initial_backoff: Duration,
    /// The largest backoff between two attempts.
    pub max_backoff: Duration,
    /// How long to wait for a TCP/TLS connection to ECR.
    pub connect_timeout: Duration,
    /// How long one attempt may take, from its rate-budget slot, before it is abandoned (and
    /// retried).
    pub attempt_timeout: Duration,
    /// How long one call may take, all attempts and backoffs included.
    pub operation_timeout: Duration,
    /// The PutImage budget of all replicas together, requests per second (the account quota).
    pub put_image_rate: f64,
    /// The BatchGetImage budget of all replicas together, requests per second.
    pub batch_get_image_rate: f64,
    /// The BatchDeleteImage budget of all replicas together, requests per second.
    pub batch_delete_image_rate: f64,
    /// The ListImages and DescribeImages budgets of all replicas together, each, per second.
    pub listing_rate: f64,
    /// Processes sharing those budgets without a shared limiter: each paces itself at
    /// budget ÷ `rate_share`.
    pub rate_share: u32,
    /// How long the first miss of an idle repository waits for others to batch with.
    pub batch_window: Duration,
    /// ECR calls in flight at once (from their budget slot to ECR's answer); past it an
    /// attempt is refused OVERLOADED, unsent.
    pub max_upstream_calls: usize,
    /// Of those, at most this many for one caller.
    pub max_upstream_calls_per_caller: usize,
}

impl Default for EcrSettings {
    /// The production defaults: the SDK's chains for region and endpoint, and the whole
    /// account's quotas (one replica).
    fn default() -> Self {
        Self {
            region: None,
            endpoint_url: None,
            max_attempts: DEFAULT_MAX_ATTEMPTS,
            initial_backoff: DEFAULT_INITIAL_BACKOFF,
            max_backoff: DEFAULT_MAX_BACKOFF,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            attempt_timeout: DEFAULT_ATTEMPT_TIMEOUT,
            operation_timeout: DEFAULT_OPERATION_TIMEOUT,
            put_image_rate: DEFAULT_PUT_IMAGE_RATE,
            batch_get_image_rate: DEFAULT_BATCH_GET_IMAGE_RATE,
            batch_delete_image_rate: DEFAULT_BATCH_DELETE_IMAGE_RATE,
            listing_rate: DEFAULT_LISTING_RATE,
            rate_share: 1,
            batch_window: DEFAULT_BATCH_WINDOW,
            max_upstream_calls: DEFAULT_MAX_UPSTREAM_CALLS,
            max_upstream_calls_per_caller: DEFAULT_MAX_UPSTREAM_CALLS_PER_CALLER,
        }
    }
}

/// Loads the AWS SDK's shared configuration the standard way: credentials only from the default
/// provider chain (environment, profile, web identity for IRSA, container and instance roles).
pub async fn load_sdk_config(settings: &EcrSettings) -> SdkConfig {
    let mut loader = aws_config::defaults(BehaviorVersion::latest());
    if let Some(region) = &settings.region {
        loader = loader.region(Region::new(region.clone()));
    }
    loader.load().await
}

/// Names the account when the credentials do not: replicas sharing a Redis then share one
/// budget, which can only be too cautious, never over a quota.
pub const UNKNOWN_ACCOUNT: &str = "default";
/// Resolving credentials at start-up (IRSA asks STS) takes well under this.
const ACCOUNT_LOOKUP_TIMEOUT: Duration = Duration::from_secs(5);

/// The account the credentials belong to, which names the fleet's shared budgets (ECR's quotas
/// are per account and region): the provider chain knows it for web identity (IRSA), SSO and
/// `AWS_ACCOUNT_ID`; otherwise [`UNKNOWN_ACCOUNT`].
pub async fn account_of(sdk: &SdkConfig) -> String {
    use aws_credential_types::provider::ProvideCredentials;
    let Some(provider) = sdk.credentials_provider() else {
        return UNKNOWN_ACCOUNT.to_owned();
    };
    let account =
        match tokio::time::timeout(ACCOUNT_LOOKUP_TIMEOUT, provider.provide_credentials()).await {
            Ok(Ok(credentials)) => credentials.account_id().map(|id| id.as_str().to_owned()),
            _ => None,
        };
    account.unwrap_or_else(|| {
        tracing::info!(
            account = UNKNOWN_ACCOUNT,
            "the credentials name no account: the shared ECR budgets are keyed by region alone"
        );
        UNKNOWN_ACCOUNT.to_owned()
    })
}

/// The ECR client configuration: the shared SDK configuration plus our retries, timeouts and
/// endpoint. Returned as a builder so tests can add what production never needs.
pub fn client_config(sdk: &SdkConfig, settings: &EcrSettings) -> aws_sdk_ecr::config::Builder {
    client_config_with(sdk, settings, None)
}

/// [`client_config`] with the budgets' slots taken from `shared`, the fleet's limiter.
pub fn client_config_with(
    sdk: &SdkConfig,
    settings: &EcrSettings,
    shared: Option<Arc<dyn SharedSlots>>,
) -> aws_sdk_ecr::config::Builder {
    client_config_sharing(sdk, settings, shared, upstream_slots(settings))
}

/// The process's bound on ECR calls in flight, for [`client_config_sharing`].
pub fn upstream_slots(settings: &EcrSettings) -> Arc<UpstreamSlots> {
    UpstreamSlots::new(
        settings.max_upstream_calls,
        settings.max_upstream_calls_per_caller,
    )
}

/// [`client_config_with`], its calls in flight counted in `slots`: one bound for every
/// registry's client, so that serving more accounts does not multiply it.
pub fn client_config_sharing(
    sdk: &SdkConfig,
    settings: &EcrSettings,
    shared: Option<Arc<dyn SharedSlots>>,
    slots: Arc<UpstreamSlots>,
) -> aws_sdk_ecr::config::Builder {
    let retry = RetryConfig::standard()
        .with_max_attempts(settings.max_attempts)
        .with_initial_backoff(settings.initial_backoff)
        .with_max_backoff(settings.max_backoff);
    // The attempt timeout is kept by the budgeted client, from the slot on (see there).
    let timeouts = TimeoutConfig::builder()
        .connect_timeout(settings.connect_timeout)
        .operation_timeout(settings.operation_timeout)
        .build();
    // The SDK's own HTTPS client, or its default, with the rate budgets in front.
    let http = sdk.http_client().unwrap_or_else(default_https_client);
    let budgets = RateBudgets::shared(
        [
            ("PutImage", settings.put_image_rate),
            ("BatchGetImage", settings.batch_get_image_rate),
            ("BatchDeleteImage", settings.batch_delete_image_rate),
            ("ListImages", settings.listing_rate),
            ("DescribeImages", settings.listing_rate),
        ],
        settings.rate_share,
        shared,
    );
    // Uploads are not watched for stalls: the SDK's clock for a stalled request body starts
    // before the rate budget, so a call queued past the grace period failed unsent, was retried
    // at the back of the queue, and ran out of time (113 of 127 queued puts refused). The
    // attempt timeout, which starts at the slot, bounds a stuck upload instead.
    let stalls = StalledStreamProtectionConfig::enabled()
        .upload_enabled(false)
        .build();
    let mut builder = aws_sdk_ecr::config::Builder::from(sdk)
        .stalled_stream_protection(stalls)
        .retry_config(retry)
        .retry_classifier(QuotaIsNotThrottling)
        .timeout_config(timeouts)
        .http_client(BudgetedHttpClient::new(
            http,
            budgets,
            slots,
            settings.attempt_timeout,
        ));
    if let Some(url) = &settings.endpoint_url {
        builder = builder.endpoint_url(url);
    }
    builder
}

/// The STS client the service assumes roles with: its own credentials chain and region, and
/// the SDK's STS endpoint (`AWS_ENDPOINT_URL_STS` for an emulator).
pub fn sts_client(sdk: &SdkConfig) -> aws_sdk_sts::Client {
    let http = sdk.http_client().unwrap_or_else(default_https_client);
    let config = aws_sdk_sts::config::Builder::from(sdk)
        .http_client(http)
        .build();
    aws_sdk_sts::Client::from_conf(config)
}

/// The HTTPS client the SDK builds by default for the current behavior version: hyper 1,
/// rustls with aws-lc, and HTTP(S)_PROXY/NO_PROXY honoured from the environment.
fn default_https_client() -> SharedHttpClient {
    aws_smithy_http_client::Builder::new().build_with_connector_fn(|settings, components| {
        let mut connector = ConnectorBuilder::default().tls_provider(tls::Provider::Rustls(
            tls::rustls_provider::CryptoMode::AwsLc,
        ));
        connector.set_connector_settings(settings.cloned());
        if let Some(components) = components {
            connector.set_sleep_impl(components.sleep_impl());
        }
        connector.set_proxy_config(Some(ProxyConfig::from_env()));
        connector.build()
    })
}

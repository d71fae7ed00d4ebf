//! The server's configuration (`serve`): every flag has an `ECR_IMAGE_SERVICE_*` twin, and everything is
//! validated at start-up so a bad deployment fails at once with one clear line (exit 64).
//!
//! AWS credentials are not configuration here: they come only from the SDK's default chain.

use std::net::SocketAddr;
use std::time::Duration;

use clap::{Args, ValueEnum};
use humantime::Duration as Human;

use crate::access::identity::IdentitySource;
use crate::domain::image::{RegistryId, RepositoryName};
use crate::registry::cached::{self, CacheSettings};
use crate::registry::ecr::{EcrSettings, client as ecr, slots};
use crate::registry::local::{self, LocalSettings};
use crate::telemetry::LogFormat;
use crate::transport::server::{self, ServerSettings};

/// Upper bound on `--batch-window`: a longer wait costs every cold read more than ECR's latency.
const MAX_BATCH_WINDOW: Duration = Duration::from_millis(100);
/// Upper bound on `--max-attempts`: beyond this, retries only amplify an ECR outage.
const MAX_ATTEMPTS_LIMIT: u32 = 10;

/// Where images are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Backend {
    /// Amazon ECR, through aws-sdk-ecr (credentials from the AWS default chain).
    Ecr,
    /// An embedded SQLite store in `--data-dir` with ECR's semantics: no AWS account needed.
    Local,
}

impl Backend {
    /// The backend's name as `--backend` spells it.
    pub fn name(self) -> &'static str {
        match self {
            Self::Ecr => "ecr",
            Self::Local => "local",
        }
    }
}

/// Whose name the service's writes carry in CloudTrail.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum AttributeWrites {
    /// The service's own role session for every write.
    None,
    /// A role session per (account, caller) for writes, with the caller as SourceIdentity.
    SourceIdentity,
}

impl AttributeWrites {
    /// The mode as the flag spells it.
    pub fn name(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::SourceIdentity => "source-identity",
        }
    }
}

/// On or off.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Switch {
    /// On.
    On,
    /// Off.
    Off,
}

/// `ecr-image-service serve`.
#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Where images are stored: Amazon ECR, or the embedded store for development and tests.
    #[arg(long, env = "ECR_IMAGE_SERVICE_BACKEND", value_enum, default_value_t = Backend::Ecr)]
    pub backend: Backend,

    /// Directory of the embedded store (`--backend local`); created if missing.
    #[arg(long, env = "ECR_IMAGE_SERVICE_DATA_DIR")]
    pub data_dir: Option<std::path::PathBuf>,

    /// Repositories the embedded store creates tag-immutable: names, or `prefix/*`,
    /// comma-separated (`--backend local`; ECR sets this per repository).
    #[arg(
        long,
        env = "ECR_IMAGE_SERVICE_IMMUTABLE_REPOSITORIES",
        value_delimiter = ','
    )]
    pub immutable_repositories: Vec<String>,

    /// The registry ID the embedded store reports (`--backend local`).
    #[arg(long, env = "ECR_IMAGE_SERVICE_LOCAL_REGISTRY_ID", default_value = local::DEFAULT_REGISTRY_ID)]
    pub local_registry_id: String,

    /// Address to listen on for gRPC.
    #[arg(long, env = "ECR_IMAGE_SERVICE_LISTEN", default_value_t = server::DEFAULT_LISTEN)]
    pub listen: SocketAddr,

    /// Address of the admin HTTP endpoint (`/metrics` for Prometheus).
    #[arg(long, env = "ECR_IMAGE_SERVICE_ADMIN_LISTEN", default_value_t = server::DEFAULT_ADMIN_LISTEN)]
    pub admin_listen: SocketAddr,

    /// Where callers' identities come from: none (everyone is `anonymous`), istio-xfcc (the
    /// Istio sidecar's x-forwarded-client-cert), linkerd (l5d-client-id) or mtls (the URI SAN
    /// of the client certificate, with --tls-*). Only this source is read; every other
    /// identity header is ignored.
    #[arg(long, env = "ECR_IMAGE_SERVICE_IDENTITY_SOURCE", value_enum, default_value_t = IdentitySource::None)]
    pub identity_source: IdentitySource,

    /// Authorization policy (YAML allow rules; re-read when it changes). Without it every
    /// caller may do everything, which start-up warns about.
    #[arg(long, env = "ECR_IMAGE_SERVICE_AUTHZ_POLICY")]
    pub authz_policy: Option<std::path::PathBuf>,

    /// The server's certificate chain (PEM), with `--identity-source mtls`; re-read when it
    /// changes.
    #[arg(long, env = "ECR_IMAGE_SERVICE_TLS_CERT")]
    pub tls_cert: Option<std::path::PathBuf>,

    /// The server's private key (PEM), with `--identity-source mtls`.
    #[arg(long, env = "ECR_IMAGE_SERVICE_TLS_KEY")]
    pub tls_key: Option<std::path::PathBuf>,

    /// The CA client certificates must chain to (PEM), with `--identity-source mtls`.
    #[arg(long, env = "ECR_IMAGE_SERVICE_TLS_CLIENT_CA")]
    pub tls_client_ca: Option<std::path::PathBuf>,

    /// A file of at least 32 bytes that signs ListImages/DescribeImages page tokens, shared by
    /// every replica (a Kubernetes Secret) so a page from one continues on another. Without it
    /// each process draws a random key, and a token only works on the replica that issued it.
    #[arg(long, env = "ECR_IMAGE_SERVICE_PAGE_TOKEN_KEY_FILE")]
    pub page_token_key_file: Option<std::path::PathBuf>,

    /// How often each watched repository is polled (one BatchGetImage per 100 watched tags).
    #[arg(long, env = "ECR_IMAGE_SERVICE_WATCH_POLL_INTERVAL", default_value_t = Human::from(crate::api::watch::DEFAULT_POLL_INTERVAL))]
    pub watch_poll_interval: Human,

    /// How often a quiet WatchTag stream gets a heartbeat.
    #[arg(long, env = "ECR_IMAGE_SERVICE_WATCH_HEARTBEAT_INTERVAL", default_value_t = Human::from(crate::api::watch::DEFAULT_HEARTBEAT_INTERVAL))]
    pub watch_heartbeat_interval: Human,

    /// WatchTag streams one replica holds; more get RESOURCE_EXHAUSTED.
    #[arg(long, env = "ECR_IMAGE_SERVICE_MAX_WATCHES", default_value_t = crate::api::watch::DEFAULT_MAX_WATCHES)]
    pub max_watches: usize,

    /// Of `--max-watches`, how many one caller (principal) may hold on this replica.
    #[arg(long, env = "ECR_IMAGE_SERVICE_MAX_WATCHES_PER_CALLER", default_value_t = crate::api::watch::DEFAULT_MAX_WATCHES_PER_CALLER)]
    pub max_watches_per_caller: usize,

    /// Distinct repositories one caller's watches may span on this replica (each is polled
    /// once per `--watch-poll-interval`).
    #[arg(long, env = "ECR_IMAGE_SERVICE_MAX_WATCHED_REPOSITORIES_PER_CALLER", default_value_t = crate::api::watch::DEFAULT_MAX_WATCHED_REPOSITORIES_PER_CALLER)]
    pub max_watched_repositories_per_caller: usize,

    /// Redis shared by the replicas (`redis://HOST:PORT`, `rediss://` for TLS, `unix:///path`):
    /// the ECR budgets are the whole quotas shared by the fleet, tag moves reach every replica
    /// at once, and one replica polls each watched repository. Optional: without it each
    /// replica is on its own, with quota / --rate-share.
    #[arg(long, env = "ECR_IMAGE_SERVICE_REDIS_URL")]
    pub redis_url: Option<String>,

    /// Registries in other AWS accounts and regions (YAML: account, roleArn, externalId,
    /// sessionDuration, regions; re-read when it changes). Without it only the service's own
    /// account and region are served. `--backend ecr` only.
    #[arg(long, env = "ECR_IMAGE_SERVICE_REGISTRIES")]
    pub registries: Option<std::path::PathBuf>,

    /// Whose name writes carry in CloudTrail: `none` (the service's role session), or
    /// `source-identity`: each caller's writes use a role session of their own, whose
    /// RoleSessionName and SourceIdentity name the caller. Needs a roleArn in the registries
    /// file for every account written to, the service's own included.
    #[arg(long, env = "ECR_IMAGE_SERVICE_ATTRIBUTE_WRITES", value_enum, default_value_t = AttributeWrites::None)]
    pub attribute_writes: AttributeWrites,

    /// AssumeRole calls per second, at most, for the whole process.
    #[arg(long, env = "ECR_IMAGE_SERVICE_STS_RATE", default_value_t = crate::registry::ecr::roles::DEFAULT_STS_RATE)]
    pub sts_rate: f64,

    /// Attributed write sessions kept (least recently used dropped), with
    /// `--attribute-writes source-identity`.
    #[arg(long, env = "ECR_IMAGE_SERVICE_MAX_ATTRIBUTED_SESSIONS", default_value_t = crate::registry::ecr::lanes::DEFAULT_MAX_ATTRIBUTED_SESSIONS)]
    pub max_attributed_sessions: u64,

    /// Audit events (one JSON line on stderr per write, per retag target, per deleted id and
    /// per denial): `on`, or `off` where another system already records every write.
    #[arg(long, env = "ECR_IMAGE_SERVICE_AUDIT", value_enum, default_value_t = Switch::On)]
    pub audit: Switch,

    /// How long a verification verdict stands (the policy's `verify:` rules): a new scan
    /// finding or a removed signature is seen within it; a changed rule at once.
    #[arg(long, env = "ECR_IMAGE_SERVICE_VERDICT_TTL", default_value_t = Human::from(crate::access::verify::DEFAULT_VERDICT_TTL))]
    pub verdict_ttl: Human,

    /// PEM CA certificates trusted for a `rediss://` --redis-url instead of the system's
    /// roots (a private CA; ElastiCache needs none).
    #[arg(long, env = "ECR_IMAGE_SERVICE_REDIS_CA_FILE")]
    pub redis_ca_file: Option<std::path::PathBuf>,

    /// AWS region of the registry [default: the SDK's chain: AWS_REGION, profile, IMDS].
    #[arg(long, env = "ECR_IMAGE_SERVICE_REGION")]
    pub region: Option<String>,

    /// ECR endpoint URL, for emulators and VPC endpoints [default: the SDK's chain:
    /// AWS_ENDPOINT_URL_ECR, AWS_ENDPOINT_URL, else the regional endpoint].
    #[arg(long, env = "ECR_IMAGE_SERVICE_ECR_ENDPOINT_URL")]
    pub ecr_endpoint_url: Option<String>,

    /// Attempts per ECR call, the first included (1 disables retries).
    #[arg(long, env = "ECR_IMAGE_SERVICE_MAX_ATTEMPTS", default_value_t = ecr::DEFAULT_MAX_ATTEMPTS)]
    pub max_attempts: u32,

    /// Backoff ceiling before the first retry; doubles per retry, with full jitter.
    #[arg(long, env = "ECR_IMAGE_SERVICE_INITIAL_BACKOFF", default_value_t = Human::from(ecr::DEFAULT_INITIAL_BACKOFF))]
    pub initial_backoff: Human,

    /// Largest backoff between two attempts.
    #[arg(long, env = "ECR_IMAGE_SERVICE_MAX_BACKOFF", default_value_t = Human::from(ecr::DEFAULT_MAX_BACKOFF))]
    pub max_backoff: Human,

    /// Time allowed to open a connection to ECR.
    #[arg(long, env = "ECR_IMAGE_SERVICE_CONNECT_TIMEOUT", default_value_t = Human::from(ecr::DEFAULT_CONNECT_TIMEOUT))]
    pub connect_timeout: Human,

    /// Time allowed for one attempt of an ECR call (a timed-out attempt is retried).
    #[arg(long, env = "ECR_IMAGE_SERVICE_ATTEMPT_TIMEOUT", default_value_t = Human::from(ecr::DEFAULT_ATTEMPT_TIMEOUT))]
    pub attempt_timeout: Human,

    /// Time allowed for a whole ECR call, every attempt and backoff included.
    #[arg(long, env = "ECR_IMAGE_SERVICE_OPERATION_TIMEOUT", default_value_t = Human::from(ecr::DEFAULT_OPERATION_TIMEOUT))]
    pub operation_timeout: Human,

    /// ECR calls in flight at once, each from its rate-budget slot to ECR's answer (a wait for
    /// a budget slot holds none); an attempt past it is refused with UNAVAILABLE + RetryInfo,
    /// unsent. Callers joining a read in flight are not counted.
    #[arg(long, env = "ECR_IMAGE_SERVICE_MAX_UPSTREAM_CALLS", default_value_t = slots::DEFAULT_MAX_UPSTREAM_CALLS)]
    pub max_upstream_calls: usize,

    /// Of `--max-upstream-calls`, how many one caller (principal) may have in flight: one
    /// caller whose calls ECR answers slowly cannot take every other caller's slots.
    #[arg(long, env = "ECR_IMAGE_SERVICE_MAX_UPSTREAM_CALLS_PER_CALLER", default_value_t = slots::DEFAULT_MAX_UPSTREAM_CALLS_PER_CALLER)]
    pub max_upstream_calls_per_caller: usize,

    /// Budget of the digest -> manifest cache, in bytes (suffixes KiB, MiB, GiB).
    #[arg(long, env = "ECR_IMAGE_SERVICE_DIGEST_CACHE_BYTES", default_value_t = cached::DEFAULT_DIGEST_CACHE_BYTES, value_parser = parse_bytes)]
    pub digest_cache_bytes: u64,

    /// How many tag -> digest resolutions to keep.
    #[arg(long, env = "ECR_IMAGE_SERVICE_TAG_CACHE_ENTRIES", default_value_t = cached::DEFAULT_TAG_CACHE_ENTRIES)]
    pub tag_cache_entries: u64,

    /// How long a tag resolution is served from cache unless a request asks for fresher.
    #[arg(long, env = "ECR_IMAGE_SERVICE_TAG_TTL", default_value_t = Human::from(cached::DEFAULT_TAG_TTL))]
    pub tag_ttl: Human,

    /// Oldest tag resolution served (flagged stale) while ECR throttles or fails; 0 disables.
    #[arg(long, env = "ECR_IMAGE_SERVICE_STALE_IF_ERROR", default_value_t = Human::from(cached::DEFAULT_STALE_IF_ERROR))]
    pub stale_if_error: Human,

    /// How long the first miss of an idle repository waits to batch with others.
    #[arg(long, env = "ECR_IMAGE_SERVICE_BATCH_WINDOW", default_value_t = Human::from(ecr::DEFAULT_BATCH_WINDOW))]
    pub batch_window: Human,

    /// Deadline of a request that sends no grpc-timeout.
    #[arg(long, env = "ECR_IMAGE_SERVICE_DEFAULT_DEADLINE", default_value_t = Human::from(server::DEFAULT_DEADLINE))]
    pub default_deadline: Human,

    /// ImageService requests in flight at once; more are shed with UNAVAILABLE + RetryInfo.
    #[arg(long, env = "ECR_IMAGE_SERVICE_MAX_CONCURRENT_REQUESTS", default_value_t = server::DEFAULT_MAX_CONCURRENT_REQUESTS)]
    pub max_concurrent_requests: usize,

    /// Request bytes held at once (bodies received or arriving); a request that would pass it
    /// is shed with UNAVAILABLE + RetryInfo. Size it from the pod's memory limit (see the chart).
    #[arg(long, env = "ECR_IMAGE_SERVICE_MAX_REQUEST_BYTES_IN_FLIGHT", default_value_t = server::DEFAULT_MAX_REQUEST_BYTES_IN_FLIGHT)]
    pub max_request_bytes_in_flight: usize,

    /// How long a request's body may take to arrive after its headers; a slower one gets
    /// DEADLINE_EXCEEDED (REQUEST_BODY_TIMEOUT).
    #[arg(long, env = "ECR_IMAGE_SERVICE_REQUEST_BODY_TIMEOUT", default_value_t = Human::from(server::DEFAULT_REQUEST_BODY_TIMEOUT))]
    pub request_body_timeout: Human,

    /// Connections open at once on the gRPC port; one more is closed as soon as it is accepted.
    #[arg(long, env = "ECR_IMAGE_SERVICE_MAX_CONNECTIONS", default_value_t = server::DEFAULT_MAX_CONNECTIONS)]
    pub max_connections: usize,

    /// Threads that serve requests (Tokio's multi-threaded scheduler). Unset: the CPUs this
    /// process may use (CPU affinity and cgroup quota).
    #[arg(long, env = "ECR_IMAGE_SERVICE_WORKER_THREADS")]
    pub worker_threads: Option<usize>,

    /// PutImage requests per second the account allows (ECR quota L-AD52DFB2).
    #[arg(long, env = "ECR_IMAGE_SERVICE_PUT_IMAGE_RATE", default_value_t = ecr::DEFAULT_PUT_IMAGE_RATE)]
    pub put_image_rate: f64,

    /// BatchGetImage requests per second the account allows (ECR quota L-16E70933).
    #[arg(long, env = "ECR_IMAGE_SERVICE_BATCH_GET_IMAGE_RATE", default_value_t = ecr::DEFAULT_BATCH_GET_IMAGE_RATE)]
    pub batch_get_image_rate: f64,

    /// BatchDeleteImage requests per second (ECR publishes no quota; conservative default).
    #[arg(long, env = "ECR_IMAGE_SERVICE_BATCH_DELETE_IMAGE_RATE", default_value_t = ecr::DEFAULT_BATCH_DELETE_IMAGE_RATE)]
    pub batch_delete_image_rate: f64,

    /// ListImages and DescribeImages requests per second, each (no published quota).
    #[arg(long, env = "ECR_IMAGE_SERVICE_LISTING_RATE", default_value_t = ecr::DEFAULT_LISTING_RATE)]
    pub listing_rate: f64,

    /// Processes sharing those quotas (the HPA's maximum replicas): without --redis-url each
    /// paces itself at rate / share; with it, the share used while Redis cannot answer and the
    /// live replica count is unknown.
    #[arg(long, env = "ECR_IMAGE_SERVICE_RATE_SHARE", default_value_t = 1)]
    pub rate_share: u32,

    /// After SIGTERM, how long to keep serving with health NOT_SERVING before refusing
    /// connections.
    #[arg(long, env = "ECR_IMAGE_SERVICE_SHUTDOWN_DELAY", default_value_t = Human::from(server::DEFAULT_SHUTDOWN_DELAY))]
    pub shutdown_delay: Human,

    /// Then, how long in-flight requests have to finish.
    #[arg(long, env = "ECR_IMAGE_SERVICE_SHUTDOWN_GRACE", default_value_t = Human::from(server::DEFAULT_SHUTDOWN_GRACE))]
    pub shutdown_grace: Human,

    /// Serve gRPC reflection (v1 and v1alpha): `--reflection false` turns it off.
    #[arg(long, env = "ECR_IMAGE_SERVICE_REFLECTION", default_value_t = true, action = clap::ArgAction::Set)]
    pub reflection: bool,

    /// Log line format.
    #[arg(long, env = "ECR_IMAGE_SERVICE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// Log filter in tracing's EnvFilter syntax, e.g. `info` or `info,ecr_image_service=debug`.
    #[arg(long, env = "ECR_IMAGE_SERVICE_LOG", default_value = "info")]
    pub log_filter: String,

    /// OpenTelemetry collector to export spans to over OTLP/gRPC (e.g.
    /// `http://otel-collector:4317`): one span per RPC, continuing the caller's `traceparent`,
    /// and one per ECR call with its request ID. Off when unset. `OTEL_SERVICE_NAME`,
    /// `OTEL_RESOURCE_ATTRIBUTES` and `OTEL_BSP_*` are honoured.
    #[arg(long, env = "ECR_IMAGE_SERVICE_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
}

/// A configuration that parses but cannot work.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// A value outside its allowed range or shape.
    #[error("{flag}: {problem}")]
    Invalid {
        /// The flag at fault (its env twin is named in the README).
        flag: &'static str,
        /// What is wrong with it.
        problem: String,
    },
}

fn invalid(flag: &'static str, problem: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        flag,
        problem: problem.into(),
    }
}

impl ServeArgs {
    /// The embedded store's settings (`--backend local`).
    pub fn local_settings(&self) -> LocalSettings {
        LocalSettings {
            data_dir: self.data_dir.clone().unwrap_or_default(),
            registry_id: self.local_registry_id.clone(),
            immutable_repositories: self.immutable_repositories.clone(),
        }
    }

    /// Checks what clap's types cannot: ranges, orderings and shapes.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.backend == Backend::Local && self.registries.is_some() {
            return Err(invalid(
                "--registries",
                "is for --backend ecr (the embedded store is one registry)",
            ));
        }
        if self.attribute_writes == AttributeWrites::SourceIdentity && self.registries.is_none() {
            return Err(invalid(
                "--attribute-writes",
                "source-identity needs --registries: a roleArn for every account written to, \
                 the service's own included, is the role each caller's session assumes",
            ));
        }
        if !(self.sts_rate > 0.0 && self.sts_rate.is_finite()) {
            return Err(invalid("--sts-rate", "must be a positive number"));
        }
        if self.max_attributed_sessions == 0 {
            return Err(invalid("--max-attributed-sessions", "must be at least 1"));
        }
        if self.backend == Backend::Local && self.data_dir.is_none() {
            return Err(invalid(
                "--data-dir",
                "is required with --backend local (the directory of the embedded store)",
            ));
        }
        if RegistryId::parse(&self.local_registry_id).is_err() {
            return Err(invalid("--local-registry-id", "must be 12 digits"));
        }
        if let Some(bad) = self
            .immutable_repositories
            .iter()
            .find(|p| RepositoryName::parse(p.strip_suffix("/*").unwrap_or(p)).is_err())
        {
            return Err(invalid(
                "--immutable-repositories",
                format!("'{bad}' is not a repository name or a 'prefix/*' pattern"),
            ));
        }
        if !(1..=MAX_ATTEMPTS_LIMIT).contains(&self.max_attempts) {
            return Err(invalid(
                "--max-attempts",
                format!(
                    "must be 1 to {MAX_ATTEMPTS_LIMIT}, got {}",
                    self.max_attempts
                ),
            ));
        }
        let durations = [
            ("--initial-backoff", *self.initial_backoff),
            ("--max-backoff", *self.max_backoff),
            ("--connect-timeout", *self.connect_timeout),
            ("--attempt-timeout", *self.attempt_timeout),
            ("--operation-timeout", *self.operation_timeout),
        ];
        if let Some((flag, _)) = durations.iter().find(|(_, d)| d.is_zero()) {
            return Err(invalid(flag, "must be greater than zero"));
        }
        if self.initial_backoff > self.max_backoff {
            return Err(invalid(
                "--initial-backoff",
                "must not be larger than --max-backoff",
            ));
        }
        if self.attempt_timeout > self.operation_timeout {
            return Err(invalid(
                "--attempt-timeout",
                "must not be larger than --operation-timeout",
            ));
        }
        if let Some(region) = &self.region {
            let shaped = !region.is_empty()
                && region.len() <= 32
                && region
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
            if !shaped {
                return Err(invalid(
                    "--region",
                    format!("'{region}' is not an AWS region name such as 'us-east-1'"),
                ));
            }
        }
        if let Some(url) = &self.ecr_endpoint_url {
            check_endpoint_url("--ecr-endpoint-url", url)?;
        }
        if let Some(url) = &self.otlp_endpoint {
            check_endpoint_url("--otlp-endpoint", url)?;
        }
        if *self.batch_window > MAX_BATCH_WINDOW {
            return Err(invalid(
                "--batch-window",
                format!("must be at most {MAX_BATCH_WINDOW:?}"),
            ));
        }
        for (flag, rate) in [
            ("--put-image-rate", self.put_image_rate),
            ("--batch-get-image-rate", self.batch_get_image_rate),
            ("--batch-delete-image-rate", self.batch_delete_image_rate),
            ("--listing-rate", self.listing_rate),
        ] {
            if !(rate.is_finite() && rate > 0.0) {
                return Err(invalid(
                    flag,
                    "must be a positive number of requests per second",
                ));
            }
        }
        if self.rate_share == 0 {
            return Err(invalid("--rate-share", "must be at least 1"));
        }
        if self.max_concurrent_requests == 0 {
            return Err(invalid("--max-concurrent-requests", "must be at least 1"));
        }
        if self.max_request_bytes_in_flight < crate::api::methods::MAX_REQUEST_BYTES + 5 {
            return Err(invalid(
                "--max-request-bytes-in-flight",
                format!(
                    "must hold at least one largest request ({} bytes)",
                    crate::api::methods::MAX_REQUEST_BYTES + 5
                ),
            ));
        }
        if self.request_body_timeout.is_zero() {
            return Err(invalid(
                "--request-body-timeout",
                "must be greater than zero",
            ));
        }
        if self.watch_poll_interval.is_zero() || self.watch_heartbeat_interval.is_zero() {
            return Err(invalid(
                "--watch-poll-interval",
                "the watch intervals must be greater than zero",
            ));
        }
        if self.max_watches_per_caller == 0 || self.max_watched_repositories_per_caller == 0 {
            return Err(invalid(
                "--max-watches-per-caller",
                "the per-caller watch limits must be at least 1",
            ));
        }
        if self.max_upstream_calls == 0 {
            return Err(invalid("--max-upstream-calls", "must be at least 1"));
        }
        if self.max_upstream_calls_per_caller == 0
            || self.max_upstream_calls_per_caller > self.max_upstream_calls
        {
            return Err(invalid(
                "--max-upstream-calls-per-caller",
                "must be at least 1 and at most --max-upstream-calls",
            ));
        }
        if self.max_connections == 0 {
            return Err(invalid("--max-connections", "must be at least 1"));
        }
        if self
            .worker_threads
            .is_some_and(|n| !(1..=crate::runtime::MAX_WORKER_THREADS).contains(&n))
        {
            return Err(invalid(
                "--worker-threads",
                format!(
                    "must be at least 1 and at most {}",
                    crate::runtime::MAX_WORKER_THREADS
                ),
            ));
        }
        if self.default_deadline.is_zero() {
            return Err(invalid("--default-deadline", "must be greater than zero"));
        }
        if self.digest_cache_bytes > u64::from(u32::MAX) * 1024 {
            return Err(invalid("--digest-cache-bytes", "must be at most 4 TiB"));
        }
        tracing_subscriber::EnvFilter::try_new(&self.log_filter)
            .map_err(|e| invalid("--log-filter", e.to_string()))?;
        // The files themselves are read once, by server::Loaded::load, before anything starts.
        match (
            self.identity_source,
            self.tls_settings(),
            self.tls_cert.is_some() || self.tls_key.is_some() || self.tls_client_ca.is_some(),
        ) {
            (IdentitySource::Mtls, None, _) => {
                return Err(invalid(
                    "--identity-source",
                    "mtls needs --tls-cert, --tls-key and --tls-client-ca",
                ));
            }
            (IdentitySource::Mtls, Some(_), _) => {}
            (_, _, true) => {
                return Err(invalid(
                    "--tls-cert",
                    "the --tls-* files are only used with --identity-source mtls",
                ));
            }
            _ => {}
        }
        self.redis_client()?;
        Ok(())
    }

    /// The ECR part of the configuration.
    pub fn ecr_settings(&self) -> EcrSettings {
        EcrSettings {
            region: self.region.clone(),
            endpoint_url: self.ecr_endpoint_url.clone(),
            max_attempts: self.max_attempts,
            initial_backoff: *self.initial_backoff,
            max_backoff: *self.max_backoff,
            connect_timeout: *self.connect_timeout,
            attempt_timeout: *self.attempt_timeout,
            operation_timeout: *self.operation_timeout,
            put_image_rate: self.put_image_rate,
            batch_get_image_rate: self.batch_get_image_rate,
            batch_delete_image_rate: self.batch_delete_image_rate,
            listing_rate: self.listing_rate,
            rate_share: self.rate_share,
            batch_window: *self.batch_window,
            max_upstream_calls: self.max_upstream_calls,
            max_upstream_calls_per_caller: self.max_upstream_calls_per_caller,
        }
    }

    /// The server part of the configuration.
    pub fn server_settings(&self) -> ServerSettings {
        ServerSettings {
            listen: self.listen,
            admin_listen: self.admin_listen,
            max_concurrent_requests: self.max_concurrent_requests,
            max_request_bytes_in_flight: self.max_request_bytes_in_flight,
            request_body_timeout: *self.request_body_timeout,
            max_connections: self.max_connections,
            default_deadline: *self.default_deadline,
            shutdown_delay: *self.shutdown_delay,
            shutdown_grace: *self.shutdown_grace,
            reflection: self.reflection,
            identity_source: self.identity_source,
            authz_policy: self.authz_policy.clone(),
            tls: self.tls_settings(),
            page_token_key: self.page_token_key_file.clone(),
            watch: crate::api::watch::WatchSettings {
                poll_interval: *self.watch_poll_interval,
                heartbeat_interval: *self.watch_heartbeat_interval,
                max_watches: self.max_watches,
                max_watches_per_caller: self.max_watches_per_caller,
                max_watched_repositories_per_caller: self.max_watched_repositories_per_caller,
            },
            // The embedded store's registry is configured; ECR's account is known only once
            // the credentials are (app::serve).
            own_registry_id: match self.backend {
                Backend::Local => Some(self.local_registry_id.clone()),
                Backend::Ecr => None,
            },
            audit: self.audit == Switch::On,
            verdict_ttl: *self.verdict_ttl,
        }
    }

    /// The three TLS files, when all are given.
    /// The Redis client of `--redis-url` and `--redis-ca-file`, if any.
    pub fn redis_client(&self) -> Result<Option<redis::Client>, ConfigError> {
        let Some(url) = &self.redis_url else {
            if self.redis_ca_file.is_some() {
                return Err(invalid("--redis-ca-file", "needs a rediss:// --redis-url"));
            }
            return Ok(None);
        };
        let ca = match &self.redis_ca_file {
            Some(_) if !url.starts_with("rediss://") => {
                return Err(invalid("--redis-ca-file", "needs a rediss:// --redis-url"));
            }
            Some(path) => Some(
                std::fs::read(path)
                    .map_err(|e| invalid("--redis-ca-file", format!("{}: {e}", path.display())))?,
            ),
            None => None,
        };
        crate::fleet::client(url, ca.as_deref())
            .map(Some)
            .map_err(|e| invalid("--redis-url", e))
    }

    fn tls_settings(&self) -> Option<crate::transport::tls::TlsSettings> {
        Some(crate::transport::tls::TlsSettings {
            cert: self.tls_cert.clone()?,
            key: self.tls_key.clone()?,
            client_ca: self.tls_client_ca.clone()?,
        })
    }

    /// The cache part of the configuration.
    pub fn cache_settings(&self) -> CacheSettings {
        CacheSettings {
            digest_cache_bytes: self.digest_cache_bytes,
            tag_cache_entries: self.tag_cache_entries,
            tag_ttl: *self.tag_ttl,
            stale_if_error: *self.stale_if_error,
        }
    }
}

/// Parses `64MiB`, `512KiB`, `1GiB` or a plain number of bytes.
fn parse_bytes(text: &str) -> Result<u64, String> {
    let units = [
        ("GiB", 1u64 << 30),
        ("MiB", 1 << 20),
        ("KiB", 1 << 10),
        ("B", 1),
    ];
    let (number, unit) = units
        .iter()
        .find_map(|(suffix, unit)| text.strip_suffix(suffix).map(|n| (n, *unit)))
        .unwrap_or((text, 1));
    number
        .trim()
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(unit))
        .ok_or_else(|| format!("'{text}' is not a size such as 64MiB"))
}

fn check_endpoint_url(flag: &'static str, url: &str) -> Result<(), ConfigError> {
    let uri: http::Uri = url
        .parse()
        .map_err(|e| invalid(flag, format!("'{url}' is not a URL: {e}")))?;
    let scheme_ok = matches!(uri.scheme_str(), Some("http" | "https"));
    if !scheme_ok || uri.host().is_none_or(str::is_empty) {
        return Err(invalid(
            flag,
            format!("'{url}' must be an http:// or https:// URL with a host"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    use clap::Parser;

    /// `serve`'s flags alone, as the binary parses them.
    #[derive(Parser)]
    struct Serve {
        #[command(flatten)]
        args: ServeArgs,
    }

    fn parse(args: &[&str]) -> ServeArgs {
        let mut argv = vec!["serve"];
        argv.extend_from_slice(args);
        Serve::try_parse_from(argv).unwrap().args
    }

    #[test]
    fn defaults_are_valid() {
        let args = parse(&[]);
        assert_eq!(args.validate(), Ok(()));
        // clap's defaults are the settings types' defaults: one source for both.
        assert_eq!(args.ecr_settings(), EcrSettings::default());
        assert_eq!(args.cache_settings(), CacheSettings::default());
        assert_eq!(args.server_settings(), ServerSettings::default());
    }

    /// A CA file is for a rediss:// URL only, and must be readable.
    #[test]
    fn a_redis_ca_file_needs_a_tls_url() {
        let flag = |args: &[&str]| match parse(args).validate() {
            Err(ConfigError::Invalid { flag, .. }) => Some(flag),
            _ => None,
        };
        assert_eq!(
            flag(&["--redis-ca-file", "ca.pem"]),
            Some("--redis-ca-file")
        );
        assert_eq!(
            flag(&["--redis-url", "redis://r:6379", "--redis-ca-file", "ca.pem"]),
            Some("--redis-ca-file")
        );
        assert_eq!(
            flag(&[
                "--redis-url",
                "rediss://r:6379",
                "--redis-ca-file",
                "/nonexistent/ca.pem"
            ]),
            Some("--redis-ca-file")
        );
        assert_eq!(flag(&["--redis-url", "rediss://r:6379"]), None);
        assert_eq!(flag(&["--redis-url", "http://r"]), Some("--redis-url"));
    }

    /// The rates are the account's quotas; the share divides them when no Redis does better.
    #[test]
    fn rates_are_shared_between_replicas() {
        let settings = parse(&["--rate-share", "4"]).ecr_settings();
        assert_eq!(settings.put_image_rate, 10.0);
        assert_eq!(settings.batch_get_image_rate, 2000.0);
        assert_eq!(settings.rate_share, 4);
    }

    #[test]
    fn sizes_take_binary_suffixes() {
        assert_eq!(parse_bytes("64MiB"), Ok(64 << 20));
        assert_eq!(parse_bytes("512KiB"), Ok(512 << 10));
        assert_eq!(parse_bytes("1GiB"), Ok(1 << 30));
        assert_eq!(parse_bytes("1000"), Ok(1000));
        assert!(parse_bytes("lots").is_err());
        assert!(parse_bytes("99999999999GiB").is_err());
    }

    #[test]
    fn bad_values_name_their_flag() {
        for (argv, flag) in [
            (&["--max-attempts", "0"][..], "--max-attempts"),
            (&["--max-attempts", "11"], "--max-attempts"),
            (&["--initial-backoff", "0s"], "--initial-backoff"),
            (
                &["--initial-backoff", "3s", "--max-backoff", "1s"],
                "--initial-backoff",
            ),
            (&["--attempt-timeout", "20s"], "--attempt-timeout"),
            (&["--region", "US East"], "--region"),
            (&["--ecr-endpoint-url", "ftp://x"], "--ecr-endpoint-url"),
            (&["--ecr-endpoint-url", "not a url"], "--ecr-endpoint-url"),
            (&["--log-filter", "info,[="], "--log-filter"),
            (&["--batch-window", "1s"], "--batch-window"),
            (&["--put-image-rate", "0"], "--put-image-rate"),
            (&["--rate-share", "0"], "--rate-share"),
            (
                &["--max-concurrent-requests", "0"],
                "--max-concurrent-requests",
            ),
        ] {
            match parse(argv).validate() {
                Err(ConfigError::Invalid { flag: got, .. }) => assert_eq!(got, flag, "{argv:?}"),
                Ok(()) => panic!("{argv:?} should be refused"),
            }
        }
    }
}

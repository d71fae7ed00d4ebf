//! The roles the service assumes: one session per account of the registries file, and with
//! `--attribute-writes source-identity` one per (account, caller) for writes, named for the
//! caller so that CloudTrail shows who asked.
//!
//! One provider for both, over `aws-sdk-sts` rather than `aws_config::sts::AssumeRoleProvider`,
//! because the latter sets no `SourceIdentity` and retries a failing STS on every request. Here
//! each session is assumed once and kept until [`REFRESH_BEFORE`] its expiry, concurrent
//! callers wait for the one AssumeRole in flight, a failure is remembered for
//! [`FAILURE_COOLDOWN`] (never a tight loop against STS), and every AssumeRole of the process
//! takes a turn of one shared pace ([`StsPace`]).

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use aws_credential_types::Credentials;
use aws_credential_types::provider::error::CredentialsError;
use aws_credential_types::provider::{ProvideCredentials, future};
use aws_sdk_sts::error::ProvideErrorMetadata;
use aws_sdk_sts::operation::RequestId;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use sha2::{Digest as _, Sha256};
use tokio::sync::Mutex;
use tokio::time::Instant;

use crate::registry::accounts::Role;

/// Refresh a session this long before it expires: writes in flight finish on the old one,
/// and the SDK's own identity cache (which refreshes 10 s before) never sees it lapse.
pub const REFRESH_BEFORE: Duration = Duration::from_secs(5 * 60);
/// After a failed AssumeRole, answer with the same failure for this long without asking STS
/// again: a trust policy being fixed takes minutes, and a herd of callers must not turn one
/// misconfiguration into an STS throttling incident.
pub const FAILURE_COOLDOWN: Duration = Duration::from_secs(5);
/// AssumeRole calls per second of the whole process. STS's request quota is hundreds per
/// second per account and region, shared with everything else in the account; sessions are
/// cached for most of an hour, so 20 a second starts 1,000 callers' sessions in under a
/// minute while leaving STS's quota to others.
pub const DEFAULT_STS_RATE: f64 = 20.0;
/// The session name of the service's own session in another account.
pub const SHARED_SESSION_NAME: &str = "ecr-image-service";
/// STS's codes that mean the configuration is wrong (trust policy, role, parameters), not
/// that STS is having a bad moment: PERMISSION_DENIED, not worth a caller's retry.
const DENIED_CODES: &[&str] = &[
    "AccessDenied",
    "AccessDeniedException",
    "MalformedPolicyDocument",
    "PackedPolicyTooLarge",
    "RegionDisabledException",
    "ValidationError",
    "InvalidClientTokenId",
];

/// Why a role could not be assumed: the error the credentials provider hands the SDK, found
/// again in the ECR call's error chain by the classifier.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("assuming role {role} failed: {message}")]
pub struct AssumeRoleFailure {
    /// The role's ARN.
    pub role: String,
    /// Whether STS refused (configuration) rather than failed (availability).
    pub denied: bool,
    /// STS's error code, when it answered.
    pub code: Option<String>,
    /// STS's request id, when it answered.
    pub request_id: Option<String>,
    /// What STS said, or why it did not answer.
    pub message: String,
}

/// The one pace every AssumeRole of the process keeps.
#[derive(Debug)]
pub struct StsPace {
    interval: Duration,
    next: std::sync::Mutex<Instant>,
    /// AssumeRole calls made, by kind (`shared`, `attributed`) and outcome.
    calls: Family<[(&'static str, &'static str); 2], Counter>,
}

impl StsPace {
    /// `rate` AssumeRole calls a second at most.
    pub fn new(rate: f64) -> Arc<Self> {
        Arc::new(Self {
            interval: Duration::from_secs_f64(1.0 / rate.max(0.001)),
            next: std::sync::Mutex::new(Instant::now()),
            calls: Family::default(),
        })
    }

    /// Waits for this call's turn.
    async fn turn(&self) {
        let at = {
            let mut next = self
                .next
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let at = (*next).max(Instant::now());
            *next = at + self.interval;
            at
        };
        tokio::time::sleep_until(at).await;
    }

    /// Adds `imageservice_sts_assume_role_calls_total{kind,outcome}`.
    pub fn register_metrics(&self, metrics: &mut prometheus_client::registry::Registry) {
        metrics.register(
            "sts_assume_role_calls",
            "AssumeRole calls by kind (shared, attributed) and outcome (ok, failed)",
            self.calls.clone(),
        );
    }
}

/// One role session, assumed on first use and kept fresh.
#[derive(Debug)]
pub struct AssumedRole {
    sts: aws_sdk_sts::Client,
    role: Role,
    session_name: String,
    /// The caller, for attributed sessions.
    source_identity: Option<String>,
    pace: Arc<StsPace>,
    state: Mutex<State>,
}

#[derive(Debug)]
enum State {
    Empty,
    Ready(Credentials),
    Failed {
        failure: AssumeRoleFailure,
        until: Instant,
    },
}

impl AssumedRole {
    /// The service's own session in `role`'s account.
    pub fn shared(sts: aws_sdk_sts::Client, role: Role, pace: Arc<StsPace>) -> Self {
        Self::new(sts, role, SHARED_SESSION_NAME.to_owned(), None, pace)
    }

    /// A session for `principal`'s writes: its name and source identity are
    /// [`attribution_name`]'s.
    pub fn attributed(
        sts: aws_sdk_sts::Client,
        role: Role,
        principal: &str,
        pace: Arc<StsPace>,
    ) -> Self {
        let name = attribution_name(principal);
        Self::new(sts, role, name.clone(), Some(name), pace)
    }

    fn new(
        sts: aws_sdk_sts::Client,
        role: Role,
        session_name: String,
        source_identity: Option<String>,
        pace: Arc<StsPace>,
    ) -> Self {
        Self {
            sts,
            role,
            session_name,
            source_identity,
            pace,
            state: Mutex::new(State::Empty),
        }
    }

    /// The session's credentials: kept ones while fresh, else one AssumeRole (the callers
    /// arriving meanwhile wait for it), else the remembered failure while it cools down.
    pub async fn credentials(&self) -> Result<Credentials, AssumeRoleFailure> {
        let mut state = self.state.lock().await;
        match &*state {
            State::Ready(credentials) if fresh(credentials) => return Ok(credentials.clone()),
            State::Failed { failure, until } if Instant::now() < *until => {
                return Err(failure.clone());
            }
            _ => {}
        }
        self.pace.turn().await;
        let kind = if self.source_identity.is_some() {
            "attributed"
        } else {
            "shared"
        };
        let answer = self.assume().await;
        let outcome = if answer.is_ok() { "ok" } else { "failed" };
        self.pace
            .calls
            .get_or_create(&[("kind", kind), ("outcome", outcome)])
            .inc();
        match answer {
            Ok(credentials) => {
                tracing::info!(
                    role = %self.role.arn,
                    session = %self.session_name,
                    "assumed role"
                );
                *state = State::Ready(credentials.clone());
                Ok(credentials)
            }
            Err(failure) => {
                tracing::warn!(
                    role = %self.role.arn,
                    session = %self.session_name,
                    code = failure.code.as_deref().unwrap_or(""),
                    request_id = failure.request_id.as_deref().unwrap_or(""),
                    error = %failure.message,
                    "AssumeRole failed; refusing for {FAILURE_COOLDOWN:?} before asking STS again"
                );
                *state = State::Failed {
                    failure: failure.clone(),
                    until: Instant::now() + FAILURE_COOLDOWN,
                };
                Err(failure)
            }
        }
    }

    async fn assume(&self) -> Result<Credentials, AssumeRoleFailure> {
        let seconds = i32::try_from(self.role.session_duration.as_secs()).unwrap_or(3600);
        let sent = self
            .sts
            .assume_role()
            .role_arn(&self.role.arn)
            .role_session_name(&self.session_name)
            .set_external_id(self.role.external_id.clone())
            .set_source_identity(self.source_identity.clone())
            .duration_seconds(seconds)
            .send()
            .await;
        let failure = |denied, code: Option<&str>, request_id: Option<&str>, message: String| {
            AssumeRoleFailure {
                role: self.role.arn.clone(),
                denied,
                code: code.map(str::to_owned),
                request_id: request_id.map(str::to_owned),
                message,
            }
        };
        let output = sent.map_err(|err| {
            let code = err.code();
            let denied = code.is_some_and(|c| DENIED_CODES.contains(&c));
            let message = err
                .message()
                .map_or_else(|| crate::domain::text::with_sources(&err), str::to_owned);
            failure(denied, code, err.request_id(), message)
        })?;
        let Some(given) = output.credentials() else {
            return Err(failure(
                false,
                None,
                output.request_id(),
                "STS answered without credentials".to_owned(),
            ));
        };
        let expiry = SystemTime::try_from(*given.expiration()).ok();
        Ok(Credentials::new(
            given.access_key_id(),
            given.secret_access_key(),
            Some(given.session_token().to_owned()),
            expiry,
            "AssumeRole",
        ))
    }
}

/// Whether `credentials` will still be good [`REFRESH_BEFORE`] from now.
fn fresh(credentials: &Credentials) -> bool {
    credentials
        .expiry()
        .is_none_or(|at| at > SystemTime::now() + REFRESH_BEFORE)
}

impl ProvideCredentials for AssumedRole {
    fn provide_credentials<'a>(&'a self) -> future::ProvideCredentials<'a>
    where
        Self: 'a,
    {
        future::ProvideCredentials::new(async move {
            self.credentials()
                .await
                .map_err(CredentialsError::provider_error)
        })
    }
}

/// STS's limit on `RoleSessionName` and `SourceIdentity`.
const MAX_NAME: usize = 64;
/// Hex digits of the principal's SHA-256 that end every name: two principals that map to the
/// same readable part still get different names (a collision needs 2^32 principals).
const HASH_DIGITS: usize = 8;

/// A principal as STS's `RoleSessionName` and `SourceIdentity` take it: 2 to 64 characters of
/// `[A-Za-z0-9_+=,.@-]`, readable, and unique to the principal. A SPIFFE ID's namespace and
/// service account (`spiffe://td/ns/ci/sa/builder` -> `ci.builder`), anything else with each
/// disallowed character made `.`, cut to fit, then `-` and [`HASH_DIGITS`] hex digits of the
/// SHA-256 of the whole principal.
pub fn attribution_name(principal: &str) -> String {
    let readable = spiffe_workload(principal).unwrap_or_else(|| principal.to_owned());
    let allowed = |c: char| c.is_ascii_alphanumeric() || "_+=,.@-".contains(c);
    let mapped: String = readable
        .chars()
        .map(|c| if allowed(c) { c } else { '.' })
        .collect();
    let hash = Sha256::digest(principal.as_bytes());
    let hex: String = hash
        .iter()
        .take(HASH_DIGITS / 2)
        .map(|b| format!("{b:02x}"))
        .collect();
    let room = MAX_NAME - HASH_DIGITS - 1;
    let head: String = mapped.chars().take(room).collect();
    format!("{head}-{hex}")
}

/// `ns.sa` of `spiffe://<trust domain>/ns/<ns>/sa/<sa>`.
fn spiffe_workload(principal: &str) -> Option<String> {
    let path = principal.strip_prefix("spiffe://")?.split_once('/')?.1;
    let mut parts = path.split('/');
    match (
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
    ) {
        (Some("ns"), Some(ns), Some("sa"), Some(sa), None) => Some(format!("{ns}.{sa}")),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_readable_allowed_and_distinct() {
        let builder = attribution_name("spiffe://cluster.local/ns/ci/sa/builder");
        assert!(builder.starts_with("ci.builder-"), "{builder}");
        let other_domain = attribution_name("spiffe://other.local/ns/ci/sa/builder");
        assert!(other_domain.starts_with("ci.builder-"));
        assert_ne!(
            builder, other_domain,
            "same readable part, different principals"
        );
        let linkerd = attribution_name("builder.ci.serviceaccount.identity.linkerd.cluster.local");
        assert!(
            linkerd.starts_with("builder.ci.serviceaccount"),
            "{linkerd}"
        );
        let long = attribution_name(&format!("spiffe://x/{}", "a/".repeat(200)));
        for name in [&builder, &linkerd, &long, &attribution_name("anonymous")] {
            assert!((2..=MAX_NAME).contains(&name.len()), "{name}");
            assert!(
                name.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "_+=,.@-".contains(c)),
                "{name}"
            );
        }
    }
}

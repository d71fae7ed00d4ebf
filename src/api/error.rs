//! The service's error, and the one place it becomes a gRPC status.
//!
//! Every status carries exactly one `google.rpc.ErrorInfo` (AIP-193): a stable UPPER_SNAKE
//! [`Reason`], the [`ERROR_DOMAIN`], and ECR's error code and request ID when ECR was the cause.
//! INVALID_ARGUMENT adds a `google.rpc.BadRequest` naming the fields; throttling adds a
//! `google.rpc.RetryInfo`.

use std::collections::HashMap;
use std::time::Duration;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, FieldViolation, StatusExt};

use crate::access::authz::Action;
use crate::registry::{RegistryError, Upstream};

/// `ErrorInfo.domain` for every error this service returns.
pub const ERROR_DOMAIN: &str = "ecr-image-service";

/// How long a throttled caller is told to wait: ECR's rate quotas refill per second, so one
/// second is the shortest wait after which a retry has a fresh budget to land in.
pub const THROTTLED_RETRY_DELAY: Duration = Duration::from_secs(1);

/// How long a watcher whose stream ended waits before reconnecting: long enough to spread a
/// replica's watchers out, short next to a poll interval.
pub const WATCH_RETRY_DELAY: Duration = Duration::from_secs(1);

/// `ErrorInfo.metadata` key for ECR's error or failure code.
pub const METADATA_ECR_ERROR_CODE: &str = "ecrErrorCode";
/// `ErrorInfo.metadata` key for ECR's request ID.
pub const METADATA_ECR_REQUEST_ID: &str = "ecrRequestId";

/// The most violations one error lists: a request with a million bad entries costs the same
/// small answer as one with ten. Past this, the message says how many more there were.
pub const MAX_VIOLATIONS: usize = 10;
/// The longest description a violation carries (it may echo what the caller sent).
const MAX_DESCRIPTION_BYTES: usize = 256;
/// The longest field path a violation names.
const MAX_FIELD_BYTES: usize = 128;
/// The longest `grpc-message`: one HTTP/2 trailer, well under a kilobyte whatever the request.
const MAX_MESSAGE_BYTES: usize = 900;

pub use crate::domain::text::{truncated, with_sources};

/// One request field that failed validation, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// The field's path in the request, in proto spelling (`image_id.image_tag`).
    pub field: String,
    /// Why it was refused.
    pub description: String,
}

impl Violation {
    /// A violation of `field`, both bounded in size: a description may echo the caller's input.
    pub fn new(field: impl Into<String>, description: impl Into<String>) -> Self {
        let (field, description) = (field.into(), description.into());
        Self {
            field: truncated(&field, MAX_FIELD_BYTES),
            description: truncated(&description, MAX_DESCRIPTION_BYTES),
        }
    }
}

impl From<crate::access::authz::Denied> for Error {
    fn from(denied: crate::access::authz::Denied) -> Self {
        Self::AccessDenied {
            action: denied.action,
            repository: denied.repository,
        }
    }
}

/// Why a request failed: the service's own checks, or the registry.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request was refused before any registry call.
    #[error("invalid request: {}", describe(violations, *omitted))]
    InvalidArgument {
        /// Which rule was broken; [`Reason::InvalidField`] for plain format and limit checks.
        reason: Reason,
        /// The offending fields, at most [`MAX_VIOLATIONS`].
        violations: Vec<Violation>,
        /// How many more violations there were than are listed.
        omitted: usize,
    },
    /// The request message is larger than any legal request of its type; it was not decoded.
    #[error("the request is {bytes} bytes; requests of this type are at most {limit} bytes")]
    RequestTooLarge {
        /// The message's encoded size.
        bytes: usize,
        /// The largest accepted.
        limit: usize,
    },
    /// The caller's deadline passed before the answer was ready.
    #[error("the deadline passed before the answer was ready")]
    DeadlineExceeded,
    /// The request's body did not arrive within the header-to-body timeout.
    #[error("the request body did not arrive within {timeout:?} of its headers")]
    RequestBodyTimeout {
        /// The timeout.
        timeout: Duration,
    },
    /// Every request slot was taken; the request was shed without being worked on.
    #[error("the service is at its limit of requests in flight; retry after {retry_after:?}")]
    Overloaded {
        /// When a retry is likely to find a free slot.
        retry_after: Duration,
    },
    /// The caller's identity is missing or malformed (`--identity-source`).
    #[error("no valid caller identity from {source_name}: {why}")]
    Unauthenticated {
        /// The configured identity source.
        source_name: &'static str,
        /// What was wrong, in fixed words (never the header's value).
        why: &'static str,
    },
    /// The authorization policy does not allow this caller this action on this repository.
    #[error("the caller may not {action} repository {repository}")]
    AccessDenied {
        /// What was asked.
        action: Action,
        /// The (validated) repository.
        repository: String,
    },
    /// A WatchTag stream ends; the watcher reconnects (to any replica).
    #[error("the watch ended: {why}; reconnect")]
    WatchEnded {
        /// Why.
        why: &'static str,
    },
    /// A watch cap is reached: the replica's or the caller's.
    #[error("{0}")]
    TooManyWatches(crate::api::watch::WatchCap),
    /// The image is an index with no entry for the platform asked for.
    #[error("no image for platform {requested} in the index; it has: {available}")]
    PlatformNotFound {
        /// The platform asked for.
        requested: String,
        /// The index's platforms, comma-separated (`linux/amd64,linux/arm64/v8`).
        available: String,
    },
    /// The verification policy refused the image (enforce mode).
    #[error("the image {digest} does not pass verify rule {rule:?}: {refusal}")]
    Unverified {
        /// The rule.
        rule: String,
        /// The image.
        digest: String,
        /// Why.
        refusal: RefusalText,
    },
    /// The request names a registry this service does not serve: refused before any AWS call.
    #[error(
        "the registry asked for (account '{registry_id}', region '{region}'; empty means the \
         service's own) is not served here"
    )]
    RegistryNotConfigured {
        /// The account asked for ("" for the service's own).
        registry_id: String,
        /// The region asked for ("" for the service's own).
        region: String,
    },
    /// The registry failed or refused.
    #[error(transparent)]
    Registry(#[from] RegistryError),
}

/// A verification refusal, as errors carry it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefusalText(pub crate::access::verify::Refusal);

impl std::fmt::Display for RefusalText {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use crate::access::verify::Refusal as R;
        match &self.0 {
            R::SignatureRequired => f.write_str("it is not signed"),
            R::SignatureInvalid(why) => write!(f, "no signature verifies ({why})"),
            R::ScanFindingsOverLimit(counts) => {
                let counts: Vec<String> = counts.iter().map(|(k, v)| format!("{k} {v}")).collect();
                write!(
                    f,
                    "its scan findings are over the limit ({})",
                    counts.join(", ")
                )
            }
            R::ScanNotComplete(status) => {
                write!(f, "it has no complete scan (status {status}); retry later")
            }
        }
    }
}

/// How long a caller refused SCAN_NOT_COMPLETE should wait: ECR's basic scans take a minute
/// or two.
pub const SCAN_RETRY_DELAY: Duration = Duration::from_secs(30);

impl Error {
    /// A refused request: `reason` and its violations, at most [`MAX_VIOLATIONS`] of them
    /// kept, the rest counted.
    pub fn invalid(reason: Reason, violations: Vec<Violation>) -> Self {
        Self::invalid_beyond(reason, violations, 0)
    }

    /// [`Error::invalid`], when `omitted` violations were already left out upstream.
    pub fn invalid_beyond(reason: Reason, mut violations: Vec<Violation>, omitted: usize) -> Self {
        let omitted = omitted + violations.len().saturating_sub(MAX_VIOLATIONS);
        violations.truncate(MAX_VIOLATIONS);
        Self::InvalidArgument {
            reason,
            violations,
            omitted,
        }
    }
}

/// The violations as one message, bounded to [`MAX_MESSAGE_BYTES`].
fn describe(violations: &[Violation], omitted: usize) -> String {
    let parts: Vec<String> = violations
        .iter()
        .map(|v| format!("{}: {}", v.field, v.description))
        .collect();
    let mut message = parts.join("; ");
    if omitted > 0 {
        message.push_str(&format!("; and {omitted} more"));
    }
    truncated(&message, MAX_MESSAGE_BYTES)
}

/// `ErrorInfo.reason` values: stable identifiers clients may branch on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// A field breaks the API's limits.
    InvalidField,
    /// `image_digest` is not the SHA-256 of `image_manifest`.
    DigestMismatch,
    /// The declared media type differs from the manifest's `mediaType`.
    MediaTypeMismatch,
    /// No media type was given and none can be inferred.
    MediaTypeUndetermined,
    /// A tag and a digest name different images.
    TagDigestMismatch,
    /// ECR rejected a parameter.
    EcrInvalidParameter,
    /// No such repository.
    RepositoryNotFound,
    /// No such image.
    ImageNotFound,
    /// An immutable tag points elsewhere.
    TagAlreadyExists,
    /// Referenced blobs are missing.
    LayersNotFound,
    /// Referenced manifests are missing.
    ReferencedImagesNotFound,
    /// KMS failed.
    KmsError,
    /// The image cannot be read.
    ImageInaccessible,
    /// An ECR quota would be exceeded.
    EcrLimitExceeded,
    /// ECR throttled every attempt.
    EcrThrottled,
    /// ECR failed every attempt.
    EcrUnavailable,
    /// ECR did not answer in time.
    EcrTimeout,
    /// ECR denied the service's own identity.
    ServiceAccessDenied,
    /// The service's own credentials are unusable.
    ServiceCredentialsInvalid,
    /// Bytes from ECR do not match their digest.
    DigestVerificationFailed,
    /// Any other ECR error.
    EcrError,
    /// The caller's deadline passed.
    DeadlineExceeded,
    /// The service shed the request at its concurrency limit.
    Overloaded,
    /// This service's own ECR rate budget had no slot before the deadline.
    EcrRateBudgetExhausted,
    /// The request message is larger than any legal request of its type.
    RequestTooLarge,
    /// The request's body arrived too slowly after its headers.
    RequestBodyTimeout,
    /// The embedded store's disk is full.
    StoreFull,
    /// The caller's identity is missing or malformed.
    NoCallerIdentity,
    /// The authorization policy does not allow the request.
    AccessDenied,
    /// An index has no image for the platform asked for.
    PlatformNotFound,
    /// A watch stream ended (age limit, shutdown); reconnect.
    WatchEnded,
    /// The replica's watch cap is reached.
    TooManyWatches,
    /// Enforce mode: the image has no signature.
    SignatureRequired,
    /// Enforce mode: no signature verifies with a trusted key.
    SignatureInvalid,
    /// Enforce mode: findings over the gate.
    ScanFindingsOverLimit,
    /// Enforce mode: no complete scan, and one is required.
    ScanNotComplete,
    /// The request names a registry this service does not serve.
    RegistryNotConfigured,
    /// The service could not assume its role in the registry's account.
    AssumeRoleFailed,
}

impl Reason {
    /// Every reason, in the order of the error tables (README, proto comment).
    pub const ALL: [Reason; 38] = [
        Self::InvalidField,
        Self::DigestMismatch,
        Self::MediaTypeMismatch,
        Self::MediaTypeUndetermined,
        Self::TagDigestMismatch,
        Self::EcrInvalidParameter,
        Self::RepositoryNotFound,
        Self::ImageNotFound,
        Self::TagAlreadyExists,
        Self::LayersNotFound,
        Self::ReferencedImagesNotFound,
        Self::KmsError,
        Self::ImageInaccessible,
        Self::EcrLimitExceeded,
        Self::EcrThrottled,
        Self::EcrUnavailable,
        Self::EcrTimeout,
        Self::ServiceAccessDenied,
        Self::ServiceCredentialsInvalid,
        Self::DigestVerificationFailed,
        Self::EcrError,
        Self::DeadlineExceeded,
        Self::Overloaded,
        Self::EcrRateBudgetExhausted,
        Self::RequestTooLarge,
        Self::RequestBodyTimeout,
        Self::StoreFull,
        Self::NoCallerIdentity,
        Self::AccessDenied,
        Self::PlatformNotFound,
        Self::WatchEnded,
        Self::TooManyWatches,
        Self::SignatureRequired,
        Self::SignatureInvalid,
        Self::ScanFindingsOverLimit,
        Self::ScanNotComplete,
        Self::RegistryNotConfigured,
        Self::AssumeRoleFailed,
    ];

    /// The UPPER_SNAKE spelling used in `ErrorInfo.reason`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::InvalidField => "INVALID_FIELD",
            Self::DigestMismatch => "DIGEST_MISMATCH",
            Self::MediaTypeMismatch => "MEDIA_TYPE_MISMATCH",
            Self::MediaTypeUndetermined => "MEDIA_TYPE_UNDETERMINED",
            Self::TagDigestMismatch => "TAG_DIGEST_MISMATCH",
            Self::EcrInvalidParameter => "ECR_INVALID_PARAMETER",
            Self::RepositoryNotFound => "REPOSITORY_NOT_FOUND",
            Self::ImageNotFound => "IMAGE_NOT_FOUND",
            Self::TagAlreadyExists => "TAG_ALREADY_EXISTS",
            Self::LayersNotFound => "LAYERS_NOT_FOUND",
            Self::ReferencedImagesNotFound => "REFERENCED_IMAGES_NOT_FOUND",
            Self::KmsError => "KMS_ERROR",
            Self::ImageInaccessible => "IMAGE_INACCESSIBLE",
            Self::EcrLimitExceeded => "ECR_LIMIT_EXCEEDED",
            Self::EcrThrottled => "ECR_THROTTLED",
            Self::EcrUnavailable => "ECR_UNAVAILABLE",
            Self::EcrTimeout => "ECR_TIMEOUT",
            Self::ServiceAccessDenied => "SERVICE_ACCESS_DENIED",
            Self::ServiceCredentialsInvalid => "SERVICE_CREDENTIALS_INVALID",
            Self::DigestVerificationFailed => "DIGEST_VERIFICATION_FAILED",
            Self::EcrError => "ECR_ERROR",
            Self::DeadlineExceeded => "DEADLINE_EXCEEDED",
            Self::Overloaded => "OVERLOADED",
            Self::EcrRateBudgetExhausted => "ECR_RATE_BUDGET_EXHAUSTED",
            Self::RequestTooLarge => "REQUEST_TOO_LARGE",
            Self::RequestBodyTimeout => "REQUEST_BODY_TIMEOUT",
            Self::StoreFull => "STORE_FULL",
            Self::NoCallerIdentity => "NO_CALLER_IDENTITY",
            Self::AccessDenied => "ACCESS_DENIED",
            Self::PlatformNotFound => "PLATFORM_NOT_FOUND",
            Self::WatchEnded => "WATCH_ENDED",
            Self::TooManyWatches => "TOO_MANY_WATCHES",
            Self::SignatureRequired => "SIGNATURE_REQUIRED",
            Self::SignatureInvalid => "SIGNATURE_INVALID",
            Self::ScanFindingsOverLimit => "SCAN_FINDINGS_OVER_LIMIT",
            Self::ScanNotComplete => "SCAN_NOT_COMPLETE",
            Self::RegistryNotConfigured => "REGISTRY_NOT_CONFIGURED",
            Self::AssumeRoleFailed => "ASSUME_ROLE_FAILED",
        }
    }
}

impl Error {
    /// The gRPC code and `ErrorInfo.reason` for this error: the mapping table of the README.
    pub fn code_and_reason(&self) -> (Code, Reason) {
        use RegistryError as R;
        match self {
            Self::InvalidArgument { reason, .. } => (Code::InvalidArgument, *reason),
            Self::DeadlineExceeded => (Code::DeadlineExceeded, Reason::DeadlineExceeded),
            // The caller's own deadline may be later, but this request will not be worked on.
            Self::RequestBodyTimeout { .. } => (Code::DeadlineExceeded, Reason::RequestBodyTimeout),
            // gRPC's status table: a message over a limit is RESOURCE_EXHAUSTED.
            Self::RequestTooLarge { .. } => (Code::ResourceExhausted, Reason::RequestTooLarge),
            // UNAVAILABLE, not RESOURCE_EXHAUSTED: the one code retried by default (AIP-194) and
            // by mesh retry policies; nothing was done, so a retry is safe.
            Self::Overloaded { .. } => (Code::Unavailable, Reason::Overloaded),
            Self::Unauthenticated { .. } => (Code::Unauthenticated, Reason::NoCallerIdentity),
            Self::AccessDenied { .. } => (Code::PermissionDenied, Reason::AccessDenied),
            Self::PlatformNotFound { .. } => (Code::NotFound, Reason::PlatformNotFound),
            Self::RegistryNotConfigured { .. } => {
                (Code::FailedPrecondition, Reason::RegistryNotConfigured)
            }
            Self::Unverified { refusal, .. } => {
                use crate::access::verify::Refusal as V;
                match refusal.0 {
                    V::SignatureRequired => (Code::FailedPrecondition, Reason::SignatureRequired),
                    V::SignatureInvalid(_) => (Code::FailedPrecondition, Reason::SignatureInvalid),
                    V::ScanFindingsOverLimit(_) => {
                        (Code::FailedPrecondition, Reason::ScanFindingsOverLimit)
                    }
                    // Worth a retry: the scan will complete.
                    V::ScanNotComplete(_) => (Code::Unavailable, Reason::ScanNotComplete),
                }
            }
            // UNAVAILABLE: the one code clients and meshes retry; nothing is lost by it.
            Self::WatchEnded { .. } => (Code::Unavailable, Reason::WatchEnded),
            Self::TooManyWatches(_) => (Code::ResourceExhausted, Reason::TooManyWatches),
            Self::Registry(err) => match err {
                R::RepositoryNotFound(_) => (Code::NotFound, Reason::RepositoryNotFound),
                R::ImageNotFound(_) => (Code::NotFound, Reason::ImageNotFound),
                R::TagDigestMismatch(_) => (Code::InvalidArgument, Reason::TagDigestMismatch),
                R::TagAlreadyExists(_) => (Code::AlreadyExists, Reason::TagAlreadyExists),
                R::LayersNotFound(_) => (Code::FailedPrecondition, Reason::LayersNotFound),
                R::ReferencedImagesNotFound(_) => {
                    (Code::FailedPrecondition, Reason::ReferencedImagesNotFound)
                }
                R::Kms(_) => (Code::FailedPrecondition, Reason::KmsError),
                R::ImageInaccessible(_) => (Code::FailedPrecondition, Reason::ImageInaccessible),
                R::InvalidParameter { .. } => (Code::InvalidArgument, Reason::EcrInvalidParameter),
                R::DigestRejected(_) => (Code::InvalidArgument, Reason::DigestMismatch),
                R::LimitExceeded(_) => (Code::ResourceExhausted, Reason::EcrLimitExceeded),
                R::StoreFull(_) => (Code::ResourceExhausted, Reason::StoreFull),
                R::Throttled(_) => (Code::Unavailable, Reason::EcrThrottled),
                R::Unavailable(_) => (Code::Unavailable, Reason::EcrUnavailable),
                R::Timeout(_) => (Code::Unavailable, Reason::EcrTimeout),
                // The caller's own permissions were never checked by ECR: the message and the
                // reason say it was the service's identity that was denied.
                R::AccessDenied(_) => (Code::PermissionDenied, Reason::ServiceAccessDenied),
                R::CredentialsInvalid(_) => (Code::Internal, Reason::ServiceCredentialsInvalid),
                // Never the caller's fault: a refusal is the configuration's (not worth a
                // retry), a failure STS's (worth one, after the cool-down).
                R::AssumeRoleFailed { denied: true, .. } => {
                    (Code::PermissionDenied, Reason::AssumeRoleFailed)
                }
                R::AssumeRoleFailed { denied: false, .. } => {
                    (Code::Unavailable, Reason::AssumeRoleFailed)
                }
                R::NotConfigured { .. } => {
                    (Code::FailedPrecondition, Reason::RegistryNotConfigured)
                }
                R::DigestVerificationFailed { .. } => {
                    (Code::DataLoss, Reason::DigestVerificationFailed)
                }
                R::RateBudgetExhausted { .. } => {
                    (Code::Unavailable, Reason::EcrRateBudgetExhausted)
                }
                // Nothing was done and a retry is safe: the same answer as a shed request.
                R::Busy { .. } => (Code::Unavailable, Reason::Overloaded),
                R::Other(_) => (Code::Internal, Reason::EcrError),
            },
        }
    }

    /// What ECR said, when ECR was the cause.
    pub fn upstream(&self) -> Option<&Upstream> {
        match self {
            Self::InvalidArgument { .. }
            | Self::RequestTooLarge { .. }
            | Self::RequestBodyTimeout { .. }
            | Self::DeadlineExceeded
            | Self::Overloaded { .. }
            | Self::Unauthenticated { .. }
            | Self::AccessDenied { .. }
            | Self::PlatformNotFound { .. }
            | Self::RegistryNotConfigured { .. }
            | Self::Unverified { .. }
            | Self::WatchEnded { .. }
            | Self::TooManyWatches(_) => None,
            Self::Registry(err) => err.upstream(),
        }
    }

    /// Whether the failure is the service's or ECR's rather than the caller's: those are logged
    /// at WARN, caller mistakes at INFO.
    pub fn is_server_side(&self) -> bool {
        // A caller denied by the policy is the caller's business, unlike the service's own
        // identity denied by ECR, which shares the code.
        !matches!(
            self,
            Self::AccessDenied { .. } | Self::Unauthenticated { .. } | Self::Unverified { .. }
        ) && matches!(
            self.code_and_reason().0,
            Code::Unavailable
                | Code::DeadlineExceeded
                | Code::Internal
                | Code::DataLoss
                | Code::PermissionDenied
                | Code::ResourceExhausted
        )
    }

    /// The field violations a `google.rpc.BadRequest` should list.
    fn violations(&self) -> Vec<Violation> {
        match self {
            Self::InvalidArgument { violations, .. } => violations.clone(),
            Self::Registry(RegistryError::InvalidParameter { field, upstream }) => {
                vec![Violation::new(*field, upstream.message.clone())]
            }
            Self::Registry(RegistryError::DigestRejected(upstream)) => {
                vec![Violation::new("image_manifest", upstream.message.clone())]
            }
            Self::Registry(RegistryError::TagDigestMismatch(upstream)) => {
                vec![Violation::new("image_id", upstream.message.clone())]
            }
            Self::Registry(_)
            | Self::RequestTooLarge { .. }
            | Self::RequestBodyTimeout { .. }
            | Self::DeadlineExceeded
            | Self::Overloaded { .. }
            | Self::Unauthenticated { .. }
            | Self::AccessDenied { .. }
            | Self::PlatformNotFound { .. }
            | Self::RegistryNotConfigured { .. }
            | Self::Unverified { .. }
            | Self::WatchEnded { .. }
            | Self::TooManyWatches(_) => Vec::new(),
        }
    }

    /// How long a caller should wait before retrying, when the service can tell.
    fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::Registry(RegistryError::Throttled(_)) => Some(THROTTLED_RETRY_DELAY),
            Self::Registry(
                RegistryError::RateBudgetExhausted { retry_after }
                | RegistryError::Busy { retry_after },
            )
            | Self::Overloaded { retry_after } => Some(*retry_after),
            Self::WatchEnded { .. } | Self::TooManyWatches(_) => Some(WATCH_RETRY_DELAY),
            Self::Unverified {
                refusal: RefusalText(crate::access::verify::Refusal::ScanNotComplete(_)),
                ..
            } => Some(SCAN_RETRY_DELAY),
            // STS is asked again only after the cool-down: sooner gets the same answer.
            Self::Registry(RegistryError::AssumeRoleFailed { denied: false, .. }) => {
                Some(crate::registry::ecr::roles::FAILURE_COOLDOWN)
            }
            _ => None,
        }
    }
}

impl From<Error> for Status {
    /// The single mapping from [`Error`] to a gRPC status with its rich details.
    fn from(err: Error) -> Self {
        let (code, reason) = err.code_and_reason();
        let mut metadata = HashMap::new();
        match &err {
            Error::AccessDenied { action, repository } => {
                metadata.insert("action".to_owned(), action.as_str().to_owned());
                metadata.insert("repository".to_owned(), repository.clone());
            }
            Error::PlatformNotFound { available, .. } => {
                metadata.insert("available".to_owned(), available.clone());
            }
            Error::Unverified { rule, refusal, .. } => {
                metadata.insert("rule".to_owned(), rule.clone());
                if let crate::access::verify::Refusal::ScanFindingsOverLimit(counts) = &refusal.0 {
                    for (severity, count) in counts {
                        metadata.insert(severity.clone(), count.to_string());
                    }
                }
            }
            Error::RegistryNotConfigured {
                registry_id,
                region,
            } => {
                metadata.insert("registryId".to_owned(), registry_id.clone());
                metadata.insert("region".to_owned(), region.clone());
            }
            _ => {}
        }
        if let Some(upstream) = err.upstream() {
            if let Some(ecr_code) = &upstream.code {
                metadata.insert(METADATA_ECR_ERROR_CODE.to_owned(), ecr_code.clone());
            }
            if let Some(request_id) = &upstream.request_id {
                metadata.insert(METADATA_ECR_REQUEST_ID.to_owned(), request_id.clone());
            }
        }
        // Bounded whatever they echo (an index's platform list, ECR's words): every value, and
        // the message below, fit one trailer a client will take.
        for value in metadata.values_mut() {
            if value.len() > MAX_MESSAGE_BYTES {
                *value = truncated(value, MAX_MESSAGE_BYTES);
            }
        }
        let mut details = ErrorDetails::with_error_info(reason.as_str(), ERROR_DOMAIN, metadata);
        let violations = err.violations();
        if !violations.is_empty() {
            details.set_bad_request(
                violations
                    .into_iter()
                    .map(|v| FieldViolation::new(v.field, v.description))
                    .collect::<Vec<_>>(),
            );
        }
        let retry_after = err.retry_after();
        if let Some(retry_after) = retry_after {
            details.set_retry_info(Some(retry_after));
        }
        let message = truncated(&err.to_string(), MAX_MESSAGE_BYTES);
        let mut status = Status::with_error_details(code, message, details);
        if let Some(pushback) = pushback(code, reason, retry_after) {
            status
                .metadata_mut()
                .insert(RETRY_PUSHBACK, pushback.parse().expect("digits are ASCII"));
        }
        status
    }
}

/// The trailer gRPC clients with a retry policy obey (gRFC A6): C-core, Java and Go wait this
/// many milliseconds before their next attempt, or make none for a negative value.
pub const RETRY_PUSHBACK: &str = "grpc-retry-pushback-ms";

/// The pushback of an UNAVAILABLE answer: its RetryInfo's delay, so that clients configured
/// with the shipped service config back off as the service asks; `-1` where an automatic retry
/// within the call cannot help (a scan takes minutes: the deploy system should come back
/// later, as RetryInfo says). Other codes are not retried by the policy and carry none.
fn pushback(code: Code, reason: Reason, retry_after: Option<Duration>) -> Option<String> {
    if code != Code::Unavailable {
        return None;
    }
    if reason == Reason::ScanNotComplete {
        return Some("-1".to_owned());
    }
    retry_after.map(|delay| delay.as_millis().to_string())
}

/// The gRPC code's canonical name, as a label value.
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic_types::ErrorDetail;

    fn ecr(code: &str) -> Upstream {
        Upstream {
            code: Some(code.to_owned()),
            request_id: Some("8f3a1c2e-0000-4000-8000-000000000000".to_owned()),
            message: format!("{code} happened"),
            ..Upstream::default()
        }
    }

    /// One error of each kind, with the code and reason it must map to: the README's error
    /// table, row by row.
    fn mapping_table() -> Vec<(Error, Code, &'static str)> {
        use RegistryError as R;
        let invalid = |reason| {
            Error::invalid(
                reason,
                vec![Violation::new("repository_name", "must be lowercase")],
            )
        };
        vec![
            (
                invalid(Reason::InvalidField),
                Code::InvalidArgument,
                "INVALID_FIELD",
            ),
            (
                invalid(Reason::DigestMismatch),
                Code::InvalidArgument,
                "DIGEST_MISMATCH",
            ),
            (
                invalid(Reason::MediaTypeMismatch),
                Code::InvalidArgument,
                "MEDIA_TYPE_MISMATCH",
            ),
            (
                invalid(Reason::MediaTypeUndetermined),
                Code::InvalidArgument,
                "MEDIA_TYPE_UNDETERMINED",
            ),
            (
                R::TagDigestMismatch(ecr("ImageTagDoesNotMatchDigest")).into(),
                Code::InvalidArgument,
                "TAG_DIGEST_MISMATCH",
            ),
            (
                R::InvalidParameter {
                    field: "image_manifest",
                    upstream: ecr("InvalidParameterException"),
                }
                .into(),
                Code::InvalidArgument,
                "ECR_INVALID_PARAMETER",
            ),
            (
                R::DigestRejected(ecr("ImageDigestDoesNotMatchException")).into(),
                Code::InvalidArgument,
                "DIGEST_MISMATCH",
            ),
            (
                R::RepositoryNotFound(ecr("RepositoryNotFoundException")).into(),
                Code::NotFound,
                "REPOSITORY_NOT_FOUND",
            ),
            (
                R::ImageNotFound(ecr("ImageNotFound")).into(),
                Code::NotFound,
                "IMAGE_NOT_FOUND",
            ),
            (
                R::TagAlreadyExists(ecr("ImageTagAlreadyExistsException")).into(),
                Code::AlreadyExists,
                "TAG_ALREADY_EXISTS",
            ),
            (
                R::LayersNotFound(ecr("LayersNotFoundException")).into(),
                Code::FailedPrecondition,
                "LAYERS_NOT_FOUND",
            ),
            (
                R::ReferencedImagesNotFound(ecr("ReferencedImagesNotFoundException")).into(),
                Code::FailedPrecondition,
                "REFERENCED_IMAGES_NOT_FOUND",
            ),
            (
                R::Kms(ecr("KmsException")).into(),
                Code::FailedPrecondition,
                "KMS_ERROR",
            ),
            (
                R::ImageInaccessible(ecr("ImageInaccessible")).into(),
                Code::FailedPrecondition,
                "IMAGE_INACCESSIBLE",
            ),
            (
                R::LimitExceeded(ecr("LimitExceededException")).into(),
                Code::ResourceExhausted,
                "ECR_LIMIT_EXCEEDED",
            ),
            (
                R::Throttled(ecr("ThrottlingException")).into(),
                Code::Unavailable,
                "ECR_THROTTLED",
            ),
            (
                R::Unavailable(ecr("ServerException")).into(),
                Code::Unavailable,
                "ECR_UNAVAILABLE",
            ),
            (
                R::Timeout(Upstream::message("timed out")).into(),
                Code::Unavailable,
                "ECR_TIMEOUT",
            ),
            (
                R::AccessDenied(ecr("AccessDeniedException")).into(),
                Code::PermissionDenied,
                "SERVICE_ACCESS_DENIED",
            ),
            (
                R::CredentialsInvalid(ecr("ExpiredTokenException")).into(),
                Code::Internal,
                "SERVICE_CREDENTIALS_INVALID",
            ),
            (
                R::DigestVerificationFailed {
                    expected: "sha256:a".into(),
                    actual: "sha256:b".into(),
                }
                .into(),
                Code::DataLoss,
                "DIGEST_VERIFICATION_FAILED",
            ),
            (
                R::Other(ecr("SomethingNew")).into(),
                Code::Internal,
                "ECR_ERROR",
            ),
            (
                Error::DeadlineExceeded,
                Code::DeadlineExceeded,
                "DEADLINE_EXCEEDED",
            ),
            (
                R::StoreFull(Upstream::message("the local store's disk is full")).into(),
                Code::ResourceExhausted,
                "STORE_FULL",
            ),
            (
                Error::RequestTooLarge {
                    bytes: 800_000,
                    limit: 65_536,
                },
                Code::ResourceExhausted,
                "REQUEST_TOO_LARGE",
            ),
            (
                R::Busy {
                    retry_after: Duration::from_millis(100),
                }
                .into(),
                Code::Unavailable,
                "OVERLOADED",
            ),
            (
                Error::WatchEnded {
                    why: "the server is shutting down",
                },
                Code::Unavailable,
                "WATCH_ENDED",
            ),
            (
                Error::TooManyWatches(crate::api::watch::WatchCap::Replica(1)),
                Code::ResourceExhausted,
                "TOO_MANY_WATCHES",
            ),
            (
                Error::RegistryNotConfigured {
                    registry_id: "999999999999".into(),
                    region: String::new(),
                },
                Code::FailedPrecondition,
                "REGISTRY_NOT_CONFIGURED",
            ),
            (
                Error::PlatformNotFound {
                    requested: "linux/s390x".into(),
                    available: "linux/amd64,linux/arm64".into(),
                },
                Code::NotFound,
                "PLATFORM_NOT_FOUND",
            ),
            (
                Error::Unauthenticated {
                    source_name: "istio-xfcc",
                    why: "no x-forwarded-client-cert header",
                },
                Code::Unauthenticated,
                "NO_CALLER_IDENTITY",
            ),
            (
                Error::AccessDenied {
                    action: Action::Write,
                    repository: "team-a/app".into(),
                },
                Code::PermissionDenied,
                "ACCESS_DENIED",
            ),
            (
                Error::RequestBodyTimeout {
                    timeout: Duration::from_secs(5),
                },
                Code::DeadlineExceeded,
                "REQUEST_BODY_TIMEOUT",
            ),
            (
                Error::Overloaded {
                    retry_after: Duration::from_millis(100),
                },
                Code::Unavailable,
                "OVERLOADED",
            ),
            (
                R::RateBudgetExhausted {
                    retry_after: Duration::from_millis(300),
                }
                .into(),
                Code::Unavailable,
                "ECR_RATE_BUDGET_EXHAUSTED",
            ),
            (
                unverified(crate::access::verify::Refusal::SignatureRequired),
                Code::FailedPrecondition,
                "SIGNATURE_REQUIRED",
            ),
            (
                unverified(crate::access::verify::Refusal::SignatureInvalid("x".into())),
                Code::FailedPrecondition,
                "SIGNATURE_INVALID",
            ),
            (
                unverified(crate::access::verify::Refusal::ScanFindingsOverLimit(
                    [("CRITICAL".to_owned(), 1)].into(),
                )),
                Code::FailedPrecondition,
                "SCAN_FINDINGS_OVER_LIMIT",
            ),
            (
                unverified(crate::access::verify::Refusal::ScanNotComplete(
                    "NONE".into(),
                )),
                Code::Unavailable,
                "SCAN_NOT_COMPLETE",
            ),
            (
                R::AssumeRoleFailed {
                    denied: false,
                    upstream: Upstream::message("STS unavailable"),
                }
                .into(),
                Code::Unavailable,
                "ASSUME_ROLE_FAILED",
            ),
            (
                R::AssumeRoleFailed {
                    denied: true,
                    upstream: Upstream::message("AccessDenied"),
                }
                .into(),
                Code::PermissionDenied,
                "ASSUME_ROLE_FAILED",
            ),
        ]
    }

    fn unverified(refusal: crate::access::verify::Refusal) -> Error {
        Error::Unverified {
            rule: "signed".into(),
            digest: "sha256:0".into(),
            refusal: RefusalText(refusal),
        }
    }

    /// The README's error table, row by row: each error maps to one code and one reason, and
    /// its status carries exactly one ErrorInfo (with ECR's code and request ID when ECR spoke),
    /// a BadRequest exactly when the code is INVALID_ARGUMENT, and RetryInfo when throttled.
    /// The (code, reason) rows of a Markdown or proto-comment table whose first two columns
    /// are a gRPC code and a reason.
    fn documented_rows(text: &str) -> Vec<(String, String)> {
        let reasons: Vec<&str> = Reason::ALL.iter().map(|r| r.as_str()).collect();
        let codes: Vec<&str> = (0..=16).map(|c| code_name(Code::from_i32(c))).collect();
        text.lines()
            .filter_map(|line| {
                let line = line.trim_start_matches("//").trim();
                let mut cells = line.strip_prefix('|')?.split('|').map(str::trim);
                let code = cells.next()?.to_owned();
                let reason = cells.next()?.trim_matches('`').to_owned();
                let row = codes.contains(&code.as_str()) && reasons.contains(&reason.as_str());
                row.then_some((code, reason))
            })
            .collect()
    }

    /// The error tables cannot drift: the README's table and the proto comment's each list
    /// every reason, with each code the one mapping gives it (one row per code, adjacent:
    /// ASSUME_ROLE_FAILED has two), and nothing else.
    #[test]
    fn the_documented_error_tables_match_the_mapping() {
        let mut mapped: HashMap<&str, Vec<&str>> = HashMap::new();
        for (_, code, reason) in &mapping_table() {
            let codes = mapped.entry(*reason).or_default();
            if !codes.contains(&code_name(*code)) {
                codes.push(code_name(*code));
            }
        }
        let every: Vec<&str> = Reason::ALL.iter().map(|r| r.as_str()).collect();
        let mut sorted = every.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), every.len(), "reasons are distinct");
        assert_eq!(
            mapped.len(),
            every.len(),
            "the mapping table covers every reason"
        );
        for (name, text) in [
            ("README.md", include_str!("../../README.md")),
            (
                "the proto comment",
                include_str!("../../proto/imageservice/v1/image_service.proto"),
            ),
        ] {
            let rows = documented_rows(text);
            let mut listed: Vec<&str> = rows.iter().map(|(_, reason)| reason.as_str()).collect();
            listed.dedup();
            assert_eq!(listed, every, "{name} lists every reason once, in order");
            let documented = |reason: &str| -> Vec<&str> {
                rows.iter()
                    .filter(|(_, r)| r == reason)
                    .map(|(code, _)| code.as_str())
                    .collect()
            };
            for (reason, codes) in &mapped {
                assert_eq!(&documented(reason), codes, "{name}: {reason}'s codes");
            }
        }
    }

    /// Issue 20, finding 9: an index of 20,000 platforms (or one with a 1 MB `os`) made a
    /// PLATFORM_NOT_FOUND trailer of up to 875 KB. Every message and metadata value is bounded.
    #[test]
    fn a_huge_platform_list_makes_a_bounded_answer() {
        let available = vec!["linux/amd64"; 20_000].join(",") + &"x".repeat(1 << 20);
        let status = Status::from(Error::PlatformNotFound {
            requested: "linux/s390x".into(),
            available,
        });
        assert!(status.message().len() <= MAX_MESSAGE_BYTES + '…'.len_utf8());
        // The details carry the message again and the metadata: under 3 KB, not 875 KB.
        assert!(
            status.details().len() < 3 * MAX_MESSAGE_BYTES,
            "{}",
            status.details().len()
        );
        let info = status.get_details_error_info().unwrap();
        assert!(info.metadata["available"].starts_with("linux/amd64,linux/amd64"));
    }

    #[test]
    fn every_error_maps_to_its_code_reason_and_details() {
        let table = mapping_table();
        for (err, code, reason) in table {
            let had_ecr_code = err.upstream().and_then(|u| u.code.clone());
            let status = Status::from(err);
            assert_eq!(status.code(), code, "{reason}");
            let details = status.get_error_details_vec();
            let infos: Vec<_> = details
                .iter()
                .filter_map(|d| match d {
                    ErrorDetail::ErrorInfo(info) => Some(info),
                    _ => None,
                })
                .collect();
            assert_eq!(infos.len(), 1, "{reason}: exactly one ErrorInfo");
            assert_eq!(infos[0].reason, reason);
            assert_eq!(infos[0].domain, ERROR_DOMAIN);
            assert_eq!(
                infos[0].metadata.get(METADATA_ECR_ERROR_CODE),
                had_ecr_code.as_ref(),
                "{reason}"
            );
            let bad_request = details
                .iter()
                .any(|d| matches!(d, ErrorDetail::BadRequest(b) if !b.field_violations.is_empty()));
            assert_eq!(
                bad_request,
                code == Code::InvalidArgument,
                "{reason}: BadRequest"
            );
            let retry = details
                .iter()
                .any(|d| matches!(d, ErrorDetail::RetryInfo(_)));
            let retryable = [
                "ECR_THROTTLED",
                "OVERLOADED",
                "ECR_RATE_BUDGET_EXHAUSTED",
                "WATCH_ENDED",
                "TOO_MANY_WATCHES",
            ];
            // STS's failures (UNAVAILABLE) say when it will be asked again; its refusals do not.
            let retryable = retryable.contains(&reason)
                || reason == "SCAN_NOT_COMPLETE"
                || (reason == "ASSUME_ROLE_FAILED" && code == Code::Unavailable);
            assert_eq!(retry, retryable, "{reason}: RetryInfo");
            // The pushback trailer: RetryInfo's delay on UNAVAILABLE, -1 where a retry within
            // the call cannot help, nothing on codes the retry policy does not retry.
            let pushback = status
                .metadata()
                .get(RETRY_PUSHBACK)
                .map(|v| v.to_str().unwrap().to_owned());
            let retry_ms = status
                .get_details_retry_info()
                .and_then(|r| r.retry_delay)
                .map(|d| d.as_millis().to_string());
            let expected = match (code, reason) {
                (Code::Unavailable, "SCAN_NOT_COMPLETE") => Some("-1".to_owned()),
                (Code::Unavailable, _) => retry_ms,
                _ => None,
            };
            assert_eq!(pushback, expected, "{reason}: {RETRY_PUSHBACK}");
        }
    }

    /// The service's own IAM failure must not read as the caller's.
    #[test]
    fn access_denied_says_whose_identity() {
        let status = Status::from(Error::from(RegistryError::AccessDenied(ecr(
            "AccessDeniedException",
        ))));
        assert!(status.message().contains("this service's AWS identity"));
        let denied = Upstream {
            message: "User: arn:aws:sts::123456789012:assumed-role/svc/x is not authorized".into(),
            ..ecr("AccessDeniedException")
        };
        let status = Status::from(Error::from(RegistryError::AccessDenied(denied)));
        assert!(
            !status.message().contains("arn:aws"),
            "{}",
            status.message()
        );
        assert!(!format!("{:?}", status.details()).contains("arn:aws"));
    }
}

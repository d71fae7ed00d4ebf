//! The registry layer's errors: what went wrong in ECR's terms, independent of gRPC.

use std::fmt;

/// What the registry said about a failure, for the caller (`message`), for AWS support
/// (`code`, `request_id`) and for the operator's log (each a field of its own, never a raw
/// response).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Upstream {
    /// The registry's error or failure code, e.g. `ThrottlingException`, `ImageNotFound`.
    pub code: Option<String>,
    /// The registry's request ID (`x-amzn-RequestId`).
    pub request_id: Option<String>,
    /// A short message safe to return to the caller.
    pub message: String,
    /// What lies under a failure the registry never answered (a refused connection, a
    /// timeout), for logs only; empty when the registry answered.
    pub detail: String,
    /// Attempts the call made, retries included; `None` when not counted.
    pub attempts: Option<u32>,
}

impl Upstream {
    /// A failure described by a message alone (no upstream code or request ID).
    pub fn message(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            ..Self::default()
        }
    }
}

impl fmt::Display for Upstream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

/// What a caller refused for want of room (a request slot, an upstream slot) is told to wait:
/// long enough for work in flight to free some (cache hits take microseconds, ECR calls tens
/// of milliseconds). The one such delay: admission's shedding and the cache's upstream limit
/// both use it.
pub const RETRY_SOON: std::time::Duration = std::time::Duration::from_millis(100);

/// Why a registry call failed. Each variant is one way callers must react differently.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RegistryError {
    /// The repository does not exist in the registry.
    #[error("repository not found: {0}")]
    RepositoryNotFound(Upstream),
    /// No image has that tag or digest.
    #[error("image not found: {0}")]
    ImageNotFound(Upstream),
    /// A tag and a digest were both given and name different images.
    #[error("tag and digest name different images: {0}")]
    TagDigestMismatch(Upstream),
    /// The repository is tag-immutable and the tag already points at another digest.
    #[error("tag already exists and the repository is immutable: {0}")]
    TagAlreadyExists(Upstream),
    /// A layer or config blob the manifest references is not in the repository.
    #[error("referenced layers not found: {0}")]
    LayersNotFound(Upstream),
    /// An index or list references manifests that are not in the repository.
    #[error("referenced images not found: {0}")]
    ReferencedImagesNotFound(Upstream),
    /// The registry could not use the repository's KMS key.
    #[error("KMS error: {0}")]
    Kms(Upstream),
    /// The image exists but cannot be read (e.g. archived).
    #[error("image inaccessible: {0}")]
    ImageInaccessible(Upstream),
    /// The registry rejected a parameter; `field` is the API field it names, when known.
    #[error("invalid parameter: {upstream}")]
    InvalidParameter {
        /// The request field the registry named, in the API's spelling (`image_manifest`);
        /// empty when it named none this API knows.
        field: &'static str,
        /// What the registry said.
        upstream: Upstream,
    },
    /// The registry computed a different digest for the bytes than the one sent with them.
    #[error("the registry computed a different digest for the manifest: {0}")]
    DigestRejected(Upstream),
    /// A service quota (not a rate) would be exceeded.
    #[error("registry limit exceeded: {0}")]
    LimitExceeded(Upstream),
    /// The embedded store's disk is full: waiting will not help, freeing space will.
    #[error("the store is full: {0}")]
    StoreFull(Upstream),
    /// The registry kept throttling after every retry.
    #[error("throttled by the registry: {0}")]
    Throttled(Upstream),
    /// The registry failed or could not be reached after every retry.
    #[error("registry unavailable: {0}")]
    Unavailable(Upstream),
    /// This service's own rate budget for the operation has no send slot before the deadline:
    /// nothing was sent.
    #[error("the ECR rate budget has no slot before the deadline; retry after {retry_after:?}")]
    RateBudgetExhausted {
        /// When the budget will have a slot.
        retry_after: std::time::Duration,
    },
    /// As many ECR calls are in flight as the replica allows (`--max-upstream-calls`), or as
    /// this caller may have (`--max-upstream-calls-per-caller`); nothing was sent. Callers
    /// joining a call in flight are never refused this way, nor is a call waiting for a budget
    /// slot: only an attempt about to leave for ECR.
    #[error("too many ECR calls in flight; retry after {retry_after:?}")]
    Busy {
        /// When a retry is likely to find room.
        retry_after: std::time::Duration,
    },
    /// The registry did not answer within the configured timeouts.
    #[error("registry timed out: {0}")]
    Timeout(Upstream),
    /// The registry denied the service's own identity. ECR's message names the service's role
    /// (its ARN, hence its account); it goes to the service's log, never to the caller.
    #[error(
        "the registry denied this service's AWS identity: its IAM policy needs fixing (ECR's \
         message is in the service's log)"
    )]
    AccessDenied(Upstream),
    /// The service could not assume its role in the registry's account: STS refused it
    /// (`denied`: the trust policy or the registries file needs fixing) or failed. Never the
    /// caller's fault; remembered for a few seconds, so a herd does not hammer STS.
    #[error("assuming the registry's role failed: {upstream}")]
    AssumeRoleFailed {
        /// Whether STS refused rather than failed.
        denied: bool,
        /// What STS said (code, request id); the message is safe for the caller.
        upstream: Upstream,
    },
    /// The registry is not (or no longer) one the service serves: the registries file changed
    /// between routing and the call.
    #[error("registry {registry} is not served here")]
    NotConfigured {
        /// The registry, as keys spell it (`account` or `account@region`).
        registry: String,
    },
    /// The service's own credentials are missing, expired or not recognised.
    #[error("this service's AWS credentials are unusable: {0}")]
    CredentialsInvalid(Upstream),
    /// Bytes from the registry do not hash to the digest they came with or were asked for.
    #[error(
        "manifest bytes from the registry hash to {actual}, not to the expected {expected}: \
         refusing to pass them on"
    )]
    DigestVerificationFailed {
        /// The digest the bytes should have had.
        expected: String,
        /// The digest they have (or, for a put, the one the registry reported).
        actual: String,
    },
    /// Anything else the registry said.
    #[error("registry error: {0}")]
    Other(Upstream),
}

/// The variants that carry what the registry said, for [`RegistryError::upstream`] and its
/// `_mut` twin (one list, so a new variant cannot be forgotten in one of them).
macro_rules! with_upstream {
    ($err:expr, $u:ident => $found:expr, $none:expr) => {
        match $err {
            RegistryError::RepositoryNotFound($u)
            | RegistryError::ImageNotFound($u)
            | RegistryError::TagDigestMismatch($u)
            | RegistryError::TagAlreadyExists($u)
            | RegistryError::LayersNotFound($u)
            | RegistryError::ReferencedImagesNotFound($u)
            | RegistryError::Kms($u)
            | RegistryError::ImageInaccessible($u)
            | RegistryError::InvalidParameter { upstream: $u, .. }
            | RegistryError::DigestRejected($u)
            | RegistryError::LimitExceeded($u)
            | RegistryError::StoreFull($u)
            | RegistryError::Throttled($u)
            | RegistryError::Unavailable($u)
            | RegistryError::Timeout($u)
            | RegistryError::AccessDenied($u)
            | RegistryError::CredentialsInvalid($u)
            | RegistryError::AssumeRoleFailed { upstream: $u, .. }
            | RegistryError::Other($u) => $found,
            RegistryError::DigestVerificationFailed { .. }
            | RegistryError::NotConfigured { .. }
            | RegistryError::RateBudgetExhausted { .. }
            | RegistryError::Busy { .. } => $none,
        }
    };
}

impl RegistryError {
    /// What the registry said, when the error came from it.
    pub fn upstream(&self) -> Option<&Upstream> {
        with_upstream!(self, u => Some(u), None)
    }

    /// What the registry said, to add to (e.g. the attempts a call made).
    pub fn upstream_mut(&mut self) -> Option<&mut Upstream> {
        with_upstream!(self, u => Some(u), None)
    }
}

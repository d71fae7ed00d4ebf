//! The registry layer's errors: what went wrong in ECR's terms, independent of gRPC.

use std::fmt;

/// What the registry said about a failure, for the caller (`message`), for AWS support
/// (`code`, `request_id`) and for the operator's log (`detail`, the whole error chain).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Upstream {
    /// The registry's error or failure code, e.g. `ThrottlingException`, `ImageNotFound`.
    pub code: Option<String>,
    /// The registry's request ID (`x-amzn-RequestId`).
    pub request_id: Option<String>,
    /// A short message safe to return to the caller.
    pub message: String,
    /// The full error chain, for logs only.
    pub detail: String,
}

impl Upstream {
    /// A failure described by a message alone (no upstream code or request ID).
    pub fn message(message: impl Into<String>) -> Self {
        let message = message.into();
        Self {
            detail: message.clone(),
            message,
            ..Self::default()
        }
    }
}

impl fmt::Display for Upstream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

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
        /// The request field the registry named, in the API's spelling (`image_manifest`).
        field: String,
        /// What the registry said.
        upstream: Upstream,
    },
    /// The registry computed a different digest for the bytes than the one sent with them.
    #[error("the registry computed a different digest for the manifest: {0}")]
    DigestRejected(Upstream),
    /// A service quota (not a rate) would be exceeded.
    #[error("registry limit exceeded: {0}")]
    LimitExceeded(Upstream),
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
    /// The registry did not answer within the configured timeouts.
    #[error("registry timed out: {0}")]
    Timeout(Upstream),
    /// The registry denied the service's own identity.
    #[error("the registry denied this service's AWS identity: {0}")]
    AccessDenied(Upstream),
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

impl RegistryError {
    /// What the registry said, when the error came from it.
    pub fn upstream(&self) -> Option<&Upstream> {
        match self {
            Self::RepositoryNotFound(u)
            | Self::ImageNotFound(u)
            | Self::TagDigestMismatch(u)
            | Self::TagAlreadyExists(u)
            | Self::LayersNotFound(u)
            | Self::ReferencedImagesNotFound(u)
            | Self::Kms(u)
            | Self::ImageInaccessible(u)
            | Self::InvalidParameter { upstream: u, .. }
            | Self::DigestRejected(u)
            | Self::LimitExceeded(u)
            | Self::Throttled(u)
            | Self::Unavailable(u)
            | Self::Timeout(u)
            | Self::AccessDenied(u)
            | Self::CredentialsInvalid(u)
            | Self::Other(u) => Some(u),
            Self::DigestVerificationFailed { .. } | Self::RateBudgetExhausted { .. } => None,
        }
    }
}

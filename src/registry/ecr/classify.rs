//! Sorting ECR's answers into the registry's error kinds: SDK errors by code and status, and
//! BatchGetImage's per-image `failures[]` by failure code.

use aws_credential_types::provider::error::CredentialsError;

use super::roles::AssumeRoleFailure;
use aws_runtime::retries::classifiers::THROTTLING_ERRORS;
use aws_sdk_ecr::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_ecr::operation::RequestId;
use aws_sdk_ecr::types::{ImageFailure, ImageFailureCode};

use super::budget::BudgetExhausted;
use super::slots::SlotsFull;
use crate::domain::text::{truncated, with_sources};
use crate::registry::{RegistryError, Upstream};

/// The error a BatchGetImage `failures[]` entry stands for.
pub fn failure_error(failure: ImageFailure, request_id: Option<String>) -> RegistryError {
    let message = failure
        .failure_reason()
        .unwrap_or("the registry did not say why")
        .to_owned();
    let upstream = Upstream {
        code: failure.failure_code().map(|c| c.as_str().to_owned()),
        request_id,
        message,
        ..Upstream::default()
    };
    let invalid = |field: &'static str| RegistryError::InvalidParameter {
        field,
        upstream: upstream.clone(),
    };
    match failure.failure_code() {
        Some(ImageFailureCode::ImageNotFound) | None => RegistryError::ImageNotFound(upstream),
        Some(ImageFailureCode::ImageTagDoesNotMatchDigest) => {
            RegistryError::TagDigestMismatch(upstream)
        }
        Some(ImageFailureCode::InvalidImageDigest) => invalid("image_id.image_digest"),
        Some(ImageFailureCode::InvalidImageTag) => invalid("image_id.image_tag"),
        Some(ImageFailureCode::MissingDigestAndTag) => invalid("image_id"),
        Some(ImageFailureCode::KmsError) => RegistryError::Kms(upstream),
        Some(ImageFailureCode::ImageInaccessible) => RegistryError::ImageInaccessible(upstream),
        // Pull-through cache upstreams: transient from our caller's point of view.
        Some(
            ImageFailureCode::UpstreamAccessDenied
            | ImageFailureCode::UpstreamTooManyRequests
            | ImageFailureCode::UpstreamUnavailable,
        ) => RegistryError::Unavailable(upstream),
        Some(_) => RegistryError::Other(upstream),
    }
}

/// The two ways ECR says a put found its image already there.
pub fn is_already_exists(code: Option<&str>) -> bool {
    matches!(
        code,
        Some("ImageAlreadyExistsException" | "ImageTagAlreadyExistsException")
    )
}

/// Error codes meaning the service's own credentials were refused (not the caller's).
const CREDENTIAL_ERRORS: &[&str] = &[
    "UnrecognizedClientException",
    "InvalidSignatureException",
    "ExpiredTokenException",
    "IncompleteSignature",
    "MissingAuthenticationToken",
    "InvalidClientTokenId",
];

/// What ECR said about a failed call, for the caller, for AWS support and for the log.
pub fn upstream_of<E>(err: &SdkError<E, aws_sdk_ecr::config::http::HttpResponse>) -> Upstream
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    let message = err.message().map(str::to_owned).unwrap_or_else(|| {
        match err {
            SdkError::TimeoutError(_) => "ECR did not answer in time",
            SdkError::DispatchFailure(_) => "ECR could not be reached",
            SdkError::ResponseError(_) => "ECR's response could not be read",
            _ => "ECR call failed",
        }
        .to_owned()
    });
    // What ECR said is in the fields above. Only a failure without an answer (a refused
    // connection, a timeout) has a cause worth logging, and it is taken by `Display` alone:
    // `DisplayErrorContext` would append the error's `Debug`, the raw HTTP response with every
    // header and the body.
    let detail = match err {
        SdkError::ServiceError(_) => String::new(),
        other => causes(other),
    };
    Upstream {
        code: err.code().map(str::to_owned),
        request_id: err.request_id().map(str::to_owned),
        message,
        detail,
        attempts: None,
    }
}

/// The longest cause chain kept for a log line: a chain of `Display`s is a few hundred bytes,
/// and nothing from a response body belongs in it.
const MAX_CAUSES_BYTES: usize = 300;

/// An error's `Display` and those of its sources, joined by `: `, on one line and bounded.
fn causes(err: &(dyn std::error::Error + 'static)) -> String {
    let chain: String = with_sources(err)
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    truncated(&chain, MAX_CAUSES_BYTES)
}

/// Sorts an SDK error into the registry's error kinds. The SDK has already retried what it
/// retries; this only decides what the failure means for the caller.
pub fn classify<E>(err: SdkError<E, aws_sdk_ecr::config::http::HttpResponse>) -> RegistryError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    if let Some(refused) = find_in_chain::<BudgetExhausted>(&err) {
        return RegistryError::RateBudgetExhausted {
            retry_after: refused.retry_after,
        };
    }
    if find_in_chain::<SlotsFull>(&err).is_some() {
        return RegistryError::Busy {
            retry_after: crate::registry::RETRY_SOON,
        };
    }
    if let Some(failure) = find_in_chain::<AssumeRoleFailure>(&err) {
        return RegistryError::AssumeRoleFailed {
            denied: failure.denied,
            // STS's code and request id go to the log (in `detail`), not into the caller's
            // `ecrErrorCode` and `ecrRequestId`, which name ECR's.
            upstream: Upstream {
                code: None,
                request_id: None,
                message: format!(
                    "the service could not assume its role in the registry's account{}",
                    if failure.denied {
                        ": STS refused it (the role's trust policy or the registries file \
                         needs fixing)"
                    } else {
                        "; retry shortly"
                    }
                ),
                detail: format!(
                    "{failure} (STS code {}, request id {})",
                    failure.code.as_deref().unwrap_or("none"),
                    failure.request_id.as_deref().unwrap_or("none")
                ),
                attempts: None,
            },
        };
    }
    let upstream = upstream_of(&err);
    if find_in_chain::<CredentialsError>(&err).is_some() {
        return RegistryError::CredentialsInvalid(upstream);
    }
    match &err {
        SdkError::TimeoutError(_) => RegistryError::Timeout(upstream),
        SdkError::DispatchFailure(failure) if failure.is_timeout() => {
            RegistryError::Timeout(upstream)
        }
        SdkError::DispatchFailure(_) | SdkError::ResponseError(_) => {
            RegistryError::Unavailable(upstream)
        }
        SdkError::ServiceError(service) => by_code(upstream, service.raw().status().as_u16()),
        _ => RegistryError::Other(upstream),
    }
}

/// Sorts an ECR error response by its code, then by its HTTP status.
fn by_code(upstream: Upstream, status: u16) -> RegistryError {
    let code = upstream.code.clone();
    match code.as_deref() {
        Some("RepositoryNotFoundException") => RegistryError::RepositoryNotFound(upstream),
        Some("ImageNotFoundException") => RegistryError::ImageNotFound(upstream),
        Some("LayersNotFoundException") => RegistryError::LayersNotFound(upstream),
        Some("ReferencedImagesNotFoundException") => {
            RegistryError::ReferencedImagesNotFound(upstream)
        }
        Some("KmsException") => RegistryError::Kms(upstream),
        Some("ImageDigestDoesNotMatchException") => RegistryError::DigestRejected(upstream),
        Some("ImageTagAlreadyExistsException") => RegistryError::TagAlreadyExists(upstream),
        Some("InvalidParameterException") => RegistryError::InvalidParameter {
            field: field_named_in(&upstream.message),
            upstream,
        },
        // The SDK retries this as throttling, but for ECR it is a hard quota (e.g. images per
        // repository): waiting does not help, so it is not reported as throttling.
        Some("LimitExceededException") => RegistryError::LimitExceeded(upstream),
        Some("AccessDeniedException") => RegistryError::AccessDenied(upstream),
        Some(code) if CREDENTIAL_ERRORS.contains(&code) => {
            RegistryError::CredentialsInvalid(upstream)
        }
        Some(code) if THROTTLING_ERRORS.contains(&code) => RegistryError::Throttled(upstream),
        Some("ServerException") => RegistryError::Unavailable(upstream),
        _ if status == 429 => RegistryError::Throttled(upstream),
        _ if status >= 500 => RegistryError::Unavailable(upstream),
        _ => RegistryError::Other(upstream),
    }
}

/// The API field an ECR `InvalidParameterException` names, from messages such as
/// `Invalid parameter at 'ImageManifest' failed to satisfy constraint: 'Invalid JSON syntax'`.
fn field_named_in(message: &str) -> &'static str {
    let named = message
        .split_once("at '")
        .and_then(|(_, rest)| rest.split_once('\''))
        .map(|(name, _)| name.to_ascii_lowercase());
    match named.as_deref() {
        Some("imagemanifest") => "image_manifest",
        Some("imagemanifestmediatype") => "image_manifest_media_type",
        Some("imagetag") => "image_tag",
        Some("imagedigest") => "image_digest",
        Some("repositoryname") => "repository_name",
        Some("registryid") => "registry_id",
        Some("acceptedmediatypes") => "accepted_media_types",
        Some("imageids") => "image_id",
        _ => "",
    }
}

/// The first error of type `T` in `err`'s source chain: our credentials failing, or our own
/// rate budget refusing, both of which the SDK reports as a dispatch failure.
fn find_in_chain<'e, T: std::error::Error + 'static>(
    err: &'e (dyn std::error::Error + 'static),
) -> Option<&'e T> {
    let mut next = Some(err);
    while let Some(e) = next {
        if let Some(found) = e.downcast_ref::<T>() {
            return Some(found);
        }
        next = e.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalid_parameter_messages_name_api_fields() {
        let ecr = "Invalid parameter at 'ImageManifest' failed to satisfy constraint: \
                   'Invalid JSON syntax'";
        assert_eq!(field_named_in(ecr), "image_manifest");
        assert_eq!(
            field_named_in("Invalid parameter at 'imageTag' failed"),
            "image_tag"
        );
        assert_eq!(field_named_in("something else"), "");
    }

    /// Throttling is told apart from hard quotas, whatever the SDK's retry classifier thinks.
    #[test]
    fn codes_sort_into_kinds() {
        let kind = |code: &str, status| {
            let err = by_code(
                Upstream {
                    code: Some(code.to_owned()),
                    ..Upstream::default()
                },
                status,
            );
            std::mem::discriminant(&err)
        };
        let throttled = std::mem::discriminant(&RegistryError::Throttled(Upstream::default()));
        let limit = std::mem::discriminant(&RegistryError::LimitExceeded(Upstream::default()));
        let unavailable = std::mem::discriminant(&RegistryError::Unavailable(Upstream::default()));
        let other = std::mem::discriminant(&RegistryError::Other(Upstream::default()));
        assert_eq!(kind("ThrottlingException", 400), throttled);
        assert_eq!(kind("TooManyRequestsException", 429), throttled);
        assert_eq!(kind("LimitExceededException", 400), limit);
        assert_eq!(kind("ServerException", 500), unavailable);
        assert_eq!(kind("SomethingNew", 503), unavailable);
        assert_eq!(kind("SomethingNew", 400), other);
    }
}

//! The ECR backend: the registry seam as `aws-sdk-ecr` calls.
//!
//! Retries are the SDK's own (standard mode, bounded by the configured attempts and timeouts):
//! nothing here loops on top of them, so a call costs ECR at most `max_attempts` requests.

use std::time::Duration;

use aws_config::{BehaviorVersion, Region, SdkConfig};
use aws_credential_types::provider::error::CredentialsError;
use aws_runtime::retries::classifiers::THROTTLING_ERRORS;
use aws_sdk_ecr::config::retry::RetryConfig;
use aws_sdk_ecr::config::timeout::TimeoutConfig;
use aws_sdk_ecr::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_ecr::operation::RequestId;
use aws_sdk_ecr::types::{Image, ImageFailure, ImageFailureCode, ImageIdentifier};

use aws_smithy_http_client::proxy::ProxyConfig;
use aws_smithy_http_client::{ConnectorBuilder, tls};
use aws_smithy_runtime_api::client::http::SharedHttpClient;
use tokio::time::Instant;
use tracing::field::Empty;
use tracing::{Instrument, Span, debug_span};

use super::budget::{BudgetExhausted, BudgetedHttpClient, RateBudgets};
use super::calls::UpstreamCalls;
use super::retry::QuotaIsNotThrottling;
use super::{
    BatchGet, BatchInput, CacheStatus, Fetched, GetImageInput, PutImageInput, PutOutcome, Registry,
    RegistryError, RepositoryKey, StoredImage, Upstream,
};
use crate::deadline;
use crate::image::{Digest, ImageRef, Manifest, media_types};

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
    /// How long one attempt may take before it is abandoned (and retried).
    pub attempt_timeout: Duration,
    /// How long one call may take, all attempts and backoffs included.
    pub operation_timeout: Duration,
    /// This process's PutImage budget, requests per second (its share of the account quota).
    pub put_image_rate: f64,
    /// This process's BatchGetImage budget, requests per second.
    pub batch_get_image_rate: f64,
}

/// Time kept back from a caller's deadline for turning ECR's answer into a response and
/// sending it: the ECR call must end this much before the caller gives up.
const DEADLINE_MARGIN: Duration = Duration::from_millis(50);

/// Loads the AWS SDK's shared configuration the standard way: credentials only from the default
/// provider chain (environment, profile, web identity for IRSA, container and instance roles).
pub async fn load_sdk_config(settings: &EcrSettings) -> SdkConfig {
    let mut loader = aws_config::defaults(BehaviorVersion::latest());
    if let Some(region) = &settings.region {
        loader = loader.region(Region::new(region.clone()));
    }
    loader.load().await
}

/// The ECR client configuration: the shared SDK configuration plus our retries, timeouts and
/// endpoint. Returned as a builder so tests can add what production never needs.
pub fn client_config(sdk: &SdkConfig, settings: &EcrSettings) -> aws_sdk_ecr::config::Builder {
    let retry = RetryConfig::standard()
        .with_max_attempts(settings.max_attempts)
        .with_initial_backoff(settings.initial_backoff)
        .with_max_backoff(settings.max_backoff);
    let timeouts = TimeoutConfig::builder()
        .connect_timeout(settings.connect_timeout)
        .operation_attempt_timeout(settings.attempt_timeout)
        .operation_timeout(settings.operation_timeout)
        .build();
    // The SDK's own HTTPS client, or its default, with the rate budgets in front.
    let http = sdk.http_client().unwrap_or_else(default_https_client);
    let budgets = RateBudgets::new([
        ("PutImage", settings.put_image_rate),
        ("BatchGetImage", settings.batch_get_image_rate),
    ]);
    let mut builder = aws_sdk_ecr::config::Builder::from(sdk)
        .retry_config(retry)
        .retry_classifier(QuotaIsNotThrottling)
        .timeout_config(timeouts)
        .http_client(BudgetedHttpClient::new(http, budgets));
    if let Some(url) = &settings.endpoint_url {
        builder = builder.endpoint_url(url);
    }
    builder
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

/// ImageService's registry, backed by Amazon ECR.
#[derive(Debug, Clone)]
pub struct EcrRegistry {
    /// Built once and cloned cheaply: it owns the connection pool and the retry token bucket.
    client: aws_sdk_ecr::Client,
    /// What this client has asked of ECR, counted by an interceptor on every call.
    calls: UpstreamCalls,
    /// The configured bound on one call; a caller's deadline can only shorten it.
    operation_timeout: Option<Duration>,
}

impl EcrRegistry {
    /// A registry over a client built from `config`, with call counting added.
    pub fn from_config(config: aws_sdk_ecr::config::Builder) -> Self {
        let calls = UpstreamCalls::default();
        let client = aws_sdk_ecr::Client::from_conf(config.interceptor(calls.clone()).build());
        let operation_timeout = client
            .config()
            .timeout_config()
            .and_then(|t| t.operation_timeout());
        Self {
            client,
            calls,
            operation_timeout,
        }
    }

    /// A per-call configuration that ends the ECR call [`DEADLINE_MARGIN`] before the caller's
    /// deadline, when that comes before the configured operation timeout.
    fn within_deadline(&self) -> Option<aws_sdk_ecr::config::Builder> {
        let remaining = deadline::current()?
            .saturating_duration_since(Instant::now())
            .saturating_sub(DEADLINE_MARGIN);
        if self.operation_timeout.is_some_and(|t| t <= remaining) {
            return None;
        }
        let timeouts = TimeoutConfig::builder()
            .operation_timeout(remaining.max(Duration::from_millis(1)))
            .build();
        Some(aws_sdk_ecr::config::Builder::default().timeout_config(timeouts))
    }

    /// The calls made to ECR so far.
    pub fn calls(&self) -> &UpstreamCalls {
        &self.calls
    }

    /// ECR refused a put because the image is already there, in one of two ways: the same
    /// manifest and tag (`ImageAlreadyExistsException`), or an immutable repository's tag
    /// (`ImageTagAlreadyExistsException`), which may point at these very bytes or at others.
    /// A retried put whose first attempt landed ends here too. Only the tag's current digest
    /// tells success from conflict, so look it up rather than trust the exception's name.
    async fn confirm_existing(
        &self,
        input: PutImageInput,
        upstream: Upstream,
    ) -> Result<(StoredImage, PutOutcome), RegistryError> {
        let ours = input.manifest.digest().clone();
        let reference = match &input.tag {
            Some(tag) => ImageRef::new(Some(tag.clone()), None),
            None => ImageRef::new(None, Some(ours.clone())),
        }
        .ok_or_else(|| RegistryError::Other(upstream.clone()))?;
        let found = self
            .get_image(GetImageInput {
                registry_id: input.registry_id,
                repository: input.repository,
                reference,
                accepted_media_types: Vec::new(),
                max_staleness: None,
            })
            .await?
            .image;
        if found.digest == ours {
            return Ok((found, PutOutcome::AlreadyExisted));
        }
        Err(RegistryError::TagAlreadyExists(Upstream {
            message: format!(
                "tag '{}' in repository '{}' points at {} and the repository does not allow \
                 moving it to {ours}",
                found.tag.as_ref().map(|t| t.as_str()).unwrap_or_default(),
                found.repository,
                found.digest,
            ),
            ..upstream
        }))
    }
}

impl Registry for EcrRegistry {
    async fn put_image(
        &self,
        input: PutImageInput,
    ) -> Result<(StoredImage, PutOutcome), RegistryError> {
        // Always send the digest and the media type: real ECR verifies the digest against the
        // bytes, and needs the media type when the manifest carries none (OCI artifacts).
        let call = self
            .client
            .put_image()
            .set_registry_id(input.registry_id.as_ref().map(|r| r.as_str().to_owned()))
            .repository_name(input.repository.as_str())
            .image_manifest(input.manifest.as_str())
            .image_manifest_media_type(input.manifest.media_type().as_str())
            .image_digest(input.manifest.digest().as_str())
            .set_image_tag(input.tag.as_ref().map(|t| t.as_str().to_owned()));
        let span = ecr_call_span("PutImage");
        let sent = async {
            match self.within_deadline() {
                Some(bounded) => call.customize().config_override(bounded).send().await,
                None => call.send().await,
            }
        }
        .instrument(span.clone())
        .await;
        record_answer(&span, &sent);
        let output = match sent {
            Ok(output) => output,
            Err(err) if is_already_exists(err.code()) => {
                let upstream = upstream_of(&err);
                return self.confirm_existing(input, upstream).await;
            }
            Err(err) => return Err(classify(err)),
        };
        let image = output.image();
        if let Some(returned) = image.and_then(claimed_digest)
            && returned != input.manifest.digest().as_str()
        {
            return Err(RegistryError::DigestVerificationFailed {
                expected: input.manifest.digest().to_string(),
                actual: returned.to_owned(),
            });
        }
        let registry_id = image
            .and_then(Image::registry_id)
            .or(input.registry_id.as_ref().map(|r| r.as_str()))
            .unwrap_or_default()
            .to_owned();
        Ok((input.into_stored(registry_id), PutOutcome::Created))
    }

    async fn get_image(&self, input: GetImageInput) -> Result<Fetched, RegistryError> {
        let batch = BatchInput {
            repository: input.repository_key(),
            accepted_media_types: input.accepted_media_types,
            references: vec![input.reference],
        };
        let image = self
            .get_images(batch)
            .await?
            .pop()
            .unwrap_or_else(|| Err(nothing_for_reference()))?;
        Ok(Fetched {
            image,
            cache: CacheStatus::Miss,
        })
    }
}

impl BatchGet for EcrRegistry {
    async fn get_images(
        &self,
        input: BatchInput,
    ) -> Result<Vec<Result<StoredImage, RegistryError>>, RegistryError> {
        let ids: Vec<ImageIdentifier> = input
            .references
            .iter()
            .map(|reference| {
                ImageIdentifier::builder()
                    .set_image_tag(reference.tag().map(|t| t.as_str().to_owned()))
                    .set_image_digest(reference.digest().map(|d| d.as_str().to_owned()))
                    .build()
            })
            .collect();
        let accepted: Vec<String> = if input.accepted_media_types.is_empty() {
            media_types::ALL_MANIFESTS.map(str::to_owned).to_vec()
        } else {
            input
                .accepted_media_types
                .iter()
                .map(|m| m.as_str().to_owned())
                .collect()
        };
        let repository = &input.repository;
        let span = ecr_call_span("BatchGetImage");
        let sent = self
            .client
            .batch_get_image()
            .set_registry_id(
                repository
                    .registry_id
                    .as_ref()
                    .map(|r| r.as_str().to_owned()),
            )
            .repository_name(repository.repository.as_str())
            .set_image_ids(Some(ids))
            .set_accepted_media_types(Some(accepted))
            .send()
            .instrument(span.clone())
            .await;
        record_answer(&span, &sent);
        let output = sent.map_err(classify)?;
        let request_id = output.request_id().map(str::to_owned);
        // A missing or malformed reference is not an error to BatchGetImage: it answers 200 with
        // a `failures[]` entry for it instead of an image.
        let images = output.images.unwrap_or_default();
        let failures = output.failures.unwrap_or_default();
        let answers = match_answers(&input.references, images, failures);
        Ok(answers
            .into_iter()
            .zip(&input.references)
            .map(|(answer, reference)| match answer {
                Some(Answer::Image(image)) => verified(image, repository, reference),
                Some(Answer::Failure(failure)) => Err(failure_error(failure, request_id.clone())),
                None => Err(nothing_for_reference()),
            })
            .collect())
    }
}

/// One span per ECR call, around all its attempts, named and typed by OpenTelemetry's RPC
/// conventions. At DEBUG, like the RPC span: free unless spans are exported or logged.
fn ecr_call_span(operation: &'static str) -> Span {
    debug_span!(
        "ecr",
        operation,
        otel.name = operation,
        otel.kind = "client",
        otel.status_code = Empty,
        rpc.system = "aws-api",
        rpc.service = "ECR",
        rpc.method = operation,
        aws.request_id = Empty,
    )
}

/// Puts ECR's request ID on the call's span (the ID AWS support asks for), and marks failures.
fn record_answer<T: RequestId, E: RequestId>(span: &Span, sent: &Result<T, E>) {
    let request_id = match sent {
        Ok(output) => output.request_id(),
        Err(err) => err.request_id(),
    };
    if let Some(request_id) = request_id {
        span.record("aws.request_id", request_id);
    }
    if sent.is_err() {
        span.record("otel.status_code", "ERROR");
    }
}

/// What BatchGetImage said about one requested reference.
enum Answer {
    Image(Image),
    Failure(ImageFailure),
}

/// Pairs each requested reference with its image or failure. ECR echoes the requested image
/// id, so exact matches come first (by digest when one was asked for, else by tag). What is
/// left is paired in order, for registries whose echo differs (an emulator that reports an
/// image's latest tag instead of the requested one); such images are still verified against
/// any requested digest.
fn match_answers(
    references: &[ImageRef],
    images: Vec<Image>,
    failures: Vec<ImageFailure>,
) -> Vec<Option<Answer>> {
    let mut answers: Vec<Option<Answer>> = references.iter().map(|_| None).collect();
    let mut leftover = Vec::new();
    let answered_id = |id: Option<&ImageIdentifier>, reference: &ImageRef| {
        let id_digest = id.and_then(ImageIdentifier::image_digest);
        let id_tag = id.and_then(ImageIdentifier::image_tag);
        match reference.digest() {
            Some(digest) => id_digest == Some(digest.as_str()),
            None => id_tag.is_some() && id_tag == reference.tag().map(|t| t.as_str()),
        }
    };
    let answers_for = |answers: &[Option<Answer>], id: Option<&ImageIdentifier>| {
        (0..references.len()).find(|&i| answers[i].is_none() && answered_id(id, &references[i]))
    };
    for image in images {
        match answers_for(&answers, image.image_id()) {
            Some(i) => answers[i] = Some(Answer::Image(image)),
            None => leftover.push(Answer::Image(image)),
        }
    }
    for failure in failures {
        match answers_for(&answers, failure.image_id()) {
            Some(i) => answers[i] = Some(Answer::Failure(failure)),
            None => leftover.push(Answer::Failure(failure)),
        }
    }
    let mut leftover = leftover.into_iter();
    for answer in answers.iter_mut().filter(|a| a.is_none()) {
        *answer = leftover.next();
    }
    answers
}

/// The registry answered neither an image nor a failure for a reference.
fn nothing_for_reference() -> RegistryError {
    RegistryError::ImageNotFound(Upstream::message(
        "the registry returned neither the image nor a failure",
    ))
}

/// The digest ECR says an image has.
fn claimed_digest(image: &Image) -> Option<&str> {
    image.image_id().and_then(ImageIdentifier::image_digest)
}

/// Turns an image from ECR into a [`StoredImage`], refusing bytes that do not hash to the digest
/// they came with or the one that was asked for. The tag reported is the one asked for: ECR's
/// response `imageId.imageTag` is not a reliable echo across implementations.
fn verified(
    image: Image,
    repository: &RepositoryKey,
    reference: &ImageRef,
) -> Result<StoredImage, RegistryError> {
    let claimed = claimed_digest(&image).map(str::to_owned);
    let Image {
        registry_id,
        image_manifest,
        image_manifest_media_type,
        ..
    } = image;
    let manifest = image_manifest.ok_or_else(|| {
        RegistryError::Other(Upstream::message(
            "the registry returned an image without a manifest",
        ))
    })?;
    let actual = Digest::of(manifest.as_bytes());
    let expected = [claimed.as_deref(), reference.digest().map(Digest::as_str)];
    if let Some(expected) = expected
        .into_iter()
        .flatten()
        .find(|e| *e != actual.as_str())
    {
        return Err(RegistryError::DigestVerificationFailed {
            expected: expected.to_owned(),
            actual: actual.to_string(),
        });
    }
    let media_type = image_manifest_media_type
        .or_else(|| Manifest::sniff_media_type(&manifest))
        .unwrap_or_default();
    Ok(StoredImage {
        registry_id: registry_id
            .or(repository
                .registry_id
                .as_ref()
                .map(|r| r.as_str().to_owned()))
            .unwrap_or_default(),
        repository: repository.repository.clone(),
        digest: actual,
        tag: reference.tag().cloned(),
        manifest: manifest.into(),
        media_type,
    })
}

/// The error a BatchGetImage `failures[]` entry stands for.
fn failure_error(failure: ImageFailure, request_id: Option<String>) -> RegistryError {
    let message = failure
        .failure_reason()
        .unwrap_or("the registry did not say why")
        .to_owned();
    let upstream = Upstream {
        code: failure.failure_code().map(|c| c.as_str().to_owned()),
        request_id,
        detail: format!("BatchGetImage failure {failure:?}"),
        message,
    };
    let invalid = |field: &str| RegistryError::InvalidParameter {
        field: field.to_owned(),
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
fn is_already_exists(code: Option<&str>) -> bool {
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
fn upstream_of<E>(err: &SdkError<E, aws_sdk_ecr::config::http::HttpResponse>) -> Upstream
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
    Upstream {
        code: err.code().map(str::to_owned),
        request_id: err.request_id().map(str::to_owned),
        message,
        detail: DisplayErrorContext(err).to_string(),
    }
}

/// Sorts an SDK error into the registry's error kinds. The SDK has already retried what it
/// retries; this only decides what the failure means for the caller.
fn classify<E>(err: SdkError<E, aws_sdk_ecr::config::http::HttpResponse>) -> RegistryError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    if let Some(refused) = find_in_chain::<BudgetExhausted>(&err) {
        return RegistryError::RateBudgetExhausted {
            retry_after: refused.retry_after,
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
fn field_named_in(message: &str) -> String {
    let named = message
        .split_once("at '")
        .and_then(|(_, rest)| rest.split_once('\''))
        .map(|(name, _)| name.to_ascii_lowercase());
    let field = match named.as_deref() {
        Some("imagemanifest") => "image_manifest",
        Some("imagemanifestmediatype") => "image_manifest_media_type",
        Some("imagetag") => "image_tag",
        Some("imagedigest") => "image_digest",
        Some("repositoryname") => "repository_name",
        Some("registryid") => "registry_id",
        Some("acceptedmediatypes") => "accepted_media_types",
        Some("imageids") => "image_id",
        _ => "",
    };
    field.to_owned()
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

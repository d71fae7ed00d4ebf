//! The ECR operations as SDK calls, each in its own span: PutImage, BatchGetImage (its answers
//! paired to the references asked for and verified against their digests), BatchDeleteImage,
//! ListImages and DescribeImages.

use std::cell::Cell;
use std::future::Future;
use std::time::Duration;

use aws_credential_types::provider::SharedCredentialsProvider;
use aws_sdk_ecr::config::interceptors::BeforeTransmitInterceptorContextRef;
use aws_sdk_ecr::config::timeout::TimeoutConfig;
use aws_sdk_ecr::config::{ConfigBag, Intercept, RuntimeComponents};
use aws_sdk_ecr::error::{BoxError, ProvideErrorMetadata};
use aws_sdk_ecr::operation::RequestId;
use aws_sdk_ecr::types::{
    DescribeImagesFilter, Image, ImageFailure, ImageIdentifier, ListImageReferrersFilter,
    ListImagesFilter, ScanStatus as EcrScanStatus, SubjectIdentifier, TagStatus as EcrTagStatus,
};
use tokio::time::Instant;
use tracing::field::Empty;
use tracing::{Instrument, Span, debug_span};

use super::batch::{BatchGet, BatchInput};
use super::calls::UpstreamCalls;
use super::classify::{classify, failure_error, is_already_exists, upstream_of};
use crate::domain::call;
use crate::domain::image::{Digest, ImageRef, Manifest, Tag, media_types};
use crate::registry::{
    DeleteFailure, DeleteOutcome, Deleted, DescribeInput, DescribePage, ImageDetail, ListInput,
    ListPage, PutImageInput, Referrer, ReferrersInput, ReferrersPage, RegistryError, RepositoryKey,
    ScanState, ScanSummary, StoredImage, TagStatus as RegistryTagStatus, Upstream,
};

/// Sends the fluent builder `call`, with the per-call configuration `overrides` when it is
/// `Some` (the SDK's builders share no trait to write this as a function over).
macro_rules! send_with {
    ($call:expr, $overrides:expr) => {
        async {
            match $overrides {
                Some(config) => $call.customize().config_override(config).send().await,
                None => $call.send().await,
            }
        }
    };
}

/// The ECR client and what every call needs around it.
#[derive(Debug)]
pub struct Operations {
    /// Built once: it owns the connection pool and the retry token bucket.
    client: aws_sdk_ecr::Client,
    /// What this client has asked of ECR, counted by an interceptor on every call.
    calls: UpstreamCalls,
    /// The configured bound on one call; a caller's deadline can only shorten it.
    operation_timeout: Option<Duration>,
}

/// What ECR said to a PutImage that did not fail.
pub enum PutAnswer {
    /// Stored, in this registry.
    Stored {
        /// The account that holds the image.
        registry_id: String,
    },
    /// Refused because an image is already there (same bytes and tag, or an immutable tag):
    /// only a look at the tag tells success from conflict.
    AlreadyThere(Upstream),
}

impl Operations {
    /// Operations over a client built from `config`, its calls counted into `calls`.
    pub fn new(config: aws_sdk_ecr::config::Builder, calls: UpstreamCalls) -> Self {
        let config = config
            .interceptor(calls.clone())
            .interceptor(AttemptCounter);
        let client = aws_sdk_ecr::Client::from_conf(config.build());
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

    /// The calls made to ECR so far.
    pub fn calls(&self) -> &UpstreamCalls {
        &self.calls
    }

    /// A per-call configuration, when the call needs one: ending the ECR call at the call's
    /// deadline (which keeps back the time to answer already) when that comes before the
    /// configured operation timeout, and signing with `session` (a caller's own, for an
    /// attributed write) instead of the client's credentials.
    fn overrides(
        &self,
        session: Option<&SharedCredentialsProvider>,
    ) -> Option<aws_sdk_ecr::config::Builder> {
        let mut config = session.map(|session| {
            aws_sdk_ecr::config::Builder::default().credentials_provider(session.clone())
        });
        let Some(remaining) = call::deadline().map(|d| d.saturating_duration_since(Instant::now()))
        else {
            return config;
        };
        if self.operation_timeout.is_some_and(|t| t <= remaining) {
            return config;
        }
        let timeouts = TimeoutConfig::builder()
            .operation_timeout(remaining.max(Duration::from_millis(1)))
            .build();
        config = Some(config.unwrap_or_default().timeout_config(timeouts));
        config
    }

    /// PutImage of the exact bytes. The digest and the media type are always sent: real ECR
    /// verifies the digest against the bytes, and needs the media type when the manifest
    /// carries none (OCI artifacts).
    pub async fn put_image(
        &self,
        input: &PutImageInput,
        session: Option<&SharedCredentialsProvider>,
    ) -> Result<PutAnswer, RegistryError> {
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
        let (sent, attempts) = counting_attempts(send_with!(call, self.overrides(session)))
            .instrument(span.clone())
            .await;
        record_answer(&span, &sent);
        note_write(&sent);
        let output = match sent {
            Ok(output) => output,
            Err(err) if is_already_exists(err.code()) => {
                let upstream = Upstream {
                    attempts: Some(attempts.attempts),
                    ..upstream_of(&err)
                };
                return Ok(PutAnswer::AlreadyThere(upstream));
            }
            Err(err) => return Err(with_attempts(classify(err), attempts)),
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
        Ok(PutAnswer::Stored { registry_id })
    }
}

impl Operations {
    /// One BatchDeleteImage of at most 100 ids. Failures are per id (ECR's `failures[]`),
    /// never retried here: `ImageReferencedByManifestList` needs the index gone first.
    pub async fn delete_images(
        &self,
        repository: &RepositoryKey,
        images: &[ImageRef],
        session: Option<&SharedCredentialsProvider>,
    ) -> Result<DeleteOutcome, RegistryError> {
        let ids: Vec<ImageIdentifier> = images.iter().map(identifier).collect();
        let span = ecr_call_span("BatchDeleteImage");
        let call = self
            .client
            .batch_delete_image()
            .set_registry_id(registry_id_of(repository))
            .repository_name(repository.repository.as_str())
            .set_image_ids(Some(ids));
        let call = send_with!(call, self.overrides(session));
        let (sent, attempts) = counting_attempts(call).instrument(span.clone()).await;
        record_answer(&span, &sent);
        note_write(&sent);
        let output = sent.map_err(|err| with_attempts(classify(err), attempts))?;
        let deleted = output.image_ids().iter().map(deleted_of).collect();
        let failures = output
            .failures()
            .iter()
            .map(|failure| {
                let asked = failure.image_id();
                let image = ImageRef::new(
                    asked
                        .and_then(|id| id.image_tag())
                        .and_then(|t| Tag::parse(t).ok()),
                    asked
                        .and_then(|id| id.image_digest())
                        .and_then(|d| Digest::parse(d).ok()),
                );
                DeleteFailure {
                    image,
                    code: failure
                        .failure_code()
                        .map_or_else(String::new, |c| c.as_str().to_owned()),
                    reason: failure.failure_reason().unwrap_or_default().to_owned(),
                }
            })
            .collect();
        Ok(DeleteOutcome { deleted, failures })
    }
}

impl Operations {
    /// One ListImages call: one page.
    pub async fn list_images(&self, input: &ListInput) -> Result<ListPage, RegistryError> {
        let filter = tag_filter(input.tag_status)
            .map(|status| ListImagesFilter::builder().tag_status(status).build());
        let span = ecr_call_span("ListImages");
        let call = self
            .client
            .list_images()
            .set_registry_id(input.registry_id.as_ref().map(|r| r.as_str().to_owned()))
            .repository_name(input.repository.as_str())
            .max_results(i32::try_from(input.max_results).unwrap_or(i32::MAX))
            .set_next_token(input.next_token.clone())
            .set_filter(filter)
            .send();
        let (sent, attempts) = counting_attempts(call).instrument(span.clone()).await;
        record_answer(&span, &sent);
        let output = sent.map_err(|err| with_attempts(classify(err), attempts))?;
        Ok(ListPage {
            ids: output.image_ids().iter().map(deleted_of).collect(),
            next_token: output.next_token().map(str::to_owned),
        })
    }

    /// What `tag` of `repository` points at now, asked of ECR (one DescribeImages of the tag;
    /// not BatchGetImage, whose quota serves the reads): `None` when no image has the tag.
    pub async fn tag_digest(
        &self,
        repository: &RepositoryKey,
        tag: &Tag,
    ) -> Result<Option<Digest>, RegistryError> {
        let span = ecr_call_span("DescribeImages");
        let call = self
            .client
            .describe_images()
            .set_registry_id(registry_id_of(repository))
            .repository_name(repository.repository.as_str())
            .image_ids(ImageIdentifier::builder().image_tag(tag.as_str()).build());
        let call = send_with!(call, self.overrides(None));
        let (sent, attempts) = counting_attempts(call).instrument(span.clone()).await;
        record_answer(&span, &sent);
        match sent {
            Ok(output) => Ok(output
                .image_details()
                .iter()
                .find_map(|d| d.image_digest().and_then(|d| Digest::parse(d).ok()))),
            Err(err) => match with_attempts(classify(err), attempts) {
                RegistryError::ImageNotFound(_) => Ok(None),
                err => Err(err),
            },
        }
    }

    /// One DescribeImages call: by ids (one page), or one page of the listing.
    pub async fn describe_images(
        &self,
        input: &DescribeInput,
    ) -> Result<DescribePage, RegistryError> {
        let listing = &input.listing;
        let span = ecr_call_span("DescribeImages");
        let mut call = self
            .client
            .describe_images()
            .set_registry_id(listing.registry_id.as_ref().map(|r| r.as_str().to_owned()))
            .repository_name(listing.repository.as_str());
        call = if input.images.is_empty() {
            let filter = tag_filter(listing.tag_status)
                .map(|status| DescribeImagesFilter::builder().tag_status(status).build());
            call.max_results(i32::try_from(listing.max_results).unwrap_or(i32::MAX))
                .set_next_token(listing.next_token.clone())
                .set_filter(filter)
        } else {
            call.set_image_ids(Some(input.images.iter().map(identifier).collect()))
        };
        let (sent, attempts) = counting_attempts(call.send())
            .instrument(span.clone())
            .await;
        record_answer(&span, &sent);
        let output = sent.map_err(|err| with_attempts(classify(err), attempts))?;
        let details = output
            .image_details()
            .iter()
            .filter_map(|detail| {
                Some(ImageDetail {
                    digest: Digest::parse(detail.image_digest()?).ok()?,
                    tags: detail
                        .image_tags()
                        .iter()
                        .filter_map(|t| Tag::parse(t).ok())
                        .collect(),
                    size_in_bytes: detail.image_size_in_bytes().unwrap_or_default(),
                    pushed_at: detail.image_pushed_at().map(|t| t.secs()),
                    media_type: detail
                        .image_manifest_media_type()
                        .unwrap_or_default()
                        .to_owned(),
                    artifact_media_type: detail
                        .artifact_media_type()
                        .unwrap_or_default()
                        .to_owned(),
                })
            })
            .collect();
        Ok(DescribePage {
            details,
            next_token: output.next_token().map(str::to_owned),
        })
    }
}

impl Operations {
    /// One ListImageReferrers call: what is attached to `input.subject`.
    pub async fn list_referrers(
        &self,
        input: &ReferrersInput,
    ) -> Result<ReferrersPage, RegistryError> {
        let subject = SubjectIdentifier::builder()
            .image_digest(input.subject.as_str())
            .build()
            .map_err(|e| RegistryError::Other(Upstream::message(e.to_string())))?;
        let filter = (!input.artifact_types.is_empty()).then(|| {
            ListImageReferrersFilter::builder()
                .set_artifact_types(Some(input.artifact_types.clone()))
                .build()
        });
        let span = ecr_call_span("ListImageReferrers");
        let call = self
            .client
            .list_image_referrers()
            .set_registry_id(registry_id_of(&input.repository))
            .repository_name(input.repository.repository.as_str())
            .subject_id(subject)
            .set_filter(filter)
            .max_results(i32::try_from(input.max_results).unwrap_or(50))
            .set_next_token(input.next_token.clone());
        let call = send_with!(call, self.overrides(None));
        let (sent, attempts) = counting_attempts(call).instrument(span.clone()).await;
        record_answer(&span, &sent);
        let output = sent.map_err(|err| with_attempts(classify(err), attempts))?;
        let referrers = output
            .referrers()
            .iter()
            .filter_map(|r| {
                Some(Referrer {
                    digest: Digest::parse(r.digest()).ok()?,
                    media_type: r.media_type().to_owned(),
                    artifact_type: r.artifact_type().unwrap_or_default().to_owned(),
                    size: r.size(),
                    annotations: r
                        .annotations()
                        .map(|a| a.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
                        .unwrap_or_default(),
                })
            })
            .collect();
        Ok(ReferrersPage {
            referrers,
            next_token: output.next_token().map(str::to_owned),
        })
    }

    /// Where the blob `digest` can be fetched (GetDownloadUrlForLayer: a presigned URL, valid
    /// briefly).
    pub async fn download_url(
        &self,
        repository: &RepositoryKey,
        digest: &Digest,
    ) -> Result<String, RegistryError> {
        let span = ecr_call_span("GetDownloadUrlForLayer");
        let call = self
            .client
            .get_download_url_for_layer()
            .set_registry_id(registry_id_of(repository))
            .repository_name(repository.repository.as_str())
            .layer_digest(digest.as_str());
        let call = send_with!(call, self.overrides(None));
        let (sent, attempts) = counting_attempts(call).instrument(span.clone()).await;
        record_answer(&span, &sent);
        let output = sent.map_err(|err| with_attempts(classify(err), attempts))?;
        output.download_url().map(str::to_owned).ok_or_else(|| {
            RegistryError::Other(Upstream::message("ECR answered without a download URL"))
        })
    }

    /// One DescribeImageScanFindings call, its counts only; never scanned is `ScanState::None`.
    pub async fn scan_summary(
        &self,
        repository: &RepositoryKey,
        digest: &Digest,
    ) -> Result<ScanSummary, RegistryError> {
        let span = ecr_call_span("DescribeImageScanFindings");
        let call = self
            .client
            .describe_image_scan_findings()
            .set_registry_id(registry_id_of(repository))
            .repository_name(repository.repository.as_str())
            .image_id(
                ImageIdentifier::builder()
                    .image_digest(digest.as_str())
                    .build(),
            )
            .max_results(1);
        let call = send_with!(call, self.overrides(None));
        let (sent, attempts) = counting_attempts(call).instrument(span.clone()).await;
        record_answer(&span, &sent);
        let output = match sent {
            Ok(output) => output,
            Err(err) if err.code() == Some("ScanNotFoundException") => {
                return Ok(ScanSummary {
                    status: ScanState::None,
                    counts: std::collections::BTreeMap::new(),
                    counts_reported: false,
                    completed_at: None,
                });
            }
            Err(err) => return Err(with_attempts(classify(err), attempts)),
        };
        let status = match output.image_scan_status().and_then(|s| s.status()) {
            Some(EcrScanStatus::Complete) => ScanState::Complete,
            Some(EcrScanStatus::InProgress) => ScanState::InProgress,
            Some(EcrScanStatus::Failed) => ScanState::Failed,
            Some(other) => ScanState::Other(other.as_str().to_owned()),
            None => ScanState::None,
        };
        let findings = output.image_scan_findings();
        let counts = findings.and_then(|f| f.finding_severity_counts());
        Ok(ScanSummary {
            status,
            counts_reported: counts.is_some(),
            counts: counts
                .map(|c| {
                    c.iter()
                        .map(|(severity, n)| (severity.as_str().to_owned(), i64::from(*n)))
                        .collect()
                })
                .unwrap_or_default(),
            completed_at: findings
                .and_then(|f| f.image_scan_completed_at())
                .and_then(|t| std::time::SystemTime::try_from(*t).ok()),
        })
    }
}

/// ECR's filter value for a tag status; none for every image.
fn tag_filter(status: RegistryTagStatus) -> Option<EcrTagStatus> {
    match status {
        RegistryTagStatus::Any => None,
        RegistryTagStatus::Tagged => Some(EcrTagStatus::Tagged),
        RegistryTagStatus::Untagged => Some(EcrTagStatus::Untagged),
    }
}

/// An id as ECR reports it.
fn deleted_of(id: &ImageIdentifier) -> Deleted {
    Deleted {
        digest: id.image_digest().and_then(|d| Digest::parse(d).ok()),
        tag: id.image_tag().and_then(|t| Tag::parse(t).ok()),
    }
}

/// The registry id ECR is asked about; `None` for the caller's own account.
fn registry_id_of(repository: &RepositoryKey) -> Option<String> {
    repository
        .registry_id
        .as_ref()
        .map(|r| r.as_str().to_owned())
}

/// ECR's id for a reference.
fn identifier(reference: &ImageRef) -> ImageIdentifier {
    ImageIdentifier::builder()
        .set_image_tag(reference.tag().map(|t| t.as_str().to_owned()))
        .set_image_digest(reference.digest().map(|d| d.as_str().to_owned()))
        .build()
}

impl BatchGet for Operations {
    async fn get_images(
        &self,
        input: BatchInput,
    ) -> Result<Vec<Result<StoredImage, RegistryError>>, RegistryError> {
        let ids: Vec<ImageIdentifier> = input.references.iter().map(identifier).collect();
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
        let call = self
            .client
            .batch_get_image()
            .set_registry_id(registry_id_of(repository))
            .repository_name(repository.repository.as_str())
            .set_image_ids(Some(ids))
            .set_accepted_media_types(Some(accepted))
            .send();
        let (sent, attempts) = counting_attempts(call).instrument(span.clone()).await;
        record_answer(&span, &sent);
        let output = sent.map_err(|err| with_attempts(classify(err), attempts))?;
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

tokio::task_local! {
    /// The ECR call this task is making: its attempts, counted by [`AttemptCounter`], and
    /// whether any left for ECR, told by the rate budget's connector ([`transmitting`]).
    static ATTEMPTS: Counting;
}

/// What [`ATTEMPTS`] holds while a call runs.
#[derive(Default)]
struct Counting {
    attempts: Cell<u32>,
    transmitted: Cell<bool>,
}

/// What one ECR call did, for its failure's report.
#[derive(Debug, Clone, Copy)]
struct Counted {
    /// Attempts begun, those still waiting for a rate-budget slot included.
    attempts: u32,
    /// Whether any attempt got its slot and left for ECR.
    transmitted: bool,
}

/// The rate budget granted the current call's attempt a slot: it leaves for ECR now. Called
/// by the budgeted connector, inside the call's task.
pub(super) fn transmitting() {
    let _ = ATTEMPTS.try_with(|c| c.transmitted.set(true));
}

/// Runs `call` (one SDK call) and counts its attempts, for its failure's log line: "throttled
/// after 3 attempts" tells an operator more than "throttled". A task-local read by one
/// interceptor registered when the client is built: a per-call interceptor would rebuild the
/// SDK's runtime components on every call, which the cold path pays for.
async fn counting_attempts<T>(call: impl Future<Output = T>) -> (T, Counted) {
    ATTEMPTS
        .scope(Counting::default(), async {
            let answer = call.await;
            let counted = ATTEMPTS.with(|c| Counted {
                attempts: c.attempts.get(),
                transmitted: c.transmitted.get(),
            });
            (answer, counted)
        })
        .await
}

/// `err`, with the attempts its call made recorded in what ECR said. A timeout of a call none
/// of whose attempts left the rate budget's queue is no ECR timeout: ECR never saw it, and the
/// time ran out waiting for a slot (ECR_RATE_BUDGET_EXHAUSTED, not "ECR did not answer").
fn with_attempts(mut err: RegistryError, counted: Counted) -> RegistryError {
    if matches!(err, RegistryError::Timeout(_)) && !counted.transmitted {
        return RegistryError::RateBudgetExhausted {
            retry_after: crate::registry::RETRY_SOON,
        };
    }
    if let Some(upstream) = err.upstream_mut() {
        upstream.attempts = Some(counted.attempts);
    }
    err
}

/// Counts attempts into the task's [`ATTEMPTS`], where a call set one up.
#[derive(Debug)]
struct AttemptCounter;

impl Intercept for AttemptCounter {
    fn name(&self) -> &'static str {
        "AttemptCounter"
    }

    fn read_before_attempt(
        &self,
        _context: &BeforeTransmitInterceptorContextRef<'_>,
        _components: &RuntimeComponents,
        _cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        let _ = ATTEMPTS.try_with(|c| c.attempts.set(c.attempts.get() + 1));
        Ok(())
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

/// Notes a write's ECR request id in the call's receipt, for its audit event.
fn note_write<T: RequestId, E: RequestId>(sent: &Result<T, E>) {
    let request_id = match sent {
        Ok(output) => output.request_id(),
        Err(err) => err.request_id(),
    };
    if let Some(request_id) = request_id {
        call::note_upstream_request(request_id);
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

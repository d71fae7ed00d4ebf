//! The ImageService RPCs: request -> validate -> registry -> response, one span per request.

use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;
use tonic::{Request, Response, Status};
use tracing::field::{Empty, debug as debug_value};
use tracing::{Instrument, Span, debug, debug_span, info, warn};

use crate::error::{Error, Reason, Violation};
use crate::image::{Digest, Manifest, MediaType, Tag};
use crate::pb;
use crate::registry::{CacheStatus, PutImageInput, PutOutcome, Registry, StoredImage};
use crate::telemetry::TraceParent;
use crate::validate;
use crate::{deadline, metrics};

/// Time kept back from the caller's deadline to send our answer before it gives up.
const RESPONSE_MARGIN: Duration = Duration::from_millis(50);

/// The gRPC service over a [`Registry`].
#[derive(Debug)]
pub struct ImageService<R> {
    registry: R,
    /// The deadline of a request that brings none (no `grpc-timeout`).
    default_deadline: Duration,
}

impl<R: Registry> ImageService<R> {
    /// A service answering from `registry`.
    pub fn new(registry: R, default_deadline: Duration) -> Self {
        Self {
            registry,
            default_deadline,
        }
    }

    /// When the work must be done: the caller's `grpc-timeout` (else the configured default),
    /// less the time it takes to answer. tonic cancels a request at its `grpc-timeout` with a
    /// bare CANCELLED; ending our work [`RESPONSE_MARGIN`] earlier means the caller gets our
    /// DEADLINE_EXCEEDED, with its ErrorInfo, while it is still listening.
    fn deadline_of<T>(&self, request: &Request<T>) -> Instant {
        let asked = request
            .metadata()
            .get("grpc-timeout")
            .and_then(|v| v.to_str().ok())
            .and_then(deadline::parse_grpc_timeout);
        Instant::now()
            + asked
                .unwrap_or(self.default_deadline)
                .saturating_sub(RESPONSE_MARGIN)
    }
}

#[tonic::async_trait]
impl<R: Registry> pb::image_service_server::ImageService for ImageService<R> {
    async fn put_image(
        &self,
        request: Request<pb::PutImageRequest>,
    ) -> Result<Response<pb::PutImageResponse>, Status> {
        let deadline = self.deadline_of(&request);
        let call = Call::new(
            "PutImage",
            &request,
            &request.get_ref().repository_name,
            request.get_ref().image_tag.clone(),
        );
        let request = request.into_inner();
        let work = async {
            let input = validate::put_image(request)?;
            Span::current().record("digest", input.manifest.digest().as_str());
            let (image, outcome) = self.registry.put_image(input).await?;
            Ok(pb::PutImageResponse {
                image: Some(to_proto(image)),
                outcome: put_outcome(outcome).into(),
            })
        };
        observe(call, deadline, work).await
    }

    async fn get_image(
        &self,
        request: Request<pb::GetImageRequest>,
    ) -> Result<Response<pb::GetImageResponse>, Status> {
        let deadline = self.deadline_of(&request);
        let reference = describe(request.get_ref().image_id.as_ref());
        let call = Call::new(
            "GetImage",
            &request,
            &request.get_ref().repository_name,
            reference,
        );
        let request = request.into_inner();
        let work = async {
            let input = validate::get_image(request)?;
            let fetched = self.registry.get_image(input).await?;
            Span::current().record("digest", fetched.image.digest.as_str());
            let (cache_status, tag_resolution_age) = provenance(fetched.cache);
            Ok(pb::GetImageResponse {
                image: Some(to_proto(fetched.image)),
                cache_status: cache_status.into(),
                tag_resolution_age,
            })
        };
        observe(call, deadline, work).await
    }

    async fn retag_image(
        &self,
        request: Request<pb::RetagImageRequest>,
    ) -> Result<Response<pb::RetagImageResponse>, Status> {
        let deadline = self.deadline_of(&request);
        let reference = describe(request.get_ref().source_image_id.as_ref());
        let call = Call::new(
            "RetagImage",
            &request,
            &request.get_ref().repository_name,
            reference,
        );
        let request = request.into_inner();
        let work = async {
            let input = validate::retag_image(request)?;
            let registry_id = input.source.registry_id.clone();
            let source = self.registry.get_image(input.source).await?.image;
            Span::current().record("digest", source.digest.as_str());
            // One put per target, in order: ECR's PutImage takes one tag, and the rate budget
            // paces them. A failure is that target's result, not the call's.
            // Parsed (and hashed) once, whatever the number of targets.
            let manifest = source_manifest(&source);
            let mut results = Vec::with_capacity(input.targets.len());
            for tag in input.targets {
                let image_tag = tag.as_str().to_owned();
                let result = match &manifest {
                    Ok(manifest) => {
                        let put = PutImageInput {
                            registry_id: registry_id.clone(),
                            repository: source.repository.clone(),
                            manifest: manifest.clone(),
                            tag: Some(tag),
                        };
                        self.registry.put_image(put).await.map_err(Error::from)
                    }
                    Err(why) => Err(Error::InvalidArgument {
                        reason: Reason::MediaTypeUndetermined,
                        violations: vec![Violation::new("source_image_id", why.clone())],
                    }),
                };
                results.push(match result {
                    Ok((_, outcome)) => pb::RetagImageResult {
                        image_tag,
                        outcome: put_outcome(outcome).into(),
                        failure: None,
                    },
                    Err(err) => {
                        let (code, reason) = err.code_and_reason();
                        pb::RetagImageResult {
                            image_tag,
                            outcome: pb::PutImageOutcome::Unspecified.into(),
                            failure: Some(pb::RetagImageFailure {
                                code: metrics::code_name(code).to_owned(),
                                reason: reason.as_str().to_owned(),
                                message: err.to_string(),
                            }),
                        }
                    }
                });
            }
            let mut source_image = to_proto(source);
            // The bytes stay home: the caller asked for tags, not for the manifest.
            source_image.image_manifest = String::new();
            Ok(pb::RetagImageResponse {
                source_image: Some(source_image),
                results,
            })
        };
        observe(call, deadline, work).await
    }

    async fn resolve_image(
        &self,
        request: Request<pb::ResolveImageRequest>,
    ) -> Result<Response<pb::ResolveImageResponse>, Status> {
        let deadline = self.deadline_of(&request);
        let reference = describe(request.get_ref().image_id.as_ref());
        let call = Call::new(
            "ResolveImage",
            &request,
            &request.get_ref().repository_name,
            reference,
        );
        let request = request.into_inner();
        let work = async {
            let input = validate::resolve_image(request)?;
            let fetched = self.registry.get_image(input).await?;
            Span::current().record("digest", fetched.image.digest.as_str());
            let (cache_status, tag_resolution_age) = provenance(fetched.cache);
            let image = fetched.image;
            Ok(pb::ResolveImageResponse {
                image_manifest_size: i64::try_from(image.manifest.len()).unwrap_or(i64::MAX),
                registry_id: image.registry_id,
                repository_name: image.repository.as_str().to_owned(),
                image_id: Some(image_id(image.digest, image.tag)),
                image_manifest_media_type: image.media_type,
                cache_status: cache_status.into(),
                tag_resolution_age,
            })
        };
        observe(call, deadline, work).await
    }
}

/// `tag`, `digest` or `tag@digest`, for the request span.
fn describe(id: Option<&pb::ImageIdentifier>) -> String {
    let Some(id) = id else {
        return String::new();
    };
    match (id.image_tag.as_str(), id.image_digest.as_str()) {
        (tag, "") => tag.to_owned(),
        ("", digest) => digest.to_owned(),
        (tag, digest) => format!("{tag}@{digest}"),
    }
}

/// The API's form of where a read came from.
fn provenance(cache: CacheStatus) -> (pb::CacheStatus, Option<prost_types::Duration>) {
    let age = |d: Duration| prost_types::Duration::try_from(d).ok();
    match cache {
        CacheStatus::Miss => (pb::CacheStatus::Miss, age(Duration::ZERO)),
        CacheStatus::Hit { tag_age } => (pb::CacheStatus::Hit, tag_age.and_then(age)),
        CacheStatus::Stale { tag_age } => (pb::CacheStatus::Stale, age(tag_age)),
    }
}

/// What a request is, for its span and for the line logged if it fails.
struct Call {
    method: &'static str,
    repository: String,
    reference: String,
    /// The caller's W3C trace context, so this request's lines and spans join its trace.
    trace: Option<TraceParent>,
}

impl Call {
    fn new<T>(
        method: &'static str,
        request: &Request<T>,
        repository: &str,
        reference: String,
    ) -> Self {
        let trace = request
            .metadata()
            .get("traceparent")
            .and_then(|v| v.to_str().ok())
            .and_then(TraceParent::parse);
        Self {
            method,
            repository: repository.to_owned(),
            reference,
            trace,
        }
    }
}

/// Runs one request in its span and logs its end: successes at DEBUG; caller mistakes at INFO;
/// the service's and ECR's failures at WARN with the whole error chain. Errors become statuses
/// here, through the one mapping in [`crate::error`].
///
/// The span is at DEBUG: at the default level it is disabled and costs a cached check, where
/// an INFO span would have its fields formatted on every request, successes included. A
/// failure line carries the request's context as its own fields instead.
///
/// The work runs under the caller's deadline: at the deadline it is dropped (and with it any
/// ECR call only it was waiting for) and the caller gets DEADLINE_EXCEEDED.
async fn observe<T>(
    call: Call,
    deadline: Instant,
    work: impl Future<Output = Result<T, Error>>,
) -> Result<Response<T>, Status> {
    // `otel.*` and `rpc.*` name the exported span by OpenTelemetry's RPC conventions.
    let span = debug_span!(
        "rpc",
        method = call.method,
        repository = %call.repository,
        reference = %call.reference,
        trace_id = call.trace.as_ref().map(|t| t.trace_id.as_str()),
        digest = Empty,
        code = Empty,
        latency_ms = Empty,
        otel.name = call.method,
        otel.kind = "server",
        otel.status_code = Empty,
        rpc.system = "grpc",
        rpc.service = pb::image_service_server::SERVICE_NAME,
        rpc.method = call.method,
        rpc.grpc.status_code = Empty,
    );
    if let Some(trace) = &call.trace {
        trace.adopt(&span);
    }
    let started = Instant::now();
    let counted = metrics::process();
    counted.rpc_in_flight.inc();
    let bounded = tokio::time::timeout_at(deadline, deadline::scope(deadline, work));
    let result = bounded
        .instrument(span.clone())
        .await
        .unwrap_or(Err(Error::DeadlineExceeded));
    let elapsed = started.elapsed();
    let latency_ms = elapsed.as_secs_f64() * 1e3;
    span.record("latency_ms", latency_ms);
    counted.rpc_in_flight.dec();
    counted
        .rpc_duration
        .get_or_create(&[("method", call.method)])
        .observe(elapsed.as_secs_f64());
    let failure = result.as_ref().err().map(Error::code_and_reason);
    let code = failure.map_or(tonic::Code::Ok, |(code, _)| code);
    counted
        .rpc_requests
        .get_or_create(&[("method", call.method), ("code", metrics::code_name(code))])
        .inc();
    span.in_scope(|| match result {
        Ok(body) => {
            span.record("code", "Ok");
            span.record("rpc.grpc.status_code", 0);
            debug!("request succeeded");
            Ok(Response::new(body))
        }
        Err(err) => {
            let reason = failure.map_or("", |(_, reason)| reason.as_str());
            span.record("code", debug_value(code));
            let detail = err
                .upstream()
                .map_or_else(|| err.to_string(), |u| u.detail.clone());
            span.record("rpc.grpc.status_code", code as i32);
            if err.is_server_side() {
                span.record("otel.status_code", "ERROR");
            }
            let Call {
                method,
                repository,
                reference,
                trace,
            } = &call;
            let trace_id = trace.as_ref().map(|t| t.trace_id.as_str());
            if err.is_server_side() {
                warn!(method, %repository, %reference, trace_id, ?code, reason, latency_ms, error = %detail, "request failed");
            } else {
                info!(method, %repository, %reference, trace_id, ?code, reason, latency_ms, error = %detail, "request refused");
            }
            Err(err.into())
        }
    })
}

/// The source's exact bytes and media type as a manifest to put again; why not, if they
/// cannot be (a registry may hold what this service would refuse).
fn source_manifest(source: &StoredImage) -> Result<Manifest, String> {
    let declared = MediaType::parse(&source.media_type).ok();
    Manifest::parse(source.manifest.to_string(), declared)
        .map_err(|err| format!("the source manifest cannot be put again: {err}"))
}

fn put_outcome(outcome: PutOutcome) -> pb::PutImageOutcome {
    match outcome {
        PutOutcome::Created => pb::PutImageOutcome::Created,
        PutOutcome::AlreadyExisted => pb::PutImageOutcome::AlreadyExisted,
    }
}

/// The API's form of a stored image. The one copy of the manifest bytes a read makes.
fn to_proto(image: StoredImage) -> pb::Image {
    pb::Image {
        registry_id: image.registry_id,
        repository_name: image.repository.as_str().to_owned(),
        image_id: Some(image_id(image.digest, image.tag)),
        image_manifest: image.manifest.to_string(),
        image_manifest_media_type: image.media_type,
    }
}

fn image_id(digest: Digest, tag: Option<Tag>) -> pb::ImageIdentifier {
    pb::ImageIdentifier {
        image_digest: digest.as_str().to_owned(),
        image_tag: tag.map(|t| t.as_str().to_owned()).unwrap_or_default(),
    }
}

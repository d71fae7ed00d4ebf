//! The ImageService RPCs: request -> validate -> registry -> response, one span per request.

use std::future::Future;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use futures_util::future::{Either, FutureExt};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::histogram::Histogram;
use tokio::time::Instant;
use tonic::{Request, Response, Status};
use tracing::field::{Empty, debug as debug_value};
use tracing::{Instrument, Span, debug, debug_span, info, warn};

use crate::access::authz::Action;
use crate::access::authz::Authorizer;
use crate::access::identity::IdentitySource;
use crate::access::verify::{Mode, Verdict, Verifier, VerifyRule};
use crate::api::audit::{self, Audit};
use crate::api::error::{self, Error};
use crate::api::methods::{self, Method};
use crate::api::paging::PageTokens;
use crate::api::pb;
use crate::api::watch::{Refused, WatchHub};
use crate::api::{retag, validate};
use crate::domain::call::{CallContext, NoIdentity, Principal};
use crate::domain::image::{Digest, RegistryId, RepositoryName, Tag};
use crate::metrics;
use crate::registry::accounts::Routes;
use crate::registry::{
    CacheStatus, DeleteImagesInput, GetImageInput, ListInput, PutImageInput, PutOutcome,
    RepositoryKey, SharedRegistry, StoredImage,
};
use crate::telemetry::TraceParent;

/// The gRPC service over a registry stack.
pub struct ImageService {
    registry: SharedRegistry,
    /// The deadline of a request that brings none (no `grpc-timeout`).
    default_deadline: Duration,
    /// Where callers' identities come from.
    identity: IdentitySource,
    /// What each caller may do.
    authorizer: Arc<Authorizer>,
    /// Signs and checks ListImages and DescribeImages page tokens.
    pages: PageTokens,
    /// WatchTag's pollers and watchers.
    hub: Arc<WatchHub>,
    /// The registries served: the own one, and the registries file's.
    routes: Arc<Routes>,
    /// Where every write and denial is recorded.
    audit: Audit,
    /// Verdicts on the digests served, under the policy's `verify:` rules.
    verifier: Arc<Verifier>,
}

impl ImageService {
    /// A service answering from `registry` to every caller, as `anonymous`, its page tokens
    /// signed by `pages`, its verdicts on verified reads from `verifier`.
    pub fn new(
        registry: SharedRegistry,
        default_deadline: Duration,
        pages: PageTokens,
        hub: Arc<WatchHub>,
        verifier: Arc<Verifier>,
    ) -> Self {
        Self {
            registry,
            default_deadline,
            identity: IdentitySource::None,
            authorizer: Arc::new(Authorizer::allow_all()),
            pages,
            hub,
            routes: Arc::new(Routes::own(None, None)),
            audit: Audit::off(),
            verifier,
        }
    }

    /// The same service, serving the registries `routes` names.
    pub fn serving(mut self, routes: Arc<Routes>) -> Self {
        self.audit = self.audit.for_own(
            routes.own_account().unwrap_or_default(),
            routes.own_region().unwrap_or_default(),
        );
        self.routes = routes;
        self
    }

    /// The same service, recording writes and denials in `audit`.
    pub fn with_audit(mut self, audit: Audit) -> Self {
        self.audit = audit.for_own(
            self.routes.own_account().unwrap_or_default(),
            self.routes.own_region().unwrap_or_default(),
        );
        self
    }

    /// The request's registry, routed: the service's own account and region are the same
    /// registry as neither named (one cache key, one batch lane, one budget), a registry of
    /// the registries file is itself, and any other is REGISTRY_NOT_CONFIGURED, before
    /// authorization and before any AWS call.
    fn route(&self, registry_id: &mut Option<RegistryId>) -> Result<(), Error> {
        let Some(asked) = registry_id.take() else {
            return Ok(());
        };
        let region = asked.region().cloned();
        let account = (!asked.is_own_account()).then(|| asked.in_region(None));
        *registry_id = self
            .routes
            .route(account.as_ref(), region.as_ref())
            .map_err(|refused| Error::RegistryNotConfigured {
                registry_id: refused.registry_id,
                region: refused.region,
            })?;
        Ok(())
    }

    /// The account a routed registry is in, as policies name it: the service's own for `None`
    /// (`""` when its credentials do not say).
    fn account_of<'a>(&'a self, registry: Option<&'a RegistryId>) -> &'a str {
        registry
            .map(RegistryId::as_str)
            .or(self.routes.own_account())
            .unwrap_or_default()
    }

    /// The registry's continuation token inside the caller's `page_token`, checked against the
    /// request's `fingerprint`; `None` for the first page.
    fn continue_at(
        &self,
        page_token: &str,
        fingerprint: &[u8; 32],
    ) -> Result<Option<String>, Error> {
        if page_token.is_empty() {
            return Ok(None);
        }
        self.pages
            .redeem(page_token, fingerprint)
            .map(Some)
            .map_err(|bad| {
                Error::invalid(
                    error::Reason::InvalidField,
                    vec![error::Violation::new("page_token", bad.to_string())],
                )
            })
    }

    /// The caller's token for the registry's next page, empty at the end.
    fn next_page(&self, next_token: Option<String>, fingerprint: &[u8; 32]) -> String {
        next_token.map_or_else(String::new, |token| self.pages.issue(fingerprint, &token))
    }

    /// The same service, reading callers' identities from `identity` and checking each request
    /// against `authorizer`.
    pub fn with_access(mut self, identity: IdentitySource, authorizer: Arc<Authorizer>) -> Self {
        self.identity = identity;
        self.authorizer = authorizer;
        self
    }

    /// A read, and the platform's child when a platform was asked for and the image is an
    /// index, with the response fields GetImage and ResolveImage share. The read's input is
    /// only copied when a child may have to be fetched.
    async fn read(
        &self,
        input: crate::registry::GetImageInput,
        platform: Option<crate::api::platform::Platform>,
    ) -> Result<Read, Error> {
        // Looked up before the read moves its input; `None` (no verify rule on) costs nothing.
        let verify = self
            .authorizer
            .verify_rule(&input.repository)
            .map(|rule| (rule, input.repository_key()));
        let selected = match platform {
            None => crate::api::platform::Selected {
                image: self.registry.get_image(input).await?,
                index: None,
                platform: None,
            },
            Some(platform) => {
                let fetched = self.registry.get_image(input.clone()).await?;
                // Boxed: the index walk's state would otherwise sit in every read's future.
                Box::pin(crate::api::platform::select(
                    &*self.registry,
                    &input,
                    fetched,
                    &platform,
                ))
                .await?
            }
        };
        Span::current().record("digest", selected.image.image.digest.as_str());
        let (index_image_id, platform, platform_applied) = index_fields(&selected);
        let (cache_status, tag_resolution_age) = provenance(selected.image.cache);
        let verification = match verify {
            Some((rule, repository)) => Some(
                self.verification(&rule, &repository, &selected.image.image.digest)
                    .await?,
            ),
            None => None,
        };
        Ok(Read {
            image: selected.image.image,
            cache_status,
            tag_resolution_age,
            index_image_id,
            platform,
            platform_applied,
            verification,
        })
    }

    /// The verdict of `rule` on `digest`, as a response field; in enforce mode a digest that
    /// does not pass is the error instead (audit mode serves it, the verdict saying why not).
    async fn verification(
        &self,
        rule: &Arc<VerifyRule>,
        repository: &RepositoryKey,
        digest: &Digest,
    ) -> Result<pb::Verification, Error> {
        let verdict = match self.verifier.kept(rule, repository, digest) {
            Some(verdict) => verdict,
            // Boxed: a verification's state (signatures, blobs, scans) would otherwise sit in
            // every read's future, copied whole into the box each request's work is put in.
            None => Box::pin(self.verifier.verdict(rule, repository, digest)).await?,
        };
        if let (Some(refusal), Mode::Enforce) = (&verdict.refusal, rule.mode) {
            return Err(Error::Unverified {
                rule: rule.id.clone(),
                digest: digest.to_string(),
                refusal: error::RefusalText(refusal.clone()),
            });
        }
        Ok(verification_of(&verdict))
    }

    /// Every RPC, one skeleton: the call's context (made by admission), its span and failure
    /// line (`describe` gives the repository and reference as the request names them), then
    /// caller -> [`validate`] -> authorization (the method table's actions) -> `work`, run
    /// inside the call's context for the registry the request names, under its deadline.
    ///
    /// Not `async`: what comes before the work ([`admit`](Self::admit)) is done at the call,
    /// so the future the caller awaits (and tonic boxes) is only [`observe`]'s, not also the
    /// request and the closures (2 KB, copied into each box, where this is about 0.5 KB).
    fn handle<'a, T, V, R, Fut>(
        &'a self,
        method: &'static Method,
        request: Request<T>,
        describe: fn(&T) -> (String, String),
        validate: fn(T) -> Result<V, Error>,
        work: impl FnOnce(V) -> Fut + 'a,
    ) -> impl Future<Output = Result<Response<R>, Status>> + 'a
    where
        T: 'a,
        V: Target + 'a,
        R: 'a,
        Fut: Future<Output = Result<R, Error>> + 'a,
    {
        let call = request
            .extensions()
            .get::<CallContext>()
            .cloned()
            .unwrap_or_else(|| self.unadmitted());
        let (repository, reference) = describe(request.get_ref());
        let rpc = Rpc::new(
            method.name,
            &request,
            call.caller().ok(),
            repository,
            reference,
        );
        let timing = RpcTiming::start(method.name);
        let (metadata, _, message) = request.into_parts();
        let deadline = call.deadline();
        // The checks are synchronous, so they are done here: the future each waiting call
        // holds is only its work, inside its context, on the heap apart: GetImage's is 1.6 KB
        // (4.6 KB with the checks' state and `scope` as an `async fn`; 10.6 KB with an index
        // walk's state in every read).
        let run = match self.admit(call, &metadata, method, message, describe, validate) {
            Ok((call, input)) => Either::Left(Box::pin(call.scope(work(input)))),
            Err(err) => Either::Right(std::future::ready(Err(err))),
        };
        observe(rpc, timing, deadline, run)
    }

    /// What comes before a request's work: its caller (UNAUTHENTICATED without one), its
    /// fields ([`validate`]), its registry (routed), and the policy's word on the method's
    /// actions there; the call's context for that registry, with a receipt for the audit of a
    /// write. A refusal is audited here.
    fn admit<T, V: Target>(
        &self,
        call: CallContext,
        metadata: &tonic::metadata::MetadataMap,
        method: &'static Method,
        message: T,
        describe: fn(&T) -> (String, String),
        validate: fn(T) -> Result<V, Error>,
    ) -> Result<(CallContext, V), Error> {
        let principal = match call.caller() {
            Ok(principal) => principal.clone(),
            Err(NoIdentity(why)) => {
                let err = Error::Unauthenticated {
                    source_name: self.identity.name(),
                    why,
                };
                let (repository, _) = describe(&message);
                self.deny(&call, metadata, method, &repository, &err);
                return Err(err);
            }
        };
        let mut input = validate(message)?;
        self.route(input.registry_id_mut())?;
        let account = self.account_of(input.registry_id());
        let mut call = call.for_registry(input.registry_id().cloned());
        if let Err(denied) =
            self.authorizer
                .check_all(&principal, method.actions, account, input.repository())
        {
            let err = Error::from(denied);
            self.deny(&call, metadata, method, input.repository().as_str(), &err);
            return Err(err);
        }
        if self.audit.is_on() && method.actions.iter().any(|a| *a != Action::Read) {
            let (request_id, trace_id) = request_ids(metadata);
            call = call.with_receipt(request_id, trace_id);
        }
        Ok((call, input))
    }

    /// Records a denial (`err`, PERMISSION_DENIED or UNAUTHENTICATED) of `method` on
    /// `repository`: one audit event per action the method needed.
    fn deny(
        &self,
        call: &CallContext,
        metadata: &tonic::metadata::MetadataMap,
        method: &Method,
        repository: &str,
        err: &Error,
    ) {
        if !self.audit.is_on() {
            return;
        }
        let (request_id, trace_id) = request_ids(metadata);
        let call = call.clone().with_receipt(request_id, trace_id);
        let (_, reason) = err.code_and_reason();
        let action = match err {
            Error::AccessDenied { action, .. } => action.as_str(),
            _ => method.actions.first().map_or("read", |a| a.as_str()),
        };
        self.audit.record_for(
            &call,
            &audit::Record {
                action,
                repository,
                outcome: Some(audit::Outcome::Denied),
                reason: reason.as_str(),
                ..audit::Record::default()
            },
        );
    }

    /// The context of a request that did not come through admission, which makes one for
    /// every request: refused as unauthenticated, never served without a caller or deadline.
    fn unadmitted(&self) -> CallContext {
        CallContext::new(
            Instant::now() + self.default_deadline,
            Err(NoIdentity("the request did not pass admission")),
        )
    }
}

/// A verdict as the API reports it.
pub fn verification_of(verdict: &Verdict) -> pb::Verification {
    let signed = verdict.signed.as_ref();
    pb::Verification {
        rule: verdict.rule.clone(),
        mode: verdict.mode.as_str().to_owned(),
        passed: verdict.refusal.is_none(),
        refusal_reason: verdict
            .refusal
            .as_ref()
            .map_or_else(String::new, |r| r.reason().to_owned()),
        key_name: signed.map_or_else(String::new, |s| s.key_name.clone()),
        key_fingerprint: signed.map_or_else(String::new, |s| s.key_fingerprint.clone()),
        signature_form: signed.map_or_else(String::new, |s| s.form.as_str().to_owned()),
        scan_status: verdict.scan_status.clone(),
        scan_severity_counts: verdict
            .scan_counts
            .iter()
            .map(|(k, v)| (k.clone(), *v))
            .collect(),
        checked_at: Some(prost_types::Timestamp::from(verdict.checked_at)),
    }
}

/// The request's id (`x-request-id`, which Envoy and Istio set on every request; bounded) or a
/// fresh one, and its W3C trace id (empty without one).
fn request_ids(metadata: &tonic::metadata::MetadataMap) -> (String, String) {
    let header = |name| metadata.get(name).and_then(|v| v.to_str().ok());
    let request_id = header("x-request-id")
        .filter(|id| !id.is_empty())
        .map_or_else(crate::domain::random::request_id, |id| {
            crate::domain::text::truncated(id, MAX_REQUEST_ID_BYTES)
        });
    let trace_id = header("traceparent")
        .and_then(TraceParent::parse)
        .map(|t| t.trace_id)
        .unwrap_or_default();
    (request_id, trace_id)
}

/// Longer than any id a mesh or client library draws (a UUID is 36).
const MAX_REQUEST_ID_BYTES: usize = 128;

/// A read as GetImage and ResolveImage answer it.
struct Read {
    image: StoredImage,
    cache_status: pb::CacheStatus,
    tag_resolution_age: Option<prost_types::Duration>,
    index_image_id: Option<pb::ImageIdentifier>,
    platform: Option<pb::Platform>,
    platform_applied: bool,
    verification: Option<pb::Verification>,
}

/// What a validated request is for: the registry and the repository its authorization and
/// call context name.
trait Target {
    /// The registry; `None`: the service's own.
    fn registry_id(&self) -> Option<&RegistryId>;
    /// The registry, for routing to rewrite.
    fn registry_id_mut(&mut self) -> &mut Option<RegistryId>;
    /// The repository.
    fn repository(&self) -> &RepositoryName;
}

macro_rules! target {
    ($($input:ty),*) => {$(
        impl Target for $input {
            fn registry_id(&self) -> Option<&RegistryId> {
                self.registry_id.as_ref()
            }
            fn registry_id_mut(&mut self) -> &mut Option<RegistryId> {
                &mut self.registry_id
            }
            fn repository(&self) -> &RepositoryName {
                &self.repository
            }
        }
    )*};
}
impl Target for (crate::registry::ReferrersInput, String) {
    fn registry_id(&self) -> Option<&RegistryId> {
        self.0.repository.registry_id.as_ref()
    }
    fn registry_id_mut(&mut self) -> &mut Option<RegistryId> {
        &mut self.0.repository.registry_id
    }
    fn repository(&self) -> &RepositoryName {
        &self.0.repository.repository
    }
}

target!(
    PutImageInput,
    GetImageInput,
    DeleteImagesInput,
    ListInput,
    RepositoryKey
);

impl Target for validate::RetagInput {
    fn registry_id(&self) -> Option<&RegistryId> {
        self.source.registry_id()
    }
    fn registry_id_mut(&mut self) -> &mut Option<RegistryId> {
        self.source.registry_id_mut()
    }
    fn repository(&self) -> &RepositoryName {
        self.source.repository()
    }
}

impl Target for crate::registry::DescribeInput {
    fn registry_id(&self) -> Option<&RegistryId> {
        self.listing.registry_id()
    }
    fn registry_id_mut(&mut self) -> &mut Option<RegistryId> {
        self.listing.registry_id_mut()
    }
    fn repository(&self) -> &RepositoryName {
        self.listing.repository()
    }
}

/// A validated request with more parts: the first names the target.
impl<A: Target, B> Target for (A, B) {
    fn registry_id(&self) -> Option<&RegistryId> {
        self.0.registry_id()
    }
    fn registry_id_mut(&mut self) -> &mut Option<RegistryId> {
        self.0.registry_id_mut()
    }
    fn repository(&self) -> &RepositoryName {
        self.0.repository()
    }
}

impl<A: Target, B, C> Target for (A, B, C) {
    fn registry_id(&self) -> Option<&RegistryId> {
        self.0.registry_id()
    }
    fn registry_id_mut(&mut self) -> &mut Option<RegistryId> {
        self.0.registry_id_mut()
    }
    fn repository(&self) -> &RepositoryName {
        self.0.repository()
    }
}

#[tonic::async_trait]
impl pb::image_service_server::ImageService for ImageService {
    async fn put_image(
        &self,
        request: Request<pb::PutImageRequest>,
    ) -> Result<Response<pb::PutImageResponse>, Status> {
        let describe = |r: &pb::PutImageRequest| (r.repository_name.clone(), r.image_tag.clone());
        self.handle(
            &methods::PUT_IMAGE,
            request,
            describe,
            validate::put_image,
            |input| async move {
                let tag = input.tag.as_ref().map_or("", Tag::as_str);
                let digest = input.manifest.digest().as_str();
                let mut event = audit::Pending::start(
                    &self.audit,
                    "write",
                    input.repository.as_str(),
                    tag,
                    digest,
                );
                if let Err(err) =
                    crate::api::platform::check_children(&*self.registry, &input).await
                {
                    event.failed(&err);
                    return Err(err);
                }
                Span::current().record("digest", digest);
                let repository = input.repository_key();
                event
                    .read_before(&*self.registry, &repository, input.tag.as_ref())
                    .await;
                let put = self.registry.put_image(input).await.map_err(Error::from);
                event.finish(&put);
                let (image, outcome) = put?;
                Ok(pb::PutImageResponse {
                    image: Some(to_proto(image)),
                    outcome: put_outcome(outcome).into(),
                })
            },
        )
        .await
    }

    async fn get_image(
        &self,
        request: Request<pb::GetImageRequest>,
    ) -> Result<Response<pb::GetImageResponse>, Status> {
        let describe =
            |r: &pb::GetImageRequest| (r.repository_name.clone(), describe(r.image_id.as_ref()));
        let validate = |r: pb::GetImageRequest| {
            let platform = validate::platform(r.platform.as_ref())?;
            Ok((validate::get_image(r)?, platform))
        };
        self.handle(
            &methods::GET_IMAGE,
            request,
            describe,
            validate,
            // Mapped, not awaited in an `async` block: the block would keep the input beside
            // the read's future, which holds it too.
            |(input, platform)| {
                self.read(input, platform).map(|read| {
                    let read = read?;
                    Ok(pb::GetImageResponse {
                        image: Some(to_proto(read.image)),
                        cache_status: read.cache_status.into(),
                        tag_resolution_age: read.tag_resolution_age,
                        index_image_id: read.index_image_id,
                        platform: read.platform,
                        platform_applied: read.platform_applied,
                        verification: read.verification,
                    })
                })
            },
        )
        .await
    }

    async fn retag_image(
        &self,
        request: Request<pb::RetagImageRequest>,
    ) -> Result<Response<pb::RetagImageResponse>, Status> {
        let describe = |r: &pb::RetagImageRequest| {
            (
                r.repository_name.clone(),
                describe(r.source_image_id.as_ref()),
            )
        };
        self.handle(
            &methods::RETAG_IMAGE,
            request,
            describe,
            validate::retag_image,
            |input| async move {
                let retagged = retag::retag(&*self.registry, &self.audit, input).await?;
                Span::current().record("digest", retagged.source.digest.as_str());
                let results = retagged
                    .results
                    .into_iter()
                    .map(|(tag, result)| retag_result(tag, result))
                    .collect();
                let mut source_image = to_proto(retagged.source);
                // The bytes stay home: the caller asked for tags, not for the manifest.
                source_image.image_manifest = String::new();
                Ok(pb::RetagImageResponse {
                    source_image: Some(source_image),
                    results,
                })
            },
        )
        .await
    }

    async fn resolve_image(
        &self,
        request: Request<pb::ResolveImageRequest>,
    ) -> Result<Response<pb::ResolveImageResponse>, Status> {
        let describe = |r: &pb::ResolveImageRequest| {
            (r.repository_name.clone(), describe(r.image_id.as_ref()))
        };
        let validate = |r: pb::ResolveImageRequest| {
            let platform = validate::platform(r.platform.as_ref())?;
            Ok((validate::resolve_image(r)?, platform))
        };
        self.handle(
            &methods::RESOLVE_IMAGE,
            request,
            describe,
            validate,
            |(input, platform)| {
                self.read(input, platform).map(|read| {
                    let read = read?;
                    let image = read.image;
                    Ok(pb::ResolveImageResponse {
                        index_image_id: read.index_image_id,
                        platform: read.platform,
                        platform_applied: read.platform_applied,
                        image_manifest_size: i64::try_from(image.manifest.len())
                            .unwrap_or(i64::MAX),
                        registry_id: image.registry_id,
                        repository_name: image.repository.as_str().to_owned(),
                        image_id: Some(image_id(image.digest, image.tag)),
                        image_manifest_media_type: image.media_type,
                        cache_status: read.cache_status.into(),
                        tag_resolution_age: read.tag_resolution_age,
                        verification: read.verification,
                    })
                })
            },
        )
        .await
    }

    async fn batch_delete_image(
        &self,
        request: Request<pb::BatchDeleteImageRequest>,
    ) -> Result<Response<pb::BatchDeleteImageResponse>, Status> {
        let describe = |r: &pb::BatchDeleteImageRequest| {
            (
                r.repository_name.clone(),
                format!("{} ids", r.image_ids.len()),
            )
        };
        self.handle(
            &methods::BATCH_DELETE_IMAGE,
            request,
            describe,
            validate::batch_delete_image,
            |input| async move {
                // Tag moves reach watchers (and other replicas) from the registry stack.
                let events = audit::PendingDeletes::start(
                    &self.audit,
                    input.repository.as_str(),
                    &input.images,
                );
                let outcome = self
                    .registry
                    .delete_images(input)
                    .await
                    .map_err(Error::from);
                events.finish(&outcome);
                let outcome = outcome?;
                Ok(pb::BatchDeleteImageResponse {
                    image_ids: outcome.deleted.into_iter().map(id_of).collect(),
                    failures: outcome
                        .failures
                        .into_iter()
                        .map(|f| pb::ImageFailure {
                            image_id: Some(pb::ImageIdentifier {
                                image_digest: f
                                    .image
                                    .as_ref()
                                    .and_then(|i| i.digest())
                                    .map(ToString::to_string)
                                    .unwrap_or_default(),
                                image_tag: f
                                    .image
                                    .as_ref()
                                    .and_then(|i| i.tag())
                                    .map(ToString::to_string)
                                    .unwrap_or_default(),
                            }),
                            failure_code: f.code,
                            failure_reason: f.reason,
                        })
                        .collect(),
                })
            },
        )
        .await
    }

    async fn list_images(
        &self,
        request: Request<pb::ListImagesRequest>,
    ) -> Result<Response<pb::ListImagesResponse>, Status> {
        let describe = |r: &pb::ListImagesRequest| (r.repository_name.clone(), String::new());
        // Authorized on every page: a token never carries authority (AIP-158).
        self.handle(
            &methods::LIST_IMAGES,
            request,
            describe,
            validate::list_images,
            |(mut input, page_token)| async move {
                let fingerprint = listing_fingerprint("ListImages", &input, &[]);
                input.next_token = self.continue_at(&page_token, &fingerprint)?;
                let page = self.registry.list_images(input).await?;
                Ok(pb::ListImagesResponse {
                    image_ids: page.ids.into_iter().map(id_of).collect(),
                    next_page_token: self.next_page(page.next_token, &fingerprint),
                })
            },
        )
        .await
    }

    async fn describe_images(
        &self,
        request: Request<pb::DescribeImagesRequest>,
    ) -> Result<Response<pb::DescribeImagesResponse>, Status> {
        let describe = |r: &pb::DescribeImagesRequest| (r.repository_name.clone(), String::new());
        self.handle(
            &methods::DESCRIBE_IMAGES,
            request,
            describe,
            validate::describe_images,
            |(mut input, page_token)| async move {
                let fingerprint =
                    listing_fingerprint("DescribeImages", &input.listing, &input.images);
                input.listing.next_token = self.continue_at(&page_token, &fingerprint)?;
                let page = self.registry.describe_images(input).await?;
                Ok(pb::DescribeImagesResponse {
                    image_details: page
                        .details
                        .into_iter()
                        .map(|d| pb::ImageDetail {
                            image_digest: d.digest.to_string(),
                            image_tags: d.tags.iter().map(ToString::to_string).collect(),
                            image_size_in_bytes: d.size_in_bytes,
                            image_pushed_at: d
                                .pushed_at
                                .map(|seconds| prost_types::Timestamp { seconds, nanos: 0 }),
                            image_manifest_media_type: d.media_type,
                            artifact_media_type: d.artifact_media_type,
                        })
                        .collect(),
                    next_page_token: self.next_page(page.next_token, &fingerprint),
                })
            },
        )
        .await
    }

    async fn list_referrers(
        &self,
        request: Request<pb::ListReferrersRequest>,
    ) -> Result<Response<pb::ListReferrersResponse>, Status> {
        let describe =
            |r: &pb::ListReferrersRequest| (r.repository_name.clone(), r.image_digest.clone());
        self.handle(
            &methods::LIST_REFERRERS,
            request,
            describe,
            validate::list_referrers,
            |(mut input, page_token)| async move {
                let fingerprint = referrers_fingerprint(&input);
                input.next_token = self.continue_at(&page_token, &fingerprint)?;
                let page = self.registry.list_referrers(input).await?;
                Ok(pb::ListReferrersResponse {
                    referrers: page
                        .referrers
                        .into_iter()
                        .map(|r| pb::Referrer {
                            digest: r.digest.to_string(),
                            media_type: r.media_type,
                            artifact_type: r.artifact_type,
                            size: r.size,
                            annotations: r.annotations.into_iter().collect(),
                        })
                        .collect(),
                    next_page_token: self.next_page(page.next_token, &fingerprint),
                })
            },
        )
        .await
    }

    type WatchTagStream = crate::api::watch::WatchStream;

    async fn watch_tag(
        &self,
        request: Request<pb::WatchTagRequest>,
    ) -> Result<Response<Self::WatchTagStream>, Status> {
        let describe = |r: &pb::WatchTagRequest| (r.repository_name.clone(), r.image_tag.clone());
        self.handle(
            &methods::WATCH_TAG,
            request,
            describe,
            validate::watch_tag,
            |(repository, tag, last_known)| async move {
                // The caller as authorized now, for the stream to ask the policy again.
                let caller = crate::domain::call::current()
                    .and_then(|call| call.caller().ok().cloned())
                    .ok_or(Error::Unauthenticated {
                        source_name: self.identity.name(),
                        why: "no caller in the call's context",
                    })?;
                let (authorizer, name) =
                    (Arc::clone(&self.authorizer), repository.repository.clone());
                let account = self.account_of(repository.registry_id.as_ref()).to_owned();
                let still_allowed = move || {
                    authorizer.check_all(&caller, methods::WATCH_TAG.actions, &account, &name)?;
                    Ok(())
                };
                let repository_key = repository.clone();
                let watch = self
                    .hub
                    .watch(crate::domain::call::caller_key(), repository, tag.clone())
                    .await
                    .map_err(|refused| match refused {
                        Refused::Cap(cap) => Error::TooManyWatches(cap),
                        Refused::Repository(missing) => Error::Registry(missing),
                    })?;
                let heartbeat = self.hub.settings().heartbeat_interval;
                let judge = self.authorizer.verifies().then(|| {
                    let (authorizer, verifier) =
                        (Arc::clone(&self.authorizer), Arc::clone(&self.verifier));
                    let judge: crate::api::watch::Judge = Arc::new(move |digest: Digest| {
                        let (authorizer, verifier, repository) = (
                            Arc::clone(&authorizer),
                            Arc::clone(&verifier),
                            repository_key.clone(),
                        );
                        Box::pin(async move {
                            let Some(rule) = authorizer.verify_rule(&repository.repository) else {
                                return Ok(None);
                            };
                            let verdict = verifier.verdict(&rule, &repository, &digest).await?;
                            let refused = rule.mode == Mode::Enforce && verdict.refusal.is_some();
                            Ok(Some((verification_of(&verdict), refused)))
                        })
                    });
                    judge
                });
                let stream = crate::api::watch::stream(
                    watch,
                    tag,
                    last_known,
                    heartbeat,
                    still_allowed,
                    judge,
                );
                Ok(stream)
            },
        )
        .await
    }
}

/// What a ListReferrers page token is bound to: the registry, the repository, the image, the
/// artifact type and the page size.
fn referrers_fingerprint(input: &crate::registry::ReferrersInput) -> [u8; 32] {
    PageTokens::fingerprint(&[
        "ListReferrers",
        &input
            .repository
            .registry_id
            .as_ref()
            .map_or_else(String::new, RegistryId::key),
        input.repository.repository.as_str(),
        input.subject.as_str(),
        &input.artifact_types.join(","),
        &input.max_results.to_string(),
    ])
}

/// What a page token is bound to: the operation, the registry, the repository, the filter, the
/// page size and (DescribeImages) the ids.
fn listing_fingerprint(
    operation: &str,
    listing: &crate::registry::ListInput,
    ids: &[crate::domain::image::ImageRef],
) -> [u8; 32] {
    let ids: Vec<String> = ids.iter().map(ToString::to_string).collect();
    PageTokens::fingerprint(&[
        operation,
        &listing
            .registry_id
            .as_ref()
            .map_or_else(String::new, RegistryId::key),
        listing.repository.as_str(),
        &format!("{:?}", listing.tag_status),
        &listing.max_results.to_string(),
        &ids.join(","),
    ])
}

/// An id as the API returns it.
fn id_of(id: crate::registry::Deleted) -> pb::ImageIdentifier {
    pb::ImageIdentifier {
        image_digest: id.digest.map(|d| d.to_string()).unwrap_or_default(),
        image_tag: id.tag.map(|t| t.to_string()).unwrap_or_default(),
    }
}

/// The response fields that say which index a platform's child came from.
fn index_fields(
    selected: &crate::api::platform::Selected,
) -> (Option<pb::ImageIdentifier>, Option<pb::Platform>, bool) {
    let index = selected.index.as_ref().map(|index| pb::ImageIdentifier {
        image_digest: index.digest.to_string(),
        image_tag: index
            .tag
            .as_ref()
            .map(ToString::to_string)
            .unwrap_or_default(),
    });
    let platform = selected.platform.as_ref().map(|p| pb::Platform {
        os: p.os.clone(),
        architecture: p.architecture.clone(),
        variant: p.variant.clone(),
        os_version: p.os_version.clone(),
        os_features: p.os_features.clone(),
    });
    let applied = index.is_some();
    (index, platform, applied)
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

/// The most of a request-supplied value (a repository, a tag) that goes on a log line. Values
/// are logged before validation, so they are escaped and cut: a hostile tag can neither forge
/// a line nor make one megabytes long.
const MAX_LOGGED_VALUE_CHARS: usize = 128;

/// `value` made safe for a log line: control and invisible characters escaped, at most
/// [`MAX_LOGGED_VALUE_CHARS`] characters, `…` where it was cut.
fn loggable(value: &str) -> String {
    let mut logged: String = value
        .chars()
        .take(MAX_LOGGED_VALUE_CHARS)
        .flat_map(char::escape_debug)
        .collect();
    if value.chars().nth(MAX_LOGGED_VALUE_CHARS).is_some() {
        logged.push('…');
    }
    logged
}

/// What a request is, for its span and for the line logged if it fails.
struct Rpc {
    method: &'static str,
    /// The caller, when it has a valid identity (checked: safe to log as it is).
    principal: Option<Principal>,
    /// As the request gave it: escaped ([`loggable`]) only when a line is written.
    repository: String,
    /// As the request gave it: escaped ([`loggable`]) only when a line is written.
    reference: String,
    /// The caller's W3C trace context, so this request's lines and spans join its trace.
    trace: Option<TraceParent>,
}

impl Rpc {
    fn new<T>(
        method: &'static str,
        request: &Request<T>,
        principal: Option<&Principal>,
        repository: String,
        reference: String,
    ) -> Self {
        let trace = request
            .metadata()
            .get("traceparent")
            .and_then(|v| v.to_str().ok())
            .and_then(TraceParent::parse);
        Self {
            method,
            principal: principal.cloned(),
            repository,
            reference,
            trace,
        }
    }

    fn trace_id(&self) -> Option<&str> {
        self.trace.as_ref().map(|t| t.trace_id.as_str())
    }

    /// The request's span. At DEBUG: at the default level it is disabled and costs a cached
    /// check, where an INFO span would have its fields formatted on every request, successes
    /// included. `otel.*` and `rpc.*` name the exported span by OpenTelemetry's RPC
    /// conventions.
    fn span(&self) -> Span {
        let span = debug_span!(
            "rpc",
            method = self.method,
            principal = self.principal.as_ref().map(Principal::as_str),
            repository = %loggable(&self.repository),
            reference = %loggable(&self.reference),
            trace_id = self.trace_id(),
            digest = Empty,
            code = Empty,
            latency_ms = Empty,
            otel.name = self.method,
            otel.kind = "server",
            otel.status_code = Empty,
            rpc.system = "grpc",
            rpc.service = pb::image_service_server::SERVICE_NAME,
            rpc.method = self.method,
            rpc.grpc.status_code = Empty,
        );
        if let Some(trace) = &self.trace {
            trace.adopt(&span);
        }
        span
    }

    /// The one line a failed request logs: caller mistakes at INFO, the service's and ECR's
    /// failures at WARN. What ECR said goes in fields of its own (code, message, request ID,
    /// attempts), never as a raw response.
    fn log_failure(&self, err: &Error, code: tonic::Code, reason: &str, latency_ms: f64) {
        let method = self.method;
        let principal = self.principal.as_ref().map(Principal::as_str);
        let (repository, reference) = (loggable(&self.repository), loggable(&self.reference));
        let trace_id = self.trace_id();
        let upstream = err.upstream();
        let ecr_code = upstream.and_then(|u| u.code.as_deref());
        let ecr_request_id = upstream.and_then(|u| u.request_id.as_deref());
        let error_text = err.to_string();
        // ECR's own words, once: in `error` where the caller's message carries them, else here
        // (AccessDenied's name the service's role, and callers never see them).
        let ecr_message = upstream
            .filter(|u| !error_text.contains(&u.message))
            .map(|u| loggable(&u.message));
        let attempts = upstream.and_then(|u| u.attempts);
        let cause = upstream
            .map(|u| u.detail.as_str())
            .filter(|d| !d.is_empty());
        let error = loggable(&error_text);
        if err.is_server_side() {
            warn!(method, principal, %repository, %reference, trace_id, ?code, reason, latency_ms, %error, ecr_code, ecr_message, ecr_request_id, attempts, cause, "request failed");
        } else {
            info!(method, principal, %repository, %reference, trace_id, ?code, reason, latency_ms, %error, ecr_code, ecr_message, ecr_request_id, attempts, cause, "request refused");
        }
    }
}

/// Runs one request in its span, under the caller's deadline, and answers: successes logged at
/// DEBUG, failures by [`Rpc::log_failure`], and errors turned into statuses through the one
/// mapping in [`crate::api::error`].
///
/// At the deadline the work is dropped (and with it any ECR call only it was waiting for) and
/// the caller gets DEADLINE_EXCEEDED.
async fn observe<T>(
    call: Rpc,
    timing: RpcTiming,
    deadline: Option<Instant>,
    work: impl Future<Output = Result<T, Error>>,
) -> Result<Response<T>, Status> {
    let span = call.span();
    let result = match deadline {
        Some(deadline) => tokio::time::timeout_at(deadline, work)
            .instrument(span.clone())
            .await
            .unwrap_or(Err(Error::DeadlineExceeded)),
        None => work.instrument(span.clone()).await,
    };
    let failure = result.as_ref().err().map(Error::code_and_reason);
    let code = failure.map_or(tonic::Code::Ok, |(code, _)| code);
    let latency_ms = timing.finish(code);
    span.record("latency_ms", latency_ms);
    span.record("rpc.grpc.status_code", code as i32);
    span.in_scope(|| match result {
        Ok(body) => {
            span.record("code", "Ok");
            debug!("request succeeded");
            Ok(Response::new(body))
        }
        Err(err) => {
            let reason = failure.map_or("", |(_, reason)| reason.as_str());
            span.record("code", debug_value(code));
            if err.is_server_side() {
                span.record("otel.status_code", "ERROR");
            }
            call.log_failure(&err, code, reason, latency_ms);
            Err(err.into())
        }
    })
}

/// One RPC in the process's metrics: in flight from [`start`](Self::start) until dropped;
/// counted by code and timed by [`finish`](Self::finish).
struct RpcTiming {
    method: &'static str,
    started: Instant,
}

/// Each method's series for its successes, in [`methods::METHODS`]' order, taken from the
/// families on first use: a family lookup hashes its labels and takes a lock, two per request
/// on the cached read otherwise. Failures, rare and by code, still look theirs up.
static OK_SERIES: [OnceLock<(Histogram, Counter)>; methods::METHODS.len()] =
    [const { OnceLock::new() }; methods::METHODS.len()];

impl RpcTiming {
    fn start(method: &'static str) -> Self {
        metrics::process().rpc_in_flight.inc();
        crate::memory::request_started();
        Self {
            method,
            started: Instant::now(),
        }
    }

    /// Records the RPC's end with `code`; its latency in milliseconds.
    fn finish(self, code: tonic::Code) -> f64 {
        let elapsed = self.started.elapsed();
        let counted = metrics::process();
        let duration = || {
            counted
                .rpc_duration
                .get_or_create(&[("method", self.method)])
        };
        let requests = |code| {
            counted
                .rpc_requests
                .get_or_create(&[("method", self.method), ("code", error::code_name(code))])
        };
        let slot = methods::METHODS.iter().position(|m| m.name == self.method);
        match slot.and_then(|slot| OK_SERIES.get(slot)) {
            Some(series) if code == tonic::Code::Ok => {
                let (histogram, ok) =
                    series.get_or_init(|| (duration().clone(), requests(tonic::Code::Ok).clone()));
                histogram.observe(elapsed.as_secs_f64());
                ok.inc();
            }
            _ => {
                duration().observe(elapsed.as_secs_f64());
                requests(code).inc();
            }
        }
        elapsed.as_secs_f64() * 1e3
    }
}

impl Drop for RpcTiming {
    /// Out of flight however the RPC ends, a client's cancellation included.
    fn drop(&mut self) {
        metrics::process().rpc_in_flight.dec();
    }
}

/// The API's form of one target's result.
fn retag_result(tag: Tag, result: Result<PutOutcome, Error>) -> pb::RetagImageResult {
    let image_tag = tag.as_str().to_owned();
    match result {
        Ok(outcome) => pb::RetagImageResult {
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
                    code: error::code_name(code).to_owned(),
                    reason: reason.as_str().to_owned(),
                    message: err.to_string(),
                }),
            }
        }
    }
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
        repository_name: image.repository.into(),
        image_id: Some(image_id(image.digest, image.tag)),
        image_manifest: image.manifest.to_string(),
        image_manifest_media_type: image.media_type,
    }
}

fn image_id(digest: Digest, tag: Option<Tag>) -> pb::ImageIdentifier {
    pb::ImageIdentifier {
        image_digest: digest.into(),
        image_tag: tag.map(String::from).unwrap_or_default(),
    }
}

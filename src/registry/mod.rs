//! The registry seam: what the service needs from a place that stores manifests.
//!
//! One object-safe trait, [`Registry`], held as a [`SharedRegistry`] (`Arc<dyn Registry>`).
//! Backends implement it ([`ecr::EcrRegistry`] over `aws-sdk-ecr`, [`local::LocalRegistry`]
//! over SQLite), and decorators implement it by holding whatever is below them
//! ([`cached::CachedRegistry`]), like go-containerregistry's layers. A trait object rather
//! than an enum of backends: a decorator (the cache today; authorization and a shared Redis
//! tier next) stacks over any backend without an enum that names every combination, and the
//! one allocation a boxed future costs per call is noise next to an RPC. Each new capability
//! (list, delete, watch, platform resolution) becomes one more method here, which the cache
//! and the embedded store answer like any other.
//!
//! Each layer registers its own metrics ([`Registry::register_metrics`]), so the metrics
//! module knows no backend.

/// The [`Registry`] methods of a type whose inherent `async fn put` and `async fn get` do the
/// work: the boxing every implementation needs, written once. Used inside `impl Registry`.
macro_rules! boxed_registry_methods {
    () => {
        fn put_image(
            &self,
            input: $crate::registry::PutImageInput,
        ) -> $crate::registry::BoxFuture<
            '_,
            Result<
                ($crate::registry::StoredImage, $crate::registry::PutOutcome),
                $crate::registry::RegistryError,
            >,
        > {
            Box::pin(self.put(input))
        }

        fn get_image(
            &self,
            input: $crate::registry::GetImageInput,
        ) -> $crate::registry::BoxFuture<
            '_,
            Result<$crate::registry::Fetched, $crate::registry::RegistryError>,
        > {
            Box::pin(self.get(input))
        }

        fn delete_images(
            &self,
            input: $crate::registry::DeleteImagesInput,
        ) -> $crate::registry::BoxFuture<
            '_,
            Result<$crate::registry::DeleteOutcome, $crate::registry::RegistryError>,
        > {
            Box::pin(self.delete(input))
        }

        fn list_images(
            &self,
            input: $crate::registry::ListInput,
        ) -> $crate::registry::BoxFuture<
            '_,
            Result<$crate::registry::ListPage, $crate::registry::RegistryError>,
        > {
            Box::pin(self.list(input))
        }

        fn describe_images(
            &self,
            input: $crate::registry::DescribeInput,
        ) -> $crate::registry::BoxFuture<
            '_,
            Result<$crate::registry::DescribePage, $crate::registry::RegistryError>,
        > {
            Box::pin(self.describe(input))
        }

        fn tag_digest(
            &self,
            repository: $crate::registry::RepositoryKey,
            tag: $crate::domain::image::Tag,
        ) -> $crate::registry::BoxFuture<
            '_,
            Result<Option<$crate::domain::image::Digest>, $crate::registry::RegistryError>,
        > {
            Box::pin(self.tag_digest(repository, tag))
        }
    };
}

mod error;
mod flight;
pub mod front;

pub mod accounts;
pub mod cached;
pub mod ecr;
pub mod local;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

pub use error::{RETRY_SOON, RegistryError, Upstream};

use crate::domain::image::{
    Digest, ImageRef, Manifest, MediaType, RegistryId, RepositoryName, Tag,
};

/// A registry call in flight: boxed, so that [`Registry`] can be a trait object.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A registry stack, shared by the service and its decorators.
pub type SharedRegistry = Arc<dyn Registry>;

/// A shared registry is a registry: a stack can be handed on as it was built.
impl<R: Registry + ?Sized> Registry for Arc<R> {
    fn put_image(
        &self,
        input: PutImageInput,
    ) -> BoxFuture<'_, Result<(StoredImage, PutOutcome), RegistryError>> {
        (**self).put_image(input)
    }

    fn get_image(&self, input: GetImageInput) -> BoxFuture<'_, Result<Fetched, RegistryError>> {
        (**self).get_image(input)
    }

    fn delete_images(
        &self,
        input: DeleteImagesInput,
    ) -> BoxFuture<'_, Result<DeleteOutcome, RegistryError>> {
        (**self).delete_images(input)
    }

    fn list_images(&self, input: ListInput) -> BoxFuture<'_, Result<ListPage, RegistryError>> {
        (**self).list_images(input)
    }

    fn describe_images(
        &self,
        input: DescribeInput,
    ) -> BoxFuture<'_, Result<DescribePage, RegistryError>> {
        (**self).describe_images(input)
    }

    fn tag_digest(
        &self,
        repository: RepositoryKey,
        tag: Tag,
    ) -> BoxFuture<'_, Result<Option<Digest>, RegistryError>> {
        (**self).tag_digest(repository, tag)
    }

    fn list_referrers(
        &self,
        input: ReferrersInput,
    ) -> BoxFuture<'_, Result<ReferrersPage, RegistryError>> {
        (**self).list_referrers(input)
    }

    fn get_blob(
        &self,
        repository: RepositoryKey,
        digest: Digest,
        max_bytes: usize,
    ) -> BoxFuture<'_, Result<Vec<u8>, RegistryError>> {
        (**self).get_blob(repository, digest, max_bytes)
    }

    fn scan_summary(
        &self,
        repository: RepositoryKey,
        digest: Digest,
    ) -> BoxFuture<'_, Result<ScanSummary, RegistryError>> {
        (**self).scan_summary(repository, digest)
    }

    fn register_metrics(&self, metrics: &mut prometheus_client::registry::Registry) {
        (**self).register_metrics(metrics);
    }

    fn subscribe_moves(&self, bus: Arc<dyn TagBus>) {
        (**self).subscribe_moves(bus);
    }
}

/// A tag that a put, retag or delete through this replica moved.
#[derive(Debug, Clone, Copy)]
pub struct TagMove<'a> {
    /// The repository.
    pub repository: &'a RepositoryKey,
    /// The tag.
    pub tag: &'a Tag,
    /// What it points at now; `None`: deleted.
    pub digest: Option<&'a Digest>,
    /// The media type of what it points at (empty when deleted).
    pub media_type: &'a str,
}

/// Where this replica's tag moves go: the one path for every move, to every subscriber (the
/// fleet tells other replicas, the watch hub tells this replica's watchers).
pub trait TagBus: Send + Sync {
    /// `change` happened through this replica.
    fn moved(&self, change: &TagMove<'_>);

    /// `digest` of `repository` was deleted through this replica: no replica may serve it from
    /// its cache any more. Only the fleet needs it (watchers hear of the tags it took along).
    fn digest_deleted(&self, repository: &RepositoryKey, digest: &Digest) {
        let _ = (repository, digest);
    }
}

/// A validated PutImage: everything in it has passed the API's checks.
#[derive(Debug, Clone)]
pub struct PutImageInput {
    /// The registry; `None` means the service's own account.
    pub registry_id: Option<RegistryId>,
    /// The repository to store into; it must exist.
    pub repository: RepositoryName,
    /// The exact bytes, their digest and their settled media type.
    pub manifest: Manifest,
    /// The tag to attach; `None` stores the image untagged.
    pub tag: Option<Tag>,
}

/// A repository in a registry: the scope of every tag and of every batch.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RepositoryKey {
    /// The registry; `None` means the service's own account.
    pub registry_id: Option<RegistryId>,
    /// The repository.
    pub repository: RepositoryName,
}

/// A validated GetImage.
#[derive(Debug, Clone)]
pub struct GetImageInput {
    /// The registry; `None` means the service's own account.
    pub registry_id: Option<RegistryId>,
    /// The repository to read from.
    pub repository: RepositoryName,
    /// The tag, digest, or both.
    pub reference: ImageRef,
    /// What the caller accepts; empty means every manifest and index type (no conversion).
    pub accepted_media_types: Vec<MediaType>,
    /// How old a cached tag resolution may be; `None` means the cache's default TTL.
    pub max_staleness: Option<Duration>,
}

impl GetImageInput {
    /// The repository the read is scoped to.
    pub fn repository_key(&self) -> RepositoryKey {
        RepositoryKey {
            registry_id: self.registry_id.clone(),
            repository: self.repository.clone(),
        }
    }
}

/// Where a read was answered from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheStatus {
    /// Fetched from the registry.
    Miss,
    /// From the cache; `tag_age` is how old the tag's resolution is (`None` for a digest read).
    Hit {
        /// Age of the tag -> digest resolution.
        tag_age: Option<Duration>,
    },
    /// From the cache past the requested staleness, because the registry is failing.
    Stale {
        /// Age of the tag -> digest resolution.
        tag_age: Duration,
    },
}

/// An image and where it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fetched {
    /// The image, verified.
    pub image: StoredImage,
    /// Where it came from.
    pub cache: CacheStatus,
}

/// An image as the registry holds it, its bytes already verified against `digest`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredImage {
    /// The account that holds the image.
    pub registry_id: String,
    /// The repository that holds the image.
    pub repository: RepositoryName,
    /// SHA-256 of `manifest`, verified.
    pub digest: Digest,
    /// The tag the image was put or fetched by; `None` when addressed by digest alone.
    pub tag: Option<Tag>,
    /// The exact manifest bytes, shared: a cached image is handed out without copying them.
    pub manifest: Arc<str>,
    /// The manifest's media type; empty when neither the registry nor the bytes say.
    pub media_type: String,
}

impl PutImageInput {
    /// The repository the put writes to.
    pub fn repository_key(&self) -> RepositoryKey {
        RepositoryKey {
            registry_id: self.registry_id.clone(),
            repository: self.repository.clone(),
        }
    }

    /// The image this put stores, once a registry has taken it in `registry_id`: the digest
    /// and media type settled at validation, the bytes as given.
    pub fn into_stored(self, registry_id: String) -> StoredImage {
        StoredImage {
            registry_id,
            repository: self.repository,
            digest: self.manifest.digest().clone(),
            tag: self.tag,
            media_type: self.manifest.media_type().to_string(),
            manifest: self.manifest.into_text().into(),
        }
    }
}

/// A validated BatchDeleteImage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeleteImagesInput {
    /// The registry; `None` means the service's own account.
    pub registry_id: Option<RegistryId>,
    /// The repository to delete from.
    pub repository: RepositoryName,
    /// The images, by tag, digest or both, in the order asked.
    pub images: Vec<ImageRef>,
}

impl DeleteImagesInput {
    /// The repository the delete is scoped to.
    pub fn repository_key(&self) -> RepositoryKey {
        RepositoryKey {
            registry_id: self.registry_id.clone(),
            repository: self.repository.clone(),
        }
    }
}

/// Which images a listing takes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum TagStatus {
    /// Every image.
    #[default]
    Any,
    /// Tagged images only.
    Tagged,
    /// Untagged images only.
    Untagged,
}

/// One page of a listing, asked of a registry: its own continuation token, never the caller's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListInput {
    /// The registry; `None` means the service's own account.
    pub registry_id: Option<RegistryId>,
    /// The repository.
    pub repository: RepositoryName,
    /// Which images.
    pub tag_status: TagStatus,
    /// The most entries in the page (1 to 1,000).
    pub max_results: u32,
    /// The registry's token of the page to read; `None` for the first.
    pub next_token: Option<String>,
}

/// Image ids, one page.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListPage {
    /// One per tag, and the digest alone for an untagged image.
    pub ids: Vec<Deleted>,
    /// The registry's token of the next page; `None` at the end.
    pub next_token: Option<String>,
}

/// One page of DescribeImages: by ids (at most 100, one page), or a listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DescribeInput {
    /// The listing (its `max_results` and `next_token` unused with ids).
    pub listing: ListInput,
    /// The images to describe; empty for the listing.
    pub images: Vec<ImageRef>,
}

/// What a registry says of one image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageDetail {
    /// The digest.
    pub digest: Digest,
    /// Its tags.
    pub tags: Vec<Tag>,
    /// The registry's size for it.
    pub size_in_bytes: i64,
    /// When it was pushed, in seconds since the epoch.
    pub pushed_at: Option<i64>,
    /// The manifest's media type.
    pub media_type: String,
    /// The artifact's media type, when reported.
    pub artifact_media_type: String,
}

/// Image details, one page.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DescribePage {
    /// The details.
    pub details: Vec<ImageDetail>,
    /// The registry's token of the next page; `None` at the end.
    pub next_token: Option<String>,
}

/// One deleted image or tag, as ECR reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Deleted {
    /// The image's digest.
    pub digest: Option<Digest>,
    /// The tag removed, when the id was a tag.
    pub tag: Option<Tag>,
}

/// One id a delete could not act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeleteFailure {
    /// The id as asked; `None` when the registry named one that is not a valid id (it is then
    /// reported with an empty id rather than pinned on another).
    pub image: Option<ImageRef>,
    /// ECR's failure code (`ImageNotFound`, `ImageReferencedByManifestList`, …).
    pub code: String,
    /// Why, for people.
    pub reason: String,
}

/// What a delete did, id by id.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeleteOutcome {
    /// What was deleted.
    pub deleted: Vec<Deleted>,
    /// What was not, and why.
    pub failures: Vec<DeleteFailure>,
}

/// What a put did. Both are success: a put is idempotent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PutOutcome {
    /// The image or the tag is new.
    Created,
    /// The same bytes were already there under the same tag (or untagged, by digest).
    AlreadyExisted,
}

/// What is attached to an image (OCI 1.1 referrers: signatures, SBOMs, attestations), one page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReferrersInput {
    /// The repository of the image.
    pub repository: RepositoryKey,
    /// The image the referrers refer to.
    pub subject: Digest,
    /// Only these artifact types; empty: every type.
    pub artifact_types: Vec<String>,
    /// The most entries in the page (1 to 50, ECR's limit).
    pub max_results: u32,
    /// The registry's token of the page to read; `None` for the first.
    pub next_token: Option<String>,
}

/// One artifact attached to an image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Referrer {
    /// The referrer manifest's digest.
    pub digest: Digest,
    /// Its media type.
    pub media_type: String,
    /// Its artifact type (`application/vnd.dev.sigstore.bundle.v0.3+json`, …).
    pub artifact_type: String,
    /// Its size in bytes.
    pub size: i64,
    /// Its annotations.
    pub annotations: std::collections::BTreeMap<String, String>,
}

/// Referrers, one page.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReferrersPage {
    /// The referrers.
    pub referrers: Vec<Referrer>,
    /// The registry's token of the next page; `None` at the end.
    pub next_token: Option<String>,
}

/// Where an image's vulnerability scan stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ScanState {
    /// Never scanned.
    None,
    /// Scanning.
    InProgress,
    /// Scanned.
    Complete,
    /// The scan failed.
    Failed,
    /// Any other status the registry reports (`UNSUPPORTED_IMAGE`, …).
    Other(String),
}

impl ScanState {
    /// As ECR spells it; `NONE` for never scanned.
    pub fn as_str(&self) -> &str {
        match self {
            Self::None => "NONE",
            Self::InProgress => "IN_PROGRESS",
            Self::Complete => "COMPLETE",
            Self::Failed => "FAILED",
            Self::Other(status) => status,
        }
    }
}

/// An image's scan: its status and its findings' counts by severity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScanSummary {
    /// Where it stands.
    pub status: ScanState,
    /// Findings by severity (`CRITICAL`, `HIGH`, …).
    pub counts: std::collections::BTreeMap<String, i64>,
    /// Whether the registry reported counts at all (it may report COMPLETE before them).
    pub counts_reported: bool,
    /// When the scan completed, if it says.
    pub completed_at: Option<std::time::SystemTime>,
}

/// The refusal of a registry (a test double) that does not implement an operation.
fn cannot(what: &str) -> RegistryError {
    RegistryError::Other(Upstream::message(format!("this registry cannot {what}")))
}

/// A store of image manifests with ECR's semantics.
///
/// Implementations verify what they return: a [`StoredImage`]'s bytes hash to its digest.
pub trait Registry: Send + Sync + 'static {
    /// Stores a manifest, idempotently: re-putting the same bytes under the same tag is
    /// [`PutOutcome::AlreadyExisted`], never an error.
    fn put_image(
        &self,
        input: PutImageInput,
    ) -> BoxFuture<'_, Result<(StoredImage, PutOutcome), RegistryError>>;

    /// Fetches one image by tag, digest or both.
    fn get_image(&self, input: GetImageInput) -> BoxFuture<'_, Result<Fetched, RegistryError>>;

    /// Deletes images, each id on its own (ECR's `BatchDeleteImage` semantics). A registry
    /// that cannot delete (a test double) refuses the whole call.
    fn delete_images(
        &self,
        input: DeleteImagesInput,
    ) -> BoxFuture<'_, Result<DeleteOutcome, RegistryError>> {
        let _ = input;
        Box::pin(async { Err(cannot("delete")) })
    }

    /// One page of a repository's image ids (ECR's `ListImages`): at most one registry call.
    fn list_images(&self, input: ListInput) -> BoxFuture<'_, Result<ListPage, RegistryError>> {
        let _ = input;
        Box::pin(async { Err(cannot("list")) })
    }

    /// One page of image details (ECR's `DescribeImages`): at most one registry call.
    fn describe_images(
        &self,
        input: DescribeInput,
    ) -> BoxFuture<'_, Result<DescribePage, RegistryError>> {
        let _ = input;
        Box::pin(async { Err(cannot("describe")) })
    }

    /// What `tag` of `repository` points at now, asked of the registry itself, never a
    /// cache (an audit event's "before"): `None` when no image has the tag.
    fn tag_digest(
        &self,
        repository: RepositoryKey,
        tag: Tag,
    ) -> BoxFuture<'_, Result<Option<Digest>, RegistryError>> {
        let _ = (repository, tag);
        Box::pin(async { Err(cannot("read a tag's digest")) })
    }

    /// One page of what is attached to an image (ECR's `ListImageReferrers`).
    fn list_referrers(
        &self,
        input: ReferrersInput,
    ) -> BoxFuture<'_, Result<ReferrersPage, RegistryError>> {
        let _ = input;
        Box::pin(async { Err(cannot("list referrers")) })
    }

    /// A blob (a signature payload, a bundle) of `repository`, at most `max_bytes`, its bytes
    /// checked against `digest` (DigestVerificationFailed otherwise; LimitExceeded when larger).
    fn get_blob(
        &self,
        repository: RepositoryKey,
        digest: Digest,
        max_bytes: usize,
    ) -> BoxFuture<'_, Result<Vec<u8>, RegistryError>> {
        let _ = (repository, digest, max_bytes);
        Box::pin(async { Err(cannot("read blobs")) })
    }

    /// The image's vulnerability scan (ECR's `DescribeImageScanFindings`, counts only).
    fn scan_summary(
        &self,
        repository: RepositoryKey,
        digest: Digest,
    ) -> BoxFuture<'_, Result<ScanSummary, RegistryError>> {
        let _ = (repository, digest);
        Box::pin(async { Err(cannot("read scans")) })
    }

    /// Adds this layer's metrics, and those of the layers below it, to `metrics`.
    fn register_metrics(&self, metrics: &mut prometheus_client::registry::Registry) {
        let _ = metrics;
    }

    /// Tells `bus` of every tag moved through this stack from now on. The cache is the layer
    /// every write passes; a stack without one has no moves to tell.
    fn subscribe_moves(&self, bus: Arc<dyn TagBus>) {
        let _ = bus;
    }
}

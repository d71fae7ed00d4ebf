//! The registry seam: what the service needs from a place that stores manifests.
//!
//! [`ecr::EcrRegistry`] implements it over `aws-sdk-ecr`; a cache (or an embedded store) is
//! another implementation of the same trait, decorating or replacing it without the service
//! noticing.

mod batch;
pub mod budget;
pub mod cached;
pub mod calls;
pub mod ecr;
mod error;
mod flight;
pub mod local;
mod retry;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

pub use error::{RegistryError, Upstream};

use crate::image::{Digest, ImageRef, Manifest, MediaType, RegistryId, RepositoryName, Tag};

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

/// Several images of one repository, fetched in one upstream call.
#[derive(Debug, Clone)]
pub struct BatchInput {
    /// The repository.
    pub repository: RepositoryKey,
    /// What the callers accept (the same for the whole batch).
    pub accepted_media_types: Vec<MediaType>,
    /// The images, each distinct.
    pub references: Vec<ImageRef>,
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

/// What a put did. Both are success: a put is idempotent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PutOutcome {
    /// The image or the tag is new.
    Created,
    /// The same bytes were already there under the same tag (or untagged, by digest).
    AlreadyExisted,
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
    ) -> impl Future<Output = Result<(StoredImage, PutOutcome), RegistryError>> + Send;

    /// Fetches one image by tag, digest or both.
    fn get_image(
        &self,
        input: GetImageInput,
    ) -> impl Future<Output = Result<Fetched, RegistryError>> + Send;
}

/// A registry that can fetch several images of one repository in one call (ECR's
/// `BatchGetImage` takes up to 100).
pub trait BatchGet: Send + Sync + 'static {
    /// Fetches every reference in one call. The outer error fails the whole call (throttling,
    /// a missing repository); the inner results are per reference, in the order given.
    fn get_images(
        &self,
        input: BatchInput,
    ) -> impl Future<Output = Result<Vec<Result<StoredImage, RegistryError>>, RegistryError>> + Send;
}

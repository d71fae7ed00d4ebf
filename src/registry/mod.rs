//! The registry seam: what the service needs from a place that stores manifests.
//!
//! [`ecr::EcrRegistry`] implements it over `aws-sdk-ecr`; a cache (or an embedded store) is
//! another implementation of the same trait, decorating or replacing it without the service
//! noticing.

pub mod ecr;
mod error;

use std::future::Future;

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
    /// The exact manifest bytes.
    pub manifest: String,
    /// The manifest's media type; empty when neither the registry nor the bytes say.
    pub media_type: String,
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
    ) -> impl Future<Output = Result<StoredImage, RegistryError>> + Send;
}

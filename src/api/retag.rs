//! RetagImage's domain rule: read the source once, then put its exact bytes under each target
//! tag, one put per target, each target's result its own.
//!
//! ECR's PutImage takes one tag, and the rate budget paces the puts. One immutable-tag conflict
//! is that target's failure, not the call's, so the caller learns the fate of every tag.

use crate::api::audit::{Audit, Pending};
use crate::api::error::{Error, Reason, Violation};
use crate::api::validate::RetagInput;
use crate::domain::image::{Manifest, MediaType, Tag};
use crate::registry::{PutImageInput, PutOutcome, Registry, StoredImage};

/// What a retag did: the source as read, and each target's result in the order asked.
#[derive(Debug)]
pub struct Retagged {
    /// The source image, read fresh.
    pub source: StoredImage,
    /// Each target tag and what its put did.
    pub results: Vec<(Tag, Result<PutOutcome, Error>)>,
}

/// Points every target tag of `input` at its source image. Fails as a whole only when the
/// source cannot be read.
pub async fn retag(
    registry: &dyn Registry,
    audit: &Audit,
    input: RetagInput,
) -> Result<Retagged, Error> {
    let registry_id = input.source.registry_id.clone();
    let repository = input.source.repository_key();
    let source = match registry.get_image(input.source).await {
        Ok(fetched) => fetched.image,
        Err(err) => {
            // No target was written: each is still one event, failed for the source's reason.
            let err = Error::from(err);
            for tag in &input.targets {
                let event = Pending::start(
                    audit,
                    "write",
                    repository.repository.as_str(),
                    tag.as_str(),
                    "",
                );
                event.failed(&err);
            }
            return Err(err);
        }
    };
    // Parsed (and hashed) once, whatever the number of targets.
    let manifest = source_manifest(&source);
    let mut results = Vec::with_capacity(input.targets.len());
    for tag in input.targets {
        let mut event = Pending::start(
            audit,
            "write",
            source.repository.as_str(),
            tag.as_str(),
            source.digest.as_str(),
        );
        let result = match &manifest {
            Ok(manifest) => {
                event.read_before(registry, &repository, Some(&tag)).await;
                let put = PutImageInput {
                    registry_id: registry_id.clone(),
                    repository: source.repository.clone(),
                    manifest: manifest.clone(),
                    tag: Some(tag.clone()),
                };
                registry
                    .put_image(put)
                    .await
                    .map(|(_, outcome)| outcome)
                    .map_err(Error::from)
            }
            Err(why) => Err(Error::invalid(
                Reason::MediaTypeUndetermined,
                vec![Violation::new("source_image_id", why.clone())],
            )),
        };
        event.finish(&result);
        results.push((tag, result));
    }
    Ok(Retagged { source, results })
}

/// The source's exact bytes and media type as a manifest to put again; why not, if they
/// cannot be (a registry may hold what this service would refuse).
fn source_manifest(source: &StoredImage) -> Result<Manifest, String> {
    let declared = MediaType::parse(&source.media_type).ok();
    Manifest::parse(source.manifest.to_string(), declared)
        .map_err(|err| format!("the source manifest cannot be put again: {err}"))
}

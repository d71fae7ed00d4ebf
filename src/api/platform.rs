//! Platform selection from an index, and the children an index needs before it is put.
//!
//! Most images are multi-platform indexes (OCI image index, Docker manifest list). A node that
//! asks for `app:1.4` on `linux/arm64` wants the arm64 manifest, not the index: the service
//! picks it, as containerd does, so that no client re-implements the matching.
//!
//! - Candidates are the index's entries in order, skipping attestation manifests (buildx's
//!   `vnd.docker.reference.type: attestation-manifest`), `unknown/unknown`, entries with no
//!   platform, and media types we do not know (the OCI spec forbids failing on those). One
//!   nested index level is followed, never the index itself again.
//! - Matching is containerd's strict match after its normalisation (`aarch64` is `arm64`,
//!   `arm64/v8` is `arm64`, `arm` is `arm/v7`, `x86_64` is `amd64`): OS, architecture and
//!   variant equal; `os.version` equal when asked; the image's `os.features` a subset of the
//!   asked ones. The first match in index order wins (OCI: "the first matching entry SHOULD be
//!   used"). Unlike go-containerregistry, an entry without a platform is not taken for amd64.
//! - The index is read through a minimal serde view; its bytes are never re-serialised.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, LazyLock};

use moka::sync::Cache;
use serde::Deserialize;

use crate::api::error::Error;
use crate::domain::image::{Digest, ImageRef, media_types};
use crate::registry::{
    Fetched, GetImageInput, PutImageInput, Registry, RegistryError, StoredImage, Upstream,
};

/// buildx marks attestation manifests with this annotation key and value.
const REFERENCE_TYPE: &str = "vnd.docker.reference.type";
const ATTESTATION: &str = "attestation-manifest";
/// The most manifests an index put through the service may list: its children are checked in
/// one BatchGetImage, which takes 100 ids. A buildx index of ten platforms with attestations
/// lists twenty; a 4 MiB index of 49,343 entries used to cost 861 ECR calls to check.
pub const MAX_CHECKED_CHILDREN: usize = 100;

/// A platform, as an index descriptor or a request gives it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct Platform {
    /// The OS, e.g. `linux`.
    #[serde(default)]
    pub os: String,
    /// The CPU architecture, e.g. `arm64`.
    #[serde(default)]
    pub architecture: String,
    /// The variant, e.g. `v8`.
    #[serde(default)]
    pub variant: String,
    /// The OS version (Windows).
    #[serde(default, rename = "os.version")]
    pub os_version: String,
    /// Mandatory OS features (Windows `win32k`).
    #[serde(default, rename = "os.features")]
    pub os_features: Vec<String>,
}

impl Platform {
    /// Parses `os/arch[/variant]`, as `--platform` takes it (Docker's and containerd's form).
    pub fn parse(text: &str) -> Result<Self, String> {
        let parts: Vec<&str> = text.split('/').collect();
        if parts.iter().any(|p| p.is_empty() || p.contains('*')) || !(2..=3).contains(&parts.len())
        {
            return Err(format!(
                "{text:?} is not a platform: expected os/architecture[/variant], e.g. linux/arm64"
            ));
        }
        Ok(Self {
            os: parts[0].to_owned(),
            architecture: parts[1].to_owned(),
            variant: parts.get(2).map(|v| (*v).to_owned()).unwrap_or_default(),
            ..Self::default()
        })
    }

    /// containerd's normalisation (`platforms.Normalize`): lowercase, architecture aliases,
    /// the default variant of each architecture dropped, features sorted and deduplicated.
    pub fn normalized(&self) -> Self {
        let os = match self.os.to_ascii_lowercase().as_str() {
            "macos" => "darwin".to_owned(),
            other => other.to_owned(),
        };
        let (architecture, variant) = normalize_arch(
            &self.architecture.to_ascii_lowercase(),
            &self.variant.to_ascii_lowercase(),
        );
        let mut os_features = self.os_features.clone();
        os_features.sort();
        os_features.dedup();
        Self {
            os,
            architecture,
            variant,
            os_version: self.os_version.clone(),
            os_features,
        }
    }

    /// Whether an image built for `image` runs where `self` was asked for (containerd's
    /// strict matcher).
    pub fn matches(&self, image: &Platform) -> bool {
        self.normalized().matches_normalized(&image.normalized())
    }

    /// [`matches`](Self::matches), both platforms normalized already.
    fn matches_normalized(&self, image: &Platform) -> bool {
        let asked = self;
        asked.os == image.os
            && asked.architecture == image.architecture
            && asked.variant == image.variant
            && (asked.os_version.is_empty() || asked.os_version == image.os_version)
            && image
                .os_features
                .iter()
                .all(|f| asked.os_features.contains(f))
    }

    /// Whether this is buildx's placeholder for attestations.
    fn is_unknown(&self) -> bool {
        self.os == "unknown" && self.architecture == "unknown"
    }
}

impl fmt::Display for Platform {
    /// `os/arch[/variant]`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if !self.variant.is_empty() {
            write!(f, "/{}", self.variant)?;
        }
        Ok(())
    }
}

/// containerd's `normalizeArch`.
fn normalize_arch(architecture: &str, variant: &str) -> (String, String) {
    let (architecture, variant) = match (architecture, variant) {
        ("i386", _) => ("386", ""),
        ("x86_64" | "x86-64" | "amd64", "v1") => ("amd64", ""),
        ("x86_64" | "x86-64", v) => ("amd64", v),
        ("aarch64" | "arm64", "8" | "v8" | "v8.0") => ("arm64", ""),
        ("aarch64" | "arm64", "9" | "9.0" | "v9.0") => ("arm64", "v9"),
        ("aarch64", v) => ("arm64", v),
        ("armhf", _) => ("arm", "v7"),
        ("armel", _) => ("arm", "v6"),
        ("arm", "" | "7") => ("arm", "v7"),
        ("arm", "5") => ("arm", "v5"),
        ("arm", "6") => ("arm", "v6"),
        ("arm", "8") => ("arm", "v8"),
        (a, v) => (a, v),
    };
    (architecture.to_owned(), variant.to_owned())
}

/// What an index says about one of its entries.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Descriptor {
    #[serde(default)]
    media_type: String,
    digest: String,
    #[serde(default)]
    size: u64,
    platform: Option<Platform>,
    #[serde(default)]
    annotations: HashMap<String, String>,
    /// `platform` normalized, once, when the index is parsed.
    #[serde(skip)]
    normalized: Option<Platform>,
}

#[derive(Debug, Deserialize)]
struct IndexView {
    #[serde(default)]
    manifests: Vec<Descriptor>,
}

impl Descriptor {
    /// Whether selection may consider this entry at all.
    fn is_candidate(&self) -> bool {
        let attestation = self
            .annotations
            .get(REFERENCE_TYPE)
            .is_some_and(|t| t == ATTESTATION);
        let known_type = media_types::is_index(&self.media_type)
            || self.media_type == media_types::OCI_MANIFEST
            || self.media_type == media_types::DOCKER_MANIFEST_V2;
        // A nested index is followed whether or not it names a platform (most do not).
        let platform_ok = media_types::is_index(&self.media_type)
            || self
                .platform
                .as_ref()
                .is_some_and(|p| !p.is_unknown() && !p.architecture.is_empty());
        known_type && !attestation && platform_ok
    }
}

/// The result of a read that asked for a platform.
#[derive(Debug, Clone)]
pub struct Selected {
    /// The image to answer with: the chosen child, or the image itself when it is no index.
    pub image: Fetched,
    /// The index the child was chosen from, when one was.
    pub index: Option<StoredImage>,
    /// The platform of the chosen entry.
    pub platform: Option<Platform>,
}

/// Entries of parsed indexes kept, counted in entries: about 15 MiB parsed at worst, a few
/// thousand ordinary indexes (2-20 entries each), or two of the largest a 4 MiB index can be.
const PARSED_INDEX_ENTRIES: u64 = 50_000;

/// Parsed indexes by digest: content addressed, so a parse is good forever. A 20,753-entry
/// index was parsed again for every read of it (16 ms of a worker's time each, against
/// 0.04 ms for a cached read).
static PARSED: LazyLock<Cache<Digest, Arc<[Descriptor]>>> = LazyLock::new(|| {
    Cache::builder()
        .max_capacity(PARSED_INDEX_ENTRIES)
        .weigher(|_, entries: &Arc<[Descriptor]>| {
            u32::try_from(entries.len()).unwrap_or(u32::MAX).max(1)
        })
        .build()
});

/// The entries of `image`, an index, parsed once per digest.
fn index_of(image: &StoredImage) -> Result<Arc<[Descriptor]>, Error> {
    if let Some(entries) = PARSED.get(&image.digest) {
        return Ok(entries);
    }
    let view: IndexView = serde_json::from_str(&image.manifest).map_err(|e| {
        Error::Registry(RegistryError::Other(Upstream::message(format!(
            "the index {} cannot be read: {e}",
            image.digest
        ))))
    })?;
    let entries: Arc<[Descriptor]> = view
        .manifests
        .into_iter()
        .map(|entry| Descriptor {
            normalized: entry.platform.as_ref().map(Platform::normalized),
            ..entry
        })
        .collect();
    PARSED.insert(image.digest.clone(), Arc::clone(&entries));
    Ok(entries)
}

/// The platforms named in a PLATFORM_NOT_FOUND, at most this many bytes of them: the message
/// is cut to 900 bytes anyway, and listing 20,753 entries cost more than the rest of the read.
const MAX_AVAILABLE_BYTES: usize = 1024;

/// The platforms an index offers, as PLATFORM_NOT_FOUND lists them: bounded, with a count of
/// the rest.
#[derive(Default)]
struct Available {
    listed: String,
    more: usize,
}

impl Available {
    fn push(&mut self, platform: &Platform) {
        if self.listed.len() >= MAX_AVAILABLE_BYTES {
            self.more += 1;
            return;
        }
        if !self.listed.is_empty() {
            self.listed.push(',');
        }
        self.listed.push_str(&platform.to_string());
    }

    fn into_text(self) -> String {
        match self.more {
            0 => self.listed,
            more => format!("{} and {more} more", self.listed),
        }
    }
}

/// The child of `fetched` for `platform`, fetched by digest through `registry` (and so through
/// its cache) and checked against its descriptor; `fetched` itself when it is no index.
pub async fn select(
    registry: &dyn Registry,
    read: &GetImageInput,
    fetched: Fetched,
    platform: &Platform,
) -> Result<Selected, Error> {
    if !media_types::is_index(&fetched.image.media_type) {
        return Ok(Selected {
            image: fetched,
            index: None,
            platform: None,
        });
    }
    let index = fetched.image;
    let asked = platform.normalized();
    let mut available = Available::default();
    let top = index_of(&index)?;
    let mut nested_once = false;
    for entry in top.iter().filter(|e| e.is_candidate()) {
        if media_types::is_index(&entry.media_type) {
            // One nested level, never the index itself again; its entries come in its place.
            if nested_once || entry.digest == index.digest.as_str() {
                continue;
            }
            nested_once = true;
            let nested = index_of(&child(registry, read, entry).await?.image)?;
            let inner = nested
                .iter()
                .filter(|e| e.is_candidate() && !media_types::is_index(&e.media_type));
            for inner in inner {
                if let Some(found) = matching(inner, &asked, &mut available) {
                    return chosen(registry, read, index, found).await;
                }
            }
            continue;
        }
        if let Some(found) = matching(entry, &asked, &mut available) {
            return chosen(registry, read, index, found).await;
        }
    }
    Err(Error::PlatformNotFound {
        requested: platform.to_string(),
        available: available.into_text(),
    })
}

/// `entry` when it is for `asked` (normalized); else its platform is listed as available.
fn matching<'a>(
    entry: &'a Descriptor,
    asked: &Platform,
    available: &mut Available,
) -> Option<&'a Descriptor> {
    let (entry_platform, normalized) = (entry.platform.as_ref()?, entry.normalized.as_ref()?);
    if asked.matches_normalized(normalized) {
        return Some(entry);
    }
    available.push(entry_platform);
    None
}

/// The answer with `entry`'s image, chosen from `index`.
async fn chosen(
    registry: &dyn Registry,
    read: &GetImageInput,
    index: StoredImage,
    entry: &Descriptor,
) -> Result<Selected, Error> {
    let image = child(registry, read, entry).await?;
    Ok(Selected {
        image,
        index: Some(index),
        platform: entry.platform.clone(),
    })
}

/// A child by digest, its size checked against the descriptor (the digest is checked by every
/// registry already).
async fn child(
    registry: &dyn Registry,
    read: &GetImageInput,
    entry: &Descriptor,
) -> Result<Fetched, Error> {
    let digest = Digest::parse(&entry.digest).map_err(|e| {
        Error::Registry(RegistryError::Other(Upstream::message(format!(
            "the index lists {:?}, which is no digest: {}",
            entry.digest, e.0
        ))))
    })?;
    let fetched = registry
        .get_image(GetImageInput {
            registry_id: read.registry_id.clone(),
            repository: read.repository.clone(),
            reference: ImageRef::by_digest(digest),
            accepted_media_types: Vec::new(),
            max_staleness: None,
        })
        .await?;
    let actual = fetched.image.manifest.len() as u64;
    if entry.size != 0 && actual != entry.size {
        return Err(Error::Registry(RegistryError::DigestVerificationFailed {
            expected: format!("{} of {} bytes", entry.digest, entry.size),
            actual: format!("{actual} bytes"),
        }));
    }
    Ok(fetched)
}

/// Refuses to put an index whose children are not in its repository, as ECR does
/// (`ReferencedImagesNotFoundException`), on every backend: the children are read by digest at
/// once, so the ECR backend batches them into one BatchGetImage. An index listing more than
/// [`MAX_CHECKED_CHILDREN`] is INVALID_ARGUMENT on `image_manifest`, before any call.
pub async fn check_children(registry: &dyn Registry, input: &PutImageInput) -> Result<(), Error> {
    let children = crate::domain::image::index_children(
        input.manifest.media_type().as_str(),
        input.manifest.as_str(),
    );
    if children.len() > MAX_CHECKED_CHILDREN {
        return Err(Error::invalid(
            crate::api::error::Reason::InvalidField,
            vec![crate::api::error::Violation::new(
                "image_manifest",
                format!(
                    "the index lists {} manifests; at most {MAX_CHECKED_CHILDREN} are accepted \
                     (their presence is checked in one BatchGetImage)",
                    children.len()
                ),
            )],
        ));
    }
    let mut missing = Vec::new();
    for chunk in children.chunks(MAX_CHECKED_CHILDREN) {
        let reads = chunk.iter().map(|text| async move {
            let Ok(digest) = Digest::parse(text) else {
                return Ok(Some(text.clone()));
            };
            let read = registry.get_image(GetImageInput {
                registry_id: input.registry_id.clone(),
                repository: input.repository.clone(),
                reference: ImageRef::by_digest(digest),
                accepted_media_types: Vec::new(),
                max_staleness: None,
            });
            match read.await {
                Ok(_) => Ok(None),
                Err(RegistryError::ImageNotFound(_)) => Ok(Some(text.clone())),
                Err(err) => Err(err),
            }
        });
        for answer in futures_util::future::join_all(reads).await {
            missing.extend(answer?);
        }
    }
    if missing.is_empty() {
        return Ok(());
    }
    Err(Error::Registry(RegistryError::ReferencedImagesNotFound(
        Upstream {
            code: Some("ReferencedImagesNotFoundException".to_owned()),
            message: crate::api::error::truncated(
                &format!(
                    "the index refers to images not in repository '{}': {}",
                    input.repository,
                    missing.join(", ")
                ),
                512,
            ),
            ..Upstream::default()
        },
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(text: &str) -> Platform {
        Platform::parse(text).unwrap()
    }

    #[test]
    fn containerd_normalisation() {
        assert!(p("linux/arm64").matches(&p("linux/arm64/v8")));
        assert!(p("linux/arm64/v8").matches(&p("linux/arm64")));
        assert!(p("linux/aarch64").matches(&p("linux/arm64")));
        assert!(p("linux/arm").matches(&p("linux/arm/v7")));
        assert!(p("linux/amd64/v1").matches(&p("linux/amd64")));
        assert!(p("linux/x86_64").matches(&p("linux/amd64")));
        assert!(!p("linux/arm/v6").matches(&p("linux/arm/v7")));
        assert!(!p("linux/amd64").matches(&p("linux/arm64")));
        assert!(!p("windows/amd64").matches(&p("linux/amd64")));
        assert_eq!(p("linux/arm64/v8").normalized().to_string(), "linux/arm64");
    }

    #[test]
    fn os_features_of_the_image_must_be_asked_for() {
        let image = Platform {
            os_features: vec!["win32k".into()],
            ..p("windows/amd64")
        };
        assert!(!p("windows/amd64").matches(&image));
        let asked = Platform {
            os_features: vec!["win32k".into()],
            ..p("windows/amd64")
        };
        assert!(asked.matches(&image));
        assert!(asked.matches(&p("windows/amd64")), "asking more is fine");
    }

    #[test]
    fn platforms_parse_strictly() {
        for bad in ["linux", "linux/", "*/amd64", "linux/arm64/v8/x", ""] {
            assert!(Platform::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn attestations_unknown_and_platformless_entries_are_no_candidates() {
        let index: IndexView = serde_json::from_str(
            r#"{"manifests":[
              {"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:a","platform":{"os":"linux","architecture":"amd64"}},
              {"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:b","platform":{"os":"unknown","architecture":"unknown"},"annotations":{"vnd.docker.reference.type":"attestation-manifest"}},
              {"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:c"},
              {"mediaType":"application/x-unknown","digest":"sha256:d","platform":{"os":"linux","architecture":"amd64"}}
            ]}"#,
        )
        .unwrap();
        let candidates: Vec<bool> = index
            .manifests
            .iter()
            .map(Descriptor::is_candidate)
            .collect();
        assert_eq!(candidates, [true, false, false, false]);
    }
}

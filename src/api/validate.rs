//! Requests in, validated inputs out: every field is checked before anything reaches a registry,
//! and every offending field is reported at once, not just the first.

use std::collections::HashSet;
use std::time::Duration;

use crate::api::error::{Error, MAX_VIOLATIONS, Reason, Violation};
use crate::api::pb;
use crate::domain::image::{
    Digest, ImageRef, Invalid, Manifest, ManifestError, MediaType, Region, RegistryId,
    RepositoryName, Tag,
};
use crate::registry::{
    DeleteImagesInput, DescribeInput, GetImageInput, ListInput, PutImageInput, TagStatus,
};

/// Targets of one RetagImage: each is a PutImage, paced at ECR's ~10/s, so 20 fit in the
/// default deadline with room for throttling.
pub const MAX_TARGET_TAGS: usize = 20;

/// ECR's limit on `acceptedMediaTypes` (model shape `MediaTypeList`).
const MAX_ACCEPTED_MEDIA_TYPES: usize = 100;

/// Collects field violations while parsing a request.
#[derive(Default)]
struct Checker {
    /// At most [`MAX_VIOLATIONS`]: a million bad entries must not become a million records.
    violations: Vec<Violation>,
    /// Violations found past the cap, counted only.
    omitted: usize,
}

impl Checker {
    /// Parses a field that must be present.
    fn required<T>(
        &mut self,
        field: &str,
        value: &str,
        parse: impl FnOnce(&str) -> Result<T, Invalid>,
    ) -> Option<T> {
        if value.is_empty() {
            self.violations.push(Violation::new(field, "is required"));
            return None;
        }
        self.optional(field, value, parse)
    }

    /// Parses a field whose empty value means "not given".
    fn optional<T>(
        &mut self,
        field: &str,
        value: &str,
        parse: impl FnOnce(&str) -> Result<T, Invalid>,
    ) -> Option<T> {
        if value.is_empty() {
            return None;
        }
        parse(value)
            .map_err(|invalid| self.push(field, invalid.0))
            .ok()
    }

    /// Records a violation if a repeated field lists more than `max` entries; whether it is
    /// within bounds, so that its entries are only parsed if it is.
    fn at_most(&mut self, field: &str, len: usize, max: usize, entries: &str) -> bool {
        if len > max {
            self.push(
                field,
                format!("must list at most {max} {entries}, got {len}"),
            );
            return false;
        }
        true
    }

    /// The registry (account and region, each optional) and the repository (required) a
    /// request names. A region alone is the service's own account there
    /// ([`RegistryId::own_in`]), for routing to resolve.
    fn place(
        &mut self,
        registry_id: &str,
        region: &str,
        repository_name: &str,
    ) -> (Option<RegistryId>, Option<RepositoryName>) {
        let account = self.optional("registry_id", registry_id, RegistryId::parse);
        let region = self.optional("region", region, Region::parse);
        let registry = match (account, region) {
            (account, None) => account,
            (Some(account), region) => Some(account.in_region(region)),
            (None, Some(region)) => Some(RegistryId::own_in(region)),
        };
        (
            registry,
            self.required("repository_name", repository_name, RepositoryName::parse),
        )
    }

    /// Records a violation found by other means.
    fn push(&mut self, field: &str, description: impl Into<String>) {
        if self.violations.len() < MAX_VIOLATIONS {
            self.violations.push(Violation::new(field, description));
        } else {
            self.omitted += 1;
        }
    }

    /// The error for what was found: plain format problems first, since a request with those
    /// cannot be judged on anything else.
    fn into_error(self) -> Error {
        Error::invalid_beyond(Reason::InvalidField, self.violations, self.omitted)
    }
}

/// Validates a PutImage: identifiers, then the manifest and its media type, then the expected
/// digest against the one computed over the exact bytes.
pub fn put_image(request: pb::PutImageRequest) -> Result<PutImageInput, Error> {
    let mut check = Checker::default();
    let (registry_id, repository) = check.place(
        &request.registry_id,
        &request.region,
        &request.repository_name,
    );
    let tag = check.optional("image_tag", &request.image_tag, Tag::parse);
    let expected = check.optional("image_digest", &request.image_digest, Digest::parse);
    let declared = check.optional(
        "image_manifest_media_type",
        &request.image_manifest_media_type,
        MediaType::parse,
    );
    let manifest = Manifest::parse(request.image_manifest, declared);
    if let Err(ManifestError::Malformed(invalid)) = &manifest {
        check.push("image_manifest", invalid.0.clone());
    }
    let (Some(repository), true) = (repository, check.violations.is_empty()) else {
        return Err(check.into_error());
    };
    let manifest = manifest.map_err(|err| {
        let reason = match err {
            ManifestError::MediaTypeMismatch { .. } => Reason::MediaTypeMismatch,
            _ => Reason::MediaTypeUndetermined,
        };
        Error::invalid(
            reason,
            vec![Violation::new("image_manifest_media_type", err.to_string())],
        )
    })?;
    if let Some(expected) = expected
        && &expected != manifest.digest()
    {
        return Err(Error::invalid(
            Reason::DigestMismatch,
            vec![Violation::new(
                "image_digest",
                format!(
                    "expected {expected}, but the SHA-256 of image_manifest is {}: the bytes \
                     differ from the ones the digest was taken of (a trailing newline, a \
                     carriage return or reformatting all change it)",
                    manifest.digest()
                ),
            )],
        ));
    }
    Ok(PutImageInput {
        registry_id,
        repository,
        manifest,
        tag,
    })
}

/// Validates a GetImage.
pub fn get_image(request: pb::GetImageRequest) -> Result<GetImageInput, Error> {
    image_read(ImageRead {
        registry_id: &request.registry_id,
        region: &request.region,
        repository_name: &request.repository_name,
        image_id: request.image_id.as_ref(),
        accepted_media_types: &request.accepted_media_types,
        max_staleness: request.max_staleness,
    })
}

/// Validates a ResolveImage: a GetImage that accepts every media type.
pub fn resolve_image(request: pb::ResolveImageRequest) -> Result<GetImageInput, Error> {
    image_read(ImageRead {
        registry_id: &request.registry_id,
        region: &request.region,
        repository_name: &request.repository_name,
        image_id: request.image_id.as_ref(),
        accepted_media_types: &[],
        max_staleness: request.max_staleness,
    })
}

/// A validated RetagImage: the source to read, and the distinct tags to point at it.
#[derive(Debug, Clone)]
pub struct RetagInput {
    /// The source image, as a fresh read.
    pub source: GetImageInput,
    /// The target tags, distinct, in the order asked.
    pub targets: Vec<Tag>,
}

/// Validates a RetagImage: the source like a GetImage (always fresh), then the targets.
pub fn retag_image(request: pb::RetagImageRequest) -> Result<RetagInput, Error> {
    let source = image_read(ImageRead {
        registry_id: &request.registry_id,
        region: &request.region,
        repository_name: &request.repository_name,
        image_id: request.source_image_id.as_ref(),
        accepted_media_types: &[],
        max_staleness: Some(prost_types::Duration::default()),
    });
    let mut check = Checker::default();
    if request.target_tags.is_empty() {
        check.push("target_tags", "needs at least one tag");
    }
    // Over the limit, the entries are not even parsed: a 100,000-tag request costs one check.
    let listed = request.target_tags.len();
    let mut targets: Vec<Tag> = Vec::new();
    if check.at_most("target_tags", listed, MAX_TARGET_TAGS, "tags") {
        let mut seen = HashSet::with_capacity(listed);
        for (i, text) in request.target_tags.iter().enumerate() {
            let field = format!("target_tags[{i}]");
            if let Some(tag) = check.required(&field, text, Tag::parse) {
                if seen.insert(tag.clone()) {
                    targets.push(tag);
                } else {
                    check.push(&field, format!("'{tag}' is listed twice"));
                }
            }
        }
    }
    match (source, check.violations.is_empty()) {
        (Ok(source), true) => Ok(RetagInput { source, targets }),
        (Ok(_), false) => Err(check.into_error()),
        (Err(err), _) => Err(source_error(err, check)),
    }
}

/// A source read's violations under the RetagImage field names (`source_image_id…`), with the
/// targets' violations after them, so one answer names every bad field.
fn source_error(err: Error, targets: Checker) -> Error {
    match err {
        Error::InvalidArgument {
            reason,
            mut violations,
            omitted,
        } => {
            for violation in &mut violations {
                if let Some(rest) = violation.field.strip_prefix("image_id") {
                    violation.field = format!("source_image_id{rest}");
                }
            }
            violations.extend(targets.violations);
            Error::invalid_beyond(reason, violations, omitted + targets.omitted)
        }
        other => other,
    }
}

/// The longest OS, architecture, variant or version a platform may name.
const MAX_PLATFORM_FIELD: usize = 64;

/// Validates the platform a read asks for, if any: OS and architecture required, every field
/// short and of `[a-zA-Z0-9._-]`, no wildcard.
pub fn platform(
    platform: Option<&pb::Platform>,
) -> Result<Option<crate::api::platform::Platform>, Error> {
    let Some(asked) = platform else {
        return Ok(None);
    };
    let mut check = Checker::default();
    let field_ok = |value: &str| {
        value.len() <= MAX_PLATFORM_FIELD
            && value
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
    };
    let fields = [
        ("platform.os", &asked.os, true),
        ("platform.architecture", &asked.architecture, true),
        ("platform.variant", &asked.variant, false),
        ("platform.os_version", &asked.os_version, false),
    ];
    for (field, value, required) in fields {
        if required && value.is_empty() {
            check.push(field, "is required");
        } else if !field_ok(value) {
            check.push(
                field,
                format!("must be at most {MAX_PLATFORM_FIELD} of [a-zA-Z0-9._-]"),
            );
        }
    }
    if check.at_most(
        "platform.os_features",
        asked.os_features.len(),
        16,
        "features",
    ) {
        for (i, feature) in asked.os_features.iter().enumerate() {
            if feature.is_empty() || !field_ok(feature) {
                check.push(
                    &format!("platform.os_features[{i}]"),
                    "must be 1 to 64 of [a-zA-Z0-9._-]",
                );
            }
        }
    }
    if !check.violations.is_empty() {
        return Err(check.into_error());
    }
    Ok(Some(crate::api::platform::Platform {
        os: asked.os.clone(),
        architecture: asked.architecture.clone(),
        variant: asked.variant.clone(),
        os_version: asked.os_version.clone(),
        os_features: asked.os_features.clone(),
    }))
}

/// A page holds this many entries when the request does not say (AIP-158's default, ECR's).
pub const DEFAULT_PAGE_SIZE: u32 = 100;
/// The most a page holds; larger sizes are taken as this (AIP-158: coerce, do not refuse).
pub const MAX_PAGE_SIZE: u32 = 1000;
/// The most ids one DescribeImages takes (ECR's `ImageIdentifierList`).
pub const MAX_DESCRIBE_IDS: usize = 100;

/// The listing a ListImages asks for (its registry token still unset), and its page token.
pub fn list_images(request: pb::ListImagesRequest) -> Result<(ListInput, String), Error> {
    let mut check = Checker::default();
    let listing = listing(
        &mut check,
        &request.registry_id,
        &request.region,
        &request.repository_name,
        request.filter.as_ref(),
        request.page_size,
    );
    match listing {
        Some(listing) if check.violations.is_empty() => Ok((listing, request.page_token)),
        _ => Err(check.into_error()),
    }
}

/// The DescribeImages asked for (by ids, or a listing), and its page token.
pub fn describe_images(
    request: pb::DescribeImagesRequest,
) -> Result<(DescribeInput, String), Error> {
    let mut check = Checker::default();
    let listing = listing(
        &mut check,
        &request.registry_id,
        &request.region,
        &request.repository_name,
        request.filter.as_ref(),
        request.page_size,
    );
    let mut images = Vec::new();
    let listed = request.image_ids.len();
    if check.at_most("image_ids", listed, MAX_DESCRIBE_IDS, "image ids") {
        for (i, id) in request.image_ids.iter().enumerate() {
            images.extend(image_id_entry(&mut check, &format!("image_ids[{i}]"), id));
        }
    }
    if listed > 0 && (request.page_size != 0 || !request.page_token.is_empty()) {
        check.push(
            "page_token",
            "paging applies to a listing, not to image_ids",
        );
    }
    match listing {
        Some(listing) if check.violations.is_empty() => {
            Ok((DescribeInput { listing, images }, request.page_token))
        }
        _ => Err(check.into_error()),
    }
}

/// The registry, repository, filter and page size of a listing.
fn listing(
    check: &mut Checker,
    registry_id: &str,
    region: &str,
    repository_name: &str,
    filter: Option<&pb::ListImagesFilter>,
    page_size: i32,
) -> Option<ListInput> {
    let (registry_id, repository) = check.place(registry_id, region, repository_name);
    let max_results = match u32::try_from(page_size) {
        Err(_) => {
            check.push("page_size", "must not be negative");
            DEFAULT_PAGE_SIZE
        }
        Ok(0) => DEFAULT_PAGE_SIZE,
        Ok(size) => size.min(MAX_PAGE_SIZE),
    };
    let tag_status = match filter.map(pb::ListImagesFilter::tag_status) {
        Some(pb::TagStatus::Tagged) => TagStatus::Tagged,
        Some(pb::TagStatus::Untagged) => TagStatus::Untagged,
        _ => TagStatus::Any,
    };
    Some(ListInput {
        registry_id,
        repository: repository?,
        tag_status,
        max_results,
        next_token: None,
    })
}

/// One `image_ids[i]` entry: a tag, a digest or both.
fn image_id_entry(check: &mut Checker, field: &str, id: &pb::ImageIdentifier) -> Option<ImageRef> {
    let tag = check.optional(&format!("{field}.image_tag"), &id.image_tag, Tag::parse);
    let digest = check.optional(
        &format!("{field}.image_digest"),
        &id.image_digest,
        Digest::parse,
    );
    if id.image_tag.is_empty() && id.image_digest.is_empty() {
        check.push(field, "needs an image_tag, an image_digest, or both");
    }
    ImageRef::new(tag, digest)
}

/// Validates a WatchTag: the repository, the tag, and the digest the watcher knows, if any.
pub fn watch_tag(
    request: pb::WatchTagRequest,
) -> Result<(crate::registry::RepositoryKey, Tag, Option<Digest>), Error> {
    let mut check = Checker::default();
    let (registry_id, repository) = check.place(
        &request.registry_id,
        &request.region,
        &request.repository_name,
    );
    let tag = check.required("image_tag", &request.image_tag, Tag::parse);
    let last_known = check.optional(
        "last_known_digest",
        &request.last_known_digest,
        Digest::parse,
    );
    match (repository, tag) {
        (Some(repository), Some(tag)) if check.violations.is_empty() => Ok((
            crate::registry::RepositoryKey {
                registry_id,
                repository,
            },
            tag,
            last_known,
        )),
        _ => Err(check.into_error()),
    }
}

/// A ListReferrers page holds this many when the request does not say, and at most this many:
/// ECR's own page limit for ListImageReferrers.
pub const MAX_REFERRERS_PAGE: u32 = 50;

/// The referrers a ListReferrers asks for (its registry token still unset), and its page token.
pub fn list_referrers(
    request: pb::ListReferrersRequest,
) -> Result<(crate::registry::ReferrersInput, String), Error> {
    let mut check = Checker::default();
    let (registry_id, repository) = check.place(
        &request.registry_id,
        &request.region,
        &request.repository_name,
    );
    let subject = check.required("image_digest", &request.image_digest, Digest::parse);
    let artifact_type = check.optional("artifact_type", &request.artifact_type, MediaType::parse);
    let max_results = match u32::try_from(request.page_size) {
        Err(_) => {
            check.push("page_size", "must not be negative");
            MAX_REFERRERS_PAGE
        }
        Ok(0) => MAX_REFERRERS_PAGE,
        Ok(size) => size.min(MAX_REFERRERS_PAGE),
    };
    match (repository, subject) {
        (Some(repository), Some(subject)) if check.violations.is_empty() => Ok((
            crate::registry::ReferrersInput {
                repository: crate::registry::RepositoryKey {
                    registry_id,
                    repository,
                },
                subject,
                artifact_types: artifact_type.map(|t| t.to_string()).into_iter().collect(),
                max_results,
                next_token: None,
            },
            request.page_token,
        )),
        _ => Err(check.into_error()),
    }
}

/// The most ids one BatchDeleteImage takes: ten ECR calls of 100.
pub const MAX_DELETE_IDS: usize = 1000;

/// Validates a BatchDeleteImage: 1 to [`MAX_DELETE_IDS`] ids, each a tag, a digest or both.
pub fn batch_delete_image(
    request: pb::BatchDeleteImageRequest,
) -> Result<DeleteImagesInput, Error> {
    let mut check = Checker::default();
    let (registry_id, repository) = check.place(
        &request.registry_id,
        &request.region,
        &request.repository_name,
    );
    if request.image_ids.is_empty() {
        check.push("image_ids", "needs at least one image id");
    }
    let listed = request.image_ids.len();
    let mut images = Vec::new();
    if check.at_most("image_ids", listed, MAX_DELETE_IDS, "image ids") {
        for (i, id) in request.image_ids.iter().enumerate() {
            images.extend(image_id_entry(&mut check, &format!("image_ids[{i}]"), id));
        }
    }
    match repository {
        Some(repository) if check.violations.is_empty() => Ok(DeleteImagesInput {
            registry_id,
            repository,
            images,
        }),
        _ => Err(check.into_error()),
    }
}

/// The fields GetImage and ResolveImage share.
struct ImageRead<'a> {
    registry_id: &'a str,
    region: &'a str,
    repository_name: &'a str,
    image_id: Option<&'a pb::ImageIdentifier>,
    accepted_media_types: &'a [String],
    max_staleness: Option<prost_types::Duration>,
}

fn image_read(request: ImageRead<'_>) -> Result<GetImageInput, Error> {
    let mut check = Checker::default();
    let (registry_id, repository) =
        check.place(request.registry_id, request.region, request.repository_name);
    let (tag_text, digest_text) = request.image_id.map_or(("", ""), |id| {
        (id.image_tag.as_str(), id.image_digest.as_str())
    });
    let tag = check.optional("image_id.image_tag", tag_text, Tag::parse);
    let digest = check.optional("image_id.image_digest", digest_text, Digest::parse);
    if tag_text.is_empty() && digest_text.is_empty() {
        check.push("image_id", "needs an image_tag, an image_digest, or both");
    }
    let listed = request.accepted_media_types.len();
    let accepted_media_types: Vec<MediaType> = if check.at_most(
        "accepted_media_types",
        listed,
        MAX_ACCEPTED_MEDIA_TYPES,
        "media types",
    ) {
        request
            .accepted_media_types
            .iter()
            .enumerate()
            .filter_map(|(i, m)| {
                check.required(&format!("accepted_media_types[{i}]"), m, MediaType::parse)
            })
            .collect()
    } else {
        Vec::new()
    };
    let max_staleness = request.max_staleness.and_then(|d| {
        Duration::try_from(d)
            .map_err(|_| check.push("max_staleness", "must not be negative"))
            .ok()
    });
    let reference = ImageRef::new(tag, digest);
    match (repository, reference, check.violations.is_empty()) {
        (Some(repository), Some(reference), true) => Ok(GetImageInput {
            registry_id,
            repository,
            reference,
            accepted_media_types,
            max_staleness,
        }),
        _ => Err(check.into_error()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEED: &str = include_str!("../../tests/fixtures/hello-world.manifest.json");

    fn fields(err: Error) -> (Reason, Vec<String>) {
        match err {
            Error::InvalidArgument {
                reason, violations, ..
            } => (reason, violations.into_iter().map(|v| v.field).collect()),
            other => panic!("expected INVALID_ARGUMENT, got {other:?}"),
        }
    }

    /// Every bad field is reported in one answer, so a client fixes them all in one go.
    #[test]
    fn all_violations_are_reported_together() {
        let request = pb::PutImageRequest {
            registry_id: "42".into(),
            repository_name: "Bad_Name".into(),
            image_manifest: "[]".into(),
            image_tag: "t".repeat(301),
            image_digest: "sha256:XYZ".into(),
            image_manifest_media_type: "nonsense".into(),
            region: "Mars".into(),
        };
        let (reason, fields) = fields(put_image(request).unwrap_err());
        assert_eq!(reason, Reason::InvalidField);
        assert_eq!(
            fields,
            [
                "registry_id",
                "region",
                "repository_name",
                "image_tag",
                "image_digest",
                "image_manifest_media_type",
                "image_manifest"
            ]
        );
    }

    #[test]
    fn expected_digest_must_match_the_bytes() {
        let request = pb::PutImageRequest {
            repository_name: "hello-world".into(),
            image_manifest: SEED.trim_end().into(),
            image_digest: Digest::of(SEED.as_bytes()).to_string(),
            ..Default::default()
        };
        let (reason, fields) = fields(put_image(request).unwrap_err());
        assert_eq!(reason, Reason::DigestMismatch);
        assert_eq!(fields, ["image_digest"]);
    }

    #[test]
    fn get_needs_a_reference_and_sane_media_types() {
        let request = pb::GetImageRequest {
            repository_name: "hello-world".into(),
            accepted_media_types: vec!["application/json".into(), "".into()],
            ..Default::default()
        };
        let (_, fields) = fields(get_image(request).unwrap_err());
        assert_eq!(fields, ["image_id", "accepted_media_types[1]"]);
    }
}

#[cfg(test)]
mod properties {
    //! Validation under arbitrary input: names, tags, digests, media types and manifest bytes
    //! from the whole string space and from near-valid shapes. No input panics; every
    //! rejection is INVALID_ARGUMENT with a BadRequest naming real request fields; every
    //! acceptance carries the SHA-256 of the exact bytes given.

    use proptest::prelude::*;
    use sha2::{Digest as _, Sha256};
    use tonic::Code;
    use tonic_types::StatusExt;

    use super::*;

    const SEED: &str = include_str!("../../tests/fixtures/hello-world.manifest.json");
    const PUT_FIELDS: &[&str] = &[
        "registry_id",
        "repository_name",
        "image_tag",
        "image_digest",
        "image_manifest_media_type",
        "image_manifest",
    ];

    fn repository() -> impl Strategy<Value = String> {
        prop_oneof![
            any::<String>(),
            "[a-z0-9._/-]{0,260}",
            "[a-z0-9]{1,20}((\\.|_|__|-+)[a-z0-9]{1,20}){0,3}(/[a-z0-9]{1,20}){0,2}",
            Just("hello-world".to_owned()),
        ]
    }

    fn tag() -> impl Strategy<Value = String> {
        prop_oneof![any::<String>(), ".{0,310}", Just(String::new())]
    }

    fn digest() -> impl Strategy<Value = String> {
        prop_oneof![
            any::<String>(),
            "sha256:[0-9a-fA-F]{0,70}",
            "sha256:[0-9a-f]{64}",
            Just(String::new()),
        ]
    }

    fn media_type() -> impl Strategy<Value = String> {
        prop_oneof![
            any::<String>(),
            "[a-z]{1,12}/[a-z0-9.+-]{1,40}",
            Just(String::new()),
            Just(crate::domain::image::media_types::DOCKER_MANIFEST_V2.to_owned()),
        ]
    }

    fn manifest() -> impl Strategy<Value = String> {
        prop_oneof![
            // Arbitrary bytes, as a string field can carry them: lossily made UTF-8.
            any::<Vec<u8>>().prop_map(|b| String::from_utf8_lossy(&b).into_owned()),
            any::<String>(),
            ("[a-z]{1,8}/[a-z.+-]{1,20}", any::<u32>())
                .prop_map(|(m, n)| format!(r#"{{"mediaType":"{m}","n":{n}}}"#)),
            Just(r#"{"schemaVersion":2,"manifests":[]}"#.to_owned()),
            Just(SEED.to_owned()),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn put_validation_is_total(
            registry_id in prop_oneof![any::<String>(), "[0-9]{12}", Just(String::new())],
            repository_name in repository(),
            image_tag in tag(),
            image_digest in digest(),
            image_manifest_media_type in media_type(),
            image_manifest in manifest(),
        ) {
            let request = pb::PutImageRequest {
                registry_id,
                repository_name,
                image_manifest: image_manifest.clone(),
                image_manifest_media_type,
                image_tag,
                image_digest,
                region: String::new(),
            };
            match put_image(request) {
                Ok(input) => {
                    prop_assert_eq!(input.manifest.as_str(), image_manifest.as_str());
                    let expected = format!("sha256:{:x}", Sha256::digest(image_manifest.as_bytes()));
                    prop_assert_eq!(input.manifest.digest().as_str(), expected.as_str());
                }
                Err(err) => {
                    let fields = match &err {
                        Error::InvalidArgument { violations, .. } => {
                            violations.iter().map(|v| v.field.clone()).collect::<Vec<_>>()
                        }
                        other => return Err(TestCaseError::fail(format!("not INVALID_ARGUMENT: {other:?}"))),
                    };
                    prop_assert!(!fields.is_empty());
                    prop_assert!(fields.iter().all(|f| PUT_FIELDS.contains(&f.as_str())), "{:?}", fields);
                    let status = tonic::Status::from(err);
                    prop_assert_eq!(status.code(), Code::InvalidArgument);
                    let named: Vec<String> = status
                        .get_details_bad_request()
                        .map(|b| b.field_violations.into_iter().map(|v| v.field).collect())
                        .unwrap_or_default();
                    prop_assert_eq!(named, fields);
                }
            }
        }

        #[test]
        fn get_validation_is_total(
            repository_name in repository(),
            image_tag in tag(),
            image_digest in digest(),
            accepted in prop::collection::vec(media_type(), 0..3),
            staleness_seconds in any::<i64>(),
        ) {
            let request = pb::GetImageRequest {
                registry_id: String::new(),
                repository_name,
                image_id: Some(pb::ImageIdentifier { image_digest, image_tag }),
                accepted_media_types: accepted,
                max_staleness: Some(prost_types::Duration { seconds: staleness_seconds, nanos: 0 }),
                platform: None,
                region: String::new(),
            };
            if let Err(err) = get_image(request) {
                let status = tonic::Status::from(err);
                prop_assert_eq!(status.code(), Code::InvalidArgument);
                let violations = status.get_details_bad_request().map(|b| b.field_violations).unwrap_or_default();
                prop_assert!(!violations.is_empty());
                let known = violations.iter().all(|v| {
                    v.field == "repository_name"
                        || v.field == "max_staleness"
                        || v.field.starts_with("image_id")
                        || v.field.starts_with("accepted_media_types")
                });
                prop_assert!(known, "{:?}", violations);
            }
        }
    }
}

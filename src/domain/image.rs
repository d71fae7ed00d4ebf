//! Value types for ECR's vocabulary, each parsed once at the edge and valid from then on.
//!
//! The limits are those of the ECR API model (botocore `ecr/2015-09-21`): the AWS SDK checks none
//! of them and emulators check them differently, so the service checks them itself before any
//! call leaves the process.

use std::fmt;
use std::sync::Arc;

use serde::Deserialize;
use serde::de::IgnoredAny;
use sha2::{Digest as _, Sha256};

/// Why a value was refused: a sentence for a `google.rpc.BadRequest` field violation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Invalid(pub String);

impl Invalid {
    fn new(text: impl Into<String>) -> Self {
        Self(text.into())
    }
}

/// ECR's repository name bounds (model shape `RepositoryName`).
const REPOSITORY_NAME_LEN: std::ops::RangeInclusive<usize> = 2..=256;
/// ECR's tag bounds (model shape `ImageTag`); the model has no pattern.
const TAG_LEN: std::ops::RangeInclusive<usize> = 1..=300;
/// ECR's manifest size limit (model shape `ImageManifest`), enforced here in bytes.
pub const MAX_MANIFEST_BYTES: usize = 4_194_304;
/// RFC 6838 caps each half of a media type at 127 characters.
const MEDIA_TYPE_PART_LEN: usize = 127;

/// A repository name such as `hello-world` or `team/app`.
///
/// Model pattern: `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*(\/[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*)*`,
/// 2 to 256 characters.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RepositoryName(String);

impl RepositoryName {
    /// Parses a repository name, enforcing ECR's pattern and length.
    pub fn parse(name: &str) -> Result<Self, Invalid> {
        if !REPOSITORY_NAME_LEN.contains(&name.len()) {
            return Err(Invalid::new(format!(
                "must be 2 to 256 characters long, got {}",
                name.len()
            )));
        }
        for component in name.split('/') {
            check_repository_component(component)?;
        }
        Ok(Self(name.to_owned()))
    }

    /// The name as ECR spells it.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// One `/`-separated component: lowercase alphanumeric runs joined by `.`, `_`, `__` or `-+`.
fn check_repository_component(component: &str) -> Result<(), Invalid> {
    const SHAPE: &str = "must be lowercase letters and digits, separated by '.', '_', '__', \
                         one or more '-', or '/' between non-empty components";
    let bytes = component.as_bytes();
    let alnum = |b: &u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    if !bytes.first().is_some_and(alnum) || !bytes.last().is_some_and(alnum) {
        return Err(Invalid::new(SHAPE));
    }
    let mut separator = String::new();
    for &b in bytes {
        if alnum(&b) {
            let allowed = separator.is_empty()
                || matches!(separator.as_str(), "." | "_" | "__")
                || separator.bytes().all(|s| s == b'-');
            if !allowed {
                return Err(Invalid::new(SHAPE));
            }
            separator.clear();
        } else if matches!(b, b'.' | b'_' | b'-') {
            separator.push(char::from(b));
        } else {
            return Err(Invalid::new(SHAPE));
        }
    }
    Ok(())
}

impl fmt::Display for RepositoryName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A registry other than the service's default one: a 12-digit AWS account ID, and the AWS
/// region when it is not the service's own. ECR's quotas, caches and credentials are all per
/// account and region, so both are part of every key built from a registry.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RegistryId {
    account: String,
    /// `None`: the service's own region.
    region: Option<Region>,
}

impl RegistryId {
    /// Parses a registry ID: exactly 12 ASCII digits (model pattern `[0-9]{12}`), in the
    /// service's own region.
    pub fn parse(id: &str) -> Result<Self, Invalid> {
        if id.len() == 12 && id.bytes().all(|b| b.is_ascii_digit()) {
            Ok(Self {
                account: id.to_owned(),
                region: None,
            })
        } else {
            Err(Invalid::new("must be a 12-digit AWS account ID"))
        }
    }

    /// The service's own account in `region`: what a request naming a region and no account
    /// asks for, until routing names the account (its account text is empty, which
    /// [`parse`](Self::parse) never produces).
    pub fn own_in(region: Region) -> Self {
        Self {
            account: String::new(),
            region: Some(region),
        }
    }

    /// Whether this is [`own_in`](Self::own_in)'s request for the service's own account.
    pub fn is_own_account(&self) -> bool {
        self.account.is_empty()
    }

    /// The same account's registry in `region` (`None`: the service's own region).
    #[must_use]
    pub fn in_region(mut self, region: Option<Region>) -> Self {
        self.region = region;
        self
    }

    /// The account ID, as ECR spells it.
    pub fn as_str(&self) -> &str {
        &self.account
    }

    /// The region; `None`: the service's own.
    pub fn region(&self) -> Option<&Region> {
        self.region.as_ref()
    }

    /// `account` or `account@region`: the registry as keys and messages spell it, never two
    /// registries the same way (account IDs hold no `@`).
    pub fn key(&self) -> String {
        match &self.region {
            None => self.account.clone(),
            Some(region) => format!("{}@{}", self.account, region.as_str()),
        }
    }

    /// Reads back what [`key`](Self::key) wrote.
    pub fn from_key(key: &str) -> Result<Self, Invalid> {
        match key.split_once('@') {
            None => Self::parse(key),
            Some((account, region)) => {
                Ok(Self::parse(account)?.in_region(Some(Region::parse(region)?)))
            }
        }
    }
}

/// An AWS region name such as `us-east-1` or `us-gov-west-1`: lowercase letters and digits in
/// dash-separated parts, at most 32 characters (the longest region name today has 14).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Region(Arc<str>);

/// Longer than any AWS region name, short enough to keep a caller's text out of keys and logs.
const MAX_REGION_LEN: usize = 32;

impl Region {
    /// Parses a region name.
    pub fn parse(name: &str) -> Result<Self, Invalid> {
        let parts_ok = name.split('-').count() >= 3
            && name.split('-').all(|p| {
                !p.is_empty()
                    && p.bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
            });
        if name.len() <= MAX_REGION_LEN && parts_ok {
            Ok(Self(Arc::from(name)))
        } else {
            Err(Invalid::new(
                "must be an AWS region name such as us-east-1 (lowercase letters and digits in \
                 three or more dash-separated parts, at most 32 characters)",
            ))
        }
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Region {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// An image tag: 1 to 300 of `[a-zA-Z0-9-_.]`, mutable in ECR unless the repository is
/// immutable.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Tag(String);

impl Tag {
    /// Parses a tag with ECR's rules: the model's length, and the character set ECR's API
    /// enforces though the model states none (its own message: `Invalid parameter at 'imageTag'
    /// failed to satisfy constraint: 'must satisfy regular expression '[a-zA-Z0-9-_.]+''`,
    /// reported in alexjurkiewicz/ecr-scan-image#40). So control characters, bidirectional
    /// overrides, spaces and `/` never reach a log line, a store or ECR.
    pub fn parse(tag: &str) -> Result<Self, Invalid> {
        let len = tag.chars().count();
        if !TAG_LEN.contains(&len) {
            return Err(Invalid::new(format!(
                "must be 1 to 300 characters long, got {len}"
            )));
        }
        if let Some(bad) = tag
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
        {
            return Err(Invalid::new(format!(
                "may hold only letters, digits, '-', '_' and '.' (ECR's rule), not {:?}",
                bad.escape_debug().to_string()
            )));
        }
        Ok(Self(tag.to_owned()))
    }

    /// The tag as ECR spells it.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Tag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The string inside each checked name, given up without a copy: an answer built from a
/// cached image moves its names into the response rather than allocating them again.
macro_rules! into_string {
    ($($name:ident),*) => {$(
        impl From<$name> for String {
            fn from(name: $name) -> String {
                name.0
            }
        }
    )*};
}
into_string!(RepositoryName, Tag, Digest);

/// A content digest, `sha256:` + 64 lowercase hex characters: the identity of a manifest.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Digest(String);

/// The only algorithm ECR uses for image digests.
const SHA256_PREFIX: &str = "sha256:";

impl Digest {
    /// Parses a digest in the canonical form ECR returns. Upper-case hex is refused rather than
    /// normalised, because a digest is compared as a string everywhere it travels.
    pub fn parse(digest: &str) -> Result<Self, Invalid> {
        let hex = digest.strip_prefix(SHA256_PREFIX);
        let well_formed = hex.is_some_and(|hex| {
            hex.len() == 64 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
        });
        if well_formed {
            Ok(Self(digest.to_owned()))
        } else {
            Err(Invalid::new(
                "must be 'sha256:' followed by 64 lowercase hex characters",
            ))
        }
    }

    /// The digest of exactly these bytes, as ECR computes it.
    pub fn of(bytes: &[u8]) -> Self {
        Self(format!("{SHA256_PREFIX}{:x}", Sha256::digest(bytes)))
    }

    /// The digest as ECR spells it.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What a GetImage names: a tag, a digest, or both (which ECR requires to agree).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ImageRef {
    tag: Option<Tag>,
    digest: Option<Digest>,
}

impl ImageRef {
    /// A reference from its parts; `None` when both are missing.
    pub fn new(tag: Option<Tag>, digest: Option<Digest>) -> Option<Self> {
        (tag.is_some() || digest.is_some()).then_some(Self { tag, digest })
    }

    /// A reference by tag alone.
    pub fn by_tag(tag: Tag) -> Self {
        Self {
            tag: Some(tag),
            digest: None,
        }
    }

    /// A reference by digest alone.
    pub fn by_digest(digest: Digest) -> Self {
        Self {
            tag: None,
            digest: Some(digest),
        }
    }

    /// The tag, if the image is named by tag.
    pub fn tag(&self) -> Option<&Tag> {
        self.tag.as_ref()
    }

    /// The digest, if the image is named by digest.
    pub fn digest(&self) -> Option<&Digest> {
        self.digest.as_ref()
    }
}

impl fmt::Display for ImageRef {
    /// `tag`, `sha256:…` or `tag@sha256:…`, as in a Docker reference.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.tag, &self.digest) {
            (Some(tag), Some(digest)) => write!(f, "{tag}@{digest}"),
            (Some(tag), None) => write!(f, "{tag}"),
            (None, Some(digest)) => write!(f, "{digest}"),
            (None, None) => Ok(()),
        }
    }
}

/// A manifest media type such as `application/vnd.oci.image.manifest.v1+json`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct MediaType(String);

/// The digests an index lists, in order; none for any other manifest. Read, never rewritten:
/// the backends check that an index's children exist, the API picks a platform's child.
pub fn index_children(media_type: &str, manifest: &str) -> Vec<String> {
    /// Only what this needs of an index.
    #[derive(Deserialize)]
    struct Index {
        #[serde(default)]
        manifests: Vec<Entry>,
    }
    #[derive(Deserialize)]
    struct Entry {
        digest: String,
    }
    if !media_types::is_index(media_type) {
        return Vec::new();
    }
    serde_json::from_str::<Index>(manifest)
        .map(|index| index.manifests.into_iter().map(|d| d.digest).collect())
        .unwrap_or_default()
}

/// Media types ECR stores and returns (user guide, "Container image manifest format support").
pub mod media_types {
    /// Docker image manifest, schema 2.
    pub const DOCKER_MANIFEST_V2: &str = "application/vnd.docker.distribution.manifest.v2+json";
    /// Docker manifest list (multi-platform), schema 2.
    pub const DOCKER_MANIFEST_LIST_V2: &str =
        "application/vnd.docker.distribution.manifest.list.v2+json";
    /// Docker image manifest, legacy schema 1.
    pub const DOCKER_MANIFEST_V1: &str = "application/vnd.docker.distribution.manifest.v1+json";
    /// Docker image manifest, legacy schema 1 with JWS signatures.
    pub const DOCKER_MANIFEST_V1_SIGNED: &str =
        "application/vnd.docker.distribution.manifest.v1+prettyjws";
    /// OCI image manifest (also used by artifacts such as Helm charts).
    pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
    /// OCI image index (multi-platform).
    pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";

    /// Whether `media_type` names an index of other manifests (OCI index, Docker list).
    pub fn is_index(media_type: &str) -> bool {
        media_type == OCI_INDEX || media_type == DOCKER_MANIFEST_LIST_V2
    }

    /// What GetImage accepts unless the caller narrows it: every manifest and index type, so ECR
    /// returns the stored bytes and never converts them (it converts only when the stored type is
    /// not accepted).
    pub const ALL_MANIFESTS: [&str; 5] = [
        OCI_INDEX,
        OCI_MANIFEST,
        DOCKER_MANIFEST_LIST_V2,
        DOCKER_MANIFEST_V2,
        DOCKER_MANIFEST_V1,
    ];
}

impl MediaType {
    /// Parses a media type: `type/subtype` with RFC 6838 restricted-name characters.
    pub fn parse(media_type: &str) -> Result<Self, Invalid> {
        let restricted = |part: &str| {
            let mut bytes = part.bytes();
            bytes.next().is_some_and(|b| b.is_ascii_alphanumeric())
                && part.len() <= MEDIA_TYPE_PART_LEN
                && bytes.all(|b| b.is_ascii_alphanumeric() || b"!#$&^_.+-".contains(&b))
        };
        match media_type.split_once('/') {
            Some((kind, subtype)) if restricted(kind) && restricted(subtype) => {
                Ok(Self(media_type.to_owned()))
            }
            _ => Err(Invalid::new(
                "must be a media type such as 'application/vnd.oci.image.manifest.v1+json'",
            )),
        }
    }

    /// The media type as sent to ECR.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for MediaType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Why a manifest was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ManifestError {
    /// The bytes are not an acceptable manifest document (empty, too large, not a JSON object).
    #[error(transparent)]
    Malformed(#[from] Invalid),
    /// The request declares one media type while the manifest's own `mediaType` says another.
    #[error("declared media type '{declared}' differs from the manifest's mediaType '{found}'")]
    MediaTypeMismatch {
        /// What the request declared.
        declared: String,
        /// What the manifest says.
        found: String,
    },
    /// Neither the request nor the manifest says what it is, and its structure does not tell.
    #[error(
        "cannot determine the manifest's media type: it has no 'mediaType' and its structure is \
         neither an index ('manifests') nor an image manifest ('config' and 'layers'); \
         set image_manifest_media_type"
    )]
    MediaTypeUndetermined,
}

/// A manifest: the exact bytes a client put, their digest, and their media type.
///
/// The bytes are held as given and never re-serialised: ECR's digest is over the exact bytes,
/// so reformatting would silently create a different image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    text: String,
    digest: Digest,
    media_type: MediaType,
}

/// The deepest nesting of objects and arrays a manifest may have, ignored fields included. Real
/// manifests nest about 5 deep (an index's `manifests[].platform.os.features[]`); serde_json's
/// own limit (128) would let a 4 MiB document of brackets cost recursion it never needs.
pub const MAX_MANIFEST_DEPTH: usize = 32;

/// Whether JSON `text` nests objects and arrays deeper than `max`: one pass over the bytes,
/// brackets inside strings not counted.
fn nests_deeper_than(text: &str, max: usize) -> bool {
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    for byte in text.bytes() {
        if in_string {
            match byte {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match byte {
            b'"' => in_string = true,
            b'{' | b'[' => {
                depth += 1;
                if depth > max {
                    return true;
                }
            }
            b'}' | b']' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    false
}

/// The top-level fields that say what kind of manifest a document is; everything else is skipped
/// unread. Parsing into this checks the JSON is well formed without building a tree of it.
#[derive(Deserialize)]
struct Shape {
    #[serde(rename = "mediaType")]
    media_type: Option<String>,
    manifests: Option<IgnoredAny>,
    config: Option<IgnoredAny>,
    layers: Option<IgnoredAny>,
    #[serde(rename = "fsLayers")]
    fs_layers: Option<IgnoredAny>,
    signatures: Option<IgnoredAny>,
}

impl Shape {
    /// Reads the shape of a manifest, refusing anything but a well-formed JSON object.
    fn read(text: &str) -> Result<Self, Invalid> {
        if text.is_empty() {
            return Err(Invalid::new("must not be empty"));
        }
        if text.len() > MAX_MANIFEST_BYTES {
            return Err(Invalid::new(format!(
                "must be at most {MAX_MANIFEST_BYTES} bytes, got {}",
                text.len()
            )));
        }
        // serde accepts a JSON array for a struct; a manifest must be an object.
        if !text.trim_start().starts_with('{') {
            return Err(Invalid::new("must be a JSON object"));
        }
        if nests_deeper_than(text, MAX_MANIFEST_DEPTH) {
            return Err(Invalid::new(format!(
                "must not nest objects and arrays deeper than {MAX_MANIFEST_DEPTH} levels"
            )));
        }
        serde_json::from_str(text)
            .map_err(|e| Invalid::new(format!("must be a valid JSON object: {e}")))
    }

    /// The media type the document declares, or the one its structure implies (OCI image spec:
    /// `manifests` is an index; `config` with `layers` an image manifest; schema 1 has `fsLayers`).
    fn media_type(&self) -> Option<&str> {
        if let Some(declared) = &self.media_type {
            return Some(declared);
        }
        match (
            self.manifests.is_some(),
            self.config.is_some() && self.layers.is_some(),
        ) {
            (true, false) => Some(media_types::OCI_INDEX),
            (false, true) => Some(media_types::OCI_MANIFEST),
            _ if self.fs_layers.is_some() && self.signatures.is_some() => {
                Some(media_types::DOCKER_MANIFEST_V1_SIGNED)
            }
            _ if self.fs_layers.is_some() => Some(media_types::DOCKER_MANIFEST_V1),
            _ => None,
        }
    }
}

impl Manifest {
    /// Checks a manifest and settles its media type: the declared one, else the document's own
    /// `mediaType`, else the one its structure implies. The text is kept byte for byte.
    pub fn parse(text: String, declared: Option<MediaType>) -> Result<Self, ManifestError> {
        let shape = Shape::read(&text)?;
        let media_type = match (declared, shape.media_type.as_deref()) {
            (Some(declared), Some(found)) if declared.as_str() != found => {
                return Err(ManifestError::MediaTypeMismatch {
                    declared: declared.0,
                    found: found.to_owned(),
                });
            }
            (Some(declared), _) => declared,
            (None, _) => match shape.media_type() {
                Some(found) => {
                    MediaType::parse(found).map_err(|e| Invalid::new(format!("mediaType {e}")))?
                }
                None => return Err(ManifestError::MediaTypeUndetermined),
            },
        };
        let digest = Digest::of(text.as_bytes());
        Ok(Self {
            text,
            digest,
            media_type,
        })
    }

    /// The media type a stored manifest's bytes imply, for registries that do not report one.
    pub fn sniff_media_type(text: &str) -> Option<String> {
        Shape::read(text).ok()?.media_type().map(str::to_owned)
    }

    /// The exact bytes.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The SHA-256 digest of the exact bytes.
    pub fn digest(&self) -> &Digest {
        &self.digest
    }

    /// The settled media type.
    pub fn media_type(&self) -> &MediaType {
        &self.media_type
    }

    /// Gives back the exact bytes.
    pub fn into_text(self) -> String {
        self.text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The seed manifest as ECR returned it, and the same document as printed in the docs.
    const SEED: &str = include_str!("../../tests/fixtures/hello-world.manifest.json");
    const SEED_DOC_FORM: &str =
        include_str!("../../tests/fixtures/hello-world.manifest.doc-form.json");

    /// ECR's digest is the SHA-256 of the exact bytes: the same document, formatted differently,
    /// is a different image.
    #[test]
    fn digest_is_sha256_of_exact_bytes() {
        assert_eq!(
            Digest::of(SEED.as_bytes()).as_str(),
            "sha256:8ece96b74f87652876199d83bd107d0435a196133af383ac54cb82b6cc5283ae"
        );
        assert_eq!(
            Digest::of(SEED_DOC_FORM.as_bytes()).as_str(),
            "sha256:21c4b7549f00071eee1e70a84fbef06f92689539cb76dfdbe91a46b418bad8af"
        );
        let without_newline = SEED.trim_end();
        assert_ne!(
            Digest::of(without_newline.as_bytes()),
            Digest::of(SEED.as_bytes())
        );
    }

    #[test]
    fn manifest_keeps_exact_bytes_and_reads_media_type() {
        let manifest = Manifest::parse(SEED.to_owned(), None).unwrap();
        assert_eq!(manifest.as_str(), SEED);
        assert_eq!(
            manifest.media_type().as_str(),
            media_types::DOCKER_MANIFEST_V2
        );
        assert_eq!(manifest.digest(), &Digest::of(SEED.as_bytes()));
    }

    #[test]
    fn repository_names_follow_the_model_pattern() {
        for ok in [
            "hello-world",
            "ab",
            "a__b",
            "a--b",
            "a---b",
            "team/app",
            "a.b_c/d-e/f",
            "0abc",
            &"a".repeat(256),
        ] {
            assert!(RepositoryName::parse(ok).is_ok(), "{ok} should be valid");
        }
        for bad in [
            "",
            "a",
            "Hello",
            "a___b",
            "a._b",
            "-ab",
            "ab-",
            "/ab",
            "ab/",
            "a//b",
            "a b",
            "a:b",
            "ab/.c",
            &"a".repeat(257),
        ] {
            assert!(
                RepositoryName::parse(bad).is_err(),
                "{bad:?} should be invalid"
            );
        }
    }

    /// Nesting is bounded in every field, read or ignored; brackets inside strings are text.
    #[test]
    fn manifests_nest_at_most_32_levels() {
        let nested = |depth: usize| {
            format!(
                r#"{{"mediaType":"application/vnd.oci.image.manifest.v1+json","x":{}1{}}}"#,
                "[".repeat(depth - 1),
                "]".repeat(depth - 1)
            )
        };
        assert!(Manifest::parse(nested(MAX_MANIFEST_DEPTH), None).is_ok());
        assert!(Manifest::parse(nested(MAX_MANIFEST_DEPTH + 1), None).is_err());
        let brackets_in_text = format!(
            r#"{{"mediaType":"application/vnd.oci.image.manifest.v1+json","x":"{}\"{}"}}"#,
            "[".repeat(100),
            "{".repeat(100)
        );
        assert!(Manifest::parse(brackets_in_text, None).is_ok());
    }

    #[test]
    fn tags_are_1_to_300_characters_of_ecrs_set() {
        assert!(Tag::parse("").is_err());
        assert!(Tag::parse("2019.08").is_ok());
        assert!(Tag::parse("v1.2_rc-3").is_ok());
        assert!(Tag::parse(&"t".repeat(300)).is_ok());
        assert!(Tag::parse(&"t".repeat(301)).is_err());
        // What a hostile or careless caller sends: NUL, CR, LF, ESC, an RTL override, a path
        // escape, a space, non-ASCII letters.
        for bad in [
            "a\0b",
            "a\rb",
            "a\nb",
            "a\u{1b}[31m",
            "a\u{202e}b",
            "../etc",
            "a b",
            "é",
        ] {
            assert!(Tag::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn digests_are_canonical_sha256() {
        let hex = "8ece96b74f87652876199d83bd107d0435a196133af383ac54cb82b6cc5283ae";
        assert!(Digest::parse(&format!("sha256:{hex}")).is_ok());
        for bad in [
            hex.to_owned(),
            format!("sha256:{}", hex.to_uppercase()),
            format!("sha512:{hex}"),
            format!("sha256:{}", &hex[1..]),
            format!("sha256:{hex}0"),
            format!("sha256:{}g", &hex[1..]),
            "sha256:".to_owned(),
        ] {
            assert!(Digest::parse(&bad).is_err(), "{bad:?} should be invalid");
        }
    }

    #[test]
    fn registry_ids_are_12_digits() {
        assert!(RegistryId::parse("123456789012").is_ok());
        for bad in ["", "12345678901", "1234567890123", "12345678901a"] {
            assert!(RegistryId::parse(bad).is_err(), "{bad:?} should be invalid");
        }
    }

    #[test]
    fn image_refs_need_a_tag_or_a_digest() {
        assert!(ImageRef::new(None, None).is_none());
        let tag = Tag::parse("v1").unwrap();
        let digest = Digest::of(b"x");
        let both = ImageRef::new(Some(tag), Some(digest.clone())).unwrap();
        assert_eq!(both.to_string(), format!("v1@{digest}"));
    }

    #[test]
    fn media_types_are_type_slash_subtype() {
        assert!(MediaType::parse(media_types::OCI_INDEX).is_ok());
        for bad in ["", "application", "/json", "application/", "a/b c", "a/b/c"] {
            assert!(MediaType::parse(bad).is_err(), "{bad:?} should be invalid");
        }
    }

    /// The media type comes from the request, else the document, else its structure.
    #[test]
    fn media_type_is_declared_read_or_inferred() {
        let index = r#"{"schemaVersion":2,"manifests":[]}"#;
        let image = r#"{"schemaVersion":2,"config":{},"layers":[]}"#;
        let schema1 = r#"{"schemaVersion":1,"fsLayers":[]}"#;
        let signed = r#"{"schemaVersion":1,"fsLayers":[],"signatures":[]}"#;
        let infer = |text: &str| {
            Manifest::parse(text.to_owned(), None).map(|m| m.media_type().as_str().to_owned())
        };
        assert_eq!(infer(index).unwrap(), media_types::OCI_INDEX);
        assert_eq!(infer(image).unwrap(), media_types::OCI_MANIFEST);
        assert_eq!(infer(schema1).unwrap(), media_types::DOCKER_MANIFEST_V1);
        assert_eq!(
            infer(signed).unwrap(),
            media_types::DOCKER_MANIFEST_V1_SIGNED
        );
        assert_eq!(
            infer(r#"{"a":1}"#),
            Err(ManifestError::MediaTypeUndetermined)
        );
        assert_eq!(
            infer(r#"{"manifests":[],"config":{},"layers":[]}"#),
            Err(ManifestError::MediaTypeUndetermined)
        );

        let helm = MediaType::parse(media_types::OCI_MANIFEST).unwrap();
        let declared = Manifest::parse(image.to_owned(), Some(helm.clone())).unwrap();
        assert_eq!(declared.media_type(), &helm);
        assert!(matches!(
            Manifest::parse(SEED.to_owned(), Some(helm)),
            Err(ManifestError::MediaTypeMismatch { .. })
        ));
    }

    #[test]
    fn manifests_must_be_json_objects_within_ecr_limits() {
        for bad in [
            "",
            "[]",
            "null",
            "not json",
            "{",
            r#"{"mediaType":1}"#,
            r#"{"mediaType":"a/b"} trailing"#,
            r#"{"mediaType":"a/b","mediaType":"a/b"}"#,
        ] {
            assert!(
                matches!(
                    Manifest::parse(bad.to_owned(), None),
                    Err(ManifestError::Malformed(_))
                ),
                "{bad:?} should be malformed"
            );
        }
        let padding = MAX_MANIFEST_BYTES - r#"{"mediaType":"a/b","p":""}"#.len();
        let at_limit = format!(r#"{{"mediaType":"a/b","p":"{}"}}"#, "x".repeat(padding));
        assert_eq!(at_limit.len(), MAX_MANIFEST_BYTES);
        assert!(Manifest::parse(at_limit.clone(), None).is_ok());
        let over = at_limit.replacen('x', "xx", 1);
        assert!(matches!(
            Manifest::parse(over, None),
            Err(ManifestError::Malformed(_))
        ));
    }
}

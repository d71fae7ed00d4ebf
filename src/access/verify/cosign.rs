//! cosign's formats, checked with a trusted key: the "simple signing" payload of the tag scheme
//! (`sha256-<hex>.sig`, one layer per signature, the signature in the layer's
//! `dev.cosignproject.cosign/signature` annotation), and the Sigstore bundle v0.3 of cosign v3
//! (a DSSE envelope of an in-toto statement whose predicate type is
//! `https://sigstore.dev/cosign/sign/v1`), attached as an OCI 1.1 referrer.
//!
//! Keys are ECDSA P-256 public keys in PKIX PEM (`cosign generate-key-pair`, and AWS KMS keys'
//! exported public keys); a signature is ECDSA over SHA-256, ASN.1 DER, base64. Verified with
//! aws-lc-rs, already in the tree under rustls: no new crate (see docs/design.md for the
//! decision against the `sigstore` crate).

use aws_lc_rs::signature::{ECDSA_P256_SHA256_ASN1, UnparsedPublicKey};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use serde::Deserialize;
use sha2::{Digest as _, Sha256};
use x509_parser::prelude::FromDer;
use x509_parser::x509::SubjectPublicKeyInfo;

use crate::domain::image::Digest;

/// The annotation of a tag-scheme layer that carries its signature.
pub const SIGNATURE_ANNOTATION: &str = "dev.cosignproject.cosign/signature";
/// The media type (and artifact type) of a Sigstore bundle v0.3.
pub const BUNDLE_MEDIA_TYPE: &str = "application/vnd.dev.sigstore.bundle.v0.3+json";
/// The simple-signing payload's type in cosign v1/v2.
const SIMPLE_SIGNING_TYPE: &str = "cosign container image signature";
/// The predicate type of cosign v3's image signatures (also its simple-signing `type`).
const SIGN_PREDICATE: &str = "https://sigstore.dev/cosign/sign/v1";
/// DSSE's payload type for in-toto statements.
const IN_TOTO_PAYLOAD_TYPE: &str = "application/vnd.in-toto+json";
/// id-ecPublicKey and the P-256 curve (prime256v1).
const EC_PUBLIC_KEY_OID: &str = "1.2.840.10045.2.1";
const P256_OID: &str = "1.2.840.10045.3.1.7";

/// A trusted public key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrustedKey {
    /// The name the policy gives it.
    pub name: String,
    /// `sha256:` and the hex SHA-256 of its SubjectPublicKeyInfo (DER): what verdicts name.
    pub fingerprint: String,
    /// The uncompressed EC point.
    point: Vec<u8>,
}

impl TrustedKey {
    /// Reads a PKIX PEM public key: ECDSA P-256 only, said plainly otherwise.
    pub fn from_pem(name: &str, pem: &str) -> Result<Self, String> {
        let body: String = pem
            .lines()
            .map(str::trim)
            .skip_while(|l| *l != "-----BEGIN PUBLIC KEY-----")
            .skip(1)
            .take_while(|l| *l != "-----END PUBLIC KEY-----")
            .collect();
        if body.is_empty() {
            return Err(format!(
                "key {name:?}: not a PEM public key (-----BEGIN PUBLIC KEY-----)"
            ));
        }
        let der = STANDARD
            .decode(body)
            .map_err(|e| format!("key {name:?}: bad base64: {e}"))?;
        let (_, spki) = SubjectPublicKeyInfo::from_der(&der)
            .map_err(|e| format!("key {name:?}: not a SubjectPublicKeyInfo: {e}"))?;
        let curve = spki
            .algorithm
            .parameters
            .as_ref()
            .and_then(|p| p.as_oid().ok())
            .map(|oid| oid.to_id_string());
        if spki.algorithm.algorithm.to_id_string() != EC_PUBLIC_KEY_OID
            || curve.as_deref() != Some(P256_OID)
        {
            return Err(format!(
                "key {name:?}: only ECDSA P-256 keys are supported (cosign generate-key-pair, \
                 KMS ECC_NIST_P256)"
            ));
        }
        Ok(Self {
            name: name.to_owned(),
            fingerprint: format!("sha256:{:x}", Sha256::digest(&der)),
            point: spki.subject_public_key.data.to_vec(),
        })
    }

    /// Whether `signature` (ASN.1 DER) is this key's over `message`.
    fn verifies(&self, message: &[u8], signature: &[u8]) -> bool {
        UnparsedPublicKey::new(&ECDSA_P256_SHA256_ASN1, &self.point)
            .verify(message, signature)
            .is_ok()
    }
}

/// Why a signature did not verify, for the verdict (the first of an image's signatures that
/// came closest is reported).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rejected {
    /// No trusted key made it.
    UntrustedKey,
    /// Made by a trusted key, for another image.
    OtherDigest(String),
    /// Made by a trusted key, for this image, but not for the identity required.
    OtherIdentity(String),
    /// The payload is not a signature payload this verifier reads.
    Malformed(String),
}

impl Rejected {
    /// How close the signature came: a closer reason wins the report.
    fn rank(&self) -> u8 {
        match self {
            Self::Malformed(_) => 0,
            Self::UntrustedKey => 1,
            Self::OtherDigest(_) => 2,
            Self::OtherIdentity(_) => 3,
        }
    }

    /// The closer of two reasons.
    pub fn closer(self, other: Self) -> Self {
        if other.rank() > self.rank() {
            other
        } else {
            self
        }
    }

    /// For people.
    pub fn describe(&self) -> String {
        match self {
            Self::UntrustedKey => "signed, but by no trusted key".to_owned(),
            Self::OtherDigest(d) => format!("a trusted signature, of another image ({d})"),
            Self::OtherIdentity(r) => {
                format!("a trusted signature, for another identity ({r})")
            }
            Self::Malformed(why) => format!("an unreadable signature: {why}"),
        }
    }
}

/// The simple-signing payload (containers/image `docs/containers-signature.5.md`).
#[derive(Deserialize)]
struct SimpleSigning {
    critical: Critical,
}

#[derive(Deserialize)]
struct Critical {
    identity: Identity,
    image: ImageField,
    #[serde(rename = "type")]
    kind: String,
}

#[derive(Deserialize)]
struct Identity {
    #[serde(rename = "docker-reference")]
    docker_reference: String,
}

#[derive(Deserialize)]
struct ImageField {
    #[serde(rename = "docker-manifest-digest")]
    docker_manifest_digest: String,
}

/// Checks one tag-scheme signature: `signature_b64` (the layer's annotation) over `payload`
/// (the layer's blob, its digest already checked) by one of `keys`, naming `digest` (and an
/// identity ending in `identity`, when required). The key that made it, or why not.
pub fn check_simple_signing<'k>(
    payload: &[u8],
    signature_b64: &str,
    keys: &'k [TrustedKey],
    digest: &Digest,
    identity: Option<&str>,
) -> Result<&'k TrustedKey, Rejected> {
    let signature = STANDARD
        .decode(signature_b64.trim())
        .map_err(|e| Rejected::Malformed(format!("signature annotation: {e}")))?;
    let key = keys
        .iter()
        .find(|k| k.verifies(payload, &signature))
        .ok_or(Rejected::UntrustedKey)?;
    let parsed: SimpleSigning = serde_json::from_slice(payload)
        .map_err(|e| Rejected::Malformed(format!("payload: {e}")))?;
    if parsed.critical.kind != SIMPLE_SIGNING_TYPE && parsed.critical.kind != SIGN_PREDICATE {
        return Err(Rejected::Malformed(format!(
            "payload type {:?}",
            parsed.critical.kind
        )));
    }
    if parsed.critical.image.docker_manifest_digest != digest.as_str() {
        return Err(Rejected::OtherDigest(
            parsed.critical.image.docker_manifest_digest,
        ));
    }
    check_identity(&parsed.critical.identity.docker_reference, identity)?;
    Ok(key)
}

/// A docker reference names the identity required when it ends with it (at a path boundary:
/// `…/prod/app` ends with `prod/app`, `…/preprod/app` does not).
fn check_identity(reference: &str, required: Option<&str>) -> Result<(), Rejected> {
    let Some(required) = required else {
        return Ok(());
    };
    let repository = reference
        .split_once('@')
        .map_or(reference, |(name, _)| name);
    let repository = match repository.rsplit_once(':') {
        Some((name, tag)) if !tag.contains('/') => name,
        _ => repository,
    };
    let matches = repository == required
        || repository
            .strip_suffix(required)
            .is_some_and(|head| head.ends_with('/'));
    if matches {
        Ok(())
    } else {
        Err(Rejected::OtherIdentity(reference.to_owned()))
    }
}

/// The parts of a Sigstore bundle v0.3 this verifier reads.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Bundle {
    media_type: String,
    dsse_envelope: Option<Envelope>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Envelope {
    payload: String,
    payload_type: String,
    signatures: Vec<EnvelopeSignature>,
}

#[derive(Deserialize)]
struct EnvelopeSignature {
    sig: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Statement {
    #[serde(rename = "_type")]
    kind: String,
    subject: Vec<Subject>,
    predicate_type: String,
}

#[derive(Deserialize)]
struct Subject {
    digest: std::collections::HashMap<String, String>,
}

/// DSSE's pre-authentication encoding: what the envelope's signatures sign.
pub fn pae(payload_type: &str, payload: &[u8]) -> Vec<u8> {
    let mut out = format!(
        "DSSEv1 {} {} {} ",
        payload_type.len(),
        payload_type,
        payload.len()
    )
    .into_bytes();
    out.extend_from_slice(payload);
    out
}

/// Checks a Sigstore bundle v0.3 (the referrer's layer blob): a DSSE envelope signed by one of
/// `keys` over an in-toto statement of cosign's signing predicate whose subject is `digest`.
/// Keyless bundles (a certificate, no key) are not trusted: only configured keys are.
pub fn check_bundle<'k>(
    bundle: &[u8],
    keys: &'k [TrustedKey],
    digest: &Digest,
) -> Result<&'k TrustedKey, Rejected> {
    let bundle: Bundle =
        serde_json::from_slice(bundle).map_err(|e| Rejected::Malformed(format!("bundle: {e}")))?;
    if bundle.media_type != BUNDLE_MEDIA_TYPE {
        return Err(Rejected::Malformed(format!(
            "bundle media type {:?}",
            bundle.media_type
        )));
    }
    let envelope = bundle.dsse_envelope.ok_or_else(|| {
        Rejected::Malformed(
            "a bundle without a DSSE envelope (message signatures sign a blob, \
                             not an image)"
                .to_owned(),
        )
    })?;
    if envelope.payload_type != IN_TOTO_PAYLOAD_TYPE {
        return Err(Rejected::Malformed(format!(
            "envelope payload type {:?}",
            envelope.payload_type
        )));
    }
    let payload = STANDARD
        .decode(&envelope.payload)
        .map_err(|e| Rejected::Malformed(format!("envelope payload: {e}")))?;
    let signed = pae(&envelope.payload_type, &payload);
    let key = envelope
        .signatures
        .iter()
        .filter_map(|s| STANDARD.decode(&s.sig).ok())
        .find_map(|sig| keys.iter().find(|k| k.verifies(&signed, &sig)))
        .ok_or(Rejected::UntrustedKey)?;
    let statement: Statement = serde_json::from_slice(&payload)
        .map_err(|e| Rejected::Malformed(format!("statement: {e}")))?;
    if !statement.kind.starts_with("https://in-toto.io/Statement/")
        || statement.predicate_type != SIGN_PREDICATE
    {
        return Err(Rejected::Malformed(format!(
            "a statement of {:?}, not an image signature",
            statement.predicate_type
        )));
    }
    let hex = digest.as_str().trim_start_matches("sha256:");
    if statement
        .subject
        .iter()
        .any(|s| s.digest.get("sha256").map(String::as_str) == Some(hex))
    {
        Ok(key)
    } else {
        let named = statement
            .subject
            .first()
            .and_then(|s| s.digest.get("sha256"))
            .map_or_else(String::new, |h| format!("sha256:{h}"));
        Err(Rejected::OtherDigest(named))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identities_match_at_a_path_boundary() {
        let ok = |r, i| check_identity(r, Some(i)).is_ok();
        assert!(ok(
            "123.dkr.ecr.us-east-1.amazonaws.com/prod/app",
            "prod/app"
        ));
        assert!(ok("registry/prod/app:v1", "prod/app"));
        assert!(ok("registry/prod/app@sha256:abc", "prod/app"));
        assert!(!ok("registry/preprod/app", "prod/app"));
        assert!(!ok("registry/prod/app2", "prod/app"));
        assert!(check_identity("anything", None).is_ok());
    }

    #[test]
    fn pae_is_dsse_v1() {
        assert_eq!(
            pae("application/vnd.in-toto+json", b"{}"),
            b"DSSEv1 28 application/vnd.in-toto+json 2 {}".to_vec()
        );
    }

    #[test]
    fn only_p256_pem_keys_are_read() {
        assert!(TrustedKey::from_pem("x", "not a key").is_err());
        // An Ed25519 SubjectPublicKeyInfo.
        let ed25519 = "-----BEGIN PUBLIC KEY-----\nMCowBQYDK2VwAyEAGb9ECWmEzf6FQbrBZ9w7lshQhqowtrbLDFw4rXAxZuE=\n-----END PUBLIC KEY-----";
        let err = TrustedKey::from_pem("ed", ed25519).unwrap_err();
        assert!(err.contains("P-256"), "{err}");
    }
}

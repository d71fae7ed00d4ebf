//! Verified reads: the policy file's `verify:` rules, and the verdict on a digest about to be
//! served (signed by a trusted key, free of findings over the gate), checked once and cached.
//!
//! ```yaml
//! verify:
//!   - id: prod-signed
//!     repositories: ["prod/**"]        # the same patterns as rules:
//!     mode: enforce                     # off | audit | enforce
//!     keys:                             # trusted public keys, PKIX PEM (ECDSA P-256)
//!       - name: ci-2026
//!         pem: |
//!           -----BEGIN PUBLIC KEY-----
//!           ...
//!     identity: "prod/app"              # optional: required docker-reference suffix
//!     scan:                             # optional
//!       maxSeverity: HIGH               # refuse findings above HIGH (any CRITICAL)
//!       requireScan: true               # no COMPLETE scan: refuse
//! ```
//!
//! The first rule whose repositories match decides; none matching is `off`. A verdict is kept
//! per (account, region, repository, digest, rule version) for [`DEFAULT_VERDICT_TTL`], so that
//! a new finding is seen within it, while a changed rule (a key removed) is a new version and
//! is checked again at once; concurrent reads of one digest share one verification, and its
//! registry calls go through the budgets like any other.

pub mod cosign;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use serde::Deserialize;
use tokio::time::Instant;

use self::cosign::{BUNDLE_MEDIA_TYPE, Rejected, SIGNATURE_ANNOTATION, TrustedKey};
use crate::access::authz::pattern::Pattern;
use crate::domain::image::{Digest, ImageRef, RepositoryName, Tag};
use crate::registry::front::{Front, Miss};
use crate::registry::{
    GetImageInput, ReferrersInput, RegistryError, RepositoryKey, ScanState, ScanSummary,
    SharedRegistry,
};

/// How long a verdict stands: a finding published or a signature removed is seen within it
/// (ECR's basic scans update at most daily; enhanced scanning continuously). A changed rule is
/// seen at once: its version is part of the key.
pub const DEFAULT_VERDICT_TTL: Duration = Duration::from_secs(5 * 60);
/// Verdicts kept: one per digest served under a rule; a few hundred bytes each.
const MAX_VERDICTS: u64 = 100_000;
/// Verdicts in front of the cache, for reads: the images being served now, which a deployment
/// counts in tens or hundreds. Full, it is emptied and refills from the cache (about 2 MB).
const MAX_FRONT_VERDICTS: usize = 10_000;
/// The most signatures of one image looked at (each a blob fetched): a repository stuffed with
/// signatures cannot make one read fetch thousands.
const MAX_SIGNATURES: usize = 16;
/// The largest signature payload or bundle read: cosign's are a few KB.
pub const MAX_SIGNATURE_BYTES: usize = 256 * 1024;
/// A scan that reads COMPLETE without counts this soon after completing is treated as not
/// complete: ECR may report COMPLETE before the findings are there (aws/aws-sdk#289).
const COUNTS_GRACE: Duration = Duration::from_secs(5 * 60);

/// What a rule does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Nothing.
    Off,
    /// Serve, and log and count what enforce would refuse.
    Audit,
    /// Refuse what does not pass.
    Enforce,
}

impl Mode {
    /// As the policy spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Off => "off",
            Self::Audit => "audit",
            Self::Enforce => "enforce",
        }
    }
}

/// A finding's severity, lowest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Severity {
    /// INFORMATIONAL.
    Informational,
    /// LOW.
    Low,
    /// MEDIUM.
    Medium,
    /// HIGH.
    High,
    /// CRITICAL.
    Critical,
}

impl Severity {
    fn parse(name: &str) -> Option<Self> {
        match name {
            "INFORMATIONAL" => Some(Self::Informational),
            "LOW" => Some(Self::Low),
            "MEDIUM" => Some(Self::Medium),
            "HIGH" => Some(Self::High),
            "CRITICAL" => Some(Self::Critical),
            _ => None,
        }
    }
}

/// The scan gate of a rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ScanGate {
    /// Findings above this severity refuse the image; `None`: counts are reported only.
    #[serde(default)]
    pub max_severity: Option<Severity>,
    /// Whether an image without a COMPLETE scan is refused.
    #[serde(default)]
    pub require_scan: bool,
}

/// A `verify:` entry as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleFile {
    id: String,
    repositories: Vec<String>,
    mode: Mode,
    #[serde(default)]
    keys: Vec<KeyFile>,
    #[serde(default)]
    identity: Option<String>,
    #[serde(default)]
    scan: Option<ScanGate>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyFile {
    name: String,
    pem: String,
}

/// A checked `verify:` rule.
#[derive(Debug)]
pub struct VerifyRule {
    /// Its name, in verdicts and logs.
    pub id: String,
    repositories: Vec<Pattern>,
    /// What it does.
    pub mode: Mode,
    /// The keys whose signatures it trusts.
    pub keys: Vec<TrustedKey>,
    /// The docker-reference suffix a signature must name, if any.
    pub identity: Option<String>,
    /// The scan gate, if any.
    pub scan: Option<ScanGate>,
    /// Changes whenever the rule does (its text's hash): part of every verdict's key.
    pub version: u64,
}

impl VerifyRule {
    /// Checks one entry: patterns valid, keys readable, a key at least unless off.
    pub fn parse(file: RuleFile) -> Result<Self, String> {
        let context = |e: String| format!("verify rule {:?}: {e}", file.id);
        if file.id.is_empty() {
            return Err("a verify rule needs an id".to_owned());
        }
        if file.repositories.is_empty() {
            return Err(context("repositories must list one at least".to_owned()));
        }
        let repositories = file
            .repositories
            .iter()
            .map(|r| Pattern::repository(r))
            .collect::<Result<_, _>>()
            .map_err(context)?;
        let keys = file
            .keys
            .iter()
            .map(|k| TrustedKey::from_pem(&k.name, &k.pem))
            .collect::<Result<Vec<_>, _>>()
            .map_err(context)?;
        if keys.is_empty() && file.mode != Mode::Off {
            return Err(context(
                "keys must list one at least (a rule without keys could never pass)".to_owned(),
            ));
        }
        let version = {
            use std::hash::{Hash, Hasher};
            let mut hasher = std::collections::hash_map::DefaultHasher::new();
            (
                &file.id,
                &file.repositories,
                file.mode.as_str(),
                file.keys
                    .iter()
                    .map(|k| (&k.name, &k.pem))
                    .collect::<Vec<_>>(),
                &file.identity,
                file.scan.map(|s| (s.max_severity, s.require_scan)),
            )
                .hash(&mut hasher);
            hasher.finish()
        };
        Ok(Self {
            id: file.id,
            repositories,
            mode: file.mode,
            keys,
            identity: file.identity.filter(|i| !i.is_empty()),
            scan: file.scan,
            version,
        })
    }

    /// Whether the rule covers `repository`.
    pub fn covers(&self, repository: &RepositoryName) -> bool {
        self.repositories
            .iter()
            .any(|p| p.matches_repository(repository))
    }
}

/// How a signature was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Form {
    /// cosign's tag scheme (`sha256-<hex>.sig`).
    CosignTag,
    /// A Sigstore bundle v0.3 referrer.
    SigstoreBundle,
}

impl Form {
    /// As verdicts name it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::CosignTag => "cosign-tag",
            Self::SigstoreBundle => "sigstore-bundle",
        }
    }
}

/// The signature that verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signed {
    /// The key's name in the policy.
    pub key_name: String,
    /// The key's fingerprint.
    pub key_fingerprint: String,
    /// Where it was found.
    pub form: Form,
}

/// Why an image does not pass.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// No signature at all.
    SignatureRequired,
    /// Signatures, none valid: the closest one's reason.
    SignatureInvalid(String),
    /// Findings over the gate: every severity's count.
    ScanFindingsOverLimit(BTreeMap<String, i64>),
    /// No COMPLETE scan, and one is required: the scan's status.
    ScanNotComplete(String),
}

impl Refusal {
    /// The reason's name, as errors and metrics spell it.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::SignatureRequired => "SIGNATURE_REQUIRED",
            Self::SignatureInvalid(_) => "SIGNATURE_INVALID",
            Self::ScanFindingsOverLimit(_) => "SCAN_FINDINGS_OVER_LIMIT",
            Self::ScanNotComplete(_) => "SCAN_NOT_COMPLETE",
        }
    }
}

/// The verdict on one digest under one rule.
#[derive(Debug, Clone)]
pub struct Verdict {
    /// The rule.
    pub rule: String,
    /// Its mode.
    pub mode: Mode,
    /// The signature that verified, if one did.
    pub signed: Option<Signed>,
    /// Why the image does not pass; `None`: it does.
    pub refusal: Option<Refusal>,
    /// The scan's status (`COMPLETE`, …; empty when not asked for).
    pub scan_status: String,
    /// The scan's counts by severity.
    pub scan_counts: BTreeMap<String, i64>,
    /// When it was checked.
    pub checked_at: SystemTime,
}

/// The key of a verdict: the image (registry, repository, digest) and the rule's version.
type VerdictKey = (RepositoryKey, Digest, u64);

/// Checks digests and keeps the verdicts.
pub struct Verifier {
    registry: SharedRegistry,
    verdicts: moka::future::Cache<VerdictKey, Arc<Verdict>>,
    /// Every read of a verified image asks for its verdict. The cache's lookup (a key of three
    /// strings cloned, hashed, and the read recorded) was half of what verification cost a
    /// cached read; here a read is one hash and a map lookup under a read lock, nothing
    /// cloned but the `Arc`. The cache stays the authority and the one verification in flight.
    front: Front<VerdictKey, Arc<Verdict>>,
    ttl: Duration,
    /// `imageservice_verifications_total{mode,outcome}`: verifications made (not cached reads).
    made: Family<[(&'static str, &'static str); 2], Counter>,
}

impl Verifier {
    /// A verifier reading signatures and scans from `registry`, its verdicts kept `ttl`.
    pub fn new(registry: SharedRegistry, ttl: Duration) -> Self {
        Self {
            registry,
            verdicts: moka::future::Cache::builder()
                .max_capacity(MAX_VERDICTS)
                .time_to_live(ttl)
                .build(),
            front: Front::by_count(MAX_FRONT_VERDICTS),
            ttl,
            made: Family::default(),
        }
    }

    /// Adds `imageservice_verifications_total`.
    pub fn register_metrics(&self, metrics: &mut prometheus_client::registry::Registry) {
        metrics.register(
            "verifications",
            "Image verifications made (cached verdicts not counted), by mode and outcome",
            self.made.clone(),
        );
    }

    /// The verdict on `digest` of `repository` under `rule` if one is kept in front of the
    /// cache: a read asks this first, and makes [`verdict`](Self::verdict)'s future only when
    /// it is not.
    pub fn kept(
        &self,
        rule: &VerifyRule,
        repository: &RepositoryKey,
        digest: &Digest,
    ) -> Option<Arc<Verdict>> {
        self.in_front(rule, repository, digest).ok()
    }

    /// The verdict kept in front of the cache, else the miss and the key's hash to keep the
    /// cache's answer with.
    fn in_front(
        &self,
        rule: &VerifyRule,
        repository: &RepositoryKey,
        digest: &Digest,
    ) -> Result<Arc<Verdict>, (Miss, u64)> {
        let hash = self.front.hash((repository, digest, rule.version));
        let is_key = |(r, d, v): &VerdictKey| *v == rule.version && d == digest && r == repository;
        self.front
            .get(hash, is_key, Instant::now())
            .map_err(|miss| (miss, hash))
    }

    /// The verdict on `digest` of `repository` under `rule`: a kept one, or one verification
    /// shared by every caller asking meanwhile. A registry failure is not a verdict: it is the
    /// error, and the next read tries again.
    pub async fn verdict(
        &self,
        rule: &Arc<VerifyRule>,
        repository: &RepositoryKey,
        digest: &Digest,
    ) -> Result<Arc<Verdict>, RegistryError> {
        let (miss, hash) = match self.in_front(rule, repository, digest) {
            Ok(verdict) => return Ok(verdict),
            Err(miss) => miss,
        };
        let key = (repository.clone(), digest.clone(), rule.version);
        if let Some(verdict) = self.verdicts.get(&key).await {
            self.put_in_front(miss, hash, key, &verdict);
            return Ok(verdict);
        }
        let made = self
            .verdicts
            .try_get_with(key.clone(), async {
                let verdict = self.verify(rule, repository, digest).await?;
                let outcome = verdict.refusal.as_ref().map_or("pass", Refusal::reason);
                self.made
                    .get_or_create(&[("mode", rule.mode.as_str()), ("outcome", outcome)])
                    .inc();
                // Once per verification, not per read: what audit mode lets through, and what
                // enforce mode refuses, each with the image and the rule.
                if let Some(refusal) = &verdict.refusal {
                    tracing::info!(
                        rule = %rule.id,
                        mode = rule.mode.as_str(),
                        repository = %repository.repository,
                        %digest,
                        reason = refusal.reason(),
                        "verification: the image does not pass{}",
                        if rule.mode == Mode::Audit { " (audit mode: served)" } else { "" }
                    );
                }
                Ok::<_, RegistryError>(Arc::new(verdict))
            })
            .await;
        let verdict = made.map_err(|shared| (*shared).clone())?;
        self.put_in_front(miss, hash, key, &verdict);
        Ok(verdict)
    }

    /// Puts `verdict` in front of the cache, standing as long as the cache keeps it at most.
    fn put_in_front(&self, miss: Miss, hash: u64, key: VerdictKey, verdict: &Arc<Verdict>) {
        let age = verdict.checked_at.elapsed().unwrap_or_default();
        let now = Instant::now();
        if let Some(until) = now.checked_add(self.ttl.saturating_sub(age)) {
            self.front.keep(miss, hash, key, Arc::clone(verdict), until);
        }
    }

    async fn verify(
        &self,
        rule: &VerifyRule,
        repository: &RepositoryKey,
        digest: &Digest,
    ) -> Result<Verdict, RegistryError> {
        let (signed, refusal) = match self.signature(rule, repository, digest).await? {
            Ok(signed) => (Some(signed), None),
            Err(refusal) => (None, Some(refusal)),
        };
        let mut verdict = Verdict {
            rule: rule.id.clone(),
            mode: rule.mode,
            signed,
            refusal,
            scan_status: String::new(),
            scan_counts: BTreeMap::new(),
            checked_at: SystemTime::now(),
        };
        if let Some(gate) = rule.scan {
            let summary = self
                .registry
                .scan_summary(repository.clone(), digest.clone())
                .await?;
            let scan_refusal = judge_scan(gate, &summary);
            verdict.scan_status = summary.status.as_str().to_owned();
            verdict.scan_counts = summary.counts;
            if verdict.refusal.is_none() {
                verdict.refusal = scan_refusal;
            }
        }
        Ok(verdict)
    }

    /// The first signature of `digest` a trusted key made: referrers (bundles) first, then the
    /// tag scheme. `Err` inside: why none did.
    async fn signature(
        &self,
        rule: &VerifyRule,
        repository: &RepositoryKey,
        digest: &Digest,
    ) -> Result<Result<Signed, Refusal>, RegistryError> {
        let mut closest: Option<Rejected> = None;
        let mut found = 0usize;
        let reject = |why: Rejected, closest: &mut Option<Rejected>| {
            *closest = Some(match closest.take() {
                Some(before) => before.closer(why),
                None => why,
            });
        };
        let signed = |key: &TrustedKey, form| Signed {
            key_name: key.name.clone(),
            key_fingerprint: key.fingerprint.clone(),
            form,
        };
        for referrer in self.bundles(repository, digest).await? {
            found += 1;
            match self
                .layer_blob(repository, &referrer, BUNDLE_MEDIA_TYPE)
                .await?
            {
                Ok(blob) => match cosign::check_bundle(&blob, &rule.keys, digest) {
                    Ok(key) => return Ok(Ok(signed(key, Form::SigstoreBundle))),
                    Err(why) => reject(why, &mut closest),
                },
                Err(why) => reject(why, &mut closest),
            }
        }
        for (payload_digest, signature) in self.tag_signatures(repository, digest).await? {
            found += 1;
            match self.blob(repository, &payload_digest).await? {
                Ok(payload) => match cosign::check_simple_signing(
                    &payload,
                    &signature,
                    &rule.keys,
                    digest,
                    rule.identity.as_deref(),
                ) {
                    Ok(key) => return Ok(Ok(signed(key, Form::CosignTag))),
                    Err(why) => reject(why, &mut closest),
                },
                Err(why) => reject(why, &mut closest),
            }
        }
        Ok(Err(match closest {
            None if found == 0 => Refusal::SignatureRequired,
            None => Refusal::SignatureInvalid("no signature could be read".to_owned()),
            Some(why) => Refusal::SignatureInvalid(why.describe()),
        }))
    }

    /// The bundle referrers of `digest` (at most [`MAX_SIGNATURES`]); none where the registry
    /// keeps no referrers.
    async fn bundles(
        &self,
        repository: &RepositoryKey,
        digest: &Digest,
    ) -> Result<Vec<Digest>, RegistryError> {
        let page = self
            .registry
            .list_referrers(ReferrersInput {
                repository: repository.clone(),
                subject: digest.clone(),
                artifact_types: vec![BUNDLE_MEDIA_TYPE.to_owned()],
                max_results: 50,
                next_token: None,
            })
            .await;
        match page {
            Ok(page) => Ok(page
                .referrers
                .into_iter()
                .filter(|r| r.artifact_type == BUNDLE_MEDIA_TYPE)
                .map(|r| r.digest)
                .take(MAX_SIGNATURES)
                .collect()),
            // A subject ECR will not list referrers for (an index: containers-roadmap#2783).
            Err(RegistryError::ImageNotFound(_) | RegistryError::InvalidParameter { .. }) => {
                Ok(Vec::new())
            }
            Err(err) => Err(err),
        }
    }

    /// The (payload blob digest, signature) pairs of the tag scheme's `sha256-<hex>.sig`.
    async fn tag_signatures(
        &self,
        repository: &RepositoryKey,
        digest: &Digest,
    ) -> Result<Vec<(String, String)>, RegistryError> {
        let tag = Tag::parse(&format!(
            "sha256-{}.sig",
            digest.as_str().trim_start_matches("sha256:")
        ))
        .map_err(|e| RegistryError::Other(crate::registry::Upstream::message(e.0)))?;
        let Some(manifest) = self.manifest(repository, ImageRef::by_tag(tag)).await? else {
            return Ok(Vec::new());
        };
        Ok(layers(&manifest)
            .into_iter()
            .filter_map(|layer| {
                let signature = layer.annotations.get(SIGNATURE_ANNOTATION)?.clone();
                Some((layer.digest, signature))
            })
            .take(MAX_SIGNATURES)
            .collect())
    }

    /// The manifest `reference` of `repository` (through the cache: a digest's bytes never
    /// change); `None` when there is none.
    async fn manifest(
        &self,
        repository: &RepositoryKey,
        reference: ImageRef,
    ) -> Result<Option<Arc<str>>, RegistryError> {
        let read = self
            .registry
            .get_image(GetImageInput {
                registry_id: repository.registry_id.clone(),
                repository: repository.repository.clone(),
                reference,
                accepted_media_types: Vec::new(),
                max_staleness: None,
            })
            .await;
        match read {
            Ok(fetched) => Ok(Some(fetched.image.manifest)),
            Err(RegistryError::ImageNotFound(_)) => Ok(None),
            Err(err) => Err(err),
        }
    }

    /// The blob of the first layer of type `media_type` of the manifest `referrer`.
    async fn layer_blob(
        &self,
        repository: &RepositoryKey,
        referrer: &Digest,
        media_type: &str,
    ) -> Result<Result<Vec<u8>, Rejected>, RegistryError> {
        let Some(manifest) = self
            .manifest(repository, ImageRef::by_digest(referrer.clone()))
            .await?
        else {
            return Ok(Err(Rejected::Malformed(format!(
                "referrer {referrer} is gone"
            ))));
        };
        let Some(layer) = layers(&manifest)
            .into_iter()
            .find(|l| l.media_type == media_type)
        else {
            return Ok(Err(Rejected::Malformed(format!(
                "referrer {referrer} has no {media_type} layer"
            ))));
        };
        self.blob(repository, &layer.digest).await
    }

    /// A signature blob, its digest checked by the registry; a missing or altered blob is a
    /// signature that does not verify, not an outage.
    async fn blob(
        &self,
        repository: &RepositoryKey,
        digest: &str,
    ) -> Result<Result<Vec<u8>, Rejected>, RegistryError> {
        let Ok(digest) = Digest::parse(digest) else {
            return Ok(Err(Rejected::Malformed(format!("layer digest {digest:?}"))));
        };
        match self
            .registry
            .get_blob(repository.clone(), digest.clone(), MAX_SIGNATURE_BYTES)
            .await
        {
            Ok(bytes) => Ok(Ok(bytes)),
            Err(RegistryError::DigestVerificationFailed { .. }) => Ok(Err(Rejected::Malformed(
                format!("the blob {digest} does not hash to its digest (altered)"),
            ))),
            Err(RegistryError::LayersNotFound(_) | RegistryError::LimitExceeded(_)) => Ok(Err(
                Rejected::Malformed(format!("the blob {digest} is missing or too large")),
            )),
            Err(err) => Err(err),
        }
    }
}

/// A layer descriptor of a manifest.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Layer {
    #[serde(default)]
    media_type: String,
    digest: String,
    #[serde(default)]
    annotations: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
struct Layers {
    #[serde(default)]
    layers: Vec<Layer>,
}

/// The layers of a manifest; none if it is not one.
fn layers(manifest: &str) -> Vec<Layer> {
    serde_json::from_str::<Layers>(manifest)
        .map(|m| m.layers)
        .unwrap_or_default()
}

/// What the scan gate says of `summary`: counts above `max_severity` refuse; without a COMPLETE
/// scan (or with one whose counts may not be there yet) `require_scan` refuses.
fn judge_scan(gate: ScanGate, summary: &ScanSummary) -> Option<Refusal> {
    let complete = match summary.status {
        ScanState::Complete => {
            summary.counts_reported
                || summary
                    .completed_at
                    .and_then(|at| SystemTime::now().duration_since(at).ok())
                    .is_some_and(|since| since > COUNTS_GRACE)
        }
        _ => false,
    };
    if !complete {
        return gate
            .require_scan
            .then(|| Refusal::ScanNotComplete(summary.status.as_str().to_owned()));
    }
    let max = gate.max_severity?;
    let over = summary
        .counts
        .iter()
        .any(|(name, count)| *count > 0 && Severity::parse(name).is_some_and(|s| s > max));
    over.then(|| Refusal::ScanFindingsOverLimit(summary.counts.clone()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn summary(status: ScanState, counts: &[(&str, i64)]) -> ScanSummary {
        ScanSummary {
            status,
            counts: counts.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect(),
            counts_reported: !counts.is_empty(),
            completed_at: Some(SystemTime::now()),
        }
    }

    /// The front answers the image and rule version it was given, never another, and never
    /// past the cache's own time to live.
    #[test]
    fn the_front_holds_a_verdict_for_its_image_and_rule_version_only() {
        use crate::registry::local::{LocalRegistry, LocalSettings};
        let dir = std::env::temp_dir().join(format!("verify-front-{}", std::process::id()));
        let registry = LocalRegistry::open(&LocalSettings {
            data_dir: dir.clone(),
            registry_id: "123456789012".to_owned(),
            immutable_repositories: Vec::new(),
        })
        .unwrap();
        let verifier = Verifier::new(Arc::new(registry), Duration::from_secs(60));
        let repository = RepositoryKey {
            registry_id: None,
            repository: RepositoryName::parse("apps/web").unwrap(),
        };
        let other = RepositoryKey {
            registry_id: None,
            repository: RepositoryName::parse("apps/api").unwrap(),
        };
        let digest = Digest::parse(&format!("sha256:{}", "a".repeat(64))).unwrap();
        let verdict = |checked_at| {
            Arc::new(Verdict {
                rule: "r".to_owned(),
                mode: Mode::Enforce,
                signed: None,
                refusal: Some(Refusal::SignatureRequired),
                scan_status: String::new(),
                scan_counts: BTreeMap::new(),
                checked_at,
            })
        };
        let hash = |repository: &RepositoryKey, version: u64| {
            verifier.front.hash((repository, &digest, version))
        };
        let found = |repository: &RepositoryKey, version: u64| {
            let is_key = |(r, d, v): &VerdictKey| *v == version && *d == digest && r == repository;
            verifier
                .front
                .get(hash(repository, version), is_key, Instant::now())
        };
        let key = (repository.clone(), digest.clone(), 1);
        let miss = found(&repository, 1).unwrap_err();
        verifier.put_in_front(
            miss,
            hash(&repository, 1),
            key.clone(),
            &verdict(SystemTime::now()),
        );
        assert_eq!(
            found(&repository, 1).map(|v| v.rule.clone()).ok(),
            Some("r".to_owned())
        );
        assert!(found(&repository, 2).is_err());
        assert!(found(&other, 1).is_err());
        let miss = found(&other, 1).unwrap_err();
        let stale = SystemTime::now() - Duration::from_secs(61);
        verifier.put_in_front(miss, hash(&repository, 1), key, &verdict(stale));
        assert!(found(&repository, 1).is_err());
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn the_scan_gate_refuses_above_its_severity_and_without_a_scan() {
        let gate = ScanGate {
            max_severity: Some(Severity::High),
            require_scan: true,
        };
        assert_eq!(
            judge_scan(gate, &summary(ScanState::Complete, &[("HIGH", 3)])),
            None
        );
        assert!(matches!(
            judge_scan(
                gate,
                &summary(ScanState::Complete, &[("CRITICAL", 1), ("HIGH", 2)])
            ),
            Some(Refusal::ScanFindingsOverLimit(_))
        ));
        assert!(matches!(
            judge_scan(gate, &summary(ScanState::InProgress, &[])),
            Some(Refusal::ScanNotComplete(_))
        ));
        // COMPLETE without counts, just now: not believed yet (aws/aws-sdk#289).
        assert!(matches!(
            judge_scan(gate, &summary(ScanState::Complete, &[])),
            Some(Refusal::ScanNotComplete(_))
        ));
        let lenient = ScanGate {
            max_severity: None,
            require_scan: false,
        };
        assert_eq!(judge_scan(lenient, &summary(ScanState::None, &[])), None);
    }
}

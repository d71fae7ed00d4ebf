//! Only what was signed and scanned (issue 22): the policy's `verify:` rules checked on every
//! read, with real ECDSA P-256 keys and cosign's formats made here byte for byte (the tag
//! scheme's simple-signing payload, and a Sigstore bundle v0.3 referrer), against the emulator
//! extended with the ECR operations it lacks (`support::ecr_ext`), through the real SDK.

use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use ecr_image_service::pb::image_service_client::ImageServiceClient;
use ecr_image_service::pb::watch_tag_response::Event;
use ecr_image_service::pb::{ListReferrersRequest, WatchTagRequest};
use ecr_image_service::registry::cached::{CacheSettings, CachedRegistry};
use ecr_image_service::registry::ecr::calls::UpstreamCalls;
use ecr_image_service::server::ServerSettings;
use rcgen::{KeyPair, PKCS_ECDSA_P256_SHA256, SigningKey};
use serde_json::json;
use tonic::Code;
use tonic::transport::Channel;

use crate::support::backend::ScratchDir;
use crate::support::ecr_ext::EcrExtension;
use crate::support::requests::{get, put};
use crate::support::{
    admin, assert_status, digest_of, error_info, moto, registry, serve_on_loopback,
    server_settings, settings, unique,
};

const BUNDLE: &str = "application/vnd.dev.sigstore.bundle.v0.3+json";
const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

/// A signing key, as `cosign generate-key-pair` makes one (ECDSA P-256), and its public PEM.
struct Key {
    pair: KeyPair,
    pem: String,
}

impl Key {
    fn new() -> Self {
        let pair = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let pem = pair.public_key_pem();
        Self { pair, pem }
    }

    /// ECDSA over SHA-256, ASN.1 DER, as cosign signs.
    fn sign(&self, message: &[u8]) -> Vec<u8> {
        self.pair.sign(message).unwrap()
    }
}

/// The policy: anonymous callers may do everything; `verified/**` is verified with `keys`.
fn policy(mode: &str, keys: &[(&str, &Key)], scan: &str) -> String {
    let keys: Vec<String> = keys
        .iter()
        .map(|(name, key)| {
            let pem: String = key
                .pem
                .lines()
                .map(|l| format!("          {l}\n"))
                .collect();
            format!("      - name: {name}\n        pem: |\n{pem}")
        })
        .collect();
    format!(
        "rules:\n  - id: all\n    principals: [anonymous]\n    actions: [read, write, delete]\n    repositories: [\"**\"]\nverify:\n  - id: signed\n    repositories: [\"verified/**\"]\n    mode: {mode}\n    keys:\n{}{scan}",
        keys.concat()
    )
}

/// The service over the extended emulator, with a policy file it re-reads.
struct Verified {
    client: ImageServiceClient<Channel>,
    address: std::net::SocketAddr,
    ext: EcrExtension,
    calls: UpstreamCalls,
    policy: std::path::PathBuf,
    _dir: ScratchDir,
}

async fn verified(policy_text: &str) -> Verified {
    let dir = ScratchDir::new("verify");
    let policy = dir.0.join("policy.yaml");
    std::fs::write(&policy, policy_text).unwrap();
    let ext = EcrExtension::start(moto::endpoint()).await;
    let ecr = registry(&ext.endpoint, settings());
    let calls = ecr.calls().clone();
    let stack = CachedRegistry::new(Arc::new(ecr), CacheSettings::default());
    let address = serve_on_loopback(
        stack,
        ServerSettings {
            authz_policy: Some(policy.clone()),
            ..server_settings()
        },
    )
    .await;
    let client = ImageServiceClient::connect(format!("http://{address}"))
        .await
        .unwrap()
        .max_decoding_message_size(16 << 20);
    Verified {
        client,
        address,
        ext,
        calls,
        policy,
        _dir: dir,
    }
}

/// A distinct image manifest.
fn image(label: &str) -> String {
    format!(
        r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:{}","size":2}},"layers":[],"annotations":{{"label":"{label}"}}}}"#,
        "1".repeat(64)
    )
}

impl Verified {
    /// A repository of the verified space, created in the emulator.
    async fn repository(&self) -> String {
        let name = unique("verified/app");
        admin(&self.ext.endpoint)
            .create_repository()
            .repository_name(&name)
            .send()
            .await
            .unwrap();
        name
    }

    /// Puts `manifest` straight into the emulator (through the extension, which notes
    /// referrers), as a signer's registry client would; its digest.
    async fn put_raw(&self, repository: &str, tag: Option<&str>, manifest: &str) -> String {
        let digest = digest_of(manifest);
        admin(&self.ext.endpoint)
            .put_image()
            .repository_name(repository)
            .set_image_tag(tag.map(str::to_owned))
            .image_manifest(manifest)
            .image_manifest_media_type(OCI_MANIFEST)
            .image_digest(&digest)
            .send()
            .await
            .unwrap_or_else(|e| panic!("put into the emulator: {e:?}"));
        digest
    }

    /// A cosign tag-scheme signature of `digest` by `key`, the payload naming `names` (the
    /// digest signed, usually `digest` itself); the payload blob's digest.
    async fn sign_tag(&self, repository: &str, digest: &str, names: &str, key: &Key) -> String {
        let payload = json!({
            "critical": {
                "identity": {"docker-reference": format!("123456789012.dkr.ecr.us-east-1.amazonaws.com/{repository}")},
                "image": {"docker-manifest-digest": names},
                "type": "cosign container image signature",
            },
            "optional": null,
        })
        .to_string();
        let signature = STANDARD.encode(key.sign(payload.as_bytes()));
        let blob = self.ext.add_blob(payload.as_bytes());
        let manifest = json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": format!("sha256:{}", "2".repeat(64)), "size": 233},
            "layers": [{
                "mediaType": "application/vnd.dev.cosign.simplesigning.v1+json",
                "digest": blob,
                "size": payload.len(),
                "annotations": {"dev.cosignproject.cosign/signature": signature},
            }],
        })
        .to_string();
        let tag = format!("sha256-{}.sig", digest.trim_start_matches("sha256:"));
        self.put_raw(repository, Some(&tag), &manifest).await;
        blob
    }

    /// A cosign v3 signature of `digest` by `key`: a Sigstore bundle v0.3 (a DSSE envelope of
    /// an in-toto statement) attached as a referrer.
    async fn sign_bundle(&self, repository: &str, digest: &str, size: usize, key: &Key) {
        let statement = json!({
            "_type": "https://in-toto.io/Statement/v1",
            "subject": [{"name": repository, "digest": {"sha256": digest.trim_start_matches("sha256:")}}],
            "predicateType": "https://sigstore.dev/cosign/sign/v1",
            "predicate": {},
        })
        .to_string();
        let payload_type = "application/vnd.in-toto+json";
        let pae = format!(
            "DSSEv1 {} {payload_type} {} {statement}",
            payload_type.len(),
            statement.len()
        );
        let bundle = json!({
            "mediaType": BUNDLE,
            "verificationMaterial": {"publicKey": {"hint": "ci"}, "tlogEntries": []},
            "dsseEnvelope": {
                "payload": STANDARD.encode(&statement),
                "payloadType": payload_type,
                "signatures": [{"sig": STANDARD.encode(key.sign(pae.as_bytes())), "keyid": ""}],
            },
        })
        .to_string();
        let blob = self.ext.add_blob(bundle.as_bytes());
        let referrer = json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "artifactType": BUNDLE,
            "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a", "size": 2},
            "layers": [{"mediaType": BUNDLE, "digest": blob, "size": bundle.len()}],
            "subject": {"mediaType": OCI_MANIFEST, "digest": digest, "size": size},
            "annotations": {"dev.sigstore.bundle.content": "dsse-envelope", "dev.sigstore.bundle.predicateType": "https://sigstore.dev/cosign/sign/v1"},
        })
        .to_string();
        self.put_raw(repository, None, &referrer).await;
    }

    /// Scan findings for `digest`, as ECR would report them (moto's own API sets them).
    async fn scanned(&self, repository: &str, digest: &str, counts: serde_json::Value) {
        admin(moto::endpoint())
            .start_image_scan()
            .repository_name(repository)
            .image_id(
                aws_sdk_ecr::types::ImageIdentifier::builder()
                    .image_digest(digest)
                    .build(),
            )
            .send()
            .await
            .unwrap();
        let result = json!({
            "results": [{
                "registryId": "123456789012",
                "repositoryName": repository,
                "imageId": {"imageDigest": digest},
                "imageScanStatus": {"status": "COMPLETE", "description": "done"},
                "imageScanFindings": {"findingSeverityCounts": counts, "findings": []},
            }],
            "region": "us-east-1",
        });
        moto_api_post(
            "/moto-api/static/ecr/scan-finding-results",
            &result.to_string(),
        )
        .await;
    }
}

/// POSTs `body` to the emulator's own API at `path`.
async fn moto_api_post(path: &str, body: &str) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let address = moto::endpoint().trim_start_matches("http://");
    let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
    let request = format!(
        "POST {path} HTTP/1.1\r\nhost: {address}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).await.unwrap();
    assert!(
        answer.starts_with(b"HTTP/1.1 201") || answer.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&answer)
    );
}

/// Enforce: a tag-scheme signature by the trusted key is served with its verdict; another
/// key's, a payload naming another digest, an altered payload blob and no signature at all are
/// refused with their reasons; a bundle v0.3 referrer by the trusted key verifies.
#[tokio::test]
async fn enforce_serves_only_what_a_trusted_key_signed() {
    let (trusted, other) = (Key::new(), Key::new());
    let mut v = verified(&policy("enforce", &[("ci-2026", &trusted)], "")).await;
    let repository = v.repository().await;
    let cases = [
        "good",
        "other-key",
        "other-digest",
        "altered",
        "unsigned",
        "bundle",
    ];
    let mut digests = Vec::new();
    for case in cases {
        digests.push(v.put_raw(&repository, Some(case), &image(case)).await);
    }
    v.sign_tag(&repository, &digests[0], &digests[0], &trusted)
        .await;
    v.sign_tag(&repository, &digests[1], &digests[1], &other)
        .await;
    v.sign_tag(&repository, &digests[2], &digests[0], &trusted)
        .await;
    let blob = v
        .sign_tag(&repository, &digests[3], &digests[3], &trusted)
        .await;
    v.ext.alter_blob(&blob, b"{\"critical\":{}}");
    v.sign_bundle(&repository, &digests[5], image("bundle").len(), &trusted)
        .await;

    let good = v
        .client
        .get_image(get(&repository, "good", ""))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(good.image.unwrap().image_manifest, image("good"));
    let verdict = good.verification.expect("a verdict");
    assert!(verdict.passed, "{verdict:?}");
    assert_eq!(verdict.rule, "signed");
    assert_eq!(verdict.mode, "enforce");
    assert_eq!(verdict.key_name, "ci-2026");
    assert_eq!(verdict.signature_form, "cosign-tag");
    assert!(verdict.key_fingerprint.starts_with("sha256:"));

    for (tag, reason) in [
        ("other-key", "SIGNATURE_INVALID"),
        ("other-digest", "SIGNATURE_INVALID"),
        ("altered", "SIGNATURE_INVALID"),
        ("unsigned", "SIGNATURE_REQUIRED"),
    ] {
        let status = v
            .client
            .get_image(get(&repository, tag, ""))
            .await
            .unwrap_err();
        assert_status(&status, Code::FailedPrecondition, reason);
        assert_eq!(error_info(&status).metadata["rule"], "signed", "{tag}");
        eprintln!("{tag}: {}", status.message());
    }
    let bundle = v
        .client
        .resolve_image(ecr_image_service::pb::ResolveImageRequest {
            repository_name: repository.clone(),
            image_id: get(&repository, "bundle", "").image_id,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let verdict = bundle.verification.expect("a verdict");
    assert!(verdict.passed, "{verdict:?}");
    assert_eq!(verdict.signature_form, "sigstore-bundle");

    // ListReferrers shows the bundle attached to its image.
    let referrers = v
        .client
        .list_referrers(ListReferrersRequest {
            repository_name: repository.clone(),
            image_digest: digests[5].clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(referrers.referrers.len(), 1);
    assert_eq!(referrers.referrers[0].artifact_type, BUNDLE);
    assert_eq!(
        referrers.referrers[0].annotations["dev.sigstore.bundle.content"],
        "dsse-envelope"
    );
}

/// Findings over the gate are refused with their counts in the metadata; under it, served with
/// the counts; no scan when one is required is SCAN_NOT_COMPLETE with RetryInfo.
#[tokio::test]
async fn findings_over_the_gate_are_refused_with_their_counts() {
    let key = Key::new();
    let scan = "    scan:\n      maxSeverity: HIGH\n      requireScan: true\n";
    let mut v = verified(&policy("enforce", &[("ci", &key)], scan)).await;
    let repository = v.repository().await;
    let mut digests = Vec::new();
    for case in ["critical", "high", "unscanned"] {
        let digest = v.put_raw(&repository, Some(case), &image(case)).await;
        v.sign_tag(&repository, &digest, &digest, &key).await;
        digests.push(digest);
    }
    v.scanned(&repository, &digests[0], json!({"CRITICAL": 2, "HIGH": 5}))
        .await;
    v.scanned(&repository, &digests[1], json!({"HIGH": 3, "LOW": 7}))
        .await;
    let status = v
        .client
        .get_image(get(&repository, "critical", ""))
        .await
        .unwrap_err();
    assert_status(
        &status,
        Code::FailedPrecondition,
        "SCAN_FINDINGS_OVER_LIMIT",
    );
    let info = error_info(&status);
    assert_eq!(info.metadata["CRITICAL"], "2");
    assert_eq!(info.metadata["HIGH"], "5");
    let high = v
        .client
        .get_image(get(&repository, "high", ""))
        .await
        .unwrap()
        .into_inner()
        .verification
        .unwrap();
    assert!(high.passed);
    assert_eq!(high.scan_status, "COMPLETE");
    assert_eq!(high.scan_severity_counts["HIGH"], 3);
    let status = v
        .client
        .get_image(get(&repository, "unscanned", ""))
        .await
        .unwrap_err();
    assert_status(&status, Code::Unavailable, "SCAN_NOT_COMPLETE");
    use tonic_types::StatusExt;
    assert!(status.get_details_retry_info().is_some(), "RetryInfo");
}

/// 1,000 concurrent reads of one newly signed tag make one verification: one
/// ListImageReferrers, one GetDownloadUrlForLayer, one DescribeImageScanFindings.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_herd_of_reads_makes_one_verification() {
    let key = Key::new();
    let scan = "    scan:\n      maxSeverity: CRITICAL\n      requireScan: true\n";
    let v = verified(&policy("enforce", &[("ci", &key)], scan)).await;
    let repository = v.repository().await;
    let digest = v.put_raw(&repository, Some("herd"), &image("herd")).await;
    v.sign_tag(&repository, &digest, &digest, &key).await;
    v.scanned(&repository, &digest, json!({"LOW": 1})).await;
    let reads: Vec<_> = (0..1000)
        .map(|_| {
            let mut client = v.client.clone();
            let request = get(&repository, "herd", "");
            tokio::spawn(async move { client.get_image(request).await })
        })
        .collect();
    for read in reads {
        let answer = read.await.unwrap().unwrap().into_inner();
        assert!(answer.verification.unwrap().passed);
    }
    for operation in [
        "ListImageReferrers",
        "GetDownloadUrlForLayer",
        "DescribeImageScanFindings",
    ] {
        assert_eq!(v.calls.calls(operation), 1, "{operation}");
    }
}

/// A key removed from the policy: the image it signed is refused as soon as the policy is
/// re-read, well within the verdict TTL.
#[tokio::test]
async fn a_removed_key_is_refused_within_the_verdict_ttl() {
    let (old, new) = (Key::new(), Key::new());
    let mut v = verified(&policy("enforce", &[("old", &old), ("new", &new)], "")).await;
    let repository = v.repository().await;
    let digest = v.put_raw(&repository, Some("v1"), &image("rotated")).await;
    v.sign_tag(&repository, &digest, &digest, &old).await;
    let served = v
        .client
        .get_image(get(&repository, "v1", ""))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(served.verification.unwrap().key_name, "old");
    std::fs::write(&v.policy, policy("enforce", &[("new", &new)], "")).unwrap();
    let started = Instant::now();
    loop {
        match v.client.get_image(get(&repository, "v1", "")).await {
            Err(status) => {
                assert_status(&status, Code::FailedPrecondition, "SIGNATURE_INVALID");
                break;
            }
            Ok(_) => {
                assert!(
                    started.elapsed() < ecr_image_service::access::verify::DEFAULT_VERDICT_TTL,
                    "still served after the key was removed"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    eprintln!(
        "refused {:?} after the key left the policy",
        started.elapsed()
    );
}

/// WatchTag in enforce mode: a move to an unsigned digest is announced as refused (with the
/// reason), then a move to a signed one is announced as passing.
#[tokio::test]
async fn a_watch_announces_refused_moves_and_then_the_signed_one() {
    let key = Key::new();
    let mut v = verified(&policy("enforce", &[("ci", &key)], "")).await;
    let repository = v.repository().await;
    let first = v.put_raw(&repository, Some("live"), &image("first")).await;
    v.sign_tag(&repository, &first, &first, &key).await;
    let mut stream = v
        .client
        .watch_tag(WatchTagRequest {
            repository_name: repository.clone(),
            image_tag: "live".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut next_state = async || loop {
        let message = tokio::time::timeout(Duration::from_secs(30), stream.message())
            .await
            .expect("a message within 30 s")
            .unwrap()
            .unwrap();
        if let Some(Event::State(state)) = message.event {
            return state;
        }
    };
    let state = next_state().await;
    assert!(!state.refused);
    assert!(state.verification.unwrap().passed);
    // Moved through the service, so the watch hears at once.
    v.client
        .put_image(put(&repository, "live", &image("unsigned")))
        .await
        .unwrap();
    let state = next_state().await;
    assert_eq!(
        state.image_id.unwrap().image_digest,
        digest_of(&image("unsigned"))
    );
    assert!(
        state.refused,
        "a move to an unsigned digest is announced as refused"
    );
    assert_eq!(
        state.verification.unwrap().refusal_reason,
        "SIGNATURE_REQUIRED"
    );
    let signed = digest_of(&image("second"));
    v.sign_tag(&repository, &signed, &signed, &key).await;
    v.client
        .put_image(put(&repository, "live", &image("second")))
        .await
        .unwrap();
    let state = next_state().await;
    assert_eq!(state.image_id.unwrap().image_digest, signed);
    assert!(!state.refused);
    assert!(state.verification.unwrap().passed);
}

/// Audit mode serves an unsigned image, its verdict saying what enforce would have said.
#[tokio::test]
async fn audit_serves_and_says_what_enforce_would_refuse() {
    let key = Key::new();
    let mut v = verified(&policy("audit", &[("ci", &key)], "")).await;
    let repository = v.repository().await;
    v.put_raw(&repository, Some("v1"), &image("audited")).await;
    let answer = v
        .client
        .get_image(get(&repository, "v1", ""))
        .await
        .unwrap()
        .into_inner();
    let verdict = answer.verification.unwrap();
    assert!(!verdict.passed);
    assert_eq!(verdict.mode, "audit");
    assert_eq!(verdict.refusal_reason, "SIGNATURE_REQUIRED");
}

/// The CLI: `verify-image` prints the verdict and exits 0 when it passes, the refusal's code
/// when enforce refuses; `list-referrers` prints what is attached. (Two workers: the CLI is
/// waited for on one while the server answers on the other.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_verifies_and_lists_referrers() {
    let key = Key::new();
    let v = verified(&policy("enforce", &[("ci", &key)], "")).await;
    let repository = v.repository().await;
    let signed = v.put_raw(&repository, Some("signed"), &image("cli")).await;
    v.sign_bundle(&repository, &signed, image("cli").len(), &key)
        .await;
    v.put_raw(&repository, Some("unsigned"), &image("cli-unsigned"))
        .await;
    let endpoint = format!("http://{}", v.address);
    let run = |args: Vec<String>| {
        std::process::Command::new(crate::support::process::BINARY)
            .args(args)
            .output()
            .unwrap()
    };
    let verify = |tag: &str| {
        run(vec![
            "verify-image".into(),
            "--endpoint".into(),
            endpoint.clone(),
            "--repository-name".into(),
            repository.clone(),
            "--image-tag".into(),
            tag.into(),
        ])
    };
    let ok = verify("signed");
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let printed: serde_json::Value = serde_json::from_slice(&ok.stdout).unwrap();
    assert_eq!(printed["verification"]["passed"], true);
    assert_eq!(printed["verification"]["signatureForm"], "sigstore-bundle");
    let refused = verify("unsigned");
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("SIGNATURE_REQUIRED"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    let listed = run(vec![
        "list-referrers".into(),
        "--endpoint".into(),
        endpoint.clone(),
        "--repository-name".into(),
        repository.clone(),
        "--image-digest".into(),
        signed.clone(),
    ]);
    assert!(
        listed.status.success(),
        "{}",
        String::from_utf8_lossy(&listed.stderr)
    );
    let printed: serde_json::Value = serde_json::from_slice(&listed.stdout).unwrap();
    assert_eq!(printed["referrers"][0]["artifactType"], BUNDLE);
}

//! Platform resolution from indexes, on both backends: a buildx-style OCI index (two platforms
//! and two attestation manifests) and a Docker manifest list, put child-first through the
//! facade; and the children check on putting an index, which the emulator alone would skip.

use ecr_image_service::pb::{GetImageRequest, Platform, ResolveImageRequest};
use sha2::{Digest as _, Sha256};
use tonic::Code;

use crate::on_both_backends;
use crate::support::backend::Backend;
use crate::support::requests::{get, put};
use crate::support::{SEED, assert_status, error_info};

on_both_backends!(
    a_platform_picks_the_childs_exact_bytes_from_a_buildx_index,
    a_docker_manifest_list_is_matched_after_normalisation,
    an_absent_platform_lists_what_the_index_has,
    a_single_platform_manifest_is_returned_as_it_is,
    an_index_whose_children_are_missing_is_refused,
    a_nested_index_is_followed_one_level,
    a_child_whose_size_differs_from_its_descriptor_is_data_loss,
);

fn digest_of(text: &str) -> String {
    format!("sha256:{:x}", Sha256::digest(text.as_bytes()))
}

/// A small, distinct image manifest of `media_type`.
fn image_manifest(media_type: &str, name: &str) -> String {
    format!(
        r#"{{"schemaVersion":2,"mediaType":"{media_type}","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{}","size":2}},"layers":[],"annotations":{{"name":"{name}"}}}}"#,
        digest_of(name)
    )
}

fn descriptor(media_type: &str, child: &str, platform: &str, annotations: &str) -> String {
    format!(
        r#"{{"mediaType":"{media_type}","digest":"{}","size":{},"platform":{platform}{annotations}}}"#,
        digest_of(child),
        child.len()
    )
}

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";

/// Children first (untagged, by digest), then the index under `tag`: as buildx pushes.
async fn put_index(backend: &Backend, repository: &str, tag: &str, children: &[&str], index: &str) {
    for child in children {
        backend.put(repository, "", child).await;
    }
    backend.put(repository, tag, index).await;
}

/// buildx's shape: amd64, arm64, and one attestation manifest for each (`unknown/unknown`,
/// annotated), the attestations first so that they would win any careless match.
fn buildx_index() -> (String, String, String, Vec<String>) {
    let amd64 = image_manifest(OCI_MANIFEST, "app-amd64");
    let arm64 = image_manifest(OCI_MANIFEST, "app-arm64");
    let attest_amd64 = image_manifest(OCI_MANIFEST, "attest-amd64");
    let attest_arm64 = image_manifest(OCI_MANIFEST, "attest-arm64");
    let unknown = r#"{"os":"unknown","architecture":"unknown"}"#;
    let attestation = |of: &str| {
        format!(
            r#","annotations":{{"vnd.docker.reference.type":"attestation-manifest","vnd.docker.reference.digest":"{}"}}"#,
            digest_of(of)
        )
    };
    let index = format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[{},{},{},{}]}}"#,
        descriptor(OCI_MANIFEST, &attest_arm64, unknown, &attestation(&arm64)),
        descriptor(
            OCI_MANIFEST,
            &amd64,
            r#"{"os":"linux","architecture":"amd64"}"#,
            ""
        ),
        descriptor(
            OCI_MANIFEST,
            &arm64,
            r#"{"os":"linux","architecture":"arm64","variant":"v8"}"#,
            ""
        ),
        descriptor(OCI_MANIFEST, &attest_amd64, unknown, &attestation(&amd64)),
    );
    (index, amd64, arm64, vec![attest_amd64, attest_arm64])
}

fn platform(os: &str, architecture: &str, variant: &str) -> Option<Platform> {
    Some(Platform {
        os: os.into(),
        architecture: architecture.into(),
        variant: variant.into(),
        ..Platform::default()
    })
}

fn get_for(repository: &str, tag: &str, wanted: Option<Platform>) -> GetImageRequest {
    GetImageRequest {
        platform: wanted,
        ..get(repository, tag, "")
    }
}

async fn a_platform_picks_the_childs_exact_bytes_from_a_buildx_index(backend: Backend) {
    let repository = backend.repository("buildx", false).await;
    let (index, amd64, arm64, attestations) = buildx_index();
    let mut children = vec![amd64.as_str(), arm64.as_str()];
    children.extend(attestations.iter().map(String::as_str));
    put_index(&backend, &repository, "1.4", &children, &index).await;
    let mut client = backend.client.clone();

    for _ in 0..2 {
        let answer = client
            .get_image(get_for(&repository, "1.4", platform("linux", "arm64", "")))
            .await
            .unwrap()
            .into_inner();
        let image = answer.image.clone().unwrap();
        assert_eq!(image.image_manifest, arm64, "the arm64 child's exact bytes");
        let id = image.image_id.unwrap();
        assert_eq!(id.image_digest, digest_of(&image.image_manifest));
        assert_eq!(image.image_manifest_media_type, OCI_MANIFEST);
        assert!(answer.platform_applied);
        let index_id = answer.index_image_id.unwrap();
        assert_eq!(index_id.image_digest, digest_of(&index));
        assert_eq!(index_id.image_tag, "1.4");
        assert_eq!(answer.platform.unwrap().architecture, "arm64");
    }
    let resolved = client
        .resolve_image(ResolveImageRequest {
            repository_name: repository.clone(),
            image_id: get(&repository, "1.4", "").image_id,
            platform: platform("linux", "amd64", ""),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resolved.image_id.unwrap().image_digest, digest_of(&amd64));
    assert_eq!(resolved.image_manifest_size, amd64.len() as i64);
    assert!(resolved.platform_applied);
}

async fn a_docker_manifest_list_is_matched_after_normalisation(backend: Backend) {
    let repository = backend.repository("manifest-list", false).await;
    let amd64 = image_manifest(DOCKER_MANIFEST, "list-amd64");
    let armv7 = image_manifest(DOCKER_MANIFEST, "list-armv7");
    let list = format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.docker.distribution.manifest.list.v2+json","manifests":[{},{}]}}"#,
        descriptor(
            DOCKER_MANIFEST,
            &amd64,
            r#"{"os":"linux","architecture":"amd64"}"#,
            ""
        ),
        descriptor(
            DOCKER_MANIFEST,
            &armv7,
            r#"{"os":"linux","architecture":"arm","variant":"v7"}"#,
            ""
        ),
    );
    put_index(&backend, &repository, "2.0", &[&amd64, &armv7], &list).await;
    let mut client = backend.client.clone();
    // `arm` is `arm/v7`, `x86_64` is `amd64` (containerd's normalisation).
    for (asked, expected) in [
        (platform("linux", "arm", ""), &armv7),
        (platform("linux", "x86_64", ""), &amd64),
    ] {
        let image = client
            .get_image(get_for(&repository, "2.0", asked))
            .await
            .unwrap()
            .into_inner()
            .image
            .unwrap();
        assert_eq!(&image.image_manifest, expected);
    }
}

async fn an_absent_platform_lists_what_the_index_has(backend: Backend) {
    let repository = backend.repository("no-platform", false).await;
    let (index, amd64, arm64, attestations) = buildx_index();
    let mut children = vec![amd64.as_str(), arm64.as_str()];
    children.extend(attestations.iter().map(String::as_str));
    put_index(&backend, &repository, "1.4", &children, &index).await;
    let status = backend
        .client
        .clone()
        .get_image(get_for(&repository, "1.4", platform("linux", "s390x", "")))
        .await
        .unwrap_err();
    assert_status(&status, Code::NotFound, "PLATFORM_NOT_FOUND");
    assert_eq!(
        error_info(&status).metadata["available"],
        "linux/amd64,linux/arm64/v8",
        "the attestations are not platforms"
    );
}

async fn a_single_platform_manifest_is_returned_as_it_is(backend: Backend) {
    let repository = backend.repository("single", false).await;
    backend.put(&repository, "v1", SEED).await;
    let answer = backend
        .client
        .clone()
        .get_image(get_for(&repository, "v1", platform("linux", "arm64", "")))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(answer.image.unwrap().image_manifest, SEED);
    assert!(!answer.platform_applied);
    assert!(answer.index_image_id.is_none());
}

/// ECR refuses an index whose children are not in the repository; so does the facade, on
/// both backends (the emulator alone would accept it), naming the missing child.
async fn an_index_whose_children_are_missing_is_refused(backend: Backend) {
    let repository = backend.repository("orphan-index", false).await;
    let (index, amd64, arm64, _) = buildx_index();
    backend.put(&repository, "", &amd64).await;
    let status = backend
        .client
        .clone()
        .put_image(put(&repository, "1.4", &index))
        .await
        .unwrap_err();
    assert_status(
        &status,
        Code::FailedPrecondition,
        "REFERENCED_IMAGES_NOT_FOUND",
    );
    assert!(
        status.message().contains(&digest_of(&arm64)),
        "{}",
        status.message()
    );
    let status = backend
        .client
        .clone()
        .get_image(get(&repository, "1.4", ""))
        .await
        .unwrap_err();
    assert_status(&status, Code::NotFound, "IMAGE_NOT_FOUND");
}

/// An index listing another index (without a platform, as most tools write it): the nested
/// one's entries are candidates too, one level deep.
async fn a_nested_index_is_followed_one_level(backend: Backend) {
    let repository = backend.repository("nested", false).await;
    let (inner, amd64, arm64, attestations) = buildx_index();
    let mut children = vec![amd64.as_str(), arm64.as_str()];
    children.extend(attestations.iter().map(String::as_str));
    put_index(&backend, &repository, "", &children, &inner).await;
    let outer = format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[{{"mediaType":"application/vnd.oci.image.index.v1+json","digest":"{}","size":{}}}]}}"#,
        digest_of(&inner),
        inner.len()
    );
    backend.put(&repository, "outer", &outer).await;
    let answer = backend
        .client
        .clone()
        .get_image(get_for(
            &repository,
            "outer",
            platform("linux", "arm64", "v8"),
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(answer.image.unwrap().image_manifest, arm64);
    assert_eq!(
        answer.index_image_id.unwrap().image_digest,
        digest_of(&outer)
    );
}

/// The chosen child is checked against its descriptor: a size that differs is DATA_LOSS, never
/// passed on.
async fn a_child_whose_size_differs_from_its_descriptor_is_data_loss(backend: Backend) {
    let repository = backend.repository("bad-size", false).await;
    let child = image_manifest(OCI_MANIFEST, "sized");
    let index = format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[{{"mediaType":"{OCI_MANIFEST}","digest":"{}","size":{},"platform":{{"os":"linux","architecture":"amd64"}}}}]}}"#,
        digest_of(&child),
        child.len() + 1
    );
    put_index(&backend, &repository, "1.0", &[&child], &index).await;
    let status = backend
        .client
        .clone()
        .get_image(get_for(&repository, "1.0", platform("linux", "amd64", "")))
        .await
        .unwrap_err();
    assert_status(&status, Code::DataLoss, "DIGEST_VERIFICATION_FAILED");
}

/// Issue 20, finding 4: an index's children are checked in one BatchGetImage. An index of 100
/// missing children costs exactly one; one of 101 is refused before any call (a 4 MiB index
/// of 49,343 entries used to cost 861 calls).
#[tokio::test]
async fn an_index_costs_at_most_one_batch_get_image_for_its_children() {
    let repository = crate::support::unique("wide-index");
    crate::support::create_repository(crate::support::moto::endpoint(), &repository, false).await;
    let (registry, calls) = crate::support::cached(crate::support::moto::endpoint());
    let mut client = crate::support::start(registry).await;
    let index = |children: usize| {
        let entries: Vec<String> = (0..children)
            .map(|n| {
                descriptor(
                    "application/vnd.oci.image.manifest.v1+json",
                    &format!("{{\"n\":{n}}}"),
                    r#"{"os":"linux","architecture":"amd64"}"#,
                    "",
                )
            })
            .collect();
        format!(
            r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[{}]}}"#,
            entries.join(",")
        )
    };
    let status = client
        .put_image(put(&repository, "wide", &index(101)))
        .await
        .unwrap_err();
    assert_status(&status, Code::InvalidArgument, "INVALID_FIELD");
    assert_eq!(calls.calls("BatchGetImage"), 0);
    let status = client
        .put_image(put(&repository, "wide", &index(100)))
        .await
        .unwrap_err();
    assert_status(
        &status,
        Code::FailedPrecondition,
        "REFERENCED_IMAGES_NOT_FOUND",
    );
    assert_eq!(calls.calls("BatchGetImage"), 1);
}

//! Behaviour against the moto emulator through the real SDK: not-found paths, tag moves,
//! immutability, media-type inference, untagged images, and no partial writes. Each test
//! asserts ECR's documented behaviour, never one of the emulator's quirks.

use ecr_image_service::image::media_types;
use ecr_image_service::pb::PutImageOutcome;
use sha2::{Digest as _, Sha256};
use tonic::Code;

use crate::support::requests::{fetch, get, put};
use crate::support::{
    SEED, SEED_DIGEST, SEED_DOC_FORM, assert_status, create_repository, start_on_moto, unique,
};

fn digest_of(text: &str) -> String {
    format!("sha256:{:x}", Sha256::digest(text.as_bytes()))
}

#[tokio::test]
async fn missing_images_and_repositories_are_not_found() {
    let (mut client, endpoint) = start_on_moto().await;
    let repository = unique("not-found");
    create_repository(endpoint, &repository, false).await;

    let status = client
        .get_image(get(&repository, "nope", ""))
        .await
        .unwrap_err();
    assert_status(&status, Code::NotFound, "IMAGE_NOT_FOUND");
    let status = client
        .get_image(get(&repository, "", SEED_DIGEST))
        .await
        .unwrap_err();
    assert_status(&status, Code::NotFound, "IMAGE_NOT_FOUND");
    let status = client
        .get_image(get("no-such-repo", "v1", ""))
        .await
        .unwrap_err();
    assert_status(&status, Code::NotFound, "REPOSITORY_NOT_FOUND");
}

/// A refused put writes nothing: the tag stays unknown afterwards.
#[tokio::test]
async fn a_refused_put_writes_nothing() {
    let (mut client, endpoint) = start_on_moto().await;
    let repository = unique("no-partial");
    create_repository(endpoint, &repository, false).await;

    let mut mismatched = put(&repository, "v1", SEED);
    mismatched.image_digest = digest_of(SEED_DOC_FORM);
    let status = client.put_image(mismatched).await.unwrap_err();
    assert_status(&status, Code::InvalidArgument, "DIGEST_MISMATCH");
    let status = client
        .get_image(get(&repository, "v1", ""))
        .await
        .unwrap_err();
    assert_status(&status, Code::NotFound, "IMAGE_NOT_FOUND");
}

/// In a mutable repository a put moves the tag to the new bytes.
#[tokio::test]
async fn a_mutable_tag_moves() {
    let (mut client, endpoint) = start_on_moto().await;
    let repository = unique("mutable");
    create_repository(endpoint, &repository, false).await;

    client
        .put_image(put(&repository, "v1", SEED))
        .await
        .unwrap();
    let moved = client
        .put_image(put(&repository, "v1", SEED_DOC_FORM))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(moved.outcome(), PutImageOutcome::Created);
    let image = fetch(&mut client, get(&repository, "v1", "")).await;
    assert_eq!(image.image_manifest, SEED_DOC_FORM);
    assert_eq!(
        image.image_id.unwrap().image_digest,
        digest_of(SEED_DOC_FORM)
    );
}

/// In an immutable repository the same bytes re-put succeed; other bytes under the same tag are
/// ALREADY_EXISTS, and the tag keeps its image.
#[tokio::test]
async fn an_immutable_tag_stays() {
    let (mut client, endpoint) = start_on_moto().await;
    let repository = unique("immutable");
    create_repository(endpoint, &repository, true).await;

    client
        .put_image(put(&repository, "v1", SEED))
        .await
        .unwrap();
    let again = client
        .put_image(put(&repository, "v1", SEED))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.outcome(), PutImageOutcome::AlreadyExisted);
    let status = client
        .put_image(put(&repository, "v1", SEED_DOC_FORM))
        .await
        .unwrap_err();
    assert_status(&status, Code::AlreadyExists, "TAG_ALREADY_EXISTS");
    assert!(
        status.message().contains(SEED_DIGEST),
        "{}",
        status.message()
    );
    let image = fetch(&mut client, get(&repository, "v1", "")).await;
    assert_eq!(image.image_manifest, SEED);
}

/// Manifests without a top-level mediaType: an index is inferred from `manifests`; an OCI
/// artifact (a Helm chart) is stored with the declared type. Either comes back with its type.
#[tokio::test]
async fn media_types_are_inferred_or_declared() {
    let (mut client, endpoint) = start_on_moto().await;
    let repository = unique("media-types");
    create_repository(endpoint, &repository, false).await;

    let index = format!(
        r#"{{"schemaVersion":2,"manifests":[{{"mediaType":"{}","digest":"{SEED_DIGEST}","size":{}}}]}}"#,
        media_types::DOCKER_MANIFEST_V2,
        SEED.len()
    );
    client.put_image(put(&repository, "", SEED)).await.unwrap();
    client
        .put_image(put(&repository, "multi", &index))
        .await
        .unwrap();
    let image = fetch(&mut client, get(&repository, "multi", "")).await;
    assert_eq!(image.image_manifest, index);
    assert_eq!(image.image_manifest_media_type, media_types::OCI_INDEX);

    let chart = r#"{"schemaVersion":2,"config":{"mediaType":"application/vnd.cncf.helm.config.v1+json","digest":"sha256:0000000000000000000000000000000000000000000000000000000000000000","size":2},"layers":[]}"#;
    let mut helm = put(&repository, "chart-1.0.0", chart);
    helm.image_manifest_media_type = media_types::OCI_MANIFEST.into();
    client.put_image(helm).await.unwrap();
    let image = fetch(&mut client, get(&repository, "chart-1.0.0", "")).await;
    assert_eq!(image.image_manifest, chart);
    assert_eq!(image.image_manifest_media_type, media_types::OCI_MANIFEST);
}

/// An untagged put (an index's child) is reachable by digest, and its re-put is idempotent.
#[tokio::test]
async fn untagged_images_are_addressed_by_digest() {
    let (mut client, endpoint) = start_on_moto().await;
    let repository = unique("untagged");
    create_repository(endpoint, &repository, false).await;

    let first = client
        .put_image(put(&repository, "", SEED))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first.outcome(), PutImageOutcome::Created);
    let image = first.image.unwrap();
    assert_eq!(image.image_id.unwrap().image_tag, "");
    let image = fetch(&mut client, get(&repository, "", SEED_DIGEST)).await;
    assert_eq!(image.image_manifest, SEED);
}

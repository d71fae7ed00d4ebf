//! The seed scenario, "retag an image with its manifest", end to end through the emulator.

use ecr_image_service::pb::{PutImageOutcome, PutImageResponse};
use serde_json::Value;

use crate::support::requests::{fetch, get, put};
use crate::support::{
    MOTO_ACCOUNT, SEED, SEED_DIGEST, SEED_DOC_FORM, SEED_DOC_FORM_DIGEST, SEED_EXPECTED_OUTPUT,
    create_repository, start_on_moto,
};

/// Put the seed as `hello-world:2019.08`, read it back by tag, digest and both, retag it,
/// re-put it, and put its doc-form twin: digests are over exact bytes, the bytes come back
/// unchanged, and re-puts are idempotent.
#[tokio::test]
async fn seed_retag_scenario() {
    let (mut client, endpoint) = start_on_moto().await;
    create_repository(endpoint, "hello-world", false).await;

    let put_response = client
        .put_image(put("hello-world", "2019.08", SEED))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(put_response.outcome(), PutImageOutcome::Created);
    assert_matches_cli_output(&put_response);

    for (tag, digest) in [("2019.08", ""), ("", SEED_DIGEST), ("2019.08", SEED_DIGEST)] {
        let image = fetch(&mut client, get("hello-world", tag, digest)).await;
        assert_eq!(
            image.image_manifest, SEED,
            "get by {tag:?}/{digest:?}: exact bytes"
        );
        let id = image.image_id.unwrap();
        assert_eq!(id.image_digest, SEED_DIGEST);
        assert_eq!(id.image_tag, tag, "the tag asked for is the tag reported");
        assert_eq!(
            image.image_manifest_media_type,
            "application/vnd.docker.distribution.manifest.v2+json"
        );
    }

    // Retag: the exact bytes from a get, put under a new tag, keep the digest.
    let fetched = fetch(&mut client, get("hello-world", "2019.08", "")).await;
    let retagged = client
        .put_image(put("hello-world", "latest", &fetched.image_manifest))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(retagged.outcome(), PutImageOutcome::Created);
    assert_eq!(
        retagged.image.unwrap().image_id.unwrap().image_digest,
        SEED_DIGEST
    );
    let latest = fetch(&mut client, get("hello-world", "latest", "")).await;
    assert_eq!(latest.image_manifest, SEED);

    // The same manifest and tag again: success, reported as already there.
    let again = client
        .put_image(put("hello-world", "2019.08", SEED))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.outcome(), PutImageOutcome::AlreadyExisted);
    assert_eq!(
        again.image.unwrap().image_id.unwrap().image_digest,
        SEED_DIGEST
    );

    // Same document, other bytes: another image with its own digest.
    let doc_form = client
        .put_image(put("hello-world", "doc-form", SEED_DOC_FORM))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(doc_form.outcome(), PutImageOutcome::Created);
    assert_eq!(
        doc_form.image.unwrap().image_id.unwrap().image_digest,
        SEED_DOC_FORM_DIGEST
    );
    let doc_form_back = fetch(&mut client, get("hello-world", "", SEED_DOC_FORM_DIGEST)).await;
    assert_eq!(doc_form_back.image_manifest, SEED_DOC_FORM);
}

/// The response carries what `aws ecr put-image` prints, field for field (the registry ID is the
/// emulator's account rather than AWS's example account).
fn assert_matches_cli_output(response: &PutImageResponse) {
    let expected: Value = serde_json::from_str(SEED_EXPECTED_OUTPUT).unwrap();
    let expected = &expected["image"];
    let image = response.image.as_ref().unwrap();
    let id = image.image_id.as_ref().unwrap();
    assert_eq!(image.registry_id, MOTO_ACCOUNT);
    assert_eq!(image.repository_name, expected["repositoryName"]);
    assert_eq!(id.image_digest, expected["imageId"]["imageDigest"]);
    assert_eq!(id.image_tag, expected["imageId"]["imageTag"]);
    assert_eq!(image.image_manifest, expected["imageManifest"]);
}

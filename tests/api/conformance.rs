//! One conformance suite, two backends: every scenario runs against ECR (the moto emulator
//! behind the production stack) and against the embedded store, asserting ECR's documented
//! behaviour, never an emulator quirk. The seed scenario, "retag an image with its manifest",
//! comes first.

use ecr_image_service::image::media_types;
use ecr_image_service::pb::{
    CacheStatus, ImageIdentifier, PutImageOutcome, PutImageResponse, ResolveImageRequest,
    RetagImageRequest,
};
use serde_json::Value;
use sha2::{Digest as _, Sha256};
use tonic::Code;

use crate::on_both_backends;
use crate::support::backend::{Backend, Kind};
use crate::support::requests::{delete, fetch, get, put};
use crate::support::{
    SEED, SEED_DIGEST, SEED_DOC_FORM, SEED_DOC_FORM_DIGEST, SEED_EXPECTED_OUTPUT, assert_status,
    unique, violated_fields,
};

on_both_backends!(
    seed_retag_scenario,
    missing_images_and_repositories_are_not_found,
    a_refused_put_writes_nothing,
    a_mutable_tag_moves,
    an_immutable_tag_stays,
    media_types_are_inferred_or_declared,
    untagged_images_are_addressed_by_digest,
    resolve_reports_digest_type_and_size,
    retag_image_points_tags_at_the_exact_bytes,
    retag_image_reports_each_target_on_its_own,
    retag_image_refuses_bad_requests_whole,
    a_second_read_by_digest_is_a_cache_hit,
    deleting_a_tag_keeps_the_image_until_its_last_tag_goes,
    a_deleted_digest_is_not_found_at_once_even_when_cached,
    a_watcher_sees_the_current_state_then_this_replicas_writes,
);

/// Both backends sit behind the same cache: an image that reached the registry behind the
/// service's back is a MISS on its first read by digest and a HIT on the second, the exact
/// bytes both times.
async fn a_second_read_by_digest_is_a_cache_hit(backend: Backend) {
    let repository = backend.repository("cache-hit", false).await;
    backend
        .put_behind_the_service(&repository, "v1", SEED)
        .await;
    let mut client = backend.client.clone();
    for expected in [CacheStatus::Miss, CacheStatus::Hit] {
        let answer = client
            .get_image(get(&repository, "", SEED_DIGEST))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(answer.cache_status(), expected);
        assert_eq!(answer.image.unwrap().image_manifest, SEED);
    }
}

/// The one documented divergence in what the API exposes: ECR refuses a put into a repository
/// that was never created (REPOSITORY_NOT_FOUND, asserted on recorded ECR answers in
/// `ecr_errors.rs`, since moto answers it with a bare 500); the embedded store creates the
/// repository, as there is no CreateRepository to call.
#[tokio::test]
async fn the_local_store_creates_a_repository_on_first_put() {
    let backend = Backend::start(Kind::Local).await;
    let repository = unique("never-created");
    let mut client = backend.client.clone();
    let put_response = client
        .put_image(put(&repository, "v1", SEED))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(put_response.outcome(), PutImageOutcome::Created);
    let image = fetch(&mut client, get(&repository, "v1", "")).await;
    assert_eq!(image.image_manifest, SEED);
}

fn digest_of(text: &str) -> String {
    format!("sha256:{:x}", Sha256::digest(text.as_bytes()))
}

/// Put the seed as `hello-world:2019.08`, read it back by tag, digest and both, retag it,
/// re-put it, and put its doc-form twin: digests are over exact bytes, the bytes come back
/// unchanged, and re-puts are idempotent.
async fn seed_retag_scenario(backend: Backend) {
    backend.create_repository("hello-world", false).await;
    let mut client = backend.client.clone();

    let put_response = client
        .put_image(put("hello-world", "2019.08", SEED))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(put_response.outcome(), PutImageOutcome::Created);
    assert_matches_cli_output(&put_response, backend.registry_id());

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
            media_types::DOCKER_MANIFEST_V2
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
/// backend's account rather than AWS's example account).
fn assert_matches_cli_output(response: &PutImageResponse, registry_id: &str) {
    let expected: Value = serde_json::from_str(SEED_EXPECTED_OUTPUT).unwrap();
    let expected = &expected["image"];
    let image = response.image.as_ref().unwrap();
    let id = image.image_id.as_ref().unwrap();
    assert_eq!(image.registry_id, registry_id);
    assert_eq!(image.repository_name, expected["repositoryName"]);
    assert_eq!(id.image_digest, expected["imageId"]["imageDigest"]);
    assert_eq!(id.image_tag, expected["imageId"]["imageTag"]);
    assert_eq!(image.image_manifest, expected["imageManifest"]);
}

async fn missing_images_and_repositories_are_not_found(backend: Backend) {
    let repository = backend.repository("not-found", false).await;
    let mut client = backend.client.clone();

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
async fn a_refused_put_writes_nothing(backend: Backend) {
    let repository = backend.repository("no-partial", false).await;
    let mut client = backend.client.clone();

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

/// In a mutable repository a put moves the tag to the new bytes; the old image stays
/// reachable by digest.
async fn a_mutable_tag_moves(backend: Backend) {
    let repository = backend.repository("mutable", false).await;
    let mut client = backend.client.clone();

    backend.put(&repository, "v1", SEED).await;
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
    let old = fetch(&mut client, get(&repository, "", SEED_DIGEST)).await;
    assert_eq!(old.image_manifest, SEED);
}

/// In an immutable repository the same bytes re-put succeed; other bytes under the same tag are
/// ALREADY_EXISTS, and the tag keeps its image.
async fn an_immutable_tag_stays(backend: Backend) {
    let repository = backend.repository("immutable", true).await;
    let mut client = backend.client.clone();

    backend.put(&repository, "v1", SEED).await;
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
async fn media_types_are_inferred_or_declared(backend: Backend) {
    let repository = backend.repository("media-types", false).await;
    let mut client = backend.client.clone();

    let index = format!(
        r#"{{"schemaVersion":2,"manifests":[{{"mediaType":"{}","digest":"{SEED_DIGEST}","size":{}}}]}}"#,
        media_types::DOCKER_MANIFEST_V2,
        SEED.len()
    );
    backend.put(&repository, "", SEED).await;
    backend.put(&repository, "multi", &index).await;
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
async fn untagged_images_are_addressed_by_digest(backend: Backend) {
    let repository = backend.repository("untagged", false).await;
    let mut client = backend.client.clone();

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
    // Re-put: success either way. (ECR answers ImageAlreadyExists, so ALREADY_EXISTED, as the
    // embedded store does; moto accepts it silently, so CREATED. Neither is asserted.)
    client.put_image(put(&repository, "", SEED)).await.unwrap();
    let image = fetch(&mut client, get(&repository, "", SEED_DIGEST)).await;
    assert_eq!(image.image_manifest, SEED);
}

async fn resolve_reports_digest_type_and_size(backend: Backend) {
    let repository = backend.repository("resolve", false).await;
    let mut client = backend.client.clone();
    backend.put(&repository, "v1", SEED).await;
    let resolved = client
        .resolve_image(ResolveImageRequest {
            repository_name: repository.clone(),
            image_id: Some(ImageIdentifier {
                image_tag: "v1".into(),
                image_digest: String::new(),
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resolved.image_id.unwrap().image_digest, SEED_DIGEST);
    assert_eq!(resolved.image_manifest_size, SEED.len() as i64);
    assert_eq!(
        resolved.image_manifest_media_type,
        media_types::DOCKER_MANIFEST_V2
    );
    assert_eq!(resolved.registry_id, backend.registry_id());
}

fn retag(repository: &str, source_tag: &str, targets: &[&str]) -> RetagImageRequest {
    RetagImageRequest {
        repository_name: repository.into(),
        source_image_id: Some(ImageIdentifier {
            image_tag: source_tag.into(),
            image_digest: String::new(),
        }),
        target_tags: targets.iter().map(|t| (*t).to_owned()).collect(),
        ..Default::default()
    }
}

/// The seed's retag in one call: every target gets the exact bytes; a second call is
/// idempotent.
async fn retag_image_points_tags_at_the_exact_bytes(backend: Backend) {
    let repository = backend.repository("retag", false).await;
    let mut client = backend.client.clone();
    backend.put(&repository, "2019.08", SEED).await;

    let response = client
        .retag_image(retag(&repository, "2019.08", &["latest", "stable"]))
        .await
        .unwrap()
        .into_inner();
    let source = response.source_image.unwrap();
    assert_eq!(source.image_id.unwrap().image_digest, SEED_DIGEST);
    assert!(source.image_manifest.is_empty(), "the bytes are not echoed");
    let outcomes: Vec<_> = response
        .results
        .iter()
        .map(|r| (r.image_tag.as_str(), r.outcome(), r.failure.is_none()))
        .collect();
    assert_eq!(
        outcomes,
        [
            ("latest", PutImageOutcome::Created, true),
            ("stable", PutImageOutcome::Created, true)
        ]
    );
    for tag in ["latest", "stable"] {
        let image = fetch(&mut client, get(&repository, tag, "")).await;
        assert_eq!(image.image_manifest, SEED, "{tag}: exact bytes");
    }
    let again = client
        .retag_image(retag(&repository, "2019.08", &["latest", "stable"]))
        .await
        .unwrap()
        .into_inner();
    assert!(
        again
            .results
            .iter()
            .all(|r| r.outcome() == PutImageOutcome::AlreadyExisted)
    );
}

/// In an immutable repository, a target that points elsewhere fails on its own; the other
/// targets are still retagged.
async fn retag_image_reports_each_target_on_its_own(backend: Backend) {
    let repository = backend.repository("retag-immutable", true).await;
    let mut client = backend.client.clone();
    backend.put(&repository, "v1", SEED).await;
    backend.put(&repository, "taken", SEED_DOC_FORM).await;

    let response = client
        .retag_image(retag(&repository, "v1", &["first", "taken", "last"]))
        .await
        .unwrap()
        .into_inner();
    let [first, taken, last] = response.results.as_slice() else {
        panic!("three results: {:?}", response.results);
    };
    assert_eq!(first.outcome(), PutImageOutcome::Created);
    assert_eq!(last.outcome(), PutImageOutcome::Created);
    let failure = taken.failure.as_ref().expect("the taken tag fails");
    assert_eq!(taken.outcome(), PutImageOutcome::Unspecified);
    assert_eq!(
        (failure.code.as_str(), failure.reason.as_str()),
        ("ALREADY_EXISTS", "TAG_ALREADY_EXISTS")
    );
    let kept = fetch(&mut client, get(&repository, "taken", "")).await;
    assert_eq!(
        kept.image_manifest, SEED_DOC_FORM,
        "the taken tag kept its image"
    );
}

/// Invalid targets or a missing source fail the whole call, before anything is written.
async fn retag_image_refuses_bad_requests_whole(backend: Backend) {
    let repository = backend.repository("retag-bad", false).await;
    let mut client = backend.client.clone();
    backend.put(&repository, "v1", SEED).await;

    let status = client
        .retag_image(retag(&repository, "v1", &["ok", "", "ok"]))
        .await
        .unwrap_err();
    assert_status(&status, Code::InvalidArgument, "INVALID_FIELD");
    assert_eq!(
        violated_fields(&status),
        ["target_tags[1]", "target_tags[2]"]
    );
    let status = client
        .get_image(get(&repository, "ok", ""))
        .await
        .unwrap_err();
    assert_status(&status, Code::NotFound, "IMAGE_NOT_FOUND");

    let status = client
        .retag_image(retag(&repository, "", &[]))
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&status), ["source_image_id", "target_tags"]);
    let status = client
        .retag_image(retag(&repository, "missing", &["x"]))
        .await
        .unwrap_err();
    assert_status(&status, Code::NotFound, "IMAGE_NOT_FOUND");
}

/// A tag and a digest that name different images: ECR's `ImageTagDoesNotMatchDigest` failure
/// (asserted on recorded ECR answers in `ecr_errors.rs`; moto does not check it), here from the
/// embedded store.
#[tokio::test]
async fn the_local_store_refuses_a_tag_and_digest_that_disagree() {
    let backend = Backend::start(Kind::Local).await;
    let repository = backend.repository("mismatch", false).await;
    let mut client = backend.client.clone();
    backend.put(&repository, "v1", SEED).await;
    let status = client
        .get_image(get(&repository, "v1", SEED_DOC_FORM_DIGEST))
        .await
        .unwrap_err();
    assert_status(&status, Code::InvalidArgument, "TAG_DIGEST_MISMATCH");
    let both = fetch(&mut client, get(&repository, "v1", SEED_DIGEST)).await;
    assert_eq!(both.image_manifest, SEED);
}

/// ECR's BatchDeleteImage by tag: the tag goes and the image stays while another tag holds it;
/// deleting its last tag deletes the image (and the cache forgets it).
async fn deleting_a_tag_keeps_the_image_until_its_last_tag_goes(backend: Backend) {
    let repository = backend.repository("delete-tags", false).await;
    backend.put(&repository, "v1", SEED).await;
    backend.put(&repository, "v2", SEED).await;
    let mut client = backend.client.clone();
    fetch(&mut client, get(&repository, "", SEED_DIGEST)).await;

    let answer = client
        .batch_delete_image(delete(&repository, &[("v1", "")]))
        .await
        .unwrap()
        .into_inner();
    assert!(answer.failures.is_empty(), "{:?}", answer.failures);
    assert_eq!(answer.image_ids.len(), 1);
    assert_eq!(answer.image_ids[0].image_tag, "v1");
    let status = client
        .get_image(get(&repository, "v1", ""))
        .await
        .unwrap_err();
    assert_status(&status, Code::NotFound, "IMAGE_NOT_FOUND");
    let kept = fetch(&mut client, get(&repository, "", SEED_DIGEST)).await;
    assert_eq!(kept.image_manifest, SEED, "v2 still holds the image");

    client
        .batch_delete_image(delete(&repository, &[("v2", "")]))
        .await
        .unwrap();
    for (tag, digest) in [("v2", ""), ("", SEED_DIGEST)] {
        let status = client
            .get_image(get(&repository, tag, digest))
            .await
            .unwrap_err();
        assert_status(&status, Code::NotFound, "IMAGE_NOT_FOUND");
    }
}

/// A digest deleted is NOT_FOUND at once, by digest and by each tag it had, though both were
/// cached a moment before; deleting it again is a per-id `ImageNotFound` failure, not an error.
async fn a_deleted_digest_is_not_found_at_once_even_when_cached(backend: Backend) {
    let repository = backend.repository("delete-digest", false).await;
    backend.put(&repository, "v1", SEED).await;
    let mut client = backend.client.clone();
    for _ in 0..2 {
        fetch(&mut client, get(&repository, "", SEED_DIGEST)).await;
        fetch(&mut client, get(&repository, "v1", "")).await;
    }
    let answer = client
        .batch_delete_image(delete(&repository, &[("", SEED_DIGEST)]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(answer.image_ids.len(), 1, "{answer:?}");
    assert_eq!(answer.image_ids[0].image_digest, SEED_DIGEST);
    for (tag, digest) in [("", SEED_DIGEST), ("v1", "")] {
        let status = client
            .get_image(get(&repository, tag, digest))
            .await
            .unwrap_err();
        assert_status(&status, Code::NotFound, "IMAGE_NOT_FOUND");
    }
    let again = client
        .batch_delete_image(delete(&repository, &[("", SEED_DIGEST)]))
        .await
        .unwrap()
        .into_inner();
    assert!(again.image_ids.is_empty());
    assert_eq!(again.failures.len(), 1);
    assert_eq!(again.failures[0].failure_code, "ImageNotFound");
    assert_eq!(
        again.failures[0].image_id.as_ref().unwrap().image_digest,
        SEED_DIGEST
    );
}

/// WatchTag on either backend: the current state first, then a put through the service at
/// once (`source: WRITE`), without waiting for a poll.
async fn a_watcher_sees_the_current_state_then_this_replicas_writes(backend: Backend) {
    let repository = backend.repository("watch", false).await;
    backend.put(&repository, "live", SEED).await;
    let mut stream =
        crate::support::requests::open_watch(&backend.client, &repository, "live").await;
    let first = next_state(&mut stream).await;
    assert_eq!(first.image_id.unwrap().image_digest, SEED_DIGEST);
    let moved = r#"{"mediaType":"application/vnd.oci.image.manifest.v1+json","moved":true}"#;
    backend.put(&repository, "live", moved).await;
    let state = next_state(&mut stream).await;
    assert_eq!(state.source(), ecr_image_service::pb::TagStateSource::Write);
    assert_eq!(state.image_id.unwrap().image_digest, digest_of(moved));
}

/// The next state of a watch stream, heartbeats skipped, within 5 s.
async fn next_state(
    stream: &mut tonic::Streaming<ecr_image_service::pb::WatchTagResponse>,
) -> ecr_image_service::pb::TagState {
    use ecr_image_service::pb::watch_tag_response::Event;
    loop {
        let message = tokio::time::timeout(std::time::Duration::from_secs(5), stream.message())
            .await
            .expect("a message within 5 s")
            .unwrap()
            .unwrap();
        if let Some(Event::State(state)) = message.event {
            return state;
        }
    }
}

//! BatchDeleteImage beyond the conformance scenarios: how a large request is split for ECR,
//! index-before-children ordering, and its request bounds.

use std::sync::Arc;

use ecr_image_service::registry::cached::{CacheSettings, CachedRegistry};
use ecr_image_service::registry::local::LocalRegistry;
use sha2::{Digest as _, Sha256};
use tonic::Code;

use crate::support::backend::{ScratchDir, local_settings};
use crate::support::requests::{delete, get, put};
use crate::support::{
    assert_status, cached, create_repository, moto, start, unique, violated_fields,
};

fn digest_of(text: &str) -> String {
    format!("sha256:{:x}", Sha256::digest(text.as_bytes()))
}

fn manifest(n: usize) -> String {
    format!(r#"{{"mediaType":"application/vnd.oci.image.manifest.v1+json","n":{n}}}"#)
}

/// 250 ids are three ECR calls (100, 100, 50), and all 250 images are gone after. (Each image
/// is tagged: deleting an untagged image by digest, the emulator reports nothing deleted,
/// where ECR reports its digest; tagged, both report it.)
#[tokio::test]
async fn a_250_id_delete_is_three_ecr_calls() {
    let repository = unique("delete-250");
    create_repository(moto::endpoint(), &repository, false).await;
    let (stack, calls) = cached(moto::endpoint());
    let mut client = start(stack).await;
    let manifests: Vec<String> = (0..250).map(manifest).collect();
    for (n, text) in manifests.iter().enumerate() {
        let tag = format!("t{n}");
        client
            .put_image(put(&repository, &tag, text))
            .await
            .unwrap();
    }
    let digests: Vec<String> = manifests.iter().map(|m| digest_of(m)).collect();
    let ids: Vec<(&str, &str)> = digests.iter().map(|d| ("", d.as_str())).collect();
    let before = calls.calls("BatchDeleteImage");
    let answer = client
        .batch_delete_image(delete(&repository, &ids))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(calls.calls("BatchDeleteImage") - before, 3);
    assert_eq!(answer.image_ids.len(), 250, "{:?}", answer.failures);
    let status = client
        .get_image(get(&repository, "", &digests[249]))
        .await
        .unwrap_err();
    assert_status(&status, Code::NotFound, "IMAGE_NOT_FOUND");
}

/// A child an index still refers to is not deleted (`ImageReferencedByManifestList`, per id,
/// never retried); asked together, the index this replica knows goes first, then the child.
/// On the embedded store: the emulator does not check references.
#[tokio::test]
async fn an_index_goes_before_its_children_and_a_referenced_child_stays() {
    let dir = ScratchDir::new("delete-index");
    let store = LocalRegistry::open(&local_settings(&dir.0)).unwrap();
    let mut client = start(CachedRegistry::new(
        Arc::new(store),
        CacheSettings::default(),
    ))
    .await;
    let repository = "team/app";
    let child = manifest(1);
    let child_digest = digest_of(&child);
    let index = format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[{{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"{child_digest}","size":{},"platform":{{"os":"linux","architecture":"amd64"}}}}]}}"#,
        child.len()
    );
    let index_digest = digest_of(&index);
    client.put_image(put(repository, "", &child)).await.unwrap();
    client
        .put_image(put(repository, "v1", &index))
        .await
        .unwrap();

    let refused = client
        .batch_delete_image(delete(repository, &[("", &child_digest)]))
        .await
        .unwrap()
        .into_inner();
    assert!(refused.image_ids.is_empty());
    assert_eq!(
        refused.failures[0].failure_code,
        "ImageReferencedByManifestList"
    );

    // Child first in the request; the index is deleted first all the same.
    let both = client
        .batch_delete_image(delete(
            repository,
            &[("", &child_digest), ("", &index_digest)],
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(both.failures.is_empty(), "{:?}", both.failures);
    assert_eq!(both.image_ids.len(), 2);
}

#[tokio::test]
async fn delete_requests_are_bounded_and_checked() {
    let (stack, _) = cached(moto::endpoint());
    let mut client = start(stack).await;
    let digest = digest_of("x");
    let too_many: Vec<(&str, &str)> = (0..1001).map(|_| ("", digest.as_str())).collect();
    let status = client
        .batch_delete_image(delete("some-repo", &too_many))
        .await
        .unwrap_err();
    assert_status(&status, Code::InvalidArgument, "INVALID_FIELD");
    assert_eq!(violated_fields(&status), ["image_ids"]);
    let status = client
        .batch_delete_image(delete("some-repo", &[("", ""), ("bad tag", "")]))
        .await
        .unwrap_err();
    assert_eq!(
        violated_fields(&status),
        ["image_ids[0]", "image_ids[1].image_tag"]
    );
    let status = client
        .batch_delete_image(delete("some-repo", &[]))
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&status), ["image_ids"]);
}

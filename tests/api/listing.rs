//! ListImages and DescribeImages: what each backend lists, and AIP-158 paging with signed
//! tokens. The emulator does not page (it answers everything at once), so paging over the ECR
//! backend is exercised against recorded ECR pages, and over the embedded store for real.

use std::collections::HashSet;
use std::sync::Arc;

use ecr_image_service::pb::image_service_client::ImageServiceClient;
use ecr_image_service::pb::{
    DescribeImagesRequest, ImageIdentifier, ListImagesFilter, ListImagesRequest, TagStatus,
};
use ecr_image_service::registry::cached::{CacheSettings, CachedRegistry};
use ecr_image_service::registry::local::LocalRegistry;
use serde_json::json;
use sha2::{Digest as _, Sha256};
use tonic::Code;
use tonic::transport::Channel;

use crate::on_both_backends;
use crate::support::backend::{Backend, ScratchDir, local_settings};
use crate::support::recorded::Reply;
use crate::support::requests::put;
use crate::support::{SEED, SEED_DIGEST, assert_status, start, start_on_recorded, violated_fields};

on_both_backends!(
    listings_follow_the_tag_filter,
    describe_reports_tags_sizes_and_types
);

fn digest_of(text: &str) -> String {
    format!("sha256:{:x}", Sha256::digest(text.as_bytes()))
}

fn manifest(n: usize) -> String {
    format!(r#"{{"mediaType":"application/vnd.oci.image.manifest.v1+json","n":{n}}}"#)
}

fn list(repository: &str, status: TagStatus, page_size: i32, token: &str) -> ListImagesRequest {
    ListImagesRequest {
        repository_name: repository.into(),
        filter: Some(ListImagesFilter {
            tag_status: status.into(),
        }),
        page_size,
        page_token: token.into(),
        ..Default::default()
    }
}

/// Two tags on one image and an untagged one: ANY lists three ids (one per tag, the digest
/// alone for the untagged), TAGGED two, UNTAGGED one.
async fn listings_follow_the_tag_filter(backend: Backend) {
    let repository = backend.repository("listing", false).await;
    backend.put(&repository, "v1", SEED).await;
    backend.put(&repository, "v2", SEED).await;
    let untagged = manifest(1);
    backend.put(&repository, "", &untagged).await;
    let mut client = backend.client.clone();
    let ids = |answer: ecr_image_service::pb::ListImagesResponse| {
        let mut ids: Vec<(String, String)> = answer
            .image_ids
            .into_iter()
            .map(|id| (id.image_digest, id.image_tag))
            .collect();
        ids.sort();
        ids
    };
    let all = client
        .list_images(list(&repository, TagStatus::Any, 0, ""))
        .await
        .unwrap()
        .into_inner();
    assert!(all.next_page_token.is_empty());
    let mut expected = vec![
        (SEED_DIGEST.to_owned(), "v1".to_owned()),
        (SEED_DIGEST.to_owned(), "v2".to_owned()),
        (digest_of(&untagged), String::new()),
    ];
    expected.sort();
    assert_eq!(ids(all), expected);
    let tagged = client
        .list_images(list(&repository, TagStatus::Tagged, 0, ""))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(tagged.image_ids.len(), 2);
    let untagged_ids = client
        .list_images(list(&repository, TagStatus::Untagged, 0, ""))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ids(untagged_ids), [(digest_of(&untagged), String::new())]);
}

async fn describe_reports_tags_sizes_and_types(backend: Backend) {
    let repository = backend.repository("describe", false).await;
    backend.put(&repository, "v1", SEED).await;
    backend.put(&repository, "v2", SEED).await;
    let answer = backend
        .client
        .clone()
        .describe_images(DescribeImagesRequest {
            repository_name: repository.clone(),
            image_ids: vec![ImageIdentifier {
                image_tag: "v1".into(),
                image_digest: String::new(),
            }],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let detail = &answer.image_details[0];
    assert_eq!(detail.image_digest, SEED_DIGEST);
    let mut tags = detail.image_tags.clone();
    tags.sort();
    assert_eq!(tags, ["v1", "v2"]);
    assert_eq!(
        detail.image_manifest_media_type,
        "application/vnd.docker.distribution.manifest.v2+json"
    );
    assert!(detail.image_size_in_bytes > 0);
    let status = backend
        .client
        .clone()
        .describe_images(DescribeImagesRequest {
            repository_name: repository,
            image_ids: vec![ImageIdentifier {
                image_tag: "missing".into(),
                image_digest: String::new(),
            }],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_status(&status, Code::NotFound, "IMAGE_NOT_FOUND");
}

/// Walks every page of `repository`'s listing; each page's ids.
async fn walk(
    client: &mut ImageServiceClient<Channel>,
    repository: &str,
    size: i32,
) -> Vec<Vec<String>> {
    let mut pages = Vec::new();
    let mut token = String::new();
    loop {
        let page = client
            .list_images(list(repository, TagStatus::Any, size, &token))
            .await
            .unwrap()
            .into_inner();
        pages.push(page.image_ids.into_iter().map(|id| id.image_tag).collect());
        if page.next_page_token.is_empty() {
            return pages;
        }
        token = page.next_page_token;
    }
}

/// 250 tags on the embedded store, pages of 100: three pages, every tag exactly once; a
/// tampered token and a token used for another repository are INVALID_ARGUMENT.
#[tokio::test]
async fn pages_of_100_walk_250_tags_once_each_and_tokens_are_bound() {
    let dir = ScratchDir::new("listing-pages");
    let store = LocalRegistry::open(&local_settings(&dir.0)).unwrap();
    let mut client = start(CachedRegistry::new(
        Arc::new(store),
        CacheSettings::default(),
    ))
    .await;
    for n in 0..250 {
        client
            .put_image(put("paged", &format!("t{n:03}"), &manifest(n)))
            .await
            .unwrap();
    }
    client.put_image(put("other", "x", SEED)).await.unwrap();
    let pages = walk(&mut client, "paged", 100).await;
    assert_eq!(
        pages.iter().map(Vec::len).collect::<Vec<_>>(),
        [100, 100, 50]
    );
    let seen: HashSet<&String> = pages.iter().flatten().collect();
    assert_eq!(seen.len(), 250, "every tag exactly once");

    let first = client
        .list_images(list("paged", TagStatus::Any, 100, ""))
        .await
        .unwrap()
        .into_inner();
    let token = first.next_page_token;
    let mut tampered = token.clone().into_bytes();
    tampered[5] = if tampered[5] == b'A' { b'B' } else { b'A' };
    let tampered = String::from_utf8(tampered).unwrap();
    for (what, request) in [
        ("tampered", list("paged", TagStatus::Any, 100, &tampered)),
        (
            "another repository",
            list("other", TagStatus::Any, 100, &token),
        ),
        (
            "another filter",
            list("paged", TagStatus::Tagged, 100, &token),
        ),
    ] {
        let status = client.list_images(request).await.unwrap_err();
        assert_status(&status, Code::InvalidArgument, "INVALID_FIELD");
        assert_eq!(violated_fields(&status), ["page_token"], "{what}");
    }
    let status = client
        .list_images(list("paged", TagStatus::Any, -1, ""))
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&status), ["page_size"]);
    // Above 1,000 is taken as 1,000: one page holds all 250.
    assert_eq!(walk(&mut client, "paged", 5000).await.len(), 1);
}

/// Over the ECR backend, ECR's own `nextToken` travels inside the signed page token: three
/// recorded pages (100, 100, 50), walked through the service, ask ECR with `maxResults` 100
/// and the tokens ECR gave, and yield every id once.
#[tokio::test]
async fn ecr_pages_are_followed_with_ecrs_own_tokens() {
    let page = |from: usize, to: usize, next: Option<&str>| {
        let ids: Vec<_> = (from..to)
            .map(
                |n| json!({"imageDigest": digest_of(&manifest(n)), "imageTag": format!("t{n:03}")}),
            )
            .collect();
        let mut body = json!({ "imageIds": ids });
        if let Some(next) = next {
            body["nextToken"] = json!(next);
        }
        ("ListImages", Reply::ok(body))
    };
    let (ecr, mut client) = start_on_recorded(vec![
        page(0, 100, Some("ecr-token-1")),
        page(100, 200, Some("ecr-token-2")),
        page(200, 250, None),
    ])
    .await;
    let pages = walk(&mut client, "hello-world", 100).await;
    assert_eq!(
        pages.iter().map(Vec::len).collect::<Vec<_>>(),
        [100, 100, 50]
    );
    let seen: HashSet<&String> = pages.iter().flatten().collect();
    assert_eq!(seen.len(), 250);
    let asked: Vec<_> = ecr
        .received()
        .into_iter()
        .filter(|r| r.operation == "ListImages")
        .map(|r| (r.body["maxResults"].clone(), r.body["nextToken"].clone()))
        .collect();
    assert_eq!(
        asked,
        [
            (json!(100), serde_json::Value::Null),
            (json!(100), json!("ecr-token-1")),
            (json!(100), json!("ecr-token-2")),
        ]
    );
}

//! The cache through the real server and the real SDK: hot reads never reach ECR, concurrent
//! misses coalesce and batch, puts write through, and bad bytes never enter the cache.

use std::time::Duration;

use ecr_image_service::image::media_types;
use ecr_image_service::pb::{CacheStatus, ImageIdentifier, ResolveImageRequest};
use ecr_image_service::registry::ecr::calls::outcome;
use serde_json::json;
use tonic::Code;

use crate::support::recorded::{RecordedEcr, Reply};
use crate::support::requests::{fetch, get, put};
use crate::support::{
    MOTO_ACCOUNT, SEED, SEED_DIGEST, SEED_DOC_FORM, assert_status, cached, create_repository, moto,
    start, unique,
};

fn batch_reply(manifest: &str, digest: &str) -> Reply {
    Reply::ok(json!({
        "images": [{
            "registryId": MOTO_ACCOUNT,
            "repositoryName": "hello-world",
            "imageId": {"imageDigest": digest, "imageTag": "2019.08"},
            "imageManifest": manifest,
            "imageManifestMediaType": media_types::DOCKER_MANIFEST_V2,
        }],
        "failures": [],
    }))
}

/// After one miss, reads by tag and by digest are hits and ECR sees no further call; a fresh
/// read (max_staleness 0) goes to ECR again.
#[tokio::test]
async fn hot_reads_never_touch_ecr() {
    let ecr = RecordedEcr::start(vec![("BatchGetImage", batch_reply(SEED, SEED_DIGEST))]).await;
    let (registry, calls) = cached(&ecr.endpoint);
    let mut client = start(registry).await;

    let first = client
        .get_image(get("hello-world", "2019.08", ""))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first.cache_status(), CacheStatus::Miss);
    for _ in 0..20 {
        let hit = client
            .get_image(get("hello-world", "2019.08", ""))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(hit.cache_status(), CacheStatus::Hit);
        assert!(hit.tag_resolution_age.is_some());
        assert_eq!(hit.image.unwrap().image_manifest, SEED);
        let by_digest = client
            .get_image(get("hello-world", "", SEED_DIGEST))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(by_digest.cache_status(), CacheStatus::Hit);
        assert_eq!(
            by_digest.tag_resolution_age, None,
            "a digest needs no resolution"
        );
    }
    assert_eq!(calls.calls("BatchGetImage"), 1);
    assert_eq!(ecr.count("BatchGetImage"), 1);

    let mut fresh = get("hello-world", "2019.08", "");
    fresh.max_staleness = Some(prost_types::Duration::default());
    let fresh = client.get_image(fresh).await.unwrap().into_inner();
    assert_eq!(fresh.cache_status(), CacheStatus::Miss);
    assert_eq!(calls.calls("BatchGetImage"), 2);
    assert_eq!(calls.attempts("BatchGetImage", outcome::OK), 2);
}

/// ResolveImage answers digest, media type and size from the same caches.
#[tokio::test]
async fn resolve_image_is_served_from_the_cache() {
    let ecr = RecordedEcr::start(vec![("BatchGetImage", batch_reply(SEED, SEED_DIGEST))]).await;
    let (registry, calls) = cached(&ecr.endpoint);
    let mut client = start(registry).await;
    let resolve = || ResolveImageRequest {
        repository_name: "hello-world".into(),
        image_id: Some(ImageIdentifier {
            image_tag: "2019.08".into(),
            image_digest: String::new(),
        }),
        ..Default::default()
    };
    let first = client.resolve_image(resolve()).await.unwrap().into_inner();
    assert_eq!(first.cache_status(), CacheStatus::Miss);
    assert_eq!(first.image_id.unwrap().image_digest, SEED_DIGEST);
    assert_eq!(first.image_manifest_size, 2461);
    assert_eq!(
        first.image_manifest_media_type,
        media_types::DOCKER_MANIFEST_V2
    );
    assert_eq!(first.registry_id, MOTO_ACCOUNT);
    let second = client.resolve_image(resolve()).await.unwrap().into_inner();
    assert_eq!(second.cache_status(), CacheStatus::Hit);
    assert_eq!(calls.calls("BatchGetImage"), 1);

    let status = client
        .resolve_image(ResolveImageRequest {
            repository_name: "hello-world".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_status(&status, Code::InvalidArgument, "INVALID_FIELD");
}

/// Neither bytes that fail verification (DATA_LOSS) nor errors enter the cache: the next read
/// asks ECR again, and only the good bytes it then returns are served from the cache.
#[tokio::test]
async fn failures_never_enter_the_cache() {
    let cases = [
        (
            batch_reply(SEED_DOC_FORM, SEED_DIGEST),
            Code::DataLoss,
            "DIGEST_VERIFICATION_FAILED",
        ),
        (
            Reply::error(400, "RepositoryNotFoundException", "not yet"),
            Code::NotFound,
            "REPOSITORY_NOT_FOUND",
        ),
    ];
    for (first, code, reason) in cases {
        let ecr = RecordedEcr::start(vec![
            ("BatchGetImage", first),
            ("BatchGetImage", batch_reply(SEED, SEED_DIGEST)),
        ])
        .await;
        let (registry, calls) = cached(&ecr.endpoint);
        let mut client = start(registry).await;
        let status = client
            .get_image(get("hello-world", "2019.08", ""))
            .await
            .unwrap_err();
        assert_status(&status, code, reason);
        let good = client
            .get_image(get("hello-world", "2019.08", ""))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(good.cache_status(), CacheStatus::Miss, "{reason}");
        assert_eq!(good.image.unwrap().image_manifest, SEED);
        let hit = client
            .get_image(get("hello-world", "", SEED_DIGEST))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(hit.cache_status(), CacheStatus::Hit);
        assert_eq!(hit.image.unwrap().image_manifest, SEED);
        assert_eq!(calls.calls("BatchGetImage"), 2, "{reason}");
    }
}

/// 200 concurrent reads of one uncached tag: one BatchGetImage, every caller answered.
#[tokio::test]
async fn a_herd_on_one_tag_makes_one_call() {
    let ecr = RecordedEcr::start(vec![(
        "BatchGetImage",
        batch_reply(SEED, SEED_DIGEST).after(Duration::from_millis(300)),
    )])
    .await;
    let (registry, calls) = cached(&ecr.endpoint);
    let client = start(registry).await;
    let readers: Vec<_> = (0..200)
        .map(|_| {
            let mut client = client.clone();
            tokio::spawn(async move { client.get_image(get("hello-world", "2019.08", "")).await })
        })
        .collect();
    for reader in readers {
        let image = reader.await.unwrap().unwrap().into_inner().image.unwrap();
        assert_eq!(image.image_manifest, SEED);
    }
    assert_eq!(calls.calls("BatchGetImage"), 1);
}

/// Against the emulator: puts write through (no read reaches ECR), and a fresh service's
/// concurrent misses for 120 distinct tags are batched into a few calls of at most 100 ids,
/// each caller getting its own image.
#[tokio::test]
async fn puts_write_through_and_misses_batch() {
    let endpoint = moto::endpoint();
    let repository = unique("batching");
    create_repository(endpoint, &repository, false).await;
    let manifests: Vec<String> = (0..120)
        .map(|n| format!(r#"{{"mediaType":"{}","n":{n}}}"#, media_types::OCI_MANIFEST))
        .collect();

    let (writer, writer_calls) = cached(endpoint);
    let mut writer = start(writer).await;
    for (n, manifest) in manifests.iter().enumerate() {
        writer
            .put_image(put(&repository, &format!("t{n}"), manifest))
            .await
            .unwrap();
    }
    for n in [0, 57, 119] {
        let read = writer
            .get_image(get(&repository, &format!("t{n}"), ""))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(read.cache_status(), CacheStatus::Hit);
    }
    assert_eq!(writer_calls.calls("BatchGetImage"), 0);

    let (reader, reader_calls) = cached(endpoint);
    let reader = start(reader).await;
    let readers: Vec<_> = (0..120)
        .map(|n| {
            let mut client = reader.clone();
            let repository = repository.clone();
            tokio::spawn(async move {
                (
                    n,
                    client
                        .get_image(get(&repository, &format!("t{n}"), ""))
                        .await,
                )
            })
        })
        .collect();
    for reader in readers {
        let (n, result) = reader.await.unwrap();
        let image = result.unwrap().into_inner().image.unwrap();
        assert_eq!(
            image.image_manifest, manifests[n],
            "t{n} gets its own image"
        );
        assert_eq!(image.image_id.unwrap().image_tag, format!("t{n}"));
    }
    let calls = reader_calls.calls("BatchGetImage");
    assert!(
        (2..=10).contains(&calls),
        "{calls} BatchGetImage calls for 120 concurrent misses"
    );
    // Retagging in the same batch: two tags of one image resolve to the same digest.
    writer
        .put_image(put(&repository, "alias", &manifests[0]))
        .await
        .unwrap();
    let mut fresh = get(&repository, "alias", "");
    fresh.max_staleness = Some(prost_types::Duration::default());
    let alias = fetch(&mut reader.clone(), fresh).await;
    assert_eq!(alias.image_manifest, manifests[0]);
    let _ = SEED;
}

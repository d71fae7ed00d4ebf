//! Which registry a request is for (issue 20, finding 6 and the cache-key part of finding 5):
//! the service's own account named explicitly is the same registry as none, and any other is
//! refused before authorization and before any AWS call.

use ecr_image_service::pb::{BatchDeleteImageRequest, CacheStatus, ImageIdentifier};
use tonic::Code;

use crate::support::requests::{fetch, get, put};
use crate::support::{
    MOTO_ACCOUNT, SEED, SEED_DIGEST, assert_status, cached, create_repository, error_info, moto,
    start, unique,
};

/// A registry that is not the service's own: FAILED_PRECONDITION `REGISTRY_NOT_CONFIGURED` with
/// `metadata.registryId`, for reads and writes alike, and ECR sees nothing.
#[tokio::test]
async fn another_account_is_refused_before_any_aws_call() {
    let (registry, calls) = cached(moto::endpoint());
    let mut client = start(registry).await;
    let repository = unique("routing");
    let mut read = get(&repository, "v1", "");
    read.registry_id = "999999999999".into();
    let status = client.get_image(read).await.unwrap_err();
    assert_status(&status, Code::FailedPrecondition, "REGISTRY_NOT_CONFIGURED");
    assert_eq!(error_info(&status).metadata["registryId"], "999999999999");
    let mut write = put(&repository, "v1", SEED);
    write.registry_id = "999999999999".into();
    let status = client.put_image(write).await.unwrap_err();
    assert_status(&status, Code::FailedPrecondition, "REGISTRY_NOT_CONFIGURED");
    for operation in ["BatchGetImage", "PutImage"] {
        assert_eq!(calls.calls(operation), 0, "{operation} reached ECR");
    }
}

/// The own account's id and an empty `registry_id` are one repository: an image put without
/// one is a cache hit with one, and a digest deleted with the explicit id is gone for reads
/// without it (it used to stay a HIT there, indefinitely).
#[tokio::test]
async fn the_own_account_and_no_account_are_one_registry() {
    let repository = unique("own");
    create_repository(moto::endpoint(), &repository, false).await;
    let (registry, _calls) = cached(moto::endpoint());
    let mut client = start(registry).await;
    client
        .put_image(put(&repository, "v1", SEED))
        .await
        .unwrap();
    let mut explicit = get(&repository, "", SEED_DIGEST);
    explicit.registry_id = MOTO_ACCOUNT.into();
    let answer = client.get_image(explicit).await.unwrap().into_inner();
    assert_eq!(
        answer.cache_status(),
        CacheStatus::Hit,
        "the same cache entry"
    );
    let image = fetch(&mut client, get(&repository, "", SEED_DIGEST)).await;
    assert_eq!(image.image_manifest, SEED);

    let deleted = client
        .batch_delete_image(BatchDeleteImageRequest {
            registry_id: MOTO_ACCOUNT.into(),
            region: String::new(),
            repository_name: repository.clone(),
            image_ids: vec![ImageIdentifier {
                image_digest: SEED_DIGEST.into(),
                image_tag: String::new(),
            }],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(deleted.image_ids.len(), 1, "{deleted:?}");
    let status = client
        .get_image(get(&repository, "", SEED_DIGEST))
        .await
        .unwrap_err();
    assert_status(&status, Code::NotFound, "IMAGE_NOT_FOUND");
}

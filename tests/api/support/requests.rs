//! Request builders shared by every test: the common shapes of PutImage and GetImage.

use ecr_image_service::pb::image_service_client::ImageServiceClient;
use ecr_image_service::pb::{
    BatchDeleteImageRequest, GetImageRequest, Image, ImageIdentifier, PutImageRequest,
};
use tonic::transport::Channel;

/// PutImage of `manifest` as `repository:tag` (an empty tag puts it untagged).
pub fn put(repository: &str, tag: &str, manifest: &str) -> PutImageRequest {
    PutImageRequest {
        repository_name: repository.into(),
        image_tag: tag.into(),
        image_manifest: manifest.into(),
        ..Default::default()
    }
}

/// GetImage by tag, digest or both (empty strings are "not given").
pub fn get(repository: &str, tag: &str, digest: &str) -> GetImageRequest {
    GetImageRequest {
        repository_name: repository.into(),
        image_id: Some(ImageIdentifier {
            image_tag: tag.into(),
            image_digest: digest.into(),
        }),
        ..Default::default()
    }
}

/// Gets an image that must exist.
pub async fn fetch(client: &mut ImageServiceClient<Channel>, request: GetImageRequest) -> Image {
    client
        .get_image(request)
        .await
        .unwrap_or_else(|status| panic!("get failed: {status:?}"))
        .into_inner()
        .image
        .expect("a GetImage answer carries the image")
}

/// BatchDeleteImage of `ids`, each `(tag, digest)` (empty strings are "not given").
pub fn delete(repository: &str, ids: &[(&str, &str)]) -> BatchDeleteImageRequest {
    BatchDeleteImageRequest {
        repository_name: repository.into(),
        image_ids: ids
            .iter()
            .map(|(tag, digest)| ImageIdentifier {
                image_tag: (*tag).into(),
                image_digest: (*digest).into(),
            })
            .collect(),
        ..Default::default()
    }
}

/// A WatchTag stream of `repository:tag`, opened (nothing read yet).
pub async fn open_watch(
    client: &ImageServiceClient<Channel>,
    repository: &str,
    tag: &str,
) -> tonic::Streaming<ecr_image_service::pb::WatchTagResponse> {
    client
        .clone()
        .watch_tag(ecr_image_service::pb::WatchTagRequest {
            repository_name: repository.into(),
            image_tag: tag.into(),
            ..Default::default()
        })
        .await
        .unwrap_or_else(|status| panic!("watch failed: {status:?}"))
        .into_inner()
}

/// `message` from `caller`, as Istio's sidecar names it in `x-forwarded-client-cert`
/// (`spiffe://cluster.local/ns/{caller}/sa/{caller}`).
pub fn as_xfcc<T>(caller: &str, message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    let header = format!(
        "By=spiffe://cluster.local/ns/platform/sa/images;Hash=ab12;Subject=\"\";\
         URI=spiffe://cluster.local/ns/{caller}/sa/{caller}"
    );
    request
        .metadata_mut()
        .insert("x-forwarded-client-cert", header.parse().unwrap());
    request
}

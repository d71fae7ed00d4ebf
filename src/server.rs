//! The gRPC server: ImageService and gRPC health behind one listener.

use std::future::Future;

use tokio::net::TcpListener;
use tonic::transport::Server;
use tonic::transport::server::TcpIncoming;

use crate::image::MAX_MANIFEST_BYTES;
use crate::pb::image_service_server::ImageServiceServer;
use crate::registry::Registry;
use crate::service::ImageService;

/// The largest request accepted: a manifest at ECR's 4 MiB limit plus room for the other fields.
/// tonic's default (4 MiB for the whole message) would refuse a legal manifest before our
/// validation could say which field is too large.
pub const MAX_REQUEST_BYTES: usize = MAX_MANIFEST_BYTES + 64 * 1024;

/// Serves the API on `listener` until `shutdown` completes, then lets in-flight requests finish.
pub async fn serve<R: Registry>(
    listener: TcpListener,
    registry: R,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<ImageServiceServer<ImageService<R>>>()
        .await;
    let images = ImageServiceServer::new(ImageService::new(registry))
        .max_decoding_message_size(MAX_REQUEST_BYTES);
    Server::builder()
        .add_service(health_service)
        .add_service(images)
        .serve_with_incoming_shutdown(
            TcpIncoming::from(listener).with_nodelay(Some(true)),
            shutdown,
        )
        .await
}

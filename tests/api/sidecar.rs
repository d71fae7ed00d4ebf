//! Through a real HTTP/2 proxy, nginx `grpc_pass` standing in for a mesh sidecar: calls, rich
//! error details and deadlines reach the client exactly as the service sent them.

use std::time::{Duration, Instant};

use ecr_image_service::pb::PutImageOutcome;
use ecr_image_service::pb::image_service_client::ImageServiceClient;
use tonic::Code;
use tonic::transport::Channel;

use crate::support::nginx::Nginx;
use crate::support::recorded::{REQUEST_ID, RecordedEcr, Reply};
use crate::support::requests::{fetch, get, put};
use crate::support::{
    SEED, SEED_DIGEST, assert_status, create_repository, error_info, moto, registry,
    serve_on_loopback, server_settings, settings, unique, violated_fields,
};

/// The service on loopback, nginx in front of it, and a client of each.
struct Proxied {
    nginx: Nginx,
    direct: ImageServiceClient<Channel>,
    proxied: ImageServiceClient<Channel>,
}

async fn behind_nginx(ecr_endpoint: &str) -> Proxied {
    let upstream = serve_on_loopback(registry(ecr_endpoint, settings()), server_settings()).await;
    let nginx = Nginx::start(upstream);
    let direct = ImageServiceClient::connect(format!("http://{upstream}"))
        .await
        .unwrap();
    let proxied = ImageServiceClient::connect(nginx.url()).await.unwrap();
    Proxied {
        nginx,
        direct,
        proxied,
    }
}

/// The seed put and gets through the proxy: same outcome, digest and exact bytes.
#[tokio::test]
async fn calls_pass_through_the_proxy_unchanged() {
    let moto = moto::endpoint();
    let repository = unique("sidecar");
    create_repository(moto, &repository, false).await;
    let Proxied {
        nginx,
        mut direct,
        mut proxied,
    } = behind_nginx(moto).await;

    let put_response = proxied
        .put_image(put(&repository, "2019.08", SEED))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(put_response.outcome(), PutImageOutcome::Created);
    let through = fetch(&mut proxied, get(&repository, "2019.08", "")).await;
    let around = fetch(&mut direct, get(&repository, "", SEED_DIGEST)).await;
    assert_eq!(
        through.image_manifest, SEED,
        "exact bytes through the proxy"
    );
    assert_eq!(through.image_manifest, around.image_manifest);
    assert_eq!(through.image_id.unwrap().image_digest, SEED_DIGEST);
    assert!(
        nginx.requests_logged() >= 2,
        "the calls went through nginx: {}",
        nginx.error_log()
    );
}

/// Refusals keep their code, message and every detail (ErrorInfo, BadRequest) byte for byte.
#[tokio::test]
async fn rich_error_details_pass_through_the_proxy() {
    let ecr = RecordedEcr::start(vec![(
        "BatchGetImage",
        Reply::ok(serde_json::json!({
            "images": [],
            "failures": [{"imageId": {"imageTag": "gone"}, "failureCode": "ImageNotFound",
                          "failureReason": "Requested image not found"}],
        })),
    )])
    .await;
    // Bound, not `..`: nginx must outlive the calls.
    let Proxied {
        nginx: _nginx,
        mut direct,
        mut proxied,
    } = behind_nginx(&ecr.endpoint).await;

    let invalid = || get("Not A Repository!", "", "sha256:short");
    let through = proxied.get_image(invalid()).await.unwrap_err();
    let around = direct.get_image(invalid()).await.unwrap_err();
    assert_status(&through, Code::InvalidArgument, "INVALID_FIELD");
    assert_eq!(
        violated_fields(&through),
        ["repository_name", "image_id.image_digest"]
    );
    assert_eq!(through.message(), around.message());
    assert_eq!(through.details(), around.details(), "details byte for byte");

    let missing = || get("hello-world", "gone", "");
    let through = proxied.get_image(missing()).await.unwrap_err();
    let around = direct.get_image(missing()).await.unwrap_err();
    assert_status(&through, Code::NotFound, "IMAGE_NOT_FOUND");
    // Compared decoded: ErrorInfo's metadata is a map, encoded in no fixed order.
    let (through, around) = (error_info(&through), error_info(&around));
    assert_eq!(
        (&through.reason, &through.domain, &through.metadata),
        (&around.reason, &around.domain, &around.metadata)
    );
    assert_eq!(through.metadata["ecrRequestId"], REQUEST_ID);
}

/// The caller's deadline crosses the proxy: the service itself answers DEADLINE_EXCEEDED (with
/// its ErrorInfo) on time, instead of waiting for a slow ECR under its default deadline.
#[tokio::test]
async fn deadlines_pass_through_the_proxy() {
    let ecr = RecordedEcr::start(vec![(
        "BatchGetImage",
        Reply::ok(serde_json::json!({"images": [], "failures": []})).after(Duration::from_secs(5)),
    )])
    .await;
    let Proxied {
        nginx: _nginx,
        mut proxied,
        ..
    } = behind_nginx(&ecr.endpoint).await;
    let deadline = Duration::from_millis(500);
    let mut request = tonic::Request::new(get("hello-world", "slow", ""));
    request.set_timeout(deadline);
    let started = Instant::now();
    let status = proxied.get_image(request).await.unwrap_err();
    let took = started.elapsed();
    // The ErrorInfo is the service's: a deadline that never reached it would end in the
    // client's own DEADLINE_EXCEEDED, with no details, and the service would still be waiting.
    assert_status(&status, Code::DeadlineExceeded, "DEADLINE_EXCEEDED");
    assert!(took < Duration::from_secs(2), "took {took:?}");
}

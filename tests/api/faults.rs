//! Failure is normal: the service between a fault proxy and the emulator. It must neither lose
//! a write, nor report a landed write as failed, nor amplify load, nor outlive its caller's
//! deadline.

use std::time::Duration;

use ecr_image_service::pb::PutImageOutcome;
use ecr_image_service::pb::image_service_client::ImageServiceClient;
use ecr_image_service::server::ServerSettings;
use tokio::time::Instant;
use tonic::Code;
use tonic::transport::Channel;
use tonic_types::StatusExt;

use crate::support::fault_proxy::{Fault, FaultProxy};
use crate::support::recorded::{RecordedEcr, Reply};
use crate::support::requests::{get, put};
use crate::support::{
    SEED, SEED_DIGEST, admin, assert_status, create_repository, moto, registry, server_settings,
    settings, start, start_with, unique,
};

/// The images the emulator holds in `repository`, by digest.
async fn stored_digests(repository: &str) -> Vec<String> {
    let described = admin(moto::endpoint())
        .describe_images()
        .repository_name(repository)
        .send()
        .await
        .unwrap();
    described
        .image_details()
        .iter()
        .filter_map(|d| d.image_digest().map(str::to_owned))
        .collect()
}

/// A fresh repository on the emulator, the fault proxy in front of the emulator running
/// `plan`, and the service behind the proxy.
async fn behind_faults(
    prefix: &str,
    plan: impl Fn(&str, u32) -> Fault + Send + Sync + 'static,
) -> (String, FaultProxy, ImageServiceClient<Channel>) {
    let repository = repository_on_moto(prefix).await;
    let proxy = FaultProxy::start(moto::endpoint(), plan).await;
    let client = start(registry(&proxy.endpoint, settings())).await;
    (repository, proxy, client)
}

async fn repository_on_moto(prefix: &str) -> String {
    let repository = unique(prefix);
    create_repository(moto::endpoint(), &repository, false).await;
    repository
}

/// Transient failures the SDK retries: throttled twice, or a 500 and then a bare 503 (a load
/// balancer's answer, no ECR error code). The third attempt stores the image, once.
#[tokio::test]
async fn transient_failures_are_retried_and_store_one_image() {
    type Plan = Box<dyn Fn(&str, u32) -> Fault + Send + Sync>;
    let cases: [(&str, Plan, [Fault; 2]); 2] = [
        (
            "throttle-twice",
            Box::new(|op, attempt| match (op, attempt) {
                ("PutImage", 1 | 2) => Fault::Throttle,
                _ => Fault::Forward,
            }),
            [Fault::Throttle, Fault::Throttle],
        ),
        (
            "server-errors",
            Box::new(|op, attempt| match (op, attempt) {
                ("PutImage", 1) => Fault::ServerError,
                ("PutImage", 2) => Fault::Bare503,
                _ => Fault::Forward,
            }),
            [Fault::ServerError, Fault::Bare503],
        ),
    ];
    for (name, plan, faults) in cases {
        let (repository, proxy, mut client) = behind_faults(name, plan).await;
        let response = client
            .put_image(put(&repository, "v1", SEED))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(response.outcome(), PutImageOutcome::Created, "{name}");
        let attempts: Vec<(u32, Fault)> = proxy
            .seen()
            .iter()
            .filter(|s| s.operation == "PutImage")
            .map(|s| (s.attempt, s.fault))
            .collect();
        assert_eq!(
            attempts,
            [(1, faults[0]), (2, faults[1]), (3, Fault::Forward)],
            "{name}"
        );
        assert_eq!(stored_digests(&repository).await, [SEED_DIGEST], "{name}");
    }
}

/// The put reaches ECR and is applied, but the answer is lost: the SDK retries, ECR says the
/// image already exists, the service confirms the tag points at these bytes. The caller gets
/// success with the right digest, and the image exists once.
#[tokio::test]
async fn a_lost_answer_to_an_applied_put_is_success() {
    let (repository, proxy, mut client) =
        behind_faults("lost-answer", |op, attempt| match (op, attempt) {
            ("PutImage", 1) => Fault::ForwardThenDrop,
            _ => Fault::Forward,
        })
        .await;
    let response = client
        .put_image(put(&repository, "v1", SEED))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(response.outcome(), PutImageOutcome::AlreadyExisted);
    assert_eq!(
        response.image.unwrap().image_id.unwrap().image_digest,
        SEED_DIGEST
    );
    assert_eq!(proxy.count("PutImage"), 2);
    assert_eq!(stored_digests(&repository).await, [SEED_DIGEST]);
}

/// Throttled on every attempt: UNAVAILABLE with RetryInfo, well within the caller's deadline.
#[tokio::test]
async fn throttled_throughout_is_unavailable_within_the_deadline() {
    let (repository, proxy, mut client) = behind_faults("throttle-always", |op, _| match op {
        "PutImage" => Fault::Throttle,
        _ => Fault::Forward,
    })
    .await;
    let mut request = tonic::Request::new(put(&repository, "v1", SEED));
    let deadline = Duration::from_secs(5);
    request.set_timeout(deadline);
    let started = Instant::now();
    let status = client.put_image(request).await.unwrap_err();
    assert!(started.elapsed() < deadline, "took {:?}", started.elapsed());
    assert_status(&status, Code::Unavailable, "ECR_THROTTLED");
    assert!(status.get_details_retry_info().is_some());
    assert_eq!(proxy.count("PutImage"), 3);
    assert!(stored_digests(&repository).await.is_empty());
}

/// ECR slower than the caller's deadline: DEADLINE_EXCEEDED from the service (with its
/// ErrorInfo) within deadline + 100 ms, however long ECR would have taken.
#[tokio::test]
async fn a_slow_ecr_answers_deadline_exceeded_on_time() {
    let (repository, _proxy, mut client) = behind_faults("slow", |op, _| match op {
        "BatchGetImage" => Fault::Delay(Duration::from_secs(3)),
        _ => Fault::Forward,
    })
    .await;
    client
        .put_image(put(&repository, "v1", SEED))
        .await
        .unwrap();
    let deadline = Duration::from_millis(500);
    let mut request = tonic::Request::new(get(&repository, "v1", ""));
    request.set_timeout(deadline);
    let started = Instant::now();
    let status = client.get_image(request).await.unwrap_err();
    let took = started.elapsed();
    assert!(
        took < deadline + Duration::from_millis(100),
        "took {took:?}"
    );
    assert_status(&status, Code::DeadlineExceeded, "DEADLINE_EXCEEDED");
}

/// Past the concurrency limit, requests are shed at once with UNAVAILABLE and a RetryInfo,
/// and the ones admitted are served.
#[tokio::test]
async fn overload_is_shed_with_unavailable() {
    let ecr = RecordedEcr::start(vec![(
        "BatchGetImage",
        Reply::ok(serde_json::json!({
            "images": [{"imageId": {"imageDigest": SEED_DIGEST, "imageTag": "v1"}, "imageManifest": SEED}],
            "failures": [],
        }))
        .after(Duration::from_millis(500)),
    )])
    .await;
    let limited = ServerSettings {
        max_concurrent_requests: 2,
        ..server_settings()
    };
    let client = start_with(registry(&ecr.endpoint, settings()), limited).await;
    // One tag, the one the recording answers: the two admitted reads may share one call.
    let calls: Vec<_> = (0..10)
        .map(|_| {
            let mut client = client.clone();
            tokio::spawn(async move { client.get_image(get("hello-world", "v1", "")).await })
        })
        .collect();
    let (mut served, mut shed) = (0, 0);
    for call in calls {
        match call.await.unwrap() {
            Ok(_) => served += 1,
            Err(status) => {
                assert_status(&status, Code::Unavailable, "OVERLOADED");
                assert!(status.get_details_retry_info().is_some());
                shed += 1;
            }
        }
    }
    assert_eq!(served, 2);
    assert_eq!(shed, 8);
}

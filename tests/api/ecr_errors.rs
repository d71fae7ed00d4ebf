//! Every ECR error and failure the service maps, produced in ECR's wire format by recorded ECR
//! and read by the real `aws-sdk-ecr`: the emulator cannot produce most of them (throttling,
//! 5xx, immutable-tag and blob errors, failure entries, corrupted bytes).

use std::time::Duration;

use ecr_image_service::error::{METADATA_ECR_ERROR_CODE, METADATA_ECR_REQUEST_ID};
use ecr_image_service::image::media_types;
use ecr_image_service::pb::PutImageOutcome;
use ecr_image_service::registry::ecr::EcrSettings;
use serde_json::{Value, json};
use tonic::Code;
use tonic_types::StatusExt;

use crate::support::recorded::{REQUEST_ID, RecordedEcr, Reply};
use crate::support::requests::{get, put};
use crate::support::{
    MOTO_ACCOUNT, SEED, SEED_DIGEST, SEED_DOC_FORM, SEED_DOC_FORM_DIGEST, assert_status,
    error_info, registry, settings, start, start_on_recorded, violated_fields,
};

fn image_json(manifest: &str, digest: &str, media_type: Option<&str>) -> Value {
    let mut image = json!({
        "registryId": MOTO_ACCOUNT,
        "repositoryName": "hello-world",
        "imageId": {"imageDigest": digest, "imageTag": "2019.08"},
        "imageManifest": manifest,
    });
    if let Some(media_type) = media_type {
        image["imageManifestMediaType"] = json!(media_type);
    }
    image
}

fn put_ok(manifest: &str, digest: &str) -> Reply {
    Reply::ok(
        json!({ "image": image_json(manifest, digest, Some(media_types::DOCKER_MANIFEST_V2)) }),
    )
}

fn get_ok(manifest: &str, digest: &str) -> Reply {
    Reply::ok(json!({
        "images": [image_json(manifest, digest, Some(media_types::DOCKER_MANIFEST_V2))],
        "failures": [],
    }))
}

fn get_failure(code: &str, reason: &str) -> Reply {
    Reply::ok(json!({
        "images": [],
        "failures": [{"imageId": {"imageTag": "2019.08"}, "failureCode": code, "failureReason": reason}],
    }))
}

/// One recorded exchange and what the caller must see.
struct Case {
    what: &'static str,
    script: Vec<(&'static str, Reply)>,
    code: Code,
    reason: &'static str,
    /// ECR's code as carried in `ErrorInfo.metadata`.
    ecr_code: Option<&'static str>,
}

fn case(
    what: &'static str,
    script: Vec<(&'static str, Reply)>,
    code: Code,
    reason: &'static str,
    ecr_code: Option<&'static str>,
) -> Case {
    Case {
        what,
        script,
        code,
        reason,
        ecr_code,
    }
}

fn put_cases() -> Vec<Case> {
    let put_error =
        |status, code: &str, message: &str| vec![("PutImage", Reply::error(status, code, message))];
    vec![
        case(
            "repository missing",
            put_error(
                400,
                "RepositoryNotFoundException",
                "The repository with name 'hello-world' does not exist in the registry with id '123456789012'",
            ),
            Code::NotFound,
            "REPOSITORY_NOT_FOUND",
            Some("RepositoryNotFoundException"),
        ),
        case(
            "layers missing",
            put_error(
                400,
                "LayersNotFoundException",
                "Layers with digests '[sha256:d886...]' required for pushing image into repository with name 'hello-world' in the registry with id '123456789012' do not exist",
            ),
            Code::FailedPrecondition,
            "LAYERS_NOT_FOUND",
            Some("LayersNotFoundException"),
        ),
        case(
            "index children missing",
            put_error(
                400,
                "ReferencedImagesNotFoundException",
                "Some of the images referenced by the manifest list were not found",
            ),
            Code::FailedPrecondition,
            "REFERENCED_IMAGES_NOT_FOUND",
            Some("ReferencedImagesNotFoundException"),
        ),
        case(
            "KMS failure",
            put_error(400, "KmsException", "KMS key is disabled"),
            Code::FailedPrecondition,
            "KMS_ERROR",
            Some("KmsException"),
        ),
        case(
            "ECR parameter check",
            put_error(
                400,
                "InvalidParameterException",
                "Invalid parameter at 'ImageManifest' failed to satisfy constraint: 'Invalid JSON syntax'",
            ),
            Code::InvalidArgument,
            "ECR_INVALID_PARAMETER",
            Some("InvalidParameterException"),
        ),
        case(
            "ECR digest check",
            put_error(
                400,
                "ImageDigestDoesNotMatchException",
                "The provided image digest does not match the digest calculated by Amazon ECR",
            ),
            Code::InvalidArgument,
            "DIGEST_MISMATCH",
            Some("ImageDigestDoesNotMatchException"),
        ),
        case(
            "quota",
            put_error(
                400,
                "LimitExceededException",
                "The operation did not succeed because it would have exceeded a service limit for your account",
            ),
            Code::ResourceExhausted,
            "ECR_LIMIT_EXCEEDED",
            Some("LimitExceededException"),
        ),
        case(
            "throttled throughout",
            put_error(400, "ThrottlingException", "Rate exceeded"),
            Code::Unavailable,
            "ECR_THROTTLED",
            Some("ThrottlingException"),
        ),
        case(
            "namespaced throttling code",
            put_error(
                400,
                "com.amazon.coral.availability#ThrottlingException",
                "Rate exceeded",
            ),
            Code::Unavailable,
            "ECR_THROTTLED",
            Some("ThrottlingException"),
        ),
        case(
            "server error throughout",
            put_error(500, "ServerException", "Internal error"),
            Code::Unavailable,
            "ECR_UNAVAILABLE",
            Some("ServerException"),
        ),
        case(
            "bare 503",
            vec![("PutImage", Reply::bare(503))],
            Code::Unavailable,
            "ECR_UNAVAILABLE",
            None,
        ),
        case(
            "service role denied",
            put_error(
                400,
                "AccessDeniedException",
                "User: arn:aws:sts::123456789012:assumed-role/ecr-image-service/x is not authorized to perform: ecr:PutImage",
            ),
            Code::PermissionDenied,
            "SERVICE_ACCESS_DENIED",
            Some("AccessDeniedException"),
        ),
        case(
            "service credentials rejected",
            put_error(
                400,
                "UnrecognizedClientException",
                "The security token included in the request is invalid.",
            ),
            Code::Internal,
            "SERVICE_CREDENTIALS_INVALID",
            Some("UnrecognizedClientException"),
        ),
        case(
            "unknown ECR error",
            put_error(400, "BrandNewException", "something new"),
            Code::Internal,
            "ECR_ERROR",
            Some("BrandNewException"),
        ),
        case(
            "immutable tag points elsewhere",
            vec![
                (
                    "PutImage",
                    Reply::error(
                        400,
                        "ImageTagAlreadyExistsException",
                        "The image tag '2019.08' already exists in the 'hello-world' repository and cannot be overwritten because the repository is immutable.",
                    ),
                ),
                ("BatchGetImage", get_ok(SEED_DOC_FORM, SEED_DOC_FORM_DIGEST)),
            ],
            Code::AlreadyExists,
            "TAG_ALREADY_EXISTS",
            Some("ImageTagAlreadyExistsException"),
        ),
        case(
            "ECR acknowledges other bytes",
            vec![("PutImage", put_ok(SEED, SEED_DOC_FORM_DIGEST))],
            Code::DataLoss,
            "DIGEST_VERIFICATION_FAILED",
            None,
        ),
    ]
}

fn get_cases() -> Vec<Case> {
    vec![
        case(
            "image missing",
            vec![(
                "BatchGetImage",
                get_failure("ImageNotFound", "Requested image not found"),
            )],
            Code::NotFound,
            "IMAGE_NOT_FOUND",
            Some("ImageNotFound"),
        ),
        case(
            "repository missing",
            vec![(
                "BatchGetImage",
                Reply::error(
                    400,
                    "RepositoryNotFoundException",
                    "The repository with name 'hello-world' does not exist",
                ),
            )],
            Code::NotFound,
            "REPOSITORY_NOT_FOUND",
            Some("RepositoryNotFoundException"),
        ),
        case(
            "tag and digest disagree",
            vec![(
                "BatchGetImage",
                get_failure(
                    "ImageTagDoesNotMatchDigest",
                    "Image tag does not match digest",
                ),
            )],
            Code::InvalidArgument,
            "TAG_DIGEST_MISMATCH",
            Some("ImageTagDoesNotMatchDigest"),
        ),
        case(
            "ECR refuses the tag",
            vec![(
                "BatchGetImage",
                get_failure("InvalidImageTag", "Invalid image tag"),
            )],
            Code::InvalidArgument,
            "ECR_INVALID_PARAMETER",
            Some("InvalidImageTag"),
        ),
        case(
            "ECR refuses the digest",
            vec![(
                "BatchGetImage",
                get_failure("InvalidImageDigest", "Invalid image digest"),
            )],
            Code::InvalidArgument,
            "ECR_INVALID_PARAMETER",
            Some("InvalidImageDigest"),
        ),
        case(
            "KMS failure",
            vec![(
                "BatchGetImage",
                get_failure("KmsError", "KMS key is disabled"),
            )],
            Code::FailedPrecondition,
            "KMS_ERROR",
            Some("KmsError"),
        ),
        case(
            "archived image",
            vec![(
                "BatchGetImage",
                get_failure("ImageInaccessible", "The image is archived"),
            )],
            Code::FailedPrecondition,
            "IMAGE_INACCESSIBLE",
            Some("ImageInaccessible"),
        ),
        case(
            "pull-through upstream down",
            vec![(
                "BatchGetImage",
                get_failure("UpstreamUnavailable", "Upstream registry unavailable"),
            )],
            Code::Unavailable,
            "ECR_UNAVAILABLE",
            Some("UpstreamUnavailable"),
        ),
        case(
            "throttled throughout",
            vec![(
                "BatchGetImage",
                Reply::error(400, "ThrottlingException", "Rate exceeded"),
            )],
            Code::Unavailable,
            "ECR_THROTTLED",
            Some("ThrottlingException"),
        ),
        case(
            "bytes do not hash to their digest",
            vec![("BatchGetImage", get_ok(SEED_DOC_FORM, SEED_DIGEST))],
            Code::DataLoss,
            "DIGEST_VERIFICATION_FAILED",
            None,
        ),
    ]
}

fn check(case: &Case, status: &tonic::Status) {
    assert_status(status, case.code, case.reason);
    let info = error_info(status);
    assert_eq!(
        info.metadata
            .get(METADATA_ECR_ERROR_CODE)
            .map(String::as_str),
        case.ecr_code,
        "{}: ECR's code travels to the caller",
        case.what
    );
    if case.ecr_code.is_some() {
        assert_eq!(
            info.metadata
                .get(METADATA_ECR_REQUEST_ID)
                .map(String::as_str),
            Some(REQUEST_ID),
            "{}: ECR's request id travels to the caller",
            case.what
        );
    }
    if case.code == Code::InvalidArgument {
        assert_eq!(
            violated_fields(status).len(),
            1,
            "{}: BadRequest",
            case.what
        );
    }
}

#[tokio::test]
async fn put_errors_map_to_their_statuses() {
    for case in put_cases() {
        let (_ecr, mut client) = start_on_recorded(case.script.clone()).await;
        let status = client
            .put_image(put("hello-world", "2019.08", SEED))
            .await
            .expect_err(case.what);
        check(&case, &status);
    }
}

#[tokio::test]
async fn get_errors_map_to_their_statuses() {
    for case in get_cases() {
        let (_ecr, mut client) = start_on_recorded(case.script.clone()).await;
        let status = client
            .get_image(get("hello-world", "2019.08", ""))
            .await
            .expect_err(case.what);
        check(&case, &status);
    }
}

/// ECR's field-naming parameter errors become a field violation on our field.
#[tokio::test]
async fn ecr_parameter_errors_name_the_field() {
    let (_ecr, mut client) = start_on_recorded(vec![(
        "PutImage",
        Reply::error(400, "InvalidParameterException", "Invalid parameter at 'ImageManifest' failed to satisfy constraint: 'Invalid JSON syntax'"),
    )]).await;
    let status = client
        .put_image(put("hello-world", "2019.08", SEED))
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&status), ["image_manifest"]);
}

/// The SDK retries throttling (and only the SDK does): three attempts, then UNAVAILABLE with a
/// RetryInfo telling the caller when to come back.
#[tokio::test]
async fn throttling_is_retried_by_the_sdk_then_reported_with_retry_info() {
    let (ecr, mut client) = start_on_recorded(vec![(
        "PutImage",
        Reply::error(400, "ThrottlingException", "Rate exceeded"),
    )])
    .await;
    let status = client
        .put_image(put("hello-world", "2019.08", SEED))
        .await
        .unwrap_err();
    assert_status(&status, Code::Unavailable, "ECR_THROTTLED");
    assert_eq!(
        ecr.count("PutImage"),
        3,
        "max_attempts, no retry loop on top"
    );
    let retry = status.get_details_retry_info().expect("RetryInfo");
    assert_eq!(retry.retry_delay, Some(Duration::from_secs(1)));
}

/// A quota error is final: the SDK would retry it as throttling, the service does not.
#[tokio::test]
async fn a_quota_error_is_not_retried() {
    let (ecr, mut client) = start_on_recorded(vec![(
        "PutImage",
        Reply::error(400, "LimitExceededException", "images per repository"),
    )])
    .await;
    let status = client
        .put_image(put("hello-world", "2019.08", SEED))
        .await
        .unwrap_err();
    assert_status(&status, Code::ResourceExhausted, "ECR_LIMIT_EXCEEDED");
    assert_eq!(ecr.count("PutImage"), 1);
}

#[tokio::test]
async fn a_throttling_blip_is_absorbed() {
    let (ecr, mut client) = start_on_recorded(vec![
        (
            "PutImage",
            Reply::error(400, "ThrottlingException", "Rate exceeded"),
        ),
        ("PutImage", put_ok(SEED, SEED_DIGEST)),
    ])
    .await;
    let response = client
        .put_image(put("hello-world", "2019.08", SEED))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(response.outcome(), PutImageOutcome::Created);
    assert_eq!(ecr.count("PutImage"), 2);
}

/// A put whose first attempt landed but whose answer was lost (5xx) is retried by the SDK and
/// meets ImageAlreadyExists: the caller gets success with the right digest, not an error.
#[tokio::test]
async fn a_retried_put_that_already_landed_succeeds() {
    let (_ecr, mut client) = start_on_recorded(vec![
        ("PutImage", Reply::error(500, "ServerException", "Internal error")),
        ("PutImage", Reply::error(400, "ImageAlreadyExistsException", "Image with digest 'sha256:8ece…' and tag '2019.08' already exists in the repository with name 'hello-world' in registry with id '123456789012'")),
        ("BatchGetImage", get_ok(SEED, SEED_DIGEST)),
    ]).await;
    let response = client
        .put_image(put("hello-world", "2019.08", SEED))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(response.outcome(), PutImageOutcome::AlreadyExisted);
    let image = response.image.unwrap();
    assert_eq!(image.image_id.unwrap().image_digest, SEED_DIGEST);
    assert_eq!(image.image_manifest, SEED);
}

/// Immutable repository, same bytes under the same tag: real ECR may answer
/// ImageTagAlreadyExists; the tag already points at these bytes, so it is success.
#[tokio::test]
async fn immutable_re_put_of_the_same_bytes_succeeds() {
    let (_ecr, mut client) = start_on_recorded(vec![
        ("PutImage", Reply::error(400, "ImageTagAlreadyExistsException", "The image tag '2019.08' already exists in the 'hello-world' repository and cannot be overwritten because the repository is immutable.")),
        ("BatchGetImage", get_ok(SEED, SEED_DIGEST)),
    ]).await;
    let response = client
        .put_image(put("hello-world", "2019.08", SEED))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(response.outcome(), PutImageOutcome::AlreadyExisted);
    assert_eq!(response.image.unwrap().registry_id, MOTO_ACCOUNT);
}

/// What goes over the wire: the exact bytes, always the digest and the media type on a put,
/// every manifest and index type on a get unless the caller narrows them.
#[tokio::test]
async fn requests_carry_digest_media_type_and_accepted_types() {
    let (ecr, mut client) = start_on_recorded(vec![
        ("PutImage", put_ok(SEED, SEED_DIGEST)),
        ("BatchGetImage", get_ok(SEED, SEED_DIGEST)),
    ])
    .await;
    client
        .put_image(put("hello-world", "2019.08", SEED))
        .await
        .unwrap();
    client
        .get_image(get("hello-world", "2019.08", ""))
        .await
        .unwrap();
    let mut narrowed = get("hello-world", "", SEED_DIGEST);
    narrowed.accepted_media_types = vec![media_types::OCI_MANIFEST.into()];
    client.get_image(narrowed).await.unwrap();

    // The audit trail's read of the tag comes first (DescribeImages): find the put itself.
    let received = ecr.received();
    let put = &received
        .iter()
        .find(|r| r.operation == "PutImage")
        .expect("a PutImage")
        .body;
    assert_eq!(put["imageManifest"], SEED);
    assert_eq!(put["imageDigest"], SEED_DIGEST);
    assert_eq!(
        put["imageManifestMediaType"],
        media_types::DOCKER_MANIFEST_V2
    );
    assert_eq!(put["imageTag"], "2019.08");
    let gets: Vec<_> = received
        .iter()
        .filter(|r| r.operation == "BatchGetImage")
        .collect();
    let all: Vec<&str> = media_types::ALL_MANIFESTS.to_vec();
    assert_eq!(gets[0].body["acceptedMediaTypes"], json!(all));
    assert_eq!(gets[0].body["imageIds"], json!([{"imageTag": "2019.08"}]));
    assert_eq!(
        gets[1].body["acceptedMediaTypes"],
        json!([media_types::OCI_MANIFEST])
    );
    assert_eq!(
        gets[1].body["imageIds"],
        json!([{"imageDigest": SEED_DIGEST}])
    );
}

/// ECR may omit `imageManifestMediaType`; the type is then read from the bytes.
#[tokio::test]
async fn a_missing_media_type_is_read_from_the_manifest() {
    let (_ecr, mut client) = start_on_recorded(vec![(
        "BatchGetImage",
        Reply::ok(json!({"images": [image_json(SEED, SEED_DIGEST, None)], "failures": []})),
    )])
    .await;
    let image = client
        .get_image(get("hello-world", "2019.08", ""))
        .await
        .unwrap()
        .into_inner()
        .image
        .unwrap();
    assert_eq!(
        image.image_manifest_media_type,
        media_types::DOCKER_MANIFEST_V2
    );
}

/// A get by digest whose answer is another (self-consistent) image is refused.
#[tokio::test]
async fn a_get_by_digest_answered_with_other_bytes_is_data_loss() {
    let (_ecr, mut client) = start_on_recorded(vec![(
        "BatchGetImage",
        get_ok(SEED_DOC_FORM, SEED_DOC_FORM_DIGEST),
    )])
    .await;
    let status = client
        .get_image(get("hello-world", "", SEED_DIGEST))
        .await
        .unwrap_err();
    assert_status(&status, Code::DataLoss, "DIGEST_VERIFICATION_FAILED");
}

/// An attempt that outlives `attempt_timeout` is abandoned and retried; when all are, the
/// caller gets UNAVAILABLE/ECR_TIMEOUT rather than waiting on ECR indefinitely.
#[tokio::test]
async fn a_stalled_ecr_times_out() {
    let ecr = RecordedEcr::start(vec![(
        "BatchGetImage",
        get_ok(SEED, SEED_DIGEST).after(Duration::from_secs(5)),
    )])
    .await;
    let settings = EcrSettings {
        max_attempts: 2,
        attempt_timeout: Duration::from_millis(200),
        ..settings()
    };
    let mut client = start(registry(&ecr.endpoint, settings)).await;
    let status = client
        .get_image(get("hello-world", "2019.08", ""))
        .await
        .unwrap_err();
    assert_status(&status, Code::Unavailable, "ECR_TIMEOUT");
    assert_eq!(ecr.count("BatchGetImage"), 2);
}

#[tokio::test]
async fn an_unreachable_ecr_is_unavailable_and_shows_in_the_reachability_gauge() {
    // Port 1 on loopback: nothing listens there, so the connection is refused at once.
    let ecr = registry("http://127.0.0.1:1", settings());
    let calls = ecr.calls().clone();
    assert_eq!(calls.reachable(), None, "unknown before any call");
    let mut client = start(ecr).await;
    let status = client
        .get_image(get("hello-world", "2019.08", ""))
        .await
        .unwrap_err();
    assert_status(&status, Code::Unavailable, "ECR_UNAVAILABLE");
    assert_eq!(calls.reachable(), Some(false));
}

/// A machine with no AWS credentials at all (the default chain finds none): the failure is the
/// service's own, INTERNAL/SERVICE_CREDENTIALS_INVALID, and nothing is sent to ECR unsigned.
#[tokio::test]
async fn missing_service_credentials_are_the_services_problem() {
    use aws_credential_types::credential_fn::provide_credentials_fn;
    use aws_credential_types::provider::SharedCredentialsProvider;
    use aws_credential_types::provider::error::CredentialsError;

    let ecr = RecordedEcr::start(vec![("BatchGetImage", get_ok(SEED, SEED_DIGEST))]).await;
    let settings = EcrSettings {
        endpoint_url: Some(ecr.endpoint.clone()),
        ..settings()
    };
    let sdk = aws_config::SdkConfig::builder()
        .behavior_version(aws_config::BehaviorVersion::latest())
        .region(aws_config::Region::new("us-east-1"))
        .credentials_provider(SharedCredentialsProvider::new(provide_credentials_fn(
            || async {
                Err(CredentialsError::not_loaded(
                    "no credentials in the environment, profile or instance role",
                ))
            },
        )))
        .build();
    let config = ecr_image_service::registry::ecr::client_config(&sdk, &settings);
    let registry =
        ecr_image_service::registry::ecr::EcrRegistry::from_config(config, settings.batch_window);
    let mut client = start(registry).await;
    let status = client
        .get_image(get("hello-world", "2019.08", ""))
        .await
        .unwrap_err();
    assert_status(&status, Code::Internal, "SERVICE_CREDENTIALS_INVALID");
    assert!(
        ecr.received().is_empty(),
        "no unsigned request left the service"
    );
}

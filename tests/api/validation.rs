//! Every validation rule, through the real server: INVALID_ARGUMENT, the reason, a BadRequest
//! naming the field, and no call to ECR at all (recorded ECR counts what reaches it).

use ecr_image_service::image::MAX_MANIFEST_BYTES;
use ecr_image_service::pb::{GetImageRequest, ImageIdentifier, PutImageRequest};
use serde_json::json;
use sha2::{Digest as _, Sha256};
use tonic::Code;

use crate::support::recorded::{RecordedEcr, Reply};
use crate::support::requests::{get, put};
use crate::support::{
    SEED, SEED_DIGEST, assert_status, registry, settings, start_channel, start_on_recorded,
    violated_fields,
};

/// A well-formed manifest without a top-level mediaType whose structure says nothing.
const SHAPELESS: &str = r#"{"schemaVersion":2,"annotations":{}}"#;

/// Each bad PutImage: (what is wrong, request, reason, the one field named).
fn bad_puts() -> Vec<(&'static str, PutImageRequest, &'static str, &'static str)> {
    let with = |f: fn(&mut PutImageRequest)| {
        let mut request = put("hello-world", "2019.08", SEED);
        f(&mut request);
        request
    };
    vec![
        (
            "missing repository",
            with(|r| r.repository_name.clear()),
            "INVALID_FIELD",
            "repository_name",
        ),
        (
            "1-char repository",
            with(|r| r.repository_name = "a".into()),
            "INVALID_FIELD",
            "repository_name",
        ),
        (
            "257-char repository",
            with(|r| r.repository_name = "a".repeat(257)),
            "INVALID_FIELD",
            "repository_name",
        ),
        (
            "upper-case repository",
            with(|r| r.repository_name = "Hello".into()),
            "INVALID_FIELD",
            "repository_name",
        ),
        (
            "repository with '//'",
            with(|r| r.repository_name = "a//b".into()),
            "INVALID_FIELD",
            "repository_name",
        ),
        (
            "repository with '___'",
            with(|r| r.repository_name = "a___b".into()),
            "INVALID_FIELD",
            "repository_name",
        ),
        (
            "registry id not 12 digits",
            with(|r| r.registry_id = "12345".into()),
            "INVALID_FIELD",
            "registry_id",
        ),
        (
            "301-char tag",
            with(|r| r.image_tag = "t".repeat(301)),
            "INVALID_FIELD",
            "image_tag",
        ),
        (
            "digest without algorithm",
            with(|r| r.image_digest = SEED_DIGEST[7..].into()),
            "INVALID_FIELD",
            "image_digest",
        ),
        (
            "upper-case digest",
            with(|r| r.image_digest = SEED_DIGEST.to_uppercase().replace("SHA256", "sha256")),
            "INVALID_FIELD",
            "image_digest",
        ),
        (
            "short digest",
            with(|r| r.image_digest = "sha256:abc".into()),
            "INVALID_FIELD",
            "image_digest",
        ),
        (
            "malformed media type",
            with(|r| r.image_manifest_media_type = "json".into()),
            "INVALID_FIELD",
            "image_manifest_media_type",
        ),
        (
            "empty manifest",
            with(|r| r.image_manifest.clear()),
            "INVALID_FIELD",
            "image_manifest",
        ),
        (
            "manifest not JSON",
            with(|r| r.image_manifest = "FROM scratch".into()),
            "INVALID_FIELD",
            "image_manifest",
        ),
        (
            "manifest a JSON array",
            with(|r| r.image_manifest = "[1,2]".into()),
            "INVALID_FIELD",
            "image_manifest",
        ),
        (
            "manifest with trailing garbage",
            with(|r| r.image_manifest = format!("{SEED}}}")),
            "INVALID_FIELD",
            "image_manifest",
        ),
        (
            "manifest over 4 MiB",
            with(|r| r.image_manifest = oversized_manifest()),
            "INVALID_FIELD",
            "image_manifest",
        ),
        (
            "expected digest of other bytes",
            with(|r| {
                r.image_manifest = SEED.trim_end().into();
                r.image_digest = SEED_DIGEST.into();
            }),
            "DIGEST_MISMATCH",
            "image_digest",
        ),
        (
            "declared type contradicts the manifest",
            with(|r| {
                r.image_manifest_media_type = "application/vnd.oci.image.manifest.v1+json".into()
            }),
            "MEDIA_TYPE_MISMATCH",
            "image_manifest_media_type",
        ),
        (
            "type cannot be determined",
            with(|r| r.image_manifest = SHAPELESS.into()),
            "MEDIA_TYPE_UNDETERMINED",
            "image_manifest_media_type",
        ),
    ]
}

/// One byte over ECR's limit, yet under the server's message limit: the answer must name the
/// field, not be a transport-level RESOURCE_EXHAUSTED.
fn oversized_manifest() -> String {
    let mut manifest = at_limit_manifest();
    manifest.insert(manifest.len() - 2, 'x');
    assert_eq!(manifest.len(), MAX_MANIFEST_BYTES + 1);
    manifest
}

/// A valid manifest of exactly ECR's maximum size.
fn at_limit_manifest() -> String {
    let skeleton = r#"{"mediaType":"application/vnd.oci.image.manifest.v1+json","pad":""}"#;
    let padding = "x".repeat(MAX_MANIFEST_BYTES - skeleton.len());
    let manifest = skeleton.replace(r#""pad":"""#, &format!(r#""pad":"{padding}""#));
    assert_eq!(manifest.len(), MAX_MANIFEST_BYTES);
    manifest
}

#[tokio::test]
async fn bad_puts_are_refused_before_ecr() {
    let (ecr, mut client) = start_on_recorded(vec![]).await;
    for (what, request, reason, field) in bad_puts() {
        let status = client.put_image(request).await.expect_err(what);
        assert_status(&status, Code::InvalidArgument, reason);
        assert_eq!(violated_fields(&status), [field], "{what}");
    }
    assert!(
        ecr.received().is_empty(),
        "nothing reached ECR: {:?}",
        ecr.received()
    );
}

#[tokio::test]
async fn bad_gets_are_refused_before_ecr() {
    let (ecr, mut client) = start_on_recorded(vec![]).await;
    let with = |f: fn(&mut GetImageRequest)| {
        let mut request = get("hello-world", "2019.08", "");
        f(&mut request);
        request
    };
    let cases = vec![
        ("no image id", with(|r| r.image_id = None), "image_id"),
        (
            "empty image id",
            with(|r| r.image_id = Some(ImageIdentifier::default())),
            "image_id",
        ),
        (
            "bad digest",
            with(|r| r.image_id.as_mut().unwrap().image_digest = "sha256:0".into()),
            "image_id.image_digest",
        ),
        (
            "301-char tag",
            with(|r| r.image_id.as_mut().unwrap().image_tag = "t".repeat(301)),
            "image_id.image_tag",
        ),
        (
            "bad repository",
            with(|r| r.repository_name = "-x".into()),
            "repository_name",
        ),
        (
            "bad registry id",
            with(|r| r.registry_id = "abcdefghijkl".into()),
            "registry_id",
        ),
        (
            "bad accepted media type",
            with(|r| r.accepted_media_types = vec!["nope".into()]),
            "accepted_media_types[0]",
        ),
        (
            "101 accepted media types",
            with(|r| r.accepted_media_types = vec!["a/b".into(); 101]),
            "accepted_media_types",
        ),
    ];
    for (what, request, field) in cases {
        let status = client.get_image(request).await.expect_err(what);
        assert_status(&status, Code::InvalidArgument, "INVALID_FIELD");
        assert_eq!(violated_fields(&status), [field], "{what}");
    }
    assert!(
        ecr.received().is_empty(),
        "nothing reached ECR: {:?}",
        ecr.received()
    );
}

/// A manifest of exactly 4,194,304 bytes is legal and travels whole; it is what ECR receives.
#[tokio::test]
async fn manifest_at_the_size_limit_is_accepted() {
    let manifest = at_limit_manifest();
    let digest = format!("sha256:{:x}", Sha256::digest(manifest.as_bytes()));
    let (ecr, mut client) = start_on_recorded(vec![(
        "PutImage",
        Reply::ok(json!({"image": {
            "registryId": "123456789012",
            "repositoryName": "big",
            "imageId": {"imageDigest": digest, "imageTag": "v1"},
            "imageManifest": manifest,
        }})),
    )])
    .await;
    let response = client
        .put_image(PutImageRequest {
            repository_name: "big".into(),
            image_tag: "v1".into(),
            image_manifest: manifest.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        response.image.unwrap().image_id.unwrap().image_digest,
        digest
    );
    let received = ecr.received();
    let sent = &received
        .iter()
        .find(|r| r.operation == "PutImage")
        .expect("a PutImage")
        .body;
    assert_eq!(
        sent["imageManifest"].as_str().unwrap().len(),
        MAX_MANIFEST_BYTES
    );
}

/// PutImageRequest as a client that ignores proto3's UTF-8 rule would send it: the manifest as
/// raw bytes.
#[derive(Clone, PartialEq, prost::Message)]
struct RawPutImageRequest {
    #[prost(string, tag = "2")]
    repository_name: String,
    #[prost(bytes = "vec", tag = "3")]
    image_manifest: Vec<u8>,
}

/// Bytes that are not UTF-8 in `image_manifest` are INVALID_ARGUMENT naming that field, not the
/// INTERNAL gRPC uses for unparseable messages, and never reach ECR.
#[tokio::test]
async fn a_manifest_that_is_not_utf8_names_the_field() {
    let ecr = RecordedEcr::start(vec![]).await;
    let channel = start_channel(registry(&ecr.endpoint, settings())).await;
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let request = RawPutImageRequest {
        repository_name: "hello-world".into(),
        image_manifest: b"{\"mediaType\":\"a/b\",\"x\":\"\xff\xfe\"}".to_vec(),
    };
    let status =
        grpc
            .unary(
                tonic::Request::new(request),
                http::uri::PathAndQuery::from_static("/imageservice.v1.ImageService/PutImage"),
                tonic_prost::ProstCodec::<
                    RawPutImageRequest,
                    ecr_image_service::pb::PutImageResponse,
                >::default(),
            )
            .await
            .unwrap_err();
    assert_status(&status, Code::InvalidArgument, "INVALID_FIELD");
    assert_eq!(violated_fields(&status), ["image_manifest"]);
    assert!(ecr.received().is_empty());
}

//! Who may do what: the caller's identity from the one configured source, and the per-repository
//! policy, over a real gRPC client on loopback (the embedded store behind the production stack).

use std::sync::Arc;
use std::time::{Duration, Instant};

use ecr_image_service::identity::IdentitySource;
use ecr_image_service::pb::image_service_client::ImageServiceClient;
use ecr_image_service::pb::{ImageIdentifier, RetagImageRequest};
use ecr_image_service::registry::cached::{CacheSettings, CachedRegistry};
use ecr_image_service::registry::local::LocalRegistry;
use ecr_image_service::server::ServerSettings;
use tonic::transport::Channel;
use tonic::{Code, Request};

use crate::support::backend::{ScratchDir, local_settings};
use crate::support::requests::{get, put};
use crate::support::{SEED, assert_status, error_info, serve_with_admin, server_settings};

const BUILDER: &str = "spiffe://cluster.local/ns/ci/sa/builder";
const DEPLOYER: &str = "spiffe://cluster.local/ns/cd/sa/deployer";

/// Builder writes team-a; any authenticated caller reads base; nothing else.
const POLICY: &str = include_str!("../fixtures/policy/example.yaml");

/// The service on the embedded store, reading identities from `source`, with `policy` in a file
/// of its own; a client, the policy file, and the admin address.
struct Guarded {
    client: ImageServiceClient<Channel>,
    policy: std::path::PathBuf,
    admin: std::net::SocketAddr,
    _dir: ScratchDir,
}

async fn guarded(source: IdentitySource, policy: &str) -> Guarded {
    let dir = ScratchDir::new("access");
    let policy_path = dir.0.join("policy.yaml");
    std::fs::write(&policy_path, policy).unwrap();
    let store = LocalRegistry::open(&local_settings(&dir.0.join("store"))).unwrap();
    let stack = CachedRegistry::new(Arc::new(store), CacheSettings::default());
    let settings = ServerSettings {
        identity_source: source,
        authz_policy: Some(policy_path.clone()),
        ..server_settings()
    };
    let (address, admin) = serve_with_admin(stack, settings).await;
    let client = ImageServiceClient::connect(format!("http://{address}"))
        .await
        .unwrap();
    Guarded {
        client,
        policy: policy_path,
        admin,
        _dir: dir,
    }
}

/// `message` as a request with `headers` set.
fn with_headers<T>(message: T, headers: &[(&'static str, &str)]) -> Request<T> {
    let mut request = Request::new(message);
    for (name, value) in headers {
        request.metadata_mut().append(*name, value.parse().unwrap());
    }
    request
}

fn xfcc(principal: &str) -> String {
    format!(
        r#"By=spiffe://cluster.local/ns/platform/sa/images;Hash=ab12;Subject="";URI={principal}"#
    )
}

#[tokio::test]
async fn the_policy_allows_what_it_lists_and_denies_the_rest_without_revealing_itself() {
    let mut service = guarded(IdentitySource::IstioXfcc, POLICY).await;
    let builder = xfcc(BUILDER);
    let as_builder = [("x-forwarded-client-cert", builder.as_str())];
    let client = &mut service.client;
    client
        .put_image(with_headers(put("team-a/app", "v1", SEED), &as_builder))
        .await
        .expect("the builder writes team-a");
    client
        .get_image(with_headers(get("team-a/app", "v1", ""), &as_builder))
        .await
        .expect("and reads it");

    let deployer = xfcc(DEPLOYER);
    let as_deployer = [("x-forwarded-client-cert", deployer.as_str())];
    let status = client
        .put_image(with_headers(put("team-a/app", "prod", SEED), &as_deployer))
        .await
        .unwrap_err();
    assert_status(&status, Code::PermissionDenied, "ACCESS_DENIED");
    let info = error_info(&status);
    assert_eq!(info.metadata["action"], "write");
    assert_eq!(info.metadata["repository"], "team-a/app");
    for secret in ["ci-team-a", "everyone-reads-base", "builder", "**"] {
        assert!(!status.message().contains(secret), "{}", status.message());
    }
    let status = client
        .get_image(with_headers(get("team-a/app", "v1", ""), &as_deployer))
        .await
        .unwrap_err();
    assert_status(&status, Code::PermissionDenied, "ACCESS_DENIED");

    // Deleting is its own action: read and write do not cover it.
    let status = client
        .batch_delete_image(with_headers(
            crate::support::requests::delete("team-a/app", &[("v1", "")]),
            &as_builder,
        ))
        .await
        .unwrap_err();
    assert_status(&status, Code::PermissionDenied, "ACCESS_DENIED");
    assert_eq!(error_info(&status).metadata["action"], "delete");

    // RetagImage needs read on the source and write on the targets.
    let retag = RetagImageRequest {
        repository_name: "team-a/app".into(),
        source_image_id: Some(ImageIdentifier {
            image_tag: "v1".into(),
            image_digest: String::new(),
        }),
        target_tags: vec!["prod".into()],
        ..Default::default()
    };
    client
        .retag_image(with_headers(retag.clone(), &as_builder))
        .await
        .expect("the builder retags in team-a");
    let status = client
        .retag_image(with_headers(retag, &as_deployer))
        .await
        .unwrap_err();
    assert_status(&status, Code::PermissionDenied, "ACCESS_DENIED");
}

#[tokio::test]
async fn a_missing_repeated_or_forged_identity_is_unauthenticated() {
    let mut service = guarded(IdentitySource::IstioXfcc, POLICY).await;
    let builder = xfcc(BUILDER);
    let client = &mut service.client;
    let cases: [(&str, Vec<(&'static str, &str)>); 4] = [
        ("no header", vec![]),
        (
            "a repeated header",
            vec![
                ("x-forwarded-client-cert", builder.as_str()),
                ("x-forwarded-client-cert", builder.as_str()),
            ],
        ),
        (
            "another source's header",
            vec![(
                "l5d-client-id",
                "builder.ci.serviceaccount.identity.linkerd.cluster.local",
            )],
        ),
        (
            "a URI that is no SPIFFE ID",
            vec![("x-forwarded-client-cert", "URI=https://evil.example/x")],
        ),
    ];
    for (case, headers) in cases {
        let status = client
            .get_image(with_headers(get("base/debian", "v1", ""), &headers))
            .await
            .unwrap_err();
        assert_status(&status, Code::Unauthenticated, "NO_CALLER_IDENTITY");
        assert!(
            !status.message().contains("evil"),
            "{case}: the header is never echoed"
        );
    }
    // A forged earlier element does not win over the sidecar's last one.
    let forged = format!("URI={BUILDER},{}", xfcc(DEPLOYER));
    let status = client
        .put_image(with_headers(
            put("team-a/app", "v1", SEED),
            &[("x-forwarded-client-cert", forged.as_str())],
        ))
        .await
        .unwrap_err();
    assert_status(&status, Code::PermissionDenied, "ACCESS_DENIED");
}

#[tokio::test]
async fn under_linkerd_only_l5d_client_id_counts() {
    let policy = r#"
rules:
  - id: linkerd-builder
    principals: ["*.ci.serviceaccount.identity.linkerd.cluster.local"]
    actions: [write, read]
    repositories: ["team-a/*"]
"#;
    let mut service = guarded(IdentitySource::Linkerd, policy).await;
    let builder = "builder.ci.serviceaccount.identity.linkerd.cluster.local";
    let forged = xfcc(BUILDER);
    service
        .client
        .put_image(with_headers(
            put("team-a/app", "v1", SEED),
            &[
                ("l5d-client-id", builder),
                ("x-forwarded-client-cert", "URI=spiffe://x/y"),
            ],
        ))
        .await
        .expect("l5d-client-id is the identity");
    let status = service
        .client
        .put_image(with_headers(
            put("team-a/app", "v1", SEED),
            &[("x-forwarded-client-cert", forged.as_str())],
        ))
        .await
        .unwrap_err();
    assert_status(&status, Code::Unauthenticated, "NO_CALLER_IDENTITY");
}

/// `authz_policy_valid` and `authz_decisions_total` as the admin endpoint serves them.
async fn policy_metrics(admin: std::net::SocketAddr) -> (f64, f64) {
    let body = reqwest_free_get(admin).await;
    let value = |name: &str| {
        body.lines()
            .filter(|l| l.starts_with(name))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>()
    };
    (
        value("imageservice_authz_policy_valid"),
        value("imageservice_authz_decisions_total"),
    )
}

/// GET /metrics over a plain TCP connection (HTTP/1.0, so the answer ends with the connection).
async fn reqwest_free_get(admin: std::net::SocketAddr) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(admin).await.unwrap();
    tcp.write_all(b"GET /metrics HTTP/1.0\r\n\r\n")
        .await
        .unwrap();
    let mut body = String::new();
    tcp.read_to_string(&mut body).await.unwrap();
    body
}

/// An invalid change keeps the old policy (and sets the metric); a valid change applies within
/// a couple of seconds. Polled, never slept for.
#[tokio::test]
async fn a_changed_policy_applies_and_an_invalid_one_keeps_the_old() {
    let mut service = guarded(IdentitySource::None, "rules: []\n").await;
    let read = |client: &mut ImageServiceClient<Channel>| {
        let mut client = client.clone();
        async move { client.get_image(get("base/debian", "v1", "")).await }
    };
    let status = read(&mut service.client).await.unwrap_err();
    assert_status(&status, Code::PermissionDenied, "ACCESS_DENIED");

    std::fs::write(&service.policy, "rules: [{id: broken, actions: [fly]}]\n").unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while policy_metrics(service.admin).await.0 != 0.0 {
        assert!(
            Instant::now() < deadline,
            "the invalid policy was never noticed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let status = read(&mut service.client).await.unwrap_err();
    assert_status(&status, Code::PermissionDenied, "ACCESS_DENIED");

    let started = Instant::now();
    std::fs::write(
        &service.policy,
        "rules: [{id: anonymous-reads, principals: [anonymous], actions: [read], repositories: ['base/**']}]\n",
    )
    .unwrap();
    loop {
        match read(&mut service.client).await {
            // The image does not exist: the request got past the policy.
            Err(status) if status.code() == Code::NotFound => break,
            // An outcome with a deadline, not a timing bound: the reload polls every second.
            _ => assert!(
                started.elapsed() < Duration::from_secs(10),
                "the valid policy never applied"
            ),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (valid, decisions) = policy_metrics(service.admin).await;
    assert_eq!(valid, 1.0);
    assert!(decisions >= 3.0, "decisions are counted: {decisions}");
}

/// A deleted policy file reads invalid (`authz_policy_valid` 0) while the last policy stays in
/// force; the file's return reads valid again. (It used to stay 1 with the file gone.)
#[tokio::test]
async fn a_deleted_policy_file_reads_invalid_and_the_last_policy_stays() {
    let mut service = guarded(IdentitySource::None, "rules: []\n").await;
    let deadline = Instant::now() + Duration::from_secs(10);
    std::fs::remove_file(&service.policy).unwrap();
    while policy_metrics(service.admin).await.0 != 0.0 {
        assert!(
            Instant::now() < deadline,
            "the missing file was never noticed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let status = service
        .client
        .get_image(get("base/debian", "v1", ""))
        .await
        .unwrap_err();
    assert_status(&status, Code::PermissionDenied, "ACCESS_DENIED");
    std::fs::write(&service.policy, "rules: []\n").unwrap();
    while policy_metrics(service.admin).await.0 != 1.0 {
        assert!(
            Instant::now() < deadline,
            "the returned file was never read"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Issue 20, finding 8: a policy change that takes a caller's read away reaches its open
/// WatchTag streams: the next event ends the stream with PERMISSION_DENIED (it used to keep
/// announcing digests for the stream's 30 minutes).
#[tokio::test]
async fn a_revoked_read_ends_an_open_watch_at_its_next_event() {
    let reads_and_writes = "rules: [{id: all, principals: [anonymous], actions: [read, write], repositories: ['base/**']}]\n";
    let mut service = guarded(IdentitySource::None, reads_and_writes).await;
    service
        .client
        .put_image(put("base/app", "live", SEED))
        .await
        .unwrap();
    let mut watch = crate::support::requests::open_watch(&service.client, "base/app", "live").await;
    watch.message().await.unwrap().expect("the current state");

    let writes_only =
        "rules: [{id: w, principals: [anonymous], actions: [write], repositories: ['base/**']}]\n";
    std::fs::write(&service.policy, writes_only).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let read = service.client.get_image(get("base/app", "live", "")).await;
        if matches!(&read, Err(status) if status.code() == Code::PermissionDenied) {
            break;
        }
        assert!(Instant::now() < deadline, "the new policy never applied");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let moved = r#"{"mediaType":"application/vnd.oci.image.manifest.v1+json","moved":1}"#;
    service
        .client
        .put_image(put("base/app", "live", moved))
        .await
        .unwrap();
    let status = tokio::time::timeout(Duration::from_secs(10), watch.message())
        .await
        .expect("the watch's next event came")
        .unwrap_err();
    assert_status(&status, Code::PermissionDenied, "ACCESS_DENIED");
}

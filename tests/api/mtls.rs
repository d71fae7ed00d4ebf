//! `--identity-source mtls`: the service terminates mutual TLS itself, and the caller is the
//! client certificate's one SPIFFE URI SAN. Certificates are made at test time with rcgen; a
//! real tonic client holds its identity; everything stays on loopback.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ecr_image_service::identity::IdentitySource;
use ecr_image_service::pb::image_service_client::ImageServiceClient;
use ecr_image_service::registry::cached::{CacheSettings, CachedRegistry};
use ecr_image_service::registry::local::LocalRegistry;
use ecr_image_service::server::ServerSettings;
use ecr_image_service::tls::TlsSettings;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::{Code, Request};

use crate::support::backend::{ScratchDir, local_settings};
use crate::support::certs::Ca;
use crate::support::requests::put;
use crate::support::{SEED, assert_status, serve_on_loopback, server_settings};

const BUILDER: &str = "spiffe://test/ns/ci/sa/builder";

/// The service with mTLS from `ca`, the policy letting [`BUILDER`] write `team-a/**`.
struct MtlsService {
    address: std::net::SocketAddr,
    client_ca: std::path::PathBuf,
    server_ca: String,
    _dir: ScratchDir,
}

async fn serve_mtls(ca: &Ca) -> MtlsService {
    let dir = ScratchDir::new("mtls");
    let write = |name: &str, text: &str| {
        let path = dir.0.join(name);
        std::fs::write(&path, text).unwrap();
        path
    };
    let server_ca = Ca::new();
    let (cert, key) = server_ca.leaf(&["localhost"], &[]);
    let tls = TlsSettings {
        cert: write("server.pem", &cert),
        key: write("server.key", &key),
        client_ca: write("client-ca.pem", &ca.pem),
    };
    let policy = write(
        "policy.yaml",
        &format!(
            "rules: [{{id: builder, principals: ['{BUILDER}'], actions: [read, write], repositories: ['team-a/**']}}]\n"
        ),
    );
    let store = LocalRegistry::open(&local_settings(&dir.0.join("store"))).unwrap();
    let stack = CachedRegistry::new(Arc::new(store), CacheSettings::default());
    let settings = ServerSettings {
        identity_source: IdentitySource::Mtls,
        tls: Some(tls.clone()),
        authz_policy: Some(policy),
        ..server_settings()
    };
    let address = serve_on_loopback(stack, settings).await;
    MtlsService {
        address,
        client_ca: tls.client_ca,
        server_ca: server_ca.pem,
        _dir: dir,
    }
}

/// A client presenting `identity` (certificate and key PEM), trusting the server's CA.
async fn client(
    service: &MtlsService,
    identity: &(String, String),
) -> Result<ImageServiceClient<Channel>, tonic::transport::Error> {
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&service.server_ca))
        .identity(Identity::from_pem(&identity.0, &identity.1))
        .domain_name("localhost");
    let channel = Endpoint::from_shared(format!("https://{}", service.address))?
        .tls_config(tls)?
        .connect()
        .await?;
    Ok(ImageServiceClient::new(channel))
}

fn write_team_a(tag: &str) -> Request<ecr_image_service::pb::PutImageRequest> {
    Request::new(put("team-a/app", tag, SEED))
}

#[tokio::test]
async fn the_client_certificates_spiffe_id_is_the_caller() {
    let ca = Ca::new();
    let service = serve_mtls(&ca).await;
    let mut builder = client(&service, &ca.leaf(&[], &[BUILDER])).await.unwrap();
    builder
        .put_image(write_team_a("v1"))
        .await
        .expect("the builder's certificate may write team-a");

    // Under mtls a forged sidecar header changes nothing.
    let other = ca.leaf(&[], &["spiffe://test/ns/web/sa/frontend"]);
    let mut frontend = client(&service, &other).await.unwrap();
    let mut forged = write_team_a("v2");
    forged.metadata_mut().insert(
        "x-forwarded-client-cert",
        format!("URI={BUILDER}").parse().unwrap(),
    );
    forged.metadata_mut().insert(
        "l5d-client-id",
        "builder.ci.serviceaccount.identity.linkerd.cluster.local"
            .parse()
            .unwrap(),
    );
    let status = frontend.put_image(forged).await.unwrap_err();
    assert_status(&status, Code::PermissionDenied, "ACCESS_DENIED");
}

#[tokio::test]
async fn certificates_without_exactly_one_spiffe_uri_have_no_identity() {
    let ca = Ca::new();
    let service = serve_mtls(&ca).await;
    for (case, uris) in [
        (
            "two URI SANs",
            vec![BUILDER, "spiffe://test/ns/ci/sa/other"],
        ),
        ("no URI SAN", vec![]),
        ("a URI that is no SPIFFE ID", vec!["https://test/builder"]),
    ] {
        let mut client = client(&service, &ca.leaf(&["client.test"], &uris))
            .await
            .unwrap_or_else(|e| panic!("{case}: the handshake itself succeeds: {e}"));
        let status = client.put_image(write_team_a("v1")).await.unwrap_err();
        assert_status(&status, Code::Unauthenticated, "NO_CALLER_IDENTITY");
    }
}

/// A certificate from another CA fails the handshake; once that CA is written into the client
/// CA file, the service takes it without a restart.
#[tokio::test]
async fn another_ca_is_refused_until_the_client_ca_file_rotates_to_it() {
    let ca = Ca::new();
    let service = serve_mtls(&ca).await;
    let other_ca = Ca::new();
    let stranger = other_ca.leaf(&[], &[BUILDER]);
    let refused = match client(&service, &stranger).await {
        Err(_) => true,
        Ok(mut client) => client.put_image(write_team_a("v1")).await.is_err(),
    };
    assert!(refused, "a certificate of another CA is refused");

    rotate(&service.client_ca, &format!("{}{}", ca.pem, other_ca.pem));
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(mut client) = client(&service, &stranger).await
            && client.put_image(write_team_a("v1")).await.is_ok()
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the rotated CA never took effect"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Replaces `path` whole, as a rotation does (write aside, then rename).
fn rotate(path: &Path, text: &str) {
    let aside = path.with_extension("new");
    std::fs::write(&aside, text).unwrap();
    std::fs::rename(&aside, path).unwrap();
}

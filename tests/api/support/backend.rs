//! The two backends every conformance test runs on, each behind the production stack (the
//! cache over the backend): ECR through aws-sdk-ecr and the moto emulator, and the embedded
//! store (`--backend local`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use ecr_image_service::image::{Manifest, RepositoryName, Tag};
use ecr_image_service::pb::PutImageResponse;
use ecr_image_service::pb::image_service_client::ImageServiceClient;
use ecr_image_service::registry::cached::{CacheSettings, CachedRegistry};
use ecr_image_service::registry::local::{DEFAULT_REGISTRY_ID, LocalRegistry, LocalSettings};
use ecr_image_service::registry::{PutImageInput, Registry};
use ecr_image_service::server::ServerSettings;
use tonic::transport::Channel;

use super::requests::put;
use super::{
    MOTO_ACCOUNT, admin, cached, create_repository, moto, serve_on_loopback, server_settings,
    unique,
};

/// Which store the service is in front of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Amazon ECR's API, served by the moto emulator.
    Ecr,
    /// The embedded SQLite store.
    Local,
}

/// The service in front of one backend, a client of it, and the backend's set-up handle.
pub struct Backend {
    /// Which backend this is.
    pub kind: Kind,
    /// A gRPC client of the service.
    pub client: ImageServiceClient<Channel>,
    /// Where the service listens, for clients in other languages.
    pub address: SocketAddr,
    store: Store,
    _policy: ScratchDir,
}

/// The policy the conformance suite runs under: the anonymous test client may read, write and
/// delete every repository (denials have tests of their own, in `access.rs`).
const CONFORMANCE_POLICY: &str = "rules:
  - id: conformance
    principals: [anonymous]
    actions: [read, write, delete]
    repositories: ['**']
";

enum Store {
    Ecr(&'static str),
    Local(LocalRegistry, ScratchDir),
}

impl Backend {
    /// Starts the service on `kind`, with an authorization policy in place that lets the
    /// (anonymous) test client read and write every repository, so that the whole suite runs
    /// through the policy check.
    pub async fn start(kind: Kind) -> Self {
        let policy_dir = ScratchDir::new("policy");
        let policy = policy_dir.0.join("policy.yaml");
        std::fs::write(&policy, CONFORMANCE_POLICY).expect("write the policy");
        let settings = ServerSettings {
            authz_policy: Some(policy),
            ..server_settings()
        };
        let (address, store) = match kind {
            Kind::Ecr => {
                let endpoint = moto::endpoint();
                let address = serve_on_loopback(cached(endpoint).0, settings).await;
                (address, Store::Ecr(endpoint))
            }
            Kind::Local => {
                let dir = ScratchDir::new("conformance");
                let local = LocalRegistry::open(&local_settings(&dir.0)).expect("open the store");
                let stack = CachedRegistry::new(Arc::new(local.clone()), CacheSettings::default());
                let address = serve_on_loopback(stack, settings).await;
                (address, Store::Local(local, dir))
            }
        };
        let client = ImageServiceClient::connect(format!("http://{address}"))
            .await
            .expect("connect to the service");
        Self {
            kind,
            client,
            address,
            store,
            _policy: policy_dir,
        }
    }

    /// Creates a repository, as `aws ecr create-repository` would.
    pub async fn create_repository(&self, name: &str, immutable: bool) {
        match &self.store {
            Store::Ecr(endpoint) => create_repository(endpoint, name, immutable).await,
            Store::Local(local, _) => local
                .create_repository(&RepositoryName::parse(name).unwrap(), immutable)
                .await
                .unwrap(),
        }
    }

    /// A fresh repository for one test (moto is shared by every test in the binary).
    pub async fn repository(&self, prefix: &str, immutable: bool) -> String {
        let name = unique(prefix);
        self.create_repository(&name, immutable).await;
        name
    }

    /// Puts `manifest` as `repository:tag` through the service; the put must succeed.
    pub async fn put(&self, repository: &str, tag: &str, manifest: &str) -> PutImageResponse {
        self.client
            .clone()
            .put_image(put(repository, tag, manifest))
            .await
            .unwrap_or_else(|status| panic!("put {repository}:{tag}: {status:?}"))
            .into_inner()
    }

    /// Puts `manifest` as `repository:tag` straight into the backend, behind the service's
    /// back (as another client of the registry would): the service's cache has not seen it.
    pub async fn put_behind_the_service(&self, repository: &str, tag: &str, manifest: &str) {
        let parsed = Manifest::parse(manifest.to_owned(), None).expect("a valid manifest");
        match &self.store {
            Store::Ecr(endpoint) => {
                admin(endpoint)
                    .put_image()
                    .repository_name(repository)
                    .image_tag(tag)
                    .image_manifest(manifest)
                    .image_manifest_media_type(parsed.media_type().as_str())
                    .image_digest(parsed.digest().as_str())
                    .send()
                    .await
                    .expect("put into the emulator");
            }
            Store::Local(local, _) => {
                local
                    .put_image(PutImageInput {
                        registry_id: None,
                        repository: RepositoryName::parse(repository).unwrap(),
                        manifest: parsed,
                        tag: Some(Tag::parse(tag).unwrap()),
                    })
                    .await
                    .expect("put into the store");
            }
        }
    }

    /// The registry ID the backend reports.
    pub fn registry_id(&self) -> &'static str {
        match self.kind {
            Kind::Ecr => MOTO_ACCOUNT,
            Kind::Local => DEFAULT_REGISTRY_ID,
        }
    }
}

/// The embedded store's production settings, in `dir`.
pub fn local_settings(dir: &std::path::Path) -> LocalSettings {
    LocalSettings {
        data_dir: dir.to_owned(),
        registry_id: DEFAULT_REGISTRY_ID.to_owned(),
        immutable_repositories: Vec::new(),
    }
}

/// A directory of the test's own, removed when dropped.
pub struct ScratchDir(pub PathBuf);

impl ScratchDir {
    /// A new empty directory under the system's temporary directory.
    pub fn new(prefix: &str) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "ecr-image-service-{}-{}",
            std::process::id(),
            unique(prefix)
        ));
        std::fs::create_dir_all(&dir).expect("scratch directory");
        Self(dir)
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs each named scenario `async fn(Backend)` as two tests, `ecr::NAME` and `local::NAME`:
/// one suite, so the backends cannot drift apart.
#[macro_export]
macro_rules! on_both_backends {
    ($($scenario:ident),* $(,)?) => {
        mod ecr {
            $(
                #[tokio::test]
                async fn $scenario() {
                    let backend = $crate::support::backend::Backend::start(
                        $crate::support::backend::Kind::Ecr,
                    )
                    .await;
                    super::$scenario(backend).await;
                }
            )*
        }
        mod local {
            $(
                #[tokio::test]
                async fn $scenario() {
                    let backend = $crate::support::backend::Backend::start(
                        $crate::support::backend::Kind::Local,
                    )
                    .await;
                    super::$scenario(backend).await;
                }
            )*
        }
    };
}

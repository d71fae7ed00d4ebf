//! The wiring: the registry stack the configuration asks for, served until shutdown. The one
//! module that names concrete backends; everything else sees a [`SharedRegistry`].

use std::future::Future;
use std::sync::Arc;

use tracing::{info, warn};

use crate::cli::exit;
use crate::config::{AttributeWrites, Backend, ServeArgs};
use crate::fleet::Fleet;
use crate::registry::SharedRegistry;
use crate::registry::accounts::Routes;
use crate::registry::cached::CachedRegistry;
use crate::registry::ecr::budget::SharedSlots;
use crate::registry::ecr::lanes::{BudgetScopes, LanesConfig};
use crate::registry::ecr::{self, EcrRegistry};
use crate::registry::local::{LocalRegistry, OpenError};
use crate::transport::server::{self, ServeError};

/// Why the service could not start, or stopped on an error.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The configuration cannot work; restarting will not help.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The embedded store cannot be opened.
    #[error(transparent)]
    Store(#[from] OpenError),
    /// A listener could not be bound, or a file read at start (policy, TLS, page-token key)
    /// is invalid.
    #[error(transparent)]
    Serve(#[from] ServeError),
}

impl StartError {
    /// The process exit code for this failure.
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Config(_)
            | Self::Serve(ServeError::Policy(_) | ServeError::Tls(_) | ServeError::PageTokens(_)) => {
                exit::USAGE
            }
            Self::Store(_) | Self::Serve(_) => exit::OTHER,
        }
    }
}

/// The stack `args` asks for: the cache over the chosen backend; with `--redis-url`, linked to
/// the fleet's other replicas through the returned [`Fleet`].
pub async fn registry(
    args: &ServeArgs,
) -> Result<(SharedRegistry, Option<Arc<Fleet>>, Arc<Routes>), StartError> {
    let redis = args
        .redis_client()
        .map_err(|e| StartError::Config(e.to_string()))?;
    let fleet = |scope: &str| {
        redis
            .clone()
            .map(|client| {
                Fleet::with_client(client, scope, args.rate_share).map_err(StartError::Config)
            })
            .transpose()
    };
    let routes;
    let (backend, fleet): (SharedRegistry, _) = match args.backend {
        Backend::Ecr => {
            let settings = args.ecr_settings();
            let sdk = ecr::load_sdk_config(&settings).await;
            let Some(region) = sdk.region().map(ToString::to_string) else {
                return Err(StartError::Config(
                    "no AWS region: set --region, ECR_IMAGE_SERVICE_REGION, AWS_REGION or a \
                     profile region"
                        .to_owned(),
                ));
            };
            let account = ecr::account_of(&sdk).await;
            let fleet = match &redis {
                Some(_) => fleet(&format!("{account}:{region}"))?,
                None => None,
            };
            let own = (account != ecr::UNKNOWN_ACCOUNT).then_some(account);
            if own.is_none() {
                warn!(
                    "the credentials name no account: a request naming a registry_id is refused \
                     (REGISTRY_NOT_CONFIGURED); requests naming none are served"
                );
            }
            routes = Arc::new(match &args.registries {
                Some(path) => Routes::from_file(own.clone(), Some(&region), path)
                    .map_err(StartError::Config)?,
                None => Routes::own(own.clone(), Some(&region)),
            });
            if args.attribute_writes == AttributeWrites::SourceIdentity {
                check_attribution(&routes)?;
            }
            info!(
                attribute_writes = args.attribute_writes.name(),
                registries = routes.registries().len(),
                "writes are made {}",
                match args.attribute_writes {
                    AttributeWrites::None => "with the service's own role session",
                    AttributeWrites::SourceIdentity =>
                        "with a role session per (account, caller), the caller its SourceIdentity",
                }
            );
            info!(
                backend = "ecr",
                %region,
                ecr_endpoint = settings.endpoint_url.as_deref().unwrap_or("(SDK default)"),
                max_attempts = settings.max_attempts,
                put_image_rate = settings.put_image_rate,
                batch_get_image_rate = settings.batch_get_image_rate,
                "backend ready"
            );
            let slots = fleet.clone().map(|f| f as Arc<dyn SharedSlots>);
            // One bound on calls in flight for every registry's client.
            let upstream = ecr::client::upstream_slots(&settings);
            let config =
                ecr::client::client_config_sharing(&sdk, &settings, slots, Arc::clone(&upstream));
            let mut ecr = EcrRegistry::from_config(config, settings.batch_window);
            if args.registries.is_some() {
                ecr = ecr.with_registries(LanesConfig {
                    budgets: fleet.clone().map(|f| f as Arc<dyn BudgetScopes>),
                    sdk,
                    settings,
                    routes: Arc::clone(&routes),
                    sts_rate: args.sts_rate,
                    attributed_sessions: (args.attribute_writes == AttributeWrites::SourceIdentity)
                        .then_some(args.max_attributed_sessions),
                    slots: Some(upstream),
                });
            }
            (Arc::new(ecr), fleet)
        }
        Backend::Local => {
            let settings = args.local_settings();
            routes = Arc::new(Routes::own(Some(settings.registry_id.clone()), None));
            let store = LocalRegistry::open(&settings)?;
            info!(
                backend = "local",
                data_dir = %settings.data_dir.display(),
                registry_id = settings.registry_id,
                "backend ready"
            );
            (
                Arc::new(store),
                fleet(&format!("local:{}", settings.registry_id))?,
            )
        }
    };
    let cache = CachedRegistry::new(backend, args.cache_settings());
    let Some(fleet) = fleet else {
        crate::metrics::budget_mode(false);
        info!(
            rate_share = args.rate_share,
            put_image_rate = args.put_image_rate / f64::from(args.rate_share),
            batch_get_image_rate = args.batch_get_image_rate / f64::from(args.rate_share),
            "no --redis-url: this replica is on its own; its ECR budgets are the quotas divided by \
             --rate-share (PutImage {} / {} = {:.2}/s), and a tag moved through another replica is \
             seen here within --tag-ttl",
            args.put_image_rate,
            args.rate_share,
            args.put_image_rate / f64::from(args.rate_share),
        );
        return Ok((Arc::new(cache), None, routes));
    };
    fleet.listen(cache.tag_invalidator());
    let bus = Arc::clone(&fleet);
    Ok((Arc::new(cache.with_bus(bus)), Some(fleet), routes))
}

/// With attributed writes, every account written to needs a role for the callers' sessions:
/// the service's own among them.
fn check_attribution(routes: &Routes) -> Result<(), StartError> {
    let registries = routes.registries();
    let refuse = |what: String| {
        StartError::Config(format!(
            "--attribute-writes source-identity: {what}; each caller's writes assume that role \
             with their name as SourceIdentity"
        ))
    };
    if let Some((account, _)) = registries.roles().find(|(_, role)| role.is_none()) {
        return Err(refuse(format!(
            "account {account} has no roleArn in --registries"
        )));
    }
    match routes.own_account() {
        Some(own) if registries.account(own).is_some() => Ok(()),
        Some(own) => Err(refuse(format!(
            "the service's own account {own} is not in --registries with a roleArn"
        ))),
        None => Err(refuse(
            "the service's credentials name no account, so its own writes have no role".to_owned(),
        )),
    }
}

/// Builds the stack, binds both listeners (with the start-up files `loaded`), says where it
/// listens, and serves until `shutdown`.
pub async fn serve(
    args: ServeArgs,
    loaded: server::Loaded,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), StartError> {
    if args.backend == Backend::Local && loaded.verifies() {
        return Err(StartError::Config(
            "the policy's verify: rules need --backend ecr: the embedded store keeps no \
             signatures, referrers or scans, so enforce would refuse every image and audit \
             would report nothing true"
                .to_owned(),
        ));
    }
    let (registry, fleet, routes) = registry(&args).await?;
    let mut settings = args.server_settings();
    if let Some(own) = routes.own_account() {
        settings.own_registry_id = Some(own.to_owned());
    }
    let mut bound = server::bind_loaded(settings, loaded)
        .await?
        .with_routes(routes);
    if let Some(fleet) = fleet {
        bound = bound.with_shared_polls(fleet);
    }
    // As the runtime serving this was built, not worked out again from the flags.
    let workers = crate::runtime::current();
    info!(
        address = %bound.address(),
        admin_address = %bound.admin_address(),
        backend = args.backend.name(),
        digest_cache_bytes = args.digest_cache_bytes,
        tag_ttl = %args.tag_ttl,
        identity_source = args.identity_source.name(),
        attribute_writes = args.attribute_writes.name(),
        audit = args.audit == crate::config::Switch::On,
        workers,
        "listening"
    );
    bound.serve(registry, shutdown).await;
    info!("stopped");
    Ok(())
}

//! One ECR client per registry (account and region): its own credentials (the service's own, or
//! a role session in the account), its own rate budgets (ECR's quotas are per account and
//! region; locally, and through Redis under the registry's own keys), and its own batcher. A
//! burst to one registry never waits on another's budget.
//!
//! The service's own registry is built at start-up; the others on their first call, from the
//! registries file in force then (a changed role makes a new client). With write attribution,
//! each (registry, caller) also has a role session of its own for writes ([`Lanes::session`]).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use aws_config::{Region, SdkConfig};
use aws_credential_types::provider::SharedCredentialsProvider;
use moka::sync::Cache;
use prometheus_client::metrics::histogram::Histogram;

use super::batch::Batcher;
use super::budget::SharedSlots;
use super::calls::UpstreamCalls;
use super::client::{EcrSettings, client_config_sharing, sts_client, upstream_slots};
use super::operations::Operations;
use super::roles::{AssumedRole, StsPace};
use super::slots::UpstreamSlots;
use crate::domain::image::RegistryId;
use crate::registry::RegistryError;
use crate::registry::accounts::{Role, Routes};

/// Role sessions kept for attributed writes: each is one caller writing to one account, so a
/// busy organisation has hundreds, not tens of thousands. Past it, the least recently used is
/// dropped (and assumed again on its caller's next write).
pub const DEFAULT_MAX_ATTRIBUTED_SESSIONS: u64 = 1_000;

/// Where the fleet's shared budgets of a registry live: `<account>:<region>` names its keys.
pub trait BudgetScopes: Send + Sync {
    /// The shared slots of the registry named `scope`.
    fn slots(&self, scope: &str) -> Arc<dyn SharedSlots>;
}

/// A registry's client and batcher.
#[derive(Clone)]
pub struct Lane {
    /// The ECR calls, through this registry's client.
    pub operations: Arc<Operations>,
    /// Concurrent reads of one repository as one BatchGetImage.
    pub batcher: Arc<Batcher<Operations>>,
}

/// What makes a lane: the registry, and the role that reaches it.
type LaneKey = (RegistryId, Option<Role>);
/// An attributed session's key: the account, its role, and the caller.
type SessionKey = (String, Role, Arc<str>);

/// Every registry's lane, and the attributed sessions.
pub struct Lanes {
    sdk: SdkConfig,
    settings: EcrSettings,
    calls: UpstreamCalls,
    sizes: Histogram,
    routes: Arc<Routes>,
    own_region: String,
    budgets: Option<Arc<dyn BudgetScopes>>,
    sts: aws_sdk_sts::Client,
    pace: Arc<StsPace>,
    slots: Arc<UpstreamSlots>,
    others: Mutex<HashMap<LaneKey, Lane>>,
    /// With `--attribute-writes source-identity`: sessions by (account, role, principal).
    sessions: Option<Cache<SessionKey, SharedCredentialsProvider>>,
}

/// How other registries are reached.
pub struct LanesConfig {
    /// The service's own SDK configuration (its credentials chain and region).
    pub sdk: SdkConfig,
    /// The ECR settings every client shares.
    pub settings: EcrSettings,
    /// The registries served.
    pub routes: Arc<Routes>,
    /// The fleet's budgets by registry, with `--redis-url`.
    pub budgets: Option<Arc<dyn BudgetScopes>>,
    /// AssumeRole calls a second, at most.
    pub sts_rate: f64,
    /// Attributed write sessions kept; `None`: writes are not attributed.
    pub attributed_sessions: Option<u64>,
    /// The own client's bound on calls in flight, shared by every registry's client; `None`:
    /// a bound of their own.
    pub slots: Option<Arc<UpstreamSlots>>,
}

impl Lanes {
    /// How to make the other registries' lanes, counting their calls into `calls` and their
    /// batch sizes into `sizes` (the own lane's).
    pub fn new(sizes: Histogram, calls: UpstreamCalls, config: LanesConfig) -> Self {
        let own_region = config
            .sdk
            .region()
            .map(ToString::to_string)
            .unwrap_or_default();
        Self {
            slots: config
                .slots
                .unwrap_or_else(|| upstream_slots(&config.settings)),
            sts: sts_client(&config.sdk),
            pace: StsPace::new(config.sts_rate),
            sdk: config.sdk,
            settings: config.settings,
            calls,
            sizes,
            routes: config.routes,
            own_region,
            budgets: config.budgets,
            others: Mutex::default(),
            sessions: config
                .attributed_sessions
                .map(|capacity| Cache::builder().max_capacity(capacity).build()),
        }
    }

    /// The lane of `registry`, another than the service's own.
    pub fn lane(&self, registry: &RegistryId) -> Result<Lane, RegistryError> {
        let role = self.role_of(registry)?;
        let key = (registry.clone(), role);
        let mut others = self.others.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(lane) = others.get(&key) {
            return Ok(lane.clone());
        }
        let lane = self.build(&key.0, key.1.as_ref());
        others.insert(key, lane.clone());
        Ok(lane)
    }

    /// The role that reaches `registry`'s account now, per the registries file.
    fn role_of(&self, registry: &RegistryId) -> Result<Option<Role>, RegistryError> {
        let registries = self.routes.registries();
        match registries.account(registry.as_str()) {
            Some(account) => Ok(account.role.clone()),
            // The own account in another region needs no entry of its own to be reached (only
            // to be routed to), and no role.
            None if Some(registry.as_str()) == self.routes.own_account() => Ok(None),
            None => Err(RegistryError::NotConfigured {
                registry: registry.key(),
            }),
        }
    }

    fn build(&self, registry: &RegistryId, role: Option<&Role>) -> Lane {
        let region = registry
            .region()
            .map_or_else(|| self.own_region.clone(), |r| r.as_str().to_owned());
        let mut sdk = self.sdk.to_builder();
        sdk.set_region(Some(Region::new(region.clone())));
        if let Some(role) = role {
            let session =
                AssumedRole::shared(self.sts.clone(), role.clone(), Arc::clone(&self.pace));
            sdk.set_credentials_provider(Some(SharedCredentialsProvider::new(session)));
        }
        let sdk = sdk.build();
        let scope = format!("{}:{region}", registry.as_str());
        let shared = self.budgets.as_ref().map(|b| b.slots(&scope));
        tracing::info!(
            registry = %registry.key(),
            %region,
            role = role.map_or("(the service's own credentials)", |r| r.arn.as_str()),
            "ECR client ready for another registry"
        );
        lane(
            client_config_sharing(&sdk, &self.settings, shared, Arc::clone(&self.slots)),
            &self.settings,
            self.calls.clone(),
            self.sizes.clone(),
        )
    }

    /// The credentials of the current caller's writes to `registry`, when writes are
    /// attributed: a session of the account's role named for the caller, assumed once per
    /// session lifetime. `None` when writes are not attributed.
    pub fn session(
        &self,
        registry: Option<&RegistryId>,
    ) -> Result<Option<SharedCredentialsProvider>, RegistryError> {
        let Some(sessions) = &self.sessions else {
            return Ok(None);
        };
        let account = match registry {
            Some(registry) => registry.as_str().to_owned(),
            None => self.routes.own_account().unwrap_or_default().to_owned(),
        };
        let registries = self.routes.registries();
        let Some(role) = registries.account(&account).and_then(|a| a.role.clone()) else {
            // Checked at start-up for the file as read then; a reload that dropped the role.
            return Err(RegistryError::NotConfigured { registry: account });
        };
        let principal = crate::domain::call::caller_key();
        let key = (account, role.clone(), Arc::clone(&principal));
        Ok(Some(sessions.get_with(key, || {
            SharedCredentialsProvider::new(AssumedRole::attributed(
                self.sts.clone(),
                role,
                &principal,
                Arc::clone(&self.pace),
            ))
        })))
    }

    /// The STS pace, for its metrics.
    pub fn pace(&self) -> &StsPace {
        &self.pace
    }
}

/// A lane over a client built from `config`.
pub fn lane(
    config: aws_sdk_ecr::config::Builder,
    settings: &EcrSettings,
    calls: UpstreamCalls,
    sizes: Histogram,
) -> Lane {
    let operations = Arc::new(Operations::new(config, calls));
    Lane {
        batcher: Arc::new(
            Batcher::new(Arc::clone(&operations), settings.batch_window).with_sizes(sizes),
        ),
        operations,
    }
}

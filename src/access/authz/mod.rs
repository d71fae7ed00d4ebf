//! Per-repository authorization: which principal may read, write or delete which repository.
//!
//! The facade holds an IAM role that may write every repository it serves; without a policy it
//! would act for any caller that reaches it (a confused deputy). With `--authz-policy`, each
//! request is checked after validation, against the caller's principal ([`crate::access::identity`]),
//! the action and the validated repository name. A policy only allows: what no rule allows is
//! denied, with PERMISSION_DENIED + `ACCESS_DENIED`, and the answer never reveals the policy.
//!
//! The file is re-read every [`RELOAD_INTERVAL`]; a changed file is checked whole and swapped
//! in at once, or, if invalid, logged and counted while the old policy stays.

pub mod pattern;
pub mod policy;

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use tracing::{debug, info, warn};

pub use policy::{Action, Decision, Policy};

use crate::access::identity::Principal;
use crate::domain::image::RepositoryName;
use crate::metrics;

pub use crate::reload::RELOAD_INTERVAL;
/// The rule id a denial is logged with.
const DEFAULT_DENY: &str = "default-deny";

/// A request the policy does not allow: the API answers it with PERMISSION_DENIED +
/// `ACCESS_DENIED`, saying nothing of the policy.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the caller may not {action} repository {repository}")]
pub struct Denied {
    /// What was asked.
    pub action: Action,
    /// The (validated) repository.
    pub repository: String,
}

/// The policy in force, if any, and where it is read from.
#[derive(Debug)]
pub struct Authorizer {
    path: Option<PathBuf>,
    current: RwLock<Current>,
    metrics: AuthzMetrics,
}

/// What the authorizer counts (never by principal: its cardinality is unbounded).
#[derive(Debug, Default)]
struct AuthzMetrics {
    /// Decisions by decision (allow, deny) and action.
    decisions: Family<metrics::Labels, Counter>,
    /// 1 while the file on disk is the policy in force; 0 when it changed into an invalid one.
    valid: Gauge,
    /// Policy file changes by result (applied, invalid).
    reloads: Family<metrics::Label, Counter>,
}

#[derive(Debug)]
struct Current {
    policy: Option<Arc<Policy>>,
    /// The file's text when last read, valid or not: only a change is checked again.
    text: String,
}

impl Authorizer {
    /// No policy: everything is allowed (said once at start-up, at WARN).
    pub fn allow_all() -> Self {
        Self {
            path: None,
            current: RwLock::new(Current {
                policy: None,
                text: String::new(),
            }),
            metrics: AuthzMetrics::default(),
        }
    }

    /// The policy in `path`, which must be readable and valid.
    pub fn from_file(path: &Path) -> Result<Self, String> {
        let text = crate::reload::read(path)?;
        let policy = Policy::parse(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        let metrics = AuthzMetrics::default();
        metrics.valid.set(1);
        Ok(Self {
            path: Some(path.to_owned()),
            current: RwLock::new(Current {
                policy: Some(Arc::new(policy)),
                text,
            }),
            metrics,
        })
    }

    /// Says at start-up what is enforced.
    pub fn announce(&self) {
        match &self.path {
            Some(path) => {
                let rules = self.policy().map_or(0, |p| p.len());
                info!(policy = %path.display(), rules, "authorization policy in force");
            }
            None => warn!(
                "no --authz-policy: every caller may read, write and delete every repository the \
                 service's IAM role can reach"
            ),
        }
    }

    fn policy(&self) -> Option<Arc<Policy>> {
        match self.current.read() {
            Ok(current) => current.policy.clone(),
            Err(poisoned) => poisoned.into_inner().policy.clone(),
        }
    }

    /// Allows the request, or denies it with PERMISSION_DENIED. Every decision is one DEBUG
    /// line; a denial also INFO.
    pub fn check(
        &self,
        principal: &Principal,
        action: Action,
        account: &str,
        repository: &RepositoryName,
    ) -> Result<(), Denied> {
        let Some(policy) = self.policy() else {
            return Ok(());
        };
        let decision = policy.decide(principal, action, account, repository);
        let label = match &decision {
            Decision::Allow(_) => "allow",
            Decision::Deny => "deny",
        };
        self.metrics
            .decisions
            .get_or_create(&[("decision", label), ("action", action.as_str())])
            .inc();
        let repository_name = repository.as_str();
        match decision {
            Decision::Allow(rule) => {
                debug!(%principal, %action, account, repository = repository_name, rule, "authorization: allow");
                Ok(())
            }
            Decision::Deny => {
                info!(%principal, %action, account, repository = repository_name, rule = DEFAULT_DENY, "authorization: deny");
                Err(Denied {
                    action,
                    repository: repository_name.to_owned(),
                })
            }
        }
    }

    /// The `verify:` rule of the policy in force that decides for `repository`, if one is on.
    pub fn verify_rule(
        &self,
        repository: &RepositoryName,
    ) -> Option<Arc<crate::access::verify::VerifyRule>> {
        let policy = self.policy()?;
        policy.verify_rule(repository).cloned()
    }

    /// Whether the policy in force verifies anything.
    pub fn verifies(&self) -> bool {
        self.policy().is_some_and(|p| p.verifies())
    }

    /// [`check`](Self::check) of every one of `actions` (a method's, from the API's table).
    pub fn check_all(
        &self,
        principal: &Principal,
        actions: &[Action],
        account: &str,
        repository: &RepositoryName,
    ) -> Result<(), Denied> {
        actions
            .iter()
            .try_for_each(|action| self.check(principal, *action, account, repository))
    }

    /// Re-reads the file; a changed, valid policy replaces the current one. Whether it changed.
    pub fn reload(&self) -> Result<bool, String> {
        let Some(path) = &self.path else {
            return Ok(false);
        };
        let text = match crate::reload::read(path) {
            Ok(text) => text,
            // Deleted, or a dangling symlink: the policy in force stays, but the file on disk
            // is not it, which is what `authz_policy_valid` says. Forgetting the text makes the
            // file's return a change, so that it is read, checked and counted again.
            Err(err) => {
                self.metrics.valid.set(0);
                match self.current.write() {
                    Ok(mut current) => current.text.clear(),
                    Err(poisoned) => poisoned.into_inner().text.clear(),
                }
                return Err(err);
            }
        };
        let unchanged = match self.current.read() {
            Ok(current) => current.text == text,
            Err(_) => false,
        };
        if unchanged {
            return Ok(false);
        }
        let reloads = &self.metrics.reloads;
        let parsed = Policy::parse(&text);
        let mut current = match self.current.write() {
            Ok(current) => current,
            Err(poisoned) => poisoned.into_inner(),
        };
        current.text = text;
        match parsed {
            Ok(policy) => {
                let rules = policy.len();
                current.policy = Some(Arc::new(policy));
                drop(current);
                self.metrics.valid.set(1);
                reloads.get_or_create(&[("result", "applied")]).inc();
                info!(policy = %path.display(), rules, "authorization policy reloaded");
                Ok(true)
            }
            Err(err) => {
                drop(current);
                self.metrics.valid.set(0);
                reloads.get_or_create(&[("result", "invalid")]).inc();
                Err(format!("{}: {err}", path.display()))
            }
        }
    }

    /// Adds the authorizer's metrics to `registry`.
    pub fn register_metrics(&self, registry: &mut prometheus_client::registry::Registry) {
        registry.register(
            "authz_decisions",
            "Authorization decisions by decision and action",
            self.metrics.decisions.clone(),
        );
        registry.register(
            "authz_policy_valid",
            "1 while the policy file on disk is the one in force; 0 when it became invalid",
            self.metrics.valid.clone(),
        );
        registry.register(
            "authz_policy_reloads",
            "Policy file changes by result (applied, invalid)",
            self.metrics.reloads.clone(),
        );
    }

    /// Re-reads the policy every [`RELOAD_INTERVAL`] until the process ends; an invalid
    /// change is logged once.
    pub async fn watch(self: Arc<Self>) {
        if self.path.is_none() {
            return;
        }
        crate::reload::every_interval("authorization policy", || self.reload()).await;
    }
}

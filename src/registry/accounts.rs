//! Which registries the service serves: its own account in its own region always, and with
//! `--registries FILE` the accounts and regions that file names, each with the IAM role the
//! service assumes there.
//!
//! ```yaml
//! registries:
//!   - account: "111122223333"          # 12 digits, quoted
//!     roleArn: arn:aws:iam::111122223333:role/ecr-image-service
//!     externalId: optional-string      # optional
//!     sessionDuration: 1h              # optional; chained sessions cannot exceed 1 h
//!     regions: [us-east-1, eu-west-1]  # optional; default: the service's region
//!   - account: "123456789012"          # the service's own account: no roleArn
//! ```
//!
//! A request is routed ([`Routes::route`]) to `None`, the service's own registry, or to a
//! [`RegistryId`] the file names, before authorization and before any AWS call; anything else
//! is [`NotConfigured`], and the refusal says nothing else of the file. The file is re-read
//! every [`crate::reload::RELOAD_INTERVAL`]; an invalid change is logged and the previous
//! version stays.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use serde::Deserialize;
use tracing::info;

use crate::domain::image::{Region, RegistryId};

/// AWS's own default for AssumeRole, and its cap when the service's identity is itself an
/// assumed role (IRSA in EKS): a chained session cannot last longer.
pub const DEFAULT_SESSION_DURATION: Duration = Duration::from_secs(3600);
/// AssumeRole's minimum `DurationSeconds`.
const MIN_SESSION_DURATION: Duration = Duration::from_secs(900);
/// The cap on a chained session: a longer request fails at STS on every call, so it is refused
/// when the file is read instead.
const MAX_SESSION_DURATION: Duration = DEFAULT_SESSION_DURATION;

/// The file's shape.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RegistriesFile {
    registries: Vec<EntryFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct EntryFile {
    account: String,
    role_arn: Option<String>,
    external_id: Option<String>,
    session_duration: Option<String>,
    regions: Option<Vec<String>>,
}

/// The role the service assumes to reach an account.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Role {
    /// The role's ARN.
    pub arn: String,
    /// The external ID the role's trust policy asks for, if any.
    pub external_id: Option<String>,
    /// How long each session lasts (15 min to 1 h).
    pub session_duration: Duration,
}

/// One account of the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Account {
    /// The role to assume there; `None`: the service's own credentials reach it.
    pub role: Option<Role>,
    /// The regions served; empty: the service's own.
    pub regions: Vec<Region>,
}

/// A checked registries file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Registries {
    accounts: BTreeMap<String, Account>,
}

impl Registries {
    /// Parses and checks a registries file: accounts 12 digits and listed once, role ARNs
    /// well-formed, durations within STS's limits, regions valid. The first problem is the
    /// error.
    pub fn parse(text: &str) -> Result<Self, String> {
        let file: RegistriesFile = serde_yaml_ng::from_str(text).map_err(|e| e.to_string())?;
        let mut accounts = BTreeMap::new();
        for entry in file.registries {
            let account = RegistryId::parse(&entry.account)
                .map_err(|e| format!("account {:?}: {}", entry.account, e.0))?;
            let context = |e: String| format!("account {}: {e}", entry.account);
            let role = entry
                .role_arn
                .map(|arn| {
                    check_role_arn(&arn).map_err(context)?;
                    let session_duration = match &entry.session_duration {
                        None => DEFAULT_SESSION_DURATION,
                        Some(text) => session_duration(text).map_err(context)?,
                    };
                    Ok::<_, String>(Role {
                        arn,
                        external_id: entry.external_id.clone(),
                        session_duration,
                    })
                })
                .transpose()?;
            if role.is_none() && (entry.external_id.is_some() || entry.session_duration.is_some()) {
                return Err(context(
                    "externalId and sessionDuration need a roleArn".to_owned(),
                ));
            }
            let regions = entry
                .regions
                .unwrap_or_default()
                .iter()
                .map(|r| Region::parse(r).map_err(|e| context(format!("region {r:?}: {}", e.0))))
                .collect::<Result<Vec<_>, _>>()?;
            let key = account.as_str().to_owned();
            if accounts.insert(key, Account { role, regions }).is_some() {
                return Err(context("listed twice".to_owned()));
            }
        }
        Ok(Self { accounts })
    }

    /// The account's entry, if the file names it.
    pub fn account(&self, account: &str) -> Option<&Account> {
        self.accounts.get(account)
    }

    /// How many accounts the file names.
    pub fn len(&self) -> usize {
        self.accounts.len()
    }

    /// Whether the file names no account.
    pub fn is_empty(&self) -> bool {
        self.accounts.is_empty()
    }

    /// Every (account, role) pair with a role, for start-up checks.
    pub fn roles(&self) -> impl Iterator<Item = (&str, Option<&Role>)> {
        self.accounts
            .iter()
            .map(|(account, entry)| (account.as_str(), entry.role.as_ref()))
    }
}

/// `arn:<partition>:iam::<12 digits>:role/<name>`.
fn check_role_arn(arn: &str) -> Result<(), String> {
    let mut parts = arn.splitn(6, ':');
    let well_formed = parts.next() == Some("arn")
        && parts.next().is_some_and(|p| p.starts_with("aws"))
        && parts.next() == Some("iam")
        && parts.next() == Some("")
        && parts.next().is_some_and(|a| RegistryId::parse(a).is_ok())
        && parts
            .next()
            .and_then(|r| r.strip_prefix("role/"))
            .is_some_and(|name| !name.is_empty());
    if well_formed {
        Ok(())
    } else {
        Err(format!(
            "roleArn {arn:?} is not an IAM role ARN (arn:aws:iam::<account>:role/<name>)"
        ))
    }
}

fn session_duration(text: &str) -> Result<Duration, String> {
    let duration =
        humantime::parse_duration(text).map_err(|e| format!("sessionDuration {text:?}: {e}"))?;
    if (MIN_SESSION_DURATION..=MAX_SESSION_DURATION).contains(&duration) {
        Ok(duration)
    } else {
        Err(format!(
            "sessionDuration {text:?} must be 15m to 1h: STS refuses shorter sessions, and \
             caps a chained session (the service's IRSA role assuming another) at 1 hour"
        ))
    }
}

/// A request for a registry the service does not serve. Says only what was asked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotConfigured {
    /// The account asked for ("" for the service's own).
    pub registry_id: String,
    /// The region asked for ("" for the service's own).
    pub region: String,
}

/// The registries served: the service's own account and region, and the file's, re-read
/// while the service runs.
#[derive(Debug)]
pub struct Routes {
    /// The service's account; `None` when its credentials do not say.
    own_account: Option<String>,
    /// The service's region.
    own_region: Option<Region>,
    path: Option<PathBuf>,
    current: RwLock<(String, Arc<Registries>)>,
}

impl Routes {
    /// Only the service's own registry.
    pub fn own(own_account: Option<String>, own_region: Option<&str>) -> Self {
        Self {
            own_account,
            own_region: own_region.and_then(|r| Region::parse(r).ok()),
            path: None,
            current: RwLock::new((String::new(), Arc::default())),
        }
    }

    /// The service's own registry and those of the file at `path`, read now.
    pub fn from_file(
        own_account: Option<String>,
        own_region: Option<&str>,
        path: &Path,
    ) -> Result<Self, String> {
        let text = crate::reload::read(path)?;
        let registries =
            Registries::parse(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        info!(registries = %path.display(), accounts = registries.len(), "registries file read");
        Ok(Self {
            path: Some(path.to_owned()),
            current: RwLock::new((text, Arc::new(registries))),
            ..Self::own(own_account, own_region)
        })
    }

    /// The file's content in force.
    pub fn registries(&self) -> Arc<Registries> {
        match self.current.read() {
            Ok(current) => Arc::clone(&current.1),
            Err(poisoned) => Arc::clone(&poisoned.into_inner().1),
        }
    }

    /// The service's own account, if known.
    pub fn own_account(&self) -> Option<&str> {
        self.own_account.as_deref()
    }

    /// The service's own region, if known.
    pub fn own_region(&self) -> Option<&str> {
        self.own_region.as_ref().map(Region::as_str)
    }

    /// Where a request naming `account` and `region` (each `None` for the service's own) goes:
    /// `None` for the service's own registry, in the one spelling every key uses (the own
    /// account and region named explicitly are the same registry as neither); the file's
    /// registry otherwise; [`NotConfigured`] for anything the service does not serve.
    pub fn route(
        &self,
        account: Option<&RegistryId>,
        region: Option<&Region>,
    ) -> Result<Option<RegistryId>, NotConfigured> {
        let refuse = || NotConfigured {
            registry_id: account.map(|a| a.as_str().to_owned()).unwrap_or_default(),
            region: region.map(|r| r.as_str().to_owned()).unwrap_or_default(),
        };
        let region = region.filter(|r| Some(*r) != self.own_region.as_ref());
        let account = account.map(RegistryId::as_str);
        let own = account.is_none() || account == self.own_account.as_deref();
        if own && region.is_none() {
            return Ok(None);
        }
        let Some(account) = account.or(self.own_account.as_deref()) else {
            return Err(refuse());
        };
        let registries = self.registries();
        let Some(entry) = registries.account(account) else {
            return Err(refuse());
        };
        let served = match region {
            None => {
                entry.regions.is_empty()
                    || entry
                        .regions
                        .iter()
                        .any(|r| Some(r) == self.own_region.as_ref())
            }
            Some(region) => entry.regions.contains(region),
        };
        if !served {
            return Err(refuse());
        }
        let id = RegistryId::parse(account).map_err(|_| refuse())?;
        Ok(Some(id.in_region(region.cloned())))
    }

    /// Re-reads the file; a changed, valid file replaces the current one. Whether it changed.
    pub fn reload(&self) -> Result<bool, String> {
        let Some(path) = &self.path else {
            return Ok(false);
        };
        let text = crate::reload::read(path)?;
        let unchanged = self.current.read().map(|c| c.0 == text).unwrap_or(false);
        if unchanged {
            return Ok(false);
        }
        let registries =
            Registries::parse(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        let accounts = registries.len();
        match self.current.write() {
            Ok(mut current) => *current = (text, Arc::new(registries)),
            Err(poisoned) => *poisoned.into_inner() = (text, Arc::new(registries)),
        }
        info!(registries = %path.display(), accounts, "registries file reloaded");
        Ok(true)
    }

    /// Re-reads the file every [`crate::reload::RELOAD_INTERVAL`] until the process ends.
    pub async fn watch(self: Arc<Self>) {
        if self.path.is_none() {
            return;
        }
        crate::reload::every_interval("registries file", || self.reload()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = r#"
registries:
  - account: "111122223333"
    roleArn: arn:aws:iam::111122223333:role/ecr-image-service
    externalId: x
    sessionDuration: 30m
    regions: [us-east-1, eu-west-1]
  - account: "123456789012"
"#;

    fn routes() -> Routes {
        let routes = Routes::own(Some("123456789012".into()), Some("us-east-1"));
        *routes.current.write().unwrap() =
            (String::new(), Arc::new(Registries::parse(FILE).unwrap()));
        routes
    }

    fn id(account: &str) -> RegistryId {
        RegistryId::parse(account).unwrap()
    }

    fn region(name: &str) -> Region {
        Region::parse(name).unwrap()
    }

    #[test]
    fn the_documented_shape_parses() {
        let registries = Registries::parse(FILE).unwrap();
        let role = registries
            .account("111122223333")
            .unwrap()
            .role
            .clone()
            .unwrap();
        assert_eq!(role.session_duration, Duration::from_secs(1800));
        assert_eq!(role.external_id.as_deref(), Some("x"));
        assert!(registries.account("123456789012").unwrap().role.is_none());
    }

    #[test]
    fn a_bad_file_is_refused_with_its_reason() {
        for (text, says) in [
            ("registries: [{account: \"1234\"}]", "12-digit"),
            (
                "registries: [{account: \"111122223333\", roleArn: \"role/x\"}]",
                "not an IAM role ARN",
            ),
            (
                "registries: [{account: \"111122223333\", roleArn: \"arn:aws:iam::111122223333:role/x\", sessionDuration: 2h}]",
                "15m to 1h",
            ),
            (
                "registries: [{account: \"111122223333\", regions: [\"Mars\"]}]",
                "region",
            ),
            (
                "registries: [{account: \"111122223333\"}, {account: \"111122223333\"}]",
                "twice",
            ),
            (
                "registries: [{account: \"111122223333\", externalId: e}]",
                "need a roleArn",
            ),
            (
                "registries: [{account: \"111122223333\", role: x}]",
                "unknown field",
            ),
        ] {
            let err = Registries::parse(text).unwrap_err();
            assert!(err.contains(says), "{text}: {err}");
        }
    }

    /// The own registry has one spelling, `None`; the file's registries route to themselves;
    /// anything else is refused with what was asked.
    #[test]
    fn requests_route_to_the_registries_served() {
        let routes = routes();
        let own = id("123456789012");
        let us = region("us-east-1");
        assert_eq!(routes.route(None, None), Ok(None));
        assert_eq!(routes.route(Some(&own), Some(&us)), Ok(None));
        let other = id("111122223333");
        assert_eq!(routes.route(Some(&other), None), Ok(Some(other.clone())));
        let eu = region("eu-west-1");
        assert_eq!(
            routes.route(Some(&other), Some(&eu)),
            Ok(Some(other.clone().in_region(Some(eu.clone()))))
        );
        // The own account is not listed in eu-west-1.
        assert_eq!(
            routes.route(None, Some(&eu)),
            Err(NotConfigured {
                registry_id: String::new(),
                region: "eu-west-1".into()
            })
        );
        assert_eq!(
            routes.route(Some(&other), Some(&region("ap-south-1"))),
            Err(NotConfigured {
                registry_id: "111122223333".into(),
                region: "ap-south-1".into()
            })
        );
        assert!(routes.route(Some(&id("999999999999")), None).is_err());
    }

    /// Without a file, only the own registry is served, as before.
    #[test]
    fn without_a_file_only_the_own_registry_is_served() {
        let routes = Routes::own(Some("123456789012".into()), Some("us-east-1"));
        assert_eq!(routes.route(Some(&id("123456789012")), None), Ok(None));
        assert!(routes.route(Some(&id("111122223333")), None).is_err());
        assert!(routes.route(None, Some(&region("eu-west-1"))).is_err());
        let unknown = Routes::own(None, Some("us-east-1"));
        assert_eq!(unknown.route(None, None), Ok(None));
        assert!(unknown.route(Some(&id("123456789012")), None).is_err());
    }
}

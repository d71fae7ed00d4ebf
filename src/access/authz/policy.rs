//! The authorization policy: additive allow rules, read from YAML (or JSON). Whatever no rule
//! allows is denied; there are no deny rules to reason about.
//!
//! ```yaml
//! rules:
//!   - id: ci-team-a
//!     principals: ["spiffe://cluster.local/ns/ci/sa/builder"]
//!     actions: [read, write]
//!     repositories: ["team-a/**"]
//! ```

use std::collections::HashSet;
use std::fmt;
use std::sync::Arc;

use serde::Deserialize;

use super::pattern::Pattern;
use crate::access::identity::Principal;
use crate::access::verify::VerifyRule;
use crate::domain::image::{RegistryId, RepositoryName};

/// What a caller does to a repository.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// GetImage, ResolveImage, ListImages, DescribeImages, WatchTag, and RetagImage on its
    /// source (the API's method table says which RPC needs what).
    Read,
    /// PutImage, and RetagImage on its targets.
    Write,
    /// Deleting images.
    Delete,
}

impl Action {
    /// The action's name, as policies and metric labels spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Read => "read",
            Self::Write => "write",
            Self::Delete => "delete",
        }
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The file's shape, before its patterns are checked.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyFile {
    rules: Vec<RuleFile>,
    /// Verified reads: which repositories' images must be signed (and scanned).
    #[serde(default)]
    verify: Vec<crate::access::verify::RuleFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleFile {
    id: String,
    principals: Vec<String>,
    actions: Vec<Action>,
    repositories: Vec<String>,
    /// The accounts the rule applies to; absent: every account served.
    #[serde(default)]
    registries: Option<Vec<String>>,
}

/// One allow rule, its patterns checked.
#[derive(Debug, Clone)]
pub struct Rule {
    /// The rule's name, reported by audits and decision log lines.
    pub id: String,
    principals: Vec<Pattern>,
    actions: Vec<Action>,
    repositories: Vec<Pattern>,
    /// The accounts (12-digit IDs) the rule applies to; `None`: every account.
    registries: Option<Vec<String>>,
}

/// A checked policy.
#[derive(Debug, Clone)]
pub struct Policy {
    rules: Vec<Rule>,
    /// The `verify:` rules, in order: the first covering a repository decides.
    verify: Vec<Arc<VerifyRule>>,
}

/// What the policy says about one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Allowed by the rule with this id.
    Allow(String),
    /// No rule allows it.
    Deny,
}

impl Policy {
    /// Parses and checks a policy: every field present, every pattern valid, rule ids unique
    /// and non-empty, no rule empty. The first problem is the error.
    pub fn parse(text: &str) -> Result<Self, String> {
        let file: PolicyFile = serde_yaml_ng::from_str(text).map_err(|e| e.to_string())?;
        let mut ids = HashSet::new();
        let rules = file
            .rules
            .into_iter()
            .map(|rule| {
                if rule.id.is_empty() || !ids.insert(rule.id.clone()) {
                    return Err(format!("rule id {:?} is empty or repeated", rule.id));
                }
                let context = |e: String| format!("rule {:?}: {e}", rule.id);
                if rule.principals.is_empty()
                    || rule.actions.is_empty()
                    || rule.repositories.is_empty()
                {
                    return Err(context(
                        "principals, actions and repositories must each list one at least"
                            .to_owned(),
                    ));
                }
                if let Some(bad) = rule
                    .registries
                    .iter()
                    .flatten()
                    .find(|r| RegistryId::parse(r).is_err())
                {
                    return Err(context(format!(
                        "registries: {bad:?} is not a 12-digit AWS account ID"
                    )));
                }
                if rule.registries.as_ref().is_some_and(Vec::is_empty) {
                    return Err(context(
                        "registries, when given, must list one account at least".to_owned(),
                    ));
                }
                Ok(Rule {
                    registries: rule.registries,
                    principals: rule
                        .principals
                        .iter()
                        .map(|p| Pattern::principal(p))
                        .collect::<Result<_, _>>()
                        .map_err(context)?,
                    repositories: rule
                        .repositories
                        .iter()
                        .map(|r| Pattern::repository(r))
                        .collect::<Result<_, _>>()
                        .map_err(context)?,
                    actions: rule.actions,
                    id: rule.id,
                })
            })
            .collect::<Result<_, _>>()?;
        let mut verify_ids = HashSet::new();
        let verify = file
            .verify
            .into_iter()
            .map(|rule| {
                let rule = VerifyRule::parse(rule)?;
                if !verify_ids.insert(rule.id.clone()) {
                    return Err(format!("verify rule id {:?} is repeated", rule.id));
                }
                Ok(Arc::new(rule))
            })
            .collect::<Result<_, String>>()?;
        Ok(Self { rules, verify })
    }

    /// The `verify:` rule that decides for `repository`, unless it is `off` or there is none.
    pub fn verify_rule(&self, repository: &RepositoryName) -> Option<&Arc<VerifyRule>> {
        self.verify
            .iter()
            .find(|rule| rule.covers(repository))
            .filter(|rule| rule.mode != crate::access::verify::Mode::Off)
    }

    /// Whether any `verify:` rule is on.
    pub fn verifies(&self) -> bool {
        self.verify
            .iter()
            .any(|r| r.mode != crate::access::verify::Mode::Off)
    }

    /// The first rule that allows `principal` to do `action` to `repository` of `account`
    /// (`""` when the service's own account is not known: only rules without `registries`
    /// then apply), if any.
    pub fn decide(
        &self,
        principal: &Principal,
        action: Action,
        account: &str,
        repository: &RepositoryName,
    ) -> Decision {
        self.rules
            .iter()
            .find(|rule| {
                rule.actions.contains(&action)
                    && rule
                        .registries
                        .as_ref()
                        .is_none_or(|accounts| accounts.iter().any(|a| a == account))
                    && rule
                        .principals
                        .iter()
                        .any(|p| p.matches_principal(principal))
                    && rule
                        .repositories
                        .iter()
                        .any(|r| r.matches_repository(repository))
            })
            .map_or(Decision::Deny, |rule| Decision::Allow(rule.id.clone()))
    }

    /// How many rules there are.
    pub fn len(&self) -> usize {
        self.rules.len()
    }

    /// Whether there are no rules (everything is denied).
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = include_str!("../../../tests/fixtures/policy/example.yaml");

    fn decide(principal: &str, action: Action, repository: &str) -> Decision {
        Policy::parse(EXAMPLE).unwrap().decide(
            &Principal::named(principal),
            action,
            "123456789012",
            &RepositoryName::parse(repository).unwrap(),
        )
    }

    #[test]
    fn the_issues_example_allows_what_it_lists_and_nothing_else() {
        let builder = "spiffe://cluster.local/ns/ci/sa/builder";
        let other = "spiffe://cluster.local/ns/web/sa/frontend";
        assert_eq!(
            decide(builder, Action::Write, "team-a/app"),
            Decision::Allow("ci-team-a".into())
        );
        assert_eq!(
            decide(builder, Action::Delete, "team-a/app"),
            Decision::Deny
        );
        assert_eq!(decide(builder, Action::Write, "team-b/app"), Decision::Deny);
        assert_eq!(
            decide(other, Action::Read, "base/debian"),
            Decision::Allow("everyone-reads-base".into())
        );
        assert_eq!(decide(other, Action::Write, "base/debian"), Decision::Deny);
        assert_eq!(
            decide("anonymous", Action::Read, "base/debian"),
            Decision::Deny
        );
        assert_eq!(
            decide(other, Action::Read, "base/debian/slim"),
            Decision::Deny
        );
    }

    /// A rule naming accounts allows nothing in any other.
    #[test]
    fn a_rule_may_restrict_accounts() {
        let policy = Policy::parse(
            "rules: [{id: a-only, principals: ['*'], actions: [write], repositories: ['**'], \
             registries: ['111122223333']}]",
        )
        .unwrap();
        let repo = RepositoryName::parse("team/app").unwrap();
        let caller = Principal::named("spiffe://cluster.local/ns/ci/sa/builder");
        assert_eq!(
            policy.decide(&caller, Action::Write, "111122223333", &repo),
            Decision::Allow("a-only".into())
        );
        assert_eq!(
            policy.decide(&caller, Action::Write, "444455556666", &repo),
            Decision::Deny
        );
        assert_eq!(
            policy.decide(&caller, Action::Write, "", &repo),
            Decision::Deny
        );
    }

    #[test]
    fn bad_policies_are_refused_with_the_reason() {
        for (text, says) in [
            (
                "rules: [{id: a, principals: ['*'], actions: [fly], repositories: ['xx']}]",
                "fly",
            ),
            (
                "rules: [{id: a, principals: ['*'], actions: [read], repositories: ['X/*']}]",
                "rule \"a\"",
            ),
            (
                "rules: [{id: a, principals: ['*'], actions: [read], repositories: []}]",
                "at least",
            ),
            (
                "rules: [{id: a, principals: ['*'], actions: [read], repositories: ['xx'], extra: 1}]",
                "extra",
            ),
            (
                "rules: [{id: a, principals: ['*'], actions: [read], repositories: ['xx']}, {id: a, principals: ['*'], actions: [read], repositories: ['xx']}]",
                "repeated",
            ),
            ("{}", "rules"),
            (
                "rules: [{id: a, principals: ['*'], actions: [read], repositories: ['xx'], registries: ['42']}]",
                "12-digit",
            ),
            (
                "rules: [{id: a, principals: ['*'], actions: [read], repositories: ['xx'], registries: []}]",
                "one account",
            ),
        ] {
            let err = Policy::parse(text).unwrap_err();
            assert!(err.contains(says), "{text}: {err}");
        }
        assert!(Policy::parse("rules: []").unwrap().is_empty());
    }
}

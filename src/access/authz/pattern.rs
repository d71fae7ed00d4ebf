//! Segment-aware patterns for policy rules: `*` is exactly one segment, `**` is zero or more
//! segments, and there are no other metacharacters. Unlike IAM's `*` or a default `globset`,
//! nothing crosses a segment boundary by accident: `team-a/*` never matches `team-admin/x` or
//! `team-a/x/y`.

use crate::access::identity::{self, Principal};
use crate::domain::image::RepositoryName;

/// One segment of a pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    /// Exactly this text.
    Literal(String),
    /// Any one segment.
    One,
    /// Zero or more segments.
    Any,
}

/// A pattern over `/`-separated repository names, or over principals.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pattern {
    segments: Vec<Segment>,
    separator: char,
    /// The lone `*` principal: any authenticated caller.
    any_authenticated: bool,
}

impl Pattern {
    /// A repository pattern: segments of ECR's repository grammar, `*` or `**`.
    pub fn repository(text: &str) -> Result<Self, String> {
        let segments = segments(text, '/', true)?;
        // The literal parts must be a repository name's parts.
        RepositoryName::parse(&example(&segments, '/'))
            .map_err(|e| format!("repository pattern {text:?}: {e}"))?;
        Ok(Self {
            segments,
            separator: '/',
            any_authenticated: false,
        })
    }

    /// A principal pattern: `*` alone (any authenticated caller), a SPIFFE ID whose path
    /// segments may be `*` or `**`, a Linkerd identity whose labels may be `*`, or `anonymous`.
    pub fn principal(text: &str) -> Result<Self, String> {
        if text == "*" {
            return Ok(Self {
                segments: Vec::new(),
                separator: '/',
                any_authenticated: true,
            });
        }
        if text == identity::ANONYMOUS {
            return Ok(Self {
                segments: vec![Segment::Literal(text.to_owned())],
                separator: '/',
                any_authenticated: false,
            });
        }
        let (separator, example_ok): (char, fn(&str) -> bool) = if text.starts_with("spiffe://") {
            ('/', identity::is_spiffe_id)
        } else {
            ('.', identity::is_dns_identity)
        };
        let segments = segments(text, separator, separator == '/')?;
        if !example_ok(&example(&segments, separator)) {
            return Err(format!(
                "principal pattern {text:?} is not a SPIFFE ID or a Linkerd identity, with * \
                 only as a whole segment"
            ));
        }
        Ok(Self {
            segments,
            separator,
            any_authenticated: false,
        })
    }

    /// Whether `repository` matches.
    pub fn matches_repository(&self, repository: &RepositoryName) -> bool {
        self.matches_text(repository.as_str())
    }

    /// Whether `principal` matches. A Linkerd pattern matches only Linkerd (DNS) identities:
    /// split at dots, `*.ci.serviceaccount.identity.linkerd.cluster.local` would otherwise take
    /// `spiffe://evil/x.ci.serviceaccount.identity.linkerd.cluster.local` for one, its `*`
    /// swallowing a whole SPIFFE ID. (A SPIFFE pattern's first segment is `spiffe:`, which no
    /// other kind of identity has.)
    pub fn matches_principal(&self, principal: &Principal) -> bool {
        if self.any_authenticated {
            return !principal.is_anonymous();
        }
        if self.separator == '.' && !identity::is_dns_identity(principal.as_str()) {
            return false;
        }
        self.matches_text(principal.as_str())
    }

    fn matches_text(&self, text: &str) -> bool {
        let parts: Vec<&str> = text.split(self.separator).collect();
        matches(&self.segments, &parts)
    }
}

/// A text the pattern matches, every wildcard standing for `xx`: its literal parts can then be
/// checked by the grammar of what the pattern matches.
fn example(segments: &[Segment], separator: char) -> String {
    segments
        .iter()
        .map(|s| match s {
            Segment::Literal(l) => l.as_str(),
            Segment::One | Segment::Any => "xx",
        })
        .collect::<Vec<_>>()
        .join(&separator.to_string())
}

/// `text` split at `separator` into segments; `**` only where `allow_any`.
fn segments(text: &str, separator: char, allow_any: bool) -> Result<Vec<Segment>, String> {
    text.split(separator)
        .map(|part| match part {
            "*" => Ok(Segment::One),
            "**" if allow_any => Ok(Segment::Any),
            part if part.contains('*') => Err(format!(
                "pattern {text:?}: `*` and `**` must be whole segments"
            )),
            part => Ok(Segment::Literal(part.to_owned())),
        })
        .collect()
}

/// Whether `parts` match `pattern`, `Any` standing for zero or more parts. Backtracks only to
/// the last `Any`, so the cost is at most patterns × parts.
fn matches(pattern: &[Segment], parts: &[&str]) -> bool {
    let (mut p, mut t) = (0, 0);
    let mut resume: Option<(usize, usize)> = None;
    while t < parts.len() {
        match pattern.get(p) {
            Some(Segment::Any) => {
                resume = Some((p, t));
                p += 1;
            }
            Some(Segment::One) => {
                p += 1;
                t += 1;
            }
            Some(Segment::Literal(l)) if l == parts[t] => {
                p += 1;
                t += 1;
            }
            _ => match resume {
                Some((any, from)) => {
                    p = any + 1;
                    t = from + 1;
                    resume = Some((any, from + 1));
                }
                None => return false,
            },
        }
    }
    pattern[p..].iter().all(|s| *s == Segment::Any)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 20, finding 7: a SPIFFE ID ending in a Linkerd identity's labels is no Linkerd
    /// identity.
    #[test]
    fn a_linkerd_pattern_matches_only_linkerd_identities() {
        let pattern =
            Pattern::principal("*.ci.serviceaccount.identity.linkerd.cluster.local").unwrap();
        let linkerd = Principal::named("builder.ci.serviceaccount.identity.linkerd.cluster.local");
        assert!(pattern.matches_principal(&linkerd));
        let forged =
            Principal::named("spiffe://evil/x.ci.serviceaccount.identity.linkerd.cluster.local");
        assert!(!pattern.matches_principal(&forged));
        let spiffe = Pattern::principal("spiffe://cluster.local/ns/ci/sa/*").unwrap();
        assert!(!spiffe.matches_principal(&linkerd));
    }
    use proptest::prelude::*;

    fn repo(pattern: &str, name: &str) -> bool {
        Pattern::repository(pattern)
            .unwrap()
            .matches_repository(&RepositoryName::parse(name).unwrap())
    }

    #[test]
    fn one_star_is_exactly_one_segment() {
        assert!(repo("team-a/*", "team-a/x"));
        assert!(!repo("team-a/*", "team-a/x/y"));
        assert!(!repo("team-a/*", "team-admin/x"));
        assert!(!repo("team-a/*", "team-a"));
    }

    #[test]
    fn two_stars_are_zero_or_more_segments() {
        assert!(repo("team-a/**", "team-a"));
        assert!(repo("team-a/**", "team-a/x"));
        assert!(repo("team-a/**", "team-a/x/y/z"));
        assert!(!repo("team-a/**", "team-admin/x"));
        assert!(repo("**/base", "base"));
        assert!(repo("**/base", "a/b/base"));
        assert!(!repo("**/base", "a/base/c"));
        assert!(repo("a/**/z", "a/z"));
        assert!(repo("a/**/z", "a/b/c/z"));
        assert!(repo("**", "anything/at/all"));
    }

    #[test]
    fn patterns_are_validated() {
        for bad in ["team-a/x*", "Team-A/*", "team-a//x", "../x", "*a"] {
            assert!(Pattern::repository(bad).is_err(), "{bad}");
        }
        for bad in [
            "spiffe://td/ns/ci*",
            "spiffe://TD/x",
            "**",
            "web.*x.identity",
            "x",
        ] {
            assert!(Pattern::principal(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn principal_patterns_match_by_segment_and_star_means_authenticated() {
        let builder = Principal::named("spiffe://cluster.local/ns/ci/sa/builder");
        let spiffe = Pattern::principal("spiffe://cluster.local/ns/*/sa/builder").unwrap();
        assert!(spiffe.matches_principal(&builder));
        assert!(!spiffe.matches_principal(&Principal::named(
            "spiffe://cluster.local/ns/ci/x/sa/builder"
        )));
        let linkerd =
            Pattern::principal("*.ci.serviceaccount.identity.linkerd.cluster.local").unwrap();
        assert!(linkerd.matches_principal(&Principal::named(
            "builder.ci.serviceaccount.identity.linkerd.cluster.local"
        )));
        assert!(!linkerd.matches_principal(&Principal::named(
            "a.b.ci.serviceaccount.identity.linkerd.cluster.local"
        )));
        let any = Pattern::principal("*").unwrap();
        assert!(any.matches_principal(&builder));
        assert!(!any.matches_principal(&Principal::named(identity::ANONYMOUS)));
        assert!(
            Pattern::principal("anonymous")
                .unwrap()
                .matches_principal(&Principal::named("anonymous"))
        );
    }

    proptest! {
        /// `prefix/*` matches exactly the names with one more segment under `prefix`.
        #[test]
        fn one_star_never_crosses_a_boundary(
            prefix in "[a-z]{2,5}",
            rest in proptest::collection::vec("[a-z]{1,4}", 0..4),
        ) {
            let name = std::iter::once(prefix.clone()).chain(rest.iter().cloned()).collect::<Vec<_>>().join("/");
            prop_assert_eq!(repo(&format!("{prefix}/*"), &name), rest.len() == 1);
            prop_assert_eq!(repo(&format!("{prefix}/**"), &name), true);
            prop_assert_eq!(repo(&format!("{prefix}x/**"), &name), false);
        }
    }
}

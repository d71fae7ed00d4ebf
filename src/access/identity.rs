//! Who is calling: the principal of a request, read from exactly one configured source.
//!
//! In a mesh the sidecar terminates mTLS and tells the app who the peer was, in a header it
//! sets itself: Istio appends an element to `x-forwarded-client-cert` (Envoy's
//! `APPEND_FORWARD`), Linkerd sets `l5d-client-id` and strips any value the client sent. Only
//! the configured source is read; every other identity header is ignored, so a client cannot
//! choose which header the service believes. A raw header is never logged.

use clap::ValueEnum;
use http::HeaderMap;

pub use crate::domain::call::{ANONYMOUS, NoIdentity, Principal};
/// Istio's (Envoy's) header: one element per proxy, the last one written by our own sidecar.
const XFCC: &str = "x-forwarded-client-cert";
/// Linkerd's header: the meshed client's identity, set (or stripped) by the inbound proxy.
const L5D_CLIENT_ID: &str = "l5d-client-id";
/// SPIFFE IDs may be up to 2,048 bytes (SPIFFE-ID.md §2.3); nothing longer is an identity.
const MAX_SPIFFE_ID_BYTES: usize = 2048;
/// A trust domain is at most 255 bytes (SPIFFE-ID.md §2.1); so is a DNS name.
const MAX_DOMAIN_BYTES: usize = 255;

/// Where the caller's identity comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum IdentitySource {
    /// No identity: every caller is `anonymous` (development, the embedded store).
    None,
    /// Istio's sidecar: the `URI` of the last `x-forwarded-client-cert` element.
    IstioXfcc,
    /// Linkerd's proxy: `l5d-client-id`.
    Linkerd,
    /// The service's own mutual TLS (`--tls-*`): the client certificate's one URI SAN.
    Mtls,
}

/// The identity of a connection's client certificate, worked out once per connection
/// (by the transport's TLS acceptor): the principal, or why there is none.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerIdentity(pub Result<Principal, &'static str>);

impl IdentitySource {
    /// The value as `--identity-source` spells it.
    pub fn name(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::IstioXfcc => "istio-xfcc",
            Self::Linkerd => "linkerd",
            Self::Mtls => "mtls",
        }
    }

    /// The principal of a request with `headers` on a connection whose client certificate
    /// gave `peer` (TLS connections only), or why there is none.
    pub fn principal(
        self,
        headers: &HeaderMap,
        peer: Option<&PeerIdentity>,
    ) -> Result<Principal, NoIdentity> {
        match self {
            Self::None => Ok(Principal::anonymous()),
            Self::Mtls => match peer {
                Some(PeerIdentity(Ok(principal))) => Ok(principal.clone()),
                Some(PeerIdentity(Err(why))) => Err(NoIdentity(why)),
                None => Err(NoIdentity("the connection is not mutual TLS")),
            },
            Self::IstioXfcc => single(headers, XFCC).and_then(xfcc_principal),
            Self::Linkerd => single(headers, L5D_CLIENT_ID).and_then(|value| {
                if is_spiffe_id(value) || is_dns_identity(value) {
                    Ok(Principal::named(value))
                } else {
                    Err(NoIdentity(
                        "l5d-client-id is not a Linkerd or SPIFFE identity",
                    ))
                }
            }),
        }
    }
}

/// The one instance of header `name`, as text.
fn single<'h>(headers: &'h HeaderMap, name: &'static str) -> Result<&'h str, NoIdentity> {
    let mut values = headers.get_all(name).iter();
    let value = values.next().ok_or(NoIdentity(match name {
        XFCC => "no x-forwarded-client-cert header",
        _ => "no l5d-client-id header",
    }))?;
    if values.next().is_some() {
        return Err(NoIdentity("the identity header is repeated"));
    }
    value
        .to_str()
        .map_err(|_| NoIdentity("the identity header is not visible ASCII"))
}

/// The principal of an XFCC value: the last element's single `URI`, a SPIFFE ID.
fn xfcc_principal(value: &str) -> Result<Principal, NoIdentity> {
    let elements = parse_xfcc(value)?;
    let last = elements
        .last()
        .ok_or(NoIdentity("x-forwarded-client-cert is empty"))?;
    let mut uris = last
        .iter()
        .filter(|(key, _)| key.eq_ignore_ascii_case("uri"));
    let (_, uri) = uris.next().ok_or(NoIdentity(
        "the sidecar's x-forwarded-client-cert element has no URI",
    ))?;
    if uris.next().is_some() {
        return Err(NoIdentity(
            "the sidecar's x-forwarded-client-cert element has two URIs",
        ));
    }
    if !is_spiffe_id(uri) {
        return Err(NoIdentity(
            "the sidecar's x-forwarded-client-cert URI is not a SPIFFE ID",
        ));
    }
    Ok(Principal::named(uri.as_str()))
}

/// One XFCC element: its `key=value` pairs, values unquoted.
type Element = Vec<(String, String)>;

/// Envoy's XFCC grammar: elements separated by `,`, pairs by `;`, key and value by `=`; a
/// value holding any of those is double-quoted, with `"` escaped as `\"`.
fn parse_xfcc(value: &str) -> Result<Vec<Element>, NoIdentity> {
    const MALFORMED: NoIdentity = NoIdentity("x-forwarded-client-cert is malformed");
    let mut elements = vec![Vec::new()];
    let mut chars = value.chars().peekable();
    loop {
        // One pair: a key up to `=`, then a value (quoted or bare).
        let mut key = String::new();
        let mut assigned = false;
        for c in chars.by_ref() {
            match c {
                '=' => {
                    assigned = true;
                    break;
                }
                ',' | ';' | '"' => return Err(MALFORMED),
                c => key.push(c),
            }
        }
        let key = key.trim().to_owned();
        if !assigned || key.is_empty() {
            return Err(MALFORMED);
        }
        let mut text = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            loop {
                match chars.next().ok_or(MALFORMED)? {
                    '\\' => text.push(chars.next().ok_or(MALFORMED)?),
                    '"' => break,
                    c => text.push(c),
                }
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c == ';' || c == ',' {
                    break;
                }
                if c == '"' || c == '=' {
                    return Err(MALFORMED);
                }
                text.push(c);
                chars.next();
            }
        }
        elements.last_mut().ok_or(MALFORMED)?.push((key, text));
        match chars.next() {
            None => return Ok(elements),
            Some(';') => {}
            Some(',') => elements.push(Vec::new()),
            Some(_) => return Err(MALFORMED),
        }
    }
}

/// A SPIFFE ID (SPIFFE-ID.md): `spiffe://` + a trust domain of lowercase letters, digits, `.`,
/// `-`, `_`, then path segments of letters, digits, `.`, `-`, `_`, none empty, `.` or `..`; no
/// query, fragment, port or userinfo; at most 2,048 bytes.
pub fn is_spiffe_id(text: &str) -> bool {
    let Some(rest) = text.strip_prefix("spiffe://") else {
        return false;
    };
    if text.len() > MAX_SPIFFE_ID_BYTES {
        return false;
    }
    let (domain, path) = rest.split_once('/').unwrap_or((rest, ""));
    let domain_ok = !domain.is_empty()
        && domain.len() <= MAX_DOMAIN_BYTES
        && domain
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-._".contains(&b));
    let path_ok = rest.find('/').is_none()
        || path.split('/').all(|segment| {
            !segment.is_empty()
                && segment != "."
                && segment != ".."
                && segment
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b))
        });
    domain_ok && path_ok
}

/// A Linkerd identity: a DNS name of lowercase labels (`sa.ns.serviceaccount.identity.…`).
pub fn is_dns_identity(text: &str) -> bool {
    text.len() <= MAX_DOMAIN_BYTES
        && text.contains('.')
        && text.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;
    use proptest::prelude::*;

    const BUILDER: &str = "spiffe://cluster.local/ns/ci/sa/builder";

    fn xfcc(values: &[&str]) -> Result<Principal, NoIdentity> {
        let mut headers = HeaderMap::new();
        for value in values {
            headers.append(XFCC, HeaderValue::from_str(value).unwrap());
        }
        IdentitySource::IstioXfcc.principal(&headers, None)
    }

    #[test]
    fn envoys_documented_examples_parse() {
        // The three examples of Envoy's header documentation.
        let examples = [
            r#"By=http://frontend.lyft.com;Hash=468ed33be74eee6556d90c0149c1309e9ba61d6425303443c0748a02dd8de688;Subject="/C=US/ST=CA/L=San Francisco/OU=Lyft/CN=Test Client";URI=http://testclient.lyft.com"#,
            r#"By=http://frontend.lyft.com;Hash=468ed33be74eee6556d90c0149c1309e9ba61d6425303443c0748a02dd8de688;URI=http://testclient.lyft.com,By=http://backend.lyft.com;Hash=9ba61d6425303443c0748a02dd8de688468ed33be74eee6556d90c0149c1309e;URI=http://frontend.lyft.com"#,
            r#"By=http://frontend.lyft.com;Hash=468ed33be74eee6556d90c0149c1309e9ba61d6425303443c0748a02dd8de688;Subject="/C=US/ST=CA/L=San Francisco/OU=Lyft/CN=Test Client";URI=http://testclient.lyft.com;DNS=lyft.com;DNS=www.lyft.com"#,
        ];
        let parsed: Vec<_> = examples.iter().map(|e| parse_xfcc(e).unwrap()).collect();
        assert_eq!(parsed[0].len(), 1);
        assert_eq!(
            parsed[0][0][2],
            (
                "Subject".to_owned(),
                "/C=US/ST=CA/L=San Francisco/OU=Lyft/CN=Test Client".to_owned()
            )
        );
        assert_eq!(parsed[1].len(), 2);
        assert_eq!(parsed[1][1][2].1, "http://frontend.lyft.com");
        assert_eq!(parsed[2][0].iter().filter(|(k, _)| k == "DNS").count(), 2);
        // Their URIs are not SPIFFE IDs: no principal.
        assert!(xfcc(&[examples[0]]).is_err());
    }

    #[test]
    fn istios_shape_gives_the_spiffe_id() {
        let value = format!(
            r#"By=spiffe://cluster.local/ns/platform/sa/images;Hash=abc123;Subject="";URI={BUILDER}"#
        );
        assert_eq!(xfcc(&[&value]).unwrap().as_str(), BUILDER);
    }

    #[test]
    fn quoted_values_may_hold_separators_and_escaped_quotes() {
        let value = format!(r#"Subject="CN=a,b;c=\"d\"";URI={BUILDER}"#);
        let parsed = parse_xfcc(&value).unwrap();
        assert_eq!(parsed[0][0].1, r#"CN=a,b;c="d""#);
        assert_eq!(xfcc(&[&value]).unwrap().as_str(), BUILDER);
    }

    #[test]
    fn the_last_element_wins_over_a_forged_earlier_one() {
        let value = format!("URI=spiffe://cluster.local/ns/prod/sa/admin,By=x;URI={BUILDER}");
        assert_eq!(xfcc(&[&value]).unwrap().as_str(), BUILDER);
    }

    #[test]
    fn repeated_missing_or_bad_identities_are_refused() {
        let good = format!("URI={BUILDER}");
        assert!(xfcc(&[&good, &good]).is_err(), "a repeated header");
        assert!(xfcc(&[]).is_err(), "no header");
        assert!(xfcc(&["By=spiffe://a/b;Hash=1"]).is_err(), "no URI");
        assert!(
            xfcc(&[&format!(
                "URI={BUILDER};URI=spiffe://cluster.local/ns/x/sa/y"
            )])
            .is_err(),
            "two URIs"
        );
        assert!(xfcc(&["URI=https://example.com/x"]).is_err(), "not SPIFFE");
        for malformed in ["URI", "=x", "URI=\"open", "URI=a\"b", "a=b;;c=d", ""] {
            assert!(xfcc(&[malformed]).is_err(), "{malformed:?}");
        }
    }

    #[test]
    fn only_the_configured_source_is_read() {
        let mut headers = HeaderMap::new();
        headers.insert(
            L5D_CLIENT_ID,
            HeaderValue::from_static("a.b.serviceaccount.identity.linkerd.cluster.local"),
        );
        assert!(IdentitySource::IstioXfcc.principal(&headers, None).is_err());
        headers.insert(
            XFCC,
            HeaderValue::from_str(&format!("URI={BUILDER}")).unwrap(),
        );
        assert_eq!(
            IdentitySource::Linkerd
                .principal(&headers, None)
                .unwrap()
                .as_str(),
            "a.b.serviceaccount.identity.linkerd.cluster.local"
        );
        assert!(
            IdentitySource::None
                .principal(&headers, None)
                .unwrap()
                .is_anonymous()
        );
    }

    #[test]
    fn spiffe_ids_and_dns_identities_are_checked() {
        assert!(is_spiffe_id(BUILDER));
        assert!(is_spiffe_id("spiffe://example.org"));
        for bad in [
            "spiffe://",
            "spiffe:///x",
            "spiffe://Example.org/x",
            "spiffe://a/x/",
            "spiffe://a//x",
            "spiffe://a/../x",
            "spiffe://a:8080/x",
            "spiffe://u@a/x",
            "spiffe://a/x?q",
            "spiffe://a/x#f",
            "http://a/x",
        ] {
            assert!(!is_spiffe_id(bad), "{bad}");
        }
        assert!(is_dns_identity(
            "web.prod.serviceaccount.identity.linkerd.cluster.local"
        ));
        for bad in ["single", "a..b", "A.b", "-a.b", "a.b\n"] {
            assert!(!is_dns_identity(bad), "{bad:?}");
        }
    }

    proptest! {
        #[test]
        fn arbitrary_header_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            if let Ok(value) = HeaderValue::from_bytes(&bytes) {
                let mut headers = HeaderMap::new();
                headers.insert(XFCC, value.clone());
                headers.insert(L5D_CLIENT_ID, value);
                let _ = IdentitySource::IstioXfcc.principal(&headers, None);
                let _ = IdentitySource::Linkerd.principal(&headers, None);
            }
        }

        #[test]
        fn arbitrary_text_never_panics(text in ".{0,200}") {
            let _ = parse_xfcc(&text);
            let _ = is_spiffe_id(&text);
        }
    }
}

//! Page tokens (AIP-158): opaque to callers, signed, bound to the request they continue, and
//! short-lived. A token carries the registry's own continuation token, the time it was issued
//! and a fingerprint of the request (operation, registry, repository, filter), all under an
//! HMAC-SHA256; a token that was altered, is presented with another request, or is older than
//! [`TOKEN_LIFETIME`] is INVALID_ARGUMENT.
//!
//! The key comes from `--page-token-key-file`, shared by replicas (a Kubernetes Secret), so a
//! page from one replica continues on another. Without one, each process draws a random key:
//! tokens then only work on the replica that issued them.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use sha2::{Digest as _, Sha256};

/// How long a token may be redeemed: AIP-158's "a reasonable time", a day of paging.
pub const TOKEN_LIFETIME: Duration = Duration::from_secs(24 * 3600);
/// The shortest key accepted: SHA-256's block of security.
const MIN_KEY_BYTES: usize = 32;
/// Issued-at (8 bytes) and fingerprint (32 bytes) before the registry's token.
const HEADER_BYTES: usize = 8 + 32;

type HmacSha256 = Hmac<Sha256>;

/// Issues and redeems page tokens under one key.
#[derive(Clone)]
pub struct PageTokens {
    /// The keyed HMAC state, built once; cloned for each token.
    mac: HmacSha256,
}

impl std::fmt::Debug for PageTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PageTokens { key: <redacted> }")
    }
}

/// Why a token was refused (never which check failed: a caller learns nothing from probing).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("is not a page token of this request, or has expired")]
pub struct BadToken;

impl PageTokens {
    /// A per-process random key.
    pub fn random() -> Result<Self, String> {
        let mut key = vec![0u8; MIN_KEY_BYTES];
        getrandom::fill(&mut key)
            .map_err(|e| format!("no randomness for a page-token key: {e}"))?;
        Self::with_key(&key)
    }

    fn with_key(key: &[u8]) -> Result<Self, String> {
        let mac = <HmacSha256 as Mac>::new_from_slice(key).map_err(|e| e.to_string())?;
        Ok(Self { mac })
    }

    /// The key in `path`: at least 32 bytes, used as they are.
    pub fn from_file(path: &Path) -> Result<Self, String> {
        let key = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
        if key.len() < MIN_KEY_BYTES {
            return Err(format!(
                "{}: a page-token key needs at least {MIN_KEY_BYTES} bytes, got {}",
                path.display(),
                key.len()
            ));
        }
        Self::with_key(&key)
    }

    /// The fingerprint of a request: what a token is bound to.
    pub fn fingerprint(parts: &[&str]) -> [u8; 32] {
        let mut hash = Sha256::new();
        for part in parts {
            hash.update((part.len() as u64).to_be_bytes());
            hash.update(part.as_bytes());
        }
        hash.finalize().into()
    }

    /// A token for the page after the one `fingerprint` asked for, continuing at the
    /// registry's `next_token`.
    pub fn issue(&self, fingerprint: &[u8; 32], next_token: &str) -> String {
        self.issue_at(fingerprint, next_token, SystemTime::now())
    }

    fn issue_at(&self, fingerprint: &[u8; 32], next_token: &str, now: SystemTime) -> String {
        let issued = now.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
        let mut payload = Vec::with_capacity(HEADER_BYTES + next_token.len());
        payload.extend_from_slice(&issued.to_be_bytes());
        payload.extend_from_slice(fingerprint);
        payload.extend_from_slice(next_token.as_bytes());
        let mut mac = self.mac.clone();
        mac.update(&payload);
        let signature = mac.finalize().into_bytes();
        format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(&payload),
            URL_SAFE_NO_PAD.encode(signature)
        )
    }

    /// The registry's token inside `token`, if `token` was issued under this key, for a
    /// request with `fingerprint`, less than [`TOKEN_LIFETIME`] ago.
    pub fn redeem(&self, token: &str, fingerprint: &[u8; 32]) -> Result<String, BadToken> {
        self.redeem_at(token, fingerprint, SystemTime::now())
    }

    fn redeem_at(
        &self,
        token: &str,
        fingerprint: &[u8; 32],
        now: SystemTime,
    ) -> Result<String, BadToken> {
        let (payload, signature) = token.split_once('.').ok_or(BadToken)?;
        let payload = URL_SAFE_NO_PAD.decode(payload).map_err(|_| BadToken)?;
        let signature = URL_SAFE_NO_PAD.decode(signature).map_err(|_| BadToken)?;
        let mut mac = self.mac.clone();
        mac.update(&payload);
        mac.verify_slice(&signature).map_err(|_| BadToken)?;
        if payload.len() < HEADER_BYTES || payload[8..HEADER_BYTES] != fingerprint[..] {
            return Err(BadToken);
        }
        let mut issued = [0u8; 8];
        issued.copy_from_slice(&payload[..8]);
        let issued = UNIX_EPOCH + Duration::from_secs(u64::from_be_bytes(issued));
        let age = now.duration_since(issued).map_err(|_| BadToken)?;
        if age > TOKEN_LIFETIME {
            return Err(BadToken);
        }
        String::from_utf8(payload[HEADER_BYTES..].to_vec()).map_err(|_| BadToken)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_continues_only_its_own_request_within_a_day() {
        let tokens = PageTokens::random().unwrap();
        let request = PageTokens::fingerprint(&["ListImages", "", "team/app", "ANY"]);
        let other = PageTokens::fingerprint(&["ListImages", "", "team/other", "ANY"]);
        let token = tokens.issue(&request, "ecr-next-token");
        assert_eq!(tokens.redeem(&token, &request).unwrap(), "ecr-next-token");
        assert_eq!(
            tokens.redeem(&token, &other),
            Err(BadToken),
            "another request"
        );

        // Any changed character of the payload or the signature is refused.
        let mut tampered = token.clone().into_bytes();
        tampered[3] = if tampered[3] == b'A' { b'B' } else { b'A' };
        let tampered = String::from_utf8(tampered).unwrap();
        assert_eq!(tokens.redeem(&tampered, &request), Err(BadToken));
        let other_key = PageTokens::random().unwrap();
        assert_eq!(
            other_key.redeem(&token, &request),
            Err(BadToken),
            "another key"
        );

        let day_ago = SystemTime::now() - TOKEN_LIFETIME - Duration::from_secs(1);
        let old = tokens.issue_at(&request, "x", day_ago);
        assert_eq!(tokens.redeem(&old, &request), Err(BadToken), "expired");
        for junk in ["", ".", "abc", "a.b.c", "!!!.???"] {
            assert_eq!(tokens.redeem(junk, &request), Err(BadToken), "{junk:?}");
        }
    }
}

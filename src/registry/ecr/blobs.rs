//! Blobs read from where ECR says they are: `GetDownloadUrlForLayer`'s presigned URL, fetched
//! with a plain HTTPS GET (hyper, rustls on aws-lc-rs and the system's roots: the stack the SDK
//! itself uses, already in the tree), bounded in time and size, and checked against the digest
//! before anyone reads it.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use sha2::{Digest as _, Sha256};

use crate::domain::image::Digest;
use crate::registry::{RegistryError, Upstream};

/// A presigned S3 URL answers in milliseconds; a blob that takes longer is not coming.
const BLOB_TIMEOUT: Duration = Duration::from_secs(10);

/// The HTTPS client for presigned URLs.
#[derive(Clone)]
pub struct BlobClient {
    client: Client<hyper_rustls::HttpsConnector<HttpConnector>, Empty<Bytes>>,
}

impl std::fmt::Debug for BlobClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlobClient").finish_non_exhaustive()
    }
}

impl BlobClient {
    /// A client trusting the system's roots. Plain `http://` URLs are fetched too (an emulator
    /// on loopback): what comes back is checked against its digest either way.
    pub fn new() -> Result<Self, String> {
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_provider_and_native_roots(rustls::crypto::aws_lc_rs::default_provider())
            .map_err(|e| format!("no TLS roots for blob downloads: {e}"))?
            .https_or_http()
            .enable_http1()
            .build();
        Ok(Self {
            client: Client::builder(TokioExecutor::new()).build(https),
        })
    }

    /// The blob at `url`, at most `max_bytes`, hashing to `digest`.
    pub async fn fetch(
        &self,
        url: &str,
        digest: &Digest,
        max_bytes: usize,
    ) -> Result<Vec<u8>, RegistryError> {
        let unavailable = |message: String| RegistryError::Unavailable(Upstream::message(message));
        let uri: http::Uri = url
            .parse()
            .map_err(|e| unavailable(format!("ECR gave an unusable download URL: {e}")))?;
        let request = http::Request::get(uri)
            .body(Empty::new())
            .map_err(|e| unavailable(e.to_string()))?;
        let fetched = tokio::time::timeout(BLOB_TIMEOUT, async {
            let response = self
                .client
                .request(request)
                .await
                .map_err(|e| unavailable(format!("blob download failed: {e}")))?;
            let status = response.status();
            if !status.is_success() {
                return Err(unavailable(format!("blob download answered {status}")));
            }
            Limited::new(response.into_body(), max_bytes)
                .collect()
                .await
                .map(|body| body.to_bytes())
                .map_err(|e| {
                    if e.downcast_ref::<http_body_util::LengthLimitError>()
                        .is_some()
                    {
                        RegistryError::LimitExceeded(Upstream::message(format!(
                            "blob {digest} is larger than {max_bytes} bytes"
                        )))
                    } else {
                        unavailable(format!("blob download broke off: {e}"))
                    }
                })
        })
        .await
        .map_err(|_| {
            RegistryError::Timeout(Upstream::message(format!(
                "blob {digest} did not arrive within {BLOB_TIMEOUT:?}"
            )))
        })??;
        let actual = format!("sha256:{:x}", Sha256::digest(&fetched));
        if actual != digest.as_str() {
            return Err(RegistryError::DigestVerificationFailed {
                expected: digest.to_string(),
                actual,
            });
        }
        Ok(fetched.to_vec())
    }
}

//! The ECR operations moto 5.2.5 lacks, beside it: a proxy in front of the emulator that answers
//! `ListImageReferrers` and `GetDownloadUrlForLayer` itself and serves the blobs those URLs name,
//! and forwards every other request to moto. Each behaviour follows the ECR API reference:
//!
//! - ListImageReferrers (ECR API reference, "ListImageReferrers"): the manifests put into the
//!   repository whose `subject.digest` is the image asked for, each as `{digest, mediaType,
//!   artifactType, size, annotations, artifactStatus: ACTIVE}`; `filter.artifactTypes` keeps
//!   those types; `maxResults` (≤ 50) pages with an opaque `nextToken`. The artifact type is the
//!   manifest's `artifactType`, else its config's media type (OCI image spec 1.1, "Guidelines for
//!   artifact usage"). The proxy learns the manifests from the PutImage requests it forwards.
//! - GetDownloadUrlForLayer (ECR API reference): `{downloadUrl, layerDigest}` for a blob of the
//!   repository; `LayersNotFoundException` otherwise. The URL is this proxy's own loopback
//!   `/blobs/<digest>` (ECR's is a presigned S3 URL): moto keeps only layer sizes, so the test
//!   hands the blobs to the proxy ([`EcrExtension::add_blob`]).
//!
//! The service under test never knows: it calls these operations through the real SDK, and
//! fetches the URL with its own HTTP client.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use serde_json::{Value, json};
use sha2::{Digest as _, Sha256};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};

use super::fault_proxy::forward;
use super::recorded::read_request;

/// A referrer as ListImageReferrers reports it, with the repository and subject it is of.
#[derive(Debug, Clone)]
struct Stored {
    repository: String,
    subject: String,
    referrer: Value,
}

#[derive(Debug, Default)]
struct State {
    referrers: Vec<Stored>,
    /// Blob digest -> the bytes served for it (altered ones included, for tamper tests).
    blobs: HashMap<String, Vec<u8>>,
    /// Operations answered or forwarded, in order.
    seen: Vec<String>,
}

/// A running extension proxy.
pub struct EcrExtension {
    /// `http://127.0.0.1:PORT`: the ECR endpoint to give the service.
    pub endpoint: String,
    state: Arc<Mutex<State>>,
}

impl EcrExtension {
    /// Starts the proxy in front of the emulator at `upstream`.
    pub async fn start(upstream: &str) -> Self {
        let upstream: SocketAddr = upstream.trim_start_matches("http://").parse().unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let endpoint = format!("http://{address}");
        let state = Arc::new(Mutex::new(State::default()));
        let shared = Arc::clone(&state);
        let base = endpoint.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(handle(stream, upstream, Arc::clone(&shared), base.clone()));
            }
        });
        Self { endpoint, state }
    }

    /// Keeps `bytes` as a blob; its digest.
    pub fn add_blob(&self, bytes: &[u8]) -> String {
        let digest = format!("sha256:{:x}", Sha256::digest(bytes));
        self.state
            .lock()
            .unwrap()
            .blobs
            .insert(digest.clone(), bytes.to_vec());
        digest
    }

    /// Serves `bytes` for the blob `digest` from now on (a blob altered after signing).
    pub fn alter_blob(&self, digest: &str, bytes: &[u8]) {
        self.state
            .lock()
            .unwrap()
            .blobs
            .insert(digest.to_owned(), bytes.to_vec());
    }

    /// How many requests for `operation` arrived.
    pub fn count(&self, operation: &str) -> usize {
        self.state
            .lock()
            .unwrap()
            .seen
            .iter()
            .filter(|o| *o == operation)
            .count()
    }
}

async fn handle(
    mut client: TcpStream,
    upstream: SocketAddr,
    state: Arc<Mutex<State>>,
    base: String,
) {
    let Some(request) = read_request(&mut client).await else {
        return;
    };
    let line = String::from_utf8_lossy(&request.head)
        .lines()
        .next()
        .unwrap_or_default()
        .to_owned();
    if let Some(digest) = line
        .strip_prefix("GET /blobs/")
        .and_then(|rest| rest.split(' ').next())
    {
        let blob = state.lock().unwrap().blobs.get(digest).cloned();
        let answer = match blob {
            Some(bytes) => respond_bytes(200, "application/octet-stream", &bytes),
            None => respond_bytes(404, "text/plain", b"no such blob"),
        };
        let _ = client.write_all(&answer).await;
        return;
    }
    let operation = request.operation();
    state.lock().unwrap().seen.push(operation.clone());
    let body: Value = serde_json::from_slice(&request.body).unwrap_or(Value::Null);
    let answer = match operation.as_str() {
        "ListImageReferrers" => list_referrers(&state, &body),
        "GetDownloadUrlForLayer" => download_url(&state, &body, &base),
        _ => {
            let answer = forward(upstream, &request.head, &request.body).await;
            if operation == "PutImage" && answer.starts_with(b"HTTP/1.1 200") {
                remember_referrer(&state, &body);
            }
            answer
        }
    };
    let _ = client.write_all(&answer).await;
    let _ = client.shutdown().await;
}

fn remember_referrer(state: &Mutex<State>, put: &Value) {
    let Some(text) = put["imageManifest"].as_str() else {
        return;
    };
    let Ok(manifest) = serde_json::from_str::<Value>(text) else {
        return;
    };
    let Some(subject) = manifest["subject"]["digest"].as_str() else {
        return;
    };
    let artifact_type = manifest["artifactType"]
        .as_str()
        .or(manifest["config"]["mediaType"].as_str())
        .unwrap_or_default();
    let referrer = json!({
        "digest": format!("sha256:{:x}", Sha256::digest(text.as_bytes())),
        "mediaType": manifest["mediaType"].as_str().unwrap_or_default(),
        "artifactType": artifact_type,
        "size": text.len(),
        "annotations": manifest.get("annotations").cloned().unwrap_or(json!({})),
        "artifactStatus": "ACTIVE",
    });
    state.lock().unwrap().referrers.push(Stored {
        repository: put["repositoryName"]
            .as_str()
            .unwrap_or_default()
            .to_owned(),
        subject: subject.to_owned(),
        referrer,
    });
}

fn list_referrers(state: &Mutex<State>, body: &Value) -> Vec<u8> {
    let repository = body["repositoryName"].as_str().unwrap_or_default();
    let subject = body["subjectId"]["imageDigest"]
        .as_str()
        .unwrap_or_default();
    let types: Vec<&str> = body["filter"]["artifactTypes"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let all: Vec<Value> = state
        .lock()
        .unwrap()
        .referrers
        .iter()
        .filter(|s| s.repository == repository && s.subject == subject)
        .filter(|s| {
            types.is_empty() || types.contains(&s.referrer["artifactType"].as_str().unwrap_or(""))
        })
        .map(|s| s.referrer.clone())
        .collect();
    let max = body["maxResults"].as_u64().unwrap_or(50).clamp(1, 50) as usize;
    let start: usize = body["nextToken"]
        .as_str()
        .and_then(|t| t.parse().ok())
        .unwrap_or(0);
    let page: Vec<Value> = all.iter().skip(start).take(max).cloned().collect();
    let mut answer = json!({ "referrers": page });
    if start + max < all.len() {
        answer["nextToken"] = json!((start + max).to_string());
    }
    respond_bytes(
        200,
        "application/x-amz-json-1.1",
        answer.to_string().as_bytes(),
    )
}

fn download_url(state: &Mutex<State>, body: &Value, base: &str) -> Vec<u8> {
    let digest = body["layerDigest"].as_str().unwrap_or_default();
    if state.lock().unwrap().blobs.contains_key(digest) {
        let answer =
            json!({ "downloadUrl": format!("{base}/blobs/{digest}"), "layerDigest": digest });
        respond_bytes(
            200,
            "application/x-amz-json-1.1",
            answer.to_string().as_bytes(),
        )
    } else {
        let error = json!({
            "__type": "LayersNotFoundException",
            "message": format!("The layer with digest {digest} does not exist"),
        });
        respond_bytes(
            400,
            "application/x-amz-json-1.1",
            error.to_string().as_bytes(),
        )
    }
}

fn respond_bytes(status: u16, content_type: &str, body: &[u8]) -> Vec<u8> {
    let mut answer = format!(
        "HTTP/1.1 {status} Extension\r\ncontent-type: {content_type}\r\nx-amzn-RequestId: \
         ext-{status}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    answer.extend_from_slice(body);
    answer
}

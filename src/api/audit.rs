//! Audit events: one JSON object on one line of stderr for every PutImage, every RetagImage
//! target, every BatchDeleteImage id, and every denial (PERMISSION_DENIED, UNAUTHENTICATED),
//! whatever `--log-format` says, never sampled:
//!
//! ```json
//! {"type":"audit","time":"2026-12-07T10:00:00.123Z","principal":"spiffe://…/sa/builder",
//!  "action":"write","registryId":"111122223333","region":"eu-west-1","repository":"team/app",
//!  "imageTag":"prod","digestBefore":"sha256:…","digestAfter":"sha256:…","outcome":"ok",
//!  "reason":"","requestId":"…","traceId":"…","ecrRequestId":"…"}
//! ```
//!
//! `digestBefore` is what the tag pointed at, read from the registry in the same call (`""`
//! for a new tag or an untagged put, `null` when that read failed); `digestAfter` is what it
//! points at once the write is done (`""` for a delete). A write whose call ends before its
//! answer (the deadline) is still one event: `failed`, `DEADLINE_EXCEEDED`. Caller-supplied
//! values are validated before they get here, and bounded besides: JSON escapes them.

use std::io::Write as _;
use std::sync::Arc;
use std::time::SystemTime;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use serde::Serialize;

use crate::api::error::Error;
use crate::domain::call::{self, CallContext};
use crate::domain::image::{ImageRef, Tag};
use crate::domain::text::truncated;
use crate::registry::{DeleteOutcome, Registry, RepositoryKey};

/// The longest value written for a field a caller chose and nothing validated (a repository
/// name of a request refused before validation, a request id header): longer than any valid
/// one (256), short enough that a hostile request cannot inflate the audit log.
const MAX_FIELD_BYTES: usize = 320;

/// How a write ended, for the event's `outcome`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    /// Done.
    Ok,
    /// Refused by the policy or for want of an identity.
    Denied,
    /// Tried, and failed (ECR, the deadline, an immutable tag …).
    Failed,
}

impl Outcome {
    fn as_str(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::Denied => "denied",
            Self::Failed => "failed",
        }
    }
}

/// What one event says beyond the call's own facts (caller, registry, request and trace ids).
#[derive(Debug, Clone, Default)]
pub struct Record<'a> {
    /// `write`, `delete` or `read` (a denied read).
    pub action: &'static str,
    /// The repository.
    pub repository: &'a str,
    /// The tag; `""` for an untagged put or a delete by digest.
    pub image_tag: &'a str,
    /// What the tag pointed at before; `Some("")` for nothing, `None` when unknown.
    pub digest_before: Option<&'a str>,
    /// What it points at after; `""` for a delete or a denial.
    pub digest_after: &'a str,
    /// How it ended.
    pub outcome: Option<Outcome>,
    /// The error's reason (`TAG_ALREADY_EXISTS`, `ACCESS_DENIED`, …); `""` when it succeeded.
    pub reason: &'a str,
}

/// The line as written.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Line<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    time: String,
    principal: &'a str,
    action: &'static str,
    registry_id: &'a str,
    region: &'a str,
    repository: String,
    image_tag: &'a str,
    digest_before: Option<&'a str>,
    digest_after: &'a str,
    outcome: Outcome,
    reason: &'a str,
    request_id: String,
    trace_id: String,
    ecr_request_id: String,
}

/// Where audit lines go: stderr in the service, a buffer in tests.
pub trait AuditSink: Send + Sync + std::fmt::Debug {
    /// Writes one line (without its newline).
    fn write_line(&self, line: &str);
}

/// The process's stderr, the line and its newline in one write under stderr's lock, so that no
/// log line lands inside it.
#[derive(Debug)]
struct Stderr;

impl AuditSink for Stderr {
    fn write_line(&self, line: &str) {
        let mut buffer = Vec::with_capacity(line.len() + 1);
        buffer.extend_from_slice(line.as_bytes());
        buffer.push(b'\n');
        let _ = std::io::stderr().lock().write_all(&buffer);
    }
}

/// The audit trail: on or off, where it goes, what it counted.
#[derive(Clone)]
pub struct Audit {
    sink: Option<Arc<dyn AuditSink>>,
    /// `imageservice_audit_events_total{action,outcome}`.
    events: Family<[(&'static str, &'static str); 2], Counter>,
    /// The service's own account and region, for events about its own registry.
    own_account: Arc<str>,
    own_region: Arc<str>,
}

impl Default for Audit {
    /// On, to stderr.
    fn default() -> Self {
        Self::to(Some(Arc::new(Stderr)))
    }
}

impl Audit {
    /// An audit trail written to `sink`; `None`: off.
    pub fn to(sink: Option<Arc<dyn AuditSink>>) -> Self {
        Self {
            sink,
            events: Family::default(),
            own_account: Arc::from(""),
            own_region: Arc::from(""),
        }
    }

    /// Off: nothing written, and no registry read made for it.
    pub fn off() -> Self {
        Self::to(None)
    }

    /// The same trail, naming `account` and `region` for the service's own registry.
    #[must_use]
    pub fn for_own(mut self, account: &str, region: &str) -> Self {
        self.own_account = Arc::from(account);
        self.own_region = Arc::from(region);
        self
    }

    /// Whether events are written (and writes read what their tag pointed at first).
    pub fn is_on(&self) -> bool {
        self.sink.is_some()
    }

    /// Adds `imageservice_audit_events_total`.
    pub fn register_metrics(&self, metrics: &mut prometheus_client::registry::Registry) {
        metrics.register(
            "audit_events",
            "Audit events written, by action and outcome",
            self.events.clone(),
        );
    }

    /// Writes the event `record` describes, for the call this task works for: its caller,
    /// registry, request and trace ids, and the ECR request ids its writes noted since the
    /// last event.
    pub fn record(&self, record: &Record<'_>) {
        let Some(call) = call::current() else {
            return;
        };
        self.record_for(&call, record);
    }

    /// [`record`](Self::record) for `call`.
    pub fn record_for(&self, call: &CallContext, record: &Record<'_>) {
        let Some(sink) = &self.sink else {
            return;
        };
        let outcome = record.outcome.unwrap_or(Outcome::Failed);
        self.events
            .get_or_create(&[("action", record.action), ("outcome", outcome.as_str())])
            .inc();
        let principal = call.caller().map_or("", |p| p.as_str());
        let (registry_id, region) = match call.registry() {
            Some(registry) => (
                registry.as_str(),
                registry.region().map_or(&*self.own_region, |r| r.as_str()),
            ),
            None => (&*self.own_account, &*self.own_region),
        };
        let (request_id, trace_id, ecr_request_id) = match call.receipt() {
            Some(receipt) => (
                receipt.request_id.clone(),
                receipt.trace_id.clone(),
                receipt.take().join(","),
            ),
            None => Default::default(),
        };
        let line = Line {
            kind: "audit",
            time: humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
            principal,
            action: record.action,
            registry_id,
            region,
            repository: truncated(record.repository, MAX_FIELD_BYTES),
            image_tag: record.image_tag,
            digest_before: record.digest_before,
            digest_after: record.digest_after,
            outcome,
            reason: record.reason,
            request_id: truncated(&request_id, MAX_FIELD_BYTES),
            trace_id,
            ecr_request_id,
        };
        if let Ok(text) = serde_json::to_string(&line) {
            sink.write_line(&text);
        }
    }
}

/// One write's event, written exactly once: by [`finish`](Self::finish), or, when the call is
/// dropped first (its deadline), as `failed` with `DEADLINE_EXCEEDED` and the call's context.
pub struct Pending<'a> {
    audit: &'a Audit,
    call: Option<CallContext>,
    action: &'static str,
    repository: String,
    image_tag: String,
    digest_before: Option<String>,
    digest_after: String,
}

impl<'a> Pending<'a> {
    /// A write of `image_tag` in `repository` to `digest_after`, by the current call.
    pub fn start(
        audit: &'a Audit,
        action: &'static str,
        repository: &str,
        image_tag: &str,
        digest_after: &str,
    ) -> Self {
        Self {
            audit,
            call: audit.is_on().then(call::current).flatten(),
            action,
            repository: repository.to_owned(),
            image_tag: image_tag.to_owned(),
            digest_before: Some(String::new()),
            digest_after: digest_after.to_owned(),
        }
    }

    /// Reads what the tag points at now from `registry` (never a cache), as the event's
    /// "before": only when the trail is on and the write names a tag. A failed read is written
    /// `null` and does not stop the write.
    pub async fn read_before(
        &mut self,
        registry: &dyn Registry,
        repository: &RepositoryKey,
        tag: Option<&Tag>,
    ) {
        let Some(tag) = tag.filter(|_| self.call.is_some()) else {
            return;
        };
        self.digest_before = match registry.tag_digest(repository.clone(), tag.clone()).await {
            Ok(digest) => Some(digest.map(|d| d.to_string()).unwrap_or_default()),
            Err(err) => {
                tracing::debug!(error = %err, "the tag's digest before the write could not be read");
                None
            }
        };
    }

    /// Writes the event: `ok`, or `failed` with the error's reason.
    pub fn finish<T>(self, result: &Result<T, Error>) {
        match result {
            Ok(_) => self.ok(),
            Err(err) => self.failed(err),
        }
    }

    /// Writes the event: `ok`.
    pub fn ok(mut self) {
        self.write((Outcome::Ok, ""));
    }

    /// Writes the event: `failed` with `err`'s reason.
    pub fn failed(mut self, err: &Error) {
        self.write((Outcome::Failed, err.code_and_reason().1.as_str()));
    }

    fn write(&mut self, (outcome, reason): (Outcome, &str)) {
        let Some(call) = self.call.take() else {
            return;
        };
        let digest_after = if outcome == Outcome::Ok {
            self.digest_after.as_str()
        } else {
            ""
        };
        self.audit.record_for(
            &call,
            &Record {
                action: self.action,
                repository: &self.repository,
                image_tag: &self.image_tag,
                digest_before: self.digest_before.as_deref(),
                digest_after,
                outcome: Some(outcome),
                reason,
            },
        );
    }
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        self.write((Outcome::Failed, "DEADLINE_EXCEEDED"));
    }
}

/// A delete's events, one per id asked for, written exactly once: from its outcome, or, when
/// the call is dropped first (its deadline), as `failed` with `DEADLINE_EXCEEDED`.
pub struct PendingDeletes<'a> {
    audit: &'a Audit,
    call: Option<CallContext>,
    repository: String,
    ids: Vec<ImageRef>,
}

impl<'a> PendingDeletes<'a> {
    /// A delete of `ids` from `repository` by the current call.
    pub fn start(audit: &'a Audit, repository: &str, ids: &[ImageRef]) -> Self {
        let call = audit.is_on().then(call::current).flatten();
        Self {
            audit,
            repository: repository.to_owned(),
            ids: if call.is_some() {
                ids.to_vec()
            } else {
                Vec::new()
            },
            call,
        }
    }

    /// Writes each id's event from what the registry answered for it: deleted (`ok`, the
    /// digest it named before), or its failure code.
    pub fn finish(mut self, result: &Result<DeleteOutcome, Error>) {
        let Some(call) = self.call.take() else {
            return;
        };
        for id in &self.ids {
            let tag = id.tag().map_or("", Tag::as_str);
            let (outcome, reason, before) = match result {
                Err(err) => (Outcome::Failed, err.code_and_reason().1.as_str(), None),
                Ok(outcome) => answer_for(id, outcome),
            };
            self.audit.record_for(
                &call,
                &Record {
                    action: "delete",
                    repository: &self.repository,
                    image_tag: tag,
                    digest_before: before.as_deref(),
                    digest_after: "",
                    outcome: Some(outcome),
                    reason,
                },
            );
        }
    }
}

/// What a delete's answer says of `id`: its failure (an id ECR did not find had nothing
/// before), or its deletion and the digest it named.
fn answer_for<'o>(id: &ImageRef, outcome: &'o DeleteOutcome) -> (Outcome, &'o str, Option<String>) {
    if let Some(failure) = outcome
        .failures
        .iter()
        .find(|f| f.image.as_ref() == Some(id))
    {
        let before = (failure.code == "ImageNotFound").then(String::new);
        return (Outcome::Failed, failure.code.as_str(), before);
    }
    let deleted = outcome.deleted.iter().find(|d| match id.tag() {
        Some(tag) => d.tag.as_ref() == Some(tag),
        None => d.digest.as_ref() == id.digest(),
    });
    match deleted {
        Some(deleted) => (
            Outcome::Ok,
            "",
            Some(
                deleted
                    .digest
                    .as_ref()
                    .map(ToString::to_string)
                    .unwrap_or_default(),
            ),
        ),
        None => (Outcome::Failed, "NOT_REPORTED", None),
    }
}

impl Drop for PendingDeletes<'_> {
    fn drop(&mut self) {
        let Some(call) = self.call.take() else {
            return;
        };
        for id in &self.ids {
            self.audit.record_for(
                &call,
                &Record {
                    action: "delete",
                    repository: &self.repository,
                    image_tag: id.tag().map_or("", Tag::as_str),
                    digest_before: None,
                    outcome: Some(Outcome::Failed),
                    reason: "DEADLINE_EXCEEDED",
                    ..Record::default()
                },
            );
        }
    }
}

//! Counts of ECR calls made, per operation and outcome, recorded by an SDK interceptor: the
//! numbers that show whether caching, coalescing and batching keep load off ECR.

use aws_sdk_ecr::config::interceptors::FinalizerInterceptorContextRef;
use aws_sdk_ecr::config::{ConfigBag, Intercept, RuntimeComponents};
use aws_sdk_ecr::error::BoxError;
use aws_smithy_runtime_api::client::orchestrator::Metadata;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// What one attempt came back with, by HTTP status class.
pub mod outcome {
    /// A 2xx response.
    pub const OK: &str = "ok";
    /// A 4xx response (throttling included: ECR throttles with 400).
    pub const CLIENT_ERROR: &str = "client_error";
    /// A 5xx response.
    pub const SERVER_ERROR: &str = "server_error";
    /// No response: connection failure or timeout.
    pub const NO_RESPONSE: &str = "no_response";
}

/// Shared counters; clones count into the same totals.
#[derive(Debug, Clone, Default)]
pub struct UpstreamCalls {
    /// Logical calls (retries not counted) by operation.
    calls: Family<[(&'static str, String); 1], Counter>,
    /// Attempts by operation and outcome.
    attempts: Family<[(&'static str, String); 2], Counter>,
    /// 1 when ECR's last attempt got an answer that was not a 5xx, 0 when it got none or a
    /// 5xx. A family without labels, so the series appears with the first attempt instead of
    /// reading 0 ("unreachable") on a service that has not called ECR yet.
    reachable: Family<Vec<(String, String)>, Gauge>,
}

impl UpstreamCalls {
    /// Logical calls of `operation` (e.g. `BatchGetImage`), retries not counted.
    pub fn calls(&self, operation: &str) -> u64 {
        self.calls
            .get_or_create(&[("operation", operation.to_owned())])
            .get()
    }

    /// Attempts of `operation` that ended with `outcome` (see [`outcome`]).
    pub fn attempts(&self, operation: &str, outcome: &'static str) -> u64 {
        self.attempts
            .get_or_create(&[
                ("operation", operation.to_owned()),
                ("outcome", outcome.to_owned()),
            ])
            .get()
    }

    /// Adds these counters to `registry` (`ecr_calls_total`, `ecr_attempts_total`).
    pub fn register_metrics(&self, registry: &mut Registry) {
        registry.register(
            "ecr_calls",
            "ECR calls by operation, retries not counted",
            self.calls.clone(),
        );
        registry.register(
            "ecr_attempts",
            "ECR attempts by operation and outcome",
            self.attempts.clone(),
        );
        registry.register(
            "ecr_reachable",
            "1 if ECR's last attempt was answered without a 5xx, 0 if not (readiness ignores it)",
            self.reachable.clone(),
        );
    }

    /// Whether ECR's last attempt was answered without a 5xx; `None` before the first one.
    pub fn reachable(&self) -> Option<bool> {
        self.reachable
            .get(&Vec::new())
            .map(|gauge| gauge.get() == 1)
    }
}

fn operation(cfg: &ConfigBag) -> &str {
    cfg.load::<Metadata>().map_or("unknown", Metadata::name)
}

impl Intercept for UpstreamCalls {
    fn name(&self) -> &'static str {
        "UpstreamCalls"
    }

    // Calls are counted as they end: the operation's metadata is not in the config bag yet
    // when an execution starts.
    fn read_after_execution(
        &self,
        _context: &FinalizerInterceptorContextRef<'_>,
        _components: &RuntimeComponents,
        cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        self.calls
            .get_or_create(&[("operation", operation(cfg).to_owned())])
            .inc();
        Ok(())
    }

    fn read_after_attempt(
        &self,
        context: &FinalizerInterceptorContextRef<'_>,
        _components: &RuntimeComponents,
        cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        let what = match context.response().map(|r| r.status().as_u16()) {
            Some(200..=299) => outcome::OK,
            Some(500..) => outcome::SERVER_ERROR,
            Some(_) => outcome::CLIENT_ERROR,
            None => outcome::NO_RESPONSE,
        };
        self.attempts
            .get_or_create(&[
                ("operation", operation(cfg).to_owned()),
                ("outcome", what.to_owned()),
            ])
            .inc();
        let answered = matches!(what, outcome::OK | outcome::CLIENT_ERROR);
        self.reachable
            .get_or_create(&Vec::new())
            .set(i64::from(answered));
        Ok(())
    }
}

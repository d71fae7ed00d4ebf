//! Counts of ECR calls made, per operation and outcome, recorded by an SDK interceptor: the
//! numbers that show whether caching, coalescing and batching keep load off ECR.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};

use aws_sdk_ecr::config::interceptors::FinalizerInterceptorContextRef;
use aws_sdk_ecr::config::{ConfigBag, Intercept, RuntimeComponents};
use aws_sdk_ecr::error::BoxError;
use aws_smithy_runtime_api::client::orchestrator::Metadata;

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
    /// (operation, what) -> count, where what is `call` or an attempt outcome.
    counts: Arc<Mutex<BTreeMap<(String, &'static str), u64>>>,
}

/// The `what` under which logical calls (not attempts) are counted.
const CALL: &str = "call";

impl UpstreamCalls {
    fn add(&self, operation: &str, what: &'static str) {
        let mut counts = self.counts.lock().unwrap_or_else(PoisonError::into_inner);
        *counts.entry((operation.to_owned(), what)).or_default() += 1;
    }

    fn get(&self, operation: &str, what: &'static str) -> u64 {
        let counts = self.counts.lock().unwrap_or_else(PoisonError::into_inner);
        counts
            .get(&(operation.to_owned(), what))
            .copied()
            .unwrap_or_default()
    }

    /// Logical calls of `operation` (e.g. `BatchGetImage`), retries not counted.
    pub fn calls(&self, operation: &str) -> u64 {
        self.get(operation, CALL)
    }

    /// Attempts of `operation` that ended with `outcome` (see [`outcome`]).
    pub fn attempts(&self, operation: &str, outcome: &'static str) -> u64 {
        self.get(operation, outcome)
    }

    /// Every count: (operation, `call` or attempt outcome, count).
    pub fn snapshot(&self) -> Vec<(String, &'static str, u64)> {
        let counts = self.counts.lock().unwrap_or_else(PoisonError::into_inner);
        counts
            .iter()
            .map(|((op, what), n)| (op.clone(), *what, *n))
            .collect()
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
        self.add(operation(cfg), CALL);
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
        self.add(operation(cfg), what);
        Ok(())
    }
}

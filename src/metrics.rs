//! Prometheus metrics, served by the admin endpoint on `--admin-listen` at `/metrics`.
//!
//! Process-wide metrics (RPCs, the ECR rate budgets) live here as statics: there is one server
//! and one budget per process. Per-instance metrics (cache, coalescing, batching, ECR calls)
//! are owned by the components that count them, so tests can read one instance's counts
//! exactly; each layer of the registry stack registers its own, and [`registry`] gathers them
//! for the endpoint without knowing which layers there are. Recording is an atomic increment or a
//! histogram bucket: nothing the cached-read benchmark can see.

use std::sync::LazyLock;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};

/// One label.
pub type Label = [(&'static str, &'static str); 1];
/// Two labels.
pub type Labels = [(&'static str, &'static str); 2];
/// A histogram family with one label.
pub type Histograms = Family<Label, Histogram, fn() -> Histogram>;

/// Metrics of the whole process.
#[derive(Debug)]
pub struct ProcessMetrics {
    /// Finished RPCs by method and gRPC code.
    pub rpc_requests: Family<Labels, Counter>,
    /// RPC latency by method.
    pub rpc_duration: Histograms,
    /// RPCs being served now.
    pub rpc_in_flight: Gauge,
    /// ECR requests that waited for a rate-budget slot, by operation.
    pub budget_waits: Family<Label, Counter>,
    /// ECR requests refused for want of a slot before their deadline, by operation.
    pub budget_rejections: Family<Label, Counter>,
    /// Where the ECR budgets' slots come from: `mode="redis"` (shared by the fleet) or
    /// `mode="local"` (this replica's share), 1 for the current one.
    pub budget_mode: Family<Label, Gauge>,
    /// Switches between the two, by the mode switched to.
    pub budget_mode_switches: Family<Label, Counter>,
    /// Requests shed at admission, by what was at its limit (`concurrency`, `bytes`).
    pub requests_shed: Family<Label, Counter>,
    /// WatchTag streams open on this replica.
    pub watches_open: Gauge,
    /// Re-reads of a watched file that changed, by file (`authorization policy`, `TLS
    /// certificates`, `registries file`) and result (`applied`, `invalid`).
    pub file_reloads: Family<Labels, Counter>,
}

/// RPC latency buckets: 100 µs (a cache hit) doubling to ~13 s (past the default deadline).
fn rpc_buckets() -> Histogram {
    Histogram::new(exponential_buckets(0.0001, 2.0, 18))
}

static PROCESS: LazyLock<ProcessMetrics> = LazyLock::new(|| ProcessMetrics {
    rpc_requests: Family::default(),
    rpc_duration: Family::new_with_constructor(rpc_buckets),
    rpc_in_flight: Gauge::default(),
    budget_waits: Family::default(),
    budget_rejections: Family::default(),
    budget_mode: Family::default(),
    budget_mode_switches: Family::default(),
    requests_shed: Family::default(),
    watches_open: Gauge::default(),
    file_reloads: Family::default(),
});

/// The ECR budgets' slots come from Redis (`shared`) or from this replica's share now; a
/// change is counted as a switch.
pub fn budget_mode(shared: bool) {
    let process = process();
    let (now, other) = if shared {
        ("redis", "local")
    } else {
        ("local", "redis")
    };
    process.budget_mode.get_or_create(&[("mode", now)]).set(1);
    if process.budget_mode.get_or_create(&[("mode", other)]).set(0) == 1 {
        process
            .budget_mode_switches
            .get_or_create(&[("to", now)])
            .inc();
    }
}

/// The process's metrics.
pub fn process() -> &'static ProcessMetrics {
    &PROCESS
}

/// The registry the admin endpoint serves: the process's metrics and what `components`
/// registers (each layer of the registry stack its own), all prefixed `imageservice_`. The
/// components are passed in, so that this module knows no layer above it.
pub fn registry(components: impl FnOnce(&mut Registry)) -> Registry {
    let mut registry = Registry::with_prefix("imageservice");
    let process = process();
    registry.register(
        "rpc_requests",
        "Finished RPCs by method and gRPC code",
        process.rpc_requests.clone(),
    );
    registry.register_with_unit(
        "rpc_duration",
        "RPC latency by method",
        Unit::Seconds,
        process.rpc_duration.clone(),
    );
    registry.register(
        "rpc_in_flight",
        "RPCs being served",
        process.rpc_in_flight.clone(),
    );
    registry.register(
        "ecr_budget_waits",
        "ECR requests that waited for a rate-budget slot",
        process.budget_waits.clone(),
    );
    registry.register(
        "ecr_budget_rejections",
        "ECR requests refused: no rate-budget slot before their deadline",
        process.budget_rejections.clone(),
    );
    registry.register(
        "ecr_budget_mode",
        "Where ECR budget slots come from: redis (shared by the fleet) or local (this replica's share)",
        process.budget_mode.clone(),
    );
    registry.register(
        "ecr_budget_mode_switches",
        "Switches of the ECR budgets between redis and local, by the mode switched to",
        process.budget_mode_switches.clone(),
    );
    registry.register(
        "requests_shed",
        "Requests shed at admission (UNAVAILABLE OVERLOADED), by what was at its limit",
        process.requests_shed.clone(),
    );
    registry.register(
        "watches_open",
        "WatchTag streams open on this replica",
        process.watches_open.clone(),
    );
    registry.register(
        "file_reloads",
        "Changed files re-read, by file and result (applied, invalid: the previous version stays)",
        process.file_reloads.clone(),
    );
    components(&mut registry);
    registry
}

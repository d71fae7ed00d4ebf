//! ECR rate budgets: every request to ECR, retries included, waits for a send slot of its
//! operation's budget, so ECR never sees more than the configured rate from this process.
//!
//! The budget sits in the HTTP connector because that is the one place every attempt passes
//! through: the SDK's retry loop is above it. A request whose slot would come after its
//! caller's deadline is refused at once with the time it would have had to wait.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use aws_smithy_runtime_api::client::http::{
    HttpClient, HttpConnector, HttpConnectorFuture, HttpConnectorSettings, SharedHttpClient,
    SharedHttpConnector,
};
use aws_smithy_runtime_api::client::orchestrator::HttpRequest;
use aws_smithy_runtime_api::client::result::ConnectorError;
use aws_smithy_runtime_api::client::runtime_components::RuntimeComponents;
use tokio::time::Instant;

use crate::{deadline, metrics};

/// Requests are paced this fraction under the configured rate. Sends at exactly the rate can
/// still arrive closer together: between the budget's release and the wire there is connection
/// set-up and a busy runtime, and under a burst that delay varies by tens of milliseconds (the
/// burst test saw a 50 ms swing). 10% leaves ~100 ms of such jitter per second before a
/// one-second window at ECR could hold one request too many.
const PACING_HEADROOM: f64 = 0.9;

/// What a granted slot must leave before the deadline for the ECR call itself: ECR answers
/// these operations in tens of milliseconds.
const ECR_CALL_ALLOWANCE: Duration = Duration::from_millis(100);

/// A request refused because its operation's budget has no slot before the caller's deadline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the ECR rate budget has no send slot before the deadline; next slot in {retry_after:?}")]
pub struct BudgetExhausted {
    /// How long until the budget would have had a slot.
    pub retry_after: Duration,
}

/// One operation's budget: send slots evenly spaced at the configured rate.
///
/// Strict pacing (no burst) is what makes "never more than the rate in any second" hold for
/// every one-second window, not just on average. Two clocks keep it: reserved slots decide at
/// once whether a request can be sent before its deadline; the time of the last actual send
/// keeps the spacing when a busy runtime wakes several reserved requests late together.
#[derive(Debug)]
pub struct RateBudget {
    interval: Duration,
    state: Mutex<Pacing>,
}

#[derive(Debug, Default)]
struct Pacing {
    /// The next slot not yet reserved.
    next_slot: Option<Instant>,
    /// When the last request was let through.
    last_sent: Option<Instant>,
}

impl RateBudget {
    /// A budget of `per_second` requests per second.
    pub fn per_second(per_second: f64) -> Self {
        Self {
            interval: Duration::from_secs_f64(1.0 / (per_second * PACING_HEADROOM)),
            state: Mutex::default(),
        }
    }

    /// Waits for the next send slot, or refuses at once if it falls after `deadline`; says
    /// whether it had to wait. A slot taken by a request that is then cancelled is not reused:
    /// the budget errs on the side of sending less.
    pub async fn acquire(&self, deadline: Option<Instant>) -> Result<bool, BudgetExhausted> {
        let slot = {
            let mut pacing = self.state.lock().unwrap_or_else(PoisonError::into_inner);
            let now = Instant::now();
            let slot = pacing.next_slot.map_or(now, |n| n.max(now));
            if let Some(deadline) = deadline
                && slot > deadline
            {
                return Err(BudgetExhausted {
                    retry_after: slot - now,
                });
            }
            pacing.next_slot = Some(slot + self.interval);
            slot
        };
        // An elapsed deadline would still wait for the timer wheel's next tick (up to 1 ms).
        let mut waited = slot > Instant::now();
        if waited {
            tokio::time::sleep_until(slot).await;
        }
        loop {
            let not_before = {
                let mut pacing = self.state.lock().unwrap_or_else(PoisonError::into_inner);
                let now = Instant::now();
                match pacing.last_sent.map(|last| last + self.interval) {
                    Some(not_before) if not_before > now => not_before,
                    _ => {
                        pacing.last_sent = Some(now);
                        pacing.next_slot = pacing.next_slot.max(Some(now + self.interval));
                        return Ok(waited);
                    }
                }
            };
            waited = true;
            tokio::time::sleep_until(not_before).await;
        }
    }
}

/// Budgets by ECR operation name (`PutImage`, `BatchGetImage`); unlisted operations are free.
#[derive(Debug, Default, Clone)]
pub struct RateBudgets {
    budgets: Arc<HashMap<&'static str, RateBudget>>,
}

impl RateBudgets {
    /// Budgets from (operation, requests per second) pairs.
    pub fn new(rates: impl IntoIterator<Item = (&'static str, f64)>) -> Self {
        let budgets = rates
            .into_iter()
            .map(|(op, rate)| (op, RateBudget::per_second(rate)))
            .collect();
        Self {
            budgets: Arc::new(budgets),
        }
    }

    /// The budget of `operation`, with the operation's name as a static label value.
    fn entry(&self, operation: &str) -> Option<(&'static str, &RateBudget)> {
        self.budgets
            .get_key_value(operation)
            .map(|(name, budget)| (*name, budget))
    }
}

/// The SDK's HTTP client with the budgets in front of every request.
#[derive(Debug, Clone)]
pub struct BudgetedHttpClient {
    inner: SharedHttpClient,
    budgets: RateBudgets,
}

impl BudgetedHttpClient {
    /// Wraps `inner`.
    pub fn new(inner: SharedHttpClient, budgets: RateBudgets) -> Self {
        Self { inner, budgets }
    }
}

impl HttpClient for BudgetedHttpClient {
    fn http_connector(
        &self,
        settings: &HttpConnectorSettings,
        components: &RuntimeComponents,
    ) -> SharedHttpConnector {
        SharedHttpConnector::new(BudgetedConnector {
            inner: self.inner.http_connector(settings, components),
            budgets: self.budgets.clone(),
        })
    }
}

#[derive(Debug)]
struct BudgetedConnector {
    inner: SharedHttpConnector,
    budgets: RateBudgets,
}

impl HttpConnector for BudgetedConnector {
    fn call(&self, request: HttpRequest) -> HttpConnectorFuture {
        // awsJson1_1 names the operation in X-Amz-Target: `AmazonEC2ContainerRegistry_V20150921.PutImage`.
        let operation = request
            .headers()
            .get("x-amz-target")
            .and_then(|target| target.rsplit_once('.'))
            .map(|(_, operation)| operation.to_owned());
        let budgets = self.budgets.clone();
        let inner = self.inner.clone();
        // A slot is only useful if the call it admits can finish before the deadline.
        let deadline = deadline::current().map(|d| d.checked_sub(ECR_CALL_ALLOWANCE).unwrap_or(d));
        HttpConnectorFuture::new(async move {
            if let Some((op, budget)) = operation.as_deref().and_then(|op| budgets.entry(op)) {
                let counted = metrics::process();
                match budget.acquire(deadline).await {
                    Ok(true) => counted
                        .budget_waits
                        .get_or_create(&[("operation", op)])
                        .inc(),
                    Ok(false) => 0,
                    Err(refused) => {
                        counted
                            .budget_rejections
                            .get_or_create(&[("operation", op)])
                            .inc();
                        return Err(ConnectorError::user(Box::new(refused)));
                    }
                };
            }
            inner.call(request).await
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Slots are spaced at the paced rate (never early; late only by the timer's millisecond
    /// granularity, which accumulates per slot), and a slot past the deadline is refused at
    /// once with the wait it would have needed.
    #[tokio::test(start_paused = true)]
    async fn slots_are_paced_and_bounded_by_the_deadline() {
        let budget = RateBudget::per_second(10.0);
        let start = Instant::now();
        let interval = Duration::from_secs_f64(0.1 / PACING_HEADROOM);
        for n in 0..5u32 {
            budget.acquire(None).await.unwrap();
            let late = start.elapsed().checked_sub(interval * n);
            let bound = Duration::from_millis(2) * (n + 1);
            assert!(
                late.is_some_and(|l| l <= bound),
                "slot {n} at {:?}",
                start.elapsed()
            );
        }
        // The next slot is ~111 ms away: within a 150 ms deadline, the one after it is not.
        let deadline = Some(Instant::now() + Duration::from_millis(150));
        budget.acquire(deadline).await.unwrap();
        let asked = Instant::now();
        let refused = budget.acquire(deadline).await.unwrap_err();
        assert_eq!(Instant::now(), asked, "refused at once");
        assert!(refused.retry_after.abs_diff(interval) < Duration::from_millis(5));
    }
}

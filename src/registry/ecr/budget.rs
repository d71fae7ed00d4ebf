//! ECR rate budgets: every request to ECR, retries included, waits for a send slot of its
//! operation's budget, so ECR never sees more than the configured rate from this process.
//!
//! The budget sits in the HTTP connector because that is the one place every attempt passes
//! through: the SDK's retry loop is above it. A request whose slot would come after its
//! caller's deadline is refused at once with the time it would have had to wait.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use aws_smithy_runtime_api::client::http::{
    HttpClient, HttpConnector, HttpConnectorFuture, HttpConnectorSettings, SharedHttpClient,
    SharedHttpConnector,
};
use aws_smithy_runtime_api::client::orchestrator::HttpRequest;
use aws_smithy_runtime_api::client::result::ConnectorError;
use aws_smithy_runtime_api::client::runtime_components::RuntimeComponents;
use tokio::sync::oneshot;
use tokio::time::Instant;

use crate::{deadline, identity, metrics};

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

/// One operation's budget: send slots evenly spaced at the configured rate, shared fairly.
///
/// Strict pacing (no burst) is what makes "never more than the rate in any second" hold for
/// every one-second window, not just on average. When requests compete for slots, each caller
/// (the principal of the request, [`identity::current`]) with requests waiting gets its turn in
/// round robin, one slot a turn, so one caller's 500 queued puts cannot starve another's one:
/// a principal alone gets the whole rate, two get half each. A dispatcher task, alive only
/// while requests wait, releases them one interval apart.
#[derive(Debug)]
pub struct RateBudget {
    interval: Duration,
    state: Arc<Mutex<Queues>>,
}

/// The waiting requests, by caller.
#[derive(Debug, Default)]
struct Queues {
    /// When the last request was let through.
    last_sent: Option<Instant>,
    /// Each caller's waiting requests, oldest first.
    waiting: HashMap<Arc<str>, VecDeque<oneshot::Sender<()>>>,
    /// The callers with waiting requests, in turn order.
    turns: VecDeque<Arc<str>>,
    /// Waiting requests, all callers together.
    queued: usize,
    /// Whether a dispatcher task is running.
    dispatching: bool,
}

impl RateBudget {
    /// A budget of `per_second` requests per second.
    pub fn per_second(per_second: f64) -> Self {
        Self {
            interval: Duration::from_secs_f64(1.0 / (per_second * PACING_HEADROOM)),
            state: Arc::default(),
        }
    }

    /// Waits for a send slot; says whether it had to wait. Refuses at once when, with every
    /// waiting caller taking its turn first, the slot would come after `deadline`; a request
    /// still waiting at its deadline is refused then, its turn passed on unused.
    pub async fn acquire(&self, deadline: Option<Instant>) -> Result<bool, BudgetExhausted> {
        let caller = identity::current().unwrap_or_else(|| Arc::from(""));
        let interval = self.interval;
        let ready = {
            let mut queues = self.state.lock().unwrap_or_else(PoisonError::into_inner);
            let now = Instant::now();
            let next = queues
                .last_sent
                .map_or(now, |last| (last + interval).max(now));
            if queues.queued == 0 && next <= now {
                queues.last_sent = Some(now);
                return Ok(false);
            }
            // Slots before this request's at most: its own queue, and one a turn for every
            // other caller waiting until then.
            let own = queues.waiting.get(&caller).map_or(0, VecDeque::len);
            let callers = queues.turns.len() + usize::from(own == 0);
            let ahead = queues.queued.min((own + 1) * callers - 1);
            let slot = next + interval * u32::try_from(ahead).unwrap_or(u32::MAX);
            if let Some(deadline) = deadline
                && slot > deadline
            {
                return Err(BudgetExhausted {
                    retry_after: slot - now,
                });
            }
            let (ready_tx, ready) = oneshot::channel();
            if own == 0 {
                queues.turns.push_back(Arc::clone(&caller));
            }
            queues
                .waiting
                .entry(caller)
                .or_default()
                .push_back(ready_tx);
            queues.queued += 1;
            if !queues.dispatching {
                queues.dispatching = true;
                tokio::spawn(dispatch(Arc::clone(&self.state), interval));
            }
            ready
        };
        let released = match deadline {
            Some(deadline) => tokio::time::timeout_at(deadline, ready).await.ok(),
            None => Some(ready.await),
        };
        match released {
            Some(Ok(())) => Ok(true),
            _ => Err(BudgetExhausted {
                retry_after: interval,
            }),
        }
    }
}

/// Releases waiting requests one interval apart, callers in turn, until none waits.
async fn dispatch(state: Arc<Mutex<Queues>>, interval: Duration) {
    loop {
        let next = {
            let queues = state.lock().unwrap_or_else(PoisonError::into_inner);
            queues.last_sent.map(|last| last + interval)
        };
        if let Some(next) = next {
            tokio::time::sleep_until(next).await;
        }
        let mut queues = state.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            let Some(caller) = queues.turns.pop_front() else {
                queues.dispatching = false;
                return;
            };
            let (waiter, more) = match queues.waiting.get_mut(&caller) {
                Some(waiting) => (waiting.pop_front(), !waiting.is_empty()),
                None => (None, false),
            };
            if more {
                queues.turns.push_back(Arc::clone(&caller));
            } else {
                queues.waiting.remove(&caller);
            }
            let Some(waiter) = waiter else { continue };
            queues.queued -= 1;
            // A request that gave up (deadline, cancelled caller) takes no slot.
            if waiter.send(()).is_ok() {
                queues.last_sent = Some(Instant::now());
                break;
            }
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

    /// One caller with 40 requests waiting and another asking once: the second is let through
    /// at the next turn, not after the 40; alone, a caller gets every slot.
    #[tokio::test(start_paused = true)]
    async fn callers_take_turns() {
        let budget = Arc::new(RateBudget::per_second(10.0));
        let interval = budget.interval;
        let start = Instant::now();
        let busy: Vec<_> = (0..40)
            .map(|_| {
                let budget = Arc::clone(&budget);
                tokio::spawn(identity::scope(Arc::from("busy"), async move {
                    budget.acquire(None).await.unwrap();
                    Instant::now()
                }))
            })
            .collect();
        tokio::time::sleep(interval * 3).await;
        let asked = Instant::now();
        identity::scope(Arc::from("occasional"), budget.acquire(None))
            .await
            .unwrap();
        let waited = asked.elapsed();
        assert!(
            waited <= interval * 2,
            "the occasional caller waited {waited:?}"
        );
        let mut sent: Vec<Instant> = Vec::new();
        for request in busy {
            sent.push(request.await.unwrap());
        }
        sent.sort();
        // Alone again, the busy caller's slots are one interval apart, none closer.
        for pair in sent.windows(2) {
            assert!(pair[1] - pair[0] >= interval, "{:?}", pair[1] - pair[0]);
        }
        assert!(start.elapsed() <= interval * 42 + Duration::from_millis(50));
    }
}

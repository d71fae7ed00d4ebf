//! Single flight: concurrent identical reads share one upstream call.

use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::sync::{Arc, Mutex, PoisonError};

use prometheus_client::metrics::counter::Counter;
use tokio::sync::OnceCell;

/// Calls in flight, by key. A caller that finds its key in flight waits for that call's result
/// instead of making its own. If the caller running the call goes away (its client gave up),
/// one of the waiters runs it instead: `OnceCell` hands initialisation on.
#[derive(Debug)]
pub struct Flights<K, V> {
    in_flight: Mutex<HashMap<K, Arc<OnceCell<V>>>>,
    /// Callers that joined a call already in flight rather than starting one.
    joined: Counter,
    /// Called the instant a finished call's entry leaves the map, for tests that look at
    /// what a request arriving right then would find.
    #[cfg(test)]
    on_leave: Mutex<Option<LeaveHook>>,
}

/// See [`Flights::on_leave`].
#[cfg(test)]
pub struct LeaveHook(pub Box<dyn Fn() + Send + Sync>);

#[cfg(test)]
impl std::fmt::Debug for LeaveHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LeaveHook")
    }
}

impl<K, V> Default for Flights<K, V> {
    fn default() -> Self {
        Self {
            in_flight: Mutex::default(),
            joined: Counter::default(),
            #[cfg(test)]
            on_leave: Mutex::default(),
        }
    }
}

impl<K: Hash + Eq + Clone, V: Clone> Flights<K, V> {
    /// Runs `call` for `key`, or waits for the identical call already running.
    pub async fn run<F, Fut>(&self, key: K, call: F) -> V
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = V>,
    {
        let cell = {
            let mut in_flight = self
                .in_flight
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            let cell = in_flight.entry(key.clone()).or_default();
            if cell.initialized() || Arc::strong_count(cell) > 1 {
                self.joined.inc();
            }
            Arc::clone(cell)
        };
        // Leaves the map tidy however this caller ends: with the answer, or dropped because
        // its client gave up (code after an `.await` never runs then).
        let seat = Seat {
            flights: self,
            key,
            cell,
        };
        seat.cell.get_or_init(call).await.clone()
    }

    /// Keys in flight now.
    #[cfg(test)]
    pub fn keys_in_flight(&self) -> usize {
        self.in_flight
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    /// Callers that joined a call in flight instead of making their own.
    pub fn joined(&self) -> &Counter {
        &self.joined
    }

    /// Runs `hook` whenever a finished call's entry leaves the map, in that instant.
    #[cfg(test)]
    pub fn on_leave(&self, hook: LeaveHook) {
        *self.on_leave.lock().unwrap_or_else(PoisonError::into_inner) = Some(hook);
    }
}

/// One caller's place in a flight. When the last caller leaves, or the answer is in, the
/// entry goes: the next caller starts a new call, and nobody's entry outlives its callers.
struct Seat<'a, K: Hash + Eq, V> {
    flights: &'a Flights<K, V>,
    key: K,
    cell: Arc<OnceCell<V>>,
}

impl<K: Hash + Eq, V> Drop for Seat<'_, K, V> {
    fn drop(&mut self) {
        let mut in_flight = self
            .flights
            .in_flight
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let ours = in_flight
            .get(&self.key)
            .is_some_and(|c| Arc::ptr_eq(c, &self.cell));
        // The map's reference and this seat's: nobody else is waiting.
        let last = Arc::strong_count(&self.cell) <= 2;
        if ours && (self.cell.initialized() || last) {
            in_flight.remove(&self.key);
            #[cfg(test)]
            if self.cell.initialized()
                && let Some(hook) = &*self
                    .flights
                    .on_leave
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
            {
                (hook.0)();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    /// N concurrent callers of one key make exactly one call and all get its result.
    #[tokio::test(start_paused = true)]
    async fn concurrent_callers_share_one_call() {
        let flights = Arc::new(Flights::<&str, u32>::default());
        let calls = Arc::new(AtomicUsize::new(0));
        let callers: Vec<_> = (0..50)
            .map(|_| {
                let (flights, calls) = (flights.clone(), calls.clone());
                tokio::spawn(async move {
                    flights
                        .run("tag", || async {
                            calls.fetch_add(1, Ordering::SeqCst);
                            tokio::time::sleep(Duration::from_millis(10)).await;
                            7
                        })
                        .await
                })
            })
            .collect();
        for caller in callers {
            assert_eq!(caller.await.unwrap(), 7);
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert_eq!(flights.joined().get(), 49);
        // Finished flights are forgotten: the next call runs again.
        assert_eq!(flights.run("tag", || async { 8 }).await, 8);
        assert_eq!(flights.keys_in_flight(), 0);
    }

    /// Callers dropped mid-call (their clients gave up) leave no entry behind, and a caller
    /// still waiting when another is dropped keeps the flight.
    #[tokio::test(start_paused = true)]
    async fn cancelled_callers_leave_no_entry() {
        let flights = Flights::<u32, u32>::default();
        let slow = || async {
            tokio::time::sleep(Duration::from_secs(1)).await;
            1
        };
        for key in 0..1000 {
            let cancelled =
                tokio::time::timeout(Duration::from_millis(10), flights.run(key, slow)).await;
            assert!(cancelled.is_err());
        }
        assert_eq!(
            flights.keys_in_flight(),
            0,
            "every cancelled caller's entry is gone"
        );

        let patient = flights.run(7, slow);
        let impatient = tokio::time::timeout(Duration::from_millis(10), flights.run(7, slow));
        let (answer, gave_up) = tokio::join!(patient, impatient);
        assert_eq!(answer, 1);
        assert!(gave_up.is_err());
        assert_eq!(flights.keys_in_flight(), 0);
    }
}

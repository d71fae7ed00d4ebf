//! The call context: the facts about one call that every layer needs (when its work must be
//! done, who asked, which registry it is for), in one value.
//!
//! Admission creates it once per request, from the headers' arrival and the one configured
//! identity source; the API layer adds the registry once the request is validated, and runs
//! the work inside it ([`CallContext::scope`]). Layers below read it with [`current`]. Work that
//! moves to another task takes the context with it through [`spawn`], or, where one task serves
//! several calls (the batcher's drain), through a context made for that work
//! ([`CallContext::serving`]): never a deadline or a caller re-scoped by hand.
//!
//! It is a task-local because the one place that must see it for every ECR attempt, the rate
//! budget in the SDK's HTTP connector, is reached through the SDK and cannot take arguments.

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::domain::image::RegistryId;

/// Time kept back from the caller's deadline to send our answer before it gives up: a gRPC
/// client stops listening at its `grpc-timeout` with a bare DEADLINE_EXCEEDED of its own, so
/// ending our work this much earlier means the caller gets ours, with its ErrorInfo, while it
/// still listens. The one margin: every layer below works to [`CallContext::deadline`] as it is.
pub const RESPONSE_MARGIN: Duration = Duration::from_millis(50);

/// The principal of a caller when no identity source is configured.
pub const ANONYMOUS: &str = "anonymous";

/// A caller's identity: a SPIFFE ID, a Linkerd identity, or `anonymous`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Principal(Arc<str>);

/// The one `anonymous` principal, shared: no allocation per request without identities.
static ANONYMOUS_PRINCIPAL: std::sync::LazyLock<Arc<str>> =
    std::sync::LazyLock::new(|| Arc::from(ANONYMOUS));

impl Principal {
    /// The identity as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The caller of an unauthenticated source.
    pub fn anonymous() -> Self {
        Self(Arc::clone(&ANONYMOUS_PRINCIPAL))
    }

    /// Whether this is the caller of an unauthenticated source.
    pub fn is_anonymous(&self) -> bool {
        &*self.0 == ANONYMOUS
    }

    /// A principal named `text`: what an identity source read, or a name given on the
    /// command line (`policy check`).
    pub fn named(text: &str) -> Self {
        Self(Arc::from(text))
    }

    /// The identity as a shared string: a key that costs no allocation to clone.
    pub fn shared(&self) -> Arc<str> {
        Arc::clone(&self.0)
    }
}

impl fmt::Display for Principal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Why a request carries no usable identity: a fixed description, never the header's value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NoIdentity(pub &'static str);

/// One call: its deadline, its caller and its registry.
#[derive(Debug, Clone)]
pub struct CallContext {
    /// When the work must be done ([`RESPONSE_MARGIN`] already kept back); `None` for work
    /// no caller waits for.
    deadline: Option<Instant>,
    /// Who asked, or why it is not known (the call is then refused before any work).
    caller: Result<Principal, NoIdentity>,
    /// The registry the call is for; `None`: the service's own.
    registry: Option<RegistryId>,
    /// Where a write's ECR request ids are noted for its audit events; `None` (no allocation)
    /// for every call that writes nothing.
    receipt: Option<Arc<Receipt>>,
}

/// What a write call's audit events name beyond its caller and registry: the request's ids,
/// and the ECR request ids of its writes, in the order they were made.
#[derive(Debug, Default)]
pub struct Receipt {
    /// The request's id (`x-request-id`, as meshes set it), or one drawn for it.
    pub request_id: String,
    /// The caller's W3C trace id; empty without one.
    pub trace_id: String,
    ecr: std::sync::Mutex<Vec<String>>,
}

impl Receipt {
    /// The ECR request ids noted since the last take, and none kept.
    pub fn take(&self) -> Vec<String> {
        std::mem::take(
            &mut *self
                .ecr
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        )
    }
}

tokio::task_local! {
    static CURRENT: CallContext;
}

impl CallContext {
    /// A request's context: due at `deadline`, from `caller`, for the service's own registry
    /// until [`for_registry`](Self::for_registry) says otherwise.
    pub fn new(deadline: Instant, caller: Result<Principal, NoIdentity>) -> Self {
        Self {
            deadline: Some(deadline),
            caller,
            registry: None,
            receipt: None,
        }
    }

    /// The same call, noting its writes' ECR request ids in a receipt of its own, with the
    /// request's `request_id` and `trace_id`.
    #[must_use]
    pub fn with_receipt(mut self, request_id: String, trace_id: String) -> Self {
        self.receipt = Some(Arc::new(Receipt {
            request_id,
            trace_id,
            ecr: std::sync::Mutex::default(),
        }));
        self
    }

    /// The call's receipt, if it keeps one.
    pub fn receipt(&self) -> Option<&Arc<Receipt>> {
        self.receipt.as_ref()
    }

    /// The context of work the service does on its own behalf (a watch poll): no deadline,
    /// `caller` a name of the service's own, charged like any caller in the budgets' turns.
    pub fn background(caller: &'static str) -> Self {
        Self {
            deadline: None,
            caller: Ok(Principal::named(caller)),
            registry: None,
            receipt: None,
        }
    }

    /// [`background`](Self::background) for a caller named at run time (tests).
    #[cfg(test)]
    pub fn background_of(caller: &str) -> Self {
        Self {
            deadline: None,
            caller: Ok(Principal::named(caller)),
            registry: None,
            receipt: None,
        }
    }

    /// The context of one piece of work done for several calls at once (a batched ECR call):
    /// it lasts as long as the most patient of them (no deadline if one has none), and is
    /// charged to the first of them, whose miss started it. Everyone else rides along free;
    /// the batcher fills each batch in turns across callers, so no caller is kept out of one.
    pub fn serving<'a>(calls: impl IntoIterator<Item = &'a CallContext>) -> Option<Self> {
        let mut calls = calls.into_iter();
        let first = calls.next()?;
        let mut serving = first.clone();
        for call in calls {
            serving.deadline = match (serving.deadline, call.deadline) {
                (Some(a), Some(b)) => Some(a.max(b)),
                _ => None,
            };
        }
        Some(serving)
    }

    /// The same call, for `registry` (`None`: the service's own).
    #[must_use]
    pub fn for_registry(mut self, registry: Option<RegistryId>) -> Self {
        self.registry = registry;
        self
    }

    /// When the work must be done, if anyone waits for it.
    pub fn deadline(&self) -> Option<Instant> {
        self.deadline
    }

    /// Who asked, or why that is not known.
    pub fn caller(&self) -> Result<&Principal, NoIdentity> {
        self.caller.as_ref().map_err(|why| *why)
    }

    /// The key the budgets' fair turns are taken by: the principal, `""` without one.
    pub fn caller_key(&self) -> Arc<str> {
        self.caller
            .as_ref()
            .map_or_else(|_| Arc::from(""), Principal::shared)
    }

    /// The registry the call is for; `None`: the service's own.
    pub fn registry(&self) -> Option<&RegistryId> {
        self.registry.as_ref()
    }

    /// Runs `work` inside this context.
    ///
    /// Not `async`: an `async fn` keeps its arguments beside the future it awaits, so `work`
    /// would be held twice (GetImage's work future was 4.6 KB in its box for it, 3.4 KB more
    /// than the work itself).
    pub fn scope<F: Future>(self, work: F) -> impl Future<Output = F::Output> {
        CURRENT.scope(self, work)
    }
}

/// The context of the call this task is working for, if any.
pub fn current() -> Option<CallContext> {
    CURRENT.try_with(Clone::clone).ok()
}

/// The deadline of the call this task is working for, if it has one.
pub fn deadline() -> Option<Instant> {
    CURRENT.try_with(|call| call.deadline).ok().flatten()
}

/// The budgets' key for the call this task is working for (`""` outside one).
pub fn caller_key() -> Arc<str> {
    CURRENT
        .try_with(CallContext::caller_key)
        .unwrap_or_else(|_| Arc::from(""))
}

/// Notes `request_id`, an ECR write's, in the receipt of the call this task works for.
pub fn note_upstream_request(request_id: &str) {
    let _ = CURRENT.try_with(|call| {
        if let Some(receipt) = &call.receipt {
            receipt
                .ecr
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .push(request_id.to_owned());
        }
    });
}

/// Runs `work` on a task of its own, inside the current call's context: the one way work
/// leaves the request's task.
pub fn spawn<F>(work: F) -> tokio::task::JoinHandle<F::Output>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    match current() {
        Some(call) => tokio::spawn(call.scope(work)),
        None => tokio::spawn(work),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(caller: &str, deadline: Option<Instant>) -> CallContext {
        CallContext {
            deadline,
            caller: Ok(Principal::named(caller)),
            registry: None,
            receipt: None,
        }
    }

    /// The context travels with the task and, through [`spawn`], to the task it starts.
    #[tokio::test]
    async fn the_context_travels_with_the_task_and_its_spawns() {
        assert!(current().is_none());
        assert_eq!(&*caller_key(), "");
        let due = Instant::now() + Duration::from_secs(1);
        let (deadline, caller) = call("a", Some(due))
            .scope(async { spawn(async { (deadline(), caller_key()) }).await.unwrap() })
            .await;
        assert_eq!(deadline, Some(due));
        assert_eq!(&*caller, "a");
    }

    /// Shared work lasts as long as its most patient call and is charged to its first.
    #[test]
    fn shared_work_takes_the_latest_deadline_and_the_first_caller() {
        let now = Instant::now();
        let (early, late) = (now + Duration::from_secs(1), now + Duration::from_secs(2));
        let calls = [call("first", Some(early)), call("second", Some(late))];
        let serving = CallContext::serving(&calls).unwrap();
        assert_eq!(serving.deadline(), Some(late));
        assert_eq!(&*serving.caller_key(), "first");
        let patient = [call("a", Some(early)), call("b", None)];
        assert_eq!(CallContext::serving(&patient).unwrap().deadline(), None);
        assert!(CallContext::serving(&[]).is_none());
    }

    #[test]
    fn an_unidentified_caller_has_the_empty_key() {
        let call = CallContext::new(Instant::now(), Err(NoIdentity("no header")));
        assert_eq!(&*call.caller_key(), "");
        assert_eq!(call.caller(), Err(NoIdentity("no header")));
    }
}

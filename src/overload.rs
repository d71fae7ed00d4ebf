//! Overload protection: a concurrency limit with load shedding outside it.
//!
//! A request that finds every permit taken is answered at once with UNAVAILABLE and a
//! `RetryInfo`, rather than queued: queueing would hold its memory and push its latency past
//! its deadline. tower's `LoadShed` would answer RESOURCE_EXHAUSTED, which mesh retry policies
//! (Istio's `retryOn: unavailable`, Linkerd's retryable statuses) do not retry; UNAVAILABLE is
//! the code they do.
//!
//! It wraps the ImageService alone, not the whole server, so health probes are never shed:
//! an overloaded replica must not be restarted by its liveness probe.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::sync::Semaphore;
use tonic::Status;
use tonic::body::Body;
use tonic::server::NamedService;

use crate::error::Error;

/// A service with at most `limit` requests in flight; the rest are shed.
#[derive(Debug, Clone)]
pub struct Shed<S> {
    inner: S,
    permits: Arc<Semaphore>,
    retry_after: Duration,
}

impl<S> Shed<S> {
    /// Limits `inner` to `limit` concurrent requests; shed callers are told to retry after
    /// `retry_after`.
    pub fn new(inner: S, limit: usize, retry_after: Duration) -> Self {
        Self {
            inner,
            permits: Arc::new(Semaphore::new(limit)),
            retry_after,
        }
    }
}

type BoxFuture<T> = Pin<Box<dyn std::future::Future<Output = T> + Send>>;

impl<S, B> tonic::codegen::Service<http::Request<B>> for Shed<S>
where
    S: tonic::codegen::Service<http::Request<B>, Response = http::Response<Body>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        match Arc::clone(&self.permits).try_acquire_owned() {
            Ok(permit) => {
                let response = self.inner.call(request);
                Box::pin(async move {
                    let response = response.await;
                    drop(permit);
                    response
                })
            }
            Err(_) => {
                let status = Status::from(Error::Overloaded {
                    retry_after: self.retry_after,
                });
                tracing::debug!("request shed: concurrency limit reached");
                Box::pin(async move { Ok(status.into_http()) })
            }
        }
    }
}

impl<S: NamedService> NamedService for Shed<S> {
    const NAME: &'static str = S::NAME;
}

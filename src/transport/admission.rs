//! Admission: which requests the ImageService works on, decided once a request's body has
//! arrived and its size is known, so that a slow or oversized body cannot hold a slot.
//!
//! In order, for each request:
//! 1. the body is received within the header-to-body timeout and the caller's deadline (both
//!    counted from the headers' arrival); a body that dribbles is dropped with
//!    DEADLINE_EXCEEDED, and holds nothing but its own bytes while it waits;
//! 2. its bytes are charged, as they arrive, to a budget of request bytes in flight, which
//!    bounds the memory bodies can take (see the chart for the arithmetic); a message whose
//!    length prefix is over the largest legal request is refused before the rest is read;
//! 3. a request slot is taken (at most `max_concurrent_requests` at once).
//!
//! A request that finds the budget or the slots used up is shed at once with UNAVAILABLE and a
//! `RetryInfo`, rather than queued: queueing would hold its memory and push its latency past
//! its deadline. tower's `LoadShed` would answer RESOURCE_EXHAUSTED, which mesh retry policies
//! (Istio's `retryOn: unavailable`, Linkerd's retryable statuses) do not retry; UNAVAILABLE is
//! the code they do. The bytes and the slot are released when the answer is ready.
//!
//! It wraps the ImageService alone, not the whole server, so health probes are never shed:
//! an overloaded replica must not be restarted by its liveness probe.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http_body_util::{BodyExt, Full};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tonic::Status;
use tonic::body::Body;
use tonic::server::NamedService;

use crate::access::identity::IdentitySource;
use crate::api::error::{Error, Reason, Violation};
use crate::domain::call::{CallContext, RESPONSE_MARGIN};

/// The length of gRPC's message prefix: a compression flag and a 4-byte length.
const GRPC_PREFIX_BYTES: usize = 5;

/// The bounds [`Admission`] enforces.
#[derive(Debug, Clone, Copy)]
pub struct AdmissionLimits {
    /// Requests worked on at once.
    pub max_concurrent_requests: usize,
    /// Request bytes held at once, received or being received.
    pub max_request_bytes_in_flight: usize,
    /// How long a body may take to arrive after its headers.
    pub body_timeout: Duration,
    /// The deadline of a request that brings no `grpc-timeout`.
    pub default_deadline: Duration,
    /// What a shed caller is told to wait.
    pub retry_after: Duration,
    /// Where callers' identities come from.
    pub identity_source: IdentitySource,
}

/// A service that works only on admitted requests; the rest are answered at once.
#[derive(Debug, Clone)]
pub struct Admission<S> {
    inner: S,
    slots: Arc<Semaphore>,
    bytes: Arc<Semaphore>,
    limits: AdmissionLimits,
}

impl<S> Admission<S> {
    /// `inner`, behind `limits`.
    pub fn new(inner: S, limits: AdmissionLimits) -> Self {
        Self {
            inner,
            slots: Arc::new(Semaphore::new(limits.max_concurrent_requests)),
            bytes: Arc::new(Semaphore::new(limits.max_request_bytes_in_flight)),
            limits,
        }
    }
}

type BoxFuture<T> = Pin<Box<dyn std::future::Future<Output = T> + Send>>;

impl<S, B> tonic::codegen::Service<http::Request<B>> for Admission<S>
where
    S: tonic::codegen::Service<http::Request<Body>, Response = http::Response<Body>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: http_body::Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: std::fmt::Display,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let arrived = Instant::now();
        // The clone that was made ready is the one to call (tower's `poll_ready` contract).
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let (slots, bytes, limits) = (
            Arc::clone(&self.slots),
            Arc::clone(&self.bytes),
            self.limits,
        );
        Box::pin(async move {
            let (mut parts, body) = request.into_parts();
            let deadline = deadline_of(&parts.headers, arrived, limits.default_deadline);
            // The method table's limit: an oversized message is refused on its length prefix.
            let largest = crate::api::methods::request_limit(parts.uri.path());
            let deadlines = (arrived + limits.body_timeout, deadline);
            let received = receive(body, &bytes, &limits, largest, deadlines);
            let (body, charged) = match received.await {
                Ok(received) => received,
                Err(err) => return Ok(answer(err)),
            };
            let Ok(slot) = slots.try_acquire_owned() else {
                tracing::debug!("request shed: concurrency limit reached");
                crate::metrics::process()
                    .requests_shed
                    .get_or_create(&[("limit", "concurrency")])
                    .inc();
                return Ok(answer(overloaded(&limits)));
            };
            // The call's context, made once: the service and every layer below read this.
            let peer = parts
                .extensions
                .get::<crate::transport::tls::TlsConnectInfo>()
                .map(|info| &info.peer);
            let caller = limits.identity_source.principal(&parts.headers, peer);
            parts.extensions.insert(CallContext::new(deadline, caller));
            let request = http::Request::from_parts(parts, Body::new(Full::new(body)));
            let response = inner.call(request).await;
            drop((slot, charged));
            response
        })
    }
}

impl<S: NamedService> NamedService for Admission<S> {
    const NAME: &'static str = S::NAME;
}

/// When the work on a request whose headers arrived at `arrived` must be done: its
/// `grpc-timeout` (else `default`), less [`RESPONSE_MARGIN`]. Counted from the headers, not
/// from the body's arrival, so that the time a body took is part of it.
fn deadline_of(headers: &http::HeaderMap, arrived: Instant, default: Duration) -> Instant {
    let asked = headers
        .get("grpc-timeout")
        .and_then(|v| v.to_str().ok())
        .and_then(parse_grpc_timeout);
    arrived + asked.unwrap_or(default).saturating_sub(RESPONSE_MARGIN)
}

/// Parses a `grpc-timeout` header value: 1-8 ASCII digits and a unit, `H`, `M`, `S`, `m`
/// (milli), `u` (micro) or `n` (nano), per the gRPC HTTP/2 protocol.
pub fn parse_grpc_timeout(value: &str) -> Option<Duration> {
    let unit_at = value.len().checked_sub(1)?;
    let (digits, unit) = value.split_at(unit_at);
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let amount: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(amount * 3600),
        "M" => Duration::from_secs(amount * 60),
        "S" => Duration::from_secs(amount),
        "m" => Duration::from_millis(amount),
        "u" => Duration::from_micros(amount),
        "n" => Duration::from_nanos(amount),
        _ => return None,
    })
}

/// The error as a trailers-only gRPC answer.
fn answer(err: Error) -> http::Response<Body> {
    Status::from(err).into_http()
}

fn overloaded(limits: &AdmissionLimits) -> Error {
    Error::Overloaded {
        retry_after: limits.retry_after,
    }
}

/// The whole body of a message of at most `limit` bytes, and the bytes it holds in the budget:
/// by the body deadline and the caller's deadline (`deadlines`), whichever comes first.
async fn receive<B>(
    mut body: B,
    budget: &Arc<Semaphore>,
    limits: &AdmissionLimits,
    limit: usize,
    (body_deadline, deadline): (Instant, Instant),
) -> Result<(Bytes, Option<OwnedSemaphorePermit>), Error>
where
    B: http_body::Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    let mut received = Received::default();
    let mut charged: Option<OwnedSemaphorePermit> = None;
    let largest = limit + GRPC_PREFIX_BYTES;
    // A unary request usually arrives whole with its headers: END_STREAM is then known without
    // another poll, and the single chunk is passed on without a copy.
    while !body.is_end_stream() {
        let frame = match tokio::time::timeout_at(body_deadline.min(deadline), body.frame()).await {
            Err(_) if deadline <= body_deadline => return Err(Error::DeadlineExceeded),
            Err(_) => {
                return Err(Error::RequestBodyTimeout {
                    timeout: limits.body_timeout,
                });
            }
            Ok(None) => break,
            Ok(Some(Err(err))) => {
                return Err(Error::invalid(
                    Reason::InvalidField,
                    vec![Violation::new(
                        "request",
                        format!("the request body could not be read: {err}"),
                    )],
                ));
            }
            Ok(Some(Ok(frame))) => frame,
        };
        // Request trailers carry nothing gRPC defines; only data counts.
        let Ok(mut data) = frame.into_data() else {
            continue;
        };
        let total = received.len() + data.remaining();
        if total > largest {
            return Err(Error::RequestTooLarge {
                bytes: total.saturating_sub(GRPC_PREFIX_BYTES),
                limit,
            });
        }
        let more = u32::try_from(data.remaining()).unwrap_or(u32::MAX);
        let Ok(permit) = Arc::clone(budget).try_acquire_many_owned(more) else {
            tracing::debug!("request shed: request bytes in flight at their limit");
            crate::metrics::process()
                .requests_shed
                .get_or_create(&[("limit", "bytes")])
                .inc();
            return Err(overloaded(limits));
        };
        match &mut charged {
            Some(held) => held.merge(permit),
            None => charged = Some(permit),
        }
        received.push(data.copy_to_bytes(data.remaining()));
        if let Some(declared) = received.declared_length()
            && declared > limit
        {
            return Err(Error::RequestTooLarge {
                bytes: declared,
                limit,
            });
        }
    }
    Ok((received.into_bytes(), charged))
}

/// A body's bytes as they arrive: the first chunk as it came, a copy only once there are two.
#[derive(Default)]
struct Received {
    first: Bytes,
    more: Option<BytesMut>,
}

impl Received {
    fn len(&self) -> usize {
        self.more.as_ref().map_or(self.first.len(), BytesMut::len)
    }

    fn push(&mut self, chunk: Bytes) {
        match &mut self.more {
            Some(more) => more.extend_from_slice(&chunk),
            None if self.first.is_empty() => self.first = chunk,
            None => {
                let mut more = BytesMut::from(&self.first[..]);
                more.extend_from_slice(&chunk);
                self.more = Some(more);
            }
        }
    }

    /// The length the message's gRPC prefix declares, once the prefix has arrived.
    fn declared_length(&self) -> Option<usize> {
        match &self.more {
            Some(more) => declared_length(more),
            None => declared_length(&self.first),
        }
    }

    fn into_bytes(self) -> Bytes {
        self.more.map_or(self.first, BytesMut::freeze)
    }
}

/// The length a message's gRPC prefix declares, once the prefix has arrived.
fn declared_length(received: &[u8]) -> Option<usize> {
    let prefix = received.get(..GRPC_PREFIX_BYTES)?;
    let length = u32::from_be_bytes([prefix[1], prefix[2], prefix[3], prefix[4]]);
    usize::try_from(length).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_are_joined_in_order_and_a_single_one_is_not_copied() {
        let mut received = Received::default();
        let chunk = Bytes::from_static(&[0, 0, 0, 0, 3, b'a']);
        received.push(chunk.clone());
        assert_eq!(received.declared_length(), Some(3));
        assert_eq!(received.len(), 6);
        let whole = Received {
            first: chunk.clone(),
            more: None,
        }
        .into_bytes();
        assert_eq!(
            whole.as_ptr(),
            chunk.as_ptr(),
            "one chunk is passed on as it came"
        );
        received.push(Bytes::from_static(b"bc"));
        assert_eq!(received.len(), 8);
        assert_eq!(
            &received.into_bytes()[..],
            &[0, 0, 0, 0, 3, b'a', b'b', b'c']
        );
    }

    #[test]
    fn grpc_timeouts_parse() {
        assert_eq!(parse_grpc_timeout("10S"), Some(Duration::from_secs(10)));
        assert_eq!(parse_grpc_timeout("250m"), Some(Duration::from_millis(250)));
        assert_eq!(parse_grpc_timeout("2M"), Some(Duration::from_secs(120)));
        assert_eq!(parse_grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(
            parse_grpc_timeout("99999999n"),
            Some(Duration::from_nanos(99_999_999))
        );
        for bad in ["", "S", "10", "123456789S", "10s", "-1S", "1.5S"] {
            assert_eq!(parse_grpc_timeout(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn the_prefix_declares_the_length() {
        assert_eq!(declared_length(&[0, 0, 0]), None);
        assert_eq!(declared_length(&[0, 0, 0, 1, 0]), Some(256));
        assert_eq!(
            declared_length(&[0, 0x7f, 0xff, 0xff, 0xff, 9]),
            Some(0x7fff_ffff)
        );
    }
}

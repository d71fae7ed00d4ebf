//! tonic's answer to a request message over the server's size limit, in this service's error
//! model: RESOURCE_EXHAUSTED with reason `REQUEST_TOO_LARGE`, as gRPC's status-code table has
//! it, rather than tonic's bare OUT_OF_RANGE (which says "a value out of range", and carries no
//! ErrorInfo).
//!
//! tonic refuses such a message by its length prefix, before any byte of it reaches our codec,
//! and answers trailers-only (the status in the response headers). This wrapper rewrites that one
//! answer and passes every other response through untouched.

use std::pin::Pin;
use std::task::{Context, Poll};

use tonic::Status;
use tonic::body::Body;
use tonic::server::NamedService;

use crate::error::Error;

/// The start of tonic's message for a request over the limit (`tonic/src/codec/decode.rs`),
/// percent-encoded as it travels in `grpc-message`.
const TONIC_TOO_LARGE: &str = "Error,%20decoded%20message%20length%20too%20large";

/// `inner`, with tonic's over-limit answer rewritten.
#[derive(Debug, Clone)]
pub struct Oversize<S>(pub S);

type BoxFuture<T> = Pin<Box<dyn std::future::Future<Output = T> + Send>>;

impl<S, B> tonic::codegen::Service<http::Request<B>> for Oversize<S>
where
    S: tonic::codegen::Service<http::Request<B>, Response = http::Response<Body>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let response = self.0.call(request);
        Box::pin(async move { Ok(rewrite(response.await?)) })
    }
}

impl<S: NamedService> NamedService for Oversize<S> {
    const NAME: &'static str = S::NAME;
}

/// Our status in place of tonic's over-limit one; any other response as it is.
fn rewrite(response: http::Response<Body>) -> http::Response<Body> {
    let headers = response.headers();
    let out_of_range = headers.get("grpc-status").is_some_and(|s| s == "11");
    let Some(message) = headers
        .get("grpc-message")
        .and_then(|m| m.to_str().ok())
        .filter(|m| out_of_range && m.starts_with(TONIC_TOO_LARGE))
    else {
        return response;
    };
    // "…found {len} bytes, the limit is: {limit} bytes", spaces encoded as %20.
    let numbers: Vec<usize> = message
        .split("%20")
        .filter_map(|word| word.trim_end_matches(',').parse().ok())
        .collect();
    let (bytes, limit) = match numbers[..] {
        [bytes, limit] => (bytes, limit),
        _ => (0, 0),
    };
    Status::from(Error::RequestTooLarge { bytes, limit }).into_http()
}

//! The caller's deadline, carried with the request's task so every layer below can see how much
//! time is left: the ECR call's operation timeout, the rate budget's wait, the batch's timeout.

use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;

tokio::task_local! {
    static DEADLINE: Instant;
}

/// Runs `work` with `deadline` as the current deadline.
pub async fn scope<F: Future>(deadline: Instant, work: F) -> F::Output {
    DEADLINE.scope(deadline, work).await
}

/// The deadline of the request this task is serving, if any.
pub fn current() -> Option<Instant> {
    DEADLINE.try_with(|d| *d).ok()
}

/// Time kept back from the caller's deadline to send our answer before it gives up.
pub const RESPONSE_MARGIN: Duration = Duration::from_millis(50);

/// When the work on a request whose headers arrived at `arrived` must be done: its
/// `grpc-timeout` (else `default`), less the time it takes to answer. tonic cancels a request
/// at its `grpc-timeout` with a bare CANCELLED; ending our work [`RESPONSE_MARGIN`] earlier
/// means the caller gets our DEADLINE_EXCEEDED, with its ErrorInfo, while it is still listening.
pub fn for_request(headers: &http::HeaderMap, arrived: Instant, default: Duration) -> Instant {
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

#[cfg(test)]
mod tests {
    use super::*;

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

    #[tokio::test]
    async fn the_deadline_travels_with_the_task() {
        assert_eq!(current(), None);
        let deadline = Instant::now() + Duration::from_secs(1);
        assert_eq!(scope(deadline, async { current() }).await, Some(deadline));
    }
}

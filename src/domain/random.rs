//! A little randomness, for spreading things out in time (poll turns, pacing switches) so that
//! replicas and pollers started together do not act together, and for ids. Not for secrets.

/// A number in [0, 1), at random; 0.5 if the system has no randomness to give.
pub fn unit() -> f64 {
    let mut bytes = [0u8; 2];
    match getrandom::fill(&mut bytes) {
        Ok(()) => f64::from(u16::from_le_bytes(bytes)) / 65_536.0,
        Err(_) => 0.5,
    }
}

/// A request id for a request that brought none: 16 random hex digits (a counter-free id
/// that replicas cannot repeat between them in practice).
pub fn request_id() -> String {
    let mut bytes = [0u8; 8];
    let _ = getrandom::fill(&mut bytes);
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

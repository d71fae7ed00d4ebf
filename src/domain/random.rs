//! A little randomness, for spreading things out in time (poll turns, pacing switches) so that
//! replicas and pollers started together do not act together. Not for secrets.

/// A number in [0, 1), at random; 0.5 if the system has no randomness to give.
pub fn unit() -> f64 {
    let mut bytes = [0u8; 2];
    match getrandom::fill(&mut bytes) {
        Ok(()) => f64::from(u16::from_le_bytes(bytes)) / 65_536.0,
        Err(_) => 0.5,
    }
}

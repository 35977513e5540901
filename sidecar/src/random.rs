//! Randomness from the TLS provider's CSPRNG (aws-lc), so the sidecar needs no RNG crate.

#[derive(Debug, thiserror::Error)]
#[error("the system's random number generator failed")]
pub struct Error;

fn fill(buf: &mut [u8]) -> Result<(), Error> {
    rustls::crypto::aws_lc_rs::default_provider()
        .secure_random
        .fill(buf)
        .map_err(|_| Error)
}

/// 256 random bits as 64 hex digits: the container-credentials endpoint's token.
pub fn token() -> Result<String, Error> {
    let mut bytes = [0u8; 32];
    fill(&mut bytes)?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// Uniform in `[0, 1)`, for jitter; 0.5 in the (never seen) case that the generator fails,
/// since jitter only spreads load and must not stop a refresh.
pub fn unit() -> f64 {
    let mut bytes = [0u8; 8];
    match fill(&mut bytes) {
        Ok(()) => (u64::from_le_bytes(bytes) >> 11) as f64 / (1u64 << 53) as f64,
        Err(Error) => 0.5,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_fresh_hex_and_units_in_range() {
        let (a, b) = (token().unwrap(), token().unwrap());
        assert_eq!(a.len(), 64);
        assert!(a.bytes().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
        for _ in 0..1000 {
            let u = unit();
            assert!((0.0..1.0).contains(&u), "{u}");
        }
    }
}

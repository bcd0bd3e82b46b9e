//! API keys: generation and hashing.

use sha2::{Digest, Sha256};

/// A new API key: `sk_` and 48 hex digits (192 random bits).
pub fn generate_key() -> String {
    let mut bytes = [0u8; 24];
    // The OS random source failing is not recoverable for a key generator; fall back to a
    // time-seeded hash would be weak, so refuse loudly instead.
    if let Err(e) = getrandom::fill(&mut bytes) {
        panic!("the operating system's random source failed: {e}");
    }
    let mut key = String::with_capacity(51);
    key.push_str("sk_");
    push_hex(&mut key, &bytes);
    key
}

/// The stored form of a key: lowercase hex SHA-256.
pub fn hash_key(key: &str) -> String {
    let digest = Sha256::digest(key.as_bytes());
    let mut out = String::with_capacity(64);
    push_hex(&mut out, &digest);
    out
}

fn push_hex(out: &mut String, bytes: &[u8]) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for b in bytes {
        out.push(HEX[usize::from(b >> 4)] as char);
        out.push(HEX[usize::from(b & 0xf)] as char);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_random_and_hash_to_sha256() {
        let a = generate_key();
        let b = generate_key();
        assert_ne!(a, b);
        assert_eq!(a.len(), 51);
        assert!(a.starts_with("sk_"));
        assert_eq!(
            hash_key("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}

//! Identifiers: unguessable tool-call ids (`call_`/`toolu_` + 32 hex from the OS CSPRNG) and
//! Responses item ids (`resp_`/`rs_`/`msg_`/`fc_` + 24 hex); sequential `chatcmpl-N`/`cmpl-N`.

use std::sync::atomic::{AtomicU64, Ordering};

static FALLBACK: AtomicU64 = AtomicU64::new(0x9e37_79b9_7f4a_7c15);

/// `n` random bytes as lower-case hex. Uses the OS CSPRNG; should it ever fail, falls back to a
/// time-and-counter mix (never panics).
pub fn random_hex(n: usize) -> String {
    let mut b = vec![0u8; n];
    if getrandom::fill(&mut b).is_err() {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        for (i, x) in b.iter_mut().enumerate() {
            let c = FALLBACK.fetch_add(0x9e37_79b9_7f4a_7c15, Ordering::Relaxed);
            let v = (c ^ t ^ (i as u64) ^ std::process::id() as u64)
                .wrapping_mul(0x2545_f491_4f6c_dd1d);
            *x = (v >> 56) as u8;
        }
    }
    let mut s = String::with_capacity(2 * n);
    for x in b {
        s.push(char::from_digit((x >> 4) as u32, 16).unwrap_or('0'));
        s.push(char::from_digit((x & 15) as u32, 16).unwrap_or('0'));
    }
    s
}

/// A random 64-bit value (a request seed), never 0.
pub fn random_u64() -> u64 {
    let h = random_hex(8);
    u64::from_str_radix(&h, 16).unwrap_or(0x5eed).max(1)
}

/// A tool-call id: `prefix` + 32 hex digits (128 random bits).
pub fn tool_id(prefix: &str) -> String {
    format!("{prefix}{}", random_hex(16))
}

/// A Responses item id: `prefix` + 24 hex digits.
pub fn item_id(prefix: &str) -> String {
    format!("{prefix}{}", random_hex(12))
}

/// Sequential per-process response ids (`chatcmpl-1`, `chatcmpl-2`, …).
#[derive(Debug, Default)]
pub struct Sequence(AtomicU64);

impl Sequence {
    pub fn next(&self) -> u64 {
        self.0.fetch_add(1, Ordering::Relaxed) + 1
    }
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_have_the_right_shape_and_differ() {
        let a = tool_id("call_");
        let b = tool_id("call_");
        assert_eq!(a.len(), 5 + 32);
        assert!(a[5..].bytes().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
        assert_eq!(item_id("fc_").len(), 3 + 24);
        let s = Sequence::default();
        assert_eq!(s.next(), 1);
        assert_eq!(s.next(), 2);
    }
}

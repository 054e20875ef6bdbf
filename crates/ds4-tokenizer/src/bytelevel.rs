//! The GPT-2 byte <-> code point map used by byte-level BPE.
//!
//! Bytes 33..=126, 161..=172 and 174..=255 map to the code point of the same value; the other 68
//! bytes map to U+0100.. in increasing byte order.

use std::sync::OnceLock;

struct Tables {
    byte_to_char: [char; 256],
    /// Indexed by code point (< 324); -1 when not a byte-level code point.
    char_to_byte: [i16; 324],
}

fn tables() -> &'static Tables {
    static T: OnceLock<Tables> = OnceLock::new();
    T.get_or_init(|| {
        let mut byte_to_char = ['\0'; 256];
        let mut char_to_byte = [-1i16; 324];
        let mut next = 256u32;
        for b in 0..256u32 {
            let direct =
                (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
            let cp = if direct {
                b
            } else {
                let c = next;
                next += 1;
                c
            };
            // All values are < 0x200, valid scalar values.
            byte_to_char[b as usize] = char::from_u32(cp).unwrap_or('\u{FFFD}');
            char_to_byte[cp as usize] = b as i16;
        }
        Tables {
            byte_to_char,
            char_to_byte,
        }
    })
}

/// The code point that stands for byte `b` in byte-level token strings.
pub fn byte_to_char(b: u8) -> char {
    tables().byte_to_char[b as usize]
}

/// The byte a byte-level code point stands for, or `None` if `c` is not one of the 256.
pub fn char_to_byte(c: char) -> Option<u8> {
    let cp = c as usize;
    match tables().char_to_byte.get(cp) {
        Some(&b) if b >= 0 => Some(b as u8),
        _ => None,
    }
}

/// Byte-level encode arbitrary bytes into the token-string alphabet.
pub fn encode_bytes(bytes: &[u8]) -> String {
    bytes.iter().map(|&b| byte_to_char(b)).collect()
}

/// Decode a byte-level token string back to bytes; code points outside the alphabet are dropped
/// (ds4 `ds4_token_text` behaviour).
pub fn decode_str(s: &str) -> Vec<u8> {
    s.chars().filter_map(char_to_byte).collect()
}

/// Whether `c` is one of the 256 byte-level code points.
pub fn is_byte_char(c: char) -> bool {
    char_to_byte(c).is_some()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_all_bytes() {
        let mut seen = std::collections::HashSet::new();
        for b in 0..=255u8 {
            let c = byte_to_char(b);
            assert!(seen.insert(c));
            assert_eq!(char_to_byte(c), Some(b));
        }
        assert_eq!(byte_to_char(b' '), 'Ġ');
        assert_eq!(byte_to_char(b'\n'), 'Ċ');
        assert_eq!(byte_to_char(b'!'), '!');
        assert_eq!(char_to_byte('｜'), None);
        assert_eq!(byte_to_char(0xAD), '\u{143}');
    }
}

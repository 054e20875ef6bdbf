#![no_main]
//! Feed arbitrary bytes to the GGUF reader: it must return Ok or a typed error, never panic, and
//! never allocate beyond a small multiple of the input size (libFuzzer's -rss_limit_mb catches that).

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(h) = ds4_gguf::parse_header(data) {
        // Everything the header promises must be addressable.
        for t in &h.tensors {
            let start = (h.data_offset + t.offset) as usize;
            let end = start + t.n_bytes as usize;
            assert!(end <= data.len());
        }
        if let Ok(g) = ds4_gguf::Gguf::from_bytes(data.to_vec()) {
            for t in g.tensors() {
                assert_eq!(g.data_of(t).len() as u64, t.n_bytes);
            }
        }
    }
});

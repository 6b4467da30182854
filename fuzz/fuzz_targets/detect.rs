//! Protocol detection on a connection's first bytes.
//!
//! Holds whatever the bytes: once a prefix decides, every longer prefix decides the same (detection
//! may read more only while undecided), and 24 bytes (the HTTP/2 preface's length) always decide.

#![no_main]

use libfuzzer_sys::fuzz_target;
use remora_proxy::detect::{H2_PREFACE, classify};

fuzz_target!(|bytes: &[u8]| {
    let mut decided = None;
    for end in 0..=bytes.len() {
        let verdict = classify(&bytes[..end]);
        match (decided, verdict) {
            (Some(first), verdict) => assert_eq!(verdict, Some(first), "a longer prefix changed the verdict"),
            (None, Some(verdict)) => decided = Some(verdict),
            (None, None) => assert!(end < H2_PREFACE.len(), "undecided after {end} bytes"),
        }
    }
});

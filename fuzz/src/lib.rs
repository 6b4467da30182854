//! What the fuzz targets share: a runtime for the targets that drive sockets, and a reader of fuzz
//! input as a sequence of length-prefixed pieces.
//!
//! Each target in `fuzz_targets/` feeds arbitrary bytes to one of Remora's parsers and asserts what
//! must hold whatever the bytes (not just "no panic"); `README.md` says how to run them.

use std::sync::LazyLock;

/// One current-thread runtime per process, for the targets that drive real loopback sockets.
pub fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: LazyLock<tokio::runtime::Runtime> = LazyLock::new(|| {
        tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a runtime for the fuzz target")
    });
    &RUNTIME
}

/// Splits `input` into pieces, each led by one byte giving its length (0–255): a way for the fuzzer
/// to choose several inputs, and the splits between reads, from one byte string.
pub fn pieces(mut input: &[u8]) -> impl Iterator<Item = &[u8]> {
    std::iter::from_fn(move || {
        let (&length, rest) = input.split_first()?;
        let length = usize::from(length).min(rest.len());
        let (piece, rest) = rest.split_at(length);
        input = rest;
        Some(piece)
    })
}

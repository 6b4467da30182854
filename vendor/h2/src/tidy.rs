//! Giving an idle connection's buffers back, when its owner says it is idle.
//!
//! (Remora's patch; see REMORA.md.) Upstream h2 gives each connection a 16 KiB write buffer, an
//! 8 KiB read buffer and a 4 KiB buffer for Huffman-decoded header strings at its handshake, and
//! keeps them, with the slabs its streams and queued frames grew (a few KiB more), until the
//! connection closes: an idle connection held about 32 KiB. Whether a connection is idle is a
//! question of time, which h2 does not keep, so the owner of the connection answers it: a poll made
//! inside [`tidy`] is a tidying poll, and in it a connection that finds nothing to read gives back
//! its read and Huffman buffers (the buffer must be empty) and its HPACK decoder's spare room, one
//! that has flushed everything gives back its write buffer and has its HPACK encoder forget its
//! table (`hpack::Encoder::give_back`), and one with no stream left gives back its stream and frame
//! slabs and its map of stream ids. Each is allocated again when the connection next reads,
//! writes, decodes or opens a stream. Other polls behave as upstream's, but for a thread-local flag
//! checked a few times per poll.
//!
//! A buffer's allocation may still be shared with bytes handed out earlier (a header value in the
//! HPACK decoder's table): the decoder copies its newest table entries out when it gives its
//! buffers back (`hpack::Decoder::give_back`), so that the table keeps none of them alive.

use bytes::BytesMut;
use std::cell::Cell;

thread_local! {
    static TIDYING: Cell<bool> = const { Cell::new(false) };
}

/// Runs `poll` (a poll of HTTP/2 connections: a server's `Connection`, or a future driving one) as
/// a tidying poll: connections it polls that have nothing to do give back their buffers. Call it
/// when a connection has been quiet for a while; a busy connection would only allocate them again.
pub fn tidy<R>(poll: impl FnOnce() -> R) -> R {
    struct Reset(bool);
    impl Drop for Reset {
        fn drop(&mut self) {
            TIDYING.with(|tidying| tidying.set(self.0));
        }
    }
    let _reset = Reset(TIDYING.with(|tidying| tidying.replace(true)));
    poll()
}

/// Whether the current poll is a tidying one.
pub(crate) fn tidying() -> bool {
    TIDYING.with(Cell::get)
}

/// In a tidying poll, frees `buf`'s allocation if it holds no bytes.
pub(crate) fn give_back(buf: &mut BytesMut) {
    if buf.is_empty() && buf.capacity() > 0 && tidying() {
        *buf = BytesMut::new();
    }
}

/// In a tidying poll, frees `slab`'s storage if it holds nothing.
pub(crate) fn give_back_slab<T>(slab: &mut slab::Slab<T>) {
    if slab.is_empty() && slab.capacity() > 0 && tidying() {
        *slab = slab::Slab::new();
    }
}

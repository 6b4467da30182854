//! Copying bytes both ways between two streams, holding no buffer while the connection idles.
//!
//! Opaque TCP that crosses TLS or a tunnel on either side, and an upgraded or `CONNECT`ed HTTP
//! connection, is relayed through user space: [`copy_both`] reads from one side (`poll_read`) and
//! writes what it read to the other (`poll_write`), each way, until each side has ended and that
//! end was passed on as a shutdown; it returns the bytes moved each way. tokio's own copy holds a
//! buffer per direction for the connection's life (16–32 KiB per relay), and most relayed
//! connections (database pools, WebSockets, long-polls) spend their life idle. Here a direction
//! borrows a buffer from its thread's spares when it reads, and gives it back as soon as a read
//! finds nothing and nothing read is left to write: an idle relay holds no buffer at all. A busy
//! one keeps its buffer while bytes keep coming, so the spares are touched once per wake-up, not
//! per read. At most [`limits::SPARE_COPY_BUFFERS`] spares stay per thread; the rest are freed.
//!
//! A stream that is `Pending` must not have written into the buffer it was offered (true of a
//! socket, a TLS session and an HTTP/2 or HTTP/3 stream, which keep what they received in their
//! own state until asked with a buffer that is theirs to fill).

use std::cell::{Cell, RefCell};
use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::limits;

thread_local! {
    /// Buffers no relay of this thread holds right now.
    static SPARES: RefCell<Vec<Box<[u8]>>> = const { RefCell::new(Vec::new()) };
    /// Buffers this thread's relays hold right now.
    static LENT: Cell<usize> = const { Cell::new(0) };
}

/// A buffer of `size` bytes: a spare of that size if this thread has one, else a new one.
fn borrow(size: usize) -> Box<[u8]> {
    LENT.set(LENT.get() + 1);
    let spare = SPARES.with_borrow_mut(|spares| {
        let at = spares.iter().rposition(|buffer| buffer.len() == size)?;
        Some(spares.swap_remove(at))
    });
    spare.unwrap_or_else(|| vec![0; size].into_boxed_slice())
}

/// Returns a buffer to this thread's spares (or frees it, when they are full).
fn give_back(buffer: Box<[u8]>) {
    LENT.set(LENT.get().saturating_sub(1));
    SPARES.with_borrow_mut(|spares| {
        if spares.len() < limits::SPARE_COPY_BUFFERS {
            spares.push(buffer);
        }
    });
}

/// How many copy buffers this thread's relays hold now (an idle relay holds none).
pub fn buffers_lent() -> usize {
    LENT.get()
}

/// One direction of a relay: bytes read from one side not yet written to the other.
#[derive(Debug)]
struct Direction {
    size: usize,
    /// Held only while a read found bytes and until they are all written (and the next read
    /// finds nothing).
    buffer: Option<Box<[u8]>>,
    /// `buffer[written..filled]` is still to be written.
    written: usize,
    filled: usize,
    moved: u64,
    state: State,
    /// Bytes were written since the last flush.
    unflushed: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Copying,
    /// The reader ended; what was written is being flushed.
    Flushing,
    /// Then the writer is shut down.
    ShuttingDown,
    Done,
}

impl Direction {
    fn new(size: usize) -> Self {
        Direction { size, buffer: None, written: 0, filled: 0, moved: 0, state: State::Copying, unflushed: false }
    }

    /// Moves bytes until the reader has ended and the writer is shut down.
    fn poll<R, W>(&mut self, cx: &mut Context<'_>, mut from: Pin<&mut R>, mut to: Pin<&mut W>) -> Poll<io::Result<u64>>
    where
        R: AsyncRead + ?Sized,
        W: AsyncWrite + ?Sized,
    {
        loop {
            match self.state {
                State::Done => return Poll::Ready(Ok(self.moved)),
                State::ShuttingDown => {
                    ready!(to.as_mut().poll_shutdown(cx))?;
                    self.state = State::Done;
                }
                State::Flushing => {
                    ready!(to.as_mut().poll_flush(cx))?;
                    self.state = State::ShuttingDown;
                }
                State::Copying => {
                    ready!(self.poll_copy(cx, from.as_mut(), to.as_mut()))?;
                    self.state = State::Flushing;
                }
            }
        }
    }

    /// Copies until the reader ends, returning `Pending` whenever one side must wait.
    fn poll_copy<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        mut from: Pin<&mut R>,
        mut to: Pin<&mut W>,
    ) -> Poll<io::Result<()>>
    where
        R: AsyncRead + ?Sized,
        W: AsyncWrite + ?Sized,
    {
        loop {
            while self.written < self.filled {
                let Some(buffer) = &self.buffer else { break };
                let n = ready!(to.as_mut().poll_write(cx, &buffer[self.written..self.filled]))?;
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                self.written += n;
                self.moved += n as u64;
                self.unflushed = true;
            }
            let mut buffer = self.buffer.take().unwrap_or_else(|| borrow(self.size));
            let mut read = ReadBuf::new(&mut buffer);
            match from.as_mut().poll_read(cx, &mut read) {
                Poll::Ready(Ok(())) => {
                    let n = read.filled().len();
                    (self.written, self.filled) = (0, n);
                    if n == 0 {
                        give_back(buffer);
                        return Poll::Ready(Ok(()));
                    }
                    self.buffer = Some(buffer);
                }
                Poll::Ready(Err(error)) if error.kind() == io::ErrorKind::Interrupted => self.buffer = Some(buffer),
                Poll::Ready(Err(error)) => {
                    give_back(buffer);
                    return Poll::Ready(Err(error));
                }
                Poll::Pending => {
                    // Nothing to read and nothing left to write: the buffer goes back.
                    give_back(buffer);
                    if self.unflushed {
                        ready!(to.as_mut().poll_flush(cx))?;
                        self.unflushed = false;
                    }
                    return Poll::Pending;
                }
            }
        }
    }
}

impl Drop for Direction {
    fn drop(&mut self) {
        if let Some(buffer) = self.buffer.take() {
            give_back(buffer);
        }
    }
}

/// Copies `a` to `b` and `b` to `a` with buffers of `size` bytes until both have ended, passing
/// each end on as a shutdown of the other side. Returns the bytes moved `a` to `b` and `b` to `a`;
/// the first error ends both directions.
pub async fn copy_both<A, B>(a: &mut A, b: &mut B, size: usize) -> io::Result<(u64, u64)>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let (mut a_to_b, mut b_to_a) = (Direction::new(size), Direction::new(size));
    poll_fn(|cx| {
        let forth = a_to_b.poll(cx, Pin::new(&mut *a), Pin::new(&mut *b))?;
        let back = b_to_a.poll(cx, Pin::new(&mut *b), Pin::new(&mut *a))?;
        match (forth, back) {
            (Poll::Ready(forth), Poll::Ready(back)) => Poll::Ready(Ok((forth, back))),
            _ => Poll::Pending,
        }
    })
    .await
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use tokio::io::{AsyncReadExt, AsyncWriteExt, duplex};

    use super::*;

    /// Bytes cross both ways, each end passes on as an end, and while nothing moves the relay
    /// holds no buffer; a byte arriving after the idle spell borrows one again and is relayed.
    #[tokio::test(flavor = "current_thread")]
    async fn relays_both_ways_and_holds_no_buffer_while_idle() {
        let (mut client, mut near) = duplex(64 * 1024);
        let (mut far, mut server) = duplex(64 * 1024);
        let relay = tokio::spawn(async move { copy_both(&mut near, &mut far, 8 * 1024).await });
        let big = vec![7_u8; 100_000];
        let writing = {
            let big = big.clone();
            tokio::spawn(async move {
                client.write_all(&big).await.unwrap();
                client
            })
        };
        let mut got = vec![0; big.len()];
        server.read_exact(&mut got).await.unwrap();
        assert_eq!(got, big);
        let mut client = writing.await.unwrap();
        server.write_all(b"pong").await.unwrap();
        let mut pong = [0; 4];
        client.read_exact(&mut pong).await.unwrap();
        assert_eq!(&pong, b"pong");

        tokio::task::yield_now().await;
        assert_eq!(buffers_lent(), 0, "an idle relay holds no buffer");

        server.write_all(b"again").await.unwrap();
        let mut again = [0; 5];
        client.read_exact(&mut again).await.unwrap();
        assert_eq!(&again, b"again");
        client.shutdown().await.unwrap();
        let mut rest = Vec::new();
        server.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty());
        server.shutdown().await.unwrap();
        assert_eq!(relay.await.unwrap().unwrap(), (100_000, 9));
        assert_eq!(buffers_lent(), 0);
        assert!(SPARES.with_borrow(|spares| spares.len()) <= limits::SPARE_COPY_BUFFERS);
    }

    /// A side that fails ends the relay with its error, and the buffers come back.
    #[tokio::test(flavor = "current_thread")]
    async fn an_error_ends_the_relay_and_returns_its_buffers() {
        let (client, mut near) = duplex(1024);
        let (mut far, server) = duplex(1024);
        drop(server);
        let mut client = client;
        client.write_all(b"to nobody").await.unwrap();
        let result = copy_both(&mut near, &mut far, 1024).await;
        assert!(result.is_err(), "{result:?}");
        assert_eq!(buffers_lent(), 0);
    }
}

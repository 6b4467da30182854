//! Request bodies that can be read more than once: for retries, hedges and mirrors.
//!
//! A [`ReplayBody`] wraps the downstream request body. Every attempt at the request (and a mirrored
//! copy) reads through its own `ReplayBody` reader, all sharing one record: frames are kept, as they
//! stream from the client, up to a byte limit, so a second attempt can replay them from the start
//! and then carry on with the client's stream where the first left off. Nothing waits for the body
//! to be complete before it is sent: a streaming upload (a client-streaming gRPC call) goes out at
//! the client's pace, and only a retry needs what was recorded. Once the body outgrows the limit the
//! record is dropped: the reader at the live edge carries on, and nothing can be replayed any more
//! (the request is not retried).
//!
//! Whichever *primary* reader (an attempt) needs the next frame first takes it from the client and
//! records it; other readers find it in the record. A *follower* (a mirror) never takes frames from
//! the client while a primary reader exists, so a slow mirror cannot hold the original back; it
//! waits for frames the primaries bring in, and takes over only when no primary is left.
//!
//! [`Reusable`] is what the policed path holds of a request body it may need again: the recorded
//! body, or nothing at all when the client sent none.
//!
//! The record is a `std::sync::Mutex`: hyper may poll an HTTP/2 request body from a task of its own,
//! so readers can live in different tasks, but they are all on one worker thread and hold the lock
//! for a poll, so it is never contended.

use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};

use crate::http::body::{ClientBody, UpstreamBody};

/// Errors a replayed body can end with.
pub type ReplayError = Box<dyn std::error::Error + Send + Sync>;

#[derive(Debug)]
struct Record<B> {
    source: B,
    /// Data frames kept, `chunks[0]` being frame number `base`.
    chunks: Vec<Bytes>,
    base: usize,
    /// Data frames taken from the client so far.
    total: usize,
    buffered: usize,
    limit: usize,
    /// The record outgrew the limit and was dropped.
    capped: bool,
    trailers: Option<HeaderMap>,
    ended: bool,
    error: Option<String>,
    primaries: usize,
    waiting: Vec<Waker>,
    hint: SizeHint,
}

impl<B> Record<B> {
    fn wake_all(&mut self) {
        for waker in self.waiting.drain(..) {
            waker.wake();
        }
    }

    fn wait(&mut self, cx: &Context<'_>) {
        if !self.waiting.iter().any(|w| w.will_wake(cx.waker())) {
            self.waiting.push(cx.waker().clone());
        }
    }
}

/// One reader of a shared request body (the downstream request's, or in tests any body).
#[derive(Debug)]
pub struct ReplayBody<B = ClientBody> {
    record: Arc<Mutex<Record<B>>>,
    /// The next data frame this reader yields.
    position: usize,
    yielded: u64,
    trailers_sent: bool,
    primary: bool,
}

impl<B: Body> ReplayBody<B> {
    /// The first (primary) reader of `body`, keeping up to `limit` bytes for replay.
    pub fn new(body: B, limit: usize) -> ReplayBody<B> {
        let ended = body.is_end_stream();
        let hint = body.size_hint();
        let record = Record {
            source: body,
            chunks: Vec::new(),
            base: 0,
            total: 0,
            buffered: 0,
            limit,
            capped: false,
            trailers: None,
            ended,
            error: None,
            primaries: 1,
            waiting: Vec::new(),
            hint,
        };
        ReplayBody {
            record: Arc::new(Mutex::new(record)),
            position: 0,
            yielded: 0,
            trailers_sent: false,
            primary: true,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Record<B>> {
        // A panic while holding the lock leaves a record that is at worst short; readers then fail.
        self.record.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Another primary reader, from the start: for a retry or a hedge. `None` if the record was
    /// dropped (the body outgrew the limit) or the client's body failed.
    pub fn replay(&self) -> Option<ReplayBody<B>> {
        let mut record = self.lock();
        if record.capped || record.error.is_some() {
            return None;
        }
        record.primaries += 1;
        Some(ReplayBody { record: self.record.clone(), position: 0, yielded: 0, trailers_sent: false, primary: true })
    }

    /// A follower reader, from the start: for a mirror. `None` as for [`ReplayBody::replay`].
    pub fn follow(&self) -> Option<ReplayBody<B>> {
        let record = self.lock();
        if record.capped || record.error.is_some() {
            return None;
        }
        Some(ReplayBody { record: self.record.clone(), position: 0, yielded: 0, trailers_sent: false, primary: false })
    }

    /// Whether another attempt could still replay the body from the start.
    pub fn is_replayable(&self) -> bool {
        let record = self.lock();
        !record.capped && record.error.is_none()
    }
}

impl<B> Drop for ReplayBody<B> {
    fn drop(&mut self) {
        if self.primary {
            let mut record = self.record.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            record.primaries = record.primaries.saturating_sub(1);
            // A follower waiting for primaries may now read the client's stream itself.
            record.wake_all();
        }
    }
}

impl<B> Body for ReplayBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display + Into<ReplayError>,
{
    type Data = Bytes;
    type Error = ReplayError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, ReplayError>>> {
        let this = self.get_mut();
        // Locked through the field itself (not `lock()`), so the guard and this reader's own fields
        // are disjoint borrows.
        let mut record = this.record.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        loop {
            if this.position < record.total {
                let Some(chunk) = this.position.checked_sub(record.base).and_then(|i| record.chunks.get(i)) else {
                    return Poll::Ready(Some(Err("request body outgrew the replay buffer".into())));
                };
                let chunk = chunk.clone();
                this.position += 1;
                this.yielded += chunk.len() as u64;
                return Poll::Ready(Some(Ok(Frame::data(chunk))));
            }
            if record.ended {
                if !this.trailers_sent
                    && let Some(trailers) = record.trailers.clone()
                {
                    this.trailers_sent = true;
                    return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
                }
                return Poll::Ready(None);
            }
            if let Some(error) = &record.error {
                return Poll::Ready(Some(Err(error.clone().into())));
            }
            if !this.primary && record.primaries > 0 {
                record.wait(cx);
                return Poll::Pending;
            }
            match Pin::new(&mut record.source).poll_frame(cx) {
                Poll::Pending => {
                    // Another reader may take the frame when it comes; it wakes us.
                    record.wait(cx);
                    return Poll::Pending;
                }
                Poll::Ready(None) => {
                    record.ended = true;
                    record.wake_all();
                }
                Poll::Ready(Some(Err(error))) => {
                    record.error = Some(format!("request body: {error}"));
                    record.wake_all();
                    return Poll::Ready(Some(Err(error.into())));
                }
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) => {
                        record.total += 1;
                        if !record.capped {
                            if record.buffered + data.len() > record.limit {
                                record.capped = true;
                                record.chunks = Vec::new();
                            } else {
                                record.buffered += data.len();
                                record.chunks.push(data.clone());
                            }
                        }
                        if record.capped {
                            record.base = record.total;
                        }
                        record.wake_all();
                        this.position = record.total;
                        this.yielded += data.len() as u64;
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                    Err(frame) => {
                        if let Ok(trailers) = frame.into_trailers() {
                            record.trailers = Some(trailers);
                            record.ended = true;
                            record.wake_all();
                        }
                        // Any other frame kind is unknown to HTTP; skip it.
                    }
                },
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        let record = self.lock();
        record.ended && self.position >= record.total && (self.trailers_sent || record.trailers.is_none())
    }

    fn size_hint(&self) -> SizeHint {
        let record = self.lock();
        match record.hint.exact() {
            Some(total) => SizeHint::with_exact(total.saturating_sub(self.yielded)),
            None => SizeHint::default(),
        }
    }
}

/// A request body that later attempts, or a mirrored copy, may read again.
pub(crate) enum Reusable {
    /// The client sent no body: every reader gets an empty one, and nothing is recorded.
    Empty,
    /// The client's body, recorded as it streams.
    Recorded(ReplayBody),
}

impl Reusable {
    /// `body`, recorded up to `limit` bytes for readers that come later (none if it is empty).
    pub(crate) fn new(body: ClientBody, limit: usize) -> Reusable {
        if hyper::body::Body::is_end_stream(&body) {
            Reusable::Empty
        } else {
            Reusable::Recorded(ReplayBody::new(body, limit))
        }
    }

    /// A body for another attempt, from the start; `None` once the body can no longer be replayed.
    pub(crate) fn attempt(&self) -> Option<UpstreamBody> {
        match self {
            Reusable::Empty => Some(UpstreamBody::Empty),
            Reusable::Recorded(body) => body.replay().map(UpstreamBody::Replay),
        }
    }

    /// A body for a mirrored copy, following the attempts' reading; `None` as for `attempt`.
    pub(crate) fn copy(&self) -> Option<UpstreamBody> {
        match self {
            Reusable::Empty => Some(UpstreamBody::Empty),
            Reusable::Recorded(body) => body.follow().map(UpstreamBody::Replay),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::future::poll_fn;

    use http_body_util::{BodyExt, StreamBody};

    use super::*;

    type Source = StreamBody<futures_util::stream::Iter<std::vec::IntoIter<Result<Frame<Bytes>, ReplayError>>>>;

    fn source(parts: &[&'static str], trailers: bool) -> Source {
        let mut frames: Vec<Result<Frame<Bytes>, ReplayError>> =
            parts.iter().map(|p| Ok(Frame::data(Bytes::from_static(p.as_bytes())))).collect();
        if trailers {
            let mut map = HeaderMap::new();
            map.insert("x-sum", "1".parse().unwrap());
            frames.push(Ok(Frame::trailers(map)));
        }
        StreamBody::new(futures_util::stream::iter(frames))
    }

    async fn read_all(body: &mut ReplayBody<Source>) -> Result<(String, bool), ReplayError> {
        let mut text = String::new();
        let mut trailers = false;
        while let Some(frame) = poll_fn(|cx| Pin::new(&mut *body).poll_frame(cx)).await {
            match frame?.into_data() {
                Ok(data) => text.push_str(std::str::from_utf8(&data).unwrap()),
                Err(frame) => trailers |= frame.is_trailers(),
            }
        }
        Ok((text, trailers))
    }

    #[tokio::test]
    async fn a_second_attempt_replays_what_the_first_read_then_continues() {
        let mut first = ReplayBody::new(source(&["ab", "cd", "ef"], true), 1024);
        // The first attempt reads two frames and fails.
        let frame = poll_fn(|cx| Pin::new(&mut first).poll_frame(cx)).await.unwrap().unwrap();
        assert_eq!(frame.into_data().unwrap(), "ab");
        let mut second = first.replay().unwrap();
        drop(first);
        assert_eq!(read_all(&mut second).await.unwrap(), ("abcdef".into(), true));
        assert!(second.is_end_stream());
        // And a third, from the record alone.
        let mut third = second.replay().unwrap();
        assert_eq!(read_all(&mut third).await.unwrap(), ("abcdef".into(), true));
    }

    #[tokio::test]
    async fn a_body_over_the_limit_streams_on_but_cannot_be_replayed() {
        let mut first = ReplayBody::new(source(&["1234", "5678", "9"], false), 6);
        let behind = first.follow().unwrap();
        assert_eq!(read_all(&mut first).await.unwrap().0, "123456789", "the live reader is never cut short");
        assert!(!first.is_replayable());
        assert!(first.replay().is_none());
        let mut behind = behind;
        let error = read_all(&mut behind).await.unwrap_err().to_string();
        assert!(error.contains("replay buffer"), "{error}");
    }

    #[tokio::test]
    async fn a_follower_waits_for_primaries_and_takes_over_when_they_are_gone() {
        let mut primary = ReplayBody::new(source(&["x", "y"], false), 1024);
        let mut follower = primary.follow().unwrap();
        // With a primary alive, the follower does not read the client's stream itself.
        let waker = futures_util::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        assert!(Pin::new(&mut follower).poll_frame(&mut cx).is_pending());
        let frame = poll_fn(|cx| Pin::new(&mut primary).poll_frame(cx)).await.unwrap().unwrap();
        assert_eq!(frame.into_data().unwrap(), "x");
        drop(primary);
        assert_eq!(read_all(&mut follower).await.unwrap().0, "xy");
    }

    #[tokio::test]
    async fn size_hints_count_down_per_reader() {
        let body =
            http_body_util::Full::new(Bytes::from_static(b"hello")).map_err(|never| -> ReplayError { match never {} });
        let mut first = ReplayBody::new(body, 1024);
        assert_eq!(first.size_hint().exact(), Some(5));
        let second = first.replay().unwrap();
        let _ = poll_fn(|cx| Pin::new(&mut first).poll_frame(cx)).await;
        assert_eq!(first.size_hint().exact(), Some(0));
        assert_eq!(second.size_hint().exact(), Some(5));
    }
}

//! The worker's lot of parked HTTP/1.1 connections: an idle keep-alive connection that holds no
//! task, no tokio registration and no buffer, only its socket and its shared record.
//!
//! `http::park` shuts hyper down on a quiet connection and waits for the next request inside the
//! connection's own task, which keeps the task (1.4 kB), tokio's registration of the socket and a
//! few timers alive for as long as the client keeps the connection open. On a worker, which runs
//! [`run`], a plain TCP connection goes further: [`park`] takes the socket out of tokio's reactor,
//! adds it to an epoll set of the worker's own with the connection's record and the instant it
//! must close by (its header or idle timeout, whichever comes first), and the connection's task
//! ends. [`run`], one task per worker, waits on that epoll set through tokio (one registration for
//! the whole lot), a batch of events at a time: a socket with a next request is taken out of the
//! set, handed back to tokio, and served by a new task; one the client closed with nothing left to
//! read is closed in the lot, with no task; a connection past its deadline is closed (deadlines
//! are checked at most every [`SCAN_EVERY`], so a timeout may fire that much late); a drain closes
//! every parked connection, and the lot takes no more. Once the parking task
//! has ended, the connection's record moves out of its allocation into the lot's table
//! ([`Record::settle`]), so that an idle connection pins no page of the heap its short-lived
//! buffers were freed from; a table a crowd grew is compacted once it is mostly empty
//! ([`Parking::compact`]). A connection the lot cannot take (a TLS session, a tunnel, a thread
//! that runs no lot) parks in its task as before.
//!
//! [`Parking`] is the lot without tokio: the epoll set, what waits in it, and the deadlines.

use std::cell::RefCell;
use std::io;
use std::os::fd::OwnedFd;
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use prometheus_client::metrics::gauge::Gauge;
use rustix::event::{Timespec, epoll};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tracing::{debug, warn};

use crate::drain::DrainWatch;
use crate::http::server::HttpConnection;
use crate::io::DownstreamStream;

/// How often, at most, the lot looks for connections past their deadline.
const SCAN_EVERY: Duration = Duration::from_millis(100);
/// The most readiness events taken from the epoll set per system call.
const EVENTS_PER_WAIT: usize = 64;
/// A table of more slots than this is compacted once no more than a quarter of them are parked.
const COMPACT_ABOVE: usize = 64;
/// How a parked socket waits: for bytes to read, or its peer closing.
const WAITING: epoll::EventFlags = epoll::EventFlags::IN.union(epoll::EventFlags::RDHUP);

/// Sockets waiting in an epoll set for something to read, each with an item and a deadline.
pub(crate) struct Parking<T> {
    epoll: OwnedFd,
    slots: Vec<Option<Parked<T>>>,
    free: Vec<usize>,
    len: usize,
    /// No later than the earliest deadline of what is parked (none when nothing is).
    earliest: Option<Instant>,
    /// Room for one system call's events, kept between calls.
    events: Vec<epoll::Event>,
    /// The slots filled since [`Parking::settle`] last ran.
    fresh: Vec<usize>,
}

struct Parked<T> {
    socket: std::net::TcpStream,
    item: T,
    until: Instant,
}

impl<T> Parking<T> {
    /// An empty lot with an epoll set of its own.
    pub(crate) fn new() -> io::Result<Parking<T>> {
        Ok(Parking {
            epoll: epoll::create(epoll::CreateFlags::CLOEXEC)?,
            slots: Vec::new(),
            free: Vec::new(),
            len: 0,
            earliest: None,
            events: Vec::new(),
            fresh: Vec::new(),
        })
    }

    /// A second descriptor of the epoll set, readable whenever a parked socket is: for a reactor
    /// to watch.
    pub(crate) fn watch_fd(&self) -> io::Result<OwnedFd> {
        self.epoll.try_clone()
    }

    /// How many sockets are parked.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// No later than the earliest deadline of the parked sockets; none when there are none.
    pub(crate) fn earliest(&self) -> Option<Instant> {
        self.earliest
    }

    /// Parks `socket` (non-blocking) with `item` until `until`. Both come back when the socket
    /// cannot join the epoll set.
    pub(crate) fn park(
        &mut self,
        socket: std::net::TcpStream,
        item: T,
        until: Instant,
    ) -> Result<(), (std::net::TcpStream, T)> {
        let index = self.free.pop().unwrap_or(self.slots.len());
        let data = epoll::EventData::new_u64(index as u64);
        // Level-triggered: a request that arrived before the socket joined is reported at once.
        if epoll::add(&self.epoll, &socket, data, WAITING).is_err() {
            if index < self.slots.len() {
                self.free.push(index);
            }
            return Err((socket, item));
        }
        if index == self.slots.len() {
            self.slots.push(None);
        }
        self.slots[index] = Some(Parked { socket, item, until });
        self.fresh.push(index);
        self.len += 1;
        self.earliest = Some(self.earliest.map_or(until, |earliest| earliest.min(until)));
        Ok(())
    }

    /// Looks once at the epoll set (at most [`EVENTS_PER_WAIT`] events): a parked socket with
    /// something to read is taken out with its item into `out`; one its peer closed with nothing
    /// left to read is taken out and closed here, its item dropped, with no task to serve it
    /// (when a client pool closes thousands of idle connections at once, that is thousands of
    /// tasks, each with hyper's buffers, not spawned).
    pub(crate) fn ready(&mut self, out: &mut Vec<(std::net::TcpStream, T)>) -> io::Result<Looked> {
        const NOW: Timespec = Timespec { tv_sec: 0, tv_nsec: 0 };
        const ENDED: epoll::EventFlags =
            epoll::EventFlags::RDHUP.union(epoll::EventFlags::HUP).union(epoll::EventFlags::ERR);
        self.events.clear();
        self.events.reserve(EVENTS_PER_WAIT);
        epoll::wait(&self.epoll, rustix::buffer::spare_capacity(&mut self.events), Some(&NOW))?;
        let mut looked = Looked { closed: 0, more: self.events.len() >= EVENTS_PER_WAIT };
        for index in 0..self.events.len() {
            // (The event is packed: its data is copied out before it is read.)
            let (data, flags) = { (self.events[index].data, self.events[index].flags) };
            let slot = usize::try_from(data.u64()).unwrap_or(usize::MAX);
            let Some(parked) = self.take(slot) else { continue };
            if flags.intersects(ENDED) && !has_bytes(&parked.socket) {
                looked.closed += 1;
            } else {
                out.push((parked.socket, parked.item));
            }
        }
        self.compact(out);
        Ok(looked)
    }

    /// Takes out every parked socket whose deadline is at or before `now`, with its item, into
    /// `out`; the earliest deadline is known exactly again afterwards.
    pub(crate) fn expired(&mut self, now: Instant, out: &mut Vec<(std::net::TcpStream, T)>) {
        if self.earliest.is_none_or(|earliest| earliest > now) {
            return;
        }
        let mut earliest = None;
        for slot in 0..self.slots.len() {
            let Some(until) = self.slots.get(slot).and_then(Option::as_ref).map(|parked| parked.until) else {
                continue;
            };
            if until <= now {
                if let Some(parked) = self.take(slot) {
                    out.push((parked.socket, parked.item));
                }
            } else {
                earliest = Some(earliest.map_or(until, |e: Instant| e.min(until)));
            }
        }
        self.earliest = earliest;
        self.compact(out);
    }

    /// Passes each item parked since the last call through `settle`, which gives back what is to
    /// stay in its place.
    pub(crate) fn settle(&mut self, mut settle: impl FnMut(T) -> T) {
        for slot in std::mem::take(&mut self.fresh) {
            if let Some(entry) = self.slots.get_mut(slot)
                && let Some(parked) = entry.take()
            {
                *entry = Some(Parked { item: settle(parked.item), ..parked });
            }
        }
    }

    /// Moves what is parked to the front of a table a crowd grew and mostly left, and gives the
    /// rest of it back: a lot that held 5,000 connections and holds 16 again keeps a table of 16,
    /// not one of 5,000 empty slots (a slot is the size of a connection's record). Each socket
    /// moved is told its new slot (the epoll set reports it by slot); one that cannot be is taken
    /// out into `out` with the sockets its caller took out: served after a look, closed after a
    /// scan for deadlines. Runs between looks, never while a look's events, which name slots, are
    /// being read.
    fn compact(&mut self, out: &mut Vec<(std::net::TcpStream, T)>) {
        if self.slots.len() <= COMPACT_ABOVE || self.len > self.slots.len() / 4 {
            return;
        }
        let mut slots = Vec::with_capacity(self.len);
        // The old slot of each moved socket, in order: to find where a fresh one went.
        let mut moved_from = Vec::with_capacity(self.len);
        for (from, entry) in std::mem::take(&mut self.slots).into_iter().enumerate() {
            let Some(parked) = entry else { continue };
            let data = epoll::EventData::new_u64(slots.len() as u64);
            if epoll::modify(&self.epoll, &parked.socket, data, WAITING).is_err() {
                let _ = epoll::delete(&self.epoll, &parked.socket);
                self.len -= 1;
                out.push((parked.socket, parked.item));
                continue;
            }
            moved_from.push(from);
            slots.push(Some(parked));
        }
        self.slots = slots;
        self.free = Vec::new();
        self.fresh.retain_mut(|slot| match moved_from.binary_search(slot) {
            Ok(to) => {
                *slot = to;
                true
            }
            Err(_) => false,
        });
        if self.len == 0 {
            self.earliest = None;
        }
    }

    fn take(&mut self, slot: usize) -> Option<Parked<T>> {
        let parked = self.slots.get_mut(slot)?.take()?;
        // (Closing the socket would also take it out, but a socket handed back lives on.)
        let _ = epoll::delete(&self.epoll, &parked.socket);
        self.free.push(slot);
        self.len -= 1;
        if self.len == 0 {
            self.earliest = None;
            // A burst's slots are given back once it has gone.
            self.slots = Vec::new();
            self.free = Vec::new();
            self.fresh = Vec::new();
        }
        Some(parked)
    }
}

/// What one look at a [`Parking`]'s epoll set did besides taking sockets out to serve.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Looked {
    /// Sockets closed by their peer with nothing left to read, closed and dropped.
    pub(crate) closed: usize,
    /// As many events as one look takes: there may be more.
    pub(crate) more: bool,
}

/// Whether `socket`, which its peer closed or reset, still holds bytes to read (a last request
/// sent before the close, served as any other).
fn has_bytes(socket: &std::net::TcpStream) -> bool {
    matches!(socket.peek(&mut [0; 1]), Ok(read) if read > 0)
}

/// A worker's lot, and how to wake its task (for a deadline earlier than the ones it waits for, and
/// to settle what was parked).
struct Lot {
    parking: Parking<Record>,
    wake: Arc<Notify>,
}

/// A parked connection's shared record. Parked by the connection's task, which still holds it; once
/// that task has ended, the lot's task moves the record out of its allocation into the lot's own
/// slot ([`Record::settle`]). A record allocated when the connection was accepted, among that
/// connection's short-lived buffers, would otherwise hold on to the pages around it for as long as
/// the connection stays idle; the lot's slots are one contiguous table.
#[allow(clippy::large_enum_variant)] // Owned in place is the point: a box would be an allocation again.
enum Record {
    /// Still shared (the parking task had not ended yet, or something else holds it).
    Shared(Arc<HttpConnection>),
    /// Moved into the lot.
    Owned(HttpConnection),
}

impl Record {
    /// Owned, when nothing else holds the record any more.
    fn settle(self) -> Record {
        match self {
            Record::Shared(shared) => match Arc::try_unwrap(shared) {
                Ok(owned) => Record::Owned(owned),
                Err(shared) => Record::Shared(shared),
            },
            owned => owned,
        }
    }

    /// Shared again, to serve the connection.
    fn into_shared(self) -> Arc<HttpConnection> {
        match self {
            Record::Shared(shared) => shared,
            Record::Owned(owned) => Arc::new(owned),
        }
    }

    fn get(&self) -> &HttpConnection {
        match self {
            Record::Shared(shared) => shared,
            Record::Owned(owned) => owned,
        }
    }
}

thread_local! {
    /// The lot of the worker running on this thread; none on other threads, and after a drain.
    static LOT: RefCell<Option<Lot>> = const { RefCell::new(None) };
}

/// Parks `stream`, a quiet HTTP/1.1 connection, in this worker's lot until it is readable or
/// `until`. `Err` gives the stream back when the lot cannot take it (no lot on this thread, a
/// drain, not a plain TCP socket, or the socket could not join the epoll set): the caller then
/// parks it in its own task. `Ok` when the lot has it, or when it was closed on an error.
pub(super) fn park(
    stream: DownstreamStream,
    connection: &Arc<HttpConnection>,
    until: Instant,
) -> Result<(), DownstreamStream> {
    if !LOT.try_with(|lot| lot.borrow().is_some()).unwrap_or(false) {
        return Err(stream);
    }
    let socket = stream.into_plain()?;
    let socket = match socket.into_std() {
        Ok(socket) => socket,
        Err(error) => {
            debug!(listener = %connection.listener.name, %error, "cannot park a connection; closing it");
            return Ok(());
        }
    };
    let refused = LOT.with(|lot| {
        let mut lot = lot.borrow_mut();
        let Some(lot) = lot.as_mut() else { return Some(socket) };
        match lot.parking.park(socket, Record::Shared(connection.clone()), until) {
            Ok(()) => {
                PARKED.inc();
                crate::memory::released();
                // To settle the record once this task has let go of it, and perhaps to wait for
                // an earlier deadline.
                lot.wake.notify_one();
                None
            }
            Err((socket, _)) => Some(socket),
        }
    });
    let Some(socket) = refused else { return Ok(()) };
    match TcpStream::from_std(socket) {
        Ok(socket) => Err(DownstreamStream::new(socket, Bytes::new(), connection.meter.clone())),
        Err(error) => {
            debug!(listener = %connection.listener.name, %error, "cannot serve a connection again; closing it");
            Ok(())
        }
    }
}

/// How many connections the workers' lots hold, process-wide (`remora_http_parked_connections`).
pub(crate) static PARKED: LazyLock<Gauge> = LazyLock::new(Gauge::default);

/// Counts `n` connections out of a lot.
fn unparked(n: usize) {
    PARKED.dec_by(i64::try_from(n).unwrap_or(i64::MAX));
}

/// Runs this worker's lot until `drain` is signalled, then closes what it holds. Spawned once by
/// each worker.
pub(crate) async fn run(mut drain: DrainWatch) {
    let wake = Arc::new(Notify::new());
    let fd = match open(&wake) {
        Ok(fd) => fd,
        Err(error) => {
            warn!(%error, "no lot for idle connections on this worker; they park in their tasks");
            return;
        }
    };
    let mut out = Vec::new();
    let mut last_scan = Instant::now();
    loop {
        let next_scan = LOT.with(|lot| {
            let mut lot = lot.borrow_mut();
            let lot = lot.as_mut()?;
            lot.parking.settle(Record::settle);
            lot.parking.earliest()
        });
        let scan = async {
            match next_scan {
                Some(at) => tokio::time::sleep_until(at.max(last_scan + SCAN_EVERY).into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = drain.signaled() => break,
            guard = fd.readable() => {
                let mut guard = match guard {
                    Ok(guard) => guard,
                    Err(error) => {
                        warn!(%error, "the lot of idle connections failed; closing what it holds");
                        break;
                    }
                };
                let looked = match LOT.with(|lot| lot.borrow_mut().as_mut().map(|lot| lot.parking.ready(&mut out))) {
                    Some(Ok(looked)) => looked,
                    Some(Err(error)) => {
                        warn!(%error, "the lot of idle connections failed; closing what it holds");
                        break;
                    }
                    None => break,
                };
                if !looked.more {
                    guard.clear_ready();
                }
                drop(guard);
                unparked(out.len() + looked.closed);
                for (socket, record) in out.drain(..) {
                    let connection = record.into_shared();
                    match TcpStream::from_std(socket) {
                        Ok(socket) => {
                            let stream = DownstreamStream::new(socket, Bytes::new(), connection.meter.clone());
                            tokio::spawn(super::park::serve(stream, connection));
                        }
                        Err(error) => debug!(listener = %connection.listener.name, %error, "cannot serve a parked connection again; closing it"),
                    }
                }
                if looked.more {
                    // The rest after the tasks just woken have run: a burst woken at once would
                    // grow the worker's run queue to its size, for good.
                    tokio::task::yield_now().await;
                }
            }
            () = scan => {
                last_scan = Instant::now();
                LOT.with(|lot| {
                    if let Some(lot) = lot.borrow_mut().as_mut() {
                        lot.parking.expired(last_scan, &mut out);
                    }
                });
                unparked(out.len());
                for (_, record) in out.drain(..) {
                    debug!(listener = %record.get().listener.name, "parked keep-alive connection closed at its header or idle timeout");
                }
                if out.capacity() > EVENTS_PER_WAIT {
                    // Room for a burst that timed out together is given back.
                    out = Vec::new();
                }
            }
            () = wake.notified() => {}
        }
    }
    // Every parked connection closes as its socket and record drop; later ones park in their tasks,
    // where the drain closes them.
    let closing = LOT.with(|lot| lot.borrow_mut().take());
    if let Some(lot) = closing {
        unparked(lot.parking.len());
    }
}

/// Opens this thread's lot, woken by `wake`; the descriptor to wait on, registered with tokio.
fn open(wake: &Arc<Notify>) -> io::Result<AsyncFd<OwnedFd>> {
    let parking = Parking::new()?;
    let watched = parking.watch_fd()?;
    // SAFETY: an `OwnedFd` stays open, and its `as_raw_fd` is the same descriptor, until it is
    // dropped, which only the `AsyncFd` that owns it can do.
    #[allow(unsafe_code)]
    let fd = unsafe { AsyncFd::register_with_interest(watched, Interest::READABLE) }
        .map_err(|refused| refused.into_parts().1)?;
    LOT.with(|lot| *lot.borrow_mut() = Some(Lot { parking, wake: wake.clone() }));
    Ok(fd)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};

    use super::*;

    /// A connected pair of non-blocking sockets: (client, server).
    fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        server.set_nonblocking(true).unwrap();
        (client, server)
    }

    /// What comes out ready once `expected` items have (or 5 s have passed), sorted.
    fn ready_items(parking: &mut Parking<u32>, expected: usize) -> Vec<u32> {
        let mut out = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            while parking.ready(&mut out).unwrap().more {}
            if out.len() >= expected || Instant::now() > deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let mut items: Vec<u32> = out.into_iter().map(|(_, item)| item).collect();
        items.sort_unstable();
        items
    }

    #[test]
    fn a_socket_comes_back_when_it_has_something_to_read_and_is_closed_when_its_peer_closed() {
        let mut parking = Parking::new().unwrap();
        let far = Instant::now() + Duration::from_secs(60);
        let (mut talker, server_a) = pair();
        let (closer, server_b) = pair();
        let (_quiet, server_c) = pair();
        let (mut last_words, server_d) = pair();
        // Bytes that arrived before the socket was parked are reported too.
        talker.write_all(b"GET / HTTP/1.1\r\n").unwrap();
        for (server, item) in [(server_a, 1), (server_b, 2), (server_c, 3), (server_d, 4)] {
            parking.park(server, item, far).unwrap();
        }
        assert_eq!(parking.len(), 4);
        drop(closer);
        // A request sent just before the close is still served.
        last_words.write_all(b"GET /last HTTP/1.1\r\n\r\n").unwrap();
        drop(last_words);
        let (mut out, mut closed) = (Vec::new(), 0);
        let deadline = Instant::now() + Duration::from_secs(5);
        while out.len() + closed < 3 && Instant::now() < deadline {
            closed += parking.ready(&mut out).unwrap().closed;
        }
        out.sort_by_key(|(_, item)| *item);
        assert_eq!(out.iter().map(|(_, item)| *item).collect::<Vec<_>>(), [1, 4]);
        assert_eq!(closed, 1, "the socket its peer closed is closed in the lot");
        let mut head = [0; 16];
        out[0].0.read_exact(&mut head).unwrap();
        assert_eq!(&head, b"GET / HTTP/1.1\r\n", "the socket comes back with its bytes unread");
        // Taken out: reported no more, even while still readable; the quiet one stays.
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(ready_items(&mut parking, 0), Vec::<u32>::new());
        assert_eq!(parking.len(), 1);
    }

    #[test]
    fn a_crowd_of_closed_sockets_is_closed_a_look_at_a_time() {
        let mut parking = Parking::new().unwrap();
        let far = Instant::now() + Duration::from_secs(60);
        let count = EVENTS_PER_WAIT * 2 + 5;
        for item in 0..count {
            let (client, server) = pair();
            parking.park(server, item, far).unwrap();
            drop(client);
        }
        let mut out = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut looks = Vec::new();
        while parking.len() > 0 && Instant::now() < deadline {
            looks.push(parking.ready(&mut out).unwrap());
        }
        assert!(out.is_empty(), "nothing to serve");
        assert_eq!(looks.iter().map(|looked| looked.closed).sum::<usize>(), count);
        assert!(looks.iter().all(|looked| looked.closed <= EVENTS_PER_WAIT), "one look takes one call's events");
        assert!(looks[0].more);
    }

    #[test]
    fn a_table_a_crowd_left_is_compacted_and_what_stays_is_still_found() {
        let mut parking = Parking::new().unwrap();
        let far = Instant::now() + Duration::from_secs(60);
        let count = COMPACT_ABOVE * 4;
        let (mut stayers, mut leavers) = (Vec::new(), Vec::new());
        for item in 0..u32::try_from(count).unwrap() {
            let (client, server) = pair();
            parking.park(server, item, far).unwrap();
            // Every tenth stays; they are spread over the table.
            if item % 10 == 0 { stayers.push((item, client)) } else { leavers.push(client) }
        }
        // Some of the stayers have not been settled yet when the table is compacted.
        parking.settle(|item| item + 1000);
        for (item, client) in stayers.iter_mut().rev().take(3) {
            // Its client closes the old connection and opens another, parked after the settling.
            let (again, server) = pair();
            *client = again;
            parking.park(server, *item + 2000, far).unwrap();
        }
        let mut closed = 0;
        leavers.clear();
        let deadline = Instant::now() + Duration::from_secs(5);
        while parking.len() > stayers.len() && Instant::now() < deadline {
            let mut out = Vec::new();
            closed += parking.ready(&mut out).unwrap().closed;
            assert!(out.is_empty());
        }
        assert_eq!(closed, count - stayers.len() + 3);
        assert_eq!(parking.len(), stayers.len());
        assert!(parking.slots.capacity() <= COMPACT_ABOVE, "the table was cut to what was parked");
        parking.settle(|item| item + 10_000);
        for (_, client) in &mut stayers {
            client.write_all(b"x").unwrap();
        }
        let mut expected: Vec<u32> = stayers.iter().map(|(item, _)| item + 1000).collect();
        let n = expected.len();
        for item in &mut expected[n - 3..] {
            *item += 1000 + 10_000;
        }
        expected.sort_unstable();
        assert_eq!(ready_items(&mut parking, stayers.len()), expected);
        assert_eq!(parking.len(), 0);
    }

    #[test]
    fn a_socket_past_its_deadline_is_taken_out_and_the_earliest_deadline_follows() {
        let mut parking = Parking::new().unwrap();
        let start = Instant::now();
        let mut clients = Vec::new();
        for (item, after) in [(1, 10), (2, 30), (3, 20)] {
            let (client, server) = pair();
            clients.push(client);
            parking.park(server, item, start + Duration::from_secs(after)).unwrap();
        }
        assert_eq!(parking.earliest(), Some(start + Duration::from_secs(10)));
        let mut out = Vec::new();
        parking.expired(start + Duration::from_secs(5), &mut out);
        assert!(out.is_empty());
        parking.expired(start + Duration::from_secs(20), &mut out);
        let mut items: Vec<u32> = out.drain(..).map(|(_, item)| item).collect();
        items.sort_unstable();
        assert_eq!(items, [1, 3]);
        assert_eq!(parking.earliest(), Some(start + Duration::from_secs(30)));
        assert_eq!(parking.len(), 1);
        // Its slot is reused, and a socket taken out by its deadline is not reported ready.
        let (mut client, server) = pair();
        parking.park(server, 4, start + Duration::from_secs(40)).unwrap();
        client.write_all(b"x").unwrap();
        assert_eq!(ready_items(&mut parking, 1), [4]);
        parking.expired(start + Duration::from_secs(60), &mut out);
        assert_eq!(out.len(), 1);
        assert_eq!((parking.len(), parking.earliest()), (0, None));
    }

    #[test]
    fn what_was_parked_since_the_last_settling_is_settled_once() {
        let mut parking = Parking::new().unwrap();
        let far = Instant::now() + Duration::from_secs(60);
        let mut clients = Vec::new();
        for item in [1, 2] {
            let (client, server) = pair();
            clients.push(client);
            parking.park(server, item, far).unwrap();
        }
        parking.settle(|item| item * 10);
        let (mut client, server) = pair();
        parking.park(server, 3, far).unwrap();
        parking.settle(|item| item * 100);
        client.write_all(b"x").unwrap();
        for client in &mut clients {
            client.write_all(b"x").unwrap();
        }
        assert_eq!(ready_items(&mut parking, 3), [10, 20, 300]);
    }

    #[test]
    fn more_ready_sockets_than_one_call_takes_all_come_back() {
        let mut parking = Parking::new().unwrap();
        let far = Instant::now() + Duration::from_secs(60);
        let mut clients = Vec::new();
        let count = u32::try_from(EVENTS_PER_WAIT * 2 + 5).unwrap();
        for item in 0..count {
            let (mut client, server) = pair();
            client.write_all(b"x").unwrap();
            clients.push(client);
            parking.park(server, item, far).unwrap();
        }
        assert_eq!(ready_items(&mut parking, count as usize), (0..count).collect::<Vec<_>>());
        assert_eq!(parking.len(), 0);
    }
}

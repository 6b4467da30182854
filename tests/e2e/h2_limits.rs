//! HTTP/2 limits proven on the wire, and HTTP/2 floods refused: a raw client written here (frames
//! and HPACK by hand, so it can misbehave as no library client would) against a proxy's `http2`
//! listener in front of a real upstream.
//!
//! A limit set in the proxy's code can fail to reach the codec (hyper#3782 once disabled the
//! reset-flood guard without a word), so each is read back from what the proxy sends, or provoked:
//! the SETTINGS it announces (concurrent streams, stream window, header list size) and its
//! connection window; rapid reset (HEADERS then RST_STREAM, again and again) and MadeYouReset
//! (frames that make the server reset streams itself) each ended with GOAWAY `ENHANCE_YOUR_CALM`;
//! a header list over 64 KiB refused, and a CONTINUATION flood ended, without the proxy buffering
//! it; and PING, SETTINGS and empty-DATA floods leaving the proxy serving. After every attack, a
//! fresh client is served.

use std::net::SocketAddr;
use std::time::Duration;

use remora_proxy::testing::{Client, HttpServer, TestProxy};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::{cluster, listener, route_all};

pub(crate) const DATA: u8 = 0x0;
pub(crate) const HEADERS: u8 = 0x1;
pub(crate) const RST_STREAM: u8 = 0x3;
pub(crate) const SETTINGS: u8 = 0x4;
pub(crate) const PING: u8 = 0x6;
pub(crate) const GOAWAY: u8 = 0x7;
pub(crate) const WINDOW_UPDATE: u8 = 0x8;
pub(crate) const CONTINUATION: u8 = 0x9;

pub(crate) const END_STREAM: u8 = 0x1;
pub(crate) const ACK: u8 = 0x1;
pub(crate) const END_HEADERS: u8 = 0x4;

pub(crate) const ENHANCE_YOUR_CALM: u32 = 0xb;

/// One frame as read: its type, flags, stream and payload.
#[derive(Debug)]
pub(crate) struct Frame {
    pub(crate) kind: u8,
    pub(crate) flags: u8,
    pub(crate) stream: u32,
    pub(crate) payload: Vec<u8>,
}

pub(crate) fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let length = u32::try_from(payload.len()).unwrap();
    let mut out = length.to_be_bytes()[1..].to_vec();
    out.extend([kind, flags]);
    out.extend(stream.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// An HPACK integer with an `prefix`-bit prefix, its first byte's high bits `high`.
pub(crate) fn integer(value: usize, prefix: u8, high: u8, out: &mut Vec<u8>) {
    let max = (1usize << prefix) - 1;
    if value < max {
        out.push(high | value as u8);
        return;
    }
    out.push(high | max as u8);
    let mut rest = value - max;
    while rest >= 128 {
        out.push((rest % 128) as u8 | 0x80);
        rest /= 128;
    }
    out.push(rest as u8);
}

/// A header field as a literal without indexing, with a new name.
pub(crate) fn literal(name: &str, value: &[u8], out: &mut Vec<u8>) {
    out.push(0x00);
    integer(name.len(), 7, 0, out);
    out.extend_from_slice(name.as_bytes());
    integer(value.len(), 7, 0, out);
    out.extend_from_slice(value);
}

/// A GET's header block: `:method GET`, `:scheme http`, `:path /` (static table), `:authority`.
pub(crate) fn get_block() -> Vec<u8> {
    let mut block = vec![0x82, 0x86, 0x84];
    integer(1, 4, 0x00, &mut block);
    integer(4, 7, 0, &mut block);
    block.extend_from_slice(b"shop");
    block
}

/// A raw HTTP/2 connection to the proxy, past the preface and the SETTINGS exchange.
pub(crate) struct Raw {
    stream: TcpStream,
    /// The server's SETTINGS, as `(identifier, value)`.
    settings: Vec<(u16, u32)>,
    /// Frames read while waiting for SETTINGS.
    early: Vec<Frame>,
}

impl Raw {
    pub(crate) async fn connect(address: SocketAddr) -> Raw {
        let mut stream = TcpStream::connect(address).await.unwrap();
        stream.set_nodelay(true).unwrap();
        stream.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await.unwrap();
        stream.write_all(&frame(SETTINGS, 0, 0, &[])).await.unwrap();
        let mut raw = Raw { stream, settings: Vec::new(), early: Vec::new() };
        loop {
            let frame = raw.read().await.expect("the server's SETTINGS");
            if frame.kind == SETTINGS && frame.flags & ACK == 0 {
                raw.settings = frame
                    .payload
                    .chunks(6)
                    .map(|c| (u16::from_be_bytes([c[0], c[1]]), u32::from_be_bytes([c[2], c[3], c[4], c[5]])))
                    .collect();
                raw.stream.write_all(&frame_ack()).await.unwrap();
                return raw;
            }
            raw.early.push(frame);
        }
    }

    /// Reads until the server's first WINDOW_UPDATE for the connection, returning the window it
    /// grants. A client may send no more than 65,535 bytes of DATA before it has that frame.
    pub(crate) async fn connection_window(&mut self) -> u32 {
        let increment = |f: &Frame| u32::from_be_bytes([f.payload[0], f.payload[1], f.payload[2], f.payload[3]]);
        if let Some(at) = self.early.iter().position(|f| f.kind == WINDOW_UPDATE && f.stream == 0) {
            return 65_535 + (increment(&self.early.remove(at)) & 0x7fff_ffff);
        }
        loop {
            let frame = self.read().await.expect("the server's connection WINDOW_UPDATE");
            if frame.kind == WINDOW_UPDATE && frame.stream == 0 {
                return 65_535 + (increment(&frame) & 0x7fff_ffff);
            }
            self.early.push(frame);
        }
    }

    pub(crate) fn setting(&self, identifier: u16) -> Option<u32> {
        self.settings.iter().find(|(id, _)| *id == identifier).map(|(_, value)| *value)
    }

    /// The next frame, or `None` at the end of the connection (or after 5 s of nothing).
    pub(crate) async fn read(&mut self) -> Option<Frame> {
        self.read_within(Duration::from_secs(5)).await
    }

    /// The next frame, or `None` at the end of the connection (or after `limit` of nothing).
    pub(crate) async fn read_within(&mut self, limit: Duration) -> Option<Frame> {
        let mut head = [0u8; 9];
        tokio::time::timeout(limit, self.stream.read_exact(&mut head)).await.ok()?.ok()?;
        let length = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
        let mut payload = vec![0u8; length];
        tokio::time::timeout(limit, self.stream.read_exact(&mut payload)).await.ok()?.ok()?;
        let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
        Some(Frame { kind: head[3], flags: head[4], stream, payload })
    }

    /// Reads until GOAWAY (its error code) or the end of the connection (`None`).
    pub(crate) async fn goaway(&mut self) -> Option<u32> {
        while let Some(frame) = self.read().await {
            if frame.kind == GOAWAY {
                return Some(u32::from_be_bytes([
                    frame.payload[4],
                    frame.payload[5],
                    frame.payload[6],
                    frame.payload[7],
                ]));
            }
        }
        None
    }

    /// Reads until stream 1 is answered or ended: true if it was refused (reset, the connection
    /// ended, or any answer but 200), false if it was served.
    pub(crate) async fn refused(&mut self) -> bool {
        loop {
            match self.read().await {
                None => return true,
                Some(f) if f.kind == GOAWAY || (f.kind == RST_STREAM && f.stream == 1) => return true,
                // A response's HEADERS: served if its block opens with `:status 200` from the
                // static table (0x88); a 4xx is another index or a literal carrying its digits.
                Some(f) if f.kind == HEADERS && f.stream == 1 => return !f.payload.starts_with(&[0x88]),
                Some(_) => {}
            }
        }
    }

    /// Writes `bytes`, ignoring a connection the server has already closed.
    pub(crate) async fn send(&mut self, bytes: &[u8]) -> bool {
        self.stream.write_all(bytes).await.is_ok()
    }
}

pub(crate) fn frame_ack() -> Vec<u8> {
    frame(SETTINGS, ACK, 0, &[])
}

struct Setup {
    _upstream: HttpServer,
    proxy: TestProxy,
    address: SocketAddr,
}

async fn setup() -> Setup {
    let upstream = HttpServer::start("up").await;
    let proxy = TestProxy::start(&format!(
        "resources:\n{}{}{}",
        cluster("up", "", &[upstream.address()]),
        route_all("main", "up"),
        listener("in", ", protocol: http2"),
    ));
    let address = proxy.address("in");
    Setup { _upstream: upstream, proxy, address }
}

/// After an attack, a new client is served.
async fn still_serves(address: SocketAddr) {
    let reply = Client::http2(address).await.get("shop", "/").await;
    assert_eq!(reply.status, 200);
}

/// The limits the proxy's HTTP/2 server is built with are what it announces: 512 concurrent
/// streams, a 256 KiB stream window, a 64 KiB header list, a 1 MiB connection window.
#[tokio::test]
async fn the_limits_reach_the_wire() {
    let setup = setup().await;
    let mut raw = Raw::connect(setup.address).await;
    assert_eq!(raw.setting(0x3), Some(remora_proxy::limits::H2_MAX_CONCURRENT_STREAMS));
    assert_eq!(raw.setting(0x4), Some(remora_proxy::limits::H2_STREAM_WINDOW));
    assert_eq!(raw.setting(0x6), Some(remora_proxy::limits::H2_MAX_HEADER_LIST_SIZE));
    assert_eq!(raw.connection_window().await, remora_proxy::limits::H2_CONNECTION_WINDOW);
    drop(setup.proxy);
}

/// Rapid reset (CVE-2023-44487): streams opened and cancelled at once, thousands of them, end in
/// GOAWAY `ENHANCE_YOUR_CALM`, and the proxy serves others.
#[tokio::test]
async fn rapid_reset_ends_in_goaway() {
    streams_then_goaway(5_000, |stream| frame(RST_STREAM, 0, stream, &8u32.to_be_bytes())).await;
}

/// MadeYouReset (CVE-2025-8671): frames that make the server reset each stream itself (a
/// WINDOW_UPDATE that overflows the stream's send window is a stream error) end in GOAWAY
/// `ENHANCE_YOUR_CALM` once past the local-error-reset limit. (A WINDOW_UPDATE of 0, the other
/// classic, the codec takes as a connection error at once.)
#[tokio::test]
async fn made_you_reset_ends_in_goaway() {
    let limit = u32::try_from(remora_proxy::limits::H2_MAX_LOCAL_ERROR_RESET_STREAMS).unwrap();
    streams_then_goaway(2 * limit, |stream| frame(WINDOW_UPDATE, 0, stream, &0x7fff_ffffu32.to_be_bytes())).await;
}

/// Opens `count` streams in one burst, each GET followed by `then(stream)`, and expects GOAWAY
/// `ENHANCE_YOUR_CALM`, and a new client served after it.
async fn streams_then_goaway(count: u32, then: impl Fn(u32) -> Vec<u8>) {
    let setup = setup().await;
    let mut raw = Raw::connect(setup.address).await;
    let block = get_block();
    let mut burst = Vec::new();
    for stream in (0..count).map(|i| 2 * i + 1) {
        burst.extend(frame(HEADERS, END_STREAM | END_HEADERS, stream, &block));
        burst.extend(then(stream));
    }
    raw.send(&burst).await;
    assert_eq!(raw.goaway().await, Some(ENHANCE_YOUR_CALM));
    still_serves(setup.address).await;
}

/// A header list over 64 KiB (one 70 KB field, in CONTINUATION frames) is refused (a 431, or the
/// stream or connection reset), and a CONTINUATION flood (a header block that never ends, in
/// 100,000 small frames) ends the connection instead of being buffered.
#[tokio::test]
async fn oversized_headers_and_continuation_floods_are_refused() {
    let setup = setup().await;
    let mut raw = Raw::connect(setup.address).await;
    let mut block = get_block();
    literal("x-big", &vec![b'a'; 70_000], &mut block);
    let mut chunks = block.chunks(16_000);
    let mut out = frame(HEADERS, END_STREAM, 1, chunks.next().unwrap());
    let mut rest: Vec<&[u8]> = chunks.collect();
    let last = rest.pop().unwrap();
    for chunk in rest {
        out.extend(frame(CONTINUATION, 0, 1, chunk));
    }
    out.extend(frame(CONTINUATION, END_HEADERS, 1, last));
    raw.send(&out).await;
    assert!(raw.refused().await, "a 70 KB header list was served");
    still_serves(setup.address).await;

    let mut raw = Raw::connect(setup.address).await;
    let mut flood = frame(HEADERS, END_STREAM, 1, &get_block());
    let mut field = Vec::new();
    literal("x-c", b"continued", &mut field);
    for _ in 0..100_000 {
        flood.extend(frame(CONTINUATION, 0, 1, &field));
    }
    raw.send(&flood).await;
    loop {
        match raw.read().await {
            None => break,
            Some(f) if f.kind == GOAWAY => break,
            Some(f) => assert!(f.kind != HEADERS || f.stream != 1, "an endless header block was served"),
        }
    }
    still_serves(setup.address).await;
}

/// PING, SETTINGS and empty-DATA floods (100,000 frames each, the answers left unread) neither
/// crash the proxy nor stop it serving others.
#[tokio::test]
async fn ping_settings_and_empty_data_floods_leave_the_proxy_serving() {
    let setup = setup().await;
    for flood in [frame(PING, 0, 0, &[0u8; 8]), frame(SETTINGS, 0, 0, &[0, 0x3, 0, 0, 0, 100]), frame(DATA, 0, 1, &[])]
    {
        let mut raw = Raw::connect(setup.address).await;
        let mut out = Vec::new();
        if flood[3] == DATA {
            out.extend(frame(HEADERS, END_HEADERS, 1, &get_block()));
        }
        for _ in 0..100_000 {
            out.extend_from_slice(&flood);
        }
        // Written from a task of its own: the proxy may stop reading (its answers unread fill the
        // socket) or end the connection, and either is fine.
        let writer = tokio::spawn(async move {
            let _ = tokio::time::timeout(Duration::from_secs(10), raw.send(&out)).await;
            raw
        });
        still_serves(setup.address).await;
        drop(writer.await.unwrap());
    }
    still_serves(setup.address).await;
}

/// An HPACK bomb (one 4 KB field put in the dynamic table, then named by its one-byte index 100
/// times: a 4 KB block that decodes to 400 KB) is refused as the header list over 64 KiB it is,
/// and a padding flood (100,000 DATA frames of nothing but 255 bytes of padding, which count
/// against flow control) leaves the proxy serving.
#[tokio::test]
async fn hpack_bombs_and_padding_floods_are_refused() {
    let setup = setup().await;
    let mut raw = Raw::connect(setup.address).await;
    let mut block = get_block();
    // Literal with incremental indexing, new name: it becomes dynamic-table entry 62.
    block.push(0x40);
    integer(5, 7, 0, &mut block);
    block.extend_from_slice(b"x-big");
    integer(4_000, 7, 0, &mut block);
    block.extend(std::iter::repeat_n(b'a', 4_000));
    block.extend(std::iter::repeat_n(0x80 | 62, 100));
    raw.send(&frame(HEADERS, END_STREAM | END_HEADERS, 1, &block)).await;
    assert!(raw.refused().await, "a 400 KB header list from a 4 KB block was served");
    still_serves(setup.address).await;

    let mut raw = Raw::connect(setup.address).await;
    let mut out = frame(HEADERS, END_HEADERS, 1, &get_block());
    let mut padded = vec![255_u8];
    padded.extend([0_u8; 255]);
    const PADDED: u8 = 0x8;
    for _ in 0..100_000 {
        out.extend(frame(DATA, PADDED, 1, &padded));
    }
    let writer = tokio::spawn(async move {
        let _ = tokio::time::timeout(Duration::from_secs(10), raw.send(&out)).await;
        raw
    });
    still_serves(setup.address).await;
    drop(writer.await.unwrap());
    still_serves(setup.address).await;
}

/// A request header block for `method path` on authority `shop`.
fn request_block(method: &str, path: &str) -> Vec<u8> {
    let mut block = Vec::new();
    for (name, value) in [(":method", method), (":scheme", "http"), (":path", path), (":authority", "shop")] {
        literal(name, value.as_bytes(), &mut block);
    }
    block
}

/// Reads until stream `stream` is reset, returning its error code; `None` if it is not (the
/// connection ending instead, or nothing for 30 s).
async fn reset_of(raw: &mut Raw, stream: u32) -> Option<u32> {
    while let Some(frame) = raw.read_within(Duration::from_secs(30)).await {
        match frame.kind {
            RST_STREAM if frame.stream == stream => {
                return Some(u32::from_be_bytes(frame.payload[..4].try_into().ok()?));
            }
            GOAWAY => return None,
            _ => {}
        }
    }
    None
}

const REFUSED_STREAM: u32 = 0x7;
const FLOW_CONTROL_ERROR: u32 = 0x3;

/// The concurrent-stream limit takes effect: with 512 requests open (each waiting on a slow
/// endpoint), the 513th stream is refused with `REFUSED_STREAM`, and the 512 are answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_513th_concurrent_stream_is_refused() {
    let setup = setup().await;
    let mut raw = Raw::connect(setup.address).await;
    let limit = remora_proxy::limits::H2_MAX_CONCURRENT_STREAMS;
    let block = request_block("GET", "/slow/1500");
    let mut burst = Vec::new();
    for stream in (0..=limit).map(|i| 2 * i + 1) {
        burst.extend(frame(HEADERS, END_STREAM | END_HEADERS, stream, &block));
    }
    raw.send(&burst).await;
    let last = 2 * limit + 1;
    let mut answered = 0;
    let mut refused = None;
    while answered < limit || refused.is_none() {
        let Some(frame) = raw.read_within(Duration::from_secs(30)).await else { break };
        match frame.kind {
            RST_STREAM if frame.stream == last => {
                refused = Some(u32::from_be_bytes(frame.payload[..4].try_into().unwrap()))
            }
            RST_STREAM => panic!("stream {} reset", frame.stream),
            HEADERS if frame.stream != last => answered += 1,
            _ => {}
        }
    }
    assert_eq!(refused, Some(REFUSED_STREAM));
    assert_eq!(answered, limit, "the streams within the limit were answered");
}

/// The stream window takes effect: a request body sent past the 256 KiB the proxy granted (while a
/// fault delay holds the request, so nothing is read yet) is a flow-control error, and one that
/// fills the window exactly is served.
#[tokio::test]
async fn a_body_past_the_stream_window_is_a_flow_control_error() {
    let upstream = HttpServer::start("up").await;
    let proxy = TestProxy::start(&format!(
        "resources:\n{}  - {{kind: RouteTable, name: main, routes: [{{fault: {{delay: {{percent: 100, duration: 0.5s}}}}, backends: [{{cluster: up}}]}}]}}\n{}",
        cluster("up", "", &[upstream.address()]),
        listener("in", ", protocol: http2"),
    ));
    let window = remora_proxy::limits::H2_STREAM_WINDOW as usize;
    let body = |length: usize| {
        let mut frames = frame(HEADERS, END_HEADERS, 1, &request_block("POST", "/echo"));
        let chunk = vec![b'x'; 16_384];
        let mut left = length;
        while left > 0 {
            let n = left.min(chunk.len());
            left -= n;
            frames.extend(frame(DATA, if left == 0 { END_STREAM } else { 0 }, 1, &chunk[..n]));
        }
        frames
    };
    // Each time, the connection's own window is waited for (the stream's is what is tested).
    let mut raw = Raw::connect(proxy.address("in")).await;
    raw.connection_window().await;
    raw.send(&body(window + 16_384)).await;
    assert_eq!(reset_of(&mut raw, 1).await, Some(FLOW_CONTROL_ERROR));

    let mut raw = Raw::connect(proxy.address("in")).await;
    raw.connection_window().await;
    raw.send(&body(window)).await;
    // Generous: under a loaded CI machine the answer may take a while; refusal is what is checked.
    let answer = loop {
        match raw.read_within(Duration::from_secs(30)).await {
            Some(f) if f.kind == HEADERS && f.stream == 1 => break f,
            Some(f) if f.kind == RST_STREAM || f.kind == GOAWAY => panic!("refused: {f:?}"),
            Some(_) => {}
            None => panic!("no answer in 30 s"),
        }
    };
    assert!(answer.payload.starts_with(&[0x88]), "a body filling the window exactly was not served: {answer:?}");
}

//! Every safety limit and built-in default, in one place, with the reason for its value.
//!
//! hyper and h2 leave some protections off by default (no header-read timeout without a timer, no
//! cap on connections); a sidecar faces whatever the app or the network sends it, so each limit is
//! set here and read by the code that applies it. Nothing else in the crate holds a magic number for
//! these. Values configurable per resource (timeouts, connection caps) have their defaults here too.

use std::time::Duration;

// ---- Listeners -------------------------------------------------------------------------------

/// Pending-connection queue per listening socket. Matches the benchmark peers (nginx `backlog=4096`);
/// the kernel clamps it to `net.core.somaxconn`.
pub const LISTEN_BACKLOG: i32 = 4096;

/// Default `Listener.max_connections`: far above what one sidecar serves, low enough that a
/// connection flood cannot exhaust file descriptors (each proxied TCP connection holds six: two
/// sockets and two pipes).
pub const DEFAULT_MAX_CONNECTIONS: u32 = 100_000;

/// Default `Listener.detect_timeout`. Server-speaks-first protocols (MySQL, SMTP) wait this long on
/// every new connection before the proxy gives up on detection and forwards bytes, so it is short;
/// clients that send first are detected on their first packet and never wait.
pub const DEFAULT_DETECT_TIMEOUT: Duration = Duration::from_secs(1);

/// Bytes read before protocol detection must decide. The longest thing detection looks for is the
/// 24-byte HTTP/2 preface; an HTTP/1 method is at most 20 bytes there (see `detect`).
pub const DETECT_PEEK_BYTES: usize = 1024;

/// Default `Listener.idle_timeout`: a connection with no bytes moving for an hour is closed. Envoy's
/// default for TCP proxies and HTTP connections alike; long enough for any sane keep-alive pool.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(3600);

/// How often freed memory is given back to the system (`memory::give_back`): an RSS that grew in a
/// burst comes back within this long of the burst's end.
pub const MEMORY_RETURN_INTERVAL: Duration = Duration::from_secs(5);

/// Backoff after `accept` fails (EMFILE, ENFILE, ENOMEM), so an exhausted process does not spin.
pub const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(20);

// ---- HTTP/1.1 server -------------------------------------------------------------------------

/// Default `Listener.header_timeout`: time a client has to send a complete request head. hyper starts
/// this timer whenever it waits for a request, so it is also how long an idle keep-alive connection
/// stays open: 60 s, as nginx's `client_header_timeout`, and under nginx's 75 s `keepalive_timeout`
/// so clients that reuse an nginx pool see the same behaviour. It stops slowloris clients from
/// holding connections forever.
pub const DEFAULT_HEADER_TIMEOUT: Duration = Duration::from_secs(60);

/// How long an HTTP/1.1 keep-alive connection stays quiet (between requests, nothing moving) before
/// it parks: hyper is shut down and its buffers freed, and only the socket waits for the next
/// request (`http::park`). Short, so that a pool of idle connections costs what its sockets do;
/// long enough that a busy connection, whose next request comes within microseconds, does not
/// pay to start hyper again per request.
pub const H1_PARK_AFTER: Duration = Duration::from_millis(20);

/// How long an HTTP/2 connection moves no byte before h2 is asked to free its buffers
/// (`http::server::Driven`; about 30 kB of read, write and decoding buffers, slabs and HPACK
/// tables, allocated again by the next frame). As for parking, short enough that idle connections cost little, and
/// long enough that a busy connection never pays for it.
pub const H2_TIDY_AFTER: Duration = Duration::from_millis(20);

// Most header fields in one HTTP/1 request: 100, hyper's default and Envoy's. It is deliberately not
// set through `max_headers`, which would move hyper's header array from the stack to a heap
// allocation per request.

/// Largest buffered request head (request line plus headers), in bytes. 64 KiB is Envoy's 60 KiB
/// header limit rounded up; nginx allows 32 KiB. Larger heads get 431.
pub const MAX_HEADER_BYTES: usize = 64 * 1024;

/// Largest read/write buffer per HTTP/1 connection. Bounds memory per connection; bodies stream
/// through it and are never held whole.
pub const H1_MAX_BUF_SIZE: usize = 128 * 1024;

// ---- HTTP/2 (server and client) --------------------------------------------------------------

/// Streams a client may open at once on one connection. nginx allows 128, HAProxy 100, Envoy
/// effectively unlimited; gRPC clients multiplex heavily, so 512, with memory bounded by the
/// connection window below rather than by this count.
pub const H2_MAX_CONCURRENT_STREAMS: u32 = 512;

/// Largest decoded header list (HPACK can expand small frames into large lists). Same budget as
/// HTTP/1's [`MAX_HEADER_BYTES`].
pub const H2_MAX_HEADER_LIST_SIZE: u32 = MAX_HEADER_BYTES as u32;

/// Streams the client opened and reset before the proxy accepted them, at most, before the
/// connection is closed with GOAWAY: the "rapid reset" attack (CVE-2023-44487). hyper's default.
pub const H2_MAX_PENDING_ACCEPT_RESET_STREAMS: usize = 20;

/// Streams the proxy may reset because of the peer's protocol errors before it closes the
/// connection: the "MadeYouReset" attack (CVE-2025-8671). hyper's default.
pub const H2_MAX_LOCAL_ERROR_RESET_STREAMS: usize = 1024;

/// Flow-control window per stream: how much one stream may have in flight unacknowledged. 256 KiB
/// keeps a single gRPC stream fast on a LAN (bandwidth-delay product of 10 Gbit/s x 200 us).
pub const H2_STREAM_WINDOW: u32 = 256 * 1024;

/// Flow-control window per connection: the bound on body bytes one connection can make the proxy
/// hold, whatever its stream count. Envoy's recommended edge value.
pub const H2_CONNECTION_WINDOW: u32 = 1024 * 1024;

/// Most bytes buffered for sending per stream before the sender is told to wait. Below hyper's
/// 400 KiB default, above the stream window so one window's worth always fits.
pub const H2_MAX_SEND_BUF_SIZE: usize = 384 * 1024;

/// HTTP/3 requests open at once on one QUIC connection (its bidirectional-stream limit), as HTTP/2's
/// [`H2_MAX_CONCURRENT_STREAMS`]; their flow-control windows are HTTP/2's too.
pub const H3_MAX_CONCURRENT_STREAMS: u32 = H2_MAX_CONCURRENT_STREAMS;
/// Unidirectional streams a client may open on an HTTP/3 connection: it needs three (control and
/// the two QPACK streams); a few more leave room for extensions, no more for a flood.
pub const H3_MAX_UNI_STREAMS: u32 = 8;
/// Mesh QUIC connections (HBONE over QUIC) send a keep-alive this often, so one whose tunnels are
/// quiet stays up; one that hears nothing for [`MESH_QUIC_IDLE_TIMEOUT`] is dead (a path that
/// stopped carrying UDP), and its tunnels with it.
pub const MESH_QUIC_KEEP_ALIVE: Duration = Duration::from_secs(5);
/// See [`MESH_QUIC_KEEP_ALIVE`].
pub const MESH_QUIC_IDLE_TIMEOUT: Duration = Duration::from_secs(20);
/// After QUIC to an endpoint's host failed to connect in time (UDP blocked on the path), its
/// connections take the cluster's TCP transport, and QUIC is tried again in the background this
/// often: no connection waits on a blocked path twice, and one that opens again is used within this.
pub const QUIC_PROBE_INTERVAL: Duration = Duration::from_secs(3);
/// How often an `hbone_quic` listener looks for this proxy's first certificate before it can answer.
pub const IDENTITY_WAIT_POLL: Duration = Duration::from_millis(100);
/// The largest PEM file (certificate chain, key, trust bundle) the proxy reads: a chain is a few
/// kilobytes, a large trust bundle a few hundred.
pub const MAX_PEM_FILE_BYTES: u64 = 4 * 1024 * 1024;
/// How long a client may remember an `Alt-Svc` advertisement of HTTP/3 (a day, as most sites).
pub const ALT_SVC_MAX_AGE: u32 = 86_400;

/// HBONE connections (both ways): each stream is a whole TCP connection's bytes, so its window
/// is a TCP-like 4 MiB, the connection's 16 MiB, and frames up to 1 MiB (ztunnel's choices);
/// measured in docs/benchmarks.md ("TCP between sidecars").
pub const HBONE_STREAM_WINDOW: u32 = 4 * 1024 * 1024;
/// See [`HBONE_STREAM_WINDOW`].
pub const HBONE_CONNECTION_WINDOW: u32 = 16 * 1024 * 1024;
/// See [`HBONE_STREAM_WINDOW`].
pub const HBONE_MAX_FRAME_SIZE: u32 = 1024 * 1024;
/// Tunnels open at once on one HBONE connection this proxy accepts (its HTTP/2 concurrent-stream
/// limit). Remora and ztunnel open another connection past [`HBONE_TUNNELS_PER_CONNECTION`], but
/// a peer that pools one connection per host must not have its tunnels wait for each other (each
/// still counts against the inbound listener's `max_connections`).
pub const HBONE_MAX_TUNNELS: u32 = 16 * 1024;
/// Tunnels this proxy opens at once on one pooled HBONE connection before it opens another to the
/// same host: 100, ztunnel's default (`POOL_MAX_STREAMS_PER_CONNECTION`) and the least concurrent
/// stream limit RFC 9113 (§6.5.2) recommends a server allow, so a peer's limit is not hit first.
pub const HBONE_TUNNELS_PER_CONNECTION: usize = 100;

/// Buffer per direction when opaque TCP is copied through user space (TLS on a side, an upgraded
/// HTTP connection): tokio's default. Held only while bytes move ([`crate::relay`]).
pub const COPY_BUFFER: usize = 8 * 1024;
/// The same when a side is an HBONE tunnel, where each write is a DATA frame: twice tokio's, as a
/// TLS record's; it moved as much through one tunnel as 64 KiB did (4.70–5.28 Gbit/s against
/// 4.89; 8 KiB: 3.72): figures in docs/benchmarks.md ("TCP between sidecars").
pub const TUNNEL_COPY_BUFFER: usize = 16 * 1024;
/// Copy buffers a worker thread keeps for its relays' next reads once they are given back (at
/// most 512 KiB of 16 KiB buffers); more are freed.
pub const SPARE_COPY_BUFFERS: usize = 32;

// ---- Upstream clusters -----------------------------------------------------------------------

/// Default `Cluster.connect_timeout`. Endpoints in a mesh are a LAN hop away; a connect that takes
/// a second is a dead or overloaded endpoint (Linkerd uses 1 s too).
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// Default `Cluster.idle_timeout` for pooled upstream connections: closed before the common server
/// keep-alive timeouts (nginx 75 s). Servers that close sooner (Node.js, 5 s) are handled by
/// `http::h1`: a closed pooled connection is noticed at checkout, and a request that raced the close
/// is sent again.
pub const DEFAULT_POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// Idle HTTP/1.1 connections kept per endpoint per worker. Above the concurrency the benchmarks
/// drive (h2load: 16 x 32 streams), so steady load does not churn connections.
pub const POOL_MAX_IDLE_PER_ENDPOINT: usize = 512;

/// Of those, how many stay for the cluster's idle timeout: the most recently used. The others, what
/// a burst left beyond the load that follows it, are closed once idle for
/// `POOL_SURPLUS_IDLE_TIMEOUT`, and their memory given back (nginx's upstream `keepalive` cache is
/// commonly 16–64 connections a worker).
pub const POOL_WARM_PER_ENDPOINT: usize = 32;

/// How long an idle HTTP/1.1 connection beyond `POOL_WARM_PER_ENDPOINT` is kept: long enough for a
/// burst that comes back, short enough that the next give-back finds it gone.
pub const POOL_SURPLUS_IDLE_TIMEOUT: Duration = Duration::from_secs(5);

/// Default `Cluster.panic_threshold`: below 50% healthy endpoints, health is ignored (Envoy's
/// default). When half a cluster looks bad, the likelier story is a shared cause (a bad deploy of
/// the check, a network blip) than half the endpoints failing at once, and concentrating the whole
/// load on the rest would take them down too.
pub const DEFAULT_PANIC_THRESHOLD: u32 = 50;

/// Mirrored requests in flight per worker, at most; copies beyond it are dropped (and counted). A
/// shadow cluster that stops answering must cost bounded memory, never the primary's latency.
pub const MIRROR_MAX_IN_FLIGHT: usize = 256;

/// How long a mirrored request may take before it is abandoned, when its route has no timeout.
pub const MIRROR_TIMEOUT: Duration = Duration::from_secs(30);

/// Bytes of request body kept so a mirror can read it beside the original when the route has no
/// retry policy (with one, its `replay_buffer_bytes`).
pub const MIRROR_BODY_BUFFER: usize = 64 * 1024;

/// How often each worker advances its coarse clock (`timer`), fires the coarse timers that are due
/// (the HTTP/1 header-read timeout) and closes pooled connections past their idle timeout. Those
/// deadlines are this coarse, which is nothing next to their tens of seconds.
pub const TIMER_TICK: Duration = Duration::from_secs(1);

// ---- L4 forwarding ---------------------------------------------------------------------------

/// Pipe capacity asked for each direction of a spliced TCP connection. A larger pipe moves more per
/// `splice(2)` call; the kernel may refuse (per-user pipe limits) and the pipe then keeps its
/// default 64 KiB, which still works.
pub const SPLICE_PIPE_SIZE: usize = 256 * 1024;

/// Empty pipes a worker thread keeps for its spliced connections' next bytes once they are given
/// back (`tcp::one_way`); more are closed.
pub const SPARE_PIPES: usize = 64;

/// Send and receive buffer of a forwarded TCP socket whose peer is on this host (the local app). The
/// less data sits in flight between the app's write and the other side's read, the more of it is
/// still in cache when it is copied; spliced pages are never touched by the proxy, so this decides
/// whether they arrive warm. With the peer benchmark (`benches/peers/tcp.yaml`) 256 KiB moved 19-20
/// Gbit/s at 0.20 CPU-seconds per GB, against 15.7 Gbit/s and 0.25 with the kernel's autotuned
/// buffers. Only loopback-like paths get it: their round trip is microseconds, so 256 KiB covers any
/// rate. Sockets across the network keep autotuning, which sizes them to their bandwidth-delay
/// product.
pub const LOCAL_SOCKET_BUFFER: usize = 256 * 1024;

/// Buffer size per direction for the portable (non-splice) copy.
pub const COPY_BUFFER_SIZE: usize = 64 * 1024;

// ---- Process ---------------------------------------------------------------------------------

/// Default `Bootstrap.drain_time`: Istio's termination drain duration.
pub const DEFAULT_DRAIN_TIME: Duration = Duration::from_secs(5);

/// How often the config file's metadata is read for changes, besides the kernel's notifications.
pub const CONFIG_POLL_INTERVAL: Duration = Duration::from_millis(500);

/// How long a followed file (the config, certificates) must hold still before a change is acted
/// on: an editor or a tool that writes in several steps is done within it.
pub const FILE_SETTLE_TIME: Duration = Duration::from_millis(10);

// ---- Control plane ---------------------------------------------------------------------------

/// Default `Bootstrap.initial_fetch_timeout`, Envoy's value: long enough for a control plane that is
/// starting beside the proxy, short enough that a proxy whose control plane is down still becomes
/// ready (serving its file's resources) within a deploy's patience.
pub const DEFAULT_INITIAL_FETCH_TIMEOUT: Duration = Duration::from_secs(15);

/// Most bytes peeked to find a ClientHello's ALPN. rustls' hellos are ~250 bytes; browsers' with
/// post-quantum key shares ~1.8 KiB; a longer one is passed through as not ours.
pub const CLIENT_HELLO_PEEK: usize = 4096;

/// Default TLS handshake timeout with a peer sidecar, either way.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How often certificate files' metadata is read for changes, besides the kernel's notifications.
pub const CERT_FILES_POLL_INTERVAL: Duration = Duration::from_secs(1);

/// Default certificate lifetime asked of the CA.
pub const DEFAULT_CERT_TTL: Duration = Duration::from_secs(24 * 3600);

/// Backoff between failed renewals: from the first to the last, doubling, with jitter.
pub const RENEW_BACKOFF_FIRST: Duration = Duration::from_millis(500);
/// See [`RENEW_BACKOFF_FIRST`].
pub const RENEW_BACKOFF_MAX: Duration = Duration::from_secs(30);

/// How long one signing call to the CA may take.
pub const CA_CALL_TIMEOUT: Duration = Duration::from_secs(10);

//! Remora's data plane: the sidecar proxy.
//!
//! A proxy accepts connections on its listeners, works out what each speaks and where it was going,
//! and forwards it: opaque TCP byte for byte (spliced in the kernel), HTTP/1.1 and HTTP/2 request by
//! request through route tables to balanced, pooled upstream connections. Its configuration is a set
//! of resources (see `remora-control-api`) compiled into an immutable snapshot and swapped whole
//! when the config changes, without dropping a request. An admin server reports health, metrics and
//! the config serving now; traces leave over OTLP and requests can be logged as JSON lines.
//!
//! ```text
//! accept → admit (connection rate limit, cap) → original destination (transparent) → detect
//!        ├─ inbound mesh TLS → terminate, peer SPIFFE ID, authorize → HTTP/2 or TCP as below
//!        ├─ opaque / TLS → tcp: route by original destination → balance → connect (mTLS to a mesh
//!        │    cluster) → splice both ways (copy when either side is TLS)
//!        └─ HTTP/1.1, HTTP/2 → http: observe → route (route, authorize, identity header, admit)
//!             → plan (tunnel | abort | direct | policed) → attempt (pick within breakers → send
//!             by version → settle) → respond → record
//!             (policed: the route's timeout over attempts, retried or hedged by `http::retries`,
//!              mirrored by `http::mirror`, answered by its fallback)
//!             trace context read on arrival; server span, access log line and gRPC status when
//!             the response body ends; a client span per attempt
//! ```
//!
//! # Layout
//! - [`app`] — the composition root: start (every subsystem's metrics registered, every listener
//!   bound before anything runs), signals, drain.
//! - [`bootstrap`] — where the config comes from; start-up settings and built-in defaults.
//! - [`context`] — what the data path shares: the [`context::DataPath`] every worker reads, and the
//!   mark an admitted connection carries until it ends.
//! - [`state`] — the live [`state::Snapshot`] (compiled listeners, route tables, clusters,
//!   authorization policies) and its metric families; `state::compose`, what serves out of the
//!   file's and the control plane's resources.
//! - [`reload`] — applying a new config all-or-nothing; the config file's watcher.
//! - [`xds`] — the control-plane stream's handler: applies, answers (ACK/NACK), reports, readiness.
//! - [`worker`] — the worker threads, one single-threaded runtime each.
//! - [`listener`] — binding, accepting, and sending each connection down the right path (HBONE
//!   tunnels included); the listeners' metrics.
//! - [`detect`] — what a connection speaks, from its first bytes.
//! - [`io`] — the downstream stream (replay + byte meter) and the idle timeout.
//! - [`memory`] — freed memory given back to the system, every few seconds.
//! - [`connect`] — TCP connects to endpoints, for every path.
//! - [`tcp`] — L4 forwarding (`splice(2)`), in TLS or HBONE tunnels to mesh clusters.
//! - [`relay`] — copying both ways through user space (TLS, tunnels, upgrades), holding no buffer
//!   while idle.
//! - [`http`] — the request's phases, one file each (`route`, `plan`, `attempt`, `policed`,
//!   `retries`, `mirror`, `observe`), the server (idle HTTP/1.1 connections parked between
//!   requests by `park`, in
//!   the worker's `lot`), the upstream pools and the HTTP/1.1 client (`h1`), bodies, header
//!   hygiene, tunnels.
//! - [`failure`] — what a failed attempt says about itself: the facts retry policy and outlier
//!   detection decide over.
//! - [`policy`] — traffic policy: a route's timeout, faults, rate limit, retries (conditions,
//!   backoff, budget) and fallback; a cluster's circuit breakers; their metrics.
//! - [`balance`] — endpoint selection (round robin, random, least request, peak EWMA, ring hash;
//!   locality tiers and panic mode), endpoint run-time state, outlier detection, health checks and
//!   the monitor that runs them (over the live snapshot); weighted cluster choice; their metrics.
//! - [`telemetry`] — the metrics registry and its rendering, lock-free latency histograms, trace
//!   context and spans, the OTLP export thread, the access log, the runtime log filter.
//! - [`timer`] — coarse per-worker time: a clock read once per tick, cheap timers for hyper, and
//!   precise deadlines for the policy path.
//! - [`quic`] — HTTP/3 listeners (quinn and h3): their certificates, QUIC settings and server,
//!   whose requests join the `http` pipeline at `route`; HBONE's tunnels over QUIC, in (judged by
//!   `listener::hbone`'s carrier) and out (pooled per host, falling back to TCP).
//! - [`tls`] — mutual TLS between sidecars: credentials (from the CA, renewed at half-life, or
//!   from watched files), the rustls configs, SPIFFE verification, the ClientHello ALPN sniffer;
//!   the identity and handshake metrics.
//! - [`admin`] — the admin HTTP server.
//! - [`capture`] — the iptables rules that send a pod's traffic through its proxy (`remora init`).
//! - [`drain`] — the drain signal and open-connection count.
//! - [`limits`] — every safety limit and default, with its reason.
//! - `testing` (feature `testing`) — fixtures for tests and benches, and the typed config builder.
//!
//! Each subsystem owns its metrics: it declares its families (`register`) and `app` registers them
//! in the one registry; no module knows another's counters. No file imports one of another folder
//! that imports it back (`tests/house.rs` checks).
//!
//! Errors follow one convention: a message includes its cause (`bind 0.0.0.0:80: permission
//! denied`), and the cause is not also returned from `source()`, so a chain printer such as
//! anyhow's `{:#}` shows each cause once.

pub mod admin;
pub mod app;
pub mod balance;
pub mod bootstrap;
pub mod capture;
pub mod connect;
pub mod context;
pub mod detect;
pub mod drain;
pub mod failure;
pub mod http;
pub mod io;
pub mod limits;
pub mod listener;
pub mod memory;
pub mod policy;
pub mod quic;
pub mod relay;
pub mod reload;
pub mod state;
pub mod tcp;
pub mod telemetry;
pub mod timer;
pub mod tls;
pub mod worker;
pub mod xds;

#[cfg(feature = "testing")]
pub mod testing;

pub use app::{Proxy, StartError, StartOptions, run};
pub use bootstrap::ConfigSource;

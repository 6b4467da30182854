//! The access log: one JSON line per HTTP request and per opaque TCP connection, to stdout or a
//! file, with the fields the bootstrap names.
//!
//! The data path fills an [`Entry`] when a request's response ends (or a connection closes), unless
//! [`AccessLog::wants`] says a successful request is not in the sampled share, and hands it to
//! [`AccessLog::write`], which formats the line on the worker and passes it to a writer
//! thread through a bounded queue without waiting: a writer that falls behind (a full disk, a slow
//! pipe) costs dropped lines, counted, never request latency. The writer flushes whenever its queue
//! runs empty, so lines appear promptly at low traffic and in large writes at high. A log file is
//! followed across rotation: at most once a second, before writing, the writer checks that the path
//! still names the file it has open, and if logrotate (or anyone) moved or deleted it, opens a new
//! one there, so no signal or `copytruncate` is needed.

use std::fmt::Write as _;
use std::io::Write as _;
use std::net::SocketAddr;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use prometheus_client::metrics::counter::Counter;
use remora_control_api::validate::bootstrap::ACCESS_LOG_FIELDS;

/// Lines queued for the writer before new ones are dropped.
const QUEUE_LINES: usize = 16 * 1024;
/// How often, at most, the writer checks that its file is still the one at the path.
const ROTATION_CHECK: Duration = Duration::from_secs(1);
/// The writer's buffer.
const WRITE_BUFFER: usize = 64 * 1024;

/// Whether HTTP and TCP lines carry each field of [`ACCESS_LOG_FIELDS`], in its order.
const CARRIED: [Carried; ACCESS_LOG_FIELDS.len()] = [
    Carried { http: true, tcp: true },  // start_time
    Carried { http: true, tcp: true },  // duration_ms
    Carried { http: true, tcp: true },  // protocol
    Carried { http: true, tcp: true },  // listener
    Carried { http: true, tcp: true },  // direction
    Carried { http: true, tcp: false }, // method
    Carried { http: true, tcp: false }, // authority
    Carried { http: true, tcp: false }, // path
    Carried { http: true, tcp: false }, // status
    Carried { http: true, tcp: false }, // grpc_status
    Carried { http: true, tcp: false }, // request_bytes
    Carried { http: true, tcp: false }, // response_bytes
    Carried { http: false, tcp: true }, // bytes_received
    Carried { http: false, tcp: true }, // bytes_sent
    Carried { http: true, tcp: false }, // route
    Carried { http: true, tcp: true },  // upstream_cluster
    Carried { http: true, tcp: true },  // upstream_endpoint
    Carried { http: true, tcp: false }, // attempts
    Carried { http: true, tcp: true },  // peer
    Carried { http: true, tcp: true },  // peer_identity
    Carried { http: true, tcp: false }, // trace_id
    Carried { http: true, tcp: true },  // response_flags
];

/// Whether HTTP and TCP lines carry a field.
struct Carried {
    http: bool,
    tcp: bool,
}

/// The names of every field, in the default order (for docs and errors).
pub fn field_names() -> impl Iterator<Item = &'static str> {
    ACCESS_LOG_FIELDS.iter().copied()
}

/// What one line says. Fields that do not apply, or are unknown, are written as `null`.
#[derive(Debug, Default)]
pub struct Entry<'a> {
    /// When the request arrived (the connection was accepted).
    pub start: Option<SystemTime>,
    /// How long until its response ended (the connection closed).
    pub duration: Duration,
    /// `HTTP/1.1`, `HTTP/2` or `tcp`.
    pub protocol: &'a str,
    /// The listener.
    pub listener: &'a str,
    /// `inbound` or `outbound`.
    pub direction: &'a str,
    /// HTTP: the method.
    pub method: Option<&'a str>,
    /// HTTP: the authority (`Host`).
    pub authority: Option<&'a str>,
    /// HTTP: the path and query.
    pub path: Option<&'a str>,
    /// HTTP: the status sent.
    pub status: Option<u16>,
    /// HTTP: the gRPC status, for gRPC.
    pub grpc_status: Option<u32>,
    /// HTTP: request body bytes read from the client by the time the response ended.
    pub request_bytes: Option<u64>,
    /// HTTP: response body bytes sent.
    pub response_bytes: Option<u64>,
    /// TCP: bytes from the client.
    pub bytes_received: Option<u64>,
    /// TCP: bytes to the client.
    pub bytes_sent: Option<u64>,
    /// HTTP: the route (`TABLE/ROUTE`).
    pub route: Option<&'a str>,
    /// The cluster.
    pub cluster: Option<&'a str>,
    /// The (last) endpoint.
    pub endpoint: Option<SocketAddr>,
    /// HTTP: attempts sent.
    pub attempts: Option<u32>,
    /// The client's address.
    pub peer: Option<SocketAddr>,
    /// The client's authenticated identity (mTLS).
    pub peer_identity: Option<&'a str>,
    /// HTTP: the trace id, when the request was traced.
    pub trace_id: Option<u128>,
    /// What went wrong, as the proxy's `x-remora-error` names it.
    pub flags: Option<&'a str>,
}

/// Where lines go and which fields they carry.
#[derive(Clone, Debug, PartialEq)]
pub struct AccessLogSettings {
    /// `None`: stdout.
    pub path: Option<PathBuf>,
    /// Indexes into the field list, in output order.
    fields: Vec<usize>,
    /// The share of successful HTTP requests logged.
    success_ratio: f64,
}

impl AccessLogSettings {
    /// Settings for `path` (`stdout` or `-` for standard output) and `fields` (empty: all);
    /// an unknown field name is the error.
    pub fn new(path: &str, fields: &[String]) -> Result<AccessLogSettings, String> {
        let path = match path {
            "stdout" | "-" => None,
            path => Some(PathBuf::from(path)),
        };
        let fields = if fields.is_empty() {
            (0..ACCESS_LOG_FIELDS.len()).collect()
        } else {
            fields
                .iter()
                .map(|name| {
                    ACCESS_LOG_FIELDS.iter().position(|f| f == name).ok_or_else(|| {
                        format!("unknown field {name:?} (known: {})", field_names().collect::<Vec<_>>().join(", "))
                    })
                })
                .collect::<Result<_, _>>()?
        };
        Ok(AccessLogSettings { path, fields, success_ratio: 1.0 })
    }

    /// Logs only `ratio` (0 to 1) of the successful HTTP requests; failures are always logged.
    pub fn sampling_successes(mut self, ratio: f64) -> AccessLogSettings {
        self.success_ratio = ratio.clamp(0.0, 1.0);
        self
    }
}

/// The access log: see the module documentation.
#[derive(Debug)]
pub struct AccessLog {
    sender: SyncSender<String>,
    fields: Vec<usize>,
    success_ratio: f64,
    dropped: Counter,
}

impl AccessLog {
    /// Opens the file (appending) or stdout and starts the writer thread. `counters` are the
    /// written and dropped line counters.
    pub fn open(settings: &AccessLogSettings, counters: [Counter; 2]) -> std::io::Result<Arc<AccessLog>> {
        let out = match &settings.path {
            None => Sink::Stdout(std::io::BufWriter::with_capacity(WRITE_BUFFER, std::io::stdout())),
            Some(path) => Sink::File(LogFile::open(path)?),
        };
        let (sender, receiver) = std::sync::mpsc::sync_channel(QUEUE_LINES);
        let [written, dropped] = counters;
        std::thread::Builder::new()
            .name("remora-access-log".into())
            .spawn(move || write_lines(receiver, out, &written))?;
        Ok(Arc::new(AccessLog {
            sender,
            fields: settings.fields.clone(),
            success_ratio: settings.success_ratio,
            dropped,
        }))
    }

    /// Whether an HTTP request that ended with `status` (`grpc_status`, and `flag` when the proxy
    /// answered itself) gets a line: failures always, successes at the sampling ratio.
    pub fn wants(&self, status: u16, grpc_status: Option<u32>, flag: Option<&str>) -> bool {
        let failed = status >= 500 || flag.is_some() || grpc_status.is_some_and(|code| code != 0);
        failed || self.success_ratio >= 1.0 || (self.success_ratio > 0.0 && fastrand::f64() < self.success_ratio)
    }

    /// Formats `entry` as one line and queues it; `http` says which fields apply.
    pub fn write(&self, entry: &Entry<'_>, http: bool) {
        let line = self.format(entry, http);
        if let Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) = self.sender.try_send(line) {
            self.dropped.inc();
        }
    }

    fn format(&self, e: &Entry<'_>, http: bool) -> String {
        let mut line = String::with_capacity(384);
        line.push('{');
        let mut first = true;
        for &index in &self.fields {
            let field = &CARRIED[index];
            if !(if http { field.http } else { field.tcp }) {
                continue;
            }
            if !first {
                line.push(',');
            }
            first = false;
            let name = ACCESS_LOG_FIELDS[index];
            json_string(&mut line, name);
            line.push(':');
            match name {
                "start_time" => opt_str(&mut line, e.start.map(rfc3339).as_deref()),
                "duration_ms" => {
                    let _ = write!(line, "{:.3}", e.duration.as_secs_f64() * 1000.0);
                }
                "protocol" => json_string(&mut line, e.protocol),
                "listener" => json_string(&mut line, e.listener),
                "direction" => json_string(&mut line, e.direction),
                "method" => opt_str(&mut line, e.method),
                "authority" => opt_str(&mut line, e.authority),
                "path" => opt_str(&mut line, e.path),
                "status" => opt_num(&mut line, e.status.map(u64::from)),
                "grpc_status" => opt_num(&mut line, e.grpc_status.map(u64::from)),
                "request_bytes" => opt_num(&mut line, e.request_bytes),
                "response_bytes" => opt_num(&mut line, e.response_bytes),
                "bytes_received" => opt_num(&mut line, e.bytes_received),
                "bytes_sent" => opt_num(&mut line, e.bytes_sent),
                "route" => opt_str(&mut line, e.route),
                "upstream_cluster" => opt_str(&mut line, e.cluster),
                "upstream_endpoint" => opt_str(&mut line, e.endpoint.map(|a| a.to_string()).as_deref()),
                "attempts" => opt_num(&mut line, e.attempts.map(u64::from)),
                "peer" => opt_str(&mut line, e.peer.map(|a| a.to_string()).as_deref()),
                "peer_identity" => opt_str(&mut line, e.peer_identity),
                "trace_id" => opt_str(&mut line, e.trace_id.map(|t| format!("{t:032x}")).as_deref()),
                "response_flags" => opt_str(&mut line, e.flags),
                _ => line.push_str("null"),
            }
        }
        line.push_str("}\n");
        line
    }
}

/// Where the writer writes.
enum Sink {
    Stdout(std::io::BufWriter<std::io::Stdout>),
    File(LogFile),
}

/// A log file, and which file it is (device and inode), to notice when the path names another.
struct LogFile {
    path: PathBuf,
    out: std::io::BufWriter<std::fs::File>,
    identity: (u64, u64),
    checked: Instant,
}

impl LogFile {
    fn open(path: &Path) -> std::io::Result<LogFile> {
        let file = std::fs::OpenOptions::new().create(true).append(true).open(path)?;
        let metadata = file.metadata()?;
        Ok(LogFile {
            path: path.to_owned(),
            out: std::io::BufWriter::with_capacity(WRITE_BUFFER, file),
            identity: (metadata.dev(), metadata.ino()),
            checked: Instant::now(),
        })
    }

    /// Opens the path afresh if the file there is no longer the one open (moved away or deleted).
    fn follow_rotation(&mut self) {
        if self.checked.elapsed() < ROTATION_CHECK {
            return;
        }
        self.checked = Instant::now();
        let current = std::fs::metadata(&self.path).map(|m| (m.dev(), m.ino())).ok();
        if current == Some(self.identity) {
            return;
        }
        let _ = self.out.flush();
        match LogFile::open(&self.path) {
            Ok(fresh) => {
                *self = fresh;
                tracing::info!(path = %self.path.display(), "access log reopened after rotation");
            }
            Err(error) => tracing::warn!(path = %self.path.display(), %error, "access log: cannot reopen"),
        }
    }
}

impl Sink {
    fn writer(&mut self) -> &mut dyn std::io::Write {
        match self {
            Sink::Stdout(out) => out,
            Sink::File(file) => {
                file.follow_rotation();
                &mut file.out
            }
        }
    }
}

fn write_lines(receiver: Receiver<String>, mut sink: Sink, written: &Counter) {
    while let Ok(line) = receiver.recv() {
        let out = sink.writer();
        let mut lines = 1;
        let mut ok = out.write_all(line.as_bytes()).is_ok();
        while let Ok(line) = receiver.try_recv() {
            ok &= out.write_all(line.as_bytes()).is_ok();
            lines += 1;
        }
        ok &= out.flush().is_ok();
        if ok {
            written.inc_by(lines);
        } else {
            tracing::warn!(lines, "access log: write failed");
        }
    }
}

fn json_string(out: &mut String, value: &str) {
    out.push('"');
    for c in value.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

fn opt_str(out: &mut String, value: Option<&str>) {
    match value {
        Some(value) => json_string(out, value),
        None => out.push_str("null"),
    }
}

fn opt_num(out: &mut String, value: Option<u64>) {
    match value {
        Some(value) => {
            let _ = write!(out, "{value}");
        }
        None => out.push_str("null"),
    }
}

/// `2026-12-01T10:11:12.345Z`.
pub fn rfc3339(time: SystemTime) -> String {
    let since = time.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let (days, rest) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rest / 3600,
        rest / 60 % 60,
        rest % 60,
        since.subsec_millis()
    )
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn timestamps_are_rfc3339_utc() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(UNIX_EPOCH + Duration::from_millis(1_796_123_456_789)), "2026-12-01T11:10:56.789Z");
        assert_eq!(rfc3339(UNIX_EPOCH + Duration::from_secs(951_782_400)), "2000-02-29T00:00:00.000Z");
    }

    #[test]
    fn lines_carry_the_chosen_fields_as_json() {
        let settings =
            AccessLogSettings::new("stdout", &["status".into(), "path".into(), "bytes_sent".into()]).unwrap();
        let (sender, _receiver) = std::sync::mpsc::sync_channel(1);
        let log = AccessLog { sender, fields: settings.fields, success_ratio: 1.0, dropped: Counter::default() };
        let entry = Entry { status: Some(200), path: Some("/a\"b"), bytes_sent: Some(3), ..Entry::default() };
        assert_eq!(log.format(&entry, true), "{\"status\":200,\"path\":\"/a\\\"b\"}\n");
        assert_eq!(log.format(&entry, false), "{\"bytes_sent\":3}\n");
        let error = AccessLogSettings::new("stdout", &["nope".into()]).unwrap_err();
        assert!(error.contains("unknown field \"nope\""), "{error}");
    }

    #[test]
    fn failures_are_always_logged_and_successes_at_the_ratio() {
        let (sender, _receiver) = std::sync::mpsc::sync_channel(1);
        let none = AccessLog { sender, fields: Vec::new(), success_ratio: 0.0, dropped: Counter::default() };
        assert!(!none.wants(200, None, None));
        assert!(!none.wants(404, Some(0), None), "a 4xx is the caller's failure, not the service's");
        assert!(none.wants(503, None, None));
        assert!(none.wants(200, Some(14), None), "gRPC UNAVAILABLE in the trailers");
        assert!(none.wants(429, None, Some("rate_limited")), "an answer the proxy made itself");
        let all = AccessLog { success_ratio: 1.0, ..none };
        assert!(all.wants(200, None, None));
    }

    #[test]
    fn a_rotated_file_is_followed_by_a_new_one_at_the_path() {
        let dir = std::env::temp_dir().join(format!("remora-access-rotate-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("access.log");
        let settings = AccessLogSettings::new(path.to_str().unwrap(), &["status".into()]).unwrap();
        let log = AccessLog::open(&settings, [Counter::default(), Counter::default()]).unwrap();
        let lines = |path: &Path| std::fs::read_to_string(path).unwrap_or_default().lines().count();
        let wait_for = |path: &Path, n: usize| {
            let deadline = Instant::now() + Duration::from_secs(10);
            while lines(path) < n {
                assert!(Instant::now() < deadline, "{} has {} lines, not {n}", path.display(), lines(path));
                std::thread::sleep(Duration::from_millis(10));
            }
        };
        log.write(&Entry { status: Some(200), ..Entry::default() }, true);
        wait_for(&path, 1);
        // logrotate's default: move the file away; the next lines go to a new one at the path.
        let rotated = dir.join("access.log.1");
        std::fs::rename(&path, &rotated).unwrap();
        std::thread::sleep(ROTATION_CHECK + Duration::from_millis(100));
        log.write(&Entry { status: Some(201), ..Entry::default() }, true);
        wait_for(&path, 1);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "{\"status\":201}\n");
        assert_eq!(std::fs::read_to_string(&rotated).unwrap(), "{\"status\":200}\n");
        let _ = std::fs::remove_dir_all(dir);
    }
}

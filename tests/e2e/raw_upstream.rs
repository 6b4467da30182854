//! A hand-written HTTP/1.1 endpoint for the attack tests: it keeps the exact head of every request
//! the proxy forwards (so a test can see what reached the application, smuggled or not) and answers
//! each with bytes the test chooses, well-formed or hostile.
//!
//! Requests are read strictly: a head up to its blank line, then a body framed by `Content-Length`
//! or by chunks. A head carrying both is kept with `ambiguous` set (an application behind the proxy
//! might frame it either way, which is what smuggling needs) and read as chunked, as RFC 9112 says.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

/// One request as the endpoint read it.
#[derive(Clone, Debug)]
pub(crate) struct Seen {
    /// Which accepted connection carried it, counting from 0.
    pub(crate) connection: usize,
    /// The request line and header lines, as sent.
    pub(crate) head: String,
    /// The body, unframed.
    pub(crate) body: Vec<u8>,
    /// The head carried both `Content-Length` and `Transfer-Encoding`.
    pub(crate) ambiguous: bool,
}

/// What the endpoint sends back for one request.
pub(crate) enum Answer {
    /// These bytes, and the connection stays open for the next request.
    Bytes(Vec<u8>),
    /// These bytes, then the connection is closed.
    ThenClose(Vec<u8>),
    /// `first`, then `repeat` again and again until the proxy closes the connection, or until
    /// more is sent than every socket buffer between could hold, which means the proxy kept
    /// reading (see [`RawUpstream::endless`]).
    Endless { first: Vec<u8>, repeat: Vec<u8> },
}

/// Chooses the answer from the request line (e.g. `GET /ok HTTP/1.1`).
pub(crate) type Responder = Arc<dyn Fn(&str) -> Answer + Send + Sync>;

/// An endpoint on `127.0.0.1:0` answering as its [`Responder`] says.
pub(crate) struct RawUpstream {
    address: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    endless: Arc<Mutex<Vec<(String, Ended)>>>,
    task: tokio::task::JoinHandle<()>,
}

/// How an `Endless` answer ended.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Ended {
    /// The proxy closed the connection.
    Closed,
    /// More was sent than the kernel's largest send and receive buffers together, plus 16 MiB:
    /// the proxy kept reading.
    Read,
}

impl RawUpstream {
    pub(crate) async fn start(responder: Responder) -> RawUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let endless = Arc::new(Mutex::new(Vec::new()));
        let connections = Arc::new(AtomicUsize::new(0));
        let (record, count) = (seen.clone(), endless.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { continue };
                let connection = connections.fetch_add(1, Ordering::SeqCst);
                let (responder, record, count) = (responder.clone(), record.clone(), count.clone());
                tokio::spawn(serve(stream, connection, responder, record, count));
            }
        });
        RawUpstream { address, seen, endless, task }
    }

    pub(crate) fn address(&self) -> SocketAddr {
        self.address
    }

    /// Every request read so far.
    pub(crate) fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    /// The request lines of the `Endless` answers that have ended, and how each ended.
    pub(crate) fn endless(&self) -> Vec<(String, Ended)> {
        self.endless.lock().unwrap().clone()
    }
}

impl Drop for RawUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(
    stream: TcpStream,
    connection: usize,
    responder: Responder,
    record: Arc<Mutex<Vec<Seen>>>,
    endless: Arc<Mutex<Vec<(String, Ended)>>>,
) {
    let mut stream = BufReader::new(stream);
    while let Some(seen) = read_request(&mut stream, connection).await {
        let line = seen.head.lines().next().unwrap_or_default().to_owned();
        record.lock().unwrap().push(seen);
        let writer = stream.get_mut();
        match responder(&line) {
            Answer::Bytes(bytes) => {
                if writer.write_all(&bytes).await.is_err() {
                    return;
                }
            }
            Answer::ThenClose(bytes) => {
                let _ = writer.write_all(&bytes).await;
                return;
            }
            Answer::Endless { first, repeat } => {
                let cap = kernel_buffer_max("tcp_wmem") + kernel_buffer_max("tcp_rmem") + (16 << 20);
                let block = repeat.repeat((16_384 / repeat.len()).max(1));
                let mut sent = 0;
                let mut result = writer.write_all(&first).await;
                while result.is_ok() && sent < cap {
                    result = writer.write_all(&block).await;
                    sent += block.len() as u64;
                }
                let ended = if result.is_ok() { Ended::Read } else { Ended::Closed };
                endless.lock().unwrap().push((line, ended));
                return;
            }
        }
    }
}

/// The most the kernel grows a TCP socket's buffer to (`net.ipv4.tcp_wmem` or `tcp_rmem`'s third
/// field).
pub(crate) fn kernel_buffer_max(name: &str) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/sys/net/ipv4/{name}")).unwrap();
    text.split_whitespace().nth(2).unwrap().parse().unwrap()
}

/// Reads one request, or `None` at the end of the connection or on anything it cannot frame.
async fn read_request(stream: &mut BufReader<TcpStream>, connection: usize) -> Option<Seen> {
    let mut head = String::new();
    loop {
        let mut line = String::new();
        if stream.read_line(&mut line).await.ok()? == 0 {
            return None;
        }
        if line == "\r\n" {
            break;
        }
        head.push_str(&line);
    }
    let field = |name: &str| {
        head.lines().skip(1).find_map(|line| {
            let (key, value) = line.split_once(':')?;
            key.eq_ignore_ascii_case(name).then(|| value.trim().to_owned())
        })
    };
    let (length, encoding) = (field("content-length"), field("transfer-encoding"));
    let ambiguous = length.is_some() && encoding.is_some();
    let mut body = Vec::new();
    if encoding.is_some_and(|e| e.eq_ignore_ascii_case("chunked")) {
        loop {
            let mut size = String::new();
            stream.read_line(&mut size).await.ok()?;
            let size = usize::from_str_radix(size.trim_end().split(';').next()?, 16).ok()?;
            if size == 0 {
                // Trailers, to the blank line.
                loop {
                    let mut line = String::new();
                    if stream.read_line(&mut line).await.ok()? == 0 || line == "\r\n" {
                        break;
                    }
                }
                break;
            }
            let at = body.len();
            body.resize(at + size + 2, 0);
            stream.read_exact(&mut body[at..]).await.ok()?;
            body.truncate(at + size);
        }
    } else if let Some(length) = length {
        body.resize(length.parse().ok()?, 0);
        stream.read_exact(&mut body).await.ok()?;
    }
    Some(Seen { connection, head, body, ambiguous })
}

/// A complete response with a `Content-Length` body.
pub(crate) fn ok(body: &str) -> Vec<u8> {
    format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}", body.len()).into_bytes()
}

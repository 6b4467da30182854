//! A test client: one HTTP/1.1 or HTTP/2 connection, requests sent on it, replies read whole.

use std::net::SocketAddr;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;

use crate::testing::servers::{TestBody, full};

enum Sender {
    Http1(http1::SendRequest<TestBody>),
    Http2(http2::SendRequest<TestBody>),
}

/// One client connection.
pub struct Client {
    sender: Sender,
}

/// A response read whole.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub trailers: Option<HeaderMap>,
}

impl Reply {
    /// A header's value as text ("" when absent).
    pub fn header(&self, name: &str) -> &str {
        self.headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or("")
    }

    /// The body as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

impl Client {
    /// Opens an HTTP/1.1 connection to `address`.
    pub async fn http1(address: SocketAddr) -> Client {
        let stream = TcpStream::connect(address).await.unwrap();
        let (sender, connection) = http1::handshake(TokioIo::new(stream)).await.unwrap();
        tokio::spawn(connection.with_upgrades());
        Client { sender: Sender::Http1(sender) }
    }

    /// Opens an HTTP/2 (prior knowledge) connection to `address`.
    pub async fn http2(address: SocketAddr) -> Client {
        let stream = TcpStream::connect(address).await.unwrap();
        let (sender, connection) = http2::handshake(TokioExecutor::new(), TokioIo::new(stream)).await.unwrap();
        tokio::spawn(connection);
        Client { sender: Sender::Http2(sender) }
    }

    /// Sends a request (for HTTP/1.1 give it a `Host` header; for HTTP/2 an absolute URI).
    pub async fn send(&mut self, request: Request<TestBody>) -> Result<Response<Incoming>, hyper::Error> {
        match &mut self.sender {
            Sender::Http1(sender) => {
                sender.ready().await?;
                sender.send_request(request).await
            }
            Sender::Http2(sender) => {
                sender.ready().await?;
                sender.send_request(request).await
            }
        }
    }

    /// Whether the connection has closed (the server ended it, or it failed).
    pub fn is_closed(&self) -> bool {
        match &self.sender {
            Sender::Http1(sender) => sender.is_closed(),
            Sender::Http2(sender) => sender.is_closed(),
        }
    }

    /// A request for `path` on `host`, in the form this connection's version wants.
    pub fn request(&self, method: Method, host: &str, path: &str) -> http::request::Builder {
        match self.sender {
            Sender::Http1(_) => Request::builder().method(method).uri(path).header("host", host),
            Sender::Http2(_) => Request::builder().method(method).uri(format!("http://{host}{path}")),
        }
    }

    /// `GET path` on `host`, read whole.
    pub async fn get(&mut self, host: &str, path: &str) -> Reply {
        let request = self.request(Method::GET, host, path).body(full(Bytes::new())).unwrap();
        let response = self.send(request).await.unwrap();
        read(response).await
    }
}

/// Reads a response whole, trailers included.
pub async fn read(response: Response<Incoming>) -> Reply {
    let (parts, body) = response.into_parts();
    let collected = body.collect().await.unwrap();
    let trailers = collected.trailers().cloned();
    Reply { status: parts.status, headers: parts.headers, body: collected.to_bytes(), trailers }
}

//! The HTTP client the OTLP/HTTP exporter sends its batches with: HTTP/1.1 to the collector,
//! plaintext for an `http://` endpoint, TLS 1.3 checked against `tracing.ca_file` for `https://`.
//!
//! The exporter hands [`CollectorClient::send_bytes`] one request per batch (a protobuf body, the
//! collector's full URL); the client sends it on its one kept-alive connection, opening a new one
//! (TCP, then TLS to the URL's host) when there is none or the last one failed, and returns the
//! collector's whole answer, its body capped at 4 MiB. Each send is bounded by the export timeout,
//! connecting included, so a collector that accepts and never answers costs one batch, not a stuck
//! exporter. Batches go one at a time (the exporter thread sends them in turn), so one connection
//! is all it needs.

use std::time::Duration;

use bytes::Bytes;
use http::header::HOST;
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{HeaderValue, Request, Response, Uri};
use http_body_util::{BodyExt, Full, Limited};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use opentelemetry_http::{HttpClient, HttpError};
use remora_control_api::grpc::ControlTls;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio::sync::Mutex;

/// The most of a collector's answer that is read (its body is a small status message).
const MAX_ANSWER: usize = 4 * 1024 * 1024;

/// An HTTP/1.1 client of one OTLP collector.
pub(crate) struct CollectorClient {
    /// How `https://` endpoints are checked; `None` sends `https://` nowhere (refused).
    tls: Option<tokio_rustls::TlsConnector>,
    timeout: Duration,
    /// The kept-alive connection, and the authority it was opened to.
    connection: Mutex<Option<(Authority, SendRequest<Full<Bytes>>)>>,
}

impl std::fmt::Debug for CollectorClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CollectorClient").field("tls", &self.tls.is_some()).field("timeout", &self.timeout).finish()
    }
}

impl CollectorClient {
    /// A client that checks `https://` collectors with `tls`, each send within `timeout`.
    pub(crate) fn new(tls: Option<&ControlTls>, timeout: Duration) -> CollectorClient {
        CollectorClient {
            tls: tls.map(|tls| tokio_rustls::TlsConnector::from(tls.http1_config())),
            timeout,
            connection: Mutex::new(None),
        }
    }

    async fn send(&self, request: Request<Bytes>) -> Result<Response<Bytes>, HttpError> {
        let (mut parts, body) = request.into_parts();
        let uri = std::mem::take(&mut parts.uri);
        let authority = uri.authority().cloned().ok_or("the collector's URL has no host")?;
        let https = uri.scheme() == Some(&Scheme::HTTPS);
        // Origin form on the wire, the authority in `Host`.
        parts.uri = Uri::from(uri.path_and_query().cloned().unwrap_or_else(|| PathAndQuery::from_static("/")));
        parts.headers.insert(HOST, HeaderValue::from_str(authority.as_str())?);
        let request = Request::from_parts(parts, Full::new(body));

        let mut kept = self.connection.lock().await;
        let mut sender = match kept.take().filter(|(to, sender)| *to == authority && !sender.is_closed()) {
            Some((_, mut sender)) => match sender.ready().await {
                Ok(()) => sender,
                Err(_) => self.connect(&authority, https).await?,
            },
            None => self.connect(&authority, https).await?,
        };
        let response = sender.send_request(request).await?;
        let (parts, body) = response.into_parts();
        let body = Limited::new(body, MAX_ANSWER).collect().await?.to_bytes();
        *kept = Some((authority, sender));
        Ok(Response::from_parts(parts, body))
    }

    /// Opens a connection to `authority`: TCP, then TLS when `https`, then an HTTP/1.1 handshake.
    async fn connect(&self, authority: &Authority, https: bool) -> Result<SendRequest<Full<Bytes>>, HttpError> {
        let host = authority.host().trim_start_matches('[').trim_end_matches(']');
        let port = authority.port_u16().unwrap_or(if https { 443 } else { 80 });
        let tcp = TcpStream::connect((host, port)).await?;
        tcp.set_nodelay(true)?;
        if !https {
            return handshake(tcp).await;
        }
        let tls = self.tls.as_ref().ok_or("an https:// collector and no ca_file to check it with")?;
        let name = ServerName::try_from(host.to_owned())?;
        handshake(tls.connect(name, tcp).await?).await
    }
}

async fn handshake<T>(io: T) -> Result<SendRequest<Full<Bytes>>, HttpError>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
{
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(io)).await?;
    // The connection ends when the sender is dropped or the collector closes it.
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            tracing::debug!(%error, "collector connection ended");
        }
    });
    Ok(sender)
}

#[async_trait::async_trait]
impl HttpClient for CollectorClient {
    async fn send_bytes(&self, request: Request<Bytes>) -> Result<Response<Bytes>, HttpError> {
        match tokio::time::timeout(self.timeout, self.send(request)).await {
            Ok(result) => result,
            Err(_) => Err(format!("no answer from the collector within {:?}", self.timeout).into()),
        }
    }
}

//! The request head as the HTTP/1.1 client writes it: the request line, the fields (hop-by-hop ones
//! already gone), the framing this client chooses, and any fields an attempt adds after the rest.
//!
//! [`Head`] is what the client reads of a head: a request's own `Parts`, or a head kept for several
//! attempts and read in place. [`encode_head`] writes it into the connection's reused buffer:
//! `content-length` when the body's size is known, chunked otherwise ([`request_framing`]);
//! `Expect` dropped (the downstream server answered `100 Continue` itself); a missing `Host` filled
//! with the endpoint's address.

use std::fmt::Write as _;
use std::net::SocketAddr;

use bytes::BytesMut;
use http::header::{CONTENT_LENGTH, EXPECT, HOST, TRANSFER_ENCODING};
use http::{HeaderMap, Method};

/// How a message body is framed on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Framing {
    /// No body.
    Empty,
    /// `Content-Length: n`.
    Length(u64),
    /// `Transfer-Encoding: chunked`.
    Chunked,
}

/// What the client reads of a request head: the request line and the headers. A request's own
/// `Parts`, or a reference to a head kept for several attempts (a retried request's), which then
/// need not be copied for each.
pub trait Head {
    /// The method.
    fn method(&self) -> &Method;
    /// The target (origin form).
    fn uri(&self) -> &http::Uri;
    /// The header fields, hop-by-hop ones removed.
    fn headers(&self) -> &HeaderMap;
    /// Writes fields after `headers` (an attempt's own trace context) with [`write_field`].
    fn write_extra(&self, _out: &mut BytesMut) {}
}

/// Writes one `name: value` field line.
pub(crate) fn write_field(out: &mut BytesMut, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

impl Head for http::request::Parts {
    fn method(&self) -> &Method {
        &self.method
    }

    fn uri(&self) -> &http::Uri {
        &self.uri
    }

    fn headers(&self) -> &HeaderMap {
        &self.headers
    }
}

impl<T: Head + ?Sized> Head for &T {
    fn method(&self) -> &Method {
        (**self).method()
    }

    fn uri(&self) -> &http::Uri {
        (**self).uri()
    }

    fn headers(&self) -> &HeaderMap {
        (**self).headers()
    }

    fn write_extra(&self, out: &mut BytesMut) {
        (**self).write_extra(out);
    }
}

/// How the request body will be framed.
pub(super) fn request_framing<B: http_body::Body>(headers: &HeaderMap, body: &B) -> Framing {
    if body.is_end_stream() {
        // A POST with `Content-Length: 0` keeps saying so; a GET says nothing.
        if headers.contains_key(CONTENT_LENGTH) { Framing::Length(0) } else { Framing::Empty }
    } else {
        match body.size_hint().exact() {
            Some(length) => Framing::Length(length),
            None => Framing::Chunked,
        }
    }
}

/// Writes the request line and headers into `out`.
pub(super) fn encode_head(request: &impl Head, framing: Framing, endpoint: SocketAddr, out: &mut BytesMut) {
    let (method, uri, headers) = (request.method(), request.uri(), request.headers());
    out.clear();
    out.extend_from_slice(method.as_str().as_bytes());
    out.extend_from_slice(b" ");
    let target = uri.path_and_query().map_or("/", |pq| pq.as_str());
    out.extend_from_slice(if target.is_empty() { b"/" } else { target.as_bytes() });
    out.extend_from_slice(b" HTTP/1.1\r\n");
    if !headers.contains_key(HOST) {
        // Writing into a BytesMut cannot fail.
        let _ = write!(out, "host: {endpoint}\r\n");
    }
    for (name, value) in headers {
        // Framing is ours to write; `Expect: 100-continue` was answered downstream already.
        if name == CONTENT_LENGTH || name == TRANSFER_ENCODING || name == EXPECT {
            continue;
        }
        write_field(out, name.as_str().as_bytes(), value.as_bytes());
    }
    request.write_extra(out);
    match framing {
        Framing::Empty => {}
        Framing::Length(length) => {
            let _ = write!(out, "content-length: {length}\r\n");
        }
        Framing::Chunked => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
    }
    out.extend_from_slice(b"\r\n");
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use bytes::Bytes;
    use http_body_util::{BodyExt, Empty, Full, StreamBody};

    use super::*;

    fn parts(request: http::Request<()>) -> http::request::Parts {
        request.into_parts().0
    }

    fn encoded(head: &impl Head, framing: Framing) -> String {
        let mut out = BytesMut::from(&b"left over from the last request"[..]);
        encode_head(head, framing, "10.0.0.1:8080".parse().unwrap(), &mut out);
        String::from_utf8(out.to_vec()).unwrap()
    }

    /// The request line and fields go out as they are, with the framing this client chose in place
    /// of the client's, `Expect` dropped, and `Host` filled in when the request had none.
    #[test]
    fn heads_are_written_with_the_framing_chosen_here() {
        let request = http::Request::post("/cart?id=7")
            .header("content-length", "999")
            .header("transfer-encoding", "chunked")
            .header("expect", "100-continue")
            .header("x-kept", "yes")
            .body(())
            .unwrap();
        assert_eq!(
            encoded(&parts(request), Framing::Length(3)),
            "POST /cart?id=7 HTTP/1.1\r\nhost: 10.0.0.1:8080\r\nx-kept: yes\r\ncontent-length: 3\r\n\r\n"
        );
        let request = http::Request::get("/").header("host", "shop").body(()).unwrap();
        assert_eq!(
            encoded(&parts(request), Framing::Chunked),
            "GET / HTTP/1.1\r\nhost: shop\r\ntransfer-encoding: chunked\r\n\r\n"
        );
        let absolute = http::Request::get("http://shop").header("host", "shop").body(()).unwrap();
        assert_eq!(encoded(&parts(absolute), Framing::Empty), "GET / HTTP/1.1\r\nhost: shop\r\n\r\n");
    }

    /// An attempt's own fields (its trace context) come after the kept head's.
    #[test]
    fn extra_fields_follow_the_heads_own() {
        struct Traced(http::request::Parts);
        impl Head for Traced {
            fn method(&self) -> &Method {
                &self.0.method
            }
            fn uri(&self) -> &http::Uri {
                &self.0.uri
            }
            fn headers(&self) -> &HeaderMap {
                &self.0.headers
            }
            fn write_extra(&self, out: &mut BytesMut) {
                write_field(out, b"traceparent", b"00-abc-def-01");
            }
        }
        let request = http::Request::get("/").header("host", "shop").body(()).unwrap();
        assert_eq!(
            encoded(&Traced(parts(request)), Framing::Empty),
            "GET / HTTP/1.1\r\nhost: shop\r\ntraceparent: 00-abc-def-01\r\n\r\n"
        );
    }

    /// A body of known size is length-framed, one of unknown size chunked; an empty one has no
    /// framing, unless the client said `Content-Length: 0`.
    #[test]
    fn the_framing_follows_what_is_known_of_the_body() {
        let none = HeaderMap::new();
        let mut zero = HeaderMap::new();
        zero.insert(CONTENT_LENGTH, "0".parse().unwrap());
        assert_eq!(request_framing(&none, &Empty::<Bytes>::new()), Framing::Empty);
        assert_eq!(request_framing(&zero, &Empty::<Bytes>::new()), Framing::Length(0));
        assert_eq!(request_framing(&none, &Full::new(Bytes::from_static(b"abc"))), Framing::Length(3));
        let stream = futures_util::stream::iter([Ok::<_, std::convert::Infallible>(http_body::Frame::data(
            Bytes::from_static(b"abc"),
        ))]);
        assert_eq!(request_framing(&none, &StreamBody::new(stream).boxed()), Framing::Chunked);
    }
}

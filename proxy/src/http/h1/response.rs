//! The response head: read until a final one is complete (interim 1xx skipped, a `101` final),
//! parsed strictly (RFC 9112 §4–§6), its hop-by-hop fields read and left out, and its body's
//! framing decided (RFC 9112 §6.3).
//!
//! Header values share the read buffer's memory (no copy). A response with both `Transfer-Encoding`
//! and `Content-Length` is a smuggling shape: the encoding wins, the length goes, and the connection
//! is not reused after it.

use std::mem::MaybeUninit;
use std::task::{Context, Poll, ready};

use bytes::{Bytes, BytesMut};
use http::header::{CONNECTION, CONTENT_LENGTH, HeaderName, HeaderValue, TE, TRANSFER_ENCODING, UPGRADE};
use http::{HeaderMap, StatusCode, Version};

use super::decode::{Chunk, Decoder};
use super::{Connection, Error, MAX_HEADERS};
use crate::limits;

static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// Offsets of one header's name and value within a response head.
#[derive(Clone, Copy, Debug)]
pub(super) struct Field {
    name: (usize, usize),
    value: (usize, usize),
}

/// A parsed response head, hop-by-hop headers already left out.
#[derive(Debug)]
pub(super) struct ResponseHead {
    pub(super) status: StatusCode,
    pub(super) version: Version,
    pub(super) headers: HeaderMap,
    pub(super) keep_alive: bool,
    /// `Some(true)` if `Transfer-Encoding` ends in `chunked`, `Some(false)` for any other coding.
    transfer_encoding: Option<bool>,
    /// The `Content-Length`, if one was given.
    content_length: Option<u64>,
}

impl ResponseHead {
    /// How the body is delimited (RFC 9112 §6.3).
    pub(super) fn framing(&self, head_request: bool) -> Result<Decoder, Error> {
        let status = self.status;
        if head_request
            || status.is_informational()
            || status == StatusCode::NO_CONTENT
            || status == StatusCode::NOT_MODIFIED
        {
            return Ok(Decoder::Done);
        }
        Ok(match (self.transfer_encoding, self.content_length) {
            // Transfer-Encoding wins over Content-Length; anything but chunked runs until close.
            (Some(true), _) => Decoder::Chunked(Chunk::Size),
            (Some(false), _) => Decoder::Eof,
            (None, Some(0)) => Decoder::Done,
            (None, Some(n)) => Decoder::Length(n),
            (None, None) => Decoder::Eof,
        })
    }
}

/// Reads until a final (non-1xx, or 101) response head is complete, and parses it.
///
/// A head larger than [`limits::MAX_HEADER_BYTES`] is refused whether it arrived in one read or in
/// many. `interim` counts the bytes of interim heads skipped so far (the caller keeps it across
/// polls): they and the final head together get that limit, so an endpoint that answers 1xx after
/// 1xx is cut off as one that sends an endless head is.
pub(super) fn poll_response_head(
    connection: &mut Connection,
    interim: &mut usize,
    cx: &mut Context<'_>,
) -> Poll<Result<ResponseHead, Error>> {
    loop {
        if !connection.read.is_empty() {
            let before = connection.read.len();
            let parsed = parse_response_head(&mut connection.read, &mut connection.fields)?;
            // However the head arrived (in one read or many), its size counts.
            let size = *interim + before - connection.read.len();
            match parsed {
                Some(_) if size > limits::MAX_HEADER_BYTES => {
                    return Poll::Ready(Err(Error::Protocol("response head too large")));
                }
                Some(head) if head.status.is_informational() && head.status != StatusCode::SWITCHING_PROTOCOLS => {
                    // 100 Continue, 103 Early Hints: not the answer; keep reading.
                    *interim = size;
                    continue;
                }
                Some(head) => return Poll::Ready(Ok(head)),
                None if *interim + connection.read.len() > limits::MAX_HEADER_BYTES => {
                    return Poll::Ready(Err(Error::Protocol("response head too large")));
                }
                None => {}
            }
        }
        match ready!(connection.poll_fill(cx)) {
            Ok(0) => return Poll::Ready(Err(Error::Closed)),
            Ok(_) => {}
            Err(e) => return Poll::Ready(Err(Error::Io(e))),
        }
    }
}

/// A header value as httparse accepted it, sharing the head's memory.
#[allow(unsafe_code)]
fn parsed_value(bytes: Bytes) -> HeaderValue {
    // SAFETY: httparse accepts in a field value exactly the bytes a `HeaderValue` may hold (HTAB,
    // 0x20-0x7E, 0x80-0xFF), as hyper relies on too; checking each byte again cost about 260
    // instructions per response (callgrind). Builds with debug assertions (the tests, the
    // differential test against hyper, the fuzzers) still check, and panic on a disagreement.
    unsafe { HeaderValue::from_maybe_shared_unchecked(bytes) }
}

/// Parses a complete head at the start of `buffer` and consumes it; `None` if incomplete.
///
/// Header values share the buffer's memory (no copy); `fields` is scratch space for their offsets.
pub(super) fn parse_response_head(
    buffer: &mut BytesMut,
    fields: &mut Vec<Field>,
) -> Result<Option<ResponseHead>, Error> {
    // Uninitialised slots: zeroing 128 of them per response is a measurable cost.
    let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut response = httparse::Response::new(&mut []);
    // The default configuration is the strict one: no obsolete line folding, no spaces before colons.
    let length =
        match httparse::ParserConfig::default().parse_response_with_uninit_headers(&mut response, buffer, &mut slots) {
            Ok(httparse::Status::Complete(length)) => length,
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(httparse::Error::TooManyHeaders) => return Err(Error::Protocol("too many response headers")),
            Err(_) => return Err(Error::Protocol("malformed response head")),
        };
    let code = response.code.ok_or(Error::Protocol("malformed status line"))?;
    let status = StatusCode::from_u16(code).map_err(|_| Error::Protocol("invalid status code"))?;
    let version = if response.version == Some(0) { Version::HTTP_10 } else { Version::HTTP_11 };
    let base = buffer.as_ptr() as usize;
    fields.clear();
    fields.extend(response.headers.iter().map(|header| Field {
        name: (header.name.as_ptr() as usize - base, header.name.len()),
        value: (header.value.as_ptr() as usize - base, header.value.len()),
    }));
    let head = buffer.split_to(length).freeze();
    let mut parsed = ResponseHead {
        status,
        version,
        headers: HeaderMap::with_capacity(fields.len()),
        keep_alive: version == Version::HTTP_11,
        transfer_encoding: None,
        content_length: None,
    };
    let mut connection_names = false;
    for field in fields.iter() {
        let (name_at, name_len) = field.name;
        let (value_at, value_len) = field.value;
        let name = HeaderName::from_bytes(&head[name_at..name_at + name_len])
            .map_err(|_| Error::Protocol("invalid header name"))?;
        let value = parsed_value(head.slice(value_at..value_at + value_len));
        // Hop-by-hop headers describe this connection only: they are read here and not kept, so the
        // response needs no cleaning later.
        if name == CONNECTION {
            for token in value.as_bytes().split(|b| *b == b',').map(<[u8]>::trim_ascii) {
                if token.eq_ignore_ascii_case(b"close") {
                    parsed.keep_alive = false;
                } else if token.eq_ignore_ascii_case(b"keep-alive") {
                    parsed.keep_alive |= version == Version::HTTP_10;
                } else if !token.eq_ignore_ascii_case(b"upgrade") {
                    connection_names = true;
                }
            }
            continue;
        }
        if name == TRANSFER_ENCODING {
            let last = value.as_bytes().rsplit(|b| *b == b',').next().map(<[u8]>::trim_ascii);
            parsed.transfer_encoding = Some(last.is_some_and(|t| t.eq_ignore_ascii_case(b"chunked")));
            continue;
        }
        if name == CONTENT_LENGTH {
            for part in value.as_bytes().split(|b| *b == b',').map(<[u8]>::trim_ascii) {
                let length = parse_decimal(part).ok_or(Error::Protocol("invalid Content-Length"))?;
                if parsed.content_length.is_some_and(|l| l != length) {
                    return Err(Error::Protocol("conflicting Content-Length values"));
                }
                parsed.content_length = Some(length);
            }
        } else if name == KEEP_ALIVE
            || name == PROXY_CONNECTION
            || name == TE
            || (name == UPGRADE && status != StatusCode::SWITCHING_PROTOCOLS)
        {
            continue;
        }
        parsed.headers.append(name, value);
    }
    if parsed.transfer_encoding.is_some() {
        // A response with both is a smuggling risk: Transfer-Encoding wins, the length goes, and
        // the connection closes after it (RFC 9112 §6.3).
        parsed.headers.remove(CONTENT_LENGTH);
        if parsed.content_length.take().is_some() {
            parsed.keep_alive = false;
        }
    }
    if connection_names {
        // Rare: the headers `Connection` names are hop-by-hop too.
        remove_connection_named(&head, fields, &mut parsed.headers);
    }
    Ok(Some(parsed))
}

/// Removes the headers named in `Connection` (other than the standard tokens).
fn remove_connection_named(head: &Bytes, fields: &[Field], headers: &mut HeaderMap) {
    for field in fields {
        let (name_at, name_len) = field.name;
        if !head[name_at..name_at + name_len].eq_ignore_ascii_case(b"connection") {
            continue;
        }
        let (value_at, value_len) = field.value;
        for token in head[value_at..value_at + value_len].split(|b| *b == b',').map(<[u8]>::trim_ascii) {
            if let Ok(name) = HeaderName::from_bytes(token) {
                headers.remove(name);
            }
        }
    }
}

/// A non-empty run of ASCII digits as a number (no sign, no spaces, no overflow).
fn parse_decimal(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() || digits.len() > 19 {
        return None;
    }
    digits.iter().try_fold(0_u64, |n, d| d.is_ascii_digit().then(|| n * 10 + u64::from(d - b'0')))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn parse(text: &str) -> Result<Option<ResponseHead>, Error> {
        let mut buffer = BytesMut::from(text.as_bytes());
        parse_response_head(&mut buffer, &mut Vec::new())
    }

    fn head(text: &str) -> ResponseHead {
        parse(text).unwrap().unwrap()
    }

    /// A complete head is consumed from the buffer, the body's bytes left behind; an incomplete
    /// one is not an answer yet.
    #[test]
    fn a_complete_head_is_consumed_and_a_partial_one_waits() {
        let mut buffer = BytesMut::from(&b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\nx-a: 1\r\n\r\nhello"[..]);
        let parsed = parse_response_head(&mut buffer, &mut Vec::new()).unwrap().unwrap();
        assert_eq!(parsed.status, StatusCode::OK);
        assert_eq!(parsed.headers["x-a"], "1");
        assert_eq!(parsed.framing(false).unwrap(), Decoder::Length(5));
        assert_eq!(&buffer[..], b"hello");
        assert!(parse("HTTP/1.1 200 OK\r\ncontent-len").unwrap().is_none());
    }

    /// Keep-alive is HTTP/1.1's default and HTTP/1.0's exception; `Connection: close` ends it.
    #[test]
    fn keep_alive_follows_the_version_and_connection_tokens() {
        assert!(head("HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n").keep_alive);
        assert!(!head("HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 0\r\n\r\n").keep_alive);
        assert!(!head("HTTP/1.0 200 OK\r\ncontent-length: 0\r\n\r\n").keep_alive);
        assert!(head("HTTP/1.0 200 OK\r\nconnection: keep-alive\r\ncontent-length: 0\r\n\r\n").keep_alive);
    }

    /// The body's framing, RFC 9112 §6.3: chunked wins, another coding runs until close, a length
    /// counts down, and some responses have no body whatever they say.
    #[test]
    fn the_body_is_framed_as_rfc_9112_says() {
        let framing = |text: &str, head_request: bool| head(text).framing(head_request).unwrap();
        assert_eq!(
            framing("HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\n\r\n", false),
            Decoder::Chunked(Chunk::Size)
        );
        assert_eq!(framing("HTTP/1.1 200 OK\r\ntransfer-encoding: gzip\r\n\r\n", false), Decoder::Eof);
        assert_eq!(framing("HTTP/1.1 200 OK\r\n\r\n", false), Decoder::Eof);
        assert_eq!(framing("HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n", false), Decoder::Done);
        assert_eq!(framing("HTTP/1.1 204 No Content\r\ncontent-length: 9\r\n\r\n", false), Decoder::Done);
        assert_eq!(framing("HTTP/1.1 304 Not Modified\r\n\r\n", false), Decoder::Done);
        assert_eq!(framing("HTTP/1.1 200 OK\r\ncontent-length: 9\r\n\r\n", true), Decoder::Done);
    }

    /// Hop-by-hop fields are read and left out, with any the `Connection` field names.
    #[test]
    fn hop_by_hop_fields_are_left_out() {
        let parsed = head(
            "HTTP/1.1 200 OK\r\nconnection: x-private, keep-alive\r\nkeep-alive: timeout=5\r\nx-private: 1\r\nproxy-connection: close\r\nte: trailers\r\nupgrade: h2c\r\nx-kept: 1\r\ncontent-length: 0\r\n\r\n",
        );
        let mut names: Vec<&str> = parsed.headers.keys().map(HeaderName::as_str).collect();
        names.sort_unstable();
        assert_eq!(names, ["content-length", "x-kept"]);
    }

    /// Shapes that could desynchronise a reused connection are refused or defused: conflicting
    /// lengths, a length next to an encoding, folded lines, a space before the colon, bad numbers.
    #[test]
    fn smuggling_shapes_are_refused_or_defused() {
        assert!(parse("HTTP/1.1 200 OK\r\ncontent-length: 5\r\ncontent-length: 6\r\n\r\n").is_err());
        assert!(parse("HTTP/1.1 200 OK\r\ncontent-length: 5, 6\r\n\r\n").is_err());
        assert_eq!(head("HTTP/1.1 200 OK\r\ncontent-length: 5, 5\r\n\r\n").framing(false).unwrap(), Decoder::Length(5));
        assert!(parse("HTTP/1.1 200 OK\r\ncontent-length: -1\r\n\r\n").is_err());
        assert!(parse("HTTP/1.1 200 OK\r\ncontent-length: 99999999999999999999\r\n\r\n").is_err());
        let both = head("HTTP/1.1 200 OK\r\ncontent-length: 5\r\ntransfer-encoding: chunked\r\n\r\n");
        assert!(!both.keep_alive, "a response with both never leaves its connection reusable");
        assert!(both.headers.get(CONTENT_LENGTH).is_none());
        assert_eq!(both.framing(false).unwrap(), Decoder::Chunked(Chunk::Size));
        assert!(parse("HTTP/1.1 200 OK\r\nx-a: 1\r\n folded\r\n\r\n").is_err());
        assert!(parse("HTTP/1.1 200 OK\r\nx-a : 1\r\n\r\n").is_err());
        assert!(parse("HTTP/1.1 2000 OK\r\n\r\n").is_err());
        let many: String = (0..MAX_HEADERS + 1).map(|i| format!("x-{i}: 1\r\n")).collect();
        assert!(parse(&format!("HTTP/1.1 200 OK\r\n{many}\r\n")).is_err());
    }
}

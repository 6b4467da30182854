//! Protocol detection: what a new connection speaks, from its first bytes.
//!
//! [`detect`] runs once per connection on `auto` listeners, before anything else reads the socket. It
//! peeks (the bytes stay in the kernel) and classifies them with [`classify`]: an HTTP/2 preface, an
//! HTTP/1 request line, a TLS ClientHello, or anything else. Only when the first packet is too short
//! to decide does it read bytes out, and then it hands them back as a replay prefix for whoever
//! serves the connection. A client that sends nothing within the detect timeout is treated as opaque
//! TCP: server-speaks-first protocols (MySQL, SMTP) work, after that delay. [`detect_read`] does
//! the same for a stream that cannot be peeked at (a tunnel), reading what it looks at.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::limits;

/// The HTTP/2 connection preface (RFC 9113 §3.4).
pub const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Longest method token accepted as the start of an HTTP/1 request line. The registered methods are
/// at most 17 bytes (`BASELINE-CONTROL`), so 20 leaves room without accepting arbitrary words.
const MAX_METHOD_LEN: usize = 20;

/// What a connection speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    /// An HTTP/1.x request line.
    Http1,
    /// The HTTP/2 prior-knowledge preface.
    Http2,
    /// A TLS record carrying a handshake (a ClientHello). Forwarded as opaque TCP until the proxy
    /// terminates TLS itself.
    Tls,
    /// Anything else, or nothing before the timeout.
    Opaque,
}

/// Classifies the first bytes of a connection, or returns `None` if more bytes are needed to decide.
pub fn classify(bytes: &[u8]) -> Option<Protocol> {
    let first = *bytes.first()?;
    if first == 0x16 {
        // TLS record: content type 22 (handshake), then a major version of 3.
        return match bytes.get(1) {
            None => None,
            Some(0x03) => Some(Protocol::Tls),
            Some(_) => Some(Protocol::Opaque),
        };
    }
    let common = bytes.len().min(H2_PREFACE.len());
    if bytes[..common] == H2_PREFACE[..common] {
        return if bytes.len() >= H2_PREFACE.len() { Some(Protocol::Http2) } else { None };
    }
    // An HTTP/1 request line starts with a method token (upper-case letters by convention, and in
    // every method registered with IANA), then a space.
    for (i, &byte) in bytes.iter().enumerate().take(MAX_METHOD_LEN + 1) {
        match byte {
            b' ' if i > 0 => return Some(Protocol::Http1),
            b'A'..=b'Z' | b'-' | b'_' if i < MAX_METHOD_LEN => {}
            _ => return Some(Protocol::Opaque),
        }
    }
    if bytes.len() > MAX_METHOD_LEN { Some(Protocol::Opaque) } else { None }
}

/// Waits for a connection's first bytes and classifies them.
///
/// Returns the protocol and the bytes consumed from the socket while deciding, which the caller must
/// replay before reading the socket itself (usually none: a first packet long enough to decide is only
/// peeked at). EOF before a decision, or `timeout` with nothing decisive, is `Opaque`.
pub async fn detect(stream: &TcpStream, timeout: Duration) -> std::io::Result<(Protocol, Bytes)> {
    let deadline = Instant::now() + timeout;
    let mut peeked = [0_u8; 64];
    let n = match tokio::time::timeout_at(deadline, stream.peek(&mut peeked)).await {
        Err(_) => return Ok((Protocol::Opaque, Bytes::new())),
        Ok(result) => result?,
    };
    if n == 0 {
        return Ok((Protocol::Opaque, Bytes::new()));
    }
    if let Some(protocol) = classify(&peeked[..n]) {
        return Ok((protocol, Bytes::new()));
    }
    // Too short to decide: take the bytes out so the next read waits for new ones.
    let mut buffer = BytesMut::with_capacity(limits::DETECT_PEEK_BYTES);
    loop {
        let read = async {
            loop {
                stream.readable().await?;
                match stream.try_read_buf(&mut buffer) {
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                    result => return result,
                }
            }
        };
        match tokio::time::timeout_at(deadline, read).await {
            Err(_) => return Ok((Protocol::Opaque, buffer.freeze())),
            Ok(Ok(0)) => return Ok((Protocol::Opaque, buffer.freeze())),
            Ok(Ok(_)) => {
                if let Some(protocol) = decided(&buffer) {
                    return Ok((protocol, buffer.freeze()));
                }
            }
            Ok(Err(e)) => return Err(e),
        }
    }
}

/// What bytes read out of a connection say it speaks: [`classify`]'s answer, or opaque once
/// [`limits::DETECT_PEEK_BYTES`] of them have not decided.
fn decided(read: &[u8]) -> Option<Protocol> {
    classify(read).or((read.len() >= limits::DETECT_PEEK_BYTES).then_some(Protocol::Opaque))
}

/// [`detect`] for a stream that cannot be peeked at (an HBONE tunnel): reads until the bytes
/// decide, the stream ends, `timeout` passes or [`limits::DETECT_PEEK_BYTES`] are in hand, and
/// returns every byte read, for the caller to replay.
pub async fn detect_read<R: AsyncRead + Unpin>(
    stream: &mut R,
    timeout: Duration,
) -> std::io::Result<(Protocol, Bytes)> {
    let deadline = Instant::now() + timeout;
    let mut buffer = BytesMut::with_capacity(limits::DETECT_PEEK_BYTES);
    loop {
        match tokio::time::timeout_at(deadline, stream.read_buf(&mut buffer)).await {
            Err(_) | Ok(Ok(0)) => return Ok((Protocol::Opaque, buffer.freeze())),
            Ok(Ok(_)) => {
                if let Some(protocol) = decided(&buffer) {
                    return Ok((protocol, buffer.freeze()));
                }
            }
            Ok(Err(e)) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn classifies_complete_openings() {
        assert_eq!(classify(b"GET / HTTP/1.1\r\n"), Some(Protocol::Http1));
        assert_eq!(classify(b"CONNECT a:1 HTTP/1.1\r\n"), Some(Protocol::Http1));
        assert_eq!(classify(b"M-SEARCH * HTTP/1.1\r\n"), Some(Protocol::Http1));
        assert_eq!(classify(H2_PREFACE), Some(Protocol::Http2));
        assert_eq!(classify(&[0x16, 0x03, 0x01, 0x02, 0x00]), Some(Protocol::Tls));
        assert_eq!(classify(b"\x00\x00\x00\x01hello"), Some(Protocol::Opaque));
        assert_eq!(classify(b"get / HTTP/1.1"), Some(Protocol::Opaque));
        assert_eq!(classify(b" GET /"), Some(Protocol::Opaque));
        assert_eq!(classify(b"SSH-2.0-OpenSSH_9.2\r\n"), Some(Protocol::Opaque));
        assert_eq!(classify(&[0x16, 0x01]), Some(Protocol::Opaque));
    }

    #[test]
    fn asks_for_more_when_the_opening_is_cut_short() {
        assert_eq!(classify(b""), None);
        assert_eq!(classify(b"GE"), None);
        assert_eq!(classify(b"PRI * HTTP/2"), None);
        assert_eq!(classify(b"PRI"), None);
        assert_eq!(classify(&[0x16]), None);
        assert_eq!(classify(b"ABCDEFGHIJKLMNOPQRST"), None);
        assert_eq!(classify(b"ABCDEFGHIJKLMNOPQRSTU"), Some(Protocol::Opaque));
    }

    #[tokio::test]
    async fn reading_detection_hands_back_every_byte_it_read() {
        let (mut client, mut server) = tokio::io::duplex(64);
        let reading = tokio::spawn(async move {
            let detected = detect_read(&mut server, Duration::from_secs(5)).await.unwrap();
            (detected, server)
        });
        tokio::io::AsyncWriteExt::write_all(&mut client, b"GE").await.unwrap();
        tokio::task::yield_now().await;
        tokio::io::AsyncWriteExt::write_all(&mut client, b"T / HTTP/1.1\r\n").await.unwrap();
        let ((protocol, replay), _server) = reading.await.unwrap();
        assert_eq!(protocol, Protocol::Http1);
        assert!(b"GET / HTTP/1.1\r\n".starts_with(&replay) && replay.len() >= 4, "{replay:?}");
        let (_client, mut silent) = tokio::io::duplex(64);
        let (protocol, replay) = detect_read(&mut silent, Duration::from_millis(20)).await.unwrap();
        assert_eq!((protocol, replay.len()), (Protocol::Opaque, 0), "nothing before the timeout is opaque");
    }

    #[test]
    fn http1_with_a_pri_method_is_not_http2() {
        assert_eq!(classify(b"PRI * HTTP/1.1\r\n"), Some(Protocol::Http1));
    }
}

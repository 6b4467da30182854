//! The HTTP/1.1 client's response decoding (head, framing, length, chunked and trailers, interim
//! responses) against arbitrary bytes from an endpoint, arriving in arbitrary splits, over a real
//! loopback connection.
//!
//! Input: one byte seeding the write splits, then the endpoint's bytes (which it writes, then
//! closes). Holds whatever the bytes:
//! - the exchange and its body end within a bounded time (never a hung connection);
//! - a body never exceeds a single valid `content-length`, and equals it when it ends cleanly;
//! - the connection goes back to the pool only after a body that ended cleanly.

#![no_main]

use std::cell::Cell;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use libfuzzer_sys::fuzz_target;
use remora_proxy::http::h1::{Connection, Exchanged, Failure, exchange};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};

thread_local! {
    static RELEASED: Cell<bool> = const { Cell::new(false) };
}

fn release(_connection: Box<Connection>) {
    RELEASED.with(|released| released.set(true));
}

/// The one `content-length` the head declares, when it declares exactly one valid one and no
/// `transfer-encoding`, for a status that has a body.
fn declared_length(response: &http::Response<impl Sized>) -> Option<u64> {
    let status = response.status().as_u16();
    if status < 200 || status == 204 || status == 304 || response.headers().contains_key("transfer-encoding") {
        return None;
    }
    let mut values = response.headers().get_all("content-length").iter();
    let value = values.next()?;
    if values.next().is_some() {
        return None;
    }
    value.to_str().ok()?.parse().ok()
}

fuzz_target!(|input: &[u8]| {
    let Some((&seed, response)) = input.split_first() else { return };
    let response = response.to_vec();
    remora_fuzz::runtime().block_on(async move {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("address");
        let client = TcpStream::connect(address).await.expect("connect");
        let (mut server, _) = listener.accept().await.expect("accept");
        server.set_nodelay(true).expect("nodelay");
        let writer = tokio::spawn(async move {
            let mut rest = &response[..];
            let mut state = u32::from(seed) | 1;
            while !rest.is_empty() {
                state ^= state << 13;
                state ^= state >> 17;
                state ^= state << 5;
                let length = (1 + state as usize % 64).min(rest.len());
                if server.write_all(&rest[..length]).await.is_err() {
                    return;
                }
                rest = &rest[length..];
                tokio::task::yield_now().await;
            }
            let _ = server.shutdown().await;
            // Hold the socket open until the client is done, so a close is an orderly end of stream.
            let mut sink = [0u8; 1024];
            while let Ok(n) = tokio::io::AsyncReadExt::read(&mut server, &mut sink).await {
                if n == 0 {
                    break;
                }
            }
        });
        RELEASED.with(|released| released.set(false));
        let connection = Box::new(Connection::new(client, address, Duration::from_secs(60), None));
        let (head, body) =
            http::Request::get("/").header("host", "fuzz").body(Empty::<Bytes>::new()).expect("request").into_parts();
        let exchanged = tokio::time::timeout(Duration::from_secs(10), async move {
            match exchange(connection, head, body, false, release).await {
                Ok(Exchanged::Response(response)) => {
                    let declared = declared_length(&response);
                    let mut body = response.into_body();
                    let mut total = 0u64;
                    let clean = loop {
                        match body.frame().await {
                            None => break true,
                            Some(Err(_)) => break false,
                            Some(Ok(frame)) => {
                                if let Some(data) = frame.data_ref() {
                                    total += data.len() as u64;
                                    if let Some(declared) = declared {
                                        assert!(
                                            total <= declared,
                                            "body of {total} bytes past content-length {declared}"
                                        );
                                    }
                                }
                            }
                        }
                    };
                    drop(body);
                    if clean && let Some(declared) = declared {
                        assert_eq!(total, declared, "a clean end short of content-length");
                    }
                    if !clean {
                        assert!(!RELEASED.with(Cell::get), "a connection pooled after a broken body");
                    }
                }
                // The attempt refuses a switch nobody asked for; the codec hands it up.
                Ok(Exchanged::Switched(..)) => {}
                Err(Failure::Stale(..)) => panic!("a fresh connection reported stale"),
                Err(Failure::Failed(_)) => assert!(!RELEASED.with(Cell::get)),
            }
        })
        .await;
        assert!(exchanged.is_ok(), "the exchange hung after the endpoint closed");
        writer.abort();
    });
});

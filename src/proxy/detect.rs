//! Looking at a new connection's first bytes, without consuming them, to tell
//! mesh TLS from anything else.

use std::time::Duration;

use rustls::server::Acceptor;
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::tls::ALPN;

/// What a client sent first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Detected {
    /// A TLS ClientHello offering `portcullis/1`: another sidecar.
    MeshTls,
    /// TLS, but not from a sidecar (the app's own TLS).
    OtherTls,
    /// Bytes that are not a TLS ClientHello.
    Plain,
    /// Nothing within the wait.
    Silent,
    /// The client closed without sending anything.
    Closed,
}

/// Largest ClientHello we wait for; past this it is treated as foreign TLS.
const PEEK_LIMIT: usize = 16 * 1024;
/// How often to look again while a ClientHello is still arriving.
const REPEEK: Duration = Duration::from_millis(2);

/// Peeks at the stream for at most `wait` and classifies the first bytes.
pub async fn detect(stream: &TcpStream, wait: Duration) -> std::io::Result<Detected> {
    let deadline = Instant::now() + wait;
    let mut buf = vec![0u8; PEEK_LIMIT];
    let mut seen = 0;
    loop {
        let n = match tokio::time::timeout_at(deadline, stream.peek(&mut buf)).await {
            Err(_) => {
                return Ok(if seen == 0 {
                    Detected::Silent
                } else {
                    Detected::OtherTls
                })
            }
            Ok(r) => r?,
        };
        if n == 0 {
            return Ok(Detected::Closed);
        }
        if buf[0] != 0x16 {
            return Ok(Detected::Plain);
        }
        if n > seen {
            seen = n;
            match classify_hello(&buf[..n]) {
                Some(d) => return Ok(d),
                None if n == buf.len() => return Ok(Detected::OtherTls),
                None => {}
            }
        }
        // The hello is still arriving: peek returns at once while any byte is
        // buffered, so pause briefly before looking again.
        if Instant::now() + REPEEK >= deadline {
            return Ok(Detected::OtherTls);
        }
        tokio::time::sleep(REPEEK).await;
    }
}

/// `Some` once `bytes` hold a whole ClientHello (or something that can never
/// be one), `None` while more is needed.
fn classify_hello(bytes: &[u8]) -> Option<Detected> {
    let mut acceptor = Acceptor::default();
    let mut rd = bytes;
    while !rd.is_empty() {
        if acceptor.read_tls(&mut rd).is_err() {
            return Some(Detected::Plain);
        }
    }
    match acceptor.accept() {
        Ok(Some(accepted)) => {
            let ours = accepted
                .client_hello()
                .alpn()
                .is_some_and(|mut protocols| protocols.any(|p| p == ALPN));
            Some(if ours {
                Detected::MeshTls
            } else {
                Detected::OtherTls
            })
        }
        Ok(None) => None,
        Err(_) => Some(Detected::Plain),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_first_bytes() {
        assert_eq!(classify_hello(&[0x16, 0x03, 0x01, 0x00, 0x05, 0x01]), None);
        assert_eq!(
            classify_hello(b"\x16GET / HTTP/1.1\r\n\r\n"),
            Some(Detected::Plain)
        );
    }
}

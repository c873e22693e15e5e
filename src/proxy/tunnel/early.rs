//! The app's first bytes, sent right behind the `CONNECT` instead of after
//! its answer: a client that speaks first (an HTTP request, a TLS
//! ClientHello) saves a round trip between the sidecars, and the request
//! and its first bytes share a write. Only bytes that are already waiting
//! are taken, so a protocol whose server speaks first is not held up. They
//! are kept until the peer answers: a stream the peer did not process (421,
//! `REFUSED_STREAM`, GOAWAY) is retried on another connection with the
//! same bytes, and a denied one loses them along with the connection, as
//! it would have anyway. The peer forwards nothing before it has
//! authorized the stream.

use std::cell::RefCell;

use bytes::Bytes;
use tokio::net::TcpStream;

/// The most taken from the app before the answer.
const MAX_EARLY: usize = 16 * 1024;

thread_local! {
    /// Where [`Early::read`] reads, reused by every connection of a thread.
    static SCRATCH: RefCell<Vec<u8>> = RefCell::new(Vec::with_capacity(MAX_EARLY));
}

/// One app connection's early bytes, across its attempts.
#[derive(Default)]
pub struct Early {
    bytes: Bytes,
    /// The app was read once already (bytes or not): never again before
    /// the answer, so at most [`MAX_EARLY`] bytes wait on it.
    read: bool,
}

impl Early {
    /// Bytes an earlier attempt sent, to send again on a new stream.
    pub fn resend(&self) -> Option<Bytes> {
        (!self.bytes.is_empty()).then(|| self.bytes.clone())
    }

    /// Whether the app may still be read for early bytes.
    pub fn may_read(&self) -> bool {
        !self.read
    }

    /// Takes what the app has already sent, without waiting. `None` when
    /// there is nothing (or end of stream, or an error, which the copy
    /// that follows sees again).
    pub fn read(&mut self, app: &TcpStream) -> Option<Bytes> {
        self.read = true;
        // Read into this thread's scratch buffer (spare capacity, never
        // zeroed) and keep only what came: a request is usually a few
        // hundred bytes, and it is held until the peer answers.
        SCRATCH.with_borrow_mut(|buf| {
            buf.clear();
            match app.try_read_buf(buf) {
                Ok(n) if n > 0 => {
                    self.bytes = Bytes::copy_from_slice(&buf[..n]);
                    Some(self.bytes.clone())
                }
                _ => None,
            }
        })
    }

    /// How many bytes went to the peer this way.
    pub fn sent(&self) -> u64 {
        self.bytes.len() as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpListener;

    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        (client, server)
    }

    /// Waiting bytes are taken once, at most `MAX_EARLY` of them, and kept
    /// for a retry; the rest stay in the socket for the copy.
    #[tokio::test]
    async fn takes_waiting_bytes_once_and_keeps_them() {
        let (mut client, app) = pair().await;
        let sent = vec![7u8; MAX_EARLY + 100];
        client.write_all(&sent).await.unwrap();
        app.readable().await.unwrap();
        let mut early = Early::default();
        assert!(early.may_read());
        let first = early.read(&app).expect("bytes were waiting");
        assert!(!first.is_empty() && first.len() <= MAX_EARLY);
        assert!(!early.may_read());
        assert_eq!(early.resend(), Some(first.clone()));
        assert_eq!(early.sent(), first.len() as u64);
    }

    /// Nothing waiting (a server-speaks-first protocol): nothing taken.
    #[tokio::test]
    async fn nothing_waiting_takes_nothing() {
        let (_client, app) = pair().await;
        let mut early = Early::default();
        assert_eq!(early.read(&app), None);
        assert_eq!(early.resend(), None);
        assert_eq!(early.sent(), 0);
    }
}

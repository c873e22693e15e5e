//! Looking at a new connection's first bytes, without consuming them, to tell
//! mesh TLS from anything else.

use std::time::Duration;

use std::os::fd::AsRawFd;

use nix::sys::socket::{recv, MsgFlags};
use rustls::server::Acceptor;
use tokio::io::Interest;
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::request_line::{LineScan, Verdict};
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
    /// The start of a TLS record, and not all of it within the wait.
    Partial,
    /// The client closed without sending anything.
    Closed,
}

/// Largest ClientHello we wait for (all its records, headers included);
/// past this it is treated as foreign TLS.
const PEEK_LIMIT: usize = 16 * 1024 + RECORD_HEADER;
/// A TLS record header: type, version (2 bytes), length (2 bytes).
const RECORD_HEADER: usize = 5;
/// The largest plaintext record TLS allows.
const MAX_RECORD: usize = 16 * 1024;

/// Peeks at the stream for at most `wait` and classifies the first bytes.
///
/// A stalled client must cost next to nothing, as thousands may be waiting
/// at once: the bytes are looked at only when the kernel says new ones
/// arrived (a peek that finds nothing new clears the stream's readiness),
/// the hello is parsed only when a whole record is buffered (its header
/// says how long it is), and no buffer is kept between looks.
pub async fn detect(stream: &TcpStream, wait: Duration) -> std::io::Result<Detected> {
    let deadline = Instant::now() + wait;
    let mut want = RECORD_HEADER;
    let mut seen = 0;
    let mut parsed = 0;
    loop {
        let ready = match tokio::time::timeout_at(deadline, stream.ready(Interest::READABLE)).await
        {
            Err(_) => return Ok(stalled(seen)),
            Ok(r) => r?,
        };
        let looked = stream.try_io(Interest::READABLE, || {
            let mut buf = vec![0u8; want];
            let n = recv(
                stream.as_raw_fd(),
                &mut buf,
                MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT,
            )
            .map_err(std::io::Error::from)?;
            seen = seen.max(n);
            if n == 0 || n >= want || buf[0] != 0x16 {
                buf.truncate(n);
                Ok(buf)
            } else {
                // Not enough yet: report WouldBlock so that tokio clears
                // the readiness and the next wake-up means new bytes.
                Err(std::io::ErrorKind::WouldBlock.into())
            }
        });
        let buf = match looked {
            Ok(buf) => buf,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if ready.is_read_closed() {
                    // The client finished sending with the hello incomplete.
                    return Ok(stalled(seen));
                }
                continue;
            }
            Err(e) => return Err(e),
        };
        if buf.is_empty() {
            return Ok(Detected::Closed);
        }
        if buf[0] != 0x16 {
            return Ok(Detected::Plain);
        }
        let (complete, next) = records(&buf);
        if complete > parsed {
            parsed = complete;
            if let Some(d) = classify_hello(&buf[..complete]) {
                return Ok(d);
            }
        }
        match next {
            Some(n) if n <= PEEK_LIMIT => want = n,
            // A record longer than TLS allows: let rustls say what it is.
            None => return Ok(classify_hello(&buf).unwrap_or(Detected::Plain)),
            Some(_) => return Ok(Detected::OtherTls),
        }
    }
}

/// How far a just-accepted connection has got, judged from what is already
/// buffered, without waiting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    /// Nothing received yet.
    Nothing,
    /// Some bytes, but not a whole ClientHello.
    Started,
    /// A whole ClientHello (or bytes that are certainly not one).
    Decided,
}

/// Looks once, without waiting, at what `stream` has buffered. A sidecar's
/// ClientHello usually arrives with or just after the TCP handshake, so by
/// the time a connection is taken from a deep accept queue it is already
/// there: such a connection is worth more than one that has sent nothing.
pub fn progress_now(stream: &TcpStream) -> Progress {
    let mut header = [0u8; RECORD_HEADER];
    let peek = |buf: &mut [u8]| {
        recv(
            stream.as_raw_fd(),
            buf,
            MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT,
        )
        .unwrap_or(0)
    };
    match peek(&mut header) {
        0 => return Progress::Nothing,
        n if n < RECORD_HEADER || header[0] != 0x16 => {
            return if header[0] == 0x16 {
                Progress::Started
            } else {
                Progress::Decided
            }
        }
        _ => {}
    }
    let len = usize::from(u16::from_be_bytes([header[3], header[4]]));
    if len > MAX_RECORD {
        return Progress::Decided;
    }
    let mut record = vec![0u8; RECORD_HEADER + len];
    let n = peek(&mut record);
    match classify_hello(&record[..n.min(record.len())]) {
        Some(_) if n >= record.len() => Progress::Decided,
        _ => Progress::Started,
    }
}

/// What a client that sent part of something and then nothing more was.
fn stalled(seen: usize) -> Detected {
    if seen == 0 {
        Detected::Silent
    } else {
        Detected::Partial
    }
}

/// Walks the TLS records at the start of `buf`: how many bytes the whole
/// records take, and how many bytes must be buffered to hold the next
/// header or record in full (`None`: a record longer than TLS allows).
fn records(buf: &[u8]) -> (usize, Option<usize>) {
    let mut at = 0;
    loop {
        let Some(header) = buf.get(at..at + RECORD_HEADER) else {
            return (at, Some(at + RECORD_HEADER));
        };
        let len = usize::from(u16::from_be_bytes([header[3], header[4]]));
        if len > MAX_RECORD {
            return (at, None);
        }
        let end = at + RECORD_HEADER + len;
        if end > buf.len() {
            return (at, Some(end));
        }
        at = end;
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

/// The application protocol a client started with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AppProtocol {
    Http1,
    Http2,
    /// Anything else, or nothing within the wait: carried as opaque bytes.
    Opaque,
}

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// A first line that may still become a request line and runs longer than
/// this without ending is read as HTTP without waiting for the rest of it.
const LINE_LIMIT: usize = 8 * 1024;

/// Reads the first bytes of `stream` (at most `wait`) to tell HTTP/1.x and
/// HTTP/2 from anything else. Returns the protocol and the bytes read, which
/// the caller must replay (see `Rewind`).
pub async fn sniff_http<S>(stream: &mut S, wait: Duration) -> (AppProtocol, bytes::Bytes)
where
    S: tokio::io::AsyncRead + Unpin,
{
    sniff_http_after(stream, wait, Vec::with_capacity(1024)).await
}

/// [`sniff_http`] for a stream whose first bytes, `buf`, were read already.
pub async fn sniff_http_after<S>(
    stream: &mut S,
    wait: Duration,
    mut buf: Vec<u8>,
) -> (AppProtocol, bytes::Bytes)
where
    S: tokio::io::AsyncRead + Unpin,
{
    use tokio::io::AsyncReadExt;
    let deadline = Instant::now() + wait;
    loop {
        if let Some(p) = classify_http(&buf) {
            return (p, buf.into());
        }
        let mut chunk = [0u8; 2048];
        match tokio::time::timeout_at(deadline, stream.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => buf.extend_from_slice(&chunk[..n]),
            Ok(Ok(_)) => return (classify_at_end(&buf), buf.into()),
            // Out of time, or a failed read: opaque, which the caller
            // carries behind a `FirstLineGuard` (a late request line is
            // still caught there).
            _ => return (AppProtocol::Opaque, buf.into()),
        }
    }
}

/// `Some` once the bytes decide the protocol; `None` while more are needed.
fn classify_http(buf: &[u8]) -> Option<AppProtocol> {
    if buf.is_empty() {
        return None;
    }
    let n = buf.len().min(H2_PREFACE.len());
    if buf[..n] == H2_PREFACE[..n] {
        return (n == H2_PREFACE.len()).then_some(AppProtocol::Http2);
    }
    // Fail closed: whatever a lenient server would read as a request line is
    // parsed as HTTP (and refused there if it is not valid HTTP/1.1).
    let mut scan = LineScan::default();
    match scan.feed(buf) {
        Some(Verdict::Request) => Some(AppProtocol::Http1),
        Some(Verdict::NotRequest) => Some(AppProtocol::Opaque),
        // Not the start of a request as clients write them (binary bytes,
        // a lowercase word that is no method): no line end to wait for.
        // Carried opaque behind a `FirstLineGuard`, which still resets the
        // connection if the line ends as a request line after all.
        None if scan.saw_control() || !looks_like_a_request_start(&buf[scan.line_start()..]) => {
            Some(AppProtocol::Opaque)
        }
        None if buf.len() >= LINE_LIMIT => Some(AppProtocol::Http1),
        None => None,
    }
}

/// Whether `buf`, a first line without its end yet, starts the way HTTP
/// clients write requests: an optional blank line, a letters-only method
/// (lowercase only for a standard one, at most 20 letters), spaces, then
/// a target starting like a path, `*`, an absolute URI or an authority.
/// Only such starts are worth waiting for; the rest is decided at once.
fn looks_like_a_request_start(buf: &[u8]) -> bool {
    let start = buf
        .iter()
        .take_while(|b| matches!(b, b'\r' | b'\n' | b' ' | b'\t'))
        .count();
    let buf = &buf[start..];
    let method_len = buf
        .iter()
        .take_while(|b| b.is_ascii_alphabetic() || matches!(b, b'-' | b'_'))
        .count();
    let method = &buf[..method_len];
    let lowercase = method.iter().any(u8::is_ascii_lowercase);
    if lowercase && !is_standard_method_prefix(method) {
        return false;
    }
    if method_len == buf.len() {
        return method_len <= 20;
    }
    if method_len == 0 || !matches!(buf[method_len], b' ' | b'\t') {
        return false;
    }
    let spaces = buf[method_len..]
        .iter()
        .take_while(|b| matches!(b, b' ' | b'\t'))
        .count();
    match buf.get(method_len + spaces) {
        None => true,
        Some(b) if lowercase => matches!(b, b'/' | b'*' | b'h' | b'H'),
        Some(b) => matches!(b, b'/' | b'*' | b'[') || b.is_ascii_alphanumeric(),
    }
}

/// Whether `m` is the start of a standard method name, in any case.
fn is_standard_method_prefix(m: &[u8]) -> bool {
    const METHODS: [&[u8]; 9] = [
        b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"CONNECT", b"OPTIONS", b"TRACE", b"PATCH",
    ];
    METHODS
        .iter()
        .any(|full| full.len() >= m.len() && full[..m.len()].eq_ignore_ascii_case(m))
}

/// What `buf` is when the client stopped sending after it: a line servers
/// would take as a request even without its end is HTTP. Nothing more can
/// come, so the sniff's early guesses do not apply.
fn classify_at_end(buf: &[u8]) -> AppProtocol {
    if buf.starts_with(H2_PREFACE) {
        return AppProtocol::Http2;
    }
    let mut scan = LineScan::default();
    match scan.feed(buf).unwrap_or_else(|| scan.at_end()) {
        Verdict::Request => AppProtocol::Http1,
        Verdict::NotRequest => AppProtocol::Opaque,
    }
}

/// The pure steps of [`detect`] and [`sniff_http`] over bytes already in
/// hand, in the order `detect` takes them: the TLS record walk (see
/// `records`), the ClientHello verdict on the whole records (or on all of
/// `buf` when a record is longer than TLS allows), and the HTTP sniff.
/// It exists so the parsers can be fuzzed and tested without a socket.
pub fn classify_buffered(buf: &[u8]) -> (usize, Option<Detected>, Option<AppProtocol>) {
    let (complete, next) = records(buf);
    let hello = match next {
        None => classify_hello(buf),
        Some(_) => classify_hello(&buf[..complete]),
    };
    (complete, hello, classify_http(buf))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tells_http_from_other_bytes() {
        let cases: &[(&[u8], Option<AppProtocol>)] = &[
            (b"GET / HTTP/1.1\r\nHost: x\r\n", Some(AppProtocol::Http1)),
            (b"POST /api?x=1 HTTP/1.0\r\n", Some(AppProtocol::Http1)),
            (b"GET / HTT", None),
            (
                b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
                Some(AppProtocol::Http2),
            ),
            (b"PRI * HTTP/2", None),
            (b"SSH-2.0-OpenSSH_9.2\r\n", Some(AppProtocol::Opaque)),
            (b"\x00\x01binary", Some(AppProtocol::Opaque)),
            (b"GET / HTTP/2.0\r\n", Some(AppProtocol::Http1)),
            (b"GET / HTTP/1.1\nHost: x\n", Some(AppProtocol::Http1)),
            (b"GET  /  HTTP/1.1 \r\n", Some(AppProtocol::Http1)),
            (b"GET / http/1.1\r\n", Some(AppProtocol::Http1)),
            (b"GET /\r\n", Some(AppProtocol::Http1)),
            (b"\r\nGET / HTTP/1.1\r\n", Some(AppProtocol::Http1)),
            (b"GET\t/\tHTTP/1.1\r\n", Some(AppProtocol::Http1)),
            (b"M-SEARCH2 * HTTP/1.1\r\n", Some(AppProtocol::Http1)),
            (b"get http/abc\r\n", Some(AppProtocol::Http1)),
            (b"GET /x RTSP/1.1\r\n", Some(AppProtocol::Http1)),
            (b"PROXY TCP4 10.0.0.1 10.0.0.2 1 2\r\nGET /x", None),
            (
                b"PROXY TCP4 10.0.0.1 10.0.0.2 1 2\r\nping 1",
                Some(AppProtocol::Opaque),
            ),
            (
                b"PROXY TCP4 10.0.0.1 10.0.0.2 1 2\r\nGET / HTTP/1.1\r\n",
                Some(AppProtocol::Http1),
            ),
            (
                b"0032git-upload-pack /p.git\0host=x\0",
                Some(AppProtocol::Opaque),
            ),
            (b"SET key value\r\n", Some(AppProtocol::Opaque)),
            (
                b"CONNECT {\"verbose\":false}\r\n",
                Some(AppProtocol::Opaque),
            ),
            (b"get key\r\n", Some(AppProtocol::Opaque)),
            (b"*1\r\n$4\r\nPING\r\n", Some(AppProtocol::Opaque)),
            (b"ping 00000001", Some(AppProtocol::Opaque)),
            (b"get / HTTP/1.1\r\n", Some(AppProtocol::Http1)),
            (b"Delete /x HTTP/1.1\r\n", Some(AppProtocol::Http1)),
            (b"get", None),
            (b"get 1", Some(AppProtocol::Opaque)),
            (b"PING", None),
            (b"PING ", None),
            (b"PING  x", None),
            (b"PING  x\r\n", Some(AppProtocol::Opaque)),
            (b"GET /no/line/end/yet", None),
            (b"HELLO world", None),
            (b"HELLO world\r\n", Some(AppProtocol::Opaque)),
            (b"direct", Some(AppProtocol::Opaque)),
            (b"\r\nGET /", None),
            (b"\tGET\t/x", None),
            (b"AVERYLONGMETHODNAMEOVERTWENTY", Some(AppProtocol::Opaque)),
            (
                b"AVERYLONGMETHODNAMEOVERTWENTY / HTTP/1.1\r\n",
                Some(AppProtocol::Http1),
            ),
            (b"direct\n", Some(AppProtocol::Opaque)),
            (b"", None),
        ];
        let mut long = b"GET /?".to_vec();
        long.resize(LINE_LIMIT, b'p');
        assert_eq!(classify_http(&long[..LINE_LIMIT - 1]), None);
        assert_eq!(classify_http(&long), Some(AppProtocol::Http1));
        for (bytes, want) in cases {
            assert_eq!(
                classify_http(bytes),
                *want,
                "{:?}",
                String::from_utf8_lossy(bytes)
            );
        }
    }

    #[test]
    fn a_line_cut_short_by_the_end_of_the_stream() {
        let cases: &[(&[u8], AppProtocol)] = &[
            (b"GET /eof09", AppProtocol::Http1),
            (b"GET / HTTP/1.1", AppProtocol::Http1),
            (b"PRI * HTTP/2", AppProtocol::Http1),
            (b"ping 00000001", AppProtocol::Opaque),
            (b"foo / HTTP/1.1", AppProtocol::Http1),
            (b"GET /a\0b HTTP/1.1", AppProtocol::Http1),
            (b"direct", AppProtocol::Opaque),
            (b"", AppProtocol::Opaque),
        ];
        for (bytes, want) in cases {
            assert_eq!(
                classify_at_end(bytes),
                *want,
                "{:?}",
                String::from_utf8_lossy(bytes)
            );
        }
    }

    #[test]
    fn walks_records() {
        assert_eq!(records(&[0x16, 3, 1]), (0, Some(5)));
        assert_eq!(records(&[0x16, 3, 1, 0, 4, 1]), (0, Some(9)));
        assert_eq!(records(&[0x16, 3, 1, 0, 1, 9, 0x16, 3]), (6, Some(11)));
        assert_eq!(records(&[0x16, 3, 1, 0, 1, 9]), (6, Some(11)));
        assert_eq!(records(&[0x16, 3, 1, 0x40, 1]), (0, None));
    }

    #[test]
    fn classifies_first_bytes() {
        assert_eq!(classify_hello(&[0x16, 0x03, 0x01, 0x00, 0x05, 0x01]), None);
        assert_eq!(
            classify_hello(b"\x16GET / HTTP/1.1\r\n\r\n"),
            Some(Detected::Plain)
        );
    }
}

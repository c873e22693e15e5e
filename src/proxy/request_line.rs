//! Whether a connection's first line is an HTTP request line, judged as the
//! most lenient servers read one (Python's `http.server` splits the line on
//! any whitespace and takes `GET /path` alone as HTTP/0.9; Go takes any
//! token as a method). The sniff uses it to send HTTP to the per-request
//! path; [`FirstLineGuard`] uses it on connections carried as opaque bytes,
//! so a request line never reaches an app unparsed (past the per-request
//! rules, with a forged `x-forwarded-client-cert`) however its bytes were
//! timed, split or spaced.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, ReadBuf};

use super::Chunked;

/// What a first line turned out to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Request,
    NotRequest,
}

/// Between words: what lenient servers split a request line on (Python's
/// `str.split()` over a Latin-1 line takes all of these).
fn is_space(b: u8) -> bool {
    matches!(
        b,
        b' ' | b'\t' | b'\r' | 0x0b | 0x0c | 0x1c..=0x1f | 0x85 | 0xa0
    )
}

/// A token character (RFC 9110): what a method is made of.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// How many bytes of each word are kept: enough for `https://`.
const HEAD: usize = 8;

/// The longest first line any common server reads as a request: Go's
/// limit on a whole request head (1 MiB, plus the 4 KiB it allows over);
/// Python stops at 64 KiB, Node at 16 KiB, nginx at 8 KiB. A line still
/// going past it is not a request, so an opaque stream of token bytes
/// without a line end is not scanned to its end.
const MAX_FIRST_LINE: usize = (1 << 20) + 4096;

/// What starts a binary PROXY protocol (v2) header; 4 more bytes follow,
/// the last two the length of the rest.
const PROXY_V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";

/// The kinds of PROXY protocol (v1) header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ProxyV1 {
    /// `PROXY TCP4|TCP6 source destination sport dport`.
    Addresses,
    /// `PROXY UNKNOWN`, with anything after it.
    Unknown,
}

/// Where the scan is in the stream.
#[derive(Debug, Clone, Copy)]
enum Prelude {
    /// At the start: this many bytes matched the PROXY v2 signature.
    Signature(usize),
    /// In a PROXY v2 header: bytes read after the signature, and the
    /// length of its addresses once known.
    V2 { read: usize, len: usize },
    /// Reading lines; `proxy_seen` once a PROXY header (v1 or v2) was
    /// skipped, as an app that takes PROXY headers would skip it.
    Lines { proxy_seen: bool },
}

/// The first line being read (a few bytes of state, never the line).
#[derive(Debug, Clone, Default)]
struct Line {
    /// Empty lines and whitespace before the method are skipped, as
    /// servers skip them.
    started: bool,
    /// Bytes since the line started (blank lines before it not counted).
    len: usize,
    in_word: bool,
    words: u8,
    /// The method's first bytes, and its whole length.
    method: [u8; HEAD],
    method_len: usize,
    method_has_lowercase: bool,
    /// The first bytes of the word being read.
    head: [u8; HEAD],
    head_len: usize,
    /// The last word so far is a protocol version (`HTTP/…`).
    version: bool,
    /// The second word starts like a target (`/`, `*`, `http://`).
    target: bool,
    /// The line starts like a PROXY protocol (v1) header: `PROXY TCP4` or
    /// `PROXY TCP6` (then six words), or `PROXY UNKNOWN` (anything after).
    proxy: Option<ProxyV1>,
    /// A separator other than one space (a tab, two spaces, 0xa0…): the
    /// PROXY header grammar allows single spaces only, and a server that
    /// splits on spaces alone reads `PROXY\tUNKNOWN` as one method.
    odd_space: bool,
    /// The same line split on spaces alone, as the JDK's server splits it
    /// (a tab is part of a word there): its words so far, and whether its
    /// second word starts like a target.
    sp_words: u8,
    sp_in_word: bool,
    sp_head: [u8; HEAD],
    sp_head_len: usize,
    sp_target: bool,
    /// A control byte after the method: not text a line protocol sends,
    /// so the sniff need not wait for the line to end.
    control: bool,
}

/// Reads a stream's first line a few bytes at a time, so it can follow a
/// connection of any length.
#[derive(Debug, Clone)]
pub struct LineScan {
    verdict: Option<Verdict>,
    prelude: Prelude,
    line: Line,
    /// Bytes read so far, and where the line being read starts.
    fed: usize,
    line_start: usize,
}

impl Default for LineScan {
    fn default() -> Self {
        LineScan {
            verdict: None,
            prelude: Prelude::Signature(0),
            line: Line::default(),
            fed: 0,
            line_start: 0,
        }
    }
}

impl LineScan {
    /// Reads `bytes`, the next ones of the stream; the verdict once the first
    /// line has ended or the bytes can no longer start a request line.
    pub fn feed(&mut self, bytes: &[u8]) -> Option<Verdict> {
        if self.verdict.is_some() {
            return self.verdict;
        }
        for &b in bytes {
            self.fed += 1;
            if let Some(v) = self.step(b) {
                self.verdict = Some(v);
                return Some(v);
            }
        }
        None
    }

    /// The verdict if the stream ended here (servers read a last line
    /// without its line end).
    pub fn at_end(&self) -> Verdict {
        if let Some(v) = self.verdict {
            return v;
        }
        let mut line = self.line.clone();
        line.end_word();
        line.end_space_word();
        line.judge()
    }

    /// Whether the line being read holds a control byte.
    pub fn saw_control(&self) -> bool {
        self.line.control
    }

    /// Where, in the bytes fed, the line being read starts (past a PROXY
    /// protocol header).
    pub fn line_start(&self) -> usize {
        self.line_start
    }

    fn step(&mut self, b: u8) -> Option<Verdict> {
        match self.prelude {
            Prelude::Signature(n) if b == PROXY_V2_SIGNATURE[n] => {
                self.prelude = if n + 1 == PROXY_V2_SIGNATURE.len() {
                    Prelude::V2 { read: 0, len: 0 }
                } else {
                    Prelude::Signature(n + 1)
                };
                None
            }
            Prelude::Signature(n) => {
                // Not a PROXY v2 header: read what was held back as text.
                self.prelude = Prelude::Lines { proxy_seen: false };
                PROXY_V2_SIGNATURE[..n]
                    .iter()
                    .chain(std::iter::once(&b))
                    .find_map(|&b| self.step_line(b))
            }
            Prelude::V2 { read, len } => {
                let read = read + 1;
                let len = match read {
                    3 => usize::from(b) << 8,
                    4 => len | usize::from(b),
                    _ => len,
                };
                if read >= 4 && read == 4 + len {
                    self.next_line();
                } else {
                    self.prelude = Prelude::V2 { read, len };
                }
                None
            }
            Prelude::Lines { .. } => self.step_line(b),
        }
    }

    fn step_line(&mut self, b: u8) -> Option<Verdict> {
        let line = &mut self.line;
        if !line.started {
            if b == b'\n' || is_space(b) {
                return None;
            }
            if !is_tchar(b) {
                return Some(Verdict::NotRequest);
            }
            line.started = true;
        }
        line.len += 1;
        if line.len > MAX_FIRST_LINE {
            return Some(Verdict::NotRequest);
        }
        if b == b'\n' {
            line.end_word();
            line.end_space_word();
            // Only a header of the PROXY grammar is skipped: a request
            // with `PROXY` as its method is judged like any other line, and
            // so is one spaced otherwise or ending in a version.
            let grammar = match line.proxy {
                Some(ProxyV1::Addresses) => line.words == 6,
                Some(ProxyV1::Unknown) => true,
                None => false,
            };
            let proxy_v1 = grammar && !line.odd_space && !line.version;
            if proxy_v1 && matches!(self.prelude, Prelude::Lines { proxy_seen: false }) {
                self.next_line();
                return None;
            }
            return Some(line.judge());
        }
        line.space_split(b);
        if is_space(b) {
            // The CR of a CRLF line end is no separator.
            line.odd_space |= (b != b' ' && b != b'\r') || !line.in_word;
            line.end_word();
            return None;
        }
        if !line.in_word {
            line.in_word = true;
            line.words = line.words.saturating_add(1);
            line.head_len = 0;
        }
        if line.words == 1 {
            if !is_tchar(b) {
                return Some(Verdict::NotRequest);
            }
            line.method_has_lowercase |= b.is_ascii_lowercase();
            if line.method_len < HEAD {
                line.method[line.method_len] = b;
            }
            line.method_len += 1;
        } else if b < 0x20 || b == 0x7f {
            line.control = true;
        }
        if line.head_len < HEAD {
            line.head[line.head_len] = b;
            line.head_len += 1;
        }
        None
    }

    /// Starts over on the line after a PROXY header.
    fn next_line(&mut self) {
        self.prelude = Prelude::Lines { proxy_seen: true };
        self.line = Line::default();
        self.line_start = self.fed;
    }
}

impl Line {
    /// Follows the split on spaces alone (`b` is not the line end).
    fn space_split(&mut self, b: u8) {
        if b == b' ' {
            self.end_space_word();
            return;
        }
        if !self.sp_in_word {
            self.sp_in_word = true;
            self.sp_words = self.sp_words.saturating_add(1);
        }
        if self.sp_words == 2 && self.sp_head_len < HEAD {
            self.sp_head[self.sp_head_len] = b;
            self.sp_head_len += 1;
        }
    }

    fn end_space_word(&mut self) {
        if !self.sp_in_word {
            return;
        }
        self.sp_in_word = false;
        if self.sp_words == 2 {
            self.sp_target = starts_like_target(&self.sp_head[..self.sp_head_len]);
        }
    }

    fn end_word(&mut self) {
        if !self.in_word {
            return;
        }
        self.in_word = false;
        let head = &self.head[..self.head_len];
        let starts = |prefix: &[u8]| {
            head.len() >= prefix.len() && head[..prefix.len()].eq_ignore_ascii_case(prefix)
        };
        if self.words >= 2 {
            // Node's parser also serves `RTSP/` and `ICE/` versions.
            self.version = starts(b"HTTP/") || starts(b"RTSP/") || starts(b"ICE/");
        }
        if self.words == 2 {
            self.target = starts_like_target(head);
            if &self.method[..self.method_len.min(HEAD)] == b"PROXY" {
                self.proxy = match head {
                    b"TCP4" | b"TCP6" => Some(ProxyV1::Addresses),
                    b"UNKNOWN" => Some(ProxyV1::Unknown),
                    _ => None,
                };
            }
        }
    }

    /// `METHOD target … VERSION` however spaced; `METHOD target word…` with
    /// any last word (the JDK's server does not check the version, and
    /// Go, the JDK and Netty take any token as a method); or the HTTP/0.9
    /// form `METHOD target`: `GET` with any target (Python serves
    /// `GET a/b`), another uppercase method with a path or absolute URI
    /// (lowercase two-word lines are text protocols: memcached's `get key`).
    fn judge(&self) -> Verdict {
        let versioned = self.words >= 2 && self.version;
        let targeted = (self.words >= 3 && self.target) || (self.sp_words >= 3 && self.sp_target);
        let get = &self.method[..self.method_len.min(HEAD)] == b"GET";
        let simple = self.words == 2 && (get || (self.target && !self.method_has_lowercase));
        if versioned || targeted || simple {
            Verdict::Request
        } else {
            Verdict::NotRequest
        }
    }
}

/// Whether a word starts like a request target: a path, `*`, or an
/// absolute `http://` or `https://` URI.
fn starts_like_target(head: &[u8]) -> bool {
    let starts = |prefix: &[u8]| {
        head.len() >= prefix.len() && head[..prefix.len()].eq_ignore_ascii_case(prefix)
    };
    matches!(head.first(), Some(b'/' | b'*')) || starts(b"http://") || starts(b"https://")
}

/// The error a [`FirstLineGuard`] fails a read with.
#[derive(Debug, thiserror::Error)]
#[error("an HTTP request line on a connection carried as opaque bytes")]
pub struct RequestLineInOpaque;

impl RequestLineInOpaque {
    /// Whether `e` is this error.
    pub fn is(e: &io::Error) -> bool {
        e.get_ref().is_some_and(|inner| inner.is::<Self>())
    }
}

/// Wraps the client side of a connection carried as opaque bytes. Reads
/// pass through while the first line is looked at; if it turns out to be an
/// HTTP request line (it came late, slowly, or after bytes that made the
/// sniff give up), the read that completes it fails with
/// [`RequestLineInOpaque`] instead, so the app never gets the line's end
/// (or the headers after it). The caller then resets the app connection.
pub struct FirstLineGuard<S> {
    inner: S,
    scan: LineScan,
}

impl<S> FirstLineGuard<S> {
    pub fn new(inner: S) -> Self {
        FirstLineGuard {
            inner,
            scan: LineScan::default(),
        }
    }
}

impl<S> FirstLineGuard<S> {
    /// Looks at bytes just read (none: the end of the stream); an error if
    /// they complete an HTTP request line.
    fn look_at(&mut self, new: &[u8]) -> io::Result<()> {
        let verdict = if new.is_empty() {
            self.scan.at_end()
        } else {
            self.scan.feed(new).unwrap_or(Verdict::NotRequest)
        };
        if verdict == Verdict::Request {
            self.scan.verdict = Some(Verdict::Request);
            return Err(tripped());
        }
        Ok(())
    }

    /// A read error from the stream: its end, as far as the app is
    /// concerned (a TLS peer that drops TCP without close_notify, a reset,
    /// a tunnel stream cancelled). An unended line is judged then too, so
    /// a request line cut off that way makes the app connection reset, not
    /// closed as if the line were whole.
    fn look_at_error(&mut self, e: io::Error) -> io::Error {
        if self.scan.verdict.is_none() {
            if let Err(tripped) = self.look_at(&[]) {
                return tripped;
            }
        }
        e
    }
}

fn tripped() -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, RequestLineInOpaque)
}

impl<S: AsyncRead + Unpin> AsyncRead for FirstLineGuard<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match this.scan.verdict {
            Some(Verdict::Request) => return Poll::Ready(Err(tripped())),
            // Past the first line, or no room to read into (which reads
            // nothing without being the end of the stream).
            Some(Verdict::NotRequest) => return Pin::new(&mut this.inner).poll_read(cx, buf),
            None if buf.remaining() == 0 => return Pin::new(&mut this.inner).poll_read(cx, buf),
            None => {}
        }
        let before = buf.filled().len();
        if let Err(e) = std::task::ready!(Pin::new(&mut this.inner).poll_read(cx, buf)) {
            return Poll::Ready(Err(this.look_at_error(e)));
        }
        if let Err(e) = this.look_at(&buf.filled()[before..]) {
            buf.set_filled(before);
            return Poll::Ready(Err(e));
        }
        Poll::Ready(Ok(()))
    }
}

write_through!(FirstLineGuard);

impl<S: Chunked> Chunked for FirstLineGuard<S> {
    fn poll_read_chunk(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut BytesMut,
        want: usize,
    ) -> Poll<io::Result<Bytes>> {
        match self.scan.verdict {
            Some(Verdict::Request) => return Poll::Ready(Err(tripped())),
            Some(Verdict::NotRequest) => return self.inner.poll_read_chunk(cx, buf, want),
            None => {}
        }
        let chunk = match std::task::ready!(self.inner.poll_read_chunk(cx, buf, want)) {
            Ok(chunk) => chunk,
            Err(e) => return Poll::Ready(Err(self.look_at_error(e))),
        };
        self.look_at(&chunk)?;
        Poll::Ready(Ok(chunk))
    }

    fn poll_write_chunk(
        &mut self,
        cx: &mut Context<'_>,
        chunk: &mut Bytes,
    ) -> Poll<io::Result<()>> {
        self.inner.poll_write_chunk(cx, chunk)
    }
}

#[cfg(test)]
mod tests;

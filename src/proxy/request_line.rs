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

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

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

/// How many bytes of each word are kept: enough for `HTTP/1`.
const HEAD: usize = 6;

/// Reads a stream's first line a few bytes at a time, keeping a few bytes
/// of state (never the line), so it can follow a connection of any length.
#[derive(Debug, Clone, Default)]
pub struct LineScan {
    verdict: Option<Verdict>,
    /// Empty lines and whitespace before the method are skipped, as servers
    /// skip them.
    started: bool,
    in_word: bool,
    words: u8,
    method_has_lowercase: bool,
    /// The first bytes of the word being read.
    head: [u8; HEAD],
    head_len: usize,
    /// A word after the method starts with `HTTP/` and a digit.
    version: bool,
    /// The second word starts like a target (`/`, `*`, `http`).
    target: bool,
    /// A control byte in the line: not text a line protocol sends, so the
    /// sniff need not wait for the line to end.
    control: bool,
}

impl LineScan {
    /// Reads `bytes`, the next ones of the stream; the verdict once the first
    /// line has ended or the bytes can no longer start a request line.
    pub fn feed(&mut self, bytes: &[u8]) -> Option<Verdict> {
        if self.verdict.is_some() {
            return self.verdict;
        }
        for &b in bytes {
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
        let mut ended = self.clone();
        ended.end_word();
        ended.judge()
    }

    /// Whether the line so far holds a control byte.
    pub fn saw_control(&self) -> bool {
        self.control
    }

    fn step(&mut self, b: u8) -> Option<Verdict> {
        if !self.started {
            if b == b'\n' || is_space(b) {
                return None;
            }
            if !is_tchar(b) {
                return Some(Verdict::NotRequest);
            }
            self.started = true;
        }
        if b == b'\n' {
            self.end_word();
            return Some(self.judge());
        }
        if is_space(b) {
            self.end_word();
            return None;
        }
        if !self.in_word {
            self.in_word = true;
            self.words = self.words.saturating_add(1);
            self.head_len = 0;
        }
        if self.words == 1 {
            if !is_tchar(b) {
                return Some(Verdict::NotRequest);
            }
            self.method_has_lowercase |= b.is_ascii_lowercase();
        } else if b < 0x20 || b == 0x7f {
            self.control = true;
        }
        if self.head_len < HEAD {
            self.head[self.head_len] = b;
            self.head_len += 1;
        }
        None
    }

    fn end_word(&mut self) {
        if !self.in_word {
            return;
        }
        self.in_word = false;
        let head = &self.head[..self.head_len];
        if self.words >= 2 {
            self.version |= head.len() == HEAD
                && head[..5].eq_ignore_ascii_case(b"HTTP/")
                && head[5].is_ascii_digit();
        }
        if self.words == 2 {
            self.target = matches!(head.first(), Some(b'/' | b'*'))
                || (head.len() >= 4 && head[..4].eq_ignore_ascii_case(b"http"));
        }
    }

    /// `METHOD target … HTTP/x` however spaced, or the HTTP/0.9 form
    /// `METHOD target` with an uppercase method (lowercase two-word lines
    /// are text protocols: memcached's `get key`).
    fn judge(&self) -> Verdict {
        let versioned = self.words >= 2 && self.version;
        let simple = self.words == 2 && self.target && !self.method_has_lowercase;
        if versioned || simple {
            Verdict::Request
        } else {
            Verdict::NotRequest
        }
    }
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

impl<S: AsyncRead + Unpin> AsyncRead for FirstLineGuard<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.scan.verdict.is_some() {
            return Pin::new(&mut this.inner).poll_read(cx, buf);
        }
        let before = buf.filled().len();
        std::task::ready!(Pin::new(&mut this.inner).poll_read(cx, buf))?;
        let new = &buf.filled()[before..];
        let verdict = if new.is_empty() {
            Some(this.scan.at_end())
        } else {
            this.scan.feed(new)
        };
        if verdict == Some(Verdict::Request) {
            buf.set_filled(before);
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::InvalidData,
                RequestLineInOpaque,
            )));
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for FirstLineGuard<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, data)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests;

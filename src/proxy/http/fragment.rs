//! Finds `#fragment`s in HTTP/1 request targets, which the HTTP parser
//! drops without a trace (`/admin#x` arrives as `/admin`).
//!
//! A fragment is never sent by a correct client, so one in a request
//! target means a confused or hostile client, and the proxy answers 400
//! rather than guess what the client meant. The HTTP/1 parser cuts the
//! fragment off while building the URI, so the raw bytes are watched
//! instead: [`Watch`] wraps the connection and, for every `#` preceded by
//! what looks like the start of a request line (`METHOD SP target`), notes
//! the method and the target before the `#`. When a request with that
//! method and target arrives, the note is taken and the request refused.
//! No framing is tracked (that would be a second HTTP parser), so a note
//! made from body bytes that happen to look like a request line can only
//! refuse a later request of the same connection with the same target,
//! i.e. hurt the client that sent both. HTTP/2 connections
//! are not watched: their headers are compressed, and the HTTP/2 parser
//! drops fragments the same way.

use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, ReadBuf};

/// How far back from a `#` a request line's start is looked for; longer
/// targets are not checked (hyper's own limit on the head applies anyway).
const MAX_LINE: usize = 8 * 1024;

/// Notes kept at once; the oldest go first.
const MAX_NOTES: usize = 8;

/// The HTTP/2 connection preface starts like this.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0";

/// One `METHOD SP target#` seen: the uppercase run before the space (a
/// body without a final newline may run into the method, so the method is
/// matched as its end) and the target before the `#`.
struct Note {
    run: Vec<u8>,
    target: Vec<u8>,
}

/// What the connection reader saw, shared with the request handler.
#[derive(Default)]
struct Seen {
    /// The last bytes since the last `\n`, at most [`MAX_LINE`].
    tail: Vec<u8>,
    notes: VecDeque<Note>,
    /// Not HTTP/1 (or upgraded): nothing more to watch.
    off: bool,
    started: bool,
}

/// The handle the request handler asks.
#[derive(Clone, Default)]
pub struct Fragments(Arc<Mutex<Seen>>);

impl Fragments {
    /// Whether an HTTP/1 request with this method and target (as parsed,
    /// without the fragment) had a fragment; the note is taken.
    pub fn take(&self, method: &str, uri: &http::Uri) -> bool {
        let mut seen = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if seen.notes.is_empty() {
            return false;
        }
        let target = uri.to_string();
        let found = seen
            .notes
            .iter()
            .position(|n| n.target == target.as_bytes() && n.run.ends_with(method.as_bytes()));
        found.is_some_and(|i| seen.notes.remove(i).is_some())
    }

    /// Stops watching (the connection was upgraded to another protocol).
    pub fn stop(&self) {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).off = true;
    }

    fn observe(&self, new: &[u8]) {
        let mut seen = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if seen.off || new.is_empty() {
            return;
        }
        if !seen.started {
            seen.started = true;
            let n = new.len().min(H2_PREFACE.len());
            if new[..n] == H2_PREFACE[..n] {
                seen.off = true;
                return;
            }
        }
        if new.contains(&b'#') {
            let mut window = Vec::with_capacity(seen.tail.len() + new.len());
            window.extend_from_slice(&seen.tail);
            window.extend_from_slice(new);
            let old = seen.tail.len();
            let hashes = window.iter().enumerate().filter(|(_, &b)| b == b'#');
            for (at, _) in hashes.skip_while(|(at, _)| *at < old) {
                if let Some(note) = note_before(&window[..at]) {
                    if seen.notes.len() == MAX_NOTES {
                        seen.notes.pop_front();
                    }
                    seen.notes.push_back(note);
                }
            }
        }
        match new.iter().rposition(|&b| b == b'\n') {
            Some(nl) => {
                seen.tail.clear();
                let rest = &new[nl + 1..];
                seen.tail
                    .extend_from_slice(&rest[rest.len().saturating_sub(MAX_LINE)..]);
            }
            None => {
                seen.tail
                    .extend_from_slice(&new[new.len().saturating_sub(MAX_LINE)..]);
                let over = seen.tail.len().saturating_sub(MAX_LINE);
                seen.tail.drain(..over);
            }
        }
    }
}

/// The note for a `#` that ends `before`, when `before` ends like the
/// start of a request line: uppercase letters, one space, a target
/// without whitespace.
fn note_before(before: &[u8]) -> Option<Note> {
    let before = &before[before.len().saturating_sub(MAX_LINE)..];
    let blank = |b: &u8| matches!(b, b' ' | b'\t' | b'\r' | b'\n');
    let start = before.iter().rposition(blank).map_or(0, |i| i + 1);
    let sp = start.checked_sub(1).filter(|&i| before[i] == b' ')?;
    let run_start = before[..sp]
        .iter()
        .rposition(|b| !(b.is_ascii_uppercase() || *b == b'-'))
        .map_or(0, |i| i + 1);
    if run_start == sp || start == before.len() {
        return None;
    }
    Some(Note {
        run: before[run_start..sp].to_vec(),
        target: before[start..].to_vec(),
    })
}

/// A connection whose incoming bytes are watched for fragments.
pub struct Watch<S> {
    inner: S,
    fragments: Fragments,
}

impl<S> Watch<S> {
    pub fn new(inner: S) -> (Self, Fragments) {
        let fragments = Fragments::default();
        let watch = Watch {
            inner,
            fragments: fragments.clone(),
        };
        (watch, fragments)
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Watch<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let this = &mut *self;
        let res = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = res {
            this.fragments.observe(&buf.filled()[before..]);
        }
        res
    }
}

write_through!(Watch);

#[cfg(test)]
mod tests {
    use super::*;

    fn uri(s: &str) -> http::Uri {
        s.parse().unwrap()
    }

    #[test]
    fn fragments_in_request_lines_are_noted_across_reads() {
        let f = Fragments::default();
        f.observe(b"GET /a#x HTTP/1.1\r\nHost: h\r\n\r\nPOST /lo");
        f.observe(b"ng/path?q=1");
        f.observe(b"#frag HTTP/1.1\r\nx: #not-a-target\r\n\r\nGET /clean HTTP/1.1\r\n\r\n");
        // A body without a final newline runs into the next request line.
        f.observe(b"POST /b HTTP/1.1\r\nContent-Length: 4\r\n\r\nDATAGET /c#d HTTP/1.1\r\n");
        assert!(f.take("GET", &uri("/a")));
        assert!(!f.take("GET", &uri("/a")), "a note is taken once");
        assert!(f.take("POST", &uri("/long/path?q=1")));
        assert!(!f.take("GET", &uri("/clean")));
        assert!(f.take("GET", &uri("/c")));
        let left = f.0.lock().unwrap().notes.len();
        assert_eq!(left, 0, "`x: #not-a-target` is no request line");
    }

    #[test]
    fn http2_is_not_watched() {
        let f = Fragments::default();
        f.observe(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\nGET /a#x HTTP/1.1\r\n");
        assert!(!f.take("GET", &uri("/a")));
    }
}

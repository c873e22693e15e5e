//! Copying bytes both ways between two streams, passing half-closes on and
//! closing connections that stay idle too long.

use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use prometheus::IntCounter;
use tokio::time::Instant;

use super::chunks::Chunked;

/// Byte counters of one connection, from the accepted side's point of view.
pub struct Traffic {
    pub received: IntCounter,
    pub sent: IntCounter,
}

impl Traffic {
    /// Counters exported nowhere, for a copy whose bytes are already
    /// counted by the stream it reads from.
    pub fn uncounted() -> Self {
        let counter = || IntCounter::new("uncounted", "not exported").expect("valid name");
        Traffic {
            received: counter(),
            sent: counter(),
        }
    }
}

/// A copy starts with a small buffer and grows it while reads keep filling
/// it: an idle or chatty connection holds a few KiB, a bulk one gets large
/// reads (fewer system calls per byte).
const FIRST_BUFFER: usize = 4 * 1024;
const MAX_BUFFER: usize = 64 * 1024;

/// Copies `accepted` ⇄ `upstream` until both directions have ended. When one
/// side stops sending, the other side's write half is shut down and the
/// opposite direction keeps going. Ends with `TimedOut` after `idle` with no
/// bytes either way. Returns the bytes received from and sent to `accepted`
/// (the access log's numbers for one connection).
///
/// Both directions run in this one future (no locks between the halves),
/// and bytes move as chunks (see [`Chunked`]): what one side hands over is
/// what the other side is given.
pub async fn splice<A, U>(
    mut accepted: A,
    mut upstream: U,
    idle: Duration,
    traffic: &Traffic,
) -> io::Result<(u64, u64)>
where
    A: Chunked,
    U: Chunked,
{
    let start = Instant::now();
    let last = AtomicU64::new(0);
    let mut up = Transfer::new(&traffic.received);
    let mut down = Transfer::new(&traffic.sent);
    let activity = Activity { last: &last, start };
    let both = poll_fn(|cx| {
        // Either direction's error ends the connection.
        let up_done = up.poll(cx, &mut accepted, &mut upstream, &activity)?;
        let down_done = down.poll(cx, &mut upstream, &mut accepted, &activity)?;
        if up_done.is_ready() && down_done.is_ready() {
            return Poll::Ready(Ok::<_, io::Error>((up.total, down.total)));
        }
        Poll::Pending
    });
    let idle_watch = async {
        loop {
            let since = Duration::from_millis(last.load(Ordering::Relaxed));
            let deadline = start + since + idle;
            if Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep_until(deadline).await;
        }
    };
    tokio::select! {
        r = both => r,
        _ = idle_watch => Err(io::Error::new(io::ErrorKind::TimedOut, "idle timeout")),
    }
}

/// When bytes last moved, in ms since the copy started.
struct Activity<'a> {
    last: &'a AtomicU64,
    start: Instant,
}

/// One direction of a copy: read a chunk, write all of it, flush, count
/// it; at the end of the stream, shut the writer down.
struct Transfer<'a> {
    /// Where streams without chunks of their own read into.
    buf: BytesMut,
    /// How much the next read asks room for (grows while reads fill it).
    want: usize,
    /// Read but not yet written.
    chunk: Bytes,
    /// Written, not yet flushed and counted.
    unflushed: u64,
    state: State,
    total: u64,
    counter: &'a IntCounter,
}

#[derive(PartialEq)]
enum State {
    Copying,
    /// The reader ended: passing the half-close on.
    ShuttingDown,
    Done,
}

impl<'a> Transfer<'a> {
    fn new(counter: &'a IntCounter) -> Self {
        Transfer {
            buf: BytesMut::new(),
            want: FIRST_BUFFER,
            chunk: Bytes::new(),
            unflushed: 0,
            state: State::Copying,
            total: 0,
            counter,
        }
    }

    /// Moves bytes from `r` to `w` until either would wait; ready once this
    /// direction has ended (and stays ready).
    fn poll<R: Chunked, W: Chunked>(
        &mut self,
        cx: &mut Context<'_>,
        r: &mut R,
        w: &mut W,
        activity: &Activity<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            match self.state {
                State::Done => return Poll::Ready(Ok(())),
                State::ShuttingDown => {
                    // The peer may already be gone: the half-close is best effort.
                    let _ = ready!(Pin::new(&mut *w).poll_shutdown(cx));
                    self.state = State::Done;
                }
                State::Copying if !self.chunk.is_empty() => {
                    let before = self.chunk.len();
                    ready!(w.poll_write_chunk(cx, &mut self.chunk))?;
                    self.unflushed += (before - self.chunk.len()) as u64;
                }
                State::Copying if self.unflushed > 0 => {
                    ready!(Pin::new(&mut *w).poll_flush(cx))?;
                    self.counter.inc_by(self.unflushed);
                    self.total += self.unflushed;
                    self.unflushed = 0;
                    let elapsed = activity.start.elapsed().as_millis() as u64;
                    activity.last.store(elapsed, Ordering::Relaxed);
                }
                State::Copying => {
                    let chunk = match ready!(r.poll_read_chunk(cx, &mut self.buf, self.want)) {
                        Ok(chunk) => chunk,
                        // A TLS peer that closes TCP without close_notify: the end of stream.
                        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Bytes::new(),
                        Err(e) => return Poll::Ready(Err(e)),
                    };
                    if chunk.is_empty() {
                        self.state = State::ShuttingDown;
                        continue;
                    }
                    if chunk.len() >= self.want && self.want < MAX_BUFFER {
                        self.want = (self.want * 4).min(MAX_BUFFER);
                    }
                    self.chunk = chunk;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;

//! Copying bytes both ways between two streams, passing half-closes on and
//! closing connections that stay idle too long.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use prometheus::IntCounter;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;

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
pub async fn splice<A, U>(
    accepted: A,
    upstream: U,
    idle: Duration,
    traffic: &Traffic,
) -> io::Result<(u64, u64)>
where
    A: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let start = Instant::now();
    let last = AtomicU64::new(0);
    let (mut ar, mut aw) = tokio::io::split(accepted);
    let (mut ur, mut uw) = tokio::io::split(upstream);
    let up = pump(&mut ar, &mut uw, &traffic.received, &last, start);
    let down = pump(&mut ur, &mut aw, &traffic.sent, &last, start);
    let both = async { tokio::try_join!(up, down) };
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

async fn pump<R, W>(
    r: &mut R,
    w: &mut W,
    counter: &IntCounter,
    last: &AtomicU64,
    start: Instant,
) -> io::Result<u64>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    // Read into spare capacity: no zeroing of a buffer per connection.
    let mut buf = Vec::with_capacity(FIRST_BUFFER);
    let mut total = 0u64;
    loop {
        buf.clear();
        let n = match r.read_buf(&mut buf).await {
            Ok(n) => n,
            // A TLS peer that closes TCP without close_notify: treat as end of stream.
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => 0,
            Err(e) => return Err(e),
        };
        if n == 0 {
            // Pass the half-close on; the peer may already be gone.
            let _ = w.shutdown().await;
            return Ok(total);
        }
        w.write_all(&buf[..n]).await?;
        w.flush().await?;
        if n == buf.capacity() && n < MAX_BUFFER {
            buf = Vec::with_capacity(n * 4);
        }
        counter.inc_by(n as u64);
        total += n as u64;
        last.store(start.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
}

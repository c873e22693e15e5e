//! Log lines reach stderr from a thread of their own. A container runtime
//! that stops reading stderr must not stall the proxy, whose data path may
//! run on a single thread: lines wait in a bounded queue, and when it is
//! full a line is dropped and counted (`portcullis_log_lines_dropped_total`)
//! instead of making the logging thread wait.

use std::io::{self, Write};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use prometheus::IntCounter;
use tracing_subscriber::fmt::MakeWriter;

/// Lines that may wait for the writer thread.
const QUEUE: usize = 4096;

enum Message {
    Line(Vec<u8>),
    /// Answered once every line queued before it is written.
    Flush(SyncSender<()>),
}

/// Lines dropped because the queue was full, in every registry that
/// exports it (one count per process, as there is one stderr).
pub fn dropped() -> IntCounter {
    static DROPPED: OnceLock<IntCounter> = OnceLock::new();
    DROPPED
        .get_or_init(|| {
            IntCounter::new(
                "portcullis_log_lines_dropped_total",
                "Log lines dropped because stderr was not read fast enough (the proxy never waits for it).",
            )
            .expect("valid metric")
        })
        .clone()
}

/// The sending end; the fmt layer makes one [`LineWriter`] per event.
#[derive(Clone)]
pub struct Sink {
    tx: SyncSender<Message>,
}

impl Sink {
    /// Starts the thread that writes queued lines to `out`.
    pub fn spawn<W: Write + Send + 'static>(out: W) -> Sink {
        Self::with_queue(out, QUEUE)
    }

    fn with_queue<W: Write + Send + 'static>(out: W, queue: usize) -> Sink {
        let (tx, rx) = sync_channel(queue);
        std::thread::Builder::new()
            .name("log-writer".into())
            .spawn(move || write_lines(rx, out))
            .expect("start the log writer thread");
        Sink { tx }
    }

    /// Waits, at most `limit`, until every line queued so far is written
    /// (at exit, so the last lines are not lost).
    pub fn flush(&self, limit: Duration) {
        let deadline = Instant::now() + limit;
        let (ack, done) = sync_channel(1);
        let mut message = Message::Flush(ack);
        // A full queue is waited on (politely) until the deadline, never
        // longer: stderr may be stuck for good.
        loop {
            match self.tx.try_send(message) {
                Ok(()) => break,
                Err(TrySendError::Full(m)) if Instant::now() < deadline => {
                    message = m;
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err(_) => return,
            }
        }
        let _ = done.recv_timeout(deadline.saturating_duration_since(Instant::now()));
    }

    fn send(&self, line: Vec<u8>) {
        if let Err(TrySendError::Full(_)) = self.tx.try_send(Message::Line(line)) {
            dropped().inc();
        }
    }
}

fn write_lines<W: Write>(rx: Receiver<Message>, mut out: W) {
    for message in rx {
        match message {
            Message::Line(line) => {
                let _ = out.write_all(&line);
            }
            Message::Flush(ack) => {
                let _ = out.flush();
                let _ = ack.send(());
            }
        }
    }
}

/// One event's text, queued whole when the fmt layer is done with it.
pub struct LineWriter<'a> {
    sink: &'a Sink,
    buf: Vec<u8>,
}

impl<'a> MakeWriter<'a> for Sink {
    type Writer = LineWriter<'a>;

    fn make_writer(&'a self) -> LineWriter<'a> {
        LineWriter {
            sink: self,
            buf: Vec::new(),
        }
    }
}

impl Write for LineWriter<'_> {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        self.buf.extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for LineWriter<'_> {
    fn drop(&mut self) {
        if !self.buf.is_empty() {
            self.sink.send(std::mem::take(&mut self.buf));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// A `Write` into shared memory; `gate` (when set) holds every write
    /// until the test lets it go, like a pipe nobody reads.
    #[derive(Clone, Default)]
    struct Shared {
        bytes: Arc<Mutex<Vec<u8>>>,
        gate: Option<Arc<Mutex<()>>>,
    }

    impl Write for Shared {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            let _held = self.gate.as_ref().map(|g| g.lock().unwrap());
            self.bytes.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn log(sink: &Sink, line: &str) {
        let mut w = sink.make_writer();
        w.write_all(line.as_bytes()).unwrap();
    }

    #[test]
    fn lines_arrive_whole_and_in_order_by_the_flush() {
        let out = Shared::default();
        let sink = Sink::spawn(out.clone());
        for i in 0..100 {
            log(&sink, &format!("line {i}\n"));
        }
        sink.flush(Duration::from_secs(10));
        let text = String::from_utf8(out.bytes.lock().unwrap().clone()).unwrap();
        let expected: String = (0..100).map(|i| format!("line {i}\n")).collect();
        assert_eq!(text, expected);
    }

    /// With stderr stuck, logging does not wait: what does not fit in the
    /// queue is dropped and counted; once stderr moves, queued lines follow.
    #[test]
    fn a_stuck_stderr_drops_and_counts_instead_of_waiting() {
        let gate = Arc::new(Mutex::new(()));
        let out = Shared {
            gate: Some(gate.clone()),
            ..Shared::default()
        };
        let held = gate.lock().unwrap();
        let sink = Sink::with_queue(out.clone(), 4);
        let before = dropped().get();
        for i in 0..50 {
            log(&sink, &format!("line {i}\n"));
        }
        // The writer thread holds at most one line, the queue four.
        assert!(
            dropped().get() - before >= 45,
            "{}",
            dropped().get() - before
        );
        drop(held);
        sink.flush(Duration::from_secs(10));
        let text = String::from_utf8(out.bytes.lock().unwrap().clone()).unwrap();
        assert!(text.starts_with("line 0\n"), "{text}");
        assert!(text.lines().count() <= 5, "{text}");
    }
}

//! The access log (`--access-log off|json|text`): one line per inbound HTTP
//! request and per opaque connection, on stdout.
//!
//! Lines go through a bounded channel to one writer task, so a slow stdout
//! never blocks the data path: when the channel is full the line is dropped
//! and counted (`portcullis_access_log_dropped_total`).
//!
//! The authorization decision of a request is taken deep inside the HTTP
//! path; it reaches the log line through a task-local note that
//! [`Logged`] (the service wrapper around each request) opens and
//! [`note`] (called where every decision is recorded) fills in.

use std::cell::RefCell;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::{Body as _, Frame, Incoming, SizeHint};
use hyper::{Request, Response};
use prometheus::IntCounter;
use serde::Serialize;
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;

use super::http::{Body, ConnInfo};
use crate::authz::Decision;

/// Lines waiting for the writer; past this they are dropped.
const QUEUE: usize = 4096;
/// How long the writer lets lines gather after the first one: at most this
/// much delay on stdout, and at most `QUEUE` lines per batch (about 200,000
/// lines/s before any is dropped).
const BATCH_WAIT: Duration = Duration::from_millis(20);

/// `--access-log`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Off,
    Json,
    Text,
}

/// A handle to the access log; cheap to clone; does nothing when off.
#[derive(Clone)]
pub struct AccessLog {
    inner: Option<Arc<Inner>>,
}

struct Inner {
    format: Format,
    tx: mpsc::Sender<String>,
    dropped: IntCounter,
}

/// One access log line.
#[derive(Debug, Clone, Serialize)]
pub struct Entry {
    /// RFC 3339, when the request or connection ended.
    pub time: String,
    /// `http` or `tcp`.
    pub kind: &'static str,
    /// The peer's SPIFFE id, or `unauthenticated`.
    pub peer: String,
    pub method: Option<String>,
    pub authority: Option<String>,
    pub path: Option<String>,
    pub status: Option<u16>,
    /// `allow` or `deny`.
    pub decision: String,
    /// The deciding rule, or `default`.
    pub rule: String,
    pub duration_ms: f64,
    /// Body bytes from the peer (HTTP: the request's Content-Length, when
    /// it has one).
    pub bytes_received: Option<u64>,
    /// Body bytes to the peer.
    pub bytes_sent: Option<u64>,
    /// Where the request or connection went (the app).
    pub upstream: String,
}

impl AccessLog {
    /// A log that writes nothing.
    pub fn off() -> Self {
        AccessLog { inner: None }
    }

    /// Starts the writer task (inside a tokio runtime) unless `format` is
    /// `Off`. `dropped` counts lines lost to a full queue.
    pub fn start(format: Format, dropped: IntCounter) -> Self {
        if format == Format::Off {
            return Self::off();
        }
        let (tx, rx) = mpsc::channel(QUEUE);
        tokio::spawn(write_lines(rx));
        AccessLog {
            inner: Some(Arc::new(Inner {
                format,
                tx,
                dropped,
            })),
        }
    }

    pub fn is_on(&self) -> bool {
        self.inner.is_some()
    }

    /// Builds the line with `entry` only when the log is on, and queues it.
    pub fn write_with(&self, entry: impl FnOnce() -> Entry) {
        if self.is_on() {
            self.write(&entry());
        }
    }

    /// Queues one line; drops (and counts) it when the writer lags behind.
    pub fn write(&self, entry: &Entry) {
        let Some(inner) = &self.inner else {
            return;
        };
        let line = match inner.format {
            Format::Json => serde_json::to_string(entry).unwrap_or_default(),
            _ => text_line(entry),
        };
        if inner.tx.try_send(line).is_err() {
            inner.dropped.inc();
        }
    }
}

/// `time kind peer "METHOD authority path" status decision rule duration_ms
/// received sent upstream`, `-` for what is unknown.
fn text_line(e: &Entry) -> String {
    let opt = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
    let num = |v: Option<u64>| v.map_or("-".into(), |n| n.to_string());
    format!(
        "{} {} {} \"{} {} {}\" {} {} {} {:.3} {} {} {}",
        e.time,
        e.kind,
        e.peer,
        opt(&e.method),
        opt(&e.authority),
        opt(&e.path),
        e.status.map_or("-".into(), |s| s.to_string()),
        e.decision,
        e.rule,
        e.duration_ms,
        num(e.bytes_received),
        num(e.bytes_sent),
        e.upstream
    )
}

/// The writer task. It wakes for the first line, then lets lines gather for
/// [`BATCH_WAIT`] and writes them all with one flush: under load that is
/// one wake-up and one write per batch rather than per line; idle, it
/// sleeps.
async fn write_lines(mut rx: mpsc::Receiver<String>) {
    let mut out = tokio::io::BufWriter::with_capacity(64 * 1024, tokio::io::stdout());
    let mut batch = Vec::with_capacity(QUEUE);
    while rx.recv_many(&mut batch, QUEUE).await > 0 {
        tokio::time::sleep(BATCH_WAIT).await;
        while batch.len() < QUEUE {
            let Ok(line) = rx.try_recv() else { break };
            batch.push(line);
        }
        for line in batch.drain(..) {
            if out.write_all(line.as_bytes()).await.is_err() || out.write_all(b"\n").await.is_err()
            {
                return;
            }
        }
        if out.flush().await.is_err() {
            return;
        }
    }
}

/// RFC 3339, with the fraction of a second.
pub fn now_rfc3339() -> String {
    time::OffsetDateTime::from(SystemTime::now())
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// What the decision of one request left for its log line.
struct Note {
    log: AccessLog,
    peer: String,
    upstream: SocketAddr,
    allowed: bool,
    rule: String,
}

tokio::task_local! {
    static NOTE: RefCell<Option<Note>>;
}

/// Called wherever a request's decision is recorded: keeps it for the log
/// line of the request being served (if the log is on and a [`Logged`]
/// wrapper is serving it).
pub fn note(log: &AccessLog, conn: &ConnInfo, decision: &Decision) {
    if !log.is_on() {
        return;
    }
    let _ = NOTE.try_with(|n| {
        *n.borrow_mut() = Some(Note {
            log: log.clone(),
            peer: conn.peer.to_string(),
            upstream: conn.target,
            allowed: decision.allowed,
            rule: decision.rule.clone(),
        })
    });
}

/// A hyper service wrapper that writes one access log line per request
/// that reached an authorization decision, once its response body ends.
#[derive(Clone)]
pub struct Logged<S>(pub S);

type Fut = Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;

impl<S> hyper::service::Service<Request<Incoming>> for Logged<S>
where
    S: hyper::service::Service<Request<Incoming>, Response = Response<Body>, Error = Infallible>,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Fut;

    fn call(&self, req: Request<Incoming>) -> Fut {
        let started = Instant::now();
        let method = req.method().to_string();
        let authority = req.uri().authority().map(|a| a.to_string()).or_else(|| {
            req.headers()
                .get(hyper::header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_string)
        });
        let path = req.uri().path().to_string();
        let received = req.body().size_hint().exact();
        let inner = self.0.call(req);
        Box::pin(NOTE.scope(RefCell::new(None), async move {
            let resp = inner.await?;
            let Some(note) = NOTE.with(|n| n.borrow_mut().take()) else {
                return Ok(resp);
            };
            let pending = Pending {
                entry: Entry {
                    time: String::new(),
                    kind: "http",
                    peer: note.peer,
                    method: Some(method),
                    authority,
                    path: Some(path),
                    status: Some(resp.status().as_u16()),
                    decision: if note.allowed { "allow" } else { "deny" }.into(),
                    rule: note.rule,
                    duration_ms: 0.0,
                    bytes_received: received,
                    bytes_sent: Some(0),
                    upstream: note.upstream.to_string(),
                },
                started,
                log: note.log,
            };
            let (parts, body) = resp.into_parts();
            let body = Counted {
                inner: body,
                pending: Some(pending),
            };
            Ok(Response::from_parts(parts, body.boxed()))
        }))
    }
}

/// A log line waiting for its response body to end.
struct Pending {
    entry: Entry,
    started: Instant,
    log: AccessLog,
}

impl Pending {
    fn finish(mut self) {
        self.entry.time = now_rfc3339();
        self.entry.duration_ms = self.started.elapsed().as_secs_f64() * 1000.0;
        self.log.write(&self.entry);
    }
}

/// A response body that counts its bytes and writes the log line when it
/// ends (or is dropped: the client went away).
struct Counted {
    inner: Body,
    pending: Option<Pending>,
}

impl hyper::body::Body for Counted {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let (Some(data), Some(p)) = (frame.data_ref(), self.pending.as_mut()) {
                    let sent = p.entry.bytes_sent.get_or_insert(0);
                    *sent += data.len() as u64;
                }
            }
            Poll::Ready(None) => {
                if let Some(p) = self.pending.take() {
                    p.finish();
                }
            }
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        if let Some(p) = self.pending.take() {
            p.finish();
        }
    }
}

//! The client side's pool of tunnel connections, keyed by the peer
//! sidecar's address and the identity we require of it. A new app
//! connection takes a stream on a pooled connection with room; only when
//! none has room is another one dialled, and concurrent first connections
//! to one peer wait for a single handshake instead of racing their own.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use h2::client::SendRequest;
use http::{Method, Request, StatusCode};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tracing::{debug, info};

use super::early::Early;
use super::health::ConnHealth;
use super::stream::H2Stream;
use super::Open;
use crate::identity::SpiffeId;
use crate::proxy::Shared;

/// How often a pooled connection checks whether it has idled long enough.
const IDLE_CHECK: Duration = Duration::from_secs(1);

/// One pooled tunnel connection.
pub struct PooledConn {
    send: SendRequest<Bytes>,
    active: AtomicUsize,
    max_streams: usize,
    closed: AtomicBool,
    health: ConnHealth,
    pub server: SpiffeId,
    /// When the last stream ended (or the connection was made).
    idle_since: Mutex<Instant>,
}

impl PooledConn {
    /// Takes one stream's room, if there is any.
    fn reserve(self: &Arc<Self>) -> Option<StreamSlot> {
        let mut n = self.active.load(Ordering::Acquire);
        loop {
            // The peer's own limit, once its SETTINGS arrived, may be lower.
            let limit = self.max_streams.min(self.send.current_max_send_streams());
            if n >= limit {
                return None;
            }
            match self
                .active
                .compare_exchange(n, n + 1, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return Some(StreamSlot { conn: self.clone() }),
                Err(now) => n = now,
            }
        }
    }

    fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// No new stream goes here any more; open ones finish.
    fn retire(&self) {
        self.closed.store(true, Ordering::Release);
    }
}

/// One stream's place on a pooled connection, given back when dropped.
pub struct StreamSlot {
    conn: Arc<PooledConn>,
}

impl StreamSlot {
    pub fn server(&self) -> &SpiffeId {
        &self.conn.server
    }
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        if self.conn.active.fetch_sub(1, Ordering::AcqRel) == 1 {
            *self
                .conn
                .idle_since
                .lock()
                .unwrap_or_else(|p| p.into_inner()) = Instant::now();
        }
    }
}

/// The connections to one peer, and the lock that makes dialling single.
#[derive(Default)]
pub struct Entry {
    conns: Mutex<Vec<Arc<PooledConn>>>,
    pub dialing: tokio::sync::Mutex<()>,
}

impl Entry {
    /// A stream's room on a usable connection; connections that may take no
    /// new stream (closed, draining, certificates expiring, untrusted) are
    /// retired and dropped from the pool on the way.
    pub fn pick(&self, shared: &Shared) -> Option<StreamSlot> {
        let now = SystemTime::now();
        let mut conns = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        conns.retain(|c| {
            if c.is_closed() {
                return false;
            }
            match c.health.check(&shared.tls, now) {
                Ok(()) => true,
                Err(stale) => {
                    debug!(server = %c.server, reason = stale.label(), "tunnel connection retired");
                    c.retire();
                    false
                }
            }
        });
        conns.iter().find_map(|c| c.reserve())
    }

    fn add(&self, conn: Arc<PooledConn>) {
        self.conns
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(conn);
    }

    /// Connections in the pool now (tests and `/certs`-like views).
    pub fn len(&self) -> usize {
        self.conns.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

/// Every peer's entry, plus the peers remembered to have no tunnel.
/// Entries are per shard (`runtime::shard`): a connection's HTTP/2 task
/// runs on the shard that dialled it, and streams opened from another
/// thread would wake it through the kernel for every frame.
#[derive(Default)]
pub struct Pool {
    entries: Mutex<Entries>,
    no_tunnel: Mutex<HashMap<SocketAddr, Instant>>,
}

/// Entries are swept for peers with no connection left once the map has
/// doubled since the last sweep (and holds more than this), so a pod
/// talking to many live peers does not scan them all on every connection.
const SWEEP_FLOOR: usize = 64;

/// Entries by the peer sidecar's address, then by shard and the identity
/// required of the peer (a short list: looked up without hashing or
/// copying the identity).
#[derive(Default)]
struct Entries {
    map: HashMap<SocketAddr, Vec<Held>>,
    len: usize,
    sweep_at: usize,
}

struct Held {
    shard: usize,
    expect: Option<SpiffeId>,
    entry: Arc<Entry>,
}

impl Entries {
    /// Drops the entries nobody holds and that have no connection left.
    fn sweep(&mut self) {
        self.map.retain(|_, held| {
            held.retain(|h| Arc::strong_count(&h.entry) > 1 || h.entry.len() > 0);
            !held.is_empty()
        });
        self.len = self.map.values().map(Vec::len).sum();
        self.sweep_at = 2 * self.len;
    }
}

impl Pool {
    /// The calling shard's entry for the peer sidecar at `addr` that must
    /// be `expect`.
    pub fn entry(&self, addr: SocketAddr, expect: Option<&SpiffeId>) -> Arc<Entry> {
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        // Entries of peers with no connection left are dropped as we go,
        // so a pod that talked to many peers once does not keep them all.
        if entries.len > entries.sweep_at.max(SWEEP_FLOOR) {
            entries.sweep();
        }
        let shard = crate::runtime::shard();
        let held = entries.map.entry(addr).or_default();
        if let Some(h) = held
            .iter()
            .find(|h| h.shard == shard && h.expect.as_ref() == expect)
        {
            return h.entry.clone();
        }
        let entry = Arc::<Entry>::default();
        held.push(Held {
            shard,
            expect: expect.cloned(),
            entry: entry.clone(),
        });
        entries.len += 1;
        entry
    }

    /// Whether `addr` refused a tunnel within the last `memory`.
    pub fn remembered_without_tunnel(&self, addr: SocketAddr, memory: Duration) -> bool {
        let mut map = self.no_tunnel.lock().unwrap_or_else(|p| p.into_inner());
        match map.get(&addr) {
            Some(at) if at.elapsed() < memory => true,
            Some(_) => {
                map.remove(&addr);
                false
            }
            None => false,
        }
    }

    pub fn remember_without_tunnel(&self, addr: SocketAddr) {
        let mut map = self.no_tunnel.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() > 4096 {
            map.clear();
        }
        map.insert(addr, Instant::now());
    }
}

/// Starts the HTTP/2 client on a verified tunnel connection, adds it to
/// `entry`, and returns a stream's room on it.
pub async fn start(
    shared: &Arc<Shared>,
    entry: &Entry,
    dialed: crate::proxy::dial::Dialed,
) -> Option<StreamSlot> {
    let own = dialed.snapshot.leaf.as_ref().map(|l| l.not_after);
    let chain = dialed
        .tls
        .get_ref()
        .1
        .peer_certificates()
        .unwrap_or_default()
        .to_vec();
    let health = ConnHealth::for_client(&chain, dialed.snapshot.bundle.clone(), own)?;
    let settings = &shared.tunnel;
    let mut builder = h2::client::Builder::new();
    builder
        .initial_window_size(super::STREAM_WINDOW)
        .initial_connection_window_size(super::CONNECTION_WINDOW)
        .max_frame_size(super::MAX_FRAME)
        .max_send_buffer_size(super::SEND_BUFFER)
        .enable_push(false);
    let handshake = builder.handshake::<_, Bytes>(dialed.tls);
    let (send, connection) = match tokio::time::timeout(shared.handshake_timeout, handshake).await {
        Ok(Ok(pair)) => pair,
        Ok(Err(e)) => {
            info!(server = %dialed.server, error = %e, "tunnel connection failed: HTTP/2 handshake");
            return None;
        }
        Err(_) => {
            info!(server = %dialed.server, "tunnel connection failed: HTTP/2 handshake timed out");
            return None;
        }
    };
    let metrics = &shared.metrics.tunnel;
    metrics
        .connections_opened
        .with_label_values(&["outbound"])
        .inc();
    let open = Open::new(metrics.connections_open.with_label_values(&["outbound"]));
    let conn = Arc::new(PooledConn {
        send,
        active: AtomicUsize::new(0),
        max_streams: settings.max_streams as usize,
        closed: AtomicBool::new(false),
        health,
        server: dialed.server,
        idle_since: Mutex::new(Instant::now()),
    });
    let slot = conn.reserve();
    entry.add(conn.clone());
    let idle_timeout = settings.idle_timeout;
    tokio::spawn(async move {
        let _open = open;
        tokio::pin!(connection);
        loop {
            tokio::select! {
                r = &mut connection => {
                    if let Err(e) = r {
                        debug!(server = %conn.server, error = %e, "tunnel connection ended with an error");
                    }
                    break;
                }
                _ = tokio::time::sleep(IDLE_CHECK) => {
                    let idle = *conn.idle_since.lock().unwrap_or_else(|p| p.into_inner());
                    let active = conn.active.load(Ordering::Acquire);
                    if active == 0 && idle.elapsed() >= idle_timeout {
                        debug!(server = %conn.server, "idle tunnel connection closed");
                        break;
                    }
                    if active == 0 && conn.is_closed() {
                        break;
                    }
                }
            }
        }
        conn.retire();
    });
    slot
}

/// What the peer answered to a stream's CONNECT.
pub enum Opened {
    Stream(H2Stream),
    /// The peer refused it (403, 503, ...): final for this app connection.
    Refused(StatusCode),
    /// The connection could not take it (GOAWAY, reset, closed): try
    /// another connection.
    Retry,
}

/// Opens a stream to `authority` on the slot's connection. The app's first
/// bytes go with the request when they are already there (see [`Early`]).
pub async fn open(
    shared: &Shared,
    slot: &StreamSlot,
    authority: &str,
    app: &TcpStream,
    early: &mut Early,
) -> Opened {
    let conn = &slot.conn;
    let request = match Request::builder()
        .method(Method::CONNECT)
        .uri(authority)
        .body(())
    {
        Ok(r) => r,
        Err(_) => return Opened::Refused(StatusCode::BAD_REQUEST),
    };
    let send = conn.send.clone().ready();
    let mut send = match tokio::time::timeout(shared.connect_timeout, send).await {
        Ok(Ok(send)) => send,
        _ => {
            conn.retire();
            return Opened::Retry;
        }
    };
    let (response, mut stream) = match send.send_request(request, false) {
        Ok(pair) => pair,
        Err(e) => {
            debug!(error = %e, "tunnel connection refused a new stream");
            conn.retire();
            return Opened::Retry;
        }
    };
    let answer = tokio::time::timeout(shared.connect_timeout, async {
        let mut response = std::pin::pin!(response);
        if let Some(bytes) = early.resend() {
            let _ = stream.send_data(bytes, false);
        } else if early.may_read() {
            tokio::select! {
                biased;
                answer = &mut response => return answer,
                _ = app.readable() => {
                    if let Some(bytes) = early.read(app) {
                        let _ = stream.send_data(bytes, false);
                    }
                }
            }
        }
        response.await
    });
    match answer.await {
        Ok(Ok(response)) if response.status() == StatusCode::OK => {
            Opened::Stream(H2Stream::new(stream, response.into_body()))
        }
        // The peer will not take it on this connection (its certificates
        // or trust changed under it): another connection may.
        Ok(Ok(response)) if response.status() == StatusCode::MISDIRECTED_REQUEST => {
            conn.retire();
            Opened::Retry
        }
        Ok(Ok(response)) => Opened::Refused(response.status()),
        // Not processed by the peer (it is draining, or full): safe to
        // send again, on another connection. A connection that failed
        // under the stream may have delivered the app's first bytes, so
        // that is final once they were sent.
        Ok(Err(e))
            if e.reason() == Some(h2::Reason::REFUSED_STREAM)
                || e.is_go_away()
                || (e.is_io() && early.sent() == 0) =>
        {
            conn.retire();
            Opened::Retry
        }
        Ok(Err(e)) => {
            debug!(error = %e, "tunnel stream reset by the peer");
            Opened::Refused(StatusCode::BAD_GATEWAY)
        }
        Err(_) => Opened::Refused(StatusCode::GATEWAY_TIMEOUT),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([10, 0, 0, 1], port))
    }

    /// Entries nobody holds are swept; held ones survive every sweep, and
    /// sweeps get rarer as live entries grow (not one per connection).
    #[test]
    fn unused_entries_are_swept_and_live_ones_kept() {
        let pool = Pool::default();
        for port in 0..1_000 {
            drop(pool.entry(addr(port), None));
        }
        let len = pool.entries.lock().unwrap().len;
        assert!(len <= SWEEP_FLOOR + 1, "{len} unused entries kept");

        let live: Vec<_> = (0..300)
            .map(|p| (p, pool.entry(addr(10_000 + p), None)))
            .collect();
        for (p, held) in &live {
            assert!(Arc::ptr_eq(held, &pool.entry(addr(10_000 + p), None)));
        }
        let entries = pool.entries.lock().unwrap();
        assert!(entries.len >= 300);
        // The last sweep (at more than 150 entries) set the next one at
        // twice what it kept, beyond what the map holds now.
        assert!(
            entries.sweep_at >= entries.len && entries.sweep_at > 2 * SWEEP_FLOOR,
            "next sweep at {} with {} entries",
            entries.sweep_at,
            entries.len
        );
    }
}

//! How many tunnel connections each source address holds open. Every
//! connection may hold up to a connection window of bytes the app has not
//! read yet, so a peer opening connections without end could make the
//! sidecar buffer without end; past `--tunnel-max-connections-per-source`
//! a source's new connections are closed. A client sidecar opens another
//! connection only when its others carry `--tunnel-max-streams` streams
//! each (per worker thread), so the default leaves a pod room for
//! thousands of app connections to one peer.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

/// The open tunnel connections of every source address.
#[derive(Debug)]
pub struct SourceLimit {
    max: usize,
    open: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

/// One open connection of a source, counted until dropped.
#[derive(Debug)]
pub struct SourceSlot {
    source: IpAddr,
    open: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

impl SourceLimit {
    pub fn new(max: usize) -> Self {
        SourceLimit {
            max,
            open: Arc::default(),
        }
    }

    /// A slot for one more connection from `source`, unless it holds the
    /// most it may.
    pub fn acquire(&self, source: IpAddr) -> Option<SourceSlot> {
        let source = source.to_canonical();
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let count = open.entry(source).or_default();
        if *count >= self.max {
            return None;
        }
        *count += 1;
        Some(SourceSlot {
            source,
            open: self.open.clone(),
        })
    }
}

impl Drop for SourceSlot {
    fn drop(&mut self) {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(count) = open.get_mut(&self.source) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.source);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_source_holds_at_most_max_and_gets_its_slots_back() {
        let limit = SourceLimit::new(2);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let a_mapped: IpAddr = "::ffff:10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let first = limit.acquire(a).unwrap();
        let _second = limit.acquire(a_mapped).unwrap();
        assert!(limit.acquire(a).is_none(), "a third from the same source");
        let _other = limit.acquire(b).expect("another source is not held back");
        drop(first);
        assert!(limit.acquire(a).is_some(), "a slot comes back when closed");
        drop(_second);
        drop(_other);
        assert!(limit.open.lock().unwrap().is_empty());
    }
}

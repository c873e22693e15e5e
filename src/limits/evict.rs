//! A bounded set of connections in which a newcomer pushes out the oldest
//! of the least valuable ones instead of being refused.
//!
//! Refusing the newest connection when a cap is full lets whoever fills the
//! cap first keep it: a client that opens a thousand silent connections and
//! reopens them as they close would lock everybody else out. Evicting the
//! oldest entry of the lowest class (say, "no ClientHello yet") means a
//! well-behaved client, which moves to a higher class at once, keeps its
//! slot however fast the flood churns. A per-source cap keeps one address
//! from filling the whole set: when it is reached, the source's own oldest
//! entry goes, never another source's.

use std::collections::{BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::oneshot;

/// Entries of this class are never evicted (e.g. a request in flight).
pub const PROTECTED: u8 = u8::MAX;

/// Why an entry was pushed out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Eviction {
    /// Its source had `max_per_source` entries and opened another one.
    SourceFull,
    /// The set was full and another connection arrived.
    Full,
}

impl Eviction {
    /// A short label value for metrics.
    pub fn label(self) -> &'static str {
        match self {
            Eviction::SourceFull => "source_overload",
            Eviction::Full => "overload",
        }
    }
}

/// The set; clones share it.
#[derive(Clone)]
pub struct EvictionSet {
    inner: Arc<Mutex<Inner>>,
    max: usize,
    max_per_source: usize,
}

/// A key orders entries: lowest class first, then oldest first.
type Key = (u8, u64);

#[derive(Default)]
struct Inner {
    next: u64,
    order: BTreeSet<Key>,
    sources: HashMap<IpAddr, BTreeSet<Key>>,
    entries: HashMap<u64, Entry>,
}

struct Entry {
    source: IpAddr,
    class: u8,
    evict: oneshot::Sender<Eviction>,
}

impl Inner {
    fn remove(&mut self, seq: u64) -> Option<Entry> {
        let entry = self.entries.remove(&seq)?;
        let key = (entry.class, seq);
        self.order.remove(&key);
        if let Some(keys) = self.sources.get_mut(&entry.source) {
            keys.remove(&key);
            if keys.is_empty() {
                self.sources.remove(&entry.source);
            }
        }
        Some(entry)
    }

    /// Evicts the first of `keys` unless it is protected.
    fn evict_first(&mut self, first: Option<Key>, why: Eviction) -> bool {
        match first {
            Some((class, seq)) if class != PROTECTED => {
                if let Some(entry) = self.remove(seq) {
                    // The owner may be gone already; then nothing is lost.
                    let _ = entry.evict.send(why);
                }
                true
            }
            _ => false,
        }
    }
}

impl EvictionSet {
    /// A set of at most `max` entries, at most `max_per_source` of them from
    /// one address (both at least 1).
    pub fn new(max: usize, max_per_source: usize) -> Self {
        EvictionSet {
            inner: Arc::default(),
            max: max.max(1),
            max_per_source: max_per_source.max(1),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Admits a connection from `source` in `class`, evicting the oldest
    /// entry of the lowest class of the source (at its cap) or of the whole
    /// set (when full). `None` when the entry that would have to go is
    /// protected: then the newcomer is refused.
    pub fn admit(&self, source: IpAddr, class: u8) -> Option<Slot> {
        let source = source.to_canonical();
        let mut inner = self.lock();
        let of_source = inner.sources.get(&source);
        if of_source.map_or(0, BTreeSet::len) >= self.max_per_source {
            let first = of_source.and_then(|k| k.first().copied());
            if !inner.evict_first(first, Eviction::SourceFull) {
                return None;
            }
        }
        if inner.entries.len() >= self.max {
            let first = inner.order.first().copied();
            if !inner.evict_first(first, Eviction::Full) {
                return None;
            }
        }
        let seq = inner.next;
        inner.next += 1;
        let (tx, rx) = oneshot::channel();
        inner.order.insert((class, seq));
        inner
            .sources
            .entry(source)
            .or_default()
            .insert((class, seq));
        inner.entries.insert(
            seq,
            Entry {
                source,
                class,
                evict: tx,
            },
        );
        Some(Slot {
            handle: SlotHandle {
                inner: self.inner.clone(),
                seq,
            },
            evicted: rx,
            fired: None,
        })
    }

    /// Entries held now.
    pub fn len(&self) -> usize {
        self.lock().entries.len()
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A place in the set, given up when dropped.
pub struct Slot {
    handle: SlotHandle,
    evicted: oneshot::Receiver<Eviction>,
    fired: Option<Eviction>,
}

impl Slot {
    /// A handle that can change this slot's class from elsewhere (e.g. a
    /// request handler).
    pub fn handle(&self) -> SlotHandle {
        self.handle.clone()
    }

    /// Moves the slot to `class` (no effect once evicted).
    pub fn set_class(&self, class: u8) {
        self.handle.set_class(class);
    }

    /// Resolves when the slot is evicted, with the reason; never otherwise.
    pub async fn evicted(&mut self) -> Eviction {
        if let Some(why) = self.fired {
            return why;
        }
        match (&mut self.evicted).await {
            Ok(why) => {
                self.fired = Some(why);
                why
            }
            // The sender goes only with the entry, i.e. with this slot.
            Err(_) => std::future::pending().await,
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut inner = self.handle.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner.remove(self.handle.seq);
    }
}

/// Changes a slot's class; holds no place itself.
#[derive(Clone)]
pub struct SlotHandle {
    inner: Arc<Mutex<Inner>>,
    seq: u64,
}

impl SlotHandle {
    /// Moves the slot to `class` (no effect once evicted or dropped).
    pub fn set_class(&self, class: u8) {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let inner = &mut *inner;
        let Some(entry) = inner.entries.get_mut(&self.seq) else {
            return;
        };
        if entry.class == class {
            return;
        }
        let old = (entry.class, self.seq);
        let new = (class, self.seq);
        entry.class = class;
        inner.order.remove(&old);
        inner.order.insert(new);
        if let Some(keys) = inner.sources.get_mut(&entry.source) {
            keys.remove(&old);
            keys.insert(new);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([127, 0, 0, last])
    }

    fn fired(slot: &mut Slot) -> Option<Eviction> {
        slot.evicted.try_recv().ok()
    }

    #[test]
    fn a_full_set_evicts_its_oldest_lowest_class_entry() {
        let set = EvictionSet::new(3, 3);
        let mut a = set.admit(ip(1), 0).unwrap();
        let mut b = set.admit(ip(2), 0).unwrap();
        let mut c = set.admit(ip(3), 0).unwrap();
        a.set_class(1);
        let _d = set.admit(ip(4), 0).unwrap();
        assert_eq!(fired(&mut b), Some(Eviction::Full), "oldest of class 0");
        assert_eq!(fired(&mut a), None, "a higher class stays");
        assert_eq!(fired(&mut c), None);
        assert_eq!(set.len(), 3);
        let _e = set.admit(ip(5), 0).unwrap();
        assert_eq!(fired(&mut c), Some(Eviction::Full));
        assert_eq!(set.len(), 3);
        drop(b);
        drop(c);
        assert_eq!(set.len(), 3, "evicted slots were already gone");
    }

    #[test]
    fn a_source_at_its_cap_evicts_its_own_entries_only() {
        let set = EvictionSet::new(10, 2);
        let mut other = set.admit(ip(9), 0).unwrap();
        let mut a = set.admit(ip(1), 0).unwrap();
        let mut b = set.admit(ip(1), 0).unwrap();
        let _c = set.admit(ip(1), 0).unwrap();
        assert_eq!(fired(&mut a), Some(Eviction::SourceFull));
        assert_eq!(fired(&mut b), None);
        assert_eq!(fired(&mut other), None, "another source keeps its slot");
        // IPv4-mapped IPv6 is the same source.
        let mapped = IpAddr::from(std::net::Ipv4Addr::new(127, 0, 0, 1).to_ipv6_mapped());
        let _d = set.admit(mapped, 0).unwrap();
        assert_eq!(fired(&mut b), Some(Eviction::SourceFull));
        assert_eq!(set.len(), 3);
    }

    #[test]
    fn protected_entries_are_never_evicted() {
        let set = EvictionSet::new(2, 2);
        let a = set.admit(ip(1), 0).unwrap();
        let b = set.admit(ip(2), 0).unwrap();
        a.set_class(PROTECTED);
        b.handle().set_class(PROTECTED);
        assert!(set.admit(ip(3), 0).is_none(), "refused: all protected");
        b.set_class(1);
        assert!(set.admit(ip(3), 0).is_some());
    }
}

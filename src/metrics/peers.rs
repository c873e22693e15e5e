//! Peer labels for per-peer metrics: a peer's identity split into
//! `peer_trust_domain`, `peer_namespace` and `peer_service_account`, with a
//! cap on how many distinct peers get their own series. Past the cap a new
//! peer counts as `other` (and the overflow is counted), so a mesh with many
//! callers, or one client minting identities, cannot grow the number of
//! series without bound.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use prometheus::IntCounter;

use crate::authz::Peer;
use crate::identity::SpiffeId;

/// The default of `--metrics-max-peers`.
pub const DEFAULT_MAX_PEERS: usize = 100;

/// The three label values of one peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerLabel {
    pub trust_domain: String,
    pub namespace: String,
    pub service_account: String,
}

impl PeerLabel {
    fn same(word: &str) -> Self {
        PeerLabel {
            trust_domain: word.to_string(),
            namespace: word.to_string(),
            service_account: word.to_string(),
        }
    }

    /// A mesh peer's labels: `ns/<ns>/sa/<sa>` ids split; any other id
    /// form keeps its trust domain with `unknown` for the other two.
    fn of(id: &SpiffeId) -> Self {
        let (namespace, service_account) = match id.namespace() {
            Some(ns) => (
                ns.to_string(),
                id.path()
                    .rsplit('/')
                    .next()
                    .unwrap_or("unknown")
                    .to_string(),
            ),
            None => ("unknown".to_string(), "unknown".to_string()),
        };
        PeerLabel {
            trust_domain: id.trust_domain().to_string(),
            namespace,
            service_account,
        }
    }

    /// The values in label order (trust domain, namespace, service account).
    pub fn values(&self) -> [&str; 3] {
        [&self.trust_domain, &self.namespace, &self.service_account]
    }
}

/// The label names, in the order of [`PeerLabel::values`].
pub const PEER_LABELS: [&str; 3] = [
    "peer_trust_domain",
    "peer_namespace",
    "peer_service_account",
];

/// Hands out peer labels, at most `max` distinct mesh peers.
pub struct PeerLabels {
    max: AtomicUsize,
    seen: Mutex<HashMap<SpiffeId, Arc<PeerLabel>>>,
    unauthenticated: Arc<PeerLabel>,
    other: Arc<PeerLabel>,
    overflow: IntCounter,
}

impl PeerLabels {
    /// `overflow` counts the times a peer was labelled `other` for the cap.
    pub fn new(overflow: IntCounter) -> Self {
        PeerLabels {
            max: AtomicUsize::new(DEFAULT_MAX_PEERS),
            seen: Mutex::new(HashMap::new()),
            unauthenticated: Arc::new(PeerLabel::same("unauthenticated")),
            other: Arc::new(PeerLabel::same("other")),
            overflow,
        }
    }

    /// Sets the cap (`--metrics-max-peers`); peers already labelled keep
    /// their labels.
    pub fn set_max(&self, max: usize) {
        self.max.store(max, Ordering::Relaxed);
    }

    /// The labels of `peer`: its own for the first `max` mesh peers seen,
    /// `other` after that, `unauthenticated` for plaintext peers.
    pub fn label(&self, peer: &Peer) -> Arc<PeerLabel> {
        let id = match peer {
            Peer::Mesh(id) => id,
            Peer::Unauthenticated => return self.unauthenticated.clone(),
        };
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(label) = seen.get(id) {
            return label.clone();
        }
        if seen.len() >= self.max.load(Ordering::Relaxed) {
            self.overflow.inc();
            return self.other.clone();
        }
        let label = Arc::new(PeerLabel::of(id));
        seen.insert(id.clone(), label.clone());
        label
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(s: &str) -> Peer {
        Peer::Mesh(SpiffeId::parse(s).unwrap())
    }

    #[test]
    fn splits_ids_and_caps_distinct_peers() {
        let overflow = IntCounter::new("o", "o").unwrap();
        let labels = PeerLabels::new(overflow.clone());
        labels.set_max(2);
        let cases: &[(&str, [&str; 3])] = &[
            (
                "spiffe://cluster.local/ns/web/sa/frontend",
                ["cluster.local", "web", "frontend"],
            ),
            (
                "spiffe://other.org/vm/db",
                ["other.org", "unknown", "unknown"],
            ),
            // Seen before: its own labels, even at the cap.
            (
                "spiffe://cluster.local/ns/web/sa/frontend",
                ["cluster.local", "web", "frontend"],
            ),
            // A third distinct peer: over the cap.
            (
                "spiffe://cluster.local/ns/api/sa/backend",
                ["other", "other", "other"],
            ),
        ];
        for (id, want) in cases {
            assert_eq!(labels.label(&peer(id)).values(), *want, "{id}");
        }
        assert_eq!(
            labels.label(&Peer::Unauthenticated).values(),
            ["unauthenticated"; 3]
        );
        assert_eq!(overflow.get(), 1);
    }
}

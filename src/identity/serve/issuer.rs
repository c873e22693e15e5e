//! The issuer the identity service signs with, its trust bundle, and the
//! serving certificate minted from it. Replaced as a whole when the files
//! change (hot reload) so a request never sees a new issuer with an old bundle.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use bytes::Bytes;
use rustls::ServerConfig;
use tracing::{info, warn};

use super::metrics::CaMetrics;
use crate::identity::{CaFiles, Issuer, Leaf, SpiffeId, TrustDomain};
use crate::tls::TrustBundle;

/// How long the serving certificate lives (capped at the issuer's expiry);
/// it is re-minted at half of that.
const SERVING_TTL: Duration = Duration::from_secs(24 * 3600);

/// The files behind the issuer.
#[derive(Debug, Clone)]
pub struct IssuerFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub bundle: PathBuf,
}

impl IssuerFiles {
    pub fn paths(&self) -> Vec<PathBuf> {
        vec![self.cert.clone(), self.key.clone(), self.bundle.clone()]
    }
}

/// What the service serves with right now.
pub struct Served {
    pub issuer: Arc<Issuer>,
    pub bundle_pem: Bytes,
    pub serving: Leaf,
    pub tls: Arc<ServerConfig>,
}

/// The name the service's own certificate carries.
#[derive(Debug, Clone)]
pub struct ServingName {
    pub id: SpiffeId,
    pub dns: Vec<String>,
}

impl ServingName {
    /// `<service>.<namespace>.svc` (and `.svc.cluster.local`), and the
    /// identity `spiffe://<td>/ns/<namespace>/sa/portcullis-ca`.
    pub fn new(td: &TrustDomain, namespace: &str, service: &str) -> Result<Self, String> {
        let id = SpiffeId::workload(td, namespace, "portcullis-ca").map_err(|e| e.to_string())?;
        Ok(ServingName {
            id,
            dns: vec![
                format!("{service}.{namespace}.svc"),
                format!("{service}.{namespace}.svc.cluster.local"),
            ],
        })
    }
}

/// Checks a new issuer (`contents` = cert, key, bundle files) and mints the
/// serving certificate from it. The issuer must be a CA, match its key, be
/// in date, be of our trust domain, and sign leaves that verify against the bundle.
pub fn load(
    files: &IssuerFiles,
    contents: &[Vec<u8>],
    td: &TrustDomain,
    name: &ServingName,
) -> Result<Served, String> {
    let ca = CaFiles {
        cert: files.cert.clone(),
        key: files.key.clone(),
    };
    let issuer =
        Issuer::from_pem(&ca, &contents[0], &contents[1], td).map_err(|e| e.to_string())?;
    let bundle = TrustBundle::from_pem(&files.bundle, &contents[2])?;
    crate::tls::check_issuer(&issuer, td, bundle.roots.clone())
        .map_err(|e| format!("{}: {e} ({})", files.cert.display(), files.bundle.display()))?;
    mint(Arc::new(issuer), Bytes::from(contents[2].clone()), name)
}

fn mint(issuer: Arc<Issuer>, bundle_pem: Bytes, name: &ServingName) -> Result<Served, String> {
    let serving = issuer
        .issue_server(&name.id, &name.dns, SERVING_TTL)
        .map_err(|e| format!("minting the serving certificate: {e}"))?;
    let mut tls = ServerConfig::builder_with_provider(crate::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(serving.chain.clone(), serving.key.clone_key())
        .map_err(|e| format!("serving certificate: {e}"))?;
    tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Served {
        issuer,
        bundle_pem,
        serving,
        tls: Arc::new(tls),
    })
}

/// The current issuer, shared by every request; one writer (the reloader
/// and the serving-certificate refresher), many readers.
pub struct LiveIssuer {
    current: ArcSwap<Served>,
    name: ServingName,
    metrics: Arc<CaMetrics>,
}

impl LiveIssuer {
    pub fn new(served: Served, name: ServingName, metrics: Arc<CaMetrics>) -> Self {
        let live = LiveIssuer {
            current: ArcSwap::from_pointee(served),
            name,
            metrics,
        };
        live.note_expiry();
        live
    }

    pub fn current(&self) -> Arc<Served> {
        self.current.load_full()
    }

    /// Serves with `served` from the next request and handshake on.
    pub fn set(&self, served: Served) {
        info!(
            issuer = %served.issuer.subject,
            not_after = %served.issuer.not_after,
            serving_serial = %served.serving.serial,
            "issuer in use; serving certificate minted"
        );
        self.current.store(Arc::new(served));
        self.note_expiry();
    }

    fn note_expiry(&self) {
        let t = self.current.load().issuer.not_after.unix_timestamp();
        self.metrics.issuer_expiry.set(t as f64);
    }

    /// Re-mints the serving certificate once it is past half of its life,
    /// so a long-lived issuer never leaves the service with an expired one.
    pub fn refresh_serving(&self) {
        let cur = self.current();
        let life = cur
            .serving
            .not_after
            .duration_since(cur.serving.not_before)
            .unwrap_or_default();
        let due = cur.serving.not_before + life / 2;
        if SystemTime::now() < due {
            return;
        }
        match mint(cur.issuer.clone(), cur.bundle_pem.clone(), &self.name) {
            Ok(served) => {
                // Only if no reload replaced the issuer meanwhile.
                let prev = self.current.compare_and_swap(&cur, Arc::new(served));
                if Arc::ptr_eq(&prev, &cur) {
                    info!("serving certificate re-minted");
                }
            }
            Err(e) => warn!(error = %e, "could not re-mint the serving certificate"),
        }
    }
}

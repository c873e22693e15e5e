//! The current TLS configs. One writer (rotator and bundle reloader, through
//! `set_leaf`/`set_bundle`), many readers; a connection takes one snapshot
//! and keeps it, so a rotation never touches an open connection.

use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use arc_swap::ArcSwap;
use rustls::client::Resumption;
use rustls::crypto::CryptoProvider;
use rustls::server::NoServerSessionStorage;
use rustls::{ClientConfig, ServerConfig};

use super::{provider, Error, MeshVerifier, TrustBundle, ALPN, TUNNEL_ALPN};
use crate::identity::{Leaf, TrustDomain};

/// What new handshakes use right now.
pub struct Snapshot {
    pub leaf: Option<Arc<Leaf>>,
    pub bundle: Arc<TrustBundle>,
    /// `None` until the first leaf arrives.
    pub server: Option<Arc<ServerConfig>>,
    pub client: Option<Arc<ClientConfig>>,
    /// The same, for the tunnel: the server offers ALPN `h2` only; the
    /// client offers `h2` then `portcullis/1`, so a peer that has no tunnel
    /// still completes the handshake as one per-connection link.
    pub tunnel_server: Option<Arc<ServerConfig>>,
    pub tunnel_client: Option<Arc<ClientConfig>>,
    /// The inbound listener's config when this sidecar serves no tunnel
    /// (`--tunnel-listen off`): ALPN `portcullis/1` only.
    pub link_server: Option<Arc<ServerConfig>>,
}

/// Why this sidecar takes part in no mesh handshake right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unusable {
    /// No leaf has arrived yet.
    NoCertificate,
    /// Our own leaf has expired and no new one came (the issuer or the
    /// identity service could not be reached in time). A peer would refuse
    /// it anyway; refusing here says why, on our side.
    Expired,
}

impl Unusable {
    /// The `result` label of `portcullis_tls_handshakes_total`.
    pub fn label(self) -> &'static str {
        match self {
            Unusable::NoCertificate => "no_certificate",
            Unusable::Expired => "own_cert_expired",
        }
    }
}

impl std::fmt::Display for Unusable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Unusable::NoCertificate => "no certificate yet",
            Unusable::Expired => "our certificate has expired and renewal has not succeeded",
        })
    }
}

impl Snapshot {
    /// The server config for a handshake starting `now`.
    pub fn server_at(&self, now: SystemTime) -> Result<Arc<ServerConfig>, Unusable> {
        self.usable(now)?;
        self.server.clone().ok_or(Unusable::NoCertificate)
    }

    /// The client config for a handshake starting `now`.
    pub fn client_at(&self, now: SystemTime) -> Result<Arc<ClientConfig>, Unusable> {
        self.usable(now)?;
        self.client.clone().ok_or(Unusable::NoCertificate)
    }

    /// The tunnel listener's server config for a handshake starting `now`.
    pub fn tunnel_server_at(&self, now: SystemTime) -> Result<Arc<ServerConfig>, Unusable> {
        self.usable(now)?;
        self.tunnel_server.clone().ok_or(Unusable::NoCertificate)
    }

    /// The tunnel client config for a handshake starting `now`.
    pub fn tunnel_client_at(&self, now: SystemTime) -> Result<Arc<ClientConfig>, Unusable> {
        self.usable(now)?;
        self.tunnel_client.clone().ok_or(Unusable::NoCertificate)
    }

    /// The inbound server config without the tunnel, for a handshake starting `now`.
    pub fn link_server_at(&self, now: SystemTime) -> Result<Arc<ServerConfig>, Unusable> {
        self.usable(now)?;
        self.link_server.clone().ok_or(Unusable::NoCertificate)
    }

    fn usable(&self, now: SystemTime) -> Result<(), Unusable> {
        match &self.leaf {
            None => Err(Unusable::NoCertificate),
            Some(leaf) if leaf.not_after <= now => Err(Unusable::Expired),
            Some(_) => Ok(()),
        }
    }
}

/// The mesh TLS state shared by all listeners.
pub struct MeshTls {
    td: TrustDomain,
    current: ArcSwap<Snapshot>,
    writer: Mutex<()>,
}

impl MeshTls {
    pub fn new(td: TrustDomain, bundle: TrustBundle) -> Self {
        let snapshot = Snapshot {
            leaf: None,
            bundle: Arc::new(bundle),
            server: None,
            client: None,
            tunnel_server: None,
            tunnel_client: None,
            link_server: None,
        };
        MeshTls {
            td,
            current: ArcSwap::from_pointee(snapshot),
            writer: Mutex::new(()),
        }
    }

    pub fn trust_domain(&self) -> &TrustDomain {
        &self.td
    }

    /// The configs for the next handshake.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    /// Uses `leaf` for every new handshake.
    pub fn set_leaf(&self, leaf: Arc<Leaf>) -> Result<(), Error> {
        let _w = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        let bundle = self.current.load().bundle.clone();
        self.publish(Some(leaf), bundle)
    }

    /// Verifies peers against `bundle` from the next handshake on.
    pub fn set_bundle(&self, bundle: TrustBundle) -> Result<(), Error> {
        let _w = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        let leaf = self.current.load().leaf.clone();
        self.publish(leaf, Arc::new(bundle))
    }

    fn publish(&self, leaf: Option<Arc<Leaf>>, bundle: Arc<TrustBundle>) -> Result<(), Error> {
        let mut snapshot = Snapshot {
            leaf: None,
            bundle,
            server: None,
            client: None,
            tunnel_server: None,
            tunnel_client: None,
            link_server: None,
        };
        if let Some(leaf) = &leaf {
            let (server, client) = mesh_configs(provider(), &self.td, leaf, &snapshot.bundle)?;
            let mut tunnel_server = server.clone();
            tunnel_server.alpn_protocols = vec![TUNNEL_ALPN.to_vec()];
            let mut link_server = server.clone();
            link_server.alpn_protocols = vec![ALPN.to_vec()];
            let mut tunnel_client = client.clone();
            tunnel_client.alpn_protocols = vec![TUNNEL_ALPN.to_vec(), ALPN.to_vec()];
            snapshot.server = Some(Arc::new(server));
            snapshot.client = Some(Arc::new(client));
            snapshot.tunnel_server = Some(Arc::new(tunnel_server));
            snapshot.tunnel_client = Some(Arc::new(tunnel_client));
            snapshot.link_server = Some(Arc::new(link_server));
        }
        snapshot.leaf = leaf;
        self.current.store(Arc::new(snapshot));
        Ok(())
    }
}

/// Server and client configs for one leaf and bundle. Session resumption is
/// off so that every connection is verified against the current bundle.
/// Sidecars pass [`provider()`]; tests and benches pass one with fewer key
/// exchange groups to play a peer without post-quantum key exchange.
pub fn mesh_configs(
    provider: Arc<CryptoProvider>,
    td: &TrustDomain,
    leaf: &Leaf,
    bundle: &TrustBundle,
) -> Result<(ServerConfig, ClientConfig), Error> {
    let verifier = Arc::new(MeshVerifier::new(bundle.roots.clone(), td.clone())?);
    let mut server = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier.clone())
        .with_single_cert(leaf.chain.clone(), leaf.key.clone_key())?;
    // A tunnel client offers `h2` first; an older client offers only
    // `portcullis/1` and gets a connection of its own, as before.
    server.alpn_protocols = vec![TUNNEL_ALPN.to_vec(), ALPN.to_vec()];
    server.send_tls13_tickets = 0;
    server.session_storage = Arc::new(NoServerSessionStorage {});
    let mut client = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(leaf.chain.clone(), leaf.key.clone_key())?;
    client.alpn_protocols = vec![ALPN.to_vec()];
    client.resumption = Resumption::disabled();
    client.enable_sni = false;
    Ok((server, client))
}

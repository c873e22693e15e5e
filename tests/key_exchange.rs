//! Post-quantum key exchange between sidecars, over real TLS on loopback:
//! two sidecars agree on X25519MLKEM768; peers without it (X25519 only,
//! P-256 only) still connect, in both roles; every successful handshake is
//! counted in `portcullis_tls_key_exchanges_total` under the group it used.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use portcullis::identity::Leaf;
use portcullis::tls::{kx_group_label, mesh_configs, provider, TrustBundle};
use rustls::crypto::{ring::kx_group, SupportedKxGroup};
use rustls::NamedGroup;
use tokio::net::TcpListener;

const KX: &str = "portcullis_tls_key_exchanges_total";

/// Mesh client and server configs (exactly the sidecar's) whose provider
/// offers only `groups`.
fn configs_with(
    groups: &[&'static dyn SupportedKxGroup],
    leaf: &Leaf,
    bundle_pem: &[u8],
) -> (Arc<rustls::ServerConfig>, Arc<rustls::ClientConfig>) {
    let mut p = (*provider()).clone();
    p.kx_groups = groups.to_vec();
    let bundle = TrustBundle::from_pem(Path::new("bundle"), bundle_pem).unwrap();
    let (server, client) = mesh_configs(Arc::new(p), &td(), leaf, &bundle).unwrap();
    (Arc::new(server), Arc::new(client))
}

async fn count(sidecar: &Sidecar, direction: &str, group: &str, want: f64) {
    let what = format!("{KX}{{direction={direction},group={group}}} = {want}");
    eventually(&what, Duration::from_secs(5), || async {
        sidecar.metric(KX, &[("direction", direction), ("group", group)]) == want
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecars_negotiate_x25519mlkem768() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::root(dir.path(), "ca", TD);
    let pair = Pair::start(&ca, &ca.files.cert, &[], &[]).await;
    // Three app connections ride one tunnel connection: one handshake.
    for _ in 0..3 {
        assert!(pair.ping(b"post-quantum").await);
    }
    count(&pair.a, "outbound", "x25519mlkem768", 1.0).await;
    count(&pair.b, "inbound", "x25519mlkem768", 1.0).await;
    for (sidecar, direction) in [(&pair.a, "outbound"), (&pair.b, "inbound")] {
        assert_eq!(sidecar.metric(KX, &[("direction", direction)]), 1.0);
    }

    // What a direct mesh client sees: the same group, named the same way.
    let config = client_config(ca.leaf("direct"), &ca.cert_pem());
    let tls = tls_connect(config, pair.b.addrs.inbound).await.unwrap();
    let (_, conn) = tls.get_ref();
    assert_eq!(
        conn.negotiated_key_exchange_group().map(|g| g.name()),
        Some(NamedGroup::X25519MLKEM768)
    );
    assert_eq!(kx_group_label(conn), "x25519mlkem768");
    assert_eq!(round_trip(tls, b"hi").await.unwrap(), b"hi");
    count(&pair.b, "inbound", "x25519mlkem768", 2.0).await;

    // `/certs` lists what the sidecar offers, most preferred first.
    let (status, body) = http_get(pair.b.addrs.admin, "/certs").await.unwrap();
    assert_eq!(status, 200);
    let certs: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        certs["key_exchange_groups"],
        serde_json::json!(["x25519mlkem768", "x25519", "secp256r1", "secp384r1"])
    );
}

/// A client without the hybrid still gets through to a sidecar, which counts
/// the classical group it used.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn classical_only_clients_still_connect() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::root(dir.path(), "ca", TD);
    let pair = Pair::start(&ca, &ca.files.cert, &[], &[]).await;
    let cases: [(&'static dyn SupportedKxGroup, &str, NamedGroup); 2] = [
        (kx_group::X25519, "x25519", NamedGroup::X25519),
        (kx_group::SECP256R1, "secp256r1", NamedGroup::secp256r1),
    ];
    for (group, label, name) in cases {
        let (_, client) = configs_with(&[group], &ca.leaf("legacy"), &ca.cert_pem());
        let tls = tls_connect(client, pair.b.addrs.inbound).await.unwrap();
        let (_, conn) = tls.get_ref();
        assert_eq!(
            conn.negotiated_key_exchange_group().map(|g| g.name()),
            Some(name)
        );
        assert_eq!(
            round_trip(tls, label.as_bytes()).await.unwrap(),
            label.as_bytes()
        );
        count(&pair.b, "inbound", label, 1.0).await;
    }
    assert_eq!(
        pair.b.metric(KX, &[("group", "x25519mlkem768")]),
        0.0,
        "no hybrid handshake happened"
    );
}

/// The other way round: a sidecar's outbound side reaches a server without
/// the hybrid. The client sends an X25519 share beside the hybrid one, so
/// the server picks X25519 from the first ClientHello.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecar_reaches_a_classical_only_server() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::root(dir.path(), "ca", TD);
    let (server, _) = configs_with(&[kx_group::X25519], &ca.leaf("server"), &ca.cert_pem());
    // An older sidecar: one connection per app connection, no tunnel.
    let mut server = (*server).clone();
    server.alpn_protocols = vec![b"portcullis/1".to_vec()];
    let server = Arc::new(server);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let peer = listener.local_addr().unwrap();
    let served = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let mut tls = tokio_rustls::TlsAcceptor::from(server)
            .accept(tcp)
            .await
            .unwrap();
        let group = tls.get_ref().1.negotiated_key_exchange_group().unwrap();
        let name = group.name();
        let mut buf = [0u8; 4];
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        tls.read_exact(&mut buf).await.unwrap();
        tls.write_all(&buf).await.unwrap();
        tls.shutdown().await.unwrap();
        name
    });

    let mut args = issuer_args(&ca, &ca.files.cert, "client");
    args.extend([
        "--upstream".to_string(),
        format!("127.0.0.1:0={peer}={}", id("server")),
    ]);
    let a = Sidecar::start(&args).await;
    let app = tokio::net::TcpStream::connect(a.upstream()).await.unwrap();
    assert_eq!(round_trip(app, b"ping").await.unwrap(), b"ping");
    assert_eq!(served.await.unwrap(), NamedGroup::X25519);
    count(&a, "outbound", "x25519", 1.0).await;
    assert_eq!(a.metric(KX, &[("group", "x25519mlkem768")]), 0.0);
}

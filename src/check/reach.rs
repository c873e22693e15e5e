//! Whether the identity service (`--ca-url`) answers: a TCP connection,
//! then a TLS 1.3 handshake verified against the trust bundle and the URL's
//! host, as the sidecar makes it when it renews its certificate.

use std::net::{TcpStream, ToSocketAddrs};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use super::Finding;
use crate::identity::CaUrl;
use crate::tls::TrustBundle;

const NAME: &str = "identity-service";

/// The `identity-service` finding.
pub fn identity_service(url: Option<&str>, bundle: Option<&Path>, timeout: Duration) -> Finding {
    let Some(url) = url else {
        return Finding::ok(
            NAME,
            "not used: no --ca-url (PORTCULLIS_CA_URL), the sidecar signs its own certificate",
        );
    };
    let parsed = match CaUrl::parse(url) {
        Ok(u) => u,
        Err(e) => return Finding::fail(
            NAME,
            format!("--ca-url: {e}"),
            "set --ca-url to the identity service, e.g. https://portcullis-ca.portcullis.svc:15012",
        ),
    };
    let unreachable_fix = format!(
        "check that the identity service runs and is reachable from this pod on port {} (kubectl -n portcullis get pods,svc; a NetworkPolicy may block it)",
        parsed.port
    );
    let addrs = match (parsed.connect_host.as_str(), parsed.port).to_socket_addrs() {
        Ok(a) => a.collect::<Vec<_>>(),
        Err(e) => {
            return Finding::fail(
                NAME,
                format!("{url}: {}: {e}", parsed.connect_host),
                unreachable_fix,
            )
        }
    };
    let mut last = None;
    let mut tcp = None;
    for addr in &addrs {
        match TcpStream::connect_timeout(addr, timeout) {
            Ok(s) => {
                tcp = Some(s);
                break;
            }
            Err(e) => last = Some(format!("{addr}: {e}")),
        }
    }
    let Some(tcp) = tcp else {
        let why = last.unwrap_or_else(|| "no address".into());
        return Finding::fail(NAME, format!("{url}: {why}"), unreachable_fix);
    };
    let bundle = match bundle.map(TrustBundle::load) {
        Some(Ok(b)) => b,
        Some(Err(e)) => {
            return Finding::ok(
                NAME,
                format!("{url}: TCP connects; TLS not checked (trust bundle: {e})"),
            )
        }
        None => {
            return Finding::ok(
                NAME,
                format!("{url}: TCP connects; TLS not checked (no --trust-bundle)"),
            )
        }
    };
    match handshake(tcp, &parsed, &bundle, timeout) {
        Ok(()) => Finding::ok(NAME, format!("{url}: TLS handshake verified")),
        Err(e) => Finding::fail(
            NAME,
            format!("{url}: TLS: {e}"),
            "the identity service's certificate must chain to the trust bundle and name the URL's host; re-issue it or fix --ca-url",
        ),
    }
}

fn handshake(
    mut tcp: TcpStream,
    url: &CaUrl,
    bundle: &TrustBundle,
    timeout: Duration,
) -> Result<(), String> {
    tcp.set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    tcp.set_write_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    let config = rustls::ClientConfig::builder_with_provider(crate::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| e.to_string())?
        .with_root_certificates(bundle.roots.clone())
        .with_no_client_auth();
    let mut conn = rustls::ClientConnection::new(Arc::new(config), url.host.clone())
        .map_err(|e| e.to_string())?;
    // Each round trip moves the handshake on; TLS 1.3 needs two or three.
    for _ in 0..16 {
        if !conn.is_handshaking() {
            break;
        }
        conn.complete_io(&mut tcp).map_err(|e| e.to_string())?;
    }
    if conn.is_handshaking() {
        return Err("the handshake did not finish".into());
    }
    conn.send_close_notify();
    let _ = conn.complete_io(&mut tcp);
    Ok(())
}

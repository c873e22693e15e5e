//! Probe rewriting, the sidecar's half: `GET /app-health/<container>/<kind>`
//! runs the app's original probe (HTTP GET, TCP connect or gRPC health
//! check) from inside the pod and answers 200 or 503. The kubelet calls this
//! on the admin port, which interception leaves alone, so probes keep
//! working under strict mTLS and a default-deny rule set. The originals come
//! from `PORTCULLIS_APP_PROBES` (written by the injector, see
//! `inject/probes.rs`); the app is reached at `PORTCULLIS_POD_IP`, where the
//! kubelet would reach it, else on loopback.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use crate::inject::probes::{AppProbe, AppProbes, Grpc, HttpGet};

/// Probes and the app's address, read once from the environment.
struct Env {
    probes: Result<AppProbes, String>,
    host: IpAddr,
}

fn env() -> &'static Env {
    static ENV: OnceLock<Env> = OnceLock::new();
    ENV.get_or_init(|| Env {
        probes: match std::env::var(crate::inject::probes::ENV) {
            Ok(s) => {
                serde_json::from_str(&s).map_err(|e| format!("{}: {e}", crate::inject::probes::ENV))
            }
            Err(_) => Ok(AppProbes::new()),
        },
        host: std::env::var("PORTCULLIS_POD_IP")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST)),
    })
}

/// Answers `/app-health/...` requests; `None` for every other path.
pub async fn route<B>(req: &Request<B>) -> Option<Response<Full<Bytes>>> {
    let rest = req.uri().path().strip_prefix("/app-health/")?;
    let reply = |status: StatusCode, body: String| {
        let mut r = Response::new(Full::new(Bytes::from(body)));
        *r.status_mut() = status;
        r
    };
    if req.method() != hyper::Method::GET {
        return Some(reply(StatusCode::METHOD_NOT_ALLOWED, "use GET\n".into()));
    }
    let env = env();
    let probes = match &env.probes {
        Ok(p) => p,
        Err(e) => return Some(reply(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n"))),
    };
    let Some(probe) = rest
        .split_once('/')
        .and_then(|(c, k)| probes.get(c)?.get(k))
    else {
        return Some(reply(StatusCode::NOT_FOUND, "no such probe\n".into()));
    };
    Some(match check(probe, env.host).await {
        Ok(()) => reply(StatusCode::OK, "ok\n".into()),
        Err(e) => {
            tracing::debug!(probe = rest, error = %e, "app probe failed");
            reply(StatusCode::SERVICE_UNAVAILABLE, format!("{e}\n"))
        }
    })
}

/// Runs one probe against the app within its timeout.
pub async fn check(probe: &AppProbe, default_host: IpAddr) -> Result<(), String> {
    let limit = Duration::from_secs(probe.timeout_seconds.max(1));
    let run = async {
        if let Some(h) = &probe.http_get {
            http_get(h, default_host).await
        } else if let Some(t) = &probe.tcp_socket {
            connect(t.host.as_deref(), default_host, t.port)
                .await
                .map(drop)
        } else if let Some(g) = &probe.grpc {
            grpc(g, default_host).await
        } else {
            Err("probe has no handler".into())
        }
    };
    tokio::time::timeout(limit, run)
        .await
        .unwrap_or_else(|_| Err(format!("timed out after {limit:?}")))
}

async fn connect(host: Option<&str>, default_host: IpAddr, port: u16) -> Result<TcpStream, String> {
    let r = match host {
        Some(h) => TcpStream::connect((h, port)).await,
        None => TcpStream::connect((default_host, port)).await,
    };
    r.map_err(|e| format!("connect to port {port}: {e}"))
}

/// Like the kubelet: success is a status from 200 to 399; HTTPS
/// certificates are not verified.
async fn http_get(h: &HttpGet, default_host: IpAddr) -> Result<(), String> {
    let tcp = connect(h.host.as_deref(), default_host, h.port).await?;
    let authority = match &h.host {
        Some(host) => format!("{host}:{}", h.port),
        None if default_host.is_ipv6() => format!("[{default_host}]:{}", h.port),
        None => format!("{default_host}:{}", h.port),
    };
    let mut req = Request::get(&h.path)
        .header(hyper::header::USER_AGENT, "kube-probe/portcullis")
        .header(hyper::header::ACCEPT, "*/*");
    if !h
        .http_headers
        .iter()
        .any(|x| x.name.eq_ignore_ascii_case("host"))
    {
        req = req.header(hyper::header::HOST, &authority);
    }
    for x in &h.http_headers {
        req = req.header(x.name.as_str(), x.value.as_str());
    }
    let req = req.body(Empty::<Bytes>::new()).map_err(|e| e.to_string())?;
    let status = if h.scheme == "HTTPS" {
        let name = rustls::pki_types::ServerName::try_from(
            h.host.clone().unwrap_or_else(|| default_host.to_string()),
        )
        .map_err(|e| e.to_string())?;
        let tls = tokio_rustls::TlsConnector::from(insecure_client())
            .connect(name, tcp)
            .await
            .map_err(|e| format!("tls: {e}"))?;
        send_http1(tls, req).await?
    } else {
        send_http1(tcp, req).await?
    };
    if (200..400).contains(&status.as_u16()) {
        Ok(())
    } else {
        Err(format!("HTTP status {status}"))
    }
}

async fn send_http1<S>(io: S, req: Request<Empty<Bytes>>) -> Result<StatusCode, String>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
    Ok(resp.status())
}

/// `grpc.health.v1.Health/Check` over cleartext HTTP/2, as the kubelet's
/// gRPC probe does; SERVING (1) is success.
async fn grpc(g: &Grpc, default_host: IpAddr) -> Result<(), String> {
    let tcp = connect(None, default_host, g.port).await?;
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .map_err(|e| format!("http/2: {e}"))?;
    tokio::spawn(conn);
    // HealthCheckRequest { string service = 1; }, behind the 5-byte gRPC frame header.
    let service = g.service.as_deref().unwrap_or("");
    let mut msg = Vec::new();
    if !service.is_empty() {
        msg.push(0x0a);
        push_varint(&mut msg, service.len() as u64);
        msg.extend_from_slice(service.as_bytes());
    }
    let mut frame = vec![0u8];
    frame.extend_from_slice(&(msg.len() as u32).to_be_bytes());
    frame.extend_from_slice(&msg);
    let authority = match default_host {
        IpAddr::V6(a) => format!("[{a}]:{}", g.port),
        IpAddr::V4(a) => format!("{a}:{}", g.port),
    };
    let req = Request::post(format!("http://{authority}/grpc.health.v1.Health/Check"))
        .header(hyper::header::CONTENT_TYPE, "application/grpc")
        .header(hyper::header::TE, "trailers")
        .header(hyper::header::USER_AGENT, "kube-probe/portcullis")
        .body(Full::new(Bytes::from(frame)))
        .map_err(|e| e.to_string())?;
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| format!("grpc: {e}"))?;
    let head_status = resp.headers().get("grpc-status").cloned();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| format!("grpc: {e}"))?;
    let status = body
        .trailers()
        .and_then(|t| t.get("grpc-status").cloned())
        .or(head_status);
    match status.as_ref().and_then(|s| s.to_str().ok()) {
        Some("0") => {}
        Some(code) => return Err(format!("grpc-status {code}")),
        None => return Err("no grpc-status".into()),
    }
    let bytes = body.to_bytes();
    // HealthCheckResponse { ServingStatus status = 1; } with SERVING = 1.
    match bytes.get(5..) {
        Some([0x08, 1, ..]) => Ok(()),
        Some(rest) => Err(format!("not SERVING (response {rest:02x?})")),
        None => Err("short gRPC response".into()),
    }
}

fn push_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// A TLS client that accepts any server certificate, as the kubelet's HTTPS
/// probes do; used only for an app's own probe endpoint.
fn insecure_client() -> Arc<rustls::ClientConfig> {
    static CFG: OnceLock<Arc<rustls::ClientConfig>> = OnceLock::new();
    CFG.get_or_init(|| {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let cfg = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .expect("default versions")
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyCert(provider)))
            .with_no_client_auth();
        Arc::new(cfg)
    })
    .clone()
}

#[derive(Debug)]
struct AnyCert(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyCert {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests;

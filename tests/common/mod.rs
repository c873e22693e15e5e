//! Shared test harness: a PKI in a temp dir, in-process sidecars on port 0,
//! an echo server, test TLS clients and a metrics reader.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use clap::Parser;
use portcullis::app::{App, BoundAddrs};
use portcullis::config::{Cli, Command};
use portcullis::drain::Drain;
use portcullis::identity::{CaFiles, Issuer, Leaf, LeafRequest, NewCa, SpiffeId, TrustDomain};
use portcullis::metrics::Metrics;
use portcullis::tls::{MeshTls, TrustBundle};
use rcgen::{CertificateParams, DnType, IsCa, KeyPair, SanType};
use rustls::pki_types::{CertificateDer, PrivatePkcs8KeyDer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

pub const TD: &str = "cluster.local";

pub fn td() -> TrustDomain {
    TrustDomain::new(TD).unwrap()
}

pub fn id(sa: &str) -> SpiffeId {
    SpiffeId::workload(&td(), "default", sa).unwrap()
}

/// Waits until `check` holds, polling; panics with `what` after `limit`.
pub async fn eventually<F, Fut>(what: &str, limit: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    while !check().await {
        if tokio::time::Instant::now() > deadline {
            panic!("timed out after {limit:?} waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Reads a JSON-logging child's stderr `lines` until the line whose message
/// is `message` and returns its fields; `seen` is handed every line read.
/// Panics if the child's stderr ends first.
pub fn await_log_line<I>(
    lines: &mut I,
    message: &str,
    mut seen: impl FnMut(&str),
) -> serde_json::Value
where
    I: Iterator<Item = std::io::Result<String>>,
{
    loop {
        let line = lines
            .next()
            .unwrap_or_else(|| panic!("the child logged {message:?} before its stderr ended"))
            .unwrap();
        seen(&line);
        let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
        if v["message"] == message {
            return v;
        }
    }
}

/// Writes a file atomically (temp file + rename), as editors and kubelet do.
pub fn write_atomic(path: &Path, bytes: &[u8]) {
    let tmp = path.with_extension("tmp-write");
    std::fs::write(&tmp, bytes).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// A CA directory made for a test.
pub struct Ca {
    pub dir: PathBuf,
    pub files: CaFiles,
}

impl Ca {
    /// A new root for `td` in `parent/name`.
    pub fn root(parent: &Path, name: &str, trust_domain: &str) -> Ca {
        let dir = parent.join(name);
        let td = TrustDomain::new(trust_domain).unwrap();
        let files = NewCa::root(&td, Duration::from_secs(86400))
            .unwrap()
            .write(&dir, false)
            .unwrap();
        Ca { dir, files }
    }

    pub fn cert_pem(&self) -> Vec<u8> {
        std::fs::read(&self.files.cert).unwrap()
    }

    pub fn issuer(&self) -> Issuer {
        Issuer::load(&self.files, &td()).unwrap()
    }

    /// A leaf for `sa` signed by this CA.
    pub fn leaf(&self, sa: &str) -> Leaf {
        self.issuer()
            .issue(&LeafRequest {
                id: id(sa),
                ttl: Duration::from_secs(3600),
            })
            .unwrap()
    }

    /// A leaf with arbitrary URI SANs and validity, signed by this CA, for
    /// playing bad peers.
    pub fn custom_leaf(&self, uris: &[&str], valid_from: SystemTime, valid_to: SystemTime) -> Leaf {
        let ca_params =
            CertificateParams::from_ca_cert_pem(&String::from_utf8(self.cert_pem()).unwrap())
                .unwrap();
        let ca_key = KeyPair::from_pem(&std::fs::read_to_string(&self.files.key).unwrap()).unwrap();
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::default();
        params
            .distinguished_name
            .push(DnType::OrganizationName, "test");
        params.is_ca = IsCa::ExplicitNoCa;
        params.extended_key_usages = vec![
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.subject_alt_names = uris
            .iter()
            .map(|u| SanType::URI((*u).try_into().unwrap()))
            .collect();
        params.not_before = valid_from.into();
        params.not_after = valid_to.into();
        let cert = params.signed_by(&key, &ca, &ca_key).unwrap();
        let chain = vec![cert.der().clone(), CertificateDer::from(ca.der().to_vec())];
        Leaf::new(
            id("test"),
            chain,
            PrivatePkcs8KeyDer::from(key.serialize_der()).into(),
        )
        .unwrap()
    }
}

/// A TLS client config presenting `leaf` and trusting `bundle_pem`, the way
/// a sidecar's outbound side would.
pub fn client_config(leaf: Leaf, bundle_pem: &[u8]) -> Arc<rustls::ClientConfig> {
    let bundle = TrustBundle::from_pem(Path::new("bundle"), bundle_pem).unwrap();
    let tls = MeshTls::new(td(), bundle);
    tls.set_leaf(Arc::new(leaf)).unwrap();
    tls.snapshot().client.clone().unwrap()
}

/// Connects with mesh TLS directly to a sidecar's inbound listener.
pub async fn tls_connect(
    config: Arc<rustls::ClientConfig>,
    addr: SocketAddr,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    let name = rustls::pki_types::ServerName::IpAddress(addr.ip().into());
    tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
}

/// An in-process sidecar.
pub struct Sidecar {
    pub addrs: BoundAddrs,
    pub metrics: Arc<Metrics>,
    pub drain: Drain,
    pub task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Sidecar {
    /// Starts `portcullis run` with `args` (listeners default to port 0 on
    /// loopback) and waits until it is ready.
    pub async fn start<S: AsRef<str>>(args: &[S]) -> Sidecar {
        let sidecar = Sidecar::spawn_with(args, |_| {}).await;
        sidecar.wait_ready().await;
        sidecar
    }

    /// Starts `portcullis run` with `args`, letting `tweak` adjust the
    /// parsed settings (e.g. where `--ca-url` connects), without waiting.
    pub async fn spawn_with<S: AsRef<str>>(
        args: &[S],
        tweak: impl FnOnce(&mut portcullis::config::Settings),
    ) -> Sidecar {
        let mut argv = vec![
            "portcullis",
            "run",
            "--inbound-listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--outbound-listen",
            "127.0.0.1:0",
        ];
        if !args.iter().any(|a| a.as_ref() == "--tunnel-listen") {
            argv.extend(["--tunnel-listen", "127.0.0.1:0"]);
        }
        argv.extend(args.iter().map(|a| a.as_ref()));
        let Command::Run(run) = Cli::try_parse_from(&argv).unwrap().command else {
            unreachable!()
        };
        let mut settings = run.settings().unwrap();
        tweak(&mut settings);
        let app = App::bind(settings).await.unwrap();
        Sidecar {
            addrs: app.addrs().clone(),
            metrics: app.metrics(),
            drain: app.drain(),
            task: tokio::spawn(app.run()),
        }
    }

    /// Waits (at most 10 s) until `/ready` answers 200.
    pub async fn wait_ready(&self) {
        let admin = self.addrs.admin;
        eventually("sidecar ready", Duration::from_secs(10), || async move {
            http_get(admin, "/ready")
                .await
                .map(|(s, _)| s == 200)
                .unwrap_or(false)
        })
        .await;
    }

    /// The sum of a metric's samples whose labels include all of `labels`.
    pub fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        metric_value(&self.metrics.encode(), name, labels)
    }

    /// The upstream listener (explicit mode), if any.
    pub fn upstream(&self) -> SocketAddr {
        self.addrs.upstreams[0]
    }
}

/// `portcullis run` with JSON logs, its inbound and admin listeners on free
/// loopback ports (read back from the `listening` line), then `more`.
pub fn run_args(more: &[String]) -> Vec<String> {
    let mut args: Vec<String> = [
        "run",
        "--log-format",
        "json",
        "--inbound-listen",
        "127.0.0.1:0",
        "--admin-listen",
        "127.0.0.1:0",
    ]
    .map(String::from)
    .into();
    args.extend_from_slice(more);
    args
}

/// The standard arguments for a sidecar of `sa` using `ca` as issuer and bundle.
pub fn issuer_args(ca: &Ca, bundle: &Path, sa: &str) -> Vec<String> {
    vec![
        "--ca-cert".into(),
        ca.files.cert.display().to_string(),
        "--ca-key".into(),
        ca.files.key.display().to_string(),
        "--trust-bundle".into(),
        bundle.display().to_string(),
        "--service-account".into(),
        sa.into(),
    ]
}

/// Sums samples of `name` in Prometheus text whose labels include `labels`.
pub fn metric_value(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (n, rest) = match series.find('{') {
                Some(i) => (&series[..i], &series[i..]),
                None => (series, ""),
            };
            if n != name {
                return None;
            }
            let all = labels
                .iter()
                .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")));
            all.then(|| value.parse::<f64>().ok()).flatten()
        })
        .sum()
}

/// A bare HTTP/1.0 GET; returns the status and body.
pub async fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    http_request(addr, "GET", path).await
}

pub async fn http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect(addr).await?;
    s.write_all(
        format!("{method} {path} HTTP/1.0\r\nHost: x\r\nContent-Length: 0\r\n\r\n").as_bytes(),
    )
    .await?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).await?;
    let status = buf.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = buf
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

/// An echo server: every byte back, and a half-close answered by a half-close.
pub async fn echo_server() -> SocketAddr {
    echo_on("127.0.0.1").await
}

/// An echo server like [`echo_server`], bound to `ip`.
pub async fn echo_on(ip: &str) -> SocketAddr {
    let listener = TcpListener::bind((ip, 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    addr
}

/// Sends `msg`, half-closes, and returns everything read back.
pub async fn round_trip<S>(mut s: S, msg: &[u8]) -> std::io::Result<Vec<u8>>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    s.write_all(msg).await?;
    s.shutdown().await?;
    let mut out = Vec::new();
    s.read_to_end(&mut out).await?;
    Ok(out)
}

/// A pair: client sidecar A (`--upstream`) → mTLS → server sidecar B
/// (`--inbound-target` an echo server), both issued by `ca`.
pub struct Pair {
    pub a: Sidecar,
    pub b: Sidecar,
    /// The app behind B.
    pub app: SocketAddr,
}

impl Pair {
    /// A pair in front of an echo app.
    pub async fn start(ca: &Ca, bundle: &Path, a_extra: &[&str], b_extra: &[&str]) -> Pair {
        Self::in_front_of(echo_server().await, ca, bundle, a_extra, b_extra).await
    }

    /// A pair in front of `app`: A's upstream listener leads to B, B's
    /// inbound to `app`.
    pub async fn in_front_of(
        app: SocketAddr,
        ca: &Ca,
        bundle: &Path,
        a_extra: &[&str],
        b_extra: &[&str],
    ) -> Pair {
        let target = app.to_string();
        let mut b_args = issuer_args(ca, bundle, "server");
        b_args.extend(["--inbound-target".to_string(), target]);
        b_args.extend(b_extra.iter().map(|s| s.to_string()));
        let b = Sidecar::start(&b_args).await;
        let mut a_args = issuer_args(ca, bundle, "client");
        a_args.extend([
            "--upstream".to_string(),
            format!("127.0.0.1:0={}={}", b.addrs.inbound, id("server")),
        ]);
        a_args.extend(a_extra.iter().map(|s| s.to_string()));
        let a = Sidecar::start(&a_args).await;
        Pair { a, b, app }
    }

    /// One short echo through A → B; true when the echo came back whole.
    pub async fn ping(&self, msg: &[u8]) -> bool {
        let Ok(s) = TcpStream::connect(self.a.upstream()).await else {
            return false;
        };
        matches!(tokio::time::timeout(Duration::from_secs(5), round_trip(s, msg)).await, Ok(Ok(out)) if out == msg)
    }
}

/// Asserts that `text` passes `promtool check metrics`.
pub fn promtool_check(text: &str) {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let promtool = std::env::var_os("PATH")
        .and_then(|p| {
            p.to_str()?
                .split(':')
                .map(|d| std::path::Path::new(d).join("promtool"))
                .find(|p| p.is_file())
        })
        .expect("promtool not found: run `make deps` (Debian package prometheus)");
    let mut child = Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A client that offers TLS 1.2 only, with `alpn`, and accepts any server:
/// what the server must refuse on its own.
pub fn tls12_client(alpn: &[u8]) -> Arc<rustls::ClientConfig> {
    #[derive(Debug)]
    struct AcceptAnything;
    impl rustls::client::danger::ServerCertVerifier for AcceptAnything {
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
            _: &[u8],
            _: &rustls::pki_types::CertificateDer<'_>,
            _: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
        }
        fn verify_tls13_signature(
            &self,
            _: &[u8],
            _: &rustls::pki_types::CertificateDer<'_>,
            _: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
        }
        fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
            rustls::crypto::ring::default_provider()
                .signature_verification_algorithms
                .supported_schemes()
        }
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS12])
    .unwrap()
    .dangerous()
    .with_custom_certificate_verifier(Arc::new(AcceptAnything))
    .with_no_client_auth();
    config.alpn_protocols = vec![alpn.to_vec()];
    Arc::new(config)
}

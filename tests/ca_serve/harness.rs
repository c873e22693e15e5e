//! Test harness for the identity service: a PKI, the API server stand-in,
//! an in-process `ca serve`, CSRs, and an HTTPS client that verifies the
//! service like a sidecar does.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use clap::Parser;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use portcullis::config::{CaCommand, Cli, Command};
use portcullis::drain::Drain;
use portcullis::identity::serve::{CaMetrics, CaServer};
use portcullis::identity::{NewCa, TrustDomain};
use rcgen::{CertificateParams, KeyPair, SanType};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use serde_json::{json, Value};
use tokio::net::TcpStream;

use super::apiserver::{FakeApi, ServingCert, TokenInfo};
use crate::common::{metric_value, TD};

pub const CA_TOKEN: &str = "ca-sa-token";
pub const HOST: &str = "portcullis-ca.default.svc";

/// Everything a test of the identity service needs.
pub struct Fixture {
    pub dir: tempfile::TempDir,
    pub api: FakeApi,
    /// The root (bundle) and the intermediate the service signs with.
    pub bundle: PathBuf,
    pub issuer_cert: PathBuf,
    pub issuer_key: PathBuf,
    pub root_dir: PathBuf,
    pub kube_ca: PathBuf,
    pub kube_token: PathBuf,
}

impl Fixture {
    /// A root, an intermediate (2 h) as issuer, the stand-in with tokens
    /// `client-token` and `server-token` (bound, default namespace).
    pub async fn new() -> Fixture {
        Fixture::with_api_cert(ServingCert::Good).await
    }

    /// The same, with the API server stand-in presenting `cert`.
    pub async fn with_api_cert(cert: ServingCert) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let td = TrustDomain::new(TD).unwrap();
        let root_dir = dir.path().join("root");
        let root = NewCa::root(&td, Duration::from_secs(86400))
            .unwrap()
            .write(&root_dir, false)
            .unwrap();
        let issuer_dir = dir.path().join("issuer");
        std::fs::create_dir_all(&issuer_dir).unwrap();
        let api = FakeApi::start_serving(CA_TOKEN, cert).await;
        api.add_token("client-token", TokenInfo::bound("default", "client"));
        api.add_token("server-token", TokenInfo::bound("default", "server"));
        let kube_ca = dir.path().join("kube-ca.crt");
        std::fs::write(&kube_ca, &api.ca_pem).unwrap();
        let kube_token = dir.path().join("kube-token");
        std::fs::write(&kube_token, CA_TOKEN).unwrap();
        let f = Fixture {
            bundle: root.cert.clone(),
            issuer_cert: issuer_dir.join("ca.crt"),
            issuer_key: issuer_dir.join("ca.key"),
            root_dir,
            kube_ca,
            kube_token,
            api,
            dir,
        };
        f.write_issuer(&f.intermediate(Duration::from_secs(7200)));
        f
    }

    /// A new intermediate of the fixture's root.
    pub fn intermediate(&self, ttl: Duration) -> NewCa {
        let td = TrustDomain::new(TD).unwrap();
        let root = portcullis::identity::Issuer::load(
            &portcullis::identity::CaFiles::in_dir(&self.root_dir),
            &td,
        )
        .unwrap();
        NewCa::intermediate(&root, ttl).unwrap()
    }

    /// Replaces the issuer files (each atomically).
    pub fn write_issuer(&self, ca: &NewCa) {
        crate::common::write_atomic(
            &self.issuer_cert,
            format!("{}{}", ca.cert_pem, ca.chain_pem).as_bytes(),
        );
        crate::common::write_atomic(&self.issuer_key, ca.key_pem.as_bytes());
    }

    pub fn bundle_pem(&self) -> Vec<u8> {
        std::fs::read(&self.bundle).unwrap()
    }

    /// `ca serve` flags for this fixture, plus `extra`.
    pub fn args(&self, extra: &[&str]) -> Vec<String> {
        let mut v: Vec<String> = [
            "--issuer-cert",
            self.issuer_cert.to_str().unwrap(),
            "--issuer-key",
            self.issuer_key.to_str().unwrap(),
            "--trust-bundle",
            self.bundle.to_str().unwrap(),
            "--namespace",
            "default",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--kube-api-url",
            &self.api.url(),
            "--kube-ca-file",
            self.kube_ca.to_str().unwrap(),
            "--kube-token-file",
            self.kube_token.to_str().unwrap(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    }
}

/// An in-process identity service.
pub struct Service {
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub metrics: Arc<CaMetrics>,
    pub drain: Drain,
    pub task: tokio::task::JoinHandle<()>,
}

impl Service {
    pub async fn start(args: &[String]) -> Service {
        let mut argv = vec!["portcullis".to_string(), "ca".into(), "serve".into()];
        argv.extend(args.iter().cloned());
        let Command::Ca(CaCommand::Serve(serve)) = Cli::try_parse_from(&argv).unwrap().command
        else {
            unreachable!()
        };
        let server = CaServer::bind(serve.settings().unwrap()).await.unwrap();
        Service {
            addr: server.addrs().listen,
            admin: server.addrs().admin,
            metrics: server.metrics(),
            drain: server.drain(),
            task: tokio::spawn(async move { server.run().await.unwrap() }),
        }
    }

    /// Begins the shutdown and waits (bounded) for the server to stop.
    pub async fn stop(self) {
        self.drain.begin();
        tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .expect("ca serve stops")
            .unwrap();
    }

    pub fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        metric_value(&self.metrics.encode(), name, labels)
    }

    pub fn requests(&self, result: &str) -> f64 {
        self.metric("portcullis_ca_requests_total", &[("result", result)])
    }
}

/// A P-256 key and a CSR for `uris`.
pub fn csr(uris: &[&str]) -> (KeyPair, String) {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = CertificateParams::default();
    params.subject_alt_names = uris
        .iter()
        .map(|u| SanType::URI((*u).try_into().unwrap()))
        .collect();
    let pem = params.serialize_request(&key).unwrap().pem().unwrap();
    (key, pem)
}

/// A certify body for `id` with a fresh CSR.
pub fn body_for(id: &str) -> (KeyPair, Value) {
    let (key, pem) = csr(&[id]);
    (
        key,
        json!({"identity": id, "csr": pem, "ttl_seconds": 3600}),
    )
}

/// Accepts any server certificate: for looking at a service whose
/// certificate has expired.
#[derive(Debug)]
struct AnyCert;

impl ServerCertVerifier for AnyCert {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }
    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        rustls::crypto::ring::default_provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// An HTTPS/1.1 connection to the service.
pub struct Client {
    send: SendRequest<Full<Bytes>>,
    pub peer_chain: Vec<CertificateDer<'static>>,
}

/// What came back.
pub struct Answer {
    pub status: u16,
    pub headers: hyper::HeaderMap,
    pub body: Value,
}

impl Client {
    /// Connects to `addr`, verifying the service against `bundle_pem` and
    /// the name `HOST` (or not at all with `bundle_pem = None`).
    pub async fn connect(addr: SocketAddr, bundle_pem: Option<&[u8]>) -> Client {
        let builder = rustls::ClientConfig::builder_with_provider(portcullis::tls::provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap();
        let config = match bundle_pem {
            Some(pem) => {
                let bundle =
                    portcullis::tls::TrustBundle::from_pem(Path::new("bundle"), pem).unwrap();
                builder
                    .with_root_certificates(bundle.roots.clone())
                    .with_no_client_auth()
            }
            None => builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(AnyCert))
                .with_no_client_auth(),
        };
        let tcp = TcpStream::connect(addr).await.unwrap();
        let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(ServerName::try_from(HOST).unwrap(), tcp)
            .await
            .expect("TLS to the identity service");
        let peer_chain = tls
            .get_ref()
            .1
            .peer_certificates()
            .unwrap()
            .iter()
            .map(|c| c.clone().into_owned())
            .collect();
        let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .unwrap();
        tokio::spawn(conn);
        Client { send, peer_chain }
    }

    /// Sends any request.
    pub async fn request(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Vec<u8>,
    ) -> Answer {
        let mut req = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header("host", HOST);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        self.send.ready().await.expect("connection usable");
        let resp = tokio::time::timeout(
            Duration::from_secs(10),
            self.send
                .send_request(req.body(Full::new(Bytes::from(body))).unwrap()),
        )
        .await
        .expect("answer in time")
        .unwrap();
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        let body = serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into()));
        Answer {
            status,
            headers,
            body,
        }
    }

    /// `POST /v1/certify` with `token` (if any) and a JSON body.
    pub async fn certify(&mut self, token: Option<&str>, body: &Value) -> Answer {
        let auth = token.map(|t| format!("Bearer {t}"));
        let mut headers = vec![("content-type", "application/json")];
        if let Some(a) = &auth {
            headers.push(("authorization", a.as_str()));
        }
        self.request(
            "POST",
            "/v1/certify",
            &headers,
            serde_json::to_vec(body).unwrap(),
        )
        .await
    }
}

impl Answer {
    pub fn code(&self) -> &str {
        self.body["error"].as_str().unwrap_or("")
    }

    pub fn retry_after(&self) -> Option<u64> {
        self.headers
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
    }

    /// The returned chain, DER.
    pub fn chain(&self) -> Vec<CertificateDer<'static>> {
        let pem: String = self.body["chain"]
            .as_array()
            .expect("a chain")
            .iter()
            .map(|c| c.as_str().unwrap())
            .collect();
        portcullis::identity::parse_cert_chain(Path::new("answer"), pem.as_bytes()).unwrap()
    }
}

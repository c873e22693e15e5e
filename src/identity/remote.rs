//! The sidecar as a client of the identity service (`run --ca-url`): a new
//! key and CSR per attempt, the projected token read afresh each time and
//! sent only after the service's certificate has been verified against the
//! trust bundle and the URL's host name, and the answer checked before use.
//! No client certificate is presented, so renewal never depends on the
//! current certificate still being valid.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::header::{AUTHORIZATION, CONTENT_TYPE, HOST, RETRY_AFTER};
use hyper::{Method, Request, StatusCode, Uri};
use hyper_util::rt::TokioIo;
use rcgen::{CertificateParams, KeyPair, SanType, PKCS_ECDSA_P256_SHA256};
use rustls::client::danger::ServerCertVerifier;
use rustls::pki_types::{PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::danger::ClientCertVerifier;
use tokio::net::TcpStream;
use x509_parser::prelude::{FromDer, X509Certificate};

use super::serve::{CertifyRequest, CertifyResponse, Code, ErrorBody};
use super::{parse_cert_chain, Leaf, LeafRequest};
use crate::file_limits::{read_capped_string, TOKEN_FILE_MAX_BYTES};
use crate::tls::{peer_identity, MeshTls, MeshVerifier, TrustBundle};

/// One attempt, from connect to the checked answer, must finish within this.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);
/// The most of an answer we read.
const MAX_ANSWER: usize = 256 * 1024;

/// Why an attempt to get a leaf from the identity service failed.
#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    #[error("reading the token file {path}: {source}")]
    Token {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("identity service unreachable: {0}")]
    Unreachable(String),
    #[error("identity service not trusted (token not sent): {0}")]
    Untrusted(String),
    #[error("identity service refused ({status}): {code}: {message}")]
    Refused {
        status: u16,
        code: String,
        message: String,
        retry_after: Option<Duration>,
    },
    #[error("identity service answer refused: {0}")]
    BadAnswer(String),
    #[error("making the key or CSR: {0}")]
    Local(String),
}

impl RemoteError {
    /// The `result` label of `portcullis_cert_rotations_total`: the
    /// service's stable code, or what went wrong on our side.
    pub fn label(&self) -> &'static str {
        match self {
            RemoteError::Token { .. } => "token_unreadable",
            RemoteError::Unreachable(_) => "ca_unreachable",
            RemoteError::Untrusted(_) => "ca_untrusted",
            RemoteError::Refused { code, .. } => {
                Code::parse(code).map(Code::as_str).unwrap_or("ca_error")
            }
            RemoteError::BadAnswer(_) => "bad_answer",
            RemoteError::Local(_) => "error",
        }
    }

    /// How long the service asked us to wait, if it did.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            RemoteError::Refused { retry_after, .. } => *retry_after,
            _ => None,
        }
    }
}

/// A checked `--ca-url`: https, a host to verify, and the certify endpoint.
#[derive(Debug, Clone)]
pub struct CaUrl {
    pub endpoint: Uri,
    /// `GET` here returns the service's trust bundle.
    pub bundle_endpoint: Uri,
    pub host: ServerName<'static>,
    pub authority: String,
    /// The host to connect to (without IPv6 brackets).
    pub connect_host: String,
    pub port: u16,
}

impl CaUrl {
    pub fn parse(url: &str) -> Result<Self, String> {
        let uri: Uri = url.parse().map_err(|e| format!("{url:?}: {e}"))?;
        if uri.scheme_str() != Some("https") {
            return Err(format!("{url:?}: must be https://HOST[:PORT]"));
        }
        let authority = uri
            .authority()
            .ok_or_else(|| format!("{url:?}: has no host"))?
            .to_string();
        let host = uri.host().unwrap_or_default();
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        let name = ServerName::try_from(bare.to_string())
            .map_err(|_| format!("{url:?}: {host:?} is not a host name"))?;
        let prefix = uri.path().trim_end_matches('/');
        let endpoint = format!("https://{authority}{prefix}/v1/certify")
            .parse()
            .map_err(|e| format!("{url:?}: {e}"))?;
        let bundle_endpoint = format!("https://{authority}{prefix}/v1/trust-bundle")
            .parse()
            .map_err(|e| format!("{url:?}: {e}"))?;
        Ok(CaUrl {
            endpoint,
            bundle_endpoint,
            host: name,
            port: uri.port_u16().unwrap_or(443),
            connect_host: bare.to_string(),
            authority,
        })
    }
}

/// The identity service as a leaf source.
pub struct RemoteCa {
    url: CaUrl,
    token_file: PathBuf,
    /// Connect here instead of resolving the URL's host (tests, the demo);
    /// the certificate is still checked against the URL's host.
    connect_to: Option<SocketAddr>,
    /// Its bundle verifies the service and the answer; always the current one.
    tls: Arc<MeshTls>,
}

impl RemoteCa {
    pub fn new(
        url: &str,
        token_file: PathBuf,
        connect_to: Option<SocketAddr>,
        tls: Arc<MeshTls>,
    ) -> Result<Self, String> {
        Ok(RemoteCa {
            url: CaUrl::parse(url)?,
            token_file,
            connect_to,
            tls,
        })
    }

    /// One attempt: a new key and CSR, a verified connection, the token, the
    /// request, and a checked answer.
    pub async fn fetch(&self, req: &LeafRequest) -> Result<Leaf, RemoteError> {
        tokio::time::timeout(ATTEMPT_TIMEOUT, self.attempt(req))
            .await
            .unwrap_or_else(|_| {
                Err(RemoteError::Unreachable(format!(
                    "no answer within {ATTEMPT_TIMEOUT:?}"
                )))
            })
    }

    async fn attempt(&self, req: &LeafRequest) -> Result<Leaf, RemoteError> {
        let local = |e: rcgen::Error| RemoteError::Local(e.to_string());
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(local)?;
        let mut params = CertificateParams::default();
        params.subject_alt_names =
            vec![SanType::URI(req.id.to_string().try_into().map_err(local)?)];
        let csr = params
            .serialize_request(&key)
            .and_then(|c| c.pem())
            .map_err(local)?;
        let bundle = self.tls.snapshot().bundle.clone();

        let stream = self.connect(&bundle).await?;
        // Verified: only now is the token read and sent.
        let token = read_capped_string(&self.token_file, TOKEN_FILE_MAX_BYTES)
            .map_err(|e| RemoteError::Token {
                path: self.token_file.clone(),
                source: e.into_io(),
            })?
            .trim()
            .to_string();
        let body = serde_json::to_vec(&CertifyRequest {
            identity: req.id.to_string(),
            csr,
            ttl_seconds: Some(req.ttl.as_secs().max(1)),
        })
        .expect("serializable");
        let request = Request::builder()
            .method(Method::POST)
            .uri(self.url.endpoint.path())
            .header(HOST, &self.url.authority)
            .header(CONTENT_TYPE, "application/json")
            .header(AUTHORIZATION, format!("Bearer {token}"))
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| RemoteError::Local(e.to_string()))?;
        let resp = send(stream, request).await?;
        let status = resp.status();
        let retry_after = resp
            .headers()
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        let body = Limited::new(resp.into_body(), MAX_ANSWER)
            .collect()
            .await
            .map_err(|e| RemoteError::Unreachable(format!("reading the answer: {e}")))?
            .to_bytes();
        if status != StatusCode::OK {
            let (code, message) = match serde_json::from_slice::<ErrorBody>(&body) {
                Ok(b) => (b.error, b.message),
                Err(_) => (
                    "unknown".to_string(),
                    String::from_utf8_lossy(&body).chars().take(200).collect(),
                ),
            };
            return Err(RemoteError::Refused {
                status: status.as_u16(),
                code,
                message,
                retry_after,
            });
        }
        let answer: CertifyResponse = serde_json::from_slice(&body)
            .map_err(|e| RemoteError::BadAnswer(format!("does not parse ({e})")))?;
        check_answer(&answer, &key, req, &bundle, self.tls.trust_domain())
    }

    /// The service's trust bundle (`GET /v1/trust-bundle`), accepted only
    /// over a connection verified with the bundle we already hold, so a
    /// root rotation reaches running pods without a restart and nobody
    /// else can hand us roots.
    pub async fn fetch_bundle(&self) -> Result<(TrustBundle, Vec<u8>), RemoteError> {
        let attempt = async {
            let bundle = self.tls.snapshot().bundle.clone();
            let stream = self.connect(&bundle).await?;
            let request = Request::builder()
                .method(Method::GET)
                .uri(self.url.bundle_endpoint.path())
                .header(HOST, &self.url.authority)
                .body(Full::new(Bytes::new()))
                .map_err(|e| RemoteError::Local(e.to_string()))?;
            let resp = send(stream, request).await?;
            if resp.status() != StatusCode::OK {
                return Err(RemoteError::BadAnswer(format!(
                    "trust bundle: status {}",
                    resp.status()
                )));
            }
            let pem = Limited::new(resp.into_body(), MAX_ANSWER)
                .collect()
                .await
                .map_err(|e| RemoteError::Unreachable(format!("reading the bundle: {e}")))?
                .to_bytes()
                .to_vec();
            let parsed = TrustBundle::from_pem(std::path::Path::new("GET /v1/trust-bundle"), &pem)
                .map_err(RemoteError::BadAnswer)?;
            Ok((parsed, pem))
        };
        tokio::time::timeout(ATTEMPT_TIMEOUT, attempt)
            .await
            .unwrap_or_else(|_| {
                Err(RemoteError::Unreachable(format!(
                    "no answer within {ATTEMPT_TIMEOUT:?}"
                )))
            })
    }

    /// TCP, then TLS 1.3 verified against the bundle and the URL's host.
    async fn connect(
        &self,
        bundle: &TrustBundle,
    ) -> Result<tokio_rustls::client::TlsStream<TcpStream>, RemoteError> {
        let unreachable = |e: std::io::Error| RemoteError::Unreachable(e.to_string());
        let tcp = match self.connect_to {
            Some(addr) => TcpStream::connect(addr).await,
            None => TcpStream::connect((self.url.connect_host.as_str(), self.url.port)).await,
        }
        .map_err(unreachable)?;
        let _ = tcp.set_nodelay(true);
        let mut config = rustls::ClientConfig::builder_with_provider(crate::tls::provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| RemoteError::Local(e.to_string()))?
            .with_root_certificates(bundle.roots.clone())
            .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(self.url.host.clone(), tcp)
            .await
            .map_err(|e| {
                let tls = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>());
                match tls {
                    Some(rustls::Error::InvalidCertificate(c)) => {
                        RemoteError::Untrusted(format!("{c:?}"))
                    }
                    _ => RemoteError::Unreachable(format!("TLS handshake: {e}")),
                }
            })
    }
}

/// One HTTP/1.1 request on a verified connection.
async fn send(
    stream: tokio_rustls::client::TlsStream<TcpStream>,
    request: Request<Full<Bytes>>,
) -> Result<hyper::Response<hyper::body::Incoming>, RemoteError> {
    let unreachable = |e: hyper::Error| RemoteError::Unreachable(e.to_string());
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(unreachable)?;
    tokio::spawn(conn);
    sender.send_request(request).await.map_err(unreachable)
}

/// Checks an answer before it is used: the leaf carries our key and our
/// identity, and its chain verifies to the bundle (as a client and as a
/// server certificate, the way peers will check it) and is in date.
pub fn check_answer(
    answer: &CertifyResponse,
    key: &KeyPair,
    req: &LeafRequest,
    bundle: &TrustBundle,
    td: &crate::identity::TrustDomain,
) -> Result<Leaf, RemoteError> {
    let bad = RemoteError::BadAnswer;
    let pem = answer.chain.concat();
    let chain = parse_cert_chain(std::path::Path::new("answer"), pem.as_bytes())
        .map_err(|e| bad(e.to_string()))?;
    let (_, x509) = X509Certificate::from_der(&chain[0]).map_err(|e| bad(format!("leaf: {e}")))?;
    if x509.public_key().raw != key.public_key_der().as_slice() {
        return Err(bad("the leaf does not carry our key".into()));
    }
    let id = peer_identity(&chain[0], td).map_err(|e| bad(e.to_string()))?;
    if id != req.id {
        return Err(bad(format!("the leaf is for {id}, not {}", req.id)));
    }
    let verifier = MeshVerifier::new(bundle.roots.clone(), td.clone())
        .map_err(|e| RemoteError::Local(e.to_string()))?;
    let now = UnixTime::now();
    let any = ServerName::try_from("portcullis.invalid").expect("valid name");
    verifier
        .verify_client_cert(&chain[0], &chain[1..], now)
        .map_err(|e| bad(format!("the chain does not verify: {e}")))?;
    verifier
        .verify_server_cert(&chain[0], &chain[1..], &any, &[], now)
        .map_err(|e| bad(format!("the chain does not verify: {e}")))?;
    Leaf::new(
        id,
        chain,
        PrivatePkcs8KeyDer::from(key.serialize_der()).into(),
    )
    .map_err(|e| bad(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ca_urls() {
        let u = CaUrl::parse("https://portcullis-ca.portcullis.svc:15012").unwrap();
        assert_eq!(
            u.endpoint.to_string(),
            "https://portcullis-ca.portcullis.svc:15012/v1/certify"
        );
        assert_eq!(u.port, 15012);
        let u = CaUrl::parse("https://ca.example/prefix/").unwrap();
        assert_eq!(u.endpoint.path(), "/prefix/v1/certify");
        assert_eq!(u.port, 443);
        let u = CaUrl::parse("https://[::1]:8443").unwrap();
        assert!(matches!(u.host, ServerName::IpAddress(_)));
        for bad in ["http://ca:1", "ca:1", "https://", "not a url"] {
            assert!(CaUrl::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn labels_name_the_service_codes() {
        let refused = |code: &str| RemoteError::Refused {
            status: 503,
            code: code.into(),
            message: String::new(),
            retry_after: Some(Duration::from_secs(3)),
        };
        assert_eq!(
            refused("tokenreview_unavailable").label(),
            "tokenreview_unavailable"
        );
        assert_eq!(refused("whatever").label(), "ca_error");
        assert_eq!(refused("x").retry_after(), Some(Duration::from_secs(3)));
        assert_eq!(RemoteError::Untrusted("x".into()).label(), "ca_untrusted");
    }
}

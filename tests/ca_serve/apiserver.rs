//! A stand-in for the Kubernetes API server's TokenReview endpoint, since
//! no cluster is available on these machines. It is served over real TLS
//! (its own root, for `--kube-ca-file`), requires the identity service's
//! bearer token (401 otherwise), checks the request schema
//! (`authentication.k8s.io/v1` `TokenReview`, `spec.token`), records the
//! audiences it is asked for, and answers 201 with the real semantics from
//! a table of tokens (namespace, service account, audiences, expiry, bound
//! pod), using the API server's error strings. Fault switches: latency,
//! 500, 429 with Retry-After, dropped connections, an audience-unaware
//! mode (no `status.audiences`, like old webhook authenticators), and
//! legacy unbound tokens (no pod in the table entry).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{CertificateParams, IsCa, KeyPair, SanType};
use rustls::pki_types::{CertificateDer, PrivatePkcs8KeyDer};
use serde_json::{json, Value};
use tokio::net::TcpListener;

/// One token the stand-in knows.
#[derive(Clone, Debug)]
pub struct TokenInfo {
    pub namespace: String,
    pub service_account: String,
    pub audiences: Vec<String>,
    pub expires: SystemTime,
    /// The pod a projected token is bound to; `None` for a legacy token.
    pub pod: Option<String>,
}

impl TokenInfo {
    /// A projected token for `ns/sa`, audience `portcullis-ca`, valid 1 h.
    pub fn bound(ns: &str, sa: &str) -> Self {
        TokenInfo {
            namespace: ns.into(),
            service_account: sa.into(),
            audiences: vec!["portcullis-ca".into()],
            expires: SystemTime::now() + Duration::from_secs(3600),
            pod: Some(format!("{sa}-pod")),
        }
    }
}

/// Fault switches.
#[derive(Clone, Debug, Default)]
pub struct Faults {
    pub latency: Duration,
    pub status_500: bool,
    /// Answer 429 with this `Retry-After`.
    pub throttle: Option<u64>,
    /// Close the connection without an answer.
    pub drop_connections: bool,
    /// Authenticate without looking at audiences, and say nothing about them.
    pub audience_unaware: bool,
}

#[derive(Default)]
struct Inner {
    ca_token: String,
    tokens: HashMap<String, TokenInfo>,
    faults: Faults,
    /// `spec.audiences` of every well-formed review received.
    reviews: Vec<Vec<String>>,
    /// Requests that arrived, before any fault is applied.
    arrivals: usize,
}

/// The running stand-in.
#[derive(Clone)]
pub struct FakeApi {
    pub addr: SocketAddr,
    /// PEM of the root its serving certificate chains to.
    pub ca_pem: String,
    inner: Arc<Mutex<Inner>>,
}

impl FakeApi {
    /// Serves on 127.0.0.1 presenting `cert` (normally `Good`: one for that
    /// IP under `ca_pem`), accepting `ca_token` as the identity service's
    /// credentials.
    pub async fn start_serving(ca_token: &str, cert: ServingCert) -> FakeApi {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        FakeApi::start_on_serving(listener, ca_token, cert).await
    }

    /// Serves on 127.0.0.1 with a good certificate for that IP.
    #[allow(dead_code)] // used by tests/install.rs, not by every includer
    pub async fn start(ca_token: &str) -> FakeApi {
        FakeApi::start_serving(ca_token, ServingCert::Good).await
    }

    /// Serves on `listener` (bound anywhere, e.g. in another network
    /// namespace) with a certificate for its IP address.
    #[allow(dead_code)] // used by tests/podstart.rs, not by every includer
    pub async fn start_on(listener: std::net::TcpListener, ca_token: &str) -> FakeApi {
        FakeApi::start_on_serving(listener, ca_token, ServingCert::Good).await
    }

    async fn start_on_serving(
        listener: std::net::TcpListener,
        ca_token: &str,
        cert: ServingCert,
    ) -> FakeApi {
        let ip = listener.local_addr().unwrap().ip();
        listener.set_nonblocking(true).unwrap();
        let (chain, key, ca_pem) = serving_chain(ip, cert);
        let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::from_std(listener).unwrap();
        let api = FakeApi {
            addr: listener.local_addr().unwrap(),
            ca_pem,
            inner: Arc::new(Mutex::new(Inner {
                ca_token: ca_token.into(),
                ..Default::default()
            })),
        };
        let inner = api.inner.clone();
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let (acceptor, inner) = (acceptor.clone(), inner.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let service = hyper::service::service_fn(move |req| {
                        let inner = inner.clone();
                        async move { answer(&inner, req).await }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tls), service)
                        .await;
                });
            }
        });
        api
    }

    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    pub fn add_token(&self, token: &str, info: TokenInfo) {
        self.inner.lock().unwrap().tokens.insert(token.into(), info);
    }

    pub fn set_faults(&self, faults: Faults) {
        self.inner.lock().unwrap().faults = faults;
    }

    pub fn set_ca_token(&self, token: &str) {
        self.inner.lock().unwrap().ca_token = token.into();
    }

    /// Requests received so far, counted on arrival.
    pub fn arrivals(&self) -> usize {
        self.inner.lock().unwrap().arrivals
    }

    /// The audiences of every review received so far.
    pub fn reviews(&self) -> Vec<Vec<String>> {
        self.inner.lock().unwrap().reviews.clone()
    }
}

/// The certificate the stand-in presents.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum ServingCert {
    /// A leaf for its IP and `kubernetes.default.svc`, under the root it
    /// hands out as `ca_pem`.
    Good,
    /// A leaf from another root than `ca_pem`.
    UnknownIssuer,
    /// The `ca_pem` root itself (with the IP) as the server's certificate.
    CaAsEndEntity,
    /// A leaf for `kubernetes.default.svc` only, while clients dial the IP.
    WrongName,
    /// A leaf whose validity ended an hour ago.
    Expired,
}

/// The chain and key to serve for `ip`, and the root PEM for clients.
fn serving_chain(
    ip: std::net::IpAddr,
    kind: ServingCert,
) -> (
    Vec<CertificateDer<'static>>,
    rustls::pki_types::PrivateKeyDer<'static>,
    String,
) {
    let root = |name: &str, sans: Vec<SanType>| {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        p.distinguished_name.push(rcgen::DnType::CommonName, name);
        p.subject_alt_names = sans;
        (p.self_signed(&key).unwrap(), key)
    };
    let (root_cert, root_key) = root(
        "kubernetes",
        if kind == ServingCert::CaAsEndEntity {
            vec![SanType::IpAddress(ip)]
        } else {
            vec![]
        },
    );
    let der = |k: &KeyPair| PrivatePkcs8KeyDer::from(k.serialize_der()).into();
    if kind == ServingCert::CaAsEndEntity {
        return (
            vec![root_cert.der().clone()],
            der(&root_key),
            root_cert.pem(),
        );
    }
    let other = (kind == ServingCert::UnknownIssuer).then(|| root("another-ca", vec![]));
    let (signer, signer_key) = match &other {
        Some((cert, key)) => (cert, key),
        None => (&root_cert, &root_key),
    };
    let key = KeyPair::generate().unwrap();
    let mut leaf = CertificateParams::new(vec!["kubernetes.default.svc".into()]).unwrap();
    if kind != ServingCert::WrongName {
        leaf.subject_alt_names.push(SanType::IpAddress(ip));
    }
    if kind == ServingCert::Expired {
        let now = SystemTime::now();
        leaf.not_before = (now - Duration::from_secs(7200)).into();
        leaf.not_after = (now - Duration::from_secs(3600)).into();
    }
    let leaf = leaf.signed_by(&key, signer, signer_key).unwrap();
    (
        vec![leaf.der().clone(), signer.der().clone()],
        der(&key),
        root_cert.pem(),
    )
}

/// A `Status` object, as the API server sends for errors.
fn status(code: StatusCode, reason: &str, message: &str) -> Response<Full<Bytes>> {
    let body = json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure", "message": message, "reason": reason, "code": code.as_u16(),
    });
    let mut resp = Response::new(Full::new(Bytes::from(body.to_string())));
    *resp.status_mut() = code;
    resp.headers_mut()
        .insert("content-type", "application/json".parse().unwrap());
    resp
}

async fn answer(
    inner: &Mutex<Inner>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, std::io::Error> {
    let faults = {
        let mut g = inner.lock().unwrap();
        g.arrivals += 1;
        g.faults.clone()
    };
    if !faults.latency.is_zero() {
        tokio::time::sleep(faults.latency).await;
    }
    if faults.drop_connections {
        return Err(std::io::Error::other("dropping the connection"));
    }
    if faults.status_500 {
        return Ok(status(
            StatusCode::INTERNAL_SERVER_ERROR,
            "InternalError",
            "Internal error occurred: unexpected error",
        ));
    }
    if let Some(after) = faults.throttle {
        let mut r = status(
            StatusCode::TOO_MANY_REQUESTS,
            "TooManyRequests",
            "Too many requests, please try again later.",
        );
        r.headers_mut()
            .insert("retry-after", after.to_string().parse().unwrap());
        return Ok(r);
    }
    let ca_token = inner.lock().unwrap().ca_token.clone();
    let authorized = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        == Some(format!("Bearer {ca_token}").as_str());
    if !authorized {
        return Ok(status(
            StatusCode::UNAUTHORIZED,
            "Unauthorized",
            "Unauthorized",
        ));
    }
    if req.uri().path() != "/apis/authentication.k8s.io/v1/tokenreviews" {
        return Ok(status(
            StatusCode::NOT_FOUND,
            "NotFound",
            "the server could not find the requested resource",
        ));
    }
    if req.method() != hyper::Method::POST {
        return Ok(status(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            "the server does not allow this method on the requested resource",
        ));
    }
    let body = req
        .into_body()
        .collect()
        .await
        .map_err(std::io::Error::other)?
        .to_bytes();
    let review: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => {
            return Ok(status(
                StatusCode::BAD_REQUEST,
                "BadRequest",
                &format!("the object provided is unrecognized: {e}"),
            ))
        }
    };
    if review["apiVersion"] != "authentication.k8s.io/v1" || review["kind"] != "TokenReview" {
        return Ok(status(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            "the object provided is unrecognized (must be authentication.k8s.io/v1 TokenReview)",
        ));
    }
    let Some(token) = review["spec"]["token"].as_str().filter(|t| !t.is_empty()) else {
        return Ok(status(
            StatusCode::UNPROCESSABLE_ENTITY,
            "Invalid",
            "TokenReview.authentication.k8s.io \"\" is invalid: spec.token: Required value",
        ));
    };
    let requested: Vec<String> = review["spec"]["audiences"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default();
    let entry = {
        let mut g = inner.lock().unwrap();
        g.reviews.push(requested.clone());
        g.tokens.get(token).cloned()
    };
    let api_audiences = vec!["https://kubernetes.default.svc.cluster.local".to_string()];
    let wanted = if requested.is_empty() {
        api_audiences.clone()
    } else {
        requested.clone()
    };
    let status_obj = match entry {
        None => {
            json!({"authenticated": false, "error": "[invalid bearer token, square/go-jose: error in cryptographic primitive]"})
        }
        Some(t) if t.expires < SystemTime::now() => {
            json!({"authenticated": false, "error": "[invalid bearer token, square/go-jose/jwt: validation failed, token is expired (exp)]"})
        }
        Some(t) => {
            let user = {
                let mut u = json!({
                    "username": format!("system:serviceaccount:{}:{}", t.namespace, t.service_account),
                    "uid": "0b1c7e38-0000-4000-8000-000000000001",
                    "groups": ["system:serviceaccounts", format!("system:serviceaccounts:{}", t.namespace), "system:authenticated"],
                });
                if let Some(pod) = &t.pod {
                    u["extra"] = json!({
                        "authentication.kubernetes.io/pod-name": [pod],
                        "authentication.kubernetes.io/pod-uid": ["7f1f0000-0000-4000-8000-000000000002"],
                    });
                }
                u
            };
            if faults.audience_unaware {
                json!({"authenticated": true, "user": user})
            } else {
                let matched: Vec<&String> =
                    wanted.iter().filter(|a| t.audiences.contains(a)).collect();
                if matched.is_empty() {
                    json!({"authenticated": false, "error": format!(
                        "[invalid bearer token, token audiences {:?} is invalid for the target audiences {:?}]",
                        t.audiences, wanted)})
                } else {
                    json!({"authenticated": true, "user": user, "audiences": matched})
                }
            }
        }
    };
    let body = json!({
        "kind": "TokenReview",
        "apiVersion": "authentication.k8s.io/v1",
        "metadata": {"creationTimestamp": null},
        "spec": review["spec"],
        "status": status_obj,
    });
    let mut resp = Response::new(Full::new(Bytes::from(body.to_string())));
    *resp.status_mut() = StatusCode::CREATED;
    resp.headers_mut()
        .insert("content-type", "application/json".parse().unwrap());
    Ok(resp)
}

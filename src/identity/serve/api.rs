//! The HTTP API: `POST /v1/certify` runs the ordered checks (cheapest
//! first, so malformed requests never reach the API server) and signs;
//! `GET /v1/trust-bundle` hands out the roots.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderMap, HeaderValue, ALLOW, AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE};
use hyper::header::{RETRY_AFTER, WWW_AUTHENTICATE};
use hyper::{Method, Request, Response, StatusCode};
use serde::{Deserialize, Serialize};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;
use tracing::{info, warn};
use x509_parser::prelude::{FromDer, X509Certificate};

use super::code::Code;
use super::csr::{check_csr, CsrError};
use super::judge::judge;
use super::State;
use crate::identity::{pem_cert, SpiffeId, TrustDomain};

/// The largest certify body accepted.
pub const MAX_BODY: usize = 16 * 1024;
/// The largest bearer token accepted.
pub const MAX_TOKEN: usize = 8 * 1024;
/// What a client is told to wait while the issuer is unusable.
const ISSUER_RETRY: Duration = Duration::from_secs(30);
/// A request body (at most `MAX_BODY`) must arrive within this.
const BODY_TIMEOUT: Duration = Duration::from_secs(10);

pub type Reply = Response<Full<Bytes>>;

/// `POST /v1/certify` body.
#[derive(Debug, Serialize, Deserialize)]
pub struct CertifyRequest {
    pub identity: String,
    pub csr: String,
    #[serde(default)]
    pub ttl_seconds: Option<u64>,
}

/// `POST /v1/certify` success body.
#[derive(Debug, Serialize, Deserialize)]
pub struct CertifyResponse {
    pub identity: String,
    /// Leaf first, then the issuer's chain; PEM each.
    pub chain: Vec<String>,
    pub not_before: String,
    pub not_after: String,
    pub serial: String,
}

/// Every failure body: a stable code and a message for people.
#[derive(Debug, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
    pub message: String,
}

/// A refusal: its code, why, and how long to wait when it is temporary.
#[derive(Debug)]
pub struct Reject {
    pub code: Code,
    pub message: String,
    pub retry_after: Option<Duration>,
}

fn reject(code: Code, message: impl Into<String>) -> Reject {
    Reject {
        code,
        message: message.into(),
        retry_after: None,
    }
}

impl Reject {
    fn reply(&self) -> Reply {
        let body = ErrorBody {
            error: self.code.as_str().into(),
            message: self.message.clone(),
        };
        let mut resp = json_reply(
            self.code.status(),
            serde_json::to_vec(&body).expect("serializable"),
        );
        let h = resp.headers_mut();
        if let Some(after) = self.retry_after {
            h.insert(RETRY_AFTER, HeaderValue::from(after.as_secs().max(1)));
        }
        match self.code {
            Code::MissingToken => {
                h.insert(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            Code::MethodNotAllowed => {
                h.insert(ALLOW, HeaderValue::from_static("POST, GET"));
            }
            _ => {}
        }
        resp
    }
}

fn json_reply(status: StatusCode, body: Vec<u8>) -> Reply {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

/// Routes one request.
pub async fn handle(state: &State, req: Request<Incoming>) -> Reply {
    let route = (req.method().clone(), req.uri().path().to_string());
    match (&route.0, route.1.as_str()) {
        (&Method::GET, "/v1/trust-bundle") => {
            let mut resp = Response::new(Full::new(state.issuer.current().bundle_pem.clone()));
            resp.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static("application/x-pem-file"),
            );
            resp
        }
        (&Method::POST, "/v1/certify") => {
            let result = certify(state, req).await;
            match result {
                Ok(body) => {
                    state.metrics.count(Code::Ok);
                    info!(id = %body.identity, serial = %body.serial, not_after = %body.not_after, "certificate signed");
                    json_reply(
                        StatusCode::OK,
                        serde_json::to_vec(&body).expect("serializable"),
                    )
                }
                Err(r) => {
                    state.metrics.count(r.code);
                    info!(code = %r.code, reason = %r.message, "certify refused");
                    r.reply()
                }
            }
        }
        (_, path) => {
            let r = if matches!(path, "/v1/certify" | "/v1/trust-bundle") {
                reject(
                    Code::MethodNotAllowed,
                    "use POST /v1/certify or GET /v1/trust-bundle",
                )
            } else {
                reject(Code::NotFound, format!("no such endpoint {path}"))
            };
            state.metrics.count(r.code);
            r.reply()
        }
    }
}

/// Checks 1 to 12, in order.
async fn certify(state: &State, req: Request<Incoming>) -> Result<CertifyResponse, Reject> {
    // 1. content type and size.
    let (parts, body) = req.into_parts();
    if !is_json(&parts.headers) {
        return Err(reject(
            Code::UnsupportedMediaType,
            "Content-Type must be application/json",
        ));
    }
    let declared = parts
        .headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let too_large = || {
        reject(
            Code::PayloadTooLarge,
            format!("body is larger than {MAX_BODY} bytes"),
        )
    };
    if declared.is_some_and(|n| n > MAX_BODY as u64) {
        return Err(too_large());
    }
    // A client that trickles its body must not hold the connection (and a
    // descriptor) for ever: the whole body, which is small, within the limit.
    let body =
        match tokio::time::timeout(BODY_TIMEOUT, Limited::new(body, MAX_BODY).collect()).await {
            Ok(Ok(b)) => b.to_bytes(),
            Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => return Err(too_large()),
            Ok(Err(e)) => return Err(reject(Code::BadRequest, format!("reading the body: {e}"))),
            Err(_) => {
                return Err(reject(
                    Code::BadRequest,
                    format!("the body did not arrive within {BODY_TIMEOUT:?}"),
                ))
            }
        };

    // 2. an issuer we may sign with.
    let served = state.issuer.current();
    let now = OffsetDateTime::now_utc();
    if !served.issuer.is_valid_at(now) {
        return Err(Reject {
            retry_after: Some(ISSUER_RETRY),
            ..reject(
                Code::IssuerUnavailable,
                format!(
                    "the issuer is not valid now (valid {} to {})",
                    served.issuer.not_before, served.issuer.not_after
                ),
            )
        });
    }

    // 3. the identity asked for.
    let request: CertifyRequest = serde_json::from_slice(&body).map_err(|e| {
        reject(
            Code::BadRequest,
            format!("body is not a certify request: {e}"),
        )
    })?;
    let id =
        workload_id(&request.identity, &state.td).map_err(|why| reject(Code::BadRequest, why))?;
    let ttl = match request.ttl_seconds {
        None => DEFAULT_TTL.min(state.max_ttl),
        Some(0) => return Err(reject(Code::BadRequest, "ttl_seconds must be positive")),
        Some(s) => Duration::from_secs(s),
    };

    // 4. a bearer token.
    let token = bearer(&parts.headers).ok_or_else(|| {
        reject(
            Code::MissingToken,
            format!("an Authorization: Bearer token (at most {MAX_TOKEN} bytes) is required"),
        )
    })?;

    // 5 and 6. the CSR and what it asks for.
    let key = check_csr(&request.csr, &id).map_err(|e| match e {
        CsrError::Bad(m) => reject(Code::BadCsr, m),
        CsrError::Policy(m) => reject(Code::CsrPolicy, m),
    })?;
    if ttl > state.max_ttl {
        return Err(reject(
            Code::CsrPolicy,
            format!(
                "ttl_seconds {} is more than the maximum {}",
                ttl.as_secs(),
                state.max_ttl.as_secs()
            ),
        ));
    }

    // 7. TokenReview.
    let status = state.reviewer.review(token).await.map_err(|e| {
        warn!(reason = %e.reason, "TokenReview unavailable");
        Reject {
            retry_after: Some(e.retry_after),
            ..reject(Code::TokenreviewUnavailable, e.reason)
        }
    })?;

    // 8 to 11. what the review says.
    judge(&status, &state.audience, &id).map_err(|(code, why)| reject(code, why))?;

    // 12. sign.
    let chain = served
        .issuer
        .certify(&id, ttl, &key)
        .map_err(|e| reject(Code::Internal, format!("signing failed: {e}")))?;
    let (_, leaf) = X509Certificate::from_der(&chain[0])
        .map_err(|e| reject(Code::Internal, format!("signed certificate: {e}")))?;
    let validity = leaf.validity();
    let (not_before, not_after) = (
        validity.not_before.to_datetime(),
        validity.not_after.to_datetime(),
    );
    let serial = leaf.raw_serial_as_string();
    Ok(CertifyResponse {
        identity: id.to_string(),
        chain: chain.iter().map(|c| pem_cert(c)).collect(),
        not_before: not_before.format(&Rfc3339).unwrap_or_default(),
        not_after: not_after.format(&Rfc3339).unwrap_or_default(),
        serial,
    })
}

/// The TTL granted when a request names none.
const DEFAULT_TTL: Duration = Duration::from_secs(3600);

/// `application/json`, with or without parameters such as `charset`.
fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|t| t.trim().eq_ignore_ascii_case("application/json"))
}

/// The bearer token of `Authorization`, if present, non-empty and not too long.
fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty() && token.len() <= MAX_TOKEN)
        .then_some(token)
}

/// `identity` exactly as `spiffe://<td>/ns/<ns>/sa/<sa>` would print
/// (check 3 of a certify request). Public so that it can be fuzzed.
pub fn workload_id(identity: &str, td: &TrustDomain) -> Result<SpiffeId, String> {
    let id = SpiffeId::parse(identity).map_err(|e| e.to_string())?;
    if id.trust_domain() != td {
        return Err(format!("{identity} is not in trust domain {td}"));
    }
    let mut parts = id.path().trim_start_matches('/').split('/');
    let (Some("ns"), Some(ns), Some("sa"), Some(sa), None) = (
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
    ) else {
        return Err(format!(
            "{identity} is not of the form spiffe://{td}/ns/NAMESPACE/sa/SERVICE_ACCOUNT"
        ));
    };
    let canonical = SpiffeId::workload(td, ns, sa).map_err(|e| e.to_string())?;
    if canonical.to_string() != identity {
        return Err(format!("{identity} is not in canonical form"));
    }
    Ok(canonical)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_table() {
        let td = TrustDomain::new("cluster.local").unwrap();
        let cases = [
            ("spiffe://cluster.local/ns/a/sa/b", true),
            ("spiffe://other.org/ns/a/sa/b", false),
            ("spiffe://cluster.local/ns/a/sa/b/c", false),
            ("spiffe://cluster.local/ns/a", false),
            ("spiffe://cluster.local/x/a/sa/b", false),
            ("spiffe://cluster.local/ns/A/sa/b", false),
            ("spiffe://cluster.local/ns/a_b/sa/b", false),
            ("http://cluster.local/ns/a/sa/b", false),
            ("", false),
        ];
        for (id, ok) in cases {
            assert_eq!(workload_id(id, &td).is_ok(), ok, "{id}");
        }
    }

    #[test]
    fn bearer_and_content_type() {
        let mut h = HeaderMap::new();
        assert_eq!(bearer(&h), None);
        h.insert(AUTHORIZATION, HeaderValue::from_static("Bearer abc"));
        assert_eq!(bearer(&h), Some("abc"));
        h.insert(AUTHORIZATION, HeaderValue::from_static("bearer  abc "));
        assert_eq!(bearer(&h), Some("abc"));
        h.insert(AUTHORIZATION, HeaderValue::from_static("Basic abc"));
        assert_eq!(bearer(&h), None);
        h.insert(AUTHORIZATION, HeaderValue::from_static("Bearer "));
        assert_eq!(bearer(&h), None);
        let long = format!("Bearer {}", "a".repeat(MAX_TOKEN + 1));
        h.insert(AUTHORIZATION, HeaderValue::from_str(&long).unwrap());
        assert_eq!(bearer(&h), None);

        for (ct, ok) in [
            ("application/json", true),
            ("application/json; charset=utf-8", true),
            ("Application/JSON", true),
            ("text/plain", false),
            ("application/jsonx", false),
        ] {
            h.insert(CONTENT_TYPE, HeaderValue::from_static(ct));
            assert_eq!(is_json(&h), ok, "{ct}");
        }
    }
}

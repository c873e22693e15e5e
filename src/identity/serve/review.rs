//! Check 7: asking the Kubernetes API server whether a bearer token is
//! genuine, with a TokenReview bound to our audience. Any trouble on the
//! way (down, slow, 5xx, 429, our own credentials refused) is "unavailable",
//! never "rejected", so a sidecar retries instead of giving up; the review
//! is never retried without the audience.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE, RETRY_AFTER};
use hyper::{Method, Request, StatusCode, Uri};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use prometheus::Histogram;
use serde::Deserialize;
use serde_json::json;
use tokio::sync::Semaphore;
use tracing::{debug, info};

use super::connector::HttpsConnector;
use super::judge::ReviewStatus;
use crate::file_limits::{read_capped_string, TOKEN_FILE_MAX_BYTES};

/// How long our own service-account token is trusted before it is read again
/// (the kubelet rotates it well before it expires).
const TOKEN_MAX_AGE: Duration = Duration::from_secs(60);
/// The most of an API server answer we read.
const MAX_ANSWER: usize = 64 * 1024;

/// Why no review could be had; the caller answers 503 with `retry_after`.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{reason}")]
pub struct Unavailable {
    pub reason: String,
    pub retry_after: Duration,
}

fn unavailable(reason: impl Into<String>, retry_after: Duration) -> Unavailable {
    Unavailable {
        reason: reason.into(),
        retry_after,
    }
}

/// How to reach the API server.
#[derive(Debug, Clone)]
pub struct ReviewSettings {
    /// `https://host:port` of the API server.
    pub api_url: Uri,
    pub token_file: PathBuf,
    pub audience: String,
    pub timeout: Duration,
    pub max_in_flight: usize,
}

/// The TokenReview client: one pooled HTTPS client, our own token (re-read
/// every minute and after a 401), and a cap on reviews in flight.
pub struct Reviewer {
    client: Client<HttpsConnector, Full<Bytes>>,
    url: Uri,
    settings: ReviewSettings,
    token: Mutex<Option<(String, Instant)>>,
    in_flight: Arc<Semaphore>,
    duration: Histogram,
}

#[derive(Deserialize)]
struct TokenReview {
    #[serde(default)]
    status: ReviewStatus,
}

impl Reviewer {
    pub fn new(settings: ReviewSettings, connector: HttpsConnector, duration: Histogram) -> Self {
        let base = settings.api_url.to_string();
        let url = format!(
            "{}/apis/authentication.k8s.io/v1/tokenreviews",
            base.trim_end_matches('/')
        )
        .parse()
        .expect("an https URL plus a path is a URI");
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .build(connector);
        Reviewer {
            client,
            url,
            in_flight: Arc::new(Semaphore::new(settings.max_in_flight)),
            settings,
            token: Mutex::new(None),
            duration,
        }
    }

    /// Reviews `token` for our audience.
    pub async fn review(&self, token: &str) -> Result<ReviewStatus, Unavailable> {
        let Ok(_permit) = self.in_flight.try_acquire() else {
            return Err(unavailable(
                "too many token reviews in flight",
                Duration::from_secs(1),
            ));
        };
        let started = Instant::now();
        let result = tokio::time::timeout(self.settings.timeout, self.review_once(token)).await;
        self.duration.observe(started.elapsed().as_secs_f64());
        result.unwrap_or_else(|_| {
            Err(unavailable(
                format!("TokenReview timed out after {:?}", self.settings.timeout),
                Duration::from_secs(2),
            ))
        })
    }

    async fn review_once(&self, token: &str) -> Result<ReviewStatus, Unavailable> {
        let own = self.own_token(false)?;
        let (status, retry, body) = self.post(&own, token).await?;
        let (status, retry, body) = if status == StatusCode::UNAUTHORIZED {
            // Our own token may have been rotated under us: read it again,
            // and ask once more only if it changed.
            let fresh = self.own_token(true)?;
            if fresh == own {
                (status, retry, body)
            } else {
                info!("the API server refused our token; retrying with the re-read one");
                self.post(&fresh, token).await?
            }
        } else {
            (status, retry, body)
        };
        match status {
            StatusCode::OK | StatusCode::CREATED => {
                let review: TokenReview = serde_json::from_slice(&body).map_err(|e| {
                    unavailable(
                        format!("TokenReview answer does not parse ({e})"),
                        Duration::from_secs(2),
                    )
                })?;
                Ok(review.status)
            }
            StatusCode::TOO_MANY_REQUESTS => Err(unavailable(
                "the API server is throttling TokenReviews (429)",
                retry.unwrap_or(Duration::from_secs(1)),
            )),
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => Err(unavailable(
                format!(
                    "the API server refused our own credentials ({status}); is the tokenreviews ClusterRole bound?"
                ),
                Duration::from_secs(5),
            )),
            other => Err(unavailable(
                format!("the API server answered {other}"),
                retry.unwrap_or(Duration::from_secs(2)),
            )),
        }
    }

    async fn post(
        &self,
        own: &str,
        token: &str,
    ) -> Result<(StatusCode, Option<Duration>, Bytes), Unavailable> {
        let body = json!({
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenReview",
            "spec": {"token": token, "audiences": [self.settings.audience]},
        });
        let req = Request::builder()
            .method(Method::POST)
            .uri(self.url.clone())
            .header(AUTHORIZATION, format!("Bearer {own}"))
            .header(CONTENT_TYPE, "application/json")
            .header(ACCEPT, "application/json")
            .body(Full::new(Bytes::from(body.to_string())))
            .map_err(|e| {
                unavailable(format!("building the review: {e}"), Duration::from_secs(5))
            })?;
        let resp = self.client.request(req).await.map_err(|e| {
            debug!(error = ?e, "TokenReview request failed");
            let why = failure_reason(&e)
                .unwrap_or_else(|| format!("the API server is unreachable ({e})"));
            unavailable(why, Duration::from_secs(2))
        })?;
        let status = resp.status();
        let retry = resp
            .headers()
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(|s| Duration::from_secs(s.clamp(1, 60)));
        let body = Limited::new(resp.into_body(), MAX_ANSWER)
            .collect()
            .await
            .map_err(|e| {
                unavailable(
                    format!("reading the API server's answer: {e}"),
                    Duration::from_secs(2),
                )
            })?
            .to_bytes();
        Ok((status, retry, body))
    }

    /// Our own bearer token, read from its file at most a minute ago (or
    /// just now when `fresh`).
    fn own_token(&self, fresh: bool) -> Result<String, Unavailable> {
        let mut cached = self.token.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((token, read_at)) = cached.as_ref() {
            if !fresh && read_at.elapsed() < TOKEN_MAX_AGE {
                return Ok(token.clone());
            }
        }
        let path = &self.settings.token_file;
        let token = read_capped_string(path, TOKEN_FILE_MAX_BYTES)
            .map_err(|e| {
                unavailable(
                    format!("reading our token {}: {}", path.display(), e.into_io()),
                    Duration::from_secs(5),
                )
            })?
            .trim()
            .to_string();
        *cached = Some((token.clone(), Instant::now()));
        Ok(token)
    }
}

/// Why a request to the API server failed, from the innermost cause worth
/// naming: hyper's own message says only "client error (Connect)", which
/// hides a certificate the cluster CA file does not vouch for or a refused
/// connection. `None` when nothing in the chain is more telling than the
/// error itself.
pub fn failure_reason(err: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut innermost = None;
    let mut next = Some(err);
    while let Some(e) = next {
        // `io::Error::source` skips the error it wraps, so look inside it.
        let wrapped = e
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            .map(|inner| inner as &(dyn std::error::Error + 'static));
        for candidate in [Some(e), wrapped].into_iter().flatten() {
            if let Some(tls) = candidate.downcast_ref::<rustls::Error>() {
                return Some(tls_reason(tls));
            }
        }
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            innermost = Some(format!("the API server is unreachable ({io})"));
        }
        next = e.source();
    }
    innermost
}

/// A TLS failure in words an operator can act on.
fn tls_reason(err: &rustls::Error) -> String {
    use rustls::CertificateError as C;
    let rustls::Error::InvalidCertificate(cert) = err else {
        return format!("TLS handshake failed: {err}");
    };
    let what = match cert {
        C::UnknownIssuer => "unknown issuer: it does not chain to --kube-ca-file".to_string(),
        C::Expired | C::ExpiredContext { .. } => format!("expired: {cert}"),
        C::NotValidYet | C::NotValidYetContext { .. } => format!("not yet valid: {cert}"),
        C::NotValidForName | C::NotValidForNameContext { .. } => {
            format!("name mismatch with --kube-api-url: {cert}")
        }
        C::Other(other) if other.to_string().contains("CaUsedAsEndEntity") => {
            "a CA certificate used as the server's own (end-entity) certificate".to_string()
        }
        C::BadSignature => "bad signature".to_string(),
        C::InvalidPurpose | C::InvalidPurposeContext { .. } => {
            format!("not valid for server authentication: {cert}")
        }
        other => other.to_string(),
    };
    format!("the API server's certificate is refused: {what}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::CertificateError;

    /// An error whose cause is `source`, as hyper-util's client error is.
    #[derive(Debug, thiserror::Error)]
    #[error("client error (Connect)")]
    struct Outer(#[source] std::io::Error);

    #[test]
    fn failure_reasons_name_the_innermost_cause() {
        let tls = |c: CertificateError| {
            Outer(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                rustls::Error::InvalidCertificate(c),
            ))
        };
        let cases = [
            (tls(CertificateError::UnknownIssuer), "unknown issuer"),
            (tls(CertificateError::Expired), "expired"),
            (tls(CertificateError::NotValidForName), "name mismatch"),
            (tls(CertificateError::BadSignature), "bad signature"),
            (
                Outer(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    rustls::Error::NoApplicationProtocol,
                )),
                "TLS handshake failed",
            ),
            (
                Outer(std::io::Error::from(std::io::ErrorKind::ConnectionRefused)),
                "unreachable (connection refused)",
            ),
        ];
        for (err, want) in cases {
            let got = failure_reason(&err).unwrap();
            assert!(got.contains(want), "{err:?}: {got}");
            assert!(!got.contains("client error"), "{got}");
        }
    }
}

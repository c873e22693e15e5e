//! An HTTPS connector for hyper-util's pooled client, built from one CA file
//! (the cluster's `ca.crt`), so the TokenReview client verifies the API
//! server like any in-cluster client and needs no extra TLS crate.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::Uri;
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

/// Connects to `https://` URIs, verifying the server against the roots it
/// was built with and the URI's host (a DNS name or an IP address).
#[derive(Clone)]
pub struct HttpsConnector {
    tls: TlsConnector,
    connect_timeout: Duration,
}

impl HttpsConnector {
    pub fn new(config: Arc<rustls::ClientConfig>, connect_timeout: Duration) -> Self {
        HttpsConnector {
            tls: TlsConnector::from(config),
            connect_timeout,
        }
    }
}

/// The server name to verify for `host` as it appears in a URI
/// (`[::1]` in brackets for IPv6).
pub fn server_name(host: &str) -> Option<ServerName<'static>> {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    ServerName::try_from(bare.to_string()).ok()
}

impl tower_service::Service<Uri> for HttpsConnector {
    type Response = TokioIo<TlsConn>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let tls = self.tls.clone();
        let limit = self.connect_timeout;
        Box::pin(async move {
            let invalid = |m: &str| io::Error::new(io::ErrorKind::InvalidInput, m.to_string());
            if uri.scheme_str() != Some("https") {
                return Err(invalid("only https:// is allowed"));
            }
            let host = uri.host().ok_or_else(|| invalid("URI has no host"))?;
            let name = server_name(host).ok_or_else(|| invalid("URI host is not a valid name"))?;
            let port = uri.port_u16().unwrap_or(443);
            let bare = host.trim_start_matches('[').trim_end_matches(']');
            let connect = async {
                let tcp = TcpStream::connect((bare, port)).await?;
                tcp.set_nodelay(true)?;
                tls.connect(name, tcp).await
            };
            let stream = tokio::time::timeout(limit, connect)
                .await
                .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))??;
            Ok(TokioIo::new(TlsConn(stream)))
        })
    }
}

/// A verified TLS connection, as the pooled client needs it.
pub struct TlsConn(TlsStream<TcpStream>);

impl Connection for TlsConn {
    fn connected(&self) -> Connected {
        Connected::new()
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_names_from_uri_hosts() {
        assert!(matches!(
            server_name("[::1]"),
            Some(ServerName::IpAddress(_))
        ));
        assert!(matches!(
            server_name("10.0.0.1"),
            Some(ServerName::IpAddress(_))
        ));
        assert!(matches!(
            server_name("kubernetes.default.svc"),
            Some(ServerName::DnsName(_))
        ));
        assert!(server_name("bad name").is_none());
    }
}

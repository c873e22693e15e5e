//! What the tunnel tests share: a raw tunnel client (rustls + h2, as a
//! peer sidecar or an attacker would speak), app servers, and pairs.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use h2::client::SendRequest;
use http::{Method, Request, StatusCode};
use portcullis::identity::Leaf;
use portcullis::proxy::tunnel::H2Stream;
use portcullis::tls::{MeshTls, TrustBundle};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::mpsc;

use crate::common::*;

/// The tunnel client config a sidecar holding `leaf` would use (ALPN h2,
/// then portcullis/1).
pub fn tunnel_client_config(leaf: Leaf, bundle_pem: &[u8]) -> Arc<rustls::ClientConfig> {
    let bundle = TrustBundle::from_pem(std::path::Path::new("bundle"), bundle_pem).unwrap();
    let tls = MeshTls::new(td(), bundle);
    tls.set_leaf(Arc::new(leaf)).unwrap();
    tls.snapshot().tunnel_client.clone().unwrap()
}

/// Mesh mTLS to `addr`, then an HTTP/2 client on it (its connection task
/// runs in the background).
pub async fn h2_client(
    config: Arc<rustls::ClientConfig>,
    addr: SocketAddr,
) -> std::io::Result<SendRequest<Bytes>> {
    let tls = tls_connect(config, addr).await?;
    let (send, conn) = h2::client::handshake(tls)
        .await
        .map_err(std::io::Error::other)?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(send)
}

/// Sends `CONNECT authority` (or another method) and returns the status
/// and, for 200, the stream as bytes.
pub async fn open_stream(
    send: &SendRequest<Bytes>,
    method: Method,
    authority: &str,
) -> Result<(StatusCode, Option<H2Stream>), h2::Error> {
    let mut send = send.clone().ready().await?;
    let uri = if method == Method::CONNECT {
        authority.to_string()
    } else {
        format!("http://{authority}/")
    };
    let request = Request::builder().method(method).uri(uri).body(()).unwrap();
    let (response, stream) = send.send_request(request, false)?;
    let response = response.await?;
    let status = response.status();
    if status == StatusCode::OK {
        Ok((status, Some(H2Stream::new(stream, response.into_body()))))
    } else {
        Ok((status, None))
    }
}

/// An app that speaks first: it writes `HELLO\n`, half-closes, then reads
/// until the client's end of stream and reports how many bytes came.
pub async fn banner_app(ip: &str) -> (SocketAddr, mpsc::UnboundedReceiver<usize>) {
    let listener = TcpListener::bind((ip, 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            let tx = tx.clone();
            tokio::spawn(async move {
                if s.write_all(b"HELLO\n").await.is_err() {
                    return;
                }
                let _ = s.shutdown().await;
                let mut buf = Vec::new();
                if s.read_to_end(&mut buf).await.is_ok() {
                    let _ = tx.send(buf.len());
                }
            });
        }
    });
    (addr, rx)
}

/// One echo through `s`: writes `msg`, reads the same number of bytes back.
pub async fn echo_once<S>(s: &mut S, msg: &[u8]) -> bool
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    if s.write_all(msg).await.is_err() {
        return false;
    }
    let mut back = vec![0u8; msg.len()];
    let read = tokio::time::timeout(std::time::Duration::from_secs(5), s.read_exact(&mut back));
    matches!(read.await, Ok(Ok(_))) && back == msg
}

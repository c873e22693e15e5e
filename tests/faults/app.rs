//! The app behind the server sidecar for the fault tests: an HTTP server
//! answering `200 <path>` that records every path it was asked for, so a
//! test can prove a request never reached it.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::{TcpListener, TcpStream};

/// The running app and the paths it served.
#[derive(Clone)]
pub struct App {
    pub addr: SocketAddr,
    seen: Arc<Mutex<Vec<String>>>,
}

impl App {
    pub async fn start() -> App {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let app = App {
            addr: listener.local_addr().unwrap(),
            seen: Arc::default(),
        };
        let seen = app.seen.clone();
        tokio::spawn(async move {
            loop {
                let Ok((s, _)) = listener.accept().await else {
                    return;
                };
                let seen = seen.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req: Request<_>| {
                        let path = req.uri().path().to_string();
                        seen.lock().unwrap().push(path.clone());
                        async move { Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(path)))) }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(s), svc)
                        .await;
                });
            }
        });
        app
    }

    /// Every path the app was asked for, in order.
    pub fn seen(&self) -> Vec<String> {
        self.seen.lock().unwrap().clone()
    }
}

/// A keep-alive HTTP/1.1 client connection.
pub type H1 = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

/// Opens a keep-alive HTTP/1.1 connection to `addr`.
pub async fn h1(addr: SocketAddr) -> std::io::Result<H1> {
    let io = TokioIo::new(TcpStream::connect(addr).await?);
    let (send, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(std::io::Error::other)?;
    tokio::spawn(conn);
    Ok(send)
}

/// One GET on `send`; the status and body, or why there was none.
pub async fn get(send: &mut H1, path: &str) -> Result<(u16, String), String> {
    send.ready().await.map_err(|e| e.to_string())?;
    let req = Request::get(path)
        .header("host", "app.test")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = send.send_request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

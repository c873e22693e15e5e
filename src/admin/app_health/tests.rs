//! The sidecar runs each kind of original probe against real local servers.

use std::convert::Infallible;
use std::net::{IpAddr, Ipv4Addr};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

use super::check;
use crate::inject::probes::{AppProbe, Grpc, HttpGet, TcpSocket};

const LO: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

fn probe(http: Option<HttpGet>, tcp: Option<TcpSocket>, grpc: Option<Grpc>) -> AppProbe {
    AppProbe {
        http_get: http,
        tcp_socket: tcp,
        grpc,
        timeout_seconds: 2,
    }
}

fn get(port: u16, path: &str) -> AppProbe {
    probe(
        Some(HttpGet {
            port,
            path: path.into(),
            scheme: "HTTP".into(),
            host: None,
            http_headers: vec![],
        }),
        None,
        None,
    )
}

/// An HTTP/1 and HTTP/2 (cleartext) server: `/ok` 200, `/moved` 302, else
/// 500; the gRPC health path answers SERVING for service "up" only.
async fn server() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let (s, _) = l.accept().await.unwrap();
            tokio::spawn(async move {
                let svc =
                    hyper::service::service_fn(|req: Request<hyper::body::Incoming>| async move {
                        use http_body_util::BodyExt;
                        let path = req.uri().path().to_string();
                        let body = req.into_body().collect().await.unwrap().to_bytes();
                        let r = match path.as_str() {
                            "/ok" => Response::new(Full::new(Bytes::new())),
                            "/moved" => Response::builder()
                                .status(302)
                                .body(Full::new(Bytes::new()))
                                .unwrap(),
                            "/grpc.health.v1.Health/Check" => {
                                let serving = body.ends_with(b"up");
                                let msg: &[u8] = if serving {
                                    &[0, 0, 0, 0, 2, 0x08, 1]
                                } else {
                                    &[0, 0, 0, 0, 2, 0x08, 2]
                                };
                                Response::builder()
                                    .header("content-type", "application/grpc")
                                    .header("grpc-status", "0")
                                    .body(Full::new(Bytes::from_static(msg)))
                                    .unwrap()
                            }
                            _ => Response::builder()
                                .status(500)
                                .body(Full::new(Bytes::new()))
                                .unwrap(),
                        };
                        Ok::<_, Infallible>(r)
                    });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    port
}

#[tokio::test]
async fn http_probes() {
    let port = server().await;
    assert!(check(&get(port, "/ok"), LO).await.is_ok());
    assert!(
        check(&get(port, "/moved"), LO).await.is_ok(),
        "3xx is success, as for the kubelet"
    );
    let err = check(&get(port, "/broken"), LO).await.unwrap_err();
    assert!(err.contains("500"), "{err}");
}

#[tokio::test]
async fn tcp_probes() {
    let port = server().await;
    let tcp = |port| probe(None, Some(TcpSocket { port, host: None }), None);
    assert!(check(&tcp(port), LO).await.is_ok());
    let free = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    assert!(check(&tcp(free), LO).await.is_err());
}

#[tokio::test]
async fn grpc_probes() {
    let port = server().await;
    let g = |s: &str| {
        probe(
            None,
            None,
            Some(Grpc {
                port,
                service: Some(s.into()),
            }),
        )
    };
    assert!(check(&g("up"), LO).await.is_ok());
    let err = check(&g("down"), LO).await.unwrap_err();
    assert!(err.contains("not SERVING"), "{err}");
}

#[tokio::test]
async fn a_silent_app_times_out() {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    let _hold = tokio::spawn(async move {
        let _conns: Vec<_> = vec![l.accept().await];
        std::future::pending::<()>().await
    });
    let mut p = get(port, "/ok");
    p.timeout_seconds = 1;
    let err = check(&p, LO).await.unwrap_err();
    assert!(err.contains("timed out"), "{err}");
    let _ = StatusCode::OK;
}

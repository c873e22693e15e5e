//! `portcullis demo` end to end: a request through the client sidecar reaches
//! the echo app over mTLS, both sidecars are ready, and stopping cleans up.

use std::net::SocketAddr;
use std::time::Duration;

use portcullis::config::DemoArgs;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A raw HTTP/1.1 GET; returns the whole answer (status line, headers, body).
async fn get(addr: SocketAddr, path: &str) -> String {
    let exchange = async {
        let mut s = TcpStream::connect(addr).await.unwrap();
        let req = format!("GET {path} HTTP/1.1\r\nHost: demo.test\r\nX-Demo-Test: yes\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await.unwrap();
        let mut answer = String::new();
        s.read_to_string(&mut answer).await.unwrap();
        answer
    };
    tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .expect("GET timed out")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_carries_a_request_and_cleans_up() {
    let demo = portcullis::demo::start(DemoArgs { port: 0 }).await.unwrap();
    let dir = demo.dir.clone();
    assert!(
        dir.join("ca.crt").is_file(),
        "the CA is written to {}",
        dir.display()
    );
    assert!(demo.listen.ip().is_loopback() && demo.listen.port() != 0);

    let answer = get(demo.listen, "/hello/there?x=1").await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let body = answer.split("\r\n\r\n").nth(1).unwrap_or_default();
    assert!(
        body.starts_with("hello from the demo app\nGET /hello/there?x=1\n"),
        "{body}"
    );
    assert!(
        body.contains("x-demo-test: yes"),
        "request headers are echoed: {body}"
    );

    for admin in [demo.client.admin, demo.server.admin] {
        let ready = get(admin, "/ready").await;
        assert!(ready.starts_with("HTTP/1.1 200"), "{admin}: {ready}");
    }
    // The hop between the sidecars really was mesh TLS.
    let metrics = get(demo.server.admin, "/metrics").await;
    assert!(
        metrics.contains("portcullis_tls_handshakes_total"),
        "{metrics}"
    );

    let banner = demo.banner("HTTP/1.1 200 OK");
    assert!(
        banner.contains(&format!("curl http://{}/hello", demo.listen)),
        "{banner}"
    );

    demo.stop().await.unwrap();
    assert!(!dir.exists(), "{} is removed", dir.display());
}

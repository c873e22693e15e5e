//! `portcullis demo` end to end: a request through the client sidecar reaches
//! the echo app over mTLS, both sidecars are ready and read rules only from
//! the demo's directory, and stopping cleans up.

use std::net::SocketAddr;
use std::time::Duration;

use portcullis::config::DemoArgs;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A raw HTTP/1.1 GET; returns the whole answer (status line, headers, body).
async fn get(addr: SocketAddr, path: &str) -> std::io::Result<String> {
    let exchange = async {
        let mut s = TcpStream::connect(addr).await?;
        let req = format!(
            "GET {path} HTTP/1.1\r\nHost: demo.test\r\nX-Demo-Test: yes\r\n\
             Connection: close\r\n\r\n"
        );
        s.write_all(req.as_bytes()).await?;
        let mut answer = String::new();
        s.read_to_string(&mut answer).await?;
        Ok(answer)
    };
    let answer = tokio::time::timeout(Duration::from_secs(10), exchange).await;
    answer.expect("GET timed out")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_carries_a_request_and_cleans_up() {
    let demo = portcullis::demo::start(DemoArgs { port: 0 }).await.unwrap();
    let dir = demo.dir.clone();
    assert!(dir.join("ca.crt").is_file(), "no CA in {}", dir.display());
    assert!(demo.listen.ip().is_loopback() && demo.listen.port() != 0);

    let answer = get(demo.listen, "/hello/there?x=1").await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let body = answer.split("\r\n\r\n").nth(1).unwrap_or_default();
    let start = "hello from the demo app\nGET /hello/there?x=1\n";
    assert!(body.starts_with(start), "{body}");
    assert!(
        body.contains("x-demo-test: yes"),
        "headers not echoed: {body}"
    );

    for admin in [demo.client.admin, demo.server.admin] {
        let ready = get(admin, "/ready").await.unwrap();
        assert!(ready.starts_with("HTTP/1.1 200"), "{admin}: {ready}");
        // Each sidecar reads rules from the demo's directory, never from
        // the host's /etc/portcullis/rules.
        let rules = get(admin, "/rules").await.unwrap();
        let body = rules.split("\r\n\r\n").nth(1).unwrap_or_default();
        let status: serde_json::Value = serde_json::from_str(body).unwrap();
        let rules_dir = status["dir"].as_str().unwrap_or_default();
        assert!(
            rules_dir.starts_with(dir.to_str().unwrap()),
            "{admin}: {status}"
        );
    }
    // The hop between the sidecars really was mesh TLS...
    let metrics = get(demo.server.admin, "/metrics").await.unwrap();
    let ok = r#"portcullis_tls_handshakes_total{direction="inbound",result="ok"}"#;
    assert!(metrics.contains(ok), "{metrics}");
    // ...and plaintext straight to the server sidecar does not reach the app.
    let direct = get(demo.server.inbound, "/").await.unwrap_or_default();
    assert!(!direct.contains("hello from the demo app"), "{direct}");

    // The demo's rules allow /hello/** only: /admin is denied before the app.
    let denied = get(demo.listen, "/admin").await.unwrap();
    assert!(denied.starts_with("HTTP/1.1 403"), "{denied}");
    // Editing the rules file opens /admin without a restart.
    let rules = std::fs::read_to_string(&demo.rules_file).unwrap();
    let opened = rules.replace(r#""/hello/**"]"#, r#""/hello/**", "/admin"]"#);
    assert_ne!(rules, opened, "the demo rules changed shape");
    let tmp = demo.rules_file.with_extension("tmp");
    std::fs::write(&tmp, opened).unwrap();
    std::fs::rename(&tmp, &demo.rules_file).unwrap();
    let mut allowed = false;
    for _ in 0..100 {
        if get(demo.listen, "/admin")
            .await
            .unwrap()
            .starts_with("HTTP/1.1 200")
        {
            allowed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(allowed, "the edited rules were not applied");

    let banner = demo.banner("HTTP/1.1 200 OK", "HTTP/1.1 403 Forbidden");
    let try_it = format!("curl http://{}/hello", demo.listen);
    assert!(banner.contains(&try_it), "{banner}");
    assert!(
        banner.contains(&demo.rules_file.display().to_string()),
        "{banner}"
    );

    demo.stop().await.unwrap();
    assert!(!dir.exists(), "{} is not removed", dir.display());
}

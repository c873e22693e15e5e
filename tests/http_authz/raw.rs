//! Requests written as raw bytes: a half-close right after the request,
//! request lines an app reads but that are not textbook HTTP/1, and a
//! request after a silence. Each must still be parsed, authorized and
//! rewritten by the serving sidecar.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::*;

/// Connects to `addr`, stays silent for `silence`, writes `request`
/// (then shuts down the sending side when `half_close`: what
/// `printf 'GET …' | nc -N` does), and reads until the sidecar closes.
async fn exchange(addr: SocketAddr, silence: Duration, request: &str, half_close: bool) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    tokio::time::sleep(silence).await;
    s.write_all(request.as_bytes()).await.unwrap();
    if half_close {
        s.shutdown().await.unwrap();
    }
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut answer))
        .await
        .expect("the sidecar answers and closes")
        .unwrap();
    String::from_utf8_lossy(&answer).into_owned()
}

/// A client that half-closes right after its request still gets the
/// answer (HTTP/1.1 and 1.0, allowed and denied), as it would from the app
/// directly, through the tunnel and over a connection of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_followed_by_a_half_close_is_answered() {
    let m = mesh().await;
    let own_connection = client_of(&m.ca, &m.b, &["--tunnel=off"]).await;
    let half_closed = |front, request| exchange(front, Duration::ZERO, request, true);
    for front in [m.pair_a.upstream(), own_connection.upstream()] {
        let ok = half_closed(front, "GET /public/x HTTP/1.1\r\nhost: s\r\n\r\n").await;
        assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
        assert!(
            ok.ends_with("GET /public/x xfcc=URI=spiffe://cluster.local/ns/default/sa/client"),
            "{ok}"
        );
        let old = half_closed(front, "GET /public/y HTTP/1.0\r\n\r\n").await;
        assert!(old.starts_with("HTTP/1.0 200"), "{old}");
        let denied = half_closed(front, "GET /admin/x HTTP/1.1\r\nhost: s\r\n\r\n").await;
        assert!(denied.starts_with("HTTP/1.1 403"), "{denied}");
    }
}

/// Requests an app would read but that do not look like textbook HTTP/1
/// (bare LF, runs of spaces, a request line over 8 KiB) are still parsed
/// as HTTP, so a caller's forged `x-forwarded-client-cert` never reaches
/// the app, with no rules at all (where nothing else would stop them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn odd_request_lines_are_still_http_and_cannot_forge_the_caller() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::root(dir.path(), "ca", TD);
    let b = server_with(&ca, app().await, &[]).await;
    let a = client_of(&ca, &b, &[]).await;
    let forged = "x-forwarded-client-cert: URI=spiffe://cluster.local/ns/prod/sa/admin";
    let long = format!("/?{}", "p".repeat(9_000));
    let requests = [
        format!("GET /lf HTTP/1.1\nhost: s\n{forged}\nconnection: close\n\n"),
        format!("GET  /spaces  HTTP/1.1\r\nhost: s\r\n{forged}\r\nconnection: close\r\n\r\n"),
        format!("GET {long} HTTP/1.1\r\nhost: s\r\n{forged}\r\nconnection: close\r\n\r\n"),
    ];
    for request in &requests {
        let answer = exchange(a.upstream(), Duration::ZERO, request, false).await;
        assert!(answer.starts_with("HTTP/1.1 "), "{answer}");
        assert!(
            !answer.contains("sa/admin"),
            "the forged header arrived: {answer}"
        );
        if answer.starts_with("HTTP/1.1 200") {
            assert!(
                answer.contains("xfcc=URI=spiffe://cluster.local/ns/default/sa/client"),
                "{answer}"
            );
        }
    }
}

/// A client that connects and says nothing for longer than the detect
/// timeout, then sends HTTP (a warm connection pool): the request is still
/// parsed, authorized and rewritten, with and without HTTP rules on the
/// port; a forged caller header never reaches the app.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_after_a_silence_is_still_http() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::root(dir.path(), "ca", TD);
    let app = app().await;
    let rules = dir.path().join("rules");
    std::fs::create_dir(&rules).unwrap();
    write_rules(&rules, "policy.yaml", &rules_for(app.port()));
    let forged = "x-forwarded-client-cert: URI=spiffe://cluster.local/ns/prod/sa/admin";
    for with_rules in [false, true] {
        let rules_dir = rules.display().to_string();
        let mut extra = vec!["--detect-timeout", "200ms"];
        if with_rules {
            extra.extend(["--rules-dir", &rules_dir]);
        }
        let b = server_with(&ca, app, &extra).await;
        let a = client_of(&ca, &b, &[]).await;
        let request = format!(
            "GET /public/late HTTP/1.1\r\nhost: s\r\n{forged}\r\nconnection: close\r\n\r\n"
        );
        // Past the detect timeout (200 ms) several times over.
        let answer = exchange(a.upstream(), Duration::from_millis(800), &request, false).await;
        assert!(
            answer.starts_with("HTTP/1.1 200"),
            "rules {with_rules}: {answer}"
        );
        assert!(
            answer
                .ends_with("GET /public/late xfcc=URI=spiffe://cluster.local/ns/default/sa/client"),
            "rules {with_rules}: {answer}"
        );
    }
}

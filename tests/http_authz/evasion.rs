//! Ways a caller might try to get a request to the app past the HTTP
//! parser: split, slowed or paused request lines, blank lines or odd
//! whitespace first, HTTP/0.9, methods no standard names, a control byte
//! that makes the sniff give up. Lenient servers (Python's `http.server`,
//! Node, Go) read all of these, so the app here records raw bytes rather
//! than parsing them: whatever happens, a forged `x-forwarded-client-cert`
//! must never reach it, and a request carried as opaque bytes must be cut
//! off (reset) before its line ends.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::*;

const FORGED: &str = "x-forwarded-client-cert: URI=spiffe://cluster.local/ns/prod/sa/admin";

/// What the app got on one connection.
#[derive(Debug, Clone)]
struct Received {
    bytes: Vec<u8>,
    /// The connection ended with a reset rather than an end of stream.
    reset: bool,
}

type Log = Arc<Mutex<Vec<Received>>>;

/// An app that records every byte of every connection and, once it has
/// seen a blank line or the end of the stream, answers 200 `ok`.
async fn recording_app() -> (SocketAddr, Log) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let log: Log = Arc::default();
    let kept = log.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let log = kept.clone();
            tokio::spawn(async move {
                let mut got = Received {
                    bytes: Vec::new(),
                    reset: false,
                };
                let mut answered = false;
                let mut buf = [0u8; 4096];
                loop {
                    let read = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf));
                    let n = match read.await {
                        Ok(Ok(n)) => n,
                        Ok(Err(_)) => {
                            got.reset = true;
                            break;
                        }
                        Err(_) => break,
                    };
                    got.bytes.extend_from_slice(&buf[..n]);
                    let blank = got.bytes.windows(2).any(|w| w == b"\n\n")
                        || got.bytes.windows(4).any(|w| w == b"\r\n\r\n");
                    if !answered && (n == 0 || blank) {
                        answered = true;
                        let ok =
                            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok";
                        let _ = s.write_all(ok).await;
                        let _ = s.shutdown().await;
                    }
                    if n == 0 {
                        break;
                    }
                }
                log.lock().unwrap().push(got);
            });
        }
    });
    (addr, log)
}

/// A piece of what the caller sends.
enum Part {
    Bytes(Vec<u8>),
    Pause(Duration),
    /// One byte at a time, this far apart.
    Drip(Vec<u8>, Duration),
    HalfClose,
}

fn text(s: &str) -> Part {
    Part::Bytes(s.as_bytes().to_vec())
}

fn pause(ms: u64) -> Part {
    Part::Pause(Duration::from_millis(ms))
}

/// Sends `parts` to `addr` and reads until the connection ends: what came
/// back (a reset ends it too).
async fn send(addr: SocketAddr, parts: Vec<Part>) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.set_nodelay(true).unwrap();
    for part in parts {
        let sent = match part {
            Part::Bytes(b) => s.write_all(&b).await,
            Part::Pause(d) => {
                tokio::time::sleep(d).await;
                Ok(())
            }
            Part::Drip(bytes, gap) => {
                let mut r = Ok(());
                for b in bytes {
                    r = s.write_all(&[b]).await;
                    if r.is_err() {
                        break;
                    }
                    tokio::time::sleep(gap).await;
                }
                r
            }
            Part::HalfClose => s.shutdown().await,
        };
        if sent.is_err() {
            break;
        }
    }
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    let read_all = async {
        while let Ok(n) = s.read(&mut buf).await {
            if n == 0 {
                break;
            }
            answer.extend_from_slice(&buf[..n]);
        }
    };
    tokio::time::timeout(Duration::from_secs(10), read_all)
        .await
        .expect("the connection ends");
    String::from_utf8_lossy(&answer).into_owned()
}

fn request(line: &str, eol: &str) -> String {
    format!("{line}{eol}host: s{eol}{FORGED}{eol}connection: close{eol}{eol}")
}

/// Requests sent so that the sniff gives up on them before their request
/// line ends (what `FirstLineGuard` must catch).
fn cut_off_cases() -> Vec<(&'static str, Vec<Part>)> {
    let rest = |line_end: &str| text(&request(line_end, "\r\n"));
    vec![
        (
            "paused",
            vec![text("GET /slow"), pause(700), rest(" HTTP/1.1")],
        ),
        (
            "dripped",
            vec![
                Part::Drip(b"GET /drip".to_vec(), Duration::from_millis(40)),
                rest(" HTTP/1.1"),
            ],
        ),
        (
            "paused HTTP/2 preface",
            vec![
                text("PRI * HTTP/2.0\r\n"),
                pause(700),
                text("\r\nSM\r\n\r\n"),
            ],
        ),
        (
            "control byte first",
            vec![text("GET /a\0b"), pause(500), rest(" HTTP/1.1")],
        ),
        (
            "an unusual method first",
            vec![text("foo"), pause(500), rest(" / HTTP/1.1")],
        ),
        (
            "a PROXY header first",
            vec![
                text("PROXY TCP4 10.9.9.9 10.0.0.1 1111 80\r\nGET /px"),
                pause(700),
                rest(" HTTP/1.1"),
            ],
        ),
        // Go, the JDK and Netty serve any token as a method, `PROXY` too.
        (
            "PROXY as the method",
            vec![text("PROXY /pm"), pause(700), rest(" HTTP/1.1")],
        ),
        // The JDK's server does not check the version word.
        (
            "no version word",
            vec![text("DELETE /nv"), pause(700), rest(" XYZ")],
        ),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_way_of_sending_a_request_line_gets_a_forged_caller_to_the_app() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::root(dir.path(), "ca", TD);
    let (app, received) = recording_app().await;
    let b = server_with(&ca, app, &["--detect-timeout", "200ms"]).await;
    let a = client_of(&ca, &b, &[]).await;

    // Carried opaque once the sniff gives up, then reset as the request
    // line ends: the app gets at most the line's start, then a reset.
    // Through the tunnel and over a connection of its own.
    let own_connection = client_of(&ca, &b, &["--tunnel=off"]).await;
    let mut cut = 0;
    for front in [a.upstream(), own_connection.upstream()] {
        for (what, parts) in cut_off_cases() {
            let before = received.lock().unwrap().len();
            let answer = send(front, parts).await;
            assert!(!answer.contains("200 OK"), "{what}: {answer}");
            cut += 1;
            let (b, received) = (&b, &received);
            eventually(what, Duration::from_secs(5), || async move {
                b.metric("portcullis_opaque_request_lines_total", &[]) == cut as f64
                    && received.lock().unwrap().len() > before
            })
            .await;
            let got = received.lock().unwrap()[before..].to_vec();
            for r in &got {
                let seen = String::from_utf8_lossy(&r.bytes);
                assert!(!seen.contains("HTTP/"), "{what}: {seen:?}");
                assert!(r.reset, "{what}: {r:?}");
            }
        }
    }

    // Read as HTTP from the start: parsed (and refused, or rewritten).
    let parsed: Vec<(&str, Vec<Part>)> = vec![
        (
            "blank lines first",
            vec![text(&format!(
                "\r\n\r\n{}",
                request("GET /blank HTTP/1.1", "\r\n")
            ))],
        ),
        ("tabs", vec![text(&request("GET\t/tab\tHTTP/1.1", "\r\n"))]),
        (
            "form feed",
            vec![text(&request("GET\x0c/ff\x0cHTTP/1.1", "\r\n"))],
        ),
        (
            "leading space",
            vec![text(&request(" GET /sp HTTP/1.1", "\r\n"))],
        ),
        ("HTTP/0.9", vec![text(&request("GET /old", "\r\n"))]),
        (
            "control byte",
            vec![text(&request("GET /a\0b HTTP/1.1", "\r\n"))],
        ),
        (
            "HTTP/0.9, relative",
            vec![text(&request("GET admin/x", "\r\n"))],
        ),
        (
            "RTSP version",
            vec![text(&request("GET /admin/x RTSP/1.1", "\r\n"))],
        ),
        (
            "signed version",
            vec![text(&request("GET /admin/x HTTP/+1.1", "\r\n"))],
        ),
        (
            "PROXY header",
            vec![text(&format!(
                "PROXY TCP4 10.9.9.9 10.0.0.1 1111 80\r\n{}",
                request("GET /admin/x HTTP/1.1", "\r\n")
            ))],
        ),
        (
            "long method",
            vec![text(&request(
                "ABCDEFGHIJKLMNOPQRSTUVWXYZ /m HTTP/1.1",
                "\r\n",
            ))],
        ),
        (
            "token method",
            vec![text(&request("M3!H / HTTP/1.1", "\r\n"))],
        ),
        (
            "lowercase method",
            vec![text(&request("foo / HTTP/1.1", "\n"))],
        ),
        (
            "PROXY as the method",
            vec![text(&request("PROXY /admin/x HTTP/1.1", "\r\n"))],
        ),
        (
            "PROXY as the method, then a request",
            vec![text(&format!(
                "PROXY / HTTP/1.1\r\n{}",
                request("DELETE /admin/x HTTP/1.1", "\r\n")
            ))],
        ),
        (
            "not a version",
            vec![text(&request("DELETE /admin/x XYZ", "\r\n"))],
        ),
        (
            "a PROXY header spaced with a tab",
            vec![text(&request("PROXY\tUNKNOWN /admin/x HTTP/1.1", "\r\n"))],
        ),
        (
            "a word after the version",
            vec![text(&request("DELETE /admin/x HTTP/1.1 x", "\r\n"))],
        ),
    ];
    for (what, parts) in parsed {
        let answer = send(a.upstream(), parts).await;
        assert!(answer.starts_with("HTTP/1.1 "), "{what}: {answer:?}");
    }
    // A line servers take as a request at the end of the stream, even
    // without its end: the parser closes it, the app never gets it.
    let answer = send(a.upstream(), vec![text("GET /eof09"), Part::HalfClose]).await;
    assert!(!answer.contains("200 OK"), "{answer}");

    // Not HTTP: still carried to the app untouched, at once.
    let git = b"0032git-upload-pack /p.git\0host=x\0".to_vec();
    let answer = send(
        a.upstream(),
        vec![Part::Bytes(git.clone()), Part::HalfClose],
    )
    .await;
    assert!(answer.ends_with("ok"), "{answer}");
    eventually(
        "the app got the git request",
        Duration::from_secs(5),
        || {
            let got = received.lock().unwrap().iter().any(|r| r.bytes == git);
            async move { got }
        },
    )
    .await;

    let all = received.lock().unwrap().clone();
    for r in &all {
        let seen = String::from_utf8_lossy(&r.bytes);
        assert!(
            !seen.contains("sa/admin"),
            "the forged header arrived: {seen:?}"
        );
        assert!(!seen.contains("eof09"), "{seen:?}");
        if seen.contains("x-forwarded-client-cert") {
            assert!(
                seen.contains("URI=spiffe://cluster.local/ns/default/sa/client"),
                "{seen:?}"
            );
        }
    }
    assert_eq!(
        b.metric("portcullis_opaque_request_lines_total", &[]),
        cut as f64
    );
}

/// A client that closes its sending side without a word still hears a
/// server that speaks first (`nc -N host port </dev/null`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_only_listens_hears_the_banner() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::root(dir.path(), "ca", TD);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let app = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let _ = s.write_all(b"220 banner\r\n").await;
                let _ = s.shutdown().await;
            });
        }
    });
    let b = server_with(&ca, app, &["--detect-timeout", "200ms"]).await;
    let a = client_of(&ca, &b, &[]).await;
    let answer = send(a.upstream(), vec![Part::HalfClose]).await;
    assert_eq!(answer, "220 banner\r\n");
}

/// A mesh peer that drops TCP without TLS's close_notify ends the stream
/// with an error rather than an end of stream. A request line left unended
/// then must be cut off as at a clean end: the app gets a reset, never an
/// end of stream that a lenient server would take as the line's end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unended_request_line_cut_by_a_dropped_tls_connection_is_reset() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::root(dir.path(), "ca", TD);
    let (app, received) = recording_app().await;
    let b = server_with(&ca, app, &["--detect-timeout", "200ms"]).await;
    // Without close_notify, then with a TCP reset.
    for (n, reset) in [(1, false), (2, true)] {
        let config = client_config(ca.leaf("client"), &ca.cert_pem());
        let mut tls = tls_connect(config, b.addrs.inbound).await.unwrap();
        // Slow enough that the sniff gives up and the bytes go on opaque.
        tls.write_all(b"GET /dropped").await.unwrap();
        tls.flush().await.unwrap();
        tokio::time::sleep(Duration::from_millis(700)).await;
        tls.write_all(b" HTTP/1.0").await.unwrap();
        tls.flush().await.unwrap();
        let (tcp, _) = tls.into_inner();
        if reset {
            let tcp = socket2::SockRef::from(&tcp);
            tcp.set_linger(Some(Duration::ZERO)).unwrap();
        }
        drop(tcp);
        let received = &received;
        let ended = || async move { received.lock().unwrap().len() == n };
        eventually("the app connection ends", Duration::from_secs(5), ended).await;
        let got = received.lock().unwrap()[n - 1].clone();
        assert!(got.reset, "reset {reset}: the app saw a clean end: {got:?}");
        let counted = b.metric("portcullis_opaque_request_lines_total", &[]);
        assert_eq!(counted, n as f64, "reset {reset}");
    }
}

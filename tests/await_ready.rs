//! `portcullis await` exits 0 once `/ready` answers 200, 1 at its timeout
//! (also when nothing listens), and 2 on a usage error; `--admin` is
//! HOST:PORT or http://HOST:PORT.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_portcullis");

/// A tiny admin stand-in: `/ready` is 503 until `ready` is set, then 200.
fn admin(ready: Arc<AtomicBool>) -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for mut s in l.incoming().flatten() {
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf);
            let status = if ready.load(Ordering::SeqCst) {
                "200 OK"
            } else {
                "503 Service Unavailable"
            };
            let _ = s.write_all(
                format!("HTTP/1.1 {status}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                    .as_bytes(),
            );
        }
    });
    port
}

fn await_cmd(port: u16, timeout: &str) -> (std::process::Output, Duration) {
    await_admin(&format!("http://127.0.0.1:{port}"), timeout)
}

fn await_admin(admin: &str, timeout: &str) -> (std::process::Output, Duration) {
    let started = Instant::now();
    let out = Command::new(BIN)
        .args(["await", "--timeout", timeout, "--admin", admin])
        .output()
        .unwrap();
    (out, started.elapsed())
}

#[test]
fn exits_zero_once_ready() {
    let ready = Arc::new(AtomicBool::new(false));
    let port = admin(ready.clone());
    let flip = ready.clone();
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(700));
        flip.store(true, Ordering::SeqCst);
    });
    let (out, took) = await_cmd(port, "10s");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        took >= Duration::from_millis(600),
        "returned before ready: {took:?}"
    );
    assert!(took < Duration::from_secs(5), "too slow: {took:?}");
}

/// `--admin` takes HOST:PORT as `check --admin` does, not only a URL.
#[test]
fn admin_without_http_works_too() {
    let port = admin(Arc::new(AtomicBool::new(true)));
    for admin in [
        format!("127.0.0.1:{port}"),
        format!("localhost:{port}"),
        format!("http://127.0.0.1:{port}/"),
    ] {
        let (out, _) = await_admin(&admin, "10s");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{admin}: {stderr}");
    }
}

#[test]
fn fails_at_timeout() {
    let port = admin(Arc::new(AtomicBool::new(false)));
    let (out, took) = await_cmd(port, "1s");
    assert_eq!(out.status.code(), Some(1), "a timeout exits 1");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("503"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(5),
        "{took:?}"
    );
    // Nothing listening at all.
    let free = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let (out, _) = await_cmd(free, "500ms");
    assert_eq!(out.status.code(), Some(1));
}

/// A bad `--admin` is a usage error: exit 2 at once, naming the flag, not
/// a timeout later; `--help` documents the exit codes.
#[test]
fn usage_errors_exit_2_and_help_lists_exit_codes() {
    for admin in ["nope", "https://127.0.0.1:15020", "http://127.0.0.1"] {
        let started = Instant::now();
        let out = Command::new(BIN)
            .args(["await", "--timeout", "30s", "--admin", admin])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{admin}: {stderr}");
        assert!(stderr.contains("--admin"), "{stderr}");
        assert!(
            stderr.contains("use HOST:PORT or http://HOST:PORT"),
            "{stderr}"
        );
        assert!(started.elapsed() < Duration::from_secs(5));
    }
    let out = Command::new(BIN)
        .args(["await", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    for line in [
        "Exit codes:",
        "0  the sidecar answered /ready with 200",
        "1  it did not before --timeout",
        "2  usage error",
    ] {
        assert!(help.contains(line), "{line:?} not in:\n{help}");
    }
}

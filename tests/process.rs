//! Tests 5 and 6 run the real binary: graceful drain on SIGTERM, and one
//! clear line naming the flag or file for every start-up error.

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const BIN: &str = env!("CARGO_BIN_EXE_portcullis");

/// A `portcullis run` child process and the addresses it logged.
struct Proc {
    child: Child,
    inbound: SocketAddr,
    admin: SocketAddr,
}

impl Proc {
    /// `portcullis run` with `args`, listeners on port 0, JSON logs.
    fn start(args: &[String]) -> Proc {
        Proc::spawn(&run_args(args), "listening", "inbound")
    }

    /// Any server command; waits for its JSON log line `message` and reads
    /// the addresses from its `listen_key` and `admin` fields.
    fn spawn(args: &[String], message: &str, listen_key: &str) -> Proc {
        let mut child = Command::new(BIN)
            .args(args)
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let listening = loop {
            let line = lines
                .next()
                .unwrap_or_else(|| panic!("the process logged {message:?}"))
                .unwrap();
            let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
            if v["message"] == message {
                break v;
            }
        };
        // Keep draining stderr so the child never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        let addr = |k: &str| listening[k].as_str().unwrap().parse().unwrap();
        Proc {
            inbound: addr(listen_key),
            admin: addr("admin"),
            child,
        }
    }

    /// Waits until `/ready` answers 200.
    async fn wait_ready(&self) {
        let admin = self.admin;
        eventually("process ready", Duration::from_secs(10), || async move {
            http_get(admin, "/ready")
                .await
                .map(|(s, _)| s == 200)
                .unwrap_or(false)
        })
        .await;
    }

    fn signal(&self, sig: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.child.id() as i32), sig).unwrap();
    }

    /// Waits for exit at most `limit`; returns the status and how long it took.
    fn wait(&mut self, limit: Duration) -> (std::process::ExitStatus, Duration) {
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return (status, started.elapsed());
            }
            if started.elapsed() > limit {
                let _ = self.child.kill();
                panic!("process did not exit within {limit:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_open_streams_and_refuses_new_ones() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::root(dir.path(), "ca", TD);
    let echo = echo_server().await;
    let mut args = issuer_args(&ca, &ca.files.cert, "server");
    args.extend(strings(&[
        "--inbound-target",
        &echo.to_string(),
        "--drain-timeout",
        "10s",
    ]));
    let mut b = Proc::start(&args);
    b.wait_ready().await;
    let admin = b.admin;
    let mut a_args = issuer_args(&ca, &ca.files.cert, "client");
    a_args.extend(strings(&[
        "--upstream",
        &format!("127.0.0.1:0={}", b.inbound),
    ]));
    let a = Sidecar::start(&a_args).await;

    let mut stream = TcpStream::connect(a.upstream()).await.unwrap();
    let mut buf = [0u8; 5];
    stream.write_all(b"first").await.unwrap();
    stream.read_exact(&mut buf).await.unwrap();

    b.signal(nix::sys::signal::Signal::SIGTERM);
    eventually(
        "/ready says 503 while draining",
        Duration::from_secs(5),
        || async move {
            http_get(admin, "/ready")
                .await
                .map(|(s, _)| s == 503)
                .unwrap_or(false)
        },
    )
    .await;
    let inbound = b.inbound;
    eventually(
        "new connections refused",
        Duration::from_secs(5),
        || async move { TcpStream::connect(inbound).await.is_err() },
    )
    .await;
    // The open stream keeps working for a while, then ends cleanly.
    for i in 0..10 {
        let msg = format!("more {i}");
        stream.write_all(msg.as_bytes()).await.unwrap();
        let mut back = vec![0u8; msg.len()];
        stream.read_exact(&mut back).await.unwrap();
        assert_eq!(back, msg.as_bytes());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(round_trip(stream, b"last").await.unwrap(), b"last");
    let (status, took) = b.wait(Duration::from_secs(10));
    assert!(status.success(), "exit status {status}");
    assert!(
        took < Duration::from_secs(5),
        "exited {took:?} after the stream ended"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_timeout_ends_streams_that_never_finish() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::root(dir.path(), "ca", TD);
    let echo = echo_server().await;
    let mut args = issuer_args(&ca, &ca.files.cert, "server");
    args.extend(strings(&[
        "--inbound-target",
        &echo.to_string(),
        "--drain-timeout",
        "2s",
        "--inbound-mode",
        "permissive",
        "--default-policy",
        "allow",
    ]));
    let mut b = Proc::start(&args);
    b.wait_ready().await;
    let mut stream = TcpStream::connect(b.inbound).await.unwrap();
    let mut buf = [0u8; 2];
    stream.write_all(b"hi").await.unwrap();
    stream.read_exact(&mut buf).await.unwrap();
    let started = Instant::now();
    b.signal(nix::sys::signal::Signal::SIGTERM);
    let (status, _) = b.wait(Duration::from_secs(10));
    let took = started.elapsed();
    assert!(status.success(), "exit status {status}");
    assert!(
        took >= Duration::from_millis(1900) && took < Duration::from_secs(5),
        "took {took:?}"
    );
    drop(stream);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_endpoint_is_loopback_only_and_drains() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::root(dir.path(), "ca", TD);
    let echo = echo_server().await;
    let mut args = issuer_args(&ca, &ca.files.cert, "server");
    args.extend(strings(&["--inbound-target", &echo.to_string()]));
    let mut b = Proc::start(&args);
    b.wait_ready().await;
    let admin = b.admin;
    assert_eq!(
        http_request(admin, "GET", "/shutdown").await.unwrap().0,
        405
    );
    assert_eq!(
        http_request(admin, "POST", "/shutdown").await.unwrap().0,
        202
    );
    let (status, _) = b.wait(Duration::from_secs(10));
    assert!(status.success());
}

/// Makes a CA certificate that expired an hour ago.
fn expired_ca(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = rcgen::CertificateParams::default();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "expired CA");
    let now = SystemTime::now();
    params.not_before = (now - Duration::from_secs(7200)).into();
    params.not_after = (now - Duration::from_secs(3600)).into();
    let cert = params.self_signed(&key).unwrap();
    let (c, k) = (dir.join("expired.crt"), dir.join("expired.key"));
    std::fs::write(&c, cert.pem()).unwrap();
    std::fs::write(&k, key.serialize_pem()).unwrap();
    (c, k)
}

#[test]
fn every_startup_error_names_its_flag_or_file_and_exits_non_zero() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::root(dir.path(), "ca", TD);
    let other = Ca::root(dir.path(), "other", TD);
    let foreign_td = Ca::root(dir.path(), "foreign", "other.org");
    let d = |p: &Path| p.display().to_string();
    let (expired_crt, expired_key) = expired_ca(dir.path());
    let leaf_dir = dir.path().join("leaf");
    let out = Command::new(BIN)
        .args([
            "ca",
            "issue",
            "--ca",
            &d(&ca.dir),
            "--id",
            "spiffe://cluster.local/ns/a/sa/b",
            "--out",
            &d(&leaf_dir),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let busy_addr = busy.local_addr().unwrap().to_string();
    let not_pem = dir.path().join("not.pem");
    std::fs::write(&not_pem, "hello").unwrap();

    let good = |cert: &Path, key: &Path, bundle: &Path| {
        vec![
            "--ca-cert".to_string(),
            d(cert),
            "--ca-key".into(),
            d(key),
            "--trust-bundle".into(),
            d(bundle),
        ]
    };
    let (crt, key, bundle) = (&ca.files.cert, &ca.files.key, &ca.files.cert);
    let missing = dir.path().join("missing.crt");
    let with = |mut base: Vec<String>, extra: &[&str]| {
        base.extend(strings(extra));
        base
    };
    let cases: Vec<(&str, Vec<String>, Vec<&str>)> = vec![
        (
            "missing issuer",
            good(&missing, key, bundle),
            vec!["--ca-cert", "missing.crt", "No such file"],
        ),
        (
            "too many worker threads",
            with(good(crt, key, bundle), &["--worker-threads", "2000"]),
            vec!["--worker-threads", "2000"],
        ),
        (
            "missing bundle",
            good(crt, key, &missing),
            vec!["--trust-bundle", "missing.crt"],
        ),
        (
            "bundle is a directory",
            good(crt, key, dir.path()),
            vec!["--trust-bundle"],
        ),
        (
            "bundle not PEM",
            good(crt, key, &not_pem),
            vec!["--trust-bundle", "not.pem"],
        ),
        (
            "key does not match",
            good(crt, &other.files.key, bundle),
            vec!["--ca-key", "does not match"],
        ),
        (
            "issuer is not a CA",
            good(&leaf_dir.join("tls.crt"), &leaf_dir.join("tls.key"), bundle),
            vec!["tls.crt", "not a CA"],
        ),
        (
            "expired issuer",
            good(&expired_crt, &expired_key, bundle),
            vec!["expired.crt", "expired"],
        ),
        (
            "issuer of another trust domain",
            good(&foreign_td.files.cert, &foreign_td.files.key, bundle),
            vec!["--ca-cert", "not trust domain cluster.local"],
        ),
        (
            "bad trust domain",
            with(good(crt, key, bundle), &["--trust-domain", "Bad_Domain"]),
            vec!["--trust-domain"],
        ),
        (
            "bad namespace",
            with(good(crt, key, bundle), &["--namespace", "a/b"]),
            vec!["--namespace"],
        ),
        (
            "port in use",
            with(good(crt, key, bundle), &["--admin-listen", &busy_addr]),
            vec!["--admin-listen", "in use"],
        ),
        (
            "bad upstream",
            with(good(crt, key, bundle), &["--upstream", "nonsense"]),
            vec!["--upstream"],
        ),
        (
            "no issuer",
            vec!["--trust-bundle".into(), d(bundle)],
            vec!["--ca-cert"],
        ),
        (
            "issuer outside the bundle",
            good(crt, key, &other.files.cert),
            vec![
                "--ca-cert/--ca-key",
                "do not verify against the trust bundle",
            ],
        ),
    ];
    for (what, args, wants) in cases {
        let started = Instant::now();
        let out = Command::new(BIN)
            .args([
                "run",
                "--inbound-listen",
                "127.0.0.1:0",
                "--outbound-listen",
                "127.0.0.1:0",
            ])
            .args(&args)
            .output()
            .unwrap();
        let took = started.elapsed();
        let stderr = String::from_utf8_lossy(&out.stderr);
        let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
        assert!(!out.status.success(), "{what}: exited 0");
        assert!(took < Duration::from_secs(1), "{what}: took {took:?}");
        assert_eq!(lines.len(), 1, "{what}: want one line, got:\n{stderr}");
        for want in wants {
            assert!(
                lines[0].contains(want),
                "{what}: {want:?} not in {:?}",
                lines[0]
            );
        }
    }
    drop(busy);
}

/// The identity service also drains on SIGTERM and exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ca_serve_exits_zero_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::root(dir.path(), "ca", TD);
    let token = dir.path().join("kube-token");
    std::fs::write(&token, "t").unwrap();
    let d = |p: &Path| p.display().to_string();
    let mut p = Proc::spawn(
        &strings(&[
            "ca",
            "serve",
            "--issuer-cert",
            &d(&ca.files.cert),
            "--issuer-key",
            &d(&ca.files.key),
            "--trust-bundle",
            &d(&ca.files.cert),
            "--namespace",
            "portcullis",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--kube-api-url",
            "https://127.0.0.1:1",
            "--kube-ca-file",
            &d(&ca.files.cert),
            "--kube-token-file",
            &d(&token),
            "--log-format",
            "json",
        ]),
        "identity service listening",
        "listen",
    );
    p.wait_ready().await;
    p.signal(nix::sys::signal::Signal::SIGTERM);
    let (status, took) = p.wait(Duration::from_secs(10));
    assert!(status.success(), "exit status {status}");
    assert!(took < Duration::from_secs(5), "took {took:?}");
}

/// `--allow-shutdown false` (what the injector sets outside Job pods): the
/// endpoint refuses and the sidecar keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_endpoint_can_be_turned_off() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::root(dir.path(), "ca", TD);
    let echo = echo_server().await;
    let mut args = issuer_args(&ca, &ca.files.cert, "server");
    args.extend(strings(&[
        "--inbound-target",
        &echo.to_string(),
        "--allow-shutdown",
        "false",
    ]));
    let b = Sidecar::start(&args).await;
    let (status, body) = http_request(b.addrs.admin, "POST", "/shutdown")
        .await
        .unwrap();
    assert_eq!(status, 403, "{body}");
    assert!(!b.drain.is_draining());
    assert_eq!(http_get(b.addrs.admin, "/ready").await.unwrap().0, 200);
}

/// Kubernetes passes settings as `PORTCULLIS_*` variables: a bad one is
/// reported on one line that names the variable, and the flag it sets.
#[test]
fn a_bad_environment_variable_is_named() {
    let out = Command::new(BIN)
        .args([
            "run",
            "--trust-bundle",
            "b",
            "--ca-cert",
            "c",
            "--ca-key",
            "k",
        ])
        .env("PORTCULLIS_INBOUND_MODE", "strct")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.starts_with("portcullis: error: PORTCULLIS_INBOUND_MODE (for --inbound-mode): invalid value 'strct'"),
        "{stderr}"
    );
    assert!(stderr.contains("strict, permissive"), "{stderr}");
}

/// Threads named like the runtime's workers (`runtime::WORKER_NAME`) in
/// process `pid`.
fn runtime_workers(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .filter(|name| name.trim() == portcullis::runtime::WORKER_NAME)
        .count()
}

/// One thread (the main one) runs the whole sidecar unless
/// `--worker-threads` asks for more: N threads are the main one and N - 1
/// named workers; either way it comes up ready.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_threads_sizes_the_runtime() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::root(dir.path(), "ca", TD);
    let echo = echo_server().await;
    for (flag, workers) in [(None, 0), (Some("3"), 2)] {
        let mut args = issuer_args(&ca, &ca.files.cert, "server");
        args.extend(strings(&["--inbound-target", &echo.to_string()]));
        if let Some(n) = flag {
            args.extend(strings(&["--worker-threads", n]));
        }
        let p = Proc::start(&args);
        p.wait_ready().await;
        assert_eq!(runtime_workers(p.child.id()), workers, "{flag:?}");
    }
}

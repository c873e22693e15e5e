//! Hostile rule files against a real sidecar process: a deeply nested file,
//! a file over the size limit, and a symlink to a private key. The sidecar
//! must keep serving with the last good rules, stay responsive to probes
//! and SIGTERM, and never echo a key into its log or `GET /rules`.

mod common;

use std::io::{BufRead, BufReader};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;

const BIN: &str = env!("CARGO_BIN_EXE_portcullis");

const GOOD: &str = r#"rules:
  - name: client-in
    action: allow
    from:
      identities: ["spiffe://cluster.local/ns/default/sa/client"]
"#;

/// A `portcullis run` child process whose log lines are kept.
struct Proc {
    child: Child,
    inbound: SocketAddr,
    admin: SocketAddr,
    log: Arc<Mutex<Vec<String>>>,
}

impl Proc {
    /// Starts server sidecar B (issuer `ca`, rules from `rules`, default
    /// deny) in front of `echo`, with the admin port on `admin_ip`.
    fn start(ca: &Ca, rules: &Path, echo: SocketAddr, admin_ip: &str) -> Proc {
        let mut args: Vec<String> = [
            "run",
            "--log-format",
            "json",
            "--inbound-listen",
            "127.0.0.1:0",
            "--admin-listen",
            &format!("{admin_ip}:0"),
            "--inbound-target",
            &echo.to_string(),
            "--rules-dir",
            &rules.display().to_string(),
            "--default-policy",
            "deny",
            "--drain-timeout",
            "2s",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(issuer_args(ca, &ca.files.cert, "server"));
        let mut child = Command::new(BIN)
            .args(&args)
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let log = Arc::new(Mutex::new(Vec::new()));
        let listening = await_log_line(&mut lines, "listening", |line| {
            log.lock().unwrap().push(line.to_string())
        });
        let keep = log.clone();
        std::thread::spawn(move || {
            for line in lines.map_while(Result::ok) {
                keep.lock().unwrap().push(line);
            }
        });
        let addr = |k: &str| listening[k].as_str().unwrap().parse().unwrap();
        Proc {
            inbound: addr("inbound"),
            admin: addr("admin"),
            child,
            log,
        }
    }

    /// The admin address as a loopback client reaches it.
    fn admin_local(&self) -> SocketAddr {
        SocketAddr::new([127, 0, 0, 1].into(), self.admin.port())
    }

    async fn get(&self, path: &str) -> (u16, String) {
        let answer =
            tokio::time::timeout(Duration::from_secs(1), http_get(self.admin_local(), path)).await;
        match answer {
            Ok(Ok(a)) => a,
            _ => (0, String::new()),
        }
    }

    async fn rules(&self) -> serde_json::Value {
        serde_json::from_str(&self.get("/rules").await.1).unwrap_or_default()
    }

    async fn reload_errors(&self) -> f64 {
        metric_value(
            &self.get("/metrics").await.1,
            "portcullis_rules_reloads_total",
            &[("result", "error")],
        )
    }

    fn log_text(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    /// Sends SIGTERM and returns how long the process took to exit.
    fn terminate(&mut self, limit: Duration) -> Duration {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
        let started = Instant::now();
        loop {
            if self.child.try_wait().unwrap().is_some() {
                return started.elapsed();
            }
            assert!(
                started.elapsed() < limit,
                "the sidecar did not exit within {limit:?} of SIGTERM"
            );
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

/// A sidecar pair A (in-process client) → B (process) with `GOOD` rules.
struct Setup {
    _dir: tempfile::TempDir,
    rules: PathBuf,
    b: Proc,
    a: Sidecar,
}

async fn setup(admin_ip: &str) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::root(dir.path(), "ca", TD);
    let rules = dir.path().join("rules");
    std::fs::create_dir(&rules).unwrap();
    write_atomic(&rules.join("good.yaml"), GOOD.as_bytes());
    let echo = echo_server().await;
    let b = Proc::start(&ca, &rules, echo, admin_ip);
    let admin = b.admin_local();
    eventually("B ready", Duration::from_secs(10), || async move {
        matches!(http_get(admin, "/ready").await, Ok((200, _)))
    })
    .await;
    let mut a_args = issuer_args(&ca, &ca.files.cert, "client");
    a_args.extend(["--upstream".into(), format!("127.0.0.1:0={}", b.inbound)]);
    let a = Sidecar::start(&a_args).await;
    Setup {
        _dir: dir,
        rules,
        b,
        a,
    }
}

/// One echo through A → B.
async fn ping(a: &Sidecar) -> bool {
    let Ok(s) = tokio::net::TcpStream::connect(a.upstream()).await else {
        return false;
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(2), round_trip(s, b"ping")).await,
        Ok(Ok(out)) if out == b"ping"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deeply_nested_or_oversized_rule_file_never_stalls_the_sidecar() {
    let mut s = setup("127.0.0.1").await;
    assert!(ping(&s.a).await, "the good rules let the client in");
    let good_hash = s.b.rules().await["hash"].clone();

    // 80,000 levels in 160 KB.
    let deep = format!("http: {}{}\n", "[".repeat(80_000), "]".repeat(80_000));
    write_atomic(&s.rules.join("deep.yaml"), deep.as_bytes());

    // For the next seconds probes answer and traffic flows on the old rules.
    let started = Instant::now();
    let mut rounds = 0;
    while started.elapsed() < Duration::from_secs(3) {
        let (live, _) = s.b.get("/live").await;
        assert_eq!(live, 200, "/live did not answer within 1 s");
        assert!(ping(&s.a).await, "traffic stopped");
        rounds += 1;
    }
    assert!(rounds >= 5, "only {rounds} rounds in 3 s");

    let b = &s.b;
    eventually(
        "the refusal in /rules",
        Duration::from_secs(5),
        || async move { b.rules().await["last_error"]["position"] == "deep.yaml:1:70" },
    )
    .await;
    let status = s.b.rules().await;
    assert_eq!(status["hash"], good_hash, "the good rules stay active");
    assert_eq!(status["valid"], false);
    let message = status["last_error"]["message"].as_str().unwrap();
    assert!(
        message.ends_with("deep.yaml:1:70: nested deeper than 64 levels; refused before parsing"),
        "{message}"
    );
    assert_eq!(s.b.reload_errors().await, 1.0);

    // A file over the size limit is refused without being parsed.
    std::fs::remove_file(s.rules.join("deep.yaml")).unwrap();
    let big = format!("{GOOD}{}", format!("#{}\n", "x".repeat(1023)).repeat(1100));
    write_atomic(&s.rules.join("big.yaml"), big.as_bytes());
    eventually("the size refusal", Duration::from_secs(5), || async move {
        b.rules().await["last_error"]["position"] == "big.yaml"
    })
    .await;
    let status = s.b.rules().await;
    assert!(
        status["last_error"]["message"]
            .as_str()
            .unwrap()
            .ends_with("big.yaml: the file is larger than the limit of 1048576 bytes; refused"),
        "{status}"
    );
    assert_eq!(status["hash"], good_hash);
    assert_eq!(s.b.reload_errors().await, 2.0);
    assert!(ping(&s.a).await);
    let refusals = s.b.log_text().matches("rules reload refused").count();
    assert_eq!(refusals, 2, "each refusal is logged once");

    let took = s.b.terminate(Duration::from_secs(5));
    assert!(took < Duration::from_secs(5), "exit took {took:?}");
}

/// The resident memory of a process, in KiB (`VmRSS` of /proc/PID/status).
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// A 148 KB file whose 4,000 aliases each repeat a rule of 20,000 paths:
/// a parser that expands it builds 80 million strings.
fn alias_bomb() -> String {
    let paths = vec!["\"/a\""; 20_000].join(", ");
    let mut s = format!(
        "rules:\n  - &r {{name: r0, action: allow, ports: [1], http: {{paths: [{paths}]}}}}\n"
    );
    s.push_str(&"  - *r\n".repeat(4_000));
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_yaml_alias_bomb_is_refused_before_parsing_and_later_files_apply() {
    let mut s = setup("127.0.0.1").await;
    assert!(ping(&s.a).await, "the good rules let the client in");
    let good_hash = s.b.rules().await["hash"].clone();
    let pid = s.b.child.id();
    let rss_before = rss_kib(pid);

    let bomb = alias_bomb();
    assert!(
        bomb.len() > 140_000 && bomb.len() < 160_000,
        "{}",
        bomb.len()
    );
    let started = Instant::now();
    write_atomic(&s.rules.join("42-alias.yaml"), bomb.as_bytes());
    let b = &s.b;
    eventually(
        "the refusal in /rules",
        Duration::from_secs(10),
        || async move { b.rules().await["last_error"]["position"] == "42-alias.yaml:2:5" },
    )
    .await;
    let refused_after = started.elapsed();
    assert!(
        refused_after < Duration::from_secs(2),
        "refused after {refused_after:?}, not before parsing"
    );
    let status = s.b.rules().await;
    assert_eq!(status["hash"], good_hash, "the good rules stay active");
    let message = status["last_error"]["message"].as_str().unwrap();
    assert!(
        message.ends_with(
            "42-alias.yaml:2:5: YAML anchors and aliases are not allowed in rule files; refused before parsing"
        ),
        "{message}"
    );
    // Nothing is parsing the bomb in the background: memory stays flat
    // and probes and traffic carry on.
    for _ in 0..5 {
        let (live, _) = s.b.get("/live").await;
        assert_eq!(live, 200, "/live did not answer within 1 s");
        assert!(ping(&s.a).await, "traffic stopped");
        let rss = rss_kib(pid);
        assert!(rss < 200 * 1024, "RSS {rss} KiB (was {rss_before} KiB)");
    }

    // An emergency deny written next is applied promptly.
    let deny = "rules:\n  - name: emergency\n    action: deny\n    from:\n      identities: [\"spiffe://cluster.local/ns/default/sa/client\"]\n";
    std::fs::remove_file(s.rules.join("42-alias.yaml")).unwrap();
    let started = Instant::now();
    write_atomic(&s.rules.join("00-deny.yaml"), deny.as_bytes());
    let a = &s.a;
    eventually("the deny applied", Duration::from_secs(10), || async move {
        !ping(a).await
    })
    .await;
    let applied_after = started.elapsed();
    assert!(
        applied_after < Duration::from_secs(3),
        "the deny took {applied_after:?}"
    );
    assert_ne!(s.b.rules().await["hash"], good_hash);
    let rss = rss_kib(pid);
    eprintln!(
        "alias bomb refused after {refused_after:?}, deny applied after {applied_after:?}, \
         RSS {rss_before} KiB before, {rss} KiB after"
    );
    assert!(rss < 200 * 1024, "RSS {rss} KiB");
    let took = s.b.terminate(Duration::from_secs(5));
    assert!(took < Duration::from_secs(5), "exit took {took:?}");
}

/// A non-loopback address of this host, if it has one.
fn local_ip() -> Option<IpAddr> {
    let probe = std::net::UdpSocket::bind("0.0.0.0:0").ok()?;
    probe.connect("192.0.2.1:9").ok()?;
    let ip = probe.local_addr().ok()?.ip();
    (!ip.is_loopback() && !ip.is_unspecified()).then_some(ip)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_symlink_to_a_private_key_is_refused_and_never_echoed() {
    let s = setup("0.0.0.0").await;
    let key_dir = tempfile::tempdir().unwrap();
    let ca_key = std::fs::read_to_string(&Ca::root(key_dir.path(), "other", TD).files.key).unwrap();
    assert!(ca_key.contains("PRIVATE KEY"));
    let body_line = ca_key.lines().nth(1).unwrap().to_string();
    let key = key_dir.path().join("ca.key");
    std::fs::write(&key, &ca_key).unwrap();
    std::os::unix::fs::symlink(&key, s.rules.join("secrets.yaml")).unwrap();

    let b = &s.b;
    eventually(
        "the refusal in /rules",
        Duration::from_secs(5),
        || async move { b.rules().await["last_error"]["position"] == "secrets.yaml" },
    )
    .await;
    let status = s.b.rules().await;
    let message = status["last_error"]["message"].as_str().unwrap();
    assert!(
        message.ends_with("secrets.yaml: resolves outside the rules directory; refused"),
        "{message}"
    );
    assert!(ping(&s.a).await, "the good rules stay active");

    // A PEM file copied into the directory is refused without quoting it.
    std::fs::remove_file(s.rules.join("secrets.yaml")).unwrap();
    write_atomic(&s.rules.join("copied.yaml"), ca_key.as_bytes());
    eventually("the PEM refusal", Duration::from_secs(5), || async move {
        b.rules().await["last_error"]["position"] == "copied.yaml:1:1"
    })
    .await;

    let everything = format!("{}\n{}", s.b.log_text(), s.b.get("/rules").await.1);
    assert!(everything.contains("secrets.yaml"), "the file is named");
    assert!(!everything.contains("PRIVATE KEY"), "{everything}");
    assert!(!everything.contains(&body_line), "{everything}");

    // Other clients see where the error is, not what it says.
    if let Some(ip) = local_ip() {
        let (code, body) = http_get(SocketAddr::new(ip, s.b.admin.port()), "/rules")
            .await
            .unwrap();
        assert_eq!(code, 200);
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["last_error"]["position"], "copied.yaml:1:1");
        assert_eq!(v["valid"], false);
        assert_eq!(v["rule_count"], 1);
        for hidden in ["files", "dir", "message"] {
            assert!(!body.contains(hidden), "{hidden} in {body}");
        }
    } else {
        eprintln!("no non-loopback address: the remote /rules view is not checked");
    }
}

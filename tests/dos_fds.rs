//! Out of file descriptors: a sidecar started with a low descriptor limit
//! (soft and hard, so it cannot raise it) and then filled with held
//! connections must refuse new ones cleanly (a close, not a hang), log it
//! once per interval rather than once per connection, count it, and serve
//! again by itself once descriptors are free.

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

const BIN: &str = env!("CARGO_BIN_EXE_portcullis");
/// The sidecar's descriptor limit, soft and hard.
const NOFILE: u32 = 64;
/// Silent connections opened to fill the sidecar: more than it can hold.
const FLOOD: usize = 120;

/// The child and every JSON log line it wrote so far.
struct Proc {
    child: Child,
    logs: Arc<Mutex<Vec<serde_json::Value>>>,
}

impl Proc {
    fn logged(&self, message: &str, listener: Option<&str>) -> Vec<serde_json::Value> {
        self.logs
            .lock()
            .unwrap()
            .iter()
            .filter(|v| v["message"] == message)
            .filter(|v| listener.is_none_or(|l| v["listener"] == l))
            .cloned()
            .collect()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// True when the server closes `s` within `limit` (a clean refusal).
async fn closed_within(s: &mut TcpStream, limit: Duration) -> bool {
    let mut buf = [0u8; 16];
    matches!(
        tokio::time::timeout(limit, s.read(&mut buf)).await,
        Ok(Ok(0)) | Ok(Err(_))
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_descriptors_refuses_cleanly_logs_once_and_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::root(dir.path(), "ca", TD);
    let mut args: Vec<String> = [
        format!("--nofile={NOFILE}:{NOFILE}"),
        "--".into(),
        BIN.into(),
        "run".into(),
        "--log-format".into(),
        "json".into(),
        "--inbound-listen".into(),
        "127.0.0.1:0".into(),
        "--admin-listen".into(),
        "127.0.0.1:0".into(),
        "--outbound-listen".into(),
        "127.0.0.1:0".into(),
        // Silent clients stay pending (one descriptor each) for the
        // whole test.
        // Explicit mode: no SO_ORIGINAL_DST needed (never reached anyway).
        "--inbound-target".into(),
        "127.0.0.1:9".into(),
        "--hello-timeout".into(),
        "120s".into(),
        "--handshake-timeout".into(),
        "120s".into(),
    ]
    .into();
    args.extend(issuer_args(&ca, &ca.files.cert, "server"));
    let mut child = Command::new("prlimit")
        .args(&args)
        .stderr(Stdio::piped())
        .spawn()
        .expect("prlimit (util-linux) runs");
    let stderr = child.stderr.take().unwrap();
    let logs = Arc::new(Mutex::new(Vec::new()));
    let sink = logs.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
            sink.lock().unwrap().push(v);
        }
    });
    let proc = Proc { child, logs };
    eventually("the sidecar listens", Duration::from_secs(10), || async {
        !proc.logged("listening", None).is_empty()
    })
    .await;
    let listening = proc.logged("listening", None).remove(0);
    let addr = |k: &str| -> SocketAddr { listening[k].as_str().unwrap().parse().unwrap() };
    let (inbound, admin) = (addr("inbound"), addr("admin"));
    eventually("ready", Duration::from_secs(10), || async {
        matches!(http_get(admin, "/ready").await, Ok((200, _)))
    })
    .await;

    // Fill it: silent connections until it has no descriptor left. The
    // ones it cannot hold must be closed at once, not left hanging.
    let started = Instant::now();
    let mut conns = Vec::new();
    for _ in 0..FLOOD {
        conns.push(TcpStream::connect(inbound).await.unwrap());
    }
    let mut checks = tokio::task::JoinSet::new();
    for mut s in conns {
        checks.spawn(async move {
            let closed = closed_within(&mut s, Duration::from_millis(500)).await;
            (closed, s)
        });
    }
    let mut held = Vec::new();
    let mut refused = 0;
    while let Some(r) = checks.join_next().await {
        match r.unwrap() {
            (true, _) => refused += 1,
            (false, s) => held.push(s),
        }
    }
    assert!(refused > 0, "some connections were refused");
    assert!(
        !held.is_empty(),
        "some connections were held: {:?}",
        proc.logs.lock().unwrap()
    );
    // The admin port is out of descriptors too: refused cleanly.
    let probe = tokio::time::timeout(Duration::from_secs(2), http_get(admin, "/live")).await;
    assert!(
        matches!(probe, Ok(Ok((0, _))) | Ok(Err(_))),
        "admin refused cleanly while out of descriptors: {probe:?}"
    );
    let exhausted_for = started.elapsed();

    // One line per listener, not one per refused connection.
    let warned = proc.logged(
        "out of file descriptors: refusing new connections",
        Some("inbound"),
    );
    assert!(
        exhausted_for < portcullis::limits::ACCEPT_LOG_INTERVAL,
        "the test ran within one log interval"
    );
    assert_eq!(warned.len(), 1, "logged once: {warned:?}");

    // Free the descriptors: it serves again by itself.
    drop(held);
    eventually("admin answers again", Duration::from_secs(10), || async {
        matches!(http_get(admin, "/ready").await, Ok((200, _)))
    })
    .await;
    let mut again = TcpStream::connect(inbound).await.unwrap();
    assert!(
        !closed_within(&mut again, Duration::from_millis(500)).await,
        "a new inbound connection is held (served) again"
    );
    let (_, metrics) = http_get(admin, "/metrics").await.unwrap();
    let errors = |listener| {
        metric_value(
            &metrics,
            "portcullis_accept_errors_total",
            &[("listener", listener), ("reason", "fd_limit")],
        )
    };
    assert!(errors("inbound") >= 1.0, "counted:\n{metrics}");
    assert!(errors("admin") >= 1.0, "counted:\n{metrics}");
    let recovered = proc.logged(
        "accepting connections again after running out of file descriptors",
        Some("inbound"),
    );
    assert_eq!(recovered.len(), 1, "recovery logged once: {recovered:?}");
    println!(
        "nofile={NOFILE}: held {} silent connections, refused {refused} of {FLOOD} cleanly; \
         accept_errors_total{{fd_limit}}: inbound={} admin={}; recovery line: {}",
        FLOOD - refused,
        errors("inbound"),
        errors("admin"),
        recovered[0]
    );
}

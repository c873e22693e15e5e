//! A log pipe that nobody reads (a stuck container runtime) must cost log
//! lines, not traffic: the real binary, its stderr a pipe we stop reading
//! once it is up, keeps answering while it logs far more than the pipe and
//! its queue hold, and counts what it dropped.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

const BIN: &str = env!("CARGO_BIN_EXE_portcullis");

/// Each accepted log-level change logs one line (about 150 bytes): this
/// many fill the 64 KiB pipe and the 4,096-line queue several times over.
const CHANGES: usize = 8_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_log_pipe_costs_lines_not_traffic() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::root(dir.path(), "ca", TD);
    let echo = echo_server().await;
    let mut args = run_args(&["--inbound-target".into(), echo.to_string()]);
    args.extend(issuer_args(&ca, &ca.files.cert, "server"));
    let mut child = Command::new(BIN)
        .args(&args)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Read up to the `listening` line, then never again.
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let admin = loop {
        let mut line = String::new();
        assert!(
            stderr.read_line(&mut line).unwrap() > 0,
            "exited before listening"
        );
        let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
        if v["message"] == "listening" {
            break v["admin"].as_str().unwrap().parse().unwrap();
        }
    };
    let result = tokio::time::timeout(Duration::from_secs(60), async {
        for i in 0..CHANGES {
            let level = if i % 2 == 0 {
                "info"
            } else {
                "warn,portcullis=info"
            };
            let (status, body) = http_request(admin, "PUT", &format!("/logging?level={level}"))
                .await
                .unwrap();
            assert_eq!(status, 200, "change {i}: {body}");
        }
        http_get(admin, "/metrics").await.unwrap()
    })
    .await;
    let _ = child.kill();
    let _ = child.wait();
    drop(stderr);
    let (status, metrics) = result.expect("the sidecar kept answering with its log pipe full");
    assert_eq!(status, 200);
    let dropped = metric_value(&metrics, "portcullis_log_lines_dropped_total", &[]);
    assert!(dropped > 0.0, "nothing counted as dropped:\n{metrics}");
    assert!(dropped < CHANGES as f64, "{dropped}");
}

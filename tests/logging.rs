//! The log filter changed at runtime: `PUT /logging?level=` on the admin
//! port turns debug lines on and off in the running sidecar's stderr, `GET
//! /logging` shows the filter in force, and a change from a non-loopback
//! address is refused. The sidecar runs in its own network namespace whose
//! `lo` also carries a non-loopback address (10.99.0.1), so a non-loopback
//! client exists whatever the machine's own interfaces are.

mod common;
mod netns;

use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use netns::Netns;

const BIN: &str = env!("CARGO_BIN_EXE_portcullis");
const ADMIN: &str = "127.0.0.1:15020";
const OUTSIDE: &str = "10.99.0.1";
/// The sidecar's debug line for a malformed admin request.
const DEBUG_LINE: &str = "admin connection failed";
/// The sidecar's info line for every accepted change.
const CHANGED: &str = "log level changed through the admin endpoint";

/// `curl` inside `ns`: the status code and the body.
fn curl(ns: &Netns, method: &str, url: &str) -> (u16, String) {
    let out = ns.run(&[
        "curl",
        "-sS",
        "--max-time",
        "5",
        "-X",
        method,
        "-w",
        "\n%{http_code}",
        url,
    ]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (
        code.trim().parse().unwrap_or(0),
        body.trim_end().to_string(),
    )
}

/// Sends a request hyper cannot parse to the admin port and waits until
/// the sidecar closed it (by then its debug line, if enabled, is written).
fn malformed_admin_request(ns: &Netns) {
    ns.ok(&[
        "bash",
        "-c",
        "exec 3<>/dev/tcp/127.0.0.1/15020; printf 'not http\\r\\n\\r\\n' >&3; timeout 5 cat <&3 >/dev/null",
    ]);
}

/// The JSON `message` of every stderr line so far.
fn messages(lines: &Mutex<Vec<String>>) -> Vec<String> {
    lines
        .lock()
        .unwrap()
        .iter()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v["message"].as_str().map(str::to_string))
        .collect()
}

fn count(lines: &Mutex<Vec<String>>, message: &str) -> usize {
    messages(lines).iter().filter(|m| *m == message).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_level_changes_at_runtime_from_loopback_only() {
    if netns::skip(
        "log_level_changes_at_runtime_from_loopback_only",
        &["ip", "curl", "bash"],
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::root(dir.path(), "ca", TD);
    let ns = Netns::new("logging");
    ns.addr("lo", &format!("{OUTSIDE}/32"));
    let mut argv: Vec<String> = [
        BIN,
        "run",
        "--log-format",
        "json",
        "--log-level",
        "info",
        "--inbound-listen",
        "127.0.0.1:15006",
        "--admin-listen",
        "0.0.0.0:15020",
        "--inbound-target",
        "127.0.0.1:9",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    argv.extend(issuer_args(&ca, &ca.files.cert, "server"));
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    let mut sidecar = ns.spawn_with(&argv, Stdio::null(), Stdio::piped());
    let lines = Arc::new(Mutex::new(Vec::new()));
    let stderr = sidecar.take_stderr().unwrap();
    let sink = lines.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            sink.lock().unwrap().push(line);
        }
    });
    eventually("sidecar ready", Duration::from_secs(10), || {
        let ready = curl(&ns, "GET", &format!("http://{ADMIN}/ready")).0 == 200;
        async move { ready }
    })
    .await;

    let url = |host: &str, query: &str| format!("http://{host}:15020/logging{query}");
    assert_eq!(
        curl(&ns, "GET", &url("127.0.0.1", "")),
        (200, "info".into())
    );

    // At info, the debug line does not appear.
    malformed_admin_request(&ns);

    // From a non-loopback address: refused, and the filter is unchanged.
    let (status, body) = curl(&ns, "PUT", &url(OUTSIDE, "?level=debug"));
    assert_eq!(status, 403, "{body}");
    assert_eq!(
        curl(&ns, "GET", &url(OUTSIDE, "")),
        (200, "info".into()),
        "GET /logging answers from anywhere"
    );

    // A directive that does not parse: 400, filter unchanged.
    let (status, body) = curl(&ns, "PUT", &url("127.0.0.1", "?level=%3D%3D%3D"));
    assert_eq!(status, 400, "{body}");
    let (status, _) = curl(&ns, "PUT", &url("127.0.0.1", ""));
    assert_eq!(status, 400);

    // From loopback: debug on, and the debug line appears.
    assert_eq!(curl(&ns, "PUT", &url("127.0.0.1", "?level=debug")).0, 200);
    assert_eq!(
        curl(&ns, "GET", &url("127.0.0.1", "")),
        (200, "debug".into())
    );
    malformed_admin_request(&ns);
    eventually("the debug line appears", Duration::from_secs(5), || {
        let n = count(&lines, DEBUG_LINE);
        async move { n == 1 }
    })
    .await;

    // Back to info: the same event no longer logs. The second change is a
    // marker logged after the malformed request was closed.
    assert_eq!(curl(&ns, "PUT", &url("127.0.0.1", "?level=info")).0, 200);
    malformed_admin_request(&ns);
    assert_eq!(curl(&ns, "PUT", &url("127.0.0.1", "?level=info")).0, 200);
    eventually("both changes logged", Duration::from_secs(5), || {
        let n = count(&lines, CHANGED);
        async move { n == 3 }
    })
    .await;
    assert_eq!(
        count(&lines, DEBUG_LINE),
        1,
        "debug lines: {:#?}",
        messages(&lines)
    );
    drop(sidecar);
}

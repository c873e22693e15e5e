//! A real Prometheus for tests: started from a temp dir on a free loopback
//! port with a given config, queried over its HTTP API, killed on drop.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value;

use crate::common::{eventually, http_get};

/// The full path of `program` on PATH; panics with the fix when missing.
pub fn tool(program: &str) -> PathBuf {
    std::env::var_os("PATH")
        .and_then(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join(program))
                .find(|p| p.is_file())
        })
        .unwrap_or_else(|| {
            panic!("{program} not found: run `make deps` (Debian package prometheus)")
        })
}

/// A running Prometheus.
pub struct Prometheus {
    child: Child,
    pub addr: SocketAddr,
    log: PathBuf,
}

impl Prometheus {
    /// Starts Prometheus with `config` (a file in `dir`), its TSDB in `dir`,
    /// and waits (bounded) until it is ready. A port taken between choosing
    /// and binding it makes Prometheus exit; then another port is tried.
    pub async fn start(dir: &Path, config: &Path) -> Prometheus {
        for attempt in 0..3 {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            let addr: SocketAddr = ([127, 0, 0, 1], port).into();
            let log = dir.join(format!("prometheus-{attempt}.log"));
            let child = Command::new(tool("prometheus"))
                .arg(format!("--config.file={}", config.display()))
                .arg(format!(
                    "--storage.tsdb.path={}",
                    dir.join(format!("data-{attempt}")).display()
                ))
                .arg(format!("--web.listen-address={addr}"))
                .arg("--log.level=warn")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&log).unwrap())
                .spawn()
                .unwrap();
            let mut p = Prometheus { child, addr, log };
            let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
            loop {
                if let Ok((200, _)) = http_get(addr, "/-/ready").await {
                    return p;
                }
                if p.child.try_wait().unwrap().is_some() {
                    break;
                }
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "prometheus not ready after 30 s:\n{}",
                    p.logs()
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            eprintln!("prometheus exited at start, retrying:\n{}", p.logs());
        }
        panic!("prometheus would not start (see the logs above)");
    }

    /// Prometheus' own log so far, for failure messages.
    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `GET /api/v1/<path>`: the `data` of a successful answer.
    pub async fn api(&self, path: &str) -> Value {
        let (status, body) = http_get(self.addr, &format!("/api/v1/{path}"))
            .await
            .unwrap();
        let v: Value = serde_json::from_str(&body)
            .unwrap_or_else(|e| panic!("/api/v1/{path}: {status} {e}: {body}"));
        assert_eq!(v["status"], "success", "/api/v1/{path}: {body}");
        v["data"].clone()
    }

    /// An instant query; the result's samples as (labels, value).
    pub async fn query(&self, promql: &str) -> Vec<(Value, f64)> {
        let data = self
            .api(&format!("query?query={}", url_encode(promql)))
            .await;
        let value = |v: &Value| -> f64 {
            v[1].as_str()
                .and_then(|s| s.parse().ok())
                .unwrap_or(f64::NAN)
        };
        match data["resultType"].as_str() {
            Some("vector") => data["result"]
                .as_array()
                .unwrap()
                .iter()
                .map(|s| (s["metric"].clone(), value(&s["value"])))
                .collect(),
            Some("scalar") => vec![(Value::Null, value(&data["result"]))],
            other => panic!("{promql}: unexpected result type {other:?}"),
        }
    }

    /// Waits (at most `limit`) until `promql` returns at least one sample
    /// with a number (not NaN): the expression has data to show.
    pub async fn wait_for_data(&self, promql: &str, limit: Duration) {
        let what = format!("data for {promql}");
        eventually(&what, limit, || async {
            self.query(promql).await.iter().any(|(_, v)| v.is_finite())
        })
        .await;
    }

    /// The state (`pending`, `firing`) of alert `name`, if active.
    pub async fn alert_state(&self, name: &str) -> Option<String> {
        let data = self.api("alerts").await;
        data["alerts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|a| a["labels"]["alertname"] == name)
            .map(|a| a["state"].as_str().unwrap_or_default().to_string())
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Percent-encodes a query parameter value.
pub fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Runs `promtool` with `args`; panics with its output unless it succeeds.
pub fn promtool(args: &[&str]) {
    let out = Command::new(tool("promtool")).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "promtool {args:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

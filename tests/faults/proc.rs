//! The real `portcullis run` binary as a child process, for faults an
//! in-process sidecar cannot suffer (SIGKILL) and for measuring a sidecar's
//! own memory.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use crate::common::*;

/// The binary under test: this build's, or `PORTCULLIS_SOAK_BIN` (the
/// release build, for `make soak`'s figures).
pub fn bin() -> String {
    std::env::var("PORTCULLIS_SOAK_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_portcullis").into())
}

/// A running sidecar process, its addresses, and every log line so far.
pub struct Proc {
    child: Child,
    pub inbound: SocketAddr,
    pub admin: SocketAddr,
    /// The explicit-mode upstream listener, if one was asked for.
    pub upstream: Option<SocketAddr>,
    pub logs: Arc<Mutex<Vec<String>>>,
}

impl Proc {
    /// `portcullis run --log-format json` with `args` (which must name the
    /// listen addresses); returns once it logged that it is listening.
    pub fn run(args: &[String]) -> Proc {
        let mut child = Command::new(bin())
            .args(["run", "--log-format", "json"])
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let logs: Arc<Mutex<Vec<String>>> = Arc::default();
        let (tx, rx) = mpsc::channel();
        {
            let logs = logs.clone();
            // Reads until the child exits, so it never blocks on a full pipe.
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
                    if v["message"] == "listening" {
                        let _ = tx.send(v);
                    }
                    logs.lock().unwrap().push(line);
                }
            });
        }
        let Ok(listening) = rx.recv_timeout(Duration::from_secs(20)) else {
            let _ = child.kill();
            panic!(
                "the sidecar did not start listening: {:?}",
                logs.lock().unwrap()
            );
        };
        let addr = |k: &str| listening[k].as_str().and_then(|s| s.parse().ok());
        let upstream = listening["upstreams"]
            .as_str()
            .and_then(|s| s.split(',').next())
            .and_then(|s| s.trim_matches(['[', ']', '"']).parse().ok());
        Proc {
            inbound: addr("inbound").expect("inbound address logged"),
            admin: addr("admin").expect("admin address logged"),
            upstream,
            child,
            logs,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits (at most 20 s) until `/ready` answers 200; returns when it did.
    pub async fn wait_ready(&self) -> Instant {
        let admin = self.admin;
        eventually(
            "sidecar process ready",
            Duration::from_secs(20),
            || async move { matches!(http_get(admin, "/ready").await, Ok((200, _))) },
        )
        .await;
        Instant::now()
    }

    /// SIGKILL, and reap it.
    pub fn kill(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// The resident set size now, in kB, from `/proc/<pid>/status`.
    pub fn rss_kb(&self) -> u64 {
        status_kb(self.pid(), "VmRSS:")
    }

    /// The peak resident set size, in kB.
    pub fn peak_rss_kb(&self) -> u64 {
        status_kb(self.pid(), "VmHWM:")
    }

    /// Open file descriptors now.
    pub fn fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .map(|d| d.count())
            .unwrap_or(0)
    }

    /// Log lines containing `needle`.
    pub fn logged(&self, needle: &str) -> Vec<String> {
        let logs = self.logs.lock().unwrap();
        logs.iter()
            .filter(|l| l.contains(needle))
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

fn status_kb(pid: u32, key: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

//! Soak runs that take minutes, kept out of `make test`: `make soak` runs
//! them (`--ignored`) against the release binary and prints the figures
//! recorded in benches/README.md.

mod common;
#[path = "faults/load.rs"]
mod load;
#[path = "faults/proc.rs"]
#[allow(dead_code)]
mod proc;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

/// Set in the environment of this test binary re-run as the echo app.
const ECHO_CHILD: &str = "PORTCULLIS_SOAK_ECHO_CHILD";

/// 10,000 connections held at once through a pair of sidecar processes
/// (fewer if RLIMIT_NOFILE cannot be raised: the figure says so).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "minutes; run by make soak"]
async fn ten_thousand_held_connections_through_a_pair() {
    let n = load::connections_allowed(10_000);
    if n < 10_000 {
        eprintln!(
            "RLIMIT_NOFILE cannot be raised here (no CAP_SYS_RESOURCE): holding {n} connections, \
             the most two descriptors per connection per sidecar allow"
        );
    }
    let echo = EchoChild::start();
    let held = load::hold(n, echo.addr).await;
    load::assert_bounded(&held, 64);
}

/// The echo app in a process of its own, so its sockets do not count
/// against this process's descriptor limit.
struct EchoChild {
    child: Child,
    addr: std::net::SocketAddr,
}

impl EchoChild {
    fn start() -> EchoChild {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "echo_child", "--ignored", "--nocapture"])
            .env(ECHO_CHILD, "1")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let addr = lines
            .by_ref()
            .map_while(Result::ok)
            .find_map(|l| l.strip_prefix("ECHO ").map(|a| a.parse().unwrap()))
            .expect("the echo child printed its address");
        // Keep reading: the harness writes on (slow-test notices), and a
        // closed pipe would end the child.
        std::thread::spawn(move || for _ in lines {});
        EchoChild { child, addr }
    }
}

impl Drop for EchoChild {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Not a test: the echo app when run by `EchoChild` (a no-op otherwise).
/// Serves until its stdin closes, i.e. until the parent is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "the echo app process of the soak run"]
async fn echo_child() {
    if std::env::var_os(ECHO_CHILD).is_none() {
        return;
    }
    load::connections_allowed(10_000);
    let addr = common::echo_server().await;
    println!("ECHO {addr}");
    let mut stdin = tokio::io::stdin();
    let mut buf = [0u8; 1];
    let _ = tokio::io::AsyncReadExt::read(&mut stdin, &mut buf).await;
}

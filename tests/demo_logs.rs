//! `portcullis demo` shows the sidecars' log lines, each prefixed with the
//! sidecar's name: rules loaded and reloaded, requests denied.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_portcullis");

/// Kills the demo if the test fails half-way.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Waits (bounded) for a line from `rx` that satisfies `want`; returns it.
/// On failure it says which line (`what`) it waited for and shows every
/// line seen, the demo's stdout and stderr interleaved.
fn line_where(
    rx: &mpsc::Receiver<String>,
    seen: &mut Vec<String>,
    what: &str,
    want: impl Fn(&str) -> bool,
) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    if let Some(l) = seen.iter().find(|l| want(l)) {
        return l.clone();
    }
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        match rx.recv_timeout(left) {
            Ok(l) => {
                seen.push(l.clone());
                if want(&l) {
                    return l;
                }
            }
            Err(_) => break,
        }
    }
    panic!("no line {what} within 20s; got:\n{}", seen.join("\n"));
}

#[test]
fn demo_shows_the_sidecars_logs_by_name() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut child = Child(
        Command::new(BIN)
            .args(["demo", "--port", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let (tx, rx) = mpsc::channel();
    for reader in [
        Box::new(child.0.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
        Box::new(child.0.stderr.take().unwrap()),
    ] {
        let tx = tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(reader).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
    }
    let mut seen = Vec::new();
    line_where(&rx, &mut seen, "ending the banner", |l| {
        l == "press Ctrl-C to stop"
    });
    let loaded = line_where(&rx, &mut seen, "[server] rules loaded", |l| {
        l.starts_with("[server] info rules loaded")
    });
    // The banner's own GET /admin was denied by the server sidecar.
    line_where(&rx, &mut seen, "[server] request denied /admin", |l| {
        l.starts_with("[server] info request denied") && l.contains("path=/admin")
    });
    line_where(&rx, &mut seen, "[client] certificate issued", |l| {
        l.starts_with("[client] info certificate issued")
    });
    assert!(
        !loaded.contains('\u{1b}'),
        "colour codes in a pipe: {loaded:?}"
    );

    // Editing the rules shows the reload, attributed to the server.
    let dir = loaded
        .split_whitespace()
        .find_map(|w| w.strip_prefix("dir="))
        .expect("rules dir in the log line");
    let file = std::path::Path::new(dir).join("demo.yaml");
    let rules = std::fs::read_to_string(&file).unwrap();
    let tmp = file.with_extension("tmp");
    std::fs::write(
        &tmp,
        rules.replace(r#""/hello/**"]"#, r#""/hello/**", "/admin"]"#),
    )
    .unwrap();
    std::fs::rename(&tmp, &file).unwrap();
    line_where(&rx, &mut seen, "[server] rules reloaded", |l| {
        l.starts_with("[server] info rules reloaded")
    });

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.0.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    line_where(&rx, &mut seen, "demo stopped", |l| {
        l.starts_with("demo stopped")
    });
    assert!(child.0.wait().unwrap().success());
}

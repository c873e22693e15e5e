//! A packet capture on one interface of the node (tcpdump writing pcap to a
//! pipe), used to prove what does and does not cross the wire in plaintext.
//! The pcap stream holds every packet's bytes verbatim, so a marker sent in
//! a request body is found by a plain byte search.

use std::io::{BufRead, BufReader, Read};
use std::process::Stdio;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::netns::{Netns, Process};

/// A running capture; stopped (and tcpdump killed) on drop.
pub struct Capture {
    process: Process,
    bytes: Arc<Mutex<Vec<u8>>>,
    reader: Option<JoinHandle<()>>,
}

impl Capture {
    /// Starts capturing TCP on `dev` in `ns`; returns once tcpdump says it
    /// listens, so nothing sent afterwards is missed.
    pub fn start(ns: &Netns, dev: &str) -> Capture {
        // -U --immediate-mode: every packet reaches the pipe at once;
        // -Z root: keep writing as root (the pipe needs no user switch).
        let mut process = ns.spawn_with(
            &[
                "tcpdump",
                "-i",
                dev,
                "-n",
                "-s",
                "0",
                "-U",
                "--immediate-mode",
                "-Z",
                "root",
                "-w",
                "-",
                "tcp",
            ],
            Stdio::piped(),
            Stdio::piped(),
        );
        let mut stdout = process.take_stdout().expect("stdout is piped");
        let stderr = process.take_stderr().expect("stderr is piped");
        let bytes = Arc::new(Mutex::new(Vec::new()));
        let sink = bytes.clone();
        let reader = std::thread::spawn(move || {
            let mut buf = [0u8; 65536];
            while let Ok(n) = stdout.read(&mut buf) {
                if n == 0 {
                    return;
                }
                sink.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        });
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) if line.contains("listening on") => break,
                Ok(_) => continue,
                Err(e) => panic!("tcpdump on {dev} did not start ({e})"),
            }
        }
        Capture {
            process,
            bytes,
            reader: Some(reader),
        }
    }

    /// Whether `needle` appears in what was captured so far.
    pub fn contains(&self, needle: &str) -> bool {
        let bytes = self.bytes.lock().unwrap();
        bytes.windows(needle.len()).any(|w| w == needle.as_bytes())
    }

    /// Waits (at most `limit`) until `needle` was captured. Packets reach
    /// the capture in order, so once a marker sent last is seen, everything
    /// sent before it has been seen too.
    pub fn wait_for(&self, needle: &str, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if self.contains(needle) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        self.contains(needle)
    }

    /// How many bytes were captured (to show the capture saw traffic).
    pub fn len(&self) -> usize {
        self.bytes.lock().unwrap().len()
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.process.id() as i32);
        // The bytes were read as they came: nothing is left to flush.
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
    }
}

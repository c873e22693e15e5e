//! Network namespaces for tests: pods and peers simulated as Linux network
//! namespaces. A [`Netns`] is created for one test and deleted on drop —
//! also when the test panics — after every process still inside it has been
//! killed. Commands run inside with `ip netns exec`; [`Netns::link`] joins
//! two namespaces with a veth pair; [`Process`] is a background process
//! that is killed on drop.
//!
//! Every name starts with `portcullis-test-` and carries the test process id,
//! so parallel tests and parallel test runs never collide, and a leftover
//! from a crashed run is easy to spot (`ip netns list`).
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// Where root's tools live even when PATH lacks them.
const SBIN: [&str; 3] = ["/usr/local/sbin", "/usr/sbin", "/sbin"];

/// Whether the tests run as root (network namespaces need it).
pub fn is_root() -> bool {
    nix::unistd::Uid::effective().is_root()
}

/// The full path of `program` from PATH or the sbin directories.
pub fn find(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(SBIN.iter().map(PathBuf::from))
        .map(|d| d.join(program))
        .find(|p| p.is_file())
}

/// Returns true — after saying so LOUDLY on stderr — when `test` cannot run
/// here: not root, or one of `programs` is missing (`make deps` installs
/// them). The message is written to stderr directly, not with `eprintln!`,
/// so the test harness's output capture cannot hide it.
pub fn skip(test: &str, programs: &[&str]) -> bool {
    let why = if !is_root() {
        "needs root for network namespaces (run `make test` as root)".to_string()
    } else {
        let missing: Vec<&str> = programs
            .iter()
            .copied()
            .filter(|p| find(p).is_none())
            .collect();
        if missing.is_empty() {
            return false;
        }
        format!("missing {} (run `bash .ci/deps.sh`)", missing.join(", "))
    };
    let _ = writeln!(
        std::io::stderr(),
        "\n!!!!!!!!!! SKIPPED {test}: {why} !!!!!!!!!!\n"
    );
    true
}

/// A network namespace that exists as long as this value.
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates `portcullis-test-<tag>-<pid>-<n>` with `lo` up. Panics (with
    /// the `ip` error) when it cannot.
    pub fn new(tag: &str) -> Netns {
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let name = format!("portcullis-test-{tag}-{}-{n}", std::process::id());
        let out = Command::new("ip")
            .args(["netns", "add", &name])
            .output()
            .expect("running ip");
        assert!(
            out.status.success(),
            "ip netns add {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let ns = Netns { name };
        ns.ok(&["ip", "link", "set", "lo", "up"]);
        ns
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// A command that runs `program` inside the namespace.
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name, program]);
        cmd
    }

    /// Runs `argv` inside and returns its output, whatever its exit status.
    pub fn run(&self, argv: &[&str]) -> Output {
        self.command(argv[0])
            .args(&argv[1..])
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("running {argv:?} in {}: {e}", self.name))
    }

    /// Runs `argv` inside with `input` on its stdin; returns its output.
    pub fn run_with_input(&self, argv: &[&str], input: &str) -> Output {
        let mut child = self
            .command(argv[0])
            .args(&argv[1..])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("running {argv:?} in {}: {e}", self.name));
        let mut stdin = child.stdin.take().expect("stdin is piped");
        // A program that exits early closes the pipe; its output says why.
        let _ = stdin.write_all(input.as_bytes());
        drop(stdin);
        child.wait_with_output().expect("waiting for the child")
    }

    /// Runs `argv` inside, panics unless it succeeds, returns its stdout.
    pub fn ok(&self, argv: &[&str]) -> String {
        let out = self.run(argv);
        assert!(
            out.status.success(),
            "{argv:?} in {} failed: {}{}",
            self.name,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs a shell script inside; panics unless it succeeds; returns stdout.
    pub fn sh(&self, script: &str) -> String {
        self.ok(&["sh", "-c", script])
    }

    /// Starts `argv` inside in the background; it is killed when the
    /// returned [`Process`] (or this namespace) is dropped.
    pub fn spawn(&self, argv: &[&str]) -> Process {
        let child = self
            .command(argv[0])
            .args(&argv[1..])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {argv:?} in {}: {e}", self.name));
        Process { child }
    }

    /// Starts `argv` inside in the background with the given stdout and
    /// stderr (a log file, a pipe…); killed like [`Netns::spawn`]'s.
    pub fn spawn_with(&self, argv: &[&str], stdout: Stdio, stderr: Stdio) -> Process {
        let child = self
            .command(argv[0])
            .args(&argv[1..])
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {argv:?} in {}: {e}", self.name));
        Process { child }
    }

    /// Joins this namespace to `other` with a veth pair: `here` is the
    /// interface name in this namespace, `there` in the other. Both are up.
    pub fn link(&self, here: &str, other: &Netns, there: &str) {
        let out = Command::new("ip")
            .args(["link", "add", here, "netns", &self.name, "type", "veth"])
            .args(["peer", "name", there, "netns", &other.name])
            .output()
            .expect("running ip");
        assert!(
            out.status.success(),
            "veth {}/{here} <-> {}/{there}: {}",
            self.name,
            other.name,
            String::from_utf8_lossy(&out.stderr)
        );
        self.ok(&["ip", "link", "set", here, "up"]);
        other.ok(&["ip", "link", "set", there, "up"]);
    }

    /// Adds an address (`10.0.0.1/24`, `fd00::1/64`) to an interface. IPv6
    /// addresses skip duplicate address detection, so they work at once.
    pub fn addr(&self, dev: &str, cidr: &str) {
        let mut argv = vec!["ip", "addr", "add", cidr, "dev", dev];
        if cidr.contains(':') {
            argv.push("nodad");
        }
        self.ok(&argv);
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Processes left inside keep the namespace alive: end them first.
        if let Ok(out) = Command::new("ip")
            .args(["netns", "pids", &self.name])
            .output()
        {
            for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                if let Ok(pid) = pid.parse::<i32>() {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
            }
        }
        let out = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
        if !matches!(&out, Ok(o) if o.status.success()) {
            eprintln!(
                "warning: could not delete network namespace {}: {out:?}",
                self.name
            );
        }
    }
}

/// A background process, killed and reaped on drop.
pub struct Process {
    child: Child,
}

impl Process {
    /// Adopts a child started elsewhere (killed and reaped on drop too).
    pub fn from_child(child: Child) -> Process {
        Process { child }
    }

    /// Reads stdout lines until one equals `line` (e.g. a server's "ready");
    /// panics if the process ends first.
    pub fn wait_for_line(&mut self, line: &str) {
        let stdout = self.child.stdout.as_mut().expect("stdout is piped");
        let mut reader = BufReader::new(stdout);
        let mut got = String::new();
        loop {
            got.clear();
            let n = reader.read_line(&mut got).expect("reading stdout");
            assert!(n > 0, "process ended before printing {line:?}");
            if got.trim_end() == line {
                return;
            }
        }
    }

    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// The exit status if the process has ended (it is not waited for).
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Takes the stdout pipe (from [`Netns::spawn`] or a piped
    /// [`Netns::spawn_with`]) to read it elsewhere, e.g. on a thread.
    pub fn take_stdout(&mut self) -> Option<std::process::ChildStdout> {
        self.child.stdout.take()
    }

    /// Takes the stderr pipe of a [`Netns::spawn_with`] that piped it.
    pub fn take_stderr(&mut self) -> Option<std::process::ChildStderr> {
        self.child.stderr.take()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

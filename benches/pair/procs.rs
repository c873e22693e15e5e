//! Child processes (the release `portcullis` binary, nginx, haproxy) and
//! what `/proc` says about them: resident memory and CPU time.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use portcullis::identity::CaFiles;

use crate::{run_args, wait_ok, READY_TIMEOUT};

/// The binary this bench was built with (`cargo bench` builds it in the
/// same profile, so it is never stale).
pub const BIN: &str = env!("CARGO_BIN_EXE_portcullis");
/// `/proc/<pid>/stat` counts CPU time in these ticks per second (Linux's
/// USER_HZ, 100 on every architecture this runs on).
const TICKS_PER_SEC: f64 = 100.0;
/// How long a graceful stop may take before SIGKILL.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);
/// Log lines of a sidecar kept for error messages.
const LOG_TAIL: usize = 40;

/// A child process, killed and reaped when dropped, whatever path the bench
/// takes; `log` is quoted if it dies early.
pub struct Child {
    child: std::process::Child,
    name: String,
    log: Log,
    /// Stop with SIGTERM first (nginx: its master then stops its workers,
    /// which a SIGKILL would leave running).
    graceful: bool,
}

/// Where a child's diagnostics went.
enum Log {
    File(PathBuf),
    Tail(Arc<Mutex<VecDeque<String>>>),
}

impl Child {
    /// Starts `cmd` with stdin and stdout closed and stderr to `log`.
    pub fn spawn(name: &str, cmd: &mut Command, log: &Path) -> Result<Child> {
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log)?)
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        Ok(Child {
            child,
            name: name.into(),
            log: Log::File(log.into()),
            graceful: false,
        })
    }

    /// Asks for SIGTERM (then, after `STOP_TIMEOUT`, SIGKILL) on drop.
    pub fn graceful(mut self) -> Child {
        self.graceful = true;
        self
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Fails, quoting its log, if the process has exited.
    pub fn alive(&mut self) -> Result<()> {
        let Some(status) = self.child.try_wait()? else {
            return Ok(());
        };
        let log = match &self.log {
            Log::File(path) => std::fs::read_to_string(path).unwrap_or_default(),
            Log::Tail(tail) => Vec::from(tail.lock().expect("log lock").clone()).join("\n"),
        };
        bail!("{} exited ({status}): {}", self.name, log.trim())
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        use nix::sys::signal::{kill, Signal};
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        if self.graceful && kill(pid, Signal::SIGTERM).is_ok() {
            let deadline = std::time::Instant::now() + STOP_TIMEOUT;
            while std::time::Instant::now() < deadline {
                if let Ok(Some(_)) = self.child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A `portcullis run` process and the addresses it logged.
pub struct Sidecar {
    pub proc: Child,
    pub inbound: SocketAddr,
    pub upstream: Option<SocketAddr>,
}

impl Sidecar {
    /// Starts the release binary as sidecar `sa` with `extra` flags, every
    /// listener on port 0 (the addresses come from its JSON "listening"
    /// line), and waits for `/ready`.
    pub async fn start(ca: &CaFiles, sa: &str, extra: &[&str]) -> Result<Sidecar> {
        let mut extra = extra.to_vec();
        extra.extend([
            "--outbound-listen",
            "127.0.0.1:0",
            "--log-format",
            "json",
            "--log-level",
            "warn,portcullis::app=info",
        ]);
        let argv = run_args(ca, sa, "127.0.0.1:0", "127.0.0.1:0", &extra);
        let mut child = Command::new(BIN)
            .args(&argv[1..])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {BIN}"))?;
        let stderr = child.stderr.take().context("no stderr")?;
        let tail: Arc<Mutex<VecDeque<String>>> = Arc::default();
        let (tx, rx) = mpsc::channel();
        {
            let tail = tail.clone();
            // Reads until the child exits, so it never blocks on a full pipe.
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
                    if v["message"] == "listening" {
                        let _ = tx.send(v);
                    }
                    let mut tail = tail.lock().expect("log lock");
                    if tail.len() == LOG_TAIL {
                        tail.pop_front();
                    }
                    tail.push_back(line);
                }
            });
        }
        let mut proc = Child {
            child,
            name: format!("sidecar {sa} ({BIN})"),
            log: Log::Tail(tail),
            graceful: false,
        };
        let listening = tokio::task::spawn_blocking(move || rx.recv_timeout(READY_TIMEOUT)).await?;
        let Ok(listening) = listening else {
            proc.alive()?;
            bail!("sidecar {sa} logged no \"listening\" line in {READY_TIMEOUT:?}");
        };
        let addr = |k: &str| -> Result<SocketAddr> {
            listening[k]
                .as_str()
                .and_then(|s| s.parse().ok())
                .with_context(|| format!("no {k} address in {listening}"))
        };
        let upstream = listening["upstreams"]
            .as_str()
            .and_then(|s| s.split(',').next())
            .and_then(|s| s.trim_matches(['[', ']', '"', ' ']).parse().ok());
        let (inbound, admin) = (addr("inbound")?, addr("admin")?);
        wait_ok(admin, "/ready", || proc.alive()).await?;
        Ok(Sidecar {
            proc,
            inbound,
            upstream,
        })
    }
}

/// A sidecar pair of processes: B in front of `app` (explicit mode, with
/// `extra_b`), A with an upstream listener carrying to B.
pub struct Pair {
    pub a: Sidecar,
    pub b: Sidecar,
    /// A's upstream listener: where clients connect.
    pub front: SocketAddr,
}

impl Pair {
    pub async fn start(ca: &CaFiles, app: SocketAddr, extra_b: &[&str]) -> Result<Pair> {
        Self::start_with(ca, app, extra_b, &[]).await
    }

    /// [`Pair::start`] with flags for the client sidecar (A) too.
    pub async fn start_with(
        ca: &CaFiles,
        app: SocketAddr,
        extra_b: &[&str],
        extra_a: &[&str],
    ) -> Result<Pair> {
        let target = app.to_string();
        let mut b_args = vec!["--inbound-target", &target];
        b_args.extend_from_slice(extra_b);
        let b = Sidecar::start(ca, "server", &b_args).await?;
        let upstream = format!("127.0.0.1:0={}={}", b.inbound, crate::SERVER_ID);
        let mut a_args = vec!["--upstream", &upstream];
        a_args.extend_from_slice(extra_a);
        let a = Sidecar::start(ca, "client", &a_args).await?;
        let front = a
            .upstream
            .context("sidecar A logged no upstream listener")?;
        Ok(Pair { a, b, front })
    }

    pub fn pids(&self) -> Vec<u32> {
        vec![self.a.proc.pid(), self.b.proc.pid()]
    }
}

/// CPU time (user + system, all threads, dead ones included) of `pids`
/// together, in seconds.
pub fn cpu_seconds(pids: &[u32]) -> Result<f64> {
    let mut ticks = 0u64;
    for pid in pids {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .with_context(|| format!("process {pid} is gone"))?;
        // The command name (field 2) may hold spaces; fields after it are
        // plain numbers: state is field 3, utime 14, stime 15.
        let rest = stat.rsplit_once(')').context("odd /proc stat")?.1;
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let utime: u64 = fields.get(11).context("no utime")?.parse()?;
        let stime: u64 = fields.get(12).context("no stime")?.parse()?;
        ticks += utime + stime;
    }
    Ok(ticks as f64 / TICKS_PER_SEC)
}

/// The process and its direct children (nginx's workers).
pub fn with_children(pid: u32) -> Vec<u32> {
    let mut pids = vec![pid];
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return pids;
    };
    for entry in dir.flatten() {
        let Some(child) = entry.file_name().to_str().and_then(|s| s.parse().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{child}/stat")) else {
            continue;
        };
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        if ppid == Some(pid) {
            pids.push(child);
        }
    }
    pids
}

/// `VmRSS` of a process, in KiB, from `/proc/<pid>/status`.
pub fn vm_rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .context("no VmRSS line")?;
    let kib = line.trim().trim_end_matches("kB").trim();
    Ok(kib.parse()?)
}

/// A loopback address with a port that was free a moment ago (for programs
/// that cannot report a port-0 listener; can race with other programs).
pub fn free_port() -> Result<SocketAddr> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

/// Raises this process's descriptor limit to its hard limit (children
/// inherit it): the memory row holds 1,000 connections, two sockets each
/// in this process and in each sidecar.
pub fn raise_fd_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
}

/// The current soft descriptor limit.
pub fn fd_limit() -> u64 {
    nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .map_or(1024, |(soft, _)| soft)
}

/// Where `program` is: on `PATH` or in `/usr/sbin` (nginx and haproxy
/// live there). `PAIR_BENCH_WITHOUT=wrk,nginx,…` hides programs, to run the
/// fallbacks (the in-process load generator and app) or skip comparisons.
pub fn which(program: &str) -> Option<PathBuf> {
    let hidden = std::env::var("PAIR_BENCH_WITHOUT").unwrap_or_default();
    if hidden.split(',').any(|h| h.trim() == program) {
        return None;
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .map(|dir| dir.join(program))
        .find(|p| p.is_file())
}

/// Waits until `addr` accepts TCP connections, failing early if `proc` dies.
pub async fn wait_listening(addr: SocketAddr, procs: &mut [Child]) -> Result<()> {
    let deadline = std::time::Instant::now() + READY_TIMEOUT;
    loop {
        for p in procs.iter_mut() {
            p.alive()?;
        }
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return Ok(());
        }
        if std::time::Instant::now() > deadline {
            bail!("nothing listening on {addr} after {READY_TIMEOUT:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

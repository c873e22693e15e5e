//! A small Kubernetes-like node made of network namespaces: one namespace
//! holds a bridge (the node's pod network), and every pod is a namespace
//! joined to it by a veth pair, with an IPv4 and an IPv6 address. A meshed
//! pod gets `portcullis init` and then `portcullis run` as UID/GID 1500, the
//! way an init container and a sidecar container would set it up.
//!
//! Everything lives in namespaces the test creates and is torn down on drop
//! (also when the test fails), and the sidecar's logs are printed then.
//!
//! Shared by tests/pods.rs and tests/podstart.rs, which use different parts.
#![allow(dead_code)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::apps::start_app;
use crate::netns::{Netns, Process};

pub const BIN: &str = env!("CARGO_BIN_EXE_portcullis");

/// The proxy's UID and GID (portcullis' default, exempt from interception).
pub const PROXY_ID: u32 = 1500;

/// The pod network; pod N gets `10.89.0.N` and `fd89::N` (N in hex there).
const POD_V4: &str = "10.89.0";
const POD_V6: &str = "fd89:";

/// The node's own address on the bridge (see [`Node::node_ip`]); no pod
/// is numbered 1.
pub const NODE_V4: &str = "10.89.0.1";

/// The meshed part of the pod network (`--mesh-cidrs`): pods numbered
/// 1 to 15 are inside; pods from 16 up are outside the mesh, so meshed
/// clients send them plaintext.
pub const MESH_CIDRS: &str = "10.89.0.0/28,fd89::/124";

/// Polls `check` every 20 ms until it holds; panics with `what` after `limit`.
pub fn eventually(what: &str, limit: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !check() {
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?}: {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// How a meshed pod's sidecar is set up.
#[derive(Debug, Clone, Default)]
pub struct Sidecar {
    /// `init --backend` (`None`: auto).
    pub backend: Option<&'static str>,
    /// More `init` flags (exclusions).
    pub init: Vec<String>,
    /// More `run` flags (inbound mode, default policy).
    pub run: Vec<String>,
}

/// The node: the bridge namespace and the files shared by its pods (the
/// mesh CA, the binary the sidecars run).
pub struct Node {
    bridge: Netns,
    dir: TempDir,
    bin: PathBuf,
    ca_cert: PathBuf,
    ca_key: PathBuf,
}

impl Node {
    /// Creates the bridge namespace and a mesh CA readable by the proxy UID.
    pub fn new() -> Node {
        let bridge = Netns::new("node");
        bridge.sh("ip link add br0 type bridge mcast_snooping 0 && ip link set br0 up");
        let dir = tempfile::tempdir().expect("temp dir");
        open_to_all(dir.path());
        let ca = dir.path().join("ca");
        let out = std::process::Command::new(BIN)
            .args(["ca", "init", "--out"])
            .arg(&ca)
            .output()
            .expect("running portcullis ca init");
        assert!(out.status.success(), "ca init: {out:?}");
        open_to_all(&ca);
        let ca_key = ca.join("ca.key");
        std::os::unix::fs::chown(&ca_key, Some(PROXY_ID), Some(PROXY_ID)).expect("chown ca.key");
        let bin = runnable_binary(dir.path());
        Node {
            bridge,
            dir,
            bin,
            ca_cert: ca.join("ca.crt"),
            ca_key,
        }
    }

    /// The bridge namespace (where each pod's veth is captured).
    pub fn bridge(&self) -> &Netns {
        &self.bridge
    }

    /// The node's working directory (logs, CA, copied binary).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The binary the proxy UID can run.
    pub fn bin(&self) -> &Path {
        &self.bin
    }

    /// Gives the bridge the node's address [`NODE_V4`], so the node's
    /// namespace can reach its pods (as the kubelet probes them); returns it.
    pub fn node_ip(&self) -> &'static str {
        let addrs = self.bridge.ok(&["ip", "-4", "addr", "show", "dev", "br0"]);
        if !addrs.contains(&format!("{NODE_V4}/")) {
            // A bridge takes the lowest MAC of its ports unless given one,
            // so every new pod could change it under the pods' ARP caches.
            self.bridge
                .ok(&["ip", "link", "set", "br0", "address", "02:89:00:00:00:01"]);
            self.bridge.addr("br0", &format!("{NODE_V4}/24"));
        }
        NODE_V4
    }

    /// A pod without a sidecar, numbered `n` (its addresses end in `n`).
    pub fn plain_pod(&self, name: &'static str, n: u16) -> Pod {
        let mut pod = self.bare_pod(name, n);
        pod.app = Some(start_app(&pod.ns, name, &pod.app_log));
        pod
    }

    /// A pod namespace on the bridge with its addresses, and nothing
    /// running in it yet.
    pub fn bare_pod(&self, name: &'static str, n: u16) -> Pod {
        let ns = Netns::new(name);
        let veth = format!("veth-{name}");
        self.bridge.link(&veth, &ns, "eth0");
        self.bridge
            .ok(&["ip", "link", "set", &veth, "master", "br0"]);
        let v4 = format!("{POD_V4}.{n}");
        let v6 = format!("{POD_V6}:{n:x}");
        ns.addr("eth0", &format!("{v4}/24"));
        ns.addr("eth0", &format!("{v6}/64"));
        Pod {
            sidecar: None,
            app: None,
            others: Vec::new(),
            name,
            v4,
            v6,
            veth,
            app_log: self.dir.path().join(format!("{name}-app.log")),
            sidecar_log: self.dir.path().join(format!("{name}-sidecar.log")),
            ns,
        }
    }

    /// A meshed pod: a plain pod made meshed with [`Node::mesh`].
    pub fn meshed_pod(&self, name: &'static str, n: u16, sidecar: &Sidecar) -> Pod {
        let mut pod = self.plain_pod(name, n);
        self.mesh(&mut pod, sidecar);
        pod
    }

    /// Runs `portcullis init` in `pod` (twice, which must leave one set of
    /// rules), then starts its sidecar.
    pub fn mesh(&self, pod: &mut Pod, sidecar: &Sidecar) {
        pod.init(sidecar.backend, &sidecar.init);
        pod.init(sidecar.backend, &sidecar.init);
        self.start_sidecar(pod, sidecar);
    }

    /// Starts `portcullis run` in `pod` as the proxy UID/GID and waits for
    /// its `/ready`.
    pub fn start_sidecar(&self, pod: &mut Pod, sidecar: &Sidecar) {
        let log = std::fs::File::create(&pod.sidecar_log).expect("sidecar log");
        let id = PROXY_ID.to_string();
        let (bin, cert, key) = (path(&self.bin), path(&self.ca_cert), path(&self.ca_key));
        let rules = self.dir.path().join("rules");
        std::fs::create_dir_all(&rules).expect("rules dir");
        open_to_all(&rules);
        // No rules: `--default-policy` decides (authenticated by default).
        let file = rules.join("none.yaml");
        std::fs::write(&file, "# no rules: --default-policy decides\n").expect("rules file");
        open_to_all(&file);
        let rules = path(&rules);
        let mut argv = vec![
            "setpriv",
            "--reuid",
            &id,
            "--regid",
            &id,
            "--clear-groups",
            &bin,
            "run",
            "--ca-cert",
            &cert,
            "--ca-key",
            &key,
            "--trust-bundle",
            &cert,
            "--namespace",
            "pods",
            "--service-account",
            pod.name,
            "--mesh-cidrs",
            MESH_CIDRS,
            "--rules-dir",
            &rules,
            "--log-format",
            "json",
        ];
        argv.extend(sidecar.run.iter().map(String::as_str));
        let process = pod.ns.spawn_with(&argv, Stdio::null(), log.into());
        pod.sidecar = Some(process);
        eventually(
            &format!("sidecar of {} ready", pod.name),
            Duration::from_secs(10),
            || {
                if let Some(status) = pod.sidecar.as_mut().and_then(|p| p.exited()) {
                    panic!(
                        "sidecar of {} exited ({status}):\n{}",
                        pod.name,
                        pod.sidecar_log()
                    );
                }
                pod.admin("/ready").0 == 200
            },
        );
    }
}

/// The binary the sidecars run: the built one when the proxy UID can
/// execute it where it is, else a copy in `dir`.
fn runnable_binary(dir: &Path) -> PathBuf {
    let id = PROXY_ID.to_string();
    let probe = std::process::Command::new("setpriv")
        .args([
            "--reuid",
            &id,
            "--regid",
            &id,
            "--clear-groups",
            "test",
            "-x",
            BIN,
        ])
        .status()
        .expect("running setpriv");
    if probe.success() {
        return PathBuf::from(BIN);
    }
    let copy = dir.join("portcullis");
    std::fs::copy(BIN, &copy).expect("copying the binary");
    open_to_all(&copy);
    copy
}

/// Lets every user read (and enter) a test file or directory.
fn open_to_all(p: &Path) {
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755)).expect("chmod");
}

fn path(p: &Path) -> String {
    p.display().to_string()
}

/// One pod: its namespace, addresses, app and (when meshed) sidecar.
pub struct Pod {
    // Processes first: they are dropped (killed) before the namespace.
    sidecar: Option<Process>,
    app: Option<Process>,
    others: Vec<Process>,
    pub name: &'static str,
    pub v4: String,
    pub v6: String,
    /// Its veth's name in the bridge namespace.
    pub veth: String,
    app_log: PathBuf,
    sidecar_log: PathBuf,
    pub ns: Netns,
}

impl Pod {
    /// Runs `portcullis init` with `backend` (or auto) and `extra` flags.
    pub fn init<S: AsRef<str>>(&self, backend: Option<&str>, extra: &[S]) -> String {
        let mut argv = vec![BIN, "init"];
        if let Some(b) = backend {
            argv.extend(["--backend", b]);
        }
        argv.extend(extra.iter().map(AsRef::as_ref));
        self.ns.ok(&argv)
    }

    /// GETs `path` from the sidecar's admin port (inside the pod, over
    /// loopback, which the rules never redirect): (status, body).
    pub fn admin(&self, path: &str) -> (u16, String) {
        let url = format!("http://127.0.0.1:15020{path}");
        let out = self.ns.run(&[
            "curl",
            "-s",
            "--noproxy",
            "*",
            "-m",
            "2",
            "-w",
            "\n%{http_code}",
            &url,
        ]);
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = stdout.rsplit_once('\n').unwrap_or(("", &stdout));
        (code.trim().parse().unwrap_or(0), body.to_string())
    }

    /// The sum of the samples of `name` whose labels include `labels`.
    pub fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let (status, text) = self.admin("/metrics");
        assert_eq!(status, 200, "{}: /metrics: {text}", self.name);
        metric_value(&text, name, labels)
    }

    /// Every connection and handshake the sidecar has counted, in one
    /// number: it does not move while traffic bypasses the sidecar.
    pub fn activity(&self) -> f64 {
        let (status, text) = self.admin("/metrics");
        assert_eq!(status, 200, "{}: /metrics: {text}", self.name);
        metric_value(&text, "portcullis_tcp_connections_opened_total", &[])
            + metric_value(&text, "portcullis_tls_handshakes_total", &[])
    }

    /// Where the app's and the sidecar's output go (printed if a test fails).
    pub fn log_paths(&self) -> (&Path, &Path) {
        (&self.app_log, &self.sidecar_log)
    }

    /// Takes `process` as the pod's sidecar (ended with the pod).
    pub fn set_sidecar(&mut self, process: Process) {
        self.sidecar = Some(process);
    }

    /// Takes `process` as the pod's app (ended with the pod).
    pub fn set_app(&mut self, process: Process) {
        self.app = Some(process);
    }

    /// Keeps any other process of the pod until the pod ends.
    pub fn adopt(&mut self, process: Process) {
        self.others.push(process);
    }

    /// Whether the sidecar has exited (with its status).
    pub fn sidecar_exited(&mut self) -> Option<std::process::ExitStatus> {
        self.sidecar.as_mut().and_then(|p| p.exited())
    }

    /// The process ids of the sidecar and of the app, when running.
    pub fn pids(&self) -> (Option<u32>, Option<u32>) {
        (
            self.sidecar.as_ref().map(Process::id),
            self.app.as_ref().map(Process::id),
        )
    }

    /// Kills the app (SIGKILL).
    pub fn kill_app(&mut self) {
        drop(self.app.take());
    }

    /// Kills the sidecar (SIGKILL: no draining, as in a crash).
    pub fn kill_sidecar(&mut self) {
        drop(self.sidecar.take());
    }

    /// Lines the app has logged (one per request or greeting).
    pub fn app_log(&self) -> String {
        std::fs::read_to_string(&self.app_log).unwrap_or_default()
    }

    /// The sidecar's log (JSON lines).
    pub fn sidecar_log(&self) -> String {
        std::fs::read_to_string(&self.sidecar_log).unwrap_or_default()
    }

    /// The pod's address of one family.
    pub fn ip(&self, v6: bool) -> &str {
        if v6 {
            &self.v6
        } else {
            &self.v4
        }
    }
}

impl Drop for Pod {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "--- pod {} app log:\n{}--- pod {} sidecar log:\n{}",
                self.name,
                self.app_log(),
                self.name,
                self.sidecar_log()
            );
        }
    }
}

/// Sums the samples of `name` in Prometheus text whose labels include `labels`.
pub fn metric_value(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (n, rest) = series.split_at(series.find('{').unwrap_or(series.len()));
            let wanted = n == name
                && labels
                    .iter()
                    .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")));
            wanted.then(|| value.parse::<f64>().ok()).flatten()
        })
        .sum()
}

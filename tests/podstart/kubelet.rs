//! A stand-in for the kubelet (and for the parts of the API server that
//! fill a pod in), enough to start a pod exactly as its spec says: each
//! container's `command`/`args`/`env` as written, Downward API values filled
//! in, every volume written as files in the kubelet's layout (`..data`
//! symlink to a timestamped directory) and mounted at its `mountPath`, the
//! user, groups, capabilities and read-only root of its `securityContext`.
//!
//! How a container is run: `ip netns exec POD unshare --mount` (the pod's
//! network, a private mount namespace), then a shell script that builds the
//! container's root — an overlay whose lower layer is the host's `/` and
//! whose upper layer is a tmpfs, so nothing it creates touches the host —
//! bind-mounts the volumes, the built binary at `/usr/local/bin/portcullis`
//! (where the image has it) and the pod's `/etc/hosts`, and `exec`s
//! `chroot` + `setpriv` + `env -i` + the command. Every mount lives in the
//! private mount namespace and disappears with the process; the process the
//! test holds is the container's own (each step `exec`s the next).
//!
//! Names: cluster DNS is played by `/etc/hosts`, where each Service's
//! `name.namespace.svc` names the IP of the pod its selector picks (no
//! kube-proxy: a Service port must equal its target container port).

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use serde_json::Value;

pub use crate::cluster::{Cluster, PodMeta};
use crate::netns::Netns;
use crate::node::{eventually, Node, Pod};

/// The container whose output goes to the [`Pod`]'s sidecar log (in the
/// fallback layout it is a regular container; natively, an init container).
const SIDECAR: &str = "portcullis-proxy";
/// Capabilities a container runtime grants unless the spec drops them.
const DEFAULT_CAPS: [&str; 14] = [
    "chown",
    "dac_override",
    "fsetid",
    "fowner",
    "mknod",
    "net_raw",
    "setgid",
    "setuid",
    "setfcap",
    "setpcap",
    "net_bind_service",
    "sys_chroot",
    "kill",
    "audit_write",
];

/// A running pod: its namespace, processes (in [`Pod`]) and full object.
pub struct RunningPod {
    pub pod: Pod,
    pub object: Value,
    pub meta: PodMeta,
    dir: PathBuf,
}

pub fn str_at<'a>(v: &'a Value, pointer: &str) -> &'a str {
    v.pointer(pointer).and_then(Value::as_str).unwrap_or("")
}

/// A container port named or numbered `target`, if the container has it.
pub fn container_port(c: &Value, target: &Value) -> Option<u64> {
    c["ports"].as_array()?.iter().find_map(|p| {
        let hit = match target {
            Value::String(name) => p["name"] == name.as_str(),
            other => &p["containerPort"] == other,
        };
        hit.then(|| p["containerPort"].as_u64()).flatten()
    })
}

fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// `path` as the container will see it: the host's symlinks resolved in
/// its existing part (the container's root is the host's, overlaid).
fn in_root(path: &str) -> String {
    let mut existing = PathBuf::from(path);
    let mut rest = Vec::new();
    while !existing.exists() {
        rest.push(existing.file_name().expect("a mountPath").to_owned());
        existing.pop();
    }
    let mut real = existing.canonicalize().expect("canonical path");
    real.extend(rest.iter().rev());
    real.display().to_string()
}

/// Replaces `$(NAME)` with the value of the variable, as the kubelet does
/// in env values, `command` and `args`.
fn expand(s: &str, env: &[(String, String)]) -> String {
    let mut out = s.to_string();
    for (k, v) in env {
        out = out.replace(&format!("$({k})"), v);
    }
    out
}

/// The container's environment, in order.
fn environment(cluster: &Cluster, meta: &PodMeta, c: &Value) -> Vec<(String, String)> {
    let api = cluster.api.addr;
    let mut env: Vec<(String, String)> = vec![
        (
            "PATH".into(),
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(),
        ),
        ("HOSTNAME".into(), meta.name.clone()),
        ("KUBERNETES_SERVICE_HOST".into(), api.ip().to_string()),
        ("KUBERNETES_SERVICE_PORT".into(), api.port().to_string()),
    ];
    for e in c["env"].as_array().into_iter().flatten() {
        let value = if let Some(v) = e["value"].as_str() {
            expand(v, &env)
        } else if let Some(path) = e.pointer("/valueFrom/fieldRef/fieldPath") {
            meta.field(path.as_str().unwrap())
        } else if e.get("valueFrom").is_some() {
            panic!("env source not supported here: {e}");
        } else {
            String::new()
        };
        env.push((str_at(e, "/name").to_string(), value));
    }
    env
}

/// The shell script that becomes container `c` (see the module doc).
fn script(
    node: &Node,
    cluster: &Cluster,
    meta: &PodMeta,
    spec: &Value,
    c: &Value,
    vols: &HashMap<String, PathBuf>,
    dir: &Path,
) -> String {
    let name = str_at(c, "/name");
    let scratch = dir.join(format!("root-{name}"));
    std::fs::create_dir_all(&scratch).expect("scratch dir");
    let (s, r) = (quote(&scratch.display().to_string()), "\"$S/root\"");
    let mut lines = vec![
        "set -e".to_string(),
        format!("S={s}"),
        "mount -t tmpfs podstart \"$S\"".into(),
        "mkdir \"$S/upper\" \"$S/work\" \"$S/root\"".into(),
        format!(
            "mount -t overlay overlay -o lowerdir=/,upperdir=\"$S/upper\",workdir=\"$S/work\" {r}"
        ),
    ];
    for m in ["proc", "dev", "sys"] {
        lines.push(format!("mount --rbind /{m} {r}/{m}"));
    }
    let bind = |src: &Path, dst: &str, ro: bool, lines: &mut Vec<String>| {
        let dst = format!("{r}{}", quote(&in_root(dst)));
        if src.is_dir() {
            lines.push(format!("mkdir -p {dst}"));
        } else {
            lines.push(format!("mkdir -p \"$(dirname {dst})\" && touch {dst}"));
        }
        lines.push(format!(
            "mount --bind {} {dst}",
            quote(&src.display().to_string())
        ));
        if ro {
            lines.push(format!("mount -o remount,bind,ro {dst}"));
        }
    };
    let hosts = dir.join(format!("hosts-{name}"));
    std::fs::write(&hosts, cluster.hosts(meta)).expect("hosts file");
    bind(&hosts, "/etc/hosts", false, &mut lines);
    bind(node.bin(), "/usr/local/bin/portcullis", true, &mut lines);
    for m in c["volumeMounts"].as_array().into_iter().flatten() {
        let vol = &vols[str_at(m, "/name")];
        let src = vol.join(str_at(m, "/subPath"));
        bind(
            &src,
            str_at(m, "/mountPath"),
            m["readOnly"] == true,
            &mut lines,
        );
    }
    if c["securityContext"]["readOnlyRootFilesystem"] == true {
        lines.push(format!("mount -o remount,bind,ro {r}"));
    }
    let command = c["command"]
        .as_array()
        .unwrap_or_else(|| panic!("{name}: no command (the image's entrypoint is unknown here)"));
    let args = c["args"].as_array().into_iter().flatten();
    let command: Vec<&Value> = command.iter().chain(args).collect();
    let run = run_as(cluster, meta, spec, c, &command);
    lines.push(format!("exec chroot {r} {run}"));
    lines.join("\n")
}

/// `setpriv … -- env -i … COMMAND…`, shell-quoted: `command` as container
/// `c`'s user, groups and capabilities, with its environment.
fn run_as(
    cluster: &Cluster,
    meta: &PodMeta,
    spec: &Value,
    c: &Value,
    command: &[&Value],
) -> String {
    let name = str_at(c, "/name");
    let (psc, csc) = (&spec["securityContext"], &c["securityContext"]);
    let pick = |k: &str| csc[k].as_u64().or_else(|| psc[k].as_u64());
    let uid = pick("runAsUser").unwrap_or(0);
    let gid = pick("runAsGroup").unwrap_or(0);
    if csc["runAsNonRoot"] == true || (csc["runAsNonRoot"].is_null() && psc["runAsNonRoot"] == true)
    {
        assert_ne!(
            uid, 0,
            "{name}: runAsNonRoot with UID 0: the kubelet refuses"
        );
    }
    let mut groups: Vec<String> = psc["fsGroup"]
        .as_u64()
        .map(|g| g.to_string())
        .into_iter()
        .collect();
    groups.extend(
        psc["supplementalGroups"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|g| g.to_string()),
    );
    let mut caps: Vec<String> = DEFAULT_CAPS.iter().map(|c| c.to_string()).collect();
    let lower = |v: &Value| v.as_str().unwrap_or("").to_lowercase();
    for d in csc["capabilities"]["drop"].as_array().into_iter().flatten() {
        if lower(d) == "all" {
            caps.clear();
        }
        caps.retain(|c| *c != lower(d));
    }
    caps.extend(
        csc["capabilities"]["add"]
            .as_array()
            .into_iter()
            .flatten()
            .map(lower),
    );
    let bounding: String = std::iter::once("-all".to_string())
        .chain(caps.iter().map(|c| format!("+{c}")))
        .collect::<Vec<_>>()
        .join(",");
    let mut argv = vec![
        "setpriv".to_string(),
        format!("--reuid={uid}"),
        format!("--regid={gid}"),
    ];
    argv.push(if groups.is_empty() {
        "--clear-groups".into()
    } else {
        format!("--groups={}", groups.join(","))
    });
    argv.push(format!("--bounding-set={bounding}"));
    argv.push("--inh-caps=-all".into());
    if csc["allowPrivilegeEscalation"] == false {
        argv.push("--no-new-privs".into());
    }
    argv.extend(["--".into(), "env".into(), "-i".into()]);
    let env = environment(cluster, meta, c);
    argv.extend(env.iter().map(|(k, v)| quote(&format!("{k}={v}"))));
    for a in command {
        argv.push(quote(&expand(a.as_str().expect("a string"), &env)));
    }
    argv.join(" ")
}

/// Runs container `c`'s `postStart` exec hook, if it has one, inside the
/// container (its namespaces and root, its user and environment) once its
/// process `pid` is in its root; the kubelet starts the next container
/// only after the hook succeeds.
fn post_start(cluster: &Cluster, meta: &PodMeta, spec: &Value, c: &Value, pid: u32) {
    let Some(hook) = c.pointer("/lifecycle/postStart/exec/command") else {
        return;
    };
    let hook: Vec<&Value> = hook.as_array().expect("a command").iter().collect();
    let name = str_at(c, "/name");
    let root = format!("/proc/{pid}/root");
    eventually(
        &format!("{name} in its root"),
        Duration::from_secs(5),
        || std::fs::read_link(&root).is_ok_and(|r| r != Path::new("/")),
    );
    let run = run_as(cluster, meta, spec, c, &hook);
    let script = format!("exec nsenter --target {pid} --mount --net --root --wd {run}");
    let out = std::process::Command::new("sh")
        .args(["-c", &script])
        .stdin(Stdio::null())
        .output()
        .expect("running a postStart hook");
    assert!(
        out.status.success(),
        "{}: {name}'s postStart hook {hook:?} failed ({}): {}{}",
        meta.name,
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Starts the pod `name` (numbered `n` on the node) from the Pod object
/// `object`: init containers in order (each to completion, a native sidecar
/// until its startup probe passes), then the containers in order (each
/// after the previous one's `postStart` hook succeeded). The sidecar's
/// output goes to the pod's sidecar log, the others' to its app log.
pub fn start(
    node: &Node,
    cluster: &Cluster,
    name: &'static str,
    n: u16,
    object: &Value,
) -> RunningPod {
    let mut pod = node.bare_pod(name, n);
    let meta = PodMeta {
        name: str_at(object, "/metadata/name").to_string(),
        namespace: str_at(object, "/metadata/namespace").to_string(),
        service_account: object["spec"]["serviceAccountName"]
            .as_str()
            .unwrap_or("default")
            .to_string(),
        ip: pod.v4.clone(),
        labels: object["metadata"]["labels"].clone(),
        annotations: object["metadata"]["annotations"].clone(),
    };
    let mut object = object.clone();
    crate::volumes::automount(&mut object["spec"]);
    let spec = &object["spec"];
    let dir = node.dir().join(format!("pod-{name}"));
    std::fs::create_dir_all(&dir).expect("pod dir");
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let vols = crate::volumes::volumes(cluster, &meta, spec, &dir.join("volumes"));
    let (app_log, sidecar_log) = pod.log_paths();
    let (app_log, sidecar_log) = (app_log.to_path_buf(), sidecar_log.to_path_buf());
    let launch = |ns: &Netns, c: &Value| {
        let mut cmd = ns.command("unshare");
        cmd.args(["--mount", "--propagation", "private", "sh", "-c"]);
        cmd.arg(script(node, cluster, &meta, spec, c, &vols, &dir));
        cmd
    };
    let log = |path: &Path| -> Stdio {
        File::options()
            .create(true)
            .append(true)
            .open(path)
            .expect("log")
            .into()
    };
    for c in spec["initContainers"].as_array().into_iter().flatten() {
        let cname = str_at(c, "/name");
        if c["restartPolicy"] == "Always" {
            let child = launch(&pod.ns, c)
                .stdin(Stdio::null())
                .stdout(log(&sidecar_log))
                .stderr(log(&sidecar_log))
                .spawn()
                .expect("starting a native sidecar");
            pod.set_sidecar(crate::netns::Process::from_child(child));
            let started = format!("{name}: native sidecar {cname} passes its startup probe");
            eventually(&started, Duration::from_secs(15), || {
                if let Some(status) = pod.sidecar_exited() {
                    panic!("{name}: {cname} exited ({status}):\n{}", pod.sidecar_log());
                }
                probe(node.bridge(), &meta, c, "startupProbe") == Some(true)
            });
        } else {
            let out = launch(&pod.ns, c)
                .stdin(Stdio::null())
                .output()
                .expect("running an init container");
            assert!(
                out.status.success(),
                "{name}: init container {cname} failed ({}):\n{}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    let mut has_app = false;
    for c in spec["containers"].as_array().expect("containers") {
        let is_sidecar = c["name"] == SIDECAR;
        let out = if is_sidecar { &sidecar_log } else { &app_log };
        let child = launch(&pod.ns, c)
            .stdin(Stdio::null())
            .stdout(log(out))
            .stderr(log(out))
            .spawn()
            .expect("starting a container");
        let process = crate::netns::Process::from_child(child);
        let pid = process.id();
        if is_sidecar {
            pod.set_sidecar(process);
        } else if !has_app {
            pod.set_app(process);
            has_app = true;
        } else {
            pod.adopt(process);
        }
        post_start(cluster, &meta, spec, c, pid);
    }
    RunningPod {
        pod,
        object,
        meta,
        dir,
    }
}

/// Runs `kind` (`readinessProbe`…) of container `c` from `from` as the
/// kubelet would: `None` without such a probe, else whether it passed.
/// Only HTTP GET probes are run (the rewritten ones all are).
pub fn probe(from: &Netns, meta: &PodMeta, c: &Value, kind: &str) -> Option<bool> {
    let p = c.get(kind)?;
    let status = probe_status(from, meta, c, p);
    Some((200..400).contains(&status))
}

/// The HTTP status an HTTP GET probe gets (0 when no answer).
pub fn probe_status(from: &Netns, meta: &PodMeta, c: &Value, p: &Value) -> u16 {
    let get = p.get("httpGet").unwrap_or_else(|| {
        panic!("the kubelet stand-in runs only httpGet probes, not {p} (was it rewritten?)")
    });
    let port = container_port(c, &get["port"])
        .or_else(|| get["port"].as_u64())
        .unwrap_or_else(|| panic!("probe port {} not found", get["port"]));
    let host = get["host"].as_str().unwrap_or(&meta.ip);
    let scheme = get["scheme"].as_str().unwrap_or("HTTP").to_lowercase();
    let url = format!("{scheme}://{host}:{port}{}", str_at(get, "/path"));
    let timeout = p["timeoutSeconds"].as_u64().unwrap_or(1).to_string();
    let out = from.run(&[
        "curl",
        "-sk",
        "--noproxy",
        "*",
        "-m",
        &timeout,
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        &url,
    ]);
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or(0)
}

impl RunningPod {
    /// The host directory holding volume `name`'s files.
    pub fn volume(&self, name: &str) -> PathBuf {
        self.dir.join("volumes").join(name)
    }

    pub fn container(&self, name: &str) -> &Value {
        let spec = &self.object["spec"];
        ["initContainers", "containers"]
            .iter()
            .flat_map(|l| spec[*l].as_array().into_iter().flatten())
            .find(|c| c["name"] == name)
            .unwrap_or_else(|| panic!("no container {name}"))
    }

    /// Waits until every container's readiness probe passes.
    pub fn wait_ready(&mut self, from: &Netns, limit: Duration) {
        let spec = self.object["spec"].clone();
        let all: Vec<&Value> = ["initContainers", "containers"]
            .iter()
            .flat_map(|l| spec[*l].as_array().into_iter().flatten())
            .collect();
        let what = format!("pod {} ready", self.meta.name);
        eventually(&what, limit, || {
            if let Some(status) = self.pod.sidecar_exited() {
                panic!(
                    "{what}: the sidecar exited ({status}):\n{}",
                    self.pod.sidecar_log()
                );
            }
            all.iter()
                .all(|c| probe(from, &self.meta, c, "readinessProbe") != Some(false))
        });
    }
}

//! The injected pod really works (issue 6, test 4). No cluster exists on
//! these machines, so this plays one with network namespaces, from the
//! real artefacts users apply:
//!
//! * the CA is made as docs/kubernetes.md says (`portcullis ca init`, then
//!   `ca issue --intermediate`) and given to the chart with `--set-file`;
//!   `helm template` renders it (tests/helm's Helm 3.17);
//! * the identity service is the chart's `portcullis-ca` Deployment, started
//!   with its own `command`, `args` and volumes (the issuer Secret and the
//!   bundle ConfigMap from the render) and the in-cluster defaults every pod
//!   gets (`KUBERNETES_SERVICE_HOST/PORT`, the automounted service-account
//!   token and `ca.crt`); the API server is the TokenReview stand-in of
//!   tests/ca_serve, served by this process on the node's address (its
//!   socket opened inside the node's namespace);
//! * the example's `api` and `frontend` Deployments are run through
//!   `portcullis inject --config <the chart's injector ConfigMap>`, and
//!   their pods started by tests/podstart/kubelet.rs: `portcullis-init` as
//!   root with only NET_ADMIN and NET_RAW, `portcullis-proxy` as UID 1500
//!   until its startup probe passes, then the example's own app commands
//!   (`python3 -m http.server`, the frontend's `main.py`) with their
//!   ConfigMaps. The api opts into default-deny with the annotation
//!   `config.portcullis.io/default-inbound-policy: deny`.
//!
//! Then: the allowed route (frontend → GET /api/hello) gets 200 over mTLS,
//! the other (GET /admin/) 403, both through the frontend's own page too;
//! the kubelet's rewritten readiness probe of the api returns 200 through
//! `/app-health/api/readyz` under default-deny and strict mTLS, while the
//! original probe sent straight to the app is refused; and once the app is
//! down, the rewritten probe fails.
//!
//! Runs as root (skipped LOUDLY otherwise); everything is torn down on drop.

mod netns;

#[allow(dead_code)]
#[path = "ca_serve/apiserver.rs"]
mod apiserver;
#[allow(dead_code)]
#[path = "pods/apps.rs"]
mod apps;
#[path = "podstart/cluster.rs"]
mod cluster;
#[path = "podstart/kubelet.rs"]
mod kubelet;
#[path = "pods/node.rs"]
mod node;
#[allow(dead_code)]
#[path = "helm/support.rs"]
mod support;
#[path = "podstart/volumes.rs"]
mod volumes;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use apiserver::FakeApi;
use kubelet::{Cluster, RunningPod};
use netns::{find, skip, Netns};
use node::{eventually, metric_value, Node, BIN};
use support::{docs, Render};

/// Pod numbers on the node (addresses 10.89.0.N).
const CA_N: u16 = 10;
const API_N: u16 = 2;
const FRONTEND_N: u16 = 3;
/// The chart value every install sets: the pod network gets mTLS.
const MESH_CIDRS: &str = "proxy.meshCidrs={10.89.0.0/24}";
/// The API server stand-in's port on the node's address.
const API_PORT: u16 = 6443;
const FRONTEND_ID: &str = "spiffe://cluster.local/ns/portcullis-example/sa/frontend";
const API_ID: &str = "spiffe://cluster.local/ns/portcullis-example/sa/api";
/// The example's one rule.
const RULE: &str = "frontend-reads-api";

fn example(file: &str) -> PathBuf {
    support::root().join("deploy/example").join(file)
}

/// Runs `cmd`; panics with its output unless it succeeds; returns stdout.
fn ok(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The CA as docs/kubernetes.md makes it: an offline root and an
/// intermediate issuer. Returns (root cert, issuer cert, issuer key).
fn make_ca(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let (root, issuer) = (dir.join("root"), dir.join("issuer"));
    ok(Command::new(BIN)
        .args([
            "ca",
            "init",
            "--trust-domain",
            "cluster.local",
            "--ttl",
            "48h",
            "--out",
        ])
        .arg(&root));
    ok(Command::new(BIN)
        .args(["ca", "issue", "--ca"])
        .arg(&root)
        .args(["--intermediate", "--ttl", "24h", "--out"])
        .arg(&issuer)
        .args([
            "--id",
            "spiffe://cluster.local/ns/portcullis/sa/portcullis-ca",
        ]));
    (
        root.join("ca.crt"),
        issuer.join("ca.crt"),
        issuer.join("ca.key"),
    )
}

fn find_doc<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name}"))
}

/// `portcullis inject -f <example file> --config <config>`, after `edit`
/// has changed the file's documents (written back as YAML).
fn inject(dir: &Path, config: &Path, file: &str, edit: impl Fn(&mut Value)) -> Vec<Value> {
    let mut input = docs(&std::fs::read_to_string(example(file)).expect("example file"));
    input.iter_mut().for_each(edit);
    let yaml: Vec<String> = input
        .iter()
        .map(|d| serde_norway::to_string(d).expect("YAML"))
        .collect();
    let path = dir.join(file);
    std::fs::write(&path, yaml.join("---\n")).expect("input file");
    let out = Command::new(BIN)
        .args(["inject", "-f"])
        .arg(&path)
        .arg("--config")
        .arg(config)
        .output()
        .expect("running portcullis inject");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "inject {file}: {stderr}");
    if !stderr.trim().is_empty() {
        eprintln!("inject {file} warned:\n{stderr}");
    }
    docs(&String::from_utf8_lossy(&out.stdout))
}

/// The Pod a Deployment's ReplicaSet would create, named `name`.
fn pod_of(deployment: &Value, name: &str) -> Value {
    let template = &deployment["spec"]["template"];
    let mut meta = template["metadata"].clone();
    meta["name"] = json!(name);
    meta["namespace"] = deployment["metadata"]["namespace"].clone();
    json!({"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": template["spec"]})
}

/// A TCP listener opened inside `ns` (from a thread that enters it for
/// the `bind` only): the socket stays in that namespace.
fn listen_in(ns: &Netns, addr: &str) -> std::net::TcpListener {
    let path = format!("/run/netns/{}", ns.name());
    std::thread::scope(|s| {
        s.spawn(|| {
            let f = std::fs::File::open(&path).expect("the namespace's file");
            nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
            std::net::TcpListener::bind(addr).expect("bind in the namespace")
        })
        .join()
        .expect("the binding thread")
    })
}

/// GET `url` with curl from `ns`: (status, body); status 0 without an answer.
fn get(ns: &Netns, url: &str) -> (u16, String) {
    let out = ns.run(&[
        "curl",
        "-s",
        "--noproxy",
        "*",
        "-m",
        "5",
        "-w",
        "\n%{http_code}",
        url,
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = stdout.rsplit_once('\n').unwrap_or(("", &stdout));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

fn env_of<'a>(c: &'a Value, name: &str) -> Option<&'a str> {
    c["env"].as_array()?.iter().find(|e| e["name"] == name)?["value"].as_str()
}

/// The counters the assertions follow, read from one pod's sidecar:
/// handshakes in and out, the example rule's allows, and the denials of
/// what that rule leaves out on its port.
fn counters(pod: &RunningPod) -> [f64; 4] {
    let (status, text) = pod.pod.admin("/metrics");
    assert_eq!(status, 200, "{}: /metrics", pod.meta.name);
    let hs = |dir: &str| {
        let labels = [("direction", dir), ("result", "ok")];
        metric_value(&text, "portcullis_tls_handshakes_total", &labels)
    };
    let authz = |rule: &str, action: &str, decision: &str| {
        let labels = [("rule", rule), ("action", action), ("decision", decision)];
        metric_value(&text, "portcullis_authz_decisions_total", &labels)
    };
    [
        hs("inbound"),
        hs("outbound"),
        authz(RULE, "allow", "allow"),
        authz("default", "implicit_deny", "deny"),
    ]
}

/// The native sidecar layout (the default).
#[test]
fn injected_example_pods_really_work() {
    example_pods_really_work("injected_example_pods_really_work", true);
}

/// The fallback layout (`config.portcullis.io/native-sidecar: "false"`):
/// the proxy is the first container and its `postStart` hook, `portcullis
/// await`, holds the app's start until the proxy is ready.
#[test]
fn injected_example_pods_really_work_in_the_fallback_layout() {
    example_pods_really_work(
        "injected_example_pods_really_work_in_the_fallback_layout",
        false,
    );
}

/// Asserts the layout the injector chose: the proxy after `portcullis-init`
/// among the init containers, restarted always (native), or first among the
/// containers with `portcullis await` as its postStart hook (fallback).
fn check_layout(pod: &Value, native: bool) {
    let names = |list: &str| -> Vec<&str> {
        let list = pod["spec"][list].as_array().into_iter().flatten();
        list.map(|c| c["name"].as_str().unwrap()).collect()
    };
    let (init, containers) = (names("initContainers"), names("containers"));
    assert_eq!(init[0], "portcullis-init", "{init:?}");
    let proxy = if native {
        assert_eq!(init[1], "portcullis-proxy", "{init:?}");
        &pod["spec"]["initContainers"][1]
    } else {
        assert_eq!(containers[0], "portcullis-proxy", "{containers:?}");
        assert!(!init.contains(&"portcullis-proxy"), "{init:?}");
        &pod["spec"]["containers"][0]
    };
    let hook = proxy.pointer("/lifecycle/postStart/exec/command");
    if native {
        assert_eq!(proxy["restartPolicy"], "Always");
        assert_eq!(hook, None);
    } else {
        let await_ = json!(["/usr/local/bin/portcullis", "await", "--timeout", "120s"]);
        assert_eq!(hook, Some(&await_));
    }
}

fn example_pods_really_work(test: &str, native: bool) {
    if skip(test, &[]) {
        return;
    }
    for tool in ["ip", "setpriv", "curl", "python3", "unshare", "chroot"] {
        assert!(
            find(tool).is_some(),
            "{tool} is missing: run `bash .ci/deps.sh`"
        );
    }
    let started = Instant::now();
    let node = Node::new();
    let node_ip = node.node_ip();
    let dir = node.dir().join("cluster");
    std::fs::create_dir_all(&dir).expect("cluster dir");

    // The control plane, as `helm install` would configure it.
    let (root, issuer_crt, issuer_key) = make_ca(&dir);
    let chart = Render::default()
        .set_file("identity.issuer.crtPEM", &issuer_crt)
        .set_file("identity.issuer.keyPEM", &issuer_key)
        .set_file("identity.trustBundlePEM", &root)
        .set(MESH_CIDRS)
        .docs();
    let config = dir.join("injector-config.yaml");
    let config_map = find_doc(&chart, "ConfigMap", "portcullis-injector-config");
    let config_yaml = config_map["data"]["config.yaml"]
        .as_str()
        .expect("config.yaml");
    std::fs::write(&config, config_yaml).expect("injector config");

    // The example, injected; the api opts into default-deny.
    let annotate = |deny: bool| {
        move |d: &mut Value| {
            if d["kind"] != "Deployment" {
                return;
            }
            let mut add = |k: &str, v: &str| {
                let metadata = &mut d["spec"]["template"]["metadata"];
                metadata["annotations"][format!("config.portcullis.io/{k}")] = json!(v);
            };
            if deny {
                add("default-inbound-policy", "deny");
            }
            if !native {
                add("native-sidecar", "false");
            }
        }
    };
    let api_docs = inject(&dir, &config, "20-api.yaml", annotate(true));
    let frontend_docs = inject(&dir, &config, "30-frontend.yaml", annotate(false));
    let rules = docs(&std::fs::read_to_string(example("10-rules.yaml")).expect("rules"));

    // The API server stand-in on the node's address.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("a runtime");
    let listener = listen_in(node.bridge(), &format!("{node_ip}:{API_PORT}"));
    let api = rt.block_on(FakeApi::start_on(listener, "not yet"));

    let ca_pod = pod_of(
        find_doc(&chart, "Deployment", "portcullis-ca"),
        "portcullis-ca-0",
    );
    let api_pod = pod_of(find_doc(&api_docs, "Deployment", "api"), "api-0");
    let frontend_pod = pod_of(
        find_doc(&frontend_docs, "Deployment", "frontend"),
        "frontend-0",
    );
    check_layout(&api_pod, native);
    check_layout(&frontend_pod, native);
    let objects = [chart.clone(), api_docs, frontend_docs, rules].concat();
    let mut cluster = Cluster::new(objects, api);
    for (pod, n) in [
        (&ca_pod, CA_N),
        (&api_pod, API_N),
        (&frontend_pod, FRONTEND_N),
    ] {
        cluster.place(pod, &format!("10.89.0.{n}"));
    }
    let prepared = started.elapsed();

    let mut ca = kubelet::start(&node, &cluster, "ca", CA_N, &ca_pod);
    // The identity service calls the API with its own automounted token.
    let ca_token = std::fs::read_to_string(ca.volume("kube-api-access").join("token"))
        .expect("the CA's token");
    cluster.api.set_ca_token(&ca_token);
    ca.wait_ready(node.bridge(), Duration::from_secs(10));
    let mut api = kubelet::start(&node, &cluster, "api", API_N, &api_pod);
    api.wait_ready(node.bridge(), Duration::from_secs(15));
    let mut frontend = kubelet::start(&node, &cluster, "frontend", FRONTEND_N, &frontend_pod);
    frontend.wait_ready(node.bridge(), Duration::from_secs(15));
    let running = started.elapsed();

    // The containers run as their securityContext says: the sidecar as
    // 1500 with no capabilities and no privilege escalation, the identity
    // service as 1500 with the fsGroup that can read the issuer key.
    let status = |pid: Option<u32>| {
        let pid = pid.expect("a running process");
        std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc status")
    };
    let sidecar = status(api.pod.pids().0);
    for line in [
        "Uid:\t1500\t1500\t1500\t1500",
        "Gid:\t1500\t1500\t1500\t1500",
        "CapEff:\t0000000000000000",
        "CapBnd:\t0000000000000000",
        "NoNewPrivs:\t1",
    ] {
        assert!(
            sidecar.contains(line),
            "the api's sidecar lacks {line:?}:\n{sidecar}"
        );
    }
    let identity = status(ca.pod.pids().1);
    for line in ["Uid:\t1500\t1500\t1500\t1500", "Groups:\t1500"] {
        assert!(
            identity.contains(line),
            "the identity service lacks {line:?}:\n{identity}"
        );
    }

    // Both sidecars hold leaves from the chart's identity service, for
    // their pods' service accounts, and it checked their tokens' audience.
    for (pod, id) in [(&api, API_ID), (&frontend, FRONTEND_ID)] {
        let (status, certs) = pod.pod.admin("/certs");
        assert_eq!(status, 200, "{}: /certs", pod.meta.name);
        assert!(
            certs.contains(id),
            "{}: /certs lacks {id}: {certs}",
            pod.meta.name
        );
    }
    let ca_metrics = get(node.bridge(), "http://10.89.0.10:15020/metrics").1;
    let issued = metric_value(
        &ca_metrics,
        "portcullis_ca_requests_total",
        &[("result", "ok")],
    );
    assert!(issued >= 2.0, "the CA issued {issued}:\n{ca_metrics}");
    let audiences = cluster.api.reviews();
    assert!(
        !audiences.is_empty() && audiences.iter().all(|a| a == &["portcullis-ca"]),
        "TokenReviews asked for {audiences:?}"
    );

    // The allowed route, over mTLS, decided by the example's rule.
    let api_url = |path: &str| format!("http://{}:8080{path}", api.pod.v4);
    let [a_in, _, a_allow, a_deny] = counters(&api);
    let [_, f_out, _, _] = counters(&frontend);
    let (status, body) = get(&frontend.pod.ns, &api_url("/api/hello"));
    assert_eq!(
        (status, body.as_str()),
        (200, "hello from the api\n"),
        "allowed route"
    );
    let [a_in2, _, a_allow2, _] = counters(&api);
    let [_, f_out2, _, _] = counters(&frontend);
    assert_eq!(
        a_in2,
        a_in + 1.0,
        "the api's sidecar counts one inbound mTLS handshake"
    );
    assert_eq!(
        f_out2,
        f_out + 1.0,
        "the frontend's sidecar counts one outbound handshake"
    );
    assert_eq!(a_allow2, a_allow + 1.0, "{RULE} allowed it");

    // Everything else on the port is denied by the sidecar, not the app.
    let (status, _) = get(&frontend.pod.ns, &api_url("/admin/"));
    assert_eq!(status, 403, "GET /admin/");
    let denied = counters(&api)[3];
    assert_eq!(
        denied,
        a_deny + 1.0,
        "{RULE} covers port 8080: implicitly denied"
    );

    // The frontend's own page (what `kubectl port-forward` would show),
    // calling the api by its Service name.
    let (status, page) = get(&frontend.pod.ns, "http://127.0.0.1:8080/");
    assert_eq!(status, 200, "the frontend's page: {page}");
    assert_eq!(page, "GET /api/hello -> 200\nGET /admin/ -> 403\n");

    // The api is default-deny: an identity no rule names is denied.
    let proxy = api.container("portcullis-proxy").clone();
    assert_eq!(env_of(&proxy, "PORTCULLIS_DEFAULT_POLICY"), Some("deny"));
    let explain = format!("/authz/explain?from={API_ID}&port=9090&method=GET&path=/");
    let (status, why) = api.pod.admin(&explain);
    assert!(
        status == 200 && why.contains("default_deny"),
        "explain: {status} {why}"
    );

    // The kubelet's probe: rewritten, it passes through the admin port;
    // the original, sent straight to the app from the node, is refused.
    let app = api.container("api").clone();
    let readiness = &app["readinessProbe"];
    assert_eq!(readiness["httpGet"]["path"], "/app-health/api/readyz");
    let status = kubelet::probe_status(node.bridge(), &api.meta, &app, readiness);
    assert_eq!(status, 200, "the rewritten probe under default-deny");
    let original: Value = serde_json::from_str(env_of(&proxy, "PORTCULLIS_APP_PROBES").unwrap())
        .expect("PORTCULLIS_APP_PROBES");
    let original = &original["api"]["readyz"];
    assert_eq!(original["httpGet"]["path"], "/api/hello");
    let direct = kubelet::probe_status(node.bridge(), &api.meta, &app, original);
    assert_ne!(direct, 200, "the original probe got through strict mTLS");

    // The app down: the rewritten probe fails.
    api.pod.kill_app();
    eventually("the rewritten probe fails", Duration::from_secs(5), || {
        kubelet::probe_status(node.bridge(), &api.meta, &app, readiness) != 200
    });
    eprintln!(
        "{test}: prepared (CA, helm template, inject) in {prepared:.1?}, pods running at {running:.1?}, done in {:.1?}",
        started.elapsed()
    );
}

//! Issue 6, tests 1 and 2: golden AdmissionReview fixtures through the
//! injector, in-process and through the real `portcullis webhook` over
//! HTTPS with `curl`. Every injected pod is built with the `json-patch`
//! crate, validated with `kubernetes-validate --strict` for Kubernetes 1.29
//! and 1.32, checked for what the schema cannot see (`inject/checks.rs`),
//! and re-injected to an empty patch. `UPDATE_GOLDEN=1` rewrites the golden
//! files after a deliberate change.

#[path = "inject/checks.rs"]
mod checks;
#[path = "inject/support.rs"]
mod support;

use std::path::Path;

use portcullis::inject::webhook::review::review;
use portcullis::inject::InjectorConfig;
use serde_json::Value;
use support::*;

/// Each fixture, the webhook path it is posted to, and what must happen.
const CASES: &[(&str, Path_, Expect)] = &[
    ("bare-pod", NS, Injected),
    ("init-containers-native", NS, Injected),
    ("init-containers-fallback", NS, Injected),
    ("replicaset-generate-name", NS, Injected),
    ("debug-copy", NS, Skipped("already_injected")),
    (
        "already-injected-annotation",
        NS,
        Skipped("already_injected"),
    ),
    ("opt-out", NS, Skipped("opted_out")),
    ("invalid-label", NS, Skipped("invalid_label")),
    ("pod-label-enabled", POD, Injected),
    ("no-label", POD, Skipped("not_enabled")),
    ("host-network", NS, Skipped("host_network")),
    ("mirror-pod", NS, Skipped("mirror_pod")),
    ("empty-service-account", NS, Injected),
    ("no-automount", NS, Injected),
    ("probes", NS, Injected),
    ("probes-rewrite-off", NS, Injected),
    ("probes-unknown-port", NS, Injected),
    ("job-native", NS, Injected),
    ("job-fallback", NS, Injected),
    ("update", NS, Skipped("not_create")),
    ("ephemeral-containers", NS, Skipped("subresource")),
    ("not-a-pod", NS, Skipped("not_pod")),
    ("release-namespace", NS, Skipped("excluded_namespace")),
    ("kube-system", NS, Skipped("excluded_namespace")),
    ("conflicts", NS, Injected),
    ("annotations", NS, Injected),
    ("bad-annotations", NS, Injected),
    ("fallback-no-await", NS, Injected),
    ("bad-pod-shape", NS, InternalError),
    ("malformed-json", NS, BadRequest),
    ("malformed-no-uid", NS, BadRequest),
    ("malformed-v1beta1", NS, BadRequest),
];

/// Warnings some cases must carry (a substring of one of them).
const WARNINGS: &[(&str, &str)] = &[
    ("invalid-label", "portcullis.io/inject=\"yes\""),
    ("conflicts", "runs as UID 1500"),
    ("conflicts", "uses port 15001"),
    ("conflicts", "uses port 15008"),
    ("bad-annotations", "proxy-memory-limit"),
    ("bad-annotations", "inbound-mode"),
    ("bad-annotations", "unknown annotation"),
    ("probes-unknown-port", "probe left as is"),
    ("job-fallback", "/shutdown"),
    ("host-network", "host network"),
    ("bad-pod-shape", "internal error"),
];

fn in_process(case: &str, path: Path_, cfg: &InjectorConfig) -> (u16, Value) {
    match review(&fixture(case), path == NS, cfg) {
        Ok(r) => (200, r.review),
        Err(_) => (400, Value::Null),
    }
}

#[test]
fn fixtures_inject_validate_and_reinject_empty() {
    let cfg = config();
    let bundle = cfg.trust_bundle.clone();
    let out = tempfile::tempdir().unwrap();
    let mut pods = Vec::new();
    for &(case, path, expect) in CASES {
        let (status, review_out) = in_process(case, path, &cfg);
        let golden = normalize(status, &review_out);
        check_golden(case, &golden);
        check_expectation(case, expect, status, &review_out);
        for &(c, w) in WARNINGS.iter().filter(|(c, _)| *c == case) {
            let all: Vec<&str> = review_out["response"]["warnings"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .collect();
            assert!(
                all.iter().any(|x| x.contains(w)),
                "{c}: warning {w:?} missing in {all:?}"
            );
        }
        if expect != Injected {
            continue;
        }
        let input: Value = serde_json::from_slice(&fixture(case)).unwrap();
        let before = &input["request"]["object"];
        let after = apply_patch(before, &review_out);
        checks::injected_pod(case, before, &after, &bundle);
        // Our own add-only applier agrees with the json-patch crate.
        let ops: portcullis::inject::Patch = patch_ops(&review_out);
        let mut ours = before.clone();
        portcullis::inject::patch::apply(&mut ours, &ops).unwrap();
        assert_eq!(ours, after, "{case}: our applier differs from json-patch");
        // Re-injecting the result gives an empty patch.
        let mut again = input.clone();
        again["request"]["object"] = after.clone();
        let r = review(&serde_json::to_vec(&again).unwrap(), path == NS, &cfg).unwrap();
        assert!(
            r.review["response"].get("patch").is_none(),
            "{case}: re-injection patched"
        );
        assert_eq!(r.reason, "already_injected", "{case}");
        let file = out.path().join(format!("{case}.json"));
        let mut pod = after.clone();
        pod["metadata"]["name"] = pod["metadata"]["name"]
            .as_str()
            .unwrap_or("generated-x1y2z")
            .into();
        std::fs::write(&file, serde_json::to_vec_pretty(&pod).unwrap()).unwrap();
        pods.push(file);
    }
    assert!(pods.len() >= 15, "too few injected cases: {}", pods.len());
    for version in ["1.29.0", "1.32.0"] {
        kubernetes_validate(version, &pods);
    }
}

#[test]
fn webhook_over_https_matches_golden() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = self_signed(dir.path(), "one");
    let hook = WebhookProc::start(&cert, &key, Path::new(CONFIG));
    let ca1 = dir.path().join("one.crt");
    for &(case, path, expect) in CASES {
        let file = Path::new(FIXTURES).join(format!("{case}.json"));
        let (status, body) = curl_post(&hook.url(path), &ca1, &file);
        let review_out: Value = if status == 200 {
            serde_json::from_str(&body).unwrap()
        } else {
            Value::Null
        };
        let input: Value = serde_json::from_slice(&fixture(case)).unwrap_or(Value::Null);
        if status == 200 {
            assert_eq!(
                review_out["response"]["uid"], input["request"]["uid"],
                "{case}: uid echoed"
            );
        }
        check_golden(case, &normalize(status, &review_out));
        check_expectation(case, expect, status, &review_out);
        if expect == Injected {
            let before = &input["request"]["object"];
            checks::injected_pod(
                case,
                before,
                &apply_patch(before, &review_out),
                &config().trust_bundle,
            );
        }
    }
    let metrics = http_get(hook.admin, "/metrics");
    assert!(
        metrics
            .contains("portcullis_injector_admissions_total{reason=\"none\",result=\"injected\"}"),
        "{metrics}"
    );
    assert!(
        metrics.contains("reason=\"already_injected\",result=\"skipped\""),
        "{metrics}"
    );
    assert!(
        metrics.contains("reason=\"malformed\",result=\"error\""),
        "{metrics}"
    );
    assert!(
        metrics.contains("# TYPE process_resident_memory_bytes gauge"),
        "{metrics}"
    );
    assert!(
        metrics.contains("portcullis_injector_admission_duration_seconds_count"),
        "{metrics}"
    );

    // The serving certificate is replaced on disk: new connections get it.
    let (cert2, key2) = self_signed(dir.path(), "two");
    replace(&cert2, &cert);
    replace(&key2, &key);
    let ca2 = dir.path().join("two.crt");
    let bare = Path::new(FIXTURES).join("bare-pod.json");
    wait_until("the webhook serves the new certificate", || {
        curl_post(&hook.url(NS), &ca2, &bare).0 == 200
    });
    assert!(http_get(hook.admin, "/metrics")
        .contains("portcullis_injector_tls_reloads_total{result=\"ok\"} 1"));
}

/// The offline `portcullis inject -f -` gives the same pod as the webhook,
/// for a Pod and for a Deployment's template, and copies other documents
/// byte for byte.
#[test]
fn offline_inject_matches_webhook() {
    let cfg = config();
    let untouched = "# keep me\napiVersion: v1\nkind: ConfigMap\nmetadata: {name: settings}   # inline\ndata: {a: \"1\"}\n";
    for case in [
        "bare-pod",
        "init-containers-native",
        "init-containers-fallback",
        "probes",
        "annotations",
        "job-fallback",
        "no-automount",
    ] {
        let input: Value = serde_json::from_slice(&fixture(case)).unwrap();
        let pod = input["request"]["object"].clone();
        let (_, out) = in_process(case, NS, &cfg);
        let want = apply_patch(&pod, &out);
        let mut template = serde_json::json!({"spec": pod["spec"]});
        if let Some(m) = pod.get("metadata") {
            template["metadata"] = m.clone();
        }
        let deployment = serde_json::json!({
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "web", "namespace": "shop"},
            "spec": {"selector": {"matchLabels": {"app": "web"}}, "template": template},
        });
        let text = format!(
            "{untouched}---\n{}---\n{}",
            serde_norway::to_string(&pod).unwrap(),
            serde_norway::to_string(&deployment).unwrap()
        );
        let mut child = std::process::Command::new(BIN)
            .args(["inject", "-f", "-", "--config", CONFIG])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
        let done = child.wait_with_output().unwrap();
        assert!(
            done.status.success(),
            "{case}: {}",
            String::from_utf8_lossy(&done.stderr)
        );
        let stdout = String::from_utf8(done.stdout).unwrap();
        assert!(
            stdout.starts_with(&format!("{untouched}---\n")),
            "{case}: other documents changed:\n{stdout}"
        );
        let docs: Vec<Value> = stdout
            .split("\n---\n")
            .map(|d| serde_norway::from_str(d).unwrap())
            .collect();
        assert_eq!(docs.len(), 3, "{case}");
        assert_eq!(
            docs[1], want,
            "{case}: offline Pod differs from the webhook's"
        );
        let t = &docs[2]["spec"]["template"];
        assert_eq!(
            t["spec"], want["spec"],
            "{case}: Deployment template spec differs"
        );
        assert_eq!(
            t["metadata"], want["metadata"],
            "{case}: Deployment template metadata differs"
        );
        // Injecting the output again changes nothing.
        let (again, _) = portcullis::inject::offline::inject_documents(&stdout, &cfg).unwrap();
        assert_eq!(
            again, stdout,
            "{case}: offline re-injection changed the output"
        );
    }
}

/// The webhook's admin port holds at most `ADMIN_MAX_CONNECTIONS`
/// connections, like the sidecar's: when full, a probe evicts one that
/// never sent a whole request and is answered, and half-sent requests are
/// closed after `ADMIN_FIRST_REQUEST_TIMEOUT`.
#[test]
fn webhook_admin_connections_are_capped() {
    use portcullis::limits::{ADMIN_FIRST_REQUEST_TIMEOUT, ADMIN_MAX_CONNECTIONS};
    use std::io::{Read, Write};
    use std::time::{Duration, Instant};
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = self_signed(dir.path(), "one");
    let hook = WebhookProc::start(&cert, &key, Path::new(CONFIG));
    let half = b"GET /metrics HTTP/1.1\r\nHost: x\r\n";
    let started = Instant::now();
    let mut held = Vec::new();
    for _ in 0..ADMIN_MAX_CONNECTIONS {
        let mut s = std::net::TcpStream::connect(hook.admin).unwrap();
        s.write_all(half).unwrap();
        held.push(s);
    }
    let mut probe = std::net::TcpStream::connect(hook.admin).unwrap();
    probe
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    probe.write_all(b"GET /live HTTP/1.0\r\n\r\n").unwrap();
    let mut answer = String::new();
    let _ = probe.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.0 200"), "{answer:?}");
    for s in &mut held {
        let left = (ADMIN_FIRST_REQUEST_TIMEOUT + Duration::from_secs(5))
            .saturating_sub(started.elapsed())
            .max(Duration::from_millis(1));
        s.set_read_timeout(Some(left)).unwrap();
        let mut buf = [0u8; 16];
        assert!(
            !matches!(s.read(&mut buf), Err(ref e) if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::TimedOut),
            "a half-sent request was closed"
        );
    }
}

//! Tables for the injector's pure decisions: opt-in precedence, skip
//! reasons, and annotation values.

use std::collections::BTreeMap;

use serde_json::{json, Value};

use super::settings::{quantity, resolve};
use super::*;

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn run(ns: &[(&str, &str)], pod: Value, namespace: &str) -> Option<Skip> {
    let ns = labels(ns);
    let req = Request {
        kind: "Pod",
        operation: "CREATE",
        sub_resource: "",
        namespace,
        namespace_labels: &ns,
        pod: &pod,
        job: false,
    };
    inject(&req, &InjectorConfig::default()).unwrap().skipped
}

fn pod_with_label(v: Option<&str>) -> Value {
    let mut p =
        json!({"metadata": {"name": "p"}, "spec": {"containers": [{"name": "app", "image": "x"}]}});
    if let Some(v) = v {
        p["metadata"]["labels"] = json!({INJECT_LABEL: v});
    }
    p
}

#[test]
fn opt_in_pod_wins_over_namespace() {
    let on = [(INJECT_LABEL, "enabled")];
    let off = [(INJECT_LABEL, "disabled")];
    type Case<'a> = (&'a [(&'a str, &'a str)], Option<&'a str>, Option<Skip>);
    let cases: &[Case] = &[
        (&on, None, None),
        (&on, Some("disabled"), Some(Skip::OptedOut)),
        (&off, Some("enabled"), None),
        (&off, None, Some(Skip::OptedOut)),
        (&[], None, Some(Skip::NotEnabled)),
        (&[], Some("enabled"), None),
        (&on, Some("true"), Some(Skip::InvalidLabel)),
        (&[(INJECT_LABEL, "yes")], None, Some(Skip::InvalidLabel)),
        (
            &[(INJECT_LABEL, "enabled"), (WEBHOOKS_LABEL, "disabled")],
            Some("enabled"),
            Some(Skip::WebhooksDisabled),
        ),
    ];
    for (i, (ns, pod, want)) in cases.iter().enumerate() {
        assert_eq!(run(ns, pod_with_label(*pod), "shop"), *want, "case {i}");
    }
    assert_eq!(
        run(&on, pod_with_label(None), "kube-system"),
        Some(Skip::ExcludedNamespace)
    );
}

#[test]
fn quantities() {
    for ok in ["100m", "1", "0.5", "64Mi", "1Gi", "1e3", "2E-2", "+1"] {
        assert!(quantity(ok).is_ok(), "{ok}");
    }
    for bad in ["", "lots", "1.2.3", "10MB", "-1", "m", "1e"] {
        assert!(quantity(bad).is_err(), "{bad}");
    }
}

#[test]
fn annotations_override_or_warn() {
    let cfg = InjectorConfig::default();
    let ann = labels(&[
        ("config.portcullis.io/skip-inbound-ports", "9000-9100, 22"),
        ("config.portcullis.io/native-sidecar", "false"),
        ("config.portcullis.io/inbound-mode", "stirct"),
        ("config.portcullis.io/nope", "1"),
        ("config.portcullis.io/proxy-worker-threads", "2"),
        ("unrelated.io/x", "y"),
    ]);
    let (s, warnings) = resolve(&cfg, &ann);
    assert_eq!(s.skip_inbound_ports, "9000-9100,22");
    assert!(!s.native_sidecar);
    assert_eq!(s.inbound_mode, "strict");
    assert_eq!(s.worker_threads, 2);
    assert_eq!(warnings.len(), 2, "{warnings:?}");
    for bad in ["-1", "1025", "two", "1.5", ""] {
        let ann = labels(&[("config.portcullis.io/proxy-worker-threads", bad)]);
        let (s, warnings) = resolve(&cfg, &ann);
        assert_eq!(s.worker_threads, 1, "{bad}");
        assert_eq!(warnings.len(), 1, "{bad}: {warnings:?}");
    }
}

#[test]
fn config_refuses_bad_values() {
    assert!(InjectorConfig::parse("").is_ok());
    for bad in [
        "imagePullPolicy: Sometimes",
        "proxy: {uid: 0}",
        "proxy: {resources: {memoryLimit: lots}}",
        "proxy: {inboundMode: open}",
        "proxy: {workerThreads: 2000}",
        "proxy: {workerThreads: -1}",
        "unknownKey: 1",
        "init: {excludeOutboundCidrs: [10.0.0.0/33]}",
    ] {
        assert!(InjectorConfig::parse(bad).is_err(), "{bad}");
    }
}

/// Empty YAML fields (`annotations:`, `volumes:`) arrive as `null`: they
/// are injected like missing ones, not a crash of `portcullis inject`.
#[test]
fn null_fields_are_like_missing_ones() {
    let pod = json!({
        "metadata": {"name": "p", "labels": null, "annotations": null},
        "spec": {"initContainers": null, "volumes": null,
                 "containers": [{"name": "app", "image": "x", "ports": null, "env": null}]},
    });
    let ns = labels(&[(INJECT_LABEL, "enabled")]);
    let req = Request {
        kind: "Pod",
        operation: "CREATE",
        sub_resource: "",
        namespace: "shop",
        namespace_labels: &ns,
        pod: &pod,
        job: false,
    };
    let injection = inject(&req, &InjectorConfig::default()).unwrap();
    assert_eq!(injection.skipped, None);
    let mut doc = pod.clone();
    patch::apply(&mut doc, &injection.patch).unwrap();
    assert!(doc["metadata"]["annotations"][build::STATUS_ANNOTATION].is_string());
    assert_eq!(doc["spec"]["initContainers"].as_array().unwrap().len(), 2);
    assert_eq!(doc["spec"]["volumes"].as_array().unwrap().len(), 4);
}

#[test]
fn config_files_over_the_limits_are_refused_without_parsing() {
    let deep = format!("proxy: {}{}\n", "[".repeat(80_000), "]".repeat(80_000));
    let started = std::time::Instant::now();
    let e = InjectorConfig::parse(&deep).unwrap_err().to_string();
    assert!(
        e.contains("line 1 column 71: nested deeper than 64 levels"),
        "{e}"
    );
    assert!(started.elapsed() < std::time::Duration::from_secs(1));
    let bomb = format!(
        "proxy: &p [{}]\nall: [{}]\n",
        vec!["x"; 20_000].join(", "),
        vec!["*p"; 4_000].join(", ")
    );
    let e = InjectorConfig::parse(&bomb).unwrap_err().to_string();
    assert!(
        e.contains(
            "line 1 column 8: YAML anchors and aliases are not allowed; refused before parsing"
        ),
        "{e}"
    );

    let dir = tempfile::tempdir().unwrap();
    let big = dir.path().join("config.yaml");
    std::fs::write(&big, "#".repeat(2 << 20)).unwrap();
    let e = InjectorConfig::load(Some(&big)).unwrap_err().to_string();
    assert!(e.contains("larger than the limit of 1048576 bytes"), "{e}");

    // Values are not echoed in full.
    let secret = "s3cr3t".repeat(40);
    let e = InjectorConfig::parse(&format!("image: [{secret}]\n"))
        .unwrap_err()
        .to_string();
    assert!(!e.contains(&secret[..40]), "{e}");
}

/// Every injected pod declares the tunnel port on its proxy and keeps it
/// (and the admin port) out of interception, ahead of the exclusions the
/// config and the pod's annotations add, in both layouts.
#[test]
fn tunnel_port_is_declared_and_never_redirected() {
    let cfg = InjectorConfig::parse("init: {excludeInboundPorts: ['9000']}").unwrap();
    for native in ["true", "false"] {
        let pod = json!({
            "metadata": {"name": "p", "annotations": {
                "config.portcullis.io/skip-inbound-ports": "22",
                "config.portcullis.io/native-sidecar": native,
            }},
            "spec": {"containers": [{"name": "app", "image": "x"}]},
        });
        let ns = labels(&[(INJECT_LABEL, "enabled")]);
        let req = Request {
            kind: "Pod",
            operation: "CREATE",
            sub_resource: "",
            namespace: "shop",
            namespace_labels: &ns,
            pod: &pod,
            job: false,
        };
        let mut doc = pod.clone();
        patch::apply(&mut doc, &inject(&req, &cfg).unwrap().patch).unwrap();
        let all: Vec<&Value> = ["initContainers", "containers"]
            .iter()
            .flat_map(|f| doc["spec"][f].as_array().unwrap())
            .collect();
        let by_name = |n: &str| *all.iter().find(|c| c["name"] == n).unwrap();
        let init = by_name(build::INIT_NAME);
        let excluded = init["env"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["name"] == "PORTCULLIS_EXCLUDE_INBOUND_PORTS")
            .map(|e| e["value"].clone());
        assert_eq!(
            excluded,
            Some(json!("15008,15020,9000,22")),
            "native={native}"
        );
        let ports = &by_name(build::PROXY_NAME)["ports"];
        assert!(
            ports.as_array().unwrap().contains(
                &json!({"name": "tunnel", "containerPort": build::TUNNEL_PORT, "protocol": "TCP"})
            ),
            "native={native}: {ports}"
        );
    }
}

//! What the Kubernetes schemas do not check, checked on a chart render:
//! name lengths, security contexts, the webhook's selectors, the identity
//! service's RBAC and flags, the injector config, and the CRD objects.

use serde_json::Value;

use super::support::*;

/// The keys of the injector's config file (src/inject/config.rs on the
/// inject branch, documented in docs/kubernetes.md): the injector refuses
/// unknown keys, so the chart must write only these.
const INJECTOR_KEYS: &[&str] = &[
    "image",
    "imagePullPolicy",
    "nativeSidecar",
    "proxyAwait",
    "rewriteAppProbes",
    "trustDomain",
    "trustBundle",
    "caUrl",
    "caAudience",
    "excludedNamespaces",
    "denyOnError",
    "proxy",
    "init",
];
const INJECTOR_PROXY_KEYS: &[&str] = &[
    "uid",
    "gid",
    "resources",
    "logLevel",
    "logFormat",
    "inboundMode",
    "defaultInboundPolicy",
    "meshCidrs",
    "rulesConfigMap",
    "certTtl",
    "workerThreads",
];
const INJECTOR_INIT_KEYS: &[&str] = &[
    "resources",
    "excludeInboundPorts",
    "excludeOutboundPorts",
    "excludeOutboundCidrs",
];
const RESOURCE_KEYS: &[&str] = &["cpuRequest", "cpuLimit", "memoryRequest", "memoryLimit"];

/// Every check below, on one render in the release namespace.
pub fn check_render(docs: &[Value], what: &str) {
    check_names(docs, what);
    check_workloads(docs, what);
    check_identity(docs, what);
    check_webhook(docs, what);
    check_injector_config(docs, what);
    for d in docs.iter().filter(|d| is_crd_kind(d)) {
        check_crd_object(d, what);
    }
}

fn label_ok(s: &str) -> bool {
    s.len() <= 63
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        && s.chars().next().is_none_or(|c| c.is_ascii_alphanumeric())
        && s.chars().last().is_none_or(|c| c.is_ascii_alphanumeric())
}

fn dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

fn check_labels(labels: &Value, what: &str) {
    if let Some(m) = labels.as_object() {
        for (k, v) in m {
            let key_name = k.rsplit('/').next().unwrap();
            assert!(label_ok(key_name), "{what}: label key {k:?}");
            let v = v
                .as_str()
                .unwrap_or_else(|| panic!("{what}: label {k} not a string"));
            assert!(
                label_ok(v),
                "{what}: label {k}={v:?} is not a valid label value"
            );
        }
    }
}

/// Every object name is a DNS label of at most 63 characters (so it can
/// also be a Service name and a label value); labels are valid; container
/// and port names fit their limits (the schemas check none of this).
pub fn check_names(docs: &[Value], what: &str) {
    for d in docs {
        let n = name(d);
        assert!(
            dns_label(n),
            "{what}: {} name {n:?} ({} chars)",
            kind(d),
            n.len()
        );
        check_labels(&d["metadata"]["labels"], what);
        if let Some(tpl) = d["spec"]["template"].as_object() {
            check_labels(&tpl["metadata"]["labels"], what);
            for c in tpl["spec"]["containers"].as_array().into_iter().flatten() {
                let cn = c["name"].as_str().unwrap();
                assert!(dns_label(cn), "{what}: container name {cn:?}");
                for p in c["ports"].as_array().into_iter().flatten() {
                    let pn = p["name"].as_str().unwrap_or("");
                    assert!(
                        pn.len() <= 15 && dns_label(pn),
                        "{what}: port name {pn:?} (at most 15 characters)"
                    );
                }
            }
        }
    }
}

/// The control plane runs as 1500, non-root, read-only root filesystem,
/// no capabilities, RuntimeDefault seccomp, outside the mesh.
pub fn check_workloads(docs: &[Value], what: &str) {
    let deployments = of_kind(docs, "Deployment");
    assert_eq!(
        deployments.len(),
        2,
        "{what}: the identity service and the injector"
    );
    for d in deployments {
        let n = name(d);
        let spec = &d["spec"]["template"]["spec"];
        let psc = &spec["securityContext"];
        assert_eq!(psc["runAsNonRoot"], true, "{what}: {n}");
        assert_eq!(psc["runAsUser"], 1500, "{what}: {n}");
        assert_eq!(psc["runAsGroup"], 1500, "{what}: {n}");
        assert_eq!(
            psc["seccompProfile"]["type"], "RuntimeDefault",
            "{what}: {n}"
        );
        assert_eq!(
            d["spec"]["template"]["metadata"]["labels"]["portcullis.io/inject"], "disabled",
            "{what}: {n} must never be meshed"
        );
        for c in spec["containers"].as_array().unwrap() {
            let sc = &c["securityContext"];
            assert_eq!(sc["runAsNonRoot"], true, "{what}: {n}");
            assert_eq!(sc["runAsUser"], 1500, "{what}: {n}");
            assert_eq!(sc["readOnlyRootFilesystem"], true, "{what}: {n}");
            assert_eq!(sc["allowPrivilegeEscalation"], false, "{what}: {n}");
            assert_eq!(
                sc["capabilities"]["drop"],
                serde_json::json!(["ALL"]),
                "{what}: {n}"
            );
            assert!(sc["capabilities"]["add"].is_null(), "{what}: {n}");
            assert_eq!(
                sc["seccompProfile"]["type"], "RuntimeDefault",
                "{what}: {n}"
            );
            assert_eq!(c["command"][0], "/usr/local/bin/portcullis", "{what}: {n}");
            assert!(c["readinessProbe"].is_object() && c["livenessProbe"].is_object());
        }
        // A PodDisruptionBudget whenever there is more than one replica.
        let replicas = d["spec"]["replicas"].as_u64().unwrap();
        let pdbs = of_kind(docs, "PodDisruptionBudget");
        let has_pdb = pdbs.iter().any(|p| name(p) == n);
        assert_eq!(
            has_pdb,
            replicas > 1,
            "{what}: PodDisruptionBudget of {n} ({replicas} replicas)"
        );
    }
}

/// The args of a Deployment's first container.
pub fn args(d: &Value) -> Vec<String> {
    d["spec"]["template"]["spec"]["containers"][0]["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().to_string())
        .collect()
}

fn flag<'a>(args: &'a [String], f: &str) -> Option<&'a str> {
    let prefix = format!("{f}=");
    args.iter().find_map(|a| a.strip_prefix(&prefix))
}

fn identity_deployment(docs: &[Value]) -> &Value {
    of_kind(docs, "Deployment")
        .into_iter()
        .find(|d| {
            d["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"] == "identity"
        })
        .expect("the identity Deployment")
}

pub fn injector_deployment(docs: &[Value]) -> &Value {
    of_kind(docs, "Deployment")
        .into_iter()
        .find(|d| {
            d["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"] == "injector"
        })
        .expect("the injector Deployment")
}

/// `ca serve` with its flags, a Service on 15012 with the name the
/// certificate is minted for, RBAC: `create` on `tokenreviews` only.
pub fn check_identity(docs: &[Value], what: &str) {
    let dep = identity_deployment(docs);
    let a = args(dep);
    assert_eq!(&a[..2], ["ca", "serve"], "{what}");
    let svc_name = flag(&a, "--service-name").expect("--service-name");
    let svc = find(docs, "Service", svc_name);
    let ports = svc["spec"]["ports"].as_array().unwrap();
    assert!(ports
        .iter()
        .any(|p| p["name"] == "https" && p["targetPort"] == "https"));
    assert_eq!(flag(&a, "--namespace"), Some(NAMESPACE), "{what}");
    assert_eq!(flag(&a, "--listen"), Some("[::]:15012"), "{what}");
    for f in [
        "--issuer-cert",
        "--issuer-key",
        "--trust-bundle",
        "--trust-domain",
        "--audience",
        "--max-ttl",
    ] {
        assert!(
            flag(&a, f).is_some(),
            "{what}: identity service without {f}"
        );
    }
    let spec = &dep["spec"]["template"]["spec"];
    assert_eq!(
        spec["automountServiceAccountToken"], true,
        "{what}: TokenReview needs a token"
    );
    let sa = spec["serviceAccountName"].as_str().unwrap();
    find(docs, "ServiceAccount", sa);

    let roles = of_kind(docs, "ClusterRole");
    assert_eq!(roles.len(), 1, "{what}: one ClusterRole");
    assert_eq!(
        roles[0]["rules"],
        serde_json::json!([{"apiGroups": ["authentication.k8s.io"], "resources": ["tokenreviews"], "verbs": ["create"]}]),
        "{what}: the identity service may create TokenReviews and nothing else"
    );
    let bindings = of_kind(docs, "ClusterRoleBinding");
    assert_eq!(bindings.len(), 1);
    assert_eq!(bindings[0]["roleRef"]["name"], roles[0]["metadata"]["name"]);
    assert_eq!(
        bindings[0]["subjects"],
        serde_json::json!([{"kind": "ServiceAccount", "name": sa, "namespace": NAMESPACE}])
    );
    assert!(of_kind(docs, "Role").is_empty() && of_kind(docs, "RoleBinding").is_empty());
}

/// Two webhooks (namespace opt-in and pod opt-in) on the injector Service,
/// pods on CREATE only, sideEffects None, a timeout, and selectors that
/// exclude the system namespaces, the release namespace and namespaces
/// labelled portcullis.io/admission-webhooks=disabled.
pub fn check_webhook(docs: &[Value], what: &str) {
    let cfgs = of_kind(docs, "MutatingWebhookConfiguration");
    assert_eq!(cfgs.len(), 1, "{what}");
    let hooks = cfgs[0]["webhooks"].as_array().unwrap();
    assert_eq!(hooks.len(), 2, "{what}");
    let injector = injector_deployment(docs);
    let injector_svc = find(docs, "Service", name(injector));
    let mut paths = Vec::new();
    for h in hooks {
        assert_eq!(h["sideEffects"], "None", "{what}");
        assert_eq!(h["admissionReviewVersions"], serde_json::json!(["v1"]));
        let t = h["timeoutSeconds"].as_u64().unwrap();
        assert!((1..=30).contains(&t), "{what}: timeoutSeconds {t}");
        assert!(["Ignore", "Fail"].contains(&h["failurePolicy"].as_str().unwrap()));
        assert_eq!(
            h["rules"],
            serde_json::json!([{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"], "resources": ["pods"], "scope": "Namespaced"}])
        );
        let svc = &h["clientConfig"]["service"];
        assert_eq!(svc["name"], injector_svc["metadata"]["name"], "{what}");
        assert_eq!(svc["namespace"], NAMESPACE);
        let port = svc["port"].as_u64().unwrap();
        assert!(injector_svc["spec"]["ports"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["port"] == port && p["targetPort"] == "https"));
        paths.push(svc["path"].as_str().unwrap().to_string());

        let exprs = h["namespaceSelector"]["matchExpressions"]
            .as_array()
            .unwrap();
        let excluded = exprs
            .iter()
            .find(|e| e["key"] == "kubernetes.io/metadata.name" && e["operator"] == "NotIn")
            .expect("namespace exclusions");
        for ns in ["kube-system", "kube-public", "kube-node-lease", NAMESPACE] {
            assert!(
                excluded["values"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|v| v == ns),
                "{what}: {ns} must be excluded"
            );
        }
        assert!(exprs
            .iter()
            .any(|e| e["key"] == "portcullis.io/admission-webhooks"
                && e["operator"] == "NotIn"
                && e["values"] == serde_json::json!(["disabled"])));
        assert!(h["objectSelector"]["matchExpressions"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["key"] == "portcullis.io/inject"));
    }
    paths.sort();
    assert_eq!(paths, ["/inject", "/inject/namespace-enabled"], "{what}");
}

/// The injector ConfigMap holds a config file in the injector's format,
/// pointing at the chart's identity service; the injector Deployment reads
/// it and carries its checksum.
/// The injector's config as the chart renders it (the ConfigMap its
/// Deployment mounts).
pub fn injector_config_text(docs: &[Value]) -> String {
    let spec = &injector_deployment(docs)["spec"]["template"]["spec"];
    let cm_name = spec["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find_map(|v| v["configMap"]["name"].as_str())
        .expect("the config volume");
    find(docs, "ConfigMap", cm_name)["data"]["config.yaml"]
        .as_str()
        .expect("config.yaml")
        .to_string()
}

pub fn check_injector_config(docs: &[Value], what: &str) {
    let dep = injector_deployment(docs);
    let a = args(dep);
    assert_eq!(a[0], "webhook", "{what}");
    for f in ["--listen", "--tls-cert", "--tls-key", "--config"] {
        assert!(flag(&a, f).is_some(), "{what}: webhook without {f}");
    }
    let text = injector_config_text(docs);
    let annotations = &dep["spec"]["template"]["metadata"]["annotations"];
    assert_eq!(
        annotations["checksum/config"].as_str(),
        Some(sha256_hex(text.strip_suffix('\n').unwrap_or(&text)).as_str()),
        "{what}: the injector pods carry the config's checksum"
    );
    let cfg = &docs_of(&text)[0];
    let keys = |v: &Value, allowed: &[&str], at: &str| {
        for k in v.as_object().unwrap().keys() {
            assert!(
                allowed.contains(&k.as_str()),
                "{what}: injector config {at}{k} is unknown to the injector"
            );
        }
    };
    keys(cfg, INJECTOR_KEYS, "");
    keys(&cfg["proxy"], INJECTOR_PROXY_KEYS, "proxy.");
    keys(&cfg["init"], INJECTOR_INIT_KEYS, "init.");
    keys(
        &cfg["proxy"]["resources"],
        RESOURCE_KEYS,
        "proxy.resources.",
    );
    keys(&cfg["init"]["resources"], RESOURCE_KEYS, "init.resources.");
    let ca = identity_deployment(docs);
    let svc = flag(&args(ca), "--service-name").unwrap().to_string();
    assert_eq!(
        cfg["caUrl"],
        format!("https://{svc}.{NAMESPACE}.svc:15012"),
        "{what}: sidecars must reach the identity service by the name its certificate carries"
    );
    assert_eq!(
        cfg["caAudience"].as_str(),
        flag(&args(ca), "--audience"),
        "{what}"
    );
    assert_eq!(
        cfg["trustDomain"].as_str(),
        flag(&args(ca), "--trust-domain"),
        "{what}"
    );
    assert!(cfg["excludedNamespaces"]
        .as_array()
        .unwrap()
        .iter()
        .any(|n| n == NAMESPACE));
    assert!(cfg["proxy"]["uid"].as_u64().unwrap() > 0);
}

fn docs_of(text: &str) -> Vec<Value> {
    docs(text)
}

/// The CRD objects the schemas cannot check: the fields the tests rely on.
pub fn check_crd_object(d: &Value, what: &str) {
    let n = name(d);
    match (d["apiVersion"].as_str().unwrap(), kind(d)) {
        ("cert-manager.io/v1", "Issuer") => {
            assert!(
                d["spec"]["selfSigned"].is_object() || d["spec"]["ca"]["secretName"].is_string(),
                "{what}: {n}"
            )
        }
        ("cert-manager.io/v1", "Certificate") => {
            assert!(d["spec"]["secretName"].is_string(), "{what}: {n}");
            assert!(d["spec"]["issuerRef"]["name"].is_string(), "{what}: {n}");
            if d["spec"]["isCA"] != true {
                let dns = d["spec"]["dnsNames"].as_array().unwrap();
                assert!(dns
                    .iter()
                    .any(|x| x.as_str().unwrap().ends_with(&format!(".{NAMESPACE}.svc"))));
            }
        }
        ("monitoring.coreos.com/v1", "PodMonitor") => {
            let ep = &d["spec"]["podMetricsEndpoints"][0];
            assert_eq!(ep["path"], "/metrics");
            assert!(ep["relabelings"]
                .as_array()
                .unwrap()
                .iter()
                .any(|r| r["action"] == "keep" && r["regex"] == "portcullis-proxy;15020"));
            assert_eq!(d["spec"]["namespaceSelector"]["any"], true);
        }
        ("monitoring.coreos.com/v1", "ServiceMonitor") => {
            assert_eq!(d["spec"]["endpoints"][0]["port"], "admin");
        }
        (api, k) => panic!("{what}: unexpected CRD object {api} {k}"),
    }
}

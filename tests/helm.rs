//! The Helm chart (charts/portcullis), proven with the real tools: the Helm
//! 3.17 binary (`make deps` fetches it into .tools/bin, see .ci/helm.sh) and
//! the official Kubernetes schemas (`kubernetes-validate --strict`, from
//! PyPI). There is no cluster here, so nothing is installed: every values
//! file of charts/portcullis/ci is linted, rendered for Kubernetes 1.29, 1.32
//! and 1.33, and every rendered object validated; objects of CRD kinds
//! (cert-manager, Prometheus Operator), which the schemas do not know, are
//! skipped by kubernetes-validate and checked field by field instead.

#[path = "helm/checks.rs"]
mod checks;
#[path = "helm/support.rs"]
mod support;

use std::collections::BTreeSet;
use std::process::Command;
use std::time::Instant;

use serde_json::Value;
use support::*;

fn ci_values() -> Vec<std::path::PathBuf> {
    let mut files: Vec<_> = std::fs::read_dir(chart().join("ci"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().ends_with("-values.yaml"))
        .collect();
    files.sort();
    assert!(files.len() >= 8, "the ci matrix: {files:?}");
    files
}

/// `helm lint --strict` and `helm template` for every ci values file on
/// every Kubernetes version; every object validated against that version's
/// schemas (one kubernetes-validate call per render) and checked for what
/// the schemas miss (tests/helm/checks.rs).
#[test]
fn ci_values_lint_render_and_validate_on_every_kube_version() {
    let started = Instant::now();
    let mut validated = 0;
    let mut skipped_crd = BTreeSet::new();
    for file in ci_values() {
        let base = file.file_name().unwrap().to_string_lossy().into_owned();
        for kube in KUBE_VERSIONS {
            let what = format!("{base} on {kube}");
            let r = Render::bare().file(&file).kube(kube);
            if let Err(e) = r.lint() {
                panic!("{what}: helm lint --strict failed:\n{e}");
            }
            let docs = r.docs();
            assert!(docs.len() >= 10, "{what}: only {} objects", docs.len());
            checks::check_render(&docs, &what);
            validated += validate(&docs, kube, &what);
            for d in docs.iter().filter(|d| is_crd_kind(d)) {
                skipped_crd.insert(format!("{} {}", d["apiVersion"].as_str().unwrap(), kind(d)));
            }
        }
    }
    eprintln!(
        "validated {validated} objects in {:.1?}; CRD kinds not in the Kubernetes schemas, checked by hand instead: {skipped_crd:?}",
        started.elapsed()
    );
}

/// Bad values are refused by the schema (or by a `required` in the
/// templates) with a message naming the value, by lint and template alike.
/// Each fixture's first line says `# expect: <text of the error>`.
#[test]
fn bad_values_files_are_refused() {
    let dir = root().join("tests/fixtures/helm");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            let n = p.file_name().unwrap().to_string_lossy();
            n.starts_with("bad-") && n.ends_with(".yaml")
        })
        .collect();
    files.sort();
    assert!(files.len() >= 10, "bad values fixtures: {files:?}");
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap();
        let expect = text
            .lines()
            .next()
            .and_then(|l| l.strip_prefix("# expect: "))
            .unwrap_or_else(|| panic!("{}: first line must be `# expect: ...`", f.display()))
            .trim()
            .to_string();
        let r = Render::default().file(&f);
        let name = f.file_name().unwrap().to_string_lossy();
        match r.template() {
            Ok(_) => panic!("{name}: helm template accepted it"),
            Err(e) => assert!(e.contains(&expect), "{name}: expected {expect:?} in:\n{e}"),
        }
        match r.lint() {
            Ok(()) => panic!("{name}: helm lint --strict accepted it"),
            Err(e) => assert!(
                e.contains(&expect),
                "{name}: lint: expected {expect:?} in:\n{e}"
            ),
        }
    }
}

/// Helm allows release names up to 53 characters; with the longest one
/// (and with a 63-character fullnameOverride, in ci/long-names-values.yaml)
/// every name stays a DNS label of at most 63 characters.
#[test]
fn names_fit_in_63_characters_even_with_the_longest_release_name() {
    let release = "a-release-name-of-fifty-three-characters-for-the-test";
    assert_eq!(release.len(), 53);
    let docs = Render::default()
        .release(release)
        .set("monitoring.force=true")
        .set("defaultRules.enabled=true")
        .set("defaultRules.namespaces={shop}")
        .docs();
    checks::check_names(&docs, release);
    let longest = docs.iter().map(|d| name(d).len()).max().unwrap();
    assert!(longest <= 63, "longest name {longest}");
    // The webhook's DNS name still fits a label.
    let dep = checks::injector_deployment(&docs);
    assert!(name(dep).len() <= 63);
}

/// deploy/portcullis.yaml is what `make manifests` renders now.
#[test]
fn deploy_manifest_equals_a_fresh_render() {
    helm();
    let out = run(Command::new("bash").arg(root().join(".ci/manifests.sh")));
    assert!(out.status.success(), "{}", text(&out.stderr));
    let fresh = text(&out.stdout);
    let committed = std::fs::read_to_string(root().join("deploy/portcullis.yaml")).unwrap();
    assert!(
        fresh == committed,
        "deploy/portcullis.yaml is out of date: run `make manifests` and commit it"
    );
    let docs = docs(&committed);
    assert_eq!(kind(&docs[0]), "Namespace");
    checks::check_render(&docs[1..], "deploy/portcullis.yaml");
    for kube in KUBE_VERSIONS {
        validate(&docs, kube, "deploy/portcullis.yaml");
    }
    // No private key is published: the webhook's comes from cert-manager
    // and the issuer's from a Secret the user makes.
    assert!(!committed.contains("PRIVATE KEY") && !committed.contains("tls.key:"));
}

/// Helm-generated webhook TLS: the Secret's CA is the caBundle of both
/// webhooks, and its certificate is signed by that CA for the injector
/// Service's DNS names.
#[test]
fn helm_generated_webhook_tls_is_consistent() {
    let docs = Render::default().docs();
    let dep = checks::injector_deployment(&docs);
    let svc = name(dep);
    let secret_name = dep["spec"]["template"]["spec"]["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find_map(|v| v["secret"]["secretName"].as_str())
        .unwrap();
    let secret = find(&docs, "Secret", secret_name);
    assert_eq!(secret["type"], "kubernetes.io/tls");
    let ca_pem = b64(secret["data"]["ca.crt"].as_str().unwrap());
    let crt_pem = b64(secret["data"]["tls.crt"].as_str().unwrap());
    let key_pem = b64(secret["data"]["tls.key"].as_str().unwrap());
    assert!(key_pem.contains("PRIVATE KEY"));
    for h in of_kind(&docs, "MutatingWebhookConfiguration")[0]["webhooks"]
        .as_array()
        .unwrap()
    {
        assert_eq!(b64(h["clientConfig"]["caBundle"].as_str().unwrap()), ca_pem);
    }
    let ca_der = &pem_certs(&ca_pem)[0];
    let crt_der = &pem_certs(&crt_pem)[0];
    let (_, ca) = x509_parser::parse_x509_certificate(ca_der).unwrap();
    let (_, crt) = x509_parser::parse_x509_certificate(crt_der).unwrap();
    assert!(ca.is_ca());
    crt.verify_signature(Some(ca.public_key()))
        .expect("the serving certificate is signed by the caBundle's CA");
    let sans: Vec<String> = crt
        .subject_alternative_name()
        .unwrap()
        .unwrap()
        .value
        .general_names
        .iter()
        .map(|g| g.to_string())
        .collect();
    let want = format!("DNSName({svc}.{NAMESPACE}.svc)");
    assert!(sans.contains(&want), "{want} not in {sans:?}");

    // cert-manager: no Secret from Helm; the CA injector fills caBundle.
    let docs = Render::default()
        .set("webhook.tls.mode=cert-manager")
        .docs();
    let hook = of_kind(&docs, "MutatingWebhookConfiguration")[0];
    assert!(hook["webhooks"][0]["clientConfig"]["caBundle"].is_null());
    assert_eq!(
        hook["metadata"]["annotations"]["cert-manager.io/inject-ca-from"],
        format!("{NAMESPACE}/{secret_name}")
    );
    assert!(of_kind(&docs, "Secret").is_empty());
}

/// A change of the injector's config changes the checksum on its pods (so
/// they roll); the identity service, which hot-reloads its files, is not
/// touched by it.
#[test]
fn config_changes_roll_the_injector() {
    let a = Render::default().docs();
    let b = Render::default().set("proxy.logLevel=debug").docs();
    let sum = |d: &[Value]| {
        checks::injector_deployment(d)["spec"]["template"]["metadata"]["annotations"]
            ["checksum/config"]
            .clone()
    };
    assert_ne!(sum(&a), sum(&b));
    let identity = |d: &[Value]| {
        of_kind(d, "Deployment")
            .into_iter()
            .find(|x| x["spec"]["template"]["spec"]["containers"][0]["name"] == "ca")
            .unwrap()
            .clone()
    };
    assert_eq!(identity(&a), identity(&b));
}

/// Values kept from a release that had no `proxy.workerThreads` (`helm
/// upgrade --reuse-values`) render a config without the key, which the
/// injector reads with its default instead of refusing a null.
#[test]
fn a_missing_worker_threads_value_leaves_the_injector_default() {
    let set = Render::default().set("proxy.workerThreads=3").docs();
    let cfg =
        portcullis::inject::InjectorConfig::parse(&checks::injector_config_text(&set)).unwrap();
    assert_eq!(cfg.proxy.worker_threads, 3);
    let unset = Render::default().set("proxy.workerThreads=null").docs();
    let text = checks::injector_config_text(&unset);
    assert!(!text.contains("workerThreads"), "{text}");
    let cfg = portcullis::inject::InjectorConfig::parse(&text).unwrap();
    assert_eq!(cfg.proxy.worker_threads, 1);
}

/// PodMonitor and ServiceMonitor only when the cluster has the monitoring
/// API (`--api-versions`), or when forced; never when disabled.
#[test]
fn monitors_render_only_with_the_monitoring_api_or_forced() {
    let monitors = |r: Render| {
        let docs = r.docs();
        let mut kinds: Vec<String> = docs
            .iter()
            .filter(|d| d["apiVersion"] == "monitoring.coreos.com/v1")
            .map(|d| kind(d).to_string())
            .collect();
        kinds.sort();
        kinds
    };
    let both = vec!["PodMonitor".to_string(), "ServiceMonitor".to_string()];
    assert!(monitors(Render::default()).is_empty());
    assert_eq!(
        monitors(Render::default().api("monitoring.coreos.com/v1")),
        both
    );
    assert_eq!(
        monitors(Render::default().set("monitoring.force=true")),
        both
    );
    assert!(monitors(
        Render::default()
            .api("monitoring.coreos.com/v1")
            .set("monitoring.enabled=false")
    )
    .is_empty());
}

/// The example app is valid on every version, its rules pass `portcullis
/// rules check` and decide as documented; when this build has `portcullis
/// inject`, the injected example validates too, with the chart's config.
#[test]
fn example_app_validates_and_its_rules_check() {
    let dir = root().join("deploy/example");
    let mut all = Vec::new();
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    for f in &files {
        all.extend(docs(&std::fs::read_to_string(f).unwrap()));
    }
    assert_eq!(kind(&all[0]), "Namespace");
    assert_eq!(
        all[0]["metadata"]["labels"]["portcullis.io/inject"],
        "enabled"
    );
    assert_eq!(of_kind(&all, "Deployment").len(), 2);
    assert_eq!(of_kind(&all, "Service").len(), 2);
    for kube in KUBE_VERSIONS {
        validate(&all, kube, "deploy/example");
    }

    let bin = env!("CARGO_BIN_EXE_portcullis");
    let rules = find(&all, "ConfigMap", "portcullis-rules");
    let tmp = tempfile::tempdir().unwrap();
    for (file, body) in rules["data"].as_object().unwrap() {
        std::fs::write(tmp.path().join(file), body.as_str().unwrap()).unwrap();
    }
    let out = run(Command::new(bin).arg("rules").arg("check").arg(tmp.path()));
    assert!(
        out.status.success(),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    let explain = |path: &str| {
        let out = run(Command::new(bin).args([
            "rules",
            "explain",
            "--rules",
            tmp.path().to_str().unwrap(),
            "--from",
            "spiffe://cluster.local/ns/portcullis-example/sa/frontend",
            "--port",
            "8080",
            "--method",
            "GET",
            "--path",
            path,
        ]));
        text(&out.stdout)
    };
    assert!(
        explain("/api/hello").contains("decision: allow"),
        "{}",
        explain("/api/hello")
    );
    assert!(
        explain("/admin/").contains("decision: deny"),
        "{}",
        explain("/admin/")
    );

    // The injector lives on another branch until the merge: use it when the
    // binary has it.
    let has_inject = run(Command::new(bin).args(["inject", "--help"]))
        .status
        .success();
    if !has_inject {
        eprintln!(
            "skipped: this build has no `portcullis inject`; the injected example is not checked"
        );
        return;
    }
    let chart_docs = Render::default()
        .file(chart().join("ci/issuer-values.yaml"))
        .docs();
    let cfg = of_kind(&chart_docs, "ConfigMap")
        .into_iter()
        .find_map(|c| c["data"]["config.yaml"].as_str())
        .unwrap();
    std::fs::write(tmp.path().join("injector.yaml"), cfg).unwrap();
    let mut input = String::new();
    for f in &files {
        input.push_str("---\n");
        input.push_str(&std::fs::read_to_string(f).unwrap());
    }
    std::fs::write(tmp.path().join("example.yaml"), input).unwrap();
    let out = run(Command::new(bin)
        .arg("inject")
        .arg("-f")
        .arg(tmp.path().join("example.yaml"))
        .arg("--config")
        .arg(tmp.path().join("injector.yaml")));
    assert!(out.status.success(), "{}", text(&out.stderr));
    let injected = docs(&text(&out.stdout));
    for kube in KUBE_VERSIONS {
        validate(&injected, kube, "injected deploy/example");
    }
    for d in of_kind(&injected, "Deployment") {
        let init = &d["spec"]["template"]["spec"]["initContainers"];
        assert_eq!(init[0]["name"], "portcullis-init", "{}", name(d));
        assert_eq!(init[1]["name"], "portcullis-proxy", "{}", name(d));
        // Peer sidecars' tunnels: declared on the proxy, never redirected.
        let tunnel =
            serde_json::json!({"name": "tunnel", "containerPort": 15008, "protocol": "TCP"});
        assert!(
            init[1]["ports"].as_array().unwrap().contains(&tunnel),
            "{}: {}",
            name(d),
            init[1]["ports"]
        );
        let excluded = init[0]["env"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["name"] == "PORTCULLIS_EXCLUDE_INBOUND_PORTS")
            .and_then(|e| e["value"].as_str())
            .unwrap_or_default();
        assert!(
            excluded.starts_with("15008,15020"),
            "{}: {excluded:?}",
            name(d)
        );
    }
}

/// The plain-Prometheus scrape config keeps the portcullis-proxy
/// container's admin port with the pod role (which lists init containers,
/// so native sidecars are scraped too). Debian's promtool is built without
/// Kubernetes discovery, so the structure is checked here instead.
#[test]
fn prometheus_scrape_config_keeps_the_proxy_admin_port() {
    let text =
        std::fs::read_to_string(root().join("deploy/prometheus/scrape-config.yaml")).unwrap();
    let cfg = &docs(&text)[0];
    let jobs = cfg["scrape_configs"].as_array().unwrap();
    let proxies = jobs
        .iter()
        .find(|j| j["job_name"] == "portcullis-proxies")
        .unwrap();
    assert_eq!(proxies["kubernetes_sd_configs"][0]["role"], "pod");
    assert_eq!(proxies["metrics_path"], "/metrics");
    let keep = proxies["relabel_configs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["action"] == "keep")
        .unwrap();
    assert_eq!(
        keep["source_labels"],
        serde_json::json!([
            "__meta_kubernetes_pod_container_name",
            "__meta_kubernetes_pod_container_port_number"
        ])
    );
    assert_eq!(keep["regex"], "portcullis-proxy;15020");
    // No rule filters init containers (native sidecars) out.
    for r in proxies["relabel_configs"].as_array().unwrap() {
        assert!(
            !r.to_string()
                .contains("__meta_kubernetes_pod_container_init"),
            "{r}"
        );
    }
    assert!(jobs
        .iter()
        .any(|j| j["job_name"] == "portcullis-control-plane"));
}

/// NOTES.txt renders for every ci values file (Helm renders it only on a
/// real install, so a copy of the chart renders it through `tpl` in a
/// ConfigMap) and warns when the issuer or the bundle is missing.
#[test]
fn notes_render_for_every_ci_values_file() {
    let tmp = tempfile::tempdir().unwrap();
    let copy = tmp.path().join("portcullis");
    let out = run(Command::new("cp").arg("-r").arg(chart()).arg(&copy));
    assert!(out.status.success());
    std::fs::copy(copy.join("templates/NOTES.txt"), copy.join("notes.txt")).unwrap();
    std::fs::write(
        copy.join("templates/notes-test.yaml"),
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: notes}\ndata:\n  notes: |\n    {{- tpl (.Files.Get \"notes.txt\") . | nindent 4 }}\n",
    )
    .unwrap();
    for file in ci_values() {
        let base = file.file_name().unwrap().to_string_lossy().into_owned();
        let out = run(Command::new(helm())
            .args(["template", RELEASE])
            .arg(&copy)
            .args(["--namespace", NAMESPACE, "--kube-version", KUBE_VERSIONS[0]])
            .args(["--show-only", "templates/notes-test.yaml", "-f"])
            .arg(&file));
        assert!(out.status.success(), "{base}: {}", text(&out.stderr));
        let notes = docs(&text(&out.stdout))[0]["data"]["notes"]
            .as_str()
            .unwrap()
            .to_string();
        assert!(
            notes.contains("portcullis.io/inject=enabled"),
            "{base}:\n{notes}"
        );
        let values = std::fs::read_to_string(&file).unwrap();
        let has_issuer = values.contains("crtPEM: |") || values.contains("existingSecret:");
        assert_eq!(
            notes.contains("WARNING: no issuer"),
            !has_issuer,
            "{base}:\n{notes}"
        );
    }
}

/// Every flag the chart passes to `ca serve` and `webhook` exists in the
/// binary. Those subcommands come from other branches; until they are
/// merged, the missing one is skipped with a note.
#[test]
fn chart_flags_exist_in_the_binary() {
    let bin = env!("CARGO_BIN_EXE_portcullis");
    let docs = Render::default().docs();
    for (component, sub) in [
        ("identity", &["ca", "serve"][..]),
        ("injector", &["webhook"][..]),
    ] {
        let dep = of_kind(&docs, "Deployment")
            .into_iter()
            .find(|d| {
                d["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"]
                    == component
            })
            .unwrap();
        let args = checks::args(dep);
        assert_eq!(&args[..sub.len()], sub);
        let help = run(Command::new(bin).args(sub).arg("--help"));
        if !help.status.success() {
            eprintln!(
                "skipped: this build has no `portcullis {}`; flags not checked: {:?}",
                sub.join(" "),
                &args[sub.len()..]
            );
            continue;
        }
        let help = text(&help.stdout);
        for a in &args[sub.len()..] {
            let flag = a.split('=').next().unwrap();
            assert!(
                help.contains(&format!("{flag} "))
                    || help.contains(&format!("{flag}="))
                    || help.contains(&format!("{flag}\n")),
                "`portcullis {}` has no {flag}:\n{help}",
                sub.join(" ")
            );
        }
    }
}

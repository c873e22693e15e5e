//! `portcullis install` and `portcullis ca bootstrap`, with the real tools:
//! the output passes `kubernetes-validate --strict`, equals a Helm render of
//! the chart given the same CA (so it stays in step with the chart), its
//! certificates chain, and an identity service started from its objects
//! signs a sidecar's CSR. The chart itself refuses to render without a
//! trust anchor, and `ca bootstrap`'s values make it render and lint clean;
//! the GitOps values docs/kubernetes.md gives render no private key.

#[allow(dead_code)]
#[path = "ca_serve/apiserver.rs"]
mod apiserver;
mod common;
#[allow(dead_code)]
#[path = "ca_serve/harness.rs"]
mod harness;
#[allow(dead_code)]
#[path = "helm/support.rs"]
mod support;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use serde_json::Value;
use support::*;
use x509_parser::prelude::*;

const BIN: &str = env!("CARGO_BIN_EXE_portcullis");

fn portcullis(args: &[&str]) -> std::process::Output {
    run(Command::new(BIN).args(args))
}

/// Runs `portcullis install ARGS`; returns its parsed documents and text.
fn install(args: &[&str]) -> (Vec<Value>, String) {
    let mut argv = vec!["install"];
    argv.extend_from_slice(args);
    let out = portcullis(&argv);
    assert!(out.status.success(), "install: {}", text(&out.stderr));
    let yaml = text(&out.stdout);
    (docs(&yaml), yaml)
}

/// The issuer Secret's tls.crt and tls.key and the bundle ConfigMap's
/// bundle.pem, checking there is exactly one of each.
fn ca_objects(docs: &[Value]) -> (String, String, String) {
    let secrets: Vec<_> = of_kind(docs, "Secret")
        .into_iter()
        .filter(|s| name(s).ends_with("-ca-issuer"))
        .collect();
    assert_eq!(secrets.len(), 1, "one issuer Secret");
    let s = secrets[0];
    assert_eq!(name(s), "portcullis-ca-issuer");
    assert_eq!(s["type"], "kubernetes.io/tls");
    let bundles: Vec<_> = of_kind(docs, "ConfigMap")
        .into_iter()
        .filter(|c| c["data"]["bundle.pem"].is_string())
        .collect();
    assert_eq!(bundles.len(), 1, "one bundle ConfigMap");
    assert_eq!(name(bundles[0]), "portcullis-trust-bundle");
    (
        b64(s["data"]["tls.crt"].as_str().unwrap()),
        b64(s["data"]["tls.key"].as_str().unwrap()),
        bundles[0]["data"]["bundle.pem"]
            .as_str()
            .unwrap()
            .to_string(),
    )
}

/// The issuer chain is [intermediate, root], the bundle [root]: the root is
/// self-signed, the intermediate signed by it, a CA that signs leaves only,
/// both for `td`.
fn check_chain(crt: &str, bundle: &str, td: &str) {
    let chain = pem_certs(crt);
    let roots = pem_certs(bundle);
    assert_eq!((chain.len(), roots.len()), (2, 1));
    assert_eq!(chain[1], roots[0], "the chain ends in the bundle's root");
    let (_, inter) = parse_x509_certificate(&chain[0]).unwrap();
    let (_, root) = parse_x509_certificate(&roots[0]).unwrap();
    root.verify_signature(None)
        .expect("the root is self-signed");
    inter
        .verify_signature(Some(root.public_key()))
        .expect("the intermediate is signed by the root");
    assert_eq!(inter.issuer(), root.subject());
    assert!(root.is_ca() && inter.is_ca());
    let bc = inter.basic_constraints().unwrap().unwrap().value;
    assert_eq!(bc.path_len_constraint, Some(0));
    let want = format!("spiffe://{td}");
    for c in [&inter, &root] {
        let san = c.subject_alternative_name().unwrap().unwrap();
        assert!(
            san.value
                .general_names
                .iter()
                .any(|g| matches!(g, GeneralName::URI(u) if *u == want)),
            "{want} in {}",
            c.subject()
        );
    }
}

fn injector_config(docs: &[Value]) -> (Value, String) {
    let cm = find(docs, "ConfigMap", "portcullis-injector-config");
    let text = cm["data"]["config.yaml"].as_str().unwrap().to_string();
    (serde_norway::from_str(&text).unwrap(), text)
}

/// The default install validates on 1.29 and 1.33, carries one issuer and
/// one bundle that chain, gives the injector that bundle (with a matching
/// config checksum), and never prints the trust anchor's key, which
/// `--trust-anchor-key-out` writes with mode 0600.
#[test]
fn install_validates_and_carries_a_chaining_issuer_and_bundle() {
    let dir = tempfile::tempdir().unwrap();
    let key_out = dir.path().join("anchor.key");
    let cert_out = dir.path().join("anchor.crt");
    let (docs, yaml) = install(&[
        "--trust-anchor-key-out",
        key_out.to_str().unwrap(),
        "--trust-anchor-cert-out",
        cert_out.to_str().unwrap(),
    ]);
    for kube in ["1.29.0", "1.33.0"] {
        validate(&docs, kube, "portcullis install");
    }
    assert_eq!(kind(&docs[0]), "Namespace");
    assert_eq!(name(&docs[0]), "portcullis");
    // The only Secret: the webhook's certificate comes from cert-manager.
    assert_eq!(of_kind(&docs, "Secret").len(), 1);
    let (crt, key, bundle) = ca_objects(&docs);
    check_chain(&crt, &bundle, "cluster.local");
    assert!(key.contains("PRIVATE KEY"));
    assert_eq!(std::fs::read_to_string(&cert_out).unwrap(), bundle);

    // The anchor's key: written 0600, printed nowhere.
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(&key_out).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    let anchor_key = std::fs::read_to_string(&key_out).unwrap();
    assert!(anchor_key.contains("PRIVATE KEY") && anchor_key != key);
    let body: String = anchor_key
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .collect();
    assert!(
        !yaml.contains(&body[..40]),
        "the anchor key is in the output"
    );
    assert!(!yaml.contains(&base64_of(&anchor_key)));
    // The anchor key matches the anchor certificate.
    let roots = pem_certs(&bundle);
    let (_, root) = parse_x509_certificate(&roots[0]).unwrap();
    let anchor = rcgen::KeyPair::from_pem(&anchor_key).unwrap();
    assert_eq!(root.public_key().raw, anchor.public_key_der().as_slice());

    let (cfg, cfg_text) = injector_config(&docs);
    assert_eq!(cfg["trustBundle"].as_str().unwrap(), bundle);
    let dep = docs
        .iter()
        .find(|d| d["spec"]["template"]["metadata"]["annotations"]["checksum/config"].is_string())
        .unwrap();
    assert_eq!(
        dep["spec"]["template"]["metadata"]["annotations"]["checksum/config"],
        sha256_hex(&cfg_text)
    );
}

fn base64_of(s: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(s)
}

/// With another namespace and trust domain, `install` prints what Helm
/// renders from the chart with the same values and CA (deploy/portcullis.yaml
/// is embedded, so a chart change without `make manifests` fails here too).
#[test]
fn install_equals_a_helm_render_with_the_same_ca() {
    let (ns, td) = ("mesh-system", "example.org");
    // A bare address is written as the /32 the chart's schema wants.
    let (docs, _) = install(&[
        "--namespace",
        ns,
        "--trust-domain",
        td,
        "--mesh-cidrs",
        "10.244.0.0/16,fd00:10:244::/56",
        "--mesh-cidrs",
        "10.96.0.10",
    ]);
    let (crt, key, bundle) = ca_objects(&docs);
    check_chain(&crt, &bundle, td);
    let dir = tempfile::tempdir().unwrap();
    let file = |n: &str, body: &str| {
        let p = dir.path().join(n);
        std::fs::write(&p, body).unwrap();
        p
    };
    let (crt_f, key_f, bundle_f) = (
        file("tls.crt", &crt),
        file("tls.key", &key),
        file("bundle.pem", &bundle),
    );
    let out = run(Command::new(helm())
        .args(["template", RELEASE])
        .arg(chart())
        .args(["--namespace", ns, "--kube-version", "1.29.0"])
        .args(["--set", "webhook.tls.mode=cert-manager"])
        .args(["--set", &format!("trustDomain={td}")])
        .args([
            "--set",
            "proxy.meshCidrs={10.244.0.0/16,fd00:10:244::/56,10.96.0.10/32}",
        ])
        .arg("--set-file")
        .arg(format!("identity.issuer.crtPEM={}", crt_f.display()))
        .arg("--set-file")
        .arg(format!("identity.issuer.keyPEM={}", key_f.display()))
        .arg("--set-file")
        .arg(format!("identity.trustBundlePEM={}", bundle_f.display())));
    assert!(out.status.success(), "{}", text(&out.stderr));
    let helm_docs = support::docs(&text(&out.stdout));

    // The injector config compared as data, its checksum as its hash.
    let normalize = |docs: &[Value]| -> BTreeMap<String, Value> {
        docs.iter()
            .filter(|d| kind(d) != "Namespace")
            .map(|d| {
                let mut d = d.clone();
                if let Some(text) = d["data"]["config.yaml"].as_str() {
                    let parsed: Value = serde_norway::from_str(text).unwrap();
                    d["data"]["config.yaml"] = parsed;
                }
                if let Some(sum) =
                    d.pointer_mut("/spec/template/metadata/annotations/checksum~1config")
                {
                    assert_eq!(sum.as_str().unwrap().len(), 64);
                    *sum = Value::String("<checked>".into());
                }
                let key = format!(
                    "{} {}/{}",
                    kind(&d),
                    d["metadata"]["namespace"].as_str().unwrap_or(""),
                    name(&d)
                );
                (key, d)
            })
            .collect()
    };
    let ours = normalize(&docs);
    let theirs = normalize(&helm_docs);
    assert_eq!(
        ours.keys().collect::<Vec<_>>(),
        theirs.keys().collect::<Vec<_>>()
    );
    for (k, v) in &theirs {
        assert_eq!(&ours[k], v, "{k} differs from the Helm render");
    }
    assert_eq!(name(&docs[0]), ns);
    let (cfg, _) = injector_config(&docs);
    assert_eq!(cfg["trustDomain"], td);
    assert_eq!(
        cfg["caUrl"],
        format!("https://portcullis-ca.{ns}.svc:15012").as_str()
    );
    assert_eq!(
        cfg["proxy"]["meshCidrs"],
        serde_json::json!(["10.244.0.0/16", "fd00:10:244::/56", "10.96.0.10/32"])
    );
}

/// Without `--mesh-cidrs` the output is the same valid install with an
/// empty list, and one warning line on stderr says what that breaks and
/// how to set it; with them there is no warning.
#[test]
fn install_warns_once_without_mesh_cidrs() {
    let warning = "warning: no --mesh-cidrs";
    let out = portcullis(&["install"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let err = text(&out.stderr);
    let warnings: Vec<&str> = err.lines().filter(|l| l.contains(warning)).collect();
    assert_eq!(warnings.len(), 1, "{err}");
    for what in ["plain TCP", "refuse", "--mesh-cidrs 10.244.0.0/16"] {
        assert!(warnings[0].contains(what), "{what:?} not in {err}");
    }
    let docs = docs(&text(&out.stdout));
    validate(&docs, "1.33.0", "portcullis install without --mesh-cidrs");
    let (cfg, _) = injector_config(&docs);
    assert_eq!(cfg["proxy"]["meshCidrs"], serde_json::json!([]));

    let out = portcullis(&["install", "--mesh-cidrs", "10.244.0.0/16"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        !text(&out.stderr).contains(warning),
        "{}",
        text(&out.stderr)
    );
    let (cfg, _) = injector_config(&support::docs(&text(&out.stdout)));
    assert_eq!(
        cfg["proxy"]["meshCidrs"],
        serde_json::json!(["10.244.0.0/16"])
    );
}

/// A kept trust anchor signs the new issuer (and nothing is generated);
/// `ca bootstrap` values feed `install --values` to the same issuer; what
/// install cannot apply without Helm, or a mismatched pair, is refused.
#[test]
fn install_uses_a_given_anchor_or_bootstrap_values() {
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n).to_str().unwrap().to_string();
    let out = portcullis(&[
        "ca",
        "init",
        "--out",
        &p("root"),
        "--trust-domain",
        "corp.test",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let (docs, _) = install(&[
        "--trust-domain",
        "corp.test",
        "--trust-anchor-cert",
        &p("root/ca.crt"),
        "--trust-anchor-key",
        &p("root/ca.key"),
    ]);
    let (crt, _, bundle) = ca_objects(&docs);
    assert_eq!(bundle, std::fs::read_to_string(p("root/ca.crt")).unwrap());
    check_chain(&crt, &bundle, "corp.test");

    // The anchor is for corp.test, not cluster.local: refused.
    let out = portcullis(&[
        "install",
        "--trust-anchor-cert",
        &p("root/ca.crt"),
        "--trust-anchor-key",
        &p("root/ca.key"),
    ]);
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("not trust domain cluster.local"));
    // Nothing generated, nothing to write.
    let out = portcullis(&[
        "install",
        "--trust-anchor-cert",
        &p("root/ca.crt"),
        "--trust-anchor-key",
        &p("root/ca.key"),
        "--trust-anchor-key-out",
        &p("x.key"),
    ]);
    assert!(!out.status.success() && out.stdout.is_empty());

    let out = portcullis(&[
        "ca",
        "bootstrap",
        "--values-out",
        &p("values.yaml"),
        "--trust-domain",
        "corp.test",
        "--trust-anchor-cert",
        &p("root/ca.crt"),
        "--trust-anchor-key",
        &p("root/ca.key"),
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let values: Value =
        serde_norway::from_str(&std::fs::read_to_string(p("values.yaml")).unwrap()).unwrap();
    let (docs, _) = install(&["--values", &p("values.yaml")]);
    let (crt, key, bundle) = ca_objects(&docs);
    assert_eq!(
        crt,
        values["identity"]["issuer"]["crtPEM"].as_str().unwrap()
    );
    assert_eq!(
        key,
        values["identity"]["issuer"]["keyPEM"].as_str().unwrap()
    );
    assert_eq!(
        bundle,
        values["identity"]["trustBundlePEM"].as_str().unwrap()
    );
    assert_eq!(injector_config(&docs).0["trustDomain"], "corp.test");

    let mut extra = std::fs::read_to_string(p("values.yaml")).unwrap();
    extra.push_str("proxy:\n  logLevel: debug\n");
    std::fs::write(p("extra.yaml"), extra).unwrap();
    let out = portcullis(&["install", "--values", &p("extra.yaml")]);
    assert!(!out.status.success() && out.stdout.is_empty());
    assert!(text(&out.stderr).contains("proxy"), "{}", text(&out.stderr));
}

/// An identity service started from the install's Secret and ConfigMap
/// contents (as the chart mounts them) signs a sidecar's CSR, and the leaf
/// chains to the bundle.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_service_from_install_objects_signs_a_csr() {
    let td = "example.org";
    let (docs, _) = install(&["--namespace", "default", "--trust-domain", td]);
    let (crt, key, bundle) = ca_objects(&docs);
    let dir = tempfile::tempdir().unwrap();
    let issuer = dir.path().join("issuer");
    let trust = dir.path().join("trust");
    std::fs::create_dir_all(&issuer).unwrap();
    std::fs::create_dir_all(&trust).unwrap();
    std::fs::write(issuer.join("tls.crt"), &crt).unwrap();
    std::fs::write(issuer.join("tls.key"), &key).unwrap();
    std::fs::write(trust.join("bundle.pem"), &bundle).unwrap();

    // The Deployment's own flags, with local files, addresses and API.
    let dep = find(&docs, "Deployment", "portcullis-ca");
    let flags: Vec<String> = dep["spec"]["template"]["spec"]["containers"][0]["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().to_string())
        .collect();
    assert!(flags.contains(&format!("--trust-domain={td}")), "{flags:?}");
    let api = apiserver::FakeApi::start(harness::CA_TOKEN).await;
    api.add_token(
        "client-token",
        apiserver::TokenInfo::bound("default", "client"),
    );
    let kube_ca = dir.path().join("kube-ca.crt");
    std::fs::write(&kube_ca, &api.ca_pem).unwrap();
    let kube_token = dir.path().join("kube-token");
    std::fs::write(&kube_token, harness::CA_TOKEN).unwrap();
    let local = |f: &str| {
        f.replace("/var/run/portcullis/issuer", issuer.to_str().unwrap())
            .replace("/var/run/portcullis/trust", trust.to_str().unwrap())
    };
    let mut args: Vec<String> = flags[2..]
        .iter()
        .filter(|f| !f.starts_with("--listen=") && !f.starts_with("--admin-listen="))
        .map(|f| local(f))
        .collect();
    args.extend([
        "--listen=127.0.0.1:0".to_string(),
        "--admin-listen=127.0.0.1:0".into(),
        format!("--kube-api-url={}", api.url()),
        format!("--kube-ca-file={}", kube_ca.display()),
        format!("--kube-token-file={}", kube_token.display()),
    ]);
    let service = harness::Service::start(&args).await;
    let mut client = harness::Client::connect(service.addr, Some(bundle.as_bytes())).await;
    let id = format!("spiffe://{td}/ns/default/sa/client");
    let (leaf_key, body) = harness::body_for(&id);
    let answer = client.certify(Some("client-token"), &body).await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    let chain = answer.chain();
    let roots =
        portcullis::identity::parse_cert_chain(Path::new("bundle"), bundle.as_bytes()).unwrap();
    assert!(portcullis::identity::chains_to(&chain, &roots));
    let (_, leaf) = X509Certificate::from_der(&chain[0]).unwrap();
    assert_eq!(leaf.public_key().raw, leaf_key.public_key_der().as_slice());
    service.stop().await;
}

/// `ca bootstrap` values make the chart render (issuer Secret and bundle
/// ConfigMap included, valid on 1.29 and 1.33) and lint clean with real
/// Helm; the values file is 0600 and refuses to be overwritten.
#[test]
fn bootstrap_values_render_and_lint_with_helm() {
    let dir = tempfile::tempdir().unwrap();
    let values = dir.path().join("values.yaml");
    let out = portcullis(&["ca", "bootstrap", "--values-out", values.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    // The hint names the values file and the mesh CIDRs, which Helm takes.
    let hint = text(&out.stdout);
    assert!(hint.contains("-f "), "{hint}");
    let set = hint
        .split("--set '")
        .nth(1)
        .and_then(|rest| rest.split('\'').next())
        .unwrap_or_else(|| panic!("no --set in the hint: {hint}"));
    assert!(set.starts_with("proxy.meshCidrs={"), "{hint}");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&values).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    let again = portcullis(&["ca", "bootstrap", "--values-out", values.to_str().unwrap()]);
    assert!(!again.status.success());

    let r = Render::bare().file(&values).set(set);
    r.lint()
        .unwrap_or_else(|e| panic!("helm lint --strict: {e}"));
    let docs = r.docs();
    let (cfg, _) = injector_config(&docs);
    assert_eq!(
        cfg["proxy"]["meshCidrs"],
        serde_json::json!(["10.244.0.0/16", "10.96.0.0/12"])
    );
    let (crt, _, bundle) = ca_objects(&docs);
    check_chain(&crt, &bundle, "cluster.local");
    for kube in ["1.29.0", "1.33.0"] {
        validate(&docs, kube, "bootstrap values");
    }
}

/// Without an issuer and a bundle the chart refuses to render, saying how
/// to make them; half of them is not enough.
#[test]
fn chart_refuses_to_render_without_a_trust_anchor() {
    let fix = "portcullis ca bootstrap --values-out values.yaml";
    let bundle = "identity.trustBundlePEM=-----BEGIN CERTIFICATE-----";
    for r in [
        Render::bare(),
        Render::bare().set("identity.issuer.existingSecret=mine"),
        Render::bare().set(bundle),
    ] {
        let err = r.template().expect_err("rendered without a trust anchor");
        assert!(err.contains(fix), "{err}");
        // `helm lint` reports a template's `fail` as INFO by design, so the
        // bare chart still lints (as chart repositories require).
        r.lint().expect("helm lint --strict of the bare chart");
    }
    Render::bare()
        .set("identity.issuer.existingSecret=mine")
        .set(bundle)
        .template()
        .expect("an existing Secret and a bundle are enough");
}

/// docs/kubernetes.md's GitOps advice: a render from `ca bootstrap` values
/// with the default webhook TLS holds two private keys (the issuer's and a
/// webhook key made at render time); with `identity.issuer.existingSecret`
/// and cert-manager webhook TLS it holds none, and still validates.
#[test]
fn gitops_values_render_no_private_key() {
    let dir = tempfile::tempdir().unwrap();
    let values = dir.path().join("values.yaml");
    let out = portcullis(&["ca", "bootstrap", "--values-out", values.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let keys = |docs: &[Value]| -> Vec<String> {
        of_kind(docs, "Secret")
            .into_iter()
            .filter(|s| s["data"]["tls.key"].is_string() || s["stringData"]["tls.key"].is_string())
            .map(|s| name(s).to_string())
            .collect()
    };
    let docs = Render::bare().file(&values).docs();
    assert_eq!(
        keys(&docs),
        ["portcullis-ca-issuer", "portcullis-injector-tls"],
        "the default render's private keys"
    );

    let v: Value = serde_norway::from_str(&std::fs::read_to_string(&values).unwrap()).unwrap();
    let bundle = dir.path().join("bundle.pem");
    std::fs::write(&bundle, v["identity"]["trustBundlePEM"].as_str().unwrap()).unwrap();
    let docs = Render::bare()
        .set("identity.issuer.existingSecret=portcullis-ca-issuer")
        .set_file("identity.trustBundlePEM", &bundle)
        .set("webhook.tls.mode=cert-manager")
        .docs();
    assert_eq!(keys(&docs), Vec::<String>::new());
    assert!(of_kind(&docs, "Secret").is_empty());
    validate(&docs, "1.33.0", "GitOps values");
}

//! The install manifest: deploy/portcullis.yaml (the chart rendered with its
//! defaults, embedded at build time) edited as parsed YAML, never as text:
//! every place the chart writes the release namespace or the trust domain is
//! set by its path, the injector's config gets the trust bundle (and its
//! checksum annotation follows), and the issuer Secret and the trust-bundle
//! ConfigMap are added under the names the identity Deployment mounts.
//! tests/install.rs compares the result with a real Helm render.

use serde_norway::{Mapping, Value};

use super::{CaMaterial, Error};

/// The chart render `install` starts from.
pub const BASE: &str = include_str!("../../deploy/portcullis.yaml");
/// The namespace the embedded render was made for.
pub const BASE_NAMESPACE: &str = "portcullis";
/// The trust domain of the embedded render (the chart's default).
pub const BASE_TRUST_DOMAIN: &str = "cluster.local";

/// The complete manifest set for `namespace`, with `ca`'s issuer and
/// bundle, and `mesh_cidrs` (checked networks) in the injector's config.
pub fn render(namespace: &str, ca: &CaMaterial, mesh_cidrs: &[String]) -> Result<String, Error> {
    check_namespace(namespace)?;
    let mut docs = parse(BASE)?;
    let td = ca.trust_domain.as_str();
    let mut config_sum = None;
    for doc in docs.iter_mut() {
        retarget(doc, namespace, td);
        if let Some(text) = injector_config(doc, namespace, td, &ca.bundle_pem, mesh_cidrs)? {
            config_sum = Some(sha256_hex(&text));
        }
    }
    let sum = config_sum.ok_or_else(|| Error::Manifest("has no injector config".into()))?;
    let mut summed = 0;
    for doc in docs.iter_mut() {
        if let Some(slot) = get_mut(doc, &["spec", "template", "metadata", "annotations"])
            .and_then(|a| a.get_mut("checksum/config"))
        {
            *slot = sum.clone().into();
            summed += 1;
        }
    }
    if summed != 1 {
        return Err(Error::Manifest(format!(
            "has {summed} pods with a config checksum, expected 1"
        )));
    }
    let (secret, bundle) = ca_objects(&docs, namespace, ca)?;
    // After the Namespace, before anything that mounts them.
    let at = docs
        .iter()
        .position(|d| kind(d) != "Namespace")
        .unwrap_or(docs.len());
    docs.insert(at, bundle);
    docs.insert(at, secret);

    let mut out = format!(
        "# portcullis: made by `portcullis install` for namespace {namespace}, trust domain {td}.\n\
         # It holds the identity service's issuer key (the Secret below): keep it secret.\n\
         # Needs cert-manager (the webhook's serving certificate). Apply:\n\
         #   kubectl apply -f <this file>\n"
    );
    for d in &docs {
        out.push_str("---\n");
        out.push_str(&serde_norway::to_string(d)?);
    }
    Ok(out)
}

/// The documents of a multi-document YAML text (empty ones dropped).
pub fn parse(text: &str) -> Result<Vec<Value>, Error> {
    use serde::Deserialize;
    let mut docs = Vec::new();
    for de in serde_norway::Deserializer::from_str(text) {
        let v = Value::deserialize(de)?;
        if !v.is_null() {
            docs.push(v);
        }
    }
    Ok(docs)
}

/// A namespace name is a DNS label (RFC 1123).
fn check_namespace(ns: &str) -> Result<(), Error> {
    let ok = !ns.is_empty()
        && ns.len() <= 63
        && ns
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !ns.starts_with('-')
        && !ns.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(Error::Usage(format!(
            "--namespace {ns:?}: use at most 63 lowercase letters, digits and '-', starting and ending with a letter or digit"
        )))
    }
}

fn kind(d: &Value) -> &str {
    d["kind"].as_str().unwrap_or("")
}

fn get_mut<'a>(v: &'a mut Value, path: &[&str]) -> Option<&'a mut Value> {
    path.iter().try_fold(v, |v, k| v.get_mut(*k))
}

fn each_mut(v: Option<&mut Value>) -> impl Iterator<Item = &mut Value> {
    v.and_then(Value::as_sequence_mut)
        .into_iter()
        .flat_map(|s| s.iter_mut())
}

/// Sets `v` to `new` if it is the string `old`.
fn swap(v: Option<&mut Value>, old: &str, new: &str) {
    if let Some(v) = v {
        if v.as_str() == Some(old) {
            *v = new.into();
        }
    }
}

/// Every place of one object that names the release namespace or the
/// trust domain, by kind.
fn retarget(doc: &mut Value, ns: &str, td: &str) {
    if kind(doc) == "Namespace" {
        swap(get_mut(doc, &["metadata", "name"]), BASE_NAMESPACE, ns);
    }
    swap(get_mut(doc, &["metadata", "namespace"]), BASE_NAMESPACE, ns);
    match kind(doc) {
        "ClusterRoleBinding" | "RoleBinding" => {
            for s in each_mut(doc.get_mut("subjects")) {
                swap(s.get_mut("namespace"), BASE_NAMESPACE, ns);
            }
        }
        "Deployment" => {
            for c in each_mut(get_mut(doc, &["spec", "template", "spec", "containers"])) {
                for a in each_mut(c.get_mut("args")) {
                    let flag = |name: &str, old: &str, new: &str| {
                        (a.as_str() == Some(&format!("--{name}={old}")))
                            .then(|| format!("--{name}={new}"))
                    };
                    let new = flag("namespace", BASE_NAMESPACE, ns)
                        .or_else(|| flag("trust-domain", BASE_TRUST_DOMAIN, td));
                    if let Some(new) = new {
                        *a = new.into();
                    }
                }
            }
        }
        "Certificate" => {
            // <service>.<namespace>[.svc[.<cluster domain>]]
            let rename = |v: &mut Value| {
                if let Some(s) = v.as_str() {
                    let mut parts: Vec<&str> = s.split('.').collect();
                    if parts.len() >= 2 && parts[1] == BASE_NAMESPACE {
                        parts[1] = ns;
                        *v = parts.join(".").into();
                    }
                }
            };
            if let Some(cn) = get_mut(doc, &["spec", "commonName"]) {
                rename(cn);
            }
            for n in each_mut(get_mut(doc, &["spec", "dnsNames"])) {
                rename(n);
            }
        }
        "MutatingWebhookConfiguration" | "ValidatingWebhookConfiguration" => {
            if let Some(a) = get_mut(
                doc,
                &["metadata", "annotations", "cert-manager.io/inject-ca-from"],
            ) {
                if let Some((old, secret)) = a.as_str().and_then(|s| s.split_once('/')) {
                    if old == BASE_NAMESPACE {
                        *a = format!("{ns}/{secret}").into();
                    }
                }
            }
            for hook in each_mut(doc.get_mut("webhooks")) {
                swap(
                    get_mut(hook, &["clientConfig", "service", "namespace"]),
                    BASE_NAMESPACE,
                    ns,
                );
                let exprs = get_mut(hook, &["namespaceSelector", "matchExpressions"]);
                for e in each_mut(exprs) {
                    if e["key"].as_str() == Some("kubernetes.io/metadata.name") {
                        for v in each_mut(e.get_mut("values")) {
                            swap(Some(v), BASE_NAMESPACE, ns);
                        }
                    }
                }
            }
        }
        _ => {}
    }
}

/// Edits the injector's config file inside its ConfigMap (trust domain,
/// the identity service's URL, the excluded release namespace, the trust
/// bundle, the mesh CIDRs); returns the new file text, or None for other
/// objects.
fn injector_config(
    doc: &mut Value,
    ns: &str,
    td: &str,
    bundle: &str,
    mesh_cidrs: &[String],
) -> Result<Option<String>, Error> {
    if kind(doc) != "ConfigMap" {
        return Ok(None);
    }
    let Some(slot) = get_mut(doc, &["data", "config.yaml"]) else {
        return Ok(None);
    };
    let old = slot.as_str().unwrap_or_default().to_string();
    let mut cfg: Value = serde_norway::from_str(&old)?;
    let field = |cfg: &mut Value, k: &str| -> Result<(), Error> {
        cfg.get(k)
            .map(|_| ())
            .ok_or_else(|| Error::Manifest(format!("injector config has no {k}")))
    };
    for k in ["trustDomain", "caUrl", "excludedNamespaces", "trustBundle"] {
        field(&mut cfg, k)?;
    }
    cfg["trustDomain"] = td.into();
    let url = cfg["caUrl"].as_str().unwrap_or_default();
    let from = format!(".{BASE_NAMESPACE}.svc:");
    if !url.contains(&from) {
        return Err(Error::Manifest(format!(
            "injector caUrl {url:?} does not name namespace {BASE_NAMESPACE}"
        )));
    }
    cfg["caUrl"] = url.replacen(&from, &format!(".{ns}.svc:"), 1).into();
    for v in each_mut(cfg.get_mut("excludedNamespaces")) {
        swap(Some(v), BASE_NAMESPACE, ns);
    }
    cfg["trustBundle"] = bundle.into();
    let proxy = cfg
        .get_mut("proxy")
        .filter(|p| p.get("meshCidrs").is_some())
        .ok_or_else(|| Error::Manifest("injector config has no proxy.meshCidrs".into()))?;
    proxy["meshCidrs"] = Value::Sequence(mesh_cidrs.iter().map(|c| c.as_str().into()).collect());
    // The comment lines the chart puts on top, then the edited keys.
    let head: String = old
        .lines()
        .take_while(|l| l.starts_with('#'))
        .map(|l| format!("{l}\n"))
        .collect();
    let text = format!("{head}{}", serde_norway::to_string(&cfg)?);
    *slot = text.clone().into();
    Ok(Some(text))
}

/// The issuer Secret and the trust-bundle ConfigMap, named as the identity
/// Deployment's volumes name them and labelled like it.
fn ca_objects(docs: &[Value], ns: &str, ca: &CaMaterial) -> Result<(Value, Value), Error> {
    let identity = docs
        .iter()
        .find(|d| {
            kind(d) == "Deployment"
                && d["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"]
                    .as_str()
                    == Some("identity")
        })
        .ok_or_else(|| Error::Manifest("has no identity Deployment".into()))?;
    let volumes = identity["spec"]["template"]["spec"]["volumes"]
        .as_sequence()
        .cloned()
        .unwrap_or_default();
    let volume = |name: &str, source: &str, key: &str| -> Result<String, Error> {
        volumes
            .iter()
            .find(|v| v["name"].as_str() == Some(name))
            .and_then(|v| v[source][key].as_str())
            .map(str::to_string)
            .ok_or_else(|| {
                Error::Manifest(format!("identity Deployment has no {source} volume {name}"))
            })
    };
    let secret_name = volume("issuer", "secret", "secretName")?;
    let bundle_name = volume("trust", "configMap", "name")?;
    let labels = identity["metadata"]["labels"].clone();
    let meta = |name: String| {
        let mut m = Mapping::new();
        m.insert("name".into(), name.into());
        m.insert("namespace".into(), ns.into());
        m.insert("labels".into(), labels.clone());
        Value::Mapping(m)
    };
    let object = |kind: &str, name: String| {
        let mut m = Mapping::new();
        m.insert("apiVersion".into(), "v1".into());
        m.insert("kind".into(), kind.into());
        m.insert("metadata".into(), meta(name));
        m
    };
    let mut secret = object("Secret", secret_name);
    secret.insert("type".into(), "kubernetes.io/tls".into());
    let mut data = Mapping::new();
    data.insert("tls.crt".into(), b64(&ca.issuer_chain_pem).into());
    data.insert("tls.key".into(), b64(&ca.issuer_key_pem).into());
    secret.insert("data".into(), Value::Mapping(data));
    let mut bundle = object("ConfigMap", bundle_name);
    let mut data = Mapping::new();
    data.insert("bundle.pem".into(), ca.bundle_pem.clone().into());
    bundle.insert("data".into(), Value::Mapping(data));
    Ok((Value::Mapping(secret), Value::Mapping(bundle)))
}

fn b64(s: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(s.as_bytes())
}

fn sha256_hex(s: &str) -> String {
    ring::digest::digest(&ring::digest::SHA256, s.as_bytes())
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::TrustDomain;

    fn material(td: &str) -> CaMaterial {
        let args = super::super::AnchorArgs {
            trust_anchor_cert: None,
            trust_anchor_key: None,
            trust_anchor_key_out: None,
            trust_anchor_cert_out: None,
            anchor_ttl: std::time::Duration::from_secs(86400),
            issuer_ttl: std::time::Duration::from_secs(3600),
            force: false,
        };
        CaMaterial::new(&TrustDomain::new(td).unwrap(), &args).unwrap()
    }

    #[test]
    fn namespaces_must_be_dns_labels() {
        for bad in ["", "Mesh", "-mesh", "mesh-", "me_sh", &"a".repeat(64)] {
            assert!(check_namespace(bad).is_err(), "{bad:?}");
        }
        for good in ["mesh", "m", "mesh-system-2", &"a".repeat(63)] {
            assert!(check_namespace(good).is_ok(), "{good:?}");
        }
    }

    /// Every object lands in the new namespace, nothing names the old one
    /// or the old trust domain, and the private key of the anchor is not
    /// anywhere (it was never given to `render`).
    #[test]
    fn render_moves_everything_to_the_namespace_and_trust_domain() {
        let ca = material("example.org");
        let text = render("mesh", &ca, &[]).unwrap();
        let docs = parse(&text).unwrap();
        assert_eq!(kind(&docs[0]), "Namespace");
        assert_eq!(docs[0]["metadata"]["name"].as_str(), Some("mesh"));
        for d in &docs {
            if let Some(ns) = d["metadata"]["namespace"].as_str() {
                assert_eq!(ns, "mesh", "{d:?}");
            }
        }
        for stale in [
            ".portcullis.svc",
            "--namespace=portcullis",
            "inject-ca-from: portcullis/",
            "\"portcullis\"]",
        ] {
            assert!(!text.contains(stale), "{stale} left in the output");
        }
        assert!(!text.contains("cluster.local\"") && !text.contains("=cluster.local"));
        assert!(text.contains("--trust-domain=example.org"));
        assert!(!text.contains(ca.anchor_key_pem().unwrap().lines().nth(1).unwrap()));
        assert!(render("Not A Namespace", &ca, &[]).is_err());
    }
}

//! What the Kubernetes schema does not check about an injected pod: the
//! containers' order and names, the native/fallback layout, the volumes and
//! mounts, the security contexts, and the rewritten probes.

use std::collections::BTreeSet;

use serde_json::Value;

fn names(list: &Value) -> Vec<String> {
    list.as_array()
        .into_iter()
        .flatten()
        .map(|c| c["name"].as_str().unwrap().to_string())
        .collect()
}

fn env<'a>(c: &'a Value, name: &str) -> Option<&'a Value> {
    c["env"].as_array()?.iter().find(|e| e["name"] == name)
}

/// Checks an injected pod against the original; panics naming `case`.
pub fn injected_pod(case: &str, before: &Value, after: &Value, bundle: &str) {
    let (b, a) = (&before["spec"], &after["spec"]);
    let inits = names(&a["initContainers"]);
    let apps = names(&a["containers"]);
    let all: Vec<&String> = inits.iter().chain(&apps).collect();
    let unique: BTreeSet<&String> = all.iter().copied().collect();
    assert_eq!(
        unique.len(),
        all.len(),
        "{case}: container names not unique: {all:?}"
    );
    // The schema does not check it, the API server does: port names are
    // IANA service names, at most 15 characters.
    for c in a["initContainers"]
        .as_array()
        .into_iter()
        .chain(a["containers"].as_array())
        .flatten()
    {
        for port in c["ports"].as_array().into_iter().flatten() {
            let name = port["name"].as_str().unwrap_or_default();
            assert!(
                name.len() <= 15,
                "{case}: port name {name:?} is longer than 15 characters"
            );
        }
    }
    let user_inits = names(&b["initContainers"]);
    let user_apps = names(&b["containers"]);
    let native = inits.get(1).map(String::as_str) == Some("portcullis-proxy");
    let proxy = if native {
        assert_eq!(inits[0], "portcullis-init", "{case}");
        assert_eq!(
            inits[2..],
            user_inits[..],
            "{case}: user init containers keep their order, after ours"
        );
        assert_eq!(apps, user_apps, "{case}");
        let p = &a["initContainers"][1];
        assert_eq!(
            p["restartPolicy"], "Always",
            "{case}: native sidecar restartPolicy"
        );
        assert_eq!(
            p["startupProbe"]["httpGet"]["path"], "/ready",
            "{case}: startupProbe"
        );
        assert!(p.get("lifecycle").is_none(), "{case}");
        p
    } else {
        assert_eq!(
            inits.last().map(String::as_str),
            Some("portcullis-init"),
            "{case}: init last"
        );
        assert_eq!(inits[..inits.len() - 1], user_inits[..], "{case}");
        assert_eq!(apps[0], "portcullis-proxy", "{case}: proxy first");
        assert_eq!(apps[1..], user_apps[..], "{case}");
        let p = &a["containers"][0];
        assert!(p.get("restartPolicy").is_none(), "{case}");
        assert!(p.get("startupProbe").is_none(), "{case}");
        let await_off =
            before["metadata"]["annotations"]["config.portcullis.io/proxy-await"] == "false";
        if await_off {
            assert!(p.get("lifecycle").is_none(), "{case}");
        } else {
            assert_eq!(
                p["lifecycle"]["postStart"]["exec"]["command"],
                serde_json::json!(["/usr/local/bin/portcullis", "await", "--timeout", "120s"]),
                "{case}"
            );
        }
        p
    };
    // `/shutdown` is on only where the app needs it: a Job pod whose proxy
    // is an ordinary container (the fallback layout).
    let job = before["metadata"]["ownerReferences"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|o| o["kind"] == "Job");
    let want = if !native && job { "true" } else { "false" };
    assert_eq!(
        env(proxy, "PORTCULLIS_ALLOW_SHUTDOWN").map(|e| &e["value"]),
        Some(&Value::from(want)),
        "{case}: PORTCULLIS_ALLOW_SHUTDOWN"
    );
    // The tunnel port: declared on the proxy, and never redirected by the
    // init container (it leads the exclusions, before the pod's own).
    assert!(
        proxy["ports"].as_array().into_iter().flatten().any(|p| *p
            == serde_json::json!({"name": "tunnel", "containerPort": 15008, "protocol": "TCP"})),
        "{case}: proxy ports {}",
        proxy["ports"]
    );
    assert_eq!(
        proxy["readinessProbe"]["httpGet"]["path"], "/ready",
        "{case}"
    );
    assert_eq!(proxy["livenessProbe"]["httpGet"]["path"], "/live", "{case}");
    let sc = &proxy["securityContext"];
    assert_eq!(sc["runAsUser"], 1500, "{case}");
    assert_eq!(sc["runAsGroup"], 1500, "{case}");
    assert_eq!(sc["runAsNonRoot"], true, "{case}");
    assert_eq!(sc["allowPrivilegeEscalation"], false, "{case}");
    assert_eq!(sc["readOnlyRootFilesystem"], true, "{case}");
    assert_eq!(
        sc["capabilities"],
        serde_json::json!({"drop": ["ALL"]}),
        "{case}"
    );
    let init = a["initContainers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "portcullis-init")
        .unwrap();
    let excluded = env(init, "PORTCULLIS_EXCLUDE_INBOUND_PORTS")
        .and_then(|e| e["value"].as_str())
        .unwrap_or_default();
    assert!(
        excluded == "15008,15020" || excluded.starts_with("15008,15020,"),
        "{case}: init's inbound exclusions {excluded:?}"
    );
    let isc = &init["securityContext"];
    assert_eq!(isc["runAsUser"], 0, "{case}");
    assert_eq!(isc["readOnlyRootFilesystem"], true, "{case}");
    assert_eq!(
        isc["capabilities"]["add"],
        serde_json::json!(["NET_ADMIN", "NET_RAW"]),
        "{case}"
    );
    assert_eq!(
        isc["capabilities"]["drop"],
        serde_json::json!(["ALL"]),
        "{case}"
    );
    assert_eq!(
        env(proxy, "PORTCULLIS_SERVICE_ACCOUNT").unwrap()["valueFrom"]["fieldRef"]["fieldPath"],
        "spec.serviceAccountName",
        "{case}"
    );
    assert_eq!(
        env(proxy, "PORTCULLIS_NAMESPACE").unwrap()["valueFrom"]["fieldRef"]["fieldPath"],
        "metadata.namespace",
        "{case}"
    );

    // Volumes: unique, every mount resolves, ours without subPath.
    let vols = names(&a["volumes"]);
    let vset: BTreeSet<&String> = vols.iter().collect();
    assert_eq!(vset.len(), vols.len(), "{case}: volume names not unique");
    for c in a["initContainers"]
        .as_array()
        .into_iter()
        .chain(a["containers"].as_array())
        .flatten()
    {
        for m in c["volumeMounts"].as_array().into_iter().flatten() {
            let n = m["name"].as_str().unwrap();
            assert!(
                vset.contains(&n.to_string()),
                "{case}: mount {n} has no volume"
            );
            if n.starts_with("portcullis-") {
                assert!(
                    m.get("subPath").is_none(),
                    "{case}: {n} mounted with subPath"
                );
            }
        }
    }
    let vol = |n: &str| {
        a["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == n)
            .unwrap()
            .clone()
    };
    let token = &vol("portcullis-token")["projected"]["sources"][0]["serviceAccountToken"];
    assert_eq!(token["audience"], "portcullis-ca", "{case}");
    assert_eq!(token["expirationSeconds"], 3600, "{case}");
    assert_eq!(
        vol("portcullis-rules")["configMap"]["optional"],
        true,
        "{case}"
    );
    assert_eq!(
        after["metadata"]["annotations"]["portcullis.io/trust-bundle"], bundle,
        "{case}"
    );

    // Probes: rewritten to the admin port, originals in the env var.
    let rewrite =
        before["metadata"]["annotations"]["config.portcullis.io/rewrite-app-probes"] != "false";
    let originals: Value = env(proxy, "PORTCULLIS_APP_PROBES")
        .map(|e| serde_json::from_str(e["value"].as_str().unwrap()).unwrap())
        .unwrap_or(Value::Null);
    for (i, c) in b["containers"].as_array().unwrap().iter().enumerate() {
        let name = c["name"].as_str().unwrap();
        let now = a["containers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["name"] == name)
            .unwrap();
        for (field, kind) in [
            ("livenessProbe", "livez"),
            ("readinessProbe", "readyz"),
            ("startupProbe", "startupz"),
        ] {
            let Some(old) = c.get(field) else { continue };
            let new = &now[field];
            let handled = old
                .get("httpGet")
                .or(old.get("tcpSocket"))
                .or(old.get("grpc"));
            let resolvable = handled.is_some_and(|h| {
                h["port"].is_u64()
                    || c["ports"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .any(|p| p["name"] == h["port"])
            });
            if rewrite && resolvable {
                assert_eq!(
                    new["httpGet"]["path"],
                    format!("/app-health/{name}/{kind}"),
                    "{case}: {name} {field}"
                );
                assert_eq!(new["httpGet"]["port"], 15020, "{case}");
                assert!(
                    new.get("tcpSocket").is_none() && new.get("grpc").is_none(),
                    "{case}"
                );
                for t in ["periodSeconds", "timeoutSeconds", "failureThreshold"] {
                    assert_eq!(new.get(t), old.get(t), "{case}: {name} {field} {t} kept");
                }
                assert!(
                    originals[name][kind].is_object(),
                    "{case}: original {name}/{kind} missing"
                );
            } else {
                assert_eq!(new, old, "{case}: container {i} {field} must be unchanged");
            }
        }
    }
}

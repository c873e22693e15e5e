//! The objects the injector adds to a pod: the `portcullis-init` and
//! `portcullis-proxy` containers and their volumes. Plain JSON builders over
//! the resolved [`PodSettings`]; where each goes is `inject.rs`'s job.

use serde_json::{json, Map, Value};

use super::config::InjectorConfig;
use super::settings::PodSettings;

pub const INIT_NAME: &str = "portcullis-init";
pub const PROXY_NAME: &str = "portcullis-proxy";
/// The binary's path in the image (the postStart hook and `command` use it).
pub const BINARY: &str = "/usr/local/bin/portcullis";
pub const ADMIN_PORT: u16 = 15020;
/// Where peer sidecars open their mTLS tunnels (pooled HTTP/2 `CONNECT`):
/// declared on the proxy container and never redirected by `init`.
pub const TUNNEL_PORT: u16 = 15008;
pub const TOKEN_VOLUME: &str = "portcullis-token";
pub const TRUST_VOLUME: &str = "portcullis-trust";
pub const RULES_VOLUME: &str = "portcullis-rules";
pub const INIT_RUN_VOLUME: &str = "portcullis-init-run";
pub const TOKEN_DIR: &str = "/var/run/secrets/portcullis/token";
pub const TRUST_DIR: &str = "/var/run/portcullis/trust";
pub const RULES_DIR: &str = crate::config::DEFAULT_RULES_DIR;
/// The pod annotation holding the trust bundle, read by the Downward API volume.
pub const TRUST_ANNOTATION: &str = "portcullis.io/trust-bundle";
/// The pod annotation marking a pod as injected.
pub const STATUS_ANNOTATION: &str = "portcullis.io/status";

fn env(name: &str, value: &str) -> Value {
    json!({"name": name, "value": value})
}

fn field_env(name: &str, field: &str) -> Value {
    json!({"name": name, "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": field}}})
}

fn resources(cpu_req: &str, cpu_lim: &str, mem_req: &str, mem_lim: &str) -> Value {
    let pick = |cpu: &str, memory: &str| -> Map<String, Value> {
        [("cpu", cpu), ("memory", memory)]
            .into_iter()
            .filter(|(_, v)| !v.is_empty())
            .map(|(k, v)| (k.to_string(), json!(v)))
            .collect()
    };
    let requests = pick(cpu_req, mem_req);
    let limits = pick(cpu_lim, mem_lim);
    let mut out = Map::new();
    if !requests.is_empty() {
        out.insert("requests".into(), Value::Object(requests));
    }
    if !limits.is_empty() {
        out.insert("limits".into(), Value::Object(limits));
    }
    Value::Object(out)
}

/// `portcullis-init`: installs the interception rules. Root, because
/// netfilter needs it, but with only NET_ADMIN and NET_RAW and a read-only
/// root filesystem; `/run` is a small emptyDir for the xtables lock file.
/// The tunnel and admin ports always lead the inbound exclusions (the list
/// replaces `init`'s default, so leaving them out would redirect them).
pub fn init_container(cfg: &InjectorConfig, s: &PodSettings) -> Value {
    let inbound = if s.skip_inbound_ports.is_empty() {
        format!("{TUNNEL_PORT},{ADMIN_PORT}")
    } else {
        format!("{TUNNEL_PORT},{ADMIN_PORT},{}", s.skip_inbound_ports)
    };
    let mut envs = vec![
        env("PORTCULLIS_PROXY_UID", &cfg.proxy.uid.to_string()),
        env("PORTCULLIS_PROXY_GID", &cfg.proxy.gid.to_string()),
        env("PORTCULLIS_EXCLUDE_INBOUND_PORTS", &inbound),
    ];
    if !s.skip_outbound_ports.is_empty() {
        envs.push(env(
            "PORTCULLIS_EXCLUDE_OUTBOUND_PORTS",
            &s.skip_outbound_ports,
        ));
    }
    if !s.skip_subnets.is_empty() {
        envs.push(env("PORTCULLIS_EXCLUDE_OUTBOUND_CIDRS", &s.skip_subnets));
    }
    let r = &cfg.init.resources;
    json!({
        "name": INIT_NAME,
        "image": s.image,
        "imagePullPolicy": cfg.image_pull_policy,
        "command": [BINARY],
        "args": ["init"],
        "env": envs,
        "resources": resources(&r.cpu_request, &r.cpu_limit, &r.memory_request, &r.memory_limit),
        "securityContext": {
            "runAsUser": 0,
            "runAsGroup": 0,
            "runAsNonRoot": false,
            "privileged": false,
            "allowPrivilegeEscalation": false,
            "readOnlyRootFilesystem": true,
            "capabilities": {"drop": ["ALL"], "add": ["NET_ADMIN", "NET_RAW"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "volumeMounts": [{"name": INIT_RUN_VOLUME, "mountPath": "/run"}],
        "terminationMessagePolicy": "FallbackToLogsOnError",
    })
}

/// `portcullis-proxy`: the sidecar. Every setting is a `PORTCULLIS_*` env
/// var; the namespace, service account and pod IP come from the Downward API
/// (an empty service account is read as `default` by the sidecar).
/// `shutdown_endpoint`: a Job pod in the fallback layout, whose app must
/// `POST /shutdown` to let the pod complete; every other pod has it off.
pub fn proxy_container(
    cfg: &InjectorConfig,
    s: &PodSettings,
    native: bool,
    app_probes: Option<String>,
    shutdown_endpoint: bool,
) -> Value {
    let mut envs = vec![
        env("PORTCULLIS_TRUST_DOMAIN", &cfg.trust_domain),
        field_env("PORTCULLIS_NAMESPACE", "metadata.namespace"),
        field_env("PORTCULLIS_SERVICE_ACCOUNT", "spec.serviceAccountName"),
        field_env("PORTCULLIS_POD_IP", "status.podIP"),
        env("PORTCULLIS_CA_URL", &cfg.ca_url),
        env("PORTCULLIS_CA_TOKEN_FILE", &format!("{TOKEN_DIR}/token")),
        env(
            "PORTCULLIS_TRUST_BUNDLE",
            &format!("{TRUST_DIR}/bundle.pem"),
        ),
        env("PORTCULLIS_CERT_TTL", &cfg.proxy.cert_ttl),
        env("PORTCULLIS_ADMIN_LISTEN", &format!("0.0.0.0:{ADMIN_PORT}")),
        env("PORTCULLIS_INBOUND_MODE", &s.inbound_mode),
        env("PORTCULLIS_DEFAULT_POLICY", &s.default_inbound_policy),
        env("PORTCULLIS_LOG_LEVEL", &s.log_level),
        env("PORTCULLIS_LOG_FORMAT", &s.log_format),
        env("PORTCULLIS_WORKER_THREADS", &s.worker_threads.to_string()),
        env("PORTCULLIS_ALLOW_SHUTDOWN", &shutdown_endpoint.to_string()),
    ];
    if !cfg.proxy.mesh_cidrs.is_empty() {
        envs.push(env(
            "PORTCULLIS_MESH_CIDRS",
            &cfg.proxy.mesh_cidrs.join(","),
        ));
    }
    if let Some(p) = app_probes {
        envs.push(env(super::probes::ENV, &p));
    }
    let get = |path: &str| json!({"path": path, "port": ADMIN_PORT, "scheme": "HTTP"});
    let mut c = json!({
        "name": PROXY_NAME,
        "image": s.image,
        "imagePullPolicy": cfg.image_pull_policy,
        "command": [BINARY],
        "args": ["run"],
        "env": envs,
        "ports": [
            {"name": "proxy-admin", "containerPort": ADMIN_PORT, "protocol": "TCP"},
            {"name": "tunnel", "containerPort": TUNNEL_PORT, "protocol": "TCP"},
        ],
        "resources": resources(&s.cpu_request, &s.cpu_limit, &s.memory_request, &s.memory_limit),
        "securityContext": {
            "runAsUser": cfg.proxy.uid,
            "runAsGroup": cfg.proxy.gid,
            "runAsNonRoot": true,
            "privileged": false,
            "allowPrivilegeEscalation": false,
            "readOnlyRootFilesystem": true,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "readinessProbe": {"httpGet": get("/ready"), "periodSeconds": 5, "timeoutSeconds": 1, "failureThreshold": 3},
        "livenessProbe": {"httpGet": get("/live"), "periodSeconds": 10, "timeoutSeconds": 1, "failureThreshold": 3},
        "volumeMounts": [
            {"name": TOKEN_VOLUME, "mountPath": TOKEN_DIR, "readOnly": true},
            {"name": TRUST_VOLUME, "mountPath": TRUST_DIR, "readOnly": true},
            {"name": RULES_VOLUME, "mountPath": RULES_DIR, "readOnly": true},
        ],
        "terminationMessagePolicy": "FallbackToLogsOnError",
    });
    let obj = c.as_object_mut().expect("an object");
    if native {
        obj.insert("restartPolicy".into(), json!("Always"));
        obj.insert(
            "startupProbe".into(),
            json!({"httpGet": get("/ready"), "periodSeconds": 1, "timeoutSeconds": 1, "failureThreshold": 120}),
        );
    } else if s.proxy_await {
        obj.insert(
            "lifecycle".into(),
            json!({"postStart": {"exec": {"command": [BINARY, "await", "--timeout", "120s"]}}}),
        );
    }
    c
}

/// The volumes, none mounted with `subPath`, so updates reach the pod: the
/// projected token for the identity service, the trust bundle from the
/// pod's own annotation, the rules ConfigMap (optional: a pod starts without
/// it), and the init container's `/run`.
pub fn volumes(cfg: &InjectorConfig, s: &PodSettings) -> Vec<Value> {
    vec![
        json!({"name": TOKEN_VOLUME, "projected": {"sources": [{"serviceAccountToken": {
            "audience": cfg.ca_audience, "expirationSeconds": 3600, "path": "token"}}]}}),
        json!({"name": TRUST_VOLUME, "downwardAPI": {"items": [{"path": "bundle.pem",
            "fieldRef": {"apiVersion": "v1", "fieldPath": format!("metadata.annotations['{TRUST_ANNOTATION}']")}}]}}),
        json!({"name": RULES_VOLUME, "configMap": {"name": s.rules_config_map, "optional": true}}),
        json!({"name": INIT_RUN_VOLUME, "emptyDir": {"medium": "Memory", "sizeLimit": "1Mi"}}),
    ]
}

//! Probe rewriting, the injector's half: the app's HTTP, TCP and gRPC probes
//! become `GET :15020/app-health/<container>/<livez|readyz|startupz>` on the
//! sidecar's admin port (never intercepted), and the originals travel to the
//! sidecar in the `PORTCULLIS_APP_PROBES` env var. The kubelet's own probes
//! would otherwise arrive as plaintext from outside the mesh and be refused
//! by strict mTLS or a default-deny rule set. The sidecar's half is in
//! `admin/app_health.rs`.
//!
//! Exec probes run inside the app container and are left alone. Named ports
//! are resolved here from the container's ports, because the sidecar cannot
//! see another container's port names.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

/// Env var of the proxy container holding the original probes (JSON:
/// container → kind → probe).
pub const ENV: &str = "PORTCULLIS_APP_PROBES";

/// The admin port the rewritten probes call.
pub const ADMIN_PORT: u16 = 15020;

/// The probe fields of a container and the kind each one becomes.
pub const KINDS: [(&str, &str); 3] = [
    ("livenessProbe", "livez"),
    ("readinessProbe", "readyz"),
    ("startupProbe", "startupz"),
];

/// One original probe, as the sidecar runs it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AppProbe {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_get: Option<HttpGet>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp_socket: Option<TcpSocket>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grpc: Option<Grpc>,
    /// The kubelet's default is 1 s.
    #[serde(default = "one")]
    pub timeout_seconds: u64,
}

fn one() -> u64 {
    1
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpGet {
    pub port: u16,
    #[serde(default = "slash")]
    pub path: String,
    /// `HTTP` or `HTTPS` (certificates are not verified, as by the kubelet).
    #[serde(default = "http")]
    pub scheme: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub http_headers: Vec<Header>,
}

fn slash() -> String {
    "/".into()
}

fn http() -> String {
    "HTTP".into()
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Header {
    pub name: String,
    pub value: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TcpSocket {
    pub port: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Grpc {
    pub port: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
}

/// container name → probe kind (`livez`…) → original probe.
pub type AppProbes = BTreeMap<String, BTreeMap<String, AppProbe>>;

/// The outcome of rewriting one probe.
#[derive(Debug, Clone, PartialEq)]
pub enum Rewrite {
    /// Replace the probe with this one and hand `original` to the sidecar.
    Replace { probe: Value, original: AppProbe },
    /// Leave it (exec probes, or a probe with no handler).
    Keep,
    /// Leave it, and tell the user why.
    Warn(String),
}

/// Rewrites one probe of `container` (its JSON), or says why not.
pub fn rewrite(container: &Value, name: &str, kind: &str, probe: &Value) -> Rewrite {
    let timeout_seconds = probe["timeoutSeconds"].as_u64().unwrap_or(1);
    let port = |h: &Value| resolve_port(container, &h["port"]);
    let host = |h: &Value| {
        h["host"]
            .as_str()
            .filter(|s| !s.is_empty())
            .map(String::from)
    };
    let original = if let Some(h) = probe.get("httpGet") {
        let Some(port) = port(h) else {
            return Warn::port(name, kind, &h["port"]);
        };
        let headers = h["httpHeaders"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|x| {
                Some(Header {
                    name: x["name"].as_str()?.into(),
                    value: x["value"].as_str().unwrap_or("").into(),
                })
            })
            .collect();
        AppProbe {
            http_get: Some(HttpGet {
                port,
                path: h["path"]
                    .as_str()
                    .filter(|p| !p.is_empty())
                    .unwrap_or("/")
                    .into(),
                scheme: h["scheme"].as_str().unwrap_or("HTTP").to_ascii_uppercase(),
                host: host(h),
                http_headers: headers,
            }),
            tcp_socket: None,
            grpc: None,
            timeout_seconds,
        }
    } else if let Some(t) = probe.get("tcpSocket") {
        let Some(port) = port(t) else {
            return Warn::port(name, kind, &t["port"]);
        };
        AppProbe {
            http_get: None,
            tcp_socket: Some(TcpSocket {
                port,
                host: host(t),
            }),
            grpc: None,
            timeout_seconds,
        }
    } else if let Some(g) = probe.get("grpc") {
        let Some(port) = port(g) else {
            return Warn::port(name, kind, &g["port"]);
        };
        AppProbe {
            http_get: None,
            tcp_socket: None,
            grpc: Some(Grpc {
                port,
                service: g["service"]
                    .as_str()
                    .filter(|s| !s.is_empty())
                    .map(String::from),
            }),
            timeout_seconds,
        }
    } else {
        return Rewrite::Keep;
    };
    let mut new = probe.clone();
    if let Some(obj) = new.as_object_mut() {
        obj.remove("httpGet");
        obj.remove("tcpSocket");
        obj.remove("grpc");
        obj.insert(
            "httpGet".into(),
            json!({"path": path(name, kind), "port": ADMIN_PORT, "scheme": "HTTP"}),
        );
    }
    Rewrite::Replace {
        probe: new,
        original,
    }
}

struct Warn;

impl Warn {
    fn port(name: &str, kind: &str, port: &Value) -> Rewrite {
        Rewrite::Warn(format!(
            "container {name}: {kind} probe port {port} is not a port of the container; probe left as is"
        ))
    }
}

/// The admin path a rewritten probe calls.
pub fn path(container: &str, kind: &str) -> String {
    format!("/app-health/{container}/{kind}")
}

/// A probe port: a number, or the name of one of the container's ports.
fn resolve_port(container: &Value, port: &Value) -> Option<u16> {
    if let Some(n) = port.as_u64() {
        return u16::try_from(n).ok().filter(|p| *p > 0);
    }
    let name = port.as_str()?;
    if let Ok(n) = name.parse::<u16>() {
        return Some(n).filter(|p| *p > 0);
    }
    container["ports"]
        .as_array()?
        .iter()
        .find(|p| p["name"].as_str() == Some(name))
        .and_then(|p| p["containerPort"].as_u64())
        .and_then(|n| u16::try_from(n).ok())
}

/// Whether a probe already points at our admin endpoint (so a re-injection
/// or a copied pod is recognised).
pub fn is_rewritten(probe: &Value) -> bool {
    probe["httpGet"]["path"]
        .as_str()
        .is_some_and(|p| p.starts_with("/app-health/"))
        && probe["httpGet"]["port"].as_u64() == Some(u64::from(ADMIN_PORT))
}

//! Per-pod settings: the config file's defaults, overridden by the pod's
//! `config.portcullis.io/*` annotations. A bad annotation value never
//! breaks the pod: it is ignored with a warning and the default applies
//! (an invalid quantity would otherwise make the API server refuse the pod).

use std::collections::BTreeMap;

use super::config::InjectorConfig;
use crate::runtime::MAX_WORKER_THREADS;

/// Prefix of every per-pod override annotation.
pub const PREFIX: &str = "config.portcullis.io/";

/// Every override annotation (without the prefix); anything else under the
/// prefix gets an "unknown annotation" warning, to catch typos.
pub const KNOWN: &[&str] = &[
    "native-sidecar",
    "proxy-await",
    "proxy-image",
    "proxy-cpu-request",
    "proxy-cpu-limit",
    "proxy-memory-request",
    "proxy-memory-limit",
    "proxy-worker-threads",
    "log-level",
    "log-format",
    "skip-inbound-ports",
    "skip-outbound-ports",
    "skip-subnets",
    "inbound-mode",
    "default-inbound-policy",
    "rules-configmap",
    "rewrite-app-probes",
];

/// The effective settings for one pod.
#[derive(Debug, Clone, PartialEq)]
pub struct PodSettings {
    pub native_sidecar: bool,
    pub proxy_await: bool,
    pub image: String,
    pub cpu_request: String,
    pub cpu_limit: String,
    pub memory_request: String,
    pub memory_limit: String,
    pub worker_threads: u16,
    pub log_level: String,
    pub log_format: String,
    /// Comma-separated, as `portcullis init` takes them.
    pub skip_inbound_ports: String,
    pub skip_outbound_ports: String,
    pub skip_subnets: String,
    pub inbound_mode: String,
    pub default_inbound_policy: String,
    pub rules_config_map: String,
    pub rewrite_app_probes: bool,
}

/// Resolves the settings of a pod with these annotations; warnings say
/// which annotations were ignored and why.
pub fn resolve(
    cfg: &InjectorConfig,
    annotations: &BTreeMap<String, String>,
) -> (PodSettings, Vec<String>) {
    let mut warnings = Vec::new();
    let mut s = PodSettings {
        native_sidecar: cfg.native_sidecar,
        proxy_await: cfg.proxy_await,
        image: cfg.image.clone(),
        cpu_request: cfg.proxy.resources.cpu_request.clone(),
        cpu_limit: cfg.proxy.resources.cpu_limit.clone(),
        memory_request: cfg.proxy.resources.memory_request.clone(),
        memory_limit: cfg.proxy.resources.memory_limit.clone(),
        worker_threads: cfg.proxy.worker_threads,
        log_level: cfg.proxy.log_level.clone(),
        log_format: cfg.proxy.log_format.clone(),
        skip_inbound_ports: cfg.init.exclude_inbound_ports.join(","),
        skip_outbound_ports: cfg.init.exclude_outbound_ports.join(","),
        skip_subnets: cfg.init.exclude_outbound_cidrs.join(","),
        inbound_mode: cfg.proxy.inbound_mode.clone(),
        default_inbound_policy: cfg.proxy.default_inbound_policy.clone(),
        rules_config_map: cfg.proxy.rules_config_map.clone(),
        rewrite_app_probes: cfg.rewrite_app_probes,
    };
    for (key, value) in annotations {
        let Some(name) = key.strip_prefix(PREFIX) else {
            continue;
        };
        let v = value.trim();
        let checked = match name {
            "native-sidecar" => boolean(v).map(|b| s.native_sidecar = b),
            "proxy-await" => boolean(v).map(|b| s.proxy_await = b),
            "rewrite-app-probes" => boolean(v).map(|b| s.rewrite_app_probes = b),
            "proxy-image" => nonempty(v).map(|v| s.image = v),
            "proxy-cpu-request" => quantity(v).map(|v| s.cpu_request = v),
            "proxy-cpu-limit" => quantity(v).map(|v| s.cpu_limit = v),
            "proxy-memory-request" => quantity(v).map(|v| s.memory_request = v),
            "proxy-memory-limit" => quantity(v).map(|v| s.memory_limit = v),
            "proxy-worker-threads" => worker_threads(v).map(|n| s.worker_threads = n),
            "log-level" => log_level(v).map(|v| s.log_level = v),
            "log-format" => log_format(v).map(|v| s.log_format = v),
            "skip-inbound-ports" => {
                ports(v).map(|v| s.skip_inbound_ports = join(&s.skip_inbound_ports, &v))
            }
            "skip-outbound-ports" => {
                ports(v).map(|v| s.skip_outbound_ports = join(&s.skip_outbound_ports, &v))
            }
            "skip-subnets" => cidrs(v).map(|v| s.skip_subnets = join(&s.skip_subnets, &v)),
            "inbound-mode" => inbound_mode(v).map(|v| s.inbound_mode = v),
            "default-inbound-policy" => default_policy(v).map(|v| s.default_inbound_policy = v),
            "rules-configmap" => dns_name(v).map(|v| s.rules_config_map = v),
            _ => Err("unknown annotation, ignored".into()),
        };
        if let Err(why) = checked {
            warnings.push(format!(
                "annotation {key}={value:?}: {why}; using the default"
            ));
        }
    }
    (s, warnings)
}

fn join(base: &str, more: &str) -> String {
    match (base.is_empty(), more.is_empty()) {
        (_, true) => base.to_string(),
        (true, false) => more.to_string(),
        (false, false) => format!("{base},{more}"),
    }
}

fn nonempty(v: &str) -> Result<String, String> {
    if v.is_empty() || v.chars().any(char::is_whitespace) {
        return Err("must be one word".into());
    }
    Ok(v.to_string())
}

/// `true` or `false` (Kubernetes' usual spellings only).
pub fn boolean(v: &str) -> Result<bool, String> {
    match v {
        "true" | "True" | "TRUE" => Ok(true),
        "false" | "False" | "FALSE" => Ok(false),
        _ => Err("not true or false".into()),
    }
}

/// A Kubernetes resource quantity such as `100m`, `0.5`, `64Mi`, `1e3`.
pub fn quantity(v: &str) -> Result<String, String> {
    let bad = || Err(format!("{v:?} is not a quantity like 100m or 64Mi"));
    let num_end = v
        .char_indices()
        .find(|&(i, c)| !(c.is_ascii_digit() || c == '.' || (i == 0 && (c == '+' || c == '-'))))
        .map_or(v.len(), |(i, _)| i);
    let (num, suffix) = v.split_at(num_end);
    let digits = num.trim_start_matches(['+', '-']);
    let dots = digits.matches('.').count();
    if digits.is_empty() || digits == "." || dots > 1 || num.starts_with('-') {
        return bad();
    }
    let suffix_ok = matches!(
        suffix,
        "" | "m" | "k" | "M" | "G" | "T" | "P" | "E" | "Ki" | "Mi" | "Gi" | "Ti" | "Pi" | "Ei"
    ) || suffix
        .strip_prefix(['e', 'E'])
        .map(|e| e.trim_start_matches(['+', '-']))
        .is_some_and(|e| !e.is_empty() && e.chars().all(|c| c.is_ascii_digit()));
    if !suffix_ok {
        return bad();
    }
    Ok(v.to_string())
}

/// A `--worker-threads` value: 0 (one per CPU) up to [`MAX_WORKER_THREADS`].
pub fn worker_threads(v: &str) -> Result<u16, String> {
    match v.parse::<u16>().map(worker_threads_in_range) {
        Ok(Ok(n)) => Ok(n),
        _ => Err(format!("not a thread count from 0 to {MAX_WORKER_THREADS}")),
    }
}

/// `n` when `--worker-threads` takes it.
pub fn worker_threads_in_range(n: u16) -> Result<u16, String> {
    if n <= MAX_WORKER_THREADS {
        Ok(n)
    } else {
        Err(format!("at most {MAX_WORKER_THREADS}"))
    }
}

/// A tracing filter the sidecar will accept.
pub fn log_level(v: &str) -> Result<String, String> {
    if v.is_empty() {
        return Err("empty".into());
    }
    tracing_subscriber::EnvFilter::try_new(v)
        .map(|_| v.to_string())
        .map_err(|e| e.to_string())
}

pub fn log_format(v: &str) -> Result<String, String> {
    one_of(v, &["text", "json"])
}

pub fn inbound_mode(v: &str) -> Result<String, String> {
    one_of(v, &["strict", "permissive"])
}

pub fn default_policy(v: &str) -> Result<String, String> {
    one_of(v, &["allow", "authenticated", "deny"])
}

fn one_of(v: &str, allowed: &[&str]) -> Result<String, String> {
    if allowed.contains(&v) {
        Ok(v.to_string())
    } else {
        Err(format!("not one of {}", allowed.join(", ")))
    }
}

/// Ports and ranges, comma-separated, as `portcullis init` takes them.
pub fn ports(v: &str) -> Result<String, String> {
    list(v, |p| crate::intercept::PortRange::parse(p).map(|_| ()))
}

/// Networks, comma-separated, as `portcullis init` takes them.
pub fn cidrs(v: &str) -> Result<String, String> {
    list(v, |c| crate::intercept::Cidr::parse(c).map(|_| ()))
}

fn list(v: &str, check: impl Fn(&str) -> Result<(), String>) -> Result<String, String> {
    let items: Vec<&str> = v
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect();
    for item in &items {
        check(item).map_err(|e| format!("{item:?}: {e}"))?;
    }
    Ok(items.join(","))
}

/// A DNS-1123 subdomain, the form of a ConfigMap name.
pub fn dns_name(v: &str) -> Result<String, String> {
    let ok = !v.is_empty()
        && v.len() <= 253
        && v.split('.').all(|l| {
            !l.is_empty()
                && l.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        });
    if ok {
        Ok(v.to_string())
    } else {
        Err(format!("{v:?} is not a valid ConfigMap name"))
    }
}

//! The injector's configuration file: the defaults every injected pod gets
//! (image, resources, proxy settings, trust bundle, identity service), as
//! the Helm chart writes them into a ConfigMap. Without a file the built-in
//! defaults below apply, so `portcullis inject -f` works on a laptop.
//!
//! The format is YAML (or JSON), camelCase, and unknown keys are refused so a
//! typo in the chart fails the injector's start-up instead of being ignored.
//! docs/kubernetes.md documents every key.

use std::path::Path;

use serde::Deserialize;

use super::Error;
use crate::file_limits::{
    check_nesting, read_capped_string, scrub, CONFIG_FILE_MAX_BYTES, MAX_NESTING,
};

/// Built-in image when neither the file nor an annotation names one.
pub const DEFAULT_IMAGE: &str = "ghcr.io/portcullis/portcullis:0.1.0";

/// Everything the injector needs to know that is not in the pod.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct InjectorConfig {
    /// Image of both injected containers.
    pub image: String,
    pub image_pull_policy: String,
    /// Native sidecar (an init container with `restartPolicy: Always`,
    /// Kubernetes ≥ 1.29) or the fallback layout.
    pub native_sidecar: bool,
    /// Fallback layout: hold the app's start until the proxy is ready.
    pub proxy_await: bool,
    /// Rewrite the app's HTTP/TCP/gRPC probes to go through the sidecar.
    pub rewrite_app_probes: bool,
    pub trust_domain: String,
    /// PEM roots baked into each pod (annotation → Downward API file); the
    /// sidecar needs them to trust the identity service at start.
    pub trust_bundle: String,
    /// The identity service (`portcullis ca serve`).
    pub ca_url: String,
    /// Audience of the projected ServiceAccount token sent to the identity service.
    pub ca_audience: String,
    /// Namespaces never injected (the chart adds its release namespace).
    pub excluded_namespaces: Vec<String>,
    /// An internal error denies the pod instead of allowing it uninjected.
    pub deny_on_error: bool,
    pub proxy: ProxyConfig,
    pub init: InitConfig,
}

/// Settings of the `portcullis-proxy` container.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct ProxyConfig {
    pub uid: u32,
    pub gid: u32,
    pub resources: Resources,
    pub log_level: String,
    pub log_format: String,
    pub inbound_mode: String,
    pub default_inbound_policy: String,
    /// Networks whose pods have sidecars (pod and Service CIDRs): outbound
    /// connections there get mTLS; everything else passes through.
    pub mesh_cidrs: Vec<String>,
    /// ConfigMap of authorization rules, mounted optional.
    pub rules_config_map: String,
    pub cert_ttl: String,
    /// `--worker-threads` of every sidecar (0: one per CPU it may use).
    pub worker_threads: u16,
}

/// Settings of the `portcullis-init` container, and the exclusions every
/// pod gets before its own annotations add to them.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct InitConfig {
    pub resources: Resources,
    pub exclude_inbound_ports: Vec<String>,
    pub exclude_outbound_ports: Vec<String>,
    pub exclude_outbound_cidrs: Vec<String>,
}

/// Requests and limits as Kubernetes quantities; an empty string leaves
/// that one unset.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct Resources {
    pub cpu_request: String,
    pub cpu_limit: String,
    pub memory_request: String,
    pub memory_limit: String,
}

impl Default for InjectorConfig {
    fn default() -> Self {
        InjectorConfig {
            image: DEFAULT_IMAGE.into(),
            image_pull_policy: "IfNotPresent".into(),
            native_sidecar: true,
            proxy_await: true,
            rewrite_app_probes: true,
            trust_domain: "cluster.local".into(),
            trust_bundle: String::new(),
            ca_url: "https://portcullis-ca.portcullis.svc:15012".into(),
            ca_audience: "portcullis-ca".into(),
            excluded_namespaces: vec![
                "kube-system".into(),
                "kube-public".into(),
                "kube-node-lease".into(),
            ],
            deny_on_error: false,
            proxy: ProxyConfig::default(),
            init: InitConfig::default(),
        }
    }
}

impl Default for ProxyConfig {
    fn default() -> Self {
        ProxyConfig {
            uid: 1500,
            gid: 1500,
            resources: Resources {
                cpu_request: "50m".into(),
                cpu_limit: String::new(),
                memory_request: "32Mi".into(),
                memory_limit: "256Mi".into(),
            },
            log_level: "info".into(),
            log_format: "json".into(),
            inbound_mode: "strict".into(),
            default_inbound_policy: "authenticated".into(),
            mesh_cidrs: Vec::new(),
            rules_config_map: "portcullis-rules".into(),
            cert_ttl: "1h".into(),
            worker_threads: 1,
        }
    }
}

impl Default for InitConfig {
    fn default() -> Self {
        InitConfig {
            resources: Resources {
                cpu_request: "10m".into(),
                cpu_limit: "100m".into(),
                memory_request: "16Mi".into(),
                memory_limit: "64Mi".into(),
            },
            exclude_inbound_ports: Vec::new(),
            exclude_outbound_ports: Vec::new(),
            exclude_outbound_cidrs: Vec::new(),
        }
    }
}

impl InjectorConfig {
    /// Parses and checks a config file's text.
    pub fn parse(text: &str) -> Result<Self, Error> {
        let cfg: InjectorConfig = if text.trim().is_empty() {
            InjectorConfig::default()
        } else {
            // Refused before parsing when nested deeper than any real config or
            // holding YAML anchors or aliases (an alias bomb expands in the parser).
            check_nesting(text, false, MAX_NESTING).map_err(|e| {
                Error::Config(format!(
                    "line {} column {}: {}; refused before parsing",
                    e.line,
                    e.column,
                    e.reason(MAX_NESTING)
                ))
            })?;
            serde_norway::from_str(text).map_err(|e| Error::Config(scrub(&e.to_string())))?
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Reads a config file, or the built-in defaults when `path` is `None`.
    pub fn load(path: Option<&Path>) -> Result<Self, Error> {
        match path {
            None => Ok(InjectorConfig::default()),
            Some(p) => {
                let text = read_capped_string(p, CONFIG_FILE_MAX_BYTES)
                    .map_err(|e| Error::Config(e.to_string()))?;
                // `parse`'s errors already say "injector config: "; put the
                // file name after it instead of a second prefix.
                Self::parse(&text).map_err(|e| match e {
                    Error::Config(m) => Error::Config(format!("{}: {m}", p.display())),
                    other => other,
                })
            }
        }
    }

    /// Refuses values that would make every injected pod invalid, so a bad
    /// chart value stops the injector instead of breaking every pod.
    pub fn validate(&self) -> Result<(), Error> {
        use super::settings as s;
        let bad = |what: &str, why: String| Err(Error::Config(format!("{what}: {why}")));
        let at = |what: &'static str| move |why: String| Error::Config(format!("{what}: {why}"));
        if self.image.trim().is_empty() {
            return bad("image", "must not be empty".into());
        }
        if !["Always", "IfNotPresent", "Never"].contains(&self.image_pull_policy.as_str()) {
            return bad(
                "imagePullPolicy",
                format!(
                    "{:?} is not Always, IfNotPresent or Never",
                    self.image_pull_policy
                ),
            );
        }
        if self.proxy.uid == 0 || self.proxy.gid == 0 {
            return bad("proxy.uid/gid", "the proxy must not run as root".into());
        }
        for (what, r) in [
            ("proxy.resources", &self.proxy.resources),
            ("init.resources", &self.init.resources),
        ] {
            for q in [
                &r.cpu_request,
                &r.cpu_limit,
                &r.memory_request,
                &r.memory_limit,
            ] {
                if !q.is_empty() {
                    s::quantity(q).map_err(at(what))?;
                }
            }
        }
        s::log_format(&self.proxy.log_format).map_err(at("proxy.logFormat"))?;
        s::inbound_mode(&self.proxy.inbound_mode).map_err(at("proxy.inboundMode"))?;
        s::default_policy(&self.proxy.default_inbound_policy)
            .map_err(at("proxy.defaultInboundPolicy"))?;
        s::dns_name(&self.proxy.rules_config_map).map_err(at("proxy.rulesConfigMap"))?;
        s::worker_threads_in_range(self.proxy.worker_threads).map_err(at("proxy.workerThreads"))?;
        humantime::parse_duration(&self.proxy.cert_ttl)
            .map_err(|e| Error::Config(format!("proxy.certTtl: {e}")))?;
        s::cidrs(&self.proxy.mesh_cidrs.join(",")).map_err(at("proxy.meshCidrs"))?;
        s::ports(&self.init.exclude_inbound_ports.join(","))
            .map_err(at("init.excludeInboundPorts"))?;
        s::ports(&self.init.exclude_outbound_ports.join(","))
            .map_err(at("init.excludeOutboundPorts"))?;
        s::cidrs(&self.init.exclude_outbound_cidrs.join(","))
            .map_err(at("init.excludeOutboundCidrs"))?;
        Ok(())
    }
}

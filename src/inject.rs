//! Sidecar injection: one pure function from a pod (or a workload's pod
//! template) to an RFC 6902 patch that adds the `portcullis-init` and
//! `portcullis-proxy` containers, their volumes, and the rewritten probes.
//! No API calls: the admission webhook (`webhook`) and the offline
//! `portcullis inject -f` (`offline`) are two front doors to [`inject`], so
//! both give the same pod.
//!
//! Layout: [`config`] the injector's defaults file; [`settings`] per-pod
//! annotation overrides; [`build`] the added containers and volumes;
//! [`probes`] probe rewriting; [`patch`] the add-only JSON patch.

pub mod build;
pub mod config;
pub mod offline;
pub mod patch;
pub mod probes;
pub mod settings;
pub mod webhook;

#[cfg(test)]
mod tests;

use std::collections::BTreeMap;

use serde_json::Value;

pub use config::InjectorConfig;
pub use patch::Patch;

/// The opt-in label, on the namespace or the pod (the pod wins).
pub const INJECT_LABEL: &str = "portcullis.io/inject";
/// A namespace label that turns the webhook off for the whole namespace.
pub const WEBHOOKS_LABEL: &str = "portcullis.io/admission-webhooks";

/// The warning for a config without a trust bundle. It says how to fix it,
/// because the usual cause is `portcullis inject` run without the chart's
/// config (the built-in defaults cannot know the cluster's CA).
pub const NO_TRUST_BUNDLE: &str =
    "the injector has no trust bundle configured, so the sidecar will not start: \
give the chart's injector config (`portcullis inject --config FILE`, FILE being the `config.yaml` \
of the chart's injector ConfigMap; see docs/kubernetes.md)";

/// What can go wrong while injecting or serving.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("injector config: {0}")]
    Config(String),
    #[error("pod: {0}")]
    Pod(String),
    #[error("{0}")]
    Input(String),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("tls: {0}")]
    Tls(String),
}

/// One admission (or one offline document), as [`inject`] sees it.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    /// The object's kind (`Pod` for anything we inject).
    pub kind: &'a str,
    /// `CREATE`, `UPDATE`…
    pub operation: &'a str,
    /// Empty, or e.g. `ephemeralcontainers`.
    pub sub_resource: &'a str,
    pub namespace: &'a str,
    /// The namespace's labels, as far as they are known (the webhook knows
    /// only what its selector matched; offline, a Namespace document).
    pub namespace_labels: &'a BTreeMap<String, String>,
    /// The pod: `metadata` and `spec`.
    pub pod: &'a Value,
    /// The pod belongs to a Job even without an owner reference (a Job or
    /// CronJob template, offline).
    pub job: bool,
}

/// Why a pod was left alone; also the `reason` label of the metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Skip {
    NotPod,
    NotCreate,
    Subresource,
    ExcludedNamespace,
    WebhooksDisabled,
    NotEnabled,
    OptedOut,
    InvalidLabel,
    MirrorPod,
    HostNetwork,
    AlreadyInjected,
}

impl Skip {
    pub fn as_str(self) -> &'static str {
        match self {
            Skip::NotPod => "not_pod",
            Skip::NotCreate => "not_create",
            Skip::Subresource => "subresource",
            Skip::ExcludedNamespace => "excluded_namespace",
            Skip::WebhooksDisabled => "webhooks_disabled",
            Skip::NotEnabled => "not_enabled",
            Skip::OptedOut => "opted_out",
            Skip::InvalidLabel => "invalid_label",
            Skip::MirrorPod => "mirror_pod",
            Skip::HostNetwork => "host_network",
            Skip::AlreadyInjected => "already_injected",
        }
    }

    /// A user-facing sentence for `response.warnings` and logs.
    fn describe(self) -> &'static str {
        match self {
            Skip::NotPod => "not a Pod",
            Skip::NotCreate => "not a CREATE",
            Skip::Subresource => "a subresource request",
            Skip::ExcludedNamespace => "the namespace is excluded from injection",
            Skip::WebhooksDisabled => {
                "the namespace is labelled portcullis.io/admission-webhooks=disabled"
            }
            Skip::NotEnabled => "injection is not enabled for this pod or namespace",
            Skip::OptedOut => "injection is disabled by label",
            Skip::InvalidLabel => "invalid portcullis.io/inject value (use enabled or disabled)",
            Skip::MirrorPod => "a mirror (static) pod",
            Skip::HostNetwork => "the pod uses the host network",
            Skip::AlreadyInjected => "the pod already has portcullis",
        }
    }
}

/// The result: a patch (empty when skipped) and the warnings to show.
#[derive(Debug, Clone, PartialEq)]
pub struct Injection {
    pub patch: Patch,
    pub skipped: Option<Skip>,
    pub warnings: Vec<String>,
}

fn string_map(v: &Value) -> BTreeMap<String, String> {
    v.as_object()
        .into_iter()
        .flatten()
        .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
        .collect()
}

fn names(spec: &Value, field: &str) -> Vec<String> {
    spec[field]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|c| c["name"].as_str().map(String::from))
        .collect()
}

/// Decides whether to inject; `Err` is the reason not to, with an extra
/// warning when the user should hear why.
fn decide(req: &Request, cfg: &InjectorConfig) -> Result<(), (Skip, Option<String>)> {
    let skip = |s: Skip| Err((s, None));
    if req.kind != "Pod" {
        return skip(Skip::NotPod);
    }
    if !req.sub_resource.is_empty() {
        return skip(Skip::Subresource);
    }
    if req.operation != "CREATE" {
        return skip(Skip::NotCreate);
    }
    if cfg.excluded_namespaces.iter().any(|n| n == req.namespace) {
        return skip(Skip::ExcludedNamespace);
    }
    if req.namespace_labels.get(WEBHOOKS_LABEL).map(String::as_str) == Some("disabled") {
        return skip(Skip::WebhooksDisabled);
    }
    let meta = &req.pod["metadata"];
    let spec = &req.pod["spec"];
    let labels = string_map(&meta["labels"]);
    let annotations = string_map(&meta["annotations"]);
    // The pod's label wins over the namespace's.
    let (value, whose) = match (
        labels.get(INJECT_LABEL),
        req.namespace_labels.get(INJECT_LABEL),
    ) {
        (Some(v), _) => (Some(v), "pod"),
        (None, Some(v)) => (Some(v), "namespace"),
        (None, None) => (None, ""),
    };
    match value.map(String::as_str) {
        Some("enabled") => {}
        Some("disabled") => return skip(Skip::OptedOut),
        None => return skip(Skip::NotEnabled),
        Some(other) => {
            return Err((
                Skip::InvalidLabel,
                Some(format!(
                    "{whose} label {INJECT_LABEL}={other:?} is not enabled or disabled"
                )),
            ))
        }
    }
    if annotations.contains_key("kubernetes.io/config.mirror") {
        return skip(Skip::MirrorPod);
    }
    if spec["hostNetwork"].as_bool() == Some(true) {
        return skip(Skip::HostNetwork);
    }
    let ours = [build::INIT_NAME, build::PROXY_NAME];
    let has_ours = ["containers", "initContainers"]
        .iter()
        .flat_map(|f| names(spec, f))
        .any(|n| ours.contains(&n.as_str()));
    if has_ours || annotations.contains_key(build::STATUS_ANNOTATION) {
        return skip(Skip::AlreadyInjected);
    }
    Ok(())
}

/// Computes the patch that injects portcullis into `req.pod`.
///
/// Pure: the same request and config always give the same patch. A skipped
/// pod gets an empty patch and, for reasons worth telling the user, a
/// warning. `Err` means the pod object itself is malformed.
pub fn inject(req: &Request, cfg: &InjectorConfig) -> Result<Injection, Error> {
    if let Err((skip, warning)) = decide(req, cfg) {
        return Ok(Injection {
            patch: Patch::default(),
            skipped: Some(skip),
            warnings: vec![format!(
                "not injected: {}",
                warning.as_deref().unwrap_or(skip.describe())
            )],
        });
    }
    let pod = req.pod;
    if !pod["spec"]["containers"].is_array() {
        return Err(Error::Pod(
            "spec.containers is missing or not a list".into(),
        ));
    }
    for field in ["initContainers", "volumes"] {
        if !pod["spec"][field].is_null() && !pod["spec"][field].is_array() {
            return Err(Error::Pod(format!("spec.{field} is not a list")));
        }
    }
    let annotations = string_map(&pod["metadata"]["annotations"]);
    let (s, mut warnings) = settings::resolve(cfg, &annotations);
    warnings.extend(conflicts(pod, cfg));
    if cfg.trust_bundle_missing() {
        warnings.push(NO_TRUST_BUNDLE.into());
    }

    let mut b = patch::Builder::new(pod);
    // Probes first: their paths use the containers' current indexes.
    let mut originals = probes::AppProbes::new();
    if s.rewrite_app_probes {
        let containers = pod["spec"]["containers"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        for (i, c) in containers.iter().enumerate() {
            let name = c["name"].as_str().unwrap_or_default();
            for (field, kind) in probes::KINDS {
                let Some(probe) = c.get(field).filter(|p| p.is_object()) else {
                    continue;
                };
                match probes::rewrite(c, name, kind, probe) {
                    probes::Rewrite::Replace { probe, original } => {
                        let idx = i.to_string();
                        b.set(&["spec", "containers", &idx, field], probe);
                        originals
                            .entry(name.to_string())
                            .or_default()
                            .insert(kind.into(), original);
                    }
                    probes::Rewrite::Keep => {}
                    probes::Rewrite::Warn(w) => warnings.push(w),
                }
            }
        }
    }
    let app_probes = (!originals.is_empty())
        .then(|| serde_json::to_string(&originals).expect("probes serialize"));

    b.set(
        &["metadata", "annotations", build::STATUS_ANNOTATION],
        "injected".into(),
    );
    b.set(
        &["metadata", "annotations", build::TRUST_ANNOTATION],
        cfg.trust_bundle.clone().into(),
    );
    let native = s.native_sidecar;
    let job = req.job
        || pod["metadata"]["ownerReferences"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|o| o["kind"] == "Job");
    if !native && !annotations.contains_key("kubectl.kubernetes.io/default-container") {
        // The proxy goes first; keep `kubectl logs/exec` pointed at the app.
        if let Some(app) = pod["spec"]["containers"][0]["name"].as_str() {
            b.set(
                &[
                    "metadata",
                    "annotations",
                    "kubectl.kubernetes.io/default-container",
                ],
                app.into(),
            );
        }
    }
    if !native && job {
        warnings.push(
            "a Job pod with the fallback layout: the app must POST http://127.0.0.1:15020/shutdown when done, or the pod never completes".into(),
        );
    }
    for v in build::volumes(cfg, &s) {
        b.insert(&["spec", "volumes"], None, v);
    }
    let init = build::init_container(cfg, &s);
    let proxy = build::proxy_container(cfg, &s, native, app_probes, !native && job);
    if native {
        b.insert(&["spec", "initContainers"], Some(0), init);
        b.insert(&["spec", "initContainers"], Some(1), proxy);
    } else {
        b.insert(&["spec", "initContainers"], None, init);
        b.insert(&["spec", "containers"], Some(0), proxy);
    }
    Ok(Injection {
        patch: b.finish(),
        skipped: None,
        warnings,
    })
}

impl InjectorConfig {
    fn trust_bundle_missing(&self) -> bool {
        self.trust_bundle.trim().is_empty()
    }
}

/// Warnings for app containers that clash with the sidecar: running as the
/// proxy's UID (their traffic would bypass interception) or using its ports.
fn conflicts(pod: &Value, cfg: &InjectorConfig) -> Vec<String> {
    let spec = &pod["spec"];
    let pod_uid = spec["securityContext"]["runAsUser"].as_u64();
    let mut out = Vec::new();
    for field in ["initContainers", "containers"] {
        for c in spec[field].as_array().into_iter().flatten() {
            let name = c["name"].as_str().unwrap_or_default();
            let uid = c["securityContext"]["runAsUser"].as_u64().or(pod_uid);
            if uid == Some(u64::from(cfg.proxy.uid)) {
                out.push(format!(
                    "container {name} runs as UID {}, the proxy's: its traffic bypasses the sidecar",
                    cfg.proxy.uid
                ));
            }
            for p in c["ports"].as_array().into_iter().flatten() {
                if let Some(port @ (15001 | 15006 | 15008 | 15020)) = p["containerPort"].as_u64() {
                    out.push(format!(
                        "container {name} uses port {port}, which the sidecar uses"
                    ));
                }
            }
        }
    }
    out
}

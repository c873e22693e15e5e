//! The "cluster" the kubelet stand-in serves: the objects pods' volumes
//! are made from, the API server stand-in that knows the tokens it mints,
//! where each pod is placed (which gives Service names their addresses),
//! and what the Downward API tells about a pod.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

use serde_json::Value;

use crate::apiserver::{FakeApi, TokenInfo};
use crate::kubelet::{container_port, str_at};

/// The audience of tokens minted for the API server itself.
const API_AUDIENCE: &str = "https://kubernetes.default.svc.cluster.local";

/// What the pods of this "cluster" can see: the objects volumes are made
/// from, the API server stand-in (tokens, `KUBERNETES_SERVICE_*`), and
/// where every pod is placed (for Service names).
pub struct Cluster {
    pub objects: Vec<Value>,
    pub api: FakeApi,
    /// (namespace, labels, IP, pod spec) of every placed pod.
    placed: Vec<(String, Value, String, Value)>,
    tokens: AtomicUsize,
}

impl Cluster {
    pub fn new(objects: Vec<Value>, api: FakeApi) -> Cluster {
        Cluster {
            objects,
            api,
            placed: Vec::new(),
            tokens: AtomicUsize::new(0),
        }
    }

    /// Says that `pod` will run at `ip` (before any pod starts, so that
    /// every pod's hosts file names every Service).
    pub fn place(&mut self, pod: &Value, ip: &str) {
        let labels = pod["metadata"]["labels"].clone();
        let ns = str_at(pod, "/metadata/namespace").to_string();
        self.placed
            .push((ns, labels, ip.to_string(), pod["spec"].clone()));
    }

    pub fn find(&self, kind: &str, ns: &str, name: &str) -> Option<&Value> {
        self.objects.iter().find(|o| {
            o["kind"] == kind && o["metadata"]["name"] == name && o["metadata"]["namespace"] == ns
        })
    }

    /// A token for `pod`'s service account, known to the API stand-in.
    pub fn mint(&self, pod: &PodMeta, audience: Option<&str>, seconds: u64) -> String {
        let n = self.tokens.fetch_add(1, Ordering::SeqCst);
        let token = format!("podstart-token-{}-{}-{n}", pod.namespace, pod.name);
        let audience = audience.unwrap_or(API_AUDIENCE).to_string();
        let info = TokenInfo {
            namespace: pod.namespace.clone(),
            service_account: pod.service_account.clone(),
            audiences: vec![audience],
            expires: SystemTime::now() + Duration::from_secs(seconds),
            pod: Some(pod.name.clone()),
        };
        self.api.add_token(&token, info);
        token
    }

    /// The hosts file of a pod: localhost, the pod itself, and every
    /// Service whose selector picks a placed pod.
    pub fn hosts(&self, pod: &PodMeta) -> String {
        let mut out = format!(
            "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost\n{}\t{}\n",
            pod.ip, pod.name
        );
        for svc in self.objects.iter().filter(|o| o["kind"] == "Service") {
            let ns = str_at(svc, "/metadata/namespace");
            let name = str_at(svc, "/metadata/name");
            let Some(selector) = svc["spec"]["selector"].as_object() else {
                continue;
            };
            let picked = self.placed.iter().find(|(pns, labels, ..)| {
                pns == ns && selector.iter().all(|(k, v)| &labels[k] == v)
            });
            let Some((_, _, ip, spec)) = picked else {
                continue;
            };
            for port in svc["spec"]["ports"].as_array().into_iter().flatten() {
                let target = port.get("targetPort").unwrap_or(&port["port"]);
                let resolved = spec["containers"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .find_map(|c| container_port(c, target));
                assert_eq!(
                    resolved,
                    port["port"].as_u64(),
                    "Service {ns}/{name}: port {port} (no kube-proxy here: it must equal the target container port)"
                );
            }
            out.push_str(&format!(
                "{ip}\t{name}.{ns}.svc {name}.{ns}.svc.cluster.local\n"
            ));
        }
        out
    }
}

/// What the Downward API can tell about a pod.
#[derive(Debug, Clone)]
pub struct PodMeta {
    pub name: String,
    pub namespace: String,
    pub service_account: String,
    pub ip: String,
    pub labels: Value,
    pub annotations: Value,
}

impl PodMeta {
    /// The value of a `fieldRef.fieldPath`.
    pub fn field(&self, path: &str) -> String {
        let keyed = |prefix: &str, map: &Value| {
            let key = path.strip_prefix(prefix)?.strip_suffix("']")?;
            Some(map[key].as_str().unwrap_or("").to_string())
        };
        if let Some(v) = keyed("metadata.annotations['", &self.annotations) {
            return v;
        }
        if let Some(v) = keyed("metadata.labels['", &self.labels) {
            return v;
        }
        match path {
            "metadata.name" => self.name.clone(),
            "metadata.namespace" => self.namespace.clone(),
            "metadata.uid" => format!("00000000-0000-4000-8000-{:012}", self.ip.len()),
            "spec.serviceAccountName" => self.service_account.clone(),
            "status.podIP" | "status.podIPs" => self.ip.clone(),
            "spec.nodeName" => "podstart-node".into(),
            "status.hostIP" => crate::node::NODE_V4.into(),
            other => panic!("the kubelet stand-in does not know the field {other:?}"),
        }
    }
}

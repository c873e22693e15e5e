//! Pod volumes as the kubelet writes them: ConfigMaps, Secrets, Downward
//! API files, projected service-account tokens (minted for the API server
//! stand-in, bound to the pod) and emptyDirs, each in its own directory in
//! the atomic writer's layout (files in a timestamped directory that
//! `..data` points to, a symlink per top-level name), with `defaultMode`
//! and the pod's `fsGroup`. Also the ServiceAccount admission plugin's
//! automounted API credentials.

use std::collections::{BTreeMap, HashMap};
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use crate::cluster::{Cluster, PodMeta};
use crate::kubelet::str_at;

/// Where a service account's credentials are mounted in every container.
const SA_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

/// Writes `files` into `dir` the way the kubelet's atomic writer does: in
/// a timestamped directory that `..data` points to, with a symlink per
/// top-level name.
fn write_volume(dir: &Path, files: &[(String, Vec<u8>)], mode: u32, gid: Option<u32>) {
    let data = dir.join("..2025_01_01_00_00_00.000000001");
    std::fs::create_dir_all(&data).expect("volume dir");
    let mut tops = std::collections::BTreeSet::new();
    for (path, content) in files {
        let file = data.join(path);
        std::fs::create_dir_all(file.parent().unwrap()).expect("volume subdir");
        std::fs::write(&file, content).expect("volume file");
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(mode)).expect("chmod");
        std::os::unix::fs::chown(&file, Some(0), gid).expect("chown");
        tops.insert(path.split('/').next().unwrap().to_string());
    }
    symlink(data.file_name().unwrap(), dir.join("..data")).expect("..data");
    for top in tops {
        symlink(format!("..data/{top}"), dir.join(&top)).expect("volume symlink");
    }
}

/// The files of a ConfigMap or Secret `source` (`name`, `items`, `optional`).
fn object_files(cluster: &Cluster, kind: &str, ns: &str, source: &Value) -> Vec<(String, Vec<u8>)> {
    let name = source["name"]
        .as_str()
        .or_else(|| source["secretName"].as_str())
        .expect("a name");
    let mut data: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    if kind == "ConfigMap" && name == "kube-root-ca.crt" {
        data.insert("ca.crt".into(), cluster.api.ca_pem.clone().into_bytes());
    } else if let Some(obj) = cluster.find(kind, ns, name) {
        for (k, v) in obj["data"].as_object().into_iter().flatten() {
            let v = v.as_str().unwrap_or("");
            let bytes = if kind == "Secret" {
                crate::support::b64(v).into_bytes()
            } else {
                v.as_bytes().to_vec()
            };
            data.insert(k.clone(), bytes);
        }
        for (k, v) in obj["stringData"].as_object().into_iter().flatten() {
            data.insert(k.clone(), v.as_str().unwrap_or("").as_bytes().to_vec());
        }
    } else {
        assert!(
            source["optional"] == true,
            "{kind} {ns}/{name} does not exist and is not optional: the pod would not start"
        );
    }
    match source["items"].as_array() {
        None => data.into_iter().collect(),
        Some(items) => items
            .iter()
            .filter_map(|i| {
                let v = data.get(str_at(i, "/key"))?;
                Some((str_at(i, "/path").to_string(), v.clone()))
            })
            .collect(),
    }
}

fn downward_files(meta: &PodMeta, items: &Value) -> Vec<(String, Vec<u8>)> {
    items
        .as_array()
        .into_iter()
        .flatten()
        .map(|i| {
            let path = str_at(i, "/fieldRef/fieldPath");
            assert!(!path.is_empty(), "only fieldRef items: {i}");
            (
                str_at(i, "/path").to_string(),
                meta.field(path).into_bytes(),
            )
        })
        .collect()
}

/// Writes every volume of `spec` under `dir`; returns name → directory.
pub fn volumes(
    cluster: &Cluster,
    meta: &PodMeta,
    spec: &Value,
    dir: &Path,
) -> HashMap<String, PathBuf> {
    let fs_group = spec["securityContext"]["fsGroup"]
        .as_u64()
        .map(|g| g as u32);
    let mut out = HashMap::new();
    for v in spec["volumes"].as_array().into_iter().flatten() {
        let name = str_at(v, "/name");
        let vdir = dir.join(name);
        std::fs::create_dir_all(&vdir).expect("volume dir");
        std::fs::set_permissions(&vdir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let ns = meta.namespace.as_str();
        let (files, mode) = if let Some(src) = v.get("configMap") {
            (
                object_files(cluster, "ConfigMap", ns, src),
                &src["defaultMode"],
            )
        } else if let Some(src) = v.get("secret") {
            (
                object_files(cluster, "Secret", ns, src),
                &src["defaultMode"],
            )
        } else if let Some(src) = v.get("downwardAPI") {
            (downward_files(meta, &src["items"]), &src["defaultMode"])
        } else if let Some(src) = v.get("projected") {
            let mut files = Vec::new();
            for s in src["sources"].as_array().into_iter().flatten() {
                if let Some(t) = s.get("serviceAccountToken") {
                    let seconds = t["expirationSeconds"].as_u64().unwrap_or(3600);
                    let token = cluster.mint(meta, t["audience"].as_str(), seconds);
                    files.push((str_at(t, "/path").to_string(), token.into_bytes()));
                } else if let Some(c) = s.get("configMap") {
                    files.extend(object_files(cluster, "ConfigMap", ns, c));
                } else if let Some(d) = s.get("downwardAPI") {
                    files.extend(downward_files(meta, &d["items"]));
                } else {
                    panic!("projected source not supported here: {s}");
                }
            }
            (files, &src["defaultMode"])
        } else if v.get("emptyDir").is_some() {
            std::fs::set_permissions(&vdir, std::fs::Permissions::from_mode(0o777)).expect("chmod");
            out.insert(name.to_string(), vdir);
            continue;
        } else {
            panic!("volume type not supported here: {v}");
        };
        let mode = mode.as_u64().unwrap_or(0o644) as u32;
        write_volume(&vdir, &files, mode, fs_group);
        out.insert(name.to_string(), vdir);
    }
    out
}

/// What the ServiceAccount admission plugin adds: the API credentials
/// volume, mounted in every container, unless the pod opts out.
pub fn automount(spec: &mut Value) {
    if spec["automountServiceAccountToken"] == false {
        return;
    }
    let volume = json!({"name": "kube-api-access", "projected": {"defaultMode": 420, "sources": [
        {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}},
        {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
        {"downwardAPI": {"items": [{"path": "namespace", "fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.namespace"}}]}},
    ]}});
    let spec = spec.as_object_mut().expect("a pod spec");
    let volumes = spec.entry("volumes").or_insert_with(|| json!([]));
    volumes.as_array_mut().unwrap().push(volume);
    for list in ["initContainers", "containers"] {
        for c in spec
            .get_mut(list)
            .and_then(Value::as_array_mut)
            .into_iter()
            .flatten()
        {
            let mounts = c.as_object_mut().unwrap().entry("volumeMounts");
            let mounts = mounts.or_insert_with(|| json!([])).as_array_mut().unwrap();
            if !mounts.iter().any(|m| m["mountPath"] == SA_DIR) {
                mounts.push(
                    json!({"name": "kube-api-access", "mountPath": SA_DIR, "readOnly": true}),
                );
            }
        }
    }
}

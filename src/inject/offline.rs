//! `portcullis inject -f FILE|DIR|-`: the offline front door. Multi-document
//! YAML in (a directory's files in name order, as `kubectl apply -f DIR`),
//! the same documents out, with every Pod and every pod template of a
//! Deployment, StatefulSet, DaemonSet, ReplicaSet, Job and CronJob (and
//! the items of a `List`) injected by the same [`inject`](super::inject) the
//! webhook uses. Documents that are not injected are copied byte for byte,
//! comments included; injected ones are re-serialised.
//!
//! The namespace is taken as opted in (asking for injection is the opt-in),
//! unless a Namespace document in the same input says otherwise; the pod's
//! own `portcullis.io/inject` label still wins, and every other skip reason
//! applies as in the webhook.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use clap::Args;
use serde_json::Value;

use super::{inject, patch, Error, InjectorConfig, Request, INJECT_LABEL};

/// `portcullis inject` flags.
#[derive(Debug, Args)]
pub struct InjectArgs {
    /// The manifest to inject: a file, a directory (every *.yaml, *.yml and
    /// *.json file in it, in name order, like `kubectl apply -f DIR`), or
    /// `-` for standard input.
    #[arg(short = 'f', long = "filename", value_name = "FILE|DIR|-")]
    pub file: String,
    /// The injector's config file: the `config.yaml` of the chart's injector
    /// ConfigMap. Without it, built-in defaults with no trust bundle.
    #[arg(long, env = "PORTCULLIS_INJECTOR_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
}

/// Runs `portcullis inject`: the result on stdout, warnings on stderr.
pub fn run(args: &InjectArgs) -> Result<(), Error> {
    let cfg = InjectorConfig::load(args.config.as_deref())?;
    let inputs = read_inputs(&args.file)?;
    let (out, warnings) = inject_inputs(&inputs, &cfg)?;
    for w in warnings {
        eprintln!("portcullis: warning: {w}");
    }
    print!("{out}");
    Ok(())
}

/// One input file: the name errors show (`-` for standard input) and its text.
type Input = (String, String);

/// Reads `-f`: standard input, one file, or a directory's manifest files.
fn read_inputs(file: &str) -> Result<Vec<Input>, Error> {
    let read = |p: &Path| {
        std::fs::read_to_string(p)
            .map(|text| (p.display().to_string(), text))
            .map_err(|e| Error::Input(format!("{}: {e}", p.display())))
    };
    if file == "-" {
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .map_err(|e| Error::Input(format!("-: {e}")))?;
        return Ok(vec![("-".into(), text)]);
    }
    let path = Path::new(file);
    if !path.is_dir() {
        return Ok(vec![read(path)?]);
    }
    let files = manifest_files(path).map_err(|e| Error::Input(format!("{file}: {e}")))?;
    if files.is_empty() {
        return Err(Error::Input(format!(
            "{file}: a directory with no *.yaml, *.yml or *.json file"
        )));
    }
    files.iter().map(|p| read(p)).collect()
}

/// The manifest files directly in `dir`, in name order (hidden names
/// skipped, symlinks followed: a mounted ConfigMap works too).
fn manifest_files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        let manifest = [".yaml", ".yml", ".json"]
            .iter()
            .any(|ext| name.ends_with(ext));
        if manifest && !name.starts_with('.') && path.is_file() {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

/// Splits YAML text into (separator line, document) pieces; a separator is
/// a `---` at the start of a line (block scalars are always indented, so a
/// document's content never starts a line with it).
fn split(text: &str) -> Vec<(&str, &str)> {
    let mut out = Vec::new();
    let mut sep = "";
    let mut start = 0;
    let mut pos = 0;
    for line in text.split_inclusive('\n') {
        let bare = line.trim_end_matches(['\n', '\r']);
        if bare == "---" || bare.starts_with("--- ") || bare.starts_with("---\t") {
            out.push((sep, &text[start..pos]));
            sep = line;
            start = pos + line.len();
        }
        pos += line.len();
    }
    out.push((sep, &text[start..]));
    out
}

/// Injects every pod (template) in `text`; returns the new text and the
/// warnings, each prefixed with the document it concerns.
pub fn inject_documents(text: &str, cfg: &InjectorConfig) -> Result<(String, Vec<String>), Error> {
    inject_inputs(&[("-".into(), text.into())], cfg)
}

/// Injects every pod (template) of every input; the outputs are joined
/// with `---` lines, in input order. Namespaces defined in any input count
/// for all of them, as they would in one `kubectl apply -f DIR`.
fn inject_inputs(inputs: &[Input], cfg: &InjectorConfig) -> Result<(String, Vec<String>), Error> {
    let mut files = Vec::with_capacity(inputs.len());
    for (name, text) in inputs {
        let pieces = split(text);
        let mut docs = Vec::with_capacity(pieces.len());
        for (i, (_, body)) in pieces.iter().enumerate() {
            let v: Value = if body.trim().is_empty() {
                Value::Null
            } else {
                serde_norway::from_str(body)
                    .map_err(|e| Error::Input(format!("{name}: document {}: {e}", i + 1)))?
            };
            docs.push(v);
        }
        files.push((pieces, docs));
    }
    // Namespaces defined alongside: their labels decide like the webhook's selector.
    let mut namespaces: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
    for d in files.iter().flat_map(|(_, docs)| docs) {
        if d["kind"] == "Namespace" {
            if let Some(name) = d["metadata"]["name"].as_str() {
                namespaces.insert(name.into(), super::string_map(&d["metadata"]["labels"]));
            }
        }
    }
    let mut out = String::new();
    let mut warnings = Vec::new();
    for (n, (pieces, docs)) in files.into_iter().enumerate() {
        if n > 0 {
            if !out.is_empty() && !out.ends_with('\n') {
                out.push('\n');
            }
            out.push_str("---\n");
        }
        for ((sep, body), mut doc) in pieces.into_iter().zip(docs) {
            out.push_str(sep);
            let changed = inject_object(&mut doc, cfg, &namespaces, &mut warnings)?;
            if changed {
                let yaml =
                    serde_norway::to_string(&doc).map_err(|e| Error::Input(e.to_string()))?;
                out.push_str(&yaml);
                if !yaml.ends_with('\n') {
                    out.push('\n');
                }
            } else {
                out.push_str(body);
            }
        }
    }
    Ok((out, warnings))
}

/// Where a kind keeps its pod template, and whether its pods are Job pods.
fn template_of(kind: &str) -> Option<(&'static [&'static str], bool)> {
    match kind {
        "Pod" => Some((&[], false)),
        "Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet" => {
            Some((&["spec", "template"], false))
        }
        "Job" => Some((&["spec", "template"], true)),
        "CronJob" => Some((&["spec", "jobTemplate", "spec", "template"], true)),
        _ => None,
    }
}

/// Injects one object in place; `true` when it changed.
fn inject_object(
    doc: &mut Value,
    cfg: &InjectorConfig,
    namespaces: &BTreeMap<String, BTreeMap<String, String>>,
    warnings: &mut Vec<String>,
) -> Result<bool, Error> {
    let kind = doc["kind"].as_str().unwrap_or_default().to_string();
    if kind == "List" {
        let mut changed = false;
        if let Some(items) = doc["items"].as_array_mut() {
            for item in items {
                changed |= inject_object(item, cfg, namespaces, warnings)?;
            }
        }
        return Ok(changed);
    }
    let Some((path, job)) = template_of(&kind) else {
        return Ok(false);
    };
    let name = doc["metadata"]["name"]
        .as_str()
        .unwrap_or("(unnamed)")
        .to_string();
    let namespace = doc["metadata"]["namespace"]
        .as_str()
        .unwrap_or("default")
        .to_string();
    let enabled = BTreeMap::from([(INJECT_LABEL.to_string(), "enabled".to_string())]);
    let ns_labels = namespaces.get(&namespace).unwrap_or(&enabled);
    let mut target = &mut *doc;
    for key in path {
        target = &mut target[*key];
    }
    if !target.is_object() {
        return Err(Error::Input(format!(
            "{kind} {name}: no pod template at /{}",
            path.join("/")
        )));
    }
    let mut pod = serde_json::json!({"apiVersion": "v1", "kind": "Pod", "spec": target["spec"]});
    if let Some(meta) = target.get("metadata") {
        pod["metadata"] = meta.clone();
    }
    let req = Request {
        kind: "Pod",
        operation: "CREATE",
        sub_resource: "",
        namespace: &namespace,
        namespace_labels: ns_labels,
        pod: &pod,
        job,
    };
    let result = inject(&req, cfg).map_err(|e| Error::Input(format!("{kind} {name}: {e}")))?;
    warnings.extend(
        result
            .warnings
            .iter()
            .map(|w| format!("{kind} {name}: {w}")),
    );
    if result.patch.0.is_empty() {
        return Ok(false);
    }
    patch::apply(&mut pod, &result.patch).map_err(Error::Pod)?;
    let obj = target.as_object_mut().expect("checked above");
    obj.insert("metadata".into(), pod["metadata"].take());
    obj.insert("spec".into(), pod["spec"].take());
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_documents_on_separator_lines() {
        let text = "a: 1\n---\nb: |\n  ---\n  x\n--- # c\nc: 3\n";
        let parts = split(text);
        assert_eq!(parts.len(), 3);
        assert_eq!(parts[0], ("", "a: 1\n"));
        assert_eq!(parts[1], ("---\n", "b: |\n  ---\n  x\n"));
        assert_eq!(parts[2], ("--- # c\n", "c: 3\n"));
        let joined: String = parts.iter().map(|(s, b)| format!("{s}{b}")).collect();
        assert_eq!(joined, text);
    }
}

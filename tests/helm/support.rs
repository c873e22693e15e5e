//! Running the real tools (Helm, kubernetes-validate) and reading their
//! output as JSON values, for tests/helm.rs.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde::Deserialize;
use serde_json::Value;

/// The Kubernetes versions every chart render is validated against.
pub const KUBE_VERSIONS: &[&str] = &["1.29.0", "1.32.0", "1.33.0"];
/// The release the matrix renders.
pub const RELEASE: &str = "portcullis";
pub const NAMESPACE: &str = "portcullis";

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn chart() -> PathBuf {
    root().join("charts/portcullis")
}

/// The Helm 3.17 binary that `make deps` (.ci/helm.sh) puts in .tools/bin.
pub fn helm() -> PathBuf {
    let p = root().join(".tools/bin/helm");
    assert!(
        p.is_file(),
        "{} is missing: run `make deps` (or `bash .ci/helm.sh`) to fetch Helm 3.17",
        p.display()
    );
    p
}

/// `kubernetes-validate` from PATH (installed by `make deps` from PyPI).
pub fn kubernetes_validate() -> PathBuf {
    which("kubernetes-validate").unwrap_or_else(|| {
        panic!(
            "kubernetes-validate is not on PATH: run `make deps` (pip install kubernetes-validate)"
        )
    })
}

pub fn which(tool: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(tool))
            .find(|p| p.is_file())
    })
}

pub fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Arguments of one Helm invocation: values files and `--set` pairs.
/// `Render::default()` sets `identity.externalCA=true` (the chart refuses
/// to render without a trust anchor otherwise); `Render::bare()` sets
/// nothing, for values files that must render on their own.
#[derive(Clone)]
pub struct Render {
    pub release: Option<String>,
    pub files: Vec<PathBuf>,
    pub sets: Vec<String>,
    pub set_files: Vec<String>,
    pub api_versions: Vec<String>,
    pub kube: Option<String>,
}

impl Default for Render {
    fn default() -> Self {
        Render::bare().set("identity.externalCA=true")
    }
}

impl Render {
    /// No values at all: the chart's own defaults.
    pub fn bare() -> Self {
        Render {
            release: None,
            files: Vec::new(),
            sets: Vec::new(),
            set_files: Vec::new(),
            api_versions: Vec::new(),
            kube: None,
        }
    }
    pub fn file(mut self, f: impl AsRef<Path>) -> Self {
        self.files.push(f.as_ref().to_path_buf());
        self
    }
    pub fn set(mut self, kv: &str) -> Self {
        self.sets.push(kv.to_string());
        self
    }
    /// `--set-file key=path` (tests/podstart.rs gives the chart its CA so).
    #[allow(dead_code)]
    pub fn set_file(mut self, key: &str, path: &Path) -> Self {
        self.set_files.push(format!("{key}={}", path.display()));
        self
    }
    pub fn kube(mut self, v: &str) -> Self {
        self.kube = Some(v.to_string());
        self
    }
    pub fn api(mut self, v: &str) -> Self {
        self.api_versions.push(v.to_string());
        self
    }
    pub fn release(mut self, r: &str) -> Self {
        self.release = Some(r.to_string());
        self
    }

    fn common(&self, cmd: &mut Command) {
        for f in &self.files {
            cmd.arg("-f").arg(f);
        }
        for s in &self.sets {
            cmd.arg("--set").arg(s);
        }
        for s in &self.set_files {
            cmd.arg("--set-file").arg(s);
        }
        cmd.arg("--kube-version")
            .arg(self.kube.as_deref().unwrap_or(KUBE_VERSIONS[0]));
    }

    /// `helm template`: the output, or the error text.
    pub fn template(&self) -> Result<String, String> {
        let mut cmd = Command::new(helm());
        cmd.arg("template")
            .arg(self.release.as_deref().unwrap_or(RELEASE))
            .arg(chart())
            .arg("--namespace")
            .arg(NAMESPACE);
        for a in &self.api_versions {
            cmd.arg("--api-versions").arg(a);
        }
        self.common(&mut cmd);
        let out = run(&mut cmd);
        if out.status.success() {
            Ok(text(&out.stdout))
        } else {
            Err(format!("{}{}", text(&out.stdout), text(&out.stderr)))
        }
    }

    /// `helm lint --strict`: Ok, or the lint report.
    pub fn lint(&self) -> Result<(), String> {
        let mut cmd = Command::new(helm());
        cmd.arg("lint")
            .arg("--strict")
            .arg(chart())
            .arg("--namespace")
            .arg(NAMESPACE);
        self.common(&mut cmd);
        let out = run(&mut cmd);
        if out.status.success() {
            Ok(())
        } else {
            Err(format!("{}{}", text(&out.stdout), text(&out.stderr)))
        }
    }

    pub fn docs(&self) -> Vec<Value> {
        docs(
            &self
                .template()
                .unwrap_or_else(|e| panic!("helm template failed:\n{e}")),
        )
    }
}

/// Every non-empty document of a multi-document YAML text.
pub fn docs(yaml: &str) -> Vec<Value> {
    serde_norway::Deserializer::from_str(yaml)
        .map(|de| Value::deserialize(de).unwrap_or_else(|e| panic!("bad YAML: {e}\n{yaml}")))
        .filter(|v| !v.is_null())
        .collect()
}

pub fn kind(d: &Value) -> &str {
    d["kind"].as_str().unwrap_or("")
}

pub fn name(d: &Value) -> &str {
    d["metadata"]["name"].as_str().unwrap_or("")
}

pub fn find<'a>(docs: &'a [Value], k: &str, n: &str) -> &'a Value {
    docs.iter()
        .find(|d| kind(d) == k && name(d) == n)
        .unwrap_or_else(|| panic!("no {k} {n} in the render"))
}

pub fn of_kind<'a>(docs: &'a [Value], k: &str) -> Vec<&'a Value> {
    docs.iter().filter(|d| kind(d) == k).collect()
}

/// Kinds from CRDs (cert-manager, Prometheus Operator): the Kubernetes
/// schemas do not know them, so kubernetes-validate cannot check them; the
/// tests check their shape themselves (see `check_crd_object`).
pub fn is_crd_kind(d: &Value) -> bool {
    let api = d["apiVersion"].as_str().unwrap_or("");
    api.starts_with("cert-manager.io/") || api.starts_with("monitoring.coreos.com/")
}

/// Validates every built-in object with `kubernetes-validate --strict` for
/// `kube` in one call; returns how many objects it checked.
pub fn validate(docs: &[Value], kube: &str, what: &str) -> usize {
    let builtin: Vec<&Value> = docs.iter().filter(|d| !is_crd_kind(d)).collect();
    if builtin.is_empty() {
        return 0;
    }
    let mut yaml = String::new();
    for d in &builtin {
        yaml.push_str("---\n");
        yaml.push_str(&serde_norway::to_string(d).expect("YAML out"));
    }
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("render.yaml");
    std::fs::write(&file, &yaml).unwrap();
    let out = run(Command::new(kubernetes_validate())
        .arg("--strict")
        .arg("-k")
        .arg(kube)
        .arg(&file));
    let report = format!("{}{}", text(&out.stdout), text(&out.stderr));
    assert!(
        out.status.success(),
        "{what}: kubernetes-validate --strict -k {kube} failed:\n{report}"
    );
    let passed = report.matches(" passed for resource ").count();
    assert!(
        !report.contains("WARN") && !report.contains("ERROR"),
        "{what}: kubernetes-validate -k {kube} warned:\n{report}"
    );
    assert_eq!(
        passed,
        builtin.len(),
        "{what}: kubernetes-validate -k {kube} checked {passed} of {} objects:\n{report}",
        builtin.len()
    );
    passed
}

/// The PEM blocks of a text, as DER.
pub fn pem_certs(pem: &str) -> Vec<Vec<u8>> {
    x509_parser::pem::Pem::iter_from_buffer(pem.as_bytes())
        .map(|p| p.expect("PEM").contents)
        .collect()
}

pub fn b64(s: &str) -> String {
    // A tiny decoder (the crate has no base64 dependency).
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = Vec::new();
    let (mut buf, mut bits) = (0u32, 0u32);
    for c in s.bytes().filter(|c| !c.is_ascii_whitespace() && *c != b'=') {
        let v = T.iter().position(|t| *t == c).expect("base64") as u32;
        buf = (buf << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((buf >> bits) as u8);
            buf &= (1 << bits) - 1;
        }
    }
    String::from_utf8(out).expect("utf-8")
}

pub fn sha256_hex(s: &str) -> String {
    ring::digest::digest(&ring::digest::SHA256, s.as_bytes())
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

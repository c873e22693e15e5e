//! Helpers for the injector tests: fixtures, golden files, patches, the
//! schema validator, and a `portcullis webhook` child process.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use portcullis::inject::InjectorConfig;
use serde_json::{json, Value};

pub const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/inject");
pub const CONFIG: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/inject/config.yaml"
);
pub const BIN: &str = env!("CARGO_BIN_EXE_portcullis");

/// The webhook path a fixture is posted to.
pub type Path_ = &'static str;
/// The entry whose namespaceSelector matched `portcullis.io/inject=enabled`.
pub const NS: Path_ = "/inject/namespace-enabled";
/// The entry that selects pods by their own label.
pub const POD: Path_ = "/inject";

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Expect {
    Injected,
    Skipped(&'static str),
    InternalError,
    BadRequest,
}
pub use Expect::*;

pub fn fixture(case: &str) -> Vec<u8> {
    std::fs::read(Path::new(FIXTURES).join(format!("{case}.json"))).unwrap()
}

pub fn config() -> InjectorConfig {
    InjectorConfig::load(Some(Path::new(CONFIG))).unwrap()
}

pub fn patch_value(review: &Value) -> Value {
    match review["response"]["patch"].as_str() {
        None => json!([]),
        Some(b64) => {
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(b64)
                .unwrap();
            serde_json::from_slice(&bytes).unwrap()
        }
    }
}

/// The response with its patch decoded, as stored in golden files.
pub fn normalize(status: u16, review: &Value) -> Value {
    if status != 200 {
        return json!({"status": status});
    }
    let mut resp = review["response"].clone();
    if resp.get("patch").is_some() {
        resp["patch"] = patch_value(review);
    }
    json!({"status": status, "response": resp})
}

pub fn check_golden(case: &str, got: &Value) {
    let path = Path::new(FIXTURES)
        .join("golden")
        .join(format!("{case}.json"));
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, serde_json::to_string_pretty(got).unwrap() + "\n").unwrap();
        return;
    }
    let want: Value = serde_json::from_str(
        &std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("{}: {e} (UPDATE_GOLDEN=1 writes it)", path.display())),
    )
    .unwrap();
    assert_eq!(
        got,
        &want,
        "{case}: differs from {} (UPDATE_GOLDEN=1 rewrites it after a deliberate change)",
        path.display()
    );
}

pub fn check_expectation(case: &str, expect: Expect, status: u16, review: &Value) {
    let resp = &review["response"];
    match expect {
        BadRequest => assert_eq!(status, 400, "{case}"),
        Injected => {
            assert_eq!(status, 200, "{case}");
            assert_eq!(resp["allowed"], true, "{case}");
            assert_eq!(resp["patchType"], "JSONPatch", "{case}");
            let ops = patch_value(review);
            assert!(
                ops.as_array().unwrap().iter().all(|o| o["op"] == "add"),
                "{case}: only add ops"
            );
        }
        Skipped(reason) => {
            assert_eq!(status, 200, "{case}");
            assert_eq!(resp["allowed"], true, "{case}");
            assert!(resp.get("patch").is_none(), "{case}: skipped but patched");
            let w = resp["warnings"].to_string();
            assert!(
                w.contains("not injected"),
                "{case} ({reason}): no reason in warnings: {w}"
            );
        }
        InternalError => {
            assert_eq!(status, 200, "{case}");
            assert_eq!(
                resp["allowed"], true,
                "{case}: an internal error allows the pod"
            );
            assert!(resp.get("patch").is_none(), "{case}");
        }
    }
}

/// Applies the response's patch with the `json-patch` crate.
pub fn apply_patch(pod: &Value, review: &Value) -> Value {
    let patch: json_patch::Patch = serde_json::from_value(patch_value(review)).unwrap();
    let mut doc = pod.clone();
    json_patch::patch(&mut doc, &patch).unwrap();
    doc
}

pub fn patch_ops(review: &Value) -> portcullis::inject::Patch {
    let ops = patch_value(review)
        .as_array()
        .unwrap()
        .iter()
        .map(|o| portcullis::inject::patch::Op {
            op: "add",
            path: o["path"].as_str().unwrap().into(),
            value: o["value"].clone(),
        })
        .collect();
    portcullis::inject::Patch(ops)
}

/// `kubernetes-validate --strict -k VERSION files...`; installed by `make deps`.
pub fn kubernetes_validate(version: &str, files: &[PathBuf]) {
    let out = Command::new("kubernetes-validate")
        .args(["--strict", "--quiet", "-k", version])
        .args(files)
        .output()
        .expect("kubernetes-validate not found: run `make deps` (pip package kubernetes-validate)");
    assert!(
        out.status.success(),
        "kubernetes-validate {version} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A self-signed serving certificate for `localhost`: NAME.crt, NAME.key.
pub fn self_signed(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let (cert, key) = (
        dir.join(format!("{name}.crt")),
        dir.join(format!("{name}.key")),
    );
    std::fs::write(&cert, ck.cert.pem()).unwrap();
    std::fs::write(&key, ck.key_pair.serialize_pem()).unwrap();
    (cert, key)
}

/// Copies `from` over `to` atomically (temp file + rename).
pub fn replace(from: &Path, to: &Path) {
    let tmp = to.with_extension("tmp");
    std::fs::copy(from, &tmp).unwrap();
    std::fs::rename(&tmp, to).unwrap();
}

pub fn wait_until(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A `portcullis webhook` child on loopback port 0, killed on drop.
pub struct WebhookProc {
    child: Child,
    pub listen: SocketAddr,
    pub admin: SocketAddr,
}

impl WebhookProc {
    pub fn start(cert: &Path, key: &Path, config: &Path) -> Self {
        let mut child = Command::new(BIN)
            .args([
                "webhook",
                "--listen",
                "127.0.0.1:0",
                "--admin-listen",
                "127.0.0.1:0",
            ])
            .arg("--tls-cert")
            .arg(cert)
            .arg("--tls-key")
            .arg(key)
            .arg("--config")
            .arg(config)
            .args(["--log-format", "json", "--file-poll-interval", "200ms"])
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let v = loop {
            let line = lines
                .next()
                .expect("the webhook logged 'listening'")
                .unwrap();
            let v: Value = serde_json::from_str(&line).unwrap_or_default();
            if v["message"] == "listening" {
                break v;
            }
        };
        std::thread::spawn(move || for _ in lines {});
        WebhookProc {
            listen: v["listen"].as_str().unwrap().parse().unwrap(),
            admin: v["admin"].as_str().unwrap().parse().unwrap(),
            child,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("https://localhost:{}{path}", self.listen.port())
    }
}

impl Drop for WebhookProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// POSTs a file with curl, verifying the server with `ca`; (status, body).
pub fn curl_post(url: &str, ca: &Path, file: &Path) -> (u16, String) {
    let out = Command::new("curl")
        .args([
            "-sS",
            "--max-time",
            "10",
            "-H",
            "Content-Type: application/json",
            "-w",
            "\n%{http_code}",
        ])
        .arg("--cacert")
        .arg(ca)
        .arg("--data-binary")
        .arg(format!("@{}", file.display()))
        .arg(url)
        .output()
        .expect("curl not found: run `make deps`");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

/// A plain HTTP GET with curl; the body.
pub fn http_get(addr: SocketAddr, path: &str) -> String {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "5"])
        .arg(format!("http://{addr}{path}"))
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).to_string()
}

//! `portcullis inject` and `portcullis webhook` as a new user meets them,
//! run as the real binary: errors name the file or the flag they concern,
//! say their prefix once, `-f DIR` reads a directory like `kubectl apply
//! -f DIR`, and the no-trust-bundle warning says how to fix it.

use std::path::Path;
use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_portcullis");
const CONFIG: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/inject/config.yaml"
);

const POD: &str = "apiVersion: v1\nkind: Pod\nmetadata: {name: web, namespace: shop}\nspec:\n  containers: [{name: app, image: nginx}]\n";
const CONFIG_MAP: &str =
    "# settings\napiVersion: v1\nkind: ConfigMap\nmetadata: {name: settings}\n";

fn run(dir: &Path, args: &[&str]) -> (Option<i32>, String, String) {
    let out: Output = Command::new(BIN)
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run portcullis");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_broken_manifest_names_its_file() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("broken.yaml"), format!("{POD}---\na: [\n")).unwrap();
    let (code, stdout, stderr) = run(
        tmp.path(),
        &["inject", "-f", "broken.yaml", "--config", CONFIG],
    );
    assert_eq!(code, Some(2), "{stderr}");
    assert_eq!(stdout, "");
    assert!(
        stderr.starts_with("portcullis: error: broken.yaml: document 2: "),
        "{stderr}"
    );
}

#[test]
fn a_bad_config_says_its_prefix_once() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("pod.yaml"), POD).unwrap();
    std::fs::write(tmp.path().join("badcfg.yaml"), "bogus: 1\n").unwrap();
    let (code, _, stderr) = run(
        tmp.path(),
        &["inject", "-f", "pod.yaml", "--config", "badcfg.yaml"],
    );
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr
            .starts_with("portcullis: error: injector config: badcfg.yaml: unknown field `bogus`"),
        "{stderr}"
    );
    assert_eq!(stderr.matches("injector config").count(), 1, "{stderr}");
}

#[test]
fn a_directory_is_read_in_name_order() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("manifests");
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join("20-pod.yaml"), POD).unwrap();
    std::fs::write(dir.join("10-settings.yml"), CONFIG_MAP).unwrap();
    std::fs::write(dir.join("README.md"), "not a manifest").unwrap();
    std::fs::write(dir.join(".hidden.yaml"), "a: [\n").unwrap();
    let (code, stdout, stderr) = run(
        tmp.path(),
        &["inject", "-f", "manifests", "--config", CONFIG],
    );
    assert_eq!(code, Some(0), "{stderr}");
    assert!(
        stdout.starts_with(&format!("{CONFIG_MAP}---\n")),
        "{stdout}"
    );
    let docs: Vec<serde_json::Value> = stdout
        .split("\n---\n")
        .map(|d| serde_norway::from_str(d).unwrap())
        .collect();
    assert_eq!(docs.len(), 2, "{stdout}");
    let containers = docs[1]["spec"]["containers"].as_array().unwrap();
    assert!(
        containers.iter().any(|c| c["name"] == "portcullis-proxy")
            || docs[1]["spec"]["initContainers"]
                .as_array()
                .is_some_and(|i| i.iter().any(|c| c["name"] == "portcullis-proxy")),
        "not injected: {stdout}"
    );

    // A broken file in the directory is named with its path.
    std::fs::write(dir.join("30-broken.yaml"), "a: [\n").unwrap();
    let (code, _, stderr) = run(tmp.path(), &["inject", "-f", "manifests"]);
    assert_eq!(code, Some(2));
    assert!(
        stderr.starts_with("portcullis: error: manifests/30-broken.yaml: document 1: "),
        "{stderr}"
    );

    std::fs::create_dir(tmp.path().join("empty")).unwrap();
    let (code, _, stderr) = run(tmp.path(), &["inject", "-f", "empty"]);
    assert_eq!(code, Some(2));
    assert_eq!(
        stderr,
        "portcullis: error: empty: a directory with no *.yaml, *.yml or *.json file\n"
    );
}

#[test]
fn without_config_the_warning_says_how_to_fix_it() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("pod.yaml"), POD).unwrap();
    let (code, _, stderr) = run(tmp.path(), &["inject", "-f", "pod.yaml"]);
    assert_eq!(code, Some(0), "{stderr}");
    for needle in [
        "no trust bundle",
        "--config FILE",
        "injector ConfigMap",
        "docs/kubernetes.md",
    ] {
        assert!(stderr.contains(needle), "{needle:?} not in {stderr}");
    }
    let (_, _, stderr) = run(
        tmp.path(),
        &["inject", "-f", "pod.yaml", "--config", CONFIG],
    );
    assert!(!stderr.contains("no trust bundle"), "{stderr}");
}

#[test]
fn webhook_names_the_missing_tls_flag() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("cert.pem"), "").unwrap();
    for (cert, key, want) in [
        ("nope", "cert.pem", "portcullis: error: --tls-cert nope: "),
        ("cert.pem", "nokey", "portcullis: error: --tls-key nokey: "),
    ] {
        let (code, _, stderr) = run(
            tmp.path(),
            &[
                "webhook",
                "--tls-cert",
                cert,
                "--tls-key",
                key,
                "--listen",
                "127.0.0.1:0",
                "--admin-listen",
                "127.0.0.1:0",
            ],
        );
        assert_eq!(code, Some(2), "{stderr}");
        assert!(stderr.starts_with(want), "{stderr}");
        assert!(stderr.contains("No such file"), "{stderr}");
    }
}

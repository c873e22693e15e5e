//! Mesh CIDRs mean the same everywhere they are accepted: the injector's
//! config, `portcullis run` (the flag and the variable the injector sets),
//! `portcullis install` and `init`'s exclusions read them with one parser.
//! A bare address is one host; host bits are refused with the same message.
//! A value the injector accepts starts the injected sidecar; one it refuses,
//! `run` refuses too.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Output, Stdio};

use common::*;

const BIN: &str = env!("CARGO_BIN_EXE_portcullis");
const CONFIG: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/inject/config.yaml"
);
const POD: &str = "apiVersion: v1\nkind: Pod\nmetadata: {name: web, namespace: shop}\nspec:\n  containers: [{name: app, image: nginx}]\n";
const HOST_BITS: &str = "host bits are set (did you mean 10.0.0.0/8?)";

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// `portcullis inject` of a pod with the fixture config, its
/// `proxy.meshCidrs` replaced by `cidrs`.
fn inject(dir: &Path, cidrs: &str) -> Output {
    let config = std::fs::read_to_string(CONFIG).unwrap();
    let old = "meshCidrs: [10.0.0.0/8, fd00::/8]";
    assert!(config.contains(old), "the fixture config changed shape");
    let config = config.replace(old, &format!("meshCidrs: [{cidrs}]"));
    std::fs::write(dir.join("config.yaml"), config).unwrap();
    std::fs::write(dir.join("pod.yaml"), POD).unwrap();
    Command::new(BIN)
        .args(["inject", "-f", "pod.yaml", "--config", "config.yaml"])
        .current_dir(dir)
        .output()
        .unwrap()
}

/// The value of `PORTCULLIS_MESH_CIDRS` in an injected manifest.
fn mesh_cidrs_env(manifest: &str) -> String {
    let mut lines = manifest.lines();
    lines
        .by_ref()
        .find(|l| l.trim() == "- name: PORTCULLIS_MESH_CIDRS")
        .unwrap_or_else(|| panic!("no PORTCULLIS_MESH_CIDRS in:\n{manifest}"));
    let value = lines.next().unwrap().trim();
    value
        .strip_prefix("value: ")
        .unwrap_or_else(|| panic!("{value}"))
        .trim_matches(['"', '\''])
        .to_string()
}

/// `portcullis run` in transparent mode with `PORTCULLIS_MESH_CIDRS` set
/// as the injector sets it (when `env_cidrs` is given), plus `args`; on
/// loopback ports.
fn run_command(ca: &Ca, env_cidrs: Option<&str>, args: &[&str]) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.args(run_args(&issuer_args(ca, &ca.files.cert, "web")))
        .args([
            "--outbound-listen",
            "127.0.0.1:0",
            "--tunnel-listen",
            "127.0.0.1:0",
        ])
        .args(args)
        .env_remove("PORTCULLIS_MESH_CIDRS")
        .env_remove("PORTCULLIS_PASSTHROUGH_CIDRS");
    if let Some(v) = env_cidrs {
        cmd.env("PORTCULLIS_MESH_CIDRS", v);
    }
    cmd
}

fn portcullis(args: &[&str]) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.args(args);
    cmd
}

#[test]
fn a_bare_address_is_one_host_for_the_injector_and_the_sidecar() {
    let dir = tempfile::tempdir().unwrap();
    let out = inject(dir.path(), "10.244.0.0/16, 10.96.0.10, fd00::1");
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let value = mesh_cidrs_env(&String::from_utf8_lossy(&out.stdout));
    assert_eq!(value, "10.244.0.0/16,10.96.0.10,fd00::1");

    // The injected sidecar starts with exactly that variable.
    let ca = Ca::root(dir.path(), "ca", TD);
    let mut child = run_command(&ca, Some(&value), &[])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let listening = await_log_line(&mut lines, "listening", |_| {});
    let _ = child.kill();
    let _ = child.wait();
    assert!(listening["admin"].is_string(), "{listening}");

    // `install` takes it as well.
    let out = portcullis(&["install", "--mesh-cidrs", "10.244.0.0/16,10.96.0.10"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
}

#[test]
fn host_bits_are_refused_everywhere_with_one_message() {
    let dir = tempfile::tempdir().unwrap();
    let out = inject(dir.path(), "10.0.0.1/8");
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("proxy.meshCidrs") && err.contains(HOST_BITS),
        "{err}"
    );

    let ca = Ca::root(dir.path(), "ca", TD);
    let bad = "10.0.0.1/8";
    let mut cases: Vec<(&str, Command)> = vec![
        (
            "--mesh-cidrs",
            run_command(&ca, None, &["--mesh-cidrs", bad]),
        ),
        (
            "PORTCULLIS_MESH_CIDRS (for --mesh-cidrs)",
            run_command(&ca, Some("10.244.0.0/16,10.0.0.1/8"), &[]),
        ),
        (
            "--passthrough-cidrs",
            run_command(&ca, None, &["--passthrough-cidrs", bad]),
        ),
        (
            "--mesh-cidrs",
            portcullis(&["install", "--mesh-cidrs", bad]),
        ),
        (
            "--exclude-outbound-cidrs",
            portcullis(&["init", "--dry-run", "--exclude-outbound-cidrs", bad]),
        ),
    ];
    for (named, cmd) in cases.iter_mut() {
        let out = cmd.output().unwrap();
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{named}: {err}");
        assert_eq!(err.lines().count(), 1, "{named}: want one line: {err}");
        assert!(err.contains(HOST_BITS), "{named}: {err}");
        assert!(err.contains(*named), "{named} not named: {err}");
    }
}

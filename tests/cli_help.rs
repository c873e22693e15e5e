//! The command line documents itself: every flag and argument of every
//! command has help text, completions cover every subcommand (and bash
//! accepts the script), the man page comes from the same definitions,
//! both end quietly when their reader goes away (`| head`), and a webhook
//! that cannot bind says so once, naming the flag and address.

use std::io::Read;
use std::process::{Command, Stdio};

use clap::CommandFactory;
use portcullis::config::Cli;

const BIN: &str = env!("CARGO_BIN_EXE_portcullis");

/// `path arg` for every argument without help, walking the whole tree.
fn undocumented(cmd: &clap::Command, path: &str, out: &mut Vec<String>) {
    let path = format!("{path} {}", cmd.get_name());
    if cmd.get_about().is_none() && cmd.get_long_about().is_none() {
        out.push(format!("{path} (the command itself)"));
    }
    for arg in cmd.get_arguments() {
        let builtin = matches!(arg.get_id().as_str(), "help" | "version");
        if !builtin && arg.get_help().is_none() && arg.get_long_help().is_none() {
            out.push(format!("{path} {}", arg.get_id()));
        }
    }
    for sub in cmd.get_subcommands() {
        undocumented(sub, &path, out);
    }
}

#[test]
fn every_command_and_argument_has_help() {
    let mut missing = Vec::new();
    let cli = Cli::command();
    for sub in cli.get_subcommands() {
        undocumented(sub, "portcullis", &mut missing);
    }
    assert!(
        missing.is_empty(),
        "no help text for:\n{}",
        missing.join("\n")
    );
}

fn stdout(args: &[&str]) -> String {
    let out = Command::new(BIN).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn completions_name_every_subcommand_and_bash_accepts_them() {
    let names: Vec<String> = Cli::command()
        .get_subcommands()
        .map(|s| s.get_name().to_string())
        .collect();
    assert!(names.contains(&"check".to_string()));
    for shell in ["bash", "zsh", "fish"] {
        let script = stdout(&["completion", shell]);
        for name in &names {
            assert!(
                script.contains(name.as_str()),
                "{shell} completion lacks {name}"
            );
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("portcullis.bash");
    std::fs::write(&file, stdout(&["completion", "bash"])).unwrap();
    let out = Command::new("bash").arg("-n").arg(&file).output().unwrap();
    assert!(
        out.status.success(),
        "bash -n: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Sourced, it registers the completion function.
    let out = Command::new("bash")
        .arg("-c")
        .arg(format!(
            "source {} && complete -p portcullis",
            file.display()
        ))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn man_page_has_every_command_and_flag() {
    let page = stdout(&["man"]);
    assert!(
        page.starts_with(".ie") || page.starts_with(".TH"),
        "{}",
        &page[..80]
    );
    assert!(page.contains(".TH portcullis 1"));
    for section in [
        "PORTCULLIS RUN",
        "PORTCULLIS CHECK",
        "PORTCULLIS CA ISSUE",
        "PORTCULLIS RULES EXPLAIN",
    ] {
        assert!(page.contains(&format!(".SH \"{section}\"")), "{section}");
    }
    for flag in ["trust\\-domain", "drain\\-timeout", "no\\-interception"] {
        assert!(page.contains(flag), "{flag}");
    }
}

#[test]
fn webhook_bind_error_is_one_line_naming_flag_and_address() {
    let dir = tempfile::tempdir().unwrap();
    let ok = |args: &[&str]| {
        let out = Command::new(BIN).args(args).output().unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let ca = dir.path().join("ca");
    let leaf = dir.path().join("leaf");
    ok(&["ca", "init", "--out", ca.to_str().unwrap()]);
    ok(&[
        "ca",
        "issue",
        "--ca",
        ca.to_str().unwrap(),
        "--id",
        "spiffe://cluster.local/ns/a/sa/b",
        "--out",
        leaf.to_str().unwrap(),
    ]);
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = busy.local_addr().unwrap().to_string();
    for (flag, other) in [
        ("--listen", "--admin-listen"),
        ("--admin-listen", "--listen"),
    ] {
        let out = Command::new(BIN)
            .args(["webhook", flag, &addr, other, "127.0.0.1:0"])
            .arg("--tls-cert")
            .arg(leaf.join("tls.crt"))
            .arg("--tls-key")
            .arg(leaf.join("tls.key"))
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success());
        let lines: Vec<&str> = stderr.lines().collect();
        assert_eq!(lines.len(), 1, "{stderr}");
        assert!(lines[0].contains(&format!("{flag} {addr}")), "{stderr}");
        assert_eq!(lines[0].matches("in use").count(), 1, "{stderr}");
    }
}

/// `portcullis completion bash | head`, `portcullis man | head` and
/// `portcullis init --dry-run | head`: a pipe whose reader is gone ends the
/// command quietly with exit 0, like other tools (it used to panic with a
/// backtrace, or print "Broken pipe").
#[test]
fn a_closed_pipe_ends_completion_and_man_quietly() {
    for args in [
        &["completion", "bash"][..],
        &["completion", "zsh"],
        &["man"],
        &["init", "--dry-run", "--backend", "nft", "--ipv6", "on"],
    ] {
        // The reader is closed before the command writes its first byte,
        // so every write meets EPIPE.
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        let out = Command::new(BIN)
            .args(args)
            .stdout(writer)
            .stderr(Stdio::piped())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{args:?}: {stderr}");
        assert_eq!(stderr, "", "{args:?}");

        // Like `head -c 64`: read a little, then close.
        let (mut reader, writer) = std::io::pipe().unwrap();
        let child = Command::new(BIN)
            .args(args)
            .stdout(writer)
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut first = [0u8; 64];
        reader.read_exact(&mut first).unwrap();
        drop(reader);
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{args:?}: {stderr}");
        assert_eq!(stderr, "", "{args:?}");
    }
}

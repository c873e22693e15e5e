//! The executor: looks at the namespace, runs `nft` or `iptables-restore`
//! with the rendered text, and rolls IPv4 back when IPv6 is refused, so a
//! failure never leaves half a rule set. Everything it decides is computed
//! by the pure modules; this file only runs programs and prints.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::backend::{choose_backend, Backend, Observed, Seen};
use super::iptables::{self, Saved};
use super::plan::{plan, RulePlan};
use super::{nft, Error, Family, InitArgs, Ipv6Mode};

/// Where root's tools live even when PATH lacks them.
const SBIN: [&str; 3] = ["/usr/local/sbin", "/usr/sbin", "/sbin"];

const CAP_HINT: &str = " (init needs CAP_NET_ADMIN in the pod's network namespace)";

/// Writes to stdout. A reader that went away (`--dry-run | head`) is not
/// an error: the rules are installed (or not, for a dry run) all the same.
fn show(text: &str) {
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(text.as_bytes()).and_then(|()| out.flush());
}

/// `portcullis init`: installs (or with `--cleanup` removes) the rules, or
/// prints them with `--dry-run`. Prints the backend it uses on stdout.
pub fn run(args: &InitArgs) -> Result<(), Error> {
    let mut opts = args.options()?;
    if args.ipv6 == Ipv6Mode::Auto {
        opts.ipv6 = ipv6_present();
    }
    let observed = observe();
    let say = |line: String| {
        if args.dry_run {
            show(&format!("# {line}\n"));
        } else {
            show(&format!("{line}\n"));
        }
    };
    let explicit = Backend::from_choice(args.backend);
    if let Some(b) = explicit {
        if !observed.get(b).installed {
            return Err(Error::MissingBinary(b.program().into(), b.install_hint()));
        }
    }

    if args.cleanup {
        let targets: Vec<Backend> = match explicit {
            Some(b) => vec![b],
            None => Backend::ALL
                .into_iter()
                .filter(|&b| observed.get(b).installed && observed.get(b).ours)
                .collect(),
        };
        if targets.is_empty() {
            say("portcullis init: no portcullis rules found; nothing to remove".into());
            return Ok(());
        }
        for b in targets {
            say(format!(
                "portcullis init: backend {b}: removing portcullis rules"
            ));
            remove(b, args.dry_run)?;
        }
        return Ok(());
    }

    let (backend, why) = match explicit {
        Some(b) => (b, "chosen with --backend".to_string()),
        None => choose_backend(&observed)?,
    };
    say(format!("portcullis init: backend {backend} ({why})"));
    let plan = plan(&opts);
    match backend {
        Backend::Nft => apply_nft(&plan, args.dry_run)?,
        Backend::IptablesNft | Backend::IptablesLegacy => {
            apply_iptables(backend, &plan, args.dry_run)?
        }
    }
    // A rerun with another backend must not leave the old set behind.
    for other in Backend::ALL.into_iter().filter(|&b| b != backend) {
        let seen = observed.get(other);
        if seen.installed && seen.ours {
            say(format!(
                "portcullis init: removing the earlier portcullis rules from {other}"
            ));
            remove(other, args.dry_run)?;
        }
    }
    if !args.dry_run {
        let families = if plan.ipv6 {
            "IPv4 and IPv6"
        } else {
            "IPv4 only"
        };
        say(format!(
            "portcullis init: installed ({families}): inbound TCP to :{}, outbound TCP to :{}, uid {} and gid {} exempt",
            opts.inbound_port, opts.outbound_port, opts.proxy_uid, opts.proxy_gid
        ));
    }
    Ok(())
}

/// Whether this network namespace has IPv6 at all.
fn ipv6_present() -> bool {
    Path::new("/proc/net/if_inet6").exists()
        && std::fs::read_to_string("/proc/sys/net/ipv6/conf/all/disable_ipv6")
            .map(|v| v.trim() == "0")
            .unwrap_or(false)
}

/// Looks at each backend: installed, holding our rules, holding others'.
fn observe() -> Observed {
    let nft = if find_program("nft").is_some() {
        let tables = run_tool("nft", &["list", "tables"], None).unwrap_or_default();
        let names: Vec<&str> = tables
            .lines()
            .filter_map(|l| l.trim().strip_prefix("table "))
            .collect();
        // iptables-nft keeps its rules in these tables; they are its, not ours.
        let iptables_nft = |t: &&str| {
            let mut parts = t.split_whitespace();
            matches!(
                (parts.next(), parts.next()),
                (
                    Some("ip" | "ip6"),
                    Some("nat" | "filter" | "mangle" | "raw" | "security")
                )
            )
        };
        Seen {
            installed: true,
            ours: names.contains(&"inet portcullis"),
            others: names
                .iter()
                .any(|t| *t != "inet portcullis" && !iptables_nft(t)),
        }
    } else {
        Seen::default()
    };
    let iptables_seen = |backend: Backend| {
        if find_program(backend.program()).is_none() {
            return Seen::default();
        }
        let mut seen = Seen {
            installed: true,
            ..Seen::default()
        };
        for family in [Family::V4, Family::V6] {
            if let Ok(text) = run_tool(&save_program(backend, family), &[], None) {
                let saved = Saved::parse(&text);
                seen.ours |= saved.has_ours();
                seen.others |= saved.foreign_rules > 0;
            }
        }
        seen
    };
    Observed {
        nft,
        iptables_nft: iptables_seen(Backend::IptablesNft),
        iptables_legacy: iptables_seen(Backend::IptablesLegacy),
    }
}

fn apply_nft(plan: &RulePlan, dry_run: bool) -> Result<(), Error> {
    let script = nft::apply_script(plan);
    if dry_run {
        show(&script);
        return Ok(());
    }
    load("nft", &["-f", "-"], &script)
}

/// Installs each family in its own `iptables-restore` transaction; if a
/// later family is refused, the earlier ones are put back as they were.
fn apply_iptables(backend: Backend, plan: &RulePlan, dry_run: bool) -> Result<(), Error> {
    let families = plan.families();
    let mut done: Vec<(Family, String)> = Vec::new();
    for family in [Family::V4, Family::V6] {
        let wanted = families.contains(&family);
        let before = match run_tool(&save_program(backend, family), &[], None) {
            Ok(text) => text,
            // No IPv6 here and none wanted: nothing to install or remove.
            Err(_) if !wanted => continue,
            Err(e) => return Err(rollback(backend, done, e)),
        };
        let saved = Saved::parse(&before);
        let input = if wanted {
            Some(iptables::apply_input(plan, family, &saved))
        } else {
            // IPv6 was turned off since an earlier run: take its rules away.
            iptables::cleanup_input(family, &saved)
        };
        let Some(input) = input else { continue };
        if dry_run {
            show(&input);
            continue;
        }
        match load(&restore_program(backend, family), &["--noflush"], &input) {
            Ok(()) => done.push((family, before)),
            Err(e) => return Err(rollback(backend, done, e)),
        }
    }
    Ok(())
}

/// Puts our rules in each family of `done` back as its save before the
/// change showed them, then returns the error that caused the rollback (or
/// both, if the rollback failed too).
fn rollback(backend: Backend, done: Vec<(Family, String)>, cause: Error) -> Error {
    for (family, before) in done.into_iter().rev() {
        let result = run_tool(&save_program(backend, family), &[], None).and_then(|now| {
            match iptables::rollback_input(family, &Saved::parse(&before), &Saved::parse(&now)) {
                Some(input) => load(&restore_program(backend, family), &["--noflush"], &input),
                None => Ok(()),
            }
        });
        if let Err(e) = result {
            return Error::Rollback {
                first: Box::new(cause),
                family: family.name(),
                rollback: Box::new(e),
            };
        }
    }
    cause
}

/// Removes our rules from one backend (both families).
fn remove(backend: Backend, dry_run: bool) -> Result<(), Error> {
    match backend {
        Backend::Nft => {
            let script = nft::cleanup_script();
            if dry_run {
                show(&script);
                Ok(())
            } else {
                load("nft", &["-f", "-"], &script)
            }
        }
        Backend::IptablesNft | Backend::IptablesLegacy => {
            for family in [Family::V4, Family::V6] {
                remove_family(backend, family, dry_run)?;
            }
            Ok(())
        }
    }
}

fn remove_family(backend: Backend, family: Family, dry_run: bool) -> Result<(), Error> {
    let Ok(text) = run_tool(&save_program(backend, family), &[], None) else {
        // That family's tables cannot even be listed: nothing of ours there.
        return Ok(());
    };
    let Some(input) = iptables::cleanup_input(family, &Saved::parse(&text)) else {
        return Ok(());
    };
    if dry_run {
        show(&input);
        return Ok(());
    }
    load(&restore_program(backend, family), &["--noflush"], &input)
}

fn flavour(backend: Backend) -> &'static str {
    match backend {
        Backend::IptablesLegacy => "legacy",
        _ => "nft",
    }
}

fn family_prefix(family: Family) -> &'static str {
    match family {
        Family::V4 => "iptables",
        Family::V6 => "ip6tables",
    }
}

fn save_program(backend: Backend, family: Family) -> String {
    format!("{}-{}-save", family_prefix(family), flavour(backend))
}

fn restore_program(backend: Backend, family: Family) -> String {
    format!("{}-{}-restore", family_prefix(family), flavour(backend))
}

/// Feeds `input` to a loader; a refusal becomes one line naming the tool,
/// the kernel's complaint and, where it is clear, the likely cause.
fn load(program: &str, args: &[&str], input: &str) -> Result<(), Error> {
    run_tool(program, args, Some(input)).map(|_| ())
}

/// Runs a program (found in PATH or the sbin directories), returns stdout.
fn run_tool(program: &str, args: &[&str], stdin: Option<&str>) -> Result<String, Error> {
    let path = find_program(program)
        .ok_or_else(|| Error::MissingBinary(program.into(), "install nftables or iptables"))?;
    let mut child = Command::new(&path)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| Error::Spawn(program.into(), e))?;
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        // A loader that dies early closes the pipe; its stderr says why.
        let _ = pipe.write_all(text.as_bytes());
    }
    let out = child
        .wait_with_output()
        .map_err(|e| Error::Spawn(program.into(), e))?;
    if out.status.success() {
        return Ok(String::from_utf8_lossy(&out.stdout).into_owned());
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    let detail = condense(&stderr, out.status.code());
    let tool = format!("{program} {}", args.join(" ")).trim().to_string();
    if stdin.is_none() {
        return Err(Error::Probe {
            tool,
            hint: hint(&stderr),
            detail,
        });
    }
    Err(Error::Refused {
        tool,
        hint: hint(&stderr),
        detail,
    })
}

/// A likely cause for a loader's complaint, or nothing.
fn hint(stderr: &str) -> &'static str {
    let lower = stderr.to_lowercase();
    if lower.contains("operation not permitted") || lower.contains("permission denied") {
        CAP_HINT
    } else if lower.contains("do you need to insmod") || lower.contains("table does not exist") {
        " (the kernel lacks this netfilter table: try the nft backend, or load ip_tables/ip6_tables)"
    } else {
        ""
    }
}

/// A loader's stderr as one line: nft's first error with the rule it
/// points at; for iptables, its lines joined, without the usage advice.
fn condense(stderr: &str, code: Option<i32>) -> String {
    let lines: Vec<&str> = stderr
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .filter(|l| !l.chars().all(|c| matches!(c, '^' | '~' | ' ')))
        .filter(|l| !l.starts_with("Try `"))
        .collect();
    let text = match lines.iter().position(|l| l.contains("Error:")) {
        Some(i) => match lines.get(i + 1) {
            Some(next) if !next.contains("Error:") => format!("{}: {next}", lines[i]),
            _ => lines[i].to_string(),
        },
        None => lines.join("; "),
    };
    match (text.is_empty(), code) {
        (true, Some(c)) => format!("exit status {c}, no message"),
        (true, None) => "killed by a signal".into(),
        (false, _) if text.len() > 400 => {
            let cut = text.char_indices().nth(400).map_or(text.len(), |(i, _)| i);
            format!("{}…", &text[..cut])
        }
        _ => text,
    }
}

/// The full path of `program`, from PATH or the usual sbin directories.
fn find_program(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(SBIN.iter().map(PathBuf::from))
        .map(|dir| dir.join(program))
        .find(|p| is_executable(p))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_become_one_line() {
        let cases: &[(&str, &str)] = &[
            (
                "/dev/stdin:17:3-40: Error: Could not process rule: Operation not permitted\n\t\tmeta skuid 1500 return\n\t\t^^^^^^^^^^^^^^^\n",
                "/dev/stdin:17:3-40: Error: Could not process rule: Operation not permitted: meta skuid 1500 return",
            ),
            (
                "iptables-restore v1.8.9 (nf_tables): unknown option \"--bogus\"\nError occurred at line: 5\nTry `iptables-restore -h' or 'iptables-restore --help' for more information.\n",
                "iptables-restore v1.8.9 (nf_tables): unknown option \"--bogus\"; Error occurred at line: 5",
            ),
            ("", "exit status 1, no message"),
        ];
        for (stderr, want) in cases {
            let got = condense(stderr, Some(1));
            assert_eq!(got, *want);
            assert!(!got.contains('\n'));
        }
        assert_eq!(hint("Error: Operation not permitted"), CAP_HINT);
    }
}

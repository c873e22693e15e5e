//! Reload storm: the server sidecar's rules are rewritten 100 times a
//! second for 10 s, alternating between two valid sets A and B, while HTTP
//! traffic flows through a real sidecar pair. No request may be allowed that
//! neither set allows, and none may fail that both allow.
//!
//! The sets are split over two files so that a reader mixing one file of A
//! with the other of B would allow a path neither set allows
//! (`/x/secret/…` or `/y/secret/…`): a torn read shows up as a violation.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::app::{get, h1, App};
use crate::common::*;

/// How often and how long the rules are rewritten.
const WRITE_EVERY: Duration = Duration::from_millis(10);
const STORM: Duration = Duration::from_secs(10);

/// What each probed path must do under either set.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Expect {
    /// Allowed by A and by B: must always be answered by the app.
    Both,
    /// Allowed by one set only: either answer is right.
    One,
    /// Allowed by neither: must never reach the app.
    Neither,
}

const PROBES: &[(&str, Expect)] = &[
    ("/both/page", Expect::Both),
    ("/x/page", Expect::One),
    ("/y/page", Expect::One),
    ("/x/secret/key", Expect::Neither),
    ("/y/secret/key", Expect::Neither),
    ("/none/page", Expect::Neither),
];

/// Comment-only files read between the two halves of a set, widening the
/// window in which a reader could see a swap mid-read.
const PADDING: usize = 40;

/// The files of set A (`open` = "x") or B (`open` = "y"): the first allows
/// `/both/**` and `/<open>/**`, the last denies `/<open>/secret/**`, and
/// comment-only padding sits between them.
fn rule_files(port: u16, open: &str) -> Vec<(String, String)> {
    let allow = format!(
        "rules:\n  - name: both-public\n    action: allow\n    ports: [{port}]\n    http:\n      paths: [\"/both/**\"]\n  - name: {open}-open\n    action: allow\n    ports: [{port}]\n    http:\n      paths: [\"/{open}/**\"]\n"
    );
    let deny = format!(
        "rules:\n  - name: {open}-secret-closed\n    action: deny\n    ports: [{port}]\n    http:\n      paths: [\"/{open}/secret/**\"]\n"
    );
    let mut files = vec![("10-allow.yaml".to_string(), allow)];
    files.extend((0..PADDING).map(|i| (format!("15-pad-{i:02}.yaml"), format!("# set {open}\n"))));
    files.push(("20-deny.yaml".to_string(), deny));
    files
}

/// How new rule files land in the directory.
#[derive(Clone, Copy, Debug)]
pub enum Layout {
    /// One file holding both halves, replaced by write-temp-then-rename.
    RenameOneFile,
    /// Kubernetes' ConfigMap volume: the files are symlinks through
    /// `..data`, which is swapped atomically to a new version directory;
    /// the old version directory is then deleted.
    ConfigMap,
}

/// Writes one version of the rules into `dir` in `layout`.
fn publish(dir: &Path, layout: Layout, version: usize, files: &[(String, String)]) {
    match layout {
        Layout::RenameOneFile => {
            let deny = &files[files.len() - 1].1;
            let joined = format!("{}{}", files[0].1, deny.trim_start_matches("rules:\n"));
            write_atomic(&dir.join("policy.yaml"), joined.as_bytes());
        }
        Layout::ConfigMap => {
            let name = format!("..v{version:05}");
            let vdir = dir.join(&name);
            std::fs::create_dir(&vdir).unwrap();
            for (file, text) in files {
                std::fs::write(vdir.join(file), text).unwrap();
            }
            let tmp = dir.join("..data_tmp");
            std::os::unix::fs::symlink(&name, &tmp).unwrap();
            let old = std::fs::read_link(dir.join("..data")).ok();
            std::fs::rename(&tmp, dir.join("..data")).unwrap();
            for (file, _) in files {
                let link = dir.join(file);
                if std::fs::symlink_metadata(&link).is_err() {
                    std::os::unix::fs::symlink(PathBuf::from("..data").join(file), &link).unwrap();
                }
            }
            if let Some(old) = old {
                std::fs::remove_dir_all(dir.join(old)).unwrap();
            }
        }
    }
}

/// Answers seen for one path.
#[derive(Default, Debug)]
struct Tally {
    allowed: usize,
    denied: usize,
    /// Other statuses or failed requests, with the first few reasons.
    failed: usize,
    reasons: Vec<String>,
}

type Tallies = Arc<Mutex<BTreeMap<&'static str, Tally>>>;

fn record(tallies: &Tallies, path: &'static str, answer: Result<(u16, String), String>) {
    let mut t = tallies.lock().unwrap();
    let t = t.entry(path).or_default();
    match answer {
        Ok((200, body)) if body == path => t.allowed += 1,
        Ok((403, _)) => t.denied += 1,
        other => {
            t.failed += 1;
            if t.reasons.len() < 5 {
                t.reasons.push(format!("{other:?}"));
            }
        }
    }
}

/// Keeps sending the probes until `stop`: over one keep-alive connection
/// (reopened if it fails), or a new connection per request.
fn traffic(
    addr: std::net::SocketAddr,
    keep_alive: bool,
    stop: Arc<AtomicBool>,
    tallies: Tallies,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        let mut conn = None;
        'outer: while !stop.load(Ordering::Relaxed) && tokio::time::Instant::now() < deadline {
            for (path, _) in PROBES {
                if stop.load(Ordering::Relaxed) {
                    break 'outer;
                }
                if conn.is_none() {
                    match h1(addr).await {
                        Ok(c) => conn = Some(c),
                        Err(e) => {
                            record(&tallies, path, Err(format!("connect: {e}")));
                            continue;
                        }
                    }
                }
                let send = conn.as_mut().expect("connected above");
                let answer = tokio::time::timeout(Duration::from_secs(5), get(send, path))
                    .await
                    .unwrap_or_else(|_| Err("no answer in 5 s".into()));
                if answer.is_err() || !keep_alive {
                    conn = None;
                }
                record(&tallies, path, answer);
            }
        }
    })
}

/// Runs the storm in `layout` and checks the invariants.
pub async fn storm(layout: Layout) {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::root(dir.path(), "ca", TD);
    let app = App::start().await;
    // On tmpfs, as kubelet's ConfigMap volumes are (and fast enough for
    // 100 versions a second on a busy machine).
    let shm = tempfile::tempdir_in("/dev/shm")
        .or_else(|_| tempfile::tempdir())
        .unwrap();
    let rules = shm.path().join("rules");
    std::fs::create_dir(&rules).unwrap();
    let sets = [
        rule_files(app.addr.port(), "x"),
        rule_files(app.addr.port(), "y"),
    ];
    publish(&rules, layout, 0, &sets[0]);
    let mut b_args = issuer_args(&ca, &ca.files.cert, "server");
    b_args.extend([
        "--inbound-target".into(),
        app.addr.to_string(),
        "--rules-dir".into(),
        rules.display().to_string(),
    ]);
    let b = Sidecar::start(&b_args).await;
    let mut a_args = issuer_args(&ca, &ca.files.cert, "client");
    a_args.extend([
        "--upstream".into(),
        format!("127.0.0.1:0={}", b.addrs.inbound),
    ]);
    let a = Sidecar::start(&a_args).await;
    let addr = a.upstream();
    let ok_before = b.metric("portcullis_rules_reloads_total", &[("result", "ok")]);

    let stop = Arc::new(AtomicBool::new(false));
    let tallies = Tallies::default();
    let workers: Vec<_> = [true, true, true, false]
        .into_iter()
        .map(|keep| traffic(addr, keep, stop.clone(), tallies.clone()))
        .collect();
    // The writer paces itself on its own thread (not a runtime worker), at
    // one write per WRITE_EVERY slot, catching up when it falls behind.
    let writer = {
        let (rules, sets) = (rules.clone(), sets.clone());
        std::thread::spawn(move || {
            let start = std::time::Instant::now();
            let mut writes = 0;
            while start.elapsed() < STORM {
                writes += 1;
                publish(&rules, layout, writes, &sets[writes % 2]);
                let next = WRITE_EVERY * writes as u32;
                if let Some(wait) = next.checked_sub(start.elapsed()) {
                    std::thread::sleep(wait);
                }
            }
            // End on set B ("y").
            if writes % 2 == 0 {
                writes += 1;
                publish(&rules, layout, writes, &sets[1]);
            }
            writes
        })
    };
    let writes = tokio::task::spawn_blocking(move || writer.join().unwrap())
        .await
        .unwrap();
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.await.unwrap();
    }

    // The last write was set B ("y"): it must end up active.
    eventually("set B is active", Duration::from_secs(10), || async {
        let Ok(mut c) = h1(addr).await else {
            return false;
        };
        matches!(get(&mut c, "/y/page").await, Ok((200, _)))
            && matches!(get(&mut c, "/x/page").await, Ok((403, _)))
    })
    .await;
    let applied = b.metric("portcullis_rules_reloads_total", &[("result", "ok")]) - ok_before;
    let refused = b.metric("portcullis_rules_reloads_total", &[("result", "error")]);
    let tallies = tallies.lock().unwrap();
    let total: usize = tallies
        .values()
        .map(|t| t.allowed + t.denied + t.failed)
        .sum();
    eprintln!(
        "reload storm ({layout:?}): {writes} writes in {STORM:?}, {applied} reloads applied, {refused} refused, {total} requests: {tallies:?}"
    );
    let seen = app.seen();
    for (path, expect) in PROBES {
        let t = tallies.get(path).expect("every path was probed");
        match expect {
            Expect::Both => assert_eq!(
                (t.denied, t.failed),
                (0, 0),
                "{path} is allowed by both sets but failed: {t:?}"
            ),
            Expect::Neither => {
                assert_eq!(t.allowed, 0, "{path} is allowed by neither set: {t:?}");
                assert!(!seen.iter().any(|s| s == path), "{path} reached the app");
            }
            Expect::One => assert_eq!(t.failed, 0, "{path}: {t:?}"),
        }
    }
    assert!(total > 500, "only {total} requests were made");
    assert!(applied >= 1.0, "no reload was applied");
    assert!(writes >= 300, "only {writes} writes in {STORM:?}");
}

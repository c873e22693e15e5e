use std::time::Instant;

use super::*;
use crate::authz::{authorize, Connection, Peer};
use crate::identity::{SpiffeId, TrustDomain};

const ALLOW_80: &str = "rules:\n  - name: web-in\n    action: allow\n    ports: [80]\n";
const DENY_80: &str = "rules:\n  - name: web-closed\n    action: deny\n    ports: [80]\n";

fn metrics() -> (prometheus::Registry, AuthzMetrics) {
    let r = prometheus::Registry::new();
    let m = AuthzMetrics::new(&r);
    (r, m)
}

fn encoded(r: &prometheus::Registry) -> String {
    use prometheus::Encoder;
    let mut buf = Vec::new();
    prometheus::TextEncoder::new()
        .encode(&r.gather(), &mut buf)
        .unwrap();
    String::from_utf8(buf).unwrap()
}

fn allowed_on_80(rules: &LiveRules) -> bool {
    let peer = Peer::Mesh(SpiffeId::parse("spiffe://cluster.local/ns/a/sa/b").unwrap());
    let conn = Connection {
        peer: &peer,
        source: "10.0.0.1".parse().unwrap(),
        port: 80,
    };
    let td = TrustDomain::new("cluster.local").unwrap();
    authorize(&rules.current(), &td, DefaultPolicy::Deny, &conn, None).allowed
}

async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "timed out: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Lays out a directory the way the kubelet mounts a ConfigMap.
fn configmap_version(dir: &Path, version: u32, file: &str, text: &str) {
    let data = dir.join(format!("..{version}"));
    std::fs::create_dir(&data).unwrap();
    std::fs::write(data.join(file), text).unwrap();
    let tmp = dir.join("..data_tmp");
    std::os::unix::fs::symlink(format!("..{version}"), &tmp).unwrap();
    std::fs::rename(&tmp, dir.join("..data")).unwrap();
    let link = dir.join(file);
    if link.symlink_metadata().is_err() {
        std::os::unix::fs::symlink(format!("..data/{file}"), link).unwrap();
    }
}

#[tokio::test]
async fn configmap_symlink_swap_flips_a_decision() {
    let dir = tempfile::tempdir().unwrap();
    configmap_version(dir.path(), 1, "rules.yaml", ALLOW_80);
    let (registry, m) = metrics();
    let rules = LiveRules::load(dir.path(), true, DefaultPolicy::Deny, m).unwrap();
    assert!(allowed_on_80(&rules));
    let first = rules.current().hash().to_string();
    let mut updates = rules.subscribe();
    let stop = CancellationToken::new();
    rules
        .spawn_reloader(Duration::from_secs(3600), stop.clone())
        .unwrap();

    configmap_version(dir.path(), 2, "rules.yaml", DENY_80);
    eventually("the new rules", || !allowed_on_80(&rules)).await;
    assert!(updates.has_changed().unwrap());
    assert_ne!(updates.borrow_and_update().hash(), first);
    let text = encoded(&registry);
    let hash = rules.current().hash().to_string();
    assert!(
        text.contains(&format!("portcullis_rules_info{{hash=\"{hash}\"}} 1")),
        "{text}"
    );
    assert!(!text.contains(&first), "the old hash is gone: {text}");
    assert!(
        text.contains("portcullis_rules_reloads_total{result=\"ok\"} 2"),
        "{text}"
    );
    stop.cancel();
}

#[tokio::test]
async fn editor_rename_and_new_files_are_seen() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("a.yaml"), ALLOW_80).unwrap();
    let (_r, m) = metrics();
    let rules = LiveRules::load(dir.path(), false, DefaultPolicy::Deny, m).unwrap();
    let stop = CancellationToken::new();
    rules
        .spawn_reloader(Duration::from_secs(3600), stop.clone())
        .unwrap();
    // An editor writes a temporary file, then renames it over the original.
    std::fs::write(dir.path().join(".a.yaml.tmp"), DENY_80).unwrap();
    std::fs::rename(dir.path().join(".a.yaml.tmp"), dir.path().join("a.yaml")).unwrap();
    eventually("the renamed file", || !allowed_on_80(&rules)).await;
    std::fs::write(
        dir.path().join("b.yml"),
        "rules:\n  - name: extra\n    action: audit\n",
    )
    .unwrap();
    eventually("the added file", || rules.current().len() == 2).await;
    std::fs::remove_file(dir.path().join("a.yaml")).unwrap();
    eventually("the deleted file", || rules.current().len() == 1).await;
    stop.cancel();
}

#[tokio::test]
async fn an_invalid_file_keeps_the_active_set() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("a.yaml"), ALLOW_80).unwrap();
    let (registry, m) = metrics();
    let rules = LiveRules::load(dir.path(), true, DefaultPolicy::Deny, m).unwrap();
    let good = rules.current().hash().to_string();

    let bad = dir.path().join("b.yaml");
    std::fs::write(
        &bad,
        "rules:\n  - name: x\n    action: allow\n    ports: [\"1-0\"]\n",
    )
    .unwrap();
    let ReloadOutcome::Refused(msg) = rules.reload(false) else {
        panic!("a bad file was accepted")
    };
    assert_eq!(
        msg,
        format!(
            "{}:4:13: rules[0].ports[0]: invalid port \"1-0\": use a port 1-65535 or a range like \"9000-9100\"",
            bad.display()
        )
    );
    assert_eq!(rules.current().hash(), good);
    assert!(allowed_on_80(&rules));
    let status = rules.status();
    assert_eq!(status.last_error.as_ref().unwrap().message, msg);
    assert_eq!(status.hash, good);
    let json = serde_json::to_value(&status).unwrap();
    assert_eq!(json["rule_count"], 1);
    assert_eq!(json["last_error"]["message"], msg.as_str());

    // The same bad content is reported once.
    assert_eq!(rules.reload(false), ReloadOutcome::Unchanged);
    let text = encoded(&registry);
    assert!(
        text.contains("portcullis_rules_reloads_total{result=\"error\"} 1"),
        "{text}"
    );

    std::fs::write(
        &bad,
        "rules:\n  - name: x\n    action: deny\n    ports: [80]\n",
    )
    .unwrap();
    assert_eq!(rules.reload(false), ReloadOutcome::Applied);
    assert!(!allowed_on_80(&rules));
    assert!(rules.status().last_error.is_none());
    assert_eq!(rules.reload(false), ReloadOutcome::Unchanged);
    // SIGHUP forces a re-read even when nothing changed.
    assert_eq!(rules.reload(true), ReloadOutcome::Applied);
}

#[tokio::test]
async fn a_missing_directory_is_an_error_only_when_asked_for() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("rules");
    let (_r, m) = metrics();
    let e = LiveRules::load(&missing, true, DefaultPolicy::Authenticated, m.clone())
        .err()
        .unwrap();
    assert!(e.to_string().contains("does not exist"), "{e}");
    let rules = LiveRules::load(&missing, false, DefaultPolicy::Authenticated, m).unwrap();
    assert!(rules.current().is_empty());
    // While it is missing nothing changes, and nothing is reported as an error.
    assert_eq!(rules.reload(false), ReloadOutcome::Unchanged);
    assert!(rules.status().last_error.is_none());
    std::fs::create_dir(&missing).unwrap();
    std::fs::write(missing.join("a.yaml"), ALLOW_80).unwrap();
    assert_eq!(rules.reload(false), ReloadOutcome::Applied);
    assert_eq!(rules.current().len(), 1);
    // Once it had rules, losing the directory keeps them and is reported.
    std::fs::remove_dir_all(&missing).unwrap();
    assert!(matches!(rules.reload(false), ReloadOutcome::Refused(_)));
    assert_eq!(rules.current().len(), 1);

    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let (_r, m) = metrics();
    assert!(LiveRules::load(&empty, true, DefaultPolicy::Deny, m.clone()).is_err());
    assert!(LiveRules::load(&empty, false, DefaultPolicy::Deny, m).is_ok());
}

#[tokio::test]
async fn emptying_a_required_directory_keeps_the_rules() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("a.yaml"), ALLOW_80).unwrap();
    let (_r, m) = metrics();
    let rules = LiveRules::load(dir.path(), true, DefaultPolicy::Deny, m).unwrap();
    std::fs::remove_file(dir.path().join("a.yaml")).unwrap();
    assert!(matches!(rules.reload(false), ReloadOutcome::Refused(_)));
    assert_eq!(rules.current().len(), 1);
}

#[test]
fn settle_waits_for_a_fresh_file_only() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("a.yaml");
    std::fs::write(&file, ALLOW_80).unwrap();
    let written = std::time::SystemTime::now();
    settle(dir.path());
    let waited = written.elapsed().unwrap();
    assert!(
        waited >= SETTLE_TIME - Duration::from_millis(5),
        "{waited:?}"
    );
    assert!(waited < SETTLE_MAX + Duration::from_secs(1), "{waited:?}");

    // A file last modified long ago is read at once.
    let old = std::time::SystemTime::now() - Duration::from_secs(3600);
    std::fs::File::options()
        .write(true)
        .open(&file)
        .unwrap()
        .set_modified(old)
        .unwrap();
    let started = Instant::now();
    settle(dir.path());
    assert!(started.elapsed() < SETTLE_TIME, "{:?}", started.elapsed());
}

#[test]
fn the_summary_hides_file_names_and_error_text() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("a.yaml"), ALLOW_80).unwrap();
    let (_r, m) = metrics();
    let rules = LiveRules::load(dir.path(), true, DefaultPolicy::Deny, m).unwrap();
    std::fs::write(
        dir.path().join("b.yaml"),
        "rules:\n  - name: secret-value\n    action: maybe\n",
    )
    .unwrap();
    assert!(matches!(rules.reload(false), ReloadOutcome::Refused(_)));
    let full = serde_json::to_value(rules.status()).unwrap();
    assert_eq!(full["valid"], false);
    assert_eq!(full["last_error"]["position"], "b.yaml:3:13");
    let summary = serde_json::to_value(rules.status().summary()).unwrap();
    let text = summary.to_string();
    assert_eq!(summary["last_error"]["position"], "b.yaml:3:13");
    assert_eq!(summary["rule_count"], 1);
    assert_eq!(summary["file_count"], 1);
    assert_eq!(summary["valid"], false);
    for hidden in ["maybe", "secret-value", "a.yaml", "message", "dir"] {
        assert!(!text.contains(hidden), "{hidden} in {text}");
    }
}

#[tokio::test]
async fn a_reload_over_its_deadline_is_refused_once_and_two_overruns_fill_the_slot() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("a.yaml"), ALLOW_80).unwrap();
    let (registry, m) = metrics();
    let rules = LiveRules::load(dir.path(), true, DefaultPolicy::Deny, m).unwrap();
    let good = rules.current().hash().to_string();
    std::fs::write(dir.path().join("a.yaml"), DENY_80).unwrap();
    let slot = ParseSlot::new();
    // A parse that cannot finish: another thread holds the reload lock.
    let (locked, wait_locked) = std::sync::mpsc::channel();
    let (release, wait_release) = std::sync::mpsc::channel::<()>();
    let holder = rules.clone();
    let stuck = std::thread::spawn(move || {
        let _guard = holder.inner.reloading.lock().unwrap();
        locked.send(()).unwrap();
        let _ = wait_release.recv();
    });
    wait_locked.recv().unwrap();
    let ran = rules
        .reload_within(&slot, false, Duration::from_millis(50))
        .await;
    assert!(!ran);
    let status = rules.status();
    let error = status.last_error.expect("the overrun is an error");
    assert!(
        error
            .message
            .ends_with("parsing took longer than 50ms; refused; keeping the active rules"),
        "{}",
        error.message
    );
    assert_eq!(rules.current().hash(), good);
    // One more parse starts beside it (and, the lock still held, overruns
    // too); then no other parse starts.
    assert!(
        !rules
            .reload_within(&slot, false, Duration::from_millis(50))
            .await
    );
    assert_eq!(slot.alive(), 2);
    assert!(
        !rules
            .reload_within(&slot, false, Duration::from_secs(5))
            .await
    );
    assert!(
        encoded(&registry).contains("portcullis_rules_reloads_total{result=\"error\"} 1"),
        "{}",
        encoded(&registry)
    );
    release.send(()).unwrap();
    stuck.join().unwrap();
    eventually("the slot is free", || !slot.is_busy()).await;
    eventually("the new rules", || !allowed_on_80(&rules)).await;
    assert!(
        rules
            .reload_within(&slot, false, Duration::from_secs(5))
            .await
    );
}

/// About 900 KB of valid rules: a parse that takes a while.
fn slow_rules() -> String {
    let mut s = String::from("rules:\n");
    for i in 0..9_000 {
        s.push_str(&format!(
            "  - name: r{i}\n    action: allow\n    ports: [81]\n    http: {{paths: [/a/{i}, /b]}}\n"
        ));
    }
    s
}

#[tokio::test]
async fn a_parse_over_its_deadline_does_not_block_the_next_file_nor_undo_it() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("a.yaml"), ALLOW_80).unwrap();
    let (_registry, m) = metrics();
    let rules = LiveRules::load(dir.path(), true, DefaultPolicy::Deny, m).unwrap();
    let slow = slow_rules();
    assert!(slow.len() < crate::file_limits::RULE_FILE_MAX_BYTES as usize);
    std::fs::write(dir.path().join("b.yaml"), &slow).unwrap();
    let slot = ParseSlot::new();
    assert!(
        !rules
            .reload_within(&slot, false, Duration::from_millis(1))
            .await
    );
    // The slow file has been read and is being parsed.
    eventually("the slow parse", || rules.state().parsing.is_some()).await;
    let parsing_slowly = slot.alive() == 1;
    std::fs::remove_file(dir.path().join("b.yaml")).unwrap();
    std::fs::write(dir.path().join("a.yaml"), DENY_80).unwrap();
    let started = Instant::now();
    assert!(
        rules
            .reload_within(&slot, false, Duration::from_secs(5))
            .await,
        "the next file waited for the slow parse"
    );
    assert!(!allowed_on_80(&rules), "the deny applies");
    eprintln!(
        "deny applied after {:?}; slow parse alive when it started: {parsing_slowly}, now: {}",
        started.elapsed(),
        slot.alive()
    );
    // The slow parse ends; its stale result never replaces the deny.
    eventually("the slow parse ended", || slot.alive() == 0).await;
    assert!(!allowed_on_80(&rules));
    assert_eq!(rules.current().len(), 1);
}

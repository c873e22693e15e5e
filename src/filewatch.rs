//! Change notification for mounted files (issuer, trust bundle, rules).
//!
//! Kubernetes updates a mounted ConfigMap or Secret by swapping a `..data`
//! symlink, and editors replace files by renaming a temporary one, so the
//! watch is on each file's directory rather than the file. Events only say
//! "look again": readers compare content hashes, and a periodic poll catches
//! anything the kernel did not report.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use notify::{RecursiveMode, Watcher};
use prometheus::IntCounterVec;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn, Instrument};

use crate::file_limits::{
    read_capped, scrub, ParseSlot, SlotError, PARSE_DEADLINE, PEM_FILE_MAX_BYTES,
};

/// Wait this long after an event so a burst of writes is read once, whole.
const DEBOUNCE: Duration = Duration::from_millis(50);

/// Wakes its owner when anything in the watched files' directories changes,
/// and at least every `poll` interval.
pub struct FileWatch {
    events: mpsc::Receiver<()>,
    poll: Duration,
    _watcher: notify::RecommendedWatcher,
}

impl FileWatch {
    /// Watches the directories that hold `paths`.
    pub fn new(paths: &[&Path], poll: Duration) -> notify::Result<Self> {
        let (tx, events) = mpsc::channel(1);
        let mut watcher =
            notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
                // Reads (ours included) raise access events; only changes
                // matter, or every reload would wake the next one.
                if res.is_ok_and(|e| !matches!(e.kind, notify::EventKind::Access(_))) {
                    let _ = tx.try_send(());
                }
            })?;
        let dirs: BTreeSet<PathBuf> = paths.iter().map(|p| watch_dir(p)).collect();
        for dir in dirs {
            watcher.watch(&dir, RecursiveMode::NonRecursive)?;
        }
        Ok(FileWatch {
            events,
            poll,
            _watcher: watcher,
        })
    }

    /// Returns once something may have changed.
    pub async fn changed(&mut self) {
        tokio::select! {
            _ = self.events.recv() => {
                tokio::time::sleep(DEBOUNCE).await;
                while self.events.try_recv().is_ok() {}
            }
            _ = tokio::time::sleep(self.poll) => {}
        }
    }
}

/// The directory to watch for `path`: its parent, or the path itself when it is a directory.
fn watch_dir(path: &Path) -> PathBuf {
    if path.is_dir() {
        return path.to_path_buf();
    }
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Keeps one piece of file-backed state current: on every wake-up it reads
/// the files, and if their content changed it parses them and applies the
/// result. A bad new version is refused, logged and counted once, and the
/// previous state stays in use. Reading and parsing run on the parse slot's
/// own thread with a deadline, so no file can stall the runtime.
pub struct Reloader<T> {
    what: &'static str,
    valid: Option<prometheus::IntGauge>,
    paths: Vec<PathBuf>,
    parse: Arc<ParseFn<T>>,
    apply: Box<dyn Fn(T) + Send + Sync>,
    outcomes: IntCounterVec,
    last_hash: String,
    slot: ParseSlot,
}

type ParseFn<T> = dyn Fn(&[Vec<u8>]) -> Result<T, String> + Send + Sync;

/// What one read-and-parse found.
enum Found<T> {
    Same,
    Parsed(String, T),
    Bad(String, String),
}

/// Reads every file (each within [`PEM_FILE_MAX_BYTES`]: every caller
/// reads PEM certificates or keys), or says which one could not be read.
pub fn read_all(paths: &[PathBuf]) -> Result<Vec<Vec<u8>>, String> {
    paths
        .iter()
        .map(|p| read_capped(p, PEM_FILE_MAX_BYTES).map_err(|e| e.to_string()))
        .collect()
}

impl<T: Send + 'static> Reloader<T> {
    /// `initial` is the content already applied at start-up.
    pub fn new(
        what: &'static str,
        paths: Vec<PathBuf>,
        initial: &[Vec<u8>],
        parse: impl Fn(&[Vec<u8>]) -> Result<T, String> + Send + Sync + 'static,
        apply: impl Fn(T) + Send + Sync + 'static,
        outcomes: IntCounterVec,
    ) -> Self {
        Reloader {
            what,
            valid: None,
            last_hash: hash_all(initial),
            paths,
            parse: Arc::new(parse),
            apply: Box::new(apply),
            outcomes,
            slot: ParseSlot::new(),
        }
    }

    /// Also sets `gauge` to 1 after every applied version and to 0 after
    /// every refused one (the `*_valid` metrics).
    pub fn with_validity(mut self, gauge: prometheus::IntGauge) -> Self {
        gauge.set(1);
        self.valid = Some(gauge);
        self
    }

    fn set_valid(&self, ok: bool) {
        if let Some(g) = &self.valid {
            g.set(i64::from(ok));
        }
    }

    /// Reads the files again and applies them if they changed and are good.
    pub async fn reload(&mut self) {
        let (paths, parse, last) = (
            self.paths.clone(),
            self.parse.clone(),
            self.last_hash.clone(),
        );
        let work = move || {
            let contents = match read_all(&paths) {
                Ok(c) => c,
                Err(msg) => return Found::Bad(content_hash(&[msg.as_bytes()]), msg),
            };
            let hash = hash_all(&contents);
            if hash == last {
                return Found::Same;
            }
            match parse(&contents) {
                Ok(value) => Found::Parsed(hash, value),
                Err(msg) => Found::Bad(hash, msg),
            }
        };
        match self.slot.run(PARSE_DEADLINE, work).await {
            Ok(Found::Same) => {}
            Ok(Found::Parsed(hash, value)) => {
                info!(what = self.what, hash = %hash, "reloaded");
                self.outcomes.with_label_values(&["ok"]).inc();
                self.set_valid(true);
                self.last_hash = hash;
                (self.apply)(value);
            }
            Ok(Found::Bad(hash, msg)) => self.refuse(hash, &msg),
            Err(SlotError::Busy) => {
                debug!(what = self.what, "two previous parses are still running")
            }
            Err(e) => self.refuse("slot".into(), &e.to_string()),
        }
    }

    fn refuse(&mut self, hash: String, msg: &str) {
        if hash != self.last_hash {
            let msg = scrub(msg);
            warn!(what = self.what, error = %msg, "reload refused; keeping the previous version");
            self.outcomes.with_label_values(&["error"]).inc();
            self.set_valid(false);
            self.last_hash = hash;
        }
    }

    /// Reloads on every change until shutdown.
    pub fn spawn(mut self, poll: Duration, shutdown: CancellationToken) -> notify::Result<()> {
        let refs: Vec<&Path> = self.paths.iter().map(|p| p.as_path()).collect();
        let mut watch = FileWatch::new(&refs, poll)?;
        let span = tracing::info_span!("reload", what = self.what);
        tokio::spawn(
            async move {
                loop {
                    tokio::select! {
                        _ = watch.changed() => {}
                        _ = shutdown.cancelled() => return,
                    }
                    tokio::select! {
                        _ = self.reload() => {}
                        _ = shutdown.cancelled() => return,
                    }
                }
            }
            .instrument(span),
        );
        Ok(())
    }
}

fn hash_all(contents: &[Vec<u8>]) -> String {
    let parts: Vec<&[u8]> = contents.iter().map(|c| c.as_slice()).collect();
    content_hash(&parts)
}

/// A short content hash, to tell whether a reload has anything new.
pub fn content_hash(parts: &[&[u8]]) -> String {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    for part in parts {
        ctx.update(&(part.len() as u64).to_be_bytes());
        ctx.update(part);
    }
    ctx.finish().as_ref()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn wakes_on_symlink_swap() {
        let dir = tempfile::tempdir().unwrap();
        let data1 = dir.path().join("..data_1");
        std::fs::create_dir(&data1).unwrap();
        std::fs::write(data1.join("f"), "one").unwrap();
        std::os::unix::fs::symlink("..data_1", dir.path().join("..data")).unwrap();
        std::os::unix::fs::symlink("..data/f", dir.path().join("f")).unwrap();
        let file = dir.path().join("f");
        let mut watch = FileWatch::new(&[&file], Duration::from_secs(3600)).unwrap();

        let data2 = dir.path().join("..data_2");
        std::fs::create_dir(&data2).unwrap();
        std::fs::write(data2.join("f"), "two").unwrap();
        std::os::unix::fs::symlink("..data_2", dir.path().join("..data_tmp")).unwrap();
        std::fs::rename(dir.path().join("..data_tmp"), dir.path().join("..data")).unwrap();
        tokio::time::timeout(Duration::from_secs(5), watch.changed())
            .await
            .expect("no wake-up");
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "two");
    }

    #[tokio::test]
    async fn reading_a_file_does_not_wake_the_watch() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f");
        std::fs::write(&file, "x").unwrap();
        let mut watch = FileWatch::new(&[&file], Duration::from_secs(3600)).unwrap();
        for _ in 0..5 {
            std::fs::read(&file).unwrap();
        }
        let woke = tokio::time::timeout(Duration::from_millis(300), watch.changed()).await;
        assert!(woke.is_err(), "a read woke the watch");
    }

    #[test]
    fn hash_tells_parts_apart() {
        assert_ne!(content_hash(&[b"ab", b"c"]), content_hash(&[b"a", b"bc"]));
        assert_eq!(content_hash(&[b"x"]), content_hash(&[b"x"]));
    }
}

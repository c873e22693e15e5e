//! The live rule set: loaded from `--rules-dir` at start-up and replaced
//! atomically whenever the directory changes, on SIGHUP, and on every poll.
//!
//! A reload reads all files, and only if their hash differs from the active
//! set parses and validates the whole set; then it swaps it in. Anything
//! wrong and nothing changes: the error is logged once per distinct
//! content, counted, and kept for `GET /rules`. Readers take the `Arc` once
//! per request or connection; `subscribe` lets open connections re-check.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use serde::Serialize;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn, Instrument};

use super::load::{compile, hash_sources, read_sources, Source};
use super::{AuthzMetrics, DefaultPolicy, Error, RuleSet};
use crate::file_limits::{ParseSlot, SlotError, PARSE_DEADLINE, SETTLE_MAX, SETTLE_TIME};
use crate::filewatch::FileWatch;

#[cfg(test)]
mod tests;

/// A refused reload, as shown by the admin endpoint.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ReloadError {
    /// `file:line:column: message`, or an I/O error.
    pub message: String,
    /// `file-name:line:column` (or the file name alone) when the error is in a file.
    pub position: Option<String>,
    /// When it was first seen (RFC 3339).
    pub at: String,
}

/// The body of `GET /rules` for loopback clients.
#[derive(Debug, Clone, Serialize)]
pub struct RulesStatus {
    pub dir: Option<String>,
    pub hash: String,
    pub loaded_at: String,
    pub rule_count: usize,
    pub file_count: usize,
    /// Whether the files on disk are the active set (no refused reload).
    pub valid: bool,
    pub files: Vec<String>,
    pub last_error: Option<ReloadError>,
}

/// The body of `GET /rules` for other clients: no file names beyond the
/// error position, and no error text (an error may quote a file).
#[derive(Debug, Clone, Serialize)]
pub struct RulesSummary {
    pub hash: String,
    pub loaded_at: String,
    pub rule_count: usize,
    pub file_count: usize,
    pub valid: bool,
    pub last_error: Option<ErrorPosition>,
}

/// Where a refused reload's error is, without its text.
#[derive(Debug, Clone, Serialize)]
pub struct ErrorPosition {
    pub position: Option<String>,
    pub at: String,
}

impl RulesStatus {
    /// The part any client may see.
    pub fn summary(&self) -> RulesSummary {
        RulesSummary {
            hash: self.hash.clone(),
            loaded_at: self.loaded_at.clone(),
            rule_count: self.rule_count,
            file_count: self.file_count,
            valid: self.valid,
            last_error: self.last_error.as_ref().map(|e| ErrorPosition {
                position: e.position.clone(),
                at: e.at.clone(),
            }),
        }
    }
}

/// What one reload did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReloadOutcome {
    /// The files are the active set's (or the already refused ones).
    Unchanged,
    /// A new set is active.
    Applied,
    /// The new files were refused; the message is also `last_error`.
    Refused(String),
}

/// The handle to the live rules; cheap to clone.
#[derive(Clone)]
pub struct LiveRules {
    inner: Arc<Inner>,
}

struct Inner {
    dir: Option<PathBuf>,
    required: bool,
    current: ArcSwap<RuleSet>,
    tx: watch::Sender<Arc<RuleSet>>,
    /// Held while a reload reads the directory and while it applies its
    /// result (not while it parses), so reads and swaps never interleave;
    /// `state` is only held briefly, so `status` never waits for a parse.
    reloading: Mutex<()>,
    state: Mutex<State>,
    metrics: AuthzMetrics,
}

/// The writer's bookkeeping.
#[derive(Default)]
struct State {
    last_error: Option<ReloadError>,
    /// Hash of the content last refused, so one bad version is logged once.
    refused_hash: Option<String>,
    /// Hash of the content being parsed now, so a parse that overruns its
    /// deadline is refused (and logged) once under that hash.
    parsing: Option<String>,
    /// Ticket of the newest read of the directory that supersedes parses
    /// in flight (see [`LiveRules::reload`]).
    newest: u64,
}

pub(crate) fn rfc3339(t: SystemTime) -> String {
    time::OffsetDateTime::from(t)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

impl LiveRules {
    /// Loads `dir` at start-up. A bad file is always an error. A missing
    /// directory, or one without rule files, is an error only when
    /// `required` (the user asked for rules); otherwise the set is empty
    /// and one log line says what the default policy then does.
    pub fn load(
        dir: &Path,
        required: bool,
        default: DefaultPolicy,
        metrics: AuthzMetrics,
    ) -> Result<Self, Error> {
        let no_rules = |reason: &str| -> Result<RuleSet, Error> {
            if required {
                return Err(Error::NoRules {
                    path: dir.to_path_buf(),
                    reason: reason.to_string(),
                });
            }
            info!(
                dir = %dir.display(),
                default_policy = %default,
                "{reason}: no authorization rules, so every connection and request gets the default policy ({})",
                describe(default)
            );
            Ok(RuleSet::empty())
        };
        let set = if !dir.is_dir() {
            no_rules("the rules directory does not exist")?
        } else {
            let sources = read_sources(&[dir.to_path_buf()])?;
            if sources.is_empty() {
                no_rules("the rules directory has no *.yaml, *.yml or *.json file")?
            } else {
                let set = compile(&sources)?;
                info!(dir = %dir.display(), hash = %set.hash(), rules = set.len(), "rules loaded");
                set
            }
        };
        metrics.reloads.with_label_values(&["ok"]).inc();
        Ok(Self::new(Some(dir.to_path_buf()), required, set, metrics))
    }

    /// A fixed set that never reloads (tests, explicit configurations).
    pub fn fixed(set: RuleSet, metrics: AuthzMetrics) -> Self {
        Self::new(None, false, set, metrics)
    }

    fn new(dir: Option<PathBuf>, required: bool, set: RuleSet, metrics: AuthzMetrics) -> Self {
        metrics.set_active(&set);
        let set = Arc::new(set);
        let (tx, _) = watch::channel(set.clone());
        LiveRules {
            inner: Arc::new(Inner {
                dir,
                required,
                current: ArcSwap::new(set),
                tx,
                reloading: Mutex::new(()),
                state: Mutex::new(State::default()),
                metrics,
            }),
        }
    }

    /// The active set; take it once per request or connection.
    pub fn current(&self) -> Arc<RuleSet> {
        self.inner.current.load_full()
    }

    /// Wakes on every new set, for re-checking open connections.
    pub fn subscribe(&self) -> watch::Receiver<Arc<RuleSet>> {
        self.inner.tx.subscribe()
    }

    pub fn metrics(&self) -> &AuthzMetrics {
        &self.inner.metrics
    }

    /// What `GET /rules` shows.
    pub fn status(&self) -> RulesStatus {
        let set = self.current();
        let state = self.inner.state.lock().expect("rules state lock");
        RulesStatus {
            dir: self.inner.dir.as_ref().map(|d| d.display().to_string()),
            hash: set.hash().to_string(),
            loaded_at: rfc3339(set.loaded_at()),
            rule_count: set.len(),
            file_count: set.files().len(),
            valid: state.last_error.is_none(),
            files: set
                .files()
                .iter()
                .map(|f| f.display().to_string())
                .collect(),
            last_error: state.last_error.clone(),
        }
    }

    /// Reads the directory again and swaps in the new set if it changed
    /// and is valid. `force` (SIGHUP) re-validates even unchanged content.
    /// Blocking (it reads and parses files): the reloader task runs it on
    /// its own thread.
    ///
    /// The reload lock is held while the directory is read and while the
    /// result is applied, not while the files are parsed: a parse that
    /// overran its deadline must not keep a later reload from reading and
    /// applying newer files. Each read of new content takes a ticket; a
    /// parse applies its result only if no reload has read the directory
    /// since (a late, stale result is dropped).
    pub fn reload(&self, force: bool) -> ReloadOutcome {
        let Some(dir) = &self.inner.dir else {
            return ReloadOutcome::Unchanged;
        };
        let (ticket, hash, sources) = {
            let _one = self.inner.reloading.lock().expect("rules reload lock");
            if !dir.is_dir() && self.inner.current.load().is_empty() {
                // Never had rules from here (an optional directory that is absent): nothing to keep or change.
                return ReloadOutcome::Unchanged;
            }
            let loaded = if dir.is_dir() {
                settle(dir);
                match read_consistent(dir) {
                    Some(loaded) => loaded,
                    None => {
                        debug!(
                            "rule files changed while being read; reading again on the next change"
                        );
                        return ReloadOutcome::Unchanged;
                    }
                }
            } else {
                Err(Error::NoRules {
                    path: dir.clone(),
                    reason: "the rules directory is gone; keeping the active rules".into(),
                })
            };
            let (hash, sources) = match loaded {
                Ok(x) => x,
                Err(e) => {
                    self.state().newest += 1;
                    return self.refuse(e.to_string(), &e);
                }
            };
            let active = self.inner.current.load_full();
            let mut state = self.state();
            if !force && hash == active.hash() {
                // The active set is what the directory holds: any parse
                // still running is of older content.
                state.newest += 1;
                state.refused_hash = None;
                state.last_error = None;
                return ReloadOutcome::Unchanged;
            }
            if !force && state.refused_hash.as_deref() == Some(hash.as_str()) {
                // Refused already (or overran its deadline and is still
                // being parsed: that parse may yet apply it).
                return ReloadOutcome::Unchanged;
            }
            state.newest += 1;
            state.parsing = Some(hash.clone());
            (state.newest, hash, sources)
        };
        let result = if sources.is_empty() && self.inner.required {
            Err(Error::NoRules {
                path: dir.clone(),
                reason: "no *.yaml, *.yml or *.json file left; keeping the active rules".into(),
            })
        } else {
            compile(&sources)
        };
        let _one = self.inner.reloading.lock().expect("rules reload lock");
        if self.state().newest != ticket {
            debug!(%hash, "a newer read of the rules directory superseded this parse; dropped");
            return ReloadOutcome::Unchanged;
        }
        match result {
            Ok(set) => {
                let previous = self.inner.current.load_full();
                info!(hash = %set.hash(), rules = set.len(), previous = %previous.hash(), "rules reloaded");
                self.inner.metrics.reloads.with_label_values(&["ok"]).inc();
                self.inner.metrics.set_active(&set);
                let set = Arc::new(set);
                self.inner.current.store(set.clone());
                self.inner.tx.send_replace(set);
                let mut state = self.state();
                state.parsing = None;
                state.refused_hash = None;
                state.last_error = None;
                ReloadOutcome::Applied
            }
            Err(e) => self.refuse(hash, &e),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.inner.state.lock().expect("rules state lock")
    }

    fn refuse(&self, hash: String, e: &Error) -> ReloadOutcome {
        self.refuse_with(hash, e.to_string(), e.position())
    }

    /// Records a refused version, logging and counting it once per content.
    fn refuse_with(
        &self,
        hash: String,
        message: String,
        position: Option<String>,
    ) -> ReloadOutcome {
        let mut state = self.state();
        state.parsing = None;
        if state.refused_hash.as_deref() == Some(hash.as_str()) {
            return ReloadOutcome::Unchanged;
        }
        warn!(error = %message, "rules reload refused; keeping the active rules");
        self.inner
            .metrics
            .reloads
            .with_label_values(&["error"])
            .inc();
        state.refused_hash = Some(hash);
        state.last_error = Some(ReloadError {
            message: message.clone(),
            position,
            at: rfc3339(SystemTime::now()),
        });
        ReloadOutcome::Refused(message)
    }

    /// Runs [`reload`](Self::reload) on the parse slot's thread, so that no
    /// file can stall the runtime; a reload that overruns the deadline is
    /// refused (the active rules stay) and holds the slot until it ends.
    /// Returns false when the slot was busy and nothing was read.
    pub async fn reload_off_runtime(&self, slot: &ParseSlot, force: bool) -> bool {
        self.reload_within(slot, force, PARSE_DEADLINE).await
    }

    async fn reload_within(&self, slot: &ParseSlot, force: bool, deadline: Duration) -> bool {
        let me = self.clone();
        match slot.run(deadline, move || me.reload(force)).await {
            Ok(_) => {}
            Err(SlotError::Busy) => {
                debug!("two previous rules parses are still running; retrying later");
                return false;
            }
            Err(e) => {
                let hash = self
                    .state()
                    .parsing
                    .clone()
                    .unwrap_or_else(|| "parse".into());
                let msg = format!("{}: {e}; keeping the active rules", self.dir_name());
                self.refuse_with(hash, msg, None);
                return false;
            }
        }
        true
    }

    fn dir_name(&self) -> String {
        self.inner
            .dir
            .as_ref()
            .map(|d| d.display().to_string())
            .unwrap_or_default()
    }

    /// Reloads on directory changes (notify, debounced), on SIGHUP and
    /// every `poll`, until `shutdown`. Must run inside a tokio runtime.
    pub fn spawn_reloader(&self, poll: Duration, shutdown: CancellationToken) -> Result<(), Error> {
        let Some(dir) = self.inner.dir.clone() else {
            return Ok(());
        };
        let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
            .map_err(|source| Error::Io {
                path: PathBuf::from("SIGHUP"),
                source,
            })?;
        // Watch before returning, so no change made after this call is missed;
        // the task's first reload catches any change made since `load`.
        let (mut watch, mut on_dir) = watch_dir(&dir, poll);
        let me = self.clone();
        let slot = ParseSlot::new();
        let span = tracing::info_span!("rules", dir = %dir.display());
        tokio::spawn(
            async move {
                let mut retry = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    done = me.reload_off_runtime(&slot, false) => !done,
                };
                loop {
                    let force = tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = hup.recv() => {
                            info!("SIGHUP received: reloading rules");
                            true
                        }
                        _ = changed(&mut watch, poll) => false,
                        // A change seen while a slow parse held the slot is read soon after.
                        _ = tokio::time::sleep(SETTLE_MAX), if retry => false,
                    };
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        done = me.reload_off_runtime(&slot, force) => retry = !done,
                    }
                    // The directory appeared (or was replaced): watch it itself.
                    if !on_dir && dir.is_dir() {
                        (watch, on_dir) = watch_dir(&dir, poll);
                    }
                }
            }
            .instrument(span),
        );
        Ok(())
    }
}

/// How many times a reload reads the files looking for two equal reads.
const CONSISTENT_READS: usize = 5;

/// Reads the directory until two reads in a row agree, and returns that
/// content with its hash; `None` if the files kept changing. One read opens
/// the files one after the other, so a ConfigMap update (all files swapped
/// at once through `..data`) landing in between would yield half of each
/// version, which can allow what neither version allows.
fn read_consistent(dir: &Path) -> Option<Result<(String, Vec<Source>), Error>> {
    let read = || read_sources(std::slice::from_ref(&dir.to_path_buf()));
    let mut last = read().map(|s| (hash_sources(&s), s));
    for _ in 1..CONSISTENT_READS {
        let next = read().map(|s| (hash_sources(&s), s));
        let same = match (&last, &next) {
            (Ok((a, _)), Ok((b, _))) => a == b,
            (Err(a), Err(b)) => a.to_string() == b.to_string(),
            _ => false,
        };
        if same {
            return Some(next);
        }
        last = next;
    }
    None
}

/// A watch on the directory, or on its parent while it does not exist; a
/// poll alone when neither can be watched.
fn watch_dir(dir: &Path, poll: Duration) -> (Option<FileWatch>, bool) {
    let on_dir = dir.is_dir();
    if !dir.exists() {
        // Polled until it appears; then the directory itself is watched.
        debug!(dir = %dir.display(), "rules directory absent; polling for it");
        return (None, false);
    }
    match FileWatch::new(&[dir], poll) {
        Ok(w) => (Some(w), on_dir),
        Err(e) => {
            warn!(error = %e, "cannot watch the rules directory; polling only");
            (None, true)
        }
    }
}

async fn changed(watch: &mut Option<FileWatch>, poll: Duration) {
    match watch {
        Some(w) => w.changed().await,
        None => tokio::time::sleep(poll).await,
    }
}

/// Waits (at most [`SETTLE_MAX`]) until every rule file in `dir` was last
/// modified at least [`SETTLE_TIME`] ago, so that a file still being
/// written in place is read whole. Files replaced atomically (renamed into
/// place, as ConfigMaps are) are complete at once; the wait only delays
/// their reading by what is left of the settle time. Blocking.
fn settle(dir: &Path) {
    let started = std::time::Instant::now();
    loop {
        let youngest = super::load::list_dir(dir)
            .unwrap_or_default()
            .iter()
            .filter_map(|f| std::fs::metadata(f).and_then(|m| m.modified()).ok())
            .map(|m| SystemTime::now().duration_since(m).unwrap_or_default())
            .min();
        let wait = match youngest {
            Some(age) if age < SETTLE_TIME => SETTLE_TIME - age,
            _ => return,
        };
        let left = SETTLE_MAX.saturating_sub(started.elapsed());
        if left.is_zero() {
            return;
        }
        std::thread::sleep(wait.min(left));
    }
}

/// What the default policy does, in words, for the start-up log line.
fn describe(default: DefaultPolicy) -> &'static str {
    match default {
        DefaultPolicy::Allow => "allow: everyone is allowed, unauthenticated peers included",
        DefaultPolicy::Authenticated => {
            "authenticated: peers with an identity of our trust domain are allowed, others denied"
        }
        DefaultPolicy::Deny => "deny: everything is denied",
    }
}

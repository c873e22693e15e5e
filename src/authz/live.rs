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

use super::load::{compile, hash_sources, read_sources};
use super::{AuthzMetrics, DefaultPolicy, Error, RuleSet};
use crate::filewatch::FileWatch;

#[cfg(test)]
mod tests;

/// A refused reload, as shown by the admin endpoint.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ReloadError {
    /// `file:line:column: message`, or an I/O error.
    pub message: String,
    /// When it was first seen (RFC 3339).
    pub at: String,
}

/// The body of `GET /rules`.
#[derive(Debug, Clone, Serialize)]
pub struct RulesStatus {
    pub dir: Option<String>,
    pub hash: String,
    pub loaded_at: String,
    pub rule_count: usize,
    pub files: Vec<String>,
    pub last_error: Option<ReloadError>,
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
    state: Mutex<State>,
    metrics: AuthzMetrics,
}

/// The writer's bookkeeping, behind one lock so reloads never interleave.
#[derive(Default)]
struct State {
    last_error: Option<ReloadError>,
    /// Hash of the content last refused, so one bad version is logged once.
    refused_hash: Option<String>,
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
    pub fn reload(&self, force: bool) -> ReloadOutcome {
        let Some(dir) = &self.inner.dir else {
            return ReloadOutcome::Unchanged;
        };
        let mut state = self.inner.state.lock().expect("rules state lock");
        if !dir.is_dir() && self.inner.current.load().is_empty() {
            // Never had rules from here (an optional directory that is absent): nothing to keep or change.
            return ReloadOutcome::Unchanged;
        }
        let loaded = if dir.is_dir() {
            read_sources(std::slice::from_ref(dir)).map(|s| (hash_sources(&s), s))
        } else {
            Err(Error::NoRules {
                path: dir.clone(),
                reason: "the rules directory is gone; keeping the active rules".into(),
            })
        };
        let (hash, sources) = match loaded {
            Ok(x) => x,
            Err(e) => return self.refuse(&mut state, e.to_string(), e.to_string()),
        };
        let active = self.inner.current.load();
        if !force && hash == active.hash() {
            state.refused_hash = None;
            state.last_error = None;
            return ReloadOutcome::Unchanged;
        }
        if !force && state.refused_hash.as_deref() == Some(hash.as_str()) {
            return ReloadOutcome::Unchanged;
        }
        if sources.is_empty() && self.inner.required {
            let msg = Error::NoRules {
                path: dir.clone(),
                reason: "no *.yaml, *.yml or *.json file left; keeping the active rules".into(),
            };
            return self.refuse(&mut state, hash, msg.to_string());
        }
        match compile(&sources) {
            Ok(set) => {
                info!(hash = %set.hash(), rules = set.len(), previous = %active.hash(), "rules reloaded");
                self.inner.metrics.reloads.with_label_values(&["ok"]).inc();
                self.inner.metrics.set_active(&set);
                let set = Arc::new(set);
                self.inner.current.store(set.clone());
                self.inner.tx.send_replace(set);
                state.refused_hash = None;
                state.last_error = None;
                ReloadOutcome::Applied
            }
            Err(e) => self.refuse(&mut state, hash, e.to_string()),
        }
    }

    fn refuse(&self, state: &mut State, hash: String, message: String) -> ReloadOutcome {
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
            at: rfc3339(SystemTime::now()),
        });
        ReloadOutcome::Refused(message)
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
        // the reload catches any change made since `load`.
        let (mut watch, mut on_dir) = watch_dir(&dir, poll);
        self.reload(false);
        let me = self.clone();
        let span = tracing::info_span!("rules", dir = %dir.display());
        tokio::spawn(
            async move {
                loop {
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = hup.recv() => {
                            info!("SIGHUP received: reloading rules");
                            me.reload(true);
                        }
                        _ = changed(&mut watch, poll) => { me.reload(false); }
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

//! Log set-up: text or JSON lines on stderr, filtered by `--log-level`, and
//! a filter that can be replaced while running (`PUT /logging` on the
//! sidecar's admin port), so an operator can turn on debug logs for a
//! moment without restarting the pod. Lines are written by a thread of
//! their own ([`sink`]).

mod sink;

pub use sink::dropped as dropped_lines;

use std::io::IsTerminal;
use std::sync::OnceLock;
use std::time::Duration;

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{reload, EnvFilter, Registry};

use crate::config::LogFormat;

/// The installed filter's handle. Logging is process-wide (one subscriber
/// per process), so its handle is too; `None` until [`init`] ran (tests
/// that run sidecars in-process install no subscriber).
static FILTER: OnceLock<reload::Handle<EnvFilter, Registry>> = OnceLock::new();

/// Where the installed subscriber's lines go; `None` until [`init`] ran.
static SINK: OnceLock<sink::Sink> = OnceLock::new();

/// Why the log filter could not be read or changed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("log filter {directive:?}: {reason}")]
    BadDirective { directive: String, reason: String },
    #[error("logging: {0}")]
    Install(String),
    #[error("this process has no runtime-adjustable log filter")]
    NotInstalled,
    #[error("the log filter could not be replaced: {0}")]
    Reload(String),
}

fn parse(directive: &str) -> Result<EnvFilter, Error> {
    EnvFilter::try_new(directive).map_err(|e| Error::BadDirective {
        directive: directive.to_string(),
        reason: e.to_string(),
    })
}

/// Installs the global subscriber. The filter is a tracing directive such as
/// `info` or `portcullis=debug,warn`.
pub fn init(format: LogFormat, level: &str) -> Result<(), String> {
    let filter = EnvFilter::try_new(level).map_err(|e| format!("--log-level {level:?}: {e}"))?;
    let (filter, handle) = reload::Layer::new(filter);
    let sink = SINK.get_or_init(|| sink::Sink::spawn(std::io::stderr()));
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(sink.clone())
        .with_ansi(std::io::stderr().is_terminal());
    let result = match format {
        LogFormat::Text => tracing_subscriber::registry()
            .with(filter)
            .with(fmt)
            .try_init(),
        LogFormat::Json => tracing_subscriber::registry()
            .with(filter)
            .with(fmt.json().flatten_event(true).with_current_span(false))
            .try_init(),
    };
    result.map_err(|e| Error::Install(e.to_string()).to_string())?;
    let _ = FILTER.set(handle);
    Ok(())
}

/// The filter in force, as a directive string.
pub fn current() -> Result<String, Error> {
    let handle = FILTER.get().ok_or(Error::NotInstalled)?;
    handle
        .with_current(|f| f.to_string())
        .map_err(|e| Error::Reload(e.to_string()))
}

/// Replaces the filter with `directive`; the previous one stays when the
/// directive does not parse.
pub fn set(directive: &str) -> Result<(), Error> {
    let filter = parse(directive)?;
    let handle = FILTER.get().ok_or(Error::NotInstalled)?;
    handle
        .reload(filter)
        .map_err(|e| Error::Reload(e.to_string()))
}

/// Writes out the log lines still queued (at most a couple of seconds'
/// wait), before the process exits or prints its own last line.
pub fn flush() {
    if let Some(sink) = SINK.get() {
        sink.flush(Duration::from_secs(2));
    }
}

//! Limits on the files portcullis parses (rule files, PEM certificates and
//! keys, tokens, the injector configuration), and the tools that enforce
//! them: a size-capped read, a nesting pre-scan for YAML and JSON, a
//! scrubber for parser messages, and a parse slot that runs parsing on its
//! own thread with a deadline.
//!
//! Why: a small file can be expensive to parse (a YAML value nested 80,000
//! levels deep costs the parser time that grows with the square of the
//! depth), a big one costs memory, and a file that is not what it claims to
//! be (a private key behind a symlink) must never be echoed into a log or an
//! HTTP answer. A file over a limit is refused before it is parsed, with an
//! error naming the file and the limit.

mod nesting;
mod slot;

#[cfg(test)]
mod tests;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use nesting::{check_nesting, TooDeep};
pub use slot::{ParseSlot, SlotError, MAX_ALIVE};

/// Largest rule file (`*.yaml`, `*.yml`, `*.json`) read.
pub const RULE_FILE_MAX_BYTES: u64 = 1024 * 1024;
/// Largest rule set (all files of a rules directory together).
pub const RULE_SET_MAX_BYTES: u64 = 8 * 1024 * 1024;
/// Deepest nesting of YAML or JSON collections (flow `[`/`{` and block
/// indentation together) accepted in a rule file or the injector
/// configuration. Real rule files use fewer than 10 levels.
pub const MAX_NESTING: usize = 64;
/// Largest PEM file read (issuer certificate and key, trust bundle,
/// webhook certificate and key, Kubernetes CA file): room for hundreds of
/// certificates.
pub const PEM_FILE_MAX_BYTES: u64 = 1024 * 1024;
/// Largest token file read (a service-account JWT is a few KiB).
pub const TOKEN_FILE_MAX_BYTES: u64 = 64 * 1024;
/// Largest injector configuration file read.
pub const CONFIG_FILE_MAX_BYTES: u64 = 1024 * 1024;
/// A reload whose parsing takes longer than this is refused (and the
/// active version stays in use); the parse thread is left to finish, and at
/// most one more parse starts beside it (see [`ParseSlot`]).
pub const PARSE_DEADLINE: Duration = Duration::from_secs(5);
/// A changed file is parsed once its modification time is at least this
/// old, so that a file still being written is not read half-way.
pub const SETTLE_TIME: Duration = Duration::from_millis(100);
/// The longest a reload waits for files to settle before reading anyway.
pub const SETTLE_MAX: Duration = Duration::from_millis(500);
/// The most characters of a file's content an error message may quote.
pub const MAX_QUOTE_CHARS: usize = 32;

/// Why a file could not be read within its limits.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: the file is larger than the limit of {} bytes; refused", path.display(), limit)]
    TooLarge { path: PathBuf, limit: u64 },
}

impl Error {
    /// The error as an I/O error without the path (for callers whose own
    /// error already names the file).
    pub fn into_io(self) -> std::io::Error {
        match self {
            Error::Io { source, .. } => source,
            Error::TooLarge { limit, .. } => std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("the file is larger than the limit of {limit} bytes; refused"),
            ),
        }
    }
}

/// Reads a whole file, refusing one larger than `limit` bytes before
/// reading it (and, should it grow meanwhile, after `limit + 1` bytes).
pub fn read_capped(path: &Path, limit: u64) -> Result<Vec<u8>, Error> {
    let io = |source| Error::Io {
        path: path.to_path_buf(),
        source,
    };
    let file = std::fs::File::open(path).map_err(io)?;
    let len = file.metadata().map_err(io)?.len();
    let too_large = || Error::TooLarge {
        path: path.to_path_buf(),
        limit,
    };
    if len > limit {
        return Err(too_large());
    }
    let mut buf = Vec::with_capacity(len as usize);
    file.take(limit + 1).read_to_end(&mut buf).map_err(io)?;
    if buf.len() as u64 > limit {
        return Err(too_large());
    }
    Ok(buf)
}

/// Reads a text file within `limit` bytes; not UTF-8 is an I/O error of
/// kind `InvalidData` (the content is never quoted).
pub fn read_capped_string(path: &Path, limit: u64) -> Result<String, Error> {
    String::from_utf8(read_capped(path, limit)?).map_err(|_| Error::Io {
        path: path.to_path_buf(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidData, "the file is not UTF-8"),
    })
}

/// A parser's message with what it quotes from the file cut short: every
/// `"…"` or `` `…` `` span longer than [`MAX_QUOTE_CHARS`] is shortened,
/// control characters are escaped, a quoted span that looks like PEM or a
/// key is replaced, and the message is cut at any other PEM armour. Parsers (serde's "invalid type: string \"…\"") quote
/// whole values, which may be a secret read from the wrong file.
pub fn scrub(msg: &str) -> String {
    let mut out = String::with_capacity(msg.len().min(512));
    let mut chars = msg.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '"' || c == '`' {
            let close = c;
            let mut quoted = String::new();
            let mut closed = false;
            while let Some(q) = chars.next() {
                if q == '\\' && close == '"' {
                    if let Some(n) = chars.next() {
                        quoted.push(q);
                        quoted.push(n);
                    }
                    continue;
                }
                if q == close {
                    closed = true;
                    break;
                }
                quoted.push(q);
            }
            out.push(close);
            out.push_str(&shorten(&quoted));
            if closed {
                out.push(close);
            }
        } else if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    if let Some(i) = out.find("-----") {
        // PEM armour outside any quotes: cut the message there.
        out.truncate(i);
        out.push_str("… (the rest is not shown)");
    }
    out
}

/// A quoted span with control characters escaped, at most
/// [`MAX_QUOTE_CHARS`] characters long.
fn shorten(quoted: &str) -> String {
    if looks_secret(quoted) {
        return "… (not shown)".into();
    }
    let mut out = String::new();
    for (i, c) in quoted.chars().enumerate() {
        if i == MAX_QUOTE_CHARS {
            out.push('…');
            break;
        }
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// Whether text holds PEM armour or key material.
pub fn looks_secret(text: &str) -> bool {
    text.contains("-----BEGIN") || text.contains("PRIVATE KEY") || text.contains("-----END")
}

/// A short description of a PEM parse error that never quotes the file
/// (the PEM reader's own messages can carry a line of it).
pub fn describe_pem_error(e: &rustls::pki_types::pem::Error) -> &'static str {
    use rustls::pki_types::pem::Error as E;
    match e {
        E::MissingSectionEnd { .. } => "a PEM section has no END line",
        E::IllegalSectionStart { .. } => "a PEM BEGIN line is malformed",
        E::Base64Decode(_) => "a PEM section is not valid base64",
        E::Io(_) => "the file could not be read",
        E::NoItemsFound => "no PEM section found",
        E::SectionTooLarge => "a PEM section is too large",
        _ => "the file is not valid PEM",
    }
}

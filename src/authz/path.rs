//! Request path normalization, so that rules and the app see the same path.
//!
//! A rule denying `/admin/**` is worthless if `/x/../admin`, `//admin` or
//! `/%61dmin` slip past it and the app then resolves them to `/admin`. So
//! the proxy matches rules against the normalized path and forwards that
//! same normalized path to the app. Forms whose meaning differs between
//! servers (an encoded `/` or `\`) are refused rather than guessed.
//!
//! The input is the path only: the proxy passes the query string separately
//! and forwards it unchanged; rules never look at it.

#[cfg(test)]
mod tests;

/// Why a request path was refused (the proxy answers 400).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("the path must start with '/'")]
    NotAbsolute,
    #[error("the path contains a fragment ('#')")]
    Fragment,
    #[error("the path contains '?': pass the query separately")]
    Query,
    #[error("the path has an invalid percent-encoding")]
    InvalidEncoding,
    #[error("the path contains an encoded '/' (%2F)")]
    EncodedSlash,
    #[error("the path contains a '\\' or an encoded one (%5C)")]
    Backslash,
    /// Servers disagree on these: some cut the path at NUL, some decode
    /// twice. Refused rather than guessed.
    #[error("the path contains an ambiguous form (%00 or a double-encoded '%25XX')")]
    Ambiguous,
    /// Path parameters: many servers (Java, some routers) cut `;…` off a
    /// segment before routing, so `/admin;x` reaches `/admin` while a rule
    /// saw `/admin;x` (and `..;` climbs like `..`). Refused, encoded too.
    #[error("the path contains ';' or an encoded one (%3B)")]
    Semicolon,
}

/// Characters RFC 3986 calls unreserved: decoding them never changes meaning.
pub(crate) fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// `%00`, or `%25` followed by two hex digits (a double encoding).
fn is_ambiguous(raw: &str) -> bool {
    let b = raw.as_bytes();
    let double_encoded = b.windows(5).any(|w| {
        w[0] == b'%' && w[1] == b'2' && w[2] == b'5' && hex(w[3]).is_some() && hex(w[4]).is_some()
    });
    let nul = b.windows(3).any(|w| w == b"%00");
    nul || double_encoded
}

/// A `;` or `%3B` (any case) anywhere in the path.
fn has_semicolon(raw: &str) -> bool {
    let b = raw.as_bytes();
    b.contains(&b';')
        || b.windows(3)
            .any(|w| w[0] == b'%' && w[1] == b'3' && (w[2] | 0x20) == b'b')
}

/// Normalizes a request path: decodes percent-escapes of unreserved
/// characters (other escapes are kept, with uppercase hex), removes `.` and
/// `..` segments (`..` never climbs above `/`), and merges repeated slashes.
/// A trailing slash is kept. A `;` (path parameters), raw or encoded, is
/// refused, and so are `%00` and a double encoding (`%25` followed by two
/// hex digits), whether written literally or built from encoded parts
/// (`%25%36%31`), since decoding must not create a form refused as written. An encoded `/` or a `\` (raw or encoded) is
/// refused unless `allow_encoded_slash`, in which case it is kept encoded
/// (`%2F`, `%5C`) and is part of its segment.
pub fn normalize_path(raw: &str, allow_encoded_slash: bool) -> Result<String, PathError> {
    if is_normal(raw) {
        return Ok(raw.to_owned());
    }
    normalize_in_full(raw, allow_encoded_slash)
}

/// Whether `raw` is its own normal form, which most request paths are: it
/// starts with `/`, has no `%`, `\`, `;`, `#` or `?` (nothing to decode or
/// refuse), and no empty, `.` or `..` segment (a final empty one is the
/// trailing slash, which is kept). One pass over the bytes, no allocation.
fn is_normal(raw: &str) -> bool {
    let Some(rest) = raw.strip_prefix('/') else {
        return false;
    };
    if rest
        .bytes()
        .any(|b| matches!(b, b'%' | b'\\' | b';' | b'#' | b'?'))
    {
        return false;
    }
    let mut segments = rest.split('/').peekable();
    while let Some(seg) = segments.next() {
        let last = segments.peek().is_none();
        if matches!(seg, "." | "..") || (seg.is_empty() && !last) {
            return false;
        }
    }
    true
}

/// [`normalize_path`] for a path that is not already normal.
fn normalize_in_full(raw: &str, allow_encoded_slash: bool) -> Result<String, PathError> {
    if raw.contains('#') {
        return Err(PathError::Fragment);
    }
    if raw.contains('?') {
        return Err(PathError::Query);
    }
    if !raw.starts_with('/') {
        return Err(PathError::NotAbsolute);
    }
    if has_semicolon(raw) {
        return Err(PathError::Semicolon);
    }
    if is_ambiguous(raw) {
        return Err(PathError::Ambiguous);
    }
    let decoded = decode_unreserved(raw, allow_encoded_slash)?;
    // Decoding can assemble a refused form from encoded parts: `%25%36%31`
    // becomes `%2561`, which an app that decodes twice reads as `a`. So the
    // refusals hold on the decoded path too, whatever built it.
    if has_semicolon(&decoded) {
        return Err(PathError::Semicolon);
    }
    if is_ambiguous(&decoded) {
        return Err(PathError::Ambiguous);
    }
    let mut out: Vec<&str> = Vec::new();
    let mut trailing = false;
    for seg in decoded[1..].split('/') {
        trailing = matches!(seg, "" | "." | "..");
        match seg {
            "" | "." => {}
            ".." => {
                out.pop();
            }
            s => out.push(s),
        }
    }
    let mut path = String::with_capacity(decoded.len());
    for seg in &out {
        path.push('/');
        path.push_str(seg);
    }
    if out.is_empty() || trailing {
        path.push('/');
    }
    Ok(path)
}

fn decode_unreserved(raw: &str, allow_encoded_slash: bool) -> Result<String, PathError> {
    let b = raw.as_bytes();
    let mut out = String::with_capacity(raw.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' => {
                let (Some(hi), Some(lo)) = (
                    b.get(i + 1).copied().and_then(hex),
                    b.get(i + 2).copied().and_then(hex),
                ) else {
                    return Err(PathError::InvalidEncoding);
                };
                let v = hi * 16 + lo;
                match v {
                    b'/' if !allow_encoded_slash => return Err(PathError::EncodedSlash),
                    b'\\' if !allow_encoded_slash => return Err(PathError::Backslash),
                    v if is_unreserved(v) => out.push(v as char),
                    v => {
                        const HEX: &[u8; 16] = b"0123456789ABCDEF";
                        out.push('%');
                        out.push(HEX[usize::from(v >> 4)] as char);
                        out.push(HEX[usize::from(v & 15)] as char);
                    }
                }
                i += 3;
            }
            b'\\' if !allow_encoded_slash => return Err(PathError::Backslash),
            b'\\' => {
                out.push_str("%5C");
                i += 1;
            }
            _ => {
                // Copy a run of ordinary characters (UTF-8 stays whole).
                let start = i;
                while i < b.len() && b[i] != b'%' && b[i] != b'\\' {
                    i += 1;
                }
                out.push_str(&raw[start..i]);
            }
        }
    }
    Ok(out)
}

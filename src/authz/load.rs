//! Reading rule files into a [`RuleSet`], with every error located as
//! `file:line:column`.
//!
//! A directory contributes every `*.yaml`, `*.yml` and `*.json` directly in
//! it (hidden entries such as Kubernetes' `..data` are skipped, symlinks are
//! followed); files are read in name order and merged. YAML errors come
//! from serde_norway, which locates syntax errors, unknown keys and bad
//! values; a duplicate name is located by re-reading its file (see
//! [`locate_rule`]), which costs nothing unless there is an error.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize as _;

use super::model::FileModel;
use super::ruleset::Rule;
use super::{Error, RuleSet};
use crate::file_limits::{
    self, check_nesting, read_capped, scrub, MAX_NESTING, RULE_FILE_MAX_BYTES, RULE_SET_MAX_BYTES,
};

#[cfg(test)]
mod tests;

/// A place in a rule file (line and column count from 1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    pub file: PathBuf,
    pub line: usize,
    pub column: usize,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.file.display(), self.line, self.column)
    }
}

impl serde::Serialize for Location {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// One file's name and text, read before anything is parsed so that a
/// reload can tell from the hash whether anything changed. Public so that
/// [`compile`] can be driven from text in memory (the fuzz targets do).
#[derive(Debug, Clone)]
pub struct Source {
    pub path: PathBuf,
    pub text: String,
}

fn is_json(path: &Path) -> bool {
    path.extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("json"))
}

/// Whether a directory entry is a rule file by its name.
pub(crate) fn is_rule_file_name(name: &str) -> bool {
    !name.starts_with('.')
        && [".yaml", ".yml", ".json"]
            .iter()
            .any(|ext| name.len() > ext.len() && name.to_ascii_lowercase().ends_with(ext))
}

/// The rule files in a directory, sorted by name. An entry that resolves
/// outside the directory (a symlink to `/etc/...` or to a key) is an
/// error: only links that stay inside, as in the ConfigMap layout
/// `foo.yaml -> ..data/foo.yaml`, `..data -> ..2024_01_01…`, are followed.
pub(crate) fn list_dir(dir: &Path) -> Result<Vec<PathBuf>, Error> {
    let io = |source| Error::Io {
        path: dir.to_path_buf(),
        source,
    };
    let root = dir.canonicalize().map_err(io)?;
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io)? {
        let entry = entry.map_err(io)?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let path = entry.path();
        if !is_rule_file_name(name) {
            continue;
        }
        // canonicalize() follows every link: `x.yaml -> ..data/x.yaml` is a file here.
        let Ok(resolved) = path.canonicalize() else {
            continue; // a dangling link, or gone since listing
        };
        if !resolved.starts_with(&root) {
            return Err(Error::Outside { path });
        }
        if std::fs::metadata(&resolved).is_ok_and(|m| m.is_file()) {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

/// Reads every file named in `paths` (directories are expanded), within
/// the per-file and per-set size limits.
pub(crate) fn read_sources(paths: &[PathBuf]) -> Result<Vec<Source>, Error> {
    let mut files = Vec::new();
    for p in paths {
        if p.is_dir() {
            files.extend(list_dir(p)?);
        } else {
            files.push(p.clone());
        }
    }
    let mut total = 0u64;
    let mut sources = Vec::with_capacity(files.len());
    for path in files {
        let src = read_source(path)?;
        total += src.text.len() as u64;
        if total > RULE_SET_MAX_BYTES {
            return Err(Error::TooLarge {
                path: paths.first().cloned().unwrap_or(src.path),
                what: "the rule set (all files together)",
                limit: RULE_SET_MAX_BYTES,
            });
        }
        sources.push(src);
    }
    Ok(sources)
}

/// Reads one rule file within [`RULE_FILE_MAX_BYTES`].
fn read_source(path: PathBuf) -> Result<Source, Error> {
    let bytes = match read_capped(&path, RULE_FILE_MAX_BYTES) {
        Ok(b) => b,
        Err(file_limits::Error::Io { source, .. }) => return Err(Error::Io { path, source }),
        Err(file_limits::Error::TooLarge { limit, .. }) => {
            return Err(Error::TooLarge {
                path,
                what: "the file",
                limit,
            })
        }
    };
    match String::from_utf8(bytes) {
        Ok(text) => Ok(Source { path, text }),
        Err(_) => Err(Error::Invalid {
            at: Location {
                file: path,
                line: 1,
                column: 1,
            },
            message: "the file is not UTF-8".into(),
        }),
    }
}

/// The hash that identifies a set of sources: file names and contents.
pub(crate) fn hash_sources(sources: &[Source]) -> String {
    let mut parts: Vec<&[u8]> = Vec::with_capacity(sources.len() * 2);
    for s in sources {
        let name = s.path.file_name().unwrap_or(s.path.as_os_str());
        parts.push(name.as_encoded_bytes());
        parts.push(s.text.as_bytes());
    }
    crate::filewatch::content_hash(&parts)
}

/// Loads and validates the rule files in `dir`.
pub fn load_dir(dir: &Path) -> Result<RuleSet, Error> {
    load_paths(&[dir.to_path_buf()])
}

/// Loads and validates rule files and directories, merged into one set.
pub fn load_paths(paths: &[PathBuf]) -> Result<RuleSet, Error> {
    compile(&read_sources(paths)?)
}

/// Parses every source (YAML unless the name ends in `.json`) and checks
/// names are unique across all of them: the whole of loading, minus the
/// file system. Public so that it can be fuzzed over text in memory.
pub fn compile(sources: &[Source]) -> Result<RuleSet, Error> {
    let mut rules: Vec<Rule> = Vec::new();
    let mut seen: std::collections::HashMap<String, usize> = Default::default();
    for (si, src) in sources.iter().enumerate() {
        let file: Arc<Path> = Arc::from(src.path.as_path());
        for (index, model) in parse_text(&src.path, &src.text)?.into_iter().enumerate() {
            let rule = Rule::from_model(model, file.clone(), index);
            if let Some(&first) = seen.get(&rule.name) {
                let first = &rules[first];
                let first_src = sources
                    .iter()
                    .find(|s| *s.path == *first.file)
                    .unwrap_or(&sources[si]);
                return Err(Error::Invalid {
                    at: locate_rule(&src.path, &src.text, index),
                    message: scrub(&format!(
                        "duplicate rule name {:?} (first defined at {}); names must be unique across all files",
                        rule.name,
                        locate_rule(&first_src.path, &first_src.text, first.index)
                    )),
                });
            }
            seen.insert(rule.name.clone(), rules.len());
            rules.push(rule);
        }
    }
    let files = sources.iter().map(|s| s.path.clone()).collect();
    Ok(RuleSet::new(rules, hash_sources(sources), files))
}

/// Parses one file's rules; YAML unless the name ends in `.json`.
pub(crate) fn parse_text(path: &Path, text: &str) -> Result<Vec<super::model::RuleModel>, Error> {
    if is_blank(text, is_json(path)) {
        return Ok(Vec::new());
    }
    precheck(path, text)?;
    let parsed = if is_json(path) {
        serde_json::from_str::<FileModel>(text).map_err(|e| json_error(path, &e))
    } else {
        serde_norway::from_str::<FileModel>(text).map_err(|e| yaml_error(path, &e))
    };
    Ok(parsed?.rules)
}

/// Refuses, before any parser sees it, a file that is PEM (a certificate
/// or key in the rules directory by mistake: its content must never be
/// echoed) or that nests deeper than [`MAX_NESTING`] levels (parsers take
/// time that grows with the square of the depth), or that holds a YAML
/// anchor or alias (aliases to aliases expand into gigabytes in the parser).
fn precheck(path: &Path, text: &str) -> Result<(), Error> {
    let at = |line, column| Location {
        file: path.to_path_buf(),
        line,
        column,
    };
    if let Some(n) = text.lines().position(|l| l.starts_with("-----BEGIN")) {
        return Err(Error::Invalid {
            at: at(n + 1, 1),
            message: "this is a PEM file (a certificate or key), not a rule file; its content is not shown".into(),
        });
    }
    check_nesting(text, is_json(path), MAX_NESTING).map_err(|e| Error::Invalid {
        at: at(e.line, e.column),
        message: if e.alias {
            "YAML anchors and aliases are not allowed in rule files; refused before parsing".into()
        } else {
            format!("nested deeper than {MAX_NESTING} levels; refused before parsing")
        },
    })
}

/// An empty file (or, for YAML, one with only comments) holds no rules:
/// a ConfigMap key may legitimately be empty.
fn is_blank(text: &str, json: bool) -> bool {
    text.lines().all(|l| {
        let l = l.trim();
        l.is_empty() || (!json && (l.starts_with('#') || l == "---"))
    })
}

fn yaml_error(path: &Path, e: &serde_norway::Error) -> Error {
    let (line, column) = e.location().map_or((1, 1), |l| (l.line(), l.column()));
    Error::Invalid {
        at: Location {
            file: path.to_path_buf(),
            line,
            column,
        },
        message: scrub(&strip_position(&e.to_string())),
    }
}

fn json_error(path: &Path, e: &serde_json::Error) -> Error {
    Error::Invalid {
        at: Location {
            file: path.to_path_buf(),
            line: e.line().max(1),
            column: e.column().max(1),
        },
        message: scrub(&strip_position(&e.to_string())),
    }
}

/// Removes the parser's own " at line N column M" phrases (the location
/// is printed once, in front).
fn strip_position(msg: &str) -> String {
    const AT: &str = " at line ";
    let mut out = String::with_capacity(msg.len());
    let mut rest = msg;
    while let Some(i) = rest.find(AT) {
        let tail = &rest[i + AT.len()..];
        let digits = |s: &str| s.bytes().take_while(u8::is_ascii_digit).count();
        let n = digits(tail);
        let skip = match tail[n..].strip_prefix(" column ") {
            Some(col) if n > 0 && digits(col) > 0 => AT.len() + n + " column ".len() + digits(col),
            _ => {
                out.push_str(&rest[..i + AT.len()]);
                rest = tail;
                continue;
            }
        };
        out.push_str(&rest[..i]);
        rest = &rest[i + skip..];
    }
    out.push_str(rest);
    out
}

/// Where rule number `index` of a file is: the position of its `name`
/// value. The parsers report positions only with errors, so this parses
/// the file again with a reader that fails on purpose at that value.
pub fn locate_rule(path: &Path, text: &str, index: usize) -> Location {
    let fallback = Location {
        file: path.to_path_buf(),
        line: 1,
        column: 1,
    };
    let located = if is_json(path) {
        let mut d = serde_json::Deserializer::from_str(text);
        match (Probe { target: index }).deserialize(&mut d) {
            Err(e) => json_error(path, &e),
            Ok(()) => return fallback,
        }
    } else {
        match (Probe { target: index }).deserialize(serde_norway::Deserializer::from_str(text)) {
            Err(e) => yaml_error(path, &e),
            Ok(()) => return fallback,
        }
    };
    match located {
        Error::Invalid { at, .. } => at,
        _ => fallback,
    }
}

/// Walks `rules[target].name` and fails there, to learn its position.
struct Probe {
    target: usize,
}

impl<'de> DeserializeSeed<'de> for Probe {
    type Value = ();
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for Probe {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a rule file")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while let Some(key) = map.next_key::<String>()? {
            if key == "rules" {
                map.next_value_seed(ProbeRules(self.target))?;
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(())
    }
}

struct ProbeRules(usize);

impl<'de> DeserializeSeed<'de> for ProbeRules {
    type Value = ();
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for ProbeRules {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a list of rules")
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let mut i = 0;
        while seq.next_element_seed(ProbeRule(i == self.0))?.is_some() {
            i += 1;
        }
        Ok(())
    }
}

struct ProbeRule(bool);

impl<'de> DeserializeSeed<'de> for ProbeRule {
    type Value = ();
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        if self.0 {
            d.deserialize_map(self)
        } else {
            IgnoredAny::deserialize(d).map(|_| ())
        }
    }
}

impl<'de> Visitor<'de> for ProbeRule {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a rule")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while let Some(key) = map.next_key::<String>()? {
            if key == "name" {
                return map.next_value_seed(Here);
            }
            map.next_value::<IgnoredAny>()?;
        }
        Err(de::Error::custom("here"))
    }
}

/// Fails on any value: the parser then reports the value's position.
struct Here;

impl<'de> DeserializeSeed<'de> for Here {
    type Value = ();
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl Visitor<'_> for Here {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("nothing (locating a rule)")
    }
}

/// Validates files and directories for `rules check`, reporting every
/// file's first error (not only the first file's) before duplicates.
pub fn check_paths(paths: &[PathBuf]) -> Result<RuleSet, Vec<Error>> {
    let mut errors = Vec::new();
    let mut files = Vec::new();
    for p in paths {
        if p.is_dir() {
            match list_dir(p) {
                Ok(found) => files.extend(found),
                Err(e) => errors.push(e),
            }
        } else {
            files.push(p.clone());
        }
    }
    let mut sources = Vec::new();
    for f in files {
        match read_sources(&[f]) {
            Ok(s) => sources.extend(s),
            Err(e) => errors.push(e),
        }
    }
    let total: u64 = sources.iter().map(|s| s.text.len() as u64).sum();
    if total > RULE_SET_MAX_BYTES {
        errors.push(Error::TooLarge {
            path: paths.first().cloned().unwrap_or_default(),
            what: "the rule set (all files together)",
            limit: RULE_SET_MAX_BYTES,
        });
        return Err(errors);
    }
    for src in &sources {
        if let Err(e) = parse_text(&src.path, &src.text) {
            errors.push(e);
        }
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    compile(&sources).map_err(|e| vec![e])
}

//! RFC 6902 JSON patches made of `add` operations only, and a small applier
//! for them (the offline `inject` uses it; tests check it against the
//! `json-patch` crate).
//!
//! `add` alone is enough: it creates a missing member, replaces an existing
//! one, and inserts into arrays. Parents must exist first, so the builder
//! adds `{}` or `[]` for each missing one before anything goes inside it —
//! a pod with no annotations or no volumes is the common case.

use serde::Serialize;
use serde_json::Value;

/// One `add` operation.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Op {
    pub op: &'static str,
    pub path: String,
    pub value: Value,
}

/// A JSON patch; empty when there is nothing to change.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
#[serde(transparent)]
pub struct Patch(pub Vec<Op>);

/// Escapes one reference token (RFC 6901): `~` → `~0`, `/` → `~1`.
pub fn escape(token: &str) -> String {
    token.replace('~', "~0").replace('/', "~1")
}

fn unescape(token: &str) -> String {
    token.replace("~1", "/").replace("~0", "~")
}

/// Builds a patch against a document it keeps up to date, so each new
/// operation sees the effect of the previous ones.
pub struct Builder {
    doc: Value,
    ops: Vec<Op>,
}

impl Builder {
    pub fn new(doc: &Value) -> Self {
        Builder {
            doc: doc.clone(),
            ops: Vec::new(),
        }
    }

    /// The document as the patch so far leaves it.
    pub fn doc(&self) -> &Value {
        &self.doc
    }

    /// Adds (or replaces) the object member at `path` (unescaped tokens),
    /// creating missing parent objects first. A `null` parent counts as
    /// missing (YAML's empty `annotations:` is `null`).
    pub fn set(&mut self, path: &[&str], value: Value) {
        for depth in 1..path.len() {
            let parent = self.doc.pointer(&pointer(&path[..depth]));
            if parent.is_none_or(Value::is_null) {
                self.push(pointer(&path[..depth]), Value::Object(Default::default()));
            }
        }
        self.push(pointer(path), value);
    }

    /// Inserts into the array at `path` at `index` (`None` = at the end),
    /// creating the array (and its parents) when missing.
    pub fn insert(&mut self, path: &[&str], index: Option<usize>, value: Value) {
        if !self
            .doc
            .pointer(&pointer(path))
            .is_some_and(Value::is_array)
        {
            self.set(path, Value::Array(vec![value]));
            return;
        }
        let at = index.map_or("-".to_string(), |i| i.to_string());
        self.push(format!("{}/{at}", pointer(path)), value);
    }

    fn push(&mut self, path: String, value: Value) {
        let op = Op {
            op: "add",
            path,
            value,
        };
        apply_op(&mut self.doc, &op).expect("the builder only makes applicable ops");
        self.ops.push(op);
    }

    pub fn finish(self) -> Patch {
        Patch(self.ops)
    }
}

fn pointer(tokens: &[&str]) -> String {
    tokens.iter().map(|t| format!("/{}", escape(t))).collect()
}

/// Applies `add` operations in order; an error names the failing path.
pub fn apply(doc: &mut Value, patch: &Patch) -> Result<(), String> {
    patch.0.iter().try_for_each(|op| apply_op(doc, op))
}

fn apply_op(doc: &mut Value, op: &Op) -> Result<(), String> {
    let fail = |why: &str| Err(format!("{}: {why}", op.path));
    let Some((parent, last)) = op.path.rsplit_once('/') else {
        return fail("not a JSON pointer");
    };
    let last = unescape(last);
    match doc.pointer_mut(parent) {
        Some(Value::Object(map)) => {
            map.insert(last, op.value.clone());
            Ok(())
        }
        Some(Value::Array(items)) => {
            let index = if last == "-" {
                items.len()
            } else {
                match last.parse::<usize>() {
                    Ok(i) if i <= items.len() => i,
                    _ => return fail("array index out of range"),
                }
            };
            items.insert(index, op.value.clone());
            Ok(())
        }
        Some(_) => fail("parent is not an object or array"),
        None => fail("parent does not exist"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn escapes_tokens() {
        for (raw, escaped) in [
            ("portcullis.io/status", "portcullis.io~1status"),
            ("a~b", "a~0b"),
            ("~/", "~0~1"),
            ("plain", "plain"),
        ] {
            assert_eq!(escape(raw), escaped);
            assert_eq!(unescape(escaped), raw);
        }
    }

    #[test]
    fn creates_parents_first() {
        let pod = json!({"spec": {"containers": []}});
        let mut b = Builder::new(&pod);
        b.set(&["metadata", "annotations", "a/b"], json!("x"));
        b.insert(&["spec", "volumes"], None, json!({"name": "v"}));
        b.insert(&["spec", "volumes"], None, json!({"name": "w"}));
        b.insert(&["spec", "containers"], Some(0), json!({"name": "c"}));
        let patch = b.finish();
        let paths: Vec<&str> = patch.0.iter().map(|o| o.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "/metadata",
                "/metadata/annotations",
                "/metadata/annotations/a~1b",
                "/spec/volumes",
                "/spec/volumes/-",
                "/spec/containers/0"
            ]
        );
        let mut doc = pod.clone();
        apply(&mut doc, &patch).unwrap();
        assert_eq!(doc["metadata"]["annotations"]["a/b"], "x");
        assert_eq!(doc["spec"]["volumes"][1]["name"], "w");
    }

    #[test]
    fn replaces_null_parents() {
        let pod = json!({"metadata": {"annotations": null}, "spec": {"volumes": null}});
        let mut b = Builder::new(&pod);
        b.set(&["metadata", "annotations", "a/b"], json!("x"));
        b.insert(&["spec", "volumes"], None, json!({"name": "v"}));
        let patch = b.finish();
        let paths: Vec<&str> = patch.0.iter().map(|o| o.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "/metadata/annotations",
                "/metadata/annotations/a~1b",
                "/spec/volumes"
            ]
        );
        let mut doc = pod.clone();
        apply(&mut doc, &patch).unwrap();
        assert_eq!(doc["metadata"]["annotations"], json!({"a/b": "x"}));
        assert_eq!(doc["spec"]["volumes"], json!([{"name": "v"}]));
    }

    #[test]
    fn refuses_missing_parents() {
        let mut doc = json!({});
        let op = Op {
            op: "add",
            path: "/a/b".into(),
            value: json!(1),
        };
        assert!(apply(&mut doc, &Patch(vec![op])).is_err());
    }
}

//! The rule file format as serde types (YAML and JSON share it).
//!
//! Every value is checked while it is deserialized, inside a visitor, so the
//! parser attaches the location of the offending value itself (a bad CIDR
//! is reported at its own line and column, not at the rule). Unknown keys
//! are errors, never silently ignored: a misspelt `methods` must not turn a
//! narrow rule into a wide one.

use std::fmt;
use std::marker::PhantomData;

use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;

use super::matchers::{
    parse_header_name, parse_method, parse_namespace, parse_trust_domain, Cidr, HeaderCond,
    HeaderValue, HostPattern, IdentityPattern, PathPattern, PortRange,
};
use super::Action;
use crate::identity::TrustDomain;

/// One rule file: a map with the key `rules`.
///
/// Deserialized by hand so that only a map is accepted, with a message that
/// says what to write. The derived impl would also take a sequence (serde's
/// tuple form of a struct), so a JSON file that is a bare list of rules —
/// the usual mistake — got "invalid type: map, expected a sequence" about
/// its first rule, and YAML got "expected struct FileModel", an internal name.
#[derive(Debug)]
pub(crate) struct FileModel {
    pub rules: Vec<RuleModel>,
}

/// The file's fields, once we know it is a map.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileFields {
    rules: Vec<RuleModel>,
}

impl<'de> Deserialize<'de> for FileModel {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct MapOnly;
        impl<'de> Visitor<'de> for MapOnly {
            type Value = FileModel;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a map with the key \"rules\"")
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<FileModel, A::Error> {
                let fields = FileFields::deserialize(de::value::MapAccessDeserializer::new(map))?;
                Ok(FileModel {
                    rules: fields.rules,
                })
            }
        }
        d.deserialize_map(MapOnly)
    }
}

/// One rule, as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RuleModel {
    pub name: Parsed<Name>,
    pub action: Action,
    #[serde(default)]
    pub ports: Option<List<Parsed<PortRange>>>,
    #[serde(default)]
    pub from: Option<FromModel>,
    #[serde(default)]
    pub http: Option<HttpModel>,
}

/// `from:` — who may be the peer.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct FromModel {
    #[serde(default)]
    pub identities: Option<List<Parsed<IdentityPattern>>>,
    #[serde(default)]
    pub namespaces: Option<List<Parsed<Namespace>>>,
    #[serde(default)]
    pub trust_domains: Option<List<Parsed<TrustDomain>>>,
    #[serde(default)]
    pub unauthenticated: Option<bool>,
    #[serde(default)]
    pub cidrs: Option<List<Parsed<Cidr>>>,
}

/// `http:` — what the request must look like.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct HttpModel {
    #[serde(default)]
    pub methods: Option<List<Parsed<Method>>>,
    #[serde(default)]
    pub paths: Option<List<Parsed<PathPattern>>>,
    #[serde(default)]
    pub hosts: Option<List<Parsed<HostPattern>>>,
    #[serde(default)]
    pub headers: Option<Headers>,
}

/// A value read from a scalar and checked by its own parser.
pub(crate) trait FromScalar: Sized {
    const EXPECTING: &'static str;
    fn from_scalar(s: &str) -> Result<Self, String>;
    /// Numbers are accepted where they make sense (ports).
    fn from_number(n: i128) -> Result<Self, String> {
        Err(format!(
            "expected {}, found the number {n}",
            Self::EXPECTING
        ))
    }
}

/// A checked scalar.
#[derive(Debug)]
pub(crate) struct Parsed<T>(pub T);

impl<'de, T: FromScalar> Deserialize<'de> for Parsed<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<T>(PhantomData<T>);
        impl<T: FromScalar> Visitor<'_> for V<T> {
            type Value = Parsed<T>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(T::EXPECTING)
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                T::from_scalar(v).map(Parsed).map_err(E::custom)
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
                T::from_number(i128::from(v)).map(Parsed).map_err(E::custom)
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
                T::from_number(i128::from(v)).map(Parsed).map_err(E::custom)
            }
        }
        d.deserialize_any(V(PhantomData))
    }
}

/// A non-empty list: an empty one would silently match nothing, so it is
/// refused (leave the key out to mean "any").
#[derive(Debug)]
pub(crate) struct List<T>(pub Vec<T>);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for List<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<T>(PhantomData<T>);
        impl<'de, T: Deserialize<'de>> Visitor<'de> for V<T> {
            type Value = List<T>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a list")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let mut items = Vec::new();
                while let Some(item) = seq.next_element()? {
                    items.push(item);
                }
                if items.is_empty() {
                    return Err(de::Error::custom(
                        "empty list matches nothing; leave the key out to match anything",
                    ));
                }
                Ok(List(items))
            }
        }
        d.deserialize_seq(V(PhantomData))
    }
}

/// A rule name: used in logs and as a metric label, so it is kept short and
/// plain; `default` is reserved for decisions no rule made.
#[derive(Debug)]
pub(crate) struct Name(pub String);

impl FromScalar for Name {
    const EXPECTING: &'static str = "a rule name";
    fn from_scalar(s: &str) -> Result<Self, String> {
        let ok = !s.is_empty()
            && s.len() <= 128
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'));
        if !ok {
            return Err(format!(
                "invalid rule name {s:?}: use 1-128 letters, digits, '-', '_', '.', ':'"
            ));
        }
        if s == super::DEFAULT_RULE {
            return Err("the rule name \"default\" is reserved".into());
        }
        Ok(Name(s.to_string()))
    }
}

impl FromScalar for PortRange {
    const EXPECTING: &'static str = "a port or a range like \"9000-9100\"";
    fn from_scalar(s: &str) -> Result<Self, String> {
        PortRange::parse(s)
    }
    fn from_number(n: i128) -> Result<Self, String> {
        PortRange::parse(&n.to_string())
    }
}

impl FromScalar for IdentityPattern {
    const EXPECTING: &'static str = "a SPIFFE id, optionally ending in `*`";
    fn from_scalar(s: &str) -> Result<Self, String> {
        IdentityPattern::parse(s)
    }
}

/// A Kubernetes namespace name.
#[derive(Debug)]
pub(crate) struct Namespace(pub String);

impl FromScalar for Namespace {
    const EXPECTING: &'static str = "a namespace";
    fn from_scalar(s: &str) -> Result<Self, String> {
        parse_namespace(s).map(Namespace)
    }
}

impl FromScalar for TrustDomain {
    const EXPECTING: &'static str = "a trust domain";
    fn from_scalar(s: &str) -> Result<Self, String> {
        parse_trust_domain(s)
    }
}

impl FromScalar for Cidr {
    const EXPECTING: &'static str = "a CIDR like \"10.0.0.0/8\"";
    fn from_scalar(s: &str) -> Result<Self, String> {
        Cidr::parse(s)
    }
}

/// An HTTP method (case-sensitive).
#[derive(Debug)]
pub(crate) struct Method(pub String);

impl FromScalar for Method {
    const EXPECTING: &'static str = "an HTTP method";
    fn from_scalar(s: &str) -> Result<Self, String> {
        parse_method(s).map(Method)
    }
}

impl FromScalar for PathPattern {
    const EXPECTING: &'static str = "a path pattern";
    fn from_scalar(s: &str) -> Result<Self, String> {
        PathPattern::parse(s)
    }
}

impl FromScalar for HostPattern {
    const EXPECTING: &'static str = "a host name";
    fn from_scalar(s: &str) -> Result<Self, String> {
        HostPattern::parse(s)
    }
}

/// `headers:` — a map from header name to a value, a list of values,
/// `true` (present) or `false` (absent).
#[derive(Debug)]
pub(crate) struct Headers(pub Vec<HeaderCond>);

impl<'de> Deserialize<'de> for Headers {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Headers;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a map of header names to values")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Headers, A::Error> {
                let mut conds: Vec<HeaderCond> = Vec::new();
                while let Some(key) = map.next_key::<String>()? {
                    let name = parse_header_name(&key).map_err(de::Error::custom)?;
                    if conds.iter().any(|c| c.name == name) {
                        return Err(de::Error::custom(format!(
                            "header {name} is listed twice (names are case-insensitive)"
                        )));
                    }
                    let value = map.next_value::<HeaderValueModel>()?.0;
                    conds.push(HeaderCond { name, value });
                }
                if conds.is_empty() {
                    return Err(de::Error::custom(
                        "empty map matches anything; leave the key out",
                    ));
                }
                Ok(Headers(conds))
            }
        }
        d.deserialize_map(V)
    }
}

struct HeaderValueModel(HeaderValue);

impl<'de> Deserialize<'de> for HeaderValueModel {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        fn value<E: de::Error>(s: &str) -> Result<String, E> {
            match http::HeaderValue::from_str(s) {
                Ok(_) => Ok(s.to_string()),
                Err(_) => Err(E::custom(format!("invalid header value {s:?}"))),
            }
        }
        impl<'de> Visitor<'de> for V {
            type Value = HeaderValueModel;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a header value, a list of values, true (present) or false (absent)")
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<Self::Value, E> {
                Ok(HeaderValueModel(if v {
                    HeaderValue::Present
                } else {
                    HeaderValue::Absent
                }))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(HeaderValueModel(HeaderValue::OneOf(vec![value(v)?])))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
                self.visit_str(&v.to_string())
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
                self.visit_str(&v.to_string())
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let mut values = Vec::new();
                while let Some(v) = seq.next_element::<ScalarString>()? {
                    values.push(value(&v.0)?);
                }
                if values.is_empty() {
                    return Err(de::Error::custom("empty list matches nothing"));
                }
                Ok(HeaderValueModel(HeaderValue::OneOf(values)))
            }
        }
        d.deserialize_any(V)
    }
}

/// A string, or a number taken as its text (YAML `x-version: 2`).
struct ScalarString(String);

impl<'de> Deserialize<'de> for ScalarString {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = ScalarString;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a header value")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<ScalarString, E> {
                Ok(ScalarString(v.to_string()))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<ScalarString, E> {
                Ok(ScalarString(v.to_string()))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<ScalarString, E> {
                Ok(ScalarString(v.to_string()))
            }
        }
        d.deserialize_any(V)
    }
}

//! SPIFFE ids (`spiffe://<trust-domain>/<path>`) as the mesh's identities.

use std::fmt;

use super::Error;

/// A validated trust domain, e.g. `cluster.local`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TrustDomain(String);

impl TrustDomain {
    /// Validates a trust domain name as the SPIFFE spec defines it.
    pub fn new(name: &str) -> Result<Self, Error> {
        let ok = !name.is_empty()
            && name.len() <= 255
            && name.bytes().all(|b| {
                b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_')
            });
        if ok {
            Ok(TrustDomain(name.to_string()))
        } else {
            Err(Error::BadTrustDomain(name.to_string()))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The id that names the trust domain itself; CA certificates carry it.
    pub fn id(&self) -> String {
        format!("spiffe://{}", self.0)
    }
}

impl fmt::Display for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A workload's SPIFFE id. Parsing enforces the spec, so a value of this type
/// is always safe to put in a certificate or compare byte for byte.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SpiffeId {
    trust_domain: TrustDomain,
    path: String,
}

impl SpiffeId {
    /// Parses `spiffe://td/path`; the path must be non-empty.
    pub fn parse(id: &str) -> Result<Self, Error> {
        let bad = |reason| Error::BadSpiffeId {
            id: id.to_string(),
            reason,
        };
        if id.len() > 2048 {
            return Err(bad("longer than 2048 bytes"));
        }
        let rest = id
            .strip_prefix("spiffe://")
            .ok_or_else(|| bad("must start with spiffe://"))?;
        let (td, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => return Err(bad("missing a workload path")),
        };
        let trust_domain = TrustDomain::new(td).map_err(|_| bad("invalid trust domain"))?;
        for segment in path[1..].split('/') {
            if segment.is_empty() {
                return Err(bad("empty path segment"));
            }
            if segment == "." || segment == ".." {
                return Err(bad("'.' and '..' segments are not allowed"));
            }
            let valid = segment
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'));
            if !valid {
                return Err(bad("path may hold only letters, digits, '.', '-' and '_'"));
            }
        }
        Ok(SpiffeId {
            trust_domain,
            path: path.to_string(),
        })
    }

    /// The Kubernetes form `spiffe://td/ns/<namespace>/sa/<service-account>`.
    /// Namespace and service account must be Kubernetes names (lowercase
    /// letters, digits, '-' and '.'), so no value can smuggle in a '/'.
    pub fn workload(
        td: &TrustDomain,
        namespace: &str,
        service_account: &str,
    ) -> Result<Self, Error> {
        for (what, name) in [
            ("namespace", namespace),
            ("service account", service_account),
        ] {
            let ok = !name.is_empty()
                && name.len() <= 253
                && name.bytes().all(|b| {
                    b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.'
                });
            if !ok {
                return Err(Error::BadSpiffeId {
                    id: name.to_string(),
                    reason: if what == "namespace" {
                        "namespace must be a Kubernetes name (a-z, 0-9, '-', '.')"
                    } else {
                        "service account must be a Kubernetes name (a-z, 0-9, '-', '.')"
                    },
                });
            }
        }
        Self::parse(&format!(
            "spiffe://{td}/ns/{namespace}/sa/{service_account}"
        ))
    }

    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// The `/ns/..` part after the trust domain.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// The namespace of a Kubernetes-form id, if it has that form.
    pub fn namespace(&self) -> Option<&str> {
        let mut parts = self.path[1..].split('/');
        match (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) {
            (Some("ns"), Some(ns), Some("sa"), Some(_), None) => Some(ns),
            _ => None,
        }
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "spiffe://{}{}", self.trust_domain, self.path)
    }
}

impl std::str::FromStr for SpiffeId {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        Self::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_rejects() {
        let cases: &[(&str, bool)] = &[
            ("spiffe://cluster.local/ns/a/sa/b", true),
            ("spiffe://example.org/x", true),
            ("spiffe://cluster.local", false),
            ("spiffe://cluster.local/", false),
            ("spiffe://Cluster.local/ns/a", false),
            ("http://cluster.local/ns/a", false),
            ("spiffe://cluster.local/ns//sa/b", false),
            ("spiffe://cluster.local/ns/../sa/b", false),
            ("spiffe://cluster.local/ns/a b", false),
            ("spiffe:///ns/a", false),
            ("spiffe://cluster.local/ns/a/", false),
        ];
        for (id, ok) in cases {
            assert_eq!(SpiffeId::parse(id).is_ok(), *ok, "{id}");
        }
    }

    #[test]
    fn workload_form_round_trips() {
        let td = TrustDomain::new("cluster.local").unwrap();
        let id = SpiffeId::workload(&td, "demo", "client").unwrap();
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/demo/sa/client");
        assert_eq!(id.namespace(), Some("demo"));
        assert_eq!(SpiffeId::parse("spiffe://td/x").unwrap().namespace(), None);
    }
}

//! The CA material an install needs: a trust anchor (root), an issuer
//! (intermediate CA) signed by it for the identity service, and the trust
//! bundle every sidecar verifies against. The anchor's private key stays
//! out of everything printed: the issuer can be replaced from it later, so
//! it belongs offline.

use std::path::{Path, PathBuf};

use serde_norway::{Mapping, Value};

use super::{AnchorArgs, Error};
use crate::identity::{parse_cert_chain, pem_cert, read_pem_file, CaFiles, Issuer, NewCa};
use crate::identity::{read_cert_chain, TrustDomain};

/// The issuer Secret's and the trust bundle's contents.
pub struct CaMaterial {
    pub trust_domain: TrustDomain,
    /// `tls.crt`: the issuer certificate, then its chain up to the anchor.
    pub issuer_chain_pem: String,
    /// `tls.key`: the issuer's private key.
    pub issuer_key_pem: String,
    /// `bundle.pem`: the trust anchor(s), ending in one newline.
    pub bundle_pem: String,
    /// The anchor's key, only when it was generated here.
    anchor_key_pem: Option<String>,
}

impl std::fmt::Debug for CaMaterial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print a key.
        f.debug_struct("CaMaterial")
            .field("trust_domain", &self.trust_domain)
            .finish_non_exhaustive()
    }
}

impl CaMaterial {
    /// A new issuer under the anchor of `args` (read from files), or under
    /// a new anchor generated for `td`; checked before it is returned.
    pub fn new(td: &TrustDomain, args: &AnchorArgs) -> Result<Self, Error> {
        let (anchor, anchor_cert_pem, anchor_key_pem) =
            match (&args.trust_anchor_cert, &args.trust_anchor_key) {
                (Some(cert), Some(key)) => {
                    let files = CaFiles {
                        cert: cert.clone(),
                        key: key.clone(),
                    };
                    let issuer = Issuer::load(&files, td)?;
                    // The bundle is the anchor itself: the last certificate
                    // of its file (a root, after any chain above it).
                    let last = read_cert_chain(cert)?.pop().expect("at least one");
                    (issuer, pem_cert(&last), None)
                }
                _ => {
                    let root = NewCa::root(td, args.anchor_ttl)?;
                    let files = CaFiles {
                        cert: PathBuf::from("<generated trust anchor>"),
                        key: PathBuf::from("<generated trust anchor key>"),
                    };
                    let issuer = Issuer::from_pem(
                        &files,
                        root.cert_pem.as_bytes(),
                        root.key_pem.as_bytes(),
                        td,
                    )?;
                    (issuer, root.cert_pem, Some(root.key_pem))
                }
            };
        let issuer = NewCa::intermediate(&anchor, args.issuer_ttl)?;
        let material = CaMaterial {
            trust_domain: td.clone(),
            issuer_chain_pem: format!("{}{}", issuer.cert_pem, issuer.chain_pem),
            issuer_key_pem: issuer.key_pem,
            bundle_pem: normalize(&anchor_cert_pem),
            anchor_key_pem,
        };
        material.check()?;
        Ok(material)
    }

    /// The generated anchor's private key, if it was generated here.
    pub fn anchor_key_pem(&self) -> Option<&str> {
        self.anchor_key_pem.as_deref()
    }

    /// Checks that leaves of the issuer verify against the bundle as peers
    /// will check them, so that nothing unusable is ever printed.
    pub fn check(&self) -> Result<(), Error> {
        let names = CaFiles {
            cert: PathBuf::from("tls.crt"),
            key: PathBuf::from("tls.key"),
        };
        let issuer = Issuer::from_pem(
            &names,
            self.issuer_chain_pem.as_bytes(),
            self.issuer_key_pem.as_bytes(),
            &self.trust_domain,
        )?;
        let bundle =
            crate::tls::TrustBundle::from_pem(Path::new("bundle.pem"), self.bundle_pem.as_bytes())
                .map_err(Error::Material)?;
        crate::tls::check_issuer(&issuer, &self.trust_domain, bundle.roots).map_err(Error::Material)
    }

    /// Helm values carrying this material (`ca bootstrap --values-out`).
    pub fn helm_values(&self) -> Result<String, Error> {
        let mut issuer = Mapping::new();
        issuer.insert("crtPEM".into(), self.issuer_chain_pem.clone().into());
        issuer.insert("keyPEM".into(), self.issuer_key_pem.clone().into());
        let mut identity = Mapping::new();
        identity.insert("issuer".into(), Value::Mapping(issuer));
        identity.insert("trustBundlePEM".into(), self.bundle_pem.clone().into());
        let mut root = Mapping::new();
        root.insert("trustDomain".into(), self.trust_domain.as_str().into());
        root.insert("identity".into(), Value::Mapping(identity));
        let body = serde_norway::to_string(&Value::Mapping(root))?;
        Ok(format!(
            "# Helm values for charts/portcullis made by `portcullis ca bootstrap`:\n\
             # the identity service's issuer (with its PRIVATE KEY: keep this file\n\
             # secret) and the trust bundle. Use: helm install ... -f <this file>\n{body}"
        ))
    }
}

/// PEM text ending in exactly one newline (as the chart stores it).
fn normalize(pem: &str) -> String {
    format!("{}\n", pem.trim())
}

/// The CA material read back from a `ca bootstrap` values file.
pub struct FromValues {
    pub trust_domain: Option<String>,
    crt: String,
    key: String,
    bundle: String,
}

impl FromValues {
    /// Reads a values file, refusing any key `install` cannot apply
    /// without Helm (so nothing in it is silently ignored).
    pub fn read(path: &Path) -> Result<Self, Error> {
        let bad = |message: String| Error::Values {
            path: path.to_path_buf(),
            message,
        };
        let text = read_pem_file(path)?;
        let value: Value = serde_norway::from_slice(&text).map_err(|e| bad(e.to_string()))?;
        let only = |v: &Value, at: &str, keys: &[&str]| -> Result<(), Error> {
            let map = v
                .as_mapping()
                .ok_or_else(|| bad(format!("{at} is not a mapping")))?;
            for k in map.keys() {
                let k = k.as_str().unwrap_or("?");
                if !keys.contains(&k) {
                    let hint = if format!("{at}{k}") == "proxy" {
                        " (for proxy.meshCidrs give --mesh-cidrs)"
                    } else {
                        ""
                    };
                    return Err(bad(format!(
                        "{at}{k} is not applied by `portcullis install` (only trustDomain, identity.issuer.crtPEM/keyPEM and identity.trustBundlePEM are); use Helm for other values{hint}"
                    )));
                }
            }
            Ok(())
        };
        only(&value, "", &["trustDomain", "identity"])?;
        only(
            &value["identity"],
            "identity.",
            &["issuer", "trustBundlePEM"],
        )?;
        only(
            &value["identity"]["issuer"],
            "identity.issuer.",
            &["crtPEM", "keyPEM"],
        )?;
        let text_at = |v: &Value, name: &str| -> Result<String, Error> {
            v.as_str()
                .filter(|s| !s.trim().is_empty())
                .map(str::to_string)
                .ok_or_else(|| bad(format!("{name} is missing")))
        };
        Ok(FromValues {
            trust_domain: value["trustDomain"].as_str().map(str::to_string),
            crt: text_at(
                &value["identity"]["issuer"]["crtPEM"],
                "identity.issuer.crtPEM",
            )?,
            key: text_at(
                &value["identity"]["issuer"]["keyPEM"],
                "identity.issuer.keyPEM",
            )?,
            bundle: text_at(
                &value["identity"]["trustBundlePEM"],
                "identity.trustBundlePEM",
            )?,
        })
    }

    /// The material, checked for `td`.
    pub fn material(self, path: &Path, td: &TrustDomain) -> Result<CaMaterial, Error> {
        parse_cert_chain(path, self.bundle.as_bytes())?;
        let material = CaMaterial {
            trust_domain: td.clone(),
            issuer_chain_pem: self.crt,
            issuer_key_pem: self.key,
            bundle_pem: normalize(&self.bundle),
            anchor_key_pem: None,
        };
        material.check()?;
        Ok(material)
    }
}

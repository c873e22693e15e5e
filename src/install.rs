//! `portcullis install` and `portcullis ca bootstrap`: from nothing to a
//! meshed cluster without Helm at runtime.
//!
//! `install` prints the whole manifest set: the chart's render
//! (deploy/portcullis.yaml, embedded at build time) with the chosen
//! namespace, trust domain and mesh CIDRs applied structurally
//! ([`manifest`]), plus the identity service's issuer Secret and the
//! trust-bundle ConfigMap made from a trust anchor ([`anchor`]): a new one,
//! or one the user keeps offline.
//! `ca bootstrap` writes the same CA material as Helm values, so that
//! `helm install -f values.yaml` needs no `--set-file`.

pub mod anchor;
pub mod manifest;

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Args;

pub use anchor::CaMaterial;
pub use manifest::render;

/// What can stop `install` or `ca bootstrap`.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Identity(#[from] crate::identity::Error),
    #[error("{0}")]
    Usage(String),
    #[error("the trust anchor and issuer do not fit together: {0}")]
    Material(String),
    #[error("--values {path}: {message}")]
    Values { path: PathBuf, message: String },
    #[error("the embedded manifest (deploy/portcullis.yaml) {0}")]
    Manifest(String),
    #[error("YAML: {0}")]
    Yaml(#[from] serde_norway::Error),
}

/// Where the trust anchor comes from, shared by `install` and `ca bootstrap`.
#[derive(Debug, Clone, Args)]
pub struct AnchorArgs {
    /// The trust anchor (root CA certificate, PEM) to sign a new issuer
    /// with; without it a new anchor is generated.
    #[arg(long, value_name = "FILE", requires = "trust_anchor_key")]
    pub trust_anchor_cert: Option<PathBuf>,
    /// The trust anchor's private key (PEM). It is only read, never printed.
    #[arg(long, value_name = "FILE", requires = "trust_anchor_cert")]
    pub trust_anchor_key: Option<PathBuf>,
    /// Write the generated trust anchor's private key here (mode 0600), to
    /// keep offline for making the next issuer; without it the key is
    /// forgotten. Never printed.
    #[arg(long, value_name = "FILE", conflicts_with = "trust_anchor_cert")]
    pub trust_anchor_key_out: Option<PathBuf>,
    /// Write the generated trust anchor's certificate here (it is also the
    /// trust bundle).
    #[arg(long, value_name = "FILE", conflicts_with = "trust_anchor_cert")]
    pub trust_anchor_cert_out: Option<PathBuf>,
    /// Lifetime of a generated trust anchor.
    #[arg(long, default_value = "87600h", value_parser = humantime::parse_duration)]
    pub anchor_ttl: Duration,
    /// Lifetime of the issuer (intermediate CA) the identity service signs with.
    #[arg(long, default_value = "8760h", value_parser = humantime::parse_duration)]
    pub issuer_ttl: Duration,
    /// Replace existing files written by the `-out` flags.
    #[arg(long)]
    pub force: bool,
}

/// `portcullis install` flags.
#[derive(Debug, Clone, Args)]
pub struct InstallArgs {
    /// SPIFFE trust domain [default: the --values file's trustDomain, else
    /// cluster.local].
    #[arg(long)]
    pub trust_domain: Option<String>,
    /// Namespace of the identity service and the injector.
    #[arg(long, default_value = manifest::BASE_NAMESPACE)]
    pub namespace: String,
    #[command(flatten)]
    pub anchor: AnchorArgs,
    /// Helm values made by `portcullis ca bootstrap`: their issuer, trust
    /// bundle and trust domain are used instead of generating new ones.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["trust_anchor_cert", "trust_anchor_key_out", "trust_anchor_cert_out"])]
    pub values: Option<PathBuf>,
    /// The cluster's pod and Service networks (e.g. 10.244.0.0/16,10.96.0.0/12):
    /// every sidecar sends connections there over mTLS. Without them
    /// outbound traffic leaves as plain TCP, which strict sidecars refuse.
    #[arg(long, value_delimiter = ',', value_name = "CIDR", value_parser = crate::intercept::Cidr::parse)]
    pub mesh_cidrs: Vec<crate::intercept::Cidr>,
}

/// Printed when `install` is given no `--mesh-cidrs`: the install works, but
/// meshed pods cannot call each other until it is set.
pub const NO_MESH_CIDRS_WARNING: &str = "portcullis install: warning: no --mesh-cidrs: sidecars will send outbound traffic as plain TCP, which the receiving sidecars (strict by default) refuse, so meshed pods cannot call each other; give your pod and Service CIDRs, e.g. --mesh-cidrs 10.244.0.0/16,10.96.0.0/12";

/// `portcullis ca bootstrap` flags.
#[derive(Debug, Clone, Args)]
pub struct BootstrapArgs {
    /// Write Helm values carrying the issuer and trust bundle here (mode
    /// 0600: it holds the issuer's private key).
    #[arg(long, value_name = "FILE")]
    pub values_out: PathBuf,
    /// The trust domain of the issuer and the sidecars' SPIFFE ids.
    #[arg(long, default_value = "cluster.local")]
    pub trust_domain: String,
    #[command(flatten)]
    pub anchor: AnchorArgs,
}

/// Runs `install`: prints the manifests on stdout; notes go to stderr.
pub fn install(args: &InstallArgs) -> Result<(), Error> {
    let material = match &args.values {
        Some(path) => {
            let values = anchor::FromValues::read(path)?;
            let td = args
                .trust_domain
                .clone()
                .or(values.trust_domain.clone())
                .unwrap_or_else(|| manifest::BASE_TRUST_DOMAIN.to_string());
            values.material(path, &trust_domain(&td)?)?
        }
        None => {
            let td = args
                .trust_domain
                .as_deref()
                .unwrap_or(manifest::BASE_TRUST_DOMAIN);
            let material = CaMaterial::new(&trust_domain(td)?, &args.anchor)?;
            write_anchor_outputs(&material, &args.anchor)?;
            material
        }
    };
    let cidrs: Vec<String> = args.mesh_cidrs.iter().map(|c| c.to_string()).collect();
    let text = render(&args.namespace, &material, &cidrs)?;
    print!("{text}");
    if cidrs.is_empty() {
        eprintln!("{NO_MESH_CIDRS_WARNING}");
    }
    eprintln!(
        "portcullis install: namespace {}, trust domain {}; the output holds the issuer's private key, treat it as a secret",
        args.namespace, material.trust_domain
    );
    Ok(())
}

/// Runs `ca bootstrap`: writes the values file and says what it did.
pub fn bootstrap(args: &BootstrapArgs) -> Result<(), Error> {
    let material = CaMaterial::new(&trust_domain(&args.trust_domain)?, &args.anchor)?;
    let values = material.helm_values()?;
    crate::identity::write_file(
        &args.values_out,
        values.as_bytes(),
        0o600,
        args.anchor.force,
    )?;
    write_anchor_outputs(&material, &args.anchor)?;
    println!(
        "wrote {} (trust domain {}): helm install portcullis charts/portcullis -n portcullis --create-namespace -f {} --set 'proxy.meshCidrs={{10.244.0.0/16,10.96.0.0/12}}' (your cluster's pod and Service CIDRs)",
        args.values_out.display(),
        material.trust_domain,
        args.values_out.display()
    );
    Ok(())
}

fn trust_domain(s: &str) -> Result<crate::identity::TrustDomain, Error> {
    crate::identity::TrustDomain::new(s).map_err(|e| Error::Usage(format!("--trust-domain: {e}")))
}

/// Writes the generated anchor's key and certificate where asked.
fn write_anchor_outputs(material: &CaMaterial, args: &AnchorArgs) -> Result<(), Error> {
    let write = |path: &Path, text: &str, mode: u32| -> Result<(), Error> {
        crate::identity::write_file(path, text.as_bytes(), mode, args.force)?;
        eprintln!("portcullis: wrote {}", path.display());
        Ok(())
    };
    if let Some(path) = &args.trust_anchor_key_out {
        let key = material.anchor_key_pem().ok_or_else(|| {
            Error::Usage("--trust-anchor-key-out: no trust anchor was generated".into())
        })?;
        write(path, key, 0o600)?;
    }
    if let Some(path) = &args.trust_anchor_cert_out {
        write(path, &material.bundle_pem, 0o644)?;
    }
    Ok(())
}

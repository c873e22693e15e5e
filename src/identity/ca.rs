//! The local CA: making roots and intermediates, loading an issuer from files,
//! and signing leaf certificates for SPIFFE ids.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use ::time::OffsetDateTime;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType, SerialNumber, PKCS_ECDSA_P256_SHA256,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use x509_parser::prelude::{ASN1Time, FromDer, X509Certificate};

use super::pem::{parse_cert_chain, read_pem_file};
use super::{Error, SpiffeId, TrustDomain};

/// How far back certificates are dated, to forgive small clock skew between pods.
const BACKDATE: Duration = Duration::from_secs(60);

/// The two files of a CA directory: `ca.crt` (certificate, then its chain) and `ca.key`.
#[derive(Debug, Clone)]
pub struct CaFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl CaFiles {
    pub fn in_dir(dir: &Path) -> Self {
        CaFiles {
            cert: dir.join("ca.crt"),
            key: dir.join("ca.key"),
        }
    }
}

/// A freshly made CA (root or intermediate), ready to be written out.
pub struct NewCa {
    pub cert_pem: String,
    /// The chain above the new CA (empty for a root), PEM, to follow it in `ca.crt`.
    pub chain_pem: String,
    pub key_pem: String,
}

impl NewCa {
    /// Makes a self-signed root for `td`, valid for `ttl`.
    pub fn root(td: &TrustDomain, ttl: Duration) -> Result<Self, Error> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let params = ca_params(
            td,
            "portcullis root CA",
            ttl,
            BasicConstraints::Unconstrained,
        )?;
        let cert = params.self_signed(&key)?;
        Ok(NewCa {
            cert_pem: cert.pem(),
            chain_pem: String::new(),
            key_pem: key.serialize_pem(),
        })
    }

    /// Makes an intermediate signed by `issuer`, allowed to sign leaves only.
    pub fn intermediate(issuer: &Issuer, ttl: Duration) -> Result<Self, Error> {
        if !issuer.may_sign_cas {
            // Peers would refuse every leaf under it (path length exceeded).
            return Err(Error::Certificate(format!(
                "{} may sign leaves only (path length 0): issue intermediates from the root",
                issuer.subject
            )));
        }
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let td = issuer.trust_domain.clone();
        let mut params = ca_params(
            &td,
            "portcullis intermediate CA",
            ttl,
            BasicConstraints::Constrained(0),
        )?;
        // A distinct name per intermediate, so chain building never mixes
        // two of them up.
        let tag: [u8; 4] = rand::random();
        let tag: String = tag.iter().map(|b| format!("{b:02x}")).collect();
        params.distinguished_name.push(
            DnType::CommonName,
            format!("portcullis intermediate CA {td} {tag}"),
        );
        params.not_after = params.not_after.min(issuer.not_after);
        let cert = params.signed_by(&key, &issuer.handle, &issuer.key)?;
        Ok(NewCa {
            cert_pem: cert.pem(),
            chain_pem: issuer.chain_pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// Writes `ca.crt` (0644) and `ca.key` (0600) into `dir`; refuses to
    /// replace existing files unless `force`.
    pub fn write(&self, dir: &Path, force: bool) -> Result<CaFiles, Error> {
        let files = CaFiles::in_dir(dir);
        std::fs::create_dir_all(dir).map_err(|e| Error::Io(dir.to_path_buf(), e))?;
        write_file(
            &files.cert,
            format!("{}{}", self.cert_pem, self.chain_pem).as_bytes(),
            0o644,
            force,
        )?;
        write_file(&files.key, self.key_pem.as_bytes(), 0o600, force)?;
        Ok(files)
    }
}

fn ca_params(
    td: &TrustDomain,
    name: &str,
    ttl: Duration,
    limit: BasicConstraints,
) -> Result<CertificateParams, Error> {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "portcullis");
    dn.push(DnType::CommonName, format!("{name} {td}"));
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(limit);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.subject_alt_names = vec![SanType::URI(td.id().try_into()?)];
    params.serial_number = Some(random_serial());
    let now = OffsetDateTime::now_utc();
    params.not_before = now - BACKDATE;
    params.not_after = now + ttl;
    Ok(params)
}

fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    bytes[0] &= 0x7f; // keep it a positive INTEGER
    bytes[0] |= 0x01; // and never shorter than 16 bytes
    SerialNumber::from_slice(&bytes)
}

/// Writes a file with `mode`, via a temporary file and a rename so readers
/// never see half of it.
pub fn write_file(path: &Path, bytes: &[u8], mode: u32, force: bool) -> Result<(), Error> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    if !force && path.exists() {
        return Err(Error::file(
            path,
            "already exists (use --force to replace it)",
        ));
    }
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(|e| Error::Io(tmp.clone(), e))?;
    f.write_all(bytes).map_err(|e| Error::Io(tmp.clone(), e))?;
    f.sync_all().map_err(|e| Error::Io(tmp.clone(), e))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::Io(path.to_path_buf(), e))
}

/// A CA certificate and its key, checked and ready to sign leaves.
pub struct Issuer {
    /// The issuer's certificate followed by the rest of its chain, as loaded.
    pub chain: Vec<CertificateDer<'static>>,
    pub trust_domain: TrustDomain,
    pub subject: String,
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
    /// False when its path length is 0: it may sign leaves only.
    pub may_sign_cas: bool,
    key: KeyPair,
    /// rcgen's view of the issuer, used only to sign.
    handle: rcgen::Certificate,
}

impl std::fmt::Debug for Issuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the key.
        f.debug_struct("Issuer")
            .field("subject", &self.subject)
            .finish_non_exhaustive()
    }
}

impl Issuer {
    /// Loads and checks an issuer from PEM files.
    pub fn load(files: &CaFiles, td: &TrustDomain) -> Result<Self, Error> {
        let cert = read_pem_file(&files.cert)?;
        let key = read_pem_file(&files.key)?;
        Self::from_pem(files, &cert, &key, td)
    }

    /// Checks an issuer given as PEM bytes: the certificate is a CA, in date,
    /// of our trust domain, and the key is its key. `files` only names the
    /// files in errors.
    pub fn from_pem(
        files: &CaFiles,
        cert_pem: &[u8],
        key_pem: &[u8],
        td: &TrustDomain,
    ) -> Result<Self, Error> {
        let chain = parse_cert_chain(&files.cert, cert_pem)?;
        let key_text = std::str::from_utf8(key_pem)
            .map_err(|_| Error::file(&files.key, "not a PEM private key"))?;
        let key = KeyPair::from_pem(key_text)
            .map_err(|e| Error::file(&files.key, format!("not a usable PEM private key ({e})")))?;
        let (_, x509) = X509Certificate::from_der(&chain[0])
            .map_err(|e| Error::file(&files.cert, format!("certificate does not parse ({e})")))?;
        if !x509.is_ca() {
            return Err(Error::file(
                &files.cert,
                "is not a CA certificate (basicConstraints cA is false)",
            ));
        }
        if x509.public_key().raw != key.public_key_der().as_slice() {
            return Err(Error::file(
                &files.key,
                format!("does not match the certificate in {}", files.cert.display()),
            ));
        }
        let not_before = x509.validity().not_before.to_datetime();
        let not_after = x509.validity().not_after.to_datetime();
        let now = OffsetDateTime::now_utc();
        if now > not_after {
            return Err(Error::file(
                &files.cert,
                format!("CA certificate expired at {not_after}"),
            ));
        }
        if now < not_before {
            return Err(Error::file(
                &files.cert,
                format!("CA certificate is not valid before {not_before}"),
            ));
        }
        let domains = super::inspect::spiffe_uris(&x509);
        if !domains.is_empty() && !domains.iter().any(|u| u.trim_end_matches('/') == td.id()) {
            return Err(Error::file(
                &files.cert,
                format!(
                    "CA certificate is for {}, not trust domain {td}",
                    domains.join(", ")
                ),
            ));
        }
        let subject = x509.subject().to_string();
        let may_sign_cas = !matches!(
            x509.basic_constraints(),
            Ok(Some(bc)) if bc.value.path_len_constraint == Some(0)
        );
        let params = CertificateParams::from_ca_cert_der(&chain[0])
            .map_err(|e| Error::file(&files.cert, format!("cannot sign with this CA ({e})")))?;
        let handle = params.self_signed(&key)?;
        Ok(Issuer {
            chain,
            trust_domain: td.clone(),
            subject,
            not_before,
            not_after,
            may_sign_cas,
            key,
            handle,
        })
    }

    /// The issuer's certificate and chain, PEM.
    pub fn chain_pem(&self) -> String {
        self.chain.iter().map(|c| pem_cert(c)).collect()
    }

    /// Whether the issuer may sign right now.
    pub fn is_valid_at(&self, now: OffsetDateTime) -> bool {
        self.not_before <= now && now < self.not_after
    }

    /// Signs a leaf for `req.id` with a new in-memory P-256 key.
    pub fn issue(&self, req: &LeafRequest) -> Result<Leaf, Error> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let now = self.valid_now()?;
        let params = leaf_params(&req.id, req.ttl, now, self.not_after)?;
        let chain = self.sign(params, &key)?;
        Leaf::new(
            req.id.clone(),
            chain,
            PrivatePkcs8KeyDer::from(key.serialize_der()).into(),
        )
    }

    /// Signs a leaf for `id` around someone else's public key (from a CSR).
    /// Everything but the key comes from our own leaf template, so nothing a
    /// requester puts in its CSR (CA flag, usages, names) reaches the
    /// certificate. Returns the chain, leaf first.
    pub fn certify(
        &self,
        id: &SpiffeId,
        ttl: Duration,
        public_key: &impl rcgen::PublicKeyData,
    ) -> Result<Vec<CertificateDer<'static>>, Error> {
        let now = self.valid_now()?;
        self.sign(leaf_params(id, ttl, now, self.not_after)?, public_key)
    }

    /// A TLS server leaf for the identity service itself: the SPIFFE id as
    /// URI SAN plus `dns_names`, so sidecars can check the URL's host name.
    pub fn issue_server(
        &self,
        id: &SpiffeId,
        dns_names: &[String],
        ttl: Duration,
    ) -> Result<Leaf, Error> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let now = self.valid_now()?;
        let mut params = leaf_params(id, ttl, now, self.not_after)?;
        for name in dns_names {
            params
                .subject_alt_names
                .push(SanType::DnsName(name.clone().try_into()?));
        }
        let chain = self.sign(params, &key)?;
        Leaf::new(
            id.clone(),
            chain,
            PrivatePkcs8KeyDer::from(key.serialize_der()).into(),
        )
    }

    fn valid_now(&self) -> Result<OffsetDateTime, Error> {
        let now = OffsetDateTime::now_utc();
        if !self.is_valid_at(now) {
            return Err(Error::Certificate(format!(
                "issuer {} is not valid now",
                self.subject
            )));
        }
        Ok(now)
    }

    fn sign(
        &self,
        params: CertificateParams,
        public_key: &impl rcgen::PublicKeyData,
    ) -> Result<Vec<CertificateDer<'static>>, Error> {
        let cert = params.signed_by(public_key, &self.handle, &self.key)?;
        let mut chain = vec![cert.der().clone()];
        chain.extend(self.chain.iter().cloned());
        Ok(chain)
    }
}

fn leaf_params(
    id: &SpiffeId,
    ttl: Duration,
    now: OffsetDateTime,
    cap: OffsetDateTime,
) -> Result<CertificateParams, Error> {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "portcullis");
    params.distinguished_name = dn;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.subject_alt_names = vec![SanType::URI(id.to_string().try_into()?)];
    params.serial_number = Some(random_serial());
    params.use_authority_key_identifier_extension = true;
    params.not_before = now - BACKDATE;
    params.not_after = (now + ttl).min(cap);
    Ok(params)
}

/// PEM text of one certificate.
pub fn pem_cert(der: &CertificateDer<'_>) -> String {
    pem_encode("CERTIFICATE", der.as_ref())
}

/// PEM text of one DER object under `label` (`CERTIFICATE`, `CERTIFICATE REQUEST`…).
pub fn pem_encode(label: &str, der: &[u8]) -> String {
    let b64 = base64_encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).expect("base64 is ascii"));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

fn base64_encode(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// What a leaf is requested for.
#[derive(Debug, Clone)]
pub struct LeafRequest {
    pub id: SpiffeId,
    pub ttl: Duration,
}

/// A signed leaf certificate with its chain and in-memory key.
pub struct Leaf {
    pub id: SpiffeId,
    /// Leaf first, then the issuer's chain.
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
    pub serial: String,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    /// When this process received it; renewal is scheduled from here.
    pub received_at: SystemTime,
    /// When the rotator plans to replace it (shown by `/certs`).
    pub renew_at: Option<SystemTime>,
}

impl std::fmt::Debug for Leaf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Leaf")
            .field("id", &self.id)
            .field("serial", &self.serial)
            .finish_non_exhaustive()
    }
}

impl Leaf {
    /// Wraps a signed chain, reading serial and validity from the leaf.
    pub fn new(
        id: SpiffeId,
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
    ) -> Result<Self, Error> {
        let (_, x509) =
            X509Certificate::from_der(&chain[0]).map_err(|e| Error::Certificate(e.to_string()))?;
        let ts =
            |t: ASN1Time| SystemTime::UNIX_EPOCH + Duration::from_secs(t.timestamp().max(0) as u64);
        Ok(Leaf {
            serial: x509.raw_serial_as_string(),
            not_before: ts(x509.validity().not_before),
            not_after: ts(x509.validity().not_after),
            received_at: SystemTime::now(),
            renew_at: None,
            id,
            chain,
            key,
        })
    }

    /// PEM of the chain, leaf first.
    pub fn chain_pem(&self) -> String {
        self.chain.iter().map(|c| pem_cert(c)).collect()
    }

    /// PEM of the private key, for `ca issue` only (the sidecar never writes it).
    pub fn key_pem(&self) -> String {
        pem_encode("PRIVATE KEY", self.key.secret_der())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use x509_parser::prelude::GeneralName;

    #[test]
    fn base64_matches_known_values() {
        assert_eq!(base64_encode(b""), "");
        assert_eq!(base64_encode(b"f"), "Zg==");
        assert_eq!(base64_encode(b"fo"), "Zm8=");
        assert_eq!(base64_encode(b"foo"), "Zm9v");
        assert_eq!(base64_encode(b"foobar"), "Zm9vYmFy");
    }

    #[test]
    fn issues_leaf_with_only_the_uri_san_and_capped_expiry() {
        let dir = tempfile::tempdir().unwrap();
        let td = TrustDomain::new("cluster.local").unwrap();
        let files = NewCa::root(&td, Duration::from_secs(3600))
            .unwrap()
            .write(dir.path(), false)
            .unwrap();
        let issuer = Issuer::load(&files, &td).unwrap();
        let id = SpiffeId::parse("spiffe://cluster.local/ns/a/sa/b").unwrap();
        let leaf = issuer
            .issue(&LeafRequest {
                id: id.clone(),
                ttl: Duration::from_secs(7200),
            })
            .unwrap();
        let (_, x) = X509Certificate::from_der(&leaf.chain[0]).unwrap();
        assert!(!x.is_ca());
        let san = x.subject_alternative_name().unwrap().unwrap();
        assert_eq!(san.value.general_names.len(), 1);
        assert!(matches!(san.value.general_names[0], GeneralName::URI(u) if u == id.to_string()));
        let issuer_end = issuer.not_after.unix_timestamp();
        assert!(x.validity().not_after.timestamp() <= issuer_end);
        assert_eq!(leaf.chain.len(), 2);
    }

    #[test]
    fn refuses_wrong_key_non_ca_and_foreign_domain() {
        let dir = tempfile::tempdir().unwrap();
        let td = TrustDomain::new("cluster.local").unwrap();
        let a = NewCa::root(&td, Duration::from_secs(3600)).unwrap();
        let b = NewCa::root(&td, Duration::from_secs(3600)).unwrap();
        let files = CaFiles::in_dir(dir.path());
        let err =
            Issuer::from_pem(&files, a.cert_pem.as_bytes(), b.key_pem.as_bytes(), &td).unwrap_err();
        assert!(err.to_string().contains("does not match"), "{err}");
        let other = TrustDomain::new("other.org").unwrap();
        let err = Issuer::from_pem(&files, a.cert_pem.as_bytes(), a.key_pem.as_bytes(), &other)
            .unwrap_err();
        assert!(
            err.to_string().contains("not trust domain other.org"),
            "{err}"
        );
        let issuer =
            Issuer::from_pem(&files, a.cert_pem.as_bytes(), a.key_pem.as_bytes(), &td).unwrap();
        let id = SpiffeId::parse("spiffe://cluster.local/ns/a/sa/b").unwrap();
        let leaf = issuer
            .issue(&LeafRequest {
                id,
                ttl: Duration::from_secs(60),
            })
            .unwrap();
        let err = Issuer::from_pem(
            &files,
            leaf.chain_pem().as_bytes(),
            leaf.key_pem().as_bytes(),
            &td,
        )
        .unwrap_err();
        assert!(err.to_string().contains("not a CA"), "{err}");
    }

    #[test]
    fn write_refuses_to_overwrite_without_force() {
        let dir = tempfile::tempdir().unwrap();
        let td = TrustDomain::new("cluster.local").unwrap();
        let ca = NewCa::root(&td, Duration::from_secs(3600)).unwrap();
        ca.write(dir.path(), false).unwrap();
        assert!(ca.write(dir.path(), false).is_err());
        ca.write(dir.path(), true).unwrap();
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join("ca.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}

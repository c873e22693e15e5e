//! Writes the seeds that are made rather than copied: real ClientHellos
//! from rustls (one offering the mesh ALPN, one offering `h2`, one split
//! over two records) and a real CSR from rcgen in each form the `csr`
//! target reads. Run from `fuzz/`: `cargo +nightly run --example seeds`.

use std::path::Path;
use std::sync::Arc;

use rcgen::{CertificateParams, KeyPair, SanType};
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection, RootCertStore};

const ID: &str = "spiffe://cluster.local/ns/default/sa/client";

fn hello(alpn: &[u8]) -> Vec<u8> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("TLS 1.3 is supported")
        .with_root_certificates(RootCertStore::empty())
        .with_no_client_auth();
    cfg.alpn_protocols = vec![alpn.to_vec()];
    let name = ServerName::try_from("portcullis.invalid").expect("a valid name");
    let mut conn = ClientConnection::new(Arc::new(cfg), name).expect("a client");
    let mut out = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut out).expect("writing to a Vec");
    }
    out
}

/// The same handshake message carried in two records.
fn split(record: &[u8]) -> Vec<u8> {
    let body = &record[5..];
    let (a, b) = body.split_at(body.len() / 2);
    let mut out = Vec::new();
    for part in [a, b] {
        out.extend_from_slice(&record[..3]);
        out.extend_from_slice(&(part.len() as u16).to_be_bytes());
        out.extend_from_slice(part);
    }
    out
}

fn write(dir: &Path, name: &str, bytes: &[u8]) {
    std::fs::create_dir_all(dir).expect("corpus directory");
    std::fs::write(dir.join(name), bytes).expect("writing a seed");
}

fn main() {
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    let hellos = corpus.join("client_hello");
    let mesh = hello(b"portcullis/1");
    write(&hellos, "rustls-mesh-alpn", &mesh);
    write(&hellos, "rustls-h2-alpn", &hello(b"h2"));
    write(&hellos, "rustls-mesh-two-records", &split(&mesh));

    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("a P-256 key");
    let mut params = CertificateParams::default();
    params.subject_alt_names = vec![SanType::URI(ID.try_into().expect("an ia5 string"))];
    let csr = params.serialize_request(&key).expect("a CSR");
    let pem = csr.pem().expect("PEM");
    let csrs = corpus.join("csr");
    let body = serde_json::json!({"identity": ID, "csr": pem, "ttl_seconds": 3600});
    let mut seed = vec![0u8];
    seed.extend_from_slice(body.to_string().as_bytes());
    write(&csrs, "certify-request", &seed);
    let mut seed = vec![1u8];
    seed.extend_from_slice(csr.der());
    write(&csrs, "csr-der", &seed);
    let review = serde_json::json!({
        "authenticated": true,
        "user": {
            "username": "system:serviceaccount:default:client",
            "uid": "4b8c6f1e-0d5a-4a57-9b8e-2f1d3c4b5a69",
            "groups": ["system:serviceaccounts", "system:serviceaccounts:default", "system:authenticated"],
            "extra": {
                "authentication.kubernetes.io/pod-name": ["client-7d9f8b6c5-x2x4z"],
                "authentication.kubernetes.io/pod-uid": ["0f3e2d1c-5b4a-4c3d-8e9f-1a2b3c4d5e6f"]
            }
        },
        "audiences": ["portcullis-ca"]
    });
    let mut seed = vec![2u8];
    seed.extend_from_slice(review.to_string().as_bytes());
    write(&csrs, "token-review-status", &seed);
    let mut seed = vec![3u8];
    seed.extend_from_slice(pem.as_bytes());
    write(&csrs, "csr-pem", &seed);
}

//! kx-compare: the X25519MLKEM768 of portcullis (`src/tls/pq.rs`: ring's
//! X25519 + the pure-Rust `ml-kem` crate) against rustls' own implementation
//! on aws-lc-rs. First interoperability (exits non-zero on any failure):
//! the key exchange alone with the secrets compared byte for byte, then full
//! TLS 1.3 mTLS handshakes between the two providers in both directions.
//! Then speed: the key exchange alone, and whole mTLS handshakes, each
//! provider with X25519 alone as its baseline, in the same run.
//!
//! Everything runs in memory (no sockets), so the numbers are CPU cost.

/// portcullis' `src/tls/pq.rs`, compiled into this program as it is.
#[path = "../../../src/tls"]
mod tls {
    #[allow(dead_code)]
    pub mod pq;
}
use tls::pq;

use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::client::Resumption;
use rustls::crypto::{aws_lc_rs, ring, CryptoProvider, SupportedKxGroup};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::{NoServerSessionStorage, WebPkiClientVerifier};
use rustls::{ClientConfig, Connection, NamedGroup, RootCertStore, ServerConfig};

/// Measurement rounds; every case runs once per round, cases interleaved,
/// so that load from other processes hits all cases alike.
const ROUNDS: usize = 7;
const ROUND_TIME: Duration = Duration::from_millis(250);
const ROUND_MAX: usize = 5_000;

type Groups = &'static [&'static dyn SupportedKxGroup];

static OURS: Groups = &[
    pq::X25519MLKEM768,
    ring::kx_group::X25519,
    ring::kx_group::SECP256R1,
];
static RING_X25519: Groups = &[ring::kx_group::X25519];
static RING_P256: Groups = &[ring::kx_group::SECP256R1];
static AWS_HYBRID: Groups = &[
    aws_lc_rs::kx_group::X25519MLKEM768,
    aws_lc_rs::kx_group::X25519,
    aws_lc_rs::kx_group::SECP256R1,
];
static AWS_X25519: Groups = &[aws_lc_rs::kx_group::X25519];

fn main() {
    let pki = Pki::new();
    let mut failures = 0;
    println!("## Interoperability\n");
    failures += kx_interop();
    failures += tls_interop(&pki);
    if failures > 0 {
        eprintln!("{failures} interoperability checks failed");
        std::process::exit(1);
    }
    println!("\n## Key exchange alone (client start + server encapsulate + client complete)\n");
    kx_speed();
    println!("\n## Full TLS 1.3 handshake with client certificates (P-256), no resumption\n");
    handshake_speed(&pki);
}

/// The hybrid alone: each implementation on one side, the other on the
/// other, and the two 64-byte secrets must be equal.
fn kx_interop() -> usize {
    let pairs: [(&str, &dyn SupportedKxGroup, &str, &dyn SupportedKxGroup); 3] = [
        (
            "ours",
            pq::X25519MLKEM768,
            "aws-lc-rs",
            aws_lc_rs::kx_group::X25519MLKEM768,
        ),
        (
            "aws-lc-rs",
            aws_lc_rs::kx_group::X25519MLKEM768,
            "ours",
            pq::X25519MLKEM768,
        ),
        ("ours", pq::X25519MLKEM768, "ours", pq::X25519MLKEM768),
    ];
    let mut failures = 0;
    for (cname, client, sname, server) in pairs {
        let mut ok = true;
        for _ in 0..100 {
            let c = client.start().expect("client start");
            let s = match server.start_and_complete(c.pub_key()) {
                Ok(s) => s,
                Err(_) => {
                    ok = false;
                    break;
                }
            };
            match c.complete(&s.pub_key) {
                Ok(secret) if secret.secret_bytes() == s.secret.secret_bytes() => {}
                _ => {
                    ok = false;
                    break;
                }
            }
        }
        println!(
            "- key exchange, client {cname} / server {sname}, 100 exchanges, equal 64-byte secrets: {}",
            verdict(ok)
        );
        failures += usize::from(!ok);
    }
    failures
}

/// Whole handshakes between the providers; both ends must report the group
/// wanted, and application data must cross both ways.
fn tls_interop(pki: &Pki) -> usize {
    let aws = || aws_lc_rs::default_provider();
    let cases: [(
        &str,
        CryptoProvider,
        Groups,
        &str,
        CryptoProvider,
        Groups,
        NamedGroup,
    ); 5] = [
        (
            "ours",
            ring::default_provider(),
            OURS,
            "aws-lc-rs",
            aws(),
            AWS_HYBRID,
            NamedGroup::X25519MLKEM768,
        ),
        (
            "aws-lc-rs",
            aws(),
            AWS_HYBRID,
            "ours",
            ring::default_provider(),
            OURS,
            NamedGroup::X25519MLKEM768,
        ),
        (
            "ours",
            ring::default_provider(),
            OURS,
            "aws-lc-rs X25519 only",
            aws(),
            AWS_X25519,
            NamedGroup::X25519,
        ),
        (
            "aws-lc-rs X25519 only",
            aws(),
            AWS_X25519,
            "ours",
            ring::default_provider(),
            OURS,
            NamedGroup::X25519,
        ),
        (
            "ring P-256 only",
            ring::default_provider(),
            RING_P256,
            "ours",
            ring::default_provider(),
            OURS,
            NamedGroup::secp256r1,
        ),
    ];
    let mut failures = 0;
    for (cname, cp, cg, sname, sp, sg, want) in cases {
        let client = pki.client(cp, cg);
        let server = pki.server(sp, sg);
        let ok = match handshake(&client, &server, true) {
            Ok(h) => h.client_group == Some(want) && h.server_group == Some(want),
            Err(e) => {
                eprintln!("  {e}");
                false
            }
        };
        println!(
            "- TLS, client {cname} / server {sname}: {want:?} both sides, data both ways: {}",
            verdict(ok)
        );
        failures += usize::from(!ok);
    }
    failures
}

fn verdict(ok: bool) -> &'static str {
    if ok {
        "ok"
    } else {
        "FAILED"
    }
}

fn kx_speed() {
    let cases: [(&str, &dyn SupportedKxGroup); 5] = [
        ("ring X25519 (baseline)", ring::kx_group::X25519),
        ("ring P-256", ring::kx_group::SECP256R1),
        ("ours X25519MLKEM768 (ring + ml-kem)", pq::X25519MLKEM768),
        ("aws-lc-rs X25519", aws_lc_rs::kx_group::X25519),
        (
            "aws-lc-rs X25519MLKEM768",
            aws_lc_rs::kx_group::X25519MLKEM768,
        ),
    ];
    let times = measure(cases.len(), |i| {
        let g = cases[i].1;
        let c = g.start().unwrap();
        let s = g.start_and_complete(c.pub_key()).unwrap();
        c.complete(&s.pub_key).unwrap();
    });
    table(&cases.map(|c| c.0), &times);
}

fn handshake_speed(pki: &Pki) {
    let aws = || aws_lc_rs::default_provider();
    let cases = [
        (
            "ring, X25519 (baseline)",
            pki.client(ring::default_provider(), RING_X25519),
            pki.server(ring::default_provider(), RING_X25519),
        ),
        (
            "ring, P-256",
            pki.client(ring::default_provider(), RING_P256),
            pki.server(ring::default_provider(), RING_P256),
        ),
        (
            "ring + ours, X25519MLKEM768",
            pki.client(ring::default_provider(), OURS),
            pki.server(ring::default_provider(), OURS),
        ),
        (
            "aws-lc-rs, X25519",
            pki.client(aws(), AWS_X25519),
            pki.server(aws(), AWS_X25519),
        ),
        (
            "aws-lc-rs, X25519MLKEM768",
            pki.client(aws(), AWS_HYBRID),
            pki.server(aws(), AWS_HYBRID),
        ),
    ];
    let mut bytes = Vec::new();
    for (_, c, s) in &cases {
        let h = handshake(c, s, false).expect("handshake");
        bytes.push((h.client_bytes, h.server_bytes));
    }
    let times = measure(cases.len(), |i| {
        handshake(&cases[i].1, &cases[i].2, false).expect("handshake");
    });
    let names: Vec<String> = cases
        .iter()
        .zip(&bytes)
        .map(|((name, _, _), (c, s))| format!("{name} | {c} | {s}"))
        .collect();
    println!(
        "| case | client→server bytes | server→client bytes | µs per handshake | ÷ baseline |"
    );
    println!("| --- | ---: | ---: | ---: | ---: |");
    for (name, t) in names.iter().zip(&times) {
        println!("| {name} | {t:.1} | {:.2} |", t / times[0]);
    }
}

/// Median over rounds of each case's mean time per call, in µs.
fn measure(cases: usize, mut run: impl FnMut(usize)) -> Vec<f64> {
    for i in 0..cases {
        for _ in 0..20 {
            run(i);
        }
    }
    let mut samples = vec![Vec::new(); cases];
    for _ in 0..ROUNDS {
        for (i, s) in samples.iter_mut().enumerate() {
            let start = Instant::now();
            let mut n = 0;
            while n < ROUND_MAX && start.elapsed() < ROUND_TIME {
                run(i);
                n += 1;
            }
            s.push(start.elapsed().as_secs_f64() * 1e6 / n as f64);
        }
    }
    samples
        .into_iter()
        .map(|mut s| {
            s.sort_by(f64::total_cmp);
            s[s.len() / 2]
        })
        .collect()
}

fn table(names: &[&str], times: &[f64]) {
    println!("| case | µs per exchange | ÷ baseline |\n| --- | ---: | ---: |");
    for (name, t) in names.iter().zip(times) {
        println!("| {name} | {t:.1} | {:.2} |", t / times[0]);
    }
}

struct Handshake {
    client_group: Option<NamedGroup>,
    server_group: Option<NamedGroup>,
    client_bytes: usize,
    server_bytes: usize,
}

/// One full handshake in memory; with `data`, a message each way after it.
fn handshake(
    client: &Arc<ClientConfig>,
    server: &Arc<ServerConfig>,
    data: bool,
) -> Result<Handshake, String> {
    let name = ServerName::try_from("server.test").unwrap();
    let mut c = Connection::Client(
        rustls::ClientConnection::new(client.clone(), name).map_err(|e| e.to_string())?,
    );
    let mut s = Connection::Server(
        rustls::ServerConnection::new(server.clone()).map_err(|e| e.to_string())?,
    );
    let (mut client_bytes, mut server_bytes) = (0, 0);
    for _ in 0..10 {
        client_bytes += transfer(&mut c, &mut s)?;
        server_bytes += transfer(&mut s, &mut c)?;
        if !c.is_handshaking() && !s.is_handshaking() {
            break;
        }
    }
    if c.is_handshaking() || s.is_handshaking() {
        return Err("handshake did not finish".into());
    }
    if data {
        ping(&mut c, &mut s)?;
        ping(&mut s, &mut c)?;
    }
    Ok(Handshake {
        client_group: c.negotiated_key_exchange_group().map(|g| g.name()),
        server_group: s.negotiated_key_exchange_group().map(|g| g.name()),
        client_bytes,
        server_bytes,
    })
}

/// Sends "ping" from `a` to `b` as application data.
fn ping(a: &mut Connection, b: &mut Connection) -> Result<(), String> {
    use std::io::{Read, Write};
    a.writer().write_all(b"ping").map_err(|e| e.to_string())?;
    transfer(a, b)?;
    let mut got = [0u8; 4];
    b.reader().read_exact(&mut got).map_err(|e| e.to_string())?;
    if &got != b"ping" {
        return Err("application data garbled".into());
    }
    Ok(())
}

/// Moves everything `from` has to send into `to`; returns the byte count.
fn transfer(from: &mut Connection, to: &mut Connection) -> Result<usize, String> {
    let mut buf = Vec::new();
    while from.wants_write() {
        from.write_tls(&mut buf).map_err(|e| e.to_string())?;
    }
    let mut rd = &buf[..];
    while !rd.is_empty() {
        to.read_tls(&mut rd).map_err(|e| e.to_string())?;
        to.process_new_packets().map_err(|e| e.to_string())?;
    }
    Ok(buf.len())
}

/// A throw-away CA with a server and a client certificate, ECDSA P-256
/// like the mesh's.
struct Pki {
    roots: Arc<RootCertStore>,
    server: (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>),
    client: (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>),
}

impl Pki {
    fn new() -> Pki {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        let leaf = |name: &str| {
            let key = rcgen::KeyPair::generate().unwrap();
            let params = rcgen::CertificateParams::new(vec![name.to_string()]).unwrap();
            let cert = params.signed_by(&key, &ca_cert, &ca_key).unwrap();
            (
                vec![cert.der().clone()],
                PrivateKeyDer::Pkcs8(key.serialize_der().into()),
            )
        };
        let mut roots = RootCertStore::empty();
        roots.add(ca_cert.der().clone()).unwrap();
        Pki {
            roots: Arc::new(roots),
            server: leaf("server.test"),
            client: leaf("client.test"),
        }
    }

    fn server(&self, mut p: CryptoProvider, groups: Groups) -> Arc<ServerConfig> {
        p.kx_groups = groups.to_vec();
        let p = Arc::new(p);
        let verifier = WebPkiClientVerifier::builder_with_provider(self.roots.clone(), p.clone())
            .build()
            .unwrap();
        let mut c = ServerConfig::builder_with_provider(p)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.server.0.clone(), self.server.1.clone_key())
            .unwrap();
        c.send_tls13_tickets = 0;
        c.session_storage = Arc::new(NoServerSessionStorage {});
        Arc::new(c)
    }

    fn client(&self, mut p: CryptoProvider, groups: Groups) -> Arc<ClientConfig> {
        p.kx_groups = groups.to_vec();
        let mut c = ClientConfig::builder_with_provider(Arc::new(p))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(self.roots.clone())
            .with_client_auth_cert(self.client.0.clone(), self.client.1.clone_key())
            .unwrap();
        c.resumption = Resumption::disabled();
        Arc::new(c)
    }
}

//! What post-quantum key exchange costs a mesh handshake: the sidecar's own
//! TLS configs (TLS 1.3, P-256 SPIFFE certificates on both sides, no
//! resumption), with a client offering X25519 only (the baseline), P-256
//! only, or what a sidecar offers (X25519MLKEM768 first), all against the
//! sidecar's server config, in one run. Three views: the key exchange
//! alone, whole handshakes in memory (CPU cost, bytes on the wire), and
//! handshakes over loopback TCP (connect to handshake done). `make bench`
//! runs it; benches/README.md says how to read it.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};
use portcullis::identity::{CaFiles, Issuer, LeafRequest, NewCa, SpiffeId, TrustDomain};
use portcullis::tls::{mesh_configs, provider, TrustBundle, X25519MLKEM768};
use rustls::crypto::ring::kx_group::{SECP256R1, X25519};
use rustls::crypto::SupportedKxGroup;
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, Connection, ServerConfig};
use tokio::net::{TcpListener, TcpStream};

/// Rounds per case; cases take turns in every round, so that load from
/// other processes falls on all of them alike. Each round of a case runs for
/// `ROUND_TIME` or `ROUND_MAX` handshakes, whichever ends first.
const ROUNDS: usize = 7;
const ROUND_TIME: Duration = Duration::from_millis(300);
const ROUND_MAX: usize = 2_000;

struct Case {
    name: &'static str,
    /// What the client offers; `None`: the sidecar's own list.
    groups: Option<&'static [&'static dyn SupportedKxGroup]>,
}

const CASES: [Case; 3] = [
    Case {
        name: "client offers X25519 only (baseline)",
        groups: Some(&[X25519]),
    },
    Case {
        name: "client offers P-256 only",
        groups: Some(&[SECP256R1]),
    },
    Case {
        name: "sidecar to sidecar: X25519MLKEM768",
        groups: None,
    },
];

fn main() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let td = TrustDomain::new("cluster.local")?;
    let ca = NewCa::root(&td, Duration::from_secs(3600))?.write(dir.path(), false)?;
    let (server, clients) = configs(&ca, &td)?;

    println!("Key exchange alone (client start, server reply, client finish):\n");
    println!("| group | µs | ÷ X25519 |\n| --- | ---: | ---: |");
    let groups: [(&str, &dyn SupportedKxGroup); 3] = [
        ("X25519 (baseline)", X25519),
        ("P-256", SECP256R1),
        ("X25519MLKEM768", X25519MLKEM768),
    ];
    let kx = measure(groups.len(), |i| {
        let g = groups[i].1;
        let client = g.start().map_err(|e| anyhow!("{e}"))?;
        let server = g.start_and_complete(client.pub_key())?;
        client.complete(&server.pub_key)?;
        Ok(())
    })?;
    for ((name, _), t) in groups.iter().zip(&kx) {
        println!("| {name} | {t:.1} | {:.2} |", t / kx[0]);
    }

    println!("\nWhole mesh handshake in memory (both sides' CPU):\n");
    println!("| case | client→server bytes | server→client bytes | µs | ÷ baseline |");
    println!("| --- | ---: | ---: | ---: | ---: |");
    let mut groups_seen = Vec::new();
    for client in &clients {
        groups_seen.push(handshake(client, &server)?);
    }
    let mem = measure(clients.len(), |i| {
        handshake(&clients[i], &server).map(|_| ())
    })?;
    for ((case, seen), t) in CASES.iter().zip(&groups_seen).zip(&mem) {
        let (group, up, down) = seen;
        println!(
            "| {} ({group}) | {up} | {down} | {t:.1} | {:.2} |",
            case.name,
            t / mem[0]
        );
    }

    println!("\nMesh handshake over loopback TCP (connect → handshake done, one at a time):\n");
    println!("| case | µs | ÷ baseline |\n| --- | ---: | ---: |");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let tcp = rt.block_on(loopback(&server, &clients))?;
    for (case, t) in CASES.iter().zip(&tcp) {
        println!("| {} | {t:.1} | {:.2} |", case.name, t / tcp[0]);
    }
    Ok(())
}

/// The sidecar's server config, and one client config per case.
fn configs(ca: &CaFiles, td: &TrustDomain) -> Result<(Arc<ServerConfig>, Vec<Arc<ClientConfig>>)> {
    let issuer = Issuer::load(ca, td)?;
    let leaf = |sa: &str| -> Result<_> {
        Ok(issuer.issue(&LeafRequest {
            id: SpiffeId::parse(&format!("spiffe://{td}/ns/bench/sa/{sa}"))
                .map_err(|e| anyhow!("{e}"))?,
            ttl: Duration::from_secs(3600),
        })?)
    };
    let bundle = TrustBundle::load(Path::new(&ca.cert)).map_err(|e| anyhow!(e))?;
    let (server, _) = mesh_configs(provider(), td, &leaf("server")?, &bundle)?;
    let client_leaf = leaf("client")?;
    let mut clients = Vec::new();
    for case in &CASES {
        let mut p = (*provider()).clone();
        if let Some(groups) = case.groups {
            p.kx_groups = groups.to_vec();
        }
        let (_, client) = mesh_configs(Arc::new(p), td, &client_leaf, &bundle)?;
        clients.push(Arc::new(client));
    }
    Ok((Arc::new(server), clients))
}

/// One full handshake in memory; the group agreed on and the bytes each way.
fn handshake(
    client: &Arc<ClientConfig>,
    server: &Arc<ServerConfig>,
) -> Result<(&'static str, usize, usize)> {
    let name = ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into());
    let mut c = Connection::Client(rustls::ClientConnection::new(client.clone(), name)?);
    let mut s = Connection::Server(rustls::ServerConnection::new(server.clone())?);
    let (mut up, mut down) = (0, 0);
    for _ in 0..10 {
        up += transfer(&mut c, &mut s)?;
        down += transfer(&mut s, &mut c)?;
        if !c.is_handshaking() && !s.is_handshaking() {
            return Ok((portcullis::tls::kx_group_label(&c), up, down));
        }
    }
    bail!("handshake did not finish")
}

/// Moves everything `from` has to send into `to`; returns the byte count.
fn transfer(from: &mut Connection, to: &mut Connection) -> Result<usize> {
    let mut buf = Vec::new();
    while from.wants_write() {
        from.write_tls(&mut buf)?;
    }
    let mut rd = &buf[..];
    while !rd.is_empty() {
        to.read_tls(&mut rd)?;
        to.process_new_packets()?;
    }
    Ok(buf.len())
}

/// Per case, the median over rounds of the mean time per handshake over
/// 127.0.0.1, from `connect` until the client's handshake is done.
async fn loopback(server: &Arc<ServerConfig>, clients: &[Arc<ClientConfig>]) -> Result<Vec<f64>> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let acceptor = tokio_rustls::TlsAcceptor::from(server.clone());
    let accepting = tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let _ = tcp.set_nodelay(true);
                let _ = acceptor.accept(tcp).await;
            });
        }
    });
    let name = ServerName::IpAddress(addr.ip().into());
    let mut samples = vec![Vec::new(); clients.len()];
    for round in 0..=ROUNDS {
        for (i, client) in clients.iter().enumerate() {
            let connector = tokio_rustls::TlsConnector::from(client.clone());
            let start = Instant::now();
            let mut n = 0u32;
            while (n as usize) < ROUND_MAX && start.elapsed() < ROUND_TIME {
                let tcp = TcpStream::connect(addr).await?;
                tcp.set_nodelay(true)?;
                connector.connect(name.clone(), tcp).await?;
                n += 1;
            }
            // Round 0 warms up and is not kept.
            if round > 0 {
                samples[i].push(start.elapsed().as_secs_f64() * 1e6 / f64::from(n));
            }
        }
    }
    accepting.abort();
    Ok(samples.into_iter().map(median).collect())
}

/// Per case, the median over rounds of the mean time per call, in µs.
fn measure(cases: usize, mut run: impl FnMut(usize) -> Result<()>) -> Result<Vec<f64>> {
    let mut samples = vec![Vec::new(); cases];
    for round in 0..=ROUNDS {
        for (i, kept) in samples.iter_mut().enumerate() {
            let start = Instant::now();
            let mut n = 0u32;
            while (n as usize) < ROUND_MAX && start.elapsed() < ROUND_TIME {
                run(i)?;
                n += 1;
            }
            // Round 0 warms up and is not kept.
            if round > 0 {
                kept.push(start.elapsed().as_secs_f64() * 1e6 / f64::from(n));
            }
        }
    }
    Ok(samples.into_iter().map(median).collect())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

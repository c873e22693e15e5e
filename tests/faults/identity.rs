//! The identity service is down for longer than a leaf lives: the sidecars
//! serve until their leaves expire, then refuse mesh handshakes themselves
//! (counted as `own_cert_expired`, with one clear log line), and recover on
//! their own once the service is back on the same address.

use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use portcullis::config::CertSource;

use crate::common::*;
use crate::harness::*;

/// Every log line of this test process (all tests share one subscriber).
fn logs() -> &'static Arc<Mutex<Vec<u8>>> {
    static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        let buf: Arc<Mutex<Vec<u8>>> = Arc::default();
        let writer = buf.clone();
        let _ = tracing_subscriber::fmt()
            .with_env_filter("portcullis=info")
            .with_ansi(false)
            .with_writer(move || LogWriter(writer.clone()))
            .try_init();
        buf
    })
}

struct LogWriter(Arc<Mutex<Vec<u8>>>);

impl Write for LogWriter {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn logged(needle: &str) -> usize {
    let logs = logs().lock().unwrap();
    String::from_utf8_lossy(&logs)
        .lines()
        .filter(|l| l.contains(needle))
        .count()
}

fn now_secs() -> f64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

pub async fn identity_service_outage_longer_than_a_leaf() {
    logs();
    let f = Fixture::new().await;
    let ca = Service::start(&f.args(&[])).await;
    let ca_addr = ca.addr;
    let url = format!("https://{HOST}:{}", ca_addr.port());
    let echo = echo_server().await;
    for sa in ["server", "client"] {
        std::fs::write(f.dir.path().join(sa), format!("{sa}-token")).unwrap();
    }
    let remote = |sa: &str| {
        [
            "--ca-url",
            &url,
            "--ca-token-file",
            f.dir.path().join(sa).to_str().unwrap(),
            "--trust-bundle",
            f.bundle.to_str().unwrap(),
            "--service-account",
            sa,
            "--cert-ttl",
            "4s",
        ]
        .map(String::from)
        .to_vec()
    };
    let point = |s: &mut portcullis::config::Settings| {
        if let CertSource::Remote { connect_to, .. } = &mut s.cert_source {
            *connect_to = Some(ca_addr);
        }
    };
    let mut b_args = remote("server");
    b_args.extend(["--inbound-target".into(), echo.to_string()]);
    let b = Sidecar::spawn_with(&b_args, point).await;
    b.wait_ready().await;
    let mut a_args = remote("client");
    a_args.extend([
        "--upstream".into(),
        format!("127.0.0.1:0={}={}", b.addrs.inbound, id("server")),
    ]);
    let a = Sidecar::spawn_with(&a_args, point).await;
    a.wait_ready().await;
    let pair = Pair { a, b, app: echo };
    assert!(pair.ping(b"up").await);

    ca.stop().await;
    let stopped = Instant::now();
    assert!(pair.ping(b"still valid").await, "served until expiry");
    let expired = |s: &Sidecar| s.metric("portcullis_cert_expiry_timestamp_seconds", &[]);
    eventually("both leaves expired", Duration::from_secs(10), || async {
        expired(&pair.a).max(expired(&pair.b)) < now_secs()
    })
    .await;
    let served_for = stopped.elapsed();

    // Outbound: the client sidecar refuses before connecting.
    assert!(
        !pair.ping(b"expired").await,
        "no traffic on an expired leaf"
    );
    let refused = |s: &Sidecar, dir: &str| {
        s.metric(
            "portcullis_tls_handshakes_total",
            &[("direction", dir), ("result", "own_cert_expired")],
        )
    };
    assert!(refused(&pair.a, "outbound") >= 1.0);
    // Inbound: a peer with a valid leaf is refused by the expired server.
    let root = portcullis::identity::Issuer::load(
        &portcullis::identity::CaFiles::in_dir(&f.root_dir),
        &td(),
    )
    .unwrap();
    let probe = root
        .issue(&portcullis::identity::LeafRequest {
            id: id("probe"),
            ttl: Duration::from_secs(600),
        })
        .unwrap();
    let direct =
        match tls_connect(client_config(probe, &f.bundle_pem()), pair.b.addrs.inbound).await {
            Err(_) => None,
            Ok(s) => round_trip(s, b"direct").await.ok(),
        };
    assert!(
        direct.is_none_or(|out| out.is_empty()),
        "the expired server served a peer"
    );
    assert!(refused(&pair.b, "inbound") >= 1.0);
    eventually("the expiry is logged", Duration::from_secs(5), || async {
        logged("certificate expired without renewal") >= 2
    })
    .await;

    // The service returns on the same address; both recover on their own.
    let mut args = f.args(&[]);
    args[9] = ca_addr.to_string();
    let ca = Service::start(&args).await;
    let back = Instant::now();
    eventually("traffic flows again", Duration::from_secs(20), || {
        pair.ping(b"recovered")
    })
    .await;
    let recovered_in = back.elapsed();
    eprintln!(
        "identity outage: served {served_for:?} after the service stopped (4 s leaves), \
         recovered {recovered_in:?} after it returned"
    );
    assert!(
        recovered_in < Duration::from_secs(10),
        "expired sidecars retry at least every 5 s: {recovered_in:?}"
    );
    assert!(logged("certificate issued after the old one expired") >= 2);
    ca.stop().await;
}

//! The server sidecar is killed with SIGKILL while traffic flows and
//! restarted on the same ports. While it is down the client sidecar fails
//! closed: even a plaintext listener squatting on the server's port gets
//! only a TLS ClientHello, never the app's bytes. Traffic resumes within
//! 2 s of the restarted sidecar's `/ready`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::common::*;
use crate::proc::Proc;

/// When each ping started and whether it came back whole.
type Pings = Arc<Mutex<Vec<(Instant, bool)>>>;

/// Pings through the client sidecar every 20 ms until `stop`.
fn pinger(
    upstream: std::net::SocketAddr,
    stop: Arc<AtomicBool>,
) -> (Pings, tokio::task::JoinHandle<()>) {
    let log = Pings::default();
    let task = {
        let log = log.clone();
        tokio::spawn(async move {
            let deadline = Instant::now() + Duration::from_secs(120);
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                let started = Instant::now();
                let ok = match TcpStream::connect(upstream).await {
                    Ok(s) => matches!(
                        tokio::time::timeout(Duration::from_secs(3), round_trip(s, b"ping")).await,
                        Ok(Ok(out)) if out == b"ping"
                    ),
                    Err(_) => false,
                };
                log.lock().unwrap().push((started, ok));
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    (log, task)
}

pub async fn sigkill_and_restart() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::root(dir.path(), "ca", TD);
    let echo = echo_server().await;
    let server_args = |inbound: &str, admin: &str| {
        let mut args = issuer_args(&ca, &ca.files.cert, "server");
        args.extend(
            [
                "--inbound-listen",
                inbound,
                "--admin-listen",
                admin,
                "--outbound-listen",
                "127.0.0.1:0",
                "--inbound-target",
                &echo.to_string(),
            ]
            .map(String::from),
        );
        args
    };
    let mut b = Proc::run(&server_args("127.0.0.1:0", "127.0.0.1:0"));
    b.wait_ready().await;
    let (b_inbound, b_admin) = (b.inbound, b.admin);
    let mut a_args = issuer_args(&ca, &ca.files.cert, "client");
    a_args.extend([
        "--upstream".into(),
        format!("127.0.0.1:0={b_inbound}={}", id("server")),
    ]);
    let a = Sidecar::start(&a_args).await;
    let stop = Arc::new(AtomicBool::new(false));
    let (pings, pinger) = pinger(a.upstream(), stop.clone());
    eventually("traffic flows", Duration::from_secs(10), || async {
        pings.lock().unwrap().iter().filter(|(_, ok)| *ok).count() >= 5
    })
    .await;

    // A long-lived stream is open when the server dies.
    let mut long = TcpStream::connect(a.upstream()).await.unwrap();
    long.write_all(b"before").await.unwrap();
    let mut buf = [0u8; 6];
    long.read_exact(&mut buf).await.unwrap();

    b.kill();
    let killed = Instant::now();
    let mut rest = Vec::new();
    let ended = tokio::time::timeout(Duration::from_secs(5), long.read_to_end(&mut rest)).await;
    assert!(
        matches!(ended, Ok(Ok(0)) | Ok(Err(_))),
        "the open stream ends when its server dies: {ended:?}"
    );

    eventually(
        "pings fail while the server is down",
        Duration::from_secs(10),
        || async {
            let pings = pings.lock().unwrap();
            pings.iter().filter(|(at, ok)| !ok && *at > killed).count() >= 3
        },
    )
    .await;

    // A plaintext listener takes the dead server's port: the client sidecar
    // must still speak TLS to it and never hand over the app's bytes.
    let squatter = TcpListener::bind(b_inbound).await.unwrap();
    let squatting = Arc::new(AtomicBool::new(true));
    let heard = {
        let squatting = squatting.clone();
        tokio::spawn(async move {
            let mut readers = Vec::new();
            while squatting.load(Ordering::Relaxed) {
                let Ok(Ok((mut s, _))) =
                    tokio::time::timeout(Duration::from_millis(100), squatter.accept()).await
                else {
                    continue;
                };
                readers.push(tokio::spawn(async move {
                    let mut got = Vec::new();
                    let _ =
                        tokio::time::timeout(Duration::from_secs(2), s.read_to_end(&mut got)).await;
                    got
                }));
            }
            let mut all = Vec::new();
            for r in readers {
                all.push(r.await.unwrap());
            }
            all
        })
    };
    let failed_before = a.metric(
        "portcullis_tls_handshakes_total",
        &[("direction", "outbound")],
    ) - a.metric(
        "portcullis_tls_handshakes_total",
        &[("direction", "outbound"), ("result", "ok")],
    );
    let app_side = TcpStream::connect(a.upstream()).await.unwrap();
    let answer = tokio::time::timeout(
        Duration::from_secs(10),
        round_trip(app_side, b"SECRET app bytes"),
    )
    .await
    .expect("the client sidecar ends the connection");
    assert!(
        answer.as_deref().map(|a| a.is_empty()).unwrap_or(true),
        "nothing comes back: {answer:?}"
    );
    squatting.store(false, Ordering::Relaxed);
    let heard = heard.await.unwrap();
    assert!(!heard.is_empty(), "the squatter was connected to");
    for got in &heard {
        assert_eq!(
            got.first(),
            Some(&0x16),
            "a TLS handshake record came first"
        );
        assert!(
            !got.windows(6).any(|w| w == b"SECRET"),
            "the app's bytes never reach a non-mesh server"
        );
    }
    let failed_after = a.metric(
        "portcullis_tls_handshakes_total",
        &[("direction", "outbound")],
    ) - a.metric(
        "portcullis_tls_handshakes_total",
        &[("direction", "outbound"), ("result", "ok")],
    );
    assert!(
        failed_after > failed_before,
        "the failed handshake is counted"
    );

    // Restart on the same ports.
    let restarted = Instant::now();
    let b = Proc::run(&server_args(&b_inbound.to_string(), &b_admin.to_string()));
    assert_eq!((b.inbound, b.admin), (b_inbound, b_admin));
    let ready = b.wait_ready().await;
    eventually("traffic resumes", Duration::from_secs(10), || async {
        pings
            .lock()
            .unwrap()
            .iter()
            .any(|(at, ok)| *ok && *at >= ready)
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    pinger.await.unwrap();
    let pings = pings.lock().unwrap();
    let first_ok = pings
        .iter()
        .find(|(at, ok)| *ok && *at >= ready)
        .map(|(at, _)| at.duration_since(ready))
        .expect("a ping after ready");
    let down: Vec<_> = pings
        .iter()
        .filter(|(at, _)| *at > killed && *at < restarted)
        .collect();
    eprintln!(
        "sigkill/restart: restart to ready {:?}, first ok ping {:?} after ready, \
         {} pings while down (all failed: {})",
        ready.duration_since(restarted),
        first_ok,
        down.len(),
        down.iter().all(|(_, ok)| !ok)
    );
    assert!(
        first_ok < Duration::from_secs(2),
        "traffic resumed {first_ok:?} after /ready"
    );
    assert!(
        down.iter().all(|(_, ok)| !ok),
        "no ping succeeded while the server was down"
    );
    // Traffic went through a tunnel before and after: the dead peer's
    // connection was dropped from the pool and a new one was handshaken
    // with the restarted peer.
    let opened = a.metric(
        "portcullis_tunnel_connections_opened_total",
        &[("direction", "outbound")],
    );
    assert!(opened >= 2.0, "{opened} tunnel connections");
    assert!(
        a.metric(
            "portcullis_tunnel_streams_total",
            &[("direction", "outbound"), ("result", "ok")]
        ) >= 6.0,
        "the pings before the kill, the long stream and a ping after the restart"
    );
}

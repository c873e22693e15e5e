//! The tunnel listener as an attacker or a misbehaving peer sees it: only
//! mesh mTLS with h2, only CONNECT, only to this pod's own address and
//! never to the sidecar's own ports; a rule change closes only the streams
//! it denies; a stream cancelled in a request line resets the app
//! connection. The "pod" is 127.0.0.2: the sidecar runs in transparent
//! mode with its tunnel listener there, apps listen there too.

use std::path::Path;
use std::time::{Duration, SystemTime};

use http::{Method, StatusCode};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::common::*;
use crate::support::*;

const POD: &str = "127.0.0.2";

struct Pod {
    sidecar: Sidecar,
    tunnel: std::net::SocketAddr,
    ca: Ca,
    rules: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

async fn pod(extra: &[&str]) -> Pod {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::root(dir.path(), "ca", TD);
    let rules = dir.path().join("rules");
    std::fs::create_dir(&rules).unwrap();
    // Nothing denied yet: every authenticated peer may connect.
    std::fs::write(rules.join("00-open.yaml"), "rules: []\n").unwrap();
    let mut args = issuer_args(&ca, &ca.files.cert, "server");
    args.extend(
        [
            "--tunnel-listen",
            &format!("{POD}:0"),
            "--rules-dir",
            &rules.display().to_string(),
            "--file-poll-interval",
            "200ms",
        ]
        .map(String::from),
    );
    args.extend(extra.iter().map(|s| s.to_string()));
    let sidecar = Sidecar::start(&args).await;
    let tunnel = sidecar.addrs.tunnel.expect("a tunnel listener");
    Pod {
        sidecar,
        tunnel,
        ca,
        rules,
        _dir: dir,
    }
}

fn inbound_streams(p: &Pod, result: &str) -> f64 {
    p.sidecar.metric(
        "portcullis_tunnel_streams_total",
        &[("direction", "inbound"), ("result", result)],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_connect_to_this_pod_is_served() {
    // Port 1 is opaque: its app is connected before the answer.
    let p = pod(&["--opaque-ports", "1"]).await;
    let app = echo_on(POD).await;
    let elsewhere = echo_on("127.0.0.1").await;
    let config = tunnel_client_config(p.ca.leaf("client"), &p.ca.cert_pem());
    let send = h2_client(config, p.tunnel).await.unwrap();

    let (status, io) = open_stream(&send, Method::CONNECT, &app.to_string())
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK);
    assert!(echo_once(&mut io.unwrap(), b"to the pod").await);

    // Another host's address: the tunnel is not an open proxy.
    let (status, _) = open_stream(&send, Method::CONNECT, &elsewhere.to_string())
        .await
        .unwrap();
    assert_eq!(status, StatusCode::FORBIDDEN);
    // The sidecar's own ports would loop back into it.
    let own = format!("{POD}:{}", p.tunnel.port());
    let (status, _) = open_stream(&send, Method::CONNECT, &own).await.unwrap();
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(inbound_streams(&p, "foreign_destination"), 2.0);
    // Not CONNECT.
    let (status, _) = open_stream(&send, Method::GET, &app.to_string())
        .await
        .unwrap();
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(inbound_streams(&p, "bad_request"), 1.0);
    // Nothing listens there.
    let (status, _) = open_stream(&send, Method::CONNECT, &format!("{POD}:1"))
        .await
        .unwrap();
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(inbound_streams(&p, "app_unreachable"), 1.0);

    // Refusals did not disturb the connection: it still carries streams.
    let (status, io) = open_stream(&send, Method::CONNECT, &app.to_string())
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK);
    assert!(echo_once(&mut io.unwrap(), b"still fine").await);
}

/// A TLS client config that presents `leaf` with the tunnel's ALPN.
fn as_peer(ca: &Ca, leaf: portcullis::identity::Leaf) -> std::sync::Arc<rustls::ClientConfig> {
    tunnel_client_config(leaf, &ca.cert_pem())
}

async fn refused(config: std::sync::Arc<rustls::ClientConfig>, addr: std::net::SocketAddr) -> bool {
    match h2_client(config, addr).await {
        Err(_) => true,
        // TLS 1.3 client auth failures arrive after the client's handshake.
        Ok(send) => open_stream(&send, Method::CONNECT, "127.0.0.2:9")
            .await
            .is_err(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_peers_are_refused_and_counted_and_others_keep_working() {
    let p = pod(&[]).await;
    let app = echo_on(POD).await;
    let good = as_peer(&p.ca, p.ca.leaf("client"));
    let send = h2_client(good.clone(), p.tunnel).await.unwrap();
    let (_, io) = open_stream(&send, Method::CONNECT, &app.to_string())
        .await
        .unwrap();
    let mut held = io.unwrap();

    let other_dir = tempfile::tempdir().unwrap();
    let foreign = Ca::root(other_dir.path(), "foreign", TD);
    let elsewhere = Ca::root(other_dir.path(), "elsewhere", "other.example");
    let now = SystemTime::now();
    let hour = Duration::from_secs(3600);
    let wrong_td = elsewhere.custom_leaf(
        &["spiffe://other.example/ns/default/sa/client"],
        now - hour,
        now + hour,
    );
    let cases: Vec<(&str, std::sync::Arc<rustls::ClientConfig>)> = vec![
        (
            "foreign CA",
            tunnel_client_config(foreign.leaf("client"), &p.ca.cert_pem()),
        ),
        ("wrong trust domain", {
            let bundle = [p.ca.cert_pem(), elsewhere.cert_pem()].concat();
            tunnel_client_config(wrong_td, &bundle)
        }),
        ("no client certificate", no_client_cert(&p.ca.cert_pem())),
        ("TLS 1.2", tls12_client(b"h2")),
    ];
    for (what, config) in cases {
        assert!(refused(config, p.tunnel).await, "{what} was served");
    }
    // Plaintext, and an HTTP/2 preface without TLS.
    let mut s = TcpStream::connect(p.tunnel).await.unwrap();
    let _ = s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await;
    assert!(closed_soon(s).await, "plaintext h2 was served");

    // A TLS client can see its failure before the server has counted it.
    let failed = || {
        p.sidecar.metric(
            "portcullis_tls_handshakes_total",
            &[("direction", "inbound")],
        ) - p.sidecar.metric(
            "portcullis_tls_handshakes_total",
            &[("direction", "inbound"), ("result", "ok")],
        )
    };
    eventually("five refusals counted", Duration::from_secs(5), || async {
        failed() >= 5.0
    })
    .await;
    assert!(
        echo_once(&mut held, b"unaffected").await,
        "the good peer's stream"
    );
}

fn no_client_cert(bundle_pem: &[u8]) -> std::sync::Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    let bundle = portcullis::tls::TrustBundle::from_pem(Path::new("b"), bundle_pem).unwrap();
    for c in bundle.certs {
        roots.add(c).unwrap();
    }
    let mut config = rustls::ClientConfig::builder_with_provider(portcullis::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    std::sync::Arc::new(config)
}

async fn closed_soon(mut s: TcpStream) -> bool {
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; 64];
    loop {
        match tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
            Err(_) => return false,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rule_change_closes_only_the_streams_it_denies() {
    let stays = echo_on(POD).await;
    let goes = echo_on(POD).await;
    let opaque = format!("{},{}", stays.port(), goes.port());
    let p = pod(&["--opaque-ports", &opaque]).await;
    let config = tunnel_client_config(p.ca.leaf("client"), &p.ca.cert_pem());
    let send = h2_client(config, p.tunnel).await.unwrap();
    let (_, a) = open_stream(&send, Method::CONNECT, &stays.to_string())
        .await
        .unwrap();
    let (_, b) = open_stream(&send, Method::CONNECT, &goes.to_string())
        .await
        .unwrap();
    let (mut a, mut b) = (a.unwrap(), b.unwrap());
    assert!(echo_once(&mut a, b"a").await && echo_once(&mut b, b"b").await);

    let deny = format!(
        "rules:\n  - name: close-{port}\n    action: deny\n    ports: [{port}]\n",
        port = goes.port()
    );
    write_atomic(&p.rules.join("deny.yaml"), deny.as_bytes());
    // Within the reload (poll 200 ms) the stream ends; each try is one echo.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while echo_once(&mut b, b"b").await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the denied stream stays open"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        echo_once(&mut a, b"a again").await,
        "the allowed stream stays"
    );
    // New streams to the denied port get 403; the connection carries on.
    let (status, _) = open_stream(&send, Method::CONNECT, &goes.to_string())
        .await
        .unwrap();
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(inbound_streams(&p, "denied"), 1.0);
    assert!(echo_once(&mut a, b"a once more").await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_flood_is_held_to_the_limit_and_others_keep_working() {
    let p = pod(&["--tunnel-max-streams", "50"]).await;
    let app = echo_on(POD).await;
    let authority = app.to_string();
    let flooder = h2_client(as_peer(&p.ca, p.ca.leaf("flooder")), p.tunnel)
        .await
        .unwrap();
    // Hold every stream the connection may have, and ask for more.
    let mut held = Vec::new();
    for _ in 0..50 {
        let (status, io) = open_stream(&flooder, Method::CONNECT, &authority)
            .await
            .unwrap();
        assert_eq!(status, StatusCode::OK);
        held.push(io.unwrap());
    }
    let extra = {
        let flooder = flooder.clone();
        let authority = authority.clone();
        tokio::spawn(async move { open_stream(&flooder, Method::CONNECT, &authority).await })
    };
    let active = || {
        p.sidecar.metric(
            "portcullis_tunnel_streams_active",
            &[("direction", "inbound")],
        )
    };
    // The server counts a stream active just after answering it.
    eventually("50 streams active", Duration::from_secs(5), || async {
        active() == 50.0
    })
    .await;
    // Open-and-cancel as fast as the client can: the server is never
    // made to hold more than the limit.
    for _ in 0..500 {
        let Ok(ready) = flooder.clone().ready().await else {
            break;
        };
        let mut ready = ready;
        let request = http::Request::builder()
            .method(Method::CONNECT)
            .uri(authority.as_str())
            .body(())
            .unwrap();
        if ready.send_request(request, false).is_err() {
            break;
        }
        assert!(active() <= 50.0, "{} streams active", active());
    }
    assert!(!extra.is_finished(), "a stream past the limit was served");

    // Another peer is served as usual meanwhile.
    let other = h2_client(as_peer(&p.ca, p.ca.leaf("other")), p.tunnel)
        .await
        .unwrap();
    let (status, io) = open_stream(&other, Method::CONNECT, &authority)
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK);
    assert!(echo_once(&mut io.unwrap(), b"unaffected").await);
    // And the flooder's held streams still work.
    assert!(echo_once(&mut held[0], b"held").await);
    extra.abort();
}

/// A peer that cancels its stream (RST_STREAM) in the middle of a request
/// line carried as opaque bytes (the sniff gave up on it) gets the app
/// connection reset, and counted; the app never sees a clean end after
/// the unended line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_cancelled_in_a_request_line_resets_the_app_connection() {
    let p = pod(&["--detect-timeout", "200ms"]).await;
    // The app says when the whole line has come, then how the connection
    // ended: true for a reset.
    let line = b"GET /cut HTTP/1.0".len();
    let (got_line, mut line_came) = tokio::sync::mpsc::unbounded_channel();
    let listener = tokio::net::TcpListener::bind(format!("{POD}:0"))
        .await
        .unwrap();
    let app = listener.local_addr().unwrap();
    let (ended, mut ends) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let mut buf = [0u8; 256];
        let mut total = 0;
        let reset = loop {
            match tokio::io::AsyncReadExt::read(&mut s, &mut buf).await {
                Ok(0) => break false,
                Ok(n) => {
                    total += n;
                    if total == line {
                        let _ = got_line.send(());
                    }
                }
                Err(_) => break true,
            }
        };
        let _ = ended.send(reset);
    });
    let config = tunnel_client_config(p.ca.leaf("client"), &p.ca.cert_pem());
    let send = h2_client(config, p.tunnel).await.unwrap();
    let mut send = send.ready().await.unwrap();
    let connect = http::Request::builder()
        .method(Method::CONNECT)
        .uri(app.to_string())
        .body(())
        .unwrap();
    let (response, mut stream) = send.send_request(connect, false).unwrap();
    // The answer comes once the sniff has given up (the client spoke).
    stream
        .send_data(bytes::Bytes::from_static(b"GET /cut"), false)
        .unwrap();
    let response = response.await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    tokio::time::sleep(Duration::from_millis(700)).await;
    stream
        .send_data(bytes::Bytes::from_static(b" HTTP/1.0"), false)
        .unwrap();
    // A reset drops what is still queued: cancel once the app has it all.
    tokio::time::timeout(Duration::from_secs(5), line_came.recv())
        .await
        .expect("the line reaches the app")
        .unwrap();
    stream.send_reset(h2::Reason::CANCEL);
    let reset = tokio::time::timeout(Duration::from_secs(5), ends.recv())
        .await
        .expect("the app connection ends")
        .unwrap();
    assert!(reset, "the app saw a clean end after the unended line");
    let counted = p
        .sidecar
        .metric("portcullis_opaque_request_lines_total", &[]);
    assert_eq!(counted, 1.0);
}

/// An HTTP/2 client over mesh mTLS from the source address `from`, and
/// the task driving its connection (aborted: the connection closes).
async fn h2_client_from(
    from: &str,
    config: std::sync::Arc<rustls::ClientConfig>,
    addr: std::net::SocketAddr,
) -> std::io::Result<(
    h2::client::SendRequest<bytes::Bytes>,
    tokio::task::JoinHandle<()>,
)> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(format!("{from}:0").parse().unwrap())?;
    let tcp = socket.connect(addr).await?;
    let name = rustls::pki_types::ServerName::IpAddress(addr.ip().into());
    let tls = tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await?;
    let (send, conn) = h2::client::handshake(tls)
        .await
        .map_err(std::io::Error::other)?;
    let task = tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok((send, task))
}

/// One source address holds at most `--tunnel-max-connections-per-source`
/// tunnel connections (each may hold a connection window of unread
/// bytes): its next one is closed after the handshake and counted; its
/// open ones and other sources keep working, and a closed one frees a slot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_source_holds_at_most_its_share_of_tunnel_connections() {
    let p = pod(&["--tunnel-max-connections-per-source", "2"]).await;
    let app = echo_on(POD).await;
    let authority = app.to_string();
    let config = as_peer(&p.ca, p.ca.leaf("many"));
    let works = |send: h2::client::SendRequest<bytes::Bytes>, msg: &'static [u8]| {
        let authority = authority.clone();
        async move {
            match open_stream(&send, Method::CONNECT, &authority).await {
                Ok((StatusCode::OK, Some(mut io))) => echo_once(&mut io, msg).await,
                _ => false,
            }
        }
    };
    let (first, _first) = h2_client_from("127.0.0.1", config.clone(), p.tunnel)
        .await
        .unwrap();
    let (second, second_task) = h2_client_from("127.0.0.1", config.clone(), p.tunnel)
        .await
        .unwrap();
    assert!(works(first.clone(), b"first").await);
    assert!(works(second.clone(), b"second").await);
    let refused = || {
        p.sidecar.metric(
            "portcullis_tunnel_connections_refused_total",
            &[("reason", "source_limit")],
        )
    };
    assert_eq!(refused(), 0.0);

    let third = h2_client_from("127.0.0.1", config.clone(), p.tunnel).await;
    let served = match third {
        Ok((send, _task)) => works(send, b"third").await,
        Err(_) => false,
    };
    assert!(!served, "a third connection from one source was served");
    assert_eq!(refused(), 1.0);
    assert!(works(first.clone(), b"first again").await);
    let (elsewhere, _elsewhere) = h2_client_from("127.0.0.3", config.clone(), p.tunnel)
        .await
        .unwrap();
    assert!(works(elsewhere, b"another source").await);

    // Closing one gives its slot back (the other source's connection
    // closes too: its client dropped its last handle).
    drop(second);
    second_task.abort();
    let open = || {
        p.sidecar.metric(
            "portcullis_tunnel_connections_open",
            &[("direction", "inbound")],
        )
    };
    eventually(
        "only the first connection open",
        Duration::from_secs(5),
        || async { open() == 1.0 },
    )
    .await;
    let (again, _again) = h2_client_from("127.0.0.1", config, p.tunnel).await.unwrap();
    assert!(works(again, b"again").await);
    assert_eq!(refused(), 1.0);
}

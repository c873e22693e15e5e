//! The monitoring kit in deploy/ against a real Prometheus: it scrapes two
//! sidecars and the identity service through a copy of
//! deploy/prometheus/static.yaml, with the recording and alerting rules
//! loaded, while traffic of every kind flows (allowed, denied, plaintext
//! refused, an app that is down, a connection closed by a rule change).
//! Then every PromQL expression of the Grafana dashboard, of the recording
//! rules and under each alert must return data; `promtool check rules` and
//! `promtool test rules` pass; and the rules-invalid alert fires while a bad
//! rule file is in place and clears once it is fixed.

#[allow(dead_code)]
#[path = "ca_serve/apiserver.rs"]
mod apiserver;
mod common;
#[allow(dead_code)]
#[path = "ca_serve/harness.rs"]
mod harness;
#[path = "prometheus/server.rs"]
mod server;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use serde_json::Value;
use server::{promtool, Prometheus};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Every alert, and the expressions under its threshold that must return
/// data while the system is healthy (each is part of the alert's expr).
const ALERT_BASES: &[(&str, &[&str])] = &[
    (
        "PortcullisSidecarDown",
        &[r#"up{job="portcullis-proxies"}"#],
    ),
    (
        "PortcullisControlPlaneDown",
        &[r#"up{job="portcullis-control-plane"}"#],
    ),
    ("PortcullisSidecarNotReady", &["portcullis_ready"]),
    (
        "PortcullisCertExpiringSoon",
        &["portcullis_cert_expiry_timestamp_seconds - time()"],
    ),
    (
        "PortcullisCertNotRotating",
        &[
            r#"sum by (namespace, app, pod) (increase(portcullis_cert_rotations_total{result!="ok"}[15m]))"#,
            r#"sum by (namespace, app, pod) (increase(portcullis_cert_rotations_total{result="ok"}[15m]))"#,
        ],
    ),
    (
        "PortcullisIssuerExpiringSoon",
        &["portcullis_ca_issuer_expiry_timestamp_seconds - time()"],
    ),
    (
        "PortcullisHandshakeFailuresRising",
        &[
            r#"sum by (namespace, app, pod) (portcullis:tls_handshakes:rate5m{result!="ok"}) / sum by (namespace, app, pod) (portcullis:tls_handshakes:rate5m)"#,
        ],
    ),
    ("PortcullisRulesInvalid", &["portcullis_rules_valid"]),
    (
        "PortcullisTrustBundleInvalid",
        &["portcullis_trust_bundle_valid"],
    ),
    (
        "PortcullisIssuerInvalid",
        &["portcullis_issuer_valid", "portcullis_ca_issuer_valid"],
    ),
    (
        "PortcullisDeniedRequestsSpike",
        &["sum by (namespace, app, pod) (portcullis:authz_denied:rate5m)"],
    ),
];

/// What the dashboard's variables become in the test's queries.
const VARIABLES: &[(&str, &str)] = &[
    ("$__rate_interval", "5m"),
    ("$namespace", ".*"),
    ("$pod", ".*"),
];

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(root().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

fn yaml(rel: &str) -> Value {
    serde_norway::from_str(&read(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// Collapses whitespace runs, so multi-line YAML expressions compare.
fn squash(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Every rule of a Prometheus rule file.
fn rules_of(file: &Value) -> Vec<Value> {
    file["groups"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_array().unwrap().clone())
        .collect()
}

/// The dashboard's queries (panel targets and the variables' queries,
/// `label_values(X, l)` as `X`) with the variables replaced.
fn dashboard_queries(dash: &Value) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack: Vec<&Value> = dash["panels"].as_array().unwrap().iter().collect();
    while let Some(p) = stack.pop() {
        if let Some(inner) = p["panels"].as_array() {
            stack.extend(inner);
        }
        for t in p["targets"].as_array().into_iter().flatten() {
            out.push(t["expr"].as_str().unwrap().to_string());
        }
    }
    for v in dash["templating"]["list"].as_array().unwrap() {
        if v["type"] == "query" {
            let q = v["query"]["query"].as_str().unwrap();
            let inner = q
                .strip_prefix("label_values(")
                .and_then(|r| r.rsplit_once(','))
                .map(|(metric, _)| metric.to_string())
                .unwrap_or_else(|| panic!("variable query {q}"));
            out.push(inner);
        }
    }
    out.into_iter()
        .map(|q| {
            VARIABLES
                .iter()
                .fold(q, |q, (var, value)| q.replace(var, value))
        })
        .collect()
}

/// The dashboard parses, has the datasource, namespace and pod variables,
/// and every panel and query uses the datasource variable.
#[test]
fn dashboard_uses_the_datasource_variable_everywhere() {
    let dash: Value = serde_json::from_str(&read("deploy/grafana/portcullis.json")).unwrap();
    let vars = dash["templating"]["list"].as_array().unwrap();
    let var = |name: &str| vars.iter().find(|v| v["name"] == name).unwrap();
    assert_eq!(var("datasource")["type"], "datasource");
    assert_eq!(var("datasource")["query"], "prometheus");
    for name in ["namespace", "pod"] {
        assert_eq!(var(name)["type"], "query");
        assert_eq!(var(name)["datasource"]["uid"], "${datasource}");
    }
    let mut panels = 0;
    for p in dash["panels"].as_array().unwrap() {
        if p["type"] == "row" {
            continue;
        }
        panels += 1;
        let title = p["title"].as_str().unwrap();
        assert_eq!(p["datasource"]["uid"], "${datasource}", "panel {title}");
        assert_eq!(p["datasource"]["type"], "prometheus", "panel {title}");
        let targets = p["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "panel {title} has no query");
        for t in targets {
            assert_eq!(t["datasource"]["uid"], "${datasource}", "panel {title}");
        }
    }
    assert!(panels >= 20, "{panels} panels");
}

/// promtool accepts the rule files and their unit tests pass.
#[test]
fn promtool_checks_and_unit_tests_pass() {
    let p = |rel: &str| root().join(rel).display().to_string();
    promtool(&[
        "check",
        "rules",
        &p("deploy/prometheus/rules.yaml"),
        &p("deploy/prometheus/alerts.yaml"),
    ]);
    promtool(&[
        "test",
        "rules",
        &p("deploy/prometheus/tests/rules.test.yaml"),
        &p("deploy/prometheus/tests/alerts.test.yaml"),
    ]);
    promtool(&["check", "config", &p("deploy/prometheus/static.yaml")]);
}

/// Every scrape config sets the same target labels.
#[test]
fn static_and_kubernetes_scrape_configs_label_alike() {
    let statics = yaml("deploy/prometheus/static.yaml");
    for job in statics["scrape_configs"].as_array().unwrap() {
        for sc in job["static_configs"].as_array().unwrap() {
            for label in ["namespace", "pod", "app"] {
                assert!(sc["labels"][label].is_string(), "{job}: {label}");
            }
        }
    }
    let k8s = yaml("deploy/prometheus/scrape-config.yaml");
    let monitors = read("charts/portcullis/templates/monitoring.yaml");
    for job in k8s["scrape_configs"].as_array().unwrap() {
        let targets: Vec<&str> = job["relabel_configs"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|r| r["target_label"].as_str())
            .collect();
        for label in ["namespace", "pod", "app"] {
            assert!(targets.contains(&label), "{}: {label}", job["job_name"]);
        }
        let name = job["job_name"].as_str().unwrap();
        assert!(
            monitors.contains(&format!("replacement: {name}")),
            "the chart's monitors set job {name}"
        );
    }
    for label in ["namespace", "pod", "app"] {
        assert_eq!(
            monitors.matches(&format!("targetLabel: {label}\n")).count(),
            if label == "app" { 3 } else { 2 },
            "the chart's monitors set {label}"
        );
    }
}

/// An HTTP app that answers every request with 200 and closes, or with 101
/// to an upgrade, after which it holds the connection; aborting the
/// returned task drops its listener, so the app is down.
async fn app() -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 1024];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < 16384 {
                    match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                if String::from_utf8_lossy(&buf)
                    .to_ascii_lowercase()
                    .contains("upgrade: websocket")
                {
                    let _ = s
                        .write_all(b"HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: websocket\r\n\r\n")
                        .await;
                    while matches!(s.read(&mut chunk).await, Ok(n) if n > 0) {}
                    return;
                }
                let _ = s
                    .write_all(
                        b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\nconnection: close\r\n\r\nok\n",
                    )
                    .await;
                let _ = s.shutdown().await;
            });
        }
    });
    (addr, task)
}

fn rules(app_port: u16, lockdown: bool) -> String {
    let mut r = format!(
        r#"rules:
  - name: no-admin
    action: deny
    ports: [{app_port}]
    http:
      paths: ["/admin/**"]
  - name: client-may-connect
    action: allow
    ports: [{app_port}]
    from:
      identities: ["spiffe://cluster.local/ns/default/sa/client"]
"#
    );
    if lockdown {
        r.push_str(&format!(
            r#"  - name: lockdown
    action: deny
    ports: [{app_port}]
    from:
      identities: ["spiffe://cluster.local/ns/default/sa/client"]
"#
        ));
    }
    r
}

/// One HTTP/1.0 request through the client sidecar; the status.
async fn request(a: &Sidecar, path: &str) -> u16 {
    match tokio::time::timeout(
        Duration::from_secs(5),
        http_request(a.upstream(), "GET", path),
    )
    .await
    {
        Ok(Ok((status, _))) => status,
        _ => 0,
    }
}

/// A WebSocket-style upgrade through the client sidecar, left open.
async fn upgrade(a: &Sidecar) -> TcpStream {
    let mut s = TcpStream::connect(a.upstream()).await.unwrap();
    s.write_all(
        b"GET /public/ws HTTP/1.1\r\nhost: x\r\nconnection: upgrade\r\nupgrade: websocket\r\n\r\n",
    )
    .await
    .unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut byte))
            .await
            .expect("the upgrade is answered")
            .unwrap();
        assert!(n == 1 && head.len() < 4096, "upgrade answer: {head:?}");
        head.push(byte[0]);
    }
    assert!(
        head.starts_with(b"HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    s
}

/// The config Prometheus runs with: static.yaml with the test's ports, 1 s
/// intervals, and copies of the rule files (the rules-invalid alert with
/// `for: 1s`).
fn write_config(dir: &Path, web: SocketAddr, api: SocketAddr, ca: SocketAddr) -> PathBuf {
    let mut text = read("deploy/prometheus/static.yaml");
    for (from, to) in [
        ("127.0.0.1:15020", web),
        ("127.0.0.1:15030", api),
        ("127.0.0.1:15021", ca),
    ] {
        assert!(text.contains(from), "static.yaml lost its {from} target");
        text = text.replace(from, &to.to_string());
    }
    text = text
        .replace("scrape_interval: 15s", "scrape_interval: 1s")
        .replace("evaluation_interval: 15s", "evaluation_interval: 1s");
    assert!(text.contains("scrape_interval: 1s") && text.contains("evaluation_interval: 1s"));
    let config = dir.join("prometheus.yaml");
    std::fs::write(&config, text).unwrap();
    std::fs::write(dir.join("rules.yaml"), read("deploy/prometheus/rules.yaml")).unwrap();
    let mut alerts = yaml("deploy/prometheus/alerts.yaml");
    for group in alerts["groups"].as_array_mut().unwrap() {
        for rule in group["rules"].as_array_mut().unwrap() {
            if rule["alert"] == "PortcullisRulesInvalid" {
                rule["for"] = "1s".into();
            }
        }
    }
    std::fs::write(
        dir.join("alerts.yaml"),
        serde_norway::to_string(&alerts).unwrap(),
    )
    .unwrap();
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_and_every_expression_has_data() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::root(dir.path(), "ca", TD);
    let (app_addr, app_task) = app().await;
    let rules_dir = dir.path().join("rules");
    std::fs::create_dir(&rules_dir).unwrap();
    let policy = rules_dir.join("policy.yaml");
    write_atomic(&policy, rules(app_addr.port(), false).as_bytes());
    let mut b_args = issuer_args(&ca, &ca.files.cert, "server");
    b_args.extend([
        "--inbound-target".into(),
        app_addr.to_string(),
        "--rules-dir".into(),
        rules_dir.display().to_string(),
        "--file-poll-interval".into(),
        "200ms".into(),
    ]);
    let b = Sidecar::start(&b_args).await;
    let mut a_args = issuer_args(&ca, &ca.files.cert, "client");
    a_args.extend([
        "--upstream".into(),
        format!("127.0.0.1:0={}={}", b.addrs.inbound, id("server")),
    ]);
    let a = Sidecar::start(&a_args).await;
    let fixture = harness::Fixture::new().await;
    let identity = harness::Service::start(&fixture.args(&[])).await;

    let config = write_config(dir.path(), a.addrs.admin, b.addrs.admin, identity.admin);
    let prom = Prometheus::start(dir.path(), &config).await;
    let up = r#"sum(up{job=~"portcullis-proxies|portcullis-control-plane"})"#;
    eventually("all three targets up", Duration::from_secs(30), || async {
        prom.query(up).await.first().map(|s| s.1) == Some(3.0)
    })
    .await;

    // Allowed, denied, plaintext refused, and an upgraded connection held
    // open (closed later by a rule change), until Prometheus has seen them.
    let mut upgraded = upgrade(&a).await;
    let seen = [
        r#"sum(portcullis_http_requests_total{status_code="200"})"#,
        r#"sum(portcullis_http_requests_total{status_code="403"})"#,
        r#"sum(portcullis_tls_handshakes_total{result="plaintext_refused"})"#,
        r#"sum(portcullis_tcp_connections_open{pod="web"})"#,
        // The upgraded connection, open on both sides, under each side's
        // peer: the server identity on the client, the caller on the server.
        r#"sum(portcullis_tcp_connections_open{pod="web", direction="outbound", peer_service_account="server"})"#,
        r#"sum(portcullis_tcp_connections_open{pod="api", direction="inbound", peer_service_account="client"})"#,
        r#"sum(portcullis_tcp_received_bytes_total{pod="api", direction="inbound", peer_namespace="default"})"#,
        r#"sum(portcullis_http_response_size_bytes_count{pod="api"})"#,
    ];
    drive(&prom, &seen, || async {
        assert_eq!(request(&a, "/public/page").await, 200);
        assert_eq!(request(&a, "/admin/panel").await, 403);
        let plain = TcpStream::connect(b.addrs.inbound).await.unwrap();
        let _ = tokio::time::timeout(Duration::from_secs(5), round_trip(plain, b"plain")).await;
    })
    .await;

    // The app goes down: 502s.
    app_task.abort();
    drive(
        &prom,
        &[r#"sum(portcullis_http_requests_total{status_code="502"})"#],
        || async {
            assert_eq!(request(&a, "/public/page").await, 502);
        },
    )
    .await;

    // A bad rule file: the alert fires (its test copy waits 1 s) ...
    write_atomic(&policy, b"rules: [oops");
    eventually(
        "PortcullisRulesInvalid fires",
        Duration::from_secs(30),
        || async { prom.alert_state("PortcullisRulesInvalid").await.as_deref() == Some("firing") },
    )
    .await;
    // ... and clears once fixed; the fix locks the client out, which closes
    // the upgraded connection.
    write_atomic(&policy, rules(app_addr.port(), true).as_bytes());
    eventually(
        "PortcullisRulesInvalid clears",
        Duration::from_secs(30),
        || async { prom.alert_state("PortcullisRulesInvalid").await.is_none() },
    )
    .await;
    let mut rest = Vec::new();
    let closed =
        tokio::time::timeout(Duration::from_secs(10), upgraded.read_to_end(&mut rest)).await;
    assert!(
        closed.is_ok(),
        "the rule change closes the upgraded connection"
    );
    prom.wait_for_data(
        r#"portcullis_authz_connections_terminated_total{rule="lockdown"}"#,
        Duration::from_secs(10),
    )
    .await;

    // Every expression has data.
    let dash: Value = serde_json::from_str(&read("deploy/grafana/portcullis.json")).unwrap();
    let mut queries = dashboard_queries(&dash);
    let recording = rules_of(&yaml("deploy/prometheus/rules.yaml"));
    for r in &recording {
        queries.push(r["expr"].as_str().unwrap().to_string());
        queries.push(r["record"].as_str().unwrap().to_string());
    }
    let alerts = rules_of(&yaml("deploy/prometheus/alerts.yaml"));
    assert_eq!(
        alerts.len(),
        ALERT_BASES.len(),
        "every alert is listed in ALERT_BASES"
    );
    for alert in &alerts {
        let name = alert["alert"].as_str().unwrap();
        let expr = squash(alert["expr"].as_str().unwrap());
        let (_, bases) = ALERT_BASES
            .iter()
            .find(|(n, _)| *n == name)
            .unwrap_or_else(|| panic!("{name} missing from ALERT_BASES"));
        for base in *bases {
            assert!(
                expr.contains(&squash(base)),
                "{name}: {base} is not part of {expr}"
            );
            queries.push(base.to_string());
        }
    }
    for q in &queries {
        prom.wait_for_data(q, Duration::from_secs(10)).await;
    }
    drop(prom);
    drop(identity);
}

/// Runs `round` repeatedly (at most 30 s, a pause of 100 ms between
/// rounds) until every query in `seen` returns a value above 0.
async fn drive<F, Fut>(prom: &Prometheus, seen: &[&str], mut round: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut pace = tokio::time::interval(Duration::from_millis(100));
    loop {
        pace.tick().await;
        round().await;
        let mut missing = Vec::new();
        for q in seen {
            if !prom.query(q).await.iter().any(|(_, v)| *v > 0.0) {
                missing.push(*q);
            }
        }
        if missing.is_empty() {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "Prometheus did not see {missing:?} within 30 s:\n{}",
            prom.logs()
        );
    }
}

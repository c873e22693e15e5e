//! Other proxies to compare with, run from temporary directories on
//! 127.0.0.1 when installed: nginx as the app, an nginx TCP-mode (`stream`)
//! pair and an haproxy HTTP-mode pair, both with mTLS between the two
//! proxies using certificates from the bench CA. Each is killed when its
//! `Running` is dropped.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{anyhow, Context, Result};
use portcullis::identity::{CaFiles, Issuer, LeafRequest, SpiffeId, TrustDomain};

use crate::procs::{free_port, wait_listening, which, with_children, Child};

/// The DNS name in the comparison proxies' server certificate, checked by
/// the client proxy (nginx and haproxy check names, not SPIFFE ids).
const SERVER_NAME: &str = "server.bench";
/// Where Debian's `libnginx-mod-stream` puts the stream module.
const STREAM_MODULES: [&str; 2] = [
    "/usr/lib/nginx/modules/ngx_stream_module.so",
    "/usr/lib64/nginx/modules/ngx_stream_module.so",
];
pub const INSTALL_HINT: &str = "apt-get install -y nginx libnginx-mod-stream haproxy wrk";

/// Processes serving one path, and where clients connect.
pub struct Running {
    pub front: SocketAddr,
    /// Every process of the proxies (for CPU time), not the app's.
    pub pids: Vec<u32>,
    _procs: Vec<Child>,
}

/// PEM files for the comparison proxies, signed by the bench CA.
pub struct Certs {
    ca: PathBuf,
    server_crt: PathBuf,
    server_key: PathBuf,
    /// Chain and key in one file (haproxy's `crt`).
    server_pem: PathBuf,
    client_crt: PathBuf,
    client_key: PathBuf,
    client_pem: PathBuf,
}

impl Certs {
    /// A server leaf (SPIFFE id plus `SERVER_NAME`) and a client leaf,
    /// P-256 like the sidecars' own.
    pub fn write(ca: &CaFiles, td: &TrustDomain, dir: &Path) -> Result<Certs> {
        let issuer = Issuer::load(ca, td)?;
        let day = std::time::Duration::from_secs(24 * 3600);
        let server = issuer.issue_server(
            &SpiffeId::parse(crate::SERVER_ID)?,
            &[SERVER_NAME.to_string()],
            day,
        )?;
        let client = issuer.issue(&LeafRequest {
            id: SpiffeId::parse(crate::CLIENT_ID)?,
            ttl: day,
        })?;
        let put = |name: &str, text: String| -> Result<PathBuf> {
            let path = dir.join(name);
            std::fs::write(&path, text)?;
            Ok(path)
        };
        Ok(Certs {
            ca: ca.cert.clone(),
            server_crt: put("server.crt", server.chain_pem())?,
            server_key: put("server.key", server.key_pem())?,
            server_pem: put("server.pem", server.chain_pem() + &server.key_pem())?,
            client_crt: put("client.crt", client.chain_pem())?,
            client_key: put("client.key", client.key_pem())?,
            client_pem: put("client.pem", client.chain_pem() + &client.key_pem())?,
        })
    }
}

/// Whether a comparison can run; the reason when it cannot.
pub fn nginx_missing() -> Option<String> {
    which("nginx")
        .is_none()
        .then(|| format!("nginx not installed ({INSTALL_HINT})"))
}

pub fn haproxy_missing() -> Option<String> {
    which("haproxy")
        .is_none()
        .then(|| format!("haproxy not installed ({INSTALL_HINT})"))
}

/// The `load_module` line nginx needs for `stream`, or why it cannot.
fn stream_module() -> Result<String, String> {
    if let Some(why) = nginx_missing() {
        return Err(why);
    }
    let nginx = which("nginx").ok_or("nginx not installed")?;
    let out = Command::new(nginx)
        .arg("-V")
        .output()
        .map_err(|e| e.to_string())?;
    let build = String::from_utf8_lossy(&out.stderr);
    if build.contains("--with-stream ") || build.ends_with("--with-stream") {
        return Ok(String::new());
    }
    if build.contains("--with-stream=dynamic") {
        if let Some(m) = STREAM_MODULES.iter().find(|m| Path::new(m).is_file()) {
            return Ok(format!("load_module {m};"));
        }
    }
    Err(format!(
        "nginx stream module not installed ({INSTALL_HINT})"
    ))
}

/// nginx's global lines, the same for every instance: one worker per core,
/// everything it writes inside `dir`, in the foreground.
fn nginx_head(dir: &Path, name: &str, module: &str) -> String {
    let d = dir.display();
    format!(
        "{module}\nworker_processes {};\ndaemon off;\npid {d}/{name}.pid;\n\
         error_log {d}/{name}.err warn;\nevents {{ worker_connections 8192; }}\n",
        nginx_workers()
    )
}

fn nginx_workers() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Starts nginx with `conf` (written to `dir/name.conf`) and waits until
/// `listen` accepts connections and every worker is up; returns it and
/// the ids of its master and workers.
async fn nginx(
    dir: &Path,
    name: &str,
    conf: String,
    listen: SocketAddr,
) -> Result<(Child, Vec<u32>)> {
    let path = dir.join(format!("{name}.conf"));
    std::fs::write(&path, conf)?;
    let mut cmd = Command::new(which("nginx").context("nginx not installed")?);
    cmd.arg("-p")
        .arg(dir)
        .arg("-c")
        .arg(&path)
        .arg("-e")
        .arg(dir.join(format!("{name}.err")));
    let mut child = [Child::spawn(
        &format!("nginx ({name})"),
        &mut cmd,
        &dir.join(format!("{name}.log")),
    )?
    .graceful()];
    wait_listening(listen, &mut child).await?;
    let [mut child] = child;
    let deadline = std::time::Instant::now() + crate::READY_TIMEOUT;
    loop {
        child.alive()?;
        let pids = with_children(child.pid());
        if pids.len() > nginx_workers() {
            return Ok((child, pids));
        }
        if std::time::Instant::now() > deadline {
            anyhow::bail!(
                "nginx ({name}) started {} of {} workers",
                pids.len() - 1,
                nginx_workers()
            );
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

/// nginx as the app: `200 ok` to every request, no access log, keep-alive
/// connections kept for as many requests as the client sends.
pub async fn nginx_app(dir: &Path) -> Result<Running> {
    let listen = free_port()?;
    let d = dir.display();
    let conf = format!(
        "{}http {{\n  access_log off;\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n\
         fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n\
         keepalive_requests 10000000;\n  keepalive_timeout 120s;\n\
         server {{\n    listen {listen};\n    location / {{ return 200 \"ok\\n\"; }}\n  }}\n}}\n",
        nginx_head(dir, "app", "")
    );
    let (child, pids) = nginx(dir, "app", conf, listen).await?;
    Ok(Running {
        front: listen,
        pids,
        _procs: vec![child],
    })
}

/// Two nginx instances in `stream` (TCP) mode: A takes plaintext and opens
/// a TLS 1.3 connection with a client certificate to B for each client
/// connection (session reuse off, so each is a full handshake, as the
/// sidecars do), checking B's certificate and name; B requires and checks
/// A's certificate and forwards the bytes to the app.
pub async fn nginx_stream_pair(dir: &Path, certs: &Certs, app: SocketAddr) -> Result<Running> {
    let module = stream_module().map_err(|e| anyhow!(e))?;
    let (a_listen, b_listen) = (free_port()?, free_port()?);
    let b_conf = format!(
        "{}stream {{\n  server {{\n    listen {b_listen} ssl;\n    ssl_protocols TLSv1.3;\n\
         ssl_certificate {};\n    ssl_certificate_key {};\n    ssl_client_certificate {};\n\
         ssl_verify_client on;\n    ssl_session_tickets off;\n    proxy_half_close on;\n    proxy_pass {app};\n  }}\n}}\n",
        nginx_head(dir, "nginx-b", &module),
        certs.server_crt.display(),
        certs.server_key.display(),
        certs.ca.display(),
    );
    let a_conf = format!(
        "{}stream {{\n  server {{\n    listen {a_listen};\n    proxy_half_close on;\n    proxy_pass {b_listen};\n\
         proxy_ssl on;\n    proxy_ssl_protocols TLSv1.3;\n    proxy_ssl_certificate {};\n\
         proxy_ssl_certificate_key {};\n    proxy_ssl_trusted_certificate {};\n\
         proxy_ssl_verify on;\n    proxy_ssl_verify_depth 2;\n    proxy_ssl_name {SERVER_NAME};\n\
         proxy_ssl_session_reuse off;\n  }}\n}}\n",
        nginx_head(dir, "nginx-a", &module),
        certs.client_crt.display(),
        certs.client_key.display(),
        certs.ca.display(),
    );
    let (b, mut pids) = nginx(dir, "nginx-b", b_conf, b_listen).await?;
    let (a, a_pids) = nginx(dir, "nginx-a", a_conf, a_listen).await?;
    pids.extend(a_pids);
    Ok(Running {
        front: a_listen,
        pids,
        _procs: vec![a, b],
    })
}

/// Two haproxy processes in HTTP mode: A takes plaintext HTTP and sends
/// requests to B over TLS 1.3 with a client certificate, checking B's
/// certificate and name, reusing idle connections to B for any client
/// (`http-reuse always`: its connection pool); B requires and checks A's
/// certificate and forwards to the app, also over reused connections.
pub async fn haproxy_http_pair(dir: &Path, certs: &Certs, app: SocketAddr) -> Result<Running> {
    let Some(haproxy) = which("haproxy") else {
        return Err(anyhow!(haproxy_missing().unwrap_or_default()));
    };
    let (a_listen, b_listen) = (free_port()?, free_port()?);
    let head = "global\n  ssl-server-verify required\n\
                defaults\n  mode http\n  timeout connect 5s\n  timeout client 30s\n\
                timeout server 30s\n  timeout http-keep-alive 30s\n";
    let b_conf = format!(
        "{head}frontend mesh\n  bind {b_listen} ssl ssl-min-ver TLSv1.3 crt {} ca-file {} verify required\n\
         default_backend app\nbackend app\n  http-reuse always\n  server app {app}\n",
        certs.server_pem.display(),
        certs.ca.display(),
    );
    let a_conf = format!(
        "{head}frontend front\n  bind {a_listen}\n  default_backend mesh\n\
         backend mesh\n  http-reuse always\n  server b {b_listen} ssl ssl-min-ver TLSv1.3 crt {} \
         ca-file {} verify required verifyhost {SERVER_NAME}\n",
        certs.client_pem.display(),
        certs.ca.display(),
    );
    let mut procs = Vec::new();
    for (name, conf, listen) in [
        ("haproxy-b", b_conf, b_listen),
        ("haproxy-a", a_conf, a_listen),
    ] {
        let path = dir.join(format!("{name}.cfg"));
        std::fs::write(&path, conf)?;
        let mut cmd = Command::new(&haproxy);
        cmd.arg("-db").arg("-f").arg(&path);
        let mut child = [Child::spawn(
            name,
            &mut cmd,
            &dir.join(format!("{name}.log")),
        )?];
        wait_listening(listen, &mut child)
            .await
            .with_context(|| format!("{name} did not start"))?;
        let [child] = child;
        procs.push(child);
    }
    Ok(Running {
        front: a_listen,
        pids: procs.iter().map(Child::pid).collect(),
        _procs: procs,
    })
}

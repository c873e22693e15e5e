//! `portcullis demo`: a whole mesh on loopback for a newcomer. A fresh CA in
//! a temporary directory, an echo app, and two sidecars configured through
//! the same flags `portcullis run` takes, so what the demo shows is what a
//! real deployment does.

use std::convert::Infallible;
use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use bytes::Bytes;
use clap::Parser;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio_util::task::AbortOnDropHandle;
use tracing::Instrument;

use crate::app::{App, BoundAddrs};
use crate::config::{Cli, Command, DemoArgs};
use crate::drain::Drain;
use crate::identity::{CaFiles, NewCa, TrustDomain};

const SERVER_ID: &str = "spiffe://cluster.local/ns/demo/sa/server";

/// The server sidecar's rules: the client may GET /hello and below; on a
/// port an allow rule covers, everything else is denied.
const DEMO_RULES: &str = "\
# portcullis demo rules: edit and save; the server sidecar applies them at once.
# Try adding \"/admin\" to paths, then curl /admin again.
rules:
  - name: client-reads-hello
    action: allow
    from:
      identities: [\"spiffe://cluster.local/ns/demo/sa/client\"]
    http:
      methods: [GET]
      paths: [\"/hello\", \"/hello/**\"]
";

/// The client sidecar's rules: none (it serves nothing in the demo). Its
/// own directory, so it never reads the host's /etc/portcullis/rules.
const CLIENT_RULES: &str = "\
# portcullis demo: the client sidecar's rules. It receives no traffic in the
# demo, so it has none; inbound connections would get the default policy.
rules: []
";

/// Runs the demo until Ctrl-C or SIGTERM, then drains and cleans up.
pub async fn run(args: DemoArgs) -> Result<()> {
    init_logs()?;
    // Listen for signals before the banner, so an early Ctrl-C still cleans up.
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("listening for SIGTERM")?;
    let demo = start(args).await?;
    let status_line = |r: Result<String>| match r {
        Ok(answer) => answer.lines().next().unwrap_or_default().to_string(),
        Err(e) => format!("failed: {e:#}"),
    };
    let first = status_line(http_get(demo.listen, "/hello").await);
    let denied = status_line(http_get(demo.listen, "/admin").await);
    println!("{}", demo.banner(&first, &denied));
    tokio::select! {
        r = tokio::signal::ctrl_c() => r.context("listening for Ctrl-C")?,
        _ = term.recv() => {}
    }
    println!("stopping: draining both sidecars...");
    let dir = demo.dir.clone();
    demo.stop().await?;
    println!("demo stopped, cleaned up {}", dir.display());
    Ok(())
}

/// A running demo mesh; `stop` drains it and removes its files.
pub struct Demo {
    /// Where the CA lives (`ca.crt`, `ca.key`); removed by `stop`.
    pub dir: PathBuf,
    /// The server sidecar's rules file, for the user to edit live.
    pub rules_file: PathBuf,
    /// The client sidecar's upstream listener: plain HTTP in, mTLS out.
    pub listen: SocketAddr,
    /// The echo app behind the server sidecar.
    pub app: SocketAddr,
    pub client: BoundAddrs,
    pub server: BoundAddrs,
    sidecars: [Sidecar; 2],
    echo: AbortOnDropHandle<()>,
    _tmp: TempDir,
}

/// Makes the CA, starts the echo app and both sidecars, and waits until both
/// sidecars say ready. On error everything started so far is torn down.
pub async fn start(args: DemoArgs) -> Result<Demo> {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("portcullis-demo-{}-{n}", std::process::id()));
    std::fs::create_dir(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let tmp = TempDir(dir.clone());
    let td = TrustDomain::new("cluster.local").map_err(|e| anyhow!("trust domain: {e}"))?;
    let ca = NewCa::root(&td, Duration::from_secs(86400))
        .and_then(|ca| ca.write(&dir, false))
        .map_err(|e| anyhow!("making the demo CA in {}: {e}", dir.display()))?;
    let rules = dir.join("rules");
    std::fs::create_dir(&rules).with_context(|| format!("creating {}", rules.display()))?;
    let rules_file = rules.join("demo.yaml");
    std::fs::write(&rules_file, DEMO_RULES)
        .with_context(|| format!("writing {}", rules_file.display()))?;
    let (app, echo) = echo_app().await.context("echo app")?;
    let flags = format!("--inbound-target {app} --cert-ttl 1m");
    let mut argv = run_argv(&ca, "server", &flags);
    argv.extend([OsString::from("--rules-dir"), OsString::from(&rules)]);
    let (server_sidecar, server) = Sidecar::start("server", argv)
        .await
        .context("server sidecar")?;
    let client_rules = dir.join("client-rules");
    std::fs::create_dir(&client_rules)
        .and_then(|()| std::fs::write(client_rules.join("client.yaml"), CLIENT_RULES))
        .with_context(|| format!("writing {}", client_rules.display()))?;
    let (port, dest) = (args.port, server.inbound);
    let flags = format!("--upstream 127.0.0.1:{port}={dest}={SERVER_ID}");
    let mut argv = run_argv(&ca, "client", &flags);
    argv.extend([OsString::from("--rules-dir"), OsString::from(&client_rules)]);
    let (client_sidecar, client) = Sidecar::start("client", argv)
        .await
        .context("client sidecar")?;
    let listen = *client.upstreams.first().context("no upstream")?;
    let sidecars = [client_sidecar, server_sidecar];
    Ok(Demo {
        dir,
        rules_file,
        listen,
        app,
        client,
        server,
        sidecars,
        echo,
        _tmp: tmp,
    })
}

/// `portcullis run ...` for one demo sidecar. Only `extra` and the fixed flags
/// are split on spaces; the CA paths are passed whole, spaces and all.
fn run_argv(ca: &CaFiles, sa: &str, extra: &str) -> Vec<OsString> {
    let flags = format!(
        "portcullis run --namespace demo --service-account {sa} --inbound-listen 127.0.0.1:0 \
         --admin-listen 127.0.0.1:0 --drain-timeout 3s {extra}"
    );
    // (--drain-timeout 3s: Ctrl-C should not wait long on an idle keep-alive.)
    let mut argv: Vec<OsString> = flags.split_whitespace().map(OsString::from).collect();
    let paths = [&ca.cert, &ca.cert, &ca.key].map(OsString::from);
    let flags = ["--trust-bundle", "--ca-cert", "--ca-key"].map(OsString::from);
    argv.extend(flags.into_iter().zip(paths).flat_map(|(f, p)| [f, p]));
    argv
}

impl Demo {
    /// Drains both sidecars, stops the app and removes the CA directory.
    pub async fn stop(self) -> Result<()> {
        let [client, server] = self.sidecars;
        let (c, s) = tokio::join!(client.stop(), server.stop());
        self.echo.abort();
        let removed = std::fs::remove_dir_all(&self.dir);
        let removed = removed.with_context(|| format!("removing {}", self.dir.display()));
        c.context("client sidecar")?;
        s.context("server sidecar")?;
        removed
    }

    /// The text shown once the mesh is up: what runs, what to try, where to look.
    pub fn banner(&self, first_answer: &str, denied_answer: &str) -> String {
        let (l, si, app) = (self.listen, self.server.inbound, self.app);
        let (rules, port) = (self.rules_file.display(), self.app.port());
        // The binary's own path: after `make demo` it is not on PATH.
        let bin = std::env::current_exe()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|_| "portcullis".into());
        let (c, s, dir) = (self.client.admin, self.server.admin, self.dir.display());
        format!(
            "\
portcullis demo: a small mesh is running on loopback

  curl --> client sidecar ==[ mTLS ]==> server sidecar --> echo app
           {l:<29}{si:<19}{app}
           sa/client                    sa/server

  identities: spiffe://cluster.local/ns/demo/sa/{{client,server}}, from a fresh CA in
  {dir}
  GET /hello through the mesh just now: {first_answer}
  GET /admin through the mesh just now: {denied_answer}

try it:
  curl http://{l}/hello
  curl http://{l}/admin      (denied by the rules in {rules})

change the rules live: edit {rules}
  (add \"/admin\" to paths), save, and curl /admin again; then see why:
  curl -s http://{s}/rules
  curl -s 'http://{s}/authz/explain?from=spiffe://cluster.local/ns/demo/sa/client&port={port}&method=GET&path=/admin'
  {bin} rules explain --rules {rules} --from spiffe://cluster.local/ns/demo/sa/client --port {port} --method GET --path /admin

admin endpoints:
  client sidecar  http://{c}/certs  /metrics  /ready
  server sidecar  http://{s}/certs  /metrics  /ready

things to look at:
  curl -s http://{c}/metrics | grep portcullis_tls_handshakes_total
  curl -s http://{s}/certs    (its certificate lives 1m: the serial changes every ~30s)
  {bin} ca inspect {dir}/ca.crt
  {bin} check --admin {s} --no-interception

the sidecars' own log lines (certificates, rule reloads, denials) show on
stderr, prefixed [client] or [server].

press Ctrl-C to stop"
        )
    }
}

/// One sidecar running in this process, on its own thread named after it
/// (`client`, `server`) with its own single-threaded runtime: every task
/// it spawns runs there, so its log lines can be told apart by thread.
/// Work it hands to a helper thread (parsing reloaded files) carries the
/// span it was started from, so the sidecar also runs inside a span named
/// after it ([`sidecar_span`]) and the log prefix finds it there.
/// Dropping it begins its drain, so a failed `start` leaves nothing listening.
struct Sidecar {
    drain: Drain,
    done: tokio::sync::oneshot::Receiver<Result<()>>,
}

impl Sidecar {
    /// Builds settings exactly as `portcullis run <flags>` would, binds, runs,
    /// and waits until its `/ready` says 200.
    async fn start(name: &'static str, argv: Vec<OsString>) -> Result<(Sidecar, BoundAddrs)> {
        let Command::Run(args) = Cli::try_parse_from(argv)?.command else {
            bail!("not a `run` command line")
        };
        let settings = args.settings().map_err(anyhow::Error::msg)?;
        let (bound_tx, bound_rx) = tokio::sync::oneshot::channel();
        let (done_tx, done) = tokio::sync::oneshot::channel();
        let span = sidecar_span(name)?;
        std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => return drop(bound_tx.send(Err(anyhow::Error::from(e)))),
                };
                rt.block_on(
                    async move {
                        let app = match App::bind(settings).await {
                            Ok(app) => app,
                            Err(e) => return drop(bound_tx.send(Err(e))),
                        };
                        let _ = bound_tx.send(Ok((app.addrs().clone(), app.drain())));
                        let _ = done_tx.send(app.run().await);
                    }
                    .instrument(span),
                );
            })
            .with_context(|| format!("starting the {name} sidecar's thread"))?;
        let (addrs, drain) = bound_rx.await.context("the sidecar's thread ended")??;
        let sidecar = Sidecar { drain, done };
        wait_ready(addrs.admin).await?;
        Ok((sidecar, addrs))
    }

    async fn stop(mut self) -> Result<()> {
        self.drain.begin();
        (&mut self.done)
            .await
            .context("the sidecar's thread ended")?
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        self.drain.begin();
    }
}

/// Shows what the sidecars log (certificates issued, rules reloaded,
/// requests denied) on stderr, each line prefixed with the sidecar's name,
/// so a newcomer sees the mesh react to what they do.
fn init_logs() -> Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_new("info,portcullis::app=error")
        .map_err(|e| anyhow!("log filter: {e}"))?;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .event_format(SidecarPrefix)
        .try_init()
        .map_err(|e| anyhow!("logging: {e}"))
}

/// The span a demo sidecar runs in. Tasks it spawns do not inherit it (the
/// thread name tells those apart), but spans created while it is entered
/// have it as their parent, and helper threads enter those: its name is
/// how [`SidecarPrefix`] attributes their lines.
fn sidecar_span(name: &str) -> Result<tracing::Span> {
    Ok(match name {
        "client" => tracing::info_span!("client"),
        "server" => tracing::info_span!("server"),
        _ => bail!("no demo sidecar is called {name}"),
    })
}

/// `[server] info request denied peer=... rule=...`: the sidecar's name
/// (its thread's, or else its [`sidecar_span`]'s), the level, then the
/// event's message and fields.
struct SidecarPrefix;

/// Which sidecar an event comes from: the thread it is logged on, or
/// else the sidecar span it is logged in; `demo` for the demo's own lines.
fn sidecar_of<S, N>(ctx: &tracing_subscriber::fmt::FmtContext<'_, S, N>) -> &'static str
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    N: for<'a> tracing_subscriber::fmt::FormatFields<'a> + 'static,
{
    let known = |n: &str| match n {
        "client" => Some("client"),
        "server" => Some("server"),
        _ => None,
    };
    if let Some(n) = std::thread::current().name().and_then(known) {
        return n;
    }
    ctx.event_scope()
        .into_iter()
        .flatten()
        .find_map(|span| known(span.name()))
        .unwrap_or("demo")
}

impl<S, N> tracing_subscriber::fmt::FormatEvent<S, N> for SidecarPrefix
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    N: for<'a> tracing_subscriber::fmt::FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &tracing_subscriber::fmt::FmtContext<'_, S, N>,
        mut writer: tracing_subscriber::fmt::format::Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        let name = sidecar_of(ctx);
        let level = event.metadata().level().as_str().to_lowercase();
        write!(writer, "[{name}] {level} ")?;
        ctx.field_format().format_fields(writer.by_ref(), event)?;
        writeln!(writer)
    }
}

/// The demo's temporary directory, removed on drop too, so even a failed
/// `start` or a panicking test leaves nothing behind.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Starts the echo app on a free loopback port. Aborting the handle closes
/// the listener and every connection (they live in the task's `JoinSet`).
async fn echo_app() -> Result<(SocketAddr, AbortOnDropHandle<()>)> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let task = tokio::spawn(async move {
        let mut conns = JoinSet::new();
        while let Ok((stream, _)) = listener.accept().await {
            conns.spawn(async move {
                let service =
                    hyper::service::service_fn(|req| async { Ok::<_, Infallible>(echo(req)) });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
            while conns.try_join_next().is_some() {}
        }
    });
    Ok((addr, AbortOnDropHandle::new(task)))
}

/// Answers any request with what it received, to show it came through.
fn echo(req: Request<Incoming>) -> Response<Full<Bytes>> {
    let mut body = format!("hello from the demo app\n{} {}\n", req.method(), req.uri());
    for (name, value) in req.headers() {
        body += &format!("{name}: {}\n", String::from_utf8_lossy(value.as_bytes()));
    }
    Response::new(Full::new(Bytes::from(body)))
}

/// Polls `/ready` on an admin address until it says 200, for up to 10 s.
async fn wait_ready(admin: SocketAddr) -> Result<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let last = match http_get(admin, "/ready").await {
            Ok(answer) if answer.starts_with("HTTP/1.1 200") => return Ok(()),
            Ok(answer) => answer.lines().next().unwrap_or_default().to_string(),
            Err(e) => format!("{e:#}"),
        };
        if tokio::time::Instant::now() > deadline {
            bail!("not ready after 10s (GET http://{admin}/ready: {last})");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A minimal HTTP/1.1 GET that returns the whole raw answer.
async fn http_get(addr: SocketAddr, path: &str) -> Result<String> {
    let get = async {
        let mut stream = TcpStream::connect(addr).await?;
        let req = format!(
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: portcullis-demo\r\n\
             Connection: close\r\n\r\n"
        );
        stream.write_all(req.as_bytes()).await?;
        let mut answer = String::new();
        stream.read_to_string(&mut answer).await?;
        Ok::<_, std::io::Error>(answer)
    };
    let answer = tokio::time::timeout(Duration::from_secs(5), get).await;
    let answer = answer.map_err(anyhow::Error::from).and_then(|a| Ok(a?));
    answer.with_context(|| format!("GET http://{addr}{path}"))
}

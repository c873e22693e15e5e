//! The programs that play a pod's application and its clients: a small
//! Python server (HTTP on some ports, a server-speaks-first greeting on
//! others) that writes every request it gets to a log file, `curl` as the
//! HTTP client and a Python client that times a greeting.
//!
//! Apps and clients run as root inside the pod's namespace, never as the
//! proxy UID, so `portcullis init`'s rules apply to them as to a real app.

use std::path::Path;

use crate::netns::{Netns, Process};

/// The app. `app.py NAME LOG http:PORT... greet:PORT...`: every HTTP
/// request is answered (and logged) with the pod's name, the port, the
/// client address, the `x-forwarded-client-cert` header and the body; a
/// greet port sends `HELLO from NAME` as soon as a client connects. All
/// ports listen on IPv4 and IPv6.
const APP: &str = r#"
import socket, socketserver, sys, threading
from http.server import BaseHTTPRequestHandler

NAME, LOG = sys.argv[1], sys.argv[2]
lock = threading.Lock()

def log(line):
    with lock, open(LOG, 'a') as f:
        f.write(line + '\n')

class Handler(BaseHTTPRequestHandler):
    protocol_version = 'HTTP/1.1'
    def do_POST(self):
        n = int(self.headers.get('Content-Length') or 0)
        body = self.rfile.read(n).decode(errors='replace')
        xfcc = self.headers.get('x-forwarded-client-cert') or '-'
        port = self.server.server_address[1]
        client = self.client_address[0]
        log(f'{port} client={client} xfcc={xfcc} body={body}')
        out = f'pod={NAME} port={port} client={client} xfcc={xfcc} body={body}\n'.encode()
        self.send_response(200)
        self.send_header('Content-Type', 'text/plain')
        self.send_header('Content-Length', str(len(out)))
        self.end_headers()
        self.wfile.write(out)
    do_GET = do_POST
    def log_message(self, *args):
        pass

# Not http.server.HTTPServer: its server_bind looks the host name up, which
# can hang in a namespace without DNS.
class Server(socketserver.ThreadingMixIn, socketserver.TCPServer):
    address_family = socket.AF_INET6
    allow_reuse_address = True
    daemon_threads = True
    def server_bind(self):
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()

def greet(port):
    s = socket.socket(socket.AF_INET6)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(('::', port))
    s.listen(64)
    def talk(c, client):
        log(f'{port} client={client} greeted')
        c.sendall(f'HELLO from {NAME}\n'.encode())
        while c.recv(4096):
            pass
        c.close()
    def loop():
        while True:
            c, client = s.accept()
            threading.Thread(target=talk, args=(c, client[0]), daemon=True).start()
    threading.Thread(target=loop, daemon=True).start()

for spec in sys.argv[3:]:
    kind, port = spec.split(':')
    if kind == 'http':
        server = Server(('::', int(port)), Handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
    else:
        greet(int(port))
print('ready', flush=True)
threading.Event().wait()
"#;

/// Connects, waits for the server to speak, and prints the milliseconds
/// from the start of the connect to the first byte, then the first line
/// (or `error: …`).
const GREET_CLIENT: &str = r#"
import socket, sys, time
try:
    t0 = time.monotonic()
    s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
    data = s.recv(4096)
    ms = (time.monotonic() - t0) * 1000
    while data and not data.endswith(b'\n'):
        more = s.recv(4096)
        if not more:
            break
        data += more
    print(f'{ms:.2f} {data.decode().strip()}')
except Exception as e:
    print(f'error: {e}')
"#;

/// The ports every app serves: HTTP on 8080 and 9090, a greeting on 3306
/// (MySQL's port: opaque by default, and the server speaks first).
pub const HTTP_PORT: u16 = 8080;
pub const OTHER_HTTP_PORT: u16 = 9090;
pub const GREET_PORT: u16 = 3306;

/// A python3 that any user can run (not a shim in root's home, which is
/// also slow to start).
pub fn python() -> &'static str {
    ["/usr/bin/python3", "/usr/local/bin/python3"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .unwrap_or("python3")
}

/// Starts the app of pod `name` in `ns`, logging requests to `log`; returns
/// once it listens.
pub fn start_app(ns: &Netns, name: &str, log: &Path) -> Process {
    let log = log.display().to_string();
    let http = format!("http:{HTTP_PORT}");
    let other = format!("http:{OTHER_HTTP_PORT}");
    let greet = format!("greet:{GREET_PORT}");
    let mut p = ns.spawn(&[python(), "-c", APP, name, &log, &http, &other, &greet]);
    p.wait_for_line("ready");
    p
}

/// What an HTTP client got: the status (0 when the request failed) and
/// the body, or curl's error.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub body: String,
}

impl Reply {
    pub fn ok(&self) -> bool {
        self.status == 200
    }
}

/// `addr` as a URL host: IPv6 in brackets.
pub fn url_host(addr: &str) -> String {
    if addr.contains(':') {
        format!("[{addr}]")
    } else {
        addr.to_string()
    }
}

/// POSTs `body` to `http://addr:port/` with curl from inside `ns`.
pub fn post(ns: &Netns, addr: &str, port: u16, body: &str) -> Reply {
    let url = format!("http://{}:{port}/", url_host(addr));
    let out = ns.run(&[
        "curl",
        "-sS",
        "-g",
        "--noproxy",
        "*",
        "-m",
        "5",
        "-H",
        "Content-Type: text/plain",
        "--data-binary",
        body,
        "-w",
        "\n%{http_code}",
        &url,
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let (text, code) = stdout.rsplit_once('\n').unwrap_or(("", &stdout));
    let status = code.trim().parse().unwrap_or(0);
    let body = if out.status.success() {
        text.to_string()
    } else {
        String::from_utf8_lossy(&out.stderr).trim().to_string()
    };
    Reply { status, body }
}

/// Reads the greeting at `addr:port` from inside `ns`; returns the
/// milliseconds from connect to first byte and the line.
pub fn greeting(ns: &Netns, addr: &str, port: u16) -> Result<(f64, String), String> {
    let out = ns.ok(&[python(), "-c", GREET_CLIENT, addr, &port.to_string()]);
    let line = out.trim();
    let (ms, text) = line.split_once(' ').ok_or_else(|| line.to_string())?;
    let ms = ms.parse::<f64>().map_err(|_| line.to_string())?;
    Ok((ms, text.to_string()))
}

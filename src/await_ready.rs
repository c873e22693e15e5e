//! `portcullis await`: waits until the local sidecar answers `/ready` with
//! 200. The fallback (non-native) layout runs it as the proxy container's
//! postStart hook, which holds the app containers' start until the mesh is
//! up, so the app's first connections are not refused.

use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Args;
use http_body_util::Empty;
use hyper_util::rt::TokioIo;

/// `portcullis await` flags.
#[derive(Debug, Args)]
#[command(after_help = EXIT_CODES)]
pub struct AwaitArgs {
    /// Give up (exit 1) after this long.
    #[arg(long, default_value = "120s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
    /// The sidecar's admin server: HOST:PORT or http://HOST:PORT.
    #[arg(
        long,
        env = "PORTCULLIS_AWAIT_ADMIN",
        default_value = "http://127.0.0.1:15020",
        value_parser = parse_admin
    )]
    pub admin: String,
}

/// Shown under `--help`: a postStart hook's caller only sees the exit code,
/// so what each one means is part of the interface.
const EXIT_CODES: &str = "Exit codes:
  0  the sidecar answered /ready with 200
  1  it did not before --timeout (the last failure is printed)
  2  usage error (a bad flag or value)";

/// Checks `--admin` while the command line is parsed, so a typo is a usage
/// error (exit 2, like every other command) and not a timeout (exit 1)
/// two minutes later.
fn parse_admin(s: &str) -> Result<String, String> {
    crate::config::admin_address(s).map(|a| format!("http://{a}"))
}

/// How often `/ready` is asked.
const INTERVAL: Duration = Duration::from_millis(200);

/// Ok once ready; Err with the last failure at the timeout.
pub async fn wait(args: &AwaitArgs) -> Result<(), String> {
    // Checked by `parse_admin` already; again for callers that build the
    // args by hand.
    let authority = crate::config::admin_address(&args.admin)
        .map_err(|e| format!("--admin {:?}: {e}", args.admin))?;
    let deadline = Instant::now() + args.timeout;
    let mut last = String::from("not asked yet");
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(format!(
                "sidecar not ready after {:?}: {last}",
                args.timeout
            ));
        }
        match tokio::time::timeout(left.min(Duration::from_secs(2)), ready(&authority)).await {
            Ok(Ok(200)) => return Ok(()),
            Ok(Ok(status)) => last = format!("/ready answered {status}"),
            Ok(Err(e)) => last = e,
            Err(_) => last = "/ready did not answer in time".into(),
        }
        tokio::time::sleep(INTERVAL.min(deadline.saturating_duration_since(Instant::now()))).await;
    }
}

async fn ready(authority: &str) -> Result<u16, String> {
    let tcp = tokio::net::TcpStream::connect(authority)
        .await
        .map_err(|e| format!("connect {authority}: {e}"))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let req = hyper::Request::get("/ready")
        .header(hyper::header::HOST, authority)
        .body(Empty::<Bytes>::new())
        .map_err(|e| e.to_string())?;
    let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
    Ok(resp.status().as_u16())
}

#[cfg(test)]
mod tests {
    use super::parse_admin;

    #[test]
    fn admin_is_host_port_with_or_without_http() {
        assert_eq!(
            parse_admin("127.0.0.1:15020").as_deref(),
            Ok("http://127.0.0.1:15020")
        );
        assert_eq!(
            parse_admin("http://[::1]:15020/").as_deref(),
            Ok("http://[::1]:15020")
        );
        assert!(parse_admin("https://x:1").is_err());
    }
}

//! A client that says nothing within the detect timeout. It may be waiting
//! for a server that speaks first (SMTP, MySQL, SSH), which needs the app
//! connected before anything happens; or it may be an HTTP client that
//! simply connected early (a warm pool). Carrying it as opaque bytes from
//! then on would let a late HTTP request reach the app unparsed: past the
//! per-request rules and with a forged `x-forwarded-client-cert`. So the
//! app is connected (when the rules let the connection through as TCP) and
//! whoever speaks first decides: the app, and it stays opaque; the client,
//! and its bytes are classified like any first bytes.

use std::future::pending;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::net::TcpStream;
use tracing::info;

use super::http::ConnInfo;
use super::{sniff_http_after, AppProtocol, Shared};

/// What decided a silent connection.
pub enum FirstWord {
    /// The client spoke: what its bytes are, the bytes (to replay), and
    /// the app connection opened meanwhile, if any.
    Client(AppProtocol, Bytes, Option<TcpStream>),
    /// The app spoke first (or closed), or the client closed its side
    /// without a word: opaque, on this app connection.
    App(TcpStream),
}

/// Waits for the first word on a connection whose client was silent for
/// the detect timeout. `None`: the client left (or closed its side with no
/// app to hear), stayed silent (for the idle timeout, or the header
/// timeout when only HTTP could be allowed), or the app could not be
/// reached (logged).
pub async fn first_word<S>(shared: &Shared, io: &mut S, conn: &ConnInfo) -> Option<FirstWord>
where
    S: AsyncRead + Unpin,
{
    let app = if shared.policy.allows_tcp(conn) {
        match shared.connect(conn.target).await {
            Ok(app) => Some(app),
            Err(e) => {
                shared.log_refusal(("inbound", "app_unreachable"), |count| {
                    info!(peer = %conn.peer, error = %e, count, "inbound connection dropped: app unreachable")
                });
                return None;
            }
        }
    } else {
        // Only HTTP could be allowed: there is no app to hear first.
        None
    };
    // With no app connected, only an HTTP request could be let through,
    // and a client gets as long for one as for its headers.
    let wait = match app {
        Some(_) => shared.idle_timeout,
        None => super::http::HEADER_READ_TIMEOUT,
    };
    let mut first = vec![0u8; 2048];
    let app_spoke = async {
        match &app {
            Some(app) => app.readable().await,
            None => pending().await,
        }
    };
    let n = tokio::select! {
        biased;
        _ = app_spoke => return app.map(FirstWord::App),
        read = tokio::time::timeout(wait, io.read(&mut first)) => match read {
            Ok(Ok(n)) if n > 0 => n,
            // Done sending without a word (`nc -N host port </dev/null`):
            // it may still want to hear the app's banner.
            Ok(Ok(_)) => return app.map(FirstWord::App),
            _ => return None,
        },
    };
    first.truncate(n);
    let (protocol, bytes) = sniff_http_after(io, shared.detect_timeout, first).await;
    Some(FirstWord::Client(protocol, bytes, app))
}

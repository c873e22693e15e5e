//! A minimal HTTP/1.0 GET for the admin port: `check` makes a handful of
//! requests to loopback, so blocking std sockets with deadlines do.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// Admin answers are small; a bigger one is not the sidecar's.
const MAX_BODY: u64 = 4 << 20;

/// Why a request gave no answer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot connect: {0}")]
    Connect(std::io::Error),
    #[error("no answer: {0}")]
    Io(std::io::Error),
    #[error("not an HTTP answer")]
    NotHttp,
    #[error("unexpected body: {0}")]
    Json(#[from] serde_json::Error),
}

/// A status and a body.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub body: String,
}

impl Answer {
    /// The body as JSON; a non-200 answer is an error that quotes it.
    pub fn json<T: serde::de::DeserializeOwned>(self) -> Result<T, Error> {
        if self.status != 200 {
            return Err(Error::Io(std::io::Error::other(format!(
                "answered {}: {}",
                self.status,
                self.body.trim()
            ))));
        }
        Ok(serde_json::from_str(&self.body)?)
    }
}

/// `GET path` on `addr`, every step bounded by `timeout`.
pub fn get(addr: SocketAddr, path: &str, timeout: Duration) -> Result<Answer, Error> {
    let mut s = TcpStream::connect_timeout(&addr, timeout).map_err(Error::Connect)?;
    s.set_read_timeout(Some(timeout)).map_err(Error::Io)?;
    s.set_write_timeout(Some(timeout)).map_err(Error::Io)?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").map_err(Error::Io)?;
    let mut raw = Vec::new();
    s.take(MAX_BODY).read_to_end(&mut raw).map_err(Error::Io)?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n").ok_or(Error::NotHttp)?;
    let status = head
        .strip_prefix("HTTP/1.")
        .and_then(|r| r.get(2..5))
        .and_then(|c| c.parse().ok())
        .ok_or(Error::NotHttp)?;
    Ok(Answer {
        status,
        body: body.to_string(),
    })
}

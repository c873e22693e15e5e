//! The address a redirected connection was really going to (`SO_ORIGINAL_DST`
//! and its IPv6 counterpart), as recorded by netfilter's connection tracking.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};

use nix::sys::socket::{getsockopt, sockopt};
use tokio::net::TcpStream;

/// The original destination of an accepted, redirected connection. The
/// question is asked in the connection's real family: an IPv4 connection
/// accepted on the dual-stack inbound listener (`[::]:15006`) has an
/// IPv4-mapped local address and an IPv4 conntrack entry, so it needs
/// `SO_ORIGINAL_DST`, which Linux answers on an IPv6 socket too (its
/// IPv6 counterpart finds no entry). Fails
/// when the kernel has none, or when it is the listener itself (the
/// connection was not redirected, and forwarding it would loop).
pub fn original_destination(stream: &TcpStream) -> Result<SocketAddr, super::Error> {
    let local = stream
        .local_addr()
        .map_err(|e| super::Error::OriginalDst(e.to_string()))?;
    let dst = match normalize(local) {
        SocketAddr::V4(_) => getsockopt(stream, sockopt::OriginalDst).map(|a| {
            SocketAddr::V4(SocketAddrV4::new(
                Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr)),
                u16::from_be(a.sin_port),
            ))
        }),
        SocketAddr::V6(_) => getsockopt(stream, sockopt::Ip6tOriginalDst).map(|a| {
            SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(a.sin6_addr.s6_addr),
                u16::from_be(a.sin6_port),
                0,
                0,
            ))
        }),
    }
    .map_err(|e| super::Error::OriginalDst(format!("not available ({e})")))?;
    let dst = normalize(dst);
    if dst == normalize(local) {
        return Err(super::Error::OriginalDst(format!(
            "{dst} is this listener: the connection was not redirected"
        )));
    }
    Ok(dst)
}

/// Treats IPv4-mapped IPv6 addresses as the IPv4 address they carry.
fn normalize(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(v4.into(), v6.port()),
            None => addr,
        },
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv4_mapped_addresses_count_as_ipv4() {
        let cases = [
            ("10.0.0.1:80", "10.0.0.1:80"),
            ("[::ffff:10.0.0.1]:15006", "10.0.0.1:15006"),
            ("[fd00::1]:8080", "[fd00::1]:8080"),
            ("[::1]:15001", "[::1]:15001"),
        ];
        for (addr, want) in cases {
            let got = normalize(addr.parse().unwrap());
            assert_eq!(got, want.parse::<SocketAddr>().unwrap(), "{addr}");
        }
    }

    /// A dual-stack listener's IPv4 connection is asked with the IPv4
    /// option: unredirected, it gets the listener itself back (with
    /// connection tracking) or "not available", never an IPv6 answer.
    #[tokio::test]
    async fn ipv4_on_a_dual_stack_listener_is_asked_as_ipv4() {
        let Ok(listener) = tokio::net::TcpListener::bind("[::]:0").await else {
            return; // no IPv6 here
        };
        let port = listener.local_addr().unwrap().port();
        let _client = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        assert!(accepted.local_addr().unwrap().is_ipv6(), "mapped");
        let err = original_destination(&accepted).unwrap_err().to_string();
        assert!(
            err.contains("127.0.0.1:") || err.contains("not available"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn a_direct_connection_has_no_original_destination() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let _client = TcpStream::connect(addr).await.unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        assert!(original_destination(&accepted).is_err());
    }
}

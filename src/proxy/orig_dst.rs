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

    /// The real thing, as root with `ip` and `nft`: in a private network
    /// namespace (of this test's thread only), connections NAT-redirected
    /// to a dual-stack listener, as the inbound one is, report where they
    /// were going, over IPv4 and IPv6.
    #[test]
    fn redirected_connections_on_a_dual_stack_listener() {
        let tools = ["ip", "nft"].iter().all(|t| {
            ["/usr/sbin", "/sbin", "/usr/bin", "/bin"]
                .iter()
                .any(|d| std::path::Path::new(d).join(t).exists())
        });
        if !nix::unistd::Uid::effective().is_root() || !tools {
            eprintln!(
                "SKIPPED redirected_connections_on_a_dual_stack_listener: needs root, ip, nft"
            );
            return;
        }
        std::thread::spawn(in_private_netns).join().unwrap();
    }

    fn in_private_netns() {
        use std::process::{Command, Stdio};
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        let ok = Command::new("ip")
            .args(["link", "set", "lo", "up"])
            .status()
            .unwrap();
        assert!(ok.success());
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let listener = crate::proxy::bind("test", "[::]:0".parse().unwrap()).unwrap();
            let port = listener.local_addr().unwrap().port();
            let rules = format!(
                "table inet t {{\n chain out {{\n type nat hook output priority -100;\n \
                 tcp dport 9 redirect to :{port}\n }}\n}}\n"
            );
            let mut nft = Command::new("nft")
                .args(["-f", "-"])
                .stdin(Stdio::piped())
                .spawn()
                .unwrap();
            use std::io::Write;
            nft.stdin
                .take()
                .unwrap()
                .write_all(rules.as_bytes())
                .unwrap();
            assert!(nft.wait().unwrap().success());
            for dest in ["127.0.0.1:9", "[::1]:9"] {
                let dest: SocketAddr = dest.parse().unwrap();
                let _client = TcpStream::connect(dest).await.unwrap();
                let (accepted, _) = listener.accept().await.unwrap();
                assert_eq!(original_destination(&accepted).unwrap(), dest);
            }
        });
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

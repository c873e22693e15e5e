//! Whether a destination is this pod's own: the inbound listener and the
//! tunnel forward only to the pod they serve, never to another host a
//! packet or a `CONNECT` names (the sidecar is not an open proxy).

use std::net::{IpAddr, SocketAddr};

/// Whether `a` and `b` are the same address (IPv4-mapped IPv6 addresses
/// compare as the IPv4 address they carry).
pub fn same_host(a: IpAddr, b: IpAddr) -> bool {
    a.to_canonical() == b.to_canonical()
}

/// Whether `ip` is an address of this network namespace. The address the
/// connection arrived on answers at once (a redirect rewrites the
/// destination to the primary address of the interface it came in on);
/// any other address is asked of the kernel, which lets a socket bind
/// only to a local address.
pub fn is_own_address(ip: IpAddr, arrived_on: IpAddr) -> bool {
    same_host(ip, arrived_on) || bindable(ip.to_canonical())
}

fn bindable(ip: IpAddr) -> bool {
    let domain = socket2::Domain::for_address(SocketAddr::new(ip, 0));
    socket2::Socket::new(domain, socket2::Type::DGRAM, None)
        .and_then(|s| s.bind(&SocketAddr::new(ip, 0).into()))
        .is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_addresses_are_own_and_others_are_not() {
        let v4: IpAddr = "127.0.0.1".parse().unwrap();
        let mapped: IpAddr = "::ffff:127.0.0.1".parse().unwrap();
        assert!(same_host(mapped, v4));
        // Another loopback address than the one arrived on: still local.
        assert!(is_own_address("127.0.0.2".parse().unwrap(), v4));
        assert!(is_own_address(mapped, "10.9.9.9".parse().unwrap()));
        // TEST-NET addresses are never assigned here.
        for foreign in [
            "192.0.2.1",
            "198.51.100.7",
            "::ffff:203.0.113.5",
            "2001:db8::1",
        ] {
            let foreign: IpAddr = foreign.parse().unwrap();
            assert!(!is_own_address(foreign, v4), "{foreign}");
        }
    }
}

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
fn is_own_address(ip: IpAddr, arrived_on: IpAddr) -> bool {
    same_host(ip, arrived_on) || bindable(ip.to_canonical())
}

/// Whether inbound traffic redirected to the sidecar may go on to
/// `target`: an address of this pod (see [`is_own_address`]) but not a
/// loopback one, which is never a destination from outside the pod (a
/// packet aimed at 127.0.0.1 by a neighbour would reach apps that listen on
/// localhost only), and not one of the sidecar's own ports.
pub fn may_receive(target: SocketAddr, arrived_on: IpAddr, own_ports: &[u16]) -> bool {
    !own_ports.contains(&target.port())
        && !target.ip().to_canonical().is_loopback()
        && is_own_address(target.ip(), arrived_on)
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

    #[test]
    fn inbound_traffic_may_go_to_the_pod_but_not_to_loopback_or_sidecar_ports() {
        let pod: IpAddr = "127.0.0.2".parse().unwrap();
        let own = [15006, 15008, 15020];
        let at = |s: &str| s.parse::<SocketAddr>().unwrap();
        // A neighbour cannot reach localhost-only apps or the sidecar.
        for refused in [
            "127.0.0.1:6379",
            "[::ffff:127.0.0.1]:80",
            "[::1]:80",
            "127.0.0.2:80",
        ] {
            assert!(!may_receive(at(refused), pod, &own), "{refused}");
        }
        let lo_only: IpAddr = "::1".parse().unwrap();
        assert!(!may_receive(at("[::1]:8080"), lo_only, &own));
        // The pod's address (here a local one that is not loopback).
        if let Some(ip) = first_non_loopback_address() {
            assert!(may_receive(SocketAddr::new(ip, 8080), ip, &own), "{ip}");
            assert!(!may_receive(SocketAddr::new(ip, 15008), ip, &own), "{ip}");
        }
        assert!(!may_receive(at("192.0.2.1:8080"), pod, &own));
    }

    /// An address of this machine that is not loopback, if it has one.
    fn first_non_loopback_address() -> Option<IpAddr> {
        let socket = std::net::UdpSocket::bind("0.0.0.0:0").ok()?;
        // Connecting a UDP socket sends nothing; it picks a source address.
        socket.connect("192.0.2.1:9").ok()?;
        let ip = socket.local_addr().ok()?.ip();
        (!ip.is_loopback() && !ip.is_unspecified()).then_some(ip)
    }
}

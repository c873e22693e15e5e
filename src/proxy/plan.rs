//! Where an outbound connection goes: over mesh mTLS to the peer's sidecar,
//! or straight through as plain TCP. A pure function, so the policy is easy
//! to read and to test.

use std::net::SocketAddr;

use ipnet::IpNet;

use crate::config::PortRange;

/// The outbound policy from the flags.
#[derive(Debug, Clone, Default)]
pub struct OutboundPolicy {
    /// Destinations in these networks have a sidecar and get mTLS.
    pub mesh_cidrs: Vec<IpNet>,
    /// Never mTLS to these networks, even inside a mesh CIDR.
    pub passthrough_cidrs: Vec<IpNet>,
    /// Never mTLS to these ports.
    pub passthrough_ports: Vec<PortRange>,
}

/// The route chosen for one connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// Mesh mTLS to the original destination, where the peer's sidecar intercepts it.
    Mesh,
    /// Plain TCP to the original destination.
    Passthrough,
}

/// Chooses the route for a connection to `dest`: passthrough rules first,
/// then the mesh networks; anything else passes through.
pub fn plan(dest: SocketAddr, policy: &OutboundPolicy) -> Route {
    let ip = dest.ip().to_canonical();
    if policy
        .passthrough_ports
        .iter()
        .any(|r| r.contains(dest.port()))
        || policy.passthrough_cidrs.iter().any(|n| n.contains(&ip))
    {
        return Route::Passthrough;
    }
    if policy.mesh_cidrs.iter().any(|n| n.contains(&ip)) {
        Route::Mesh
    } else {
        Route::Passthrough
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_by_network_and_port() {
        let policy = OutboundPolicy {
            mesh_cidrs: vec![
                "10.244.0.0/16".parse().unwrap(),
                "fd00:10::/64".parse().unwrap(),
            ],
            passthrough_cidrs: vec!["10.244.9.0/24".parse().unwrap()],
            passthrough_ports: vec!["5432".parse().unwrap(), "9000-9100".parse().unwrap()],
        };
        let cases = [
            ("10.244.1.5:8080", Route::Mesh),
            ("10.244.9.5:8080", Route::Passthrough),
            ("10.244.1.5:5432", Route::Passthrough),
            ("10.244.1.5:9050", Route::Passthrough),
            ("10.244.1.5:9101", Route::Mesh),
            ("10.245.1.5:8080", Route::Passthrough),
            ("93.184.216.34:443", Route::Passthrough),
            ("[fd00:10::5]:8080", Route::Mesh),
            ("[fd00:11::5]:8080", Route::Passthrough),
            ("[::ffff:10.244.1.5]:8080", Route::Mesh),
        ];
        for (dest, want) in cases {
            assert_eq!(plan(dest.parse().unwrap(), &policy), want, "{dest}");
        }
        assert_eq!(
            plan("10.0.0.1:80".parse().unwrap(), &OutboundPolicy::default()),
            Route::Passthrough
        );
    }
}

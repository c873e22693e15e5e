//! The validated options of `init`, and the parsers for its list values
//! (ports, port ranges, CIDRs). Lists are normalised (sorted, merged) so the
//! generated rules are stable and the kernel never sees overlapping sets.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::{Error, Family, InitArgs, Ipv6Mode};

/// An inclusive range of TCP ports; a single port is `first == last`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PortRange {
    pub first: u16,
    pub last: u16,
}

impl PortRange {
    pub fn single(port: u16) -> Self {
        PortRange {
            first: port,
            last: port,
        }
    }

    /// Parses `80` or `8000-8100`; port 0 and reversed ranges are refused.
    pub fn parse(s: &str) -> Result<Self, String> {
        let port = |p: &str| match p.trim().parse::<u16>() {
            Ok(0) | Err(_) => Err("not a port (1-65535) or a range like 8000-8100".to_string()),
            Ok(p) => Ok(p),
        };
        let (first, last) = match s.split_once('-') {
            Some((a, b)) => (port(a)?, port(b)?),
            None => {
                let p = port(s)?;
                (p, p)
            }
        };
        if first > last {
            return Err(format!("range starts after it ends ({first} > {last})"));
        }
        Ok(PortRange { first, last })
    }

    /// Sorts ranges and merges the ones that overlap or touch.
    pub fn merge(mut ranges: Vec<PortRange>) -> Vec<PortRange> {
        ranges.sort();
        let mut out: Vec<PortRange> = Vec::with_capacity(ranges.len());
        for r in ranges {
            match out.last_mut() {
                Some(prev) if u32::from(r.first) <= u32::from(prev.last) + 1 => {
                    prev.last = prev.last.max(r.last);
                }
                _ => out.push(r),
            }
        }
        out
    }
}

impl fmt::Display for PortRange {
    /// `80` or `8000-8100` (the nft spelling; iptables uses `:`).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.first == self.last {
            write!(f, "{}", self.first)
        } else {
            write!(f, "{}-{}", self.first, self.last)
        }
    }
}

/// A network: an address with its host bits cleared and a prefix length.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Cidr {
    pub addr: IpAddr,
    pub prefix: u8,
}

impl Cidr {
    pub fn family(&self) -> Family {
        match self.addr {
            IpAddr::V4(_) => Family::V4,
            IpAddr::V6(_) => Family::V6,
        }
    }

    /// Parses `10.0.0.0/8`, `fd00::/8`, or a bare address (a /32 or /128).
    ///
    /// Host bits are refused, not cleared as iptables would: `10.0.0.1/8`
    /// is more likely a typo for `10.0.0.1/32` than a wish for the whole
    /// `10.0.0.0/8`, and silently widening an exclusion lets traffic past
    /// the sidecar. The message is the rules checker's, so both agree.
    pub fn parse(s: &str) -> Result<Self, String> {
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = addr
            .trim()
            .parse()
            .map_err(|_| format!("{addr:?} is not an IPv4 or IPv6 address"))?;
        let max = match addr {
            IpAddr::V4(_) => 32,
            IpAddr::V6(_) => 128,
        };
        let prefix = match prefix {
            None => max,
            Some(p) => {
                let n: u8 = p
                    .trim()
                    .parse()
                    .map_err(|_| format!("prefix length {p:?} is not a number"))?;
                if n > max {
                    return Err(format!("prefix length {n} is more than {max}"));
                }
                n
            }
        };
        let cidr = Cidr::new(addr, prefix);
        if cidr.addr != addr {
            return Err(format!("host bits are set (did you mean {cidr}?)"));
        }
        Ok(cidr)
    }

    fn new(addr: IpAddr, prefix: u8) -> Self {
        let addr = match addr {
            IpAddr::V4(a) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
                IpAddr::V4(Ipv4Addr::from(u32::from(a) & mask))
            }
            IpAddr::V6(a) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
                IpAddr::V6(Ipv6Addr::from(u128::from(a) & mask))
            }
        };
        Cidr { addr, prefix }
    }

    /// Whether `other` lies entirely inside this network.
    pub fn contains(&self, other: &Cidr) -> bool {
        self.family() == other.family()
            && other.prefix >= self.prefix
            && Cidr::new(other.addr, self.prefix).addr == self.addr
    }

    /// Sorts networks and drops the ones inside another one.
    pub fn merge(mut cidrs: Vec<Cidr>) -> Vec<Cidr> {
        // Shorter prefixes first, so containers are kept before contents.
        cidrs.sort_by_key(|c| (c.family(), c.prefix, c.addr));
        let mut kept: Vec<Cidr> = Vec::with_capacity(cidrs.len());
        for c in cidrs {
            if !kept.iter().any(|k| k.contains(&c)) {
                kept.push(c);
            }
        }
        kept.sort();
        kept
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// Which inbound ports are captured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InboundPorts {
    /// `*`: every port (minus the exclusions).
    All,
    /// Only these; empty means inbound capture is off.
    Only(Vec<PortRange>),
}

/// Everything [`plan`](super::plan()) needs, validated and normalised.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InitOptions {
    pub inbound_port: u16,
    pub outbound_port: u16,
    pub proxy_uid: u32,
    pub proxy_gid: u32,
    pub include_inbound_ports: InboundPorts,
    pub exclude_inbound_ports: Vec<PortRange>,
    pub exclude_outbound_ports: Vec<PortRange>,
    pub exclude_inbound_cidrs: Vec<Cidr>,
    pub exclude_outbound_cidrs: Vec<Cidr>,
    /// Whether IPv6 rules are generated (already resolved from `--ipv6`).
    pub ipv6: bool,
}

impl Default for InitOptions {
    /// The defaults of the flags, with IPv6 on.
    fn default() -> Self {
        InitOptions {
            inbound_port: 15006,
            outbound_port: 15001,
            proxy_uid: 1500,
            proxy_gid: 1500,
            include_inbound_ports: InboundPorts::All,
            exclude_inbound_ports: vec![PortRange::single(15008), PortRange::single(15020)],
            exclude_outbound_ports: vec![],
            exclude_inbound_cidrs: vec![],
            exclude_outbound_cidrs: vec![],
            ipv6: true,
        }
    }
}

impl InitArgs {
    /// Checks every flag. `--ipv6 auto` is taken as on here; the executor
    /// looks at the namespace and may turn it off.
    pub fn options(&self) -> Result<InitOptions, Error> {
        let bad = |flag: &'static str, value: &str, reason: String| Error::BadFlag {
            flag,
            value: value.to_string(),
            reason,
        };
        for (flag, port) in [
            ("--inbound-port", self.inbound_port),
            ("--outbound-port", self.outbound_port),
        ] {
            if port == 0 {
                return Err(bad(flag, "0", "must be a port from 1 to 65535".into()));
            }
        }
        // UID/GID 0 would exempt every root process in the pod from
        // interception, not only the sidecar: refuse it rather than leave a
        // hole that looks like a working mesh.
        for (flag, id) in [
            ("--proxy-uid", self.proxy_uid),
            ("--proxy-gid", self.proxy_gid),
        ] {
            if id == 0 {
                return Err(bad(
                    flag,
                    "0",
                    "must not be 0: root's connections would all bypass the sidecar; run the sidecar as its own user".into(),
                ));
            }
        }
        if self.inbound_port == self.outbound_port {
            return Err(bad(
                "--outbound-port",
                &self.outbound_port.to_string(),
                "must differ from --inbound-port".into(),
            ));
        }
        let ports = |flag: &'static str, values: &[String]| -> Result<Vec<PortRange>, Error> {
            let parsed = items(values)
                .map(|v| PortRange::parse(v).map_err(|e| bad(flag, v, e)))
                .collect::<Result<Vec<_>, _>>()?;
            Ok(PortRange::merge(parsed))
        };
        let cidrs = |flag: &'static str, values: &[String]| -> Result<Vec<Cidr>, Error> {
            let parsed = items(values)
                .map(|v| Cidr::parse(v).map_err(|e| bad(flag, v, e)))
                .collect::<Result<Vec<_>, _>>()?;
            Ok(Cidr::merge(parsed))
        };
        let include = if items(&self.include_inbound_ports).any(|v| v == "*") {
            if let Some(other) = items(&self.include_inbound_ports).find(|v| *v != "*") {
                return Err(bad(
                    "--include-inbound-ports",
                    other,
                    "'*' already captures every port; give '*' or a list, not both".into(),
                ));
            }
            InboundPorts::All
        } else {
            InboundPorts::Only(ports(
                "--include-inbound-ports",
                &self.include_inbound_ports,
            )?)
        };
        Ok(InitOptions {
            inbound_port: self.inbound_port,
            outbound_port: self.outbound_port,
            proxy_uid: self.proxy_uid,
            proxy_gid: self.proxy_gid,
            include_inbound_ports: include,
            exclude_inbound_ports: ports("--exclude-inbound-ports", &self.exclude_inbound_ports)?,
            exclude_outbound_ports: ports(
                "--exclude-outbound-ports",
                &self.exclude_outbound_ports,
            )?,
            exclude_inbound_cidrs: cidrs("--exclude-inbound-cidrs", &self.exclude_inbound_cidrs)?,
            exclude_outbound_cidrs: cidrs(
                "--exclude-outbound-cidrs",
                &self.exclude_outbound_cidrs,
            )?,
            ipv6: self.ipv6 != Ipv6Mode::Off,
        })
    }
}

/// The non-empty, trimmed values of a list flag (an empty environment
/// variable gives one empty value, which means "none").
fn items(values: &[String]) -> impl Iterator<Item = &str> {
    values.iter().map(|v| v.trim()).filter(|v| !v.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    /// A parse result in a table: the range's ends, or the error's start.
    type Want = Result<(u16, u16), &'static str>;

    #[test]
    fn port_ranges() {
        let cases: &[(&str, Want)] = &[
            ("80", Ok((80, 80))),
            ("8000-8100", Ok((8000, 8100))),
            (" 1 - 65535 ", Ok((1, 65535))),
            ("0", Err("not a port")),
            ("65536", Err("not a port")),
            ("http", Err("not a port")),
            ("90-80", Err("range starts after it ends")),
            ("80-", Err("not a port")),
        ];
        for (input, want) in cases {
            let got = PortRange::parse(input).map(|r| (r.first, r.last));
            match (got, want) {
                (Ok(g), Ok(w)) => assert_eq!(g, *w, "{input}"),
                (Err(g), Err(w)) => assert!(g.starts_with(w), "{input}: {g}"),
                (g, w) => panic!("{input}: got {g:?}, want {w:?}"),
            }
        }
    }

    #[test]
    fn port_ranges_merge() {
        let r = |s: &str| PortRange::parse(s).unwrap();
        let cases: &[(&[&str], &str)] = &[
            (&[], ""),
            (&["80", "80"], "80"),
            (&["90", "80"], "80,90"),
            (&["80", "81"], "80-81"),
            (&["8000-8100", "8050-8200", "9000"], "8000-8200,9000"),
            (&["1-65535", "80"], "1-65535"),
            (&["65535", "65534"], "65534-65535"),
        ];
        for (input, want) in cases {
            let merged = PortRange::merge(input.iter().map(|s| r(s)).collect());
            let got: Vec<String> = merged.iter().map(|r| r.to_string()).collect();
            assert_eq!(got.join(","), *want, "{input:?}");
        }
    }

    #[test]
    fn cidrs() {
        let cases: &[(&str, Result<&str, &str>)] = &[
            ("10.0.0.0/8", Ok("10.0.0.0/8")),
            (
                "10.1.2.3/8",
                Err("host bits are set (did you mean 10.0.0.0/8?)"),
            ),
            (
                "10.0.0.1/8",
                Err("host bits are set (did you mean 10.0.0.0/8?)"),
            ),
            ("192.0.2.7/32", Ok("192.0.2.7/32")),
            ("192.0.2.7", Ok("192.0.2.7/32")),
            ("0.0.0.0/0", Ok("0.0.0.0/0")),
            ("fd00::/8", Ok("fd00::/8")),
            (
                "fd00::1/8",
                Err("host bits are set (did you mean fd00::/8?)"),
            ),
            (
                "0.0.0.1/0",
                Err("host bits are set (did you mean 0.0.0.0/0?)"),
            ),
            ("::1", Ok("::1/128")),
            ("10.0.0.0/33", Err("prefix length 33 is more than 32")),
            ("fd00::/129", Err("prefix length 129 is more than 128")),
            ("10.0.0.0/x", Err("prefix length \"x\" is not a number")),
            ("10.0.0/8", Err("\"10.0.0\" is not an IPv4 or IPv6 address")),
        ];
        for (input, want) in cases {
            let got = Cidr::parse(input).map(|c| c.to_string());
            assert_eq!(
                got.as_deref(),
                want.map_err(|e| e.to_string()).as_deref(),
                "{input}"
            );
        }
    }

    #[test]
    fn cidrs_merge() {
        let cases: &[(&[&str], &str)] = &[
            (&["10.0.0.0/8", "10.1.0.0/16"], "10.0.0.0/8"),
            (&["10.1.0.0/16", "10.0.0.0/8"], "10.0.0.0/8"),
            (&["10.0.0.0/8", "11.0.0.0/8"], "10.0.0.0/8,11.0.0.0/8"),
            (
                &["fd00::/8", "10.0.0.0/8", "fd00::1"],
                "10.0.0.0/8,fd00::/8",
            ),
            (&["0.0.0.0/0", "::/0", "192.0.2.1"], "0.0.0.0/0,::/0"),
        ];
        for (input, want) in cases {
            let merged = Cidr::merge(input.iter().map(|s| Cidr::parse(s).unwrap()).collect());
            let got: Vec<String> = merged.iter().map(|c| c.to_string()).collect();
            assert_eq!(got.join(","), *want, "{input:?}");
        }
    }

    #[derive(Debug, Parser)]
    struct Wrap {
        #[command(flatten)]
        args: InitArgs,
    }

    fn options(argv: &[&str]) -> Result<InitOptions, String> {
        let mut full = vec!["init"];
        full.extend_from_slice(argv);
        Wrap::try_parse_from(full)
            .map_err(|e| e.to_string())?
            .args
            .options()
            .map_err(|e| e.to_string())
    }

    #[test]
    fn defaults_are_the_documented_ones() {
        assert_eq!(options(&[]).unwrap(), InitOptions::default());
    }

    #[test]
    fn flags_and_lists() {
        let o = options(&[
            "--exclude-outbound-ports",
            "5432,8000-8100",
            "--exclude-outbound-ports",
            "22",
            "--include-inbound-ports",
            "8080,9090",
            "--exclude-outbound-cidrs",
            "169.254.169.254,fd00::/8",
            "--ipv6",
            "off",
        ])
        .unwrap();
        let show = |v: &[PortRange]| v.iter().map(|r| r.to_string()).collect::<Vec<_>>();
        assert_eq!(show(&o.exclude_outbound_ports), ["22", "5432", "8000-8100"]);
        assert_eq!(
            o.include_inbound_ports,
            InboundPorts::Only(vec![PortRange::single(8080), PortRange::single(9090)])
        );
        assert_eq!(o.exclude_outbound_cidrs.len(), 2);
        assert!(!o.ipv6);
        let none = options(&["--include-inbound-ports", ""]).unwrap();
        assert_eq!(none.include_inbound_ports, InboundPorts::Only(vec![]));
    }

    #[test]
    fn bad_values_name_their_flag() {
        let cases: &[(&[&str], &str)] = &[
            (
                &["--exclude-outbound-cidrs", "10.0.0.0/33"],
                "--exclude-outbound-cidrs: \"10.0.0.0/33\": prefix length 33 is more than 32",
            ),
            (
                &["--exclude-inbound-cidrs", "nope"],
                "--exclude-inbound-cidrs: \"nope\": \"nope\" is not an IPv4 or IPv6 address",
            ),
            (
                &["--exclude-inbound-ports", "15020,0"],
                "--exclude-inbound-ports: \"0\": not a port (1-65535) or a range like 8000-8100",
            ),
            (
                &["--include-inbound-ports", "*,80"],
                "--include-inbound-ports: \"80\": '*' already captures every port; give '*' or a list, not both",
            ),
            (
                &["--outbound-port", "15006"],
                "--outbound-port: \"15006\": must differ from --inbound-port",
            ),
            (&["--inbound-port", "0"], "--inbound-port: \"0\": must be a port from 1 to 65535"),
            (
                &["--proxy-uid", "0"],
                "--proxy-uid: \"0\": must not be 0: root's connections would all bypass the sidecar; run the sidecar as its own user",
            ),
            (
                &["--proxy-gid", "0"],
                "--proxy-gid: \"0\": must not be 0: root's connections would all bypass the sidecar; run the sidecar as its own user",
            ),
        ];
        for (argv, want) in cases {
            assert_eq!(options(argv).unwrap_err(), *want, "{argv:?}");
        }
    }

    /// Every CIDR flag refuses host bits, naming itself and the network
    /// that was probably meant.
    #[test]
    fn every_cidr_flag_refuses_host_bits() {
        for flag in ["--exclude-inbound-cidrs", "--exclude-outbound-cidrs"] {
            let cases: &[(&str, &str)] = &[
                (
                    "10.0.0.1/8",
                    "10.0.0.1/8\": host bits are set (did you mean 10.0.0.0/8?)",
                ),
                (
                    "192.0.2.0/24,fd00::1/8",
                    "fd00::1/8\": host bits are set (did you mean fd00::/8?)",
                ),
            ];
            for (value, want) in cases {
                assert_eq!(
                    options(&[flag, value]).unwrap_err(),
                    format!("{flag}: \"{want}"),
                    "{flag} {value}"
                );
            }
        }
    }
}

use super::*;

#[test]
fn cidrs() {
    let c = Cidr::parse("10.0.0.0/8").unwrap();
    assert!(c.contains("10.255.0.1".parse().unwrap()));
    assert!(c.contains("::ffff:10.0.0.1".parse().unwrap()));
    assert!(!c.contains("11.0.0.1".parse().unwrap()));
    assert!(!c.contains("::1".parse().unwrap()));
    assert!(Cidr::parse("0.0.0.0/0")
        .unwrap()
        .contains("1.2.3.4".parse().unwrap()));
    assert!(Cidr::parse("::/0")
        .unwrap()
        .contains("fe80::1".parse().unwrap()));
    assert!(Cidr::parse("192.0.2.7")
        .unwrap()
        .contains("192.0.2.7".parse().unwrap()));
    for bad in ["10.0.0.0/33", "10.0.0.1/8", "x/8", "10.0.0.0/", "fd00::1/8"] {
        assert!(Cidr::parse(bad).is_err(), "{bad}");
    }
}

#[test]
fn paths() {
    let cases: &[(&str, &str, bool)] = &[
        ("/", "/", true),
        ("/", "/a", false),
        ("/**", "/", true),
        ("/**", "/anything/at/all", true),
        ("/api/**", "/api", true),
        ("/api/**", "/api/", true),
        ("/api/**", "/api/v1/x", true),
        ("/api/**", "/apiv1", false),
        ("/users/*/profile", "/users/7/profile", true),
        ("/users/*/profile", "/users/7/8/profile", false),
        ("/users/*", "/users/", false),
        ("/*/x/**", "/a/x/b/c", true),
        ("/*/x/**", "/a/y/b", false),
        ("/a/", "/a", false),
    ];
    for (pattern, path, want) in cases {
        let p = PathPattern::parse(pattern).unwrap();
        assert_eq!(p.matches(path), *want, "{pattern} vs {path}");
    }
    for bad in [
        "api", "//a", "/a/../b", "/a/**/b", "/a*", "/a?x", "/%61", "/%2f", "/a//**",
    ] {
        assert!(PathPattern::parse(bad).is_err(), "{bad}");
    }
}

#[test]
fn identities_and_hosts() {
    let id = SpiffeId::parse("spiffe://cluster.local/ns/ops/sa/x").unwrap();
    for (p, want) in [
        ("spiffe://cluster.local/ns/ops/*", true),
        ("spiffe://cluster.local/*", true),
        ("spiffe://cluster*", true),
        ("spiffe://*", true),
        ("spiffe://cluster.local/ns/op/*", false),
        ("spiffe://cluster.local/ns/ops/sa/x", true),
        ("spiffe://cluster.local/ns/ops/sa/y", false),
    ] {
        assert_eq!(IdentityPattern::parse(p).unwrap().matches(&id), want, "{p}");
    }
    assert!(IdentityPattern::parse("*").is_err());
    let h = HostPattern::parse("*.Example.com").unwrap();
    assert!(h.matches("a.example.COM:80") && h.matches("a.b.example.com."));
    assert!(!h.matches("example.com"));
    assert!(HostPattern::parse("[::1]").unwrap().matches("[::1]:8080"));
    assert!(HostPattern::parse("a.com:80").is_err());
}

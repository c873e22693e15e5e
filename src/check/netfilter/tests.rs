//! Table tests: rules rendered by `init`'s own renderers, read back and
//! compared with the sidecar's ports.

use super::*;
use crate::check::Status;
use crate::intercept::{iptables, nft, plan, Family, InitArgs};
use clap::Parser;

#[derive(Parser)]
struct Wrap {
    #[command(flatten)]
    init: InitArgs,
}

/// The plan `portcullis init ARGS` would install.
fn planned(args: &[&str]) -> crate::intercept::RulePlan {
    let mut argv = vec!["init"];
    argv.extend_from_slice(args);
    let w = Wrap::try_parse_from(argv).unwrap();
    plan(&w.init.options().unwrap())
}

fn via_nft(args: &[&str]) -> Installed {
    parse_nft(&nft::apply_script(&planned(args)))
}

fn via_iptables(args: &[&str]) -> Installed {
    let text = iptables::apply_input(&planned(args), Family::V4, &Saved::default());
    from_saved("iptables-save", &Saved::parse(&text))
}

const EXP: Expected = Expected {
    inbound_port: 15006,
    outbound_port: 15001,
    admin_port: 15020,
    tunnel_port: 15008,
    proxy_uid: 1500,
};

fn sidecar() -> Vec<Listener> {
    [15006, 15001, 15020]
        .map(|port| Listener { port, uid: 1500 })
        .to_vec()
}

#[test]
fn init_defaults_read_back_from_both_renderers() {
    for rules in [via_nft(&[]), via_iptables(&[])] {
        assert_eq!(rules.inbound_redirects.first(), Some(&15006), "{rules:?}");
        assert_eq!(rules.outbound_redirects.first(), Some(&15001), "{rules:?}");
        assert!(rules.uid_exempt.contains(&1500), "{rules:?}");
        for port in [15008, 15020] {
            assert!(
                rules.inbound_excluded.contains(&(port, port)),
                "{port}: {rules:?}"
            );
        }
        assert!(rules.hooked_inbound && rules.hooked_outbound, "{rules:?}");
        let f = compare(Some(&rules), &sidecar(), &EXP);
        assert_eq!(f.status, Status::Ok, "{f:?}");
    }
}

#[test]
fn mismatches_fail_with_a_fix() {
    let cases: [(&[&str], &str); 8] = [
        (&["--inbound-port", "16006"], "redirected to :16006"),
        (&["--outbound-port", "16001"], "redirected to :16001"),
        (&["--proxy-uid", "1501"], "UID 1500 is not exempt"),
        (&["--exclude-inbound-ports", "9000"], "admin port :15020"),
        (&["--exclude-inbound-ports", "9000"], "tunnel port :15008"),
        (
            &["--exclude-inbound-ports", "15020,9000"],
            "tunnel port :15008",
        ),
        (
            &["--exclude-inbound-ports", "15008,9000"],
            "admin port :15020",
        ),
        (&["--exclude-inbound-ports", "15000-15030,9000"], ""),
    ];
    for (args, want) in cases {
        for rules in [via_nft(args), via_iptables(args)] {
            let f = compare(Some(&rules), &sidecar(), &EXP);
            if want.is_empty() {
                assert_eq!(f.status, Status::Ok, "{args:?}: {f:?}");
                continue;
            }
            assert_eq!(f.status, Status::Fail, "{args:?}: {f:?}");
            assert!(f.detail.contains(want), "{args:?}: {}", f.detail);
            assert!(f.fix.is_some());
        }
    }
}

/// Rules from an `init` that predates the tunnel (only the admin port
/// excluded) fail, and the fix keeps both ports: a list given to
/// --exclude-inbound-ports replaces the default.
#[test]
fn redirected_tunnel_port_fails_with_a_fix_naming_both_ports() {
    for rules in [
        via_nft(&["--exclude-inbound-ports", "15020"]),
        via_iptables(&["--exclude-inbound-ports", "15020"]),
    ] {
        let f = compare(Some(&rules), &sidecar(), &EXP);
        assert_eq!(f.status, Status::Fail, "{f:?}");
        assert!(
            f.detail
                .contains("the tunnel port :15008 is redirected too"),
            "{f:?}"
        );
        assert!(!f.detail.contains("admin port"), "{f:?}");
        assert!(
            f.fix
                .as_deref()
                .is_some_and(|fix| fix.contains("--exclude-inbound-ports 15008,15020")),
            "{f:?}"
        );
    }
    // Both missing: two problems, one fix.
    let f = compare(
        Some(&via_nft(&["--exclude-inbound-ports", "9000"])),
        &sidecar(),
        &EXP,
    );
    assert_eq!(
        f.fix.as_deref().unwrap().matches("re-run").count(),
        1,
        "{f:?}"
    );
    // Not capturing inbound at all: nothing is redirected, nothing to say.
    let rules = via_nft(&["--include-inbound-ports", "", "--exclude-inbound-ports", ""]);
    let f = compare(Some(&rules), &sidecar(), &EXP);
    assert_eq!(f.status, Status::Ok, "{f:?}");
}

#[test]
fn missing_rules_and_listeners() {
    let none = compare(None, &sidecar(), &EXP);
    assert_eq!(none.status, Status::Fail);
    assert!(none.detail.contains("no portcullis interception rules"));
    let rules = via_nft(&[]);
    let f = compare(Some(&rules), &[], &EXP);
    assert!(f.detail.contains("nothing listens on :15001"), "{f:?}");
    let root_sidecar = [15006, 15001].map(|port| Listener { port, uid: 0 });
    let f = compare(Some(&rules), &root_sidecar, &EXP);
    assert!(f.detail.contains("runs as UID 0"), "{f:?}");
    // No inbound capture (--include-inbound-ports ""): only outbound matters.
    let rules = via_nft(&["--include-inbound-ports", ""]);
    let f = compare(
        Some(&rules),
        &[Listener {
            port: 15001,
            uid: 1500,
        }],
        &EXP,
    );
    assert_eq!(f.status, Status::Ok, "{f:?}");
    assert!(f.detail.contains("inbound not captured"));
}

#[test]
fn proc_net_tcp_listeners() {
    let text = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:3A99 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1500        0 1 1 0 100 0 0 10 0
   1: 0100007F:3A99 0100007F:9C40 01 00000000:00000000 00:00000000 00000000  1500        0 2 1 0 100 0 0 10 0
";
    assert_eq!(
        parse_proc_net_tcp(text),
        vec![Listener {
            port: 15001,
            uid: 1500
        }]
    );
}

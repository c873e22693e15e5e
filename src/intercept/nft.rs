//! Renders a [`RulePlan`] as an nftables script for `nft -f -`.
//!
//! Everything lives in one table, `inet portcullis`, which serves IPv4 and
//! IPv6 at once. The script starts with `table …` then `delete table …`:
//! the first line creates the table if it is missing, so the delete never
//! fails, and the whole file is one kernel transaction. Running it twice
//! therefore leaves exactly one copy, and a refused rule leaves nothing.

use std::fmt::Write;

use super::plan::{Match, Rule, RulePlan, Verdict};
use super::Family;

/// The table's name (family `inet`).
pub const TABLE: &str = "portcullis";

/// The script that installs `plan`, replacing any earlier portcullis table.
pub fn apply_script(plan: &RulePlan) -> String {
    let mut s = String::new();
    s.push_str("# portcullis interception rules, applied by `nft -f -` in one transaction.\n");
    s.push_str("# The next two lines replace an earlier copy: create-if-missing, then delete.\n");
    let _ = writeln!(s, "table inet {TABLE}");
    let _ = writeln!(s, "delete table inet {TABLE}");
    let _ = writeln!(s, "table inet {TABLE} {{");
    let only_v4 = if plan.ipv6 { "" } else { "meta nfproto ipv4 " };
    let v6_note = if plan.ipv6 {
        ""
    } else {
        " (IPv6 is not intercepted: --ipv6 off)"
    };
    for (name, hook, target, what) in [
        ("prerouting", "prerouting", "inbound", "inbound"),
        ("output", "output", "outbound", "outbound"),
    ] {
        let _ = writeln!(s, "\tchain {name} {{");
        let _ = writeln!(s, "\t\ttype nat hook {hook} priority -100; policy accept;");
        let _ = writeln!(
            s,
            "\t\t{only_v4}meta l4proto tcp jump {target} comment \"portcullis: {what} TCP interception{v6_note}\""
        );
        s.push_str("\t}\n");
    }
    for (name, rules) in [("inbound", &plan.inbound), ("outbound", &plan.outbound)] {
        let _ = writeln!(s, "\tchain {name} {{");
        for rule in rules {
            let _ = writeln!(s, "\t\t{}", render_rule(rule));
        }
        s.push_str("\t}\n");
    }
    s.push_str("}\n");
    s
}

/// The script that removes the portcullis table, and only it. Safe to run
/// when the table does not exist.
pub fn cleanup_script() -> String {
    format!("# remove the portcullis interception rules\ntable inet {TABLE}\ndelete table inet {TABLE}\n")
}

/// One rule in nft syntax.
fn render_rule(rule: &Rule) -> String {
    let mut parts: Vec<String> = Vec::new();
    let has_addr = rule
        .matches
        .iter()
        .any(|m| matches!(m, Match::Daddr(_) | Match::Saddr(_)));
    if let (Some(family), false) = (rule.family, has_addr) {
        parts.push(format!("meta nfproto {}", nfproto(family)));
    }
    let mut has_tcp = false;
    for m in &rule.matches {
        parts.push(match m {
            Match::SkUid(uid) => format!("meta skuid {uid}"),
            Match::SkGid(gid) => format!("meta skgid {gid}"),
            Match::OutLoopback => "oifname \"lo\"".to_string(),
            Match::NotLocalDaddr => "fib daddr type != local".to_string(),
            Match::Daddr(cidrs) => format!("{} daddr {}", addr_kw(cidrs), set(cidrs)),
            Match::Saddr(cidrs) => format!("{} saddr {}", addr_kw(cidrs), set(cidrs)),
            Match::Dport(ports) => {
                has_tcp = true;
                format!("tcp dport {}", set(ports))
            }
        });
    }
    parts.push(match rule.verdict {
        Verdict::Return => "return".to_string(),
        // A redirect to a port needs a transport protocol in the same rule.
        Verdict::Redirect(port) if has_tcp => format!("redirect to :{port}"),
        Verdict::Redirect(port) => format!("meta l4proto tcp redirect to :{port}"),
    });
    parts.push(format!("comment \"{}\"", rule.comment));
    parts.join(" ")
}

fn nfproto(family: Family) -> &'static str {
    match family {
        Family::V4 => "ipv4",
        Family::V6 => "ipv6",
    }
}

/// `ip` or `ip6`, from the (single) family of the networks.
fn addr_kw(cidrs: &[super::Cidr]) -> &'static str {
    match cidrs.first().map(|c| c.family()) {
        Some(Family::V6) => "ip6",
        _ => "ip",
    }
}

/// `x` for one element, `{ x, y }` for more (an anonymous set).
fn set<T: ToString>(items: &[T]) -> String {
    let items: Vec<String> = items.iter().map(|i| i.to_string()).collect();
    if items.len() == 1 {
        items[0].clone()
    } else {
        format!("{{ {} }}", items.join(", "))
    }
}

#[cfg(test)]
mod tests;

//! Renders a [`RulePlan`] as `iptables-restore --noflush` input (the same
//! text serves iptables-nft and iptables-legacy), and reads back what
//! `iptables-save -t nat` shows of ours.
//!
//! Our rules live in the nat table in two chains, `PORTCULLIS_INBOUND` and
//! `PORTCULLIS_OUTBOUND`, reached by one jump each from PREROUTING and
//! OUTPUT. One input per family is one transaction (`COMMIT`). Declaring a
//! chain (`:NAME - [0:0]`) with `--noflush` creates it or empties it, and the
//! jumps found by [`Saved::parse`] are deleted before they are re-added, so
//! applying twice leaves one set.

use std::fmt::Write;

use super::options::PortRange;
use super::plan::{Match, Rule, RulePlan, Verdict};
use super::Family;

/// Every chain we create starts with this.
pub const CHAIN_PREFIX: &str = "PORTCULLIS_";
pub const INBOUND_CHAIN: &str = "PORTCULLIS_INBOUND";
pub const OUTBOUND_CHAIN: &str = "PORTCULLIS_OUTBOUND";

/// `multiport` takes at most 15 ports per rule, a range counting as two.
const MULTIPORT_SLOTS: usize = 15;

/// What of ours is in one family's nat table, from `iptables-save -t nat`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Saved {
    /// The table is there at all (iptables-legacy creates it lazily).
    pub has_nat: bool,
    /// Our chains (names starting with `PORTCULLIS_`).
    pub chains: Vec<String>,
    /// Rules in other chains that jump to ours, exactly as saved
    /// (`-A PREROUTING … -j PORTCULLIS_INBOUND`).
    pub jumps: Vec<String>,
    /// The rules in our chains, exactly as saved.
    pub rules: Vec<String>,
    /// How many rules that are not ours the whole save shows.
    pub foreign_rules: usize,
}

impl Saved {
    /// Reads `iptables-save` output (any tables; only nat holds ours).
    pub fn parse(save: &str) -> Saved {
        let mut saved = Saved::default();
        let mut table = "";
        for line in save.lines() {
            if let Some(t) = line.strip_prefix('*') {
                table = t.trim();
                saved.has_nat |= table == "nat";
            } else if let Some(chain) = line.strip_prefix(':') {
                let name = chain.split_whitespace().next().unwrap_or("");
                if table == "nat" && name.starts_with(CHAIN_PREFIX) {
                    saved.chains.push(name.to_string());
                }
            } else if let Some(rule) = line.strip_prefix("-A ") {
                let chain = rule.split_whitespace().next().unwrap_or("");
                let ours = table == "nat" && chain.starts_with(CHAIN_PREFIX);
                let jump = table == "nat"
                    && !ours
                    && rule
                        .split_whitespace()
                        .collect::<Vec<_>>()
                        .windows(2)
                        .any(|w| (w[0] == "-j" || w[0] == "-g") && w[1].starts_with(CHAIN_PREFIX));
                if jump {
                    saved.jumps.push(line.to_string());
                } else if ours {
                    saved.rules.push(line.to_string());
                } else {
                    saved.foreign_rules += 1;
                }
            }
        }
        saved
    }

    /// Whether anything of ours is present.
    pub fn has_ours(&self) -> bool {
        !self.chains.is_empty() || !self.jumps.is_empty()
    }
}

/// Input for `iptables-restore --noflush` (or `ip6tables-restore` for
/// IPv6) that installs `plan`'s rules for `family`, replacing what `saved`
/// shows of an earlier run.
pub fn apply_input(plan: &RulePlan, family: Family, saved: &Saved) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "# portcullis interception rules ({}), one transaction for `{} --noflush`.",
        family.name(),
        restore_name(family)
    );
    s.push_str("*nat\n");
    // Declaring a chain creates it, or empties it when it exists.
    let mine = [INBOUND_CHAIN, OUTBOUND_CHAIN];
    for chain in mine {
        let _ = writeln!(s, ":{chain} - [0:0]");
    }
    let stale: Vec<&String> = saved
        .chains
        .iter()
        .filter(|c| !mine.contains(&c.as_str()))
        .collect();
    for chain in &stale {
        let _ = writeln!(s, ":{chain} - [0:0]");
    }
    for jump in &saved.jumps {
        let _ = writeln!(s, "-D{}", &jump[2..]);
    }
    for chain in &stale {
        let _ = writeln!(s, "-X {chain}");
    }
    for (chain, rules) in [
        (INBOUND_CHAIN, &plan.inbound),
        (OUTBOUND_CHAIN, &plan.outbound),
    ] {
        for rule in rules
            .iter()
            .filter(|r| r.family.is_none_or(|f| f == family))
        {
            for line in render_rule(chain, rule) {
                s.push_str(&line);
                s.push('\n');
            }
        }
    }
    for (hook, chain, what) in [
        ("PREROUTING", INBOUND_CHAIN, "inbound"),
        ("OUTPUT", OUTBOUND_CHAIN, "outbound"),
    ] {
        let _ = writeln!(
            s,
            "-A {hook} -p tcp -m comment --comment \"portcullis: {what} TCP interception\" -j {chain}"
        );
    }
    s.push_str("COMMIT\n");
    s
}

/// Input for `iptables-restore --noflush` that removes exactly what `saved`
/// shows of ours (jumps first, then our emptied chains); `None` when there
/// is nothing of ours.
pub fn cleanup_input(family: Family, saved: &Saved) -> Option<String> {
    let header = format!(
        "# remove the portcullis interception rules ({}), for `{} --noflush`.\n",
        family.name(),
        restore_name(family)
    );
    restore_input(header, &Saved::default(), saved)
}

/// Input for `iptables-restore --noflush` that puts our part of the nat
/// table back to `want` (a save taken before a failed change), touching
/// nothing that is not ours; `None` when neither shows anything of ours.
pub fn rollback_input(family: Family, want: &Saved, now: &Saved) -> Option<String> {
    let header = format!(
        "# put back the portcullis rules ({}) as they were, for `{} --noflush`.\n",
        family.name(),
        restore_name(family)
    );
    restore_input(header, want, now)
}

/// Empties and drops our chains in `now`, then re-adds `want`'s verbatim.
fn restore_input(header: String, want: &Saved, now: &Saved) -> Option<String> {
    if !want.has_ours() && !now.has_ours() {
        return None;
    }
    let mut s = header;
    s.push_str("*nat\n");
    let mut chains: Vec<&String> = now.chains.iter().collect();
    chains.extend(want.chains.iter().filter(|c| !now.chains.contains(c)));
    for chain in &chains {
        let _ = writeln!(s, ":{chain} - [0:0]");
    }
    for jump in &now.jumps {
        let _ = writeln!(s, "-D{}", &jump[2..]);
    }
    for chain in now.chains.iter().filter(|c| !want.chains.contains(c)) {
        let _ = writeln!(s, "-X {chain}");
    }
    for line in want.rules.iter().chain(&want.jumps) {
        s.push_str(line);
        s.push('\n');
    }
    s.push_str("COMMIT\n");
    Some(s)
}

fn restore_name(family: Family) -> &'static str {
    match family {
        Family::V4 => "iptables-restore",
        Family::V6 => "ip6tables-restore",
    }
}

/// One plan rule as `-A` lines: several when it matches more networks, or
/// more ports than one `multiport` match can hold.
fn render_rule(chain: &str, rule: &Rule) -> Vec<String> {
    // Each alternative is a list of match arguments; the lines are their
    // cartesian product.
    let mut lines: Vec<String> = vec![format!("-A {chain}")];
    let mut product = |alternatives: Vec<String>| {
        lines = lines
            .iter()
            .flat_map(|l| alternatives.iter().map(move |a| format!("{l} {a}")))
            .collect();
    };
    // iptables-save order: addresses, interface, protocol, then modules.
    for m in &rule.matches {
        match m {
            Match::Saddr(cidrs) => product(cidrs.iter().map(|c| format!("-s {c}")).collect()),
            Match::Daddr(cidrs) => product(cidrs.iter().map(|c| format!("-d {c}")).collect()),
            _ => {}
        }
    }
    if rule.matches.contains(&Match::OutLoopback) {
        product(vec!["-o lo".into()]);
    }
    product(vec!["-p tcp".into()]);
    for m in &rule.matches {
        match m {
            Match::SkUid(uid) => product(vec![format!("-m owner --uid-owner {uid}")]),
            Match::SkGid(gid) => product(vec![format!("-m owner --gid-owner {gid}")]),
            Match::Dport(ports) => product(multiport(ports)),
            Match::NotLocalDaddr => product(vec!["-m addrtype ! --dst-type LOCAL".into()]),
            _ => {}
        }
    }
    product(vec![format!("-m comment --comment \"{}\"", rule.comment)]);
    product(vec![match rule.verdict {
        Verdict::Return => "-j RETURN".to_string(),
        Verdict::Redirect(port) => format!("-j REDIRECT --to-ports {port}"),
    }]);
    lines
}

/// `-m multiport --dports …` matches, split to fit the module's limit.
fn multiport(ports: &[PortRange]) -> Vec<String> {
    let mut chunks: Vec<Vec<String>> = vec![vec![]];
    let mut used = 0;
    for p in ports {
        let (text, cost) = if p.first == p.last {
            (p.first.to_string(), 1)
        } else {
            (format!("{}:{}", p.first, p.last), 2)
        };
        if used + cost > MULTIPORT_SLOTS {
            chunks.push(vec![]);
            used = 0;
        }
        used += cost;
        chunks.last_mut().expect("never empty").push(text);
    }
    chunks
        .into_iter()
        .map(|c| format!("-m multiport --dports {}", c.join(",")))
        .collect()
}

#[cfg(test)]
mod tests;

//! Which rules can apply on a port, found without walking every rule.
//!
//! A rule set of any size mostly names a few ports per rule, so a decision
//! only needs the rules listing its port plus those with no `ports` at all.
//! The port space is cut at every range boundary into segments that each
//! rule covers entirely or not at all; each segment keeps the rules that
//! list it. A decision finds its segment by binary search and walks that
//! list merged with the port-less rules, in file order, so the first match
//! is the same rule a walk over every rule would find.

use super::matchers::PortRange;

/// The most rule references all segments may hold together. Past it (many
/// wide ranges crossing many narrow ones) the index is not built and every
/// rule of the action is walked, as without an index.
const MAX_ENTRIES: usize = 1 << 20;

/// The rules of one action, indexed by the ports they list.
#[derive(Debug, Clone, Default)]
pub(crate) struct PortIndex {
    /// The first port of each segment, ascending; a segment runs to the
    /// port before the next start (the last one to 65535).
    starts: Vec<u32>,
    /// Segment `i`'s rules are `listed[offsets[i]..offsets[i + 1]]`.
    offsets: Vec<u32>,
    listed: Vec<u32>,
    /// Rules with no `ports` condition: they apply on every port.
    any_port: Vec<u32>,
    /// Every rule, when the index would have been too large.
    all: Option<Vec<u32>>,
}

impl PortIndex {
    /// Indexes the rules `ids` (ascending positions in the rule list),
    /// whose port conditions `ports_of` gives (`None`: every port).
    pub(crate) fn new<'a>(
        ids: &[usize],
        ports_of: impl Fn(usize) -> Option<&'a [PortRange]>,
    ) -> Self {
        let mut index = PortIndex::default();
        let mut bounds: Vec<u32> = Vec::new();
        for &i in ids {
            match ports_of(i) {
                None => index.any_port.push(i as u32),
                Some(ranges) => {
                    for r in ranges {
                        bounds.push(u32::from(r.lo));
                        bounds.push(u32::from(r.hi) + 1);
                    }
                }
            }
        }
        bounds.push(0);
        bounds.sort_unstable();
        bounds.dedup();
        bounds.retain(|&b| b <= u32::from(u16::MAX));
        // Each range covers a run of whole segments; rules are visited in
        // ascending position, so every segment's list comes out ascending.
        let mut segments: Vec<Vec<u32>> = vec![Vec::new(); bounds.len()];
        let mut entries = 0usize;
        for &i in ids {
            for r in ports_of(i).unwrap_or_default() {
                let first = bounds.partition_point(|&b| b < u32::from(r.lo));
                let end = bounds.partition_point(|&b| b <= u32::from(r.hi));
                for seg in &mut segments[first..end] {
                    if seg.last() != Some(&(i as u32)) {
                        seg.push(i as u32);
                        entries += 1;
                    }
                }
            }
            if entries > MAX_ENTRIES {
                return PortIndex {
                    all: Some(ids.iter().map(|&i| i as u32).collect()),
                    ..PortIndex::default()
                };
            }
        }
        index.offsets.push(0);
        for seg in segments {
            index.listed.extend(seg);
            index.offsets.push(index.listed.len() as u32);
        }
        index.starts = bounds;
        index
    }

    /// The rules that can apply on `port`, in ascending position.
    pub(crate) fn on_port(&self, port: u16) -> impl Iterator<Item = usize> + '_ {
        let (listed, any): (&[u32], &[u32]) = match &self.all {
            Some(all) => (all, &[]),
            None => {
                // The segment holding `port`: the last start at or below it.
                let seg = self.starts.partition_point(|&s| s <= u32::from(port)) - 1;
                let (from, to) = (self.offsets[seg], self.offsets[seg + 1]);
                (&self.listed[from as usize..to as usize], &self.any_port)
            }
        };
        Merged { a: listed, b: any }
    }
}

/// Two ascending lists walked as one ascending list.
struct Merged<'a> {
    a: &'a [u32],
    b: &'a [u32],
}

impl Iterator for Merged<'_> {
    type Item = usize;

    fn next(&mut self) -> Option<usize> {
        let take_a = match (self.a.first(), self.b.first()) {
            (Some(x), Some(y)) => x < y,
            (Some(_), None) => true,
            (None, Some(_)) => false,
            (None, None) => return None,
        };
        let list = if take_a { &mut self.a } else { &mut self.b };
        let (first, rest) = list.split_first()?;
        *list = rest;
        Some(*first as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(lo: u16, hi: u16) -> PortRange {
        PortRange { lo, hi }
    }

    /// What the index must agree with: every rule, filtered by its ports.
    fn walk(rules: &[Option<Vec<PortRange>>], ids: &[usize], port: u16) -> Vec<usize> {
        ids.iter()
            .copied()
            .filter(|&i| {
                rules[i]
                    .as_ref()
                    .is_none_or(|rs| rs.iter().any(|r| r.lo <= port && port <= r.hi))
            })
            .collect()
    }

    fn check(rules: &[Option<Vec<PortRange>>], ids: &[usize], ports: impl Iterator<Item = u16>) {
        let index = PortIndex::new(ids, |i| rules[i].as_deref());
        for port in ports {
            let got: Vec<usize> = index.on_port(port).collect();
            assert_eq!(got, walk(rules, ids, port), "port {port}, rules {rules:?}");
        }
    }

    #[test]
    fn edges_of_ranges_and_the_whole_port_space() {
        let rules = vec![
            Some(vec![range(80, 80)]),
            None,
            Some(vec![range(8000, 8999), range(80, 80)]),
            Some(vec![range(1, 65535)]),
            Some(vec![range(65535, 65535)]),
            None,
            Some(vec![range(8080, 8080)]),
        ];
        let ids: Vec<usize> = (0..rules.len()).collect();
        let edges = [
            1, 2, 79, 80, 81, 7999, 8000, 8079, 8080, 8081, 8999, 9000, 65534, 65535,
        ];
        check(&rules, &ids, edges.into_iter());
        // A subset of the rules (one action's), positions kept.
        check(&rules, &[1, 2, 4, 6], edges.into_iter());
        check(&rules, &[], edges.into_iter());
    }

    /// Random rule sets, every port of a window around their ranges.
    #[test]
    fn agrees_with_a_walk_over_every_rule() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        for _ in 0..200 {
            let rules: Vec<Option<Vec<PortRange>>> = (0..next(12))
                .map(|_| {
                    (next(4) != 0).then(|| {
                        (0..1 + next(3))
                            .map(|_| {
                                let lo = 1 + next(60) as u16;
                                range(lo, lo + next(5) as u16)
                            })
                            .collect()
                    })
                })
                .collect();
            let ids: Vec<usize> = (0..rules.len()).filter(|_| next(3) != 0).collect();
            check(&rules, &ids, 1..=70);
        }
    }

    #[test]
    fn too_many_references_fall_back_to_every_rule() {
        // 1,100 wide ranges crossing 1,000 single ports: over the budget.
        let mut rules: Vec<Option<Vec<PortRange>>> =
            (1..=1000).map(|p| Some(vec![range(p, p)])).collect();
        rules.extend((0..1100).map(|_| Some(vec![range(1, 65535)])));
        let ids: Vec<usize> = (0..rules.len()).collect();
        let index = PortIndex::new(&ids, |i| rules[i].as_deref());
        assert!(index.all.is_some());
        assert_eq!(index.on_port(5).count(), ids.len());
    }
}

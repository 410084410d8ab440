//! Source and route choice for the copies strait makes (async replication, the spare
//! copy, repair): which node sends which targets their bytes.
//!
//! Rules, in order: a target is fed from the holder joined to it at the lowest tier
//! (same rack switch, then same IDC); the DCI is crossed only for an IDC with no holder,
//! and then once, by one pipeline that fans out inside that IDC; among equally near
//! holders the least loaded sends (ties by node id, so plans are deterministic), and a
//! plan counts the legs it already gave a source.

use std::collections::BTreeMap;

use crate::topology::{IdcId, NodeId, Tier, Topology};

/// How busy each node already is with copies (outgoing legs). Plain data: the shell fills
/// it from what it is running; a missing node counts as idle.
#[derive(Debug, Clone, Default)]
pub struct SourceLoad {
    legs: BTreeMap<NodeId, u32>,
}

impl SourceLoad {
    /// Legs `node` is sending now.
    pub fn get(&self, node: NodeId) -> u32 {
        self.legs.get(&node).copied().unwrap_or(0)
    }

    /// Counts one more leg from `node`.
    pub fn add(&mut self, node: NodeId) {
        *self.legs.entry(node).or_insert(0) += 1;
    }

    /// Counts one leg from `node` as finished.
    pub fn remove(&mut self, node: NodeId) {
        if let Some(n) = self.legs.get_mut(&node) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.legs.remove(&node);
            }
        }
    }
}

/// One copy: `source` sends the block through one pipeline to `targets`, in that order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Leg {
    /// The node that reads its replica and sends it.
    pub source: NodeId,
    /// Pipeline order: the first target is the only one the source talks to.
    pub targets: Vec<NodeId>,
    /// The highest tier the leg's first hop crosses.
    pub tier: Tier,
}

/// Which legs restore the missing replicas, and what they cost on the top tier.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CopyPlan {
    /// Independent legs; each may run at the same time as the others.
    pub legs: Vec<Leg>,
}

impl CopyPlan {
    /// How many times the plan crosses the DCI (one per leg that starts across it).
    pub fn dci_crossings(&self) -> usize {
        self.legs.iter().filter(|l| l.tier == Tier::Dci).count()
    }
}

/// The holder that should feed `target`: the nearest by tier, then the least loaded, then
/// the lowest id. `None` when there is no holder.
pub fn choose_source(
    topology: &Topology,
    holders: &[NodeId],
    target: NodeId,
    load: &SourceLoad,
) -> Option<NodeId> {
    holders
        .iter()
        .copied()
        .filter(|&h| h != target)
        .min_by_key(|&h| (topology.tier(h, target), load.get(h), h))
}

/// Plans the copies that give every node of `missing` the block, from the nodes of
/// `holders` (which hold it finalized). Targets in an IDC that has a holder are fed inside
/// that IDC; the targets of an IDC without one are fed by a single leg across the DCI that
/// fans out there. Inside an IDC, targets are fed by the holder nearest to each (rack
/// first); targets that share a source share its leg. `load` is updated with the legs.
///
/// Duplicate or held entries in `missing` are ignored; `None` when some target has no
/// possible source (no holders at all).
pub fn plan_copy(
    topology: &Topology,
    holders: &[NodeId],
    missing: &[NodeId],
    load: &mut SourceLoad,
) -> Option<CopyPlan> {
    let mut by_idc: BTreeMap<IdcId, Vec<NodeId>> = BTreeMap::new();
    for &t in missing {
        if holders.contains(&t) {
            continue;
        }
        let group = by_idc.entry(topology.location(t).idc).or_default();
        if !group.contains(&t) {
            group.push(t);
        }
    }
    let mut plan = CopyPlan::default();
    for (idc, mut targets) in by_idc {
        let local: Vec<NodeId> = holders
            .iter()
            .copied()
            .filter(|&h| topology.location(h).idc == idc)
            .collect();
        if local.is_empty() {
            // One crossing: the least loaded holder nearest to any target sends to the
            // target nearest to it; the pipeline fans out from there, rack by rack.
            let (source, first) = targets
                .iter()
                .filter_map(|&t| choose_source(topology, holders, t, load).map(|s| (s, t)))
                .min_by_key(|&(s, t)| (topology.tier(s, t), load.get(s), s, t))?;
            targets.sort_by_key(|&t| (t != first, topology.location(t).rack, t));
            load.add(source);
            plan.legs.push(Leg {
                source,
                tier: topology.tier(source, first),
                targets,
            });
            continue;
        }
        // Inside the IDC: each target from its nearest holder; one leg per source.
        let mut legs: BTreeMap<NodeId, Vec<NodeId>> = BTreeMap::new();
        targets.sort_by_key(|&t| (topology.location(t).rack, t));
        for t in targets {
            let s = choose_source(topology, &local, t, load)?;
            if !legs.contains_key(&s) {
                load.add(s);
            }
            legs.entry(s).or_default().push(t);
        }
        for (source, mut targets) in legs {
            targets.sort_by_key(|&t| (topology.tier(source, t), t));
            plan.legs.push(Leg {
                source,
                tier: topology.tier(source, targets[0]),
                targets,
            });
        }
    }
    Some(plan)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::net::SocketAddr;
    use std::time::Duration;

    /// 2 IDCs × 2 racks × 2 nodes: a1..a4 in idc-a (a1,a2 rack r1), b1..b4 in idc-b.
    fn topo() -> Topology {
        let mut b = Topology::builder().idc("idc-a").idc("idc-b");
        let mut h = 0u8;
        for idc in ["a", "b"] {
            for (i, rack) in ["r1", "r1", "r2", "r2"].iter().enumerate() {
                h += 1;
                b = b.node(
                    format!("{idc}{}", i + 1),
                    format!("idc-{idc}"),
                    *rack,
                    SocketAddr::from(([127, 0, 0, h], 7000)),
                    1 << 40,
                );
            }
        }
        b.link("idc-a", "idc-b", 125_000_000, Duration::from_millis(5))
            .build()
            .unwrap()
    }

    fn ids(t: &Topology, names: &[&str]) -> Vec<NodeId> {
        names.iter().map(|n| t.node_by_name(n).unwrap()).collect()
    }

    #[test]
    fn a_same_idc_holder_feeds_the_target_and_the_dci_stays_idle() {
        let t = topo();
        let plan = plan_copy(
            &t,
            &ids(&t, &["a1", "a3", "b1"]),
            &ids(&t, &["b3"]),
            &mut SourceLoad::default(),
        )
        .unwrap();
        assert_eq!(plan.dci_crossings(), 0);
        assert_eq!(plan.legs[0].source, t.node_by_name("b1").unwrap());
    }

    #[test]
    fn an_idc_without_a_holder_is_crossed_once_and_fanned_out() {
        let t = topo();
        let plan = plan_copy(
            &t,
            &ids(&t, &["a1", "a3"]),
            &ids(&t, &["b4", "b1"]),
            &mut SourceLoad::default(),
        )
        .unwrap();
        assert_eq!(plan.legs.len(), 1);
        assert_eq!(plan.dci_crossings(), 1);
        assert_eq!(plan.legs[0].targets.len(), 2);
    }

    #[test]
    fn a_rack_neighbour_is_preferred_and_load_spreads_among_equals() {
        let t = topo();
        let holders = ids(&t, &["a1", "a3", "a4"]);
        // a2 shares rack r1 with a1.
        let s = choose_source(
            &t,
            &holders,
            t.node_by_name("a2").unwrap(),
            &SourceLoad::default(),
        );
        assert_eq!(s, t.node_by_name("a1"));
        // a3 already sends a leg.
        let mut load = SourceLoad::default();
        load.add(t.node_by_name("a3").unwrap());
        let holders = ids(&t, &["a3", "a4", "a1"]);
        let target = t.node_by_name("a2").unwrap();
        // a1 is the rack neighbour of a2 and wins over idle a4 (tier beats load).
        assert_eq!(
            choose_source(&t, &holders, target, &load),
            t.node_by_name("a1")
        );
        // Among a3 (busy) and a4 (idle), both one rack away from a2's rack: a4.
        let holders = ids(&t, &["a3", "a4"]);
        assert_eq!(
            choose_source(&t, &holders, target, &load),
            t.node_by_name("a4")
        );
    }

    proptest! {
        /// Every missing target is fed exactly once, by a real holder; an IDC with a
        /// holder never sees a DCI leg; the DCI is crossed at most once per IDC without a
        /// holder; no leg feeds a holder.
        #[test]
        fn plans_cover_each_target_once_and_cross_the_dci_only_where_needed(
            holder_mask in 1u8..=255,
            missing_mask in 0u8..=255,
            busy in proptest::collection::vec(0u32..4, 8),
        ) {
            let t = topo();
            let all: Vec<NodeId> = t.node_ids().collect();
            let holders: Vec<NodeId> =
                all.iter().copied().filter(|n| holder_mask & (1 << n.index()) != 0).collect();
            let missing: Vec<NodeId> =
                all.iter().copied().filter(|n| missing_mask & (1 << n.index()) != 0).collect();
            let mut load = SourceLoad::default();
            for (n, b) in all.iter().zip(&busy) {
                for _ in 0..*b { load.add(*n); }
            }
            let plan = plan_copy(&t, &holders, &missing, &mut load).unwrap();
            let mut fed: Vec<NodeId> = plan.legs.iter().flat_map(|l| l.targets.clone()).collect();
            fed.sort();
            let mut want: Vec<NodeId> =
                missing.iter().copied().filter(|m| !holders.contains(m)).collect();
            want.sort();
            prop_assert_eq!(fed, want);
            let mut crossed = std::collections::BTreeSet::new();
            for leg in &plan.legs {
                prop_assert!(holders.contains(&leg.source));
                prop_assert_eq!(leg.tier, t.tier(leg.source, leg.targets[0]));
                let idc = t.location(leg.targets[0]).idc;
                // A leg stays in one IDC after its first hop.
                prop_assert!(leg.targets.iter().all(|&x| t.location(x).idc == idc));
                let has_local = holders.iter().any(|&h| t.location(h).idc == idc);
                prop_assert_eq!(leg.tier == Tier::Dci, !has_local);
                if leg.tier == Tier::Dci {
                    prop_assert!(crossed.insert(idc), "crossed twice into one IDC");
                }
            }
        }
    }
}

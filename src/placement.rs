//! Where a block's replicas go, in which order the write pipeline visits them, and in which
//! order a reader tries them.
//!
//! A [`ReplicationSpec`] says how many replicas each IDC gets (`2+2`, `idc-a:2,idc-b:2`,
//! `3`). A [`PlacementPolicy`] turns it into a [`Placement`]: the targets in pipeline order,
//! the writer's IDC first and every IDC's replicas contiguous, so a two-IDC pipeline crosses
//! the DCI exactly once. [`sort_by_distance`] orders replicas for a reader, nearest first.
//!
//! This module is pure: it decides from the [`Topology`], the [`NodeStates`] it is handed
//! and the random source it is given. It does not learn node health, free space or
//! liveness itself; the embedding server (or the scheduler) supplies them.

use std::collections::HashSet;
use std::fmt;
use std::str::FromStr;

use rand::{Rng, RngExt};

use crate::topology::{IdcId, NodeId, Origin, Tier, Topology};

/// Largest number of replicas a spec may ask for.
pub const MAX_REPLICAS: usize = 16;

/// Which IDC a group of replicas goes to.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum IdcChoice {
    /// The writer's own IDC (first group of a positional spec such as `2+2`).
    Writer,
    /// Any IDC other than the writer's and the other groups' (later groups of `2+2`).
    Other,
    /// The IDC with this name.
    Named(String),
}

/// One group of a [`ReplicationSpec`]: `count` replicas in one IDC.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SpecGroup {
    /// Which IDC.
    pub idc: IdcChoice,
    /// How many replicas there, at least one.
    pub count: usize,
}

/// How many replicas each IDC gets.
///
/// Text forms: `2+2` (two in the writer's IDC, two in one other IDC), `3+2`, `3` (all in
/// the writer's IDC), or named: `idc-a:2,idc-b:2`. The total is 1..=16 and no IDC appears
/// twice.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ReplicationSpec {
    groups: Vec<SpecGroup>,
}

/// Why a replication spec was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SpecError {
    /// The text is empty or a part of it is neither `N` nor `idc:N`.
    #[error("replication spec {spec:?}: part {part:?} is not a count or idc:count")]
    Syntax {
        /// The whole spec.
        spec: String,
        /// The part that was not understood.
        part: String,
    },
    /// A group asks for zero replicas.
    #[error("replication spec {spec:?}: every group needs at least one replica")]
    ZeroCount {
        /// The whole spec.
        spec: String,
    },
    /// The total is outside 1..=16.
    #[error("replication spec {spec:?}: total {total} is outside 1..={MAX_REPLICAS}")]
    Total {
        /// The whole spec.
        spec: String,
        /// The total asked for.
        total: usize,
    },
    /// The same IDC is named twice.
    #[error("replication spec {spec:?}: idc {idc:?} appears twice")]
    DuplicateIdc {
        /// The whole spec.
        spec: String,
        /// The IDC.
        idc: String,
    },
    /// Positional (`2+2`) and named (`idc-a:2`) forms are mixed.
    #[error("replication spec {spec:?}: use either N+N or idc:N,idc:N, not both")]
    Mixed {
        /// The whole spec.
        spec: String,
    },
}

impl ReplicationSpec {
    /// Builds a spec from groups, with the same checks as parsing.
    pub fn new(groups: Vec<SpecGroup>) -> Result<Self, SpecError> {
        let spec = ReplicationSpec { groups };
        let text = spec.to_string();
        if spec.groups.is_empty() {
            return Err(SpecError::Syntax {
                spec: text,
                part: String::new(),
            });
        }
        if spec.groups.iter().any(|g| g.count == 0) {
            return Err(SpecError::ZeroCount { spec: text });
        }
        let total: usize = spec.groups.iter().map(|g| g.count).sum();
        if !(1..=MAX_REPLICAS).contains(&total) {
            return Err(SpecError::Total { spec: text, total });
        }
        let mut named = HashSet::new();
        for (i, g) in spec.groups.iter().enumerate() {
            match &g.idc {
                IdcChoice::Named(n) if !named.insert(n.as_str()) => {
                    return Err(SpecError::DuplicateIdc {
                        spec: text,
                        idc: n.clone(),
                    });
                }
                IdcChoice::Writer if i != 0 => return Err(SpecError::Mixed { spec: text }),
                _ => {}
            }
        }
        if !named.is_empty() && named.len() != spec.groups.len() {
            return Err(SpecError::Mixed { spec: text });
        }
        Ok(spec)
    }

    /// The classic 2+2: two replicas in the writer's IDC, two in another.
    pub fn two_plus_two() -> Self {
        ReplicationSpec {
            groups: vec![
                SpecGroup {
                    idc: IdcChoice::Writer,
                    count: 2,
                },
                SpecGroup {
                    idc: IdcChoice::Other,
                    count: 2,
                },
            ],
        }
    }

    /// The groups, in the order they were written.
    pub fn groups(&self) -> &[SpecGroup] {
        &self.groups
    }

    /// Total number of replicas.
    pub fn total(&self) -> usize {
        self.groups.iter().map(|g| g.count).sum()
    }

    /// Number of IDCs the spec spans.
    pub fn idc_count(&self) -> usize {
        self.groups.len()
    }
}

impl FromStr for ReplicationSpec {
    type Err = SpecError;

    fn from_str(s: &str) -> Result<Self, SpecError> {
        let spec = s.trim();
        let syntax = |part: &str| SpecError::Syntax {
            spec: spec.to_string(),
            part: part.to_string(),
        };
        let count = |part: &str| -> Result<usize, SpecError> {
            part.trim().parse::<usize>().map_err(|_| syntax(part))
        };
        let groups = if spec.contains(':') {
            if spec.contains('+') {
                return Err(SpecError::Mixed {
                    spec: spec.to_string(),
                });
            }
            spec.split(',')
                .map(|part| {
                    let (idc, n) = part.split_once(':').ok_or_else(|| syntax(part))?;
                    let idc = idc.trim();
                    if idc.is_empty() {
                        return Err(syntax(part));
                    }
                    Ok(SpecGroup {
                        idc: IdcChoice::Named(idc.to_string()),
                        count: count(n)?,
                    })
                })
                .collect::<Result<Vec<_>, _>>()?
        } else {
            spec.split('+')
                .enumerate()
                .map(|(i, part)| {
                    Ok(SpecGroup {
                        idc: if i == 0 {
                            IdcChoice::Writer
                        } else {
                            IdcChoice::Other
                        },
                        count: count(part)?,
                    })
                })
                .collect::<Result<Vec<_>, _>>()?
        };
        ReplicationSpec::new(groups).map_err(|e| match e {
            // Report the text the operator typed, not our re-rendering of it.
            SpecError::ZeroCount { .. } => SpecError::ZeroCount {
                spec: spec.to_string(),
            },
            SpecError::Total { total, .. } => SpecError::Total {
                spec: spec.to_string(),
                total,
            },
            other => other,
        })
    }
}

impl fmt::Display for ReplicationSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, g) in self.groups.iter().enumerate() {
            match &g.idc {
                IdcChoice::Named(n) => {
                    if i > 0 {
                        f.write_str(",")?;
                    }
                    write!(f, "{n}:{}", g.count)?;
                }
                _ => {
                    if i > 0 {
                        f.write_str("+")?;
                    }
                    write!(f, "{}", g.count)?;
                }
            }
        }
        Ok(())
    }
}

/// Whether a node takes new replicas.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AdminState {
    /// Normal service.
    #[default]
    InService,
    /// Being emptied: serves reads, takes no new replicas.
    Draining,
    /// Out of service.
    Decommissioned,
}

/// What placement needs to know of a node right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NodeState {
    /// Whether the node is reachable.
    pub alive: bool,
    /// Its administrative state.
    pub admin: AdminState,
    /// Free bytes for new replicas.
    pub free_bytes: u64,
}

/// The current state of every node of a topology, indexed by [`NodeId`].
#[derive(Debug, Clone)]
pub struct NodeStates {
    states: Vec<NodeState>,
}

impl NodeStates {
    /// Every node alive, in service, with its whole capacity free; a node a reload
    /// removed ([`Topology::is_retired`]) is decommissioned and not alive.
    pub fn from_topology(topology: &Topology) -> Self {
        NodeStates {
            states: topology
                .nodes()
                .iter()
                .map(|n| {
                    let retired = topology.is_retired(n.location.node);
                    NodeState {
                        alive: !retired,
                        admin: if retired {
                            AdminState::Decommissioned
                        } else {
                            AdminState::InService
                        },
                        free_bytes: n.capacity,
                    }
                })
                .collect(),
        }
    }

    /// The state of one node. Panics if `node` is not from the topology these states were
    /// made for.
    pub fn get(&self, node: NodeId) -> &NodeState {
        &self.states[node.index()]
    }

    /// Changes the state of one node.
    pub fn set(&mut self, node: NodeId, state: NodeState) {
        self.states[node.index()] = state;
    }

    /// Number of nodes covered.
    pub fn len(&self) -> usize {
        self.states.len()
    }

    /// Whether no node is covered.
    pub fn is_empty(&self) -> bool {
        self.states.is_empty()
    }
}

/// Why no placement could be made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PlacementError {
    /// The spec names an IDC the topology does not have.
    #[error("replication spec names idc {idc:?}, which is not in the topology")]
    UnknownIdc {
        /// The name.
        idc: String,
    },
    /// An IDC has fewer eligible nodes than its group needs.
    #[error(
        "idc {idc:?} fell short: {needed} replicas needed, {eligible} eligible nodes \
         (excluded, dead, draining or short of space nodes are skipped)"
    )]
    NotEnoughNodes {
        /// The IDC.
        idc: String,
        /// Replicas it had to take.
        needed: usize,
        /// Nodes that could take one.
        eligible: usize,
    },
    /// The spec spans more IDCs than the topology offers.
    #[error("replication spec needs {needed} idcs, the topology has {available}")]
    NotEnoughIdcs {
        /// IDCs the spec needs.
        needed: usize,
        /// IDCs available.
        available: usize,
    },
    /// The node states, writer or exclusions do not belong to this topology.
    #[error("placement inputs do not match the topology: {0}")]
    Mismatch(String),
}

/// The chosen targets of one block, in pipeline order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    targets: Vec<NodeId>,
    /// `(idc, number of targets)` for each contiguous IDC segment, in pipeline order.
    segments: Vec<(IdcId, usize)>,
    writer_idc: IdcId,
}

impl Placement {
    /// All targets in pipeline order: writer's IDC first, then the remote IDCs.
    pub fn targets(&self) -> &[NodeId] {
        &self.targets
    }

    /// The IDC segments in pipeline order: each IDC with its targets.
    pub fn segments(&self) -> impl Iterator<Item = (IdcId, &[NodeId])> + '_ {
        let mut start = 0;
        self.segments.iter().map(move |&(idc, n)| {
            let s = &self.targets[start..start + n];
            start += n;
            (idc, s)
        })
    }

    /// The targets in the writer's IDC: the pipeline of an async write.
    pub fn local(&self) -> &[NodeId] {
        match self.segments.first() {
            Some(&(idc, n)) if idc == self.writer_idc => &self.targets[..n],
            _ => &[],
        }
    }

    /// The targets outside the writer's IDC: what async replication copies later.
    pub fn remote(&self) -> &[NodeId] {
        &self.targets[self.local().len()..]
    }

    /// How many consecutive hops of the pipeline (between targets) cross the DCI.
    pub fn dci_crossings(&self) -> usize {
        self.segments.len().saturating_sub(1)
    }
}

/// Counts the hops of a chain of nodes that cross an IDC boundary.
pub fn dci_crossings(topology: &Topology, chain: &[NodeId]) -> usize {
    chain
        .windows(2)
        .filter(|w| topology.tier(w[0], w[1]).crosses_dci())
        .count()
}

/// Chooses targets for a new block. A trait so that an embedding server, or the
/// scheduler, can bring its own rules; [`DefaultPlacement`] is the HDFS-like default.
pub trait PlacementPolicy {
    /// Picks `spec.total()` distinct nodes in pipeline order for a block written from
    /// `writer`, never choosing a node in `excluded`.
    fn choose_targets(
        &self,
        topology: &Topology,
        writer: &Origin,
        spec: &ReplicationSpec,
        excluded: &[NodeId],
        states: &NodeStates,
        rng: &mut dyn Rng,
    ) -> Result<Placement, PlacementError>;
}

/// The default policy, as HDFS does it, extended to IDCs:
/// - the writer's IDC first, then remote IDCs nearest first (by DCI round-trip time);
/// - in each IDC, the writer's own node first when it is an eligible storage node;
/// - replicas of one IDC spread over as many racks as it has eligible racks;
/// - among equals, nodes are drawn with probability proportional to their free space;
/// - excluded, dead, draining or decommissioned nodes, and nodes with less than
///   `min_free_bytes` free, are never chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DefaultPlacement {
    /// A node with less free space than this takes no new replica.
    pub min_free_bytes: u64,
}

impl Default for DefaultPlacement {
    /// Room for one default-sized (128 MiB) block.
    fn default() -> Self {
        DefaultPlacement {
            min_free_bytes: 128 << 20,
        }
    }
}

/// Chooses targets with [`DefaultPlacement::default`].
pub fn choose_targets(
    topology: &Topology,
    writer: &Origin,
    spec: &ReplicationSpec,
    excluded: &[NodeId],
    states: &NodeStates,
    rng: &mut dyn Rng,
) -> Result<Placement, PlacementError> {
    DefaultPlacement::default().choose_targets(topology, writer, spec, excluded, states, rng)
}

impl DefaultPlacement {
    fn eligible(&self, states: &NodeStates, excluded: &[NodeId], node: NodeId) -> bool {
        let s = states.get(node);
        s.alive
            && s.admin == AdminState::InService
            && s.free_bytes >= self.min_free_bytes
            && !excluded.contains(&node)
    }

    /// Picks `count` eligible nodes of one IDC with rack spread, appended to `out` in
    /// pipeline order starting after `prev` (the previous hop, or the writer).
    #[allow(clippy::too_many_arguments)]
    fn pick_in_idc(
        &self,
        topology: &Topology,
        writer: &Origin,
        eligible: &[NodeId],
        count: usize,
        states: &NodeStates,
        rng: &mut dyn Rng,
        out: &mut Vec<NodeId>,
    ) {
        let mut chosen: Vec<NodeId> = Vec::with_capacity(count);
        if let Some(w) = writer.node.filter(|w| eligible.contains(w)) {
            chosen.push(w);
        }
        let mut used_racks: Vec<_> = chosen.iter().map(|&n| topology.location(n).rack).collect();
        let mut candidates: Vec<(NodeId, u64)> = Vec::with_capacity(eligible.len());
        while chosen.len() < count {
            candidates.clear();
            candidates.extend(
                eligible
                    .iter()
                    .filter(|n| !chosen.contains(n))
                    .filter(|&&n| !used_racks.contains(&topology.location(n).rack))
                    .map(|&n| (n, states.get(n).free_bytes.max(1))),
            );
            if candidates.is_empty() {
                // Every rack holds one replica already: start a new round over the racks.
                used_racks.clear();
                continue;
            }
            let node = weighted_pick(&candidates, rng);
            chosen.push(node);
            used_racks.push(topology.location(node).rack);
        }
        // Order the chain: nearest to the previous hop first (random among equals), so a
        // same-rack pair is adjacent and the pipeline leaves a rack as rarely as possible.
        let prev_tier = |n: NodeId, out: &Vec<NodeId>| match out.last() {
            Some(&p) => topology.tier(p, n),
            None => writer.tier_to(&topology.location(n)),
        };
        let start = usize::from(writer.node.is_some_and(|w| chosen.first() == Some(&w)));
        out.extend_from_slice(&chosen[..start]);
        let mut rest: Vec<NodeId> = chosen[start..].to_vec();
        while !rest.is_empty() {
            let best = rest
                .iter()
                .map(|&n| prev_tier(n, out))
                .min()
                .unwrap_or(Tier::Dci);
            let ties: Vec<usize> = (0..rest.len())
                .filter(|&i| prev_tier(rest[i], out) == best)
                .collect();
            let i = ties[rng.random_range(0..ties.len())];
            out.push(rest.swap_remove(i));
        }
    }
}

fn weighted_pick(candidates: &[(NodeId, u64)], rng: &mut dyn Rng) -> NodeId {
    let total: u128 = candidates.iter().map(|&(_, w)| w as u128).sum();
    let mut x = rng.random_range(0..total);
    for &(n, w) in candidates {
        if x < w as u128 {
            return n;
        }
        x -= w as u128;
    }
    candidates[candidates.len() - 1].0
}

impl PlacementPolicy for DefaultPlacement {
    fn choose_targets(
        &self,
        topology: &Topology,
        writer: &Origin,
        spec: &ReplicationSpec,
        excluded: &[NodeId],
        states: &NodeStates,
        rng: &mut dyn Rng,
    ) -> Result<Placement, PlacementError> {
        if states.len() != topology.nodes().len() {
            return Err(PlacementError::Mismatch(format!(
                "{} node states for {} nodes",
                states.len(),
                topology.nodes().len()
            )));
        }
        if writer.idc.index() >= topology.idcs().len()
            || writer.node.is_some_and(|n| !topology.contains(n))
        {
            return Err(PlacementError::Mismatch(
                "writer is not in the topology".into(),
            ));
        }
        if spec.idc_count() > topology.idcs().len() {
            return Err(PlacementError::NotEnoughIdcs {
                needed: spec.idc_count(),
                available: topology.idcs().len(),
            });
        }
        let eligible: Vec<Vec<NodeId>> = topology
            .idcs()
            .iter()
            .map(|idc| {
                idc.nodes
                    .iter()
                    .copied()
                    .filter(|&n| self.eligible(states, excluded, n))
                    .collect()
            })
            .collect();
        let short = |idc: IdcId, needed: usize| PlacementError::NotEnoughNodes {
            idc: topology.idc(idc).name.clone(),
            needed,
            eligible: eligible[idc.index()].len(),
        };

        // 1. Fixed groups: the writer's IDC and named IDCs.
        let mut assigned: Vec<(IdcId, usize)> = Vec::with_capacity(spec.idc_count());
        let mut others: Vec<usize> = Vec::new();
        for g in spec.groups() {
            match &g.idc {
                IdcChoice::Writer => assigned.push((writer.idc, g.count)),
                IdcChoice::Named(name) => {
                    let idc = topology
                        .idc_by_name(name)
                        .ok_or_else(|| PlacementError::UnknownIdc { idc: name.clone() })?;
                    assigned.push((idc, g.count));
                }
                IdcChoice::Other => others.push(g.count),
            }
        }
        for &(idc, n) in &assigned {
            if eligible[idc.index()].len() < n {
                return Err(short(idc, n));
            }
        }

        // 2. "Other" groups, most demanding first. The feasible IDC sets are nested by
        //    count, so taking the most constrained group first and giving it any feasible
        //    IDC (we take the nearest) finds an assignment whenever one exists.
        let rtt_from_writer = |idc: IdcId| {
            topology
                .link(writer.idc, idc)
                .map_or(std::time::Duration::MAX, |l| l.rtt)
        };
        others.sort_unstable_by(|a, b| b.cmp(a));
        for n in others {
            let free: Vec<IdcId> = topology
                .idc_ids()
                .filter(|&i| i != writer.idc && !assigned.iter().any(|&(a, _)| a == i))
                .collect();
            if free.is_empty() {
                return Err(PlacementError::NotEnoughIdcs {
                    needed: spec.idc_count(),
                    available: topology.idcs().len(),
                });
            }
            let feasible: Vec<IdcId> = free
                .iter()
                .copied()
                .filter(|i| eligible[i.index()].len() >= n)
                .collect();
            let Some(&best) = feasible.iter().min_by_key(|&&i| rtt_from_writer(i)) else {
                // Name the remote IDC that came closest to having enough nodes.
                let nearest = free
                    .iter()
                    .copied()
                    .max_by_key(|i| {
                        (
                            eligible[i.index()].len(),
                            std::cmp::Reverse(rtt_from_writer(*i)),
                        )
                    })
                    .unwrap_or(free[0]);
                return Err(short(nearest, n));
            };
            let ties: Vec<IdcId> = feasible
                .into_iter()
                .filter(|&i| rtt_from_writer(i) == rtt_from_writer(best))
                .collect();
            assigned.push((ties[rng.random_range(0..ties.len())], n));
        }

        // 3. Pipeline order of the segments: writer's IDC first, then nearest by RTT.
        assigned.sort_by_key(|&(idc, _)| (idc != writer.idc, rtt_from_writer(idc), idc));

        // 4. Nodes inside each IDC.
        let mut targets = Vec::with_capacity(spec.total());
        for &(idc, n) in &assigned {
            self.pick_in_idc(
                topology,
                writer,
                &eligible[idc.index()],
                n,
                states,
                rng,
                &mut targets,
            );
        }
        Ok(Placement {
            targets,
            segments: assigned,
            writer_idc: writer.idc,
        })
    }
}

/// Orders replicas for a reader: nearest tier first (same node, same rack, same IDC, other
/// IDC), random among replicas at the same tier so that reads spread over them.
pub fn sort_by_distance(
    topology: &Topology,
    reader: &Origin,
    replicas: &[NodeId],
    rng: &mut dyn Rng,
) -> Vec<NodeId> {
    let mut keyed: Vec<(Tier, u64, NodeId)> = replicas
        .iter()
        .map(|&n| (reader.tier_to(&topology.location(n)), rng.random(), n))
        .collect();
    keyed.sort_unstable_by_key(|&(tier, r, _)| (tier, r));
    keyed.into_iter().map(|(_, _, n)| n).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;
    use std::time::Duration;

    fn spec(s: &str) -> ReplicationSpec {
        s.parse().unwrap()
    }

    #[test]
    fn parses_specs() {
        let s = spec("2+2");
        assert_eq!(s, ReplicationSpec::two_plus_two());
        assert_eq!(s.total(), 4);
        assert_eq!(s.to_string(), "2+2");
        let s = spec("idc-a:2, idc-b:2");
        assert_eq!(s.groups()[1].idc, IdcChoice::Named("idc-b".into()));
        assert_eq!(s.to_string(), "idc-a:2,idc-b:2");
        let s = spec("3");
        assert_eq!(s.idc_count(), 1);
        assert_eq!(spec("3+2").total(), 5);
    }

    #[test]
    fn refuses_bad_specs() {
        let e = |s: &str| s.parse::<ReplicationSpec>().unwrap_err();
        assert!(matches!(e(""), SpecError::Syntax { .. }));
        assert!(matches!(e("2+x"), SpecError::Syntax { .. }));
        assert!(matches!(e(":2"), SpecError::Syntax { .. }));
        assert!(matches!(e("2+0"), SpecError::ZeroCount { .. }));
        assert!(matches!(e("0"), SpecError::ZeroCount { .. }));
        assert!(matches!(e("9+8"), SpecError::Total { total: 17, .. }));
        assert!(matches!(e("a:2,a:1"), SpecError::DuplicateIdc { .. }));
        assert!(matches!(e("2+a:2"), SpecError::Mixed { .. }));
        assert!(matches!(e("-1"), SpecError::Syntax { .. }));
    }

    fn two_idc() -> Topology {
        let mut b = Topology::builder().idc("a").idc("b");
        for (i, (idc, rack)) in [
            ("a", "r1"),
            ("a", "r1"),
            ("a", "r2"),
            ("a", "r2"),
            ("b", "r1"),
            ("b", "r1"),
            ("b", "r2"),
            ("b", "r2"),
        ]
        .into_iter()
        .enumerate()
        {
            b = b.node(
                format!("{idc}{i}"),
                idc,
                rack,
                format!("127.0.0.{}:7000", i + 1).parse().unwrap(),
                1 << 40,
            );
        }
        b.link("a", "b", 1 << 30, Duration::from_millis(2))
            .build()
            .unwrap()
    }

    #[test]
    fn two_plus_two_from_a_storage_node() {
        let t = two_idc();
        let states = NodeStates::from_topology(&t);
        let mut rng = StdRng::seed_from_u64(7);
        let a2 = t.node_by_name("a2").unwrap();
        let writer = Origin::node(t.location(a2));
        for _ in 0..100 {
            let p = choose_targets(&t, &writer, &spec("2+2"), &[], &states, &mut rng).unwrap();
            let tg = p.targets();
            assert_eq!(tg.len(), 4);
            assert_eq!(tg[0], a2, "writer's node first");
            assert_eq!(
                t.tier(tg[0], tg[1]),
                Tier::Idc,
                "other rack in the writer's idc"
            );
            assert_eq!(
                t.tier(tg[2], tg[3]),
                Tier::Idc,
                "two racks in the remote idc"
            );
            assert_eq!(p.dci_crossings(), 1);
            assert_eq!(dci_crossings(&t, tg), 1);
            assert_eq!(p.local(), &tg[..2]);
            assert_eq!(p.remote(), &tg[2..]);
        }
    }

    #[test]
    fn named_spec_from_remote_client_orders_writer_idc_first() {
        let t = two_idc();
        let states = NodeStates::from_topology(&t);
        let mut rng = StdRng::seed_from_u64(1);
        let b = t.idc_by_name("b").unwrap();
        let p = choose_targets(
            &t,
            &Origin::in_idc(b),
            &spec("a:2,b:1"),
            &[],
            &states,
            &mut rng,
        )
        .unwrap();
        assert_eq!(t.location(p.targets()[0]).idc, b);
        assert_eq!(p.local().len(), 1);
        assert_eq!(p.remote().len(), 2);
    }

    #[test]
    fn short_idc_is_named() {
        let t = two_idc();
        let mut states = NodeStates::from_topology(&t);
        let mut rng = StdRng::seed_from_u64(1);
        for name in ["b4", "b5", "b6"] {
            let id = t.node_by_name(name).unwrap();
            let mut s = *states.get(id);
            s.admin = AdminState::Draining;
            states.set(id, s);
        }
        let writer = Origin::in_idc(t.idc_by_name("a").unwrap());
        let e = choose_targets(&t, &writer, &spec("2+2"), &[], &states, &mut rng).unwrap_err();
        assert_eq!(
            e,
            PlacementError::NotEnoughNodes {
                idc: "b".into(),
                needed: 2,
                eligible: 1
            }
        );
        let e = choose_targets(&t, &writer, &spec("2+2+1"), &[], &states, &mut rng).unwrap_err();
        assert!(matches!(
            e,
            PlacementError::NotEnoughIdcs {
                needed: 3,
                available: 2
            }
        ));
        let e = choose_targets(&t, &writer, &spec("c:1"), &[], &states, &mut rng).unwrap_err();
        assert!(matches!(e, PlacementError::UnknownIdc { .. }));
    }

    #[test]
    fn full_nodes_and_exclusions_are_skipped() {
        let t = two_idc();
        let mut states = NodeStates::from_topology(&t);
        let a0 = t.node_by_name("a0").unwrap();
        let a1 = t.node_by_name("a1").unwrap();
        let mut s = *states.get(a0);
        s.free_bytes = 1;
        states.set(a0, s);
        let writer = Origin::node(t.location(a0));
        let mut rng = StdRng::seed_from_u64(3);
        for _ in 0..50 {
            let p = choose_targets(&t, &writer, &spec("2+2"), &[a1], &states, &mut rng).unwrap();
            assert!(!p.targets().contains(&a0));
            assert!(!p.targets().contains(&a1));
        }
    }

    #[test]
    fn weighted_by_free_space() {
        let t = two_idc();
        let mut states = NodeStates::from_topology(&t);
        // In idc b rack r1, b4 has 9x the free space of b5.
        let b4 = t.node_by_name("b4").unwrap();
        let b5 = t.node_by_name("b5").unwrap();
        for (n, free) in [(b4, 900u64 << 30), (b5, 100 << 30)] {
            let mut s = *states.get(n);
            s.free_bytes = free;
            states.set(n, s);
        }
        let writer = Origin::in_idc(t.idc_by_name("a").unwrap());
        let mut rng = StdRng::seed_from_u64(5);
        let (mut c4, mut c5) = (0, 0);
        for _ in 0..2000 {
            let p = choose_targets(&t, &writer, &spec("2+2"), &[], &states, &mut rng).unwrap();
            c4 += usize::from(p.targets().contains(&b4));
            c5 += usize::from(p.targets().contains(&b5));
        }
        assert!(c4 > 4 * c5, "b4 chosen {c4} times, b5 {c5} times");
    }

    #[test]
    fn read_order() {
        let t = two_idc();
        let id = |n| t.node_by_name(n).unwrap();
        let reader = Origin::node(t.location(id("a0")));
        let replicas = [id("b4"), id("a3"), id("a1"), id("a0")];
        let mut rng = StdRng::seed_from_u64(9);
        let order = sort_by_distance(&t, &reader, &replicas, &mut rng);
        assert_eq!(order, vec![id("a0"), id("a1"), id("a3"), id("b4")]);
    }

    mod props {
        use super::*;
        use proptest::prelude::*;

        #[derive(Debug, Clone)]
        struct World {
            topology: Topology,
            states: NodeStates,
            excluded: Vec<NodeId>,
            writer: Origin,
            spec: ReplicationSpec,
            seed: u64,
        }

        const MIN_FREE: u64 = 1000;

        fn world() -> impl Strategy<Value = World> {
            (1usize..=4, 1usize..=8, 1usize..=40)
                .prop_flat_map(|(idcs, racks, nodes)| {
                    (
                        Just(idcs),
                        // (idc, rack, free, alive, admin, excluded) per node
                        proptest::collection::vec(
                            (
                                0..idcs,
                                0..racks,
                                0u64..4000,
                                prop::bool::weighted(0.9),
                                0u8..10,
                                prop::bool::weighted(0.1),
                            ),
                            nodes,
                        ),
                        proptest::collection::vec(1u64..50, idcs * idcs),
                        // spec: named?, group counts
                        prop::bool::ANY,
                        proptest::collection::vec(1usize..=4, 1..=3),
                        any::<prop::sample::Index>(),
                        prop::bool::ANY,
                        any::<u64>(),
                    )
                })
                .prop_map(
                    |(idcs, nodes, rtts, named, counts, writer_pick, writer_is_node, seed)| {
                        let mut b = Topology::builder();
                        for i in 0..idcs {
                            b = b.idc(format!("i{i}"));
                        }
                        for (n, (idc, rack, ..)) in nodes.iter().enumerate() {
                            b = b.node(
                                format!("n{n}"),
                                format!("i{idc}"),
                                format!("r{rack}"),
                                format!("127.0.0.{}:{}", n + 1, 7000).parse().unwrap(),
                                1 << 30,
                            );
                        }
                        for x in 0..idcs {
                            for y in x + 1..idcs {
                                b = b.link(
                                    format!("i{x}"),
                                    format!("i{y}"),
                                    1 << 20,
                                    Duration::from_millis(rtts[x * idcs + y]),
                                );
                            }
                        }
                        let topology = b.build().unwrap();
                        let mut states = NodeStates::from_topology(&topology);
                        let mut excluded = Vec::new();
                        for (n, &(_, _, free, alive, admin, excl)) in nodes.iter().enumerate() {
                            let id = topology.node_by_name(&format!("n{n}")).unwrap();
                            states.set(
                                id,
                                NodeState {
                                    alive,
                                    admin: match admin {
                                        0 => AdminState::Draining,
                                        1 => AdminState::Decommissioned,
                                        _ => AdminState::InService,
                                    },
                                    free_bytes: free,
                                },
                            );
                            if excl {
                                excluded.push(id);
                            }
                        }
                        let node = topology
                            .node_ids()
                            .nth(writer_pick.index(nodes.len()))
                            .unwrap();
                        let writer = if writer_is_node {
                            Origin::node(topology.location(node))
                        } else {
                            Origin::in_idc(topology.location(node).idc)
                        };
                        let groups = counts
                            .iter()
                            .enumerate()
                            .map(|(i, &count)| SpecGroup {
                                idc: match (named, i) {
                                    (true, _) => {
                                        IdcChoice::Named(format!("i{}", (i + seed as usize) % 4))
                                    }
                                    (false, 0) => IdcChoice::Writer,
                                    (false, _) => IdcChoice::Other,
                                },
                                count,
                            })
                            .collect();
                        let spec = ReplicationSpec::new(groups).unwrap();
                        World {
                            topology,
                            states,
                            excluded,
                            writer,
                            spec,
                            seed,
                        }
                    },
                )
        }

        /// Independent feasibility check by exhaustive search over IDC assignments.
        fn feasible(w: &World, eligible: &[usize]) -> bool {
            fn go(w: &World, eligible: &[usize], g: usize, used: &mut Vec<usize>) -> bool {
                let Some(group) = w.spec.groups().get(g) else {
                    return true;
                };
                let candidates: Vec<usize> = match &group.idc {
                    IdcChoice::Writer => vec![w.writer.idc.index()],
                    IdcChoice::Named(n) => match w.topology.idc_by_name(n) {
                        Some(i) => vec![i.index()],
                        None => return false,
                    },
                    IdcChoice::Other => (0..eligible.len())
                        .filter(|&i| i != w.writer.idc.index())
                        .collect(),
                };
                for i in candidates {
                    if used.contains(&i) || eligible[i] < group.count {
                        continue;
                    }
                    used.push(i);
                    if go(w, eligible, g + 1, used) {
                        return true;
                    }
                    used.pop();
                }
                false
            }
            go(w, eligible, 0, &mut Vec::new())
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(512))]

            #[test]
            fn placement_invariants(w in world()) {
                let policy = DefaultPlacement { min_free_bytes: MIN_FREE };
                let t = &w.topology;
                let is_eligible = |n: NodeId| {
                    let s = w.states.get(n);
                    s.alive && s.admin == AdminState::InService && s.free_bytes >= MIN_FREE && !w.excluded.contains(&n)
                };
                let eligible: Vec<usize> = t.idcs().iter().map(|i| i.nodes.iter().filter(|&&n| is_eligible(n)).count()).collect();
                let mut rng = StdRng::seed_from_u64(w.seed);
                let result = policy.choose_targets(t, &w.writer, &w.spec, &w.excluded, &w.states, &mut rng);
                prop_assert_eq!(result.is_ok(), feasible(&w, &eligible), "{:?}", result);
                let Ok(p) = result else { return Ok(()) };

                let tg = p.targets();
                prop_assert_eq!(tg.len(), w.spec.total());
                let mut distinct = tg.to_vec();
                distinct.sort();
                distinct.dedup();
                prop_assert_eq!(distinct.len(), tg.len(), "distinct nodes");
                for &n in tg {
                    prop_assert!(is_eligible(n), "ineligible node chosen");
                }
                // Segments are contiguous IDCs, one per group, with the right counts.
                let segs: Vec<(IdcId, Vec<NodeId>)> = p.segments().map(|(i, s)| (i, s.to_vec())).collect();
                prop_assert_eq!(segs.len(), w.spec.idc_count());
                let mut seg_idcs: Vec<IdcId> = segs.iter().map(|s| s.0).collect();
                seg_idcs.sort();
                seg_idcs.dedup();
                prop_assert_eq!(seg_idcs.len(), segs.len(), "one segment per idc");
                for (idc, nodes) in &segs {
                    for &n in nodes {
                        prop_assert_eq!(t.location(n).idc, *idc);
                    }
                    // Rack spread: as many racks as possible.
                    let mut racks: Vec<_> = nodes.iter().map(|&n| t.location(n).rack).collect();
                    racks.sort();
                    racks.dedup();
                    let mut elig_racks: Vec<_> = t.idc(*idc).nodes.iter().filter(|&&n| is_eligible(n)).map(|&n| t.location(n).rack).collect();
                    elig_racks.sort();
                    elig_racks.dedup();
                    prop_assert_eq!(racks.len(), nodes.len().min(elig_racks.len()), "rack spread");
                }
                let mut want: Vec<usize> = w.spec.groups().iter().map(|g| g.count).collect();
                let mut got: Vec<usize> = segs.iter().map(|s| s.1.len()).collect();
                want.sort();
                got.sort();
                prop_assert_eq!(want, got);
                for (g, _) in w.spec.groups().iter().zip(0..) {
                    match &g.idc {
                        IdcChoice::Writer => prop_assert!(segs.iter().any(|s| s.0 == w.writer.idc && s.1.len() == g.count)),
                        IdcChoice::Named(n) => {
                            let id = t.idc_by_name(n).unwrap();
                            prop_assert!(segs.iter().any(|s| s.0 == id && s.1.len() == g.count));
                        }
                        IdcChoice::Other => {}
                    }
                }
                // Writer's IDC first; one DCI crossing per IDC boundary.
                if segs.iter().any(|s| s.0 == w.writer.idc) {
                    prop_assert_eq!(segs[0].0, w.writer.idc);
                    prop_assert_eq!(p.local(), &segs[0].1[..]);
                } else {
                    prop_assert!(p.local().is_empty());
                }
                prop_assert_eq!(dci_crossings(t, tg), w.spec.idc_count() - 1);
                if w.spec.idc_count() == 2 {
                    prop_assert_eq!(dci_crossings(t, tg), 1);
                }
                if let Some(wn) = w.writer.node
                    && is_eligible(wn) && segs.iter().any(|s| s.0 == w.writer.idc) {
                        prop_assert_eq!(tg[0], wn, "writer's own node first");
                    }
            }

            #[test]
            fn read_order_is_monotone(w in world(), pick in proptest::collection::vec(any::<prop::sample::Index>(), 0..8)) {
                let t = &w.topology;
                let n = t.nodes().len();
                let mut replicas: Vec<NodeId> = pick.iter().map(|i| t.node_ids().nth(i.index(n)).unwrap()).collect();
                replicas.sort();
                replicas.dedup();
                let mut rng = StdRng::seed_from_u64(w.seed);
                let order = sort_by_distance(t, &w.writer, &replicas, &mut rng);
                let tiers: Vec<Tier> = order.iter().map(|&r| w.writer.tier_to(&t.location(r))).collect();
                prop_assert!(tiers.windows(2).all(|p| p[0] <= p[1]), "{:?}", tiers);
                let mut sorted = order.clone();
                sorted.sort();
                prop_assert_eq!(sorted, replicas);
            }
        }
    }
}

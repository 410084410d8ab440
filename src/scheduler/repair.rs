//! Repair's decisions, pure: which nodes are down ([`PeerWatch`]), which surviving holder
//! of a block owes its repair ([`responsible`]), and where a lost replica goes
//! ([`replacements`]). The `repair` service probes peers, queues and copies; this module
//! only decides, with `now` passed in.
//!
//! Every holder of a block reaches the same answers from the same replica set, so the
//! survivors of a node loss agree on who repairs without talking, and two repairs of one
//! block (after a restart, or from two stale views) pick the same replacement: the second
//! finds it already holding the block and copies nothing.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::block::BlockId;
use crate::topology::{IdcId, NodeId, Topology};

/// Liveness of peers from periodic probes: a peer is down once no probe has succeeded for
/// `down_after`, and up again at its next successful probe.
///
/// Call order: [`handle_probe`](Self::handle_probe) with each probe's outcome, then
/// [`poll_changes`](Self::poll_changes) for the peers that went down or came back.
#[derive(Debug)]
pub struct PeerWatch {
    down_after: Duration,
    peers: HashMap<NodeId, PeerState>,
}

#[derive(Debug, Clone, Copy)]
struct PeerState {
    last_ok: Instant,
    down: bool,
    /// The state last reported by `poll_changes`.
    reported_down: bool,
}

/// A peer's change of state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerChange {
    /// No probe succeeded for `down_after`.
    Down(NodeId),
    /// A probe succeeded again.
    Up(NodeId),
}

impl PeerWatch {
    /// Watches `peers`, each counted as up at `now`.
    pub fn new(
        peers: impl IntoIterator<Item = NodeId>,
        down_after: Duration,
        now: Instant,
    ) -> Self {
        PeerWatch {
            down_after,
            peers: peers
                .into_iter()
                .map(|p| {
                    let s = PeerState {
                        last_ok: now,
                        down: false,
                        reported_down: false,
                    };
                    (p, s)
                })
                .collect(),
        }
    }

    /// A probe of `peer` finished at `now`, answered (`ok`) or not.
    pub fn handle_probe(&mut self, peer: NodeId, ok: bool, now: Instant) {
        if let Some(s) = self.peers.get_mut(&peer) {
            if ok {
                s.last_ok = s.last_ok.max(now);
                s.down = false;
            } else if now.saturating_duration_since(s.last_ok) >= self.down_after {
                s.down = true;
            }
        }
    }

    /// Peers whose state changed since the last call, as of `now`, lowest id first.
    pub fn poll_changes(&mut self, now: Instant) -> Vec<PeerChange> {
        let mut out = Vec::new();
        for (&p, s) in self.peers.iter_mut() {
            if !s.down && now.saturating_duration_since(s.last_ok) >= self.down_after {
                s.down = true;
            }
            if s.down != s.reported_down {
                s.reported_down = s.down;
                out.push(if s.down {
                    PeerChange::Down(p)
                } else {
                    PeerChange::Up(p)
                });
            }
        }
        out.sort_by_key(|c| match *c {
            PeerChange::Down(p) | PeerChange::Up(p) => p,
        });
        out
    }

    /// Watches exactly `peers` from `now` on (the topology changed): new ones count as up
    /// at `now`; the ones no longer listed are forgotten and returned as `Down`, unless
    /// they were reported down already, since their replicas are owed repairs as a dead
    /// node's are.
    pub fn set_peers(
        &mut self,
        peers: impl IntoIterator<Item = NodeId>,
        now: Instant,
    ) -> Vec<PeerChange> {
        let mut keep: HashMap<NodeId, PeerState> = HashMap::new();
        for p in peers {
            let s = self.peers.remove(&p).unwrap_or(PeerState {
                last_ok: now,
                down: false,
                reported_down: false,
            });
            keep.insert(p, s);
        }
        let mut gone: Vec<PeerChange> = std::mem::replace(&mut self.peers, keep)
            .into_iter()
            .filter(|(_, s)| !s.reported_down)
            .map(|(p, _)| PeerChange::Down(p))
            .collect();
        gone.sort_by_key(|c| match *c {
            PeerChange::Down(p) | PeerChange::Up(p) => p,
        });
        gone
    }

    /// Whether `peer` is down (a peer not watched, such as this node, never is).
    pub fn is_down(&self, peer: NodeId) -> bool {
        self.peers.get(&peer).is_some_and(|s| s.down)
    }
}

/// The holder of a block that repairs the loss of `lost`: the first live holder of the
/// replica set in `lost`'s IDC (lowest id), else the first live holder anywhere.
/// `None` when no holder is alive. The same on every node that sees the same set.
pub fn responsible(
    topology: &Topology,
    replicas: &[NodeId],
    lost: NodeId,
    is_down: impl Fn(NodeId) -> bool,
) -> Option<NodeId> {
    let idc = topology.location(lost).idc;
    replicas
        .iter()
        .copied()
        .filter(|&r| r != lost && !is_down(r))
        .min_by_key(|&r| (topology.location(r).idc != idc, r))
}

/// Candidate nodes for the replicas `idc` owes for `block`, best first: live nodes of the
/// IDC with capacity, not in `exclude` (the replica set), on racks without a live replica
/// (`holders`) first, then in an order drawn from the block id — so repairs of different
/// blocks spread over the IDC, and every repair of one block ranks alike.
pub fn replacements(
    topology: &Topology,
    block: BlockId,
    idc: IdcId,
    holders: &[NodeId],
    exclude: &[NodeId],
    is_down: impl Fn(NodeId) -> bool,
) -> Vec<NodeId> {
    let held_racks: Vec<_> = holders.iter().map(|&h| topology.location(h).rack).collect();
    let mut v: Vec<NodeId> = topology
        .node_ids()
        .filter(|&n| {
            topology.location(n).idc == idc
                && topology.node(n).capacity > 0
                && !exclude.contains(&n)
                && !holders.contains(&n)
                && !is_down(n)
        })
        .collect();
    v.sort_by_key(|&n| {
        (
            held_racks.contains(&topology.location(n).rack),
            mix(block.0 ^ (n.index() as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15)),
        )
    });
    v
}

/// SplitMix64's finalizer: a fixed, well-spread order from a block and a node.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reload_adds_peers_up_and_reports_removed_ones_down_once() {
        let t0 = Instant::now();
        let n = NodeId::from_index;
        let mut w = PeerWatch::new([n(1), n(2), n(3)], Duration::from_secs(1), t0);
        // n(3) went down before the reload: its repairs are owed already.
        w.handle_probe(n(1), true, t0 + Duration::from_secs(2));
        w.handle_probe(n(2), true, t0 + Duration::from_secs(2));
        assert_eq!(
            w.poll_changes(t0 + Duration::from_secs(2)),
            vec![PeerChange::Down(n(3))]
        );
        let t1 = t0 + Duration::from_secs(2);
        let gone = w.set_peers([n(1), n(4)], t1);
        assert_eq!(
            gone,
            vec![PeerChange::Down(n(2))],
            "removed and up: owed now"
        );
        assert!(!w.is_down(n(4)), "a new peer starts up");
        assert!(!w.is_down(n(2)) && !w.is_down(n(3)), "no longer watched");
        assert_eq!(w.poll_changes(t1), vec![]);
        assert_eq!(
            w.set_peers([n(1), n(4)], t1),
            vec![],
            "nothing more to report"
        );
    }
    use proptest::prelude::*;

    /// Two IDCs × `racks` racks × 2 nodes: a1 a2 | a3 a4 | … and b1 b2 | …
    fn topo(racks: usize) -> Topology {
        let mut b = Topology::builder().idc("idc-a").idc("idc-b");
        let mut h = 0u8;
        for idc in ["a", "b"] {
            for r in 0..racks {
                for k in 0..2 {
                    h += 1;
                    b = b.node(
                        format!("{idc}{}", r * 2 + k + 1),
                        format!("idc-{idc}"),
                        format!("r{r}"),
                        std::net::SocketAddr::from(([127, 0, 0, h], 7000)),
                        1 << 40,
                    );
                }
            }
        }
        b.link("idc-a", "idc-b", 125_000_000, Duration::from_millis(5))
            .build()
            .unwrap()
    }

    fn id(t: &Topology, n: &str) -> NodeId {
        t.node_by_name(n).unwrap()
    }

    #[test]
    fn a_peer_is_down_after_silence_and_up_at_its_next_answer() {
        let t = topo(2);
        let (a2, b1) = (id(&t, "a2"), id(&t, "b1"));
        let t0 = Instant::now();
        let s = Duration::from_secs(1);
        let mut w = PeerWatch::new([a2, b1], 3 * s, t0);
        w.handle_probe(a2, true, t0 + s);
        w.handle_probe(b1, false, t0 + s);
        assert!(
            w.poll_changes(t0 + 2 * s).is_empty(),
            "not silent long enough"
        );
        w.handle_probe(a2, false, t0 + 3 * s);
        assert_eq!(w.poll_changes(t0 + 3 * s), vec![PeerChange::Down(b1)]);
        assert!(w.is_down(b1) && !w.is_down(a2));
        assert_eq!(w.poll_changes(t0 + 4 * s), vec![PeerChange::Down(a2)]);
        assert!(w.poll_changes(t0 + 5 * s).is_empty(), "reported once");
        w.handle_probe(b1, true, t0 + 6 * s);
        assert_eq!(w.poll_changes(t0 + 6 * s), vec![PeerChange::Up(b1)]);
        assert!(!w.is_down(b1));
        // A probe that finishes late (an earlier `now`) never moves the clock back.
        w.handle_probe(b1, true, t0 + 5 * s);
        assert!(w.poll_changes(t0 + 8 * s).is_empty());
        assert!(!w.is_down(id(&t, "a1")), "an unwatched node is never down");
    }

    #[test]
    fn the_repair_falls_to_a_survivor_in_the_lost_idc_first() {
        let t = topo(2);
        let set: Vec<NodeId> = ["a1", "a2", "b1", "b2"].iter().map(|n| id(&t, n)).collect();
        let none = |_| false;
        assert_eq!(
            responsible(&t, &set, id(&t, "a1"), none),
            Some(id(&t, "a2"))
        );
        assert_eq!(
            responsible(&t, &set, id(&t, "b2"), none),
            Some(id(&t, "b1"))
        );
        // Both of b down: the first live holder anywhere.
        let b_down = |n: NodeId| t.location(n).idc == t.location(id(&t, "b1")).idc;
        assert_eq!(
            responsible(&t, &set, id(&t, "b2"), b_down),
            Some(id(&t, "a1"))
        );
        assert_eq!(responsible(&t, &set, id(&t, "b1"), |_| true), None);
    }

    #[test]
    fn replacements_prefer_a_rack_without_a_replica_and_skip_down_nodes() {
        let t = topo(3);
        let (a1, a2, a3) = (id(&t, "a1"), id(&t, "a2"), id(&t, "a3"));
        let idc = t.location(a1).idc;
        // a2 lost; a1 (rack 0) survives: racks 1 and 2 come before a2's rack mate.
        for b in 0..50 {
            let r = replacements(&t, BlockId(b), idc, &[a1], &[a1, a2], |_| false);
            assert_eq!(r.len(), 4, "a3..a6");
            assert!(!r.contains(&a1) && !r.contains(&a2));
            assert!(r[..4].iter().all(|&n| t.location(n).idc == idc));
            assert_ne!(t.location(r[0]).rack, t.location(a1).rack);
        }
        let r = replacements(&t, BlockId(7), idc, &[a1], &[a1, a2], |n| n == a3);
        assert!(!r.contains(&a3));
    }

    proptest! {
        #[test]
        fn every_view_of_a_block_ranks_its_replacements_alike_and_spreads_blocks(
            blocks in proptest::collection::vec(any::<u64>(), 64..128),
        ) {
            let t = topo(4);
            let (a1, a2) = (id(&t, "a1"), id(&t, "a2"));
            let idc = t.location(a1).idc;
            let mut firsts = std::collections::HashSet::new();
            for &b in &blocks {
                let x = replacements(&t, BlockId(b), idc, &[a1], &[a1, a2], |_| false);
                let y = replacements(&t, BlockId(b), idc, &[a1], &[a2, a1], |_| false);
                prop_assert_eq!(&x, &y);
                firsts.insert(x[0]);
            }
            // 64+ blocks over the 6 candidates of racks 1..3: more than one is used.
            prop_assert!(firsts.len() >= 3, "first choices {:?}", firsts);
        }
    }
}

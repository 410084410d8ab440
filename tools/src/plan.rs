//! `strait plan`: place many blocks on a topology without writing anything, and report
//! where the replicas land, how the pipelines are ordered and how often they cross the DCI.

use std::collections::BTreeMap;
use std::fmt::{self, Write as _};
use std::time::{Duration, Instant};

use rand::SeedableRng;
use rand::rngs::StdRng;
use strait::placement::{self, NodeStates, Placement, PlacementError, ReplicationSpec};
use strait::topology::{NodeId, Origin, Topology};

/// Who writes the blocks.
#[derive(Debug, Clone)]
pub enum Writers {
    /// Every storage node in turn (block *i* from node *i* mod *n*), as when clients run
    /// on the storage nodes.
    EveryNode,
    /// One fixed origin.
    Fixed(Origin),
}

/// What to plan.
#[derive(Debug, Clone)]
pub struct PlanParams {
    /// The replication spec.
    pub spec: ReplicationSpec,
    /// Number of blocks to place.
    pub blocks: usize,
    /// Who writes them.
    pub writers: Writers,
    /// Nodes never to choose.
    pub excluded: Vec<NodeId>,
    /// Seed of the random source, so runs repeat.
    pub seed: u64,
    /// How many example pipelines to print.
    pub examples: usize,
}

/// The outcome of a plan.
#[derive(Debug, Clone)]
pub struct PlanReport {
    /// Blocks placed.
    pub placed: usize,
    /// Blocks that could not be placed, with the first error.
    pub failed: usize,
    /// The first placement error, if any.
    pub first_error: Option<PlacementError>,
    /// Replicas per node, indexed by node.
    pub per_node: Vec<usize>,
    /// Number of blocks by DCI crossings of their pipeline (between targets).
    pub crossings: BTreeMap<usize, usize>,
    /// Blocks whose writer→first-target hop crosses the DCI.
    pub writer_hop_crossings: usize,
    /// IDC segments with ≥2 replicas in an IDC with ≥2 racks: (total, spanning ≥2 racks).
    pub rack_spread: (usize, usize),
    /// The first few placements, with their writer.
    pub examples: Vec<(Origin, Placement)>,
    /// Wall time of the placement calls alone.
    pub elapsed: Duration,
}

/// Resolves a writer given on the command line: a node name or an `/idc[/rack[/node]]` path.
pub fn parse_writer(topology: &Topology, text: &str) -> Result<Writers, String> {
    if text == "all" {
        return Ok(Writers::EveryNode);
    }
    if text.starts_with('/') {
        return topology
            .resolve_path(text)
            .map(Writers::Fixed)
            .ok_or_else(|| format!("writer path {text:?} is not in the topology"));
    }
    topology
        .node_by_name(text)
        .map(|n| Writers::Fixed(Origin::node(topology.location(n))))
        .ok_or_else(|| format!("writer {text:?} is not a node of the topology"))
}

/// Places `params.blocks` blocks and collects the statistics.
pub fn run(topology: &Topology, params: &PlanParams) -> PlanReport {
    let states = NodeStates::from_topology(topology);
    let mut rng = StdRng::seed_from_u64(params.seed);
    let nodes: Vec<NodeId> = topology.node_ids().collect();
    let mut report = PlanReport {
        placed: 0,
        failed: 0,
        first_error: None,
        per_node: vec![0; nodes.len()],
        crossings: BTreeMap::new(),
        writer_hop_crossings: 0,
        rack_spread: (0, 0),
        examples: Vec::new(),
        elapsed: Duration::ZERO,
    };
    let mut elapsed = Duration::ZERO;
    for i in 0..params.blocks {
        let writer = match &params.writers {
            Writers::EveryNode => Origin::node(topology.location(nodes[i % nodes.len()])),
            Writers::Fixed(o) => *o,
        };
        let start = Instant::now();
        let result = placement::choose_targets(
            topology,
            &writer,
            &params.spec,
            &params.excluded,
            &states,
            &mut rng,
        );
        elapsed += start.elapsed();
        let p = match result {
            Ok(p) => p,
            Err(e) => {
                report.failed += 1;
                report.first_error.get_or_insert(e);
                continue;
            }
        };
        report.placed += 1;
        for &t in p.targets() {
            report.per_node[t.index()] += 1;
        }
        *report
            .crossings
            .entry(placement::dci_crossings(topology, p.targets()))
            .or_default() += 1;
        if let Some(&first) = p.targets().first()
            && writer.tier_to(&topology.location(first)).crosses_dci()
        {
            report.writer_hop_crossings += 1;
        }
        for (idc, seg) in p.segments() {
            if seg.len() >= 2 && topology.idc(idc).racks.len() >= 2 {
                report.rack_spread.0 += 1;
                let first_rack = topology.location(seg[0]).rack;
                if seg.iter().any(|&n| topology.location(n).rack != first_rack) {
                    report.rack_spread.1 += 1;
                }
            }
        }
        if report.examples.len() < params.examples {
            report.examples.push((writer, p));
        }
    }
    report.elapsed = elapsed;
    report
}

fn pct(part: usize, whole: usize) -> f64 {
    if whole == 0 {
        0.0
    } else {
        100.0 * part as f64 / whole as f64
    }
}

fn origin_name(topology: &Topology, o: &Origin) -> String {
    match (o.node, o.rack) {
        (Some(n), _) => topology.path(n),
        (None, Some(r)) => format!("/{}/{}", topology.idc(o.idc).name, topology.rack(r).name),
        (None, None) => format!("/{}", topology.idc(o.idc).name),
    }
}

/// Renders a report as the human summary that `strait plan` prints.
pub struct Summary<'a> {
    /// The topology planned on.
    pub topology: &'a Topology,
    /// The parameters.
    pub params: &'a PlanParams,
    /// The outcome.
    pub report: &'a PlanReport,
}

impl fmt::Display for Summary<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (t, p, r) = (self.topology, self.params, self.report);
        let replicas: usize = r.per_node.iter().sum();
        writeln!(
            f,
            "plan: {} blocks, spec {} ({} replicas each), on {} idcs / {} racks / {} nodes",
            p.blocks,
            p.spec,
            p.spec.total(),
            t.idcs().len(),
            t.racks().len(),
            t.nodes().len()
        )?;
        let writers = match &p.writers {
            Writers::EveryNode => "every node in turn".to_string(),
            Writers::Fixed(o) => origin_name(t, o),
        };
        writeln!(f, "writers: {writers}; seed {}", p.seed)?;
        writeln!(f)?;
        writeln!(
            f,
            "{:<28} {:>10} {:>8}",
            "replicas per idc / rack", "replicas", "share"
        )?;
        for idc_id in t.idc_ids() {
            let idc = t.idc(idc_id);
            let n: usize = idc.nodes.iter().map(|n| r.per_node[n.index()]).sum();
            writeln!(f, "{:<28} {:>10} {:>7.1}%", idc.name, n, pct(n, replicas))?;
            for &rack_id in &idc.racks {
                let rack = t.rack(rack_id);
                let n: usize = rack.nodes.iter().map(|n| r.per_node[n.index()]).sum();
                let name = format!("  /{}/{}", idc.name, rack.name);
                writeln!(f, "{:<28} {:>10} {:>7.1}%", name, n, pct(n, replicas))?;
            }
        }
        let min = r.per_node.iter().min().copied().unwrap_or(0);
        let max = r.per_node.iter().max().copied().unwrap_or(0);
        let mean = replicas as f64 / r.per_node.len().max(1) as f64;
        writeln!(f, "per node: min {min}, mean {mean:.1}, max {max}")?;
        writeln!(f)?;
        writeln!(f, "pipeline order, first {} blocks:", r.examples.len())?;
        for (i, (writer, pl)) in r.examples.iter().enumerate() {
            let mut line = String::new();
            let mut prev: Option<NodeId> = None;
            for &n in pl.targets() {
                if let Some(prev) = prev {
                    line.push_str(if t.tier(prev, n).crosses_dci() {
                        " =DCI=> "
                    } else {
                        " -> "
                    });
                }
                let _ = write!(line, "{}", t.path(n));
                prev = Some(n);
            }
            writeln!(
                f,
                "  block {i:>3} from {:<20} {line}",
                origin_name(t, writer)
            )?;
        }
        writeln!(f)?;
        writeln!(f, "DCI crossings per block (between replicas):")?;
        for (c, n) in &r.crossings {
            writeln!(
                f,
                "  {c} crossing(s): {n} blocks ({:.1}%)",
                pct(*n, r.placed)
            )?;
        }
        writeln!(
            f,
            "writer -> first replica crosses the DCI: {} blocks",
            r.writer_hop_crossings
        )?;
        let (segs, spread) = r.rack_spread;
        if segs > 0 {
            writeln!(
                f,
                "rack spread: {spread} of {segs} multi-replica idc groups span 2+ racks ({:.1}%)",
                pct(spread, segs)
            )?;
        }
        let rate = r.placed as f64 / r.elapsed.as_secs_f64().max(1e-9);
        writeln!(
            f,
            "placed {} blocks, {} failed; {rate:.0} placements/s",
            r.placed, r.failed
        )?;
        if let Some(e) = &r.first_error {
            writeln!(f, "first failure: {e}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn example() -> Topology {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/two-idc.toml");
        Topology::from_file(path).unwrap()
    }

    #[test]
    fn example_topology_places_two_plus_two() {
        let t = example();
        let params = PlanParams {
            spec: "2+2".parse().unwrap(),
            blocks: 2000,
            writers: Writers::EveryNode,
            excluded: vec![],
            seed: 1,
            examples: 3,
        };
        let r = run(&t, &params);
        assert_eq!(r.placed, 2000);
        assert_eq!(r.failed, 0);
        assert_eq!(r.crossings.get(&1), Some(&2000));
        assert_eq!(r.writer_hop_crossings, 0);
        assert_eq!(r.rack_spread.0, r.rack_spread.1);
        for idc in t.idcs() {
            let n: usize = idc.nodes.iter().map(|n| r.per_node[n.index()]).sum();
            assert_eq!(
                n, 4000,
                "idc {} holds two replicas of every block",
                idc.name
            );
        }
        let text = Summary {
            topology: &t,
            params: &params,
            report: &r,
        }
        .to_string();
        assert!(
            text.contains("1 crossing(s): 2000 blocks (100.0%)"),
            "{text}"
        );
    }

    #[test]
    fn impossible_spec_reports_failures() {
        let t = example();
        let params = PlanParams {
            spec: "2+2+2".parse().unwrap(),
            blocks: 10,
            writers: Writers::EveryNode,
            excluded: vec![],
            seed: 1,
            examples: 0,
        };
        let r = run(&t, &params);
        assert_eq!(r.failed, 10);
        assert!(matches!(
            r.first_error,
            Some(PlacementError::NotEnoughIdcs { .. })
        ));
    }
}

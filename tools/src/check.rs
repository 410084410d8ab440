//! `strait fsck --manifest` and `strait repair --manifest`: a manifest's blocks checked
//! against the running cluster, and restored to their replica sets.
//!
//! `fsck` asks every storage node whether it holds each block (a zero-length read at the
//! manifest's genstamp: finalized and whole, corrupt, or not there) and reports, per
//! block, its holders per IDC against the manifest's set: under-replicated, missing, and
//! corrupt replicas. With `verify`, every holder's replica is also read whole and checked
//! chunk by chunk (a bad one is quarantined where it lives and reported). `repair` sends
//! each under-replicated block to a live holder (`RepairBlock`; the node plans and runs
//! the copies, class `repair`) and rewrites the manifest with the new replica lists.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;
use std::sync::Arc;

use futures_util::StreamExt;
use strait::block::{BlockId, GenStamp};
use strait::node::Node;
use strait::read::{ReadError, ReadParams, ReplicaFailure};
use strait::topology::{NodeId, Topology};
use strait::wire::{
    Compression, Frame, ReadBlock, ReadResponse, RepairBlock, Status, TrafficClass,
};

use crate::client::{ManifestEntry, client, format_manifest, parse_manifest};

/// What one node holds of one block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Held {
    /// Finalized at the manifest's genstamp, whole.
    Ok,
    /// Quarantined as corrupt (or failed `verify`).
    Corrupt,
    /// Not there (or another genstamp or length).
    No,
    /// The node did not answer.
    Unreachable,
}

/// One block's state across the cluster.
#[derive(Debug, Clone)]
pub struct BlockCheck {
    /// The manifest's line.
    pub entry: ManifestEntry,
    /// Nodes that hold it whole.
    pub holders: Vec<String>,
    /// Nodes whose replica is corrupt.
    pub corrupt: Vec<String>,
    /// IDCs with fewer holders than the manifest's set, with (holders, wanted).
    pub short: Vec<(String, usize, usize)>,
}

impl BlockCheck {
    /// No holder at all.
    pub fn missing(&self) -> bool {
        self.holders.is_empty()
    }
}

/// The result of `fsck --manifest`.
#[derive(Debug, Default)]
pub struct ClusterFsck {
    /// Every block, in manifest order.
    pub blocks: Vec<BlockCheck>,
    /// Nodes that did not answer.
    pub unreachable: Vec<String>,
}

impl ClusterFsck {
    /// Blocks with fewer replicas than their set (missing ones included).
    pub fn under_replicated(&self) -> usize {
        self.blocks.iter().filter(|b| !b.short.is_empty()).count()
    }
    /// Blocks with no replica left.
    pub fn missing(&self) -> usize {
        self.blocks.iter().filter(|b| b.missing()).count()
    }
    /// Corrupt replicas.
    pub fn corrupt(&self) -> usize {
        self.blocks.iter().map(|b| b.corrupt.len()).sum()
    }
    /// Whether every block is whole.
    pub fn healthy(&self) -> bool {
        self.under_replicated() == 0 && self.corrupt() == 0
    }
}

impl std::fmt::Display for ClusterFsck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for b in &self.blocks {
            if b.short.is_empty() && b.corrupt.is_empty() {
                continue;
            }
            let short: Vec<String> = b
                .short
                .iter()
                .map(|(idc, have, want)| format!("{idc} {have}/{want}"))
                .collect();
            writeln!(
                f,
                "{} {}: {}; holders [{}]{}",
                b.entry.block,
                b.entry.genstamp,
                if b.missing() {
                    "MISSING"
                } else {
                    "under-replicated"
                },
                b.holders.join(","),
                if b.corrupt.is_empty() {
                    String::new()
                } else {
                    format!("; corrupt on [{}]", b.corrupt.join(","))
                }
            )?;
            if !short.is_empty() {
                writeln!(f, "  short: {}", short.join(", "))?;
            }
        }
        if !self.unreachable.is_empty() {
            writeln!(f, "unreachable: {}", self.unreachable.join(","))?;
        }
        writeln!(
            f,
            "fsck: {} blocks, {} under-replicated, {} missing, {} corrupt replica(s)",
            self.blocks.len(),
            self.under_replicated(),
            self.missing(),
            self.corrupt()
        )
    }
}

async fn ask(node: &Node, peer: NodeId, frame: &Frame) -> Result<Option<Frame>, String> {
    let mut s = node
        .transport()
        .open(peer)
        .await
        .map_err(|e| e.to_string())?;
    s.writer.send(frame).await.map_err(|e| e.to_string())?;
    s.reader.recv().await.map_err(|e| e.to_string())
}

/// What `peer` says it holds of `block` at `genstamp` (a zero-length read): its answer,
/// `Ok(None)` for anything but a read response, `Err` when it cannot be asked.
pub async fn probe(
    node: &Node,
    peer: NodeId,
    block: BlockId,
    genstamp: GenStamp,
) -> Result<Option<ReadResponse>, String> {
    let probe = Frame::ReadBlock(ReadBlock {
        block,
        genstamp,
        offset: 0,
        len: 0,
        class: TrafficClass::Repair,
        compression: Compression::None,
    });
    match ask(node, peer, &probe).await? {
        Some(Frame::ReadResponse(r)) => Ok(Some(r)),
        _ => Ok(None),
    }
}

async fn held(node: &Node, peer: NodeId, e: &ManifestEntry, verify: bool) -> Held {
    let answer = match probe(node, peer, e.block, e.genstamp).await {
        Ok(Some(r)) => r,
        Ok(None) => return Held::No,
        Err(_) => return Held::Unreachable,
    };
    match answer.status {
        Status::Success if answer.finalized && answer.replica_len == e.len => {}
        Status::Corrupt => return Held::Corrupt,
        _ => return Held::No,
    }
    if verify {
        let r = node.reader(e.block, e.genstamp, &[peer], ReadParams::default());
        match r.read(0, e.len).await {
            Ok(_) => {}
            Err(ReadError::NoReplica { tried, .. })
                if tried
                    .iter()
                    .any(|(_, f)| matches!(f, ReplicaFailure::Corrupt(_))) =>
            {
                return Held::Corrupt;
            }
            Err(_) => return Held::Unreachable,
        }
    }
    Held::Ok
}

/// Checks every block of `entries` on every storage node, 16 probes at a time.
async fn check(
    node: &Node,
    topo: &Arc<Topology>,
    entries: &[ManifestEntry],
    verify: bool,
) -> ClusterFsck {
    let storage: Vec<NodeId> = topo
        .node_ids()
        .filter(|&n| topo.node(n).capacity > 0)
        .collect();
    let probes = entries.iter().enumerate().flat_map(|(i, e)| {
        storage
            .iter()
            .map(move |&n| async move { (i, n, held(node, n, e, verify).await) })
    });
    let answers: Vec<(usize, NodeId, Held)> = futures_util::stream::iter(probes)
        .buffer_unordered(16)
        .collect()
        .await;
    let mut out = ClusterFsck::default();
    let mut unreachable = std::collections::BTreeSet::new();
    for (i, e) in entries.iter().enumerate() {
        let mut holders = Vec::new();
        let mut corrupt = Vec::new();
        for &(_, n, h) in answers.iter().filter(|a| a.0 == i) {
            let name = topo.node(n).name.clone();
            match h {
                Held::Ok => holders.push(n),
                Held::Corrupt => corrupt.push(name),
                Held::Unreachable => {
                    unreachable.insert(name);
                }
                Held::No => {}
            }
        }
        holders.sort();
        corrupt.sort();
        // Wanted per IDC: the manifest's set.
        let mut want: BTreeMap<String, (usize, usize)> = BTreeMap::new();
        for r in &e.replicas {
            if let Some(id) = topo.node_by_name(r) {
                let idc = topo.idc(topo.location(id).idc).name.clone();
                want.entry(idc).or_default().1 += 1;
            }
        }
        for &h in &holders {
            let idc = topo.idc(topo.location(h).idc).name.clone();
            if let Some(w) = want.get_mut(&idc) {
                w.0 += 1;
            }
        }
        out.blocks.push(BlockCheck {
            entry: e.clone(),
            holders: holders.iter().map(|&h| topo.node(h).name.clone()).collect(),
            corrupt,
            short: want
                .into_iter()
                .filter(|(_, (have, want))| have < want)
                .map(|(idc, (have, want))| (idc, have, want))
                .collect(),
        });
    }
    out.unreachable = unreachable.into_iter().collect();
    out
}

/// `strait fsck --manifest`: the blocks of `manifest` on the cluster in `dir`, checked
/// from a client in `idc`.
pub async fn fsck(
    dir: &Path,
    manifest: &str,
    idc: &str,
    verify: bool,
) -> Result<ClusterFsck, String> {
    let entries = parse_manifest(manifest)?;
    let (node, topo) = client(dir, idc).await?;
    let report = check(&node, &topo, &entries, verify).await;
    node.shutdown().await;
    Ok(report)
}

/// What `strait repair --manifest` did.
#[derive(Debug)]
pub struct RepairRun {
    /// One line per block repaired or failed, then a summary.
    pub report: String,
    /// The manifest with each block's replicas as they are now.
    pub manifest: String,
    /// Blocks still short of their set.
    pub failed: usize,
}

/// `strait repair --manifest`: every under-replicated block of `manifest` is sent to a
/// live holder (in the client's IDC first) to be restored to its set.
pub async fn repair(dir: &Path, manifest: &str, idc: &str) -> Result<RepairRun, String> {
    let mut entries = parse_manifest(manifest)?;
    let (node, topo) = client(dir, idc).await?;
    let before = check(&node, &topo, &entries, false).await;
    let my_idc = topo.location(node.id()).idc;
    let mut report = String::new();
    let (mut repaired, mut failed) = (0, 0);
    let mut bytes = [0u64; 4];
    for (i, b) in before.blocks.iter().enumerate() {
        if b.short.is_empty() {
            entries[i].replicas = b.holders.clone();
            continue;
        }
        let mut holders: Vec<NodeId> = b
            .holders
            .iter()
            .filter_map(|h| topo.node_by_name(h))
            .collect();
        holders.sort_by_key(|&h| topo.location(h).idc != my_idc);
        let Some(&via) = holders.first() else {
            failed += 1;
            let _ = writeln!(report, "{}: no replica left, cannot repair", b.entry.block);
            continue;
        };
        let req = Frame::RepairBlock(RepairBlock {
            block: b.entry.block,
            genstamp: b.entry.genstamp,
            len: b.entry.len,
            replicas: b.entry.replicas.clone(),
        });
        match ask(&node, via, &req).await {
            Ok(Some(Frame::RepairResult(r))) if r.status == Status::Success => {
                repaired += 1;
                let copies: Vec<String> = r
                    .copied
                    .iter()
                    .zip(&r.tiers)
                    .map(|(n, &t)| {
                        bytes[t.min(3) as usize] += b.entry.len;
                        format!("{n} over {}", tier_name(t))
                    })
                    .collect();
                let _ = writeln!(
                    report,
                    "{}: repaired by {}: {}",
                    b.entry.block,
                    topo.node(via).name,
                    if copies.is_empty() {
                        "nothing to copy".into()
                    } else {
                        copies.join(", ")
                    }
                );
                entries[i].replicas = r.replicas;
            }
            Ok(Some(Frame::RepairResult(r))) => {
                failed += 1;
                let _ = writeln!(report, "{}: {:?}: {}", b.entry.block, r.status, r.message);
            }
            Ok(other) => {
                failed += 1;
                let _ = writeln!(report, "{}: unexpected answer {other:?}", b.entry.block);
            }
            Err(e) => {
                failed += 1;
                let _ = writeln!(report, "{}: {}: {e}", b.entry.block, topo.node(via).name);
            }
        }
    }
    node.shutdown().await;
    let _ = writeln!(
        report,
        "repair: {} blocks, {} under-replicated, {repaired} repaired, {failed} failed; copied bytes by tier: rack {}, idc {}, dci {}",
        before.blocks.len(),
        before.under_replicated(),
        bytes[1],
        bytes[2],
        bytes[3]
    );
    Ok(RepairRun {
        report,
        manifest: format_manifest(&entries),
        failed,
    })
}

fn tier_name(t: u8) -> &'static str {
    match t {
        0 => "node",
        1 => "rack",
        2 => "idc",
        _ => "dci",
    }
}

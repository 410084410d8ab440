//! `strait-bench repair`: a node lost under load, and the time until every block is back
//! at 2+2.
//!
//! Two IDCs × 4 nodes (two racks each) in-process, every node running the repair service
//! with its defaults (probe every 1 s, down after 3 s). `blocks` blocks are written 2+2
//! (random placement from a1), then a concurrent writer starts: one sync 2+2 block of
//! `writer_block` bytes after another, placed on live nodes. Its write latency is measured
//! for `window` seconds before the loss; then node a2 stops (its transport closes, as a
//! kill would close its sockets) and the clock runs until every block a2 held has a new
//! replica in idc-a, read back and verified. The writer's latency over the same length of
//! time after the loss gives the p99 ratio. The writer's own blocks written with a2
//! before the loss are owed a repair too, and counted.
//!
//! Reference measured in the same run: writing and fsyncing the repaired bytes as plain
//! files on the same filesystem (what one disk needs to take the copies).

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use rand::SeedableRng;
use serde_json::json;
use strait::block::{BlockId, GenStamp};
use strait::node::Node;
use strait::pipeline::WriteParams;
use strait::placement::{self, NodeStates, ReplicationSpec};
use strait::read::ReadParams;
use strait::repair::RepairConfig;
use strait::store::ReplicaState;
use strait::topology::{NodeId, Origin, Tier, Topology};
use strait::transport::CertAuthority;

use super::{Latency, Table, r3};

/// What to run.
#[derive(Debug, Clone)]
pub struct RepairBenchParams {
    /// Blocks written before the loss.
    pub blocks: usize,
    /// Bytes per block.
    pub block_size: usize,
    /// Bytes per block of the concurrent writer.
    pub writer_block: usize,
    /// Seconds of the writer measured before the loss.
    pub window: u64,
    /// DCI budget, bytes per second.
    pub budget: u64,
    /// Repairs each node runs at once (`RepairConfig::workers`).
    pub workers: usize,
    /// Directory for the node stores and repair queues.
    pub dir: std::path::PathBuf,
}

const LOST: &str = "a2";

fn pattern(seed: u64, len: usize) -> Bytes {
    Bytes::from(super::random_bytes(seed, len))
}

async fn write(node: &Node, block: BlockId, targets: &[NodeId], data: Bytes) -> Result<(), String> {
    let mut w = node
        .writer(block, targets, WriteParams::new(GenStamp(1)))
        .await
        .map_err(|e| e.to_string())?;
    w.write(data).await.map_err(|e| e.to_string())?;
    w.close().await.map_err(|e| e.to_string())?;
    Ok(())
}

/// Places a 2+2 block from idc-a on the nodes not in `excluded`.
fn place(
    topo: &Topology,
    excluded: &[NodeId],
    rng: &mut rand::rngs::StdRng,
) -> Result<Vec<NodeId>, String> {
    let spec: ReplicationSpec = "2+2".parse().map_err(|e| format!("{e}"))?;
    let origin = Origin::in_idc(topo.idc_by_name("idc-a").ok_or("no idc-a")?);
    let states = NodeStates::from_topology(topo);
    placement::choose_targets(topo, &origin, &spec, excluded, &states, rng)
        .map(|p| p.targets().to_vec())
        .map_err(|e| e.to_string())
}

/// Runs the scenario; prints the table and returns the JSON line.
pub async fn run(p: &RepairBenchParams) -> Result<serde_json::Value, String> {
    let net = std::process::id() as u8;
    let topo = super::two_idc_topology([7, net], 7900, 4, p.budget)?;
    let ca = CertAuthority::generate("repair bench CA").map_err(|e| e.to_string())?;
    let _ = std::fs::remove_dir_all(&p.dir);
    let mut nodes = Vec::new();
    for n in topo.nodes() {
        let queue = p.dir.join(format!("{}-repair", n.name));
        let node = super::start_node(&topo, &ca, &n.name, p.dir.join(&n.name), |cfg| {
            let mut r = RepairConfig::new(queue);
            r.workers = p.workers;
            cfg.repair = Some(r);
        })
        .await?;
        nodes.push(node);
    }
    let by_name = |name: &str| -> Result<&Node, String> {
        nodes
            .iter()
            .find(|n| topo.node(n.id()).name == name)
            .ok_or(format!("no node {name}"))
    };
    let a1 = by_name("a1")?.clone();
    let lost = by_name(LOST)?.clone();
    let lost_id = lost.id();

    // The data set.
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut set = Vec::new();
    for i in 0..p.blocks {
        let block = BlockId(1_000_000 + i as u64);
        let targets = place(&topo, &[], &mut rng)?;
        write(&a1, block, &targets, pattern(i as u64, p.block_size)).await?;
        set.push((block, targets));
    }
    // (block, pattern seed, length) of every block written with the lost node.
    let mut owed: Vec<(BlockId, u64, usize)> = set
        .iter()
        .enumerate()
        .filter(|(_, (_, t))| t.contains(&lost_id))
        .map(|(i, (b, _))| (*b, i as u64, p.block_size))
        .collect();
    let data_set_owed = owed.len();

    // The concurrent writer, one phase before the loss and one after. Its blocks that
    // were written with the lost node are owed a repair too.
    let stop = Arc::new(AtomicBool::new(false));
    let after_loss = Arc::new(AtomicBool::new(false));
    let written = Arc::new(std::sync::Mutex::new(Vec::new()));
    let writer = {
        let (topo, a1, stop, after_loss) =
            (topo.clone(), a1.clone(), stop.clone(), after_loss.clone());
        let written = written.clone();
        let len = p.writer_block;
        tokio::spawn(async move {
            let mut rng = rand::rngs::StdRng::seed_from_u64(11);
            let (mut before, mut after) = (Latency::default(), Latency::default());
            let mut failed = 0u64;
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let lost_now = after_loss.load(Ordering::Relaxed);
                let excluded = if lost_now { vec![lost_id] } else { vec![] };
                let Ok(targets) = place(&topo, &excluded, &mut rng) else {
                    break;
                };
                let t0 = Instant::now();
                let block = BlockId(5_000_000 + i);
                let ok = write(&a1, block, &targets, pattern(5_000_000 + i, len)).await;
                if ok.is_ok() && !lost_now && targets.contains(&lost_id) {
                    written
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push((block, 5_000_000 + i));
                }
                i += 1;
                match (ok, lost_now) {
                    (Ok(()), false) => before.record(t0.elapsed()),
                    (Ok(()), true) => after.record(t0.elapsed()),
                    (Err(_), _) => failed += 1,
                }
            }
            (before, after, failed)
        })
    };
    tokio::time::sleep(Duration::from_secs(p.window)).await;
    let bytes_before: [u64; 4] = tier_sum(&nodes);

    // The loss.
    let t_kill = Instant::now();
    after_loss.store(true, Ordering::Relaxed);
    lost.shutdown().await;
    owed.extend(
        written
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|&(b, seed)| (b, seed, p.writer_block)),
    );
    let live: Vec<Node> = nodes
        .iter()
        .filter(|n| n.id() != lost_id)
        .cloned()
        .collect();
    let mut detected = None;
    let mut down_at = None;
    let mut restored = HashSet::new();
    let limit = Duration::from_secs(120 + p.blocks as u64);
    while restored.len() < owed.len() {
        if t_kill.elapsed() > limit {
            stop.store(true, Ordering::Relaxed);
            return Err(format!(
                "only {} of {} blocks restored after {limit:?}",
                restored.len(),
                owed.len()
            ));
        }
        if detected.is_none()
            && live.iter().any(|n| {
                n.metrics().repairs_done.load(Ordering::Relaxed) > 0
                    || n.repair_status().is_some_and(|s| s.pending > 0)
            })
        {
            detected = Some(t_kill.elapsed());
        }
        if down_at.is_none()
            && live
                .iter()
                .any(|n| n.repair_status().is_some_and(|s| s.down.contains(&lost_id)))
        {
            down_at = Some(t_kill.elapsed());
        }
        for &(block, _, len) in &owed {
            if restored.contains(&block) {
                continue;
            }
            let holders: Vec<&Node> = live
                .iter()
                .filter(|n| {
                    n.store()
                        .get(block)
                        .is_some_and(|r| r.state == ReplicaState::Finalized && r.len == len as u64)
                })
                .collect();
            let in_a = holders
                .iter()
                .filter(|n| topo.location(n.id()).idc == topo.location(a1.id()).idc)
                .count();
            if holders.len() == 4 && in_a == 2 {
                restored.insert(block);
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let restore = t_kill.elapsed();
    // Hold the writer's second phase as long as the first, at least until restored.
    let rest = Duration::from_secs(p.window).saturating_sub(restore);
    tokio::time::sleep(rest).await;
    stop.store(true, Ordering::Relaxed);
    let (before, after, failed) = writer.await.map_err(|e| e.to_string())?;
    let bytes_after = tier_sum(&nodes);
    let repaired: Vec<u64> = (0..4).map(|t| bytes_after[t] - bytes_before[t]).collect();

    // Verify every replica of every owed block, read on its own.
    let mut verified = 0;
    for &(block, seed, len) in &owed {
        let want = pattern(seed, len);
        for n in &live {
            let Some(info) = n.store().get(block) else {
                continue;
            };
            let r = a1.reader(block, info.genstamp, &[n.id()], ReadParams::default());
            let got = r
                .read(0, len as u64)
                .await
                .map_err(|e| format!("verify {block} on {}: {e}", topo.node(n.id()).name))?;
            if got != want {
                return Err(format!("{block} on {} differs", topo.node(n.id()).name));
            }
            verified += 1;
        }
    }

    // Reference: the repaired bytes written and fsynced as plain files on the same disk.
    let lost_bytes: u64 = owed.iter().map(|o| o.2 as u64).sum();
    let repaired_total: u64 = repaired.iter().sum();
    let raw = raw_copy(&p.dir.join("raw"), repaired_total, p.writer_block)?;
    for n in &live {
        n.shutdown().await;
    }
    let _ = std::fs::remove_dir_all(&p.dir);

    let detect = detected.unwrap_or(restore);
    // Copying starts for most blocks once the probes count the node down.
    let copy = restore.saturating_sub(down_at.unwrap_or(detect));
    let p99_ratio = after.at(0.99) as f64 / before.at(0.99).max(1) as f64;
    println!(
        "repair: 2 IDCs x 4 nodes, {} blocks of {} KiB 2+2 and a concurrent sync writer of {} KiB blocks; {LOST} stopped: {} blocks ({data_set_owed} of the set, the rest the writer's; {:.1} MB) lost a replica",
        p.blocks,
        p.block_size >> 10,
        p.writer_block >> 10,
        owed.len(),
        lost_bytes as f64 / 1e6
    );
    let mut t = Table::new(&["figure", "value"]);
    t.row(vec![
        format!("stop -> {LOST} counted down (probes)"),
        down_at.map_or("-".into(), |d| format!("{:.2} s", d.as_secs_f64())),
    ]);
    t.row(vec![
        "stop -> first repair queued (a write's recovery or the probes)".into(),
        format!("{:.2} s", detect.as_secs_f64()),
    ]);
    t.row(vec![
        "stop -> every block at 2+2, verified".into(),
        format!("{:.2} s", restore.as_secs_f64()),
    ]);
    t.row(vec![
        "copy time (counted down -> restored)".into(),
        format!("{:.2} s", copy.as_secs_f64()),
    ]);
    t.row(vec![
        "reference: write+fsync the repaired bytes as files".into(),
        format!("{:.2} s", raw.as_secs_f64()),
    ]);
    for tier in Tier::ALL {
        t.row(vec![
            format!("repair bytes, tier {}", tier.name()),
            repaired[tier as usize].to_string(),
        ]);
    }
    t.row(vec!["replicas verified after".into(), verified.to_string()]);
    t.row(vec![
        "writer p50/p99 before, us".into(),
        format!("{} / {}", before.at(0.5), before.at(0.99)),
    ]);
    t.row(vec![
        "writer p50/p99 during repair, us".into(),
        format!("{} / {}", after.at(0.5), after.at(0.99)),
    ]);
    t.row(vec![
        "writer blocks before / after / failed".into(),
        format!("{} / {} / {failed}", before.count(), after.count()),
    ]);
    print!("{}", t.render());
    Ok(json!({
        "scenario": "repair",
        "blocks": p.blocks,
        "owed_blocks": owed.len(),
        "down_s": down_at.map(|d| r3(d.as_secs_f64())),
        "repaired_bytes": repaired_total,
        "block_bytes": p.block_size,
        "detect_s": r3(detect.as_secs_f64()),
        "restore_s": r3(restore.as_secs_f64()),
        "copy_s": r3(copy.as_secs_f64()),
        "raw_copy_s": r3(raw.as_secs_f64()),
        "copy_ratio": r3(copy.as_secs_f64() / raw.as_secs_f64().max(1e-6)),
        "dci_bytes": repaired[Tier::Dci as usize],
        "rack_bytes": repaired[Tier::Rack as usize],
        "idc_bytes": repaired[Tier::Idc as usize],
        "sync_p99_before_us": before.at(0.99),
        "sync_p99_during_us": after.at(0.99),
        "sync_p99_ratio": r3(p99_ratio),
        "writer_failed": failed,
        "workers": p.workers,
    }))
}

/// Repair bytes by tier, summed over `nodes`.
fn tier_sum(nodes: &[Node]) -> [u64; 4] {
    let mut out = [0u64; 4];
    for n in nodes {
        for t in Tier::ALL {
            out[t as usize] += n.metrics().repair_bytes.get(t);
        }
    }
    out
}

/// Writes `total` bytes under `dir` as files of `len` bytes and fsyncs each; the time it
/// took.
fn raw_copy(dir: &std::path::Path, total: u64, len: usize) -> Result<Duration, String> {
    use std::io::Write;
    std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    let data = pattern(99, len);
    let count = total.div_ceil(len.max(1) as u64);
    let t0 = Instant::now();
    for i in 0..count {
        let mut f = std::fs::File::create(dir.join(format!("{i}"))).map_err(|e| e.to_string())?;
        f.write_all(&data).map_err(|e| e.to_string())?;
        f.sync_all().map_err(|e| e.to_string())?;
    }
    Ok(t0.elapsed())
}

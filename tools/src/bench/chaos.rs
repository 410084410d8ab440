//! `strait-bench chaos`: a local cluster of real daemon processes (2 IDCs × 2 racks × 2
//! nodes, one emulated DCI link per IDC pair and direction), mixed sync and async writers for a
//! fixed time, while a seeded schedule `kill -9`s and restarts random daemons and,
//! separately, freezes one (`SIGSTOP`: a hop that goes silent without closing anything)
//! for a few seconds. Afterwards the async backlog drains, and every acknowledged block is
//! read back from both IDCs and compared with what was written; every daemon is asked
//! whether it holds each block finalized.
//!
//! What must hold: no acknowledged block is lost or reads back wrong. Replicas per block
//! are reported as they are (a node dropped from a pipeline leaves 3 until repair).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt;
use rand::{RngExt, SeedableRng};
use serde_json::json;
use strait::block::{BlockId, GenStamp};
use strait::node::Node;
use strait::pipeline::WriteParams;
use strait::placement::{self, NodeStates};
use strait::read::ReadParams;
use strait::topology::{NodeId, Origin, Topology};
use strait::wire::{Status, WriteMode};

use super::{Table, random_bytes};
use crate::cluster::{self, ClusterSpec};

/// What to run.
#[derive(Debug, Clone)]
pub struct ChaosParams {
    /// Work directory of the cluster (emptied first).
    pub dir: PathBuf,
    /// Seconds of writing under chaos.
    pub seconds: u64,
    /// `kill -9` + restart events.
    pub kills: usize,
    /// `SIGSTOP` + `SIGCONT` events.
    pub stalls: usize,
    /// Concurrent writers (half sync, half async).
    pub writers: usize,
    /// Bytes per block.
    pub block_size: usize,
    /// Seed of the schedule and of the block contents.
    pub seed: u64,
    /// DCI rate of the emulated link.
    pub dci_rate: u64,
}

/// One acknowledged block.
#[derive(Debug, Clone)]
struct Acked {
    block: BlockId,
    genstamp: GenStamp,
    len: usize,
    replicas: Vec<NodeId>,
    mode: WriteMode,
}

fn content(block: BlockId, len: usize) -> Vec<u8> {
    random_bytes(block.0, len)
}

/// Whether `node` holds `block` finalized at `gs` (asked over the network).
async fn holds(from: &Node, node: NodeId, block: BlockId, gs: GenStamp) -> bool {
    let ask = crate::check::probe(from, node, block, gs);
    matches!(
        tokio::time::timeout(Duration::from_secs(5), ask).await,
        Ok(Ok(Some(r))) if r.status == Status::Success && r.finalized
    )
}

/// One writer's job.
struct Job {
    index: u64,
    node: Node,
    topo: Arc<Topology>,
    mode: WriteMode,
    block_size: usize,
    /// Bytes per second at most (async writers keep to their share of the DCI: the RPO
    /// guard lives with a log, and a client has none).
    pace: Option<u64>,
}

/// Failed (unacknowledged) writes, by the start of their error message.
type Failures = Arc<std::sync::Mutex<BTreeMap<String, u64>>>;

fn count(failures: &Failures, why: String) {
    let key: String = why.chars().take(70).collect();
    *failures
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .entry(key)
        .or_default() += 1;
}

async fn writer(
    job: Job,
    stop: Arc<AtomicBool>,
    acked: Arc<std::sync::Mutex<Vec<Acked>>>,
    failed: Failures,
) {
    let Job {
        index,
        node,
        topo,
        mode,
        block_size,
        pace,
    } = job;
    let started = Instant::now();
    let mut written = 0u64;
    let origin = Origin::in_idc(topo.location(node.id()).idc);
    let states = NodeStates::from_topology(&topo);
    let clients: Vec<NodeId> = topo
        .nodes()
        .iter()
        .filter(|n| n.name.starts_with("client-"))
        .filter_map(|n| topo.node_by_name(&n.name))
        .collect();
    let spec = "2+2".parse().expect("valid spec");
    let mut rng = rand::rngs::StdRng::seed_from_u64(index);
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        if let Some(rate) = pace {
            let due = started + Duration::from_secs_f64(written as f64 / rate.max(1) as f64);
            tokio::time::sleep_until(due.into()).await;
        }
        written += block_size as u64;
        let block = BlockId((index << 32) | n);
        n += 1;
        let p = match placement::choose_targets(&topo, &origin, &spec, &clients, &states, &mut rng)
        {
            Ok(p) => p,
            Err(e) => {
                count(&failed, format!("placement: {e}"));
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let data = Bytes::from(content(block, block_size));
        let mut params = WriteParams::new(GenStamp(1));
        params.mode = mode;
        // Both ways of setting a pipeline up meet the faults.
        params.setup_with_first_packet = n.is_multiple_of(2);
        let done = async {
            let mut w = node.writer(block, p.targets(), params).await?;
            w.write(data).await?;
            w.close().await
        }
        .await;
        match done {
            Ok(out) => acked.lock().unwrap_or_else(|e| e.into_inner()).push(Acked {
                block,
                genstamp: out.genstamp,
                len: out.len as usize,
                replicas: out
                    .replicas
                    .iter()
                    .chain(&out.queued_remote)
                    .copied()
                    .collect(),
                mode,
            }),
            // Not acknowledged: nothing is promised for this block.
            Err(e) => count(&failed, format!("{mode:?}: {e}")),
        }
    }
}

/// Runs the scenario; prints the table and returns the JSON summary.
pub async fn run(p: &ChaosParams) -> Result<serde_json::Value, String> {
    let dir = p.dir.clone();
    if cluster::processes(&dir).is_ok() {
        let d = dir.clone();
        let _ = tokio::task::spawn_blocking(move || cluster::down(&d)).await;
    }
    let _ = std::fs::remove_dir_all(&dir);
    let spec = ClusterSpec {
        idcs: 2,
        racks: 2,
        nodes_per_rack: 2,
        dci_rate: p.dci_rate,
        dci_delay: Duration::from_millis(2),
    };
    let d = dir.clone();
    tokio::task::spawn_blocking(move || cluster::up(&d, &spec))
        .await
        .map_err(|e| e.to_string())??;
    let result = chaos(p).await;
    let d = dir.clone();
    let down = tokio::task::spawn_blocking(move || cluster::down(&d))
        .await
        .map_err(|e| e.to_string())?;
    let out = result?;
    down?;
    Ok(out)
}

async fn chaos(p: &ChaosParams) -> Result<serde_json::Value, String> {
    let dir = &p.dir;
    let (client_a, topo) = crate::client::client(dir, "idc-a").await?;
    let (client_b, _) = crate::client::client(dir, "idc-b").await?;
    let daemons: Vec<(String, std::net::SocketAddr)> = cluster::plan(&ClusterSpec {
        idcs: 2,
        racks: 2,
        nodes_per_rack: 2,
        dci_rate: p.dci_rate,
        dci_delay: Duration::from_millis(2),
    })
    .into_iter()
    .filter(|n| !n.client)
    .map(|n| (n.name, n.metrics))
    .collect();

    // Writers: half sync, half async, from both IDCs.
    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(std::sync::Mutex::new(Vec::new()));
    let failed: Failures = Arc::default();
    let mut tasks = Vec::new();
    for i in 0..p.writers.max(1) as u64 {
        let node = if i % 2 == 0 {
            client_a.clone()
        } else {
            client_b.clone()
        };
        let mode = if i % 4 < 2 {
            WriteMode::Sync
        } else {
            WriteMode::Async
        };
        let async_writers = (p.writers.max(1) as u64 / 2).max(1);
        let job = Job {
            index: i + 1,
            node,
            topo: topo.clone(),
            mode,
            block_size: p.block_size,
            pace: (mode == WriteMode::Async).then_some(p.dci_rate / async_writers),
        };
        tasks.push(tokio::spawn(writer(
            job,
            stop.clone(),
            acked.clone(),
            failed.clone(),
        )));
    }

    // The schedule: kills and stalls spread evenly, interleaved, seeded.
    let t0 = Instant::now();
    let events = p.kills + p.stalls;
    let gap = Duration::from_secs(p.seconds).div_f64((events + 1) as f64);
    let mut rng = rand::rngs::StdRng::seed_from_u64(p.seed);
    let (mut kills, mut stalls) = (0usize, 0usize);
    let mut log = Vec::new();
    for e in 0..events {
        tokio::time::sleep_until((t0 + gap * (e as u32 + 1)).into()).await;
        let (name, metrics) = daemons[rng.random_range(0..daemons.len())].clone();
        let pid = cluster::pid_of(dir, &name)?;
        // Stalls are spread among the kills: every (events / stalls)-th event.
        let stall = p.stalls > 0 && e % (events / p.stalls).max(1) == 0 && stalls < p.stalls;
        if stall {
            cluster::signal(pid, "-STOP")?;
            tokio::time::sleep(Duration::from_secs(3)).await;
            cluster::signal(pid, "-CONT")?;
            stalls += 1;
            log.push(format!(
                "{:>5.1}s stall {name} 3s",
                t0.elapsed().as_secs_f64()
            ));
        } else {
            cluster::signal(pid, "-KILL")?;
            tokio::time::sleep(Duration::from_millis(rng.random_range(100..800))).await;
            let (d, n) = (dir.clone(), name.clone());
            tokio::task::spawn_blocking(move || cluster::restart_node(&d, &n, metrics))
                .await
                .map_err(|e| e.to_string())??;
            kills += 1;
            log.push(format!(
                "{:>5.1}s kill -9 {name}, restarted",
                t0.elapsed().as_secs_f64()
            ));
        }
    }
    tokio::time::sleep_until((t0 + Duration::from_secs(p.seconds)).into()).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        let _ = t.await;
    }
    let written_for = t0.elapsed();

    // The async backlog drains (the logs survived the kills).
    let addrs: Vec<_> = daemons.iter().map(|(_, a)| *a).collect();
    let (pending, drained_in) = settle(&addrs, "strait_replication_pending_tasks", 120).await?;
    // The repairs the kills left owed finish (bounded: a repair that waits for the DCI
    // grace period would take longer).
    let (_, repaired_in) = settle(&addrs, "strait_repair_queue_depth", 60).await?;
    let repair_tiers = {
        let a = addrs.clone();
        tokio::task::spawn_blocking(move || {
            ["rack", "idc", "dci"].map(|t| {
                cluster::scrape_labelled(&a, "strait_repair_bytes_total", &format!("tier=\"{t}\""))
            })
        })
        .await
        .map_err(|e| e.to_string())?
    };

    // Every acknowledged block, read back from both IDCs, and counted where it is.
    let acked = acked.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let all: Vec<NodeId> = daemons
        .iter()
        .filter_map(|(n, _)| topo.node_by_name(n))
        .collect();
    let (mut verified, mut lost, mut corrupt) = (0usize, 0usize, 0usize);
    let mut unreadable_from = [0usize; 2];
    let mut histogram: BTreeMap<usize, usize> = BTreeMap::new();
    let mut by_mode = [0usize; 2];
    let check = |a: Acked| {
        let (client_a, client_b, all) = (&client_a, &client_b, &all);
        async move {
            let expect = content(a.block, a.len);
            // Read back from each IDC (its nearest replicas first, failing over).
            let mut outcome = [None, None];
            for (i, c) in [client_a, client_b].into_iter().enumerate() {
                let r = c.reader(a.block, a.genstamp, &a.replicas, ReadParams::default());
                outcome[i] = r.read_all().await.ok().map(|b| b[..] == expect[..]);
            }
            let probes = all
                .iter()
                .map(|&node| holds(client_a, node, a.block, a.genstamp));
            let held = futures_util::future::join_all(probes)
                .await
                .into_iter()
                .filter(|&h| h)
                .count();
            (a.mode, outcome, held)
        }
    };
    let mut checks = futures_util::stream::iter(acked.iter().cloned())
        .map(check)
        .buffer_unordered(16);
    while let Some((mode, outcome, held)) = checks.next().await {
        // Some(true): right bytes; Some(false): wrong bytes; None: unreadable.
        for (i, o) in outcome.iter().enumerate() {
            if o.is_none() {
                unreadable_from[i] += 1;
            }
        }
        if outcome.contains(&Some(false)) {
            corrupt += 1;
        } else if outcome.contains(&Some(true)) {
            verified += 1;
        } else {
            lost += 1;
        }
        *histogram.entry(held).or_default() += 1;
        by_mode[usize::from(mode == WriteMode::Async)] += 1;
    }
    drop(checks);
    client_a.shutdown().await;
    client_b.shutdown().await;

    let min_replicas = histogram.keys().next().copied().unwrap_or(0);
    let failures = failed.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let failures_total: u64 = failures.values().sum();
    let mb = (acked.iter().map(|a| a.len).sum::<usize>()) as f64 / 1e6;
    println!(
        "chaos: 2 idcs x 4 daemons (real processes, DCI emulated at {}), {} writers ({} sync / {} async blocks acked), {:.0} s, {} kills, {} stalls, seed {}",
        strait::units::fmt_rate(p.dci_rate),
        p.writers,
        by_mode[0],
        by_mode[1],
        written_for.as_secs_f64(),
        kills,
        stalls,
        p.seed
    );
    for l in &log {
        println!("  {l}");
    }
    let mut t = Table::new(&["what", "count"]);
    for (k, v) in [
        ("acked blocks", acked.len().to_string()),
        ("acked MB", format!("{mb:.1}")),
        ("failed (unacked) writes", failures_total.to_string()),
        ("verified blocks", verified.to_string()),
        ("lost blocks", lost.to_string()),
        ("corrupt reads", corrupt.to_string()),
        ("unreadable from idc-a", unreadable_from[0].to_string()),
        ("unreadable from idc-b", unreadable_from[1].to_string()),
        (
            "async drain after writes (s)",
            format!("{:.1}", drained_in.as_secs_f64()),
        ),
        (
            "repair queues empty after that (s)",
            format!("{:.1}", repaired_in.as_secs_f64()),
        ),
        (
            "repair MB over rack / idc / dci",
            format!(
                "{:.1} / {:.1} / {:.1}",
                repair_tiers[0] / 1e6,
                repair_tiers[1] / 1e6,
                repair_tiers[2] / 1e6
            ),
        ),
        ("async tasks left", format!("{pending}")),
    ] {
        t.row(vec![k.to_string(), v]);
    }
    for (n, count) in &histogram {
        t.row(vec![
            format!("blocks with {n} finalized replicas"),
            count.to_string(),
        ]);
    }
    print!("{}", t.render());
    for (why, n) in &failures {
        println!("  failed x{n}: {why}");
    }
    Ok(json!({
        "scenario": "chaos",
        "seconds": p.seconds,
        "seed": p.seed,
        "kills": kills,
        "stalls": stalls,
        "acked_blocks": acked.len(),
        "verified_blocks": verified,
        "lost_blocks": lost,
        "corrupt_reads": corrupt,
        "failed_writes": failures_total,
        "min_replicas": min_replicas,
        "replicas_histogram": histogram.iter().map(|(k, v)| (k.to_string(), *v)).map(|(k, v)| (k, json!(v))).collect::<serde_json::Map<_, _>>(),
        "async_tasks_left": pending,
    }))
}

/// Polls the sum of `metric` over `addrs` until it is 0 or `limit_s` seconds passed; the
/// last sum and how long it took.
async fn settle(
    addrs: &[std::net::SocketAddr],
    metric: &'static str,
    limit_s: u64,
) -> Result<(f64, Duration), String> {
    let t0 = Instant::now();
    let mut sum = f64::MAX;
    while t0.elapsed() < Duration::from_secs(limit_s) {
        let a = addrs.to_vec();
        sum = tokio::task::spawn_blocking(move || cluster::scrape_sum(&a, metric))
            .await
            .map_err(|e| e.to_string())?;
        if sum == 0.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok((sum, t0.elapsed()))
}

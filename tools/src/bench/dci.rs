//! `strait-bench dci`: a DCI budget `B` between two IDCs on loopback. Phase 0: paced sync
//! writes alone (the latency reference). Phase 1: a remote-read backlog alone. Phase 2:
//! the backlog plus the same paced sync writes. Reports link utilization and the worst
//! 1-second overshoot per phase (measured where the bytes arrive, in the remote IDC),
//! per-class throughput, sync packet-ack percentiles with and without the backlog, and
//! the bytes compression saved.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde_json::json;
use strait::block::{BlockId, GenStamp};
use strait::dci::governor::CLASSES;
use strait::node::Node;
use strait::pipeline::WriteParams;
use strait::read::ReadParams;
use strait::topology::{Tier, Topology};
use strait::transport::CertAuthority;
use strait::wire::TrafficClass;

use super::{Latency, Table, r3};

/// What to run.
#[derive(Debug, Clone)]
pub struct DciBenchParams {
    /// DCI budget, bytes per second.
    pub budget: u64,
    /// Seconds per phase.
    pub phase_secs: u64,
    /// Concurrent remote readers making the backlog.
    pub readers: usize,
    /// Sync blocks written per second in phases 0 and 2 (1 MiB each).
    pub sync_blocks_per_s: u64,
    /// Directory for the node stores.
    pub dir: std::path::PathBuf,
    /// Where to write an SVG chart of DCI throughput per class over the three phases.
    pub plot: Option<std::path::PathBuf>,
}

struct Phase {
    name: &'static str,
    secs: f64,
    utilization: f64,
    /// Measured where the bytes arrive (a packet counts once whole).
    worst_overshoot: f64,
    /// Measured at the sender's governor.
    worst_admitted: f64,
    per_class: [u64; 4],
    sync_acks: Latency,
    /// Bytes admitted per class since the phase began, every 100 ms: (seconds, bytes).
    timeline: Vec<(f64, [u64; 4])>,
}

/// Half the blocks text-like (compressible), half random.
fn text_or_random(seed: u64, len: usize) -> Bytes {
    Bytes::from(if seed.is_multiple_of(2) {
        super::text_bytes(seed, len)
    } else {
        super::random_bytes(seed, len)
    })
}

fn arrived(b_nodes: &[Node]) -> u64 {
    b_nodes
        .iter()
        .map(|n| {
            n.metrics().read_bytes.get(Tier::Dci)
                + n.metrics().pipeline_received_bytes.get(Tier::Dci)
        })
        .sum()
}

fn granted(a1: &Node) -> [u64; 4] {
    let mut out = [0; 4];
    for (_, g) in a1.governors().iter() {
        for (i, c) in CLASSES.iter().enumerate() {
            out[i] += g.stats(*c).granted_bytes;
        }
    }
    out
}

async fn run_phase(
    name: &'static str,
    p: &DciBenchParams,
    a1: &Node,
    b_nodes: &[Node],
    backlog: bool,
    sync: bool,
    block_base: u64,
) -> Result<Phase, String> {
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    let (a1_id, b1_id, b2_id) = (a1.id(), b_nodes[0].id(), b_nodes[1].id());
    if backlog {
        for r in 0..p.readers {
            let node = b_nodes[r % b_nodes.len()].clone();
            let stop = stop.clone();
            tasks.push(tokio::spawn(async move {
                let mut n = r as u64;
                while !stop.load(Ordering::Relaxed) {
                    let reader = node.reader(
                        BlockId(n % 8),
                        GenStamp(1),
                        &[a1_id],
                        ReadParams {
                            hedge_after: None,
                            ..ReadParams::default()
                        },
                    );
                    reader.read_all().await.map_err(|e| e.to_string())?;
                    n += 1;
                }
                Ok::<_, String>(Latency::default())
            }));
        }
    }
    if sync {
        let node = a1.clone();
        let stop = stop.clone();
        let every = Duration::from_micros(1_000_000 / p.sync_blocks_per_s.max(1));
        tasks.push(tokio::spawn(async move {
            let mut acks = Latency::default();
            let mut tick = tokio::time::interval(every);
            let mut b = block_base;
            while !stop.load(Ordering::Relaxed) {
                tick.tick().await;
                let data = text_or_random(b + 1, 1 << 20);
                let mut w = node
                    .writer(
                        BlockId(b),
                        &[a1_id, b1_id, b2_id],
                        WriteParams::new(GenStamp(1)),
                    )
                    .await
                    .map_err(|e| e.to_string())?;
                w.write(data).await.map_err(|e| e.to_string())?;
                w.hflush().await.map_err(|e| e.to_string())?;
                acks.add_hdr(w.ack_latency());
                w.close().await.map_err(|e| e.to_string())?;
                b += 1;
            }
            Ok(acks)
        }));
    }
    let start = Instant::now();
    let g0 = granted(a1);
    let admitted = |a1: &Node| granted(a1).iter().sum::<u64>();
    let mut samples = vec![(Duration::ZERO, arrived(b_nodes), admitted(a1))];
    let mut timeline = vec![(0.0, [0; 4])];
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    while start.elapsed() < Duration::from_secs(p.phase_secs) {
        tick.tick().await;
        samples.push((start.elapsed(), arrived(b_nodes), admitted(a1)));
        let g = granted(a1);
        timeline.push((
            start.elapsed().as_secs_f64(),
            std::array::from_fn(|i| g[i] - g0[i]),
        ));
    }
    let g1 = granted(a1);
    stop.store(true, Ordering::Relaxed);
    let mut sync_acks = Latency::default();
    for t in tasks {
        let l = t.await.map_err(|e| e.to_string())??;
        sync_acks.merge(&l);
    }
    let secs = samples.last().map_or(1.0, |s| s.0.as_secs_f64());
    // Skip the first second (ramp-up) for utilization.
    let from = samples
        .iter()
        .position(|s| s.0 >= Duration::from_secs(1))
        .unwrap_or(0);
    let last = samples.len() - 1;
    let span = (samples[last].0 - samples[from].0).as_secs_f64().max(1e-9);
    let utilization = (samples[last].1 - samples[from].1) as f64 / (p.budget as f64 * span);
    let mut worst: f64 = 0.0;
    let mut worst_admitted: f64 = 0.0;
    for i in 0..samples.len() {
        // Windows of 1 s on the 100 ms grid.
        if let Some(j) = samples
            .iter()
            .position(|s| s.0 >= samples[i].0 + Duration::from_secs(1))
        {
            let t = (samples[j].0 - samples[i].0).as_secs_f64();
            worst = worst.max((samples[j].1 - samples[i].1) as f64 / (p.budget as f64 * t) - 1.0);
            worst_admitted = worst_admitted
                .max((samples[j].2 - samples[i].2) as f64 / (p.budget as f64 * t) - 1.0);
        }
    }
    let mut per_class = [0; 4];
    for i in 0..4 {
        per_class[i] = ((g1[i] - g0[i]) as f64 / secs) as u64;
    }
    Ok(Phase {
        name,
        secs,
        utilization,
        worst_overshoot: worst,
        worst_admitted,
        per_class,
        sync_acks,
        timeline,
    })
}

/// The chart of `--plot`: MB/s admitted per class over 500 ms windows, the phases one
/// after another, and the budget.
fn plot(path: &std::path::Path, budget: u64, phases: &[&Phase]) -> Result<(), String> {
    let mut series: Vec<crate::plot::Series> = CLASSES
        .iter()
        .map(|c| crate::plot::Series {
            name: c.name().to_string(),
            points: Vec::new(),
        })
        .collect();
    let mut offset = 0.0;
    for ph in phases {
        let t = &ph.timeline;
        for (i, &(secs, bytes)) in t.iter().enumerate().skip(5) {
            let (secs0, bytes0) = t[i - 5];
            let dt = (secs - secs0).max(1e-9);
            for (k, s) in series.iter_mut().enumerate() {
                s.points
                    .push((offset + secs, (bytes[k] - bytes0[k]) as f64 / dt / 1e6));
            }
        }
        offset += ph.secs;
    }
    let names: Vec<&str> = phases.iter().map(|ph| ph.name).collect();
    crate::plot::write_svg(
        path,
        &crate::plot::Chart {
            title: &format!(
                "strait-bench dci: DCI throughput per class ({})",
                names.join(" | ")
            ),
            x_label: "seconds",
            y_label: "MB/s admitted",
            series,
            marks: vec![("budget".to_string(), budget as f64 / 1e6)],
        },
    )
}

/// Runs the scenario; prints the table and returns the JSON summary.
pub async fn run(p: &DciBenchParams) -> Result<serde_json::Value, String> {
    let net = std::process::id() as u8;
    let addr = |h: u8| -> SocketAddr { SocketAddr::from(([127, 5, net, h], 7700)) };
    let topo = Arc::new(
        Topology::builder()
            .idc("idc-a")
            .idc("idc-b")
            .node("a1", "idc-a", "r1", addr(1), 1 << 40)
            .node("b1", "idc-b", "r1", addr(11), 1 << 40)
            .node("b2", "idc-b", "r2", addr(12), 1 << 40)
            .node("b3", "idc-b", "r2", addr(13), 1 << 40)
            .link("idc-a", "idc-b", p.budget, Duration::from_millis(2))
            .build()
            .map_err(|e| e.to_string())?,
    );
    let ca = CertAuthority::generate("bench CA").map_err(|e| e.to_string())?;
    let mut nodes = Vec::new();
    for n in topo.nodes() {
        nodes.push(super::start_node(&topo, &ca, &n.name, p.dir.join(&n.name), |_| {}).await?);
    }
    let a1 = nodes[0].clone();
    let b_nodes: Vec<Node> = nodes[1..].to_vec();
    // The read backlog's blocks live only in IDC A.
    for b in 0..8u64 {
        let mut w = a1
            .writer(BlockId(b), &[a1.id()], WriteParams::new(GenStamp(1)))
            .await
            .map_err(|e| e.to_string())?;
        w.write(text_or_random(b, 8 << 20))
            .await
            .map_err(|e| e.to_string())?;
        w.close().await.map_err(|e| e.to_string())?;
    }
    let saved0 = a1.metrics().dci_saved_bytes.load(Ordering::Relaxed);
    let wire0 = a1.metrics().dci_wire_bytes.load(Ordering::Relaxed);
    let p0 = run_phase("sync alone", p, &a1, &b_nodes, false, true, 1_000).await?;
    let p1 = run_phase("backlog alone", p, &a1, &b_nodes, true, false, 0).await?;
    let p2 = run_phase("backlog + sync", p, &a1, &b_nodes, true, true, 100_000).await?;
    let saved = a1.metrics().dci_saved_bytes.load(Ordering::Relaxed) - saved0;
    let wire = a1.metrics().dci_wire_bytes.load(Ordering::Relaxed) - wire0;
    for n in &nodes {
        n.shutdown().await;
    }
    let _ = std::fs::remove_dir_all(&p.dir);

    println!(
        "dci: budget {} ({} MB/s) idc-a -> idc-b, {} s per phase, {} remote readers, sync {} x 1 MiB blocks/s (2+1 pipeline, one DCI hop)",
        strait::units::fmt_rate(p.budget),
        p.budget / 1_000_000,
        p.phase_secs,
        p.readers,
        p.sync_blocks_per_s
    );
    let mut t = Table::new(&[
        "phase",
        "util",
        "worst 1s over (arrived)",
        "(admitted)",
        "sync MB/s",
        "read MB/s",
        "async MB/s",
        "repair MB/s",
        "sync ack p50 us",
        "p99 us",
    ]);
    for ph in [&p0, &p1, &p2] {
        let mb = |i: usize| format!("{:.1}", ph.per_class[i] as f64 / 1e6);
        t.row(vec![
            ph.name.into(),
            format!("{:.1}%", 100.0 * ph.utilization),
            format!("{:+.1}%", 100.0 * ph.worst_overshoot),
            format!("{:+.1}%", 100.0 * ph.worst_admitted),
            mb(TrafficClass::Sync as usize),
            mb(TrafficClass::Read as usize),
            mb(TrafficClass::Async as usize),
            mb(TrafficClass::Repair as usize),
            if ph.sync_acks.count() > 0 {
                ph.sync_acks.at(0.5).to_string()
            } else {
                "-".into()
            },
            if ph.sync_acks.count() > 0 {
                ph.sync_acks.at(0.99).to_string()
            } else {
                "-".into()
            },
        ]);
    }
    print!("{}", t.render());
    println!(
        "compression: {} bytes crossed, {} saved ({:.1}%)",
        wire,
        saved,
        100.0 * saved as f64 / (wire + saved).max(1) as f64
    );
    if let Some(path) = &p.plot {
        plot(path, p.budget, &[&p0, &p1, &p2])?;
        println!("chart: {}", path.display());
    }
    Ok(json!({
        "scenario": "dci",
        "budget_bps": p.budget * 8,
        "budget_bytes_per_s": p.budget,
        "utilization": r3(p1.utilization),
        "utilization_with_sync": r3(p2.utilization),
        "max_overshoot": r3(p1.worst_overshoot.max(p2.worst_overshoot).max(0.0)),
        "max_overshoot_admitted": r3(p1.worst_admitted.max(p2.worst_admitted).max(0.0)),
        "sync_p50_us": p0.sync_acks.at(0.5),
        "sync_p99_us": p0.sync_acks.at(0.99),
        "sync_p50_backlog_us": p2.sync_acks.at(0.5),
        "sync_p99_backlog_us": p2.sync_acks.at(0.99),
        "sync_p99_ratio": r3(p2.sync_acks.at(0.99) as f64 / p0.sync_acks.at(0.99).max(1) as f64),
        "read_mb_s_backlog": r3(p1.per_class[TrafficClass::Read as usize] as f64 / 1e6),
        "read_mb_s_with_sync": r3(p2.per_class[TrafficClass::Read as usize] as f64 / 1e6),
        "sync_mb_s_with_backlog": r3(p2.per_class[TrafficClass::Sync as usize] as f64 / 1e6),
        "compression_saved": r3(saved as f64 / (wire + saved).max(1) as f64),
    }))
}

//! `strait-bench sched`: cluster-wide DCI shares against static equal shares.
//!
//! Two IDCs × 8 nodes in-process (each measured phase follows 2 s of warm-up), one link idc-a -> idc-b of budget `B`. Senders are
//! clients of each node's DCI governor (they ask it for bytes as a pipeline hop would; no
//! payload moves), so the figures measure the allocation, not the data path:
//!
//! 1. *single*: one node sends as fast as it may; its share of the budget.
//! 2. *uneven*: a paced sync sender (reserved), two unbounded async senders, a paced
//!    read sender and an unbounded repair sender marked spot, on five nodes; three idle.
//!    Utilization of the budget, the worst 1-second overshoot, and the admission latency
//!    of reserved vs spot requests.
//!
//! The same *uneven* demand then runs on a cluster where each node holds a static 1/8 of
//! the budget (today's default, MinIO's approach).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::json;
use strait::dci::{DciGovernor, SharesSettings};
use strait::node::Node;
use strait::transport::CertAuthority;
use strait::wire::TrafficClass;

use super::{Latency, Table, r3};

/// What to run.
#[derive(Debug, Clone)]
pub struct SchedBenchParams {
    /// DCI budget, bytes per second.
    pub budget: u64,
    /// Measured seconds per phase (after one second of warm-up).
    pub phase_secs: u64,
    /// Directory for the node stores.
    pub dir: std::path::PathBuf,
}

/// One sender: node index in idc-a, class, paced rate (None: as fast as allowed).
#[derive(Clone, Copy)]
struct Sender {
    node: usize,
    class: TrafficClass,
    paced: Option<u64>,
    label: &'static str,
}

fn uneven(budget: u64) -> Vec<Sender> {
    vec![
        Sender {
            node: 0,
            class: TrafficClass::Sync,
            paced: Some(budget / 6),
            label: "sync, paced B/6, reserved",
        },
        Sender {
            node: 1,
            class: TrafficClass::Async,
            paced: None,
            label: "async, unbounded",
        },
        Sender {
            node: 3,
            class: TrafficClass::Async,
            paced: None,
            label: "async, unbounded",
        },
        Sender {
            node: 5,
            class: TrafficClass::Read,
            paced: Some(budget / 12),
            label: "read, paced B/12",
        },
        Sender {
            node: 7,
            class: TrafficClass::Repair,
            paced: None,
            label: "repair, unbounded, spot",
        },
    ]
}

struct Cluster {
    nodes: Vec<Node>,
    /// idc-a's governors towards idc-b, by node index.
    govs: Vec<DciGovernor>,
}

async fn start(p: &SchedBenchParams, net: u8, shared: bool) -> Result<Cluster, String> {
    let topo = super::two_idc_topology([6, net], 7800, 8, p.budget)?;
    let ca = CertAuthority::generate("sched bench CA").map_err(|e| e.to_string())?;
    let mut nodes = Vec::new();
    for n in topo.nodes() {
        let root = p.dir.join(format!("{net}-{}", n.name));
        let node = super::start_node(&topo, &ca, &n.name, root, |cfg| {
            if shared {
                cfg.dci.shares = Some(SharesSettings {
                    spot: vec![TrafficClass::Repair],
                    ..SharesSettings::default()
                });
            } else {
                cfg.dci.share = 1.0 / 8.0;
            }
        })
        .await?;
        nodes.push(node);
    }
    let idc_b = topo.idc_by_name("idc-b").ok_or("no idc-b")?;
    let govs = nodes[..8]
        .iter()
        .map(|n| n.governors().to(idc_b).cloned().ok_or("no governor"))
        .collect::<Result<_, _>>()?;
    Ok(Cluster { nodes, govs })
}

fn granted(govs: &[DciGovernor]) -> u64 {
    govs.iter()
        .map(|g| {
            TrafficClass::ALL
                .iter()
                .map(|c| g.stats(*c).granted_bytes)
                .sum::<u64>()
        })
        .sum()
}

struct PhaseResult {
    utilization: f64,
    overshoot: f64,
    /// Bytes per second per sender.
    rates: Vec<u64>,
    /// Admission latency per sender (one request: 256 KiB).
    latency: Vec<Latency>,
}

/// Time for grants to follow a change of demand before measuring.
const WARM_UP: Duration = Duration::from_secs(2);

/// Runs `senders` on `c` for [`WARM_UP`] and `phase_secs` measured.
async fn phase(c: &Cluster, senders: &[Sender], p: &SchedBenchParams) -> PhaseResult {
    const REQ: u64 = 256 << 10;
    let stop = Arc::new(AtomicBool::new(false));
    let measuring = Arc::new(AtomicBool::new(false));
    let tasks: Vec<_> = senders
        .iter()
        .map(|s| {
            let (gov, s, stop, measuring) =
                (c.govs[s.node].clone(), *s, stop.clone(), measuring.clone());
            tokio::spawn(async move {
                let mut lat = Latency::default();
                let (mut bytes, mut t0) = (0u64, Instant::now());
                let every = s
                    .paced
                    .map(|r| Duration::from_secs_f64(REQ as f64 / r as f64));
                let mut next = Instant::now();
                let mut was_measuring = false;
                while !stop.load(Ordering::Relaxed) {
                    if let Some(e) = every {
                        tokio::time::sleep_until(next.into()).await;
                        next += e;
                    }
                    let asked = Instant::now();
                    gov.acquire(s.class, REQ).await;
                    let m = measuring.load(Ordering::Relaxed);
                    if m && !was_measuring {
                        (bytes, t0) = (0, Instant::now());
                        lat = Latency::default();
                    }
                    was_measuring = m;
                    if m {
                        lat.record(asked.elapsed());
                        bytes += REQ;
                    }
                }
                (
                    (bytes as f64 / t0.elapsed().as_secs_f64().max(1e-3)) as u64,
                    lat,
                )
            })
        })
        .collect();
    tokio::time::sleep(WARM_UP).await;
    measuring.store(true, Ordering::Relaxed);
    // Granted bytes over all of idc-a every 100 ms.
    let mut samples = vec![(Instant::now(), granted(&c.govs))];
    let end = Instant::now() + Duration::from_secs(p.phase_secs);
    while Instant::now() < end {
        tokio::time::sleep(Duration::from_millis(100)).await;
        samples.push((Instant::now(), granted(&c.govs)));
    }
    stop.store(true, Ordering::Relaxed);
    let (t_first, b_first) = samples[0];
    let (t_last, b_last) = samples[samples.len() - 1];
    let utilization =
        (b_last - b_first) as f64 / (p.budget as f64 * (t_last - t_first).as_secs_f64());
    // Worst 1-second window (by samples ten apart).
    let mut overshoot = 0f64;
    for w in samples.windows(11) {
        let (t0, b0) = w[0];
        let (t1, b1) = w[10];
        let allowed = p.budget as f64 * (t1 - t0).as_secs_f64();
        overshoot = overshoot.max((b1 - b0) as f64 / allowed - 1.0);
    }
    let mut rates = Vec::new();
    let mut latency = Vec::new();
    for t in tasks {
        let (r, l) = t.await.unwrap_or_default();
        rates.push(r);
        latency.push(l);
    }
    PhaseResult {
        utilization,
        overshoot,
        rates,
        latency,
    }
}

async fn stop(c: Cluster) {
    for n in &c.nodes {
        n.shutdown().await;
    }
}

/// Runs the scenario; prints the table and returns the JSON line.
pub async fn run(p: &SchedBenchParams) -> Result<serde_json::Value, String> {
    let net = std::process::id() as u8;
    let senders = uneven(p.budget);

    let dynamic = start(p, net, true).await?;
    let single = phase(
        &dynamic,
        &[Sender {
            node: 2,
            class: TrafficClass::Async,
            paced: None,
            label: "async, unbounded",
        }],
        p,
    )
    .await;
    let dyn_uneven = phase(&dynamic, &senders, p).await;
    stop(dynamic).await;

    let fixed = start(p, net.wrapping_add(1), false).await?;
    let static_uneven = phase(&fixed, &senders, p).await;
    stop(fixed).await;
    let _ = std::fs::remove_dir_all(&p.dir);

    let mb = |b: u64| format!("{:.1}", b as f64 / 1e6);
    println!(
        "sched: 2 IDCs x 8 nodes, link idc-a -> idc-b {} ({} MB/s), {} s per phase after 2 s warm-up; senders ask their node's governor for 256 KiB at a time",
        strait::units::fmt_rate(p.budget),
        p.budget / 1_000_000,
        p.phase_secs
    );
    let mut t = Table::new(&[
        "sender",
        "demand",
        "dynamic MB/s",
        "static MB/s",
        "dynamic p99 us",
        "static p99 us",
    ]);
    for (i, s) in senders.iter().enumerate() {
        t.row(vec![
            format!("a{}", s.node + 1),
            s.label.to_string(),
            mb(dyn_uneven.rates[i]),
            mb(static_uneven.rates[i]),
            dyn_uneven.latency[i].at(0.99).to_string(),
            static_uneven.latency[i].at(0.99).to_string(),
        ]);
    }
    print!("{}", t.render());
    let single_share = single.rates[0] as f64 / p.budget as f64;
    let mut s = Table::new(&["figure", "dynamic", "static (1/8 each)"]);
    s.row(vec![
        "utilization (uneven demand)".into(),
        format!("{:.3}", dyn_uneven.utilization),
        format!("{:.3}", static_uneven.utilization),
    ]);
    s.row(vec![
        "worst 1 s overshoot".into(),
        format!("{:.4}", dyn_uneven.overshoot.max(single.overshoot)),
        format!("{:.4}", static_uneven.overshoot),
    ]);
    s.row(vec![
        "single sender's share".into(),
        format!("{single_share:.3}"),
        "0.125".into(),
    ]);
    print!("{}", s.render());
    let reserved_p99 = dyn_uneven.latency[0].at(0.99);
    let spot_p99 = dyn_uneven.latency[4].at(0.99);
    Ok(json!({
        "scenario": "sched",
        "budget_bytes_per_s": p.budget,
        "utilization_dynamic": r3(dyn_uneven.utilization),
        "utilization_static": r3(static_uneven.utilization),
        "max_overshoot": r3(dyn_uneven.overshoot.max(single.overshoot).max(0.0)),
        "single_sender_share": r3(single_share),
        "reserved_p99_us": reserved_p99,
        "spot_p99_us": spot_p99,
    }))
}

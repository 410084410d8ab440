//! `strait-bench pipeline --spec 2+2 --mode sync`: a client node streams N blocks through a
//! 4-node pipeline (2 replicas in each of two IDCs, one DCI crossing), all nodes in this
//! process on loopback, with the default durability (O_DIRECT replica writes, fsync at
//! finalize). The reference, measured in the same run: the same blocks through a
//! single-hop pipeline (one replica). Run once per intra-IDC link kind.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use serde_json::json;
use strait::block::{BlockId, GenStamp};
use strait::node::Node;
use strait::pipeline::{AckHistogram, WriteParams};
use strait::placement::ReplicationSpec;
use strait::topology::{NodeId, Topology};
use strait::transport::{CertAuthority, LinkKind, TransportConfig};
use strait::wire::WriteMode;

use super::{Latency, Phase, Table, r3};

/// What to run.
#[derive(Debug, Clone)]
pub struct PipelineBenchParams {
    /// Replication spec; `2+2` (or any N+M over the two bench IDCs).
    pub spec: ReplicationSpec,
    /// Blocks written per measurement.
    pub blocks: usize,
    /// Bytes per block.
    pub block_size: usize,
    /// Bytes per `write` call of the client.
    pub write_size: usize,
    /// Blocks written concurrently, each through its own pipeline.
    pub in_flight: usize,
    /// Data bytes per pipeline packet.
    pub packet: usize,
    /// Smallest window of bytes in flight (0: the library default).
    pub window: usize,
    /// Run the writer on the first replica's node (HDFS-style) instead of a separate
    /// client node.
    pub writer_on_first: bool,
    /// Sync or async writes.
    pub mode: WriteMode,
    /// Writers send the pipeline's setup with their first packet
    /// (`WriteParams::setup_with_first_packet`) instead of when they are made.
    pub setup_with_data: bool,
    /// DCI budget between the two IDCs, bytes/s.
    pub dci_budget: u64,
    /// Intra-IDC link kinds to measure.
    pub links: Vec<LinkKind>,
    /// Directory for the node stores.
    pub dir: std::path::PathBuf,
}

impl PipelineBenchParams {
    /// The parameters of each block's write.
    fn write_params(&self, mode: WriteMode) -> WriteParams {
        let mut params = WriteParams::new(GenStamp(1));
        params.mode = mode;
        params.setup_with_first_packet = self.setup_with_data;
        params
    }
}

struct Bench {
    nodes: Vec<Node>,
    client: Node,
    idc_a: Vec<NodeId>,
    idc_b: Vec<NodeId>,
}

async fn start(p: &PipelineBenchParams, link: LinkKind, net: u8) -> Result<Bench, String> {
    let per_idc = p.spec.groups().iter().map(|g| g.count).max().unwrap_or(2);
    let addr = |h: u8| -> SocketAddr { SocketAddr::from(([127, 4, net, h], 7600)) };
    let mut b = Topology::builder().idc("idc-a").idc("idc-b").node(
        "client",
        "idc-a",
        "r0",
        addr(100),
        1 << 40,
    );
    for i in 0..per_idc {
        b = b.node(
            format!("a{}", i + 1),
            "idc-a",
            format!("r{}", i % 2 + 1),
            addr(1 + i as u8),
            1 << 40,
        );
        b = b.node(
            format!("b{}", i + 1),
            "idc-b",
            format!("r{}", i % 2 + 1),
            addr(51 + i as u8),
            1 << 40,
        );
    }
    let topo = Arc::new(
        b.link("idc-a", "idc-b", p.dci_budget, Duration::from_micros(200))
            .build()
            .map_err(|e| e.to_string())?,
    );
    let ca = CertAuthority::generate("bench CA").map_err(|e| e.to_string())?;
    let mut nodes = Vec::new();
    let mut client = None;
    for n in topo.nodes() {
        let root = p.dir.join(format!("{link}-{}", n.name));
        let node = super::start_node(&topo, &ca, &n.name, root, |cfg| {
            cfg.transport = TransportConfig {
                intra_idc: link,
                ..TransportConfig::default()
            };
            cfg.pipeline.packet_bytes = p.packet;
            if p.mode == WriteMode::Async {
                let mut r = strait::replication::ReplicationConfig::new(
                    p.dir.join(format!("{link}-{}-log", n.name)),
                );
                r.workers = 2;
                cfg.replication = Some(r);
            }
            if p.window > 0 {
                cfg.pipeline.min_window_bytes = p.window;
            }
        })
        .await?;
        if n.name == "client" {
            client = Some(node);
        } else {
            nodes.push(node);
        }
    }
    let id = |n: String| topo.node_by_name(&n).ok_or(format!("no node {n}"));
    let groups: Vec<usize> = p.spec.groups().iter().map(|g| g.count).collect();
    let idc_a = (0..groups[0])
        .map(|i| id(format!("a{}", i + 1)))
        .collect::<Result<_, _>>()?;
    let idc_b = (0..groups.get(1).copied().unwrap_or(0))
        .map(|i| id(format!("b{}", i + 1)))
        .collect::<Result<_, _>>()?;
    Ok(Bench {
        nodes,
        client: client.ok_or("no client node")?,
        idc_a,
        idc_b,
    })
}

/// Block ids of the single-hop reference and of the replicated run: disjoint ranges, so
/// that a node of both runs never sees the same id twice (it would rightly refuse it).
const SINGLE_HOP_IDS: u64 = 1 << 40;
const REPLICATED_IDS: u64 = 2 << 40;
const ASYNC_IDS: u64 = 3 << 40;
/// Blocks up to this size are "small": the run also measures the filesystem's floor.
const SMALL_BLOCK: usize = 1 << 20;

/// Latencies of one run: packet acks as the writer saw them, and whole blocks (create to
/// close: the latency of a block that fits in one packet).
struct RunLatency {
    acks: Latency,
    blocks: Latency,
    /// From asking for a writer to the pipeline being set up (every replica created).
    setups: Latency,
    /// From the last write to `close` returning (every replica final and acked).
    closes: Latency,
    /// Context switches of the whole process during the run (every node's threads).
    switches: u64,
}

/// How long one block took: set up, whole.
struct BlockTimes {
    setup: std::time::Duration,
    close: std::time::Duration,
    whole: std::time::Duration,
}

impl RunLatency {
    /// The figure that stands for the run: per packet for multi-packet blocks, per block
    /// when a block is one packet (its only ack is the close).
    fn headline(&self, p: &PipelineBenchParams) -> (&'static str, &Latency) {
        if p.block_size <= p.packet {
            ("block", &self.blocks)
        } else {
            ("ack", &self.acks)
        }
    }
}

async fn run_blocks(
    b: &Bench,
    targets: &[NodeId],
    p: &PipelineBenchParams,
    first_block: u64,
) -> Result<(Phase, RunLatency), String> {
    let writer = if p.writer_on_first {
        b.nodes
            .iter()
            .find(|n| n.id() == targets[0])
            .ok_or("first target not running")?
    } else {
        &b.client
    };
    // Incompressible, so that compression on DCI hops does not flatter the figures.
    let data = Bytes::from(super::random_bytes(7, p.write_size));
    let ids: Vec<BlockId> = (0..p.blocks as u64)
        .map(|i| BlockId(first_block + i))
        .collect();
    let total = (p.blocks * p.block_size) as u64;
    let switches0 = super::context_switches();
    let (phase, res) = Phase::measure(
        total,
        write_blocks(
            writer,
            &ids,
            targets,
            p.write_params(WriteMode::Sync),
            &data,
            p.block_size,
            p.in_flight,
        ),
    )
    .await;
    let mut lat = res?;
    lat.switches = super::context_switches().saturating_sub(switches0);
    Ok((phase, lat))
}

/// Writes one block; its packet-ack latencies and how long its stages took.
async fn write_one(
    writer: &Node,
    block: BlockId,
    targets: &[NodeId],
    params: WriteParams,
    data: &Bytes,
    block_size: usize,
) -> Result<(AckHistogram, BlockTimes), String> {
    let t0 = std::time::Instant::now();
    let mode = params.mode;
    let mut w = writer
        .writer(block, targets, params)
        .await
        .map_err(|e| e.to_string())?;
    let setup = t0.elapsed();
    let mut left = block_size;
    while left > 0 {
        let n = left.min(data.len());
        w.write(data.slice(..n)).await.map_err(|e| e.to_string())?;
        left -= n;
    }
    let h = w.ack_latency().clone();
    let t_close = std::time::Instant::now();
    let out = w.close().await.map_err(|e| e.to_string())?;
    if mode == WriteMode::Sync && out.replicas.len() != targets.len() {
        let topo = writer.topology();
        let names: Vec<&str> = out.failed.iter().map(|&n| &*topo.node(n).name).collect();
        return Err(format!(
            "{block} lost replicas on {} (RUST_LOG=strait=warn says why)",
            names.join(", ")
        ));
    }
    let times = BlockTimes {
        setup,
        close: t_close.elapsed(),
        whole: t0.elapsed(),
    };
    Ok((h, times))
}

/// Writes each block of `ids` (`block_size` bytes of `data`, repeated) through
/// `targets` with `params`, `in_flight` blocks at a time; returns the merged packet-ack latencies and
/// the per-block latencies. A sync block must keep every replica.
async fn write_blocks(
    writer: &Node,
    ids: &[BlockId],
    targets: &[NodeId],
    params: WriteParams,
    data: &Bytes,
    block_size: usize,
    in_flight: usize,
) -> Result<RunLatency, String> {
    // Each block is its own task, as a client's writers would be: polled together inside
    // one future they would all run on one thread.
    let one = |block: BlockId| {
        let (writer, targets, data) = (writer.clone(), targets.to_vec(), data.clone());
        let params = params.clone();
        let task = tokio::spawn(async move {
            write_one(&writer, block, &targets, params, &data, block_size).await
        });
        async move { task.await.map_err(|e| e.to_string())? }
    };
    let mut acks: Option<AckHistogram> = None;
    let (mut blocks, mut setups, mut closes) =
        (Latency::default(), Latency::default(), Latency::default());
    let mut done = futures_util::stream::iter(ids.iter().copied())
        .map(one)
        .buffer_unordered(in_flight.max(1));
    while let Some(r) = done.next().await {
        let (h, took) = r?;
        blocks.record(took.whole);
        setups.record(took.setup);
        closes.record(took.close);
        match acks.as_mut() {
            Some(a) => a.add(&h).map_err(|e| e.to_string())?,
            None => acks = Some(h),
        }
    }
    let acks = acks.ok_or_else(|| "no blocks".to_string())?;
    Ok(RunLatency {
        acks: Latency::from_hdr(&acks),
        blocks,
        setups,
        closes,
        switches: 0,
    })
}

/// The floor the filesystem sets for small blocks, measured in the same run: each of
/// `blocks` x `replicas` block files created with O_DIRECT in a directory per replica,
/// written, `fdatasync`ed and closed, by `in_flight` x `replicas` threads at once. No
/// network, no checksums, one file per replica: what writing these replicas durably as
/// files costs on this disk and filesystem now (on ext4 without a journal, creating an
/// inode after many deletions costs several times what it does otherwise).
fn fs_floor(p: &PipelineBenchParams, replicas: usize) -> Result<Phase, String> {
    use std::os::unix::fs::{FileExt, OpenOptionsExt};
    let dir = p.dir.join("fs-floor");
    let _ = std::fs::remove_dir_all(&dir);
    for r in 0..replicas {
        std::fs::create_dir_all(dir.join(format!("r{r}"))).map_err(|e| e.to_string())?;
    }
    let len = p.block_size.div_ceil(4096) * 4096;
    let threads = (p.in_flight * replicas).max(1);
    let total = (p.blocks * p.block_size) as u64;
    let (c0, t0) = (super::cpu_seconds(), std::time::Instant::now());
    let res: Result<(), String> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads)
            .map(|t| {
                let dir = &dir;
                s.spawn(move || -> Result<(), String> {
                    let (mut v, off) = super::store::aligned_vec(len);
                    v[off..off + len].fill(0x5a);
                    for i in (t..p.blocks * replicas).step_by(threads) {
                        let path = dir.join(format!("r{}/blk_{}", i % replicas, i / replicas));
                        let f = std::fs::OpenOptions::new()
                            .write(true)
                            .create_new(true)
                            .custom_flags(libc::O_DIRECT)
                            .open(&path)
                            .map_err(|e| format!("{}: {e}", path.display()))?;
                        f.write_all_at(&v[off..off + len], 0)
                            .and_then(|()| f.sync_data())
                            .map_err(|e| format!("{}: {e}", path.display()))?;
                    }
                    Ok(())
                })
            })
            .collect();
        workers.into_iter().try_for_each(|w| {
            w.join()
                .map_err(|_| "fs floor thread panicked".to_string())?
        })
    });
    let phase = Phase {
        bytes: total,
        wall: t0.elapsed(),
        cpu: super::cpu_seconds() - c0,
    };
    let _ = std::fs::remove_dir_all(&dir);
    res.map(|()| phase)
}

/// TLS-over-TCP connections made and streams carried on an idle connection, summed over
/// the bench's nodes.
fn tcp_streams(b: &Bench) -> (u64, u64) {
    use std::sync::atomic::Ordering::Relaxed;
    b.nodes
        .iter()
        .chain(std::iter::once(&b.client))
        .map(|n| {
            let c = n.transport().counters();
            (c.connections[1].load(Relaxed), c.tcp_reused.load(Relaxed))
        })
        .fold((0, 0), |a, x| (a.0 + x.0, a.1 + x.1))
}

/// Runs the scenario; prints the table and returns the JSON summary.
pub async fn run(p: &PipelineBenchParams) -> Result<serde_json::Value, String> {
    std::fs::create_dir_all(&p.dir).map_err(|e| format!("{}: {e}", p.dir.display()))?;
    let mut rows = Vec::new();
    let mut handshakes = Vec::new();
    let mut floor = None;
    for (k, &link) in p.links.iter().enumerate() {
        let bench = start(p, link, (std::process::id() as u8).wrapping_add(k as u8)).await?;
        let targets: Vec<NodeId> = bench.idc_a.iter().chain(&bench.idc_b).copied().collect();
        let (single, single_lat) = run_blocks(&bench, &targets[..1], p, SINGLE_HOP_IDS).await?;
        let before = tcp_streams(&bench);
        let (full, full_lat) = run_blocks(&bench, &targets, p, REPLICATED_IDS).await?;
        let after = tcp_streams(&bench);
        handshakes.push((after.0 - before.0, after.1 - before.1));
        for n in bench.nodes.iter().chain(std::iter::once(&bench.client)) {
            n.shutdown().await;
        }
        // Small blocks: the filesystem's floor, before anything is deleted (deleting
        // first would slow its creates on ext4 without a journal).
        if k == 0 && p.block_size <= SMALL_BLOCK {
            floor = Some(fs_floor(p, targets.len())?);
        }
        let _ = std::fs::remove_dir_all(&p.dir);
        rows.push((link, single, single_lat, full, full_lat));
    }
    let unit = rows.first().map_or("ack", |r| r.4.headline(p).0);
    println!(
        "pipeline: spec {} sync, {} blocks x {} per run, {} in flight, {} KiB packets, writer {} -> {} replicas, loopback, O_DIRECT + fsync at finalize",
        p.spec,
        p.blocks,
        strait::units::fmt_bytes(p.block_size as u64),
        p.in_flight,
        p.packet >> 10,
        if p.writer_on_first {
            "on the first replica's node"
        } else {
            "on a separate client node"
        },
        p.spec.total()
    );
    let latency_head = format!("{unit} p50 us");
    let mut t = Table::new(&[
        "intra-IDC link",
        "pipeline",
        "MB/s",
        "blocks/s",
        "ratio",
        "cpu-s/GB",
        &latency_head,
        "p90",
        "p99",
        "p99.9",
        "max",
    ]);
    for (link, single, sl, full, fl) in &rows {
        for (name, ph, l) in [
            ("single hop", single, sl),
            (&*format!("{}", p.spec), full, fl),
        ] {
            let mut cells = vec![
                link.to_string(),
                name.to_string(),
                format!("{:.0}", ph.mb_s()),
                format!("{:.0}", p.blocks as f64 / ph.wall.as_secs_f64().max(1e-9)),
                format!("{:.2}", ph.mb_s() / single.mb_s()),
                format!("{:.2}", ph.cpu_s_per_gb()),
            ];
            cells.extend(
                l.headline(p)
                    .1
                    .summary()
                    .split_whitespace()
                    .map(str::to_string),
            );
            t.row(cells);
        }
    }
    if let Some(f) = &floor {
        t.row(vec![
            "-".into(),
            format!("files only ({})", p.spec.total()),
            format!("{:.0}", f.mb_s()),
            format!("{:.0}", p.blocks as f64 / f.wall.as_secs_f64().max(1e-9)),
            format!("{:.2}", f.mb_s() / rows[0].1.mb_s()),
            format!("{:.2}", f.cpu_s_per_gb()),
        ]);
    }
    print!("{}", t.render());
    if floor.is_some() {
        println!(
            "files only: each replica one O_DIRECT file in a directory per replica, created, written, fdatasync'd, {} threads; the filesystem's floor for these blocks",
            p.in_flight * p.spec.total()
        );
    }
    let (link, single, _, full, fl) = rows.first().ok_or("no link measured")?;
    let acked = fl.acks.count() > 0;
    println!(
        "{} {link}: {}; pipeline setup p50 {} us p99 {} us; close (last packet to every replica final) p50 {} us p99 {} us; {:.1} context switches per block (single hop {:.1})",
        p.spec,
        if p.setup_with_data {
            "setup sent with the first packet (the setup figure is the writer's creation, no round trip)"
        } else {
            "setup when the writer is made"
        },
        fl.setups.at(0.5),
        fl.setups.at(0.99),
        fl.closes.at(0.5),
        fl.closes.at(0.99),
        fl.switches as f64 / p.blocks.max(1) as f64,
        rows[0].2.switches as f64 / p.blocks.max(1) as f64,
    );
    let mut out = json!({
        "scenario": "pipeline",
        "spec": p.spec.to_string(),
        "mode": "sync",
        "intra_idc_link": link.to_string(),
        "blocks": p.blocks,
        "block_bytes": p.block_size,
        "in_flight": p.in_flight,
        "setup": if p.setup_with_data { "with-data" } else { "at-create" },
        "packet_bytes": p.packet,
        "writer": if p.writer_on_first { "first-replica" } else { "client" },
        "mb_s": r3(full.mb_s()),
        "blocks_per_s": r3(p.blocks as f64 / full.wall.as_secs_f64().max(1e-9)),
        "single_hop_mb_s": r3(single.mb_s()),
        "ratio": r3(full.mb_s() / single.mb_s()),
        // A block of one packet has no packet acks before its close: no figure, not 0.
        "ack_p50_us": acked.then(|| fl.acks.at(0.5)),
        "ack_p90_us": acked.then(|| fl.acks.at(0.9)),
        "ack_p99_us": acked.then(|| fl.acks.at(0.99)),
        "ack_p999_us": acked.then(|| fl.acks.at(0.999)),
        "block_p50_us": fl.blocks.at(0.5),
        "block_p99_us": fl.blocks.at(0.99),
        "setup_p50_us": fl.setups.at(0.5),
        "setup_p99_us": fl.setups.at(0.99),
        "close_p50_us": fl.closes.at(0.5),
        "close_p99_us": fl.closes.at(0.99),
        "cpu_s_per_gb": r3(full.cpu_s_per_gb()),
        "switches_per_block": r3(fl.switches as f64 / p.blocks.max(1) as f64),
        "tcp_connects": handshakes[0].0,
        "tcp_reused": handshakes[0].1,
    });
    if let Some(f) = &floor {
        let per_s = p.blocks as f64 / f.wall.as_secs_f64().max(1e-9);
        out["fs_floor_blocks_per_s"] = json!(r3(per_s));
        out["fs_floor_ratio"] = json!(r3(full.mb_s() / f.mb_s()));
    }
    for (link, single, _, full, _) in rows.iter().skip(1) {
        let k = link.to_string().replace('-', "_");
        out[format!("{k}_mb_s")] = json!(r3(full.mb_s()));
        out[format!("{k}_single_hop_mb_s")] = json!(r3(single.mb_s()));
    }
    Ok(out)
}

/// `--mode async`: blocks acknowledged by the local IDC, copied to the remote IDC by the
/// writer node's replication workers. Reports the local-ack throughput and latency, the
/// drain rate against the DCI budget, the peak and final lag, and the bytes that crossed
/// the DCI per byte written.
pub async fn run_async(p: &PipelineBenchParams) -> Result<serde_json::Value, String> {
    std::fs::create_dir_all(&p.dir).map_err(|e| format!("{}: {e}", p.dir.display()))?;
    let link = p.links.first().copied().ok_or("no link kind")?;
    let bench = start(p, link, std::process::id() as u8).await?;
    let targets: Vec<NodeId> = bench.idc_a.iter().chain(&bench.idc_b).copied().collect();
    let head = bench
        .nodes
        .iter()
        .find(|n| n.id() == targets[0])
        .ok_or("first target not running")?
        .clone();
    let data = Bytes::from(super::random_bytes(7, p.write_size));
    let total = (p.blocks * p.block_size) as u64;
    let t0 = std::time::Instant::now();
    // Sample the lag while writing and draining.
    let sampler = {
        let head = head.clone();
        tokio::spawn(async move {
            let mut peak = 0u64;
            let mut tick = tokio::time::interval(Duration::from_millis(20));
            loop {
                tick.tick().await;
                let r = head.rpo().map_err(|e| e.to_string())?;
                peak = peak.max(r.pending_bytes);
                if r.drained_bytes >= total || t0.elapsed() > Duration::from_secs(600) {
                    return Ok::<_, String>((peak, t0.elapsed()));
                }
            }
        })
    };
    let ids: Vec<BlockId> = (0..p.blocks as u64)
        .map(|i| BlockId(ASYNC_IDS + i))
        .collect();
    let (write, acks) = Phase::measure(
        total,
        write_blocks(
            &head,
            &ids,
            &targets,
            p.write_params(WriteMode::Async),
            &data,
            p.block_size,
            p.in_flight,
        ),
    )
    .await;
    let run = acks?;
    let (acks, blocks) = (run.acks, run.blocks);
    let (peak, drain_time) = sampler.await.map_err(|e| e.to_string())??;
    let rpo = head.rpo().map_err(|e| e.to_string())?;
    let crossed: u64 = bench
        .nodes
        .iter()
        .chain(std::iter::once(&bench.client))
        .map(|n| {
            n.metrics()
                .dci_wire_bytes
                .load(std::sync::atomic::Ordering::Relaxed)
        })
        .sum();
    for n in bench.nodes.iter().chain(std::iter::once(&bench.client)) {
        n.shutdown().await;
    }
    let _ = std::fs::remove_dir_all(&p.dir);
    let drain_mb_s = total as f64 / 1e6 / drain_time.as_secs_f64().max(1e-9);
    println!(
        "pipeline: spec {} async, {} blocks x {} MiB, {} KiB packets, writer on the first replica's node, intra-IDC {link}, DCI budget {}",
        p.spec,
        p.blocks,
        p.block_size >> 20,
        p.packet >> 10,
        strait::units::fmt_rate(p.dci_budget)
    );
    let mut t = Table::new(&[
        "what",
        "MB/s",
        "of DCI budget",
        "block p50 us",
        "p90",
        "p99",
        "p99.9",
        "max",
    ]);
    let mut cells = vec![
        "local-ack writes".to_string(),
        format!("{:.0}", write.mb_s()),
        "-".into(),
    ];
    cells.extend(blocks.summary().split_whitespace().map(str::to_string));
    t.row(cells);
    let mut cells = vec![
        "drain to remote IDC".to_string(),
        format!("{drain_mb_s:.0}"),
        format!("{:.0}%", 100.0 * drain_mb_s * 1e6 / p.dci_budget as f64),
    ];
    cells.extend(std::iter::repeat_n("-".to_string(), 5));
    t.row(cells);
    print!("{}", t.render());
    // A block of one packet has no packet acks before its close: no figure, not 0.
    let acked = acks.count() > 0;
    println!(
        "block: from asking for a writer to close returning (local replicas final, remote copy queued); packet acks p50 {} us p99 {} us",
        if acked {
            acks.at(0.5).to_string()
        } else {
            "-".into()
        },
        if acked {
            acks.at(0.99).to_string()
        } else {
            "-".into()
        },
    );
    println!(
        "lag: peak {} MiB, final {} bytes; DCI bytes per block byte {:.4}",
        peak >> 20,
        rpo.pending_bytes,
        crossed as f64 / total as f64
    );
    Ok(json!({
        "scenario": "pipeline",
        "spec": p.spec.to_string(),
        "mode": "async",
        "intra_idc_link": link.to_string(),
        "blocks": p.blocks,
        "block_bytes": p.block_size,
        "mb_s": r3(write.mb_s()),
        "local_ack_p50_us": acked.then(|| acks.at(0.5)),
        "local_ack_p99_us": acked.then(|| acks.at(0.99)),
        "block_p50_us": blocks.at(0.5),
        "block_p99_us": blocks.at(0.99),
        "drain_mb_s": r3(drain_mb_s),
        "dci_budget_mb_s": r3(p.dci_budget as f64 / 1e6),
        "dci_bytes_per_block_byte": r3(crossed as f64 / total as f64),
        "peak_lag_bytes": peak,
        "final_lag_bytes": rpo.pending_bytes,
    }))
}

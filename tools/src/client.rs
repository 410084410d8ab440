//! `strait put` and `strait get`: a client of a running local cluster. The client runs an
//! in-process node with the cluster's client identity of its IDC (`client-a`, …), places
//! blocks with `placement`, writes them through the pipeline, and keeps a manifest (one
//! line per block: id, genstamp, length, replicas) that `get` reads back.

use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};
use rand::{RngExt, SeedableRng};
use strait::block::{BlockId, GenStamp};
use strait::node::{Node, NodeConfig};
use strait::pipeline::WriteParams;
use strait::placement::{self, NodeStates, ReplicationSpec};
use strait::read::ReadParams;
use strait::topology::{Origin, Tier, Topology};
use strait::transport::TlsIdentity;

/// One block of a stored file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestEntry {
    /// The block.
    pub block: BlockId,
    /// Its genstamp.
    pub genstamp: GenStamp,
    /// Its length.
    pub len: u64,
    /// Nodes holding it.
    pub replicas: Vec<String>,
}

/// The manifest text of `entries`: one line per block, `block genstamp len node,node,…`.
pub fn format_manifest(entries: &[ManifestEntry]) -> String {
    entries
        .iter()
        .map(|e| {
            format!(
                "{} {} {} {}\n",
                e.block.0,
                e.genstamp.0,
                e.len,
                e.replicas.join(",")
            )
        })
        .collect()
}

/// Parses a manifest; a line that is not `block genstamp len node,node,…` is an error
/// naming it.
pub fn parse_manifest(text: &str) -> Result<Vec<ManifestEntry>, String> {
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let bad = || {
                format!(
                    "manifest line {}: expected `block genstamp len node,node,…`",
                    i + 1
                )
            };
            if f.len() != 4 {
                return Err(bad());
            }
            Ok(ManifestEntry {
                block: BlockId(f[0].parse().map_err(|_| bad())?),
                genstamp: GenStamp(f[1].parse().map_err(|_| bad())?),
                len: f[2].parse().map_err(|_| bad())?,
                replicas: f[3].split(',').map(str::to_string).collect(),
            })
        })
        .collect()
}

/// An in-process client node of the local cluster in `dir`, with the client identity of
/// `idc` (`client-a` for `idc-a`, …), and the cluster's topology.
pub async fn client(dir: &Path, idc: &str) -> Result<(Node, Arc<Topology>), String> {
    let topo = Arc::new(Topology::from_file(dir.join("topology.toml")).map_err(|e| e.to_string())?);
    let id = topo
        .idc_by_name(idc)
        .ok_or(format!("no idc {idc:?} in the cluster"))?;
    let letter = idc
        .strip_prefix("idc-")
        .ok_or(format!("{idc:?} is not a local-cluster idc"))?;
    let name = format!("client-{letter}");
    if topo.node_by_name(&name).map(|n| topo.location(n).idc) != Some(id) {
        return Err(format!("the cluster has no client identity {name}"));
    }
    let c = dir.join("certs");
    let ident = TlsIdentity::from_pem_files(
        &c.join("ca.pem"),
        &c.join(format!("{name}.pem")),
        &c.join(format!("{name}.key")),
    )
    .map_err(|e| e.to_string())?;
    let (node, _) = Node::start(NodeConfig::new(
        name,
        topo.clone(),
        ident,
        dir.join("data").join(format!("client-{letter}")),
    ))
    .await
    .map_err(|e| e.to_string())?;
    Ok((node, topo))
}

fn bar(total: u64, what: &str) -> ProgressBar {
    let pb = ProgressBar::new(total);
    pb.set_style(
        ProgressStyle::with_template("{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    pb.set_message(what.to_string());
    pb
}

/// Blocks `put` writes at the same time, each through its own pipeline (measured on the
/// demo's 1 Gbit/s, 10 ms RTT DCI with 64 MiB blocks: 2 in flight 89.5 MB/s, 4 in flight
/// 101 MB/s).
pub const PUT_IN_FLIGHT: usize = 4;

/// Blocks `get` reads at the same time (read-ahead), each from its nearest replica.
pub const GET_IN_FLIGHT: usize = 4;

/// Bytes a block's writer or reader holds from the file at once: the file is streamed in
/// pieces of this size, so `put` and `get` hold about `IN_FLIGHT` x (piece + the
/// pipeline's window) whatever the size of the file.
pub const PIECE: u64 = 4 << 20;

/// Bytes `get` asks a replica for at once.
pub const GET_PIECE: u64 = 8 << 20;

/// Reads `len` bytes of `file` at `offset` (on a blocking thread).
async fn read_piece(file: &Arc<std::fs::File>, offset: u64, len: u64) -> Result<Bytes, String> {
    let file = file.clone();
    tokio::task::spawn_blocking(move || {
        let mut buf = vec![0u8; len as usize];
        std::os::unix::fs::FileExt::read_exact_at(&*file, &mut buf, offset)
            .map(|()| Bytes::from(buf))
            .map_err(|e| format!("read at {offset}: {e}"))
    })
    .await
    .map_err(|e| e.to_string())?
}

/// Writes `bytes` to `file` at `offset` (on a blocking thread).
async fn write_piece(file: &Arc<std::fs::File>, offset: u64, bytes: Bytes) -> Result<(), String> {
    let file = file.clone();
    tokio::task::spawn_blocking(move || {
        std::os::unix::fs::FileExt::write_all_at(&*file, &bytes, offset)
            .map_err(|e| format!("write at {offset}: {e}"))
    })
    .await
    .map_err(|e| e.to_string())?
}

/// The process's peak resident memory (VmHWM), bytes; 0 where /proc does not say.
pub fn peak_rss() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

/// Bits of a block id that number the blocks of one file (see [`put`]): up to 2^20
/// blocks per file.
const FILE_ID_BITS: u32 = 20;

/// The first block id of a file of `blocks` blocks, from `random`: its low
/// [`FILE_ID_BITS`] bits cleared, so the file's ids are `base..base + blocks`.
fn file_id_base(blocks: u64, random: u64) -> Result<u64, String> {
    if blocks > 1 << FILE_ID_BITS {
        return Err(format!(
            "{blocks} blocks; a file holds at most {} blocks (use larger blocks)",
            1u64 << FILE_ID_BITS
        ));
    }
    Ok(random & !((1u64 << FILE_ID_BITS) - 1))
}

/// Writes `file` as blocks of `block_size` with `spec` from a client in `idc`,
/// [`PUT_IN_FLIGHT`] blocks at a time, each streamed from the file in [`PIECE`]s, each
/// block's pipeline set up with its first packet when `setup_with_data`; returns the
/// manifest text and a summary. The file's blocks take consecutive ids from a random
/// base whose low [`FILE_ID_BITS`] bits are zero, as a namenode hands ids out in
/// sequence: a store files replicas in directories named from bits 8..24 of the id, so
/// a file's blocks share a few directories instead of making a new pair per block
/// (random ids cost a `mkdir` per block and replica in each state directory).
pub async fn put(
    dir: &Path,
    file: &Path,
    spec: &ReplicationSpec,
    mode: strait::wire::WriteMode,
    idc: &str,
    block_size: u64,
    setup_with_data: bool,
) -> Result<PutResult, String> {
    let f = std::fs::File::open(file).map_err(|e| format!("{}: {e}", file.display()))?;
    let size = f
        .metadata()
        .map_err(|e| format!("{}: {e}", file.display()))?
        .len();
    let f = Arc::new(f);
    let (node, topo) = client(dir, idc).await?;
    let origin = Origin::in_idc(topo.location(node.id()).idc);
    let states = NodeStates::from_topology(&topo);
    let mut rng = rand::rngs::StdRng::seed_from_u64(rand::random());
    let pb = bar(size, "put");
    let t0 = std::time::Instant::now();
    let mut excluded = vec![];
    // Client identities never hold replicas.
    for n in topo.nodes() {
        if n.name.starts_with("client-") {
            excluded.extend(topo.node_by_name(&n.name));
        }
    }
    // Placement first (one random source), then the writes, `PUT_IN_FLIGHT` at a time:
    // while one block's pipeline drains (last acks, finalize), the next one streams.
    let block_size = block_size.max(1);
    let base = file_id_base(size.div_ceil(block_size), rng.random())
        .map_err(|e| format!("{}: {e} of {block_size} bytes", file.display()))?;
    let mut plans = Vec::new();
    for (index, start) in (0..size).step_by(block_size as usize).enumerate() {
        let p = placement::choose_targets(&topo, &origin, spec, &excluded, &states, &mut rng)
            .map_err(|e| e.to_string())?;
        let len = block_size.min(size - start);
        plans.push((
            BlockId(base | index as u64),
            p.targets().to_vec(),
            start,
            len,
        ));
    }
    let writes = plans.into_iter().map(|(block, targets, start, len)| {
        let (node, pb, f) = (&node, &pb, &f);
        async move {
            let mut params = WriteParams::new(GenStamp(1));
            params.mode = mode;
            params.setup_with_first_packet = setup_with_data;
            let mut w = node
                .writer(block, &targets, params)
                .await
                .map_err(|e| e.to_string())?;
            let mut done = 0;
            while done < len {
                let n = PIECE.min(len - done);
                let piece = read_piece(f, start + done, n).await?;
                w.write(piece).await.map_err(|e| e.to_string())?;
                done += n;
                pb.inc(n);
            }
            let out = w.close().await.map_err(|e| e.to_string())?;
            Ok::<_, String>((block, out))
        }
    });
    let outcomes: Vec<_> = futures_util::stream::iter(writes)
        .buffered(PUT_IN_FLIGHT)
        .collect()
        .await;
    let mut entries = Vec::new();
    for o in outcomes {
        let (block, out) = o?;
        // The manifest lists every replica the block will have (async: once copied), at
        // its genstamp after any recovery.
        entries.push(ManifestEntry {
            block,
            genstamp: out.genstamp,
            len: out.len,
            replicas: out
                .replicas
                .iter()
                .chain(&out.queued_remote)
                .map(|&r| topo.node(r).name.clone())
                .collect(),
        });
    }
    let manifest = format_manifest(&entries);
    pb.finish_and_clear();
    let acks = node.metrics().pipeline_ack_us.snapshot();
    node.shutdown().await;
    let secs = t0.elapsed().as_secs_f64();
    let mb_s = size as f64 / 1e6 / secs.max(1e-9);
    let peak = peak_rss();
    let summary = format!(
        "put {}: {size} bytes in {} blocks, {mb_s:.1} MB/s, spec {spec} ({mode:?}), peak RSS {} MiB",
        file.display(),
        manifest.lines().count(),
        peak >> 20,
    );
    Ok(PutResult {
        manifest,
        summary,
        acks,
        mb_s,
        peak_rss: peak,
    })
}

/// What `put` did.
#[derive(Debug)]
pub struct PutResult {
    /// One line per block.
    pub manifest: String,
    /// For people.
    pub summary: String,
    /// Packet ack latencies (µs).
    pub acks: hdrhistogram::Histogram<u64>,
    /// Throughput.
    pub mb_s: f64,
    /// The process's peak resident memory when it finished, bytes.
    pub peak_rss: u64,
}

/// What `get` did.
#[derive(Debug)]
pub struct GetResult {
    /// Bytes written to the output file.
    pub bytes: u64,
    /// For people.
    pub summary: String,
    /// Bytes that came over the DCI.
    pub dci_bytes: u64,
    /// Throughput.
    pub mb_s: f64,
    /// Read latencies (µs).
    pub reads: hdrhistogram::Histogram<u64>,
    /// The process's peak resident memory when it finished, bytes.
    pub peak_rss: u64,
}

/// Reads the blocks of `manifest` from a client in `idc` into the file `out`,
/// [`GET_IN_FLIGHT`] blocks at a time, each in [`PIECE`]s written where they belong;
/// returns a summary with the bytes read per distance tier.
pub async fn get(dir: &Path, manifest: &str, idc: &str, out: &Path) -> Result<GetResult, String> {
    let entries = parse_manifest(manifest)?;
    let (node, topo) = client(dir, idc).await?;
    let total: u64 = entries.iter().map(|e| e.len).sum();
    let f = std::fs::File::create(out).map_err(|e| format!("{}: {e}", out.display()))?;
    f.set_len(total)
        .map_err(|e| format!("{}: {e}", out.display()))?;
    let f = Arc::new(f);
    let pb = bar(total, "get");
    let t0 = std::time::Instant::now();
    let mut start = 0;
    let mut blocks = Vec::new();
    for e in &entries {
        blocks.push((e, start));
        start += e.len;
    }
    let reads = blocks.into_iter().map(|(e, start)| {
        let (node, topo, pb, f) = (&node, &topo, &pb, &f);
        async move {
            let replicas: Vec<_> = e
                .replicas
                .iter()
                .filter_map(|n| topo.node_by_name(n))
                .collect();
            let r = node.reader(e.block, e.genstamp, &replicas, ReadParams::default());
            let mut done = 0;
            while done < e.len {
                let n = GET_PIECE.min(e.len - done);
                let bytes = r.read(done, n).await.map_err(|err| err.to_string())?;
                if bytes.len() as u64 != n {
                    return Err(format!(
                        "{}: read {} bytes at {done}, the manifest says the block has {}",
                        e.block,
                        bytes.len(),
                        e.len
                    ));
                }
                write_piece(f, start + done, bytes).await?;
                done += n;
                pb.inc(n);
            }
            Ok::<_, String>(())
        }
    });
    let mut done = futures_util::stream::iter(reads).buffer_unordered(GET_IN_FLIGHT);
    while let Some(r) = done.next().await {
        r?;
    }
    drop(done);
    pb.finish_and_clear();
    let m = node.metrics();
    let tiers: Vec<String> = Tier::ALL
        .iter()
        .map(|&t| format!("{t} {}", m.read_bytes.get(t)))
        .collect();
    let dci_bytes = m.read_bytes.get(Tier::Dci);
    let reads = m.read_us.snapshot();
    node.shutdown().await;
    let secs = t0.elapsed().as_secs_f64();
    let mb_s = total as f64 / 1e6 / secs.max(1e-9);
    let peak = peak_rss();
    let summary = format!(
        "get: {total} bytes from {} blocks, {mb_s:.1} MB/s, peak RSS {} MiB; bytes by tier: {}",
        entries.len(),
        peak >> 20,
        tiers.join(", ")
    );
    Ok(GetResult {
        bytes: total,
        summary,
        dci_bytes,
        mb_s,
        reads,
        peak_rss: peak,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_files_blocks_share_a_base_and_a_file_has_at_most_2_pow_20() {
        let base = file_id_base(1000, u64::MAX).unwrap();
        assert_eq!(base, u64::MAX << 20);
        // The blocks of a file fall in a few store directories (bits 8..24).
        let dirs: std::collections::HashSet<u64> =
            (0..1000).map(|i| ((base | i) >> 8) & 0xffff).collect();
        assert_eq!(dirs.len(), 4);
        assert_eq!(
            file_id_base(1 << 20, 0x1234_5678_9abc_def0),
            Ok(0x1234_5678_9ab0_0000)
        );
        let err = file_id_base((1 << 20) + 1, 7).unwrap_err();
        assert!(err.contains("at most 1048576 blocks"), "{err}");
    }

    #[test]
    fn manifests_parse_and_refuse_junk() {
        let m = parse_manifest("1 1 100 a1,a2,b1,b2\n\n2 3 7 a1\n").unwrap();
        assert_eq!(m.len(), 2);
        assert_eq!(
            m[1],
            ManifestEntry {
                block: BlockId(2),
                genstamp: GenStamp(3),
                len: 7,
                replicas: vec!["a1".into()]
            }
        );
        assert!(parse_manifest("1 1 x a1").unwrap_err().contains("line 1"));
        assert!(parse_manifest("1 1").is_err());
    }
}

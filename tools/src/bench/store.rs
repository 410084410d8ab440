//! `strait-bench store`: write N replicas of one block size through the store, then read
//! them back with verification, for each backend; in the same run, the physical reference:
//! plain io_uring O_DIRECT `write_at`/`read_at` of the same sizes at the same depth, with
//! no checksums, no copies and no meta file.

use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use serde_json::json;
use strait::block::{BlockId, ChecksumSpec, GenStamp};
use strait::store::{BackendKind, BlockStore, Durability, StoreConfig};

use super::{Latency, Phase, Table, r3};

/// What to run.
#[derive(Debug, Clone)]
pub struct StoreBenchParams {
    /// Directory on the disk under test.
    pub dir: PathBuf,
    /// Replicas per phase.
    pub replicas: usize,
    /// Bytes per replica.
    pub size: usize,
    /// Bytes per write/read call.
    pub io_size: usize,
    /// Operations in flight.
    pub depth: usize,
    /// Backends to measure.
    pub backends: Vec<BackendKind>,
    /// Rounds; each round runs the reference and every backend once, interleaved, and
    /// the figures reported are medians over rounds.
    pub rounds: usize,
}

/// Results of one backend (or of the raw reference).
#[derive(Clone)]
pub struct Measured {
    /// Name for the table.
    pub name: String,
    /// Write phase (including finalize / fsync).
    pub write: Phase,
    /// Read phase (including verification for the store).
    pub read: Phase,
    /// Per-call write latency.
    pub write_lat: Latency,
    /// Per-call read latency.
    pub read_lat: Latency,
}

fn source(size: usize) -> Arc<Vec<u8>> {
    Arc::new(super::random_bytes(0x2545_F491_4F6C_DD1D, size))
}

async fn bench_store(
    p: &StoreBenchParams,
    backend: BackendKind,
    data: &[u8],
    crcs: &[Vec<u32>],
) -> Result<Measured, String> {
    let root = p.dir.join(format!("store-{backend}"));
    let _ = std::fs::remove_dir_all(&root);
    let mut cfg = StoreConfig::new(&root);
    cfg.backend = backend;
    cfg.io_depth = p.depth;
    cfg.io_threads = if backend == BackendKind::Psync {
        p.depth.min(8)
    } else {
        1
    };
    cfg.io_buf_size = p.io_size;
    let (store, report) = BlockStore::open(cfg).await.map_err(|e| e.to_string())?;
    if !report.direct_io {
        eprintln!(
            "warning: {} does not support O_DIRECT; store numbers include the page cache",
            p.dir.display()
        );
    }
    let spec = ChecksumSpec::default();
    let total = (p.replicas * p.size) as u64;

    let (write, write_lat) = Phase::measure(total, async {
        let mut lat = Latency::default();
        for r in 0..p.replicas {
            let w = store
                .create(BlockId(r as u64), GenStamp(1), spec)
                .await
                .map_err(|e| e.to_string())?;
            let mut inflight = FuturesUnordered::new();
            for (i, c) in crcs.iter().enumerate() {
                if inflight.len() >= p.depth {
                    lat.record(inflight.next().await.ok_or("empty window")??);
                }
                let off = i * p.io_size;
                let end = (off + p.io_size).min(data.len());
                let t = Instant::now();
                // The range is reserved by this call, so appends are ordered here.
                let fut = w.write(off as u64, &data[off..end], c, Durability::Buffered);
                inflight.push(
                    async move { fut.await.map(|()| t.elapsed()).map_err(|e| e.to_string()) },
                );
            }
            while let Some(d) = inflight.next().await {
                lat.record(d?);
            }
            drop(inflight);
            w.finalize().await.map_err(|e| e.to_string())?;
        }
        Ok::<_, String>(lat)
    })
    .await;
    let write_lat = write_lat?;

    let (read, read_lat) = Phase::measure(total, async {
        let mut lat = Latency::default();
        for r in 0..p.replicas {
            let rd = store
                .reader(BlockId(r as u64), GenStamp(1))
                .await
                .map_err(|e| e.to_string())?;
            let mut inflight = FuturesUnordered::new();
            for i in 0..p.size.div_ceil(p.io_size) {
                if inflight.len() >= p.depth {
                    lat.record(inflight.next().await.ok_or("empty window")??);
                }
                let off = i * p.io_size;
                let n = p.io_size.min(p.size - off);
                let t = Instant::now();
                let rd = &rd;
                inflight.push(async move {
                    let got = rd.read(off as u64, n).await.map_err(|e| e.to_string())?;
                    if got.len() != n {
                        return Err(format!("short read at {off}"));
                    }
                    Ok::<_, String>(t.elapsed())
                });
            }
            while let Some(d) = inflight.next().await {
                lat.record(d?);
            }
        }
        Ok::<_, String>(lat)
    })
    .await;
    let read_lat = read_lat?;
    // A spot check that what came back is what went in.
    let rd = store
        .reader(BlockId(0), GenStamp(1))
        .await
        .map_err(|e| e.to_string())?;
    let probe = rd
        .read(p.size as u64 / 2, 4096.min(p.size / 2))
        .await
        .map_err(|e| e.to_string())?;
    if probe[..] != data[p.size / 2..p.size / 2 + probe.len()] {
        return Err("read back different bytes".into());
    }
    drop((rd, store));
    if std::env::var_os("STRAIT_BENCH_KEEP").is_none() {
        let _ = std::fs::remove_dir_all(&root);
    }
    Ok(Measured {
        name: format!("store/{backend}"),
        write,
        read,
        write_lat,
        read_lat,
    })
}

/// The physical reference on one tokio-uring thread: same bytes, same op size and depth.
fn bench_raw(p: &StoreBenchParams) -> Result<Measured, String> {
    let p = p.clone();
    std::thread::spawn(move || tokio_uring::start(async move { raw_inner(&p).await }))
        .join()
        .map_err(|_| "raw reference thread panicked".to_string())?
}

/// An over-allocated Vec and the offset at which `len` bytes are 4096-aligned.
pub(super) fn aligned_vec(len: usize) -> (Vec<u8>, usize) {
    let v = vec![0u8; len + 4096];
    let off = (4096 - v.as_ptr() as usize % 4096) % 4096;
    (v, off)
}

async fn raw_inner(p: &StoreBenchParams) -> Result<Measured, String> {
    use tokio_uring::buf::BoundedBuf;
    let dir = p.dir.join("raw");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let path = |r: usize| dir.join(format!("raw-{r}"));
    let open = |path: &Path, write: bool| -> Result<tokio_uring::fs::File, String> {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(write)
            .create(write)
            .truncate(write)
            .custom_flags(libc::O_DIRECT)
            .open(path)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(tokio_uring::fs::File::from_std(f))
    };
    let src = source(p.io_size);
    let mut pool: Vec<(Vec<u8>, usize)> = (0..p.depth)
        .map(|_| {
            let (mut v, off) = aligned_vec(p.io_size);
            v[off..off + p.io_size].copy_from_slice(&src);
            (v, off)
        })
        .collect();
    let ops = p.size.div_ceil(p.io_size);
    let total = (p.replicas * p.size) as u64;

    let mut write_lat = Latency::default();
    let (write, res) = Phase::measure(total, async {
        for r in 0..p.replicas {
            let f = std::rc::Rc::new(open(&path(r), true)?);
            let mut set = tokio::task::JoinSet::new();
            for i in 0..ops {
                if pool.is_empty() {
                    let (buf, d) = set
                        .join_next()
                        .await
                        .ok_or("join")?
                        .map_err(|e| e.to_string())??;
                    write_lat.record(d);
                    pool.push(buf);
                }
                let (v, off) = pool.pop().ok_or("pool")?;
                let f = f.clone();
                let n = p.io_size.min(p.size - i * p.io_size).div_ceil(4096) * 4096;
                let pos = (i * p.io_size) as u64;
                set.spawn_local(async move {
                    let t = Instant::now();
                    let (res, slice) = f.write_all_at(v.slice(off..off + n), pos).await;
                    res.map_err(|e| e.to_string())?;
                    Ok::<_, String>(((slice.into_inner(), off), t.elapsed()))
                });
            }
            while let Some(x) = set.join_next().await {
                let (buf, d) = x.map_err(|e| e.to_string())??;
                write_lat.record(d);
                pool.push(buf);
            }
            f.sync_all().await.map_err(|e| e.to_string())?;
        }
        Ok::<_, String>(())
    })
    .await;
    res?;

    let mut read_lat = Latency::default();
    let (read, res) = Phase::measure(total, async {
        for r in 0..p.replicas {
            let f = std::rc::Rc::new(open(&path(r), false)?);
            let mut set = tokio::task::JoinSet::new();
            for i in 0..ops {
                if pool.is_empty() {
                    let (buf, d) = set
                        .join_next()
                        .await
                        .ok_or("join")?
                        .map_err(|e| e.to_string())??;
                    read_lat.record(d);
                    pool.push(buf);
                }
                let (v, off) = pool.pop().ok_or("pool")?;
                let f = f.clone();
                let (n, pos) = (p.io_size, (i * p.io_size) as u64);
                set.spawn_local(async move {
                    let t = Instant::now();
                    let (res, slice) = f.read_at(v.slice(off..off + n), pos).await;
                    res.map_err(|e| e.to_string())?;
                    Ok::<_, String>(((slice.into_inner(), off), t.elapsed()))
                });
            }
            while let Some(x) = set.join_next().await {
                let (buf, d) = x.map_err(|e| e.to_string())??;
                read_lat.record(d);
                pool.push(buf);
            }
        }
        Ok::<_, String>(())
    })
    .await;
    res?;
    if std::env::var_os("STRAIT_BENCH_KEEP").is_none() {
        let _ = std::fs::remove_dir_all(&dir);
    }
    Ok(Measured {
        name: "raw io_uring O_DIRECT".into(),
        write,
        read,
        write_lat,
        read_lat,
    })
}

/// Runs the scenario; prints the table and returns the JSON summary.
pub async fn run(p: &StoreBenchParams) -> Result<serde_json::Value, String> {
    std::fs::create_dir_all(&p.dir).map_err(|e| format!("{}: {e}", p.dir.display()))?;
    let data = source(p.size);
    let spec = ChecksumSpec::default();
    let crcs: Arc<Vec<Vec<u32>>> =
        Arc::new(data.chunks(p.io_size).map(|c| spec.checksums(c)).collect());

    let mut raw_rounds = Vec::new();
    let mut store_rounds: Vec<Vec<Measured>> = vec![Vec::new(); p.backends.len()];
    for _ in 0..p.rounds.max(1) {
        raw_rounds.push(bench_raw(p)?);
        for (i, &b) in p.backends.iter().enumerate() {
            store_rounds[i].push(bench_store(p, b, &data, &crcs).await?);
        }
    }
    let raw = median(raw_rounds);
    let results: Vec<Measured> = store_rounds.into_iter().map(median).collect();

    println!(
        "store: {} replicas x {} MiB, {} KiB per call, {} in flight, median of {} rounds, dir {}",
        p.replicas,
        p.size >> 20,
        p.io_size >> 10,
        p.depth,
        p.rounds.max(1),
        p.dir.display()
    );
    let mut t = Table::new(&[
        "what", "op", "MB/s", "ratio", "cpu-s/GB", "p50 us", "p90", "p99", "p99.9", "max",
    ]);
    for m in std::iter::once(&raw).chain(&results) {
        for (op, phase, lat, reference) in [
            ("write", m.write, &m.write_lat, raw.write),
            ("read", m.read, &m.read_lat, raw.read),
        ] {
            let mut cells = vec![
                m.name.clone(),
                op.to_string(),
                format!("{:.0}", phase.mb_s()),
                format!("{:.2}", phase.mb_s() / reference.mb_s()),
                format!("{:.2}", phase.cpu_s_per_gb()),
            ];
            cells.extend(lat.summary().split_whitespace().map(str::to_string));
            t.row(cells);
        }
    }
    print!("{}", t.render());

    let main = results.first().ok_or("no backend measured")?;
    let mut out = json!({
        "scenario": "store",
        "backend": main.name.trim_start_matches("store/"),
        "replicas": p.replicas,
        "replica_bytes": p.size,
        "io_bytes": p.io_size,
        "depth": p.depth,
        "rounds": p.rounds.max(1),
        "write_mb_s": r3(main.write.mb_s()),
        "read_mb_s": r3(main.read.mb_s()),
        "raw_write_mb_s": r3(raw.write.mb_s()),
        "raw_read_mb_s": r3(raw.read.mb_s()),
        "write_ratio": r3(main.write.mb_s() / raw.write.mb_s()),
        "read_ratio": r3(main.read.mb_s() / raw.read.mb_s()),
        "write_p50_us": main.write_lat.at(0.5),
        "write_p99_us": main.write_lat.at(0.99),
        "read_p50_us": main.read_lat.at(0.5),
        "read_p99_us": main.read_lat.at(0.99),
        "write_cpu_s_per_gb": r3(main.write.cpu_s_per_gb()),
        "read_cpu_s_per_gb": r3(main.read.cpu_s_per_gb()),
    });
    for m in results.iter().skip(1) {
        let b = m.name.trim_start_matches("store/");
        out[format!("{b}_write_mb_s")] = json!(r3(m.write.mb_s()));
        out[format!("{b}_read_mb_s")] = json!(r3(m.read.mb_s()));
        out[format!("{b}_write_ratio")] = json!(r3(m.write.mb_s() / raw.write.mb_s()));
        out[format!("{b}_read_ratio")] = json!(r3(m.read.mb_s() / raw.read.mb_s()));
    }
    Ok(out)
}

/// The round with the median write throughput for the write figures and the round with
/// the median read throughput for the read figures; latency histograms of all rounds.
fn median(mut rounds: Vec<Measured>) -> Measured {
    let mut write_lat = Latency::default();
    let mut read_lat = Latency::default();
    for m in &rounds {
        write_lat.merge(&m.write_lat);
        read_lat.merge(&m.read_lat);
    }
    let mid = rounds.len() / 2;
    rounds.sort_by(|a, b| a.write.mb_s().total_cmp(&b.write.mb_s()));
    let write = rounds[mid].write;
    rounds.sort_by(|a, b| a.read.mb_s().total_cmp(&b.read.mb_s()));
    let read = rounds[mid].read;
    Measured {
        name: rounds[mid].name.clone(),
        write,
        read,
        write_lat,
        read_lat,
    }
}

//! `strait demo`: the main job on an embedded default. Starts a local 2-IDC × 4-node
//! cluster behind emulated DCI links, writes a data set in sync and in async mode, reads
//! it back from each IDC, stops the whole of IDC B and shows reads and async writes going
//! on, brings IDC B back and shows the backlog draining, kills a node with `kill -9` and
//! waits for its replicas to be repaired inside its IDC, then prints a table and stops
//! the cluster.

use std::fmt::Write as _;
use std::path::Path;
use std::time::{Duration, Instant};

use strait::wire::{TrafficClass, WriteMode};

use crate::bench::{Latency, Table, random_bytes};
use crate::check;
use crate::client::{self, GetResult, PutResult};
use crate::cluster::{self, ClusterSpec, NodePlan};

struct Row {
    what: String,
    mb_s: f64,
    lat: Option<Latency>,
    dci: String,
}

/// Runs the demo in `dir` (a fresh work directory) and returns the report.
/// Runs the demo in `dir`; with `plot`, also writes an SVG chart of DCI throughput per
/// class over the run there, and one of the RPO (bytes only in one IDC) beside it
/// (`NAME-rpo.svg`).
pub async fn run(
    dir: &Path,
    set_bytes: usize,
    block_bytes: u64,
    plot: Option<&Path>,
) -> Result<String, String> {
    let spec = ClusterSpec {
        idcs: 2,
        racks: 2,
        nodes_per_rack: 2,
        dci_rate: 125_000_000,
        dci_delay: Duration::from_millis(5),
    };
    let _ = std::fs::remove_dir_all(dir);
    let d = dir.to_path_buf();
    let sp = spec.clone();
    let summary = tokio::task::spawn_blocking(move || cluster::up(&d, &sp))
        .await
        .map_err(|e| e.to_string())??;
    println!("{summary}");
    let sampler = plot.map(|_| Sampler::start(&spec));
    let result = scenario(dir, &spec, set_bytes, block_bytes).await;
    let charts = match (sampler, plot) {
        (Some(s), Some(path)) => s.finish(path).await,
        _ => Ok(String::new()),
    };
    let d = dir.to_path_buf();
    let down = tokio::task::spawn_blocking(move || cluster::down(&d))
        .await
        .map_err(|e| e.to_string())?;
    let report = result?;
    down?;
    Ok(report + &charts?)
}

/// Scrapes every daemon every 250 ms for the charts of `--plot`.
struct Sampler {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<Vec<(f64, [f64; 4], f64)>>,
}

impl Sampler {
    fn start(spec: &ClusterSpec) -> Sampler {
        let metrics: Vec<_> = cluster::plan(spec)
            .into_iter()
            .filter(|n| !n.client)
            .map(|n| n.metrics)
            .collect();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let task = tokio::spawn(async move {
            let t0 = Instant::now();
            let mut out = Vec::new();
            let mut tick = tokio::time::interval(Duration::from_millis(250));
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                tick.tick().await;
                let m = metrics.clone();
                let sample = tokio::task::spawn_blocking(move || {
                    // One request per daemon, every figure of the sample from it.
                    let texts = cluster::scrape(&m);
                    let sum = |name: &str, label: &str| -> f64 {
                        texts
                            .iter()
                            .map(|t| cluster::metric_sum(t, name, label))
                            .sum()
                    };
                    let granted = TrafficClass::ALL.map(|c| {
                        sum(
                            "strait_dci_granted_bytes_total",
                            &format!("class=\"{}\"", c.name()),
                        )
                    });
                    (granted, sum("strait_replication_pending_bytes", ""))
                })
                .await;
                if let Ok((granted, pending)) = sample {
                    out.push((t0.elapsed().as_secs_f64(), granted, pending));
                }
            }
            out
        });
        Sampler { stop, task }
    }

    /// Stops sampling and writes the two charts; returns the lines naming them.
    async fn finish(self, path: &Path) -> Result<String, String> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let samples = self.task.await.map_err(|e| e.to_string())?;
        // A daemon that was down for a sample makes its counters dip: rates below zero
        // are cut to zero.
        let mut dci: Vec<crate::plot::Series> = TrafficClass::ALL
            .iter()
            .map(|c| crate::plot::Series {
                name: c.name().to_string(),
                points: Vec::new(),
            })
            .collect();
        for w in samples.windows(5) {
            let (a, b) = (&w[0], &w[4]);
            let dt = (b.0 - a.0).max(1e-9);
            for (k, s) in dci.iter_mut().enumerate() {
                s.points
                    .push((b.0, ((b.1[k] - a.1[k]) / dt / 1e6).max(0.0)));
            }
        }
        crate::plot::write_svg(
            path,
            &crate::plot::Chart {
                title: "strait demo: DCI throughput per class (sync, async, idc-b down and back, kill -9)",
                x_label: "seconds",
                y_label: "MB/s admitted",
                series: dci,
                marks: vec![("DCI budget".to_string(), 125.0)],
            },
        )?;
        let rpo_path = path.with_file_name(format!(
            "{}-rpo.svg",
            path.file_stem().and_then(|s| s.to_str()).unwrap_or("demo")
        ));
        crate::plot::write_svg(
            &rpo_path,
            &crate::plot::Chart {
                title: "strait demo: RPO, async bytes not yet in the other IDC",
                x_label: "seconds",
                y_label: "MiB pending",
                series: vec![crate::plot::Series {
                    name: "pending".to_string(),
                    points: samples
                        .iter()
                        .map(|s| (s.0, s.2 / (1u64 << 20) as f64))
                        .collect(),
                }],
                marks: Vec::new(),
            },
        )?;
        Ok(format!(
            "charts: {} (DCI per class), {} (RPO)\n",
            path.display(),
            rpo_path.display()
        ))
    }
}

async fn put(
    dir: &Path,
    name: &str,
    data: &[u8],
    mode: WriteMode,
    idc: &str,
    block: u64,
) -> Result<PutResult, String> {
    let file = dir.join(name);
    std::fs::write(&file, data).map_err(|e| e.to_string())?;
    let spec = "2+2"
        .parse()
        .map_err(|e: strait::placement::SpecError| e.to_string())?;
    client::put(dir, &file, &spec, mode, idc, block, true).await
}

/// Reads a data set back into `dir/read.bin` and compares it with `expect`. The file is
/// written once, untimed, before the first read: this machine's root filesystem writes
/// a new file at a fraction of the rate it rewrites one, which would be measured instead
/// of strait's reads.
async fn get(dir: &Path, manifest: &str, idc: &str, expect: &[u8]) -> Result<GetResult, String> {
    let out = dir.join("read.bin");
    if !out.exists() {
        std::fs::write(&out, expect).map_err(|e| format!("{}: {e}", out.display()))?;
    }
    let r = client::get(dir, manifest, idc, &out).await?;
    let read = std::fs::read(&out).map_err(|e| format!("{}: {e}", out.display()))?;
    if read != expect {
        return Err(format!(
            "data read from {idc} differs from what was written"
        ));
    }
    Ok(r)
}

async fn scenario(
    dir: &Path,
    spec: &ClusterSpec,
    set_bytes: usize,
    block: u64,
) -> Result<String, String> {
    let nodes: Vec<NodePlan> = cluster::plan(spec)
        .into_iter()
        .filter(|n| !n.client)
        .collect();
    let metrics: Vec<_> = nodes.iter().map(|n| n.metrics).collect();
    let scrape = |name: &'static str| {
        let m = metrics.clone();
        async move {
            tokio::task::spawn_blocking(move || cluster::scrape_sum(&m, name))
                .await
                .unwrap_or(0.0)
        }
    };
    let mut rows: Vec<Row> = Vec::new();
    let mut written = 0u64;

    println!(
        "1. writing {} MiB in sync mode and {} MiB in async mode from idc-a ...",
        set_bytes >> 20,
        set_bytes >> 20
    );
    let sync_data = random_bytes(1, set_bytes);
    let dci0 = scrape("strait_dci_wire_bytes_total").await;
    let s = put(dir, "sync.bin", &sync_data, WriteMode::Sync, "idc-a", block).await?;
    written += sync_data.len() as u64;
    rows.push(Row {
        what: "write sync 2+2".into(),
        mb_s: s.mb_s,
        lat: Some(Latency::from_hdr(&s.acks)),
        dci: "both IDCs before ack".into(),
    });
    let async_data = random_bytes(2, set_bytes);
    let a = put(
        dir,
        "async.bin",
        &async_data,
        WriteMode::Async,
        "idc-a",
        block,
    )
    .await?;
    written += async_data.len() as u64;
    rows.push(Row {
        what: "write async 2+2".into(),
        mb_s: a.mb_s,
        lat: Some(Latency::from_hdr(&a.acks)),
        dci: "local ack, copied later".into(),
    });

    // Let the async copies land, then read everything back from each IDC.
    let drained = wait_drained(&scrape).await;
    println!("2. async backlog drained in {drained:.1} s; reading back from each IDC ...");
    for (idc, m, d, what) in [
        ("idc-a", &s.manifest, &sync_data, "read sync set"),
        ("idc-b", &s.manifest, &sync_data, "read sync set"),
        ("idc-b", &a.manifest, &async_data, "read async set"),
    ] {
        let r = get(dir, m, idc, d).await?;
        rows.push(Row {
            what: format!("{what} from {idc}"),
            mb_s: r.mb_s,
            lat: Some(Latency::from_hdr(&r.reads)),
            dci: format!("{} B over DCI", r.dci_bytes),
        });
    }

    println!("3. stopping all of idc-b ...");
    let d = dir.to_path_buf();
    tokio::task::spawn_blocking(move || cluster::stop_nodes(&d, &["b1", "b2", "b3", "b4"]))
        .await
        .map_err(|e| e.to_string())??;
    let r = get(dir, &s.manifest, "idc-a", &sync_data).await?;
    rows.push(Row {
        what: "read from idc-a, idc-b down".into(),
        mb_s: r.mb_s,
        lat: Some(Latency::from_hdr(&r.reads)),
        dci: format!("{} B over DCI", r.dci_bytes),
    });
    let outage_data = random_bytes(3, set_bytes / 2);
    let o = put(
        dir,
        "outage.bin",
        &outage_data,
        WriteMode::Async,
        "idc-a",
        block,
    )
    .await?;
    written += outage_data.len() as u64;
    rows.push(Row {
        what: "write async, idc-b down".into(),
        mb_s: o.mb_s,
        lat: Some(Latency::from_hdr(&o.acks)),
        dci: "queued".into(),
    });
    let lag_down = scrape("strait_replication_pending_bytes").await;
    println!(
        "   async writes acknowledged; RPO backlog {} MiB",
        lag_down as u64 >> 20
    );

    println!("4. bringing idc-b back ...");
    for n in nodes.iter().filter(|n| n.idc == 1) {
        let (d, name, m) = (dir.to_path_buf(), n.name.clone(), n.metrics);
        tokio::task::spawn_blocking(move || cluster::restart_node(&d, &name, m))
            .await
            .map_err(|e| e.to_string())??;
    }
    let t0 = Instant::now();
    let mut timeline = vec![(0.0, lag_down)];
    loop {
        let lag = scrape("strait_replication_pending_bytes").await;
        timeline.push((t0.elapsed().as_secs_f64(), lag));
        if lag == 0.0 {
            break;
        }
        if t0.elapsed() > Duration::from_secs(90) {
            return Err(format!(
                "backlog did not drain within 90 s ({lag} bytes left)"
            ));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let r = get(dir, &o.manifest, "idc-b", &outage_data).await?;
    rows.push(Row {
        what: "read outage set from idc-b".into(),
        mb_s: r.mb_s,
        lat: Some(Latency::from_hdr(&r.reads)),
        dci: format!("{} B over DCI", r.dci_bytes),
    });
    let dci = scrape("strait_dci_wire_bytes_total").await - dci0;

    // A node lost for good: its replicas come back inside idc-a, not over the DCI.
    println!("5. kill -9 of a2 ...");
    let repair_dci0 = scrape_labelled(&metrics, "tier=\"dci\"").await;
    let pid = cluster::pid_of(dir, "a2")?;
    cluster::signal(pid, "-KILL")?;
    let t0 = Instant::now();
    loop {
        let mut healthy = true;
        for m in [&s.manifest, &a.manifest] {
            healthy &= check::fsck(dir, m, "idc-a", false).await?.healthy();
        }
        if healthy {
            break;
        }
        if t0.elapsed() > Duration::from_secs(60) {
            return Err("the blocks a2 held were not repaired within 60 s".into());
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let repaired_in = t0.elapsed().as_secs_f64();
    let repair_dci = scrape_labelled(&metrics, "tier=\"dci\"").await - repair_dci0;

    let mut out = String::new();
    let _ = writeln!(
        out,
        "\nstrait demo: 2 IDCs x 2 racks x 2 nodes, 1 Gbit/s DCI emulated with +5 ms one way, spec 2+2, {} MiB blocks",
        block >> 20
    );
    let mut t = Table::new(&[
        "step", "MB/s", "p50 us", "p90", "p99", "p99.9", "max", "DCI",
    ]);
    for r in &rows {
        let mut cells = vec![r.what.clone(), format!("{:.1}", r.mb_s)];
        match &r.lat {
            Some(l) if l.count() > 0 => {
                cells.extend(l.summary().split_whitespace().map(str::to_string))
            }
            _ => cells.extend(std::iter::repeat_n("-".to_string(), 5)),
        }
        cells.push(r.dci.clone());
        t.row(cells);
    }
    out += &t.render();
    let _ = writeln!(
        out,
        "(write latency: packet acks; read latency: 8 MiB ranges, 4 blocks read at a time)"
    );
    let _ = writeln!(
        out,
        "DCI bytes per block byte written: {:.3} (one copy each; payload bytes)",
        dci / written as f64
    );
    let _ = writeln!(
        out,
        "sync 2+2 write: {:.2} of the DCI budget ({} MB/s; {} blocks in flight, budget shared by the nodes through its allocator)",
        s.mb_s / (spec.dci_rate as f64 / 1e6),
        spec.dci_rate / 1_000_000,
        client::PUT_IN_FLIGHT
    );
    let _ = writeln!(
        out,
        "kill -9 of a2: every block back at 2+2 after {repaired_in:.1} s, {repair_dci} repair bytes over the DCI"
    );
    let _ = writeln!(out, "RPO lag after idc-b returned (seconds: MiB pending):");
    let step = (timeline.len() / 8).max(1);
    let samples: Vec<String> = timeline
        .iter()
        .step_by(step)
        .chain(timeline.last())
        .map(|(t, b)| format!("{t:.1}s: {:.1}", b / (1 << 20) as f64))
        .collect();
    let _ = writeln!(out, "  {}", samples.join("  "));
    Ok(out)
}

/// Repair bytes with `label` summed over the daemons (those that answer).
async fn scrape_labelled(metrics: &[std::net::SocketAddr], label: &'static str) -> f64 {
    let m = metrics.to_vec();
    tokio::task::spawn_blocking(move || {
        cluster::scrape_labelled(&m, "strait_repair_bytes_total", label)
    })
    .await
    .unwrap_or(0.0)
}

async fn wait_drained<F, Fut>(scrape: &F) -> f64
where
    F: Fn(&'static str) -> Fut,
    Fut: std::future::Future<Output = f64>,
{
    let t0 = Instant::now();
    while scrape("strait_replication_pending_tasks").await > 0.0
        && t0.elapsed() < Duration::from_secs(60)
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    t0.elapsed().as_secs_f64()
}

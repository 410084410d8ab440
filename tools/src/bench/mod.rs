//! `strait-bench`: scenarios that measure strait against the physical reference (raw
//! disk, raw QUIC stream) in the same run. Each prints a human table, then one JSON object
//! as its last line so results can be compared across commits.

pub mod chaos;
pub mod dci;
pub mod pipeline;
pub mod repair;
pub mod sched;
pub mod store;
pub mod transport;

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

/// A latency histogram in microseconds, 1 µs to 100 s, 3 significant digits.
#[derive(Clone)]
pub struct Latency(Histogram<u64>);

impl Default for Latency {
    fn default() -> Self {
        Latency(Histogram::new_with_bounds(1, 100_000_000, 3).expect("valid histogram bounds"))
    }
}

impl Latency {
    /// Records one operation.
    pub fn record(&mut self, d: Duration) {
        let us = (d.as_micros() as u64).clamp(1, 100_000_000);
        self.0.saturating_record(us);
    }

    /// Adds the samples of a strait histogram (µs, possibly with wider bounds).
    pub fn add_hdr(&mut self, h: &Histogram<u64>) {
        for v in h.iter_recorded() {
            self.0.saturating_record_n(
                v.value_iterated_to().clamp(1, 100_000_000),
                v.count_at_value(),
            );
        }
    }

    /// A latency histogram with the samples of a strait histogram.
    pub fn from_hdr(h: &Histogram<u64>) -> Self {
        let mut l = Latency::default();
        l.add_hdr(h);
        l
    }

    /// Adds another histogram's samples.
    pub fn merge(&mut self, other: &Latency) {
        let _ = self.0.add(&other.0);
    }

    /// Value at a quantile (0..=1), in µs.
    pub fn at(&self, q: f64) -> u64 {
        self.0.value_at_quantile(q)
    }

    /// Number of samples.
    pub fn count(&self) -> u64 {
        self.0.len()
    }

    /// `p50 / p90 / p99 / p99.9 / max` in µs, for a table cell.
    pub fn summary(&self) -> String {
        format!(
            "{:>7} {:>7} {:>7} {:>7} {:>8}",
            self.at(0.5),
            self.at(0.9),
            self.at(0.99),
            self.at(0.999),
            self.0.max()
        )
    }
}

/// Starts in-process node `name` of `topology` with its identity from `ca` and a fresh
/// store at `root` (emptied first), one IO thread, after `tweak` has adjusted its config.
pub async fn start_node(
    topology: &std::sync::Arc<strait::topology::Topology>,
    ca: &strait::transport::CertAuthority,
    name: &str,
    root: std::path::PathBuf,
    tweak: impl FnOnce(&mut strait::node::NodeConfig),
) -> Result<strait::node::Node, String> {
    let _ = std::fs::remove_dir_all(&root);
    let mut cfg = strait::node::NodeConfig::new(
        name,
        topology.clone(),
        ca.identity(name).map_err(|e| e.to_string())?,
        root,
    );
    cfg.store.io_threads = 1;
    tweak(&mut cfg);
    Ok(strait::node::Node::start(cfg)
        .await
        .map_err(|e| format!("start {name}: {e}"))?
        .0)
}

/// Two IDCs of `per_idc` nodes each (`a1..`, `b1..`), two nodes per rack, on
/// `127.<net>.<h>` port `port` (idc-b's hosts from 17), joined by one link of `budget`
/// bytes/s with a 2 ms RTT.
pub fn two_idc_topology(
    net: [u8; 2],
    port: u16,
    per_idc: u8,
    budget: u64,
) -> Result<std::sync::Arc<strait::topology::Topology>, String> {
    let mut b = strait::topology::Topology::builder()
        .idc("idc-a")
        .idc("idc-b");
    for (i, idc) in ["a", "b"].iter().enumerate() {
        for n in 0..per_idc {
            let host = i as u8 * 16 + n + 1;
            b = b.node(
                format!("{idc}{}", n + 1),
                format!("idc-{idc}"),
                format!("r{}", n / 2 + 1),
                std::net::SocketAddr::from(([127, net[0], net[1], host], port)),
                1 << 40,
            );
        }
    }
    Ok(std::sync::Arc::new(
        b.link("idc-a", "idc-b", budget, Duration::from_millis(2))
            .build()
            .map_err(|e| e.to_string())?,
    ))
}

/// CPU time (user + system) this process has used so far, from `/proc/self/stat`.
pub fn cpu_seconds() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return 0.0;
    };
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
        return 0.0;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line, 12 and 13 after ')'.
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}

/// Context switches so far of every live thread of this process (voluntary and not):
/// each is a thread hand-off or a preemption. Counted, so steadier across runs than
/// timings on a shared machine; per block it shows how many thread hops a block costs.
/// Threads that exited are not counted (a run's IO and runtime threads live throughout).
pub fn context_switches() -> u64 {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return 0;
    };
    let count = |status: &str, key: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("status")).ok())
        .map(|s| count(&s, "voluntary_ctxt_switches:") + count(&s, "nonvoluntary_ctxt_switches:"))
        .sum()
}

/// Wall time, CPU time and bytes of one measured phase.
#[derive(Debug, Clone, Copy)]
pub struct Phase {
    /// Bytes moved.
    pub bytes: u64,
    /// Wall-clock time.
    pub wall: Duration,
    /// Process CPU time.
    pub cpu: f64,
}

impl Phase {
    /// Measures `f`.
    pub async fn measure<T, F: std::future::Future<Output = T>>(bytes: u64, f: F) -> (Phase, T) {
        let (c0, t0) = (cpu_seconds(), Instant::now());
        let out = f.await;
        let phase = Phase {
            bytes,
            wall: t0.elapsed(),
            cpu: cpu_seconds() - c0,
        };
        (phase, out)
    }

    /// Throughput in MB/s (10^6 bytes).
    pub fn mb_s(&self) -> f64 {
        self.bytes as f64 / 1e6 / self.wall.as_secs_f64().max(1e-9)
    }

    /// CPU seconds per GB (10^9 bytes).
    pub fn cpu_s_per_gb(&self) -> f64 {
        self.cpu / (self.bytes as f64 / 1e9).max(1e-12)
    }
}

/// A plain text table with a header row.
pub struct Table {
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    /// A table with these column names.
    pub fn new(header: &[&str]) -> Self {
        Table {
            header: header.iter().map(|s| s.to_string()).collect(),
            rows: Vec::new(),
        }
    }

    /// Adds a row.
    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    /// Renders with columns padded to their widest cell.
    pub fn render(&self) -> String {
        let n = self.header.len();
        let mut width = vec![0; n];
        for r in std::iter::once(&self.header).chain(&self.rows) {
            for (i, c) in r.iter().enumerate().take(n) {
                width[i] = width[i].max(c.len());
            }
        }
        let mut out = String::new();
        for (k, r) in std::iter::once(&self.header).chain(&self.rows).enumerate() {
            for (i, c) in r.iter().enumerate().take(n) {
                let _ = write!(
                    out,
                    "{}{:<w$}",
                    if i > 0 { "  " } else { "" },
                    c,
                    w = width[i]
                );
            }
            out.push('\n');
            if k == 0 {
                out.push_str(&"-".repeat(width.iter().sum::<usize>() + 2 * (n - 1)));
                out.push('\n');
            }
        }
        out
    }
}

/// Rounds to 3 decimals for the JSON line.
pub fn r3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// Deterministic incompressible bytes (xorshift), different for each seed.
pub fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Deterministic text-like bytes that zstd shrinks ~5x.
pub fn text_bytes(seed: u64, len: usize) -> Vec<u8> {
    let words = [
        "replica ",
        "pipeline ",
        "genstamp ",
        "idc-a ",
        "idc-b ",
        "block ",
        "\n",
    ];
    (0..)
        .flat_map(|i: usize| words[(i * 5 + i / 7 + seed as usize) % words.len()].bytes())
        .take(len)
        .collect()
}

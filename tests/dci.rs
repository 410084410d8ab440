//! DCI protection in real time: two IDCs on loopback with a small DCI budget, a heavy
//! remote-read load plus sync writes; the bytes that reach the other IDC stay within the
//! budget. And zstd on DCI hops: text crosses at well under half its size, random data
//! is sent as it is.

mod common;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{Cluster, pattern};
use strait::block::{BlockId, GenStamp};
use strait::node::Node;
use strait::pipeline::WriteParams;
use strait::read::ReadParams;
use strait::topology::{NodeId, Tier};

async fn write(node: &Node, block: BlockId, targets: &[NodeId], data: &[u8]) {
    let mut w = node
        .writer(block, targets, WriteParams::new(GenStamp(1)))
        .await
        .unwrap();
    w.write(Bytes::copy_from_slice(data)).await.unwrap();
    let out = w.close().await.unwrap();
    assert_eq!(out.replicas, targets, "no replica lost");
}

/// Bytes that arrived in IDC B from IDC A: remote reads received by b-nodes and pipeline
/// packets received over the DCI hop, as they came off the wire.
fn arrived_in_b(c: &Cluster) -> u64 {
    ["b1", "b2", "b3", "b4"]
        .iter()
        .map(|n| {
            let m = c.node(n).metrics();
            m.read_bytes.get(Tier::Dci) + m.pipeline_received_bytes.get(Tier::Dci)
        })
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cross_idc_bytes_stay_within_the_budget() {
    // 100 Mbit/s of DCI; two nodes of IDC A send across, each with half of it.
    let budget = 12_500_000u64;
    let c = Cluster::start_with(budget, 0.5).await;
    // Blocks that live only in IDC A, for readers in IDC B.
    let local = c.ids(&["a1", "a2"]);
    let data = pattern(1, 4 << 20);
    for b in 0..4 {
        write(c.node("a1"), BlockId(b), &local, &data).await;
    }
    let start = Instant::now();
    let run = Duration::from_secs(3);
    let mut tasks = Vec::new();
    // Remote-read backlog: b-nodes read the IDC-A blocks over and over.
    for (i, reader) in ["b1", "b2", "b3"].iter().enumerate() {
        let node = c.node(reader).clone();
        let replicas = local.clone();
        tasks.push(tokio::spawn(async move {
            let mut n = 0u64;
            while start.elapsed() < run {
                let r = node.reader(
                    BlockId((i as u64 + n) % 4),
                    GenStamp(1),
                    &replicas,
                    ReadParams {
                        hedge_after: None,
                        ..ReadParams::default()
                    },
                );
                assert_eq!(r.read_all().await.unwrap().len(), 4 << 20);
                n += 1;
            }
        }));
    }
    // Sync 2+2 writes at the same time.
    let writer = c.node("a1").clone();
    let targets = c.ids(&["a1", "a2", "b1", "b2"]);
    tasks.push(tokio::spawn(async move {
        let mut b = 100;
        while start.elapsed() < run {
            write(&writer, BlockId(b), &targets, &pattern(b, 1 << 20)).await;
            b += 1;
        }
    }));
    // Sample, every 100 ms, what the governors of IDC A admitted and what arrived in B.
    let admitted = |c: &Cluster| -> u64 {
        ["a1", "a2"]
            .iter()
            .flat_map(|n| {
                c.node(n)
                    .governors()
                    .iter()
                    .map(|(_, g)| g.clone())
                    .collect::<Vec<_>>()
            })
            .map(|g| {
                strait::dci::governor::CLASSES
                    .iter()
                    .map(|&k| g.stats(k).granted_bytes)
                    .sum::<u64>()
            })
            .sum()
    };
    let mut samples = vec![(Duration::ZERO, arrived_in_b(&c), admitted(&c))];
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    while start.elapsed() < run {
        tick.tick().await;
        samples.push((start.elapsed(), arrived_in_b(&c), admitted(&c)));
    }
    for t in tasks {
        t.await.unwrap();
    }
    // Every window of at least one second stays within budget · t + burst: for what the
    // governors admitted (two senders, a burst each), and for what arrived in B up to the
    // packets in flight at the window's edges (three 256 KiB read packets and one 1 MiB
    // pipeline packet; the receivers count a packet once it is whole).
    let burst = (budget / 200).max(64 << 10);
    let in_flight = 3 * (256 << 10) + (1 << 20);
    let mut worst = 0.0f64;
    for i in 0..samples.len() {
        for j in i + 1..samples.len() {
            let t = (samples[j].0 - samples[i].0).as_secs_f64();
            if t < 1.0 {
                continue;
            }
            let granted = samples[j].2 - samples[i].2;
            let allowed = budget as f64 * t * 1.02 + 2.0 * burst as f64;
            assert!(
                granted as f64 <= allowed,
                "governors admitted {granted} bytes in {t:.2} s; budget allows {allowed:.0}"
            );
            let arrived = samples[j].1 - samples[i].1;
            worst = worst.max(arrived as f64 / (budget as f64 * t));
            let allowed = allowed + in_flight as f64;
            assert!(
                arrived as f64 <= allowed,
                "{arrived} bytes arrived in {t:.2} s; budget allows {allowed:.0}"
            );
        }
    }
    // And the budget was used: the backlog kept the link busy.
    let total = samples.last().unwrap().1 - samples[0].1;
    let used = total as f64 / (budget as f64 * samples.last().unwrap().0.as_secs_f64());
    assert!(used > 0.7, "link used at {used:.2} of its budget");
    eprintln!(
        "DCI link used at {used:.3} of its budget; worst window of 1 s or more at {worst:.3}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_crosses_compressed_random_does_not() {
    // A small budget so the DCI hop is the bottleneck.
    let c = Cluster::start_with(2_000_000, 1.0).await;
    let targets = c.ids(&["a1", "b1"]);
    let words = [
        "replica ",
        "pipeline ",
        "genstamp ",
        "idc-a ",
        "idc-b ",
        "block ",
        "\n",
    ];
    let text: Vec<u8> = (0..)
        .flat_map(|i: usize| words[(i * 5 + i / 7) % words.len()].bytes())
        .take(3 << 20)
        .collect();
    write(c.node("a1"), BlockId(1), &targets, &text).await;
    let m = c.node("a1").metrics();
    let wire = m.dci_wire_bytes.load(Ordering::Relaxed);
    let saved = m.dci_saved_bytes.load(Ordering::Relaxed);
    assert_eq!(wire + saved, text.len() as u64);
    assert!(
        wire < text.len() as u64 / 2,
        "text crossed at {wire} of {} bytes",
        text.len()
    );
    // The replica in IDC B holds the uncompressed bytes, verified.
    let r = c
        .node("b1")
        .reader(BlockId(1), GenStamp(1), &targets, ReadParams::default());
    assert_eq!(r.read_all().await.unwrap(), text);

    let random = pattern(2, 2 << 20);
    write(c.node("a1"), BlockId(2), &targets, &random).await;
    assert_eq!(
        m.dci_saved_bytes.load(Ordering::Relaxed),
        saved,
        "random data is sent as it is"
    );
    assert_eq!(
        m.dci_wire_bytes.load(Ordering::Relaxed),
        wire + random.len() as u64
    );
}

//! Repair on an in-process cluster (2 IDCs × 2 racks × 2 nodes, 2+2 blocks): a node that
//! stops is noticed by the survivors' probes and its replicas are restored inside its IDC
//! without a DCI byte; a block whose whole IDC side is lost waits out the grace period,
//! then crosses the DCI once; an IDC back within the grace costs nothing; the queue
//! survives a restart; a write's recovery and a corrupt read queue repairs too; two repairs
//! of one block at once copy it once.

mod common;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{Cluster, pattern};
use strait::block::{BlockId, GenStamp};
use strait::pipeline::WriteParams;
use strait::read::ReadParams;
use strait::repair::RepairConfig;
use strait::store::ReplicaState;
use strait::topology::Tier;

const LEN: usize = 300_000;

fn config(grace: Duration, down_after: Duration) -> RepairConfig {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let mut r = RepairConfig::new("unused");
    r.remote_grace = grace;
    r.probe_interval = Duration::from_millis(200);
    r.down_after = down_after;
    r
}

/// Writes `block` (sync, from `from`) through `targets`; returns its data.
async fn write(c: &Cluster, from: &str, block: u64, targets: &[&str]) -> Vec<u8> {
    let data = pattern(block, LEN);
    let mut w = c
        .node(from)
        .writer(
            BlockId(block),
            &c.ids(targets),
            WriteParams::new(GenStamp(1)),
        )
        .await
        .unwrap();
    w.write(Bytes::copy_from_slice(&data)).await.unwrap();
    let out = w.close().await.unwrap();
    assert_eq!(out.replicas.len(), targets.len());
    data
}

/// Running nodes holding `block` finalized at genstamp 1 with `LEN` bytes, sorted.
fn holders(c: &Cluster, block: u64) -> Vec<String> {
    let mut v: Vec<String> = c
        .nodes
        .iter()
        .filter(|(_, n)| {
            n.block_report().iter().any(|r| {
                r.block == BlockId(block)
                    && r.genstamp == GenStamp(1)
                    && r.len == LEN as u64
                    && r.state == ReplicaState::Finalized
            })
        })
        .map(|(name, _)| name.clone())
        .collect();
    v.sort();
    v
}

fn idc_count(h: &[String], idc: char) -> usize {
    h.iter().filter(|n| n.starts_with(idc)).count()
}

/// Polls (bounded) until `done`; returns how long it took.
async fn wait_for(what: &str, within: Duration, mut done: impl FnMut() -> bool) -> Duration {
    let t0 = Instant::now();
    while !done() {
        assert!(t0.elapsed() < within, "{what}: not within {within:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    t0.elapsed()
}

/// Bytes every running node sent across the DCI.
fn dci_bytes(c: &Cluster) -> u64 {
    dci_bytes_but(c, &[])
}

/// Bytes the running nodes other than `except` sent across the DCI (taken before they
/// stop, to compare with `dci_bytes` after).
fn dci_bytes_but(c: &Cluster, except: &[&str]) -> u64 {
    c.nodes
        .iter()
        .filter(|(name, _)| !except.contains(&name.as_str()))
        .map(|(_, n)| n.metrics().dci_wire_bytes.load(Ordering::Relaxed))
        .sum()
}

fn repair_bytes(c: &Cluster, tier: Tier) -> u64 {
    c.nodes
        .values()
        .map(|n| n.metrics().repair_bytes.get(tier))
        .sum()
}

/// The repair bytes over `tiers` once they reach `want` (within 10 s): a repair counts
/// its bytes when its copy returns, a moment after the target shows the replica.
async fn repair_bytes_settled(c: &Cluster, tiers: &[Tier], want: u64) -> u64 {
    let sum = || tiers.iter().map(|&t| repair_bytes(c, t)).sum::<u64>();
    wait_for("repair bytes counted", Duration::from_secs(10), || {
        sum() >= want
    })
    .await;
    sum()
}

fn pending(c: &Cluster) -> usize {
    c.nodes
        .values()
        .filter_map(|n| n.repair_status())
        .map(|s| s.pending)
        .sum()
}

/// Reads `block` from `holder` alone (verified chunk by chunk) on `via`.
async fn read_from(c: &Cluster, via: &str, holder: &str, block: u64) -> Vec<u8> {
    let r = c.node(via).reader(
        BlockId(block),
        GenStamp(1),
        &[c.id(holder)],
        ReadParams::default(),
    );
    r.read(0, LEN as u64).await.unwrap().to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stopped_node_is_restored_inside_its_idc_without_a_dci_byte() {
    let mut c =
        Cluster::start_repairing(config(Duration::from_secs(60), Duration::from_secs(1))).await;
    let a_mates = ["a1", "a3", "a4"];
    let b_pairs = [["b1", "b2"], ["b3", "b4"], ["b1", "b3"], ["b2", "b4"]];
    let mut data = Vec::new();
    for i in 0..8u64 {
        let b = b_pairs[i as usize % 4];
        let targets = ["a2", a_mates[i as usize % 3], b[0], b[1]];
        data.push(write(&c, "a1", 100 + i, &targets).await);
    }
    let before = dci_bytes_but(&c, &["a2"]);
    c.stop("a2").await;
    let took = wait_for("every block back at 2+2", Duration::from_secs(30), || {
        (0..8).all(|i| {
            let h = holders(&c, 100 + i);
            idc_count(&h, 'a') == 2 && idc_count(&h, 'b') == 2
        })
    })
    .await;
    println!("restored 8 blocks in {took:?} after the stop");
    assert_eq!(dci_bytes(&c), before, "no byte crossed the DCI");
    assert_eq!(repair_bytes(&c, Tier::Dci), 0);
    assert_eq!(
        repair_bytes_settled(&c, &[Tier::Rack, Tier::Idc], 8 * LEN as u64).await,
        8 * LEN as u64,
        "each block copied once, inside idc-a"
    );
    for i in 0..8u64 {
        for h in holders(&c, 100 + i) {
            assert_eq!(
                read_from(&c, "a1", &h, 100 + i).await,
                data[i as usize],
                "{h}'s replica of block {}",
                100 + i
            );
        }
    }
    wait_for("the queues drained", Duration::from_secs(10), || {
        pending(&c) == 0
    })
    .await;
    let done: u64 = c
        .nodes
        .values()
        .map(|n| n.metrics().repairs_done.load(Ordering::Relaxed))
        .sum();
    assert_eq!(done, 8, "one repair per block, by its responsible survivor");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lost_idc_side_waits_out_the_grace_then_crosses_the_dci_once() {
    let grace = Duration::from_secs(4);
    let mut c = Cluster::start_repairing(config(grace, Duration::from_secs(1))).await;
    let a_pairs = [["a1", "a2"], ["a3", "a4"], ["a1", "a3"]];
    for i in 0..3u64 {
        let a = a_pairs[i as usize];
        write(&c, "a1", 200 + i, &[a[0], a[1], "b1", "b2"]).await;
    }
    let before = dci_bytes_but(&c, &["b1", "b2"]);
    let t0 = Instant::now();
    c.stop_together(&["b1", "b2"]).await;
    wait_for("the repairs are queued", Duration::from_secs(10), || {
        pending(&c) >= 3
    })
    .await;
    let queued_at = t0.elapsed();
    assert!(
        queued_at < grace,
        "queued after {queued_at:?}: too late to see the grace period at work"
    );
    assert_eq!(dci_bytes(&c), before, "nothing crossed while waiting");
    wait_for(
        "idc-b back at two replicas",
        Duration::from_secs(30),
        || (0..3).all(|i| idc_count(&holders(&c, 200 + i), 'b') == 2),
    )
    .await;
    let restored = t0.elapsed();
    assert!(
        restored >= grace,
        "restored after {restored:?}, before the grace"
    );
    assert_eq!(
        repair_bytes_settled(&c, &[Tier::Dci], 3 * LEN as u64).await,
        3 * LEN as u64,
        "one crossing per block"
    );
    let wire = dci_bytes(&c) - before;
    assert!(
        wire < 3 * LEN as u64 * 13 / 10,
        "{wire} bytes on the DCI for {} bytes of blocks",
        3 * LEN
    );
    for i in 0..3u64 {
        assert_eq!(holders(&c, 200 + i)[2..], ["b3", "b4"]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_idc_back_within_the_grace_costs_nothing_and_the_queue_survives_a_restart() {
    let mut c =
        Cluster::start_repairing(config(Duration::from_secs(120), Duration::from_secs(1))).await;
    for i in 0..3u64 {
        write(&c, "a1", 300 + i, &["a1", "a2", "b1", "b2"]).await;
    }
    // Counted on the nodes that never restart (a restart starts counters afresh).
    let steady = ["a2", "a3", "a4", "b3", "b4"];
    let before: u64 = steady
        .iter()
        .map(|n| c.node(n).metrics().dci_wire_bytes.load(Ordering::Relaxed))
        .sum();
    c.stop_together(&["b1", "b2"]).await;
    // a1 owes the repairs (the first live holder, none being left in idc-b).
    wait_for("a1 queued the repairs", Duration::from_secs(10), || {
        c.node("a1").repair_status().unwrap().pending == 3
    })
    .await;
    c.stop("a1").await;
    c.start_node("a1").await;
    assert_eq!(
        c.node("a1").repair_status().unwrap().pending,
        3,
        "the queue is durable"
    );
    let (b1, b2) = (c.id("b1"), c.id("b2"));
    wait_for(
        "a1 sees idc-b's nodes down",
        Duration::from_secs(10),
        || {
            let down = c.node("a1").repair_status().unwrap().down;
            down.contains(&b1) && down.contains(&b2)
        },
    )
    .await;
    c.start_node("b1").await;
    c.start_node("b2").await;
    wait_for(
        "the repairs found nothing to do",
        Duration::from_secs(20),
        || pending(&c) == 0,
    )
    .await;
    assert_eq!(
        dci_bytes(&c),
        before,
        "an IDC back within the grace costs no DCI byte"
    );
    assert_eq!(repair_bytes(&c, Tier::Dci), 0);
    for i in 0..3u64 {
        // b2 comes back a moment after b1: a repair that runs in between may copy b2's
        // replica from b1 to b3, inside idc-b — allowed (same-IDC repairs do not wait),
        // but never across the DCI.
        let h = holders(&c, 300 + i);
        assert!(
            ["a1", "a2", "b1", "b2"]
                .iter()
                .all(|n| h.contains(&n.to_string())),
            "{h:?}"
        );
        assert_eq!(idc_count(&h, 'a'), 2);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_dropped_by_a_write_is_replaced_by_a_repair() {
    // The watcher would take an hour: the write's own recovery must queue the repair.
    let mut c =
        Cluster::start_repairing(config(Duration::from_secs(60), Duration::from_secs(3600))).await;
    let data = pattern(400, LEN);
    let mut w = c
        .node("a1")
        .writer(
            BlockId(400),
            &c.ids(&["a2", "a3", "b1", "b2"]),
            WriteParams::new(GenStamp(1)),
        )
        .await
        .unwrap();
    w.write(Bytes::copy_from_slice(&data[..LEN / 2]))
        .await
        .unwrap();
    w.hflush().await.unwrap();
    c.stop("a3").await;
    w.write(Bytes::copy_from_slice(&data[LEN / 2..]))
        .await
        .unwrap();
    let out = w.close().await.unwrap();
    assert_eq!(out.replicas.len(), 3, "a3 dropped: {out:?}");
    let gs = out.genstamp;
    let before = dci_bytes(&c);
    wait_for("block 400 back at 2+2", Duration::from_secs(20), || {
        let h: Vec<&String> = c
            .nodes
            .iter()
            .filter(|(_, n)| {
                n.store()
                    .get(BlockId(400))
                    .is_some_and(|r| r.genstamp == gs && r.state == ReplicaState::Finalized)
            })
            .map(|(name, _)| name)
            .collect();
        h.len() == 4 && h.iter().filter(|n| n.starts_with('a')).count() == 2
    })
    .await;
    assert_eq!(dci_bytes(&c), before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_repairs_of_one_block_at_once_copy_it_once() {
    let mut c =
        Cluster::start_repairing(config(Duration::from_secs(60), Duration::from_secs(3600))).await;
    write(&c, "a1", 500, &["a1", "a2", "b1", "b2"]).await;
    c.stop("a2").await;
    let set = c.ids(&["a1", "a2", "b1", "b2"]);
    let (x, y) = tokio::join!(
        c.node("a1")
            .repair(BlockId(500), GenStamp(1), LEN as u64, &set),
        c.node("b1")
            .repair(BlockId(500), GenStamp(1), LEN as u64, &set),
    );
    let (x, y) = (x.unwrap(), y.unwrap());
    let h = holders(&c, 500);
    assert_eq!(h.len(), 4, "one new replica, not two: {h:?}");
    assert_eq!(idc_count(&h, 'a'), 2);
    assert_eq!(x.replicas.len(), 4);
    assert_eq!(y.replicas.len(), 4);
    // Repeating it is a no-op.
    let again = c
        .node("b2")
        .repair(BlockId(500), GenStamp(1), LEN as u64, &set)
        .await
        .unwrap();
    assert!(again.copied.is_empty(), "{again:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_operator_repair_request_is_served_by_a_holder() {
    use strait::wire::{Frame, RepairBlock, Status};
    let mut c =
        Cluster::start_repairing(config(Duration::from_secs(60), Duration::from_secs(3600))).await;
    write(&c, "a1", 600, &["a1", "a2", "b1", "b2"]).await;
    c.stop("a2").await;
    let ask = |replicas: Vec<String>| {
        let node = c.node("a3").clone();
        let b1 = c.id("b1");
        async move {
            let mut s = node.transport().open(b1).await.unwrap();
            s.writer
                .send(&Frame::RepairBlock(RepairBlock {
                    block: BlockId(600),
                    genstamp: GenStamp(1),
                    len: LEN as u64,
                    replicas,
                }))
                .await
                .unwrap();
            match s.reader.recv().await.unwrap() {
                Some(Frame::RepairResult(r)) => r,
                other => panic!("expected a repair result, got {other:?}"),
            }
        }
    };
    let set: Vec<String> = ["a1", "a2", "b1", "b2"].map(String::from).to_vec();
    let r = ask(set.clone()).await;
    assert_eq!(r.status, Status::Success, "{}", r.message);
    assert_eq!(r.copied.len(), 1);
    assert!(r.copied[0].starts_with('a'), "{r:?}");
    assert!(
        r.tiers[0] == Tier::Rack as u8 || r.tiers[0] == Tier::Idc as u8,
        "{r:?}"
    );
    assert_eq!(r.replicas.len(), 4);
    let h = holders(&c, 600);
    assert_eq!((h.len(), idc_count(&h, 'a')), (4, 2), "{h:?}");
    assert_eq!(repair_bytes(&c, Tier::Dci), 0);
    // Again: nothing to copy. A name outside the topology is refused.
    assert!(ask(set).await.copied.is_empty());
    assert_eq!(ask(vec!["zz".into()]).await.status, Status::Rejected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replica_a_read_finds_corrupt_is_copied_back() {
    let c =
        Cluster::start_repairing(config(Duration::from_secs(60), Duration::from_secs(3600))).await;
    let data = write(&c, "a1", 700, &["a1", "a2", "b1", "b2"]).await;
    let path = c.dirs["a1"].path().join("finalized/00/02/blk_700_1");
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[150_000] ^= 0x01;
    std::fs::write(&path, &bytes).unwrap();
    let r = c.node("a1").reader(
        BlockId(700),
        GenStamp(1),
        &c.ids(&["a1", "a2", "b1", "b2"]),
        ReadParams::default(),
    );
    assert_eq!(
        r.read_all().await.unwrap(),
        data,
        "read around the bad replica"
    );
    wait_for("a1's replica copied back", Duration::from_secs(20), || {
        holders(&c, 700).contains(&"a1".to_string())
    })
    .await;
    assert_eq!(read_from(&c, "a3", "a1", 700).await, data);
    assert_eq!(repair_bytes(&c, Tier::Dci), 0);
    assert_eq!(holders(&c, 700), ["a1", "a2", "b1", "b2"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_restarted_survivor_still_knows_what_it_owes() {
    // down_after is longer than a1's restart takes here (its shutdown waits out its
    // handlers), so that a1 is not itself repaired away while it restarts.
    let mut c =
        Cluster::start_repairing(config(Duration::from_secs(60), Duration::from_secs(5))).await;
    for i in 0..3u64 {
        write(&c, "a1", 800 + i, &["a1", "a2", "b1", "b2"]).await;
    }
    // a1 is the survivor that owes a2's replicas; it restarts first.
    c.stop("a1").await;
    c.start_node("a1").await;
    c.stop("a2").await;
    wait_for(
        "idc-a back at two replicas",
        Duration::from_secs(20),
        || (0..3).all(|i| idc_count(&holders(&c, 800 + i), 'a') == 2),
    )
    .await;
    assert_eq!(repair_bytes(&c, Tier::Dci), 0);
    assert_eq!(
        repair_bytes_settled(&c, &[Tier::Rack, Tier::Idc], 3 * LEN as u64).await,
        3 * LEN as u64
    );
}

/// A node's peer watch feeds placement: once a1 counts b2 as down, the node states it
/// hands to placement mark b2 dead, and no placement chooses it; once b2 is back, it is
/// chosen again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn placement_skips_a_node_the_peer_watch_counts_down() {
    use rand::SeedableRng;
    use strait::placement;
    use strait::topology::Origin;
    let mut c =
        Cluster::start_repairing(config(Duration::from_secs(60), Duration::from_secs(1))).await;
    let (a1, b2) = (c.node("a1").clone(), c.id("b2"));
    assert!(a1.node_states().get(b2).alive);
    let me = a1.node_states().get(a1.id()).free_bytes;
    assert!(me > 0 && me <= c.topo.node(a1.id()).capacity);
    c.stop("b2").await;
    wait_for("a1 counts b2 down", Duration::from_secs(10), || {
        !a1.node_states().get(b2).alive
    })
    .await;
    let origin = Origin::node(c.topo.location(a1.id()));
    let spec = "2+2".parse().unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let states = a1.node_states();
    let mut remote = std::collections::BTreeSet::new();
    for _ in 0..500 {
        let p = placement::choose_targets(&c.topo, &origin, &spec, &[], &states, &mut rng).unwrap();
        assert!(!p.targets().contains(&b2), "placed on a node counted down");
        remote.extend(p.targets()[2..].iter().copied());
    }
    assert_eq!(
        remote.len(),
        3,
        "the other three of idc-b all take replicas"
    );
    c.start_node("b2").await;
    wait_for("a1 counts b2 up", Duration::from_secs(10), || {
        a1.node_states().get(b2).alive
    })
    .await;
}

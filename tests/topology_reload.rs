//! Topology reload on an in-process cluster (2 IDCs × 2 racks × 2 nodes, repair on):
//! a node added at runtime becomes a peer only once the others reload, takes writes and
//! placements; a removed node is refused as a peer, never placed on, and its replicas are
//! repaired; a reload that removes the node itself or adds an IDC is refused and changes
//! nothing; new DCI budgets reach the governors.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{Cluster, NAMES, pattern};
use rand::SeedableRng;
use strait::block::{BlockId, GenStamp};
use strait::pipeline::WriteParams;
use strait::placement;
use strait::repair::RepairConfig;
use strait::store::ReplicaState;
use strait::topology::{Origin, Topology, TopologyError};

const LEN: usize = 200_000;

/// Writes `block` from `from` through `targets` (names in `from`'s topology).
async fn write(c: &Cluster, from: &str, block: u64, targets: &[&str]) -> Result<(), String> {
    let node = c.node(from);
    let topo = node.topology();
    let ids: Vec<_> = targets
        .iter()
        .map(|t| {
            topo.node_by_name(t)
                .ok_or(format!("{from} does not know {t}"))
        })
        .collect::<Result<_, _>>()?;
    let mut w = node
        .writer(BlockId(block), &ids, WriteParams::new(GenStamp(1)))
        .await
        .map_err(|e| e.to_string())?;
    w.write(Bytes::from(pattern(block, LEN)))
        .await
        .map_err(|e| e.to_string())?;
    let out = w.close().await.map_err(|e| e.to_string())?;
    if out.replicas.len() != targets.len() {
        return Err(format!(
            "{} replicas of {}",
            out.replicas.len(),
            targets.len()
        ));
    }
    Ok(())
}

/// Running nodes other than `except` holding `block` finalized.
fn holders(c: &Cluster, block: u64, except: &str) -> Vec<String> {
    let mut v: Vec<String> = c
        .nodes
        .iter()
        .filter(|(name, _)| name.as_str() != except)
        .filter(|(_, n)| {
            n.block_report().iter().any(|r| {
                r.block == BlockId(block)
                    && r.len == LEN as u64
                    && r.state == ReplicaState::Finalized
            })
        })
        .map(|(name, _)| name.clone())
        .collect();
    v.sort();
    v
}

fn states_alive(n: &strait::node::Node, id: strait::topology::NodeId) -> bool {
    n.node_states().get(id).alive
}

async fn wait_for(what: &str, within: Duration, mut done: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !done() {
        assert!(t0.elapsed() < within, "{what}: not within {within:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn repairing() -> RepairConfig {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let mut r = RepairConfig::new("unused");
    r.remote_grace = Duration::from_secs(60);
    r.probe_interval = Duration::from_millis(200);
    r.down_after = Duration::from_secs(1);
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nodes_join_and_leave_a_running_cluster() {
    let mut c = Cluster::start_repairing(repairing()).await;
    write(&c, "a2", 1, &["a1", "a3", "b1", "b3"]).await.unwrap();

    // a5 starts with the new topology (a1 gone, a5 in), the others still run the old.
    let next = c.edited_topology(&["a1"], &[("a5", "idc-a", "r2", 9)], 125_000_000);
    let old = std::mem::replace(&mut c.topo, Arc::new(next.clone()));
    c.dirs.insert("a5".into(), tempfile::tempdir().unwrap());
    c.start_node("a5").await;
    c.topo = old;
    let refused = write(&c, "a5", 2, &["a5", "a2", "b1", "b2"]).await;
    assert!(
        refused.is_err(),
        "a2 accepted a5 before it knew it: {refused:?}"
    );

    for name in NAMES.iter().filter(|&&n| n != "a1") {
        let change = c.node(name).set_topology(&next).unwrap();
        assert_eq!(
            (change.added.as_slice(), change.removed.as_slice()),
            (&["a5".to_string()][..], &["a1".to_string()][..]),
            "{name}"
        );
    }
    // The new node is a peer now, in both directions.
    write(&c, "a2", 3, &["a2", "a5", "b1", "b2"]).await.unwrap();
    write(&c, "a5", 4, &["a5", "a3", "b3", "b4"]).await.unwrap();
    assert!(holders(&c, 3, "").contains(&"a5".to_string()));
    // The removed one is not: it cannot be named, and its own streams are refused.
    assert!(write(&c, "a2", 5, &["a2", "a1", "b1", "b2"]).await.is_err());
    let from_removed = write(&c, "a1", 6, &["a1", "a3", "b1", "b3"]).await;
    assert!(
        from_removed.is_err(),
        "a removed node still writes: {from_removed:?}"
    );

    // Placement on a2's view never picks a1, and picks a5.
    let a2 = c.node("a2").clone();
    let topo = a2.topology();
    let (a1, a5) = (
        topo.find_node("a1").unwrap(),
        topo.node_by_name("a5").unwrap(),
    );
    assert!(topo.is_retired(a1) && !states_alive(&a2, a1));
    let origin = Origin::node(topo.location(a2.id()));
    let spec = "2+2".parse().unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    let states = a2.node_states();
    let mut picked_a5 = 0;
    for _ in 0..500 {
        let p = placement::choose_targets(&topo, &origin, &spec, &[], &states, &mut rng).unwrap();
        assert!(!p.targets().contains(&a1), "placed on a removed node");
        picked_a5 += usize::from(p.targets().contains(&a5));
    }
    assert!(
        picked_a5 > 100,
        "a5 placed {picked_a5} times in 500 (a third of the other rack)"
    );

    // Block 1's replica on a1 is repaired inside idc-a, a1 still running.
    wait_for(
        "block 1 back at 4 replicas without a1",
        Duration::from_secs(20),
        || holders(&c, 1, "a1").len() == 4,
    )
    .await;
    let h = holders(&c, 1, "a1");
    assert_eq!(h.iter().filter(|n| n.starts_with('a')).count(), 2, "{h:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_a_node_cannot_apply_changes_nothing_and_budgets_reach_the_governors() {
    let c = Cluster::start_with(100_000_000, 0.5).await;
    let a1 = c.node("a1");
    let idc_b = c.topo.idc_by_name("idc-b").unwrap();
    let rate = |n: &strait::node::Node| n.governors().to(idc_b).unwrap().config().rate;
    assert_eq!(rate(a1), 50_000_000);

    let without_me = c.edited_topology(&["a1"], &[], 100_000_000);
    match a1.set_topology(&without_me) {
        Err(TopologyError::Reload { reason }) => assert!(reason.contains("a1"), "{reason}"),
        other => panic!("removing a1 from its own topology: {other:?}"),
    }
    let three = Topology::builder()
        .idc("idc-a")
        .idc("idc-b")
        .idc("idc-c")
        .node("a1", "idc-a", "r1", c.topo.node(c.id("a1")).addr, 1)
        .link("idc-a", "idc-b", 1, Duration::from_millis(1))
        .link("idc-a", "idc-c", 1, Duration::from_millis(1))
        .build()
        .unwrap();
    assert!(matches!(
        a1.set_topology(&three),
        Err(TopologyError::Reload { .. })
    ));
    assert_eq!(
        a1.topology().node_ids().count(),
        8,
        "a refused reload changed the topology"
    );

    let faster = c.edited_topology(&[], &[], 300_000_000);
    let change = a1.set_topology(&faster).unwrap();
    assert!(change.is_empty(), "{change:?}");
    assert_eq!(
        rate(a1),
        150_000_000,
        "the governor keeps its share of the new budget"
    );
    assert_eq!(rate(c.node("a2")), 50_000_000, "a2 did not reload");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn writes_go_on_while_nodes_join_and_leave() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let _ = repairing();
    let mut c = Cluster::start().await;
    let next = c.edited_topology(&["a4"], &[("a5", "idc-a", "r2", 9)], 125_000_000);
    let old = std::mem::replace(&mut c.topo, Arc::new(next.clone()));
    c.dirs.insert("a5".into(), tempfile::tempdir().unwrap());
    c.start_node("a5").await;
    c.topo = old;

    // a2 writes 2+2 blocks one after another, placed on its view of the topology, until
    // it has written `stop_at`.
    let a2 = c.node("a2").clone();
    let (written, stop_at) = (
        Arc::new(AtomicUsize::new(0)),
        Arc::new(AtomicUsize::new(usize::MAX)),
    );
    let writer = {
        let (a2, written, stop_at) = (a2.clone(), written.clone(), stop_at.clone());
        tokio::spawn(async move {
            let mut rng = rand::rngs::StdRng::seed_from_u64(1);
            let spec = "2+2".parse().unwrap();
            let mut out = Vec::new();
            while out.len() < stop_at.load(Ordering::Acquire) {
                let block = 1000 + out.len() as u64;
                let topo = a2.topology();
                let origin = Origin::node(topo.location(a2.id()));
                let p = placement::choose_targets(
                    &topo,
                    &origin,
                    &spec,
                    &[],
                    &a2.node_states(),
                    &mut rng,
                )
                .unwrap();
                let names: Vec<String> = p
                    .targets()
                    .iter()
                    .map(|&t| topo.node(t).name.clone())
                    .collect();
                let mut w = a2
                    .writer(BlockId(block), p.targets(), WriteParams::new(GenStamp(1)))
                    .await
                    .unwrap_or_else(|e| panic!("block {block} on {names:?}: {e}"));
                w.write(Bytes::from(pattern(block, LEN))).await.unwrap();
                let done = w
                    .close()
                    .await
                    .unwrap_or_else(|e| panic!("block {block} on {names:?}: {e}"));
                out.push((names, done.replicas.len()));
                written.fetch_add(1, Ordering::AcqRel);
            }
            out
        })
    };
    // Reload every node but a4 while the writes go on: a5 joins, a4 leaves (running).
    while written.load(Ordering::Acquire) < 5 {
        tokio::task::yield_now().await;
    }
    for name in NAMES.iter().chain(["a5"].iter()).filter(|&&n| n != "a4") {
        c.node(name).set_topology(&next).unwrap();
    }
    // Blocks placed from here on (after the one in progress) see the new topology.
    let reloaded_at = written.load(Ordering::Acquire) + 1;
    stop_at.store(reloaded_at + 10, Ordering::Release);
    let written = writer.await.unwrap();
    for (names, replicas) in &written {
        assert!(*replicas >= 3, "{names:?}: {replicas} replicas");
    }
    for (names, replicas) in &written[reloaded_at..] {
        assert!(
            !names.contains(&"a4".to_string()),
            "placed on a removed node: {names:?}"
        );
        assert_eq!(*replicas, 4, "{names:?}");
    }
    assert!(
        written[reloaded_at..]
            .iter()
            .any(|(n, _)| n.contains(&"a5".to_string())),
        "a5 took no replica in 10 blocks"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_that_reloaded_blames_the_removed_hop_not_itself() {
    let c = Cluster::start().await;
    // Everyone but a3 and a4 forgets a4; a3 still writes through it.
    let next = c.edited_topology(&["a4"], &[], 125_000_000);
    for name in NAMES.iter().filter(|&&n| n != "a3" && n != "a4") {
        c.node(name).set_topology(&next).unwrap();
    }
    let a3 = c.node("a3");
    let targets = c.ids(&["a3", "a2", "a4", "b1"]);
    let mut w = a3
        .writer(BlockId(77), &targets, WriteParams::new(GenStamp(1)))
        .await
        .unwrap();
    w.write(Bytes::from(pattern(77, LEN))).await.unwrap();
    let out = w.close().await.unwrap();
    let names: Vec<&str> = out.replicas.iter().map(|&r| c.name(r)).collect();
    assert_eq!(names, ["a3", "a2", "b1"], "a2 refused a4 and was kept");
}

//! Async writes on an in-process cluster: acknowledged after the local IDC, copied to the
//! remote IDC in the background with one DCI crossing, RPO reported and guarded, a remote
//! IDC that is down and comes back.

mod common;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{Cluster, pattern};
use strait::block::{BlockId, GenStamp};
use strait::node::Node;
use strait::pipeline::{WriteError, WriteOutcome, WriteParams};
use strait::replication::{ReplicationConfig, RpoPolicy};
use strait::store::ReplicaState;
use strait::topology::NodeId;
use strait::wire::WriteMode;

fn config(max_lag_bytes: Option<u64>, policy: RpoPolicy) -> ReplicationConfig {
    let mut r = ReplicationConfig::new("unused");
    r.max_lag_bytes = max_lag_bytes;
    r.policy = policy;
    r.backoff_min = Duration::from_millis(20);
    r.backoff_max = Duration::from_millis(300);
    r
}

async fn write_async(
    node: &Node,
    block: BlockId,
    targets: &[NodeId],
    data: &[u8],
) -> Result<WriteOutcome, WriteError> {
    let mut p = WriteParams::new(GenStamp(1));
    p.mode = WriteMode::Async;
    let mut w = node.writer(block, targets, p).await?;
    w.write(Bytes::copy_from_slice(data)).await?;
    w.close().await
}

/// Polls (bounded) until every node in `names` holds `block` finalized with `data`.
async fn wait_replicated(
    c: &Cluster,
    names: &[&str],
    block: BlockId,
    data: &[u8],
    within: Duration,
) {
    let deadline = Instant::now() + within;
    for n in names {
        loop {
            let store = c.node(n).store();
            if store
                .get(block)
                .is_some_and(|r| r.state == ReplicaState::Finalized)
            {
                let r = store.reader(block, GenStamp(1)).await.unwrap();
                let got = r.read(0, r.len() as usize).await.unwrap();
                assert_eq!(&got[..], data, "{n} holds the block's bytes");
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{block} did not reach {n} within {within:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

async fn wait_drained(node: &Node, within: Duration) {
    let deadline = Instant::now() + within;
    while node.rpo().unwrap().pending_tasks > 0 {
        assert!(
            Instant::now() < deadline,
            "log not drained: {:?}",
            node.rpo().unwrap()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn async_writes_ack_locally_and_reach_the_remote_idc_once() {
    let c = Cluster::start_full(125_000_000, 1.0, Some(config(None, RpoPolicy::Warn))).await;
    let targets = c.ids(&["a1", "a3", "b2", "b4"]);
    let mut total = 0u64;
    let mut blocks = Vec::new();
    for b in 0..4u64 {
        let data = pattern(b + 50, 1_500_000 + b as usize * 1000);
        let out = write_async(c.node("a1"), BlockId(b), &targets, &data)
            .await
            .unwrap();
        assert_eq!(
            out.replicas,
            c.ids(&["a1", "a3"]),
            "acknowledged by the local IDC"
        );
        assert_eq!(out.queued_remote, c.ids(&["b2", "b4"]));
        total += data.len() as u64;
        blocks.push(data);
    }
    for (b, data) in blocks.iter().enumerate() {
        wait_replicated(
            &c,
            &["a1", "a3", "b2", "b4"],
            BlockId(b as u64),
            data,
            Duration::from_secs(20),
        )
        .await;
    }
    wait_drained(c.node("a1"), Duration::from_secs(10)).await;
    let rpo = c.node("a1").rpo().unwrap();
    assert_eq!(rpo.drained_bytes, total);
    // One copy across the DCI per block: the bytes that crossed are the data plus framing.
    let crossed: u64 = c
        .nodes
        .values()
        .map(|n| n.metrics().dci_wire_bytes.load(Ordering::Relaxed))
        .sum();
    let ratio = crossed as f64 / total as f64;
    assert!(
        (1.0..1.05).contains(&ratio),
        "DCI bytes per block byte {ratio:.3}"
    );
    // Inside IDC B the second copy came from b2, not over the DCI.
    assert_eq!(
        c.node("b4")
            .metrics()
            .pipeline_received_bytes
            .get(strait::topology::Tier::Dci),
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_idc_down_backlog_grows_policy_triggers_then_drains() {
    let bound = 3_000_000;
    let mut c =
        Cluster::start_full(125_000_000, 1.0, Some(config(Some(bound), RpoPolicy::Sync))).await;
    let targets = c.ids(&["a1", "a2", "b1", "b2"]);
    for n in ["b1", "b2", "b3", "b4"] {
        c.stop(n).await;
    }
    // Async writes keep succeeding while IDC B is down; the backlog grows.
    let mut blocks = Vec::new();
    for b in 0..3u64 {
        let data = pattern(b + 70, 1_200_000);
        let out = write_async(c.node("a1"), BlockId(b), &targets, &data)
            .await
            .unwrap();
        assert_eq!(out.replicas, c.ids(&["a1", "a2"]));
        blocks.push(data);
    }
    let rpo = c.node("a1").rpo().unwrap();
    assert_eq!(rpo.pending_tasks, 3);
    assert_eq!(rpo.pending_bytes, 3 * 1_200_000);
    // Past the bound, the policy turns the next write into a sync write, which cannot
    // complete while IDC B is down.
    let e = write_async(c.node("a1"), BlockId(9), &targets, &pattern(9, 1000))
        .await
        .unwrap_err();
    assert!(
        matches!(&e, WriteError::IdcLost { idc, .. } if idc == "idc-b"),
        "{e}"
    );
    // IDC B returns: the log drains to zero and every block is on all four replicas.
    for n in ["b1", "b2", "b3", "b4"] {
        c.start_node(n).await;
    }
    for (b, data) in blocks.iter().enumerate() {
        wait_replicated(
            &c,
            &["a1", "a2", "b1", "b2"],
            BlockId(b as u64),
            data,
            Duration::from_secs(30),
        )
        .await;
    }
    wait_drained(c.node("a1"), Duration::from_secs(10)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_survives_a_restart_of_its_node() {
    let mut c = Cluster::start_full(125_000_000, 1.0, Some(config(None, RpoPolicy::Warn))).await;
    let targets = c.ids(&["a1", "a2", "b1", "b2"]);
    for n in ["b1", "b2"] {
        c.stop(n).await;
    }
    let data = pattern(80, 900_000);
    write_async(c.node("a1"), BlockId(1), &targets, &data)
        .await
        .unwrap();
    assert_eq!(c.node("a1").rpo().unwrap().pending_tasks, 1);
    // The node holding the log restarts; the task is still owed and is carried out.
    c.stop("a1").await;
    c.start_node("a1").await;
    assert_eq!(c.node("a1").rpo().unwrap().pending_tasks, 1);
    for n in ["b1", "b2"] {
        c.start_node(n).await;
    }
    wait_replicated(
        &c,
        &["b1", "b2"],
        BlockId(1),
        &data,
        Duration::from_secs(30),
    )
    .await;
    wait_drained(c.node("a1"), Duration::from_secs(10)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn async_mode_needs_a_log() {
    let c = Cluster::start().await;
    let e = write_async(c.node("a1"), BlockId(1), &c.ids(&["a1", "b1"]), b"x")
        .await
        .unwrap_err();
    assert!(matches!(e, WriteError::Replication { .. }), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_whose_block_is_gone_everywhere_is_dropped_not_retried_forever() {
    let mut c = Cluster::start_full(125_000_000, 1.0, Some(config(None, RpoPolicy::Warn))).await;
    let targets = c.ids(&["a1", "a3", "b2", "b4"]);
    // The remote IDC is down: the task stays queued.
    c.stop("b2").await;
    c.stop("b4").await;
    let block = BlockId(70);
    let data = pattern(70, 300_000);
    write_async(c.node("a1"), block, &targets, &data)
        .await
        .unwrap();
    assert_eq!(c.node("a1").rpo().unwrap().pending_tasks, 1);
    // The block is deleted where it lives (the embedding server removed the file).
    for n in ["a1", "a3"] {
        c.node(n).store().delete(block, GenStamp(1)).await.unwrap();
    }
    c.start_node("b2").await;
    c.start_node("b4").await;
    // Nothing can be copied any more: the task is dropped and counted, not retried.
    wait_drained(c.node("a1"), Duration::from_secs(10)).await;
    assert_eq!(c.node("a1").replication_dropped(), 1);
    for n in ["b2", "b4"] {
        assert!(c.node(n).store().get(block).is_none(), "{n} got a copy");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remote_replica_left_unfinalized_is_copied_again() {
    let c = Cluster::start_full(125_000_000, 1.0, Some(config(None, RpoPolicy::Warn))).await;
    let targets = c.ids(&["a1", "a3", "b2", "b4"]);
    let block = BlockId(71);
    let data = pattern(71, 200_000);
    // b2 holds the whole block at the right genstamp, but never finalized it (an earlier
    // copy died before its last packet was acknowledged).
    {
        let spec = strait::block::ChecksumSpec::default();
        let w = c
            .node("b2")
            .store()
            .create(block, GenStamp(1), spec)
            .await
            .unwrap();
        w.write(
            0,
            &data,
            &spec.checksums(&data),
            strait::store::Durability::Buffered,
        )
        .await
        .unwrap();
    }
    assert_eq!(
        c.node("b2").store().get(block).unwrap().state,
        ReplicaState::Rbw
    );
    write_async(c.node("a1"), block, &targets, &data)
        .await
        .unwrap();
    wait_drained(c.node("a1"), Duration::from_secs(10)).await;
    // Done means finalized on every remote target.
    wait_replicated(&c, &["b2", "b4"], block, &data, Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_feeds_the_missing_remote_replica_from_the_remote_holder() {
    use std::sync::Arc;
    use std::sync::atomic::AtomicU64;
    use strait::transport::filter::{FrameAction, Hop};
    use strait::wire::Frame;
    let c = Cluster::start_full(125_000_000, 1.0, Some(config(None, RpoPolicy::Warn))).await;
    let (b2, b4) = (c.id("b2"), c.id("b4"));
    // The first remote copy (a1 -> b2 -> b4) dies on b2's hop to b4 at the last packet:
    // b2 finalizes, b4 does not, the attempt fails and is retried.
    let seen = AtomicU64::new(0);
    c.node("b2")
        .transport()
        .set_frame_filter(Some(Arc::new(move |hop: Hop, f: &Frame| {
            if hop == (Hop { from: b2, to: b4 })
                && matches!(f, Frame::Packet(_))
                && seen.fetch_add(1, Ordering::Relaxed) == 3
            {
                FrameAction::Kill
            } else {
                FrameAction::Pass
            }
        })));
    let data = pattern(77, 3 * (1 << 20) + 100);
    let targets = c.ids(&["a1", "a3", "b2", "b4"]);
    write_async(c.node("a1"), BlockId(77), &targets, &data)
        .await
        .unwrap();
    wait_replicated(
        &c,
        &["b2", "b4"],
        BlockId(77),
        &data,
        Duration::from_secs(20),
    )
    .await;
    wait_drained(c.node("a1"), Duration::from_secs(10)).await;
    // The retry copied b2's replica to b4 inside idc-b: the block crossed the DCI once.
    let crossed: u64 = c
        .nodes
        .values()
        .map(|n| n.metrics().dci_wire_bytes.load(Ordering::Relaxed))
        .sum();
    let ratio = crossed as f64 / data.len() as f64;
    assert!(
        (1.0..1.05).contains(&ratio),
        "DCI bytes per block byte {ratio:.3}"
    );
}

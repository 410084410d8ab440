//! An in-process cluster on real sockets: 2 IDCs × 2 racks × 2 nodes, each node with its
//! own address on 127.M.N.x and its own store. Sync 2+2 writes, locality of reads,
//! pipeline recovery, corrupt and missing replicas, unreachable targets.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{Cluster, NAMES, pattern};
use rand::SeedableRng;
use strait::block::{BlockId, GenStamp};
use strait::node::{Node, NodeEvent};
use strait::pipeline::{WriteError, WriteParams};
use strait::placement::{self, NodeStates};
use strait::read::{ReadError, ReadParams};
use strait::store::{ReplicaState, StoreError};
use strait::topology::{NodeId, Origin, Tier};
use strait::transport::filter::{FrameAction, Hop};
use strait::wire::Frame;

/// Writes `data` in uneven pieces through a pipeline to `targets`, from `from`.
async fn write(
    node: &Node,
    block: BlockId,
    targets: &[NodeId],
    data: &[u8],
) -> Result<strait::pipeline::WriteOutcome, WriteError> {
    let mut w = node
        .writer(block, targets, WriteParams::new(GenStamp(1)))
        .await?;
    let mut off = 0;
    let mut step = 1;
    while off < data.len() {
        let n = step.min(data.len() - off);
        w.write(Bytes::copy_from_slice(&data[off..off + n])).await?;
        off += n;
        step = step * 7 % 100_003 + 1;
    }
    w.close().await
}

async fn stored(node: &Node, block: BlockId, gs: GenStamp) -> Result<Vec<u8>, StoreError> {
    let r = node.store().reader(block, gs).await?;
    let mut out = Vec::new();
    while (out.len() as u64) < r.len() {
        let n = (r.len() - out.len() as u64).min(1 << 20) as usize;
        out.extend_from_slice(&r.read(out.len() as u64, n).await?);
    }
    Ok(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_plus_two_sync_writes_of_every_size() {
    let c = Cluster::start().await;
    let states = NodeStates::from_topology(&c.topo);
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    let spec = "2+2".parse().unwrap();
    let sizes = [0usize, 1, 4095, 4096, 4097, 3 * 65536 + 5, (1 << 20) + 7];
    for (i, &size) in sizes.iter().enumerate() {
        let writer = NAMES[i % 8];
        let origin = Origin::node(c.topo.location(c.id(writer)));
        let p = placement::choose_targets(&c.topo, &origin, &spec, &[], &states, &mut rng).unwrap();
        assert_eq!(p.targets()[0], c.id(writer), "writer's node first");
        let block = BlockId(100 + i as u64);
        let data = pattern(block.0, size);
        let out = write(c.node(writer), block, p.targets(), &data)
            .await
            .unwrap();
        assert_eq!(out.len, size as u64);
        assert_eq!(out.genstamp, GenStamp(1));
        assert_eq!(out.replicas, p.targets());
        assert!(out.failed.is_empty());
        for &r in p.targets() {
            let node = c.node(c.name(r));
            let info = node.store().get(block).unwrap();
            assert_eq!(
                (info.state, info.len),
                (ReplicaState::Finalized, size as u64),
                "{} size {size}",
                c.name(r)
            );
            assert_eq!(
                stored(node, block, GenStamp(1)).await.unwrap(),
                data,
                "{} size {size}",
                c.name(r)
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_in_idc_a_never_cross_the_dci() {
    let c = Cluster::start().await;
    let targets = c.ids(&["a1", "a3", "b1", "b3"]);
    let data = pattern(7, 700_000);
    write(c.node("a1"), BlockId(7), &targets, &data)
        .await
        .unwrap();
    for reader in ["a1", "a2", "a3", "a4"] {
        let node = c.node(reader);
        let r = node.reader(BlockId(7), GenStamp(1), &targets, ReadParams::default());
        assert_eq!(r.read_all().await.unwrap(), data, "reader {reader}");
        assert_eq!(
            &r.read(123_457, 1000).await.unwrap()[..],
            &data[123_457..124_457]
        );
        assert_eq!(
            node.metrics().read_bytes.get(Tier::Dci),
            0,
            "reader {reader} read over the DCI"
        );
        assert!(matches!(
            r.read(699_000, 5000).await,
            Err(ReadError::OutOfRange { .. })
        ));
    }
    assert_eq!(
        c.node("a1").metrics().read_bytes.get(Tier::Node),
        700_000 + 1000,
        "a1 reads its own store"
    );
    for n in ["b1", "b2", "b3", "b4"] {
        assert_eq!(
            c.node(n).metrics().served_bytes.get(Tier::Dci),
            0,
            "{n} served IDC A"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_node_stops_mid_write_and_the_write_completes() {
    let mut c = Cluster::start().await;
    let targets = c.ids(&["a1", "a2", "b1", "b2"]);
    let mut events = c.node("a1").events();
    let data = pattern(9, 3 << 20);
    let block = BlockId(9);
    let mut w = c
        .node("a1")
        .writer(block, &targets, WriteParams::new(GenStamp(1)))
        .await
        .unwrap();
    w.write(Bytes::copy_from_slice(&data[..1 << 20]))
        .await
        .unwrap();
    w.hflush().await.unwrap();
    assert_eq!(w.acked_len(), 1 << 20);
    c.stop("a2").await;
    let t0 = Instant::now();
    w.write(Bytes::copy_from_slice(&data[1 << 20..]))
        .await
        .unwrap();
    let out = w.close().await.unwrap();
    assert!(
        t0.elapsed() < Duration::from_secs(20),
        "recovery took {:?}",
        t0.elapsed()
    );
    assert_eq!(out.len, data.len() as u64);
    assert_eq!(out.failed, c.ids(&["a2"]));
    assert_eq!(out.replicas, c.ids(&["a1", "b1", "b2"]));
    assert!(out.genstamp > GenStamp(1));
    for n in ["a1", "b1", "b2"] {
        assert_eq!(
            stored(c.node(n), block, out.genstamp).await.unwrap(),
            data,
            "{n}"
        );
    }
    match events.recv().await.unwrap() {
        NodeEvent::UnderReplicated {
            block: b,
            failed,
            replicas,
            genstamp,
        } => {
            assert_eq!(b, block);
            assert_eq!(failed, c.ids(&["a2"]));
            assert_eq!(replicas, out.replicas);
            assert!(genstamp > GenStamp(1));
        }
        other => panic!("unexpected event {other:?}"),
    }
    // a2 comes back with a stale rbw replica at the old genstamp: reads refuse it.
    c.start_node("a2").await;
    let stale = c.node("a2").store().get(block).unwrap();
    assert_eq!(stale.genstamp, GenStamp(1));
    let only_stale =
        c.node("a3")
            .reader(block, out.genstamp, &c.ids(&["a2"]), ReadParams::default());
    assert!(matches!(
        only_stale.read_all().await,
        Err(ReadError::NoReplica { .. })
    ));
    let all = c.node("a2").reader(
        block,
        out.genstamp,
        &c.ids(&["a2", "a1", "b1", "b2"]),
        ReadParams::default(),
    );
    assert_eq!(all.read_all().await.unwrap(), data);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flipped_byte_in_the_local_replica_is_read_around_and_reported() {
    let c = Cluster::start().await;
    let targets = c.ids(&["a1", "a2", "b1", "b2"]);
    let data = pattern(11, 200_000);
    write(c.node("a1"), BlockId(11), &targets, &data)
        .await
        .unwrap();
    let path = c.dirs["a1"].path().join("finalized/00/00/blk_11_1");
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[150_000] ^= 0x01;
    std::fs::write(&path, &bytes).unwrap();
    let mut events = c.node("a1").events();
    let r = c
        .node("a1")
        .reader(BlockId(11), GenStamp(1), &targets, ReadParams::default());
    assert_eq!(r.order()[0], c.id("a1"), "local replica first");
    assert_eq!(r.read_all().await.unwrap(), data);
    assert_eq!(
        events.recv().await.unwrap(),
        NodeEvent::CorruptReplica {
            block: BlockId(11),
            genstamp: GenStamp(1),
            node: c.id("a1")
        }
    );
    assert_eq!(
        c.node("a1").metrics().read_bytes.get(Tier::Dci),
        0,
        "served from a2, not the other IDC"
    );
    assert_eq!(
        c.node("a1").store().get(BlockId(11)).unwrap().state,
        ReplicaState::Corrupt
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_idc_a_replicas_down_reads_come_from_idc_b() {
    let mut c = Cluster::start().await;
    let targets = c.ids(&["a1", "a3", "b2", "b4"]);
    let data = pattern(13, 300_000);
    write(c.node("a1"), BlockId(13), &targets, &data)
        .await
        .unwrap();
    c.stop("a1").await;
    c.stop("a3").await;
    let r = c
        .node("a2")
        .reader(BlockId(13), GenStamp(1), &targets, ReadParams::default());
    assert_eq!(r.read_all().await.unwrap(), data);
    assert_eq!(
        c.node("a2").metrics().read_bytes.get(Tier::Dci),
        data.len() as u64
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_targets_fail_over_or_error_in_bounded_time() {
    let mut c = Cluster::start().await;
    c.stop("b4").await;
    // b4 is down: the pipeline drops it at setup and the write completes on three.
    let data = pattern(15, 100_000);
    let t0 = Instant::now();
    let out = write(
        c.node("a1"),
        BlockId(15),
        &c.ids(&["a1", "a2", "b3", "b4"]),
        &data,
    )
    .await
    .unwrap();
    assert_eq!(out.failed, c.ids(&["b4"]));
    assert_eq!(out.replicas, c.ids(&["a1", "a2", "b3"]));
    assert!(t0.elapsed() < Duration::from_secs(15), "{:?}", t0.elapsed());
    // Both IDC-B targets down: a clear error naming the IDC, in bounded time.
    c.stop("b3").await;
    let t0 = Instant::now();
    let e = write(
        c.node("a1"),
        BlockId(16),
        &c.ids(&["a1", "a2", "b3", "b4"]),
        &data,
    )
    .await
    .unwrap_err();
    assert!(
        matches!(&e, WriteError::IdcLost { idc, .. } if idc == "idc-b"),
        "{e}"
    );
    assert!(t0.elapsed() < Duration::from_secs(20), "{:?}", t0.elapsed());
    // Bad target lists are refused up front.
    let e = c
        .node("a1")
        .writer(
            BlockId(17),
            &c.ids(&["a2", "a2"]),
            WriteParams::new(GenStamp(1)),
        )
        .await
        .unwrap_err();
    assert!(matches!(e, WriteError::InvalidTargets(_)), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spare_replaces_the_failed_node_after_copying_the_acked_prefix() {
    let mut c = Cluster::start().await;
    let targets = c.ids(&["a1", "a2", "b1", "b2"]);
    let block = BlockId(21);
    let data = pattern(21, 2_500_000);
    let mut params = WriteParams::new(GenStamp(1));
    params.spares = c.ids(&["a4", "b3"]);
    let mut w = c.node("a1").writer(block, &targets, params).await.unwrap();
    w.write(Bytes::copy_from_slice(&data[..1_000_000]))
        .await
        .unwrap();
    w.hflush().await.unwrap();
    c.stop("a2").await;
    w.write(Bytes::copy_from_slice(&data[1_000_000..]))
        .await
        .unwrap();
    let out = w.close().await.unwrap();
    assert_eq!(out.failed, c.ids(&["a2"]));
    assert_eq!(
        out.replicas,
        c.ids(&["a1", "a4", "b1", "b2"]),
        "a4 took a2's place in idc-a"
    );
    for n in ["a1", "a4", "b1", "b2"] {
        let info = c.node(n).store().get(block).unwrap();
        assert_eq!(
            (info.state, info.genstamp),
            (ReplicaState::Finalized, out.genstamp),
            "{n}"
        );
        assert_eq!(
            stored(c.node(n), block, out.genstamp).await.unwrap(),
            data,
            "{n}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ranged_read_that_meets_a_stale_replica_fails_over() {
    let c = Cluster::start().await;
    let block = BlockId(19);
    let data = pattern(19, 300_000);
    let targets = c.ids(&["a2", "b1"]);
    let out = write(c.node("a2"), block, &targets, &data).await.unwrap();
    assert_eq!(out.genstamp, GenStamp(1));
    // a2's replica moves to another genstamp (a recovery this reader has not heard of).
    c.node("a2")
        .store()
        .bump_genstamp(block, GenStamp(1), GenStamp(2))
        .await
        .unwrap();
    // From a3, a2 (same IDC) is asked first; it holds gs 2, not gs 1: the read goes on to
    // b1 instead of ending with "out of range".
    let r = c
        .node("a3")
        .reader(block, GenStamp(1), &targets, ReadParams::default());
    assert_eq!(r.order()[0], c.id("a2"));
    let got = r.read(100, 1000).await.expect("fails over to b1");
    assert_eq!(&got[..], &data[100..1100]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_spare_is_fed_by_the_survivor_behind_its_own_rack_switch() {
    let mut c = Cluster::start().await;
    // idc-a racks: r1 = a1, a2; r2 = a3, a4. a1 fails; the spare a4 is fed its prefix by
    // a3 (same rack), not by a2, which comes first in the pipeline.
    let targets = c.ids(&["a2", "a1", "a3", "b1"]);
    let block = BlockId(23);
    let data = pattern(23, 2_000_000);
    let mut params = WriteParams::new(GenStamp(1));
    params.spares = c.ids(&["a4"]);
    let mut w = c.node("b4").writer(block, &targets, params).await.unwrap();
    w.write(Bytes::copy_from_slice(&data[..1_000_000]))
        .await
        .unwrap();
    w.hflush().await.unwrap();
    c.stop("a1").await;
    w.write(Bytes::copy_from_slice(&data[1_000_000..]))
        .await
        .unwrap();
    let out = w.close().await.unwrap();
    assert_eq!(out.failed, c.ids(&["a1"]));
    assert!(out.replicas.contains(&c.id("a4")));
    let from_rack = c
        .node("a4")
        .metrics()
        .pipeline_received_bytes
        .get(strait::topology::Tier::Rack);
    assert!(
        from_rack >= 1_000_000,
        "a4 got {from_rack} bytes from its rack"
    );
    assert_eq!(
        stored(c.node("a4"), block, out.genstamp).await.unwrap(),
        data
    );
}

/// Every packet node `from` sends to node `to` meets `action`.
fn packets_to(c: &Cluster, from: &str, to: &str, action: FrameAction) {
    let to = c.id(to);
    c.node(from)
        .transport()
        .set_frame_filter(Some(Arc::new(move |hop: Hop, f: &Frame| match f {
            Frame::Packet(_) if hop.to == to => action,
            _ => FrameAction::Pass,
        })));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_read_from_healthy_replicas_is_not_hedged() {
    let c = Cluster::start().await;
    let targets = c.ids(&["a1", "a3", "b1", "b3"]);
    let data = pattern(11, 48 << 20);
    write(c.node("a1"), BlockId(11), &targets, &data)
        .await
        .unwrap();
    // a2 holds no replica: it reads from a1 or a3, inside its IDC. Both serve at about
    // 130 MB/s (each 256 KiB packet 2 ms late): healthy, but 48 MiB take far longer than
    // the hedge delay meant for a small read. The block must not be read twice.
    for n in ["a1", "a3"] {
        packets_to(&c, n, "a2", FrameAction::Delay(Duration::from_millis(2)));
    }
    // A replica counts as slow below 20 MB/s here (debug builds verify slowly).
    let params = ReadParams {
        hedge_rate: 20_000_000,
        ..ReadParams::default()
    };
    let r = c
        .node("a2")
        .reader(BlockId(11), GenStamp(1), &targets, params);
    assert_eq!(r.read_all().await.unwrap(), data);
    // A server counts a packet once it is sent, which may be after the reader has it.
    let served = || -> u64 {
        ["a1", "a3"]
            .iter()
            .flat_map(|n| Tier::ALL.map(|t| c.node(n).metrics().served_bytes.get(t)))
            .sum()
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    while served() < data.len() as u64 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(served(), data.len() as u64, "bytes served for one read");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_replica_is_hedged_with_another_in_the_idc() {
    let c = Cluster::start().await;
    let targets = c.ids(&["a1", "a3", "b1", "b3"]);
    let data = pattern(12, 1 << 20);
    write(c.node("a1"), BlockId(12), &targets, &data)
        .await
        .unwrap();
    // a1 shares a2's rack, so a2 asks it first; it answers the request and then sends
    // nothing. The hedge (50 ms plus 1 MiB at 100 MB/s) asks a3 long before the 10 s
    // replica timeout.
    packets_to(&c, "a1", "a2", FrameAction::Stall);
    let t0 = Instant::now();
    let r = c
        .node("a2")
        .reader(BlockId(12), GenStamp(1), &targets, ReadParams::default());
    assert_eq!(r.read_all().await.unwrap(), data);
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_the_transport_cannot_reach_is_not_alive_for_placement() {
    let mut c = Cluster::start().await;
    let (a1, b2) = (c.node("a1").clone(), c.id("b2"));
    assert!(a1.node_states().get(b2).alive);
    c.stop("b2").await;
    assert!(a1.transport().open(b2).await.is_err());
    assert!(
        a1.transport().unreachable_peers().is_empty(),
        "one failure is not enough"
    );
    assert!(a1.transport().open(b2).await.is_err());
    assert_eq!(a1.transport().unreachable_peers(), vec![b2]);
    let states = a1.node_states();
    assert!(
        !states.get(b2).alive,
        "no repair service: the transport alone says so"
    );
    let origin = Origin::node(c.topo.location(a1.id()));
    let spec = "2+2".parse().unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    for _ in 0..200 {
        let p = placement::choose_targets(&c.topo, &origin, &spec, &[], &states, &mut rng).unwrap();
        assert!(!p.targets().contains(&b2), "placed on an unreachable node");
    }
    // Back: the next stream to it clears the mark.
    c.start_node("b2").await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while a1.transport().open(b2).await.is_err() {
        assert!(Instant::now() < deadline, "b2 not reachable again");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(a1.node_states().get(b2).alive);
}

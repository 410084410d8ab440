//! Cluster-wide DCI shares on an in-process cluster: the nodes of idc-a report their
//! demand on the link to idc-b to its allocator (the lowest-id node that answers) and set
//! their governors to the leased grants. The rates every node's governor actually runs at
//! are sampled all along: their sum never exceeds the link budget — while grants change
//! and when the allocator's node dies — and a lone sender gets most of the link.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::Cluster;
use strait::dci::{DciGovernor, SharesSettings};
use strait::topology::NodeId;
use strait::transport::filter::{FrameAction, Hop};
use strait::wire::{Frame, ShareReport, Status, TrafficClass};

const BUDGET: u64 = 40_000_000;
const SENDERS: [&str; 4] = ["a1", "a2", "a3", "a4"];

fn settings() -> SharesSettings {
    SharesSettings {
        lease: Duration::from_millis(1000),
        period: Duration::from_millis(100),
        ..SharesSettings::default()
    }
}

fn governor(c: &Cluster, name: &str) -> DciGovernor {
    let b = c.topo.idc_by_name("idc-b").unwrap();
    c.node(name).governors().to(b).unwrap().clone()
}

/// Keeps `gov` busy with `class` traffic until `stop`.
fn saturate(gov: DciGovernor, class: TrafficClass, stop: Arc<AtomicBool>) {
    tokio::spawn(async move {
        while !stop.load(Ordering::Relaxed) {
            gov.acquire(class, 256 << 10).await;
        }
    });
}

/// Samples the sum of the governors' configured rates every 2 ms; `extra` is counted
/// too until its deadline (a node that died with a grant in hand). Returns the largest
/// sum seen.
fn watch_sum(
    govs: Vec<DciGovernor>,
    extra: Arc<std::sync::Mutex<Option<(DciGovernor, Instant)>>>,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<u64> {
    tokio::spawn(async move {
        let mut max = 0u64;
        while !stop.load(Ordering::Relaxed) {
            let mut sum: u64 = govs.iter().map(|g| g.config().rate).sum();
            if let Some((g, until)) = extra.lock().unwrap().as_ref()
                && Instant::now() < *until
            {
                sum += g.config().rate;
            }
            max = max.max(sum);
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        max
    })
}

/// Bytes `gov` admits in `class` over `window`, per second.
async fn throughput(gov: &DciGovernor, class: TrafficClass, window: Duration) -> u64 {
    let b0 = gov.stats(class).granted_bytes;
    tokio::time::sleep(window).await;
    ((gov.stats(class).granted_bytes - b0) as f64 / window.as_secs_f64()) as u64
}

/// Restarts `name` with `grant` deciding what happens to each share grant it sends (by
/// the member it goes to). A filter applies to streams opened after it is set: the
/// restart makes every member open a new report stream.
async fn restart_with_grants(
    c: &mut Cluster,
    name: &str,
    grant: impl Fn(NodeId) -> FrameAction + Send + Sync + 'static,
) {
    c.stop(name).await;
    c.start_node(name).await;
    c.node(name)
        .transport()
        .set_frame_filter(Some(Arc::new(move |hop: Hop, f: &Frame| match f {
            Frame::ShareGrant(_) => grant(hop.to),
            _ => FrameAction::Pass,
        })));
}

/// Whether `node` holds a lease on the link to idc-b from `allocator`.
fn leases_from(c: &Cluster, node: &str, allocator: NodeId) -> bool {
    let idc_b = c.topo.idc_by_name("idc-b").unwrap();
    c.node(node)
        .dci_share(idc_b)
        .is_some_and(|s| s.leased && s.allocator == Some(allocator))
}

/// Waits (bounded) until `cond` holds, polling every 50 ms.
async fn until(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !cond() {
        assert!(Instant::now() < deadline, "not within {limit:?}: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lone_sender_gets_the_link_and_two_senders_split_it() {
    let c = Cluster::start_shared(BUDGET, settings()).await;
    let govs: Vec<DciGovernor> = SENDERS.iter().map(|n| governor(&c, n)).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let watcher = watch_sum(govs.clone(), Arc::default(), stop.clone());

    saturate(govs[1].clone(), TrafficClass::Async, stop.clone());
    until("a2 holds most of the link", Duration::from_secs(5), || {
        govs[1].config().rate as f64 >= 0.9 * BUDGET as f64
    })
    .await;
    let alone = throughput(&govs[1], TrafficClass::Async, Duration::from_secs(1)).await;
    assert!(
        alone as f64 >= 0.85 * BUDGET as f64,
        "a lone sender got {alone} B/s of {BUDGET}"
    );
    let share = c
        .node("a2")
        .dci_share(c.topo.idc_by_name("idc-b").unwrap())
        .unwrap();
    assert!(share.leased);
    assert_eq!(share.allocator, Some(c.id("a1")), "the lowest id allocates");
    let text = strait::daemon::export::render(c.node("a2"));
    assert!(
        text.contains("strait_dci_share_leased{to=\"idc-b\"} 1"),
        "{text}"
    );
    assert!(text.contains("# TYPE strait_dci_rate_bytes_per_second gauge"));

    // A second sender, with a higher class: sync is served before async.
    saturate(govs[3].clone(), TrafficClass::Sync, stop.clone());
    until("a4's sync takes the link", Duration::from_secs(5), || {
        govs[3].config().rate as f64 >= 0.8 * BUDGET as f64
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    let max = watcher.await.unwrap();
    assert!(max <= BUDGET, "configured rates summed to {max} > {BUDGET}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_the_allocator_dies_the_sum_stays_within_budget_and_another_takes_over() {
    let mut c = Cluster::start_shared(BUDGET, settings()).await;
    let govs: Vec<DciGovernor> = SENDERS.iter().map(|n| governor(&c, n)).collect();
    let stop = Arc::new(AtomicBool::new(false));
    for g in &govs {
        saturate(g.clone(), TrafficClass::Async, stop.clone());
    }
    let dead = Arc::new(std::sync::Mutex::new(None));
    let watcher = watch_sum(govs[1..].to_vec(), dead.clone(), stop.clone());
    // a1 is counted separately: it stops being a sender when it dies.
    let a1_gov = govs[0].clone();
    let a1_watch = {
        let dead = dead.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut max = 0u64;
            while !stop.load(Ordering::Relaxed) && dead.lock().unwrap().is_none() {
                max = max.max(a1_gov.config().rate);
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            max
        })
    };
    until(
        "four senders near a quarter each",
        Duration::from_secs(5),
        || {
            govs.iter()
                .all(|g| g.config().rate as f64 >= 0.2 * BUDGET as f64)
        },
    )
    .await;

    // The allocator's node dies with its grant in hand: count that grant for a lease.
    let lease = settings().lease;
    *dead.lock().unwrap() = Some((govs[0].clone(), Instant::now() + lease));
    c.stop("a1").await;
    let a1_max = a1_watch.await.unwrap();
    assert!(a1_max <= BUDGET);

    // a2 becomes the allocator (after its quiet lease) and the three survivors share
    // the link again.
    until(
        "a2 allocates for the survivors",
        Duration::from_secs(10),
        || {
            ["a2", "a3", "a4"]
                .iter()
                .all(|n| leases_from(&c, n, c.id("a2")))
        },
    )
    .await;
    // All of it but the dead node's equal share: a node that does not report may be
    // sending under another allocator (a partial partition), so it is counted at a
    // quarter of the link until it reports again or leaves the topology.
    let usable = BUDGET - BUDGET / 4;
    until("the survivors use the link", Duration::from_secs(5), || {
        let sum: u64 = govs[1..].iter().map(|g| g.config().rate).sum();
        sum as f64 >= 0.9 * usable as f64
    })
    .await;
    let sum: u64 = govs[1..].iter().map(|g| g.config().rate).sum();
    assert!(sum <= usable, "the dead node's share was handed out: {sum}");

    // The operator removes a1 from the topology (every node reloads): its share comes
    // back to the survivors, and the sum stays within the budget through the change.
    let without_a1 = c.edited_topology(&["a1"], &[], BUDGET);
    for n in common::NAMES.iter().filter(|&&n| n != "a1") {
        assert_eq!(c.node(n).set_topology(&without_a1).unwrap().removed, ["a1"]);
    }
    until(
        "the survivors use the whole link",
        Duration::from_secs(10),
        || {
            let sum: u64 = govs[1..].iter().map(|g| g.config().rate).sum();
            sum as f64 >= 0.9 * BUDGET as f64
        },
    )
    .await;
    stop.store(true, Ordering::Relaxed);
    let max = watcher.await.unwrap();
    assert!(max <= BUDGET, "configured rates summed to {max} > {BUDGET}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_members_of_the_sending_idc_get_grants() {
    let c = Cluster::start_shared(BUDGET, settings()).await;
    // b1 asks a1 for a share of a link out of idc-a: refused.
    let mut s = c.node("b1").transport().open(c.id("a1")).await.unwrap();
    s.writer
        .send(&Frame::ShareReport(ShareReport {
            to_idc: "idc-b".into(),
            demand: vec![],
            holding: None,
        }))
        .await
        .unwrap();
    match s.reader.recv().await.unwrap() {
        Some(Frame::ShareGrant(g)) => assert_eq!(g.status, Status::Denied),
        other => panic!("unexpected {other:?}"),
    }
    // A node of idc-a asking about an IDC that does not exist: not found.
    let mut s = c.node("a2").transport().open(c.id("a1")).await.unwrap();
    s.writer
        .send(&Frame::ShareReport(ShareReport {
            to_idc: "idc-z".into(),
            demand: vec![],
            holding: None,
        }))
        .await
        .unwrap();
    match s.reader.recv().await.unwrap() {
        Some(Frame::ShareGrant(g)) => assert_eq!(g.status, Status::NotFound),
        other => panic!("unexpected {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_allocator_keeps_its_members() {
    // a1 answers every report 250 ms late (more than a report period, less than half a
    // lease): a slow allocator, not a dead one. Its members stay with it, so there is
    // never a second allocator granting the same budget.
    let mut c = Cluster::start_shared(BUDGET, settings()).await;
    // A filter applies to the streams opened after it is set: a1 restarts with it, and
    // the members open new report streams to it.
    restart_with_grants(&mut c, "a1", |_| {
        FrameAction::Delay(Duration::from_millis(250))
    })
    .await;
    let restarted = Instant::now();
    let govs: Vec<DciGovernor> = SENDERS.iter().map(|n| governor(&c, n)).collect();
    let stop = Arc::new(AtomicBool::new(false));
    for g in &govs {
        saturate(g.clone(), TrafficClass::Async, stop.clone());
    }
    let a1 = c.id("a1");
    let from_a1 = |c: &Cluster| ["a2", "a3", "a4"].iter().all(|n| leases_from(c, n, a1));
    // The restart failed each member once, so each skipped a1 for two leases; then
    // they come back to it.
    until(
        "every member leases from a1 again",
        Duration::from_secs(10),
        || restarted.elapsed() > 3 * settings().lease && from_a1(&c),
    )
    .await;
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(2) {
        assert!(from_a1(&c), "a member left a slow allocator");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.store(true, Ordering::Relaxed);
}

/// A partial partition: a4's reports reach a1 but no grant comes back, while every other
/// member is served by a1. a4 moves to the next allocator (a2) and two allocators serve
/// the link at once; each counts the members that do not report to it at an equal
/// share, so the configured rates never add up to more than the budget.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_allocators_in_a_partial_partition_stay_within_budget() {
    let mut c = Cluster::start_shared(BUDGET, settings()).await;
    // Filters apply to streams opened later: a1 restarts with one that kills its grants
    // to a4.
    let a4 = c.id("a4");
    restart_with_grants(&mut c, "a1", move |to| {
        if to == a4 {
            FrameAction::Kill
        } else {
            FrameAction::Pass
        }
    })
    .await;
    let govs: Vec<DciGovernor> = SENDERS.iter().map(|n| governor(&c, n)).collect();
    let stop = Arc::new(AtomicBool::new(false));
    for g in &govs {
        saturate(g.clone(), TrafficClass::Async, stop.clone());
    }
    let watcher = watch_sum(
        govs.clone(),
        Arc::new(std::sync::Mutex::new(None)),
        stop.clone(),
    );
    let (a1, a2) = (c.id("a1"), c.id("a2"));
    until(
        "a2 and a3 lease from a1 while a4 leases from a2",
        Duration::from_secs(30),
        || leases_from(&c, "a2", a1) && leases_from(&c, "a3", a1) && leases_from(&c, "a4", a2),
    )
    .await;
    // Both allocators grant for a while; the link is still used.
    let sent = throughput(&govs[1], TrafficClass::Async, Duration::from_secs(2)).await;
    assert!(sent > 0, "a2 sends while it allocates for a4");
    stop.store(true, Ordering::Relaxed);
    let max = watcher.await.unwrap();
    assert!(max <= BUDGET, "configured rates summed to {max} > {BUDGET}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_get_their_deserved_parts_and_borrow_up_to_their_capability() {
    let tenant = |name: &str, guarantee, deserved, capability| strait::dci::TenantShare {
        name: name.into(),
        guarantee,
        deserved,
        capability,
    };
    let mut s = settings();
    s.tenants = vec![
        tenant("gold", 0.25, 0.75, 1.0),
        tenant("bronze", 0.0, 0.25, 0.5),
    ];
    let c = Cluster::start_shared(BUDGET, s).await;
    // Tenants come with a topology reload: a1, a2 gold; a3, a4 bronze.
    let t = c.edited_topology_with(
        &[],
        &[],
        BUDGET,
        &[
            ("a1", "gold"),
            ("a2", "gold"),
            ("a3", "bronze"),
            ("a4", "bronze"),
        ],
    );
    for n in common::NAMES {
        assert_eq!(c.node(n).set_topology(&t).unwrap().changed.len(), 4);
    }
    let govs: Vec<DciGovernor> = SENDERS.iter().map(|n| governor(&c, n)).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let gold_stop = Arc::new(AtomicBool::new(false));
    let watcher = watch_sum(govs.clone(), Arc::default(), stop.clone());
    saturate(govs[0].clone(), TrafficClass::Async, gold_stop.clone());
    saturate(govs[2].clone(), TrafficClass::Sync, stop.clone());
    let share = |g: &DciGovernor| g.config().rate as f64 / BUDGET as f64;
    // Both want the link: gold gets its deserved 3/4 (its async before bronze's sync:
    // quotas come before classes), bronze its 1/4.
    until("gold at 3/4, bronze at 1/4", Duration::from_secs(5), || {
        share(&govs[0]) > 0.7 && (0.2..0.27).contains(&share(&govs[2]))
    })
    .await;
    // Gold goes idle: bronze borrows, but only up to its capability (1/2).
    gold_stop.store(true, Ordering::Relaxed);
    until("bronze at its capability", Duration::from_secs(5), || {
        (0.45..0.52).contains(&share(&govs[2]))
    })
    .await;
    let steady = throughput(&govs[2], TrafficClass::Sync, Duration::from_millis(500)).await;
    assert!(
        steady as f64 <= 0.53 * BUDGET as f64,
        "bronze sent {steady} B/s, over its capability"
    );
    stop.store(true, Ordering::Relaxed);
    let max = watcher.await.unwrap();
    assert!(max <= BUDGET, "configured rates summed to {max} > {BUDGET}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spot_write_uses_idle_capacity_and_yields_to_reserved_traffic() {
    let c = Cluster::start_with(BUDGET, 1.0).await;
    let gov = governor(&c, "a1");
    let stop = Arc::new(AtomicBool::new(false));
    for _ in 0..2 {
        saturate(gov.clone(), TrafficClass::Async, stop.clone());
    }
    // A spot sync write across the DCI while reserved async traffic fills the link.
    let a1 = c.node("a1").clone();
    let targets = c.ids(&["a1", "b1"]);
    let writer = tokio::spawn(async move {
        let mut params = strait::pipeline::WriteParams::new(strait::block::GenStamp(1));
        params.provisioning = strait::scheduler::shares::Provisioning::Spot;
        let mut w = a1
            .writer(strait::block::BlockId(900), &targets, params)
            .await?;
        w.write(bytes::Bytes::from(common::pattern(900, 4 << 20)))
            .await?;
        w.close().await
    });
    let spot = |g: &DciGovernor| g.stats(TrafficClass::Sync).spot.granted_bytes;
    let (s0, a0) = (spot(&gov), gov.stats(TrafficClass::Async).granted_bytes);
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let (s1, a1_bytes) = (spot(&gov), gov.stats(TrafficClass::Async).granted_bytes);
    let (spot_bytes, reserved_bytes) = (s1 - s0, a1_bytes - a0);
    assert!(
        spot_bytes * 10 <= reserved_bytes,
        "spot took {spot_bytes} B while reserved got {reserved_bytes} B"
    );
    assert_eq!(gov.stats(TrafficClass::Sync).reserved.granted_bytes, 0);
    // The reserved traffic stops: the spot write gets the idle link and finishes.
    stop.store(true, Ordering::Relaxed);
    let out = tokio::time::timeout(Duration::from_secs(10), writer)
        .await
        .expect("the spot write finishes once the link is idle")
        .unwrap()
        .unwrap();
    assert_eq!(out.replicas.len(), 2);
    assert!(spot(&gov) >= 4 << 20);
}

/// Sends 64 KiB in `sync` through `gov` now and then (10–50 ms apart), as the DCI hop of
/// a pipeline writing small blocks sees them: ~2 MB/s, ~5 % of the link, in one-packet
/// bursts. Runs for `settle` and then for `measure`; returns how long each send of the
/// second part waited, sorted.
async fn latency_bound_sends(
    gov: &DciGovernor,
    settle: Duration,
    measure: Duration,
) -> Vec<Duration> {
    let mut waits = Vec::new();
    let mut gaps = 0x9e37_79b9_u32;
    let start = Instant::now();
    while start.elapsed() < settle + measure {
        let t = Instant::now();
        gov.acquire(TrafficClass::Sync, 64 << 10).await;
        if start.elapsed() >= settle {
            waits.push(t.elapsed());
        }
        gaps = gaps.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
        tokio::time::sleep(Duration::from_millis(10 + u64::from(gaps >> 16) % 41)).await;
    }
    waits.sort();
    waits
}

/// A latency-bound sync sender's share must let a send through within a few
/// milliseconds: sized to its average use alone, a one-packet bucket refills for tens
/// of milliseconds before each send.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_latency_bound_sync_sender_is_not_held_to_its_average_rate() {
    let c = Cluster::start_shared(BUDGET, settings()).await;
    let gov = governor(&c, "a2");
    // Two seconds for the shares to settle (several report periods), two measured.
    let waits = latency_bound_sends(&gov, Duration::from_secs(2), Duration::from_secs(2)).await;
    assert!(waits.len() >= 30, "only {} sends in 2 s", waits.len());
    let p50 = waits[waits.len() / 2];
    let p90 = waits[waits.len() * 9 / 10];
    let rate = gov.config().rate;
    assert!(
        p50 <= Duration::from_millis(2) && p90 <= Duration::from_millis(5),
        "sends waited p50 {p50:?} p90 {p90:?} at a rate of {rate} B/s ({} sends)",
        waits.len()
    );
}

/// The headroom a latency-bound sender asks for comes from budget nobody else's
/// reserved demand wants: a bulk sender on another node still fills the rest of the link.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_latency_bound_senders_headroom_yields_to_bulk_demand_elsewhere() {
    let c = Cluster::start_shared(BUDGET, settings()).await;
    let (bulk, small) = (governor(&c, "a3"), governor(&c, "a2"));
    let stop = Arc::new(AtomicBool::new(false));
    saturate(bulk.clone(), TrafficClass::Async, stop.clone());
    let sends = {
        let small = small.clone();
        tokio::spawn(async move {
            latency_bound_sends(&small, Duration::from_secs(4), Duration::ZERO).await
        })
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    let got = throughput(&bulk, TrafficClass::Async, Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);
    sends.await.unwrap();
    // The small sender uses ~5 % and the floors of the two idle members 1 %: the bulk
    // sender gets at least 80 % (with the headroom held at sync's level: ~65 %).
    assert!(
        got as f64 >= 0.8 * BUDGET as f64,
        "the bulk sender got {got} B/s of {BUDGET} beside a small sync sender"
    );
}

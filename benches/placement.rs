//! Placements per second on a 2-IDC, 1000-node topology (10 racks × 50 nodes per IDC).

use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use rand::SeedableRng;
use rand::rngs::StdRng;
use strait::placement::{self, NodeStates, ReplicationSpec};
use strait::topology::{Origin, Topology};

fn thousand_nodes() -> Topology {
    let mut b = Topology::builder().idc("idc-a").idc("idc-b");
    for i in 0..1000u32 {
        let idc = if i < 500 { "idc-a" } else { "idc-b" };
        let rack = format!("rack-{}", (i % 500) / 50);
        let addr = format!("127.{}.{}.{}:7000", i >> 16, (i >> 8) & 255, i & 255);
        b = b.node(
            format!("n{i}"),
            idc,
            rack,
            addr.parse().unwrap(),
            (1 + u64::from(i % 7)) << 40,
        );
    }
    b.link("idc-a", "idc-b", 1_250_000_000, Duration::from_millis(2))
        .build()
        .unwrap()
}

fn bench(c: &mut Criterion) {
    let topo = thousand_nodes();
    let states = NodeStates::from_topology(&topo);
    let spec: ReplicationSpec = "2+2".parse().unwrap();
    let writers: Vec<Origin> = topo
        .node_ids()
        .map(|n| Origin::node(topo.location(n)))
        .collect();
    let mut rng = StdRng::seed_from_u64(1);
    let mut g = c.benchmark_group("placement");
    g.throughput(Throughput::Elements(1));
    let mut i = 0;
    g.bench_function("choose_targets/2+2/1000-nodes", |b| {
        b.iter(|| {
            i = (i + 1) % writers.len();
            black_box(
                placement::choose_targets(&topo, &writers[i], &spec, &[], &states, &mut rng)
                    .unwrap(),
            )
        })
    });
    let replicas = placement::choose_targets(&topo, &writers[0], &spec, &[], &states, &mut rng)
        .unwrap()
        .targets()
        .to_vec();
    g.bench_function("sort_by_distance/4-replicas", |b| {
        b.iter(|| {
            black_box(placement::sort_by_distance(
                &topo,
                &writers[3],
                &replicas,
                &mut rng,
            ))
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);

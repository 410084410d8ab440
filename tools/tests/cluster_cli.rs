//! `strait cluster up`, a sync 2+2 write and read through the daemons (cross-IDC via the
//! DCI emulators), put/get, `strait cluster down`.

mod common;

use common::{cluster_up, strait};
use std::sync::Arc;

use bytes::Bytes;
use strait::block::{BlockId, GenStamp};
use strait::node::{Node, NodeConfig};
use strait::pipeline::WriteParams;
use strait::read::ReadParams;
use strait::topology::{Tier, Topology};
use strait::transport::TlsIdentity;

/// Local clusters use fixed addresses: the tests of this file take turns.
static ONE_CLUSTER_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Bytes of the file put and got to check that memory stays bounded.
const BIG: usize = 256 << 20;

/// The "peak RSS N MiB" a put or get summary ends with.
fn peak_rss_mib(out: &str) -> usize {
    out.split("peak RSS ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no peak RSS in {out}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_up_write_read_down() {
    let _turn = ONE_CLUSTER_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display().to_string();
    let out = cluster_up(&d, "1", "200mbit");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("cluster up") && text.contains("a1") && text.contains("b2"),
        "{text}"
    );
    // A second `up` in the same directory is refused.
    assert!(!strait(&["cluster", "up", "--dir", &d]).status.success());

    let root = dir.path().to_path_buf();
    let result = async move {
        let topo = Arc::new(Topology::from_file(root.join("topology.toml")).unwrap());
        let c = root.join("certs");
        let id = TlsIdentity::from_pem_files(
            &c.join("ca.pem"),
            &c.join("client-a.pem"),
            &c.join("client-a.key"),
        )
        .unwrap();
        let (client, _) = Node::start(NodeConfig::new(
            "client-a",
            topo.clone(),
            id,
            root.join("data/client-a"),
        ))
        .await
        .unwrap();
        let targets: Vec<_> = ["a1", "a2", "b1", "b2"]
            .iter()
            .map(|n| topo.node_by_name(n).unwrap())
            .collect();
        let data: Vec<u8> = (0..2_000_000u32).map(|i| (i * 7 % 253) as u8).collect();
        let mut w = client
            .writer(BlockId(1), &targets, WriteParams::new(GenStamp(1)))
            .await
            .unwrap();
        w.write(Bytes::from(data.clone())).await.unwrap();
        assert_eq!(w.close().await.unwrap().replicas, targets);
        let r = client.reader(BlockId(1), GenStamp(1), &targets, ReadParams::default());
        assert_eq!(r.read_all().await.unwrap(), data);
        assert_eq!(
            client.metrics().read_bytes.get(Tier::Dci),
            0,
            "read stayed in idc-a"
        );
        client.shutdown().await;
    };
    // Always stop the cluster, even when the checks fail.
    let mut checks = tokio::spawn(result).await;
    if checks.is_ok() {
        // put / get through the command line, reading from the other IDC.
        let file = dir.path().join("input.bin");
        let data: Vec<u8> = (0..3_100_000u32).map(|i| (i * 13 % 241) as u8).collect();
        std::fs::write(&file, &data).unwrap();
        let f = file.display().to_string();
        let put = strait(&[
            "put",
            &f,
            "--dir",
            &d,
            "--spec",
            "2+2",
            "--block-size",
            "1MiB",
        ]);
        let put_out = String::from_utf8_lossy(&put.stdout).to_string();
        let out = dir.path().join("output.bin");
        let o = out.display().to_string();
        let manifest = dir.path().join("input.strait").display().to_string();
        let get = strait(&[
            "get", &manifest, "--dir", &d, "--from", "idc-b", "--out", &o,
        ]);
        let get_out = String::from_utf8_lossy(&get.stdout).to_string();
        let async_put = strait(&["put", &f, "--dir", &d, "--mode", "async"]);
        // A file much larger than what put and get may hold: both stream it.
        let big = dir.path().join("big.bin");
        let big_data: Vec<u8> = (0..BIG).map(|i| (i % 251) as u8).collect();
        std::fs::write(&big, &big_data).unwrap();
        let b = big.display().to_string();
        let big_put = strait(&[
            "put",
            &b,
            "--dir",
            &d,
            "--mode",
            "async",
            "--block-size",
            "16MiB",
        ]);
        let big_out = dir.path().join("big.out");
        let big_get = strait(&[
            "get",
            &dir.path().join("big.strait").display().to_string(),
            "--dir",
            &d,
            "--out",
            &big_out.display().to_string(),
        ]);
        checks = tokio::spawn(async move {
            for run in [&big_put, &big_get] {
                let out = common::text(run);
                assert!(run.status.success(), "{out}");
                let peak = peak_rss_mib(&out);
                assert!(
                    peak < BIG >> 21,
                    "held {peak} MiB for a {} MiB file: {out}",
                    BIG >> 20
                );
            }
            assert!(
                std::fs::read(&big_out).unwrap() == big_data,
                "big file read back"
            );
            assert!(
                put.status.success(),
                "{put_out}\n{}",
                String::from_utf8_lossy(&put.stderr)
            );
            assert_eq!(
                put_out
                    .lines()
                    .filter(|l| l.split_whitespace().count() == 4)
                    .count(),
                3,
                "{put_out}"
            );
            assert!(
                get.status.success(),
                "{get_out}\n{}",
                String::from_utf8_lossy(&get.stderr)
            );
            assert_eq!(std::fs::read(&out).unwrap(), data);
            assert!(
                get_out.contains("dci 0"),
                "reads from idc-b stay in idc-b: {get_out}"
            );
            assert!(
                async_put.status.success(),
                "{}",
                String::from_utf8_lossy(&async_put.stderr)
            );
        })
        .await;
    }
    let down = strait(&["cluster", "down", "--dir", &d]);
    assert!(
        down.status.success(),
        "{}",
        String::from_utf8_lossy(&down.stderr)
    );
    checks.unwrap();
    assert!(!dir.path().join("cluster.pids").exists());
}

#[test]
fn a_second_cluster_on_the_same_addresses_is_refused() {
    let _turn = ONE_CLUSTER_AT_A_TIME.blocking_lock();
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (da, db) = (
        a.path().display().to_string(),
        b.path().display().to_string(),
    );
    let first = cluster_up(&da, "1", "200mbit");
    // The second cluster's daemons cannot bind; the first one's answer their /health,
    // which must not pass for theirs.
    let second = cluster_up(&db, "1", "200mbit");
    let down_b = strait(&["cluster", "down", "--dir", &db]);
    let down_a = strait(&["cluster", "down", "--dir", &da]);
    assert!(first.status.success(), "{}", common::text(&first));
    assert!(
        !second.status.success(),
        "second cluster reported up: {}",
        common::text(&second)
    );
    assert!(down_a.status.success(), "{}", common::text(&down_a));
    let _ = down_b;
}

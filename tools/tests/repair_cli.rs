//! kill -9 of one daemon of the local cluster: the survivors notice it and restore every
//! block of a file to 2+2 by themselves, inside the IDC; `strait fsck --manifest` says
//! so, and `strait repair --manifest` finds nothing left to copy and rewrites the manifest
//! with the replicas as they are now.

mod common;

use common::{cluster_up, strait, text};
use std::time::{Duration, Instant};

#[test]
fn a_killed_daemon_is_repaired_without_the_dci_and_fsck_agrees() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display().to_string();
    let up = cluster_up(&d, "2", "400mbit");
    assert!(up.status.success(), "{}", text(&up));
    let checks = std::panic::catch_unwind(|| {
        let file = dir.path().join("input.bin");
        let data: Vec<u8> = (0..6_000_000u32).map(|i| (i * 31 % 251) as u8).collect();
        std::fs::write(&file, &data).unwrap();
        let f = file.display().to_string();
        let put = strait(&["put", &f, "--dir", &d, "--block-size", "1MiB"]);
        assert!(put.status.success(), "{}", text(&put));
        let manifest = dir.path().join("input.strait");
        let m = manifest.display().to_string();
        let fsck = strait(&["fsck", "--manifest", &m, "--dir", &d]);
        assert!(fsck.status.success(), "healthy after put: {}", text(&fsck));

        // The idc-a node holding the most blocks.
        let before = std::fs::read_to_string(&manifest).unwrap();
        let victim = ["a1", "a2", "a3", "a4"]
            .into_iter()
            .max_by_key(|n| before.matches(n).count())
            .unwrap();
        let owed = before.matches(victim).count();
        let owed_bytes: u64 = before
            .lines()
            .filter(|l| l.contains(victim))
            .map(|l| l.split_whitespace().nth(2).unwrap().parse::<u64>().unwrap())
            .sum();
        assert!(owed > 0);
        let pid = strait_tools::cluster::pid_of(dir.path(), victim).unwrap();
        let t0 = Instant::now();
        strait_tools::cluster::signal(pid, "-KILL").unwrap();

        // fsck says under-replicated until the survivors have restored every block.
        let took = loop {
            let fsck = strait(&["fsck", "--manifest", &m, "--dir", &d]);
            let out = text(&fsck);
            if fsck.status.success() {
                break t0.elapsed();
            }
            assert_eq!(fsck.status.code(), Some(1), "found a problem: {out}");
            assert!(
                out.contains("under-replicated") || out.contains("unreachable"),
                "{out}"
            );
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "not restored: {out}"
            );
            std::thread::sleep(Duration::from_millis(500));
        };
        println!("{owed} blocks restored {took:?} after kill -9 of {victim}");

        let repair = strait(&["repair", "--manifest", &m, "--dir", &d]);
        let out = text(&repair);
        assert!(repair.status.success(), "{out}");
        assert!(out.contains("0 under-replicated"), "{out}");
        let after = std::fs::read_to_string(&manifest).unwrap();
        assert!(
            !after.contains(victim),
            "the manifest lists live replicas: {after}"
        );
        assert_eq!(after.lines().count(), before.lines().count());
        for line in after.lines() {
            let nodes = line.split_whitespace().nth(3).unwrap();
            assert_eq!(nodes.split(',').count(), 4, "{line}");
        }
        // The repairs never crossed the DCI: the survivors' repair counters, from /metrics.
        let (mut dci, mut inside) = (0.0, 0.0);
        for n in ["a1", "a2", "a3", "a4", "b1", "b2", "b3", "b4"] {
            if n == victim {
                continue;
            }
            let m = strait_tools::cluster::metrics(dir.path(), n).expect("metrics");
            dci +=
                strait_tools::cluster::metric_sum(&m, "strait_repair_bytes_total", "tier=\"dci\"");
            inside +=
                strait_tools::cluster::metric_sum(&m, "strait_repair_bytes_total", "tier=\"rack\"")
                    + strait_tools::cluster::metric_sum(
                        &m,
                        "strait_repair_bytes_total",
                        "tier=\"idc\"",
                    );
        }
        assert_eq!(dci, 0.0, "no repair byte crossed the DCI");
        assert!(
            inside >= owed_bytes as f64,
            "{inside} of {owed_bytes} bytes repaired inside idc-a"
        );
        let o = dir.path().join("out.bin");
        let get = strait(&["get", &m, "--dir", &d, "--out", &o.display().to_string()]);
        assert!(get.status.success(), "{}", text(&get));
        assert_eq!(std::fs::read(&o).unwrap(), data);
    });
    let down = strait(&["cluster", "down", "--dir", &d]);
    assert!(down.status.success(), "{}", text(&down));
    if let Err(e) = checks {
        std::panic::resume_unwind(e);
    }
}

//! `kill -9` of the node that holds the replication log while its tasks drain: after a
//! restart every acknowledged block reaches all four replicas, at its genstamp.

mod common;

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::pattern;
use strait::block::{BlockId, GenStamp};
use strait::node::{Node, NodeConfig, NodeError};
use strait::pipeline::WriteParams;
use strait::replication::ReplicationConfig;
use strait::store::ReplicaState;
use strait::topology::Topology;
use strait::transport::{CertAuthority, TlsIdentity};
use strait::wire::WriteMode;

const CHILD_ENV: &str = "STRAIT_REPLICATION_CRASH_CHILD";
const BLOCK_BYTES: usize = 600_000;

fn topology(net: u8) -> Arc<Topology> {
    let addr = |h: u8| -> SocketAddr { SocketAddr::from(([127, 6, net, h], 7800)) };
    Arc::new(
        Topology::builder()
            .idc("idc-a")
            .idc("idc-b")
            .node("a1", "idc-a", "r1", addr(1), 1 << 40)
            .node("a2", "idc-a", "r2", addr(2), 1 << 40)
            .node("b1", "idc-b", "r1", addr(11), 1 << 40)
            .node("b2", "idc-b", "r2", addr(12), 1 << 40)
            // A slow DCI, so that tasks are still draining when the node dies.
            .link("idc-a", "idc-b", 2_000_000, Duration::from_millis(1))
            .build()
            .unwrap(),
    )
}

fn config(name: &str, topo: &Arc<Topology>, certs: &Path, root: &Path) -> NodeConfig {
    let id = TlsIdentity::from_pem_files(
        &certs.join("ca.pem"),
        &certs.join(format!("{name}.pem")),
        &certs.join(format!("{name}.key")),
    )
    .unwrap();
    let mut cfg = NodeConfig::new(name, topo.clone(), id, root.join(format!("{name}-store")));
    cfg.store.io_threads = 1;
    let mut r = ReplicationConfig::new(root.join(format!("{name}-log")));
    r.backoff_min = Duration::from_millis(20);
    r.backoff_max = Duration::from_millis(300);
    cfg.replication = Some(r);
    cfg
}

async fn start(name: &str, topo: &Arc<Topology>, certs: &Path, root: &Path) -> Node {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match Node::start(config(name, topo, certs, root)).await {
            Ok((n, _)) => return n,
            Err(NodeError::Transport(_) | NodeError::Store(_)) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Err(e) => panic!("start {name}: {e}"),
        }
    }
}

/// Runs node a1 and writes async blocks forever, printing each acknowledged one. Run
/// only as the child of `kill_9_of_the_log_node_loses_no_task`.
#[test]
#[ignore = "child process of kill_9_of_the_log_node_loses_no_task; does nothing when run alone"]
fn replication_crash_child() {
    let Ok(spec) = std::env::var(CHILD_ENV) else {
        return;
    };
    let mut parts = spec.splitn(3, ';');
    let (net, certs, root) = (
        parts.next().unwrap().parse::<u8>().unwrap(),
        PathBuf::from(parts.next().unwrap()),
        PathBuf::from(parts.next().unwrap()),
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let topo = topology(net);
        let a1 = start("a1", &topo, &certs, &root).await;
        let targets: Vec<_> = ["a1", "a2", "b1", "b2"]
            .iter()
            .map(|n| topo.node_by_name(n).unwrap())
            .collect();
        for b in 0.. {
            let mut p = WriteParams::new(GenStamp(1));
            p.mode = WriteMode::Async;
            let mut w = a1.writer(BlockId(b), &targets, p).await.unwrap();
            w.write(Bytes::from(pattern(b, BLOCK_BYTES))).await.unwrap();
            let out = w.close().await.unwrap();
            println!("ACK {b} {}", out.genstamp.0);
        }
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_the_log_node_loses_no_task() {
    let net = (std::process::id() % 250) as u8 + 1;
    let topo = topology(net);
    let certs = tempfile::tempdir().unwrap();
    let root = tempfile::tempdir().unwrap();
    CertAuthority::generate("crash test CA")
        .unwrap()
        .write_files(certs.path(), ["a1", "a2", "b1", "b2"])
        .unwrap();
    let mut others = Vec::new();
    for n in ["a2", "b1", "b2"] {
        others.push(start(n, &topo, certs.path(), root.path()).await);
    }
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "replication_crash_child",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(
            CHILD_ENV,
            format!("{net};{};{}", certs.path().display(), root.path().display()),
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut acked = BTreeSet::new();
    fn record(acked: &mut BTreeSet<u64>, line: &str) {
        let t: Vec<&str> = line.split_whitespace().collect();
        if let Some(i) = t.iter().position(|x| *x == "ACK")
            && let (Some(b), Some(g)) = (t.get(i + 1), t.get(i + 2))
        {
            assert_eq!(*g, "1", "async writes keep genstamp 1");
            acked.insert(b.parse::<u64>().unwrap());
        }
    }
    // At 2 MB/s of DCI the log holds a backlog by the time 8 blocks are acknowledged.
    while acked.len() < 8 {
        let line = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("child makes progress");
        record(&mut acked, &line);
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    while let Ok(line) = rx.recv_timeout(Duration::from_millis(300)) {
        record(&mut acked, &line);
    }
    // a1 restarts on the same store and log: its pending tasks are carried out.
    let a1 = start("a1", &topo, certs.path(), root.path()).await;
    let pending = a1.rpo().unwrap().pending_tasks;
    assert!(pending > 0, "the kill came while tasks were draining");
    let nodes: Vec<&Node> = std::iter::once(&a1).chain(others.iter()).collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    for &b in &acked {
        let data = pattern(b, BLOCK_BYTES);
        for n in &nodes {
            loop {
                let done = n
                    .store()
                    .get(BlockId(b))
                    .is_some_and(|r| r.state == ReplicaState::Finalized);
                if done {
                    let info = n.store().get(BlockId(b)).unwrap();
                    assert_eq!(
                        info.genstamp,
                        GenStamp(1),
                        "block {b} on {n:?} at a wrong genstamp"
                    );
                    let r = n.store().reader(BlockId(b), GenStamp(1)).await.unwrap();
                    assert_eq!(
                        &r.read(0, r.len() as usize).await.unwrap()[..],
                        &data[..],
                        "block {b} on {n:?}"
                    );
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "acknowledged block {b} never reached {n:?}"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

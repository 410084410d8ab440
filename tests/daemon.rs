//! The daemon as real processes: four daemons from TOML files, a client node
//! in this process writes and reads through them, `/metrics` answers, SIGTERM exits 0
//! with nothing lost; a bad configuration is refused naming the field.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::pattern;
use strait::block::{BlockId, GenStamp};
use strait::node::{Node, NodeConfig};
use strait::pipeline::WriteParams;
use strait::read::ReadParams;
use strait::store::{BlockStore, ReplicaState, StoreConfig};
use strait::topology::Topology;
use strait::transport::{CertAuthority, PeerRole, TlsIdentity};

fn daemon() -> PathBuf {
    // target/<profile>/deps/daemon-… → target/<profile>/examples/daemon
    let exe = std::env::current_exe().unwrap();
    exe.parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("examples")
        .join("daemon")
}

const NODES: [(&str, &str, &str, u8); 5] = [
    ("a1", "idc-a", "r1", 1),
    ("a2", "idc-a", "r2", 2),
    ("b1", "idc-b", "r1", 11),
    ("b2", "idc-b", "r2", 12),
    ("client", "idc-a", "r3", 50),
];

/// The topology file of `nodes` (name, idc, rack, last octet) on 127.7.`net`.x; the
/// `client` identity stores nothing (capacity 0).
fn write_topology(dir: &Path, net: u8, nodes: &[(&str, &str, &str, u8)]) {
    let mut topo = String::from("[[idc]]\nname = \"idc-a\"\n[[idc]]\nname = \"idc-b\"\n");
    for (n, idc, rack, h) in nodes {
        topo += &format!(
            "[[node]]\nname = \"{n}\"\nlocation = \"/{idc}/{rack}\"\naddr = \"127.7.{net}.{h}:7900\"\n"
        );
        if *n == "client" {
            topo += "capacity = 0\n";
        }
    }
    topo += "[[dci]]\nbetween = [\"idc-a\", \"idc-b\"]\nbudget = \"1gbit\"\nrtt = \"1ms\"\n";
    std::fs::write(dir.join("topology.toml"), topo).unwrap();
}

/// The configuration file of node `name` (certificates in `certs/`, metrics on port 9900).
fn write_node_config(dir: &Path, net: u8, name: &str, h: u8) {
    let cfg = format!(
        "name = \"{name}\"\ntopology = \"topology.toml\"\nstore_dir = \"data/{name}\"\n\
         [tls]\nca = \"certs/ca.pem\"\ncert = \"certs/{name}.pem\"\nkey = \"certs/{name}.key\"\n\
         [metrics]\naddr = \"127.7.{net}.{h}:9900\"\n"
    );
    std::fs::write(dir.join(format!("{name}.toml")), cfg).unwrap();
}

fn write_cluster(dir: &Path, net: u8) -> CertAuthority {
    write_topology(dir, net, &NODES);
    let ca = CertAuthority::generate("daemon test CA").unwrap();
    ca.write_files(&dir.join("certs"), NODES.iter().map(|n| n.0))
        .unwrap();
    for (n, _, _, h) in NODES {
        write_node_config(dir, net, n, h);
    }
    ca
}

struct Daemon {
    child: Child,
}

impl Daemon {
    /// Sends `sig` (`-HUP`, `-TERM`) to the daemon.
    fn signal(&self, sig: &str) {
        let pid = self.child.id().to_string();
        assert!(
            Command::new("kill")
                .args([sig, &pid])
                .status()
                .unwrap()
                .success()
        );
    }
}

fn spawn(dir: &Path, name: &str) -> Daemon {
    // systemd's readiness socket, as `Type=notify` sets it.
    let notify_path = dir.join(format!("notify-{name}.sock"));
    let notify = std::os::unix::net::UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut child = Command::new(daemon())
        .args([
            "--config",
            &dir.join(format!("{name}.toml")).display().to_string(),
        ])
        .env("RUST_LOG", "warn")
        .env("NOTIFY_SOCKET", &notify_path)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("the daemon example is built by cargo test");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(
        line.trim(),
        format!("ready {name}"),
        "daemon {name} did not come up"
    );
    let mut msg = [0u8; 64];
    let n = notify.recv(&mut msg).expect("READY=1 on NOTIFY_SOCKET");
    assert_eq!(&msg[..n], b"READY=1");
    Daemon { child }
}

/// The `client` identity as a node in this process, on the cluster's topology file.
async fn start_client(dir: &Path) -> Node {
    let certs = dir.join("certs");
    let id = TlsIdentity::from_pem_files(
        &certs.join("ca.pem"),
        &certs.join("client.pem"),
        &certs.join("client.key"),
    )
    .unwrap();
    let topo = Topology::from_file(dir.join("topology.toml")).unwrap();
    let (client, _) = Node::start(NodeConfig::new(
        "client",
        Arc::new(topo),
        id,
        dir.join("data/client"),
    ))
    .await
    .unwrap();
    client
}

fn http_get(addr: SocketAddr, path: &str) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nhost: x\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemons_serve_writes_reads_metrics_and_stop_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let net = (std::process::id() % 250) as u8 + 1;
    let ca = write_cluster(dir.path(), net);
    let mut daemons: Vec<Daemon> = ["a1", "a2", "b1", "b2"]
        .iter()
        .map(|n| spawn(dir.path(), n))
        .collect();

    // A client node in this process (it stores nothing of this block).
    let client = start_client(dir.path()).await;
    let topo = client.topology();
    let certs = dir.path().join("certs");
    let targets: Vec<_> = ["a1", "a2", "b1", "b2"]
        .iter()
        .map(|n| topo.node_by_name(n).unwrap())
        .collect();
    let data = pattern(5, 1_300_000);
    let mut w = client
        .writer(BlockId(5), &targets, WriteParams::new(GenStamp(1)))
        .await
        .unwrap();
    w.write(Bytes::from(data.clone())).await.unwrap();
    let out = w.close().await.unwrap();
    assert_eq!(out.replicas, targets);
    let r = client.reader(BlockId(5), GenStamp(1), &targets, ReadParams::default());
    assert_eq!(r.read_all().await.unwrap(), data);

    let metrics = http_get(format!("127.7.{net}.1:9900").parse().unwrap(), "/metrics");
    assert!(metrics.starts_with("HTTP/1.1 200"), "{metrics}");
    assert!(
        metrics.contains("content-type: application/openmetrics-text"),
        "{metrics}"
    );
    assert!(
        metrics.contains("strait_served_bytes_total{tier=\"idc\"}"),
        "{metrics}"
    );
    assert!(
        metrics.contains("strait_replicas{state=\"finalized\"} 1"),
        "{metrics}"
    );
    // Latencies are histograms (sum, count, buckets): they aggregate across nodes.
    for line in [
        "# TYPE strait_read_seconds histogram",
        "strait_read_seconds_sum ",
        "strait_read_seconds_count ",
        "strait_read_seconds_bucket{le=\"0.001\"} ",
        "strait_read_seconds_bucket{le=\"+Inf\"} ",
    ] {
        assert!(metrics.contains(line), "{line}: {metrics}");
    }
    assert!(
        metrics.contains("strait_peer_bytes_total{peer=\"a2\",direction=\"out\"} 1300000"),
        "{metrics}"
    );
    assert!(
        metrics.contains("strait_dci_granted_bytes_total{to=\"idc-b\",class=\"sync\"}"),
        "{metrics}"
    );
    // The scraper's `instance` label names the node; no series repeats it.
    assert!(!metrics.contains("node=\""), "{metrics}");
    assert!(metrics.trim_end().ends_with("# EOF"), "{metrics}");
    assert!(
        http_get(format!("127.7.{net}.1:9900").parse().unwrap(), "/nope")
            .starts_with("HTTP/1.1 404")
    );

    // Renewal: a1 gets a new key and a 30-day certificate in its files and SIGHUP; its
    // metrics show the new expiry, and it serves with the new certificate.
    let a1_metrics: SocketAddr = format!("127.7.{net}.1:9900").parse().unwrap();
    let expiry = || {
        let text = http_get(a1_metrics, "/metrics");
        text.lines()
            .find_map(|l| l.strip_prefix("strait_tls_certificate_expiry_timestamp_seconds "))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .expect("expiry metric")
    };
    let before = expiry();
    let (csr, key) = strait::transport::certificate_request("a1").unwrap();
    let cert = ca
        .sign_request(&csr, PeerRole::Node, Duration::from_secs(30 * 86_400))
        .unwrap();
    std::fs::write(certs.join("a1.pem"), cert).unwrap();
    std::fs::write(certs.join("a1.key"), key).unwrap();
    daemons[0].signal("-HUP");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while expiry() == before {
        assert!(
            std::time::Instant::now() < deadline,
            "SIGHUP did not reload the certificate"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(expiry().abs_diff(now + 30 * 86_400) < 600, "{}", expiry());
    let mut w = client
        .writer(BlockId(6), &targets, WriteParams::new(GenStamp(1)))
        .await
        .unwrap();
    w.write(Bytes::from(data.clone())).await.unwrap();
    assert_eq!(w.close().await.unwrap().replicas, targets);
    client.shutdown().await;

    // SIGTERM: every daemon exits 0.
    for d in &mut daemons {
        d.signal("-TERM");
    }
    for d in &mut daemons {
        let status = d.child.wait().unwrap();
        assert!(status.success(), "daemon exited with {status}");
    }
    // Nothing lost: each daemon's store holds the block finalized and verified.
    for n in ["a1", "a2", "b1", "b2"] {
        let (store, _) = BlockStore::open(StoreConfig::new(dir.path().join(format!("data/{n}"))))
            .await
            .unwrap();
        let info = store.get(BlockId(5)).unwrap();
        assert_eq!(info.state, ReplicaState::Finalized, "{n}");
        let r = store.reader(BlockId(5), GenStamp(1)).await.unwrap();
        assert_eq!(&r.read(0, data.len()).await.unwrap()[..], &data[..], "{n}");
    }
}

#[test]
fn a_bad_configuration_is_refused_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    write_cluster(dir.path(), 249);
    let cfg = std::fs::read_to_string(dir.path().join("a1.toml"))
        .unwrap()
        .replace("name = \"a1\"", "name = \"a9\"");
    std::fs::write(dir.path().join("bad.toml"), cfg).unwrap();
    let out = Command::new(daemon())
        .args([
            "--config",
            &dir.path().join("bad.toml").display().to_string(),
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("field `name`") && err.contains("a9"), "{err}");
    let out = Command::new(daemon())
        .args(["--config", "/nonexistent.toml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read /nonexistent.toml"));
}

/// Polls `/metrics` at `addr` (bounded) until it shows `strait_topology_nodes want`.
async fn wait_topology_nodes(addr: SocketAddr, want: usize) {
    let line = format!("strait_topology_nodes {want}\n");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let text = http_get(addr, "/metrics");
        if text.contains(&line) {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{addr} did not reach {want} nodes: {text}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_join_and_leave_running_daemons_on_sighup() {
    let dir = tempfile::tempdir().unwrap();
    // Not the other daemon test's addresses: both may run at once in this process.
    let net = ((std::process::id() + 125) % 250) as u8 + 1;
    let ca = write_cluster(dir.path(), net);
    let mut daemons: std::collections::BTreeMap<&str, Daemon> = ["a1", "a2", "b1", "b2"]
        .into_iter()
        .map(|n| (n, spawn(dir.path(), n)))
        .collect();
    let metrics = |h: u8| -> SocketAddr { format!("127.7.{net}.{h}:9900").parse().unwrap() };
    let certs = dir.path().join("certs");
    let client = start_client(dir.path()).await;
    let write = |block: u64, targets: Vec<&'static str>| {
        let client = client.clone();
        async move {
            let topo = client.topology();
            let ids: Vec<_> = targets
                .iter()
                .map(|n| topo.node_by_name(n).unwrap())
                .collect();
            let mut w = client
                .writer(BlockId(block), &ids, WriteParams::new(GenStamp(1)))
                .await
                .map_err(|e| e.to_string())?;
            w.write(Bytes::from(pattern(block, 300_000)))
                .await
                .map_err(|e| e.to_string())?;
            let out = w.close().await.map_err(|e| e.to_string())?;
            assert_eq!(out.replicas, ids);
            Ok::<_, String>(())
        }
    };

    // Add a3: its certificate and config, the new topology file, a3 up, SIGHUP the rest.
    let mut with_a3 = NODES.to_vec();
    with_a3.push(("a3", "idc-a", "r3", 3));
    ca.write_files(&certs, ["a3"]).unwrap();
    write_node_config(dir.path(), net, "a3", 3);
    write_topology(dir.path(), net, &with_a3);
    daemons.insert("a3", spawn(dir.path(), "a3"));
    for (name, d) in &daemons {
        if *name != "a3" {
            d.signal("-HUP");
        }
    }
    for h in [1, 2, 3, 11, 12] {
        wait_topology_nodes(metrics(h), 6).await;
    }
    let next = Topology::from_file(dir.path().join("topology.toml")).unwrap();
    assert_eq!(client.set_topology(&next).unwrap().added, ["a3"]);
    write(7, vec!["a3", "a1", "b1", "b2"]).await.unwrap();
    let a3 = client.topology().node_by_name("a3").unwrap();
    let r = client.reader(BlockId(7), GenStamp(1), &[a3], ReadParams::default());
    assert_eq!(
        r.read_all().await.unwrap(),
        pattern(7, 300_000),
        "read from a3 alone"
    );

    // Remove a1: the topology file without it, SIGHUP the others.
    let without_a1: Vec<_> = with_a3.iter().copied().filter(|n| n.0 != "a1").collect();
    write_topology(dir.path(), net, &without_a1);
    for (name, d) in &daemons {
        if *name != "a1" {
            d.signal("-HUP");
        }
    }
    for h in [2, 3, 11, 12] {
        wait_topology_nodes(metrics(h), 5).await;
    }
    let next = Topology::from_file(dir.path().join("topology.toml")).unwrap();
    assert_eq!(client.set_topology(&next).unwrap().removed, ["a1"]);
    let topo = client.topology();
    let a1 = topo.find_node("a1").unwrap();
    let origin = strait::topology::Origin::node(topo.location(client.id()));
    let spec = "2+2".parse().unwrap();
    let states = client.node_states();
    let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(3);
    let mut last = None;
    for _ in 0..300 {
        let p = strait::placement::choose_targets(&topo, &origin, &spec, &[], &states, &mut rng)
            .unwrap();
        assert!(!p.targets().contains(&a1), "placed on a removed node");
        last = Some(p.targets().to_vec());
    }
    let names: Vec<&'static str> = last
        .unwrap()
        .iter()
        .map(|&n| match topo.node(n).name.as_str() {
            "a2" => "a2",
            "a3" => "a3",
            "b1" => "b1",
            "b2" => "b2",
            other => panic!("placed on {other}"),
        })
        .collect();
    write(8, names).await.unwrap();
    client.shutdown().await;

    for d in daemons.values() {
        d.signal("-TERM");
    }
    for (name, d) in &mut daemons {
        let status = d.child.wait().unwrap();
        assert!(status.success(), "daemon {name} exited with {status}");
    }
}

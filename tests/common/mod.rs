//! Helpers shared by the integration tests.
#![allow(dead_code)]

/// Deterministic pseudo-random bytes (xorshift), different for each seed.
pub(crate) fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::{Duration, Instant};

use strait::node::{Node, NodeConfig, NodeError};
use strait::pipeline::PipelineConfig;
use strait::topology::{NodeId, Topology};
use strait::transport::{CertAuthority, TransportConfig};

static NET: AtomicU8 = AtomicU8::new(1);

pub(crate) const NAMES: [&str; 8] = ["a1", "a2", "a3", "a4", "b1", "b2", "b3", "b4"];

/// An in-process cluster on real sockets: 2 IDCs × 2 racks × 2 nodes on 127.M.N.x, M
/// from the process id (test binaries run at once by hand do not collide), N one per
/// cluster of the process.
pub(crate) struct Cluster {
    pub(crate) topo: Arc<Topology>,
    pub(crate) ca: CertAuthority,
    pub(crate) dirs: HashMap<String, tempfile::TempDir>,
    pub(crate) nodes: HashMap<String, Node>,
    pub(crate) dci_share: f64,
    /// When set, every node keeps a replication log (in its own temp dir) with this
    /// configuration (its `log_dir` is replaced per node).
    pub(crate) replication: Option<strait::replication::ReplicationConfig>,
    pub(crate) logs: HashMap<String, tempfile::TempDir>,
    /// Cluster-wide DCI shares instead of the static `dci_share`.
    pub(crate) shares: Option<strait::dci::SharesSettings>,
    /// Write slots per node and admission timeout (gang admission), when not the
    /// defaults.
    pub(crate) max_writes: Option<(usize, Duration)>,
    /// When set, every node runs the repair service with this configuration (its
    /// `log_dir` is replaced per node; the queue outlives restarts).
    pub(crate) repair: Option<strait::repair::RepairConfig>,
    pub(crate) repair_logs: HashMap<String, tempfile::TempDir>,
}

impl Cluster {
    /// Starts all eight nodes with a DCI budget of 125 MB/s.
    pub(crate) async fn start() -> Cluster {
        Self::start_with(125_000_000, 1.0).await
    }

    /// Starts all eight nodes; each node may use `share` of the `budget` (bytes/s).
    pub(crate) async fn start_with(budget: u64, share: f64) -> Cluster {
        Self::start_full(budget, share, None).await
    }

    /// Starts all eight nodes with async replication configured like `replication`.
    pub(crate) async fn start_full(
        budget: u64,
        share: f64,
        replication: Option<strait::replication::ReplicationConfig>,
    ) -> Cluster {
        Self::start_opts(budget, share, replication, None).await
    }

    /// Starts all eight nodes taking part in cluster-wide DCI shares with `settings`.
    pub(crate) async fn start_shared(
        budget: u64,
        settings: strait::dci::SharesSettings,
    ) -> Cluster {
        Self::start_opts(budget, 1.0, None, Some(settings)).await
    }

    /// Starts all eight nodes with the repair service configured like `repair`.
    pub(crate) async fn start_repairing(repair: strait::repair::RepairConfig) -> Cluster {
        Self::start_opts_repair(125_000_000, 1.0, None, None, Some(repair)).await
    }

    async fn start_opts(
        budget: u64,
        share: f64,
        replication: Option<strait::replication::ReplicationConfig>,
        shares: Option<strait::dci::SharesSettings>,
    ) -> Cluster {
        Self::start_opts_repair(budget, share, replication, shares, None).await
    }

    pub(crate) async fn start_opts_repair(
        budget: u64,
        share: f64,
        replication: Option<strait::replication::ReplicationConfig>,
        shares: Option<strait::dci::SharesSettings>,
        repair: Option<strait::repair::RepairConfig>,
    ) -> Cluster {
        let net = NET.fetch_add(1, Ordering::Relaxed);
        let mut b = Topology::builder().idc("idc-a").idc("idc-b");
        for (i, name) in NAMES.iter().enumerate() {
            let idc = if i < 4 { "idc-a" } else { "idc-b" };
            let rack = if i % 4 < 2 { "r1" } else { "r2" };
            let space = 2 + std::process::id() % 200;
            let addr: SocketAddr = format!("127.{space}.{net}.{}:7500", i + 1).parse().unwrap();
            b = b.node(*name, idc, rack, addr, 1 << 40);
        }
        let topo = Arc::new(
            b.link("idc-a", "idc-b", budget, Duration::from_millis(1))
                .build()
                .unwrap(),
        );
        let mut c = Cluster {
            topo,
            ca: CertAuthority::generate("cluster test CA").unwrap(),
            dirs: HashMap::new(),
            nodes: HashMap::new(),
            dci_share: share,
            replication,
            logs: HashMap::new(),
            shares,
            max_writes: None,
            repair,
            repair_logs: HashMap::new(),
        };
        for name in NAMES {
            c.dirs
                .insert(name.to_string(), tempfile::tempdir().unwrap());
            c.start_node(name).await;
        }
        c
    }

    pub(crate) async fn start_node(&mut self, name: &str) {
        let mut cfg = NodeConfig::new(
            name,
            self.topo.clone(),
            self.ca.identity(name).unwrap(),
            self.dirs[name].path(),
        );
        cfg.store.io_threads = 1;
        cfg.store.io_depth = 8;
        cfg.transport = TransportConfig {
            connect_timeout: Duration::from_secs(2),
            open_timeout: Duration::from_secs(2),
            // A stopped node's QUIC socket lingers until its last connection idles out
            // when peers keep dialling it (repair probes): keep restarts quick.
            idle_timeout: Duration::from_secs(4),
            ..TransportConfig::default()
        };
        cfg.pipeline = PipelineConfig {
            ack_timeout: Duration::from_secs(5),
            ack_step: Duration::from_secs(1),
            setup_timeout: Duration::from_secs(3),
            ..PipelineConfig::default()
        };
        if let Some((m, admission)) = self.max_writes {
            cfg.pipeline.max_writes = m;
            cfg.pipeline.admission_timeout = admission;
        }
        cfg.shutdown_grace = Duration::from_secs(2);
        cfg.dci.share = self.dci_share;
        cfg.dci.shares = self.shares.clone();
        if let Some(r) = &self.replication {
            let dir = self
                .logs
                .entry(name.to_string())
                .or_insert_with(|| tempfile::tempdir().unwrap());
            let mut r = r.clone();
            r.log_dir = dir.path().to_path_buf();
            cfg.replication = Some(r);
        }
        if let Some(r) = &self.repair {
            let dir = self
                .repair_logs
                .entry(name.to_string())
                .or_insert_with(|| tempfile::tempdir().unwrap());
            let mut r = r.clone();
            r.log_dir = dir.path().to_path_buf();
            cfg.repair = Some(r);
        }
        // A node restarted in the same process may find its UDP socket or store lock still
        // held for a moment by the previous instance's tasks: poll for it, bounded.
        let deadline = Instant::now() + Duration::from_secs(8);
        let node = loop {
            match Node::start(cfg.clone()).await {
                Ok((node, _)) => break node,
                Err(e @ (NodeError::Transport(_) | NodeError::Store(_)))
                    if Instant::now() < deadline =>
                {
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                Err(e) => panic!("start {name}: {e}"),
            }
        };
        self.nodes.insert(name.to_string(), node);
    }

    /// Restarts every node with `max_writes` write slots each, and writers that retry a
    /// busy pipeline for `admission`.
    pub(crate) async fn limit_writes(&mut self, max_writes: usize, admission: Duration) {
        self.max_writes = Some((max_writes, admission));
        for name in NAMES {
            self.stop(name).await;
            self.start_node(name).await;
        }
    }

    pub(crate) async fn stop(&mut self, name: &str) {
        let node = self.nodes.remove(name).expect("running");
        node.shutdown().await;
    }

    /// Stops `names` at the same time (a rack or an IDC side losing power).
    pub(crate) async fn stop_together(&mut self, names: &[&str]) {
        let nodes: Vec<Node> = names
            .iter()
            .map(|n| self.nodes.remove(*n).expect("running"))
            .collect();
        futures_util::future::join_all(nodes.iter().map(|n| n.shutdown())).await;
    }

    /// The cluster's topology with `remove` left out and `add` (name, idc, rack, last octet
    /// of its address) added, and the DCI budget `budget`.
    pub(crate) fn edited_topology(
        &self,
        remove: &[&str],
        add: &[(&str, &str, &str, u8)],
        budget: u64,
    ) -> Topology {
        self.edited_topology_with(remove, add, budget, &[])
    }

    /// Like [`edited_topology`](Self::edited_topology), with the nodes of `tenants`
    /// (node, tenant) in those tenants.
    pub(crate) fn edited_topology_with(
        &self,
        remove: &[&str],
        add: &[(&str, &str, &str, u8)],
        budget: u64,
        tenants: &[(&str, &str)],
    ) -> Topology {
        let t = &self.topo;
        let mut b = Topology::builder().idc("idc-a").idc("idc-b");
        for name in NAMES.iter().filter(|n| !remove.contains(n)) {
            let id = t.node_by_name(name).unwrap();
            let loc = t.location(id);
            let n = t.node(id);
            b = b.node(
                *name,
                t.idc(loc.idc).name.clone(),
                t.rack(loc.rack).name.clone(),
                n.addr,
                n.capacity,
            );
            if let Some((_, tenant)) = tenants.iter().find(|(n, _)| n == name) {
                b = b.tenant(*tenant);
            }
        }
        let a1 = t.node(t.node_by_name("a1").unwrap()).addr;
        for (name, idc, rack, last) in add {
            let addr = SocketAddr::new(
                match a1.ip() {
                    std::net::IpAddr::V4(v4) => {
                        let o = v4.octets();
                        std::net::Ipv4Addr::new(o[0], o[1], o[2], *last).into()
                    }
                    ip => ip,
                },
                a1.port(),
            );
            b = b.node(*name, *idc, *rack, addr, 1 << 40);
        }
        b.link("idc-a", "idc-b", budget, Duration::from_millis(1))
            .build()
            .unwrap()
    }

    pub(crate) fn node(&self, name: &str) -> &Node {
        &self.nodes[name]
    }

    pub(crate) fn id(&self, name: &str) -> NodeId {
        self.topo.node_by_name(name).unwrap()
    }

    pub(crate) fn ids(&self, names: &[&str]) -> Vec<NodeId> {
        names.iter().map(|n| self.id(n)).collect()
    }

    pub(crate) fn name(&self, id: NodeId) -> &str {
        &self.topo.node(id).name
    }
}

/// Every node's resources once the cluster is idle (no relay, handler or write slot held;
/// work that just ended may take a moment to let go), or as they are after 5 s.
pub(crate) async fn settled(c: &Cluster) -> Vec<strait::node::NodeResources> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let now: Vec<strait::node::NodeResources> =
            c.nodes.values().map(|n| n.resources()).collect();
        let idle = now
            .iter()
            .all(|r| r.relays == 0 && r.handlers == 0 && r.write_slots == 0 && r.dci_slots == 0);
        if idle || Instant::now() > deadline {
            return now;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

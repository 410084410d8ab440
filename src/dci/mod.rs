//! DCI protection: every byte strait sends across an IDC boundary passes a
//! [`DciGovernor`] for that link, and packets on DCI hops may be zstd-compressed.
//!
//! - [`governor`] is the pure core: a hierarchical token bucket with the `sync`, `read`,
//!   `async` and `repair` classes, time injected.
//! - [`DciGovernor`] is the thin async shell: one driver task per link that feeds the
//!   core, sleeps until its next wakeup, and releases waiting senders.
//! - [`compress`] decides per packet whether compressing pays (the link is queueing and a
//!   sample of the data compresses) and bounds decompression.
//!
//! Traffic inside an IDC never touches this module.

pub mod compress;
pub mod governor;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::sync::{Notify, oneshot};

pub use governor::{ClassConfig, Governor, GovernorConfig, GovernorError, RequestId};

use crate::metrics::NodeMetrics;
use crate::topology::{LiveTopology, NodeId, Topology};
use crate::wire::{Compression, Packet, TrafficClass};

struct DriverState {
    core: Mutex<Governor>,
    waiters: Mutex<HashMap<RequestId, oneshot::Sender<()>>>,
    wake: Notify,
    /// Fired when a request has to wait: the node wants more than its rate.
    pressed: Notify,
}

/// The governor of one link direction, shared by every sender on this node. Cheap to
/// clone. The driver task stops when the last clone is dropped.
#[derive(Clone)]
pub struct DciGovernor {
    shared: Arc<DriverState>,
}

impl std::fmt::Debug for DciGovernor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DciGovernor")
            .field("config", &self.config())
            .finish()
    }
}

/// Releases a queued request if the waiting sender goes away.
struct CancelOnDrop<'a> {
    gov: &'a DciGovernor,
    id: Option<RequestId>,
}

impl Drop for CancelOnDrop<'_> {
    fn drop(&mut self) {
        if let Some(id) = self.id.take() {
            self.gov.lock().cancel(id);
            self.gov
                .shared
                .waiters
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&id);
        }
    }
}

impl DciGovernor {
    /// Starts a governor with `config` and its driver task (on the current runtime).
    pub fn start(config: GovernorConfig) -> Result<Self, GovernorError> {
        let core = Governor::new(config, Instant::now())?;
        let shared = Arc::new(DriverState {
            core: Mutex::new(core),
            waiters: Mutex::new(HashMap::new()),
            wake: Notify::new(),
            pressed: Notify::new(),
        });
        tokio::spawn(drive(Arc::downgrade(&shared)));
        Ok(DciGovernor { shared })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Governor> {
        self.shared.core.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The configuration in force.
    pub fn config(&self) -> GovernorConfig {
        self.lock().config().clone()
    }

    /// Changes rates at runtime; queued requests are kept.
    pub fn set_config(&self, config: GovernorConfig) -> Result<(), GovernorError> {
        self.lock().set_config(config, Instant::now())?;
        self.shared.wake.notify_one();
        Ok(())
    }

    /// Resolves once a sender has had to wait for this governor since the last call (or
    /// does already): the node wants more than its current rate.
    pub async fn pressed(&self) {
        self.shared.pressed.notified().await
    }

    /// Whether senders are waiting: the link is the bottleneck.
    pub fn backlogged(&self) -> bool {
        self.lock().backlogged()
    }

    /// Counters of one class, up to now.
    pub fn stats(&self, class: TrafficClass) -> governor::ClassStats {
        let mut g = self.lock();
        g.handle_time(Instant::now());
        g.stats(class)
    }

    /// The largest burst `class` offered since the last call, reserved and spot
    /// (`governor::Governor::take_peak_offered`): the shares size a latency-bound
    /// class's rate from it.
    pub fn take_peak_offered(&self, class: TrafficClass, now: Instant) -> (u64, u64) {
        self.lock().take_peak_offered(class, now)
    }

    /// Waits until `bytes` may be sent in `class`. Sends are admitted in parts of at
    /// most a quarter burst, in order: the bucket then has room to keep filling while the
    /// driver's timer fires late (tokio timers round up to the millisecond), and no
    /// budget is lost to a full bucket.
    pub async fn acquire(&self, class: TrafficClass, bytes: u64) {
        self.acquire_as(class, false, bytes).await
    }

    /// Like [`acquire`](Self::acquire), as a spot request (`spot`: it uses idle
    /// capacity and yields to every reserved request) or a reserved one.
    pub async fn acquire_as(&self, class: TrafficClass, spot: bool, bytes: u64) {
        let part_max = {
            let mut g = self.lock();
            g.offer(class, spot, bytes, Instant::now());
            (g.config().burst / 4).max(1)
        };
        let mut left = bytes;
        while left > 0 {
            let part = left.min(part_max);
            self.acquire_part(class, spot, part).await;
            left -= part;
        }
    }

    async fn acquire_part(&self, class: TrafficClass, spot: bool, bytes: u64) {
        let (tx, rx) = oneshot::channel();
        let id = {
            let mut g = self.lock();
            let was_backlogged = g.backlogged();
            let Ok(id) = g.request_as(class, spot, bytes, Instant::now()) else {
                return;
            };
            if was_backlogged {
                self.shared.pressed.notify_one();
            }
            self.shared
                .waiters
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(id, tx);
            id
        };
        let mut guard = CancelOnDrop {
            gov: self,
            id: Some(id),
        };
        self.shared.wake.notify_one();
        if rx.await.is_ok() {
            guard.id = None;
        }
    }
}

async fn drive(shared: std::sync::Weak<DriverState>) {
    loop {
        let Some(s) = shared.upgrade() else { return };
        let wake_at = {
            let mut g = s.core.lock().unwrap_or_else(|e| e.into_inner());
            let now = Instant::now();
            while let Some(grant) = g.poll_grant(now) {
                if let Some(tx) = s
                    .waiters
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&grant.id)
                {
                    let _ = tx.send(());
                }
            }
            g.next_wakeup(now)
        };
        let notified = s.wake.notified();
        // Do not keep the governor alive while sleeping.
        let weak_wait = async {
            match wake_at {
                Some(t) => tokio::time::sleep_until(t.into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = notified => {}
            _ = weak_wait => {}
            _ = closed(&shared) => return,
        }
        drop(s);
    }
}

/// Resolves when only the driver still holds the governor (checked once a second).
async fn closed(shared: &std::sync::Weak<DriverState>) {
    loop {
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        if shared.strong_count() <= 1 {
            return;
        }
    }
}

/// This node's use of the DCI links.
#[derive(Debug, Clone)]
pub struct DciConfig {
    /// Fraction (0..=1) of each DCI link's budget this node may use. Nodes of an IDC that
    /// all send across should split the budget (e.g. 1/4 each for four senders).
    pub share: f64,
    /// Compress packets on DCI hops when the link is the bottleneck and data compresses.
    pub compress: bool,
    /// Per class (`sync`, `read`, `async`, `repair`): guaranteed rate and ceiling in
    /// percent of this node's share; `None` keeps the default split (40/20/20/10, every
    /// ceiling 100).
    pub classes: Option<[(u8, u8); 4]>,
    /// Cluster-wide shares: when set, `share` and `classes` are not used; this node's rate
    /// on each link comes from the link's allocator (see `scheduler::shares`), its floor
    /// while it has no grant.
    pub shares: Option<SharesSettings>,
}

/// The nodes that share the DCI links leaving `idc`: its nodes that store data. A node
/// of capacity 0 is a client identity (placement never picks it); it has no floor and
/// the allocator does not wait for its reports.
pub fn share_members(topology: &Topology, idc: crate::topology::IdcId) -> Vec<NodeId> {
    topology
        .node_ids()
        .filter(|&n| topology.location(n).idc == idc && topology.node(n).capacity > 0)
        .collect()
}

/// How a node takes part in cluster-wide DCI shares.
#[derive(Debug, Clone, PartialEq)]
pub struct SharesSettings {
    /// Fraction of each link's budget split equally among the sending IDC's nodes as
    /// floors (what a node may send with no grant).
    pub floor: f64,
    /// How long a grant is valid.
    pub lease: std::time::Duration,
    /// How often a node reports its demand (a quarter of the lease or less keeps grants
    /// current through a lost report).
    pub period: std::time::Duration,
    /// Classes this node sends as spot whatever the transfer says: its governor serves
    /// them after every reserved request, and the allocator after every reserved demand.
    pub spot: Vec<TrafficClass>,
    /// Tenant quotas on every link (empty: none). A node belongs to the tenant its
    /// topology entry names; the allocator divides each link by tenant first
    /// (`scheduler::tenants`), nodes of no listed tenant sharing what the others leave.
    pub tenants: Vec<TenantShare>,
}

/// One tenant's quota on each DCI link, in fractions (0..=1) of the link's budget:
/// `guarantee <= deserved <= capability`, guarantees adding up to at most 1.
#[derive(Debug, Clone, PartialEq)]
pub struct TenantShare {
    /// The name nodes give in the topology (`tenant = "…"`).
    pub name: String,
    /// Its own while it wants it.
    pub guarantee: f64,
    /// Its part when the link is contended (and its weight).
    pub deserved: f64,
    /// The most it may get, idle quota of others included.
    pub capability: f64,
}

impl TenantShare {
    /// Its quota on a link of `budget` bytes/s.
    pub fn quota(&self, budget: u64) -> crate::scheduler::tenants::Quota {
        let of = |f: f64| (budget as f64 * f.clamp(0.0, 1.0)) as u64;
        crate::scheduler::tenants::Quota {
            guarantee: of(self.guarantee),
            deserved: of(self.deserved),
            capability: of(self.capability),
        }
    }
}

impl Default for SharesSettings {
    /// 2 % of the budget in floors, 1 s leases, reports every 50 ms on a kept stream (a
    /// change in demand is served within about a period), every class reserved.
    fn default() -> Self {
        SharesSettings {
            floor: 0.02,
            lease: std::time::Duration::from_secs(1),
            period: std::time::Duration::from_millis(50),
            spot: Vec::new(),
            tenants: Vec::new(),
        }
    }
}

impl Default for DciConfig {
    fn default() -> Self {
        DciConfig {
            share: 1.0,
            compress: true,
            classes: None,
            shares: None,
        }
    }
}

/// A node's way out across the DCI: its governors, one per link, and the compression
/// policy. Every packet a node sends to a peer goes through
/// [`govern_packet`](Self::govern_packet); only those to another IDC are touched.
pub(crate) struct Egress {
    topology: Arc<LiveTopology>,
    me: NodeId,
    /// The share and class split of static shares (`None` with cluster-wide shares).
    fixed: Option<(f64, Option<ClassSplit>)>,
    /// Classes whose traffic is spot whatever its transfer says (`[dci.shares] spot`).
    spot_classes: Vec<TrafficClass>,
    governors: DciGovernors,
    compress: Option<compress::CompressPolicy>,
}

impl Egress {
    /// The egress of node `me`, from `config`.
    pub(crate) fn new(
        live: Arc<LiveTopology>,
        me: NodeId,
        config: &DciConfig,
    ) -> Result<Egress, GovernorError> {
        let topology = live.get();
        let idc = topology.location(me).idc;
        let governors = match &config.shares {
            // Start at the floor; the allocator's grants raise it.
            Some(s) => {
                let members = share_members(&topology, idc).len().max(1);
                DciGovernors::for_node_with(&topology, idc, s.floor / members as f64, None)?
            }
            None => DciGovernors::for_node_with(&topology, idc, config.share, config.classes)?,
        };
        Ok(Egress {
            topology: live,
            me,
            fixed: match config.shares {
                Some(_) => None,
                None => Some((config.share, config.classes)),
            },
            spot_classes: config
                .shares
                .as_ref()
                .map(|s| s.spot.clone())
                .unwrap_or_default(),
            governors,
            compress: config.compress.then(compress::CompressPolicy::default),
        })
    }

    /// Applies the link budgets of `topology` (a reload) to static shares; with
    /// cluster-wide shares the member tasks pick them up at their next report.
    pub(crate) fn retune(&self, topology: &Topology) -> Result<(), GovernorError> {
        let Some((share, classes)) = self.fixed else {
            return Ok(());
        };
        let idc = topology.location(self.me).idc;
        for (other, gov) in self.governors.iter() {
            if let Some(l) = topology.link(idc, other) {
                gov.set_config(static_config(l.budget_bps, share, classes))?;
            }
        }
        Ok(())
    }

    /// What this node may count on sending to `idc`, bytes/s, for admission: its static
    /// share of the link's budget, or with cluster-wide shares its equal share (the
    /// budget over the IDC's members). `None` when no link leads there.
    pub(crate) fn admission_rate(&self, idc: crate::topology::IdcId) -> Option<u64> {
        let topo = self.topology.get();
        let from = topo.location(self.me).idc;
        let link = topo.link(from, idc)?;
        Some(match self.fixed {
            Some((share, _)) => share_of(link.budget_bps, share),
            None => link.budget_bps / share_members(&topo, from).len().max(1) as u64,
        })
    }

    /// The governors, by remote IDC.
    pub(crate) fn governors(&self) -> &DciGovernors {
        &self.governors
    }

    /// What a receiver may get: zstd-compressed packets when this node compresses.
    pub(crate) fn compression(&self) -> Compression {
        if self.compress.is_some() {
            Compression::Zstd
        } else {
            Compression::None
        }
    }

    /// The governor of the DCI link to `peer`, when talking to it crosses the DCI.
    pub(crate) fn governor_to(&self, peer: NodeId) -> Option<&DciGovernor> {
        let topo = self.topology.get();
        let (a, b) = (topo.location(self.me).idc, topo.location(peer).idc);
        if a == b { None } else { self.governors.to(b) }
    }

    /// Prepares a packet for the hop to `peer`: across the DCI, compresses it when the
    /// receiver accepts that (`compression`) and it pays, waits for the governor to admit
    /// its bytes in `class` — as spot when the transfer is (`spot`) or this node makes
    /// the class spot — and counts them in `metrics`. Intra-IDC packets pass untouched.
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn govern_packet(
        &self,
        peer: NodeId,
        class: TrafficClass,
        spot: bool,
        compression: Compression,
        p: Packet,
        metrics: &NodeMetrics,
    ) -> Packet {
        let Some(gov) = self.governor_to(peer) else {
            return p;
        };
        let raw = p.payload.len() as u64;
        let p = match (&self.compress, compression) {
            (Some(policy), Compression::Zstd) => policy.apply(p, gov.backlogged()),
            _ => p,
        };
        let wire = p.payload.len() as u64;
        // Charge what actually crosses: payload plus frame header and checksums.
        let spot = spot || self.spot_classes.contains(&class);
        gov.acquire_as(class, spot, wire + 32 + 4 * p.crcs.len() as u64)
            .await;
        metrics
            .dci_wire_bytes
            .fetch_add(wire, std::sync::atomic::Ordering::Relaxed);
        metrics
            .dci_saved_bytes
            .fetch_add(raw - wire, std::sync::atomic::Ordering::Relaxed);
        p
    }
}

/// `share` (0..=1) of a link's budget, bytes/s, at least 1.
fn share_of(budget_bps: u64, share: f64) -> u64 {
    ((budget_bps as f64) * share.clamp(0.0, 1.0)).max(1.0) as u64
}

/// Per class (rate %, ceil %) of a node's share, in `TrafficClass::ALL` order.
type ClassSplit = [(u8, u8); 4];

/// A governor at `share` (0..=1) of a link's budget, with class (rate %, ceil %) of that
/// share (`None`: the default split).
fn static_config(budget_bps: u64, share: f64, classes: Option<ClassSplit>) -> GovernorConfig {
    let rate = share_of(budget_bps, share);
    let mut cfg = GovernorConfig::for_link(rate);
    if let Some(classes) = classes {
        for (c, (r, ceil)) in cfg.classes.iter_mut().zip(classes) {
            c.rate = rate / 100 * u64::from(r);
            c.ceil = (rate / 100 * u64::from(ceil)).max(c.rate).clamp(1, rate);
        }
    }
    cfg
}

/// The governors of one node: one per remote IDC it sends to.
#[derive(Debug, Clone, Default)]
pub struct DciGovernors {
    by_idc: HashMap<crate::topology::IdcId, DciGovernor>,
}

impl DciGovernors {
    /// Governors for every DCI link of `idc` in `topology`, each at `share` (0..=1) of
    /// the link's budget, with class (rate %, ceil %) of the node's share (`None`: the
    /// default split).
    pub fn for_node_with(
        topology: &crate::topology::Topology,
        idc: crate::topology::IdcId,
        share: f64,
        classes: Option<[(u8, u8); 4]>,
    ) -> Result<Self, GovernorError> {
        let mut by_idc = HashMap::new();
        for l in topology.links() {
            let other = if l.a == idc {
                l.b
            } else if l.b == idc {
                l.a
            } else {
                continue;
            };
            let cfg = static_config(l.budget_bps, share, classes);
            by_idc.insert(other, DciGovernor::start(cfg)?);
        }
        Ok(DciGovernors { by_idc })
    }

    /// The governor of the link to `idc`, if this node has one.
    pub fn to(&self, idc: crate::topology::IdcId) -> Option<&DciGovernor> {
        self.by_idc.get(&idc)
    }

    /// All governors, by remote IDC.
    pub fn iter(&self) -> impl Iterator<Item = (crate::topology::IdcId, &DciGovernor)> {
        self.by_idc.iter().map(|(k, v)| (*k, v))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn acquire_waits_for_the_budget() {
        let gov = DciGovernor::start(GovernorConfig::for_link(2_000_000)).unwrap();
        let t0 = Instant::now();
        // The first burst (64 KiB) is free; the rest of 1 MiB takes ~0.49 s at 2 MB/s.
        gov.acquire(TrafficClass::Async, 1 << 20).await;
        let took = t0.elapsed();
        assert!(
            took >= Duration::from_millis(450),
            "1 MiB admitted in {took:?}"
        );
        assert!(
            took < Duration::from_millis(700),
            "1 MiB admitted in {took:?}"
        );
        assert!(gov.backlogged(), "link bucket is empty after a long send");
        assert_eq!(gov.stats(TrafficClass::Async).granted_bytes, 1 << 20);
    }
}

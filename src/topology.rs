//! The cluster's shape: IDCs, racks, storage nodes and the DCI links between IDCs.
//!
//! A [`Topology`] is built once — from a TOML file ([`Topology::from_toml_str`]) or in code
//! ([`TopologyBuilder`]) — validated as a whole, and then read-only. Nodes, racks and IDCs
//! are referred to by small copyable ids ([`NodeId`], [`RackId`], [`IdcId`]) that index into
//! it, so placement and read ranking never compare strings on the hot path. A running node
//! takes a changed file with [`Topology::revise`], which keeps every id (removed nodes stay
//! as retired entries), and serves it from a [`LiveTopology`].
//!
//! Distance follows the HyperNode tiers of the design: two locations are joined at the
//! lowest [`Tier`] they share — the same node, the same rack switch, the same IDC, or only
//! the DCI. This module is pure: it reads no clock, opens no socket, and the only file it
//! touches is the one [`Topology::from_file`] is asked to read.
//!
//! # File format
//!
//! ```toml
//! [[idc]]
//! name = "idc-a"
//! racks = ["rack-1", "rack-2"]      # optional: when given, nodes must use these racks
//!
//! [[idc]]
//! name = "idc-b"
//!
//! [[node]]
//! name = "a1"
//! location = "/idc-a/rack-1"        # HDFS-style network path; or idc = "…" and rack = "…"
//! addr = "127.0.0.11:7000"
//! capacity = "4TiB"                 # bytes, or a size with a unit
//! tenant = "analytics"              # optional: its DCI quota ([[dci.tenants]] of the node file)
//!
//! [[dci]]
//! between = ["idc-a", "idc-b"]
//! budget = "10gbit"                 # per direction; bytes/s as a number, or a rate with a unit
//! rtt = "2ms"
//! ```

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

use crate::units::{self, UnitError};

/// Index of an IDC in its [`Topology`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IdcId(u32);

/// Index of a rack in its [`Topology`] (unique across IDCs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RackId(u32);

/// Index of a storage node in its [`Topology`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId(u32);

macro_rules! id_index {
    ($($t:ident),*) => {$(
        impl $t {
            /// The position of this item in the topology's list.
            pub fn index(self) -> usize {
                self.0 as usize
            }

            /// The id at position `i` (tests of the cores build ids without a topology).
            #[cfg(test)]
            #[allow(dead_code)] // not every id type is built this way
            pub(crate) const fn from_index(i: usize) -> Self {
                $t(i as u32)
            }
        }
    )*};
}
id_index!(IdcId, RackId, NodeId);

/// Where a storage node sits: `/idc/rack/node`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Location {
    /// The data centre.
    pub idc: IdcId,
    /// The rack (its top-of-rack switch) inside that IDC.
    pub rack: RackId,
    /// The node itself.
    pub node: NodeId,
}

impl Location {
    /// The lowest tier that joins `self` and `other`.
    pub fn tier_to(&self, other: &Location) -> Tier {
        distance(self, other)
    }
}

/// The HyperNode tiers, from nearest to farthest. Ordered: `Node < Rack < Idc < Dci`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Tier {
    /// The same node: no network at all.
    Node = 0,
    /// Different nodes behind the same rack switch.
    Rack = 1,
    /// Different racks in the same IDC.
    Idc = 2,
    /// Different IDCs: the path crosses the DCI.
    Dci = 3,
}

impl Tier {
    /// All tiers, nearest first.
    pub const ALL: [Tier; 4] = [Tier::Node, Tier::Rack, Tier::Idc, Tier::Dci];

    /// Whether traffic joined at this tier crosses an IDC boundary.
    pub fn crosses_dci(self) -> bool {
        self == Tier::Dci
    }

    /// A short lower-case name, for tables and metric labels.
    pub fn name(self) -> &'static str {
        match self {
            Tier::Node => "node",
            Tier::Rack => "rack",
            Tier::Idc => "idc",
            Tier::Dci => "dci",
        }
    }
}

impl fmt::Display for Tier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Distance between two node locations, as the tier that joins them.
pub fn distance(a: &Location, b: &Location) -> Tier {
    if a.idc != b.idc {
        Tier::Dci
    } else if a.rack != b.rack {
        Tier::Idc
    } else if a.node != b.node {
        Tier::Rack
    } else {
        Tier::Node
    }
}

/// Where a writer or reader sits. A storage node knows its node; a client process may know
/// only its IDC, or its IDC and rack.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Origin {
    /// The IDC the client runs in.
    pub idc: IdcId,
    /// The rack, when known.
    pub rack: Option<RackId>,
    /// The storage node the client runs on, when it runs on one.
    pub node: Option<NodeId>,
}

impl Origin {
    /// A client running on a storage node.
    pub fn node(location: Location) -> Self {
        Origin {
            idc: location.idc,
            rack: Some(location.rack),
            node: Some(location.node),
        }
    }

    /// A client known only by its IDC.
    pub fn in_idc(idc: IdcId) -> Self {
        Origin {
            idc,
            rack: None,
            node: None,
        }
    }

    /// The lowest tier that joins this origin and a node. Unknown parts count as different.
    pub fn tier_to(&self, to: &Location) -> Tier {
        if self.idc != to.idc {
            Tier::Dci
        } else if self.rack != Some(to.rack) {
            Tier::Idc
        } else if self.node != Some(to.node) {
            Tier::Rack
        } else {
            Tier::Node
        }
    }
}

/// A data centre.
#[derive(Debug, Clone)]
pub struct IdcInfo {
    /// Its name, unique in the topology.
    pub name: String,
    /// Its racks.
    pub racks: Vec<RackId>,
    /// Its nodes, in file order.
    pub nodes: Vec<NodeId>,
}

/// A rack inside an IDC.
#[derive(Debug, Clone)]
pub struct RackInfo {
    /// Its name, unique inside its IDC.
    pub name: String,
    /// The IDC that holds it.
    pub idc: IdcId,
    /// Its nodes, in file order.
    pub nodes: Vec<NodeId>,
}

/// A storage node.
#[derive(Debug, Clone)]
pub struct NodeInfo {
    /// Its name, unique in the topology; certificates name the node by it.
    pub name: String,
    /// Where its strait endpoint listens.
    pub addr: SocketAddr,
    /// Disk capacity in bytes for block replicas.
    pub capacity: u64,
    /// Where peers in *other* IDCs reach the node's QUIC endpoint, when that differs from
    /// `addr` (a WAN emulator or a DCI gateway in front of it).
    pub dci_addr: Option<SocketAddr>,
    /// Where it sits.
    pub location: Location,
    /// The tenant whose quota on the DCI it sends under (cluster-wide shares with
    /// `[[dci.tenants]]`), if any.
    pub tenant: Option<String>,
}

/// The DCI link between two IDCs. The budget applies to each direction separately.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DciLink {
    /// One end.
    pub a: IdcId,
    /// The other end.
    pub b: IdcId,
    /// Bytes per second strait may send in each direction.
    pub budget_bps: u64,
    /// Round-trip time between the two IDCs.
    pub rtt: Duration,
}

impl DciLink {
    /// Bandwidth-delay product of the link in bytes (one direction's budget × RTT).
    pub fn bdp_bytes(&self) -> u64 {
        (self.budget_bps as u128 * self.rtt.as_nanos() / 1_000_000_000) as u64
    }
}

/// A validated cluster topology. See the [module docs](self) for the file format.
#[derive(Debug, Clone)]
pub struct Topology {
    idcs: Vec<IdcInfo>,
    racks: Vec<RackInfo>,
    nodes: Vec<NodeInfo>,
    links: Vec<DciLink>,
    node_by_name: HashMap<String, NodeId>,
    idc_by_name: HashMap<String, IdcId>,
    /// Nodes a reload removed ([`revise`](Self::revise)), by index: kept so that their
    /// ids stay valid, out of every list and lookup.
    retired: Vec<bool>,
}

impl Topology {
    /// Starts a topology in code; [`TopologyBuilder::build`] validates it.
    pub fn builder() -> TopologyBuilder {
        TopologyBuilder::default()
    }

    /// Reads and validates a topology file.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, TopologyError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| TopologyError::Read {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
        Self::from_toml_str(&text)
    }

    /// Parses and validates a topology from TOML text. Errors name the line they refer to.
    pub fn from_toml_str(text: &str) -> Result<Self, TopologyError> {
        let raw: RawFile = toml::from_str(text).map_err(|e| {
            let line = e.span().map(|s| line_of(text, s.start));
            TopologyError::Parse {
                line: Line(line),
                message: e.message().to_string(),
            }
        })?;
        raw.into_builder(text)?.build()
    }

    /// All IDCs.
    pub fn idcs(&self) -> &[IdcInfo] {
        &self.idcs
    }

    /// All racks.
    pub fn racks(&self) -> &[RackInfo] {
        &self.racks
    }

    /// Every storage node, indexed by [`NodeId`]: retired ones (removed by a
    /// [`revise`](Self::revise)) included, see [`is_retired`](Self::is_retired).
    pub fn nodes(&self) -> &[NodeInfo] {
        &self.nodes
    }

    /// All DCI links.
    pub fn links(&self) -> &[DciLink] {
        &self.links
    }

    /// One IDC.
    pub fn idc(&self, id: IdcId) -> &IdcInfo {
        &self.idcs[id.index()]
    }

    /// One rack.
    pub fn rack(&self, id: RackId) -> &RackInfo {
        &self.racks[id.index()]
    }

    /// One node.
    pub fn node(&self, id: NodeId) -> &NodeInfo {
        &self.nodes[id.index()]
    }

    /// Ids of the nodes in service (every node but the retired ones), in id order: file
    /// order for a topology read once.
    pub fn node_ids(&self) -> impl Iterator<Item = NodeId> + '_ {
        (0..self.nodes.len() as u32)
            .map(NodeId)
            .filter(|n| !self.retired[n.index()])
    }

    /// Whether a reload removed `id` from the topology (its id stays valid for names and
    /// logs; it is a peer of nobody).
    pub fn is_retired(&self, id: NodeId) -> bool {
        self.retired.get(id.index()).copied().unwrap_or(false)
    }

    /// Ids of all IDCs, in file order.
    pub fn idc_ids(&self) -> impl ExactSizeIterator<Item = IdcId> + '_ {
        (0..self.idcs.len() as u32).map(IdcId)
    }

    /// Looks a node up by name.
    pub fn node_by_name(&self, name: &str) -> Option<NodeId> {
        self.node_by_name.get(name).copied()
    }

    /// Looks a node up by name, retired ones included: for names read back from logs
    /// and replica sets, where a removed node still counts (its replicas are owed).
    pub fn find_node(&self, name: &str) -> Option<NodeId> {
        self.node_by_name(name).or_else(|| {
            self.nodes
                .iter()
                .position(|n| n.name == name)
                .map(|i| NodeId(i as u32))
        })
    }

    /// Looks an IDC up by name.
    pub fn idc_by_name(&self, name: &str) -> Option<IdcId> {
        self.idc_by_name.get(name).copied()
    }

    /// Whether `id` names a node in service in this topology (not a retired one).
    pub fn contains(&self, id: NodeId) -> bool {
        id.index() < self.nodes.len() && !self.retired[id.index()]
    }

    /// Where a node sits.
    pub fn location(&self, id: NodeId) -> Location {
        self.nodes[id.index()].location
    }

    /// The tier that joins two nodes.
    pub fn tier(&self, a: NodeId, b: NodeId) -> Tier {
        distance(&self.location(a), &self.location(b))
    }

    /// The DCI link between two IDCs, in either orientation.
    pub fn link(&self, a: IdcId, b: IdcId) -> Option<&DciLink> {
        self.links
            .iter()
            .find(|l| (l.a == a && l.b == b) || (l.a == b && l.b == a))
    }

    /// `/idc/rack/node` for a node.
    pub fn path(&self, id: NodeId) -> String {
        let loc = self.location(id);
        format!(
            "/{}/{}/{}",
            self.idcs[loc.idc.index()].name,
            self.racks[loc.rack.index()].name,
            self.nodes[id.index()].name
        )
    }

    /// The topology `next` describes, with this one's ids kept: what a running node
    /// applies when its topology file changes. Nodes of `next` that this topology has
    /// (by name) keep their [`NodeId`], new ones get the next ids, and nodes `next` no
    /// longer lists stay as *retired* entries ([`is_retired`](Self::is_retired)): their
    /// ids keep naming them in logs and replica sets, but they are out of
    /// [`node_ids`](Self::node_ids), the IDC and rack lists, name lookup and
    /// [`contains`](Self::contains). A retired node that comes back gets its old id.
    /// Racks only grow. A node's address, capacity and rack, and a link's budget and RTT
    /// may change.
    ///
    /// Refused ([`TopologyError::Reload`]): adding or removing an IDC or a DCI link, and
    /// moving a node to another IDC (remove it, then add it under a new name).
    pub fn revise(&self, next: &Topology) -> Result<Topology, TopologyError> {
        let refuse = |reason: String| Err(TopologyError::Reload { reason });
        let mut names: Vec<&str> = self.idcs.iter().map(|i| i.name.as_str()).collect();
        let mut next_names: Vec<&str> = next.idcs.iter().map(|i| i.name.as_str()).collect();
        names.sort_unstable();
        next_names.sort_unstable();
        if names != next_names {
            return refuse(format!(
                "the idcs change from {names:?} to {next_names:?} (restart every node for that)"
            ));
        }
        // `next`'s IDC id → this one's (the same names, so every lookup succeeds).
        let idc_of = |i: IdcId| self.idc_by_name[&next.idcs[i.index()].name];
        let pair = |a: IdcId, b: IdcId| (a.min(b), a.max(b));
        let mut links = Vec::with_capacity(next.links.len());
        for l in &next.links {
            let (a, b) = (idc_of(l.a), idc_of(l.b));
            if self.link(a, b).is_none() {
                return refuse(format!(
                    "a dci link between {:?} and {:?} is added",
                    self.idcs[a.index()].name,
                    self.idcs[b.index()].name
                ));
            }
            links.push(DciLink { a, b, ..*l });
        }
        if let Some(gone) = self.links.iter().find(|o| {
            !links
                .iter()
                .any(|l: &DciLink| pair(l.a, l.b) == pair(o.a, o.b))
        }) {
            return refuse(format!(
                "the dci link between {:?} and {:?} is removed",
                self.idcs[gone.a.index()].name,
                self.idcs[gone.b.index()].name
            ));
        }

        let mut idcs: Vec<IdcInfo> = self
            .idcs
            .iter()
            .map(|i| IdcInfo {
                nodes: Vec::new(),
                ..i.clone()
            })
            .collect();
        let mut racks: Vec<RackInfo> = self
            .racks
            .iter()
            .map(|r| RackInfo {
                nodes: Vec::new(),
                ..r.clone()
            })
            .collect();
        let mut rack_of: HashMap<RackId, RackId> = HashMap::new();
        for (i, r) in next.racks.iter().enumerate() {
            let idc = idc_of(r.idc);
            let id = match racks.iter().position(|o| o.idc == idc && o.name == r.name) {
                Some(p) => RackId(p as u32),
                None => add_rack(&mut idcs, &mut racks, idc, &r.name),
            };
            rack_of.insert(RackId(i as u32), id);
        }

        let mut nodes = self.nodes.clone();
        let mut retired = vec![true; nodes.len()];
        let mut node_by_name = HashMap::new();
        for n in &next.nodes {
            let id = match self.find_node(&n.name) {
                Some(id) => id,
                None => {
                    nodes.push(n.clone());
                    retired.push(true);
                    NodeId(nodes.len() as u32 - 1)
                }
            };
            let idc = idc_of(n.location.idc);
            let was = &nodes[id.index()];
            if id.index() < self.nodes.len() && was.location.idc != idc {
                return refuse(format!(
                    "node {:?} moves from idc {:?} to {:?} (remove it, then add it under a new name)",
                    n.name,
                    self.idcs[was.location.idc.index()].name,
                    self.idcs[idc.index()].name
                ));
            }
            let rack = rack_of[&n.location.rack];
            nodes[id.index()] = NodeInfo {
                location: Location {
                    idc,
                    rack,
                    node: id,
                },
                ..n.clone()
            };
            retired[id.index()] = false;
            node_by_name.insert(n.name.clone(), id);
        }
        for (i, n) in nodes.iter().enumerate() {
            if !retired[i] {
                let id = NodeId(i as u32);
                idcs[n.location.idc.index()].nodes.push(id);
                racks[n.location.rack.index()].nodes.push(id);
            }
        }
        Ok(Topology {
            idcs,
            racks,
            nodes,
            links,
            node_by_name,
            idc_by_name: self.idc_by_name.clone(),
            retired,
        })
    }

    /// Resolves an HDFS-style network path: `/idc`, `/idc/rack` or `/idc/rack/node`, to an
    /// [`Origin`]. Returns `None` when a part is not in the topology.
    pub fn resolve_path(&self, path: &str) -> Option<Origin> {
        let parts: Vec<&str> = path.strip_prefix('/')?.split('/').collect();
        let idc = self.idc_by_name(parts.first()?)?;
        let mut origin = Origin::in_idc(idc);
        if let Some(rack) = parts.get(1) {
            let rack = *self.idcs[idc.index()]
                .racks
                .iter()
                .find(|r| self.racks[r.index()].name == *rack)?;
            origin.rack = Some(rack);
        }
        if let Some(node) = parts.get(2) {
            let node = self.node_by_name(node)?;
            if Some(self.location(node).rack) != origin.rack {
                return None;
            }
            origin.node = Some(node);
        }
        if parts.len() > 3 {
            return None;
        }
        Some(origin)
    }
}

/// The topology a running node serves, replaced whole when it is reloaded
/// ([`Topology::revise`] keeps every id valid across versions). Readers take a snapshot
/// with [`get`](Self::get) and use that one for the whole of an operation, so that the
/// ids they hold and the topology they look them up in agree.
#[derive(Debug)]
pub struct LiveTopology(std::sync::RwLock<std::sync::Arc<Topology>>);

impl LiveTopology {
    /// Serves `topology` until the next [`set`](Self::set).
    pub fn new(topology: std::sync::Arc<Topology>) -> Self {
        LiveTopology(std::sync::RwLock::new(topology))
    }

    /// The topology in force.
    pub fn get(&self) -> std::sync::Arc<Topology> {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Puts `topology` in force; returns the one it replaces. The caller made it with
    /// [`Topology::revise`] of the one in force.
    pub fn set(&self, topology: std::sync::Arc<Topology>) -> std::sync::Arc<Topology> {
        std::mem::replace(
            &mut *self.0.write().unwrap_or_else(|e| e.into_inner()),
            topology,
        )
    }
}

/// A line number in a topology file, when the error came from one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Line(pub Option<usize>);

impl fmt::Display for Line {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(n) => write!(f, "line {n}: "),
            None => Ok(()),
        }
    }
}

/// Why a topology was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TopologyError {
    /// The file could not be read.
    #[error("cannot read topology file {path}: {message}")]
    Read {
        /// The file.
        path: String,
        /// What the OS said.
        message: String,
    },
    /// The text is not valid TOML or has a field of the wrong type or name.
    #[error("{line}{message}")]
    Parse {
        /// Where.
        line: Line,
        /// What the TOML parser said.
        message: String,
    },
    /// The topology has no storage node.
    #[error("topology has no nodes")]
    Empty,
    /// A name is empty or contains `/` or whitespace.
    #[error("{line}{what} name {name:?} is empty or contains '/' or whitespace")]
    BadName {
        /// Where.
        line: Line,
        /// `idc`, `rack` or `node`.
        what: &'static str,
        /// The name as given.
        name: String,
    },
    /// Two IDCs have the same name.
    #[error("{line}duplicate idc {name:?}")]
    DuplicateIdc {
        /// Where.
        line: Line,
        /// The name.
        name: String,
    },
    /// Two nodes have the same name.
    #[error("{line}duplicate node name {name:?} (first defined {first})")]
    DuplicateNode {
        /// Where the second one is.
        line: Line,
        /// The name.
        name: String,
        /// Where the first one is.
        first: Line,
    },
    /// Two nodes have the same address.
    #[error("{line}node {node:?} has address {addr}, already used by node {other:?}")]
    DuplicateAddress {
        /// Where.
        line: Line,
        /// The node.
        node: String,
        /// The address.
        addr: SocketAddr,
        /// The node that has it already.
        other: String,
    },
    /// A node or link names an IDC that the topology does not list.
    #[error("{line}{context} refers to unknown idc {idc:?}")]
    UnknownIdc {
        /// Where.
        line: Line,
        /// What referred to it.
        context: String,
        /// The name.
        idc: String,
    },
    /// A node names a rack that its IDC does not list.
    #[error("{line}node {node:?} refers to rack {rack:?}, which idc {idc:?} does not list")]
    UnknownRack {
        /// Where.
        line: Line,
        /// The node.
        node: String,
        /// The IDC.
        idc: String,
        /// The rack.
        rack: String,
    },
    /// A node's location is missing, malformed, or given twice.
    #[error("{line}node {node:?}: {message}")]
    BadLocation {
        /// Where.
        line: Line,
        /// The node.
        node: String,
        /// What is wrong.
        message: String,
    },
    /// A node's address is not `ip:port`.
    #[error("{line}node {node:?}: address {addr:?} is not ip:port")]
    BadAddress {
        /// Where.
        line: Line,
        /// The node.
        node: String,
        /// The text as given.
        addr: String,
    },
    /// A size, rate or duration could not be parsed.
    #[error("{line}{field}: {source}")]
    BadValue {
        /// Where.
        line: Line,
        /// The field.
        field: &'static str,
        /// The parse error.
        source: UnitError,
    },
    /// A DCI link's budget is zero or negative.
    #[error("{line}dci link {a:?} <-> {b:?}: budget must be greater than zero, got {value}")]
    BadBudget {
        /// Where.
        line: Line,
        /// One end.
        a: String,
        /// The other end.
        b: String,
        /// The value as given.
        value: String,
    },
    /// A reloaded topology changes what a running cluster cannot change in place.
    #[error("topology reload refused: {reason}")]
    Reload {
        /// What changed.
        reason: String,
    },
    /// A DCI link does not join exactly two different IDCs.
    #[error("{line}dci link must join two different idcs, got {between:?}")]
    BadLinkEnds {
        /// Where.
        line: Line,
        /// The ends as given.
        between: Vec<String>,
    },
    /// The same pair of IDCs has two links.
    #[error("{line}second dci link between {a:?} and {b:?}")]
    DuplicateLink {
        /// Where.
        line: Line,
        /// One end.
        a: String,
        /// The other end.
        b: String,
    },
    /// An IDC with nodes has no DCI link while other IDCs exist.
    #[error("{line}idc {idc:?} has nodes but no dci link to any other idc")]
    NoDciLink {
        /// Where (the IDC's first node).
        line: Line,
        /// The IDC.
        idc: String,
    },
}

fn line_of(text: &str, offset: usize) -> usize {
    text.as_bytes()[..offset.min(text.len())]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

/// Appends an empty rack `name` to `idc`; returns its id.
fn add_rack(idcs: &mut [IdcInfo], racks: &mut Vec<RackInfo>, idc: IdcId, name: &str) -> RackId {
    let id = RackId(racks.len() as u32);
    racks.push(RackInfo {
        name: name.to_string(),
        idc,
        nodes: Vec::new(),
    });
    idcs[idc.index()].racks.push(id);
    id
}

fn valid_name(name: &str) -> bool {
    !name.is_empty() && !name.contains('/') && !name.chars().any(char::is_whitespace)
}

#[derive(Debug, Clone)]
struct IdcEntry {
    name: String,
    racks: Option<Vec<String>>,
    line: Option<usize>,
}

#[derive(Debug, Clone)]
struct NodeEntry {
    name: String,
    idc: String,
    rack: String,
    addr: SocketAddr,
    capacity: u64,
    dci_addr: Option<SocketAddr>,
    tenant: Option<String>,
    line: Option<usize>,
}

#[derive(Debug, Clone)]
struct LinkEntry {
    a: String,
    b: String,
    budget_bps: u64,
    rtt: Duration,
    line: Option<usize>,
}

/// Builds a [`Topology`] in code. Every check of the file format applies in
/// [`build`](Self::build); errors carry no line number.
#[derive(Debug, Clone, Default)]
pub struct TopologyBuilder {
    idcs: Vec<IdcEntry>,
    nodes: Vec<NodeEntry>,
    links: Vec<LinkEntry>,
}

impl TopologyBuilder {
    /// Adds an IDC whose racks are implied by its nodes.
    pub fn idc(mut self, name: impl Into<String>) -> Self {
        self.idcs.push(IdcEntry {
            name: name.into(),
            racks: None,
            line: None,
        });
        self
    }

    /// Adds a node at `/idc/rack`.
    pub fn node(
        mut self,
        name: impl Into<String>,
        idc: impl Into<String>,
        rack: impl Into<String>,
        addr: SocketAddr,
        capacity: u64,
    ) -> Self {
        self.nodes.push(NodeEntry {
            name: name.into(),
            idc: idc.into(),
            rack: rack.into(),
            addr,
            capacity,
            dci_addr: None,
            tenant: None,
            line: None,
        });
        self
    }

    /// Puts the node added last in `tenant` (DCI quotas, `scheduler::tenants`).
    pub fn tenant(mut self, tenant: impl Into<String>) -> Self {
        if let Some(n) = self.nodes.last_mut() {
            n.tenant = Some(tenant.into());
        }
        self
    }

    /// Sets the address peers in other IDCs use for the node added last.
    pub fn dci_addr(mut self, addr: SocketAddr) -> Self {
        if let Some(n) = self.nodes.last_mut() {
            n.dci_addr = Some(addr);
        }
        self
    }

    /// Adds a DCI link; `budget_bps` is bytes per second in each direction.
    pub fn link(
        mut self,
        a: impl Into<String>,
        b: impl Into<String>,
        budget_bps: u64,
        rtt: Duration,
    ) -> Self {
        self.links.push(LinkEntry {
            a: a.into(),
            b: b.into(),
            budget_bps,
            rtt,
            line: None,
        });
        self
    }

    /// Validates everything and builds the topology.
    pub fn build(self) -> Result<Topology, TopologyError> {
        let mut idcs: Vec<IdcInfo> = Vec::new();
        let mut declared_racks: Vec<Option<Vec<String>>> = Vec::new();
        let mut idc_by_name = HashMap::new();
        for e in &self.idcs {
            if !valid_name(&e.name) {
                return Err(TopologyError::BadName {
                    line: Line(e.line),
                    what: "idc",
                    name: e.name.clone(),
                });
            }
            let id = IdcId(idcs.len() as u32);
            if idc_by_name.insert(e.name.clone(), id).is_some() {
                return Err(TopologyError::DuplicateIdc {
                    line: Line(e.line),
                    name: e.name.clone(),
                });
            }
            if let Some(racks) = &e.racks
                && let Some(bad) = racks.iter().find(|r| !valid_name(r))
            {
                return Err(TopologyError::BadName {
                    line: Line(e.line),
                    what: "rack",
                    name: bad.clone(),
                });
            }
            idcs.push(IdcInfo {
                name: e.name.clone(),
                racks: Vec::new(),
                nodes: Vec::new(),
            });
            declared_racks.push(e.racks.clone());
        }

        let mut racks: Vec<RackInfo> = Vec::new();
        let mut rack_by_name: HashMap<(IdcId, String), RackId> = HashMap::new();
        // Declared racks exist even when empty, in the order they were listed.
        for (i, declared) in declared_racks.iter().enumerate() {
            for r in declared.iter().flatten() {
                let idc = IdcId(i as u32);
                rack_by_name
                    .entry((idc, r.clone()))
                    .or_insert_with(|| add_rack(&mut idcs, &mut racks, idc, r));
            }
        }

        let mut nodes: Vec<NodeInfo> = Vec::new();
        let mut node_by_name: HashMap<String, NodeId> = HashMap::new();
        let mut node_lines: Vec<Option<usize>> = Vec::new();
        let mut addr_owner: HashMap<SocketAddr, NodeId> = HashMap::new();
        for e in &self.nodes {
            let line = Line(e.line);
            for (what, name) in [("node", &e.name), ("rack", &e.rack)]
                .into_iter()
                .chain(e.tenant.as_ref().map(|t| ("tenant", t)))
            {
                if !valid_name(name) {
                    return Err(TopologyError::BadName {
                        line,
                        what,
                        name: name.clone(),
                    });
                }
            }
            let id = NodeId(nodes.len() as u32);
            if let Some(first) = node_by_name.get(&e.name) {
                return Err(TopologyError::DuplicateNode {
                    line,
                    name: e.name.clone(),
                    first: Line(node_lines[first.index()]),
                });
            }
            let idc = *idc_by_name
                .get(&e.idc)
                .ok_or_else(|| TopologyError::UnknownIdc {
                    line,
                    context: format!("node {:?}", e.name),
                    idc: e.idc.clone(),
                })?;
            for a in std::iter::once(e.addr).chain(e.dci_addr) {
                if let Some(other) = addr_owner.get(&a) {
                    return Err(TopologyError::DuplicateAddress {
                        line,
                        node: e.name.clone(),
                        addr: a,
                        other: nodes[other.index()].name.clone(),
                    });
                }
            }
            let rack = match rack_by_name.get(&(idc, e.rack.clone())) {
                Some(&r) => r,
                None if declared_racks[idc.index()].is_some() => {
                    return Err(TopologyError::UnknownRack {
                        line,
                        node: e.name.clone(),
                        idc: e.idc.clone(),
                        rack: e.rack.clone(),
                    });
                }
                None => {
                    let r = add_rack(&mut idcs, &mut racks, idc, &e.rack);
                    rack_by_name.insert((idc, e.rack.clone()), r);
                    r
                }
            };
            node_by_name.insert(e.name.clone(), id);
            addr_owner.insert(e.addr, id);
            if let Some(a) = e.dci_addr {
                addr_owner.insert(a, id);
            }
            node_lines.push(e.line);
            racks[rack.index()].nodes.push(id);
            idcs[idc.index()].nodes.push(id);
            nodes.push(NodeInfo {
                name: e.name.clone(),
                addr: e.addr,
                capacity: e.capacity,
                dci_addr: e.dci_addr,
                location: Location {
                    idc,
                    rack,
                    node: id,
                },
                tenant: e.tenant.clone(),
            });
        }
        if nodes.is_empty() {
            return Err(TopologyError::Empty);
        }

        let mut links: Vec<DciLink> = Vec::new();
        let mut seen_pairs = HashSet::new();
        for e in &self.links {
            let line = Line(e.line);
            let lookup = |name: &str| {
                idc_by_name
                    .get(name)
                    .copied()
                    .ok_or_else(|| TopologyError::UnknownIdc {
                        line,
                        context: format!("dci link {:?} <-> {:?}", e.a, e.b),
                        idc: name.to_string(),
                    })
            };
            let (a, b) = (lookup(&e.a)?, lookup(&e.b)?);
            if a == b {
                return Err(TopologyError::BadLinkEnds {
                    line,
                    between: vec![e.a.clone(), e.b.clone()],
                });
            }
            if e.budget_bps == 0 {
                return Err(TopologyError::BadBudget {
                    line,
                    a: e.a.clone(),
                    b: e.b.clone(),
                    value: "0".into(),
                });
            }
            if !seen_pairs.insert((a.min(b), a.max(b))) {
                return Err(TopologyError::DuplicateLink {
                    line,
                    a: e.a.clone(),
                    b: e.b.clone(),
                });
            }
            links.push(DciLink {
                a,
                b,
                budget_bps: e.budget_bps,
                rtt: e.rtt,
            });
        }

        if idcs.len() > 1 {
            for (i, idc) in idcs.iter().enumerate() {
                let id = IdcId(i as u32);
                let linked = links.iter().any(|l| l.a == id || l.b == id);
                if let (false, Some(first)) = (linked, idc.nodes.first()) {
                    return Err(TopologyError::NoDciLink {
                        line: Line(node_lines[first.index()]),
                        idc: idc.name.clone(),
                    });
                }
            }
        }

        Ok(Topology {
            retired: vec![false; nodes.len()],
            idcs,
            racks,
            nodes,
            links,
            node_by_name,
            idc_by_name,
        })
    }
}

// ---- TOML form ---------------------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    idc: Vec<RawIdc>,
    #[serde(default)]
    node: Vec<RawNode>,
    #[serde(default)]
    dci: Vec<RawLink>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawIdc {
    name: toml::Spanned<String>,
    racks: Option<Vec<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNode {
    name: toml::Spanned<String>,
    addr: String,
    dci_addr: Option<String>,
    capacity: Option<toml::Spanned<toml::Value>>,
    location: Option<String>,
    idc: Option<String>,
    rack: Option<String>,
    tenant: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLink {
    between: toml::Spanned<Vec<String>>,
    budget: toml::Spanned<toml::Value>,
    rtt: toml::Spanned<String>,
}

/// Capacity assumed for a node whose entry gives none.
const DEFAULT_CAPACITY: u64 = 1 << 40;

fn value_text(v: &toml::Value) -> String {
    match v {
        toml::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

impl RawFile {
    fn into_builder(self, text: &str) -> Result<TopologyBuilder, TopologyError> {
        let at = |span: std::ops::Range<usize>| Line(Some(line_of(text, span.start)));
        let mut b = TopologyBuilder::default();
        for idc in self.idc {
            b.idcs.push(IdcEntry {
                line: at(idc.name.span()).0,
                name: idc.name.into_inner(),
                racks: idc.racks,
            });
        }
        for n in self.node {
            let line = at(n.name.span());
            let name = n.name.into_inner();
            let bad_location = |message: &str| TopologyError::BadLocation {
                line,
                node: name.clone(),
                message: message.to_string(),
            };
            let (idc, rack) = match (n.location, n.idc, n.rack) {
                (Some(path), None, None) => {
                    let parts: Vec<&str> = path
                        .strip_prefix('/')
                        .map(|p| p.split('/').collect())
                        .unwrap_or_default();
                    match parts.as_slice() {
                        [idc, rack] => (idc.to_string(), rack.to_string()),
                        _ => {
                            return Err(bad_location(&format!(
                                "location {path:?} is not an HDFS-style path \"/idc/rack\""
                            )));
                        }
                    }
                }
                (None, Some(idc), Some(rack)) => (idc, rack),
                (None, _, _) => {
                    return Err(bad_location(
                        "needs location = \"/idc/rack\", or both idc and rack",
                    ));
                }
                (Some(_), _, _) => {
                    return Err(bad_location("give either location or idc + rack, not both"));
                }
            };
            let addr = n.addr.parse().map_err(|_| TopologyError::BadAddress {
                line,
                node: name.clone(),
                addr: n.addr.clone(),
            })?;
            let capacity = match n.capacity {
                None => DEFAULT_CAPACITY,
                Some(v) => {
                    let cline = at(v.span());
                    match v.into_inner() {
                        toml::Value::Integer(i) if i >= 0 => i as u64,
                        toml::Value::String(s) => {
                            units::parse_bytes(&s).map_err(|source| TopologyError::BadValue {
                                line: cline,
                                field: "capacity",
                                source,
                            })?
                        }
                        other => {
                            return Err(TopologyError::BadValue {
                                line: cline,
                                field: "capacity",
                                source: UnitError::OutOfRange {
                                    text: value_text(&other),
                                },
                            });
                        }
                    }
                }
            };
            let dci_addr = match n.dci_addr {
                Some(a) => Some(a.parse().map_err(|_| TopologyError::BadAddress {
                    line,
                    node: name.clone(),
                    addr: a.clone(),
                })?),
                None => None,
            };
            b.nodes.push(NodeEntry {
                name,
                idc,
                rack,
                addr,
                capacity,
                dci_addr,
                tenant: n.tenant,
                line: line.0,
            });
        }
        for l in self.dci {
            let line = at(l.between.span());
            let between = l.between.into_inner();
            let [a, b_end] = <[String; 2]>::try_from(between.clone())
                .map_err(|_| TopologyError::BadLinkEnds { line, between })?;
            let bad_budget = |v: &toml::Value| TopologyError::BadBudget {
                line: at(l.budget.span()),
                a: a.clone(),
                b: b_end.clone(),
                value: value_text(v),
            };
            let budget_bps = match l.budget.get_ref() {
                toml::Value::Integer(i) if *i > 0 => *i as u64,
                toml::Value::String(s) => match units::parse_rate(s) {
                    Ok(0) => return Err(bad_budget(l.budget.get_ref())),
                    Ok(v) => v,
                    Err(UnitError::OutOfRange { .. }) => {
                        return Err(bad_budget(l.budget.get_ref()));
                    }
                    Err(source) => {
                        return Err(TopologyError::BadValue {
                            line: at(l.budget.span()),
                            field: "budget",
                            source,
                        });
                    }
                },
                other => return Err(bad_budget(other)),
            };
            let rtt = units::parse_duration(l.rtt.get_ref()).map_err(|source| {
                TopologyError::BadValue {
                    line: at(l.rtt.span()),
                    field: "rtt",
                    source,
                }
            })?;
            b.links.push(LinkEntry {
                a,
                b: b_end,
                budget_bps,
                rtt,
                line: line.0,
            });
        }
        Ok(b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TWO_IDC: &str = r#"
[[idc]]
name = "idc-a"
racks = ["r1", "r2"]

[[idc]]
name = "idc-b"

[[node]]
name = "a1"
location = "/idc-a/r1"
addr = "127.0.0.11:7000"
capacity = "4TiB"

[[node]]
name = "a2"
idc = "idc-a"
rack = "r2"
addr = "127.0.0.12:7000"
capacity = 1000

[[node]]
name = "b1"
location = "/idc-b/r1"
addr = "127.0.0.21:7000"

[[dci]]
between = ["idc-a", "idc-b"]
budget = "10gbit"
rtt = "2ms"
"#;

    fn addr(last: u8) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, last], 7000))
    }

    /// idc-a and idc-b with the named nodes (`a…` in idc-a, the rest in idc-b).
    fn two_idcs(nodes: &[&str]) -> Topology {
        let mut b = Topology::builder().idc("idc-a").idc("idc-b");
        for (i, n) in nodes.iter().enumerate() {
            let idc = if n.starts_with('a') { "idc-a" } else { "idc-b" };
            b = b.node(*n, idc, format!("r{}", i % 2), addr(10 + i as u8), 1 << 40);
        }
        b.link("idc-a", "idc-b", 1_000_000, Duration::from_millis(1))
            .build()
            .unwrap()
    }

    #[test]
    fn a_revision_keeps_every_id_and_retires_removed_nodes() {
        let old = two_idcs(&["a1", "a2", "b1", "b2"]);
        // a1 leaves, a3 joins (listed first: file order must not matter).
        let next = two_idcs(&["a3", "a2", "b1", "b2"]);
        let t = old.revise(&next).unwrap();
        for name in ["a2", "b1", "b2"] {
            assert_eq!(t.node_by_name(name), old.node_by_name(name), "{name}");
        }
        let (a1, a3) = (
            old.node_by_name("a1").unwrap(),
            t.node_by_name("a3").unwrap(),
        );
        assert_eq!(a3.index(), 4, "a new node takes the next id");
        assert!(t.is_retired(a1) && !t.contains(a1) && t.node_by_name("a1").is_none());
        assert_eq!(t.node(a1).name, "a1", "a retired id still names its node");
        assert!(!t.node_ids().any(|n| n == a1));
        assert_eq!(t.node_ids().count(), 4);
        let idc_a = t.idc_by_name("idc-a").unwrap();
        assert!(!t.idc(idc_a).nodes.contains(&a1));
        assert!(t.idc(idc_a).nodes.contains(&a3));
        assert_eq!(t.location(a3).node, a3);
        assert_eq!(t.idc(t.location(a3).idc).name, "idc-a");
        // Revising again is stable, and a retired node that comes back gets its old id.
        let again = t.revise(&next).unwrap();
        assert_eq!(again.nodes().len(), 5);
        let back = t
            .revise(&two_idcs(&["a1", "a2", "b1", "b2", "a3"]))
            .unwrap();
        assert_eq!(back.node_by_name("a1"), Some(a1));
        assert!(back.contains(a1) && back.contains(a3));
    }

    #[test]
    fn a_revision_takes_new_budgets_and_refuses_structural_changes() {
        let old = two_idcs(&["a1", "a2", "b1", "b2"]);
        let faster = Topology::builder()
            .idc("idc-b")
            .idc("idc-a")
            .node("b1", "idc-b", "r9", addr(30), 1)
            .node("a1", "idc-a", "r0", addr(10), 1)
            .link("idc-b", "idc-a", 5_000_000, Duration::from_millis(3))
            .build()
            .unwrap();
        let t = old.revise(&faster).unwrap();
        let (a, b) = (
            t.idc_by_name("idc-a").unwrap(),
            t.idc_by_name("idc-b").unwrap(),
        );
        assert_eq!(
            (a, b),
            (
                old.idc_by_name("idc-a").unwrap(),
                old.idc_by_name("idc-b").unwrap()
            )
        );
        assert_eq!(t.link(a, b).unwrap().budget_bps, 5_000_000);
        let b1 = t.node_by_name("b1").unwrap();
        assert_eq!(t.node(b1).addr, addr(30));
        assert_eq!(t.rack(t.location(b1).rack).name, "r9", "a new rack");
        assert_eq!(t.location(b1).idc, b);

        let reload = |r: Result<Topology, TopologyError>| match r {
            Err(TopologyError::Reload { reason }) => reason,
            other => panic!("expected a refused reload, got {other:?}"),
        };
        let three = Topology::builder()
            .idc("idc-a")
            .idc("idc-b")
            .idc("idc-c")
            .node("a1", "idc-a", "r0", addr(10), 1)
            .link("idc-a", "idc-b", 1_000_000, Duration::from_millis(1))
            .build()
            .unwrap();
        assert!(reload(old.revise(&three)).contains("idcs change"));
        let moved = Topology::builder()
            .idc("idc-a")
            .idc("idc-b")
            .node("a1", "idc-b", "r0", addr(10), 1)
            .link("idc-a", "idc-b", 1_000_000, Duration::from_millis(1))
            .build()
            .unwrap();
        assert!(reload(old.revise(&moved)).contains("moves from idc"));
        let ring = |links: &[(&str, &str)]| {
            let mut b = Topology::builder().idc("x").idc("y").idc("z");
            for (i, n) in ["x", "y", "z"].iter().enumerate() {
                b = b.node(format!("{n}1"), *n, "r", addr(50 + i as u8), 1);
            }
            for (p, q) in links {
                b = b.link(*p, *q, 1_000_000, Duration::from_millis(1));
            }
            b.build().unwrap()
        };
        let full = ring(&[("x", "y"), ("y", "z"), ("x", "z")]);
        let cut = ring(&[("x", "y"), ("y", "z")]);
        assert!(reload(full.revise(&cut)).contains("is removed"));
        assert!(reload(cut.revise(&full)).contains("is added"));
        assert!(full.revise(&full).is_ok());
    }

    fn err(text: &str) -> TopologyError {
        Topology::from_toml_str(text).expect_err("topology should be refused")
    }

    #[test]
    fn parses_example() {
        let t = Topology::from_toml_str(TWO_IDC).unwrap();
        assert_eq!(t.idcs().len(), 2);
        assert_eq!(t.racks().len(), 3);
        assert_eq!(t.nodes().len(), 3);
        let a1 = t.node_by_name("a1").unwrap();
        let a2 = t.node_by_name("a2").unwrap();
        let b1 = t.node_by_name("b1").unwrap();
        assert_eq!(t.node(a1).capacity, 4 << 40);
        assert_eq!(t.node(a2).capacity, 1000);
        assert_eq!(t.node(b1).capacity, DEFAULT_CAPACITY);
        assert_eq!(t.path(a2), "/idc-a/r2/a2");
        let link = t.link(t.location(b1).idc, t.location(a1).idc).unwrap();
        assert_eq!(link.budget_bps, 1_250_000_000);
        assert_eq!(link.rtt, Duration::from_millis(2));
        assert_eq!(link.bdp_bytes(), 2_500_000);
    }

    #[test]
    fn tiers_are_ordered() {
        let t = Topology::builder()
            .idc("a")
            .idc("b")
            .node("n1", "a", "r1", "127.0.0.1:1".parse().unwrap(), 1)
            .node("n2", "a", "r1", "127.0.0.2:1".parse().unwrap(), 1)
            .node("n3", "a", "r2", "127.0.0.3:1".parse().unwrap(), 1)
            .node("n4", "b", "r1", "127.0.0.4:1".parse().unwrap(), 1)
            .link("a", "b", 1, Duration::ZERO)
            .build()
            .unwrap();
        let id = |n| t.node_by_name(n).unwrap();
        assert_eq!(t.tier(id("n1"), id("n1")), Tier::Node);
        assert_eq!(t.tier(id("n1"), id("n2")), Tier::Rack);
        assert_eq!(t.tier(id("n1"), id("n3")), Tier::Idc);
        assert_eq!(t.tier(id("n1"), id("n4")), Tier::Dci);
        assert!(Tier::Node < Tier::Rack && Tier::Rack < Tier::Idc && Tier::Idc < Tier::Dci);
        // Rack names are scoped to their IDC: b/r1 is not a/r1.
        assert_ne!(t.location(id("n1")).rack, t.location(id("n4")).rack);

        let client = t.resolve_path("/a/r2").unwrap();
        assert_eq!(client.tier_to(&t.location(id("n3"))), Tier::Rack);
        assert_eq!(client.tier_to(&t.location(id("n1"))), Tier::Idc);
        assert_eq!(client.tier_to(&t.location(id("n4"))), Tier::Dci);
        let on_node = t.resolve_path("/a/r1/n1").unwrap();
        assert_eq!(on_node.tier_to(&t.location(id("n1"))), Tier::Node);
        assert!(t.resolve_path("/a/r2/n1").is_none(), "n1 is not in r2");
        assert!(t.resolve_path("/c").is_none());
    }

    #[test]
    fn syntax_error_names_line() {
        let e = err("[[node]]\nname = \"a\"\naddr = 5\n");
        assert!(
            matches!(
                e,
                TopologyError::Parse {
                    line: Line(Some(3)),
                    ..
                }
            ),
            "{e}"
        );
        let e = err("[[node]]\nname = \"a\"\nadress = \"x\"\n");
        assert!(e.to_string().contains("line 3"), "{e}");
    }

    #[test]
    fn unknown_idc_in_link() {
        let text = TWO_IDC.replace(
            r#"between = ["idc-a", "idc-b"]"#,
            r#"between = ["idc-a", "idc-c"]"#,
        );
        let e = err(&text);
        match &e {
            TopologyError::UnknownIdc { idc, line, .. } => {
                assert_eq!(idc, "idc-c");
                assert_eq!(line.0, Some(28));
            }
            other => panic!("unexpected {other}"),
        }
        assert!(e.to_string().starts_with("line 28: dci link"), "{e}");
    }

    #[test]
    fn unknown_idc_in_node() {
        let e = err(&TWO_IDC.replace("/idc-b/r1", "/idc-z/r1"));
        assert!(
            matches!(e, TopologyError::UnknownIdc { ref idc, .. } if idc == "idc-z"),
            "{e}"
        );
    }

    #[test]
    fn unknown_declared_rack() {
        let e = err(&TWO_IDC.replace("/idc-a/r1", "/idc-a/r9"));
        assert!(
            matches!(e, TopologyError::UnknownRack { ref rack, .. } if rack == "r9"),
            "{e}"
        );
    }

    #[test]
    fn duplicate_node_name() {
        let e = err(&TWO_IDC.replace("name = \"a2\"", "name = \"a1\""));
        match e {
            TopologyError::DuplicateNode { name, line, first } => {
                assert_eq!(name, "a1");
                assert_eq!(first.0, Some(10));
                assert_eq!(line.0, Some(16));
            }
            other => panic!("unexpected {other}"),
        }
    }

    #[test]
    fn duplicate_address() {
        let e = err(&TWO_IDC.replace("127.0.0.12:7000", "127.0.0.11:7000"));
        assert!(
            matches!(e, TopologyError::DuplicateAddress { ref node, ref other, .. } if node == "a2" && other == "a1"),
            "{e}"
        );
    }

    #[test]
    fn idc_without_link() {
        let text = TWO_IDC.replace(
            "[[dci]]\nbetween = [\"idc-a\", \"idc-b\"]\nbudget = \"10gbit\"\nrtt = \"2ms\"\n",
            "",
        );
        let e = err(&text);
        assert!(
            matches!(e, TopologyError::NoDciLink { ref idc, line: Line(Some(10)) } if idc == "idc-a"),
            "{e}"
        );
    }

    #[test]
    fn single_idc_needs_no_link() {
        let t = Topology::from_toml_str(
            "[[idc]]\nname = \"x\"\n[[node]]\nname = \"n\"\nlocation = \"/x/r\"\naddr = \"127.0.0.1:1\"\n",
        )
        .unwrap();
        assert_eq!(t.nodes().len(), 1);
    }

    #[test]
    fn zero_and_negative_budgets() {
        for budget in ["0", "-5", "\"0mbit\"", "\"-1gbit\""] {
            let text = TWO_IDC.replace("budget = \"10gbit\"", &format!("budget = {budget}"));
            let e = err(&text);
            assert!(
                matches!(
                    e,
                    TopologyError::BadBudget {
                        line: Line(Some(29)),
                        ..
                    }
                ),
                "{budget}: {e}"
            );
        }
        let e = err(&TWO_IDC.replace("\"10gbit\"", "\"10 furlongs\""));
        assert!(
            matches!(
                e,
                TopologyError::BadValue {
                    field: "budget",
                    ..
                }
            ),
            "{e}"
        );
        let e = Topology::builder()
            .idc("a")
            .idc("b")
            .node("n", "a", "r", "127.0.0.1:1".parse().unwrap(), 1)
            .node("m", "b", "r", "127.0.0.2:1".parse().unwrap(), 1)
            .link("a", "b", 0, Duration::ZERO)
            .build()
            .unwrap_err();
        assert!(
            matches!(
                e,
                TopologyError::BadBudget {
                    line: Line(None),
                    ..
                }
            ),
            "{e}"
        );
    }

    #[test]
    fn empty_names() {
        let e = err(&TWO_IDC.replace("name = \"idc-b\"", "name = \"\""));
        assert!(
            matches!(e, TopologyError::BadName { what: "idc", .. }),
            "{e}"
        );
        let e = err(&TWO_IDC.replace("name = \"a1\"", "name = \"\""));
        assert!(
            matches!(e, TopologyError::BadName { what: "node", .. }),
            "{e}"
        );
        let e = err(&TWO_IDC.replace("rack = \"r2\"", "rack = \"\""));
        assert!(
            matches!(e, TopologyError::BadName { what: "rack", .. }),
            "{e}"
        );
        let e = err(&TWO_IDC.replace("name = \"a1\"", "name = \"a/1\""));
        assert!(
            matches!(e, TopologyError::BadName { what: "node", .. }),
            "{e}"
        );
    }

    #[test]
    fn bad_location_address_rtt() {
        let e = err(&TWO_IDC.replace("location = \"/idc-a/r1\"", "location = \"idc-a\""));
        assert!(matches!(e, TopologyError::BadLocation { .. }), "{e}");
        let e = err(&TWO_IDC.replace("127.0.0.11:7000", "localhost"));
        assert!(matches!(e, TopologyError::BadAddress { .. }), "{e}");
        let e = err(&TWO_IDC.replace("rtt = \"2ms\"", "rtt = \"2\""));
        assert!(
            matches!(e, TopologyError::BadValue { field: "rtt", .. }),
            "{e}"
        );
        let e = err(&TWO_IDC.replace(r#"["idc-a", "idc-b"]"#, r#"["idc-a", "idc-a"]"#));
        assert!(matches!(e, TopologyError::BadLinkEnds { .. }), "{e}");
        let e = err(&TWO_IDC.replace("capacity = 1000", "capacity = -3"));
        assert!(
            matches!(
                e,
                TopologyError::BadValue {
                    field: "capacity",
                    ..
                }
            ),
            "{e}"
        );
    }

    #[test]
    fn duplicates_of_idc_and_link() {
        let e = err(&TWO_IDC.replace("name = \"idc-b\"", "name = \"idc-a\""));
        assert!(matches!(e, TopologyError::DuplicateIdc { .. }), "{e}");
        let text = format!(
            "{TWO_IDC}\n[[dci]]\nbetween = [\"idc-b\", \"idc-a\"]\nbudget = 5\nrtt = \"1ms\"\n"
        );
        assert!(matches!(err(&text), TopologyError::DuplicateLink { .. }));
    }

    #[test]
    fn dci_addresses() {
        let t = Topology::from_toml_str(&TWO_IDC.replace(
            "addr = \"127.0.0.21:7000\"",
            "addr = \"127.0.0.21:7000\"\ndci_addr = \"127.0.0.99:7000\"",
        ))
        .unwrap();
        let b1 = t.node_by_name("b1").unwrap();
        assert_eq!(
            t.node(b1).dci_addr,
            Some("127.0.0.99:7000".parse().unwrap())
        );
        let e = err(&TWO_IDC.replace(
            "addr = \"127.0.0.21:7000\"",
            "addr = \"127.0.0.21:7000\"\ndci_addr = \"127.0.0.11:7000\"",
        ));
        assert!(
            matches!(e, TopologyError::DuplicateAddress { ref other, .. } if other == "a1"),
            "{e}"
        );
    }

    #[test]
    fn empty_topology() {
        assert_eq!(err(""), TopologyError::Empty);
    }
}

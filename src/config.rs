//! The node configuration file the daemon reads, and its validation into a
//! [`NodeConfig`]. A bad file is refused with a message that names the field (and, for
//! syntax and type errors, the line). Every field, its default and unit:
//! `docs/CONFIG.md` (a test keeps it in step with the structs below).
//!
//! ```toml
//! name = "a1"                          # this node in the topology
//! topology = "topology.toml"           # relative paths are relative to this file
//! store_dir = "data/a1"
//! store_backend = "auto"               # auto | uring | psync
//! intra_idc_link = "tcp-tls"           # tcp-tls | quic
//! default_write_mode = "sync"          # sync | async (for clients of this node)
//!
//! [tls]
//! ca = "certs/ca.pem"
//! cert = "certs/a1.pem"
//! key = "certs/a1.key"
//!
//! [dci]
//! share = 0.5                          # of each DCI link's budget
//! compress = true
//! classes = { sync = [40, 100], read = [20, 100], async = [20, 100], repair = [10, 50] }
//!                                      # [guaranteed %, ceiling %] of the share
//!
//! [dci.shares]                         # optional: cluster-wide shares replace `share`
//! floor = 0.02                         # of each link's budget, split among its senders
//! lease = "1s"                         # how long a grant is valid
//! period = "50ms"                      # how often this node reports its demand
//! spot = ["repair"]                    # classes served after every reserved demand
//!
//! [[dci.shares.tenants]]               # optional: quotas of the topology's tenants
//! name = "analytics"                   # nodes with tenant = "analytics"
//! guarantee = 0.2                      # fractions of each link's budget
//! deserved = 0.5
//! capability = 0.8                     # default 1
//!
//! [replication]                        # optional: enables async writes from this node
//! log_dir = "data/a1-log"
//! max_lag_bytes = "1GiB"
//! max_lag_age = "5min"
//! policy = "sync"                      # block | sync | warn
//!
//! [pipeline]                           # optional: admission of write pipelines
//! max_writes = 1024                    # pipelines through this node at once
//! admission_timeout = "30s"            # how long a writer retries a busy pipeline
//! dci_min_rate = "2MB/s"               # least rate of a sync pipeline across the DCI; 0: off
//!
//! [repair]                             # optional: notice lost replicas and restore them
//! log_dir = "data/a1-repair"           # the durable repair queue
//! workers = 2                          # repairs at once
//! remote_grace = "60s"                 # a repair that must cross the DCI waits this long
//! probe_interval = "1s"                # how often each storage node is probed
//! down_after = "3s"                    # silence after which a node counts as down
//!
//! [metrics]
//! addr = "127.0.0.1:9100"              # optional: OpenMetrics on /metrics, and /health
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;

use crate::node::NodeConfig;
use crate::replication::{ReplicationConfig, RpoPolicy};
use crate::store::BackendKind;
use crate::topology::Topology;
use crate::transport::{LinkKind, TlsIdentity};
use crate::units;
use crate::wire::WriteMode;

/// Why a configuration file was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// TOML syntax, an unknown field, or a field of the wrong type.
    #[error("{path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What the parser said (with the line).
        message: String,
    },
    /// A field holds a value that cannot be used.
    #[error("{path}: field `{field}`: {message}")]
    Field {
        /// The file.
        path: PathBuf,
        /// The field, dotted (`dci.share`).
        field: &'static str,
        /// What is wrong.
        message: String,
    },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDci {
    #[serde(default = "one")]
    share: f64,
    #[serde(default = "yes")]
    compress: bool,
    classes: Option<RawClasses>,
    shares: Option<RawShares>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawShares {
    floor: Option<f64>,
    lease: Option<String>,
    period: Option<String>,
    #[serde(default)]
    spot: Vec<String>,
    #[serde(default)]
    tenants: Vec<RawTenant>,
}

/// `[[dci.shares.tenants]]`: fractions of each link's budget.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTenant {
    name: String,
    #[serde(default)]
    guarantee: f64,
    deserved: f64,
    capability: Option<f64>,
}

/// `[guaranteed %, ceiling %]` of the node's share, per class.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawClasses {
    sync: [u8; 2],
    read: [u8; 2],
    #[serde(rename = "async")]
    async_: [u8; 2],
    repair: [u8; 2],
}

/// An optional duration field (`"50ms"`, `"2min"`), or `default`.
fn duration(
    field: &dyn Fn(&'static str, String) -> ConfigError,
    name: &'static str,
    text: Option<String>,
    default: std::time::Duration,
) -> Result<std::time::Duration, ConfigError> {
    match text {
        Some(t) => units::parse_duration(&t).map_err(|e| field(name, e.to_string())),
        None => Ok(default),
    }
}

/// `[dci.shares]`, validated.
fn shares(
    raw: RawShares,
    field: &dyn Fn(&'static str, String) -> ConfigError,
) -> Result<crate::dci::SharesSettings, ConfigError> {
    let mut s = crate::dci::SharesSettings::default();
    if let Some(f) = raw.floor {
        if !(0.0..0.5).contains(&f) {
            return Err(field("dci.shares.floor", format!("{f} is not in [0, 0.5)")));
        }
        s.floor = f;
    }
    s.lease = duration(field, "dci.shares.lease", raw.lease, s.lease)?;
    s.period = duration(field, "dci.shares.period", raw.period, s.period)?;
    if s.period.is_zero() || s.lease < 2 * s.period {
        return Err(field(
            "dci.shares.period",
            format!(
                "{:?} must be positive and at most half the lease ({:?})",
                s.period, s.lease
            ),
        ));
    }
    for name in raw.spot {
        let class = crate::wire::TrafficClass::ALL
            .into_iter()
            .find(|c| c.name().eq_ignore_ascii_case(&name))
            .ok_or_else(|| {
                field(
                    "dci.shares.spot",
                    format!("{name:?}: expected sync, read, async or repair"),
                )
            })?;
        s.spot.push(class);
    }
    for t in raw.tenants {
        let capability = t.capability.unwrap_or(1.0);
        let ordered = 0.0 <= t.guarantee
            && t.guarantee <= t.deserved
            && t.deserved <= capability
            && capability <= 1.0;
        if !ordered {
            return Err(field(
                "dci.shares.tenants",
                format!(
                    "tenant {:?}: needs 0 <= guarantee ({}) <= deserved ({}) <= capability ({capability}) <= 1",
                    t.name, t.guarantee, t.deserved
                ),
            ));
        }
        if t.name.is_empty() || s.tenants.iter().any(|o| o.name == t.name) {
            return Err(field(
                "dci.shares.tenants",
                format!("tenant name {:?} is empty or given twice", t.name),
            ));
        }
        s.tenants.push(crate::dci::TenantShare {
            name: t.name,
            guarantee: t.guarantee,
            deserved: t.deserved,
            capability,
        });
    }
    let guaranteed: f64 = s.tenants.iter().map(|t| t.guarantee).sum();
    if guaranteed > 1.0 + 1e-9 {
        return Err(field(
            "dci.shares.tenants",
            format!("guarantees add up to {guaranteed}, more than the whole link (1)"),
        ));
    }
    Ok(s)
}

fn one() -> f64 {
    1.0
}
fn yes() -> bool {
    true
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawReplication {
    log_dir: PathBuf,
    max_lag_bytes: Option<String>,
    max_lag_age: Option<String>,
    #[serde(default = "warn_policy")]
    policy: RpoPolicy,
    workers: Option<usize>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRepair {
    log_dir: PathBuf,
    workers: Option<usize>,
    remote_grace: Option<String>,
    probe_interval: Option<String>,
    down_after: Option<String>,
}

/// `[repair]`, validated; `rel` resolves paths against the file's directory.
fn repair(
    raw: RawRepair,
    rel: &dyn Fn(&Path) -> PathBuf,
    field: &dyn Fn(&'static str, String) -> ConfigError,
) -> Result<crate::repair::RepairConfig, ConfigError> {
    let mut r = crate::repair::RepairConfig::new(rel(&raw.log_dir));
    if let Some(w) = raw.workers {
        if w == 0 {
            return Err(field("repair.workers", "must be at least 1".into()));
        }
        r.workers = w;
    }
    r.remote_grace = duration(
        field,
        "repair.remote_grace",
        raw.remote_grace,
        r.remote_grace,
    )?;
    r.probe_interval = duration(
        field,
        "repair.probe_interval",
        raw.probe_interval,
        r.probe_interval,
    )?;
    r.down_after = duration(field, "repair.down_after", raw.down_after, r.down_after)?;
    if r.probe_interval.is_zero() || r.down_after < 2 * r.probe_interval {
        return Err(field(
            "repair.down_after",
            format!(
                "{:?} must be at least two probe intervals ({:?})",
                r.down_after, r.probe_interval
            ),
        ));
    }
    Ok(r)
}

fn warn_policy() -> RpoPolicy {
    RpoPolicy::Warn
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMetrics {
    addr: String,
}

/// `[pipeline]`: admission of write pipelines through this node.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPipeline {
    max_writes: Option<usize>,
    admission_timeout: Option<String>,
    dci_min_rate: Option<toml::Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    name: String,
    topology: PathBuf,
    store_dir: PathBuf,
    #[serde(default)]
    store_backend: BackendKind,
    #[serde(default = "tcp")]
    intra_idc_link: LinkKind,
    #[serde(default = "sync_mode")]
    default_write_mode: String,
    tls: RawTls,
    dci: Option<RawDci>,
    replication: Option<RawReplication>,
    repair: Option<RawRepair>,
    pipeline: Option<RawPipeline>,
    metrics: Option<RawMetrics>,
}

fn tcp() -> LinkKind {
    LinkKind::TcpTls
}
fn sync_mode() -> String {
    "sync".into()
}

/// A validated daemon configuration.
#[derive(Debug)]
pub struct DaemonConfig {
    /// What the node runs with.
    pub node: NodeConfig,
    /// Where `/metrics` is served, if anywhere.
    pub metrics_addr: Option<SocketAddr>,
    /// Write mode for clients that do not choose.
    pub default_write_mode: WriteMode,
}

impl DaemonConfig {
    /// Reads and validates a configuration file.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_toml_str(&text, path)
    }

    /// Parses and validates configuration text; relative paths resolve against the
    /// directory of `path`.
    pub fn from_toml_str(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let file = path.to_path_buf();
        let raw: RawConfig = toml::from_str(text).map_err(|e| {
            let line = e
                .span()
                .map(|s| text[..s.start.min(text.len())].matches('\n').count() + 1);
            ConfigError::Parse {
                path: file.clone(),
                message: match line {
                    Some(l) => format!("line {l}: {}", e.message()),
                    None => e.message().to_string(),
                },
            }
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        let rel = |p: &Path| {
            if p.is_absolute() {
                p.to_path_buf()
            } else {
                base.join(p)
            }
        };
        let field = |field: &'static str, message: String| ConfigError::Field {
            path: file.clone(),
            field,
            message,
        };
        let topology = Topology::from_file(rel(&raw.topology))
            .map_err(|e| field("topology", e.to_string()))?;
        if topology.node_by_name(&raw.name).is_none() {
            return Err(field(
                "name",
                format!("{:?} is not a node of the topology", raw.name),
            ));
        }
        let identity =
            TlsIdentity::from_pem_files(&rel(&raw.tls.ca), &rel(&raw.tls.cert), &rel(&raw.tls.key))
                .map_err(|e| field("tls", e.to_string()))?;
        let default_write_mode = match raw.default_write_mode.as_str() {
            "sync" => WriteMode::Sync,
            "async" => WriteMode::Async,
            other => {
                return Err(field(
                    "default_write_mode",
                    format!("{other:?}: expected sync or async"),
                ));
            }
        };
        let mut node = NodeConfig::new(raw.name, Arc::new(topology), identity, rel(&raw.store_dir));
        node.store.backend = raw.store_backend;
        node.transport.intra_idc = raw.intra_idc_link;
        if let Some(d) = raw.dci {
            if !(d.share > 0.0 && d.share <= 1.0) {
                return Err(field("dci.share", format!("{} is not in (0, 1]", d.share)));
            }
            node.dci.share = d.share;
            node.dci.compress = d.compress;
            if let Some(c) = d.classes {
                let all = [c.sync, c.read, c.async_, c.repair];
                let sum: u32 = all.iter().map(|x| u32::from(x[0])).sum();
                if sum > 100 || all.iter().any(|x| x[0] > x[1] || x[1] > 100 || x[1] == 0) {
                    return Err(field(
                        "dci.classes",
                        format!(
                            "each [rate %, ceil %] needs rate <= ceil <= 100 and ceil > 0, rates summing to <= 100; got {all:?}"
                        ),
                    ));
                }
                node.dci.classes = Some(all.map(|x| (x[0], x[1])));
            }
            if let Some(sh) = d.shares {
                let sh = shares(sh, &field)?;
                // A tenant the topology names must have a quota here (a typo would
                // otherwise put its nodes in no tenant without a word).
                if !sh.tenants.is_empty()
                    && let Some(n) = node.topology.nodes().iter().find(|n| {
                        n.tenant
                            .as_ref()
                            .is_some_and(|t| !sh.tenants.iter().any(|q| &q.name == t))
                    })
                {
                    return Err(field(
                        "dci.shares.tenants",
                        format!(
                            "node {:?} of the topology is in tenant {:?}, which has no quota here",
                            n.name,
                            n.tenant.as_deref().unwrap_or_default()
                        ),
                    ));
                }
                node.dci.shares = Some(sh);
            }
        }
        if let Some(r) = raw.replication {
            let mut rc = ReplicationConfig::new(rel(&r.log_dir));
            rc.policy = r.policy;
            if let Some(b) = r.max_lag_bytes {
                rc.max_lag_bytes = Some(
                    units::parse_bytes(&b)
                        .map_err(|e| field("replication.max_lag_bytes", e.to_string()))?,
                );
            }
            if let Some(a) = r.max_lag_age {
                rc.max_lag_age = Some(
                    units::parse_duration(&a)
                        .map_err(|e| field("replication.max_lag_age", e.to_string()))?,
                );
            }
            if let Some(w) = r.workers {
                if w == 0 {
                    return Err(field("replication.workers", "must be at least 1".into()));
                }
                rc.workers = w;
            }
            node.replication = Some(rc);
        } else if default_write_mode == WriteMode::Async {
            return Err(field(
                "default_write_mode",
                "async needs a [replication] section".into(),
            ));
        }
        if let Some(r) = raw.repair {
            node.repair = Some(repair(r, &rel, &field)?);
        }
        if let Some(p) = raw.pipeline {
            let pc = &mut node.pipeline;
            if let Some(m) = p.max_writes {
                if m == 0 {
                    return Err(field("pipeline.max_writes", "must be at least 1".into()));
                }
                pc.max_writes = m;
            }
            pc.admission_timeout = duration(
                &field,
                "pipeline.admission_timeout",
                p.admission_timeout,
                pc.admission_timeout,
            )?;
            if let Some(v) = p.dci_min_rate {
                pc.dci_min_rate = match &v {
                    toml::Value::Integer(i) if *i >= 0 => *i as u64,
                    toml::Value::String(t) => units::parse_rate(t)
                        .map_err(|e| field("pipeline.dci_min_rate", e.to_string()))?,
                    other => {
                        return Err(field(
                            "pipeline.dci_min_rate",
                            format!("{other} is not a rate (bytes/s, or \"2MB/s\"; 0: off)"),
                        ));
                    }
                };
            }
        }
        let metrics_addr = match raw.metrics {
            Some(m) => Some(
                m.addr
                    .parse()
                    .map_err(|_| field("metrics.addr", format!("{:?} is not ip:port", m.addr)))?,
            ),
            None => None,
        };
        Ok(DaemonConfig {
            node,
            metrics_addr,
            default_write_mode,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fixture {
        dir: tempfile::TempDir,
    }

    fn fixture() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("topology.toml"),
            "[[idc]]\nname = \"a\"\n[[node]]\nname = \"n1\"\nlocation = \"/a/r\"\naddr = \"127.0.0.1:7000\"\n",
        )
        .unwrap();
        crate::transport::CertAuthority::generate("t")
            .unwrap()
            .write_files(&dir.path().join("certs"), ["n1"])
            .unwrap();
        Fixture { dir }
    }

    const GOOD: &str = r#"
name = "n1"
topology = "topology.toml"
store_dir = "data"
[tls]
ca = "certs/ca.pem"
cert = "certs/n1.pem"
key = "certs/n1.key"
[dci]
share = 0.5
classes = { sync = [50, 100], read = [20, 100], async = [20, 80], repair = [10, 30] }
[replication]
log_dir = "log"
max_lag_bytes = "1GiB"
policy = "block"
[repair]
log_dir = "repair"
remote_grace = "2min"
[metrics]
addr = "127.0.0.1:9100"
"#;

    fn parse(f: &Fixture, text: &str) -> Result<DaemonConfig, ConfigError> {
        DaemonConfig::from_toml_str(text, &f.dir.path().join("node.toml"))
    }

    #[test]
    fn good_config() {
        let f = fixture();
        let c = parse(&f, GOOD).unwrap();
        assert_eq!(c.node.name, "n1");
        assert_eq!(c.node.dci.share, 0.5);
        assert_eq!(
            c.node.dci.classes,
            Some([(50, 100), (20, 100), (20, 80), (10, 30)])
        );
        assert_eq!(c.node.store.root, f.dir.path().join("data"));
        let r = c.node.replication.unwrap();
        assert_eq!(
            (r.max_lag_bytes, r.policy),
            (Some(1 << 30), RpoPolicy::Block)
        );
        assert_eq!(c.metrics_addr, Some("127.0.0.1:9100".parse().unwrap()));
        let rep = c.node.repair.unwrap();
        assert_eq!(rep.log_dir, f.dir.path().join("repair"));
        assert_eq!(rep.remote_grace, std::time::Duration::from_secs(120));
        assert_eq!(rep.workers, 2);
        assert_eq!(c.node.dci.shares, None);
        let shared = format!("{GOOD}\n[dci.shares]\nlease = \"3s\"\nspot = [\"repair\"]\n");
        let s = parse(&f, &shared).unwrap().node.dci.shares.unwrap();
        assert_eq!(s.lease, std::time::Duration::from_secs(3));
        assert_eq!(s.spot, vec![crate::wire::TrafficClass::Repair]);
        assert_eq!(s.floor, 0.02);
        let tenants = format!(
            "{GOOD}\n[dci.shares]\n[[dci.shares.tenants]]\nname = \"gold\"\nguarantee = 0.3\ndeserved = 0.6\n\
             [[dci.shares.tenants]]\nname = \"bronze\"\ndeserved = 0.2\ncapability = 0.5\n"
        );
        let s = parse(&f, &tenants).unwrap().node.dci.shares.unwrap();
        assert_eq!(s.tenants.len(), 2);
        assert_eq!(
            (s.tenants[0].guarantee, s.tenants[0].capability),
            (0.3, 1.0)
        );
        assert_eq!(s.tenants[1].quota(1000).capability, 500);
    }

    #[test]
    fn pipeline_admission_is_configured_and_checked() {
        let f = fixture();
        let text = format!(
            "{GOOD}\n[pipeline]\nmax_writes = 8\nadmission_timeout = \"5s\"\ndci_min_rate = \"4MB/s\"\n"
        );
        let p = parse(&f, &text).unwrap().node.pipeline;
        assert_eq!(
            (p.max_writes, p.admission_timeout, p.dci_min_rate),
            (8, std::time::Duration::from_secs(5), 4_000_000)
        );
        let off = format!("{GOOD}\n[pipeline]\ndci_min_rate = 0\n");
        assert_eq!(parse(&f, &off).unwrap().node.pipeline.dci_min_rate, 0);
        for (text, name) in [
            (
                format!("{GOOD}\n[pipeline]\nmax_writes = 0\n"),
                "`pipeline.max_writes`",
            ),
            (
                format!("{GOOD}\n[pipeline]\ndci_min_rate = \"fast\"\n"),
                "`pipeline.dci_min_rate`",
            ),
            (
                format!("{GOOD}\n[pipeline]\ndci_min_rate = -1\n"),
                "`pipeline.dci_min_rate`",
            ),
        ] {
            let e = parse(&f, &text).unwrap_err().to_string();
            assert!(e.contains(name), "{e}");
        }
    }

    #[test]
    fn tenants_are_checked_against_each_other_and_the_topology() {
        let f = fixture();
        let shares = |t: &str| format!("{GOOD}\n[dci.shares]\n{t}");
        let tenant = |name: &str, g: f64, d: f64| {
            format!("[[dci.shares.tenants]]\nname = \"{name}\"\nguarantee = {g}\ndeserved = {d}\n")
        };
        for (text, says) in [
            (
                shares(&tenant("a", 0.5, 0.4)),
                "guarantee (0.5) <= deserved (0.4)",
            ),
            (
                shares(&(tenant("a", 0.1, 0.2) + &tenant("a", 0.1, 0.2))),
                "given twice",
            ),
            (
                shares(&(tenant("a", 0.6, 0.6) + &tenant("b", 0.6, 0.6))),
                "more than the whole link",
            ),
        ] {
            let e = parse(&f, &text).unwrap_err().to_string();
            assert!(e.contains("dci.shares.tenants") && e.contains(says), "{e}");
        }
        // The topology puts n1 in "gold", which has no quota here.
        std::fs::write(
            f.dir.path().join("tenants.toml"),
            "[[idc]]\nname = \"a\"\n[[node]]\nname = \"n1\"\nlocation = \"/a/r\"\naddr = \"127.0.0.1:7000\"\ntenant = \"gold\"\n",
        )
        .unwrap();
        let text = shares(&tenant("silver", 0.1, 0.2)).replace("topology.toml", "tenants.toml");
        let e = parse(&f, &text).unwrap_err().to_string();
        assert!(e.contains("\"n1\"") && e.contains("\"gold\""), "{e}");
        let text = shares(&tenant("gold", 0.1, 0.2)).replace("topology.toml", "tenants.toml");
        assert!(parse(&f, &text).is_ok());
    }

    #[test]
    fn bad_configs_name_the_field() {
        let f = fixture();
        let cases = [
            (GOOD.replace("name = \"n1\"", "name = \"zz\""), "`name`"),
            (GOOD.replace("share = 0.5", "share = 1.5"), "`dci.share`"),
            (
                GOOD.replace("sync = [50, 100]", "sync = [60, 100]"),
                "`dci.classes`",
            ),
            (
                GOOD.replace("\"1GiB\"", "\"lots\""),
                "`replication.max_lag_bytes`",
            ),
            (
                GOOD.replace("127.0.0.1:9100", "localhost"),
                "`metrics.addr`",
            ),
            (GOOD.replace("certs/n1.key", "certs/nope.key"), "`tls`"),
            (GOOD.replace("topology.toml", "missing.toml"), "`topology`"),
            (
                GOOD.replace("policy = \"block\"", "policy = \"panic\""),
                "line 15",
            ),
            (
                GOOD.replace("[dci]", "[dci]\nshare_all = 1"),
                "unknown field",
            ),
            (
                format!("{GOOD}\n[dci.shares]\nfloor = 0.7\n"),
                "`dci.shares.floor`",
            ),
            (
                format!("{GOOD}\n[dci.shares]\nspot = [\"bulk\"]\n"),
                "`dci.shares.spot`",
            ),
            (
                format!("{GOOD}\n[dci.shares]\nlease = \"1s\"\nperiod = \"900ms\"\n"),
                "`dci.shares.period`",
            ),
            (GOOD.replace("store_dir = \"data\"\n", ""), "store_dir"),
            (
                GOOD.replace("remote_grace = \"2min\"", "remote_grace = \"soon\""),
                "`repair.remote_grace`",
            ),
            (
                GOOD.replace("remote_grace = \"2min\"", "probe_interval = \"5s\""),
                "`repair.down_after`",
            ),
            (
                GOOD.replace("remote_grace = \"2min\"", "workers = 0"),
                "`repair.workers`",
            ),
        ];
        for (text, want) in cases {
            let e = parse(&f, &text).unwrap_err().to_string();
            assert!(e.contains(want), "expected {want:?} in: {e}");
        }
    }
}

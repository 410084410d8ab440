//! A node's metrics as a `prometheus-client` collector, so that a storage server that
//! links strait exposes them on its own endpoint: [`register`] adds them to the server's
//! [`Registry`] under the `strait_` prefix. The daemon's `/metrics` is the same collector
//! in a registry of its own ([`render`]).
//!
//! Values are read from the node's counters when the registry is encoded (a scrape):
//! nothing is copied in between, and a scrape does not copy the replica index (the store
//! counts replicas by state under its lock). Series carry no `node` label: the scraper's
//! `instance` label says which node it is. Latencies are histograms with fixed buckets
//! (seconds), built from the node's hdrhistogram at scrape time, so they aggregate across
//! nodes. Every family is listed in `docs/METRICS.md`.

use std::borrow::Cow;
use std::sync::atomic::Ordering;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::registry::Registry;

use crate::dci::governor::CLASSES;
use crate::metrics::{LatencyHistogram, TierCounters};
use crate::node::Node;
use crate::topology::Tier;

/// Adds `node`'s metrics to `registry`, named `strait_…` (below any prefix the registry
/// has). Register each node once.
pub fn register(registry: &mut Registry, node: &Node) {
    registry
        .sub_registry_with_prefix("strait")
        .register_collector(Box::new(NodeCollector(node.clone())));
}

/// `node`'s metrics in the OpenMetrics text format, as the daemon's `/metrics` serves
/// them.
pub fn render(node: &Node) -> String {
    let mut registry = Registry::default();
    register(&mut registry, node);
    let mut out = String::with_capacity(8192);
    // Writing into a String cannot fail, and no family's encoding fails on its own.
    let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
    out
}

/// The content type of [`render`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Upper bounds (seconds) of the latency histograms' buckets; `+Inf` follows.
pub const LATENCY_BUCKETS: [f64; 16] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

#[derive(Debug)]
struct NodeCollector(Node);

type Labels<'a> = Vec<(&'static str, Cow<'a, str>)>;
type Result = std::result::Result<(), std::fmt::Error>;

fn counters<'a>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    samples: impl IntoIterator<Item = (Labels<'a>, u64)>,
) -> Result {
    let mut m = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (labels, v) in samples {
        ConstCounter::new(v).encode(m.encode_family(&labels)?)?;
    }
    Ok(())
}

fn counter(enc: &mut DescriptorEncoder, name: &str, help: &str, v: u64) -> Result {
    let c = ConstCounter::new(v);
    c.encode(enc.encode_descriptor(name, help, None, c.metric_type())?)
}

fn gauges<'a, V: prometheus_client::encoding::EncodeGaugeValue + Copy>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    samples: impl IntoIterator<Item = (Labels<'a>, V)>,
) -> Result {
    let mut m = enc.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (labels, v) in samples {
        m.encode_family(&labels)?.encode_gauge(&v)?;
    }
    Ok(())
}

fn gauge<V: prometheus_client::encoding::EncodeGaugeValue + Copy>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    v: V,
) -> Result {
    enc.encode_descriptor(name, help, None, MetricType::Gauge)?
        .encode_gauge(&v)
}

fn tiers(enc: &mut DescriptorEncoder, name: &str, help: &str, c: &TierCounters) -> Result {
    counters(
        enc,
        name,
        help,
        Tier::ALL.map(|t| (vec![("tier", esc(t.name()))], c.get(t))),
    )
}

/// Per-bucket (not cumulative) counts of `h` over [`LATENCY_BUCKETS`] and `+Inf`, with
/// its sum in seconds.
fn buckets(h: &LatencyHistogram) -> (f64, u64, Vec<(f64, u64)>) {
    let h = h.snapshot();
    let mut out: Vec<(f64, u64)> = LATENCY_BUCKETS
        .iter()
        .map(|&b| (b, 0))
        .chain(std::iter::once((f64::MAX, 0)))
        .collect();
    for v in h.iter_recorded() {
        let secs = v.value_iterated_to() as f64 / 1e6;
        let i = LATENCY_BUCKETS
            .iter()
            .position(|&b| secs <= b)
            .unwrap_or(LATENCY_BUCKETS.len());
        out[i].1 += v.count_at_value();
    }
    // hdrhistogram keeps no exact sum: mean × count, within its 3 significant digits.
    (h.mean() * h.len() as f64 / 1e6, h.len(), out)
}

fn histogram(enc: &mut DescriptorEncoder, name: &str, help: &str, h: &LatencyHistogram) -> Result {
    let (sum, count, b) = buckets(h);
    enc.encode_descriptor(name, help, None, MetricType::Histogram)?
        .encode_histogram::<prometheus_client::encoding::NoLabelSet>(sum, count, &b, None)
}

/// A label value as the text format wants it: backslash, double quote and newline
/// escaped (topology names may hold any of them but `/` and whitespace; the encoder
/// writes values as given).
fn esc(v: &str) -> Cow<'_, str> {
    if !v.contains(['\\', '"', '\n']) {
        return Cow::Borrowed(v);
    }
    let mut out = String::with_capacity(v.len() + 4);
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

impl Collector for NodeCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result {
        let node = &self.0;
        let topo = node.topology();
        let m = node.metrics();
        let e = &mut enc;
        tiers(
            e,
            "read_bytes",
            "Block bytes read by this node's readers, by tier of the replica",
            &m.read_bytes,
        )?;
        tiers(
            e,
            "served_bytes",
            "Block bytes this node served to readers, by tier of the reader",
            &m.served_bytes,
        )?;
        tiers(
            e,
            "pipeline_sent_bytes",
            "Packet bytes sent down write pipelines, by tier of the hop",
            &m.pipeline_sent_bytes,
        )?;
        tiers(
            e,
            "pipeline_received_bytes",
            "Packet bytes received from upstream, by tier of the hop",
            &m.pipeline_received_bytes,
        )?;
        let peers = m.peers.snapshot();
        counters(
            e,
            "peer_bytes",
            "Block bytes exchanged with each peer",
            peers.iter().flat_map(|&(peer, received, sent)| {
                let pn = topo.node(peer).name.as_str();
                [
                    (vec![("peer", esc(pn)), ("direction", esc("in"))], received),
                    (vec![("peer", esc(pn)), ("direction", esc("out"))], sent),
                ]
            }),
        )?;
        counter(
            e,
            "dci_wire_bytes",
            "Bytes sent across the DCI as they went on the wire",
            m.dci_wire_bytes.load(Ordering::Relaxed),
        )?;
        counter(
            e,
            "write_busy_refusals",
            "Pipeline setups refused for want of a free write slot",
            m.write_busy_refusals.load(Ordering::Relaxed),
        )?;
        counter(
            e,
            "dci_busy_refusals",
            "Sync pipeline setups refused for want of a free DCI slot on the link they cross",
            m.dci_busy_refusals.load(Ordering::Relaxed),
        )?;
        counter(
            e,
            "dci_compression_saved_bytes",
            "Bytes zstd saved on DCI hops",
            m.dci_saved_bytes.load(Ordering::Relaxed),
        )?;
        let governors = node.governors();
        let links: Vec<(&str, &crate::dci::DciGovernor)> = governors
            .iter()
            .map(|(idc, g)| (topo.idc(idc).name.as_str(), g))
            .collect();
        let per_class = |f: fn(&crate::dci::governor::ClassStats) -> u64| {
            links.iter().flat_map(move |&(to, g)| {
                CLASSES.map(|c| {
                    let labels = vec![("to", esc(to)), ("class", esc(c.name()))];
                    (labels, f(&g.stats(c)))
                })
            })
        };
        gauges(
            e,
            "dci_queued_bytes",
            "Bytes waiting in a DCI governor",
            per_class(|s| s.queued_bytes),
        )?;
        counters(
            e,
            "dci_granted_bytes",
            "Bytes a DCI governor admitted",
            per_class(|s| s.granted_bytes),
        )?;
        gauges(
            e,
            "dci_rate_bytes_per_second",
            "The rate a DCI governor runs at now (a static share, or the leased grant)",
            links
                .iter()
                .map(|&(to, g)| (vec![("to", esc(to))], g.config().rate)),
        )?;
        let shares: Vec<(&str, crate::bandwidth::LinkShare)> = governors
            .iter()
            .filter_map(|(idc, _)| Some((topo.idc(idc).name.as_str(), node.dci_share(idc)?)))
            .collect();
        if !shares.is_empty() {
            type Field = fn(&crate::bandwidth::LinkShare) -> u64;
            let by_link = |f: Field| {
                shares
                    .iter()
                    .map(move |(to, l)| (vec![("to", esc(to))], f(l)))
            };
            gauges(
                e,
                "dci_share_floor_bytes_per_second",
                "What this node may send on the link with no grant",
                by_link(|l| l.floor),
            )?;
            gauges(
                e,
                "dci_share_demand_bytes_per_second",
                "The demand this node reported last",
                by_link(|l| l.demand),
            )?;
            gauges(
                e,
                "dci_share_leased",
                "1 while a grant's lease runs, 0 at the floor",
                by_link(|l| u64::from(l.leased)),
            )?;
            counters(
                e,
                "dci_share_failed_reports",
                "Demand reports that got no grant",
                by_link(|l| l.failed_reports),
            )?;
        }
        histogram(
            e,
            "pipeline_ack_seconds",
            "Packet ack latency seen by writers on this node",
            &m.pipeline_ack_us,
        )?;
        histogram(
            e,
            "read_seconds",
            "Read latency seen by readers on this node",
            &m.read_us,
        )?;
        if let Some(r) = node.repair_status() {
            tiers(
                e,
                "repair_bytes",
                "Block bytes this node's repairs copied, by tier of the hop",
                &m.repair_bytes,
            )?;
            gauge(
                e,
                "repair_queue_depth",
                "Repairs queued and not done (blocks this node knows under-replicated and owes)",
                r.pending as u64,
            )?;
            gauge(
                e,
                "under_replicated_bytes",
                "Bytes of the blocks waiting in the repair queue",
                r.pending_bytes,
            )?;
            gauge(
                e,
                "peers_down",
                "Storage nodes this node counts as down",
                r.down.len() as u64,
            )?;
            counter(
                e,
                "repairs",
                "Repairs finished (block back at its replica count)",
                m.repairs_done.load(Ordering::Relaxed),
            )?;
            histogram(
                e,
                "repair_restore_seconds",
                "Time from a loss queued for repair to its block restored",
                &m.repair_restore_us,
            )?;
        }
        gauge(
            e,
            "topology_nodes",
            "Nodes in service in the topology in force (changes when a reload is applied)",
            topo.node_ids().count() as u64,
        )?;
        if let Some(t) = node.transport().certificate_expiry() {
            let secs = t
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            gauge(
                e,
                "tls_certificate_expiry_timestamp_seconds",
                "When the certificate this node presents expires (Unix time)",
                secs,
            )?;
        }
        let store = node.store();
        let backend = store.backend().to_string();
        let direct = store.direct_io().to_string();
        enc.encode_descriptor("store", "Store backend", None, MetricType::Info)?
            .encode_info(&vec![
                ("backend", esc(&backend)),
                ("direct_io", esc(&direct)),
            ])?;
        let e = &mut enc;
        if let Some(free) = store.free_bytes() {
            gauge(
                e,
                "store_free_bytes",
                "Free space on the store's filesystem",
                free,
            )?;
        }
        let counts = store.counts();
        gauges(
            e,
            "replicas",
            "Replicas held, by state",
            [
                ("finalized", counts.finalized),
                ("rbw", counts.rbw),
                ("corrupt", counts.corrupt),
            ]
            .map(|(state, n)| (vec![("state", esc(state))], n as u64)),
        )?;
        if let Ok(r) = node.rpo() {
            gauge(
                e,
                "replication_pending_tasks",
                "Async blocks not yet in the remote IDC",
                r.pending_tasks,
            )?;
            gauge(
                e,
                "replication_pending_bytes",
                "Bytes not yet in the remote IDC (RPO in bytes)",
                r.pending_bytes,
            )?;
            gauge(
                e,
                "replication_lag_seconds",
                "Age of the oldest pending task (RPO in time)",
                r.oldest_age.as_secs_f64(),
            )?;
            counter(
                e,
                "replication_drained_bytes",
                "Bytes copied to the remote IDC",
                r.drained_bytes,
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::esc;

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(esc("a1"), "a1");
        assert_eq!(esc(r#"a"1\x"#), r#"a\"1\\x"#);
        assert_eq!(esc("a\nb"), "a\\nb");
    }
}

//! A node's counters: block bytes by distance tier and by peer, DCI bytes on the wire and
//! saved by compression, and latency histograms. The services below the node count into
//! them as they work; exposing them (Prometheus text on `/metrics`) is the daemon's job,
//! see the `daemon` module.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::topology::{NodeId, Tier};

/// Byte counters by distance tier (index: [`Tier`] as usize).
#[derive(Debug, Default)]
pub struct TierCounters([AtomicU64; 4]);

impl TierCounters {
    /// Adds `n` bytes at `tier`.
    pub fn add(&self, tier: Tier, n: u64) {
        self.0[tier as usize].fetch_add(n, Ordering::Relaxed);
    }

    /// Bytes counted at `tier`.
    pub fn get(&self, tier: Tier) -> u64 {
        self.0[tier as usize].load(Ordering::Relaxed)
    }
}

/// Counters of a node.
#[derive(Debug, Default)]
pub struct NodeMetrics {
    /// Block bytes this node's clients read, by the tier of the replica they came from
    /// (as they crossed the network: compressed size for compressed packets).
    pub read_bytes: TierCounters,
    /// Block bytes this node served to readers, by the tier of the reader.
    pub served_bytes: TierCounters,
    /// Packet payload bytes this node sent down write pipelines, by tier of the hop.
    pub pipeline_sent_bytes: TierCounters,
    /// Packet payload bytes this node received from upstream in write pipelines, as they
    /// came off the wire (compressed or not), by tier of the hop.
    pub pipeline_received_bytes: TierCounters,
    /// Bytes this node sent across the DCI as they went on the wire (after compression).
    pub dci_wire_bytes: AtomicU64,
    /// Bytes compression saved on DCI hops.
    pub dci_saved_bytes: AtomicU64,
    /// Pipeline setups this node refused for want of a free write slot.
    pub write_busy_refusals: AtomicU64,
    /// Sync pipeline setups this node refused for want of a free DCI slot on the link
    /// it would forward across.
    pub dci_busy_refusals: AtomicU64,
    /// Repairs this node ran: block bytes copied to new replicas, by the tier each
    /// copy hop crossed.
    pub repair_bytes: TierCounters,
    /// Repairs this node finished (the block back at its replica count), with or without
    /// copying.
    pub repairs_done: AtomicU64,
    /// Time from a loss being queued for repair to the block restored, µs.
    pub repair_restore_us: LatencyHistogram,
    /// Latency of packet acks seen by writers on this node, µs.
    pub pipeline_ack_us: LatencyHistogram,
    /// Latency of reads by readers on this node, µs.
    pub read_us: LatencyHistogram,
    /// Block bytes exchanged with each peer: (received, sent).
    pub peers: PeerCounters,
}

/// Block bytes received from and sent to each peer.
#[derive(Debug, Default)]
pub struct PeerCounters(std::sync::Mutex<HashMap<NodeId, (u64, u64)>>);

impl PeerCounters {
    /// Counts `n` bytes received from `peer`.
    pub fn received(&self, peer: NodeId, n: u64) {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(peer)
            .or_default()
            .0 += n;
    }

    /// Counts `n` bytes sent to `peer`.
    pub fn sent(&self, peer: NodeId, n: u64) {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(peer)
            .or_default()
            .1 += n;
    }

    /// (received, sent) per peer.
    pub fn snapshot(&self) -> Vec<(NodeId, u64, u64)> {
        let mut v: Vec<_> = self
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(&p, &(r, s))| (p, r, s))
            .collect();
        v.sort();
        v
    }
}

/// A shared latency histogram in microseconds (1 µs to 10 min).
#[derive(Debug)]
pub struct LatencyHistogram(std::sync::Mutex<hdrhistogram::Histogram<u64>>);

impl Default for LatencyHistogram {
    fn default() -> Self {
        LatencyHistogram(std::sync::Mutex::new(
            hdrhistogram::Histogram::new_with_bounds(1, 600_000_000, 3)
                .expect("valid histogram bounds"),
        ))
    }
}

impl LatencyHistogram {
    /// Records one latency.
    pub fn record(&self, d: Duration) {
        let us = (d.as_micros() as u64).clamp(1, 600_000_000);
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .saturating_record(us);
    }

    /// A copy of the histogram.
    pub fn snapshot(&self) -> hdrhistogram::Histogram<u64> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

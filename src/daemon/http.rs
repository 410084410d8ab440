//! The daemon's HTTP endpoint: `GET /metrics` answers with the node's counters in the
//! Prometheus text format, `GET /health` with `ok pid <process id>`.
//!
//! Exposed: block bytes per distance tier (read, served, pipeline in/out), DCI bytes on
//! the wire and saved by compression, each DCI governor's queue and granted bytes per
//! class, pipeline-ack and read latency percentiles (from hdrhistogram), the store's
//! backend and free space, and the replication backlog (RPO).

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::dci::governor::CLASSES;
use crate::metrics::{LatencyHistogram, TierCounters};
use crate::node::Node;
use crate::topology::Tier;

fn class_name(c: crate::wire::TrafficClass) -> &'static str {
    match c {
        crate::wire::TrafficClass::Sync => "sync",
        crate::wire::TrafficClass::Read => "read",
        crate::wire::TrafficClass::Async => "async",
        crate::wire::TrafficClass::Repair => "repair",
    }
}

/// A label value as the text format wants it: backslash, double quote and newline
/// escaped (topology names may hold any of them but `/` and whitespace).
fn label(v: &str) -> std::borrow::Cow<'_, str> {
    if !v.contains(['\\', '"', '\n']) {
        return std::borrow::Cow::Borrowed(v);
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
    std::borrow::Cow::Owned(out)
}

fn tiers(out: &mut String, name: &str, help: &str, node: &str, c: &TierCounters) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
    for t in Tier::ALL {
        let _ = writeln!(
            out,
            "{name}{{node=\"{node}\",tier=\"{}\"}} {}",
            t.name(),
            c.get(t)
        );
    }
}

fn summary(out: &mut String, name: &str, help: &str, node: &str, h: &LatencyHistogram) {
    let h = h.snapshot();
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} summary");
    for q in [0.5, 0.9, 0.99, 0.999] {
        let _ = writeln!(
            out,
            "{name}{{node=\"{node}\",quantile=\"{q}\"}} {}",
            h.value_at_quantile(q) as f64 / 1e6
        );
    }
    // hdrhistogram keeps no exact sum: mean × count, within its 3 significant digits.
    let _ = writeln!(
        out,
        "{name}_sum{{node=\"{node}\"}} {}",
        h.mean() * h.len() as f64 / 1e6
    );
    let _ = writeln!(out, "{name}_count{{node=\"{node}\"}} {}", h.len());
}

/// Renders every metric of `node` in the Prometheus text format.
pub fn render(node: &Node) -> String {
    let mut out = String::with_capacity(4096);
    let name = label(&node.topology().node(node.id()).name).into_owned();
    let m = node.metrics();
    tiers(
        &mut out,
        "strait_read_bytes_total",
        "Block bytes read by this node's readers, by tier of the replica.",
        &name,
        &m.read_bytes,
    );
    tiers(
        &mut out,
        "strait_served_bytes_total",
        "Block bytes this node served to readers, by tier of the reader.",
        &name,
        &m.served_bytes,
    );
    tiers(
        &mut out,
        "strait_pipeline_sent_bytes_total",
        "Packet bytes sent down write pipelines, by tier of the hop.",
        &name,
        &m.pipeline_sent_bytes,
    );
    tiers(
        &mut out,
        "strait_pipeline_received_bytes_total",
        "Packet bytes received from upstream, by tier of the hop.",
        &name,
        &m.pipeline_received_bytes,
    );
    let _ = writeln!(
        out,
        "# HELP strait_peer_bytes_total Block bytes exchanged with each peer.\n# TYPE strait_peer_bytes_total counter"
    );
    for (peer, received, sent) in m.peers.snapshot() {
        let pn = label(&node.topology().node(peer).name);
        let _ = writeln!(
            out,
            "strait_peer_bytes_total{{node=\"{name}\",peer=\"{pn}\",direction=\"in\"}} {received}"
        );
        let _ = writeln!(
            out,
            "strait_peer_bytes_total{{node=\"{name}\",peer=\"{pn}\",direction=\"out\"}} {sent}"
        );
    }
    let _ = writeln!(
        out,
        "# HELP strait_dci_wire_bytes_total Bytes sent across the DCI as they went on the wire.\n# TYPE strait_dci_wire_bytes_total counter\nstrait_dci_wire_bytes_total{{node=\"{name}\"}} {}",
        m.dci_wire_bytes.load(Ordering::Relaxed)
    );
    let _ = writeln!(
        out,
        "# HELP strait_write_busy_refusals_total Pipeline setups refused for want of a free write slot.\n# TYPE strait_write_busy_refusals_total counter\nstrait_write_busy_refusals_total{{node=\"{name}\"}} {}",
        m.write_busy_refusals.load(Ordering::Relaxed)
    );
    let _ = writeln!(
        out,
        "# HELP strait_dci_compression_saved_bytes_total Bytes zstd saved on DCI hops.\n# TYPE strait_dci_compression_saved_bytes_total counter\nstrait_dci_compression_saved_bytes_total{{node=\"{name}\"}} {}",
        m.dci_saved_bytes.load(Ordering::Relaxed)
    );
    let _ = writeln!(
        out,
        "# HELP strait_dci_queued_bytes Bytes waiting in a DCI governor.\n# TYPE strait_dci_queued_bytes gauge"
    );
    let mut granted = String::new();
    for (idc, g) in node.governors().iter() {
        let to = label(&node.topology().idc(idc).name);
        for c in CLASSES {
            let s = g.stats(c);
            let _ = writeln!(
                out,
                "strait_dci_queued_bytes{{node=\"{name}\",to=\"{to}\",class=\"{}\"}} {}",
                class_name(c),
                s.queued_bytes
            );
            let _ = writeln!(
                granted,
                "strait_dci_granted_bytes_total{{node=\"{name}\",to=\"{to}\",class=\"{}\"}} {}",
                class_name(c),
                s.granted_bytes
            );
        }
    }
    let _ = writeln!(
        out,
        "# HELP strait_dci_granted_bytes_total Bytes a DCI governor admitted.\n# TYPE strait_dci_granted_bytes_total counter\n{granted}"
    );
    // The governor's rate now, and with cluster-wide shares, the lease behind it.
    let mut rate = String::new();
    for (idc, g) in node.governors().iter() {
        let to = label(&node.topology().idc(idc).name);
        let _ = writeln!(
            rate,
            "strait_dci_rate_bytes_per_second{{node=\"{name}\",to=\"{to}\"}} {}",
            g.config().rate
        );
    }
    let _ = writeln!(
        out,
        "# HELP strait_dci_rate_bytes_per_second The rate a DCI governor runs at now (a static share, or the leased grant).\n# TYPE strait_dci_rate_bytes_per_second gauge\n{rate}"
    );
    let shares: Vec<_> = node
        .governors()
        .iter()
        .filter_map(|(idc, _)| Some((node.topology().idc(idc).name.clone(), node.dci_share(idc)?)))
        .collect();
    type Field = fn(&crate::bandwidth::LinkShare) -> u64;
    let families: [(&str, &str, &str, Field); 4] = [
        (
            "strait_dci_share_floor_bytes_per_second",
            "gauge",
            "What this node may send on the link with no grant.",
            |l| l.floor,
        ),
        (
            "strait_dci_share_demand_bytes_per_second",
            "gauge",
            "The demand this node reported last.",
            |l| l.demand,
        ),
        (
            "strait_dci_share_leased",
            "gauge",
            "1 while a grant's lease runs, 0 at the floor.",
            |l| u64::from(l.leased),
        ),
        (
            "strait_dci_share_failed_reports_total",
            "counter",
            "Demand reports that got no grant.",
            |l| l.failed_reports,
        ),
    ];
    if !shares.is_empty() {
        for (metric, kind, help, get) in families {
            let _ = writeln!(out, "# HELP {metric} {help}\n# TYPE {metric} {kind}");
            for (to, l) in &shares {
                let _ = writeln!(out, "{metric}{{node=\"{name}\",to=\"{to}\"}} {}", get(l));
            }
        }
    }
    summary(
        &mut out,
        "strait_pipeline_ack_seconds",
        "Packet ack latency seen by writers on this node.",
        &name,
        &m.pipeline_ack_us,
    );
    summary(
        &mut out,
        "strait_read_seconds",
        "Read latency seen by readers on this node.",
        &name,
        &m.read_us,
    );
    if let Some(r) = node.repair_status() {
        tiers(
            &mut out,
            "strait_repair_bytes_total",
            "Block bytes this node's repairs copied, by tier of the hop.",
            &name,
            &m.repair_bytes,
        );
        let _ = writeln!(
            out,
            "# HELP strait_repair_queue_depth Repairs queued and not done (blocks this node knows under-replicated and owes).\n# TYPE strait_repair_queue_depth gauge\nstrait_repair_queue_depth{{node=\"{name}\"}} {}",
            r.pending
        );
        let _ = writeln!(
            out,
            "# HELP strait_under_replicated_bytes Bytes of the blocks waiting in the repair queue.\n# TYPE strait_under_replicated_bytes gauge\nstrait_under_replicated_bytes{{node=\"{name}\"}} {}",
            r.pending_bytes
        );
        let _ = writeln!(
            out,
            "# HELP strait_peers_down Storage nodes this node counts as down.\n# TYPE strait_peers_down gauge\nstrait_peers_down{{node=\"{name}\"}} {}",
            r.down.len()
        );
        let _ = writeln!(
            out,
            "# HELP strait_repairs_total Repairs finished (block back at its replica count).\n# TYPE strait_repairs_total counter\nstrait_repairs_total{{node=\"{name}\"}} {}",
            m.repairs_done.load(Ordering::Relaxed)
        );
        summary(
            &mut out,
            "strait_repair_restore_seconds",
            "Time from a loss queued for repair to its block restored.",
            &name,
            &m.repair_restore_us,
        );
    }
    let store = node.store();
    let _ = writeln!(
        out,
        "# HELP strait_store_info Store backend.\n# TYPE strait_store_info gauge\nstrait_store_info{{node=\"{name}\",backend=\"{}\",direct_io=\"{}\"}} 1",
        store.backend(),
        store.direct_io()
    );
    if let Ok(fs) = rustix::fs::statvfs(store.root()) {
        let _ = writeln!(
            out,
            "# HELP strait_store_free_bytes Free space on the store's filesystem.\n# TYPE strait_store_free_bytes gauge\nstrait_store_free_bytes{{node=\"{name}\"}} {}",
            fs.f_bavail.saturating_mul(fs.f_frsize)
        );
    }
    let _ = writeln!(
        out,
        "# HELP strait_replicas Replicas held, by state.\n# TYPE strait_replicas gauge"
    );
    let counts = store.counts();
    for (state, n) in [
        ("finalized", counts.finalized),
        ("rbw", counts.rbw),
        ("corrupt", counts.corrupt),
    ] {
        let _ = writeln!(
            out,
            "strait_replicas{{node=\"{name}\",state=\"{state}\"}} {n}"
        );
    }
    if let Ok(r) = node.rpo() {
        let _ = writeln!(
            out,
            "# HELP strait_replication_pending_tasks Async blocks not yet in the remote IDC.\n# TYPE strait_replication_pending_tasks gauge\nstrait_replication_pending_tasks{{node=\"{name}\"}} {}\n\
             # HELP strait_replication_pending_bytes Bytes not yet in the remote IDC (RPO in bytes).\n# TYPE strait_replication_pending_bytes gauge\nstrait_replication_pending_bytes{{node=\"{name}\"}} {}\n\
             # HELP strait_replication_lag_seconds Age of the oldest pending task (RPO in time).\n# TYPE strait_replication_lag_seconds gauge\nstrait_replication_lag_seconds{{node=\"{name}\"}} {}\n\
             # HELP strait_replication_drained_bytes_total Bytes copied to the remote IDC.\n# TYPE strait_replication_drained_bytes_total counter\nstrait_replication_drained_bytes_total{{node=\"{name}\"}} {}",
            r.pending_tasks,
            r.pending_bytes,
            r.oldest_age.as_secs_f64(),
            r.drained_bytes
        );
    }
    out
}

/// At most this many requests are served at once; more connections are closed at once.
pub const MAX_CONNECTIONS: usize = 64;
/// The whole of one request — reading it and writing the answer — must fit in this.
pub const REQUEST_DEADLINE: Duration = Duration::from_secs(5);

/// Serves `GET /metrics` and `GET /health` on `addr` until the task is dropped. Paths are
/// matched exactly; anything else gets a 404. A request head may be 8 KiB; each request
/// has [`REQUEST_DEADLINE`] in all, and at most [`MAX_CONNECTIONS`] are served at once, so
/// slow or idle clients cannot hold the endpoint (or the process's descriptors).
pub async fn serve(addr: SocketAddr, node: Node) -> std::io::Result<tokio::task::JoinHandle<()>> {
    let listener = TcpListener::bind(addr).await?;
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    Ok(tokio::spawn(async move {
        loop {
            let sock = match listener.accept().await {
                Ok((s, _)) => s,
                Err(e) => {
                    // Out of descriptors and the like: back off rather than spin.
                    tracing::warn!(error = %e, "metrics accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                // Full: close it now rather than queue it.
                drop(sock);
                continue;
            };
            let node = node.clone();
            tokio::spawn(async move {
                let _ = tokio::time::timeout(REQUEST_DEADLINE, answer(sock, &node)).await;
                drop(slot);
            });
        }
    }))
}

/// The path of a `GET` request line, if the head is one.
fn get_path(head: &[u8]) -> Option<&str> {
    let line = head.split(|&b| b == b'\r').next()?;
    let line = std::str::from_utf8(line).ok()?;
    let mut parts = line.split(' ');
    match (parts.next(), parts.next(), parts.next()) {
        (Some("GET"), Some(path), Some(version)) if version.starts_with("HTTP/") => Some(path),
        _ => None,
    }
}

async fn answer(mut sock: tokio::net::TcpStream, node: &Node) {
    let mut buf = vec![0u8; 8192];
    let mut n = 0;
    // Read the request head (bounded in size here, in time by the caller).
    while n < buf.len() {
        match sock.read(&mut buf[n..]).await {
            Ok(0) | Err(_) => return,
            Ok(k) => {
                n += k;
                if buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
                    break;
                }
            }
        }
    }
    let (status, body) = match get_path(&buf[..n]) {
        Some("/metrics") => ("200 OK", render(node)),
        // Says which process answers, so that a launcher can tell its own daemon from
        // another one holding the address.
        Some("/health") => ("200 OK", format!("ok pid {}\n", std::process::id())),
        _ => ("404 Not Found", "not found\n".to_string()),
    };
    let resp = format!(
        "HTTP/1.1 {status}\r\ncontent-type: text/plain; version=0.0.4\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = sock.write_all(resp.as_bytes()).await;
    let _ = sock.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::{get_path, label};

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(label("a1"), "a1");
        assert_eq!(label(r#"a"1\x"#), r#"a\"1\\x"#);
        assert_eq!(label("a\nb"), "a\\nb");
    }

    #[test]
    fn paths_match_exactly() {
        assert_eq!(get_path(b"GET /metrics HTTP/1.1\r\n\r\n"), Some("/metrics"));
        assert_eq!(get_path(b"GET /metricsX HTTP/1.1\r\n"), Some("/metricsX"));
        assert_eq!(get_path(b"POST /metrics HTTP/1.1\r\n"), None);
        assert_eq!(get_path(b"GET /metrics"), None);
        assert_eq!(get_path(b"\xff\xfe"), None);
    }
}

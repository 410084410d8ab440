//! A storage server that links strait puts strait's metrics into its own Prometheus
//! registry, beside its own, and serves them on its own endpoint.

mod common;

use bytes::Bytes;
use common::{Cluster, pattern};
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::registry::Registry;
use strait::block::{BlockId, GenStamp};
use strait::pipeline::WriteParams;
use strait::read::ReadParams;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_embedding_server_registers_straits_metrics_in_its_own_registry() {
    let c = Cluster::start().await;
    let targets = c.ids(&["a2", "b1"]);
    let data = pattern(9, 300_000);
    let mut w = c
        .node("a1")
        .writer(BlockId(9), &targets, WriteParams::new(GenStamp(1)))
        .await
        .unwrap();
    w.write(Bytes::from(data.clone())).await.unwrap();
    w.close().await.unwrap();
    let r = c
        .node("a1")
        .reader(BlockId(9), GenStamp(1), &targets, ReadParams::default());
    assert_eq!(r.read_all().await.unwrap(), data);

    // The server's registry, with a prefix and a metric of its own.
    let mut registry = Registry::with_prefix("myserver");
    let requests: Counter = Counter::default();
    registry.register(
        "requests",
        "Requests this server answered",
        requests.clone(),
    );
    requests.inc();
    strait::daemon::export::register(&mut registry, c.node("a1"));
    let mut text = String::new();
    encode(&mut text, &registry).unwrap();

    assert!(text.contains("myserver_requests_total 1"), "{text}");
    // strait's families sit under the server's prefix, with their own values.
    assert!(
        text.contains("myserver_strait_peer_bytes_total{peer=\"a2\",direction=\"in\"} 300000"),
        "{text}"
    );
    assert!(
        text.contains("# TYPE myserver_strait_read_seconds histogram"),
        "{text}"
    );
    assert!(
        text.contains("myserver_strait_read_seconds_count 1"),
        "{text}"
    );
    assert!(
        text.contains("myserver_strait_replicas{state=\"finalized\"} 0"),
        "a1 holds no replica: {text}"
    );
    // Values are read at each encoding: a second read shows at once.
    let r = c
        .node("a1")
        .reader(BlockId(9), GenStamp(1), &targets, ReadParams::default());
    assert_eq!(r.read_all().await.unwrap(), data);
    let mut again = String::new();
    encode(&mut again, &registry).unwrap();
    assert!(
        again.contains("myserver_strait_peer_bytes_total{peer=\"a2\",direction=\"in\"} 600000"),
        "{again}"
    );
    assert!(
        again.contains("myserver_strait_read_seconds_count 2"),
        "{again}"
    );
    // Help texts end with one full stop (the encoder adds it).
    assert!(!again.contains(".."), "{again}");
}

/// The metrics of a node with every option on (replication log, DCI shares, repair).
async fn full_scrape() -> String {
    let c = Cluster::start_opts_repair(
        125_000_000,
        1.0,
        Some(strait::replication::ReplicationConfig::new("unused")),
        Some(strait::dci::SharesSettings::default()),
        Some(strait::repair::RepairConfig::new("unused")),
    )
    .await;
    strait::daemon::export::render(c.node("a1"))
}

/// `docs/METRICS.md` lists every family a node with every option on exposes, with its
/// type, and nothing else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_metrics_reference_lists_every_family() {
    let text = full_scrape().await;
    // Exposed: "# TYPE family type", named in the reference as the samples are.
    let mut exposed: Vec<(String, String)> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_once(' '))
        .map(|(family, kind)| {
            let name = match kind {
                "counter" => format!("{family}_total"),
                "info" => format!("{family}_info"),
                _ => family.to_string(),
            };
            (name, kind.to_string())
        })
        .collect();
    exposed.sort();
    let doc = read("docs/METRICS.md");
    let mut documented: Vec<(String, String)> = doc
        .lines()
        .filter(|l| l.starts_with("| `strait_"))
        .map(|l| {
            let cells: Vec<&str> = l.split('|').map(str::trim).collect();
            (cells[1].trim_matches('`').to_string(), cells[2].to_string())
        })
        .collect();
    documented.sort();
    assert_eq!(exposed, documented, "docs/METRICS.md is out of date");
}

fn read(path: &str) -> String {
    std::fs::read_to_string(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(path))
        .unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// Every `strait_…` name in `text`.
fn names_in(text: &str) -> Vec<String> {
    let mut out: Vec<String> = text
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| w.starts_with("strait_"))
        .map(str::to_string)
        .collect();
    out.sort();
    out.dedup();
    out
}

/// The dashboard and the alert rules in `deploy/` use only metrics a node exposes (as
/// sample names: `_total`, `_bucket` and the like included), and cover what an operator
/// is paged for: RPO lag, DCI queue and utilization, corrupt replicas, under-replication.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_and_alerts_name_only_real_metrics() {
    let text = full_scrape().await;
    let samples: std::collections::BTreeSet<&str> = text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split(['{', ' ']).next())
        .collect();
    let dashboard = read("deploy/grafana-dashboard.json");
    let json: serde_json::Value = serde_json::from_str(&dashboard).expect("dashboard is JSON");
    let exprs: Vec<&str> = json["panels"]
        .as_array()
        .expect("panels")
        .iter()
        .flat_map(|p| p["targets"].as_array().into_iter().flatten())
        .filter_map(|t| t["expr"].as_str())
        .collect();
    assert!(exprs.len() >= 10, "{exprs:?}");
    let alerts = read("deploy/prometheus-alerts.yml");
    for (file, text) in [
        ("deploy/grafana-dashboard.json", exprs.join("\n")),
        ("deploy/prometheus-alerts.yml", alerts.clone()),
    ] {
        let names = names_in(&text);
        assert!(!names.is_empty(), "{file}");
        for n in names {
            assert!(
                samples.contains(n.as_str()),
                "{file} names {n}, which no node exposes"
            );
        }
    }
    for needed in [
        "strait_replication_lag_seconds",
        "strait_dci_queued_bytes",
        "strait_dci_granted_bytes_total",
        "strait_replicas{state=\"corrupt\"}",
        "strait_repair_queue_depth",
    ] {
        assert!(alerts.contains(needed), "no alert on {needed}");
    }
}

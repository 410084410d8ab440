//! `docs/CONFIG.md` documents every field of the node and topology files, and its two
//! examples are files the daemon accepts.

use std::collections::BTreeSet;
use std::path::Path;

use strait::config::DaemonConfig;
use strait::transport::CertAuthority;

fn read(path: &str) -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(path))
        .unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// The fields of each `struct Raw…` in `src`, dotted under the section `sections` names
/// for it (a struct not listed holds a sub-table, not fields of a section).
fn fields(src: &str, sections: &[(&str, &str)]) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut current: Option<&str> = None;
    let mut rename: Option<String> = None;
    for line in src.lines() {
        if let Some(rest) = line.strip_prefix("struct ") {
            let name = rest.split([' ', '{']).next().unwrap_or("");
            current = sections.iter().find(|(s, _)| *s == name).map(|(_, p)| *p);
            continue;
        }
        if line.starts_with('}') {
            current = None;
            continue;
        }
        let Some(prefix) = current else { continue };
        let t = line.trim();
        if let Some(r) = t.strip_prefix("#[serde(rename = \"") {
            rename = r.split('"').next().map(str::to_string);
            continue;
        }
        if let Some((field, _)) = t.split_once(':')
            && !t.starts_with("//")
            && !t.starts_with('#')
            && field.chars().all(|c| c.is_ascii_lowercase() || c == '_')
        {
            let field = rename.take().unwrap_or_else(|| field.to_string());
            out.insert(format!("{prefix}{field}"));
        }
    }
    out
}

#[test]
fn every_field_is_documented_and_nothing_else() {
    let node = fields(
        &read("src/config.rs"),
        &[
            ("RawConfig", ""),
            ("RawTls", "tls."),
            ("RawDci", "dci."),
            ("RawShares", "dci.shares."),
            ("RawTenant", "dci.shares.tenants[]."),
            ("RawClasses", "dci.classes."),
            ("RawReplication", "replication."),
            ("RawRepair", "repair."),
            ("RawPipeline", "pipeline."),
            ("RawMetrics", "metrics."),
        ],
    );
    let topo = fields(
        &read("src/topology.rs"),
        &[
            ("RawIdc", "idc[]."),
            ("RawNode", "node[]."),
            ("RawLink", "dci[]."),
        ],
    );
    // Sections are documented through their fields.
    let sections = [
        "tls",
        "dci",
        "dci.shares",
        "dci.shares.tenants",
        "dci.classes",
        "replication",
        "repair",
        "pipeline",
        "metrics",
    ];
    let expected: BTreeSet<String> = node
        .into_iter()
        .chain(topo)
        .filter(|f| !sections.contains(&f.as_str()))
        .collect();
    assert!(
        expected.len() > 40,
        "the scan found too little: {expected:?}"
    );
    let doc = read("docs/CONFIG.md");
    let documented: BTreeSet<String> = doc
        .lines()
        .filter_map(|l| l.strip_prefix("| `"))
        .filter_map(|l| l.split('`').next())
        .map(str::to_string)
        .collect();
    assert_eq!(expected, documented, "docs/CONFIG.md is out of date");
}

#[test]
fn the_documented_examples_are_accepted() {
    let doc = read("docs/CONFIG.md");
    let blocks: Vec<&str> = doc
        .split("```toml\n")
        .skip(1)
        .filter_map(|b| b.split("```").next())
        .collect();
    assert_eq!(blocks.len(), 2, "a node file and a topology file");
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("topology.toml"), blocks[1]).unwrap();
    CertAuthority::generate("config doc CA")
        .unwrap()
        .write_files(&dir.path().join("certs"), ["a1", "b1"])
        .unwrap();
    let path = dir.path().join("a1.toml");
    std::fs::write(&path, blocks[0]).unwrap();
    let config = DaemonConfig::from_file(&path).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(config.node.name, "a1");
    assert_eq!(config.metrics_addr, Some("127.0.0.1:9100".parse().unwrap()));
}

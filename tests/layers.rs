//! The library's layers run one way. Every top-level module of `src/` sits in a layer,
//! and may use (by a `crate::` path, in code or docs) only modules of lower layers; so
//! no two modules import each other, directly or around a loop. A new module must be
//! placed in the table below, which is the picture `docs/ARCHITECTURE.md` describes.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Lowest first. Modules of one layer do not use each other.
const LAYERS: &[&[&str]] = &[
    // Pure cores and vocabulary.
    &["units", "block"],
    &["topology", "wire"],
    &["placement", "scheduler", "metrics"],
    // IO shells that know nothing of a node.
    &["store", "transport", "replication"],
    &["dci"],
    // What a node's services share.
    &["context"],
    // The services.
    &["read", "pipeline", "bandwidth"],
    &["transfer"],
    &["repair"],
    // The node, and what runs it.
    &["node"],
    &["config"],
    &["daemon"],
];

fn rs_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rs_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// Top-level module -> the top-level modules its files name with `crate::`.
fn imports() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rs_files(&src, &mut files);
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for f in files {
        let rel = f.strip_prefix(&src).unwrap();
        let first = rel
            .components()
            .next()
            .unwrap()
            .as_os_str()
            .to_string_lossy();
        let module = first.trim_end_matches(".rs").to_string();
        if module == "lib" {
            continue;
        }
        let text = std::fs::read_to_string(&f).unwrap();
        let uses = graph.entry(module.clone()).or_default();
        for (i, _) in text.match_indices("crate::") {
            let name: String = text[i + 7..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if !name.is_empty() && name != module {
                uses.insert(name);
            }
        }
    }
    graph
}

fn layer_of(module: &str) -> Option<usize> {
    LAYERS.iter().position(|l| l.contains(&module))
}

#[test]
fn every_module_uses_only_lower_layers() {
    let graph = imports();
    let mut wrong = Vec::new();
    for (module, uses) in &graph {
        let Some(mine) = layer_of(module) else {
            wrong.push(format!("{module} is in no layer (add it to LAYERS)"));
            continue;
        };
        for u in uses {
            match layer_of(u) {
                Some(theirs) if theirs < mine => {}
                Some(_) => wrong.push(format!("{module} uses {u}, which is not below it")),
                None => wrong.push(format!("{module} uses {u}, which is in no layer")),
            }
        }
    }
    assert!(wrong.is_empty(), "layering broken:\n{}", wrong.join("\n"));
}

#[test]
fn services_never_see_the_node() {
    let graph = imports();
    for service in [
        "pipeline",
        "read",
        "replication",
        "transfer",
        "dci",
        "store",
    ] {
        assert!(
            !graph[service].contains("node"),
            "{service} imports node: services take the context"
        );
    }
}

//! The command line's conventions: documented exit codes (0 done, 1 found a problem,
//! 2 usage or configuration error, 3 could not run), typed flag values.

mod common;

use common::{strait, text};

fn code(args: &[&str]) -> (Option<i32>, String) {
    let out = strait(args);
    (out.status.code(), text(&out))
}

#[test]
fn bad_flags_and_bad_files_are_usage_errors() {
    for args in [
        &["plan", "--topology", "/nonexistent.toml"][..],
        &["put", "x", "--mode", "maybe"],
        &["put", "x", "--block-size", "lots"],
        &["cluster", "up", "--dci-rate", "fast"],
        &["cluster", "up", "--dci-delay", "soon"],
        &["fsck"],
        &[
            "dci-emu",
            "--listen",
            "127.0.0.1:1",
            "--target",
            "127.0.0.1:2",
            "--loss",
            "2",
        ],
        &[
            "dci-emu",
            "--listen",
            "127.0.0.1:1",
            "--target",
            "127.0.0.1:2",
            "--queue",
            "big",
        ],
        &["get", "/nonexistent.strait", "--out", "/dev/null"],
    ] {
        let (c, out) = code(args);
        assert_eq!(c, Some(2), "{args:?}: {out}");
    }
    let topo = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/two-idc.toml");
    let (c, out) = code(&["plan", "--topology", topo, "--exclude", "nobody"]);
    assert_eq!(c, Some(2), "{out}");
    assert!(out.contains("nobody"), "{out}");
}

#[test]
fn a_job_that_cannot_run_exits_3() {
    let dir = tempfile::tempdir().unwrap();
    let manifest = dir.path().join("m.strait");
    std::fs::write(&manifest, "").unwrap();
    let (c, out) = code(&[
        "fsck",
        "--manifest",
        &manifest.display().to_string(),
        "--dir",
        &dir.path().join("no-cluster").display().to_string(),
    ]);
    assert_eq!(c, Some(3), "{out}");
}

#[test]
fn help_documents_the_exit_codes() {
    let (c, out) = code(&["--help"]);
    assert_eq!(c, Some(0));
    assert!(out.contains("Exit codes: 0"), "{out}");
}

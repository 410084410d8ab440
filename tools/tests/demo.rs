//! The README's first command, small: `strait demo` runs to completion, prints its table,
//! draws its charts and leaves no process behind.

#[test]
fn demo_runs_to_completion() {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_strait"))
        .args([
            "demo",
            "--dir",
            &dir.path().join("demo").display().to_string(),
            "--set",
            "8MiB",
            "--block-size",
            "2MiB",
            "--plot",
            &dir.path().join("demo.svg").display().to_string(),
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for want in [
        "write sync 2+2",
        "write async, idc-b down",
        "read sync set from idc-b",
        "DCI bytes per block byte written: 1.0",
        "RPO lag",
        "kill -9 of a2: every block back at 2+2",
        " 0 repair bytes over the DCI",
    ] {
        assert!(text.contains(want), "missing {want:?} in:\n{text}");
    }
    // Reads never crossed the DCI.
    assert!(
        !text.lines().any(|l| l.contains("read")
            && l.contains("B over DCI")
            && !l.contains(" 0 B over DCI")),
        "{text}"
    );
    assert!(
        !dir.path().join("demo/cluster.pids").exists(),
        "the cluster was stopped"
    );
    // The charts: DCI throughput per class and the RPO, with lines.
    for (file, words) in [
        ("demo.svg", ["DCI throughput per class", "sync", "async"]),
        ("demo-rpo.svg", ["RPO", "MiB pending", "pending"]),
    ] {
        let svg = std::fs::read_to_string(dir.path().join(file)).unwrap();
        assert!(
            svg.starts_with("<svg") && svg.contains("<polyline"),
            "{file}"
        );
        for w in words {
            assert!(svg.contains(w), "{file} misses {w:?}");
        }
    }
}

//! Helpers shared by the command-line tests.
#![allow(dead_code)]

/// Runs the `strait` binary with `args` to completion.
pub(crate) fn strait(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_strait"))
        .args(args)
        .output()
        .unwrap()
}

/// A command's stdout and stderr, for assertion messages.
pub(crate) fn text(o: &std::process::Output) -> String {
    format!(
        "{}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// `strait cluster up` in `dir`: 2 IDCs of `racks` racks × 2 nodes, a DCI of `rate` with
/// 2 ms one way.
pub(crate) fn cluster_up(dir: &str, racks: &str, rate: &str) -> std::process::Output {
    strait(&[
        "cluster",
        "up",
        "--dir",
        dir,
        "--idcs",
        "2",
        "--racks",
        racks,
        "--nodes-per-rack",
        "2",
        "--dci-rate",
        rate,
        "--dci-delay",
        "2ms",
    ])
}

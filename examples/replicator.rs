//! The replicator daemon: runs one strait node from a TOML configuration file.
//!
//! ```text
//! cargo run --release --example replicator -- --config node.toml
//! ```
//!
//! See `strait::config` for the file format. A bad file is refused at start with a
//! message naming the field (exit code 2). Logs go to stderr (level from `RUST_LOG`,
//! default `info`). SIGTERM or SIGINT stop accepting, let in-flight work finish within
//! the grace period, and exit 0; the replication log is durable at every ack, so nothing
//! needs flushing.

use std::path::PathBuf;
use std::process::ExitCode;

use strait::config::DaemonConfig;
use strait::node::Node;
use tokio::signal::unix::{SignalKind, signal};

fn usage() -> ExitCode {
    eprintln!("usage: replicator --config <node.toml>");
    ExitCode::from(2)
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let mut args = std::env::args().skip(1);
    let path = match (args.next().as_deref(), args.next()) {
        (Some("--config"), Some(p)) => PathBuf::from(p),
        _ => return usage(),
    };
    let config = match DaemonConfig::from_file(&path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("replicator: bad configuration: {e}");
            return ExitCode::from(2);
        }
    };
    let name = config.node.name.clone();
    let (node, report) = match Node::start(config.node).await {
        Ok(x) => x,
        Err(e) => {
            eprintln!("replicator: node {name} cannot start: {e}");
            return ExitCode::FAILURE;
        }
    };
    tracing::info!(
        node = %name,
        backend = %report.backend,
        finalized = report.finalized,
        rbw = report.recovered_rbw.len(),
        "node started"
    );
    let _metrics = match config.metrics_addr {
        Some(addr) => match strait::metrics::serve(addr, node.clone()).await {
            Ok(t) => Some(t),
            Err(e) => {
                eprintln!("replicator: cannot serve metrics on {addr}: {e}");
                node.shutdown().await;
                return ExitCode::FAILURE;
            }
        },
        None => None,
    };
    // One line on stdout that launchers wait for.
    println!("ready {name}");
    wait_for_stop().await;
    tracing::info!(node = %name, "stopping");
    shutdown(&node).await;
    ExitCode::SUCCESS
}

async fn wait_for_stop() {
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        // Without signal handlers, run until killed.
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

async fn shutdown(node: &Node) {
    node.shutdown().await;
    if let Ok(r) = node.rpo() {
        tracing::info!(
            pending_tasks = r.pending_tasks,
            pending_bytes = r.pending_bytes,
            "replication backlog kept in the log"
        );
    }
}

//! The daemon: one node run from a TOML file, shared by `examples/daemon.rs` and the
//! `strait node` command. [`run`] starts a node from a [`DaemonConfig`], serves
//! `/metrics` and `/health` ([`http`]), prints `ready <name>` on stdout, runs until
//! SIGTERM or SIGINT and shuts down cleanly.

pub mod export;
pub mod http;

use std::path::Path;

use tokio::signal::unix::{SignalKind, signal};

use crate::config::DaemonConfig;
use crate::node::Node;

/// How a daemon run ended badly.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DaemonError {
    /// The configuration was refused (exit code 2 by convention).
    #[error("bad configuration: {0}")]
    Config(#[from] crate::config::ConfigError),
    /// The node could not start.
    #[error("node cannot start: {0}")]
    Start(#[from] crate::node::NodeError),
    /// The metrics endpoint could not bind.
    #[error("cannot serve metrics: {0}")]
    Metrics(std::io::Error),
}

/// Runs a node from the configuration file at `path` until SIGTERM/SIGINT.
pub async fn run(path: &Path) -> Result<(), DaemonError> {
    let config = DaemonConfig::from_file(path)?;
    let name = config.node.name.clone();
    let (node, report) = Node::start(config.node).await?;
    tracing::info!(node = %name, backend = %report.backend, finalized = report.finalized, rbw = report.recovered_rbw.len(), "node started");
    let _metrics = match config.metrics_addr {
        Some(addr) => match http::serve(addr, node.clone()).await {
            Ok(t) => Some(t),
            Err(e) => {
                node.shutdown().await;
                return Err(DaemonError::Metrics(e));
            }
        },
        None => None,
    };
    // One line on stdout that launchers wait for.
    println!("ready {name}");
    wait_for_stop().await;
    tracing::info!(node = %name, "stopping");
    node.shutdown().await;
    if let Ok(r) = node.rpo() {
        tracing::info!(
            pending_tasks = r.pending_tasks,
            pending_bytes = r.pending_bytes,
            "replication backlog kept in the log"
        );
    }
    Ok(())
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

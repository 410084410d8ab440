//! The daemon: one node run from a TOML file, shared by `examples/daemon.rs` and the
//! `strait node` command. [`run`] starts a node from a [`DaemonConfig`], serves
//! `/metrics` and `/health` ([`http`]), prints `ready <name>` on stdout (and sends
//! `READY=1` to systemd when `NOTIFY_SOCKET` is set), reloads its certificate, key and
//! topology on SIGHUP, runs until SIGTERM or SIGINT and shuts down cleanly.

pub mod export;
pub mod http;

use std::os::unix::ffi::OsStrExt;
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
    // One line on stdout that launchers wait for, and systemd's readiness notice.
    println!("ready {name}");
    if let Err(e) = notify_ready() {
        tracing::warn!(error = %e, "cannot tell systemd the node is ready");
    }
    let reloads = tokio::spawn(reload_on_hangup(path.to_path_buf(), node.clone()));
    wait_for_stop().await;
    reloads.abort();
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

/// On each SIGHUP: reads the configuration file (and the topology file it names) again,
/// presents its certificate and key from the next handshake on (certificate renewal), and
/// applies the topology ([`Node::set_topology`]: nodes added and removed without a
/// restart). A file that does not load changes nothing; a certificate the transport
/// refuses (another node's, another CA's, not valid now) or a topology the node refuses
/// (an IDC or link added or removed, this node removed or moved) is logged and leaves
/// that part as it was. Other fields are not applied while the node runs.
async fn reload_on_hangup(path: std::path::PathBuf, node: Node) {
    let Ok(mut hup) = signal(SignalKind::hangup()) else {
        tracing::warn!("no SIGHUP handler: certificates and topology are loaded at start only");
        return;
    };
    while hup.recv().await.is_some() {
        let config = match DaemonConfig::from_file(&path) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, "SIGHUP: configuration not reloaded");
                continue;
            }
        };
        match node.transport().reload_identity(&config.node.identity) {
            Ok(()) => tracing::info!(
                expires = ?node.transport().certificate_expiry(),
                "SIGHUP: certificate reloaded"
            ),
            Err(e) => tracing::error!(error = %e, "SIGHUP: certificate not reloaded"),
        }
        match node.set_topology(&config.node.topology) {
            Ok(c) if c.is_empty() => tracing::info!("SIGHUP: topology unchanged"),
            Ok(c) => tracing::info!(
                added = ?c.added,
                removed = ?c.removed,
                changed = ?c.changed,
                "SIGHUP: topology reloaded"
            ),
            Err(e) => tracing::error!(error = %e, "SIGHUP: topology not reloaded"),
        }
    }
}

/// Sends `READY=1` to the socket in `NOTIFY_SOCKET` (systemd's `Type=notify`), if set:
/// a path, or an abstract name written `@name`.
fn notify_ready() -> std::io::Result<()> {
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::net::{SocketAddr, UnixDatagram};
    let Some(target) = std::env::var_os("NOTIFY_SOCKET") else {
        return Ok(());
    };
    let target = target.as_encoded_bytes();
    let addr = match target.strip_prefix(b"@") {
        Some(name) => SocketAddr::from_abstract_name(name)?,
        None => SocketAddr::from_pathname(std::ffi::OsStr::from_bytes(target))?,
    };
    UnixDatagram::unbound()?.send_to_addr(b"READY=1", &addr)?;
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

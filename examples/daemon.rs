//! The daemon: runs one strait node from a TOML configuration file.
//!
//! ```text
//! cargo run --release --example daemon -- --config node.toml
//! ```
//!
//! See `strait::config` for the file format. A bad file is refused at start with a
//! message naming the field (exit code 2). Logs go to stderr (level from `RUST_LOG`,
//! default `info`). SIGTERM or SIGINT stop accepting, let in-flight work finish within
//! the grace period, and exit 0; the replication log is durable at every ack, so nothing
//! needs flushing. (`strait node --config` runs the same loop.)

use std::path::PathBuf;
use std::process::ExitCode;

use strait::daemon::{self, DaemonError};

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
        _ => {
            eprintln!("usage: daemon --config <node.toml>");
            return ExitCode::from(2);
        }
    };
    match daemon::run(&path).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e @ DaemonError::Config(_)) => {
            eprintln!("daemon: {e}");
            ExitCode::from(2)
        }
        Err(e) => {
            eprintln!("daemon: {e}");
            ExitCode::FAILURE
        }
    }
}

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

use clap::Parser;
use strait::daemon::{self, DaemonError};

/// Runs one strait node from a TOML configuration file until SIGTERM or SIGINT.
#[derive(Parser)]
#[command(
    name = "daemon",
    after_help = "Exit codes: 0 stopped cleanly; 2 usage or configuration error; 3 could not run."
)]
struct Args {
    /// The node's configuration file.
    #[arg(long)]
    config: PathBuf,
}

#[tokio::main]
async fn main() -> ExitCode {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .try_init();
    // clap exits 2 on a usage error.
    let args = Args::parse();
    match daemon::run(&args.config).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e @ DaemonError::Config(_)) => {
            eprintln!("daemon: {e}");
            ExitCode::from(2)
        }
        Err(e) => {
            eprintln!("daemon: {e}");
            ExitCode::from(3)
        }
    }
}

//! The two processes a local cluster is made of — a daemon (`node`) and a DCI emulator
//! (`dci-emu`) — as subcommands any of the tools' binaries can carry. The cluster
//! launcher starts them by running its own executable again, so `strait` and
//! `strait-bench` both can run a cluster without the other being built.

use std::path::PathBuf;

/// `node`: run one storage node (the daemon) from a TOML file until SIGTERM/SIGINT.
#[derive(Debug, clap::Args)]
pub struct NodeArgs {
    /// The node's configuration file.
    #[arg(long)]
    pub config: PathBuf,
}

/// `dci-emu`: relay UDP from `--listen` to `--target` with a one-way delay, a rate cap
/// with a bounded queue, and random loss, in both directions.
#[derive(Debug, clap::Args)]
pub struct DciEmuArgs {
    /// Address to receive on.
    #[arg(long)]
    pub listen: std::net::SocketAddr,
    /// Address to forward to.
    #[arg(long)]
    pub target: std::net::SocketAddr,
    /// Rate cap per direction (0: none).
    #[arg(long, default_value = "1gbit")]
    pub rate: String,
    /// One-way delay.
    #[arg(long, default_value = "5ms")]
    pub delay: String,
    /// Queue limit per direction.
    #[arg(long, default_value = "4MiB")]
    pub queue: String,
    /// Loss probability, 0..=1.
    #[arg(long, default_value_t = 0.0)]
    pub loss: f64,
}

/// Runs the daemon (logs to stderr, `RUST_LOG` honoured, default `info`).
pub fn run_node(args: NodeArgs) -> Result<(), String> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let rt = tokio::runtime::Runtime::new().map_err(|e| e.to_string())?;
    rt.block_on(strait::daemon::run(&args.config))
        .map_err(|e| e.to_string())
}

/// Runs the emulator until killed.
pub fn run_dci_emu(a: DciEmuArgs) -> Result<(), String> {
    use strait::units;
    let rate = if a.rate == "0" {
        0
    } else {
        units::parse_rate(&a.rate).map_err(|e| format!("--rate: {e}"))?
    };
    let params = crate::dciemu::LinkParams {
        rate,
        delay: units::parse_duration(&a.delay).map_err(|e| format!("--delay: {e}"))?,
        queue_bytes: units::parse_bytes(&a.queue).map_err(|e| format!("--queue: {e}"))?,
        loss: if (0.0..=1.0).contains(&a.loss) {
            a.loss
        } else {
            return Err("--loss must be within 0..=1".into());
        },
    };
    let rt = tokio::runtime::Runtime::new().map_err(|e| e.to_string())?;
    println!(
        "dci-emu: {} -> {}, {} per direction, +{}, queue {}, loss {}",
        a.listen,
        a.target,
        units::fmt_rate(rate),
        a.delay,
        a.queue,
        a.loss
    );
    rt.block_on(crate::dciemu::run(
        a.listen,
        a.target,
        params,
        Default::default(),
    ))
    .map_err(|e| format!("dci-emu: {e}"))
}

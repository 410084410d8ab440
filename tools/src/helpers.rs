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

/// `dci-emu`: relay UDP to nodes across emulated DCI links with a one-way delay, a rate
/// cap with a bounded queue, and random loss, in both directions. Either one relay
/// (`--listen`, `--target`: one link each way), or several (`--relay`, `--peer`): every
/// relay of an IDC pair shares that pair's link in each direction, like the real DCI.
#[derive(Debug, clap::Args)]
pub struct DciEmuArgs {
    /// Address to receive on (one relay).
    #[arg(long, requires = "target", conflicts_with = "relay")]
    pub listen: Option<std::net::SocketAddr>,
    /// Address to forward to (one relay).
    #[arg(long, requires = "listen")]
    pub target: Option<std::net::SocketAddr>,
    /// A relay: `LISTEN,TARGET,IDC` (the target node's IDC). Repeatable.
    #[arg(long, value_parser = parse_relay)]
    pub relay: Vec<crate::dciemu::Relay>,
    /// A sender: `IP,IDC`. Repeatable; a sender not listed has a link of its own.
    #[arg(long, value_parser = parse_peer)]
    pub peer: Vec<(std::net::IpAddr, String)>,
    /// Rate cap per link and direction (0: none).
    #[arg(long, default_value = "1gbit", value_parser = parse_cap)]
    pub rate: u64,
    /// One-way delay.
    #[arg(long, default_value = "5ms", value_parser = crate::cli::parse_duration)]
    pub delay: std::time::Duration,
    /// Queue limit per link and direction.
    #[arg(long, default_value = "4MiB", value_parser = crate::cli::parse_size)]
    pub queue: u64,
    /// Loss probability, 0..=1.
    #[arg(long, default_value_t = 0.0, value_parser = parse_loss)]
    pub loss: f64,
}

/// A rate cap: a rate, or `0` for none.
fn parse_cap(s: &str) -> Result<u64, String> {
    if s == "0" {
        Ok(0)
    } else {
        crate::cli::parse_rate(s)
    }
}

/// A probability, 0..=1.
fn parse_loss(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(p) if (0.0..=1.0).contains(&p) => Ok(p),
        _ => Err(format!("{s}: expected a probability within 0..=1")),
    }
}

fn parse_relay(s: &str) -> Result<crate::dciemu::Relay, String> {
    let parts: Vec<&str> = s.split(',').collect();
    let [listen, target, idc] = parts[..] else {
        return Err(format!("{s:?}: expected LISTEN,TARGET,IDC"));
    };
    Ok(crate::dciemu::Relay {
        listen: listen
            .parse()
            .map_err(|_| format!("{listen:?} is not ip:port"))?,
        target: target
            .parse()
            .map_err(|_| format!("{target:?} is not ip:port"))?,
        idc: idc.to_string(),
    })
}

fn parse_peer(s: &str) -> Result<(std::net::IpAddr, String), String> {
    let (ip, idc) = s
        .split_once(',')
        .ok_or_else(|| format!("{s:?}: expected IP,IDC"))?;
    Ok((
        ip.parse()
            .map_err(|_| format!("{ip:?} is not an IP address"))?,
        idc.to_string(),
    ))
}

/// Runs the daemon (logs to stderr, `RUST_LOG` honoured, default `info`). A refused
/// configuration is a usage error (exit 2).
pub fn run_node(args: NodeArgs) -> Result<(), crate::cli::Failure> {
    use crate::cli::Failure;
    crate::cli::init_logging("info");
    let rt = tokio::runtime::Runtime::new().map_err(|e| Failure::CannotRun(e.to_string()))?;
    rt.block_on(strait::daemon::run(&args.config))
        .map_err(|e| match e {
            strait::daemon::DaemonError::Config(_) => Failure::Usage(e.to_string()),
            e => Failure::CannotRun(e.to_string()),
        })
}

/// Runs the emulator until killed.
pub fn run_dci_emu(a: DciEmuArgs) -> Result<(), String> {
    let params = crate::dciemu::LinkParams {
        rate: a.rate,
        delay: a.delay,
        queue_bytes: a.queue,
        loss: a.loss,
    };
    let layout = match (a.listen, a.target) {
        (Some(listen), Some(target)) => crate::dciemu::EmuLayout {
            relays: vec![crate::dciemu::Relay {
                listen,
                target,
                idc: "target".into(),
            }],
            peers: Default::default(),
        },
        _ if !a.relay.is_empty() => crate::dciemu::EmuLayout {
            relays: a.relay,
            peers: a.peer.into_iter().collect(),
        },
        _ => return Err("give --listen and --target, or one --relay or more".into()),
    };
    let rt = tokio::runtime::Runtime::new().map_err(|e| e.to_string())?;
    let mut pairs: Vec<&str> = layout.relays.iter().map(|r| r.idc.as_str()).collect();
    pairs.sort();
    pairs.dedup();
    println!(
        "dci-emu: {} relays into {} IDCs, {} per link and direction, +{:?}, queue {}, loss {}",
        layout.relays.len(),
        pairs.len(),
        strait::units::fmt_rate(params.rate),
        params.delay,
        strait::units::fmt_bytes(params.queue_bytes),
        params.loss
    );
    let stats = std::sync::Arc::new(crate::dciemu::EmuStats::default());
    rt.spawn(report(stats.clone()));
    rt.block_on(crate::dciemu::run_layout(layout, params, stats))
        .map_err(|e| format!("dci-emu: {e}"))
}

/// Prints the emulator's counters every 5 s while they move: bytes forwarded, datagrams
/// dropped, datagrams per receive call (batching), and this process's CPU per GB.
async fn report(stats: std::sync::Arc<crate::dciemu::EmuStats>) {
    use std::sync::atomic::Ordering::Relaxed;
    let mut last = (0u64, 0u64, 0u64, 0u64, crate::bench::cpu_seconds());
    loop {
        tokio::time::sleep(std::time::Duration::from_secs(5)).await;
        let now = (
            stats.forwarded_bytes.load(Relaxed),
            stats.forwarded.load(Relaxed),
            stats.dropped.load(Relaxed),
            stats.recv_calls.load(Relaxed),
            crate::bench::cpu_seconds(),
        );
        let bytes = now.0 - last.0;
        if bytes > 0 {
            println!(
                "dci-emu: {:.1} MB/s forwarded, {} datagrams dropped, {:.1} datagrams per receive, {:.2} core-s per GB",
                bytes as f64 / 5e6,
                now.2 - last.2,
                (now.1 - last.1 + now.2 - last.2) as f64 / (now.3 - last.3).max(1) as f64,
                (now.4 - last.4) / (bytes as f64 / 1e9)
            );
        }
        last = now;
    }
}

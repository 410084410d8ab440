//! `strait-bench SCENARIO`: measured scenarios with their physical reference. The last
//! line of the output is one JSON object.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use strait::store::BackendKind;
use strait::units;
use strait_tools::bench::store::{self, StoreBenchParams};
use strait_tools::bench::transport::{self, TransportBenchParams};

#[derive(Parser)]
#[command(name = "strait-bench", version, about = "strait benchmarks")]
struct Cli {
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Subcommand)]
enum Scenario {
    /// Block store: write then verified read of N replicas, per backend, against raw
    /// io_uring O_DIRECT.
    Store {
        /// Directory on the disk to measure (created; emptied of bench files afterwards).
        #[arg(long, default_value = "target/strait-bench")]
        dir: PathBuf,
        /// Replicas written and read per backend.
        #[arg(long, default_value_t = 8)]
        replicas: usize,
        /// Bytes per replica.
        #[arg(long, default_value = "128MiB", value_parser = parse_size)]
        size: usize,
        /// Bytes per write/read call.
        #[arg(long, default_value = "1MiB", value_parser = parse_size)]
        io_size: usize,
        /// Calls in flight.
        #[arg(long, default_value_t = 16)]
        depth: usize,
        /// Backends, first one reported as the main figure.
        #[arg(long, value_delimiter = ',', default_value = "uring,psync")]
        backends: Vec<BackendKind>,
        /// Rounds (interleaved); medians are reported. The disk here is virtual and
        /// varies by ±30% from run to run, so one round proves nothing.
        #[arg(long, default_value_t = 5)]
        rounds: usize,
    },
    /// Transport: framed stream vs raw quinn stream vs framed TLS-over-TCP, and the
    /// round-trip latency of a small request.
    Transport {
        /// Bytes per transfer.
        #[arg(long, default_value = "1GiB", value_parser = parse_size)]
        bytes: usize,
        /// Bytes per data packet.
        #[arg(long, default_value = "64KiB", value_parser = parse_size)]
        packet: usize,
        /// Round trips measured.
        #[arg(long, default_value_t = 5000)]
        round_trips: usize,
        /// Rounds; medians are reported.
        #[arg(long, default_value_t = 3)]
        rounds: usize,
    },
}

fn parse_size(s: &str) -> Result<usize, String> {
    units::parse_bytes(s)
        .map(|v| v as usize)
        .map_err(|e| e.to_string())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("strait-bench: cannot start runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async {
        match cli.scenario {
            Scenario::Store {
                dir,
                replicas,
                size,
                io_size,
                depth,
                backends,
                rounds,
            } => {
                if io_size % 4096 != 0 || io_size == 0 {
                    return Err("--io-size must be a multiple of 4096".to_string());
                }
                store::run(&StoreBenchParams {
                    dir,
                    replicas,
                    size,
                    io_size,
                    depth,
                    backends,
                    rounds,
                })
                .await
            }
            Scenario::Transport {
                bytes,
                packet,
                round_trips,
                rounds,
            } => {
                if packet == 0 || packet > strait::wire::MAX_PAYLOAD {
                    return Err(format!(
                        "--packet must be 1..={} bytes",
                        strait::wire::MAX_PAYLOAD
                    ));
                }
                transport::run(&TransportBenchParams {
                    bytes: bytes as u64,
                    packet,
                    round_trips,
                    rounds,
                })
                .await
            }
        }
    });
    match result {
        Ok(json) => {
            println!("{json}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("strait-bench: {e}");
            ExitCode::FAILURE
        }
    }
}

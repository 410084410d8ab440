//! `strait-bench SCENARIO`: measured scenarios with their physical reference. The last
//! line of the output is one JSON object.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use strait::placement::ReplicationSpec;
use strait::store::BackendKind;
use strait::transport::LinkKind;
use strait_tools::bench::dci::{self, DciBenchParams};
use strait_tools::bench::pipeline::{self, PipelineBenchParams};
use strait_tools::bench::sched;
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
    /// Faults on real processes: a local cluster of daemons (2 IDCs x 4) with sync and
    /// async writers, while a seeded schedule kill -9s and restarts daemons and freezes
    /// one now and then; then every acknowledged block is read back from both IDCs.
    Chaos {
        /// Work directory of the cluster (emptied first).
        #[arg(long, default_value = "target/strait-bench-chaos")]
        dir: PathBuf,
        /// Seconds of writing under chaos.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
        /// kill -9 + restart events.
        #[arg(long, default_value_t = 20)]
        kills: usize,
        /// SIGSTOP/SIGCONT (3 s) events: a daemon that goes silent without closing.
        #[arg(long, default_value_t = 3)]
        stalls: usize,
        /// Concurrent writers (half sync, half async; from both IDCs).
        #[arg(long, default_value_t = 4)]
        writers: usize,
        /// Bytes per block.
        #[arg(long, default_value = "256KiB", value_parser = parse_size)]
        block_size: usize,
        /// Seed of the schedule.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Rate of the emulated DCI (async writers keep to it between them).
        #[arg(long, default_value = "200mbit", value_parser = parse_rate)]
        dci_rate: u64,
    },
    /// A daemon of a bench cluster (the chaos scenario starts these).
    #[command(hide = true)]
    Node(strait_tools::helpers::NodeArgs),
    /// A DCI emulator of a bench cluster.
    #[command(hide = true)]
    DciEmu(strait_tools::helpers::DciEmuArgs),
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
    /// Write pipeline: a client streams blocks through a replicated pipeline of nodes on
    /// loopback, against a single-hop pipeline.
    Pipeline {
        /// Replication spec over two IDCs.
        #[arg(long, default_value = "2+2")]
        spec: ReplicationSpec,
        /// Write mode.
        #[arg(long, value_enum, default_value_t = Mode::Sync)]
        mode: Mode,
        /// Blocks per measurement.
        #[arg(long, default_value_t = 4)]
        blocks: usize,
        /// Bytes per block.
        #[arg(long, default_value = "128MiB", value_parser = parse_size)]
        block_size: usize,
        /// Bytes per client write call.
        #[arg(long, default_value = "1MiB", value_parser = parse_size)]
        write_size: usize,
        /// Blocks written at the same time, each through its own pipeline (a client with
        /// several files open, or one that streams a file block after block).
        #[arg(long, default_value_t = 1)]
        in_flight: usize,
        /// Data bytes per pipeline packet (default: the library's, 1 MiB).
        #[arg(long, default_value = "0", value_parser = parse_size)]
        packet: usize,
        /// Smallest window in flight (default: the library's).
        #[arg(long, default_value = "0", value_parser = parse_size)]
        window: usize,
        /// Where the writer runs: `client` (a separate node, 4 network hops for 2+2) or
        /// `first` (on the first replica's node, as HDFS clients on datanodes). Async mode
        /// always writes from the first replica's node, which holds the log.
        #[arg(long, value_enum, default_value_t = WriterAt::Client)]
        writer: WriterAt,
        /// When a writer sets its pipeline up: `with-data` sends the setup with the first
        /// packet (a small block then costs one round trip through the pipeline), `at-create`
        /// when the writer is made (the library's default).
        #[arg(long, value_enum, default_value_t = SetupAt::WithData)]
        setup: SetupAt,
        /// DCI budget between the two IDCs.
        #[arg(long, default_value = "10gbit", value_parser = parse_rate)]
        dci_budget: u64,
        /// Intra-IDC link kinds to measure (the first is the headline figure).
        #[arg(long, value_delimiter = ',', default_value = "tcp-tls,quic")]
        links: Vec<LinkKind>,
        /// Directory for the node stores.
        #[arg(long, default_value = "target/strait-bench-pipeline")]
        dir: PathBuf,
    },
    /// Cluster-wide DCI shares vs static equal shares: 2 IDCs x 8 nodes, uneven demand
    /// across nodes and classes against one budget; utilization, overshoot, a single
    /// sender's share, reserved vs spot admission latency.
    Sched {
        /// DCI budget.
        #[arg(long, default_value = "1gbit", value_parser = parse_rate)]
        budget: u64,
        /// Measured seconds per phase.
        #[arg(long, default_value_t = 5)]
        phase_secs: u64,
        /// Directory for the node stores.
        #[arg(long, default_value = "target/strait-bench-sched")]
        dir: PathBuf,
    },
    /// Repair: 2 IDCs x 4 nodes, blocks written 2+2, one node stopped under a concurrent
    /// sync writer: time until every block is back at 2+2 (verified), repair bytes per
    /// tier, the writer's p99 with and without repair running.
    Repair {
        /// Blocks written before the loss.
        #[arg(long, default_value_t = 64)]
        blocks: usize,
        /// Bytes per block.
        #[arg(long, default_value = "4MiB", value_parser = parse_size)]
        block_size: usize,
        /// Bytes per block of the concurrent writer.
        #[arg(long, default_value = "1MiB", value_parser = parse_size)]
        writer_block: usize,
        /// Seconds the writer is measured before the loss (and at least as long after).
        #[arg(long, default_value_t = 8)]
        window: u64,
        /// DCI budget.
        #[arg(long, default_value = "1gbit", value_parser = parse_rate)]
        budget: u64,
        /// Repairs each node runs at once.
        #[arg(long, default_value_t = 2)]
        workers: usize,
        /// Directory for the node stores.
        #[arg(long, default_value = "target/strait-bench-repair")]
        dir: PathBuf,
    },
    /// DCI protection: utilization and overshoot of a DCI budget under a remote-read
    /// backlog, with and without paced sync writes, and the sync ack latency.
    Dci {
        /// DCI budget.
        #[arg(long, default_value = "200mbit", value_parser = parse_rate)]
        budget: u64,
        /// Seconds per phase.
        #[arg(long, default_value_t = 5)]
        phase_secs: u64,
        /// Concurrent remote readers.
        #[arg(long, default_value_t = 4)]
        readers: usize,
        /// Sync 1 MiB blocks per second.
        #[arg(long, default_value_t = 4)]
        sync_blocks_per_s: u64,
        /// Directory for the node stores.
        #[arg(long, default_value = "target/strait-bench-dci")]
        dir: PathBuf,
        /// Write an SVG chart of DCI throughput per class over the phases here.
        #[arg(long)]
        plot: Option<PathBuf>,
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

use strait_tools::cli::{Mode, SetupAt, parse_rate, parse_size_usize as parse_size};

/// Where a pipeline bench's writer runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum WriterAt {
    /// A separate client node (4 network hops for 2+2).
    Client,
    /// The first replica's node, as HDFS clients on datanodes.
    First,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The processes of a bench cluster run with runtimes of their own.
    let helper = match cli.scenario {
        Scenario::Node(args) => strait_tools::helpers::run_node(args),
        Scenario::DciEmu(args) => strait_tools::helpers::run_dci_emu(args).map_err(Into::into),
        scenario => {
            // In-process nodes log here: errors by default (the chaos scenario's kills
            // would flood the output with warnings), `RUST_LOG=warn` or more to see them.
            strait_tools::cli::init_logging("error");
            return bench(scenario);
        }
    };
    match helper {
        Err(f) => f.exit("strait-bench"),
        Ok(()) => ExitCode::SUCCESS,
    }
}

fn bench(scenario: Scenario) -> ExitCode {
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
        match scenario {
            Scenario::Chaos {
                dir,
                seconds,
                kills,
                stalls,
                writers,
                block_size,
                seed,
                dci_rate,
            } => {
                strait_tools::bench::chaos::run(&strait_tools::bench::chaos::ChaosParams {
                    dir,
                    seconds,
                    kills,
                    stalls,
                    writers,
                    block_size,
                    seed,
                    dci_rate,
                })
                .await
            }
            Scenario::Node(_) | Scenario::DciEmu(_) => Err("not a benchmark".to_string()),
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
            Scenario::Pipeline {
                spec,
                mode,
                blocks,
                block_size,
                write_size,
                in_flight,
                packet,
                window,
                writer,
                setup,
                dci_budget,
                links,
                dir,
            } => {
                let writer_on_first = writer == WriterAt::First;
                let mode = strait::wire::WriteMode::from(mode);
                let packet = if packet == 0 {
                    strait::pipeline::PipelineConfig::default().packet_bytes
                } else {
                    packet
                };
                if packet > strait::wire::MAX_PAYLOAD {
                    return Err(format!(
                        "--packet must be 1..={} bytes",
                        strait::wire::MAX_PAYLOAD
                    ));
                }
                if spec.idc_count() > 2 || links.is_empty() || write_size == 0 {
                    return Err(
                        "--spec spans at most 2 IDCs; --links and --write-size must be non-empty"
                            .into(),
                    );
                }
                let params = PipelineBenchParams {
                    spec,
                    blocks,
                    block_size,
                    write_size,
                    in_flight: in_flight.max(1),
                    packet,
                    window,
                    writer_on_first: writer_on_first || mode == strait::wire::WriteMode::Async,
                    mode,
                    setup_with_data: setup == SetupAt::WithData,
                    dci_budget,
                    links,
                    dir,
                };
                if mode == strait::wire::WriteMode::Async {
                    pipeline::run_async(&params).await
                } else {
                    pipeline::run(&params).await
                }
            }
            Scenario::Sched {
                budget,
                phase_secs,
                dir,
            } => {
                sched::run(&strait_tools::bench::sched::SchedBenchParams {
                    budget,
                    phase_secs: phase_secs.max(2),
                    dir,
                })
                .await
            }
            Scenario::Repair {
                blocks,
                block_size,
                writer_block,
                window,
                budget,
                workers,
                dir,
            } => {
                strait_tools::bench::repair::run(&strait_tools::bench::repair::RepairBenchParams {
                    blocks: blocks.max(1),
                    block_size,
                    writer_block,
                    window: window.max(1),
                    budget,
                    workers: workers.max(1),
                    dir,
                })
                .await
            }
            Scenario::Dci {
                budget,
                phase_secs,
                readers,
                sync_blocks_per_s,
                dir,
                plot,
            } => {
                dci::run(&DciBenchParams {
                    budget,
                    phase_secs: phase_secs.max(2),
                    readers: readers.max(1),
                    sync_blocks_per_s,
                    dir,
                    plot,
                })
                .await
            }
            Scenario::Transport {
                bytes,
                packet,
                round_trips,
                rounds,
            } => {
                let packet = if packet == 0 {
                    strait::pipeline::PipelineConfig::default().packet_bytes
                } else {
                    packet
                };
                if packet > strait::wire::MAX_PAYLOAD {
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

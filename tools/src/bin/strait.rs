//! `strait`: the operator's command line.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use strait::placement::ReplicationSpec;
use strait::topology::Topology;
use strait::transport::{CertAuthority, PeerRole};
use strait_tools::certs;
use strait_tools::cli::{Failure, Mode, SetupAt, parse_duration, parse_rate, parse_size};
use strait_tools::plan::{self, PlanParams, Summary};

#[derive(Parser)]
#[command(
    name = "strait",
    version,
    about = "strait: block replication across data centres",
    after_help = strait_tools::cli::EXIT_CODES
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Place blocks on a topology without writing anything, and summarise where replicas
    /// land, the pipeline order and the DCI crossings.
    Plan {
        /// Topology file (TOML).
        #[arg(long, default_value = "examples/two-idc.toml")]
        topology: PathBuf,
        /// Replication spec: 2+2, 3+2, 3, or idc-a:2,idc-b:2.
        #[arg(long, default_value = "2+2")]
        spec: ReplicationSpec,
        /// Number of blocks to place.
        #[arg(long, default_value_t = 10_000)]
        blocks: usize,
        /// Who writes: `all` (every node in turn), a node name, or a path /idc[/rack].
        #[arg(long, default_value = "all")]
        writer: String,
        /// Nodes never to choose (comma-separated names).
        #[arg(long, value_delimiter = ',')]
        exclude: Vec<String>,
        /// Seed of the random source.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Example pipelines to print.
        #[arg(long, default_value_t = 8)]
        examples: usize,
    },
    /// Emulate a WAN DCI link: relay UDP from --listen to --target with a one-way delay, a
    /// rate cap with a bounded queue, and random loss, in both directions.
    DciEmu(strait_tools::helpers::DciEmuArgs),
    /// Write a file into the local cluster (blocks placed by spec); prints the manifest.
    Put {
        /// The file.
        file: PathBuf,
        /// Cluster work directory.
        #[arg(long, default_value = "target/strait-cluster")]
        dir: PathBuf,
        /// Replication spec.
        #[arg(long, default_value = "2+2")]
        spec: ReplicationSpec,
        /// Write mode: sync (both IDCs before the ack) or async (the local IDC; the
        /// pipeline head queues the remote copy).
        #[arg(long, value_enum, default_value_t = Mode::Sync)]
        mode: Mode,
        /// The client's IDC.
        #[arg(long, default_value = "idc-a")]
        from: String,
        /// Bytes per block.
        #[arg(long, default_value = "64MiB", value_parser = parse_size)]
        block_size: u64,
        /// When each block's pipeline is set up: with its first packet (one round trip
        /// through the pipeline, across the DCI too, for a small block) or when its writer
        /// is made.
        #[arg(long, value_enum, default_value_t = SetupAt::WithData)]
        setup: SetupAt,
        /// Where to write the manifest (default: FILE.strait).
        #[arg(long)]
        manifest: Option<PathBuf>,
    },
    /// Read the blocks of a manifest back from the local cluster.
    Get {
        /// The manifest written by `put`.
        manifest: PathBuf,
        /// Cluster work directory.
        #[arg(long, default_value = "target/strait-cluster")]
        dir: PathBuf,
        /// The client's IDC.
        #[arg(long, default_value = "idc-a")]
        from: String,
        /// Output file.
        #[arg(long)]
        out: PathBuf,
    },
    /// The main job: start a local 2-IDC x 4-node cluster behind emulated DCI links, write
    /// sync and async data, read from each IDC, stop and restore a whole IDC, print a
    /// table, clean up.
    Demo {
        /// Work directory (emptied first).
        #[arg(long, default_value = "target/strait-demo")]
        dir: PathBuf,
        /// Bytes per data set.
        #[arg(long, default_value = "256MiB", value_parser = parse_size)]
        set: u64,
        /// Bytes per block (HDFS uses 128 MiB; blocks are written one after another).
        #[arg(long, default_value = "64MiB", value_parser = parse_size)]
        block_size: u64,
        /// Write an SVG chart of DCI throughput per class here, and one of the RPO beside
        /// it (NAME-rpo.svg).
        #[arg(long)]
        plot: Option<PathBuf>,
    },
    /// Run a storage node (the daemon) from a TOML configuration file, until
    /// SIGTERM or SIGINT. Same as `cargo run --example daemon -- --config FILE`.
    Node(strait_tools::helpers::NodeArgs),
    /// Start or stop a local multi-IDC cluster of daemons behind DCI emulators.
    Cluster {
        #[command(subcommand)]
        action: ClusterAction,
    },
    /// Check replicas; exits 1 if anything is wrong. With --store: verify every replica
    /// of a (stopped) store and report the corrupt ones. With --manifest: ask every node
    /// of the running local cluster for each block of the manifest and report
    /// under-replicated, missing and corrupt blocks.
    Fsck {
        /// The store's directory.
        #[arg(
            long,
            conflicts_with = "manifest",
            required_unless_present = "manifest"
        )]
        store: Option<PathBuf>,
        /// IO backend: auto, uring, psync.
        #[arg(long, default_value = "auto")]
        backend: strait::store::BackendKind,
        /// A manifest written by `put`.
        #[arg(long)]
        manifest: Option<PathBuf>,
        /// Cluster work directory (with --manifest).
        #[arg(long, default_value = "target/strait-cluster")]
        dir: PathBuf,
        /// The client's IDC (with --manifest).
        #[arg(long, default_value = "idc-a")]
        from: String,
        /// With --manifest: also read every replica whole and verify it.
        #[arg(long)]
        verify: bool,
    },
    /// Restore every block of a manifest to its replica set on the running local cluster:
    /// each under-replicated block is repaired by a live holder (same IDC first, across
    /// the DCI only when an IDC has no replica left); prints what was copied over which
    /// tier and rewrites the manifest with the replicas as they are now. Exits 1 if a
    /// block could not be restored.
    Repair {
        /// The manifest written by `put` (rewritten in place).
        #[arg(long)]
        manifest: PathBuf,
        /// Cluster work directory.
        #[arg(long, default_value = "target/strait-cluster")]
        dir: PathBuf,
        /// The client's IDC.
        #[arg(long, default_value = "idc-a")]
        from: String,
    },
    /// Certificates. With `--out`: a CA and every identity of a topology on this host (a
    /// local or test cluster). On real hosts: `ca` on the CA's host, `request` on each
    /// node's (its key never leaves it), `sign` back on the CA's.
    #[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
    Certs {
        #[command(subcommand)]
        action: Option<CertsAction>,
        /// Topology file (TOML).
        #[arg(long, default_value = "examples/two-idc.toml")]
        topology: PathBuf,
        /// Output directory for the CA certificate and the node (and client) identities.
        #[arg(long, required = true)]
        out: Option<PathBuf>,
        /// Where the CA key goes (default: `ca.key` beside the output directory, not in
        /// it, so that the directory can be handed to nodes).
        #[arg(long)]
        ca_key: Option<PathBuf>,
        /// Names (in the topology) that get a client certificate: they may read, write new
        /// blocks and recover their own writes, but not relay, copy or replace replicas.
        #[arg(long, value_delimiter = ',')]
        clients: Vec<String>,
    },
}

#[derive(Subcommand)]
enum CertsAction {
    /// A new cluster CA in DIR: ca.pem (for every node) and ca.key (stays on this host).
    Ca {
        /// Directory for ca.pem and ca.key.
        #[arg(long)]
        out: PathBuf,
    },
    /// On a node's host: NODE.key (stays here) and NODE.csr (send it to the CA's host).
    Request {
        /// The node's name in the topology.
        #[arg(long)]
        node: String,
        /// Directory for the key and the request.
        #[arg(long)]
        out: PathBuf,
    },
    /// On the CA's host: a certificate for a request, with a role and a validity period.
    /// Renewal: sign a fresh request, replace the node's files, send the daemon SIGHUP.
    Sign {
        /// The certificate request (from `certs request`).
        #[arg(long)]
        csr: PathBuf,
        /// Directory holding ca.pem and ca.key.
        #[arg(long)]
        ca: PathBuf,
        /// `node` (relays, copies, replaces replicas) or `client` (reads, writes new
        /// blocks, recovers its own writes).
        #[arg(long, value_enum, default_value_t = Role::Node)]
        role: Role,
        /// How long the certificate is valid.
        #[arg(long, default_value = "365d", value_parser = parse_duration)]
        valid_for: std::time::Duration,
        /// Where the certificate goes (PEM).
        #[arg(long)]
        out: PathBuf,
    },
}

/// Role of a certificate.
#[derive(Clone, Copy, clap::ValueEnum)]
enum Role {
    Node,
    Client,
}

#[derive(Subcommand)]
enum ClusterAction {
    /// Generate certificates and configurations, start the emulators and daemons, wait
    /// until all are healthy.
    Up {
        /// Work directory (created).
        #[arg(long, default_value = "target/strait-cluster")]
        dir: PathBuf,
        /// Number of IDCs.
        #[arg(long, default_value_t = 2)]
        idcs: usize,
        /// Racks per IDC.
        #[arg(long, default_value_t = 2)]
        racks: usize,
        /// Nodes per rack.
        #[arg(long, default_value_t = 2)]
        nodes_per_rack: usize,
        /// DCI budget (and emulated rate) per direction.
        #[arg(long, default_value = "1gbit", value_parser = parse_rate)]
        dci_rate: u64,
        /// One-way DCI delay.
        #[arg(long, default_value = "5ms", value_parser = parse_duration)]
        dci_delay: std::time::Duration,
    },
    /// Stop exactly the processes `up` started.
    Down {
        /// Work directory.
        #[arg(long, default_value = "target/strait-cluster")]
        dir: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // In-process nodes (put, get, demo, repair) log warnings; the daemon logs from info.
    strait_tools::cli::init_logging(if matches!(cli.command, Command::Node(_)) {
        "info"
    } else {
        "warn"
    });
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => f.exit("strait"),
    }
}

/// A topology file, or a usage error naming it.
fn topology_file(path: &std::path::Path) -> Result<Topology, Failure> {
    Topology::from_file(path).map_err(|e| Failure::Usage(format!("{}: {e}", path.display())))
}

/// A file the user named, or a usage error naming it.
fn read_input(path: &std::path::Path) -> Result<String, Failure> {
    std::fs::read_to_string(path).map_err(|e| Failure::Usage(format!("{}: {e}", path.display())))
}

fn runtime() -> Result<tokio::runtime::Runtime, Failure> {
    tokio::runtime::Runtime::new().map_err(|e| Failure::CannotRun(e.to_string()))
}

fn run(cli: Cli) -> Result<(), Failure> {
    match cli.command {
        Command::DciEmu(args) => Ok(strait_tools::helpers::run_dci_emu(args)?),
        Command::Put {
            file,
            dir,
            spec,
            mode,
            from,
            block_size,
            setup,
            manifest,
        } => {
            let rt = runtime()?;
            let r = rt.block_on(strait_tools::client::put(
                &dir,
                &file,
                &spec,
                mode.into(),
                &from,
                block_size,
                setup == SetupAt::WithData,
            ))?;
            let path = manifest.unwrap_or_else(|| file.with_extension("strait"));
            std::fs::write(&path, &r.manifest).map_err(|e| format!("{}: {e}", path.display()))?;
            print!("{}", r.manifest);
            println!("{}; manifest {}", r.summary, path.display());
            Ok(())
        }
        Command::Get {
            manifest,
            dir,
            from,
            out,
        } => {
            let text = read_input(&manifest)?;
            let rt = runtime()?;
            let r = rt.block_on(strait_tools::client::get(&dir, &text, &from, &out))?;
            println!("{}; wrote {}", r.summary, out.display());
            Ok(())
        }
        Command::Demo {
            dir,
            set,
            block_size,
            plot,
        } => {
            let set =
                usize::try_from(set).map_err(|_| Failure::Usage("--set: too large".into()))?;
            let rt = runtime()?;
            let report = rt.block_on(strait_tools::demo::run(
                &dir,
                set,
                block_size,
                plot.as_deref(),
            ))?;
            print!("{report}");
            Ok(())
        }
        Command::Node(args) => strait_tools::helpers::run_node(args),
        Command::Cluster { action } => match action {
            ClusterAction::Up {
                dir,
                idcs,
                racks,
                nodes_per_rack,
                dci_rate,
                dci_delay,
            } => {
                let spec = strait_tools::cluster::ClusterSpec {
                    idcs,
                    racks,
                    nodes_per_rack,
                    dci_rate,
                    dci_delay,
                };
                let summary = strait_tools::cluster::up(&dir, &spec)?;
                print!("{summary}");
                Ok(())
            }
            ClusterAction::Down { dir } => {
                println!("{}", strait_tools::cluster::down(&dir)?);
                Ok(())
            }
        },
        Command::Fsck {
            manifest: Some(manifest),
            dir,
            from,
            verify,
            ..
        } => {
            let text = read_input(&manifest)?;
            let rt = runtime()?;
            let report = rt.block_on(strait_tools::check::fsck(&dir, &text, &from, verify))?;
            print!("{report}");
            if report.healthy() {
                Ok(())
            } else {
                Err(Failure::Found(format!(
                    "{} under-replicated block(s), {} corrupt replica(s)",
                    report.under_replicated(),
                    report.corrupt()
                )))
            }
        }
        Command::Repair {
            manifest,
            dir,
            from,
        } => {
            let text = read_input(&manifest)?;
            let rt = runtime()?;
            let run = rt.block_on(strait_tools::check::repair(&dir, &text, &from))?;
            print!("{}", run.report);
            // Atomically: a crash leaves the old manifest or the new one, never half.
            let tmp = manifest.with_extension("strait.tmp");
            std::fs::write(&tmp, &run.manifest)
                .and_then(|()| std::fs::rename(&tmp, &manifest))
                .map_err(|e| format!("{}: {e}", manifest.display()))?;
            if run.failed == 0 {
                Ok(())
            } else {
                Err(Failure::Found(format!(
                    "{} block(s) not restored",
                    run.failed
                )))
            }
        }
        Command::Fsck {
            store: Some(store),
            backend,
            ..
        } => {
            let rt = runtime()?;
            let report = rt
                .block_on(strait_tools::fsck::run(&store, backend))
                .map_err(|e| format!("fsck {}: {e}", store.display()))?;
            print!("{report}");
            if report.corrupt.is_empty() {
                Ok(())
            } else {
                Err(Failure::Found(format!(
                    "{} corrupt replica(s)",
                    report.corrupt.len()
                )))
            }
        }
        Command::Fsck { .. } => Err(Failure::Usage("fsck needs --store or --manifest".into())),
        Command::Certs {
            action: Some(action),
            ..
        } => {
            let files = match action {
                CertsAction::Ca { out } => certs::ca(&out)?,
                CertsAction::Request { node, out } => certs::request(&node, &out)?,
                CertsAction::Sign {
                    csr,
                    ca,
                    role,
                    valid_for,
                    out,
                } => {
                    let role = match role {
                        Role::Node => PeerRole::Node,
                        Role::Client => PeerRole::Client,
                    };
                    vec![certs::sign(&ca, &csr, role, valid_for, &out)?]
                }
            };
            for f in files {
                println!("wrote {}", f.display());
            }
            Ok(())
        }
        Command::Certs {
            action: None,
            topology,
            out,
            ca_key,
            clients,
        } => {
            let Some(out) = out else {
                return Err(Failure::Usage("certs needs --out or a subcommand".into()));
            };
            let topo = topology_file(&topology)?;
            if let Some(c) = clients.iter().find(|c| topo.node_by_name(c).is_none()) {
                return Err(Failure::Usage(format!(
                    "--clients: {c:?} is not in the topology"
                )));
            }
            let ca = CertAuthority::generate("strait cluster CA").map_err(|e| e.to_string())?;
            let role = |n: &str| {
                if clients.iter().any(|c| c == n) {
                    PeerRole::Client
                } else {
                    PeerRole::Node
                }
            };
            let mut files = ca
                .write_files_as(
                    &out,
                    topo.nodes()
                        .iter()
                        .map(|n| (n.name.as_str(), role(&n.name))),
                )
                .map_err(|e| e.to_string())?;
            let ca_key = ca_key.unwrap_or_else(|| {
                out.parent()
                    .unwrap_or(std::path::Path::new("."))
                    .join("ca.key")
            });
            files.push(ca.write_ca_key(&ca_key).map_err(|e| e.to_string())?);
            println!("wrote {} files to {}:", files.len(), out.display());
            for f in files {
                println!("  {}", f.display());
            }
            Ok(())
        }
        Command::Plan {
            topology,
            spec,
            blocks,
            writer,
            exclude,
            seed,
            examples,
        } => {
            let topo = topology_file(&topology)?;
            let writers = plan::parse_writer(&topo, &writer).map_err(Failure::Usage)?;
            let excluded = exclude
                .iter()
                .map(|n| {
                    topo.node_by_name(n).ok_or_else(|| {
                        Failure::Usage(format!("--exclude {n:?} is not a node of the topology"))
                    })
                })
                .collect::<Result<Vec<_>, _>>()?;
            let params = PlanParams {
                spec,
                blocks,
                writers,
                excluded,
                seed,
                examples,
            };
            let report = plan::run(&topo, &params);
            print!(
                "{}",
                Summary {
                    topology: &topo,
                    params: &params,
                    report: &report
                }
            );
            if report.placed == 0 && blocks > 0 {
                return Err(Failure::Found("no block could be placed".into()));
            }
            Ok(())
        }
    }
}

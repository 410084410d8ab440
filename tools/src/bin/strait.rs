//! `strait`: the operator's command line.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use strait::placement::ReplicationSpec;
use strait::topology::Topology;
use strait::transport::CertAuthority;
use strait_tools::plan::{self, PlanParams, Summary};

#[derive(Parser)]
#[command(
    name = "strait",
    version,
    about = "strait: block replication across data centres"
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
    /// Generate a cluster CA and one certificate per node of a topology (PEM files).
    Certs {
        /// Topology file (TOML).
        #[arg(long, default_value = "examples/two-idc.toml")]
        topology: PathBuf,
        /// Output directory.
        #[arg(long)]
        out: PathBuf,
    },
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("strait: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<(), String> {
    match cli.command {
        Command::Certs { topology, out } => {
            let topo = Topology::from_file(&topology)
                .map_err(|e| format!("{}: {e}", topology.display()))?;
            let ca = CertAuthority::generate("strait cluster CA").map_err(|e| e.to_string())?;
            let files = ca
                .write_files(&out, topo.nodes().iter().map(|n| n.name.as_str()))
                .map_err(|e| e.to_string())?;
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
            let topo = Topology::from_file(&topology)
                .map_err(|e| format!("{}: {e}", topology.display()))?;
            let writers = plan::parse_writer(&topo, &writer)?;
            let excluded = exclude
                .iter()
                .map(|n| {
                    topo.node_by_name(n)
                        .ok_or_else(|| format!("--exclude {n:?} is not a node of the topology"))
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
                return Err("no block could be placed".into());
            }
            Ok(())
        }
    }
}

//! The command-line programs of strait, as a library so that each one is testable.
//!
//! - [`plan`]: dry-run placement over a topology file and summarise where replicas land.
//! - [`bench`](mod@bench): the `strait-bench` scenarios.
//! - [`cluster`]: a local multi-IDC cluster of daemons behind DCI emulators.
//! - [`client`]: `put` and `get` against a running local cluster.
//! - [`dciemu`]: the DCI emulator (UDP relay with delay, rate cap, loss).
//! - [`fsck`]: verify every replica of a stopped store.
//! - [`certs`]: per-host certificates (CA, request, sign).
//! - [`check`]: a manifest's blocks checked against a running cluster
//!   (`fsck --manifest`) and restored to their replica sets (`repair --manifest`).
//! - [`helpers`]: the daemon and DCI-emulator subcommands a cluster is made of.
//! - [`demo`]: the main job: a local cluster through sync, async, an IDC outage and back.

pub mod bench;
pub mod certs;
pub mod check;
pub mod cli;
pub mod client;
pub mod cluster;
pub mod dciemu;
pub mod demo;
pub mod fsck;
pub mod helpers;
pub mod plan;
pub mod plot;

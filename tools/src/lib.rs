//! The command-line programs of strait, as a library so that each one is testable.
//!
//! - [`plan`]: dry-run placement over a topology file and summarise where replicas land.
//! - [`bench`]: the `strait-bench` scenarios.
//! - [`cluster`]: a local multi-IDC cluster of daemons behind DCI emulators.
//! - [`client`]: `put` and `get` against a running local cluster.
//! - [`dciemu`]: the DCI emulator (UDP relay with delay, rate cap, loss).
//! - [`fsck`]: verify every replica of a stopped store.

pub mod bench;
pub mod client;
pub mod cluster;
pub mod dciemu;
pub mod fsck;
pub mod plan;

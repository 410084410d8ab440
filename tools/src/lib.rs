//! The command-line programs of strait, as a library so that each one is testable.
//!
//! - [`plan`]: dry-run placement over a topology file and summarise where replicas land.
//! - [`bench`]: the `strait-bench` scenarios.

pub mod bench;
pub mod plan;

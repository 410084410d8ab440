//! The command-line programs of strait, as a library so that each one is testable.
//!
//! - [`plan`]: dry-run placement over a topology file and summarise where replicas land.

pub mod plan;

//! # strait
//!
//! The data plane of a block store that spans several data centres (IDCs): where block
//! replicas go (`2+2` across two IDCs), how replicated writes stream through a pipeline of
//! servers, how reads find the closest healthy replica, and how traffic between IDCs (the
//! DCI) is kept inside its budget.
//!
//! The crate is split into pure cores, which hold the logic and never do IO or read the
//! clock, and IO shells that drive them. The cores present so far:
//!
//! - [`topology`]: IDCs, racks, nodes and DCI links; distance by tier.
//! - [`placement`]: replication specs, target choice in pipeline order, read order.
//! - [`units`]: sizes, rates and durations as operators write them.
//! - [`block`]: block ids, generation stamps, CRC32C chunk checksums.
//! - [`wire`]: the framed, versioned protocol between nodes.
//! - [`dci`]: the per-link bandwidth governor (core and shell) and zstd on DCI hops.
//!
//! And the shells:
//!
//! - [`store`]: block replicas on local disk (io_uring or psync), crash recovery.
//! - [`transport`]: QUIC and TLS-over-TCP links with mutual TLS, framed streams.
//! - [`node`]: the storage server a process embeds; [`config`] reads its TOML file and
//!   [`daemon`] runs it until SIGTERM.
//! - [`pipeline`]: replicated writes through a pipeline, and their recovery.
//! - [`read`]: locality-ordered, verified, hedged reads.
//! - [`metrics`]: Prometheus text exposition and a `/metrics` endpoint.
//! - [`replication`]: async writes' durable log, remote copies and RPO.
//! - [`repair`]: lost replicas noticed without a scan (peer probes, pipeline recovery,
//!   corrupt reads) and restored from the nearest holder through a durable queue.
//!
//! strait does not include a metadata service: which blocks exist and where their
//! replicas live is the embedding server's business; strait decides, moves and stores.

pub mod bandwidth;
pub mod block;
pub mod config;
mod context;
pub mod daemon;
pub mod dci;
pub mod metrics;
pub mod node;
pub mod pipeline;
pub mod placement;
pub mod read;
pub mod repair;
pub mod replication;
pub mod scheduler;
pub mod store;
pub mod topology;
pub mod transfer;
pub mod transport;
pub mod units;
pub mod wire;

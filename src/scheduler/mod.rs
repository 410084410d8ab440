//! The transfer scheduler's cores: where copies come from and how the DCI budget is
//! shared. Pure: no runtime, no clock (every call that needs time takes `now`).
//!
//! - [`route`]: source and route choice on the topology's tiers (node < rack switch <
//!   IDC < DCI) for async replication, the spare copy and repair: fewest high tiers,
//!   one DCI crossing per remote IDC, load spread over sources.
//! - [`gang`]: all-or-nothing admission of write pipelines (write slots per node,
//!   immediate refusal, jittered retries until a deadline: no hold-and-wait, no deadlock).
//! - [`repair`]: peer liveness from probes, which survivor repairs a lost replica, and
//!   where the new replica goes (rack spread, the same answer on every holder).
//! - [`shares`]: cluster-wide DCI shares. Members of a link report demand per class; an
//!   allocator answers with leased grants, weighted max-min fair in class priority order
//!   (reserved before spot); the sum of what members use stays within the budget at every
//!   instant, including while grants change and when the allocator dies.
//! - [`tenants`]: tenant quotas on a link (guarantee, deserved, capability: Volcano's
//!   queue semantics), idle quota lent and taken back. Not yet wired into `shares`.

pub mod gang;
pub mod repair;
pub mod route;
pub mod shares;
pub mod tenants;

pub use gang::{Admission, Slots};
pub use route::{CopyPlan, Leg, SourceLoad, choose_source, plan_copy};
pub use shares::{Allocator, Demand, Grant, Lease, Provisioning, SharesConfig, SharesError};

//! Cluster-wide DCI shares: one allocator per link direction turns the demand its
//! senders report into rates, in the spirit of Google's BwE. Pure: every call takes `now`.
//!
//! **Fairness.** Demand is reported per (class, provisioning) with a weight. The
//! allocator serves levels in priority order — every `reserved` level before any `spot`
//! one, and inside each `sync > read > async > repair` — and inside a level gives
//! weighted max-min fair rates (water-filling) from what the higher levels left.
//!
//! **Safety.** Every member always owns a *floor*: an equal part of
//! [`SharesConfig::floor`] of the budget, usable with no grant at all. A grant gives a
//! member its floor plus a part of the rest and is valid for one *lease* from the moment
//! the member asked (the member's clock; it asked before the allocator answered, so the
//! member stops using it no later than the allocator stops counting it). The allocator
//! counts each member as holding the largest of its floor and every grant it issued that
//! has neither expired nor been superseded (the member reports which grant it applies),
//! and never issues a grant that would make those holdings add up to more than the
//! budget. So the sum of the rates members actually use stays within the budget at every
//! instant: while grants change (a decrease counts until the member confirms it, an
//! increase only uses room nobody holds), when reports or grants are lost, and when the
//! allocator dies (grants run out, members fall back to their floors). A new allocator
//! learns of grants an old one issued from the members' reports ([`Holding`]: rate and
//! lease left), and grants only floors until every member has reported or one lease has
//! passed (a silent member may still hold an old grant until then).
//!
//! Call order: [`Allocator::handle_report`] per report, returning the grant to send
//! back. A member holds its grant in a [`Lease`]: [`Lease::handle_grant`] on each answer,
//! [`Lease::rate`] whenever it configures its governor, [`Lease::holding`] in its next
//! report.
//!
//! **Two allocators.** A partial partition can leave two allocators serving one link at
//! once, each with the members that reach it. Each counts a member that has not reported
//! to it within a lease at an *equal share* of the budget (budget / members), not at its
//! floor: whatever one allocator grants its own reporters fits in the equal shares of
//! those reporters, so the sets of two allocators add up to at most the budget. This
//! needs the sets to be disjoint, which the member side keeps: a member reports to a new
//! allocator only once a lease has passed since it last reported to another one (it runs
//! at its floor meanwhile). The price: a member that is down, or reports to another
//! allocator, holds its equal share of the link idle until it reports again or leaves
//! the topology. Members report every period whether they send or not, so a live idle
//! member costs only its floor.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use super::tenants::Quota;
use crate::topology::NodeId;
use crate::wire::TrafficClass;

/// Whether a transfer is guaranteed or runs on idle capacity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Provisioning {
    /// Served first; a spot transfer never takes its rate.
    Reserved = 0,
    /// Uses what reserved demand leaves and yields first.
    Spot = 1,
}

impl Provisioning {
    /// Both, in priority order.
    pub const ALL: [Provisioning; 2] = [Provisioning::Reserved, Provisioning::Spot];
}

/// One entry of a member's demand: bytes per second it could use in `class`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Demand {
    /// Purpose of the traffic.
    pub class: TrafficClass,
    /// Reserved or spot.
    pub provisioning: Provisioning,
    /// Bytes per second wanted.
    pub rate: u64,
    /// Relative weight among demands of the same level (at least 1).
    pub weight: u32,
}

/// Configuration of one link direction's allocator.
#[derive(Debug, Clone, PartialEq)]
pub struct SharesConfig {
    /// The link's budget, bytes per second.
    pub budget: u64,
    /// Fraction (0..1) of the budget split equally among members as floors: what a
    /// member may always use. Larger floors keep traffic moving while no allocator
    /// answers; smaller ones let a single sender get closer to the whole budget.
    pub floor: f64,
    /// How long a grant is valid.
    pub lease: Duration,
    /// The nodes that send on this link.
    pub members: Vec<NodeId>,
    /// Tenant quotas (empty: no tenants). Members in no group form one more tenant with
    /// no guarantee, the deserved part the groups leave, and the whole link as its
    /// capability.
    pub tenants: Vec<TenantGroup>,
}

/// The members of one tenant and its quota on the link (see [`super::tenants`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TenantGroup {
    /// Its nodes.
    pub members: Vec<NodeId>,
    /// Its quota, bytes per second.
    pub quota: Quota,
}

impl SharesConfig {
    /// Defaults for a link of `budget` bytes/s shared by `members`: 2 % in floors, a
    /// 1 s lease, no tenants.
    pub fn new(budget: u64, members: Vec<NodeId>) -> Self {
        SharesConfig {
            budget,
            floor: 0.02,
            lease: Duration::from_secs(1),
            members,
            tenants: Vec::new(),
        }
    }

    /// The tenants as the allocator divides among them: the configured groups, then the
    /// members of none (when there are any). Empty without tenants.
    fn tenant_groups(&self) -> Vec<TenantGroup> {
        if self.tenants.is_empty() {
            return Vec::new();
        }
        let mut groups = self.tenants.clone();
        let rest: Vec<NodeId> = self
            .members
            .iter()
            .copied()
            .filter(|m| !self.tenants.iter().any(|g| g.members.contains(m)))
            .collect();
        if !rest.is_empty() {
            let deserved: u64 = self.tenants.iter().map(|g| g.quota.deserved).sum();
            groups.push(TenantGroup {
                members: rest,
                quota: Quota {
                    guarantee: 0,
                    deserved: self.budget.saturating_sub(deserved).max(1),
                    capability: self.budget,
                },
            });
        }
        groups
    }

    /// The floor of one member, bytes per second.
    pub fn floor_rate(&self) -> u64 {
        let n = self.members.len().max(1) as f64;
        ((self.budget as f64) * self.floor.clamp(0.0, 1.0) / n) as u64
    }

    /// An equal part of the budget: what the allocator counts a member at while that
    /// member does not report to it (see the module doc, *Two allocators*).
    pub fn equal_share(&self) -> u64 {
        // Rounded up: the equal shares of all members cover the whole budget.
        self.budget.div_ceil(self.members.len().max(1) as u64)
    }
}

/// A refusal from the allocator.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SharesError {
    /// The reporter does not send on this link.
    #[error("node {0:?} is not a member of this link")]
    NotMember(NodeId),
    /// The configuration cannot work.
    #[error("bad shares configuration: {0}")]
    BadConfig(&'static str),
}

/// What a member may send, and for how long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grant {
    /// Identifies the allocator instance that issued it.
    pub epoch: u64,
    /// Increases with every grant of that allocator.
    pub seq: u64,
    /// Total rate, bytes per second (the floor included).
    pub rate: u64,
    /// Of `rate`, what each class (in [`TrafficClass::ALL`] order) was given; the rest is the
    /// floor and rounding, usable by any class.
    pub per_class: [u64; 4],
    /// Validity, counted by the member from when it sent its report.
    pub lease: Duration,
}

/// The grant a member applies when it reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Holding {
    /// The allocator instance that issued it.
    pub epoch: u64,
    /// Its sequence number.
    pub seq: u64,
    /// Its rate, bytes per second.
    pub rate: u64,
    /// Lease left when the report was sent.
    pub remaining: Duration,
}

#[derive(Debug, Default)]
struct Member {
    demand: Vec<Demand>,
    reported: Option<Instant>,
    /// Issued, not expired, not superseded: (seq, rate, expires).
    outstanding: Vec<(u64, u64, Instant)>,
}

/// The allocator of one link direction. See the module doc for the call order.
#[derive(Debug)]
pub struct Allocator {
    config: SharesConfig,
    epoch: u64,
    seq: u64,
    quiet_until: Instant,
    quiet: bool,
    members: BTreeMap<NodeId, Member>,
    /// When the last report came in (`None`: none yet).
    last_report: Option<Instant>,
}

impl Allocator {
    /// A new allocator instance `epoch` (distinct from any earlier instance's) starting
    /// at `now`; it grants only floors until every member has reported or one lease has
    /// passed.
    pub fn new(config: SharesConfig, epoch: u64, now: Instant) -> Result<Self, SharesError> {
        if config.budget == 0 {
            return Err(SharesError::BadConfig("budget is zero"));
        }
        if config.members.is_empty() {
            return Err(SharesError::BadConfig("no members"));
        }
        if !(0.0..1.0).contains(&config.floor) {
            return Err(SharesError::BadConfig("floor must be in 0..1"));
        }
        if config.lease.is_zero() {
            return Err(SharesError::BadConfig("lease is zero"));
        }
        let quotas: Vec<Quota> = config.tenants.iter().map(|g| g.quota).collect();
        if super::tenants::validate(config.budget, &quotas).is_err() {
            return Err(SharesError::BadConfig(
                "tenant quotas out of order or guarantees over the budget",
            ));
        }
        if config.tenants.iter().enumerate().any(|(i, g)| {
            config.tenants[..i]
                .iter()
                .any(|o| o.members.iter().any(|m| g.members.contains(m)))
        }) {
            return Err(SharesError::BadConfig("a member is in two tenants"));
        }
        let members = config
            .members
            .iter()
            .map(|&m| (m, Member::default()))
            .collect();
        Ok(Allocator {
            quiet_until: now + config.lease,
            quiet: true,
            last_report: None,
            config,
            epoch,
            seq: 0,
            members,
        })
    }

    /// The configuration in force.
    pub fn config(&self) -> &SharesConfig {
        &self.config
    }

    /// Takes `node`'s report (its demand now, and the grant it applies) and returns its
    /// new grant. A grant of another allocator instance counts as held until its lease
    /// would run out.
    pub fn handle_report(
        &mut self,
        node: NodeId,
        demand: &[Demand],
        holding: Option<Holding>,
        now: Instant,
    ) -> Result<Grant, SharesError> {
        let epoch = self.epoch;
        if !self.members.contains_key(&node) {
            return Err(SharesError::NotMember(node));
        }
        // An instance nobody reported to for a lease (members went elsewhere, say while
        // this node was unreachable) knows nothing of the grants issued meanwhile: it
        // starts over quiet, as a new instance would.
        if self
            .last_report
            .is_some_and(|t| now.saturating_duration_since(t) >= self.config.lease)
        {
            self.quiet = true;
            self.quiet_until = now + self.config.lease;
            for m in self.members.values_mut() {
                m.reported = None;
            }
        }
        self.last_report = Some(self.last_report.map_or(now, |t| t.max(now)));
        let Some(m) = self.members.get_mut(&node) else {
            return Err(SharesError::NotMember(node));
        };
        m.demand = demand.to_vec();
        m.reported = Some(now);
        match holding {
            Some(h) if h.epoch == epoch => {
                m.outstanding.retain(|&(s, _, _)| s >= h.seq);
                // A member may hold less than it was granted (it gave some back).
                for e in m.outstanding.iter_mut().filter(|e| e.0 == h.seq) {
                    e.1 = e.1.min(h.rate);
                }
            }
            // Another instance's grant: held (as seq 0) until it lapses.
            Some(h) => {
                m.outstanding.retain(|&(s, _, _)| s != 0);
                m.outstanding.push((0, h.rate, now + h.remaining));
            }
            None => {}
        }
        for m in self.members.values_mut() {
            m.outstanding.retain(|&(_, _, exp)| exp > now);
        }
        let floor = self.config.floor_rate();
        if self.quiet
            && (now >= self.quiet_until || self.members.values().all(|m| m.reported.is_some()))
        {
            self.quiet = false;
        }
        let (rate, per_class) = if self.quiet {
            (floor, [0; 4])
        } else {
            let ideal = self.ideal(now);
            let (want, per_class) = ideal.get(&node).copied().unwrap_or((floor, [0; 4]));
            let others: u64 = self
                .members
                .iter()
                .filter(|(id, _)| **id != node)
                .map(|(_, m)| held(m, self.least(m, now), now))
                .sum();
            let room = self.config.budget.saturating_sub(others).max(floor);
            let rate = want.min(room);
            // Scale the class parts down with the rate.
            let extra_want = want - floor;
            let extra = rate - floor;
            let per_class = per_class.map(|c| {
                if extra_want == 0 {
                    0
                } else {
                    ((c as u128 * extra as u128) / extra_want as u128) as u64
                }
            });
            (rate, per_class)
        };
        self.seq += 1;
        let lease = self.config.lease;
        if let Some(m) = self.members.get_mut(&node) {
            m.outstanding.push((self.seq, rate, now + lease));
        }
        Ok(Grant {
            epoch,
            seq: self.seq,
            rate,
            per_class,
            lease,
        })
    }

    /// What the allocator counts `node` as holding now: the largest of its floor and its
    /// outstanding grants.
    pub fn held(&self, node: NodeId, now: Instant) -> u64 {
        self.members
            .get(&node)
            .map_or(0, |m| held(m, self.least(m, now), now))
    }

    /// The least a member counts for: its floor while it reports to this allocator, an
    /// equal share while it does not (module doc, *Two allocators*).
    fn least(&self, m: &Member, now: Instant) -> u64 {
        if m.reported.is_some_and(|t| now < t + self.config.lease) {
            self.config.floor_rate()
        } else {
            self.config.equal_share().max(self.config.floor_rate())
        }
    }

    /// The rate each member would get if every grant could change at once: floor plus a
    /// fair part of the rest, by level. Members that have not reported within a lease
    /// count as idle, and their equal shares are not handed out. Returns (total,
    /// per-class extra) per member.
    ///
    /// With tenants, what is left above the floors is first divided among the tenants by
    /// their quotas and total demand ([`super::tenants::divide`]), then each tenant's
    /// part among its members, level by level as without tenants.
    pub fn ideal(&self, now: Instant) -> BTreeMap<NodeId, (u64, [u64; 4])> {
        let floor = self.config.floor_rate();
        let reserved: u64 = self.members.values().map(|m| self.least(m, now)).sum();
        let left = self.config.budget.saturating_sub(reserved);
        let mut out: BTreeMap<NodeId, (u64, [u64; 4])> = self
            .members
            .keys()
            .map(|&id| (id, (floor, [0; 4])))
            .collect();
        let groups = self.config.tenant_groups();
        if groups.is_empty() {
            self.fill(left, |_| true, &mut out, now);
            return out;
        }
        let demand: Vec<u64> = groups
            .iter()
            .map(|g| {
                g.members
                    .iter()
                    .filter_map(|id| self.members.get(id))
                    .filter(|m| m.reported.is_some_and(|t| now < t + self.config.lease))
                    .flat_map(|m| m.demand.iter().map(|d| d.rate))
                    .fold(0u64, u64::saturating_add)
                    .min(self.config.budget)
            })
            .collect();
        let quotas: Vec<Quota> = groups.iter().map(|g| g.quota).collect();
        let parts = super::tenants::divide(left, &quotas, &demand);
        for (g, part) in groups.iter().zip(parts) {
            self.fill(part, |id| g.members.contains(&id), &mut out, now);
        }
        out
    }

    /// Adds to `out` the parts of `left` that the members `in_scope` get, level by level
    /// (weighted max-min fair inside each).
    fn fill(
        &self,
        mut left: u64,
        in_scope: impl Fn(NodeId) -> bool,
        out: &mut BTreeMap<NodeId, (u64, [u64; 4])>,
        now: Instant,
    ) {
        for prov in Provisioning::ALL {
            for (ci, class) in TrafficClass::ALL.iter().enumerate() {
                if left == 0 {
                    return;
                }
                let mut level = Vec::new();
                for (&id, m) in &self.members {
                    let fresh = m.reported.is_some_and(|t| now < t + self.config.lease);
                    if !fresh || !in_scope(id) {
                        continue;
                    }
                    let (rate, weight) = m
                        .demand
                        .iter()
                        .filter(|d| d.class == *class && d.provisioning == prov)
                        .fold((0u64, 0u32), |(r, w), d| {
                            (r.saturating_add(d.rate), w.max(d.weight.max(1)))
                        });
                    if rate > 0 {
                        level.push((id, rate, weight));
                    }
                }
                let shares = max_min_fair(
                    left,
                    &level.iter().map(|&(_, r, w)| (r, w)).collect::<Vec<_>>(),
                );
                for ((id, _, _), got) in level.iter().zip(shares) {
                    if let Some(e) = out.get_mut(id) {
                        e.0 += got;
                        e.1[ci] += got;
                    }
                    left -= got;
                }
            }
        }
    }
}

/// The largest of `least` and the member's unexpired grants.
fn held(m: &Member, least: u64, now: Instant) -> u64 {
    m.outstanding
        .iter()
        .filter(|&&(_, _, exp)| exp > now)
        .map(|&(_, r, _)| r)
        .max()
        .unwrap_or(0)
        .max(least)
}

/// Weighted max-min fair division of `capacity` among `(demand, weight)` pairs
/// (water-filling): nobody gets more than it asks, and whoever gets less than it asks
/// gets at least its weight's part of what the others did not take. The parts add up to
/// at most `capacity` (exactly, when the demands exceed it).
pub fn max_min_fair(capacity: u64, demands: &[(u64, u32)]) -> Vec<u64> {
    let mut out = vec![0u64; demands.len()];
    let mut active: Vec<usize> = (0..demands.len()).filter(|&i| demands[i].0 > 0).collect();
    let mut left = capacity;
    while !active.is_empty() && left > 0 {
        let total_w: u128 = active
            .iter()
            .map(|&i| u128::from(demands[i].1.max(1)))
            .sum();
        // Everyone whose remaining demand fits under its part of the water level is
        // satisfied; if none, split what is left by weight and stop.
        let mut satisfied = Vec::new();
        for &i in &active {
            let part = (left as u128 * u128::from(demands[i].1.max(1)) / total_w) as u64;
            if demands[i].0 - out[i] <= part {
                satisfied.push(i);
            }
        }
        if satisfied.is_empty() {
            let mut given = 0;
            for &i in &active {
                let part = (left as u128 * u128::from(demands[i].1.max(1)) / total_w) as u64;
                out[i] += part;
                given += part;
            }
            // Rounding leftovers, one byte each, in order.
            let mut rest = left - given;
            for &i in &active {
                if rest == 0 {
                    break;
                }
                out[i] += 1;
                rest -= 1;
            }
            break;
        }
        for &i in &satisfied {
            left -= demands[i].0 - out[i];
            out[i] = demands[i].0;
        }
        active.retain(|i| !satisfied.contains(i));
    }
    out
}

/// A member's side of its lease: which grant is in force and when it lapses.
#[derive(Debug, Clone)]
pub struct Lease {
    floor: u64,
    current: Option<(Grant, Instant)>,
}

impl Lease {
    /// A member with no grant yet: it may use `floor` bytes per second.
    pub fn new(floor: u64) -> Self {
        Lease {
            floor,
            current: None,
        }
    }

    /// Changes the floor (the link's budget or membership changed).
    pub fn set_floor(&mut self, floor: u64) {
        self.floor = floor;
    }

    /// Takes the answer to the report sent at `sent_at`. The member sends one report at
    /// a time, so the newest answer is the one in force.
    pub fn handle_grant(&mut self, grant: Grant, sent_at: Instant) {
        self.current = Some((grant, sent_at + grant.lease));
    }

    /// The grant in force at `now`, if its lease runs.
    pub fn grant(&self, now: Instant) -> Option<&Grant> {
        self.current
            .as_ref()
            .filter(|(_, until)| now < *until)
            .map(|(g, _)| g)
    }

    /// Gives back what the grant in force allows above `rate` (never below the floor):
    /// the member uses at most that from now on, and its next report says so, which
    /// frees the rest for others at once instead of a report later.
    pub fn cap(&mut self, rate: u64) {
        let floor = self.floor;
        if let Some((g, _)) = self.current.as_mut() {
            g.rate = g.rate.min(rate.max(floor));
        }
    }

    /// The rate the member may use at `now`: its grant's, or its floor once that lapsed.
    pub fn rate(&self, now: Instant) -> u64 {
        self.grant(now).map_or(self.floor, |g| g.rate)
    }

    /// When the grant in force lapses, if one is.
    pub fn expires(&self, now: Instant) -> Option<Instant> {
        self.current
            .as_ref()
            .filter(|(_, until)| now < *until)
            .map(|(_, u)| *u)
    }

    /// What to put in the next report.
    pub fn holding(&self, now: Instant) -> Option<Holding> {
        self.current
            .as_ref()
            .filter(|(_, until)| now < *until)
            .map(|(g, until)| Holding {
                epoch: g.epoch,
                seq: g.seq,
                rate: g.rate,
                remaining: *until - now,
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MB: u64 = 1_000_000;

    fn members(n: u32) -> Vec<NodeId> {
        (0..n as usize).map(NodeId::from_index).collect()
    }

    fn want(class: TrafficClass, rate: u64) -> Vec<Demand> {
        vec![Demand {
            class,
            provisioning: Provisioning::Reserved,
            rate,
            weight: 1,
        }]
    }

    fn holds(g: &Grant) -> Option<Holding> {
        Some(Holding {
            epoch: g.epoch,
            seq: g.seq,
            rate: g.rate,
            remaining: g.lease,
        })
    }

    /// An allocator past its quiet lease, every member just reported no demand (live
    /// members report every period, sending or not).
    fn warm(cfg: SharesConfig, t0: Instant) -> (Allocator, Instant) {
        let now = t0 + cfg.lease;
        let members = cfg.members.clone();
        let mut a = Allocator::new(cfg, 1, t0).unwrap();
        for m in members {
            a.handle_report(m, &[], None, now).unwrap();
        }
        (a, now)
    }

    #[test]
    fn water_filling_is_weighted_and_never_gives_more_than_asked() {
        assert_eq!(
            max_min_fair(100, &[(10, 1), (100, 1), (100, 1)]),
            vec![10, 45, 45]
        );
        assert_eq!(max_min_fair(90, &[(100, 1), (100, 2)]), vec![30, 60]);
        assert_eq!(max_min_fair(100, &[(10, 1), (20, 1)]), vec![10, 20]);
        assert_eq!(max_min_fair(0, &[(10, 1)]), vec![0]);
        assert_eq!(
            max_min_fair(7, &[(100, 1), (100, 1)]).iter().sum::<u64>(),
            7
        );
    }

    #[test]
    fn a_single_sender_gets_all_but_the_idle_floors() {
        let t0 = Instant::now();
        let cfg = SharesConfig::new(125 * MB, members(8));
        let (mut a, now) = warm(cfg, t0);
        let g = a
            .handle_report(
                NodeId::from_index(3),
                &want(TrafficClass::Sync, u64::MAX / 4),
                None,
                now,
            )
            .unwrap();
        assert!(g.rate as f64 >= 0.96 * 125.0 * MB as f64, "{}", g.rate);
        assert_eq!(g.per_class[0] + a.config().floor_rate(), g.rate);
    }

    #[test]
    fn classes_are_served_in_priority_order_and_reserved_before_spot() {
        let t0 = Instant::now();
        let cfg = SharesConfig {
            floor: 0.0,
            ..SharesConfig::new(100 * MB, members(3))
        };
        let (mut a, now) = warm(cfg, t0);
        let (n0, n1, n2) = (
            NodeId::from_index(0),
            NodeId::from_index(1),
            NodeId::from_index(2),
        );
        a.handle_report(n0, &want(TrafficClass::Repair, 100 * MB), None, now)
            .unwrap();
        let spot_sync = [Demand {
            class: TrafficClass::Sync,
            provisioning: Provisioning::Spot,
            rate: 100 * MB,
            weight: 1,
        }];
        a.handle_report(n2, &spot_sync, None, now).unwrap();
        a.handle_report(n1, &want(TrafficClass::Sync, 70 * MB), None, now)
            .unwrap();
        let ideal = a.ideal(now);
        assert_eq!(ideal[&n1].0, 70 * MB, "reserved sync first");
        assert_eq!(ideal[&n0].0, 30 * MB, "then reserved repair");
        assert_eq!(ideal[&n2].0, 0, "spot gets nothing left");
    }

    #[test]
    fn a_decrease_counts_until_confirmed_and_the_increase_follows() {
        let t0 = Instant::now();
        let cfg = SharesConfig {
            floor: 0.0,
            ..SharesConfig::new(100 * MB, members(2))
        };
        let (mut a, mut now) = warm(cfg, t0);
        let (n0, n1) = (NodeId::from_index(0), NodeId::from_index(1));
        let g0 = a
            .handle_report(n0, &want(TrafficClass::Async, 100 * MB), None, now)
            .unwrap();
        assert_eq!(g0.rate, 100 * MB);
        // n1 shows up: it is owed half, but n0 still holds all of it.
        now += Duration::from_millis(100);
        let g1 = a
            .handle_report(n1, &want(TrafficClass::Async, 100 * MB), None, now)
            .unwrap();
        assert_eq!(g1.rate, 0);
        // n0 reports again: its grant drops to half, still counted at 100 until confirmed.
        let g0b = a
            .handle_report(n0, &want(TrafficClass::Async, 100 * MB), holds(&g0), now)
            .unwrap();
        assert_eq!(g0b.rate, 50 * MB);
        let g1b = a
            .handle_report(n1, &want(TrafficClass::Async, 100 * MB), holds(&g1), now)
            .unwrap();
        assert_eq!(g1b.rate, 0, "n0 has not confirmed its decrease");
        a.handle_report(n0, &want(TrafficClass::Async, 100 * MB), holds(&g0b), now)
            .unwrap();
        let g1c = a
            .handle_report(n1, &want(TrafficClass::Async, 100 * MB), holds(&g1b), now)
            .unwrap();
        assert_eq!(g1c.rate, 50 * MB);
    }

    #[test]
    fn what_a_member_gives_back_is_free_for_others_at_once() {
        let t0 = Instant::now();
        let cfg = SharesConfig {
            floor: 0.0,
            ..SharesConfig::new(100 * MB, members(2))
        };
        let (mut a, now) = warm(cfg, t0);
        let (n0, n1) = (NodeId::from_index(0), NodeId::from_index(1));
        let g0 = a
            .handle_report(n0, &want(TrafficClass::Async, 100 * MB), None, now)
            .unwrap();
        assert_eq!(g0.rate, 100 * MB);
        // n0 is done: it caps itself to 10 MB/s before reporting its small demand.
        let mut l0 = Lease::new(0);
        l0.handle_grant(g0, now);
        l0.cap(10 * MB);
        assert_eq!(l0.rate(now), 10 * MB);
        a.handle_report(
            n0,
            &want(TrafficClass::Async, 10 * MB),
            l0.holding(now),
            now,
        )
        .unwrap();
        let g1 = a
            .handle_report(n1, &want(TrafficClass::Async, 100 * MB), None, now)
            .unwrap();
        assert_eq!(g1.rate, 90 * MB, "no report round to wait for");
    }

    #[test]
    fn a_new_allocator_grants_only_floors_for_one_lease_and_strangers_are_refused() {
        let t0 = Instant::now();
        let cfg = SharesConfig::new(100 * MB, members(4));
        let floor = cfg.floor_rate();
        let mut a = Allocator::new(cfg, 7, t0).unwrap();
        let g = a
            .handle_report(
                NodeId::from_index(0),
                &want(TrafficClass::Sync, 100 * MB),
                None,
                t0,
            )
            .unwrap();
        assert_eq!((g.rate, g.epoch), (floor, 7));
        assert_eq!(
            a.handle_report(NodeId::from_index(9), &[], None, t0),
            Err(SharesError::NotMember(NodeId::from_index(9)))
        );
        assert!(Allocator::new(SharesConfig::new(0, members(1)), 1, t0).is_err());
    }

    #[test]
    fn a_new_allocator_counts_the_old_ones_grants_and_leaves_quiet_once_all_reported() {
        let t0 = Instant::now();
        let cfg = SharesConfig {
            floor: 0.0,
            lease: Duration::from_secs(2),
            ..SharesConfig::new(100 * MB, members(2))
        };
        let mut a = Allocator::new(cfg, 2, t0).unwrap();
        let (n0, n1) = (NodeId::from_index(0), NodeId::from_index(1));
        let old = Holding {
            epoch: 1,
            seq: 40,
            rate: 90 * MB,
            remaining: Duration::from_millis(1500),
        };
        let g0 = a
            .handle_report(n0, &want(TrafficClass::Sync, 100 * MB), Some(old), t0)
            .unwrap();
        assert_eq!(g0.rate, 0, "quiet until n1 reports");
        // n1 reports: everyone is known, the quiet ends, but n0's old 90 MB/s still count.
        let g1 = a
            .handle_report(n1, &want(TrafficClass::Sync, 100 * MB), None, t0)
            .unwrap();
        assert_eq!(g1.rate, 10 * MB);
        // Once the old lease runs out, n1 gets its half.
        let later = t0 + Duration::from_millis(1600);
        a.handle_report(n0, &want(TrafficClass::Sync, 100 * MB), holds(&g0), later)
            .unwrap();
        let g1b = a
            .handle_report(n1, &want(TrafficClass::Sync, 100 * MB), holds(&g1), later)
            .unwrap();
        assert_eq!(g1b.rate, 50 * MB);
    }

    #[test]
    fn an_allocator_nobody_reported_to_for_a_lease_starts_over_quiet() {
        // Members 1..3 fail over to this instance while member 0 (the usual allocator)
        // is briefly unreachable, then go back to it. When 0 dies later, with its own
        // grant in hand, they come here again: this instance must not hand out the
        // budget as if 0 held nothing.
        let t0 = Instant::now();
        let lease = Duration::from_secs(1);
        let cfg = SharesConfig {
            floor: 0.0,
            lease,
            ..SharesConfig::new(100 * MB, members(4))
        };
        let mut a = Allocator::new(cfg, 3, t0).unwrap();
        let big = want(TrafficClass::Async, 100 * MB);
        let report = |a: &mut Allocator, i: usize, at: Instant| {
            a.handle_report(NodeId::from_index(i), &big, None, at)
                .unwrap()
                .rate
        };
        // Past its first quiet lease, it grants (members report more often than a lease).
        for i in 1..4 {
            report(&mut a, i, t0);
            report(&mut a, i, t0 + Duration::from_millis(600));
        }
        let t1 = t0 + lease + Duration::from_millis(100);
        assert!(
            report(&mut a, 1, t1) > 0,
            "it granted before the members left"
        );
        // Three leases without a report, then the members are back: quiet again.
        let t2 = t1 + 3 * lease;
        for i in 1..4 {
            assert_eq!(
                report(&mut a, i, t2),
                0,
                "member {i} right after the silence"
            );
        }
        // Member 0 never reports (dead): a lease later the survivors, reporting as often
        // as members do, share the link.
        for k in 1..4 {
            for i in 1..4 {
                report(&mut a, i, t2 + Duration::from_millis(250 * k));
            }
        }
        let t3 = t2 + lease + Duration::from_millis(100);
        let total: u64 = (1..4).map(|i| report(&mut a, i, t3)).sum();
        assert!(total > 0 && total <= 100 * MB, "{total}");
    }

    #[test]
    fn a_lease_lapses_to_the_floor() {
        let t0 = Instant::now();
        let mut l = Lease::new(5);
        assert_eq!(l.rate(t0), 5);
        let g = Grant {
            epoch: 1,
            seq: 3,
            rate: 80,
            per_class: [80, 0, 0, 0],
            lease: Duration::from_secs(2),
        };
        l.handle_grant(g, t0);
        assert_eq!(l.rate(t0 + Duration::from_millis(1999)), 80);
        assert_eq!(
            l.holding(t0).map(|h| (h.epoch, h.seq, h.rate)),
            Some((1, 3, 80))
        );
        assert_eq!(l.rate(t0 + Duration::from_secs(2)), 5);
        assert_eq!(l.holding(t0 + Duration::from_secs(2)), None);
    }

    /// A simulated link: members report every `period` (staggered), each report takes
    /// `up` to reach the allocator and `down` for the grant to come back; reports and
    /// grants may be lost; the allocator may die at `kill` and a new one start at
    /// `restart`. Returns the largest sum of member rates seen, and the rates at the end.
    struct Sim {
        budget: u64,
        n: u32,
        period: Duration,
        up: Vec<Duration>,
        down: Vec<Duration>,
        lose: Vec<bool>,
        /// Per member: gives back half its grant before each report.
        release: Vec<bool>,
        demand: Vec<Vec<Demand>>,
        change_at: Option<(Duration, Vec<Vec<Demand>>)>,
        kill: Option<Duration>,
        restart: Option<Duration>,
        horizon: Duration,
        tenants: Vec<TenantGroup>,
    }

    impl Sim {
        fn config(&self) -> SharesConfig {
            SharesConfig {
                tenants: self.tenants.clone(),
                ..SharesConfig::new(self.budget, members(self.n))
            }
        }

        fn run(&self) -> (u64, Vec<u64>, u64) {
            let t0 = Instant::now();
            let cfg = self.config();
            let floor = cfg.floor_rate();
            let mut alloc = Some(Allocator::new(cfg.clone(), 1, t0).unwrap());
            let mut leases: Vec<Lease> = (0..self.n).map(|_| Lease::new(floor)).collect();
            let mut demand = self.demand.clone();
            // In flight: (arrives, member, kind) where kind is a report (sent_at, applied)
            // or a grant (sent_at, grant).
            enum Msg {
                Report(Instant, Option<Holding>),
                Grant(Instant, Grant),
            }
            let mut flight: Vec<(Instant, usize, Msg)> = Vec::new();
            let step = Duration::from_millis(5);
            let mut t = t0;
            let mut max_sum = 0u64;
            let mut k = 0usize;
            while t < t0 + self.horizon {
                let since = t - t0;
                if let Some((at, d)) = &self.change_at
                    && since >= *at
                    && since < *at + step
                {
                    demand = d.clone();
                }
                if self.kill.is_some_and(|k| since >= k) && self.restart.is_none_or(|r| since < r) {
                    alloc = None;
                }
                if alloc.is_none()
                    && self.restart.is_some_and(|r| since >= r)
                    && self.kill.is_some_and(|k| since >= k)
                {
                    alloc = Some(Allocator::new(cfg.clone(), 2, t).unwrap());
                }
                // Members report on their staggered period.
                for (i, lease) in leases.iter_mut().enumerate() {
                    let offset = self.period * i as u32 / self.n;
                    let phase = (since + self.period - offset).as_nanos() % self.period.as_nanos();
                    if phase < step.as_nanos() {
                        if self.release[i % self.release.len()] {
                            let r = lease.rate(t);
                            lease.cap(r / 2);
                        }
                        flight.push((t + self.up[i], i, Msg::Report(t, lease.holding(t))));
                    }
                }
                // Deliver what arrives now.
                let mut rest = Vec::new();
                for (at, i, msg) in flight.drain(..) {
                    if at > t {
                        rest.push((at, i, msg));
                        continue;
                    }
                    k += 1;
                    let lost = self.lose[k % self.lose.len()];
                    match msg {
                        Msg::Report(sent, applied) => {
                            if let (Some(a), false) = (alloc.as_mut(), lost) {
                                let g = a
                                    .handle_report(NodeId::from_index(i), &demand[i], applied, t)
                                    .unwrap();
                                rest.push((t + self.down[i], i, Msg::Grant(sent, g)));
                            }
                        }
                        Msg::Grant(sent, g) => {
                            if !lost {
                                leases[i].handle_grant(g, sent);
                            }
                        }
                    }
                }
                flight = rest;
                let sum: u64 = leases.iter().map(|l| l.rate(t)).sum();
                max_sum = max_sum.max(sum);
                t += step;
            }
            (max_sum, leases.iter().map(|l| l.rate(t)).collect(), floor)
        }
    }

    fn arb_demand() -> impl Strategy<Value = Vec<Demand>> {
        proptest::collection::vec(
            (0usize..4, any::<bool>(), 0u64..200 * MB, 1u32..4).prop_map(
                |(c, spot, rate, weight)| Demand {
                    class: TrafficClass::ALL[c],
                    provisioning: if spot {
                        Provisioning::Spot
                    } else {
                        Provisioning::Reserved
                    },
                    rate,
                    weight,
                },
            ),
            0..3,
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        /// The sum of what members use never exceeds the budget — with delays, lost
        /// messages, demand that changes mid-run, and an allocator that dies and is
        /// replaced — and without losses the grants converge to the ideal.
        #[test]
        fn the_sum_stays_within_budget_and_grants_converge(
            n in 1u32..8,
            up in proptest::collection::vec(1u64..60, 8),
            down in proptest::collection::vec(1u64..60, 8),
            lose in proptest::collection::vec(proptest::bool::weighted(0.1), 1..16),
            release in proptest::collection::vec(any::<bool>(), 1..8),
            demand in proptest::collection::vec(arb_demand(), 8),
            later in proptest::collection::vec(arb_demand(), 8),
            kill in proptest::option::of((500u64..4000, 0u64..3000)),
            tenant_of in proptest::collection::vec(0usize..3, 8),
            quotas in proptest::collection::vec((0u64..40, 0u64..40, 0u64..60), 2),
        ) {
            let budget = 125 * MB;
            // Up to two tenants of the members (the rest in none), quotas in order.
            let tenants: Vec<TenantGroup> = quotas
                .iter()
                .enumerate()
                .map(|(t, &(g, d, c))| TenantGroup {
                    members: (0..n as usize).filter(|&i| tenant_of[i] == t).map(NodeId::from_index).collect(),
                    quota: Quota { guarantee: g * MB, deserved: (g + d) * MB, capability: (g + d + c) * MB },
                })
                .filter(|g| !g.members.is_empty())
                .collect();
            let ms = Duration::from_millis;
            let sim = Sim {
                budget,
                n,
                period: ms(500),
                up: up.iter().map(|&u| ms(u)).collect(),
                down: down.iter().map(|&d| ms(d)).collect(),
                lose: lose.clone(),
                release: release.clone(),
                demand: demand.clone(),
                change_at: Some((ms(3000), later.clone())),
                kill: kill.map(|(k, _)| ms(k)),
                restart: kill.map(|(k, r)| ms(k + r)),
                horizon: ms(6000),
                tenants,
            };
            let (max_sum, _, _) = sim.run();
            prop_assert!(max_sum <= budget, "sum {max_sum} over budget {budget}");

            // No losses, no kill: after the quiet lease and a few report rounds every
            // member runs at its ideal rate.
            let calm = Sim { lose: vec![false], release: vec![false], kill: None, restart: None, change_at: None, horizon: ms(2000 + 4 * 500), ..sim };
            let (_, rates, floor) = calm.run();
            let t0 = Instant::now();
            let mut a = Allocator::new(calm.config(), 1, t0).unwrap();
            for i in 0..n {
                a.handle_report(NodeId::from_index(i as usize), &demand[i as usize], None, t0).unwrap();
            }
            let ideal = a.ideal(t0);
            for i in 0..n {
                let want = ideal[&NodeId::from_index(i as usize)].0;
                prop_assert!(rates[i as usize].abs_diff(want) <= n as u64 + 1 || rates[i as usize] >= floor && want == floor,
                    "member {i}: {} vs ideal {want}", rates[i as usize]);
            }
        }
    }

    #[test]
    fn a_member_that_does_not_report_counts_at_its_equal_share() {
        let t0 = Instant::now();
        let cfg = SharesConfig::new(100 * MB, members(4));
        let floor = cfg.floor_rate();
        let (mut a, now) = warm(cfg, t0);
        let n0 = NodeId::from_index(0);
        let big = want(TrafficClass::Async, 200 * MB);
        let g = a.handle_report(n0, &big, None, now).unwrap();
        assert_eq!(
            g.rate,
            100 * MB - 3 * floor,
            "live idle members cost their floors"
        );
        // Members 1 and 2 stop reporting (down, or now with another allocator); 0 and 3
        // go on every period.
        let mut g = g;
        for step in [600, 1200] {
            let t = now + Duration::from_millis(step);
            a.handle_report(NodeId::from_index(3), &[], None, t)
                .unwrap();
            g = a.handle_report(n0, &big, holds(&g), t).unwrap();
        }
        let later = now + Duration::from_millis(1200);
        assert_eq!(g.rate, 100 * MB - 2 * 25 * MB - floor);
        assert_eq!(a.held(NodeId::from_index(1), later), 25 * MB);
    }

    /// Two allocators at once (a partial partition), each with the members that reach
    /// it: members report every period to theirs; some move to the other one midway
    /// (idle before, sending after: the case where both sides would count the mover
    /// low), waiting two leases after their last report to the old one as the member
    /// side does when `wait`. Returns the largest sum of the rates members use.
    fn two_allocators(
        n: usize,
        side: &[bool],
        moves: &[bool],
        demand: &[Vec<Demand>],
        wait: bool,
    ) -> u64 {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let cfg = SharesConfig::new(100 * MB, members(n as u32));
        let floor = cfg.floor_rate();
        let lease = cfg.lease;
        let mut alloc = [
            Allocator::new(cfg.clone(), 1, t0).unwrap(),
            Allocator::new(cfg, 2, t0).unwrap(),
        ];
        let mut leases: Vec<Lease> = (0..n).map(|_| Lease::new(floor)).collect();
        let mut at: Vec<usize> = (0..n).map(|i| usize::from(side[i % side.len()])).collect();
        let mut last_sent: Vec<Option<(usize, Instant)>> = vec![None; n];
        let (period, move_at) = (ms(200), ms(2000));
        let mut max_sum = 0;
        let mut t = t0;
        while t < t0 + ms(5000) {
            let since = t - t0;
            for i in 0..n {
                if since >= move_at && since < move_at + ms(10) && moves[i % moves.len()] {
                    at[i] = 1 - at[i];
                }
                let phase = (since + ms(7 * i as u64)).as_millis() % period.as_millis();
                if phase >= 10 {
                    continue;
                }
                // A member reports to a new allocator only two leases after its last
                // report to another one.
                if wait
                    && last_sent[i]
                        .is_some_and(|(other, sent)| other != at[i] && t < sent + 2 * lease)
                {
                    continue;
                }
                let node = NodeId::from_index(i);
                let mover = moves[i % moves.len()];
                let wants: &[Demand] = if mover && since < move_at {
                    &[]
                } else {
                    &demand[i % demand.len()]
                };
                let g = alloc[at[i]]
                    .handle_report(node, wants, leases[i].holding(t), t)
                    .unwrap();
                leases[i].handle_grant(g, t);
                last_sent[i] = Some((at[i], t));
            }
            let sum: u64 = leases.iter().map(|l| l.rate(t)).sum();
            max_sum = max_sum.max(sum);
            t += ms(10);
        }
        max_sum
    }

    #[test]
    fn a_member_moving_at_once_would_break_the_budget() {
        // Why members wait: 3 on one side, 1 on the other, one moves over at once and
        // is counted by both sides at a small rate while it takes a large one.
        let big = vec![want(TrafficClass::Async, 200 * MB)];
        let side = [false, false, false, true];
        let moves = [false, false, true, false];
        assert!(two_allocators(4, &side, &moves, &big, false) > 100 * MB);
        assert!(two_allocators(4, &side, &moves, &big, true) <= 100 * MB);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        /// Two allocators serving disjoint sets of members never grant more than the
        /// budget between them, while members move from one to the other.
        #[test]
        fn two_allocators_stay_within_budget(
            n in 1usize..8,
            side in proptest::collection::vec(any::<bool>(), 1..8),
            moves in proptest::collection::vec(any::<bool>(), 1..8),
            demand in proptest::collection::vec(arb_demand(), 1..8),
        ) {
            let max_sum = two_allocators(n, &side, &moves, &demand, true);
            prop_assert!(max_sum <= 100 * MB, "sum {max_sum} over the budget");
        }
    }

    #[test]
    fn tenants_get_their_deserved_shares_and_lend_what_they_leave() {
        let t0 = Instant::now();
        let n = NodeId::from_index;
        let cfg = SharesConfig {
            floor: 0.0,
            tenants: vec![
                TenantGroup {
                    members: vec![n(0), n(1)],
                    quota: Quota {
                        guarantee: 30 * MB,
                        deserved: 75 * MB,
                        capability: 100 * MB,
                    },
                },
                TenantGroup {
                    members: vec![n(2)],
                    quota: Quota {
                        guarantee: 0,
                        deserved: 25 * MB,
                        capability: 50 * MB,
                    },
                },
            ],
            ..SharesConfig::new(100 * MB, members(4))
        };
        let (mut a, now) = warm(cfg, t0);
        let big = want(TrafficClass::Async, 200 * MB);
        let sync = want(TrafficClass::Sync, 200 * MB);
        // Everyone saturates: 75 for the first tenant (split between its two), 25 for
        // the second; n(3), in no tenant, deserves what is left (nothing).
        for i in 0..4 {
            a.handle_report(n(i), &big, None, now).unwrap();
        }
        let ideal = a.ideal(now);
        let got = |i: usize| ideal[&n(i)].0;
        assert_eq!((got(0), got(1), got(2)), (37_500_000, 37_500_000, 25 * MB));
        assert_eq!(got(3), 0);
        // The second tenant's sync demand does not beat the first tenant's async: quotas
        // come before classes.
        a.handle_report(n(2), &sync, None, now).unwrap();
        assert_eq!(a.ideal(now)[&n(2)].0, 25 * MB);
        // The first tenant goes idle: the second borrows up to its capability, the
        // member of no tenant takes the rest.
        for i in 0..2 {
            a.handle_report(n(i), &[], None, now).unwrap();
        }
        let ideal = a.ideal(now);
        assert_eq!(
            (ideal[&n(0)].0, ideal[&n(2)].0, ideal[&n(3)].0),
            (0, 50 * MB, 50 * MB)
        );
        // A member in two tenants is refused.
        let mut bad = a.config().clone();
        bad.tenants[1].members.push(n(0));
        assert!(Allocator::new(bad, 2, now).is_err());
    }

    #[test]
    fn when_the_allocator_dies_members_fall_back_to_floors() {
        let ms = Duration::from_millis;
        let big = want(TrafficClass::Async, 200 * MB);
        let sim = Sim {
            budget: 100 * MB,
            n: 4,
            period: ms(500),
            up: vec![ms(2); 4],
            down: vec![ms(2); 4],
            lose: vec![false],
            release: vec![false],
            demand: vec![big.clone(), big.clone(), big.clone(), big],
            change_at: None,
            kill: Some(ms(3000)),
            restart: None,
            horizon: ms(3000 + 2100),
            tenants: Vec::new(),
        };
        let (max_sum, rates, floor) = sim.run();
        assert!(max_sum <= 100 * MB);
        assert_eq!(rates, vec![floor; 4]);
    }
}

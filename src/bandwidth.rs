//! Cluster-wide DCI shares at run time: the shell around `scheduler::shares`.
//!
//! Every node takes part in each DCI link that leaves its IDC (when
//! `DciConfig::shares` is set):
//!
//! - as a **member**: one task per link measures what each class of its governor wants
//!   (what it sent last period, more when requests had to wait), reports it every
//!   `period` to the link's allocator, holds the answer in a [`Lease`], and sets its
//!   governor to the lease's rate — back to the floor the moment a lease lapses;
//! - as an **allocator**, when asked: the link's allocator is the lowest-id node of the
//!   sending IDC that answers. A member reports to the lowest-id node that has not failed
//!   it lately (skipped for 4 leases after a failure, doubling with each failure in a
//!   row up to 64), and moves to another only two leases after its last report to the
//!   old one, at its floor meanwhile: two allocators never count one member apart at
//!   once (see `scheduler::shares`, *Two allocators*). A dead allocator is replaced
//!   after two leases. A node that receives a report runs an [`Allocator`] for that link
//!   (a new instance, new epoch, when it had none or its last report is two leases old).
//!
//! Reports and grants are `ShareReport` / `ShareGrant` frames over the authenticated
//! transport; only nodes of the link's sending IDC are members, anyone else is refused.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use crate::context::NodeContext;
use crate::dci::{ClassConfig, DciGovernor, GovernorConfig, SharesSettings};
use crate::scheduler::shares::{
    Allocator, Demand, Grant, Holding, Lease, Provisioning, SharesConfig, TenantGroup,
};
use crate::topology::{IdcId, NodeId};
use crate::transport::{PeerRole, Stream};
use crate::wire::{
    DemandEntry, Frame, HoldingEntry, ShareGrant, ShareReport, Status, TrafficClass,
};

/// What one node knows of one link, for metrics and tests.
#[derive(Debug, Clone, Default, PartialEq)]
#[non_exhaustive]
pub struct LinkShare {
    /// The rate this node's governor runs at now, bytes per second.
    pub rate: u64,
    /// Its floor, bytes per second.
    pub floor: u64,
    /// Whether a grant's lease runs now (otherwise the node is at its floor).
    pub leased: bool,
    /// The demand it reported last, bytes per second, summed over classes.
    pub demand: u64,
    /// The node that answered its last report.
    pub allocator: Option<NodeId>,
    /// Reports that got no grant.
    pub failed_reports: u64,
}

struct AllocatorSlot {
    alloc: Allocator,
    last: Instant,
}

/// The shares service of one node.
pub(crate) struct Bandwidth {
    ctx: Arc<NodeContext>,
    settings: SharesSettings,
    allocators: Mutex<HashMap<IdcId, AllocatorSlot>>,
    links: Mutex<HashMap<IdcId, LinkShare>>,
}

impl Bandwidth {
    /// The service, and one member task per link leaving this node's IDC.
    pub(crate) fn start(
        ctx: Arc<NodeContext>,
        settings: SharesSettings,
    ) -> (Arc<Bandwidth>, Vec<tokio::task::JoinHandle<()>>) {
        let svc = Arc::new(Bandwidth {
            ctx: ctx.clone(),
            settings,
            allocators: Mutex::new(HashMap::new()),
            links: Mutex::new(HashMap::new()),
        });
        let tasks = ctx
            .dci
            .governors()
            .iter()
            .map(|(idc, gov)| tokio::spawn(member(svc.clone(), idc, gov.clone())))
            .collect();
        (svc, tasks)
    }

    /// What this node knows of its link to `idc`.
    pub(crate) fn link(&self, idc: IdcId) -> Option<LinkShare> {
        lock(&self.links).get(&idc).cloned()
    }

    /// The allocator configuration of the link from `from` to `to`.
    fn config(&self, from: IdcId, to: IdcId) -> Option<SharesConfig> {
        let topo = self.ctx.topology();
        let link = topo.link(from, to)?;
        let members = crate::dci::share_members(&topo, from);
        let tenants = self
            .settings
            .tenants
            .iter()
            .map(|t| TenantGroup {
                members: members
                    .iter()
                    .copied()
                    .filter(|&m| topo.node(m).tenant.as_deref() == Some(t.name.as_str()))
                    .collect(),
                quota: t.quota(link.budget_bps),
            })
            .filter(|g| !g.members.is_empty())
            .collect();
        Some(SharesConfig {
            floor: self.settings.floor,
            lease: self.settings.lease,
            tenants,
            ..SharesConfig::new(link.budget_bps, members)
        })
    }

    /// Answers a report from `peer` about its link to `req.to_idc`.
    fn allocate(&self, peer: NodeId, req: &ShareReport, now: Instant) -> Result<Grant, Status> {
        let topo = self.ctx.topology();
        let from = topo.location(peer).idc;
        let to = topo.idc_by_name(&req.to_idc).ok_or(Status::NotFound)?;
        // Only an allocator of the sending IDC: its members' reports stay inside it.
        if from != topo.location(self.ctx.me).idc {
            return Err(Status::Denied);
        }
        let config = self.config(from, to).ok_or(Status::NotFound)?;
        let mut slots = lock(&self.allocators);
        // A reload that changed the link's budget or members starts a new instance: it
        // learns the grants of the old one from the members' reports, as after a
        // failover (`scheduler::shares`).
        let fresh = slots
            .get(&to)
            .is_some_and(|s| now < s.last + 2 * config.lease && *s.alloc.config() == config);
        if !fresh {
            let epoch = SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64)
                ^ u64::from(self.ctx.me.index() as u32);
            let alloc = Allocator::new(config, epoch, now).map_err(|_| Status::Rejected)?;
            slots.insert(to, AllocatorSlot { alloc, last: now });
        }
        let slot = slots.get_mut(&to).ok_or(Status::Rejected)?;
        slot.last = now;
        let demand: Vec<Demand> = req
            .demand
            .iter()
            .map(|d| Demand {
                class: d.class,
                provisioning: if d.spot {
                    Provisioning::Spot
                } else {
                    Provisioning::Reserved
                },
                rate: d.rate,
                weight: d.weight,
            })
            .collect();
        let holding = req.holding.map(|h| Holding {
            epoch: h.epoch,
            seq: h.seq,
            rate: h.rate,
            remaining: Duration::from_millis(u64::from(h.remaining_ms)),
        });
        slot.alloc
            .handle_report(peer, &demand, holding, now)
            .map_err(|_| Status::Denied)
    }

    /// Serves a member's report stream: one grant per report, for as long as the member
    /// keeps the stream open.
    pub(crate) async fn serve(&self, mut s: Stream, first: ShareReport) {
        let mut req = first;
        loop {
            let answer = if s.role != PeerRole::Node {
                Err(Status::Denied)
            } else {
                self.allocate(s.peer, &req, Instant::now())
            };
            let refused = answer.is_err();
            let frame = match answer {
                Ok(g) => grant_frame(&g),
                Err(status) => Frame::ShareGrant(ShareGrant {
                    status,
                    epoch: 0,
                    seq: 0,
                    rate: 0,
                    per_class: [0; 4],
                    lease_ms: 0,
                }),
            };
            if s.writer.send(&frame).await.is_err() || refused {
                break;
            }
            // The member reports again every period; a stream silent for a lease is gone.
            match tokio::time::timeout(self.settings.lease, s.reader.recv()).await {
                Ok(Ok(Some(Frame::ShareReport(r)))) => req = r,
                _ => break,
            }
        }
        let _ = s.writer.finish().await;
    }

    /// Sends `report` to `to` (or asks the local allocator) and waits for its grant. The
    /// stream to a remote allocator is kept in `conn` for the next report.
    async fn ask(
        &self,
        to: NodeId,
        report: &ShareReport,
        conn: &mut Option<(NodeId, Stream)>,
    ) -> Result<Grant, String> {
        if to == self.ctx.me {
            *conn = None;
            return self
                .allocate(to, report, Instant::now())
                .map_err(|s| format!("{s:?}"));
        }
        if conn.as_ref().is_some_and(|(n, _)| *n != to) {
            *conn = None;
        }
        let exchange = async {
            if conn.is_none() {
                let s = self
                    .ctx
                    .transport
                    .open(to)
                    .await
                    .map_err(|e| e.to_string())?;
                *conn = Some((to, s));
            }
            let Some((_, s)) = conn.as_mut() else {
                return Err("no stream".to_string());
            };
            s.writer
                .send(&Frame::ShareReport(report.clone()))
                .await
                .map_err(|e| e.to_string())?;
            match s.reader.recv().await.map_err(|e| e.to_string())? {
                Some(Frame::ShareGrant(g)) if g.status == Status::Success => Ok(Grant {
                    epoch: g.epoch,
                    seq: g.seq,
                    rate: g.rate,
                    per_class: g.per_class,
                    lease: Duration::from_millis(u64::from(g.lease_ms)),
                }),
                Some(Frame::ShareGrant(g)) => Err(format!("refused: {:?}", g.status)),
                other => Err(format!("unexpected answer {other:?}")),
            }
        };
        // A slow answer is not a dead allocator: waiting only a report period (50 ms)
        // made members under load move to the next node while this one still granted
        // to the rest — two allocators at once, and a sum over the budget. Half a lease
        // still leaves the grant in hand time to be renewed.
        let limit = self.settings.lease / 2;
        let r = tokio::time::timeout(limit, exchange)
            .await
            .unwrap_or_else(|_| Err(format!("no answer within {limit:?}")));
        if r.is_err() {
            // A late answer must not be read as the answer to the next report.
            *conn = None;
        }
        r
    }
}

fn grant_frame(g: &Grant) -> Frame {
    Frame::ShareGrant(ShareGrant {
        status: Status::Success,
        epoch: g.epoch,
        seq: g.seq,
        rate: g.rate,
        per_class: g.per_class,
        lease_ms: g.lease.as_millis().min(u128::from(u32::MAX)) as u32,
    })
}

/// The shortest time between two reports of one member (an early report after a cold
/// start waits at least this long after the previous one).
const EARLY_GAP: Duration = Duration::from_millis(5);

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The governor configuration for a node running at `rate` with `per_class` granted:
/// each class is guaranteed what it was granted and may borrow up to the whole rate.
pub(crate) fn governor_config(rate: u64, per_class: [u64; 4]) -> GovernorConfig {
    let rate = rate.max(1);
    let mut cfg = GovernorConfig::for_link(rate);
    if per_class.iter().any(|&c| c > 0) {
        let mut left = rate;
        for (c, &want) in cfg.classes.iter_mut().zip(&per_class) {
            let r = want.min(left);
            left -= r;
            *c = ClassConfig {
                rate: r,
                ceil: rate,
            };
        }
    }
    cfg
}

/// What a member remembers of one lane of its governor (a class's reserved or spot
/// requests) between two reports: its counters at the last one, and the largest burst
/// it offered lately with the report that last saw it.
#[derive(Debug, Default, Clone, Copy)]
struct LaneUsage {
    granted_bytes: u64,
    backlogged: Duration,
    burst: Option<(u64, Instant)>,
}

/// Per lane: the reserved then the spot one of each class, in class order.
type Usage = [LaneUsage; 8];

/// The classes whose senders wait for each packet's answer (a sync pipeline's acks, a
/// remote read's next request): their rate must pass a burst at once, not only match
/// their average use.
fn latency_bound(class: TrafficClass) -> bool {
    matches!(class, TrafficClass::Sync | TrafficClass::Read)
}

/// The demand of one lane, bytes/s: what it asks at its own level, and the headroom it
/// asks at spot level. A lane `limited` by its rate (requests waiting nearly all the
/// period) asks for the whole link; the allocator gives it a fair part. Otherwise it asks
/// for 10 % more than it `used` — a paced sender then runs backlogged about 91 % of the
/// time and keeps asking for what it uses, instead of holding a rate it leaves idle.
///
/// A latency-bound class also wants the rate that sends its largest recent `burst`
/// within `governor::BURST_WINDOW` (capped at the link): sized to its average alone, a
/// sender that uses a few percent of the link in one-packet bursts waits for a
/// one-packet bucket to refill before every packet. That headroom is asked at spot
/// level, from budget nobody else's reserved demand wants: asked at its class's level,
/// it would hold idle a rate bulk senders on other nodes could fill (measured: the
/// `sched` bench's utilization fell from 0.96 to 0.39).
fn lane_demand(latency: bool, used: u64, limited: bool, burst: u64, budget: u64) -> (u64, u64) {
    if limited {
        return (budget, 0);
    }
    let average = used + used / 10;
    if !latency {
        return (average, 0);
    }
    let window = crate::dci::governor::BURST_WINDOW.as_nanos();
    let burst_rate = (u128::from(burst) * 1_000_000_000 / window).min(u128::from(budget));
    (average, (burst_rate as u64).saturating_sub(average))
}

/// Per-class demand from what the governor saw over `elapsed` (see [`lane_demand`]): an
/// entry per class for its reserved and its spot traffic, the spot one with the class's
/// headroom added. A burst counts until `hold` (a lease) after the last report that saw
/// it: a latency-bound sender that pauses for a report period or two still finds its
/// rate when it sends again, instead of its floor.
fn measure(
    gov: &DciGovernor,
    usage: &mut Usage,
    elapsed: Duration,
    budget: u64,
    now: Instant,
    hold: Duration,
) -> Vec<DemandEntry> {
    const LIMITED: f64 = 0.95;
    let secs = elapsed.as_secs_f64().max(1e-3);
    let mut out = Vec::new();
    for (i, class) in TrafficClass::ALL.iter().enumerate() {
        let st = gov.stats(*class);
        let peaks = gov.take_peak_offered(*class, now);
        let lanes = [(st.reserved, peaks.0), (st.spot, peaks.1)];
        let mut rates = [0u64; 2];
        let mut headroom = 0u64;
        for (j, (lane, peak)) in lanes.into_iter().enumerate() {
            let u = &mut usage[2 * i + j];
            let granted = lane.granted_bytes.saturating_sub(u.granted_bytes);
            let backlogged = lane.backlogged.saturating_sub(u.backlogged);
            (u.granted_bytes, u.backlogged) = (lane.granted_bytes, lane.backlogged);
            let expired = |at: Instant| now.saturating_duration_since(at) >= hold;
            if u.burst.is_none_or(|(b, at)| peak >= b || expired(at)) {
                u.burst = (peak > 0).then_some((peak, now));
            }
            let (rate, room) = lane_demand(
                latency_bound(*class),
                (granted as f64 / secs) as u64,
                backlogged.as_secs_f64() >= LIMITED * secs,
                u.burst.map_or(0, |(b, _)| b),
                budget,
            );
            rates[j] = rate;
            headroom = headroom.max(room);
        }
        rates[1] = rates[1].saturating_add(headroom).min(budget).max(rates[1]);
        for (rate, spot) in rates.into_iter().zip([false, true]) {
            if rate > 0 {
                out.push(DemandEntry {
                    class: *class,
                    spot,
                    rate,
                    weight: 1,
                });
            }
        }
    }
    out
}

/// The member side of one link: report, hold the lease, set the governor.
async fn member(svc: Arc<Bandwidth>, to: IdcId, gov: DciGovernor) {
    let ctx = svc.ctx.clone();
    let topo = ctx.topology();
    let from = topo.location(ctx.me).idc;
    let Some(mut config) = svc.config(from, to) else {
        return;
    };
    let mut floor = config.floor_rate();
    let to_name = topo.idc(to).name.clone();
    drop(topo);
    let mut lease = Lease::new(floor);
    let mut skip_until: HashMap<NodeId, Instant> = HashMap::new();
    let mut failures: HashMap<NodeId, u32> = HashMap::new();
    let mut last_asked: Option<(NodeId, Instant)> = None;
    let mut usage = [LaneUsage::default(); 8];
    let mut applied: Option<(u64, [u64; 4])> = None;
    let mut last = Instant::now();
    let mut cold_start = false;
    let mut conn: Option<(NodeId, Stream)> = None;
    let apply = |lease: &Lease, applied: &mut Option<(u64, [u64; 4])>, floor: u64, now: Instant| {
        let want = lease
            .grant(now)
            .map_or((floor, [0; 4]), |g| (g.rate, g.per_class));
        if *applied != Some(want) {
            if let Err(e) = gov.set_config(governor_config(want.0, want.1)) {
                tracing::warn!(error = %e, "cannot apply DCI grant");
            }
            *applied = Some(want);
        }
    };
    apply(&lease, &mut applied, floor, Instant::now());
    loop {
        // The topology in force: a reload may change the budget and the members.
        if let Some(c) = svc.config(from, to) {
            config = c;
        }
        floor = config.floor_rate();
        lease.set_floor(floor);
        let budget = config.budget;
        let mut candidates = config.members.clone();
        candidates.sort();
        if candidates.is_empty() {
            // No storage node sends on this link (only client identities): nobody to
            // ask, this node stays at its floor.
            apply(&lease, &mut applied, floor, Instant::now());
            tokio::time::sleep(svc.settings.lease).await;
            continue;
        }
        let sent_at = Instant::now();
        let mut demand = measure(
            &gov,
            &mut usage,
            sent_at - last,
            budget,
            sent_at,
            config.lease,
        );
        if std::mem::take(&mut cold_start) {
            // Senders are waiting at (nearly) the floor: ask for the link for them now;
            // the next regular report measures what they really use.
            for class in TrafficClass::ALL {
                let st = gov.stats(class);
                for (lane, spot) in [(st.reserved, false), (st.spot, true)] {
                    if lane.queued > 0 {
                        demand.retain(|d| d.class != class || d.spot != spot);
                        demand.push(DemandEntry {
                            class,
                            spot,
                            rate: budget,
                            weight: 1,
                        });
                    }
                }
            }
        }
        last = sent_at;
        // Give back at once what this node holds above its demand (the allocator can
        // hand it to others without waiting for another report).
        let wanted = demand
            .iter()
            .fold(0u64, |a, d| a.saturating_add(d.rate))
            .min(budget);
        if lease.rate(sent_at) > wanted.max(floor) {
            lease.cap(wanted);
            apply(&lease, &mut applied, floor, sent_at);
        }
        let report = ShareReport {
            to_idc: to_name.clone(),
            demand: demand.clone(),
            holding: lease.holding(sent_at).map(|h| HoldingEntry {
                epoch: h.epoch,
                seq: h.seq,
                rate: h.rate,
                remaining_ms: h.remaining.as_millis().min(u128::from(u32::MAX)) as u32,
            }),
        };
        // The allocator: the lowest-id candidate that has not failed this member lately.
        let preferred = candidates
            .iter()
            .copied()
            .find(|c| skip_until.get(c).is_none_or(|&t| sent_at >= t));
        let Some(preferred) = preferred.or_else(|| {
            // Everyone failed recently: start again from the first.
            skip_until.clear();
            candidates.first().copied()
        }) else {
            return;
        };
        // Moving to another allocator waits two leases after the last report to the old
        // one: the old one counts this member at what it granted it (maybe just the
        // floor) for a lease, and grants it made to others meanwhile run for one more.
        // Only then do the two count this member apart (`scheduler::shares`, *Two
        // allocators*). Meanwhile this member runs at its floor.
        let moving =
            last_asked.is_some_and(|(p, t)| p != preferred && sent_at < t + 2 * config.lease);
        let mut answered = None;
        if !moving {
            let asked = svc.ask(preferred, &report, &mut conn).await;
            last_asked = Some((preferred, Instant::now()));
            match asked {
                Ok(g) => {
                    failures.remove(&preferred);
                    answered = Some((preferred, g));
                }
                Err(e) => {
                    tracing::debug!(allocator = %ctx.name(preferred), error = %e, "share report failed");
                    // Skipped for longer than a move takes, longer after each failure in
                    // a row: a dead allocator must not hold its members at the floor.
                    let n = failures.entry(preferred).or_insert(0u32);
                    let leases = 4u32 << (*n).min(4);
                    *n += 1;
                    skip_until.insert(preferred, Instant::now() + config.lease * leases);
                }
            }
        }
        if let Some((_, g)) = &answered {
            lease.handle_grant(*g, sent_at);
        }
        let now = Instant::now();
        apply(&lease, &mut applied, floor, now);
        {
            let mut links = lock(&svc.links);
            let l = links.entry(to).or_default();
            l.rate = lease.rate(now);
            l.floor = floor;
            l.leased = lease.grant(now).is_some();
            l.demand = demand
                .iter()
                .map(|d| d.rate)
                .fold(0u64, u64::saturating_add);
            match answered {
                Some((c, _)) => l.allocator = Some(c),
                None => l.failed_reports += 1,
            }
        }
        // Next report at the period, early when a node running near its floor has senders
        // waiting (a cold start: the first packets of a block must not crawl at the floor
        // for a whole period), and at the lease's end if that comes first (back to the
        // floor then).
        let next = sent_at + svc.settings.period;
        let early_from = sent_at + EARLY_GAP;
        loop {
            let now = Instant::now();
            let cold = lease.rate(now) <= 2 * floor;
            let wake = lease.expires(now).map_or(next, |e| e.min(next));
            tokio::select! {
                _ = tokio::time::sleep_until(wake.into()) => {}
                _ = gov.pressed(), if cold => {
                    tokio::time::sleep_until(early_from.into()).await;
                    cold_start = true;
                    break;
                }
            }
            let now = Instant::now();
            if now >= next {
                break;
            }
            // The lease ran out before the next report: back to the floor.
            apply(&lease, &mut applied, floor, now);
            if let Some(l) = lock(&svc.links).get_mut(&to) {
                l.rate = lease.rate(now);
                l.leased = lease.grant(now).is_some();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BUDGET: u64 = 125_000_000;

    #[test]
    fn a_limited_lane_asks_for_the_link_and_a_paced_one_for_a_tenth_more() {
        assert_eq!(lane_demand(false, 1_000_000, true, 0, BUDGET), (BUDGET, 0));
        assert_eq!(
            lane_demand(true, 1_000_000, true, 65_536, BUDGET),
            (BUDGET, 0)
        );
        assert_eq!(
            lane_demand(false, 1_000_000, false, 4 << 20, BUDGET),
            (1_100_000, 0)
        );
        assert_eq!(lane_demand(false, 0, false, 0, BUDGET), (0, 0));
    }

    #[test]
    fn a_latency_bound_lane_wants_headroom_to_pass_its_burst_within_the_window() {
        // One 64 KiB packet at a time, 2 MB/s on average: 64 KiB per 5 ms in all.
        assert_eq!(
            lane_demand(true, 2_000_000, false, 65_536, BUDGET),
            (2_200_000, 13_107_200 - 2_200_000)
        );
        // No headroom when its average is the larger.
        assert_eq!(
            lane_demand(true, 20_000_000, false, 65_536, BUDGET),
            (22_000_000, 0)
        );
        // Never more than the link.
        assert_eq!(lane_demand(true, 0, false, 16 << 20, BUDGET), (0, BUDGET));
        // A bulk class's bursts do not count.
        assert_eq!(
            lane_demand(false, 2_000_000, false, 65_536, BUDGET),
            (2_200_000, 0)
        );
    }

    /// The reserved and the spot sync demand.
    fn sync_demand(d: &[DemandEntry]) -> (Option<u64>, Option<u64>) {
        let rate = |spot: bool| {
            d.iter()
                .find(|e| e.class == TrafficClass::Sync && e.spot == spot)
                .map(|e| e.rate)
        };
        (rate(false), rate(true))
    }

    #[tokio::test]
    async fn a_burst_counts_for_a_lease_after_it_was_offered() {
        let gov = DciGovernor::start(GovernorConfig::for_link(BUDGET)).unwrap();
        gov.acquire(TrafficClass::Sync, 64 << 10).await;
        let mut usage = [LaneUsage::default(); 8];
        let (t, period, hold) = (
            Instant::now(),
            Duration::from_millis(100),
            Duration::from_secs(1),
        );
        // 64 KiB used in 100 ms: 655 360 B/s, and 10 % more reserved; the headroom to
        // 64 KiB per 5 ms as spot.
        let d = measure(&gov, &mut usage, period, BUDGET, t, hold);
        assert_eq!(sync_demand(&d), (Some(720_896), Some(13_107_200 - 720_896)));
        // A period with nothing sent: the burst still counts, as headroom only.
        let d = measure(&gov, &mut usage, period, BUDGET, t + period, hold);
        assert_eq!(sync_demand(&d), (None, Some(13_107_200)));
        // A lease after the last report that saw it: nothing is asked.
        let d = measure(&gov, &mut usage, period, BUDGET, t + period + hold, hold);
        assert_eq!(sync_demand(&d), (None, None));
    }
}

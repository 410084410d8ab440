//! Tenant quotas on a DCI link, with the queue semantics of Volcano: each tenant has a
//! **guarantee** (always its own while it wants it: never lent away from under it), a
//! **deserved** share (what it gets when everyone wants more than the link has) and a
//! **capability** (the most it may ever get, borrowing included). Pure: one call divides
//! a capacity among tenants' demands; calling it again when demand changes is how idle
//! quota is lent and taken back — a tenant that comes back gets its guarantee and its
//! deserved share from the next division on, and what was lent shrinks to make room.
//!
//! The division, in three rounds: every tenant gets its demand up to its guarantee; what
//! is left goes weighted max-min fair (weights: deserved) to demand up to each tenant's
//! deserved; what is still left goes the same way to demand up to each capability
//! (borrowing idle quota).
//!
//! The allocator (`shares`) divides each link by tenant first when its configuration has
//! tenants: a tenant is a group of nodes (the topology's `tenant` of each node), so a
//! node's grant is its tenant's part shared among the tenant's nodes.

use super::shares::max_min_fair;

/// One tenant's quota on a link, bytes per second.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quota {
    /// Its own while it wants it.
    pub guarantee: u64,
    /// Its share when the link is contended; also its weight among tenants.
    pub deserved: u64,
    /// The most it may get, idle quota of others included.
    pub capability: u64,
}

/// Why a set of quotas cannot be served.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum QuotaError {
    /// A quota whose parts are out of order.
    #[error("tenant {0}: needs guarantee <= deserved <= capability")]
    Order(usize),
    /// The guarantees add up to more than the link.
    #[error("guarantees add up to {sum} B/s, more than the link's {capacity} B/s")]
    Overcommitted {
        /// Their sum.
        sum: u64,
        /// The link.
        capacity: u64,
    },
}

/// Checks that `quotas` can be honoured on a link of `capacity` bytes per second.
pub fn validate(capacity: u64, quotas: &[Quota]) -> Result<(), QuotaError> {
    if let Some(i) = quotas
        .iter()
        .position(|q| !(q.guarantee <= q.deserved && q.deserved <= q.capability))
    {
        return Err(QuotaError::Order(i));
    }
    let sum = quotas
        .iter()
        .fold(0u64, |a, q| a.saturating_add(q.guarantee));
    if sum > capacity {
        return Err(QuotaError::Overcommitted { sum, capacity });
    }
    Ok(())
}

/// Divides `capacity` among tenants with `quotas` wanting `demand` (same order); returns
/// each one's rate. Quotas must pass [`validate`].
pub fn divide(capacity: u64, quotas: &[Quota], demand: &[u64]) -> Vec<u64> {
    let n = quotas.len().min(demand.len());
    let want = |i: usize, cap: u64| demand[i].min(cap);
    // Round 1: guarantees (shared by weight when the capacity is below their sum: the
    // allocator divides what is left above the members' floors).
    let firsts: Vec<(u64, u32)> = (0..n).map(|i| (want(i, quotas[i].guarantee), 1)).collect();
    let mut out: Vec<u64> = if firsts.iter().map(|f| f.0).sum::<u64>() <= capacity {
        firsts.iter().map(|f| f.0).collect()
    } else {
        max_min_fair(capacity, &firsts)
    };
    let mut left = capacity.saturating_sub(out.iter().sum());
    // Weights: deserved, scaled into u32.
    let top = quotas.iter().map(|q| q.deserved).max().unwrap_or(0);
    let shift = 64 - u64::from(top.leading_zeros()).min(64);
    let shift = shift.saturating_sub(31);
    let weight = |i: usize| ((quotas[i].deserved >> shift) as u32).max(1);
    // Rounds 2 and 3: up to deserved, then up to capability.
    for cap in [|q: &Quota| q.deserved, |q: &Quota| q.capability] {
        if left == 0 {
            break;
        }
        let more: Vec<(u64, u32)> = (0..n)
            .map(|i| (want(i, cap(&quotas[i])).saturating_sub(out[i]), weight(i)))
            .collect();
        for (o, got) in out.iter_mut().zip(max_min_fair(left, &more)) {
            *o += got;
            left -= got;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MB: u64 = 1_000_000;

    fn q(guarantee: u64, deserved: u64, capability: u64) -> Quota {
        Quota {
            guarantee: guarantee * MB,
            deserved: deserved * MB,
            capability: capability * MB,
        }
    }

    #[test]
    fn idle_quota_is_lent_and_taken_back_when_its_owner_returns() {
        let quotas = [q(20, 60, 100), q(10, 40, 80)];
        validate(100 * MB, &quotas).unwrap();
        // The first is idle: the second borrows up to its capability.
        assert_eq!(divide(100 * MB, &quotas, &[0, 500 * MB]), vec![0, 80 * MB]);
        // The first comes back: each gets its deserved share.
        assert_eq!(
            divide(100 * MB, &quotas, &[500 * MB, 500 * MB]),
            vec![60 * MB, 40 * MB]
        );
        // A small demand is served whole, the rest is lent.
        assert_eq!(
            divide(100 * MB, &quotas, &[5 * MB, 500 * MB]),
            vec![5 * MB, 80 * MB]
        );
    }

    #[test]
    fn bad_quotas_are_refused() {
        assert_eq!(validate(100, &[q(2, 1, 3)]), Err(QuotaError::Order(0)));
        assert_eq!(
            validate(100 * MB, &[q(60, 60, 60), q(50, 50, 50)]),
            Err(QuotaError::Overcommitted {
                sum: 110 * MB,
                capacity: 100 * MB
            })
        );
    }

    fn arb_tenants() -> impl Strategy<Value = (u64, Vec<Quota>, Vec<u64>)> {
        (
            1u64..1_000,
            proptest::collection::vec((0u64..100, 0u64..100, 0u64..100, 0u64..200), 1..8),
        )
            .prop_map(|(capacity, raw)| {
                let capacity = capacity * MB;
                let n = raw.len() as u64;
                let quotas: Vec<Quota> = raw
                    .iter()
                    .map(|&(g, d, c, _)| {
                        // Guarantees at most an equal part of the link: they fit.
                        let guarantee = capacity / n * g / 100;
                        let deserved = guarantee + capacity * d / 100;
                        Quota {
                            guarantee,
                            deserved,
                            capability: deserved + capacity * c / 100,
                        }
                    })
                    .collect();
                let demand = raw.iter().map(|&(_, _, _, w)| capacity * w / 100).collect();
                (capacity, quotas, demand)
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Within the link and every capability; every guarantee honoured; nothing idle
        /// while someone could use it; nobody above its deserved share while another
        /// tenant that wants more is below its own.
        #[test]
        fn division_keeps_volcano_semantics((capacity, quotas, demand) in arb_tenants()) {
            prop_assert!(validate(capacity, &quotas).is_ok());
            let out = divide(capacity, &quotas, &demand);
            let sum: u64 = out.iter().sum();
            prop_assert!(sum <= capacity);
            let usable: u64 = quotas.iter().zip(&demand).map(|(q, &d)| d.min(q.capability)).sum();
            prop_assert_eq!(sum, usable.min(capacity), "work conserving");
            for i in 0..quotas.len() {
                prop_assert!(out[i] <= demand[i].min(quotas[i].capability));
                prop_assert!(out[i] >= demand[i].min(quotas[i].guarantee), "guarantee of {}", i);
            }
            let starved = (0..quotas.len()).any(|i| out[i] < demand[i].min(quotas[i].deserved));
            if starved {
                for j in 0..quotas.len() {
                    prop_assert!(out[j] <= quotas[j].deserved, "{} borrows while another is short", j);
                }
            }
        }
    }
}

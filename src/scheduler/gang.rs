//! Gang admission for write pipelines: a pipeline runs only when every hop has a write
//! slot, all at once, or not at all.
//!
//! Each node has a fixed number of write slots ([`Slots`]). A pipeline's setup asks each
//! hop in turn; a hop without a free slot refuses at once (`Status::Busy`) instead of
//! waiting, the hops already set up release theirs when the setup fails, and the writer
//! tries the whole pipeline again after a jittered backoff ([`Admission`]) until its
//! deadline. Nobody waits while holding a slot, so writers that want overlapping sets of
//! nodes never deadlock; nothing is left reserved after a refusal or a timeout. Pure: no
//! runtime, time injected.

use std::time::{Duration, Instant};

/// A node's write slots: at most `capacity` pipelines through it at once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Slots {
    capacity: usize,
    used: usize,
}

impl Slots {
    /// `capacity` slots, all free.
    pub fn new(capacity: usize) -> Self {
        Slots { capacity, used: 0 }
    }

    /// Changes the number of slots; those in use stay taken (a capacity that follows a
    /// link's budget is set anew at each admission).
    pub fn set_capacity(&mut self, capacity: usize) {
        self.capacity = capacity;
    }

    /// Takes a slot if one is free.
    pub fn try_take(&mut self) -> bool {
        if self.used < self.capacity {
            self.used += 1;
            true
        } else {
            false
        }
    }

    /// Gives a slot back.
    pub fn release(&mut self) {
        self.used = self.used.saturating_sub(1);
    }

    /// Slots in use.
    pub fn used(&self) -> usize {
        self.used
    }

    /// All slots.
    pub fn capacity(&self) -> usize {
        self.capacity
    }
}

/// A writer's attempts at getting its whole pipeline admitted.
///
/// Call order: [`Admission::new`] when the write starts; on each refusal
/// [`Admission::handle_refusal`], which says when to try again or that the deadline has
/// passed.
#[derive(Debug, Clone)]
pub struct Admission {
    deadline: Instant,
    min: Duration,
    max: Duration,
    attempt: u32,
    rng: u64,
}

impl Admission {
    /// Attempts until `deadline`, backing off from `min` up to `max`, doubling, with
    /// full jitter from `seed` (different writers should pass different seeds, so their
    /// retries do not line up).
    pub fn new(deadline: Instant, min: Duration, max: Duration, seed: u64) -> Self {
        Admission {
            deadline,
            min,
            max: max.max(min),
            attempt: 0,
            rng: seed | 1,
        }
    }

    /// Attempts refused so far.
    pub fn refusals(&self) -> u32 {
        self.attempt
    }

    /// The setup at `now` was refused: when to try again, or `None` once the deadline
    /// would pass first.
    pub fn handle_refusal(&mut self, now: Instant) -> Option<Instant> {
        let cap = self
            .min
            .saturating_mul(1u32 << self.attempt.min(16))
            .min(self.max);
        self.attempt += 1;
        // xorshift64*: full jitter in [min, cap].
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        let r = self.rng.wrapping_mul(0x2545_F491_4F6C_DD1D);
        let span = cap.saturating_sub(self.min).as_nanos() as u64;
        let wait = self.min + Duration::from_nanos(if span == 0 { 0 } else { r % (span + 1) });
        let at = now + wait;
        (at <= self.deadline).then_some(at)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn slots_refuse_when_full_and_come_back() {
        let mut s = Slots::new(2);
        assert!(s.try_take() && s.try_take());
        assert!(!s.try_take());
        s.release();
        assert!(s.try_take());
        assert_eq!((s.used(), s.capacity()), (2, 2));
    }

    proptest! {
        /// Retries back off within [min, max], never past the deadline, and stop.
        #[test]
        fn retries_stay_in_bounds_and_end(seed in any::<u64>(), min_ms in 1u64..50, max_ms in 1u64..500, limit_ms in 0u64..3000) {
            let t0 = Instant::now();
            let (min, max) = (Duration::from_millis(min_ms), Duration::from_millis(max_ms));
            let mut a = Admission::new(t0 + Duration::from_millis(limit_ms), min, max, seed);
            let mut now = t0;
            let mut n = 0;
            while let Some(at) = a.handle_refusal(now) {
                let wait = at - now;
                prop_assert!(wait >= min && wait <= max.max(min), "wait {wait:?}");
                prop_assert!(at <= t0 + Duration::from_millis(limit_ms));
                now = at;
                n += 1;
                prop_assert!(n <= 3000, "never gives up");
            }
            prop_assert_eq!(a.refusals(), n + 1);
        }
    }
}

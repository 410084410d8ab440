//! Async replication: a block written in async mode is acknowledged once the replicas in
//! the writer's IDC have it and its task is durable in the [`ReplicationLog`]; workers
//! then copy it to the remote IDC — **one** copy across the DCI, through the governor's
//! `async` class, to the first remote target, which relays it to the next inside its IDC.
//!
//! This module owns the queue: the durable log, the RPO figures and policy, and the
//! dispatcher that hands tasks in log order to at most `workers` concurrent copies, with
//! capped exponential backoff and jitter between attempts (`Backoff`), so a remote IDC
//! that is down pauses the workers without spinning and without losing tasks. The copy
//! itself — probing the remote targets, reading a source, writing the missing replicas —
//! is the node's `transfer` service, which the dispatcher drives
//! through `Copier`; it sits above the pipeline and the reader that it uses, while the
//! pipeline queues into this module.

mod log;
pub mod record;

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::future::BoxFuture;
use rand::{RngExt, SeedableRng};
use tokio::sync::{Notify, Semaphore};

pub use log::ReplicationLog;
pub use record::Task;

/// Errors of the replication log and workers.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReplicationError {
    /// A log file could not be read or written.
    #[error("replication log {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A log segment other than the last is damaged.
    #[error("replication log segment {path} is damaged at offset {offset}")]
    Corrupt {
        /// The segment.
        path: PathBuf,
        /// Where the valid prefix ends.
        offset: u64,
    },
    /// The log is shut down.
    #[error("replication log is closed")]
    Closed,
    /// This node has no replication log configured.
    #[error("this node has no replication log (NodeConfig::replication)")]
    NotConfigured,
}

/// What to do when the RPO passes its bound.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RpoPolicy {
    /// New async writes wait until the backlog is back under the bound.
    Block,
    /// New writes fall back to sync mode.
    Sync,
    /// Only log a warning.
    Warn,
}

/// Settings of async replication on a node.
#[derive(Debug, Clone)]
pub struct ReplicationConfig {
    /// Directory of the log (not inside the block store).
    pub log_dir: PathBuf,
    /// Size at which a log segment rolls.
    pub segment_bytes: u64,
    /// Tasks copied concurrently.
    pub workers: usize,
    /// RPO bound in bytes not yet remote (`None`: no bound).
    pub max_lag_bytes: Option<u64>,
    /// RPO bound in age of the oldest task (`None`: no bound).
    pub max_lag_age: Option<Duration>,
    /// What happens past the bound.
    pub policy: RpoPolicy,
    /// First retry delay.
    pub backoff_min: Duration,
    /// Longest retry delay.
    pub backoff_max: Duration,
}

impl ReplicationConfig {
    /// Defaults with the log in `log_dir`.
    pub fn new(log_dir: impl Into<PathBuf>) -> Self {
        ReplicationConfig {
            log_dir: log_dir.into(),
            segment_bytes: 64 << 20,
            workers: 2,
            max_lag_bytes: None,
            max_lag_age: None,
            policy: RpoPolicy::Warn,
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(10),
        }
    }
}

/// What the RPO guard says about a new async write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Go ahead in async mode.
    Async,
    /// Write it in sync mode instead.
    Sync,
}

/// RPO figures.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RpoStatus {
    /// Tasks not yet done.
    pub pending_tasks: usize,
    /// Bytes of those tasks.
    pub pending_bytes: u64,
    /// Age of the oldest pending task.
    pub oldest_age: Duration,
    /// Bytes copied to the remote IDC so far.
    pub drained_bytes: u64,
}

/// The replication queue of a node: its durable log, settings and RPO counters.
pub(crate) struct ReplicationQueue {
    log: ReplicationLog,
    config: ReplicationConfig,
    drained: AtomicU64,
    dropped: AtomicU64,
    wake: Notify,
    progress: Notify,
    /// Wakes tasks waiting between attempts (a peer came back).
    retry_now: Notify,
    queued: Mutex<std::collections::BTreeSet<u64>>,
}

/// Milliseconds since the Unix epoch (the log records task creation in these).
fn epoch_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// RPO figures of `pending` tasks at `now` (ms since the epoch), with `drained` bytes.
fn rpo_of(pending: &[Task], now_ms: u64, drained: u64) -> RpoStatus {
    let oldest = pending.iter().map(|t| t.created_ms).min();
    RpoStatus {
        pending_tasks: pending.len(),
        pending_bytes: pending.iter().map(|t| t.len).sum(),
        oldest_age: oldest.map_or(Duration::ZERO, |c| {
            Duration::from_millis(now_ms.saturating_sub(c))
        }),
        drained_bytes: drained,
    }
}

impl ReplicationQueue {
    pub(crate) fn open(
        config: ReplicationConfig,
    ) -> Result<Arc<ReplicationQueue>, ReplicationError> {
        let (log, _pending) = ReplicationLog::open(&config.log_dir, config.segment_bytes)?;
        Ok(Arc::new(ReplicationQueue {
            log,
            config,
            drained: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            wake: Notify::new(),
            progress: Notify::new(),
            retry_now: Notify::new(),
            queued: Mutex::new(Default::default()),
        }))
    }

    /// RPO figures as of `now`.
    pub(crate) fn status(&self, now: SystemTime) -> RpoStatus {
        rpo_of(
            &self.log.pending(),
            epoch_ms(now),
            self.drained.load(Ordering::Relaxed),
        )
    }

    /// Tasks dropped without a copy (stale genstamp, block gone).
    pub(crate) fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    fn over_bound(&self, now: SystemTime) -> bool {
        let s = self.status(now);
        self.config
            .max_lag_bytes
            .is_some_and(|b| s.pending_bytes > b)
            || self.config.max_lag_age.is_some_and(|a| s.oldest_age > a)
    }

    /// Applies the RPO policy to a new async write.
    pub(crate) async fn admit(&self) -> Admission {
        if !self.over_bound(SystemTime::now()) {
            return Admission::Async;
        }
        match self.config.policy {
            RpoPolicy::Warn => {
                tracing::warn!(status = ?self.status(SystemTime::now()), "RPO bound exceeded");
                Admission::Async
            }
            RpoPolicy::Sync => Admission::Sync,
            RpoPolicy::Block => {
                while self.over_bound(SystemTime::now()) {
                    let progressed = self.progress.notified();
                    // Re-check at least every second, in case the clock alone moves the age.
                    let _ = tokio::time::timeout(Duration::from_secs(1), progressed).await;
                }
                Admission::Async
            }
        }
    }

    /// Ends the wait of every task between attempts: they try again now (a peer came
    /// back, so what failed or waited may go through).
    pub(crate) fn retry_now(&self) {
        self.retry_now.notify_waiters();
    }

    /// Appends a task durably (its creation time is set now) and wakes the dispatcher.
    pub(crate) async fn append(&self, mut task: Task) -> Result<Task, ReplicationError> {
        task.created_ms = epoch_ms(SystemTime::now());
        let t = self.log.append(task).await?;
        self.wake.notify_one();
        Ok(t)
    }
}

/// Capped exponential backoff with ±25% jitter. Pure: it says how long to wait, the
/// caller waits.
#[derive(Debug)]
pub(crate) struct Backoff {
    next: Duration,
    max: Duration,
    rng: rand::rngs::StdRng,
}

impl Backoff {
    /// Starts at `min`, doubles up to `max`; `seed` makes the jitter reproducible.
    pub(crate) fn new(min: Duration, max: Duration, seed: u64) -> Self {
        Backoff {
            next: min,
            max: max.max(min),
            rng: rand::rngs::StdRng::seed_from_u64(seed),
        }
    }

    /// The delay before the next attempt.
    pub(crate) fn next_delay(&mut self) -> Duration {
        let d = self.next.mul_f64(self.rng.random_range(0.75..1.25));
        self.next = (self.next * 2).min(self.max);
        d
    }
}

/// What one copy attempt of a task came to, when it did not copy it.
#[derive(Debug)]
pub(crate) enum CopyFailure {
    /// The task is obsolete (the block moved to a newer genstamp, or is gone); drop it.
    Obsolete(String),
    /// Try again later (a target or source unreachable, a write failed).
    Retry(String),
    /// Not yet: try again after this long, without counting it as a failure (a repair
    /// waiting out its grace period before copying across the DCI).
    Defer(Duration, String),
}

/// Copies a task's block to its remote targets; returns the bytes copied across.
pub(crate) trait Copier: Send + Sync + 'static {
    fn copy<'a>(&'a self, task: &'a Task) -> BoxFuture<'a, Result<u64, CopyFailure>>;
}

/// Starts the dispatcher: every pending task, in log order, runs its attempts through at
/// most `workers` slots held by `copier`. A task waiting between attempts (backoff, a
/// deferral) holds no slot, so it never stalls the tasks behind it.
pub(crate) fn start(
    queue: Arc<ReplicationQueue>,
    copier: Arc<dyn Copier>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let slots = Arc::new(Semaphore::new(queue.config.workers.max(1)));
        let mut workers = tokio::task::JoinSet::new();
        loop {
            while workers.try_join_next().is_some() {}
            let woken = queue.wake.notified();
            for task in queue.log.pending() {
                if !queue
                    .queued
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(task.seq)
                {
                    continue;
                }
                let (queue, copier, slots) = (queue.clone(), copier.clone(), slots.clone());
                workers.spawn(async move {
                    run_task(&queue, copier.as_ref(), &slots, task).await;
                });
            }
            woken.await;
        }
    })
}

async fn run_task(queue: &ReplicationQueue, copier: &dyn Copier, slots: &Semaphore, task: Task) {
    let mut backoff = Backoff::new(
        queue.config.backoff_min,
        queue.config.backoff_max,
        task.seq ^ 0x5eed,
    );
    loop {
        let Ok(permit) = slots.acquire().await else {
            return;
        };
        let result = copier.copy(&task).await;
        drop(permit);
        let wait = match result {
            Ok(copied) => {
                queue.drained.fetch_add(copied, Ordering::Relaxed);
                break;
            }
            Err(CopyFailure::Obsolete(why)) => {
                tracing::info!(block = %task.block, genstamp = %task.genstamp, reason = why, "dropping obsolete task");
                queue.dropped.fetch_add(1, Ordering::Relaxed);
                break;
            }
            Err(CopyFailure::Retry(why)) => {
                let delay = backoff.next_delay();
                tracing::debug!(block = %task.block, reason = why, ?delay, "copy attempt failed, backing off");
                delay
            }
            Err(CopyFailure::Defer(delay, why)) => {
                tracing::debug!(block = %task.block, reason = why, ?delay, "copy deferred");
                delay
            }
        };
        let early = queue.retry_now.notified();
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = early => {}
        }
    }
    if let Err(e) = queue.log.complete(task.seq).await {
        tracing::error!(seq = task.seq, error = %e, "cannot record a finished task");
    }
    queue
        .queued
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .remove(&task.seq);
    queue.progress.notify_waiters();
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block::{BlockId, GenStamp};

    fn task(seq: u64, len: u64, created_ms: u64) -> Task {
        Task {
            seq,
            block: BlockId(seq),
            genstamp: GenStamp(1),
            len,
            sources: vec!["a1".into()],
            target_idc: "idc-b".into(),
            targets: vec!["b1".into()],
            created_ms,
        }
    }

    #[test]
    fn rpo_age_is_measured_from_the_oldest_task_at_the_given_time() {
        let pending = [task(1, 100, 5_000), task(2, 50, 4_000)];
        let s = rpo_of(&pending, 9_500, 7);
        assert_eq!(s.pending_tasks, 2);
        assert_eq!(s.pending_bytes, 150);
        assert_eq!(s.oldest_age, Duration::from_millis(5_500));
        assert_eq!(s.drained_bytes, 7);
        // A clock behind a task's creation time reads as age zero, never negative.
        assert_eq!(rpo_of(&pending, 1_000, 0).oldest_age, Duration::ZERO);
        assert_eq!(rpo_of(&[], 9_500, 0), RpoStatus::default());
    }

    #[test]
    fn backoff_doubles_up_to_its_cap_with_bounded_jitter() {
        let (min, max) = (Duration::from_millis(100), Duration::from_secs(10));
        let mut b = Backoff::new(min, max, 1);
        let mut nominal = min;
        for _ in 0..12 {
            let d = b.next_delay();
            assert!(
                d >= nominal.mul_f64(0.75) && d <= nominal.mul_f64(1.25),
                "{d:?} vs {nominal:?}"
            );
            nominal = (nominal * 2).min(max);
        }
        assert_eq!(nominal, max, "reached the cap");
        // Same seed, same delays.
        let (mut x, mut y) = (Backoff::new(min, max, 9), Backoff::new(min, max, 9));
        assert!((0..5).all(|_| x.next_delay() == y.next_delay()));
    }
}

//! The fault-injecting backend, for tests: runs the psync backend and fails the
//! operations a [`FaultPlan`] picks — EIO, ENOSPC, a short write, or a "crash here" cut
//! after which nothing reaches the disk any more.
//!
//! Only data-path operations go through the engine (reads, writes, syncs of data and meta
//! files); creating, renaming and unlinking files do not, so a plan cannot fail those.
//! Exposed as `strait::store::faults` with the `fault-injection` feature.

use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::{Arc, Mutex};

use super::Op;

/// The kind of engine operation a rule matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FaultOp {
    /// A positional write (data or meta file).
    Write,
    /// A positional read.
    Read,
    /// fdatasync or fsync.
    Sync,
}

/// What happens to a matched operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Fault {
    /// The operation does nothing and fails with EIO.
    Eio,
    /// The operation does nothing and fails with ENOSPC (disk full).
    NoSpace,
    /// A write puts only its first `n` bytes on disk, then fails with ENOSPC: a disk that
    /// fills in the middle of a write. Other operations fail with ENOSPC.
    ShortWrite(usize),
    /// The machine stops here: this operation and every later one, on every file, do
    /// nothing and fail with EIO. What reached the disk before the cut stays; a test then
    /// drops the store and reopens the directory to see what recovery makes of it.
    Crash,
    /// The operation runs normally, this long after it was issued: a slow disk, which
    /// lets later operations on other IO threads overtake it.
    Delay(std::time::Duration),
}

/// One rule of a plan: which operations it matches and what it does to them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FaultRule {
    op: FaultOp,
    fault: Fault,
    path_contains: Option<String>,
    file_name: Option<String>,
    offset: Option<u64>,
    skip: u64,
    times: Option<u64>,
}

impl FaultRule {
    /// Matches every `op`, and applies `fault` to each.
    pub fn new(op: FaultOp, fault: Fault) -> Self {
        FaultRule {
            op,
            fault,
            path_contains: None,
            file_name: None,
            offset: None,
            skip: 0,
            times: None,
        }
    }

    /// Only operations on files whose path contains `needle` (e.g. `"blk_7_"` for one
    /// block, `".meta"` for meta files).
    pub fn on_files(mut self, needle: impl Into<String>) -> Self {
        self.path_contains = Some(needle.into());
        self
    }

    /// Only operations on the file named exactly `name` (e.g. `"blk_7_1"`, the data file
    /// of block 7 at genstamp 1, without its meta file).
    pub fn on_file(mut self, name: impl Into<String>) -> Self {
        self.file_name = Some(name.into());
        self
    }

    /// Only reads and writes at file offset `offset` (which of several concurrent writes
    /// is hit then does not depend on the order they reach the engine).
    pub fn at_offset(mut self, offset: u64) -> Self {
        self.offset = Some(offset);
        self
    }

    /// Lets the first `n` matching operations through.
    pub fn after(mut self, n: u64) -> Self {
        self.skip = n;
        self
    }

    /// Applies the fault `n` times, then lets operations through again (default: every
    /// time).
    pub fn times(mut self, n: u64) -> Self {
        self.times = Some(n);
        self
    }

    fn matches(&self, op: FaultOp, path: &Path, offset: Option<u64>) -> bool {
        self.op == op
            && self.offset.is_none_or(|o| offset == Some(o))
            && self
                .path_contains
                .as_deref()
                .is_none_or(|n| path.to_string_lossy().contains(n))
            && self
                .file_name
                .as_deref()
                .is_none_or(|n| path.file_name().is_some_and(|f| f == n))
    }
}

#[derive(Debug, Default)]
struct PlanState {
    /// Each rule with the matching operations seen and the faults it applied.
    rules: Vec<(FaultRule, u64, u64)>,
    crashed: bool,
    injected: u64,
}

/// The faults a store's engine injects. Cheap to clone; clones share the plan, so a test
/// keeps one and changes it while the store runs.
#[derive(Debug, Clone, Default)]
pub struct FaultPlan(Arc<Mutex<PlanState>>);

impl FaultPlan {
    /// A plan that injects nothing yet.
    pub fn new() -> Self {
        Self::default()
    }

    fn state(&self) -> std::sync::MutexGuard<'_, PlanState> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds a rule; the first matching rule decides.
    pub fn add(&self, rule: FaultRule) {
        self.state().rules.push((rule, 0, 0));
    }

    /// Removes every rule (a crash stays a crash).
    pub fn clear(&self) {
        self.state().rules.clear();
    }

    /// Faults applied so far.
    pub fn injected(&self) -> u64 {
        self.state().injected
    }

    /// Whether a [`Fault::Crash`] has fired.
    pub fn crashed(&self) -> bool {
        self.state().crashed
    }

    /// The fault for one operation, if any, counting it.
    fn check(&self, op: FaultOp, path: &Path, offset: Option<u64>) -> Option<Fault> {
        let mut st = self.state();
        if st.crashed {
            st.injected += 1;
            return Some(Fault::Crash);
        }
        let mut hit = None;
        for (rule, seen, fired) in st.rules.iter_mut() {
            if !rule.matches(op, path, offset) {
                continue;
            }
            *seen += 1;
            if *seen <= rule.skip || rule.times.is_some_and(|t| *fired >= t) {
                continue;
            }
            *fired += 1;
            hit = Some(rule.fault);
            break;
        }
        if let Some(f) = hit {
            st.injected += 1;
            if f == Fault::Crash {
                st.crashed = true;
            }
        }
        hit
    }
}

fn error(fault: Fault) -> io::Error {
    match fault {
        Fault::NoSpace | Fault::ShortWrite(_) => io::Error::from_raw_os_error(libc::ENOSPC),
        Fault::Eio | Fault::Crash | Fault::Delay(_) => io::Error::from_raw_os_error(libc::EIO),
    }
}

/// Runs one operation under the plan: faulted, or by the psync backend.
pub(super) fn execute(plan: &FaultPlan, op: Op) {
    let (kind, path, offset) = match &op {
        Op::Write { file, offset, .. } => (FaultOp::Write, file.path.as_path(), Some(*offset)),
        Op::Read { file, offset, .. } => (FaultOp::Read, file.path.as_path(), Some(*offset)),
        Op::Sync { file, .. } => (FaultOp::Sync, file.path.as_path(), None),
        Op::Barrier { .. } => return super::psync::execute(op),
    };
    let fault = match plan.check(kind, path, offset) {
        None => return super::psync::execute(op),
        Some(Fault::Delay(d)) => {
            std::thread::sleep(d);
            return super::psync::execute(op);
        }
        Some(f) => f,
    };
    match op {
        Op::Write {
            file,
            offset,
            buf,
            reply,
        } => {
            if let Fault::ShortWrite(n) = fault {
                let n = n.min(buf.len());
                if let Err(e) = file.file.write_all_at(&buf[..n], offset) {
                    let _ = reply.send((Err(e), buf));
                    return;
                }
            }
            let _ = reply.send((Err(error(fault)), buf));
        }
        Op::Read { buf, reply, .. } => {
            let _ = reply.send((Err(error(fault)), buf));
        }
        Op::Sync { reply, .. } => {
            let _ = reply.send(Err(error(fault)));
        }
        Op::Barrier { reply } => {
            let _ = reply.send(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_skip_then_fire_a_bounded_number_of_times() {
        let plan = FaultPlan::new();
        plan.add(
            FaultRule::new(FaultOp::Write, Fault::NoSpace)
                .on_files("blk_7_")
                .after(2)
                .times(1),
        );
        let p7 = Path::new("/s/rbw/00/00/blk_7_1");
        let p8 = Path::new("/s/rbw/00/00/blk_8_1");
        assert_eq!(plan.check(FaultOp::Write, p8, Some(0)), None, "other file");
        assert_eq!(plan.check(FaultOp::Sync, p7, Some(0)), None, "other op");
        assert_eq!(plan.check(FaultOp::Write, p7, Some(0)), None, "skipped 1");
        assert_eq!(plan.check(FaultOp::Write, p7, Some(0)), None, "skipped 2");
        assert_eq!(
            plan.check(FaultOp::Write, p7, Some(0)),
            Some(Fault::NoSpace)
        );
        assert_eq!(
            plan.check(FaultOp::Write, p7, Some(0)),
            None,
            "fired its one time"
        );
        assert_eq!(plan.injected(), 1);
        // An offset filter picks one write of several.
        plan.add(FaultRule::new(FaultOp::Write, Fault::Eio).at_offset(4096));
        assert_eq!(plan.check(FaultOp::Write, p8, Some(0)), None);
        assert_eq!(plan.check(FaultOp::Write, p8, Some(4096)), Some(Fault::Eio));
    }

    #[test]
    fn a_crash_stops_every_later_operation() {
        let plan = FaultPlan::new();
        plan.add(FaultRule::new(FaultOp::Sync, Fault::Crash).times(1));
        let p = Path::new("/s/x");
        assert_eq!(plan.check(FaultOp::Write, p, Some(0)), None);
        assert_eq!(plan.check(FaultOp::Sync, p, Some(0)), Some(Fault::Crash));
        assert!(plan.crashed());
        plan.clear();
        assert_eq!(plan.check(FaultOp::Read, p, Some(0)), Some(Fault::Crash));
    }
}

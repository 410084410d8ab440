//! The durable, append-only replication log: segment files of framed records in one
//! directory, appended by a single committer task that writes every record waiting and
//! covers them with one `fdatasync` (group commit). An append returns only once its
//! record is durable.
//!
//! Segments are named `seg-<number, 20 digits>.log`, numbered in creation order (a new
//! segment is created with `create_new`, so it can never truncate a live one); the
//! current one rolls after `segment_bytes`, and a segment is deleted once every task in
//! it is done. A batch whose write fails is cut off again before anything else is
//! appended, so no acknowledged record ever sits behind a partial one. On open the
//! segments are replayed in order; a torn tail of the last segment (a crash in the middle
//! of a write) is cut; damage inside an older segment is an error.

use std::collections::{BTreeMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use tokio::sync::{mpsc, oneshot};

use super::ReplicationError;
use super::record::{Record, Task, decode_all};

struct Segment {
    number: u64,
    path: PathBuf,
    /// Tasks in this segment not yet done.
    open: HashSet<u64>,
}

struct State {
    dir: PathBuf,
    segments: Vec<Segment>,
    pending: BTreeMap<u64, Task>,
    next_seq: u64,
    /// Number of the next segment file: one more than any that exists, so a new segment
    /// never takes the name of a live one.
    next_segment: u64,
    /// A failed write could not be undone: appending behind its partial record would
    /// hide later records from the next open, so the log refuses appends.
    broken: Option<String>,
    /// Tests: the next batch write puts only this many bytes on disk, then fails.
    #[cfg(test)]
    short_write: Option<usize>,
}

enum Op {
    Task(Task, oneshot::Sender<Result<(), ReplicationError>>),
    Done(u64, oneshot::Sender<Result<(), ReplicationError>>),
}

/// The log. Cheap to clone.
#[derive(Clone)]
pub struct ReplicationLog {
    tx: mpsc::Sender<Op>,
    state: Arc<Mutex<State>>,
}

fn io(path: &Path, e: std::io::Error) -> ReplicationError {
    ReplicationError::Io {
        path: path.to_path_buf(),
        source: e,
    }
}

fn seg_name(number: u64) -> String {
    format!("seg-{number:020}.log")
}

fn fsync_dir(dir: &Path) -> Result<(), ReplicationError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io(dir, e))
}

impl ReplicationLog {
    /// Opens (or creates) the log in `dir`; returns it and the tasks not yet done, in
    /// order. Must run inside a tokio runtime (it starts the committer task).
    pub fn open(
        dir: &Path,
        segment_bytes: u64,
    ) -> Result<(ReplicationLog, Vec<Task>), ReplicationError> {
        fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
        let mut names: Vec<(u64, PathBuf)> = fs::read_dir(dir)
            .map_err(|e| io(dir, e))?
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                let seq = name
                    .strip_prefix("seg-")?
                    .strip_suffix(".log")?
                    .parse()
                    .ok()?;
                Some((seq, e.path()))
            })
            .collect();
        names.sort();
        let mut pending = BTreeMap::new();
        let mut segments = Vec::new();
        let mut next_seq = 0;
        let last = names.len().saturating_sub(1);
        for (i, (number, path)) in names.into_iter().enumerate() {
            let bytes = fs::read(&path).map_err(|e| io(&path, e))?;
            let (records, valid) = decode_all(&bytes);
            if valid < bytes.len() {
                if i != last {
                    return Err(ReplicationError::Corrupt {
                        path,
                        offset: valid as u64,
                    });
                }
                tracing::warn!(path = %path.display(), cut = bytes.len() - valid, "cutting torn tail of the replication log");
                let f = OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .map_err(|e| io(&path, e))?;
                f.set_len(valid as u64).map_err(|e| io(&path, e))?;
                f.sync_all().map_err(|e| io(&path, e))?;
            }
            let mut open = HashSet::new();
            for r in records {
                match r {
                    Record::Task(t) => {
                        next_seq = next_seq.max(t.seq + 1);
                        open.insert(t.seq);
                        pending.insert(t.seq, t);
                    }
                    Record::Done { seq } => {
                        pending.remove(&seq);
                        for s in segments
                            .iter_mut()
                            .map(|s: &mut Segment| &mut s.open)
                            .chain(std::iter::once(&mut open))
                        {
                            s.remove(&seq);
                        }
                    }
                }
            }
            segments.push(Segment { number, path, open });
        }
        let mut next_segment = segments.last().map_or(0, |s| s.number + 1);
        if segments.is_empty() {
            let path = dir.join(seg_name(next_segment));
            create_segment(&path)?;
            fsync_dir(dir)?;
            segments.push(Segment {
                number: next_segment,
                path,
                open: HashSet::new(),
            });
            next_segment += 1;
        }
        let tasks: Vec<Task> = pending.values().cloned().collect();
        let state = Arc::new(Mutex::new(State {
            dir: dir.to_path_buf(),
            segments,
            pending,
            next_seq,
            next_segment,
            broken: None,
            #[cfg(test)]
            short_write: None,
        }));
        let (tx, rx) = mpsc::channel(4096);
        tokio::spawn(commit_loop(state.clone(), rx, segment_bytes));
        Ok((ReplicationLog { tx, state }, tasks))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Appends a task (its `seq` is assigned here) and returns once it is durable.
    pub async fn append(&self, mut task: Task) -> Result<Task, ReplicationError> {
        task.seq = {
            let mut st = self.lock();
            let s = st.next_seq;
            st.next_seq += 1;
            s
        };
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Op::Task(task.clone(), tx))
            .await
            .map_err(|_| ReplicationError::Closed)?;
        rx.await.map_err(|_| ReplicationError::Closed)??;
        Ok(task)
    }

    /// Records that task `seq` is done (durably), and reclaims segments left empty.
    pub async fn complete(&self, seq: u64) -> Result<(), ReplicationError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Op::Done(seq, tx))
            .await
            .map_err(|_| ReplicationError::Closed)?;
        rx.await.map_err(|_| ReplicationError::Closed)?
    }

    /// Tasks not yet done, in order.
    pub fn pending(&self) -> Vec<Task> {
        self.lock().pending.values().cloned().collect()
    }

    /// Number of segment files.
    pub fn segments(&self) -> usize {
        self.lock().segments.len()
    }
}

async fn commit_loop(state: Arc<Mutex<State>>, mut rx: mpsc::Receiver<Op>, segment_bytes: u64) {
    while let Some(first) = rx.recv().await {
        // Group commit: everything waiting now goes out with one write and one fdatasync.
        let mut batch = vec![first];
        while batch.len() < 4096 {
            match rx.try_recv() {
                Ok(op) => batch.push(op),
                Err(_) => break,
            }
        }
        let st = state.clone();
        let records: Vec<Record> = batch
            .iter()
            .map(|op| match op {
                Op::Task(t, _) => Record::Task(t.clone()),
                Op::Done(seq, _) => Record::Done { seq: *seq },
            })
            .collect();
        let result = tokio::task::spawn_blocking(move || write_batch(&st, &records, segment_bytes))
            .await
            .unwrap_or_else(|e| {
                Err(ReplicationError::Io {
                    path: PathBuf::new(),
                    source: std::io::Error::other(e.to_string()),
                })
            });
        for op in batch {
            let reply = match op {
                Op::Task(_, r) | Op::Done(_, r) => r,
            };
            let _ = reply.send(match &result {
                Ok(()) => Ok(()),
                Err(e) => Err(ReplicationError::Io {
                    path: PathBuf::new(),
                    source: std::io::Error::other(e.to_string()),
                }),
            });
        }
    }
}

/// Creates an empty segment file; an existing file is an error, never truncated.
fn create_segment(path: &Path) -> Result<(), ReplicationError> {
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map(drop)
        .map_err(|e| io(path, e))
}

/// Writes one batch at the end of the segment and makes it durable.
fn append(
    #[cfg_attr(not(test), allow(unused_variables))] st: &mut State,
    f: &mut File,
    buf: &[u8],
) -> std::io::Result<()> {
    #[cfg(test)]
    if let Some(n) = st.short_write.take() {
        f.write_all(&buf[..n.min(buf.len())])?;
        return Err(std::io::Error::other("injected short write"));
    }
    f.write_all(buf)?;
    f.sync_data()
}

fn write_batch(
    state: &Mutex<State>,
    records: &[Record],
    segment_bytes: u64,
) -> Result<(), ReplicationError> {
    let mut st = state.lock().unwrap_or_else(|e| e.into_inner());
    let mut buf = Vec::with_capacity(records.len() * 96);
    for r in records {
        r.encode(&mut buf);
    }
    if let Some(why) = &st.broken {
        return Err(ReplicationError::Io {
            path: st.dir.clone(),
            source: std::io::Error::other(format!("log refuses appends: {why}")),
        });
    }
    // Roll the segment first if this batch would overflow it (and it has content).
    let cur_path = st
        .segments
        .last()
        .map(|s| s.path.clone())
        .unwrap_or_default();
    let cur_len = fs::metadata(&cur_path).map(|m| m.len()).unwrap_or(0);
    if cur_len > 0 && cur_len + buf.len() as u64 > segment_bytes {
        let number = st.next_segment;
        let path = st.dir.join(seg_name(number));
        create_segment(&path)?;
        fsync_dir(&st.dir.clone())?;
        st.next_segment += 1;
        st.segments.push(Segment {
            number,
            path,
            open: HashSet::new(),
        });
    }
    let path = st
        .segments
        .last()
        .map(|s| s.path.clone())
        .unwrap_or_default();
    let mut f = OpenOptions::new()
        .append(true)
        .open(&path)
        .map_err(|e| io(&path, e))?;
    let before = f.metadata().map_err(|e| io(&path, e))?.len();
    if let Err(e) = append(&mut st, &mut f, &buf) {
        // Nothing of a failed batch may stay: later batches would sit behind a partial
        // record, and the next open would cut them with it.
        if let Err(undo) = f.set_len(before).and_then(|()| f.sync_all()) {
            st.broken = Some(format!("a failed write could not be undone: {undo}"));
        }
        return Err(io(&path, e));
    }
    // Durable: apply to the in-memory state.
    for r in records {
        match r {
            Record::Task(t) => {
                st.pending.insert(t.seq, t.clone());
                if let Some(s) = st.segments.last_mut() {
                    s.open.insert(t.seq);
                }
            }
            Record::Done { seq } => {
                st.pending.remove(seq);
                for s in &mut st.segments {
                    s.open.remove(seq);
                }
            }
        }
    }
    // Reclaim finished segments (never the current one).
    let n = st.segments.len();
    let mut keep = Vec::with_capacity(n);
    for (i, s) in std::mem::take(&mut st.segments).into_iter().enumerate() {
        if i + 1 < n && s.open.is_empty() {
            let _ = fs::remove_file(&s.path);
            tracing::debug!(segment = s.number, "reclaimed replication log segment");
        } else {
            keep.push(s);
        }
    }
    st.segments = keep;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block::{BlockId, GenStamp};

    fn task(block: u64) -> Task {
        Task {
            seq: 0,
            block: BlockId(block),
            genstamp: GenStamp(1),
            len: 4096,
            sources: vec!["a1".into()],
            target_idc: "idc-b".into(),
            targets: vec!["b1".into(), "b2".into()],
            created_ms: 0,
        }
    }

    #[tokio::test]
    async fn append_complete_reopen_and_reclaim() {
        let dir = tempfile::tempdir().unwrap();
        let (log, pending) = ReplicationLog::open(dir.path(), 400).unwrap();
        assert!(pending.is_empty());
        let mut seqs = Vec::new();
        // Concurrent appends share fsyncs.
        let futs: Vec<_> = (0..20).map(|b| log.append(task(b))).collect();
        for f in futs {
            seqs.push(f.await.unwrap().seq);
        }
        assert!(log.segments() > 1, "segments roll at 400 bytes");
        for &s in &seqs[..15] {
            log.complete(s).await.unwrap();
        }
        let left: Vec<u64> = log.pending().iter().map(|t| t.seq).collect();
        assert_eq!(left, seqs[15..].to_vec());
        let segs = log.segments();
        drop(log);
        let (log, pending) = ReplicationLog::open(dir.path(), 400).unwrap();
        assert_eq!(
            pending.iter().map(|t| t.seq).collect::<Vec<_>>(),
            seqs[15..].to_vec()
        );
        assert_eq!(log.segments(), segs);
        for &s in &seqs[15..] {
            log.complete(s).await.unwrap();
        }
        assert_eq!(log.segments(), 1, "finished segments are reclaimed");
        // New appends continue the sequence.
        assert!(log.append(task(99)).await.unwrap().seq > *seqs.last().unwrap());
    }

    #[tokio::test]
    async fn torn_tail_is_cut_and_the_rest_kept() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (log, _) = ReplicationLog::open(dir.path(), 1 << 20).unwrap();
            for b in 0..5 {
                log.append(task(b)).await.unwrap();
            }
        }
        let seg = fs::read_dir(dir.path())
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .path();
        let len = fs::metadata(&seg).unwrap().len();
        // Truncate the last record in the middle.
        OpenOptions::new()
            .write(true)
            .open(&seg)
            .unwrap()
            .set_len(len - 5)
            .unwrap();
        let (log, pending) = ReplicationLog::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(
            pending.iter().map(|t| t.block.0).collect::<Vec<_>>(),
            vec![0, 1, 2, 3]
        );
        assert!(
            fs::metadata(&seg).unwrap().len() < len - 5,
            "the torn record was cut"
        );
        let t = log.append(task(7)).await.unwrap();
        assert_eq!(t.seq, 4, "the cut task's sequence number is reused");
        drop(log);
        let (_, pending) = ReplicationLog::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(pending.len(), 5);
    }

    #[tokio::test]
    async fn rolls_made_of_done_records_never_reuse_a_live_segment() {
        let dir = tempfile::tempdir().unwrap();
        // Segments of 150 bytes hold one task record (~90 bytes) or ~8 Done records.
        let (log, _) = ReplicationLog::open(dir.path(), 150).unwrap();
        let mut seqs = Vec::new();
        for b in 0..30 {
            seqs.push(log.append(task(b)).await.unwrap().seq);
        }
        // Completing them one by one fills segments with Done records only: several rolls
        // in a row with no new task in between.
        for &s in &seqs {
            log.complete(s).await.unwrap();
        }
        assert!(log.pending().is_empty());
        drop(log);
        let (log, pending) = ReplicationLog::open(dir.path(), 150).unwrap();
        assert!(
            pending.is_empty(),
            "done tasks came back after a restart: {:?}",
            pending.iter().map(|t| t.seq).collect::<Vec<_>>()
        );
        // And the log still works.
        let t = log.append(task(42)).await.unwrap();
        log.complete(t.seq).await.unwrap();
    }

    #[tokio::test]
    async fn a_failed_append_leaves_nothing_that_hides_later_ones() {
        let dir = tempfile::tempdir().unwrap();
        let (log, _) = ReplicationLog::open(dir.path(), 1 << 20).unwrap();
        log.append(task(1)).await.unwrap();
        // The next write puts 7 bytes on disk, then fails (a disk that filled up).
        log.lock().short_write = Some(7);
        assert!(log.append(task(2)).await.is_err());
        // Later appends are acknowledged...
        let t3 = log.append(task(3)).await.unwrap();
        drop(log);
        // ...and must survive a restart.
        let (_, pending) = ReplicationLog::open(dir.path(), 1 << 20).unwrap();
        let blocks: Vec<u64> = pending.iter().map(|t| t.block.0).collect();
        assert_eq!(
            blocks,
            vec![1, 3],
            "an acknowledged task was lost (seq {})",
            t3.seq
        );
    }

    #[tokio::test]
    async fn damage_in_an_older_segment_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (log, _) = ReplicationLog::open(dir.path(), 200).unwrap();
            for b in 0..6 {
                log.append(task(b)).await.unwrap();
            }
            assert!(log.segments() >= 2);
        }
        let mut segs: Vec<PathBuf> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        segs.sort();
        let mut bytes = fs::read(&segs[0]).unwrap();
        bytes[10] ^= 0xff;
        fs::write(&segs[0], bytes).unwrap();
        assert!(matches!(
            ReplicationLog::open(dir.path(), 200),
            Err(ReplicationError::Corrupt { .. })
        ));
    }
}

//! The disk IO engine: dedicated threads that execute positional reads, writes and syncs
//! for the store, fed through bounded channels with owned buffers; replies come back on
//! oneshot channels, so callers on the tokio multi-thread runtime never block on disk.
//!
//! Two backends behind one interface:
//! - `uring`: each thread runs a tokio-uring runtime and keeps up to `depth` operations in
//!   flight. tokio-uring types are `!Send`; they never leave their thread. A file is pinned
//!   to one thread, which caches its own handle (a dup of the caller's fd) for it; when the
//!   last [`FileRef`] is dropped, its key joins the thread's [`CloseQueue`], and
//!   [`Engine::barrier`] waits until every close queued so far has happened (so that a
//!   deleted file's space is free when `delete` returns).
//! - `psync`: plain `pread`/`pwrite`/`fdatasync` on a small pool of threads; always
//!   compiled, used where io_uring cannot be set up.
//!
//! The store's group committer runs its writes and `syncfs` on its own thread through
//! [`Engine::write_here`] and [`Engine::sync_here`] (under the fault plan, if any).
//! Metadata operations (open, rename, unlink, directory fsync) are not here: the store
//! runs them with `spawn_blocking` or on the committer.

use std::fmt;
use std::fs::File;
use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use tokio::sync::{mpsc, oneshot};

use super::aligned::AlignedBuf;

/// Which IO backend a store uses.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Deserialize, serde::Serialize,
)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// io_uring when it can be set up, else psync (with a warning).
    #[default]
    Auto,
    /// io_uring (tokio-uring) on dedicated threads; fails if unavailable.
    Uring,
    /// Positional reads and writes on a thread pool.
    Psync,
}

impl fmt::Display for BackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BackendKind::Auto => "auto",
            BackendKind::Uring => "uring",
            BackendKind::Psync => "psync",
        })
    }
}

impl std::str::FromStr for BackendKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(BackendKind::Auto),
            "uring" => Ok(BackendKind::Uring),
            "psync" => Ok(BackendKind::Psync),
            other => Err(format!(
                "unknown store backend {other:?} (auto, uring, psync)"
            )),
        }
    }
}

static NEXT_KEY: AtomicU64 = AtomicU64::new(1);

/// An open file the engine can do IO on, made by [`Engine::file`]. Cheap to share; the fd
/// (and the uring thread's dup of it) closes when the last reference is dropped.
#[derive(Debug)]
pub(crate) struct FileRef {
    key: u64,
    /// Which uring thread serves the file (modulo the threads).
    lane: usize,
    pub(crate) file: File,
    pub(crate) path: PathBuf,
    /// Tells the file's uring thread to drop its cached handle.
    closer: Option<Arc<CloseQueue>>,
    /// The engine's count of open files.
    open: Arc<AtomicUsize>,
}

impl Drop for FileRef {
    fn drop(&mut self) {
        self.open.fetch_sub(1, Ordering::Relaxed);
        if let Some(closer) = &self.closer {
            closer.push(self.key);
        }
    }
}

/// Files dropped whose cached handles a uring thread has yet to close. A drop only
/// queues its key; the thread closes the queued handles before its next operation, at a
/// barrier, every [`CLOSE_TICK`], or at once when [`CLOSE_BATCH`] have queued up (the
/// only time a drop wakes it). A replica written and dropped thus costs its ring thread
/// no wake-up of its own (two, one per file, before), and the handles of dropped files
/// stay open at most one tick on an idle thread.
#[derive(Debug, Default)]
pub(crate) struct CloseQueue {
    keys: std::sync::Mutex<Vec<u64>>,
    full: tokio::sync::Notify,
}

/// Queued closes that wake the thread.
const CLOSE_BATCH: usize = 64;

/// How often an idle uring thread closes the handles of dropped files.
#[cfg_attr(not(target_os = "linux"), allow(dead_code))]
const CLOSE_TICK: std::time::Duration = std::time::Duration::from_millis(50);

impl CloseQueue {
    fn push(&self, key: u64) {
        let mut keys = self.keys.lock().unwrap_or_else(|e| e.into_inner());
        keys.push(key);
        if keys.len() >= CLOSE_BATCH {
            self.full.notify_one();
        }
    }

    /// The keys queued so far, taken.
    #[cfg_attr(not(target_os = "linux"), allow(dead_code))]
    fn take(&self) -> Vec<u64> {
        std::mem::take(&mut *self.keys.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Returns when a full batch has queued up.
    #[cfg_attr(not(target_os = "linux"), allow(dead_code))]
    async fn wait_full(&self) {
        self.full.notified().await
    }
}

type BufReply<T> = oneshot::Sender<(io::Result<T>, AlignedBuf)>;

enum Op {
    /// Write all of `buf` at `offset`.
    Write {
        file: Arc<FileRef>,
        offset: u64,
        buf: AlignedBuf,
        reply: BufReply<()>,
    },
    /// Read `len` bytes at `offset` into `buf` (stops early only at end of file);
    /// `buf.len()` is set to the count read.
    Read {
        file: Arc<FileRef>,
        offset: u64,
        len: usize,
        buf: AlignedBuf,
        reply: BufReply<usize>,
    },
    /// Makes everything on `file`'s filesystem durable: data, metadata, directory
    /// entries (syncfs).
    Sync {
        file: Arc<FileRef>,
        reply: oneshot::Sender<io::Result<()>>,
    },
    /// Reply once every close message sent before this op has been handled.
    #[cfg_attr(not(target_os = "linux"), allow(dead_code))]
    Barrier { reply: oneshot::Sender<()> },
}

/// Tuning of the engine threads.
#[derive(Debug, Clone)]
pub(crate) struct EngineConfig {
    pub(crate) threads: usize,
    pub(crate) depth: usize,
    /// Run the fault-injecting backend (psync under this plan) whatever the kind asked.
    pub(crate) faults: Option<FaultPlan>,
}

/// Handle to the engine's threads; clones share them. The threads exit when the last
/// clone is dropped.
#[derive(Clone)]
pub(crate) struct Engine {
    inner: Arc<Inner>,
}

struct Inner {
    backend: BackendKind,
    workers: Vec<mpsc::Sender<Op>>,
    /// Close queues of the uring threads (empty for psync). Each entry stands for one
    /// dropped file, and a full batch wakes its thread, so a queue stays short.
    closers: Vec<Arc<CloseQueue>>,
    next: AtomicUsize,
    /// Files wrapped by [`Engine::file`] and not yet dropped.
    open: Arc<AtomicUsize>,
    /// The fault plan every operation runs under (tests only).
    faults: Option<FaultPlan>,
}

fn stopped() -> io::Error {
    io::Error::other("store IO engine has stopped")
}

impl Engine {
    /// Starts the engine. `Auto` tries uring first and falls back to psync, returning the
    /// reason uring was not used.
    pub(crate) fn start(
        kind: BackendKind,
        config: EngineConfig,
    ) -> io::Result<(Engine, Option<io::Error>)> {
        if config.faults.is_some() {
            return Ok((Self::start_psync(config)?, None));
        }
        match kind {
            BackendKind::Psync => Ok((Self::start_psync(config)?, None)),
            BackendKind::Uring => Ok((Self::start_uring(config)?, None)),
            BackendKind::Auto => match Self::start_uring(config.clone()) {
                Ok(e) => Ok((e, None)),
                Err(why) => Ok((Self::start_psync(config)?, Some(why))),
            },
        }
    }

    /// The backend actually running.
    pub(crate) fn backend(&self) -> BackendKind {
        self.inner.backend
    }

    fn start_psync(config: EngineConfig) -> io::Result<Engine> {
        let mut workers = Vec::with_capacity(config.threads);
        for i in 0..config.threads.max(1) {
            let (tx, mut rx) = mpsc::channel::<Op>(config.depth.max(1));
            let faults = config.faults.clone();
            std::thread::Builder::new()
                .name(format!("strait-psync-{i}"))
                .spawn(move || {
                    while let Some(op) = rx.blocking_recv() {
                        match &faults {
                            Some(plan) => faulty::execute(plan, op),
                            None => psync::execute(op),
                        }
                    }
                })?;
            workers.push(tx);
        }
        Ok(Engine {
            inner: Arc::new(Inner {
                backend: BackendKind::Psync,
                workers,
                closers: Vec::new(),
                next: AtomicUsize::new(0),
                open: Arc::default(),
                faults: config.faults,
            }),
        })
    }

    #[cfg(not(target_os = "linux"))]
    fn start_uring(_config: EngineConfig) -> io::Result<Engine> {
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "io_uring exists only on Linux",
        ))
    }

    #[cfg(target_os = "linux")]
    fn start_uring(config: EngineConfig) -> io::Result<Engine> {
        let mut workers = Vec::with_capacity(config.threads);
        let mut closers = Vec::with_capacity(config.threads);
        for i in 0..config.threads.max(1) {
            let (w, c) = uring::spawn(i, config.depth.max(1))?;
            workers.push(w);
            closers.push(c);
        }
        Ok(Engine {
            inner: Arc::new(Inner {
                backend: BackendKind::Uring,
                workers,
                closers,
                next: AtomicUsize::new(0),
                open: Arc::default(),
                faults: None,
            }),
        })
    }

    /// Wraps an open file for IO through this engine.
    pub(crate) fn file(&self, file: File, path: PathBuf) -> Arc<FileRef> {
        self.file_in_lane(file, path, None)
    }

    /// Wraps a replica's data and meta files in one lane: with the uring backend both are
    /// served by the same ring thread, so a packet's data and checksum writes, issued
    /// together, wake one thread, not two. (psync threads take any file's ops.)
    pub(crate) fn pair(
        &self,
        data: (File, PathBuf),
        meta: (File, PathBuf),
    ) -> (Arc<FileRef>, Arc<FileRef>) {
        let data = self.file(data.0, data.1);
        let meta = self.file_in_lane(meta.0, meta.1, Some(data.lane));
        (data, meta)
    }

    /// `lane`: the thread of another file to share (default: files spread by key).
    fn file_in_lane(&self, file: File, path: PathBuf, lane: Option<usize>) -> Arc<FileRef> {
        let key = NEXT_KEY.fetch_add(1, Ordering::Relaxed);
        let lane = lane.unwrap_or(key as usize);
        let closer = match self.inner.closers.len() {
            0 => None,
            n => Some(self.inner.closers[lane % n].clone()),
        };
        self.inner.open.fetch_add(1, Ordering::Relaxed);
        Arc::new(FileRef {
            key,
            lane,
            file,
            path,
            closer,
            open: self.inner.open.clone(),
        })
    }

    /// Files open through this engine (each replica writer or reader holds two).
    pub(crate) fn open_files(&self) -> usize {
        self.inner.open.load(Ordering::Relaxed)
    }

    fn worker(&self, file: &FileRef) -> &mpsc::Sender<Op> {
        let w = &self.inner.workers;
        let i = match self.inner.backend {
            // uring threads cache per-file handles: keep a file on one thread.
            BackendKind::Uring => file.lane % w.len(),
            // psync threads are interchangeable: spread the load.
            _ => self.inner.next.fetch_add(1, Ordering::Relaxed) % w.len(),
        };
        &w[i]
    }

    /// Writes all of `buf` at `offset`; gives the buffer back.
    pub(crate) async fn write_at(
        &self,
        file: &Arc<FileRef>,
        offset: u64,
        buf: AlignedBuf,
    ) -> (io::Result<()>, Option<AlignedBuf>) {
        let (reply, rx) = oneshot::channel();
        let op = Op::Write {
            file: file.clone(),
            offset,
            buf,
            reply,
        };
        if self.worker(file).send(op).await.is_err() {
            return (Err(stopped()), None);
        }
        match rx.await {
            Ok((res, buf)) => (res, Some(buf)),
            Err(_) => (Err(stopped()), None),
        }
    }

    /// Reads `len` bytes (at most `buf.capacity()`) at `offset`; `buf.len()` is the count
    /// read, less than `len` only at end of file.
    pub(crate) async fn read_at(
        &self,
        file: &Arc<FileRef>,
        offset: u64,
        len: usize,
        buf: AlignedBuf,
    ) -> io::Result<AlignedBuf> {
        debug_assert!(len <= buf.capacity());
        let (reply, rx) = oneshot::channel();
        let op = Op::Read {
            file: file.clone(),
            offset,
            len,
            buf,
            reply,
        };
        self.worker(file).send(op).await.map_err(|_| stopped())?;
        let (res, buf) = rx.await.map_err(|_| stopped())?;
        res.map(|_| buf)
    }

    /// Runs `op` on the calling thread, under the fault plan if there is one: for a
    /// thread that is itself an IO thread (the group committer), where a hop to an
    /// engine thread would only add two context switches. Blocks.
    fn execute_here(&self, op: Op) {
        match &self.inner.faults {
            Some(plan) => faulty::execute(plan, op),
            None => psync::execute(op),
        }
    }

    /// Writes all of `buf` at `offset` on the calling thread (see `execute_here`).
    pub(crate) fn write_here(
        &self,
        file: &Arc<FileRef>,
        offset: u64,
        buf: AlignedBuf,
    ) -> io::Result<()> {
        let (reply, mut rx) = oneshot::channel();
        self.execute_here(Op::Write {
            file: file.clone(),
            offset,
            buf,
            reply,
        });
        rx.try_recv().map_err(|_| stopped())?.0
    }

    /// syncfs of the filesystem that holds `file`, on the calling thread.
    pub(crate) fn sync_here(&self, file: &Arc<FileRef>) -> io::Result<()> {
        let (reply, mut rx) = oneshot::channel();
        self.execute_here(Op::Sync {
            file: file.clone(),
            reply,
        });
        rx.try_recv().map_err(|_| stopped())?
    }

    /// Returns once every file dropped before the call has really been closed by the IO
    /// threads (uring keeps its own handles; psync has none).
    pub(crate) async fn barrier(&self) {
        if self.inner.closers.is_empty() {
            return;
        }
        for w in &self.inner.workers {
            let (reply, rx) = oneshot::channel();
            if w.send(Op::Barrier { reply }).await.is_ok() {
                let _ = rx.await;
            }
        }
    }
}

// Compiled always (it is small and pure); public only with the `fault-injection` feature.
#[cfg_attr(not(feature = "fault-injection"), allow(dead_code, unreachable_pub))]
pub(crate) mod faulty;
mod psync;
#[cfg(target_os = "linux")]
mod uring;

pub(crate) use faulty::FaultPlan;

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_file(dir: &std::path::Path, name: &str) -> (File, PathBuf) {
        let path = dir.join(name);
        (File::create(&path).unwrap(), path)
    }

    #[test]
    fn a_replicas_two_files_share_one_io_thread() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let engine = Engine::start(
            BackendKind::Psync,
            EngineConfig {
                threads: 3,
                depth: 4,
                faults: None,
            },
        )
        .unwrap()
        .0;
        for i in 0..10 {
            let (data, meta) = engine.pair(
                temp_file(dir, &format!("d{i}")),
                temp_file(dir, &format!("m{i}")),
            );
            assert_eq!(data.lane, meta.lane, "pair {i}");
            assert_ne!(
                data.key, meta.key,
                "keys stay unique (each has its own handle)"
            );
        }
    }
}

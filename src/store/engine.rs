//! The disk IO engine: dedicated threads that execute positional reads, writes and syncs
//! for the store, fed through bounded channels with owned buffers; replies come back on
//! oneshot channels, so callers on the tokio multi-thread runtime never block on disk.
//!
//! Two backends behind one interface:
//! - `uring`: each thread runs a tokio-uring runtime and keeps up to `depth` operations in
//!   flight. tokio-uring types are `!Send`; they never leave their thread. A file is pinned
//!   to one thread, which caches its own handle (a dup of the caller's fd) for it; when the
//!   last [`FileRef`] is dropped, a close message tells the thread to drop its handle, and
//!   [`Engine::barrier`] waits until every such close sent so far has happened (so that a
//!   deleted file's space is free when `delete` returns).
//! - `psync`: plain `pread`/`pwrite`/`fdatasync` on a small pool of threads; always
//!   compiled, used where io_uring cannot be set up.
//!
//! Metadata operations (open, rename, unlink, directory fsync) are not here: the store
//! runs them with `spawn_blocking`, since they are rare and not on the data path.

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
    pub(crate) file: File,
    pub(crate) path: PathBuf,
    /// Tells the file's uring thread to drop its cached handle.
    closer: Option<mpsc::UnboundedSender<u64>>,
    /// The engine's count of open files.
    open: Arc<AtomicUsize>,
}

impl Drop for FileRef {
    fn drop(&mut self) {
        self.open.fetch_sub(1, Ordering::Relaxed);
        if let Some(closer) = &self.closer {
            let _ = closer.send(self.key);
        }
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
    /// fdatasync (or fsync when `data_only` is false).
    Sync {
        file: Arc<FileRef>,
        data_only: bool,
        reply: oneshot::Sender<io::Result<()>>,
    },
    /// Reply once every close message sent before this op has been handled.
    #[cfg_attr(not(target_os = "linux"), allow(dead_code))]
    Barrier { reply: oneshot::Sender<()> },
}

/// Tuning of the engine threads.
#[derive(Debug, Clone, Copy)]
pub(crate) struct EngineConfig {
    pub(crate) threads: usize,
    pub(crate) depth: usize,
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
    /// Close channels of the uring threads (empty for psync). Unbounded, but each message
    /// stands for one dropped file, so the queue is bounded by the files ever open.
    closers: Vec<mpsc::UnboundedSender<u64>>,
    next: AtomicUsize,
    /// Files wrapped by [`Engine::file`] and not yet dropped.
    open: Arc<AtomicUsize>,
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
        match kind {
            BackendKind::Psync => Ok((Self::start_psync(config)?, None)),
            BackendKind::Uring => Ok((Self::start_uring(config)?, None)),
            BackendKind::Auto => match Self::start_uring(config) {
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
            std::thread::Builder::new()
                .name(format!("strait-psync-{i}"))
                .spawn(move || {
                    while let Some(op) = rx.blocking_recv() {
                        psync::execute(op);
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
            }),
        })
    }

    /// Wraps an open file for IO through this engine.
    pub(crate) fn file(&self, file: File, path: PathBuf) -> Arc<FileRef> {
        let key = NEXT_KEY.fetch_add(1, Ordering::Relaxed);
        let closer = match self.inner.closers.len() {
            0 => None,
            n => Some(self.inner.closers[key as usize % n].clone()),
        };
        self.inner.open.fetch_add(1, Ordering::Relaxed);
        Arc::new(FileRef {
            key,
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
            BackendKind::Uring => file.key as usize % w.len(),
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

    /// fdatasync (`data_only`) or fsync.
    pub(crate) async fn sync(&self, file: &Arc<FileRef>, data_only: bool) -> io::Result<()> {
        let (reply, rx) = oneshot::channel();
        let op = Op::Sync {
            file: file.clone(),
            data_only,
            reply,
        };
        self.worker(file).send(op).await.map_err(|_| stopped())?;
        rx.await.map_err(|_| stopped())?
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

mod psync {
    use std::os::unix::fs::FileExt;

    use super::Op;

    pub(super) fn execute(op: Op) {
        match op {
            Op::Write {
                file,
                offset,
                buf,
                reply,
            } => {
                let res = file.file.write_all_at(&buf, offset);
                let _ = reply.send((res, buf));
            }
            Op::Read {
                file,
                offset,
                len: want,
                mut buf,
                reply,
            } => {
                let want = want.min(buf.capacity());
                buf.set_len(want);
                let mut done = 0;
                let res = loop {
                    if done == want {
                        break Ok(done);
                    }
                    match file.file.read_at(&mut buf[done..], offset + done as u64) {
                        Ok(0) => break Ok(done),
                        Ok(n) => done += n,
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                        Err(e) => break Err(e),
                    }
                };
                buf.set_len(done);
                let _ = reply.send((res, buf));
            }
            Op::Sync {
                file,
                data_only,
                reply,
            } => {
                let res = if data_only {
                    file.file.sync_data()
                } else {
                    file.file.sync_all()
                };
                let _ = reply.send(res);
            }
            Op::Barrier { reply } => {
                let _ = reply.send(());
            }
        }
    }
}

#[cfg(target_os = "linux")]
mod uring {
    use std::cell::RefCell;
    use std::collections::HashMap;
    use std::io;
    use std::rc::Rc;
    use std::sync::Arc;

    use tokio::sync::{Semaphore, mpsc};
    use tokio_uring::buf::BoundedBuf;
    use tokio_uring::fs::File as UringFile;

    use super::{FileRef, Op};

    type Cache = Rc<RefCell<HashMap<u64, Rc<UringFile>>>>;

    /// Starts one uring thread; fails if the ring cannot be created. Returns its op queue
    /// and its close channel.
    pub(super) fn spawn(
        index: usize,
        depth: usize,
    ) -> io::Result<(mpsc::Sender<Op>, mpsc::UnboundedSender<u64>)> {
        let (tx, rx) = mpsc::channel::<Op>(depth);
        let (close_tx, close_rx) = mpsc::unbounded_channel::<u64>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<io::Result<()>>();
        std::thread::Builder::new()
            .name(format!("strait-uring-{index}"))
            .spawn(move || {
                let entries = (depth as u32 * 2).next_power_of_two().max(8);
                let mut builder = tokio_uring::builder();
                builder.entries(entries);
                let rt = match tokio_uring::Runtime::new(&builder) {
                    Ok(rt) => {
                        let _ = ready_tx.send(Ok(()));
                        rt
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                rt.block_on(run(rx, close_rx, depth));
            })?;
        match ready_rx.recv() {
            Ok(Ok(())) => Ok((tx, close_tx)),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(io::Error::other("uring thread died during setup")),
        }
    }

    fn handle(cache: &Cache, file: &Arc<FileRef>) -> io::Result<Rc<UringFile>> {
        let mut c = cache.borrow_mut();
        if let Some(f) = c.get(&file.key) {
            return Ok(f.clone());
        }
        let f = Rc::new(UringFile::from_std(file.file.try_clone()?));
        c.insert(file.key, f.clone());
        Ok(f)
    }

    async fn run(
        mut rx: mpsc::Receiver<Op>,
        mut closes: mpsc::UnboundedReceiver<u64>,
        depth: usize,
    ) {
        let cache: Cache = Rc::new(RefCell::new(HashMap::new()));
        let slots = Arc::new(Semaphore::new(depth));
        loop {
            let op = tokio::select! {
                biased;
                Some(key) = closes.recv() => {
                    // In-flight ops hold their own Rc; the fd closes when the last goes.
                    cache.borrow_mut().remove(&key);
                    continue;
                }
                op = rx.recv() => match op {
                    Some(op) => op,
                    None => break,
                },
            };
            if let Op::Barrier { reply } = op {
                while let Ok(key) = closes.try_recv() {
                    cache.borrow_mut().remove(&key);
                }
                let _ = reply.send(());
                continue;
            }
            // Bound the operations in flight on this ring.
            let Ok(permit) = slots.clone().acquire_owned().await else {
                break;
            };
            let cache = cache.clone();
            tokio_uring::spawn(async move {
                execute(&cache, op).await;
                drop(permit);
            });
        }
    }

    async fn execute(cache: &Cache, op: Op) {
        match op {
            Op::Write {
                file,
                offset,
                buf,
                reply,
            } => {
                let f = match handle(cache, &file) {
                    Ok(f) => f,
                    Err(e) => {
                        let _ = reply.send((Err(e), buf));
                        return;
                    }
                };
                let (res, buf) = f.write_all_at(buf, offset).await;
                let _ = reply.send((res, buf));
            }
            Op::Read {
                file,
                offset,
                len: want,
                mut buf,
                reply,
            } => {
                let f = match handle(cache, &file) {
                    Ok(f) => f,
                    Err(e) => {
                        let _ = reply.send((Err(e), buf));
                        return;
                    }
                };
                let want = want.min(buf.capacity());
                buf.set_len(0);
                let res = loop {
                    let done = buf.len();
                    if done == want {
                        break Ok(done);
                    }
                    let (res, slice) = f.read_at(buf.slice(done..want), offset + done as u64).await;
                    buf = slice.into_inner();
                    match res {
                        Ok(0) => break Ok(done),
                        Ok(_) => {}
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(e) => break Err(e),
                    }
                };
                let _ = reply.send((res, buf));
            }
            Op::Sync {
                file,
                data_only,
                reply,
            } => {
                let res = match handle(cache, &file) {
                    Ok(f) if data_only => f.sync_data().await,
                    Ok(f) => f.sync_all().await,
                    Err(e) => Err(e),
                };
                let _ = reply.send(res);
            }
            Op::Barrier { reply } => {
                let _ = reply.send(());
            }
        }
    }
}

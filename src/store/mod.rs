//! Block replicas on local disk: the only place strait touches the disk.
//!
//! A replica is a data file and a meta file (header + one CRC32C per chunk, see
//! [`meta`](self) format below), named from numbers only: `blk_<id>_<genstamp>` and
//! `blk_<id>_<genstamp>.meta`. They live under the store root in one of three states,
//! each spread over two levels of hex subdirectories (by bits 16..24 and 8..16 of the
//! block id) so that no directory grows past a few hundred entries:
//!
//! ```text
//! root/LOCK                       held (flock) while a process has the store open
//! root/rbw/0a/1f/blk_…            replicas being written
//! root/finalized/0a/1f/blk_…      complete, durable replicas
//! root/corrupt/0a/1f/blk_…        quarantined: failed verification, never served
//! ```
//!
//! Writes go through a [`ReplicaWriter`] in whole chunks (only the block's last chunk may be
//! short) and are verified against their checksums before they touch the disk. Data files
//! use O_DIRECT with aligned buffers when the filesystem supports it; meta files are small
//! and buffered. [`ReplicaWriter::finalize`] fsyncs data and meta, renames meta then data
//! into `finalized`, and fsyncs both directories, so a crash at any point leaves either a
//! complete finalized replica or a recoverable `rbw` one. Every chunk a [`ReplicaReader`]
//! returns has been verified; a mismatch quarantines the replica.
//!
//! On [`BlockStore::open`] the store scans its root: finalized replicas are indexed (and
//! verified in full when [`StoreConfig::verify_on_open`] is set); each `rbw` replica is
//! truncated to its longest prefix of chunks whose CRCs verify and reported with that
//! length, so the pipeline can recover it.
//!
//! This module does not decide which blocks a node should hold, nor talk to peers.

mod aligned;
mod engine;
mod meta;

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::sync::RwLock;

use crate::block::{BlockId, ChecksumSpec, GenStamp, MAX_BLOCK_SIZE};
use aligned::{ALIGN, BufPool, round_up};
use engine::{Engine, EngineConfig, FileRef};

pub use engine::BackendKind;
pub use meta::MetaError;

/// Largest single write or read call, bounding the memory one call can pin.
pub const MAX_IO: usize = 16 << 20;

/// Tuning and location of a store. Defaults suit one NVMe/SSD data disk on a small server.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// Directory that holds the store; created if missing.
    pub root: PathBuf,
    /// IO backend.
    pub backend: BackendKind,
    /// Disk IO threads.
    pub io_threads: usize,
    /// Operations in flight per IO thread (and queued per thread).
    pub io_depth: usize,
    /// Use O_DIRECT for data files where the filesystem allows it.
    pub direct_io: bool,
    /// Verify every chunk of every finalized replica when the store opens.
    pub verify_on_open: bool,
    /// Size of pooled IO buffers; larger IOs allocate one-off buffers.
    pub io_buf_size: usize,
}

impl StoreConfig {
    /// Defaults for a store at `root`.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        StoreConfig {
            root: root.into(),
            backend: BackendKind::Auto,
            io_threads: 2,
            io_depth: 32,
            direct_io: true,
            verify_on_open: false,
            io_buf_size: 1 << 20,
        }
    }
}

/// How durable a write is when it returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Durability {
    /// In the OS (or, with O_DIRECT, in the device): survives a process crash.
    #[default]
    Buffered,
    /// fdatasync'ed, data and meta: survives power loss.
    Sync,
}

/// Lifecycle state of a replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ReplicaState {
    /// Being written (or recovered from an interrupted write).
    Rbw,
    /// Complete and durable.
    Finalized,
    /// Failed verification; quarantined, never served.
    Corrupt,
}

impl ReplicaState {
    fn dir(self) -> &'static str {
        match self {
            ReplicaState::Rbw => "rbw",
            ReplicaState::Finalized => "finalized",
            ReplicaState::Corrupt => "corrupt",
        }
    }
}

/// What the store knows of one replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplicaInfo {
    /// The block.
    pub block: BlockId,
    /// Its generation stamp.
    pub genstamp: GenStamp,
    /// Its state.
    pub state: ReplicaState,
    /// Bytes of data (for `Rbw`: written so far, or recovered).
    pub len: u64,
}

/// What [`BlockStore::open`] found.
#[derive(Debug, Clone, Default)]
pub struct OpenReport {
    /// Backend in use.
    pub backend: BackendKind,
    /// Whether data files use O_DIRECT.
    pub direct_io: bool,
    /// Why io_uring is not in use, when `auto` fell back.
    pub fallback_reason: Option<String>,
    /// Finalized replicas indexed.
    pub finalized: usize,
    /// `rbw` replicas, each with its recovered (verified) length.
    pub recovered_rbw: Vec<ReplicaInfo>,
    /// Replicas quarantined during the scan, with the reason.
    pub quarantined: Vec<(BlockId, GenStamp, String)>,
}

/// Errors of the block store. Each names the block (and where it helps the file, chunk
/// or offset) so an operator can find it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// No replica of this block is stored here.
    #[error("{block}: no replica here")]
    NotFound {
        /// The block.
        block: BlockId,
    },
    /// The stored replica has another generation stamp.
    #[error("{block}: asked for {asked}, replica here is {found}")]
    GenStampMismatch {
        /// The block.
        block: BlockId,
        /// The generation stamp asked for.
        asked: GenStamp,
        /// The one stored.
        found: GenStamp,
    },
    /// A stored chunk does not match its checksum; the replica is now quarantined.
    #[error(
        "{block} {genstamp}: stored chunk {chunk} at offset {offset} fails its checksum ({path}); replica quarantined"
    )]
    ChecksumMismatch {
        /// The block.
        block: BlockId,
        /// Its generation stamp.
        genstamp: GenStamp,
        /// Chunk index.
        chunk: u64,
        /// Byte offset of the chunk in the block.
        offset: u64,
        /// The data file.
        path: PathBuf,
    },
    /// Data handed to `write` does not match the checksums handed with it.
    #[error("{block}: incoming chunk {chunk} at offset {offset} does not match its checksum")]
    DataChecksum {
        /// The block.
        block: BlockId,
        /// Chunk index.
        chunk: u64,
        /// Byte offset of the chunk in the block.
        offset: u64,
    },
    /// The replica is quarantined as corrupt.
    #[error("{block} {genstamp}: replica is corrupt")]
    Corrupt {
        /// The block.
        block: BlockId,
        /// Its generation stamp.
        genstamp: GenStamp,
    },
    /// A read beyond the replica's length.
    #[error(
        "{block}: read of {len} bytes at {offset} is outside the replica ({replica_len} bytes)"
    )]
    OutOfRange {
        /// The block.
        block: BlockId,
        /// Requested offset.
        offset: u64,
        /// Requested length.
        len: u64,
        /// The replica's length.
        replica_len: u64,
    },
    /// A replica of this block already exists here.
    #[error("{block}: a replica already exists here ({genstamp}, {state:?})")]
    AlreadyExists {
        /// The block.
        block: BlockId,
        /// Its generation stamp.
        genstamp: GenStamp,
        /// Its state.
        state: ReplicaState,
    },
    /// The replica is not in the state the operation needs.
    #[error("{block}: replica is {state:?}, operation needs {needed:?}")]
    WrongState {
        /// The block.
        block: BlockId,
        /// Its state.
        state: ReplicaState,
        /// The state needed.
        needed: ReplicaState,
    },
    /// A write that breaks the rules: misaligned, out of order, bad checksum count, too
    /// large, or a genstamp that does not increase.
    #[error("{block}: invalid request: {reason}")]
    Invalid {
        /// The block.
        block: BlockId,
        /// What is wrong.
        reason: String,
    },
    /// An earlier write of this writer failed; truncate to a known length to go on.
    #[error("{block}: writer failed earlier ({reason}); truncate_to a known length first")]
    WriterFailed {
        /// The block.
        block: BlockId,
        /// The first failure.
        reason: String,
    },
    /// The disk (or quota) is full.
    #[error("no space left writing {path}")]
    NoSpace {
        /// The file.
        path: PathBuf,
    },
    /// Another process has this store open.
    #[error("store {root} is in use by another process")]
    Locked {
        /// The store root.
        root: PathBuf,
    },
    /// The requested IO backend cannot run here.
    #[error("io backend {backend} unavailable: {source}")]
    Backend {
        /// The backend asked for.
        backend: BackendKind,
        /// Why.
        source: io::Error,
    },
    /// Any other IO error, with the operation and file.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
}

fn io_err(op: &'static str, path: &Path, source: io::Error) -> StoreError {
    match source.raw_os_error() {
        Some(libc::ENOSPC) | Some(libc::EDQUOT) => StoreError::NoSpace {
            path: path.to_path_buf(),
        },
        _ => StoreError::Io {
            op,
            path: path.to_path_buf(),
            source,
        },
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    tokio::task::spawn_blocking(f).await.unwrap_or_else(|e| {
        Err(StoreError::Io {
            op: "blocking task",
            path: PathBuf::new(),
            source: io::Error::other(e.to_string()),
        })
    })
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    genstamp: GenStamp,
    state: ReplicaState,
    len: u64,
}

struct Inner {
    root: PathBuf,
    engine: Engine,
    pool: BufPool,
    direct_io: bool,
    index: Mutex<HashMap<BlockId, Entry>>,
    _lock: File,
}

/// A node's block store. Cheap to clone; clones share everything.
#[derive(Clone)]
pub struct BlockStore {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for BlockStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlockStore")
            .field("root", &self.inner.root)
            .field("backend", &self.inner.engine.backend())
            .field("direct_io", &self.inner.direct_io)
            .finish()
    }
}

fn file_name(block: BlockId, gs: GenStamp) -> String {
    format!("blk_{}_{}", block.0, gs.0)
}

fn parse_name(name: &str) -> Option<(BlockId, GenStamp, bool)> {
    let (stem, is_meta) = match name.strip_suffix(".meta") {
        Some(s) => (s, true),
        None => (name, false),
    };
    let rest = stem.strip_prefix("blk_")?;
    let (id, gs) = rest.split_once('_')?;
    let ok = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !ok(id) || !ok(gs) {
        return None;
    }
    Some((
        BlockId(id.parse().ok()?),
        GenStamp(gs.parse().ok()?),
        is_meta,
    ))
}

impl Inner {
    fn dir(&self, state: ReplicaState, block: BlockId) -> PathBuf {
        self.root
            .join(state.dir())
            .join(format!("{:02x}", (block.0 >> 16) & 0xff))
            .join(format!("{:02x}", (block.0 >> 8) & 0xff))
    }

    fn paths(&self, state: ReplicaState, block: BlockId, gs: GenStamp) -> (PathBuf, PathBuf) {
        let dir = self.dir(state, block);
        let name = file_name(block, gs);
        (dir.join(&name), dir.join(format!("{name}.meta")))
    }

    fn open_data(&self, path: &Path, spec: ChecksumSpec, write: bool) -> io::Result<File> {
        let mut o = OpenOptions::new();
        o.read(true);
        if write {
            o.write(true);
        }
        if self.uses_direct(spec) {
            o.custom_flags(libc::O_DIRECT);
        }
        o.open(path)
    }

    fn uses_direct(&self, spec: ChecksumSpec) -> bool {
        self.direct_io && (spec.bytes_per_chunk() as usize).is_multiple_of(ALIGN)
    }
}

fn fsync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io_err("fsync directory", dir, e))
}

/// Probes whether the filesystem under `root` accepts O_DIRECT reads and writes.
fn probe_direct(root: &Path) -> bool {
    let path = root.join(".direct-probe");
    let result = (|| -> io::Result<()> {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .custom_flags(libc::O_DIRECT)
            .open(&path)?;
        let mut buf = aligned::AlignedBuf::new(ALIGN);
        buf.fill_padded(b"strait");
        std::os::unix::fs::FileExt::write_all_at(&f, &buf, 0)?;
        Ok(())
    })();
    let _ = fs::remove_file(&path);
    result.is_ok()
}

impl BlockStore {
    /// Opens (or creates) the store at `config.root`, starts its IO engine and recovers
    /// its replicas. See the [module docs](self) for what recovery does.
    pub async fn open(config: StoreConfig) -> Result<(BlockStore, OpenReport), StoreError> {
        let root = config.root.clone();
        let (lock, direct_io) = {
            let root = root.clone();
            let want_direct = config.direct_io;
            blocking(move || {
                for d in ["rbw", "finalized", "corrupt"] {
                    fs::create_dir_all(root.join(d)).map_err(|e| io_err("create", &root, e))?;
                }
                let lock_path = root.join("LOCK");
                let lock = OpenOptions::new()
                    .create(true)
                    .truncate(false)
                    .write(true)
                    .open(&lock_path)
                    .map_err(|e| io_err("open", &lock_path, e))?;
                lock.try_lock().map_err(|e| match e {
                    fs::TryLockError::WouldBlock => StoreError::Locked { root: root.clone() },
                    fs::TryLockError::Error(e) => io_err("lock", &lock_path, e),
                })?;
                Ok((lock, want_direct && probe_direct(&root)))
            })
            .await?
        };
        let (engine, fallback) = Engine::start(
            config.backend,
            EngineConfig {
                threads: config.io_threads,
                depth: config.io_depth,
            },
        )
        .map_err(|source| StoreError::Backend {
            backend: config.backend,
            source,
        })?;
        if let Some(why) = &fallback {
            tracing::warn!(root = %root.display(), error = %why, "io_uring unavailable, store falls back to psync");
        }
        if config.direct_io && !direct_io {
            tracing::warn!(root = %root.display(), "filesystem refuses O_DIRECT, data files use the page cache");
        }
        let inner = Arc::new(Inner {
            root,
            engine,
            pool: BufPool::new(config.io_buf_size, 4 * config.io_threads * config.io_depth),
            direct_io,
            index: Mutex::new(HashMap::new()),
            _lock: lock,
        });
        let store = BlockStore { inner };
        let mut report = {
            let inner = store.inner.clone();
            let verify = config.verify_on_open;
            blocking(move || recover::scan(&inner, verify)).await?
        };
        report.backend = store.inner.engine.backend();
        report.direct_io = direct_io;
        report.fallback_reason = fallback.map(|e| e.to_string());
        tracing::info!(
            root = %store.inner.root.display(),
            backend = %report.backend,
            direct_io,
            finalized = report.finalized,
            rbw = report.recovered_rbw.len(),
            quarantined = report.quarantined.len(),
            "block store open"
        );
        Ok((store, report))
    }

    /// The IO backend in use.
    pub fn backend(&self) -> BackendKind {
        self.inner.engine.backend()
    }

    /// Whether data files use O_DIRECT.
    pub fn direct_io(&self) -> bool {
        self.inner.direct_io
    }

    /// The store's root directory.
    pub fn root(&self) -> &Path {
        &self.inner.root
    }

    fn index(&self) -> std::sync::MutexGuard<'_, HashMap<BlockId, Entry>> {
        self.inner.index.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The replica of `block` held here, if any.
    pub fn get(&self, block: BlockId) -> Option<ReplicaInfo> {
        self.index().get(&block).map(|e| ReplicaInfo {
            block,
            genstamp: e.genstamp,
            state: e.state,
            len: e.len,
        })
    }

    /// Every replica held here, in block order.
    pub fn list(&self) -> Vec<ReplicaInfo> {
        let mut v: Vec<ReplicaInfo> = self
            .index()
            .iter()
            .map(|(&block, e)| ReplicaInfo {
                block,
                genstamp: e.genstamp,
                state: e.state,
                len: e.len,
            })
            .collect();
        v.sort_by_key(|r| r.block);
        v
    }

    fn lookup(&self, block: BlockId, gs: GenStamp) -> Result<Entry, StoreError> {
        let e = *self
            .index()
            .get(&block)
            .ok_or(StoreError::NotFound { block })?;
        if e.genstamp != gs {
            return Err(StoreError::GenStampMismatch {
                block,
                asked: gs,
                found: e.genstamp,
            });
        }
        Ok(e)
    }

    /// Starts a new replica in `rbw`. Fails if a replica of the block is already here
    /// (a corrupt one is removed first).
    pub async fn create(
        &self,
        block: BlockId,
        genstamp: GenStamp,
        spec: ChecksumSpec,
    ) -> Result<ReplicaWriter, StoreError> {
        {
            let mut index = self.index();
            match index.get(&block) {
                Some(e) if e.state != ReplicaState::Corrupt => {
                    return Err(StoreError::AlreadyExists {
                        block,
                        genstamp: e.genstamp,
                        state: e.state,
                    });
                }
                Some(e) => {
                    let (d, m) = self.inner.paths(ReplicaState::Corrupt, block, e.genstamp);
                    let _ = fs::remove_file(d);
                    let _ = fs::remove_file(m);
                }
                None => {}
            }
            // Reserve the block id so a concurrent create fails.
            index.insert(
                block,
                Entry {
                    genstamp,
                    state: ReplicaState::Rbw,
                    len: 0,
                },
            );
        }
        let inner = self.inner.clone();
        let opened = blocking(move || {
            let (data_path, meta_path) = inner.paths(ReplicaState::Rbw, block, genstamp);
            let dir = inner.dir(ReplicaState::Rbw, block);
            fs::create_dir_all(&dir).map_err(|e| io_err("create", &dir, e))?;
            let meta = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(&meta_path)
                .map_err(|e| io_err("create", &meta_path, e))?;
            std::os::unix::fs::FileExt::write_all_at(&meta, &meta::encode_header(block, spec), 0)
                .map_err(|e| io_err("write", &meta_path, e))?;
            File::create(&data_path).map_err(|e| io_err("create", &data_path, e))?;
            let data = inner
                .open_data(&data_path, spec, true)
                .map_err(|e| io_err("open", &data_path, e))?;
            Ok((data, data_path, meta, meta_path))
        })
        .await;
        match opened {
            Ok((data, data_path, meta, meta_path)) => {
                let engine = &self.inner.engine;
                let (data, meta) = (engine.file(data, data_path), engine.file(meta, meta_path));
                Ok(ReplicaWriter::new(
                    self.clone(),
                    block,
                    genstamp,
                    spec,
                    data,
                    meta,
                    0,
                ))
            }
            Err(e) => {
                self.index().remove(&block);
                Err(e)
            }
        }
    }

    /// Reopens an `rbw` replica for writing (e.g. after a restart, to let the pipeline
    /// recover it). The writer starts at the replica's recovered length.
    pub async fn reopen_rbw(
        &self,
        block: BlockId,
        genstamp: GenStamp,
    ) -> Result<ReplicaWriter, StoreError> {
        let e = self.lookup(block, genstamp)?;
        if e.state != ReplicaState::Rbw {
            return Err(StoreError::WrongState {
                block,
                state: e.state,
                needed: ReplicaState::Rbw,
            });
        }
        let inner = self.inner.clone();
        let (data, meta, spec) = blocking(move || {
            let (data_path, meta_path) = inner.paths(ReplicaState::Rbw, block, genstamp);
            let meta = OpenOptions::new()
                .read(true)
                .write(true)
                .open(&meta_path)
                .map_err(|e| io_err("open", &meta_path, e))?;
            let mut header = [0u8; meta::HEADER_LEN];
            std::os::unix::fs::FileExt::read_exact_at(&meta, &mut header, 0)
                .map_err(|e| io_err("read", &meta_path, e))?;
            let spec = meta::decode_header(block, &header).map_err(|e| StoreError::Io {
                op: "decode meta header",
                path: meta_path.clone(),
                source: io::Error::new(io::ErrorKind::InvalidData, e),
            })?;
            let data = inner
                .open_data(&data_path, spec, true)
                .map_err(|e| io_err("open", &data_path, e))?;
            Ok(((data, data_path), (meta, meta_path), spec))
        })
        .await?;
        let engine = &self.inner.engine;
        let (data, meta) = (engine.file(data.0, data.1), engine.file(meta.0, meta.1));
        Ok(ReplicaWriter::new(
            self.clone(),
            block,
            genstamp,
            spec,
            data,
            meta,
            e.len,
        ))
    }

    /// Opens a replica for verified reads. Finalized and `rbw` replicas can be read (an
    /// `rbw` one up to the length it had when opened); corrupt ones cannot.
    pub async fn reader(
        &self,
        block: BlockId,
        genstamp: GenStamp,
    ) -> Result<ReplicaReader, StoreError> {
        let e = self.lookup(block, genstamp)?;
        if e.state == ReplicaState::Corrupt {
            return Err(StoreError::Corrupt { block, genstamp });
        }
        let inner = self.inner.clone();
        let state = e.state;
        let (data, spec, crcs, len) = blocking(move || {
            let (data_path, meta_path) = inner.paths(state, block, genstamp);
            let meta_bytes = fs::read(&meta_path).map_err(|e| io_err("read", &meta_path, e))?;
            let spec = meta::decode_header(block, &meta_bytes).map_err(|e| StoreError::Io {
                op: "decode meta header",
                path: meta_path.clone(),
                source: io::Error::new(io::ErrorKind::InvalidData, e),
            })?;
            let crcs = meta::decode_crcs(&meta_bytes[meta::HEADER_LEN..]);
            let data = inner
                .open_data(&data_path, spec, false)
                .map_err(|e| io_err("open", &data_path, e))?;
            let len = data
                .metadata()
                .map_err(|e| io_err("stat", &data_path, e))?
                .len();
            Ok(((data, data_path), spec, crcs, len))
        })
        .await?;
        let data = self.inner.engine.file(data.0, data.1);
        Ok(ReplicaReader {
            store: self.clone(),
            block,
            genstamp,
            spec,
            data,
            crcs: Arc::new(crcs),
            len,
        })
    }

    /// Replica files this store has open (data and meta of every open writer and
    /// reader); back to its baseline when no replica is being written or read.
    pub fn open_files(&self) -> usize {
        self.inner.engine.open_files()
    }

    /// Deletes a replica (in any state).
    pub async fn delete(&self, block: BlockId, genstamp: GenStamp) -> Result<(), StoreError> {
        let e = self.lookup(block, genstamp)?;
        self.index().remove(&block);
        let inner = self.inner.clone();
        blocking(move || {
            let (d, m) = inner.paths(e.state, block, genstamp);
            for p in [d, m] {
                match fs::remove_file(&p) {
                    Ok(()) => {}
                    Err(err) if err.kind() == io::ErrorKind::NotFound => {}
                    Err(err) => return Err(io_err("remove", &p, err)),
                }
            }
            Ok(())
        })
        .await?;
        // Readers dropped before the delete may leave IO-thread handles; close them so
        // the space is free when this returns.
        self.inner.engine.barrier().await;
        Ok(())
    }

    /// Gives a replica a new, larger generation stamp (pipeline recovery), renaming its
    /// files. An open [`ReplicaWriter`] must use [`ReplicaWriter::bump_genstamp`] instead.
    pub async fn bump_genstamp(
        &self,
        block: BlockId,
        old: GenStamp,
        new: GenStamp,
    ) -> Result<(), StoreError> {
        let e = self.lookup(block, old)?;
        if new <= old {
            return Err(StoreError::Invalid {
                block,
                reason: format!("new genstamp {new} is not above {old}"),
            });
        }
        if e.state == ReplicaState::Corrupt {
            return Err(StoreError::Corrupt {
                block,
                genstamp: old,
            });
        }
        let inner = self.inner.clone();
        blocking(move || {
            let (od, om) = inner.paths(e.state, block, old);
            let (nd, nm) = inner.paths(e.state, block, new);
            // Meta first: a crash in between leaves the data under the old name, which
            // recovery treats as a replica without meta and quarantines; the new meta
            // alone is likewise incomplete. Either way no stale data passes as current.
            fs::rename(&om, &nm).map_err(|e| io_err("rename", &om, e))?;
            fs::rename(&od, &nd).map_err(|e| io_err("rename", &od, e))?;
            fsync_dir(&inner.dir(e.state, block))
        })
        .await?;
        if let Some(entry) = self.index().get_mut(&block) {
            entry.genstamp = new;
        }
        Ok(())
    }

    /// Truncates an `rbw` replica that has no open writer to `len` bytes.
    pub async fn truncate_rbw(
        &self,
        block: BlockId,
        genstamp: GenStamp,
        len: u64,
    ) -> Result<(), StoreError> {
        self.reopen_rbw(block, genstamp)
            .await?
            .truncate_to(len)
            .await
    }

    /// Moves a replica to quarantine after a verification failure.
    async fn quarantine(&self, block: BlockId, genstamp: GenStamp) {
        let state = {
            let mut index = self.index();
            match index.get_mut(&block) {
                Some(e) if e.genstamp == genstamp && e.state != ReplicaState::Corrupt => {
                    let s = e.state;
                    e.state = ReplicaState::Corrupt;
                    s
                }
                _ => return,
            }
        };
        let inner = self.inner.clone();
        let result = blocking(move || {
            let (od, om) = inner.paths(state, block, genstamp);
            let (nd, nm) = inner.paths(ReplicaState::Corrupt, block, genstamp);
            let dir = inner.dir(ReplicaState::Corrupt, block);
            fs::create_dir_all(&dir).map_err(|e| io_err("create", &dir, e))?;
            fs::rename(&om, &nm).map_err(|e| io_err("rename", &om, e))?;
            fs::rename(&od, &nd).map_err(|e| io_err("rename", &od, e))?;
            Ok(())
        })
        .await;
        match result {
            Ok(()) => {
                tracing::error!(%block, %genstamp, "replica failed verification and is quarantined")
            }
            Err(e) => {
                tracing::error!(%block, %genstamp, error = %e, "replica failed verification; moving it to quarantine failed")
            }
        }
    }
}

struct WriterState {
    /// End of the bytes reserved by writes so far (the replica's length once they land).
    len: u64,
    failed: Option<String>,
    genstamp: GenStamp,
    finalized: bool,
}

/// Writes one `rbw` replica. Appends may run concurrently (each reserves its range
/// first); a write that ends in a short chunk, a rewrite of the last partial chunk and a
/// truncate run alone. Dropping the writer leaves the replica in `rbw`.
pub struct ReplicaWriter {
    store: BlockStore,
    block: BlockId,
    spec: ChecksumSpec,
    data: Arc<FileRef>,
    meta: Arc<FileRef>,
    state: Mutex<WriterState>,
    /// Appends of whole chunks share it; anything that changes the tail takes it alone.
    tail: RwLock<()>,
}

impl std::fmt::Debug for ReplicaWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplicaWriter")
            .field("block", &self.block)
            .field("genstamp", &self.genstamp())
            .field("len", &self.len())
            .finish()
    }
}

impl ReplicaWriter {
    fn new(
        store: BlockStore,
        block: BlockId,
        genstamp: GenStamp,
        spec: ChecksumSpec,
        data: Arc<FileRef>,
        meta: Arc<FileRef>,
        len: u64,
    ) -> Self {
        ReplicaWriter {
            store,
            block,
            spec,
            data,
            meta,
            state: Mutex::new(WriterState {
                len,
                failed: None,
                genstamp,
                finalized: false,
            }),
            tail: RwLock::new(()),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, WriterState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The block.
    pub fn block(&self) -> BlockId {
        self.block
    }

    /// The replica's current generation stamp.
    pub fn genstamp(&self) -> GenStamp {
        self.state().genstamp
    }

    /// The checksum spec of the replica.
    pub fn spec(&self) -> ChecksumSpec {
        self.spec
    }

    /// Bytes written (reserved by writes issued so far).
    pub fn len(&self) -> u64 {
        self.state().len
    }

    /// Whether nothing has been written.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn invalid(&self, reason: impl Into<String>) -> StoreError {
        StoreError::Invalid {
            block: self.block,
            reason: reason.into(),
        }
    }

    /// Writes `data` at `offset`, with one checksum per chunk in `crcs`. `offset` must be
    /// the replica's current length (append) or, when the replica ends in a partial
    /// chunk, that chunk's start (rewrite it longer). Only the last chunk of `data` may be
    /// short, and then it ends the replica. The data is verified against `crcs` first.
    ///
    /// The checks and the reservation of the range happen when `write` is called, not
    /// when the returned future is first polled: appends issued back to back are ordered
    /// by their calls and may then complete in any order.
    pub fn write<'a>(
        &'a self,
        offset: u64,
        data: &'a [u8],
        crcs: &'a [u32],
        durability: Durability,
    ) -> impl std::future::Future<Output = Result<(), StoreError>> + Send + 'a {
        let reserved = if data.is_empty() {
            Ok(None)
        } else {
            self.reserve(offset, data, crcs).map(Some)
        };
        async move {
            match reserved? {
                Some(exclusive) => {
                    self.run_write(exclusive, offset, data, crcs, durability)
                        .await
                }
                None => Ok(()),
            }
        }
    }

    /// [`write`](Self::write) with owned buffers, checked now: validation (checksums
    /// included) and the reservation of the range happen in this call, and a refusal is
    /// returned at once; the IO runs in the returned future, which borrows nothing and
    /// can be spawned.
    pub fn try_write_owned(
        self: &Arc<Self>,
        offset: u64,
        data: Bytes,
        crcs: Vec<u32>,
        durability: Durability,
    ) -> Result<
        impl std::future::Future<Output = Result<(), StoreError>> + Send + 'static,
        StoreError,
    > {
        let reserved = if data.is_empty() {
            None
        } else {
            Some(self.reserve(offset, &data, &crcs)?)
        };
        let this = self.clone();
        Ok(async move {
            match reserved {
                Some(exclusive) => {
                    this.run_write(exclusive, offset, &data, &crcs, durability)
                        .await
                }
                None => Ok(()),
            }
        })
    }

    async fn run_write(
        &self,
        exclusive: bool,
        offset: u64,
        data: &[u8],
        crcs: &[u32],
        durability: Durability,
    ) -> Result<(), StoreError> {
        // A write that changes the tail waits for the appends before it to land.
        let _guard = if exclusive {
            Guard::Write(self.tail.write().await)
        } else {
            Guard::Read(self.tail.read().await)
        };
        let short_end = !(data.len() as u64).is_multiple_of(u64::from(self.spec.bytes_per_chunk()));
        let result = self
            .do_write(offset, data, crcs, durability, short_end)
            .await;
        if let Err(e) = &result {
            self.state().failed.get_or_insert_with(|| e.to_string());
        }
        result
    }

    /// Validates a write and reserves its range; returns whether it must run alone.
    fn reserve(&self, offset: u64, data: &[u8], crcs: &[u32]) -> Result<bool, StoreError> {
        let bpc = u64::from(self.spec.bytes_per_chunk());
        let n = data.len() as u64;
        if data.len() > MAX_IO {
            return Err(self.invalid(format!(
                "write of {n} bytes exceeds the {MAX_IO}-byte limit"
            )));
        }
        if !offset.is_multiple_of(bpc) {
            return Err(self.invalid(format!(
                "offset {offset} is not a multiple of the {bpc}-byte chunk"
            )));
        }
        if offset + n > MAX_BLOCK_SIZE {
            return Err(self.invalid(format!(
                "write ends at {} beyond the maximum block size {MAX_BLOCK_SIZE}",
                offset + n
            )));
        }
        if crcs.len() as u64 != self.spec.chunks_for(n) {
            return Err(self.invalid(format!(
                "{} checksums for {} chunks",
                crcs.len(),
                self.spec.chunks_for(n)
            )));
        }
        self.spec
            .verify(offset / bpc, data, crcs)
            .map_err(|m| StoreError::DataChecksum {
                block: self.block,
                chunk: m.chunk,
                offset: m.offset,
            })?;
        let mut st = self.state();
        if st.finalized {
            return Err(StoreError::WrongState {
                block: self.block,
                state: ReplicaState::Finalized,
                needed: ReplicaState::Rbw,
            });
        }
        if let Some(reason) = &st.failed {
            return Err(StoreError::WriterFailed {
                block: self.block,
                reason: reason.clone(),
            });
        }
        let partial_start = st.len - st.len % bpc;
        let rewrite = !st.len.is_multiple_of(bpc) && offset == partial_start;
        if offset != st.len && !rewrite {
            return Err(self.invalid(format!("write at {offset}, replica length is {}", st.len)));
        }
        if rewrite && offset + n < st.len {
            return Err(self.invalid("rewrite of the last chunk must not shorten it"));
        }
        st.len = offset + n;
        Ok(rewrite || !n.is_multiple_of(bpc))
    }

    async fn do_write(
        &self,
        offset: u64,
        data: &[u8],
        crcs: &[u32],
        durability: Durability,
        short_end: bool,
    ) -> Result<(), StoreError> {
        let inner = &self.store.inner;
        let engine = &inner.engine;
        let direct = inner.uses_direct(self.spec);
        let mut dbuf = inner.pool.get_at_least(round_up(data.len()));
        if direct {
            dbuf.fill_padded(data);
        } else {
            dbuf.set_len(data.len());
            dbuf.copy_from_slice(data);
        }
        let first_chunk = offset / u64::from(self.spec.bytes_per_chunk());
        let mut mbuf = aligned::AlignedBuf::new(crcs.len() * 4);
        mbuf.set_len(crcs.len() * 4);
        meta::encode_crcs(crcs, &mut mbuf);
        let (dres, mres) = tokio::join!(
            engine.write_at(&self.data, offset, dbuf),
            engine.write_at(&self.meta, meta::crc_offset(first_chunk), mbuf),
        );
        dres.0.map_err(|e| io_err("write", &self.data.path, e))?;
        mres.0.map_err(|e| io_err("write", &self.meta.path, e))?;
        let end = offset + data.len() as u64;
        if short_end && direct {
            // The padded tail went to disk; cut the file to the true length.
            let data = self.data.clone();
            blocking(move || {
                data.file
                    .set_len(end)
                    .map_err(|e| io_err("truncate", &data.path, e))
            })
            .await?;
        }
        if durability == Durability::Sync {
            let (d, m) = tokio::join!(engine.sync(&self.data, true), engine.sync(&self.meta, true));
            d.map_err(|e| io_err("fdatasync", &self.data.path, e))?;
            m.map_err(|e| io_err("fdatasync", &self.meta.path, e))?;
        }
        if let Some(e) = self.store.index().get_mut(&self.block) {
            e.len = e.len.max(end);
        }
        Ok(())
    }

    /// Cuts the replica to `len` bytes (pipeline recovery agreeing on the acked length)
    /// and clears an earlier write failure. `len` must not exceed the current length.
    pub async fn truncate_to(&self, len: u64) -> Result<(), StoreError> {
        let _guard = self.tail.write().await;
        let cur = self.state().len;
        if len > cur {
            return Err(self.invalid(format!("truncate to {len} beyond length {cur}")));
        }
        let chunks = self.spec.chunks_for(len);
        let (data, meta) = (self.data.clone(), self.meta.clone());
        blocking(move || {
            data.file
                .set_len(len)
                .map_err(|e| io_err("truncate", &data.path, e))?;
            meta.file
                .set_len(meta::crc_offset(chunks))
                .map_err(|e| io_err("truncate", &meta.path, e))?;
            data.file
                .sync_data()
                .map_err(|e| io_err("fdatasync", &data.path, e))?;
            meta.file
                .sync_data()
                .map_err(|e| io_err("fdatasync", &meta.path, e))
        })
        .await?;
        let mut st = self.state();
        st.len = len;
        st.failed = None;
        if let Some(e) = self.store.index().get_mut(&self.block) {
            e.len = len;
        }
        Ok(())
    }

    /// Gives the replica a new, larger generation stamp while it is being written.
    pub async fn bump_genstamp(&self, new: GenStamp) -> Result<(), StoreError> {
        let _guard = self.tail.write().await;
        let old = self.genstamp();
        self.store.bump_genstamp(self.block, old, new).await?;
        self.state().genstamp = new;
        Ok(())
    }

    /// Makes the replica durable and complete: waits for writes in flight, fsyncs data
    /// and meta, moves both into `finalized` (meta first), fsyncs the directories.
    /// Returns the length. Later writes are refused.
    pub async fn finalize(&self) -> Result<u64, StoreError> {
        let _guard = self.tail.write().await;
        let gs = {
            let st = self.state();
            if let Some(reason) = st.failed.clone() {
                return Err(StoreError::WriterFailed {
                    block: self.block,
                    reason,
                });
            }
            st.genstamp
        };
        let e = self.store.lookup(self.block, gs)?;
        if e.state != ReplicaState::Rbw {
            return Err(StoreError::WrongState {
                block: self.block,
                state: e.state,
                needed: ReplicaState::Rbw,
            });
        }
        let engine = &self.store.inner.engine;
        let (d, m) = tokio::join!(
            engine.sync(&self.data, false),
            engine.sync(&self.meta, false)
        );
        d.map_err(|e| io_err("fsync", &self.data.path, e))?;
        m.map_err(|e| io_err("fsync", &self.meta.path, e))?;
        let len = self.state().len;
        let inner = self.store.inner.clone();
        let block = self.block;
        blocking(move || {
            let (rd, rm) = inner.paths(ReplicaState::Rbw, block, gs);
            let (fd, fm) = inner.paths(ReplicaState::Finalized, block, gs);
            let fdir = inner.dir(ReplicaState::Finalized, block);
            fs::create_dir_all(&fdir).map_err(|e| io_err("create", &fdir, e))?;
            fs::rename(&rm, &fm).map_err(|e| io_err("rename", &rm, e))?;
            fs::rename(&rd, &fd).map_err(|e| io_err("rename", &rd, e))?;
            fsync_dir(&fdir)?;
            fsync_dir(&inner.dir(ReplicaState::Rbw, block))
        })
        .await?;
        if let Some(e) = self.store.index().get_mut(&block) {
            e.state = ReplicaState::Finalized;
            e.len = len;
        }
        self.state().finalized = true;
        Ok(len)
    }
}

enum Guard<'a> {
    Read(#[allow(dead_code)] tokio::sync::RwLockReadGuard<'a, ()>),
    Write(#[allow(dead_code)] tokio::sync::RwLockWriteGuard<'a, ()>),
}

/// Verified reads of one replica. Cheap to share by reference; reads may run
/// concurrently.
pub struct ReplicaReader {
    store: BlockStore,
    block: BlockId,
    genstamp: GenStamp,
    spec: ChecksumSpec,
    data: Arc<FileRef>,
    crcs: Arc<Vec<u32>>,
    len: u64,
}

impl std::fmt::Debug for ReplicaReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplicaReader")
            .field("block", &self.block)
            .field("genstamp", &self.genstamp)
            .field("len", &self.len)
            .finish()
    }
}

impl ReplicaReader {
    /// Length of the replica (as of opening).
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the replica is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The checksum spec.
    pub fn spec(&self) -> ChecksumSpec {
        self.spec
    }

    /// The stored checksums of the chunks that cover `[offset, offset + len)`, for sending
    /// along with the bytes.
    pub fn checksums(&self, offset: u64, len: u64) -> &[u32] {
        let bpc = u64::from(self.spec.bytes_per_chunk());
        let first = (offset / bpc) as usize;
        let last = self.spec.chunks_for(offset + len) as usize;
        &self.crcs[first.min(self.crcs.len())..last.min(self.crcs.len())]
    }

    /// Reads `len` bytes at `offset`, verifying every chunk they touch. A checksum
    /// mismatch quarantines the replica and returns [`StoreError::ChecksumMismatch`].
    pub async fn read(&self, offset: u64, len: usize) -> Result<Bytes, StoreError> {
        let block = self.block;
        if len > MAX_IO {
            return Err(StoreError::Invalid {
                block,
                reason: format!("read of {len} bytes exceeds the {MAX_IO}-byte limit"),
            });
        }
        let end = offset
            .checked_add(len as u64)
            .filter(|&e| e <= self.len)
            .ok_or(StoreError::OutOfRange {
                block,
                offset,
                len: len as u64,
                replica_len: self.len,
            })?;
        if len == 0 {
            return Ok(Bytes::new());
        }
        let bpc = u64::from(self.spec.bytes_per_chunk());
        let first_chunk = offset / bpc;
        let start = first_chunk * bpc;
        let chunk_end = (end.div_ceil(bpc) * bpc).min(self.len);
        let want = (chunk_end - start) as usize;
        let inner = &self.store.inner;
        let buf = inner.pool.get_at_least(round_up(want));
        let io_len = if inner.uses_direct(self.spec) {
            round_up(want)
        } else {
            want
        };
        let buf = inner
            .engine
            .read_at(&self.data, start, io_len, buf)
            .await
            .map_err(|e| io_err("read", &self.data.path, e))?;
        let nchunks = self.spec.chunks_for(want as u64) as usize;
        let crcs = self
            .crcs
            .get(first_chunk as usize..first_chunk as usize + nchunks);
        let got = buf.len().min(want);
        let verified = match crcs {
            Some(crcs) if got == want => self
                .spec
                .verify(first_chunk, &buf[..want], crcs)
                .map_err(|m| (m.chunk, m.offset)),
            // Meta or data shorter than the replica claims: the first missing chunk.
            _ => {
                let chunk = first_chunk
                    + (got as u64 / bpc)
                        .min(self.crcs.len() as u64 - first_chunk.min(self.crcs.len() as u64));
                Err((chunk, chunk * bpc))
            }
        };
        if let Err((chunk, coff)) = verified {
            self.store.quarantine(block, self.genstamp).await;
            return Err(StoreError::ChecksumMismatch {
                block,
                genstamp: self.genstamp,
                chunk,
                offset: coff,
                path: self.data.path.clone(),
            });
        }
        let skip = (offset - start) as usize;
        Ok(Bytes::from_owner(buf).slice(skip..skip + len))
    }
}

mod recover;

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
//! and buffered. [`ReplicaWriter::finalize`] seals the meta header, makes data and meta
//! durable, then renames meta and data into `finalized`; the renames become durable with
//! the next commit. A crash at any point leaves a complete finalized replica, a sealed
//! `rbw` one that recovery moves into `finalized` (it was acknowledged as final), or an
//! unsealed, recoverable `rbw` one. The durability step is a group commit
//! (`commit.rs`): one `syncfs` of the store's filesystem covers every replica finalizing
//! at the same time, instead of four fsyncs per replica. Every chunk a [`ReplicaReader`]
//! returns has been verified; a mismatch quarantines the replica.
//!
//! On [`BlockStore::open`] the store scans its root: finalized replicas are indexed (and
//! verified in full when [`StoreConfig::verify_on_open`] is set); each `rbw` replica is
//! truncated to its longest prefix of chunks whose CRCs verify and reported with that
//! length, so the pipeline can recover it.
//!
//! This module does not decide which blocks a node should hold, nor talk to peers.

mod aligned;
mod commit;
mod engine;
mod error;
mod layout;
mod meta;
mod reader;
mod recover;
mod writer;

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::block::{BlockId, ChecksumSpec, GenStamp};
use aligned::BufPool;
use engine::{Engine, EngineConfig};

pub use engine::BackendKind;

/// Fault injection for tests: a store engine that fails chosen disk operations. Set
/// [`StoreConfig::faults`] to use it.
#[cfg(feature = "fault-injection")]
pub mod faults {
    pub use super::engine::faulty::{Fault, FaultOp, FaultPlan, FaultRule};
}
pub use error::StoreError;
pub use meta::MetaError;
pub use reader::ReplicaReader;
pub use writer::{ReplicaWriter, ReservedWrite};

use error::{blocking, io_err};
use layout::{fsync_dir, probe_direct};

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
    /// Tests only: run the fault-injecting backend (psync under this plan) instead of
    /// `backend`.
    #[cfg(feature = "fault-injection")]
    pub faults: Option<faults::FaultPlan>,
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
            #[cfg(feature = "fault-injection")]
            faults: None,
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

/// Replicas of a store by state ([`BlockStore::counts`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReplicaCounts {
    /// Finalized replicas.
    pub finalized: usize,
    /// Replicas being written (or recovered as such).
    pub rbw: usize,
    /// Quarantined replicas.
    pub corrupt: usize,
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
    committer: commit::Committer,
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
                #[cfg(feature = "fault-injection")]
                faults: config.faults.clone(),
                #[cfg(not(feature = "fault-injection"))]
                faults: None,
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
        // The group commit syncs the filesystem through a descriptor of the root
        // directory (not a dup of LOCK, which would share its flock).
        let anchor = File::open(&root).map_err(|e| io_err("open", &root, e))?;
        let committer = commit::Committer::start(
            engine.clone(),
            engine.file(anchor, root.clone()),
            root.clone(),
        )
        .map_err(|e| io_err("start committer", &root, e))?;
        let inner = Arc::new(Inner {
            root,
            engine,
            pool: BufPool::new(config.io_buf_size, 4 * config.io_threads * config.io_depth),
            direct_io,
            index: Mutex::new(HashMap::new()),
            committer,
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

    /// Bytes an unprivileged writer may still use on the store's filesystem; `None` when
    /// the filesystem does not say.
    pub fn free_bytes(&self) -> Option<u64> {
        let fs = rustix::fs::statvfs(&self.inner.root).ok()?;
        Some(fs.f_bavail.saturating_mul(fs.f_frsize))
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

    /// How many replicas this store holds in each state: finalized, rbw, corrupt. Counts
    /// under the index lock without copying it (what a metrics scrape wants).
    pub fn counts(&self) -> ReplicaCounts {
        let mut c = ReplicaCounts::default();
        for e in self.index().values() {
            match e.state {
                ReplicaState::Finalized => c.finalized += 1,
                ReplicaState::Rbw => c.rbw += 1,
                ReplicaState::Corrupt => c.corrupt += 1,
            }
        }
        c
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
    /// (a corrupt one is removed first). The replica's files are created by its first
    /// write or its finalize, so an error creating them (a full disk, say) comes from
    /// there; until then the block is reserved in the index, and a reader of the empty
    /// replica finds no files.
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
        // The files are created by the replica's first write, or by its finalize (see
        // `ReplicaWriter`).
        Ok(ReplicaWriter::new(
            self.clone(),
            block,
            genstamp,
            spec,
            None,
            0,
        ))
    }

    /// Creates a new `rbw` replica's files, the meta file with its unsealed header. A
    /// failure fails the write that needed them; the block stays reserved in `rbw` until
    /// it is deleted (a retried pipeline does that) or the store reopens.
    async fn create_files(
        &self,
        block: BlockId,
        genstamp: GenStamp,
        spec: ChecksumSpec,
    ) -> Result<layout::Files, StoreError> {
        let new = self.inner.new_files(block, genstamp, spec);
        let engine = self.inner.engine.clone();
        blocking(move || {
            let files = new.create_in(&engine)?;
            let header = meta::encode_header(block, spec);
            std::os::unix::fs::FileExt::write_all_at(&files.meta.file, &header, 0)
                .map_err(|e| io_err("write", &files.meta.path, e))?;
            Ok(files)
        })
        .await
    }

    /// Reopens an `rbw` replica for writing (e.g. after a restart, to let the pipeline
    /// recover it). The writer starts at the replica's recovered length. A replica
    /// nothing was written to may have no files to reopen (see [`create`](Self::create)):
    /// delete it and create it again instead.
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
            let header = meta::decode_header(block, &header).map_err(|e| StoreError::Io {
                op: "decode meta header",
                path: meta_path.clone(),
                source: io::Error::new(io::ErrorKind::InvalidData, e),
            })?;
            let spec = header.spec;
            if header.sealed {
                // A finalize sealed it and then failed to move it: it is being written
                // again, so a crash must not find it sealed (durable before any write).
                std::os::unix::fs::FileExt::write_all_at(
                    &meta,
                    &meta::encode_header(block, spec),
                    0,
                )
                .and_then(|()| meta.sync_data())
                .map_err(|e| io_err("write", &meta_path, e))?;
            }
            let data = inner
                .open_data(&data_path, spec, true)
                .map_err(|e| io_err("open", &data_path, e))?;
            Ok(((data, data_path), (meta, meta_path), spec))
        })
        .await?;
        let (data, meta) = self.inner.engine.pair(data, meta);
        Ok(ReplicaWriter::new(
            self.clone(),
            block,
            genstamp,
            spec,
            Some(layout::Files { data, meta }),
            e.len,
        ))
    }

    /// Opens a replica for verified reads. Finalized and `rbw` replicas can be read (an
    /// `rbw` one up to the length that had landed when it was opened); corrupt ones
    /// cannot.
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
            let spec = meta::decode_header(block, &meta_bytes)
                .map_err(|e| StoreError::Io {
                    op: "decode meta header",
                    path: meta_path.clone(),
                    source: io::Error::new(io::ErrorKind::InvalidData, e),
                })?
                .spec;
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
        // A replica being written is readable up to what has landed, not to the size its
        // data file has grown to (later writes may land before earlier ones).
        let len = match state {
            ReplicaState::Rbw => len.min(e.len),
            _ => len,
        };
        let data = self.inner.engine.file(data.0, data.1);
        Ok(ReplicaReader {
            store: self.clone(),
            block,
            genstamp,
            spec,
            data,
            crcs: Arc::new(crcs),
            len,
            in_progress: state == ReplicaState::Rbw,
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
        let result =
            blocking(move || inner.move_replica(block, genstamp, state, ReplicaState::Corrupt))
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

//! Where replicas live on disk: file names made from numbers only, the state
//! directories with their two levels of hex subdirectories, O_DIRECT where the
//! filesystem takes it, and directory fsyncs.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use super::aligned::{self, ALIGN};
use super::engine::{Engine, FileRef};
use super::{Inner, ReplicaState, StoreError, io_err};
use crate::block::{BlockId, ChecksumSpec, GenStamp};

pub(super) fn file_name(block: BlockId, gs: GenStamp) -> String {
    format!("blk_{}_{}", block.0, gs.0)
}

pub(super) fn parse_name(name: &str) -> Option<(BlockId, GenStamp, bool)> {
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

/// The directory of `block`'s replica in `state`, under the store root: two levels of
/// hex subdirectories from bits 16..24 and 8..16 of the id.
pub(super) fn state_dir(root: &Path, state: ReplicaState, block: BlockId) -> PathBuf {
    root.join(state.dir())
        .join(format!("{:02x}", (block.0 >> 16) & 0xff))
        .join(format!("{:02x}", (block.0 >> 8) & 0xff))
}

/// The data and meta file paths of a replica.
pub(super) fn replica_paths(
    root: &Path,
    state: ReplicaState,
    block: BlockId,
    gs: GenStamp,
) -> (PathBuf, PathBuf) {
    let dir = state_dir(root, state, block);
    let name = file_name(block, gs);
    (dir.join(&name), dir.join(format!("{name}.meta")))
}

/// A replica's open data and meta files.
#[derive(Clone)]
pub(super) struct Files {
    pub(super) data: std::sync::Arc<FileRef>,
    pub(super) meta: std::sync::Arc<FileRef>,
}

/// The files of a new `rbw` replica, not created yet.
pub(super) struct NewFiles {
    pub(super) dir: PathBuf,
    pub(super) data: PathBuf,
    pub(super) meta: PathBuf,
    /// The data file takes O_DIRECT.
    pub(super) direct: bool,
}

impl NewFiles {
    /// Creates (or empties) the meta file, then the data file, each in one open (the
    /// directory only when the first open finds it missing), and opens both in
    /// `engine` (one IO lane). The meta file is empty: recovery takes a meta file
    /// without a header as an empty replica. Blocking: call it off the runtime.
    pub(super) fn create_in(self, engine: &Engine) -> Result<Files, StoreError> {
        let create = || {
            let mut o = OpenOptions::new();
            o.read(true).write(true).create(true).truncate(true);
            o
        };
        let meta = in_dir(&self.dir, || create().open(&self.meta))
            .map_err(|e| io_err("create", &self.meta, e))?;
        let mut o = create();
        if self.direct {
            o.custom_flags(libc::O_DIRECT);
        }
        let data = o
            .open(&self.data)
            .map_err(|e| io_err("create", &self.data, e))?;
        let (data, meta) = engine.pair((data, self.data), (meta, self.meta));
        Ok(Files { data, meta })
    }
}

/// See [`Inner::move_replica`].
pub(super) fn move_replica(
    root: &Path,
    block: BlockId,
    gs: GenStamp,
    from: ReplicaState,
    to: ReplicaState,
) -> Result<(), StoreError> {
    let (od, om) = replica_paths(root, from, block, gs);
    let (nd, nm) = replica_paths(root, to, block, gs);
    in_dir(&state_dir(root, to, block), || fs::rename(&om, &nm))
        .map_err(|e| io_err("rename", &om, e))?;
    fs::rename(&od, &nd).map_err(|e| io_err("rename", &od, e))
}

impl Inner {
    pub(super) fn dir(&self, state: ReplicaState, block: BlockId) -> PathBuf {
        state_dir(&self.root, state, block)
    }

    pub(super) fn paths(
        &self,
        state: ReplicaState,
        block: BlockId,
        gs: GenStamp,
    ) -> (PathBuf, PathBuf) {
        replica_paths(&self.root, state, block, gs)
    }

    pub(super) fn open_data(
        &self,
        path: &Path,
        spec: ChecksumSpec,
        write: bool,
    ) -> io::Result<File> {
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

    /// Where a new `rbw` replica's files go.
    pub(super) fn new_files(&self, block: BlockId, gs: GenStamp, spec: ChecksumSpec) -> NewFiles {
        let (data, meta) = self.paths(ReplicaState::Rbw, block, gs);
        NewFiles {
            dir: self.dir(ReplicaState::Rbw, block),
            data,
            meta,
            direct: self.uses_direct(spec),
        }
    }

    /// Moves a replica's files from one state directory to another, meta first (a meta
    /// file without its data is recovered as an empty replica; data without meta would
    /// be unverifiable). The target directory is created only when a rename finds it
    /// missing: the common case costs two renames and nothing else.
    pub(super) fn move_replica(
        &self,
        block: BlockId,
        gs: GenStamp,
        from: ReplicaState,
        to: ReplicaState,
    ) -> Result<(), StoreError> {
        move_replica(&self.root, block, gs, from, to)
    }

    pub(super) fn uses_direct(&self, spec: ChecksumSpec) -> bool {
        self.direct_io && (spec.bytes_per_chunk() as usize).is_multiple_of(ALIGN)
    }
}

/// Runs `op`, which creates an entry in `dir`; if it fails because `dir` is missing,
/// creates `dir` (and its parents) and runs `op` once more. State directories are
/// created on first use and never removed while the store runs, so this is one
/// syscall where `create_dir_all` first would be three.
pub(super) fn in_dir<T>(dir: &Path, mut op: impl FnMut() -> io::Result<T>) -> io::Result<T> {
    match op() {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            fs::create_dir_all(dir)?;
            op()
        }
        other => other,
    }
}

pub(super) fn fsync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io_err("fsync directory", dir, e))
}

/// Probes whether the filesystem under `root` accepts O_DIRECT reads and writes.
pub(super) fn probe_direct(root: &Path) -> bool {
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

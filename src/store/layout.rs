//! Where replicas live on disk: file names made from numbers only, the state
//! directories with their two levels of hex subdirectories, O_DIRECT where the
//! filesystem takes it, and directory fsyncs.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use super::aligned::{self, ALIGN};
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

impl Inner {
    pub(super) fn dir(&self, state: ReplicaState, block: BlockId) -> PathBuf {
        self.root
            .join(state.dir())
            .join(format!("{:02x}", (block.0 >> 16) & 0xff))
            .join(format!("{:02x}", (block.0 >> 8) & 0xff))
    }

    pub(super) fn paths(
        &self,
        state: ReplicaState,
        block: BlockId,
        gs: GenStamp,
    ) -> (PathBuf, PathBuf) {
        let dir = self.dir(state, block);
        let name = file_name(block, gs);
        (dir.join(&name), dir.join(format!("{name}.meta")))
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

    /// Creates (or empties) a replica's data file and opens it for writing, in one open.
    pub(super) fn create_data(&self, path: &Path, spec: ChecksumSpec) -> io::Result<File> {
        let mut o = OpenOptions::new();
        o.read(true).write(true).create(true).truncate(true);
        if self.uses_direct(spec) {
            o.custom_flags(libc::O_DIRECT);
        }
        o.open(path)
    }

    pub(super) fn uses_direct(&self, spec: ChecksumSpec) -> bool {
        self.direct_io && (spec.bytes_per_chunk() as usize).is_multiple_of(ALIGN)
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

//! Errors of the block store, the one mapping of a store error to a wire status, and the
//! helper that runs blocking filesystem calls off the async runtime.

use std::io;
use std::path::{Path, PathBuf};

use super::{BackendKind, ReplicaState};
use crate::block::{BlockId, GenStamp};
use crate::wire::Status;

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
    /// A replica being written does not verify where it was read: the range may still
    /// be changing (its last chunk being rewritten longer). It is not quarantined; read
    /// another replica.
    #[error(
        "{block} {genstamp}: replica being written does not verify at chunk {chunk} (offset {offset}); not quarantined"
    )]
    Unsettled {
        /// The block.
        block: BlockId,
        /// Its generation stamp.
        genstamp: GenStamp,
        /// Chunk index.
        chunk: u64,
        /// Byte offset of the chunk in the block.
        offset: u64,
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

pub(super) fn io_err(op: &'static str, path: &Path, source: io::Error) -> StoreError {
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

pub(super) async fn blocking<T: Send + 'static>(
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

/// The status a node reports to a peer for a store failure: the one mapping used by
/// every service that answers a peer (pipeline relay, read service, copies).
impl From<&StoreError> for Status {
    fn from(e: &StoreError) -> Status {
        match e {
            StoreError::NoSpace { .. } => Status::NoSpace,
            StoreError::DataChecksum { .. } => Status::ChecksumError,
            StoreError::ChecksumMismatch { .. } | StoreError::Corrupt { .. } => Status::Corrupt,
            StoreError::Io { .. }
            | StoreError::WriterFailed { .. }
            | StoreError::Backend { .. } => Status::DiskError,
            StoreError::AlreadyExists { .. } => Status::Exists,
            StoreError::NotFound { .. } => Status::NotFound,
            StoreError::GenStampMismatch { .. } => Status::Stale,
            StoreError::OutOfRange { .. }
            | StoreError::Unsettled { .. }
            | StoreError::WrongState { .. }
            | StoreError::Invalid { .. }
            | StoreError::Locked { .. } => Status::Rejected,
        }
    }
}

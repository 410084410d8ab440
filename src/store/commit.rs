//! Group commit: replicas made durable together by one `syncfs` of the store's
//! filesystem, instead of one fsync per file and per directory.
//!
//! A caller of [`Committer::commit`] returns once a `syncfs` that *started after its
//! call* has completed: everything it wrote before the call (data through O_DIRECT or
//! the page cache, meta files, renames, new directory entries) is then on stable
//! storage. Calls that arrive while a `syncfs` runs wait for the next one, which covers
//! them all: under load one `syncfs` serves a whole batch of replicas.
//!
//! [`Committer::finalize`] does a replica's whole finalize in the same batch: its sealed
//! header is written, the `syncfs` covers it with everything else, and only then are its
//! files moved into `finalized`. The committer is one thread of its own that does all of
//! this with plain syscalls: a finalize costs the caller one hand-off to that thread and
//! one back (a seal through an IO thread, a sync through another, and a rename through
//! the blocking pool cost five). A replica's last write may come with its finalize
//! ([`LastWrite`]), and a replica whose files nothing has created yet is created here
//! ([`FinalizeFiles::Create`]): a small block's replica then costs one hand-off in all,
//! for two creates, two writes, its share of a `syncfs` and two renames. The writes and
//! the `syncfs` run under the engine's fault plan, so tests can fail them.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};

use super::aligned::AlignedBuf;
use super::engine::{Engine, FileRef};
use super::layout::{Files, NewFiles};
use super::{ReplicaState, StoreError, io_err, layout, meta};
use crate::block::{BlockId, GenStamp};

/// A replica to finalize in the next batch.
pub(super) struct Finalize {
    pub(super) block: BlockId,
    pub(super) genstamp: GenStamp,
    /// The replica's files: its meta header is rewritten sealed.
    pub(super) files: FinalizeFiles,
    pub(super) header: [u8; meta::HEADER_LEN],
    /// The replica's last write, done here just before the seal (a small block's only
    /// write: the committer is woken anyway, so the write costs no hop of its own).
    pub(super) write: Option<LastWrite>,
}

/// The files of a replica to finalize.
pub(super) enum FinalizeFiles {
    /// Open already (the replica was written before).
    Open(Files),
    /// Not created yet: the committer creates them, in `rbw`, before the last write.
    Create(NewFiles),
}

/// A replica's last write, done by the committer before it seals the replica.
pub(super) struct LastWrite {
    pub(super) offset: u64,
    /// The data, padded for O_DIRECT.
    pub(super) data: AlignedBuf,
    /// Cut the data file to this length after the write (a padded short last chunk).
    pub(super) cut_to: Option<u64>,
    /// Where the checksums go in the meta file.
    pub(super) meta_at: u64,
    pub(super) crcs: AlignedBuf,
}

impl LastWrite {
    /// Data, then (cut to length) the checksums, then the sealed header: a crash in
    /// between leaves the old checksums over an unchanged prefix, as a write through the
    /// IO threads does, and never a seal over checksums not written. When the checksums
    /// start right after the header (the replica's only write) the header and the
    /// checksums are one write.
    fn run(self, engine: &Engine, files: &Files, seal: AlignedBuf) -> Result<(), StoreError> {
        let path = &files.data.path;
        engine
            .write_here(&files.data, self.offset, self.data)
            .map_err(|e| io_err("write", path, e))?;
        if let Some(len) = self.cut_to {
            files
                .data
                .file
                .set_len(len)
                .map_err(|e| io_err("truncate", path, e))?;
        }
        let meta = |at, buf| {
            engine
                .write_here(&files.meta, at, buf)
                .map_err(|e| io_err("write", &files.meta.path, e))
        };
        if self.meta_at == seal.len() as u64 {
            let mut both = AlignedBuf::new(seal.len() + self.crcs.len());
            both.set_len(seal.len() + self.crcs.len());
            both[..seal.len()].copy_from_slice(&seal);
            both[seal.len()..].copy_from_slice(&self.crcs);
            meta(0, both)
        } else {
            meta(self.meta_at, self.crcs)?;
            meta(0, seal)
        }
    }
}

enum Job {
    Commit(oneshot::Sender<io::Result<()>>),
    Finalize(Box<Finalize>, oneshot::Sender<Result<(), StoreError>>),
}

/// The store's group committer. Its thread stops when the committer is dropped.
pub(super) struct Committer {
    tx: mpsc::Sender<Job>,
}

fn stopped() -> io::Error {
    io::Error::other("store committer has stopped")
}

impl Committer {
    /// Starts the committer of the store at `root`, syncing the filesystem that holds
    /// `anchor` (any open file of the store).
    pub(super) fn start(
        engine: Engine,
        anchor: Arc<FileRef>,
        root: PathBuf,
    ) -> io::Result<Committer> {
        let (tx, mut rx) = mpsc::channel::<Job>(1024);
        std::thread::Builder::new()
            .name("strait-commit".into())
            .spawn(move || {
                while let Some(first) = rx.blocking_recv() {
                    // Everyone waiting now joins this sync; later callers wait for the next.
                    let mut batch = vec![first];
                    while let Ok(more) = rx.try_recv() {
                        batch.push(more);
                    }
                    run_batch(&engine, &anchor, &root, batch);
                }
            })?;
        Ok(Committer { tx })
    }

    /// Returns once everything written before this call is durable.
    pub(super) async fn commit(&self) -> io::Result<()> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Job::Commit(reply))
            .await
            .map_err(|_| stopped())?;
        rx.await.map_err(|_| stopped())?
    }

    /// Seals the replica, makes it durable with everything written before this call, and
    /// moves it into `finalized`. An error names the step that failed; after a failed
    /// seal or sync nothing was moved.
    pub(super) async fn finalize(&self, job: Finalize) -> Result<(), StoreError> {
        let path = match &job.files {
            FinalizeFiles::Open(f) => f.meta.path.clone(),
            FinalizeFiles::Create(n) => n.meta.clone(),
        };
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Job::Finalize(Box::new(job), reply))
            .await
            .map_err(|_| io_err("fsync", &path, stopped()))?;
        rx.await.map_err(|_| io_err("fsync", &path, stopped()))?
    }
}

/// One batch: seal every replica to finalize, one `syncfs`, then move the sealed ones.
fn run_batch(engine: &Engine, anchor: &Arc<FileRef>, root: &Path, batch: Vec<Job>) {
    let mut commits = Vec::new();
    let mut sealed = Vec::new();
    for job in batch {
        match job {
            Job::Commit(reply) => commits.push(reply),
            Job::Finalize(f, reply) => match prepare(engine, *f) {
                Ok(ready) => sealed.push((ready, reply)),
                Err(e) => {
                    let _ = reply.send(Err(e));
                }
            },
        }
    }
    let synced = engine.sync_here(anchor);
    // Every waiter gets its own copy of the one sync's error (io::Error is not Clone).
    let outcome = || match &synced {
        Ok(()) => Ok(()),
        Err(e) => Err(match e.raw_os_error() {
            Some(code) => io::Error::from_raw_os_error(code),
            None => io::Error::new(e.kind(), e.to_string()),
        }),
    };
    for reply in commits {
        let _ = reply.send(outcome());
    }
    for (f, reply) in sealed {
        let res = match outcome() {
            Err(e) => Err(io_err("fsync", &f.files.meta.path, e)),
            Ok(()) => layout::move_replica(
                root,
                f.block,
                f.genstamp,
                ReplicaState::Rbw,
                ReplicaState::Finalized,
            ),
        };
        let _ = reply.send(res);
    }
}

/// A replica sealed in this batch, to move once the `syncfs` has completed.
struct Sealed {
    block: BlockId,
    genstamp: GenStamp,
    files: Files,
}

/// A replica's part of a batch before the `syncfs`: its files (created if need be), its
/// last write and its seal.
fn prepare(engine: &Engine, f: Finalize) -> Result<Sealed, StoreError> {
    let files = match f.files {
        FinalizeFiles::Open(files) => files,
        FinalizeFiles::Create(new) => new.create_in(engine)?,
    };
    let mut seal = AlignedBuf::new(meta::HEADER_LEN);
    seal.set_len(meta::HEADER_LEN);
    seal.copy_from_slice(&f.header);
    match f.write {
        Some(w) => w.run(engine, &files, seal)?,
        None => engine
            .write_here(&files.meta, 0, seal)
            .map_err(|e| io_err("write", &files.meta.path, e))?,
    }
    Ok(Sealed {
        block: f.block,
        genstamp: f.genstamp,
        files,
    })
}

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
//! ([`LastWrite`]): a small block's replica then costs one hand-off in all. The writes
//! and the `syncfs` run under the engine's fault plan, so tests can fail them.
//!
//! The stores of one process on one filesystem share one committer thread (a store
//! under a fault plan has its own): one `syncfs` covers every store on the filesystem,
//! and one thread draining all their finalizes batches more of them per wake-up than
//! one thread per store, each woken for a batch of its own.

use std::io;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, Weak};

use tokio::sync::{mpsc, oneshot};

use super::aligned::AlignedBuf;
use super::engine::{Engine, FileRef};
use super::{ReplicaState, StoreError, io_err, layout, meta};
use crate::block::{BlockId, GenStamp};

/// A replica to finalize in the next batch.
pub(super) struct Finalize {
    pub(super) block: BlockId,
    pub(super) genstamp: GenStamp,
    /// The replica's meta file: its header is rewritten sealed.
    pub(super) meta: Arc<FileRef>,
    pub(super) header: [u8; meta::HEADER_LEN],
    /// The replica's last write, done here just before the seal (a small block's only
    /// write: the committer is woken anyway, so the write costs no hop of its own).
    pub(super) write: Option<LastWrite>,
}

/// A replica's last write, done by the committer before it seals the replica.
pub(super) struct LastWrite {
    /// The data file.
    pub(super) file: Arc<FileRef>,
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
    /// Data, then (cut to length) the checksums: a crash in between leaves the old
    /// checksums over an unchanged prefix, as a write through the IO threads does.
    fn run(self, engine: &Engine, meta: &Arc<FileRef>) -> Result<(), StoreError> {
        let path = &self.file.path;
        engine
            .write_here(&self.file, self.offset, self.data)
            .map_err(|e| io_err("write", path, e))?;
        if let Some(len) = self.cut_to {
            self.file
                .file
                .set_len(len)
                .map_err(|e| io_err("truncate", path, e))?;
        }
        engine
            .write_here(meta, self.meta_at, self.crcs)
            .map_err(|e| io_err("write", &meta.path, e))
    }
}

/// The store a job comes from: its engine (fault plan), a descriptor on its filesystem
/// for `syncfs`, and its root (for the renames).
struct Store {
    engine: Engine,
    anchor: Arc<FileRef>,
    root: PathBuf,
}

enum Job {
    Commit(Arc<Store>, oneshot::Sender<io::Result<()>>),
    Finalize(
        Arc<Store>,
        Finalize,
        oneshot::Sender<Result<(), StoreError>>,
    ),
}

impl Job {
    fn store(&self) -> &Arc<Store> {
        match self {
            Job::Commit(s, _) | Job::Finalize(s, _, _) => s,
        }
    }
}

/// A committer thread; it stops when the last [`Committer`] using it is dropped.
struct Thread {
    tx: mpsc::Sender<Job>,
}

/// Committer threads shared by the stores of this process, by filesystem (device id).
static SHARED: Mutex<Vec<(u64, Weak<Thread>)>> = Mutex::new(Vec::new());

/// A store's group committer.
pub(super) struct Committer {
    thread: Arc<Thread>,
    store: Arc<Store>,
}

fn stopped() -> io::Error {
    io::Error::other("store committer has stopped")
}

impl Thread {
    fn start() -> io::Result<Arc<Thread>> {
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
                    run_batch(batch);
                }
            })?;
        Ok(Arc::new(Thread { tx }))
    }

    /// The committer thread of the filesystem with device id `dev`, started if none runs.
    fn shared(dev: u64) -> io::Result<Arc<Thread>> {
        let mut shared = SHARED.lock().unwrap_or_else(|e| e.into_inner());
        shared.retain(|(_, t)| t.strong_count() > 0);
        if let Some(t) = shared
            .iter()
            .find(|(d, _)| *d == dev)
            .and_then(|(_, t)| t.upgrade())
        {
            return Ok(t);
        }
        let t = Thread::start()?;
        shared.push((dev, Arc::downgrade(&t)));
        Ok(t)
    }
}

impl Committer {
    /// The committer of the store at `root`, syncing the filesystem that holds `anchor`
    /// (any open file of the store). A store without a fault plan shares the thread of
    /// the other stores of this process on the same filesystem.
    pub(super) fn start(
        engine: Engine,
        anchor: Arc<FileRef>,
        root: PathBuf,
    ) -> io::Result<Committer> {
        use std::os::unix::fs::MetadataExt;
        let thread = if engine.has_faults() {
            Thread::start()?
        } else {
            Thread::shared(anchor.file.metadata()?.dev())?
        };
        let store = Arc::new(Store {
            engine,
            anchor,
            root,
        });
        Ok(Committer { thread, store })
    }

    /// Returns once everything written before this call is durable.
    pub(super) async fn commit(&self) -> io::Result<()> {
        let (reply, rx) = oneshot::channel();
        self.thread
            .tx
            .send(Job::Commit(self.store.clone(), reply))
            .await
            .map_err(|_| stopped())?;
        rx.await.map_err(|_| stopped())?
    }

    /// Seals the replica, makes it durable with everything written before this call, and
    /// moves it into `finalized`. An error names the step that failed; after a failed
    /// seal or sync nothing was moved.
    pub(super) async fn finalize(&self, job: Finalize) -> Result<(), StoreError> {
        let path = job.meta.path.clone();
        let (reply, rx) = oneshot::channel();
        self.thread
            .tx
            .send(Job::Finalize(self.store.clone(), job, reply))
            .await
            .map_err(|_| io_err("fsync", &path, stopped()))?;
        rx.await.map_err(|_| io_err("fsync", &path, stopped()))?
    }
}

/// One batch: seal every replica to finalize, one `syncfs`, then move the sealed ones.
/// Every store of a batch is on one filesystem, and either all of them are the one store
/// of a private thread or none has a fault plan: the first job's store syncs for all.
fn run_batch(batch: Vec<Job>) {
    let Some(first) = batch.first().map(|j| j.store().clone()) else {
        return;
    };
    let mut commits = Vec::new();
    let mut sealed = Vec::new();
    for job in batch {
        match job {
            Job::Commit(_, reply) => commits.push(reply),
            Job::Finalize(store, mut f, reply) => {
                let engine = &store.engine;
                if let Some(w) = f.write.take()
                    && let Err(e) = w.run(engine, &f.meta)
                {
                    let _ = reply.send(Err(e));
                    continue;
                }
                let mut header = AlignedBuf::new(meta::HEADER_LEN);
                header.set_len(meta::HEADER_LEN);
                header.copy_from_slice(&f.header);
                match engine.write_here(&f.meta, 0, header) {
                    Ok(()) => sealed.push((store, f, reply)),
                    Err(e) => {
                        let _ = reply.send(Err(io_err("write", &f.meta.path, e)));
                    }
                }
            }
        }
    }
    let synced = first.engine.sync_here(&first.anchor);
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
    for (store, f, reply) in sealed {
        let res = match outcome() {
            Err(e) => Err(io_err("fsync", &f.meta.path, e)),
            Ok(()) => layout::move_replica(
                &store.root,
                f.block,
                f.genstamp,
                ReplicaState::Rbw,
                ReplicaState::Finalized,
            ),
        };
        let _ = reply.send(res);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{BlockStore, StoreConfig};

    async fn open(cfg: StoreConfig) -> BlockStore {
        BlockStore::open(cfg).await.expect("store opens").0
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn stores_on_one_filesystem_share_one_committer_thread() {
        let dir = tempfile::tempdir().unwrap();
        let a = open(StoreConfig::new(dir.path().join("a"))).await;
        let b = open(StoreConfig::new(dir.path().join("b"))).await;
        let thread = |s: &BlockStore| s.inner.committer.thread.clone();
        assert!(Arc::ptr_eq(&thread(&a), &thread(&b)));
        // The thread outlives a store that goes while another still uses it.
        drop(a);
        b.inner
            .committer
            .commit()
            .await
            .expect("commit after the other store went");
        #[cfg(feature = "fault-injection")]
        {
            // A store under a fault plan syncs on its own thread: a fault injected into
            // its sync fails its own commit, never another store's.
            use crate::store::faults::{Fault, FaultOp, FaultPlan, FaultRule};
            let plan = FaultPlan::new();
            let mut cfg = StoreConfig::new(dir.path().join("c"));
            cfg.faults = Some(plan.clone());
            let c = open(cfg).await;
            assert!(!Arc::ptr_eq(&thread(&b), &thread(&c)));
            plan.add(FaultRule::new(FaultOp::Sync, Fault::Eio).times(1));
            let (rb, rc) = tokio::join!(b.inner.committer.commit(), c.inner.committer.commit());
            assert!(rb.is_ok(), "{rb:?}");
            assert!(rc.is_err(), "the injected fault reaches its own store");
        }
    }
}

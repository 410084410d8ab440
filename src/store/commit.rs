//! Group commit: replicas made durable together by one `syncfs` of the store's
//! filesystem, instead of one fsync per file and per directory.
//!
//! A caller of [`Committer::commit`] returns once a `syncfs` that *started after its
//! call* has completed: everything it wrote before the call (data through O_DIRECT or
//! the page cache, meta files, renames, new directory entries) is then on stable
//! storage. Calls that arrive while a `syncfs` runs wait for the next one, which covers
//! them all: under load one `syncfs` serves a whole batch of replicas. The `syncfs`
//! itself runs on the store's IO engine, so the fault-injecting engine can fail it.

use std::io;
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};

use super::engine::{Engine, FileRef};

type Reply = oneshot::Sender<Result<(), (io::ErrorKind, Option<i32>, String)>>;

/// The store's group committer. Its task stops when the committer is dropped.
pub(super) struct Committer {
    tx: mpsc::Sender<Reply>,
}

impl Committer {
    /// Starts the committer of the filesystem that holds `anchor` (any open file of the
    /// store), on the current runtime.
    pub(super) fn start(engine: Engine, anchor: Arc<FileRef>) -> Committer {
        let (tx, mut rx) = mpsc::channel::<Reply>(1024);
        tokio::spawn(async move {
            while let Some(first) = rx.recv().await {
                // Everyone waiting now joins this sync; later callers wait for the next.
                let mut batch = vec![first];
                while let Ok(more) = rx.try_recv() {
                    batch.push(more);
                }
                let res = engine
                    .sync(&anchor)
                    .await
                    .map_err(|e| (e.kind(), e.raw_os_error(), e.to_string()));
                for waiter in batch {
                    let _ = waiter.send(res.clone());
                }
            }
        });
        Committer { tx }
    }

    /// Returns once everything written before this call is durable.
    pub(super) async fn commit(&self) -> io::Result<()> {
        let stopped = || io::Error::other("store committer has stopped");
        let (reply, rx) = oneshot::channel();
        self.tx.send(reply).await.map_err(|_| stopped())?;
        match rx.await.map_err(|_| stopped())? {
            Ok(()) => Ok(()),
            Err((_, Some(code), _)) => Err(io::Error::from_raw_os_error(code)),
            Err((kind, None, msg)) => Err(io::Error::new(kind, msg)),
        }
    }
}

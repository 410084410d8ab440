//! The io_uring backend: each thread runs a tokio-uring runtime, caches one handle per
//! file, and keeps up to `depth` operations in flight.

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

async fn run(mut rx: mpsc::Receiver<Op>, mut closes: mpsc::UnboundedReceiver<u64>, depth: usize) {
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
        Op::Sync { file, reply } => {
            // io_uring has no syncfs: a blocking thread does it, off the ring's thread.
            let res = tokio::task::spawn_blocking(move || {
                rustix::fs::syncfs(&file.file).map_err(io::Error::from)
            })
            .await
            .unwrap_or_else(|e| Err(io::Error::other(e.to_string())));
            let _ = reply.send(res);
        }
        Op::Barrier { reply } => {
            let _ = reply.send(());
        }
    }
}

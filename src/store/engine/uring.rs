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

use super::{CloseQueue, FileRef, Op};

type Cache = Rc<RefCell<HashMap<u64, Rc<UringFile>>>>;

/// Starts one uring thread; fails if the ring cannot be created. Returns its op queue
/// and its close queue.
pub(super) fn spawn(index: usize, depth: usize) -> io::Result<(mpsc::Sender<Op>, Arc<CloseQueue>)> {
    let (tx, rx) = mpsc::channel::<Op>(depth);
    let closes = Arc::new(CloseQueue::default());
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<io::Result<()>>();
    let thread_closes = closes.clone();
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
            rt.block_on(run(rx, thread_closes, depth));
        })?;
    match ready_rx.recv() {
        Ok(Ok(())) => Ok((tx, closes)),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(io::Error::other("uring thread died during setup")),
    }
}

/// Closes the handles of every file dropped so far.
fn drain(closes: &CloseQueue, cache: &Cache) {
    let mut c = cache.borrow_mut();
    for key in closes.take() {
        // In-flight ops hold their own Rc; the fd closes when the last goes.
        c.remove(&key);
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

async fn run(mut rx: mpsc::Receiver<Op>, closes: Arc<CloseQueue>, depth: usize) {
    let cache: Cache = Rc::new(RefCell::new(HashMap::new()));
    let slots = Arc::new(Semaphore::new(depth));
    // Handles of dropped files close at least this often, however idle the thread.
    let mut tick = tokio::time::interval(super::CLOSE_TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let op = tokio::select! {
            biased;
            () = closes.wait_full() => {
                drain(&closes, &cache);
                continue;
            }
            _ = tick.tick() => {
                drain(&closes, &cache);
                continue;
            }
            op = rx.recv() => match op {
                Some(op) => op,
                None => break,
            },
        };
        drain(&closes, &cache);
        if let Op::Barrier { reply } = op {
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
        // io_uring has no syncfs; the group committer runs it on its own thread
        // (`Engine::sync_here`) and never sends it here. Should one arrive, it runs.
        op @ Op::Sync { .. } => super::psync::execute(op),
        Op::Barrier { reply } => {
            let _ = reply.send(());
        }
    }
}

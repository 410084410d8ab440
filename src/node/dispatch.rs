//! The node's accept loop: every stream a peer opens is read for its first frame and
//! handed to the service that owns that frame, each on its own task.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::bandwidth::Bandwidth;
use crate::context::NodeContext;
use crate::pipeline::{self, Pipelines};
use crate::repair::Repairs;
use crate::transport::{Incoming, Stream};
use crate::wire::Frame;

/// The services streams are dispatched to.
#[derive(Clone)]
pub(super) struct Services {
    pub(super) ctx: Arc<NodeContext>,
    pub(super) pipelines: Arc<Pipelines>,
    /// Cluster-wide DCI shares, when this node takes part.
    pub(super) bandwidth: Option<Arc<Bandwidth>>,
    /// Streams being served.
    pub(super) handlers: Arc<AtomicU64>,
    /// The repair service, when this node runs one.
    pub(super) repairs: Option<Arc<Repairs>>,
}

/// Serves every incoming stream until the transport shuts down, then waits for the
/// handlers still running.
pub(super) async fn serve(services: Services, mut incoming: Incoming) {
    let mut handlers = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            s = incoming.accept() => match s {
                Some(s) => {
                    handlers.spawn(handle(services.clone(), s));
                }
                None => break,
            },
            Some(_) = handlers.join_next(), if !handlers.is_empty() => {}
        }
    }
    while handlers.join_next().await.is_some() {}
}

/// Counts a stream being served for as long as it lives.
struct Counted(Arc<AtomicU64>);

impl Counted {
    fn new(n: &Arc<AtomicU64>) -> Self {
        n.fetch_add(1, Ordering::Relaxed);
        Counted(n.clone())
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

async fn handle(services: Services, mut s: Stream) {
    let _counted = Counted::new(&services.handlers);
    let first = match s.reader.recv().await {
        Ok(Some(f)) => f,
        Ok(None) => return,
        Err(e) => {
            tracing::warn!(peer = %services.ctx.name(s.peer), error = %e, "bad first frame");
            return;
        }
    };
    match first {
        Frame::WriteBlock(_) | Frame::CopyBlock(_) => services.pipelines.serve(s, first).await,
        Frame::ReadBlock(req) => crate::read::serve(services.ctx, s, req).await,
        Frame::ShareReport(req) => match &services.bandwidth {
            Some(b) => b.serve(s, req).await,
            None => pipeline::refuse(s, &Frame::ShareReport(req)).await,
        },
        Frame::RepairBlock(req) => match &services.repairs {
            Some(r) => r.serve(s, req).await,
            None => pipeline::refuse(s, &Frame::RepairBlock(req)).await,
        },
        other => pipeline::refuse(s, &other).await,
    }
}

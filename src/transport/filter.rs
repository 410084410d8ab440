//! A frame filter on transport streams, for tests: before a stream sends a frame, the
//! filter of its transport decides to pass, delay, drop, corrupt it, stall the stream
//! (nothing more arrives, and it never ends) or kill it (it ends abruptly, as when a peer
//! dies). Set with `Transport::set_frame_filter` (the `fault-injection` feature); it
//! applies to streams opened or accepted after that, the in-process hop included.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::topology::NodeId;
use crate::wire::Frame;

/// The direction of a stream a frame travels on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Hop {
    /// The node sending the frame.
    pub from: NodeId,
    /// The node it goes to.
    pub to: NodeId,
}

/// What happens to one frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameAction {
    /// Sent as it is.
    Pass,
    /// Sent after this long.
    Delay(Duration),
    /// Not sent; the stream goes on.
    Drop,
    /// Sent with one payload byte flipped (packets only; other frames pass): the
    /// receiver's checksum check must catch it.
    Corrupt,
    /// Neither this frame nor any later one is sent, and the stream never ends, even when
    /// its sender drops it: the peer sees a hop gone silent, as after a power loss.
    Stall,
    /// The stream ends abruptly instead: this frame is not sent and the send fails.
    Kill,
}

/// Decides what happens to each frame a stream sends.
pub trait FrameFilter: Send + Sync {
    /// Called for every frame, on the sending side, before it is sent.
    fn on_frame(&self, hop: Hop, frame: &Frame) -> FrameAction;
}

impl<F: Fn(Hop, &Frame) -> FrameAction + Send + Sync> FrameFilter for F {
    fn on_frame(&self, hop: Hop, frame: &Frame) -> FrameAction {
        self(hop, frame)
    }
}

/// The filter attached to one stream's sending half.
#[derive(Clone)]
pub(crate) struct Attached {
    pub(crate) filter: Arc<dyn FrameFilter>,
    pub(crate) hop: Hop,
}

impl std::fmt::Debug for Attached {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Attached").field("hop", &self.hop).finish()
    }
}

/// Stalled streams' sending halves, kept open for the life of the process so that
/// their peers never see them end.
static PARKED: Mutex<Vec<Box<dyn Send>>> = Mutex::new(Vec::new());

/// Keeps `sink` open forever.
pub(crate) fn park(sink: Box<dyn Send>) {
    PARKED.lock().unwrap_or_else(|e| e.into_inner()).push(sink);
}

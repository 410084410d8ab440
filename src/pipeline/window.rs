//! The writer's window, as a pure state machine: which nodes the pipeline runs through,
//! the packets in flight and their sequence numbers, what every node has acknowledged,
//! when the oldest packet is overdue, and what a recovery keeps, drops and resends.
//!
//! It does no IO and never reads the clock: every call that needs time takes `now`. The
//! [`Writer`](super::Writer) drives it:
//!
//! 1. [`has_room`](Window::has_room) before each packet; when it says no, wait for acks.
//!    [`push`](Window::push) numbers the packet and keeps it until every node acked it.
//! 2. Each ack from the pipeline goes to [`handle_ack`](Window::handle_ack); the oldest
//!    packet's deadline is [`poll_timeout`](Window::poll_timeout), and once it has
//!    passed, [`handle_timeout`](Window::handle_timeout) reports the fault.
//! 3. On a fault the writer drops the node the fault names with
//!    [`drop_target`](Window::drop_target) (which refuses to leave an IDC of the write
//!    without a replica), may [`insert_target`](Window::insert_target) a spare, moves to
//!    the next generation stamp with [`bump_genstamp`](Window::bump_genstamp), rebuilds
//!    the pipeline at [`resume_offset`](Window::resume_offset), and resends what
//!    [`renumber`](Window::renumber) returns: every packet still in flight, numbered
//!    again from 0.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::block::GenStamp;
use crate::topology::{IdcId, NodeId};
use crate::wire::{Ack, Packet, PacketFlags, Status};

/// Every replica of an IDC the write started in has failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct IdcLost {
    /// The IDC left without a replica.
    pub(crate) idc: IdcId,
}

/// Why the pipeline failed, as far as the acks tell.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum AckFault {
    /// Node `index` of the pipeline answered `status` for the oldest packet.
    Refused {
        /// Position in the pipeline.
        index: usize,
        /// What it answered.
        status: Status,
    },
    /// The ack carried `got` statuses for a longer pipeline: the first missing node (the
    /// one after the last that answered) failed.
    Short {
        /// Statuses in the ack.
        got: usize,
    },
    /// An ack for `got` while `expected` was the oldest packet in flight.
    OutOfOrder {
        /// The sequence number acked.
        got: u64,
        /// The one expected.
        expected: u64,
    },
    /// No ack for the oldest packet within the ack timeout.
    Timeout {
        /// How long it waited.
        waited: Duration,
    },
}

impl AckFault {
    /// The position of the node to drop.
    pub(crate) fn index(&self) -> usize {
        match *self {
            AckFault::Refused { index, .. } => index,
            AckFault::Short { got } => got,
            // Nothing says who: the first hop is the one the writer knows it reached.
            AckFault::OutOfOrder { .. } | AckFault::Timeout { .. } => 0,
        }
    }
}

impl std::fmt::Display for AckFault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AckFault::Refused { index, status } => write!(f, "node {index} answered {status:?}"),
            AckFault::Short { got } => write!(f, "ack misses statuses after {got}"),
            AckFault::OutOfOrder { got, expected } => {
                write!(f, "ack for {got} while waiting for {expected}")
            }
            AckFault::Timeout { waited } => write!(f, "no ack within {waited:?}"),
        }
    }
}

/// A packet acknowledged by every node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Acked {
    /// Its sequence number.
    pub(crate) seq: u64,
    /// Time from its (last) send to the ack.
    pub(crate) latency: Duration,
}

#[derive(Debug, Clone)]
struct InFlight {
    packet: Packet,
    sent: Instant,
}

/// See the [module docs](self).
#[derive(Debug)]
pub(crate) struct Window {
    targets: Vec<(NodeId, IdcId)>,
    /// IDCs the write started in; each must keep a replica.
    required: Vec<IdcId>,
    failed: Vec<NodeId>,
    genstamp: GenStamp,
    window_bytes: usize,
    ack_timeout: Duration,
    in_flight: VecDeque<InFlight>,
    in_flight_bytes: usize,
    next_seq: u64,
    acked_len: u64,
}

impl Window {
    /// A window over `targets` (in pipeline order, each with its IDC) for a block at
    /// `genstamp`, with at most `window_bytes` in flight (one packet always fits), and
    /// `ack_timeout` for the oldest packet.
    pub(crate) fn new(
        targets: Vec<(NodeId, IdcId)>,
        genstamp: GenStamp,
        window_bytes: usize,
        ack_timeout: Duration,
    ) -> Self {
        let mut required: Vec<IdcId> = Vec::new();
        for &(_, idc) in &targets {
            if !required.contains(&idc) {
                required.push(idc);
            }
        }
        Window {
            targets,
            required,
            failed: Vec::new(),
            genstamp,
            window_bytes,
            ack_timeout,
            in_flight: VecDeque::new(),
            in_flight_bytes: 0,
            next_seq: 0,
            acked_len: 0,
        }
    }

    /// The pipeline, in order.
    pub(crate) fn targets(&self) -> impl ExactSizeIterator<Item = NodeId> + '_ {
        self.targets.iter().map(|&(n, _)| n)
    }

    /// The first node of the pipeline.
    pub(crate) fn first(&self) -> NodeId {
        self.targets[0].0
    }

    /// Whether `node` is in the pipeline.
    pub(crate) fn contains(&self, node: NodeId) -> bool {
        self.targets.iter().any(|&(n, _)| n == node)
    }

    /// Nodes dropped so far, in order.
    pub(crate) fn failed(&self) -> &[NodeId] {
        &self.failed
    }

    /// The generation stamp the pipeline writes at.
    pub(crate) fn genstamp(&self) -> GenStamp {
        self.genstamp
    }

    /// Bytes every node of the pipeline has acknowledged.
    pub(crate) fn acked_len(&self) -> u64 {
        self.acked_len
    }

    /// Packets in flight.
    pub(crate) fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// Whether a packet of `len` bytes may go out now: it fits in the window, or nothing
    /// is in flight.
    pub(crate) fn has_room(&self, len: usize) -> bool {
        self.in_flight.is_empty() || self.in_flight_bytes + len <= self.window_bytes
    }

    /// Numbers a packet of `data` at `offset` and keeps it until every node acks it;
    /// returns it, ready to send.
    pub(crate) fn push(
        &mut self,
        offset: u64,
        data: Bytes,
        crcs: Vec<u32>,
        flags: PacketFlags,
        now: Instant,
    ) -> Packet {
        let packet = Packet {
            seq: self.next_seq,
            offset,
            flags,
            data_len: data.len() as u32,
            crcs,
            payload: data,
        };
        self.next_seq += 1;
        self.in_flight_bytes += packet.payload.len();
        self.in_flight.push_back(InFlight {
            packet: packet.clone(),
            sent: now,
        });
        packet
    }

    /// An ack from the pipeline: the oldest packet is done when every node says
    /// success; anything else names the node to drop.
    pub(crate) fn handle_ack(
        &mut self,
        ack: &Ack,
        now: Instant,
    ) -> Result<Option<Acked>, AckFault> {
        let Some(front) = self.in_flight.front() else {
            // Nothing in flight: a late ack of a pipeline already torn down.
            return Ok(None);
        };
        if ack.seq != front.packet.seq {
            return Err(AckFault::OutOfOrder {
                got: ack.seq,
                expected: front.packet.seq,
            });
        }
        if let Some(index) = ack.statuses.iter().position(|s| *s != Status::Success) {
            return Err(AckFault::Refused {
                index,
                status: ack.statuses[index],
            });
        }
        if ack.statuses.len() < self.targets.len() {
            return Err(AckFault::Short {
                got: ack.statuses.len(),
            });
        }
        let done = self.in_flight.pop_front().expect("front exists");
        let p = &done.packet;
        self.in_flight_bytes -= p.payload.len();
        self.acked_len = self.acked_len.max(p.offset + p.payload.len() as u64);
        Ok(Some(Acked {
            seq: p.seq,
            latency: now.saturating_duration_since(done.sent),
        }))
    }

    /// When the oldest packet in flight becomes overdue, if any is in flight.
    pub(crate) fn poll_timeout(&self) -> Option<Instant> {
        self.in_flight.front().map(|p| p.sent + self.ack_timeout)
    }

    /// The fault, once the oldest packet is overdue at `now`.
    pub(crate) fn handle_timeout(&self, now: Instant) -> Option<AckFault> {
        let front = self.in_flight.front()?;
        let waited = now.saturating_duration_since(front.sent);
        (waited >= self.ack_timeout).then_some(AckFault::Timeout { waited })
    }

    /// Drops the node at `index` (clamped to the pipeline). Fails when that leaves an IDC
    /// the write started in without a node; the node is dropped either way.
    pub(crate) fn drop_target(&mut self, index: usize) -> Result<NodeId, IdcLost> {
        let index = index.min(self.targets.len().saturating_sub(1));
        let (node, _) = self.targets.remove(index);
        self.failed.push(node);
        for &idc in &self.required {
            if !self.targets.iter().any(|&(_, i)| i == idc) {
                return Err(IdcLost { idc });
            }
        }
        Ok(node)
    }

    /// Puts `node` (in `idc`) into the pipeline at position `at` (clamped).
    pub(crate) fn insert_target(&mut self, at: usize, node: NodeId, idc: IdcId) {
        let at = at.min(self.targets.len());
        self.targets.insert(at, (node, idc));
    }

    /// Records a node that could not join (a spare whose copy failed).
    pub(crate) fn mark_failed(&mut self, node: NodeId) {
        self.failed.push(node);
    }

    /// Moves to the next generation stamp (once per recovery attempt).
    pub(crate) fn bump_genstamp(&mut self) -> GenStamp {
        self.genstamp = GenStamp(self.genstamp.0 + 1);
        self.genstamp
    }

    /// Where a rebuilt pipeline resumes: the acknowledged length — never below it, so
    /// bytes an hflush or hsync confirmed stay on every survivor. It may fall inside a
    /// chunk (an hflushed partial chunk); the packets resent from [`renumber`]
    /// (Self::renumber) start at that chunk's beginning and rewrite it longer.
    pub(crate) fn resume_offset(&self) -> u64 {
        self.acked_len
    }

    /// Every packet still in flight, numbered again from 0 for a rebuilt pipeline and
    /// counted as sent at `now`; the caller sends them in order.
    pub(crate) fn renumber(&mut self, now: Instant) -> Vec<Packet> {
        let mut out = Vec::with_capacity(self.in_flight.len());
        for (seq, p) in self.in_flight.iter_mut().enumerate() {
            p.packet.seq = seq as u64;
            p.sent = now;
            out.push(p.packet.clone());
        }
        self.next_seq = out.len() as u64;
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const A: IdcId = IdcId::from_index(0);
    const B: IdcId = IdcId::from_index(1);

    fn n(i: usize) -> NodeId {
        NodeId::from_index(i)
    }

    fn two_plus_two() -> Window {
        Window::new(
            vec![(n(1), A), (n(2), A), (n(3), B), (n(4), B)],
            GenStamp(1),
            3 * 100,
            Duration::from_secs(5),
        )
    }

    fn ok(seq: u64, nodes: usize) -> Ack {
        Ack {
            seq,
            statuses: vec![Status::Success; nodes],
        }
    }

    fn push(w: &mut Window, offset: u64, len: usize, now: Instant) -> Packet {
        w.push(
            offset,
            Bytes::from(vec![0u8; len]),
            vec![],
            PacketFlags::default(),
            now,
        )
    }

    #[test]
    fn the_window_bounds_bytes_in_flight_but_always_lets_one_packet_out() {
        let mut w = two_plus_two();
        let t0 = Instant::now();
        assert!(w.has_room(1000), "an empty window takes any packet");
        push(&mut w, 0, 100, t0);
        push(&mut w, 100, 100, t0);
        assert!(w.has_room(100));
        push(&mut w, 200, 100, t0);
        assert!(!w.has_room(1));
        let a = w
            .handle_ack(&ok(0, 4), t0 + Duration::from_millis(7))
            .unwrap();
        assert_eq!(
            a,
            Some(Acked {
                seq: 0,
                latency: Duration::from_millis(7)
            })
        );
        assert_eq!(w.acked_len(), 100);
        assert!(w.has_room(100));
    }

    #[test]
    fn acks_name_the_node_that_failed() {
        let mut w = two_plus_two();
        let t0 = Instant::now();
        push(&mut w, 0, 100, t0);
        let refused = Ack {
            seq: 0,
            statuses: vec![Status::Success, Status::Success, Status::DiskError],
        };
        let f = w.handle_ack(&refused, t0).unwrap_err();
        assert_eq!(
            f,
            AckFault::Refused {
                index: 2,
                status: Status::DiskError
            }
        );
        assert_eq!(f.index(), 2);
        let short = Ack {
            seq: 0,
            statuses: vec![Status::Success],
        };
        assert_eq!(w.handle_ack(&short, t0).unwrap_err().index(), 1);
        let f = w.handle_ack(&ok(5, 4), t0).unwrap_err();
        assert_eq!(
            f,
            AckFault::OutOfOrder {
                got: 5,
                expected: 0
            }
        );
        assert_eq!(w.acked_len(), 0, "nothing acked by a fault");
        assert_eq!(w.in_flight(), 1);
    }

    #[test]
    fn the_oldest_packet_sets_the_deadline() {
        let mut w = two_plus_two();
        let t0 = Instant::now();
        assert_eq!(w.poll_timeout(), None);
        assert_eq!(w.handle_timeout(t0 + Duration::from_secs(60)), None);
        push(&mut w, 0, 100, t0);
        push(&mut w, 100, 100, t0 + Duration::from_secs(1));
        assert_eq!(w.poll_timeout(), Some(t0 + Duration::from_secs(5)));
        assert_eq!(w.handle_timeout(t0 + Duration::from_millis(4999)), None);
        assert_eq!(
            w.handle_timeout(t0 + Duration::from_secs(5)),
            Some(AckFault::Timeout {
                waited: Duration::from_secs(5)
            })
        );
        w.handle_ack(&ok(0, 4), t0 + Duration::from_secs(2))
            .unwrap();
        assert_eq!(w.poll_timeout(), Some(t0 + Duration::from_secs(6)));
    }

    #[test]
    fn dropping_the_last_node_of_an_idc_is_idc_lost() {
        let mut w = two_plus_two();
        assert_eq!(w.drop_target(2), Ok(n(3)));
        assert_eq!(w.drop_target(9), Err(IdcLost { idc: B }), "clamped to b2");
        assert_eq!(w.failed(), &[n(3), n(4)]);
        let mut w = two_plus_two();
        w.drop_target(0).unwrap();
        w.insert_target(0, n(5), A);
        assert_eq!(w.drop_target(1), Ok(n(2)), "the spare keeps idc A");
        assert_eq!(w.targets().collect::<Vec<_>>(), vec![n(5), n(3), n(4)]);
    }

    #[test]
    fn recovery_resumes_at_the_oldest_unacked_packet_and_renumbers_from_zero() {
        let mut w = two_plus_two();
        let t0 = Instant::now();
        for i in 0..3 {
            push(&mut w, i * 100, 100, t0);
        }
        w.handle_ack(&ok(0, 4), t0).unwrap();
        w.drop_target(1).unwrap();
        assert_eq!(w.bump_genstamp(), GenStamp(2));
        assert_eq!(w.resume_offset(), 100);
        let t1 = t0 + Duration::from_secs(1);
        let again = w.renumber(t1);
        assert_eq!(
            again.iter().map(|p| (p.seq, p.offset)).collect::<Vec<_>>(),
            vec![(0, 100), (1, 200)]
        );
        assert_eq!(w.poll_timeout(), Some(t1 + Duration::from_secs(5)));
        // The rebuilt pipeline has three nodes; its acks carry three statuses.
        w.handle_ack(&ok(0, 3), t1).unwrap();
        assert_eq!(push(&mut w, 300, 50, t1).seq, 2, "numbering goes on");
        assert_eq!(w.resume_offset(), 200);
    }

    #[test]
    fn with_nothing_in_flight_recovery_resumes_at_the_acked_length() {
        let mut w = two_plus_two();
        let t0 = Instant::now();
        // An hflush sent a partial chunk (100..150); the next chunk starts at 100.
        push(&mut w, 0, 100, t0);
        push(&mut w, 100, 50, t0);
        w.handle_ack(&ok(0, 4), t0).unwrap();
        w.handle_ack(&ok(1, 4), t0).unwrap();
        assert_eq!(w.acked_len(), 150);
        assert_eq!(
            w.resume_offset(),
            150,
            "keeps the acknowledged partial chunk"
        );
        assert!(w.renumber(t0).is_empty());
    }

    #[test]
    fn recovery_never_resumes_below_what_was_acknowledged() {
        let mut w = two_plus_two();
        let t0 = Instant::now();
        // An hflush sent and got acked 100 bytes of a partial chunk at 4096..4196.
        push(&mut w, 0, 4096, t0);
        push(&mut w, 4096, 100, t0);
        w.handle_ack(&ok(0, 4), t0).unwrap();
        w.handle_ack(&ok(1, 4), t0).unwrap();
        assert_eq!(w.acked_len(), 4196);
        // The next packet rewrites that chunk longer; then a node fails.
        push(&mut w, 4096, 1000, t0);
        w.drop_target(3).unwrap();
        // Survivors keep the 100 acknowledged bytes: resume at 4196, not at 4096.
        assert_eq!(w.resume_offset(), 4196);
        assert_eq!(w.renumber(t0)[0].offset, 4096, "the rewrite is resent");
    }

    #[derive(Debug, Clone)]
    enum Op {
        Push(usize),
        AckOk,
        AckFail(usize),
        Timeout,
        Spare,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (1usize..=300).prop_map(Op::Push),
            4 => Just(Op::AckOk),
            1 => (0usize..6).prop_map(Op::AckFail),
            1 => Just(Op::Timeout),
            1 => Just(Op::Spare),
        ]
    }

    proptest! {
        /// Whatever the acks, faults and recoveries: bytes in flight stay within the
        /// window (or one packet), the acknowledged length only grows, the packets in
        /// flight are numbered consecutively and leave no gap after what is acked (so a
        /// recovery resending them loses nothing), and a drop either keeps every IDC of
        /// the write or says which one it lost.
        #[test]
        fn invariants_hold_under_any_sequence(ops in prop::collection::vec(op(), 1..80)) {
            let mut w = two_plus_two();
            let mut now = Instant::now();
            let mut end = 0u64;
            let mut spares = (10..20).map(n);
            for op in ops {
                now += Duration::from_millis(3);
                let before = w.acked_len();
                let fault = match op {
                    Op::Push(len) => {
                        if w.has_room(len) {
                            let p = push(&mut w, end, len, now);
                            prop_assert_eq!(p.offset, end);
                            end += len as u64;
                        }
                        None
                    }
                    Op::AckOk => match w.in_flight.front().map(|p| p.packet.seq) {
                        Some(seq) => w.handle_ack(&ok(seq, w.targets.len()), now).err(),
                        None => None,
                    },
                    Op::AckFail(i) => match w.in_flight.front().map(|p| p.packet.seq) {
                        Some(seq) => {
                            let mut statuses = vec![Status::Success; w.targets.len()];
                            let i = i.min(statuses.len() - 1);
                            statuses[i] = Status::Unreachable;
                            w.handle_ack(&Ack { seq, statuses }, now).err()
                        }
                        None => None,
                    },
                    Op::Timeout => {
                        now += Duration::from_secs(6);
                        w.handle_timeout(now)
                    }
                    Op::Spare => {
                        if let Some(s) = spares.next() {
                            w.insert_target(1, s, if s.index() % 2 == 0 { A } else { B });
                        }
                        None
                    }
                };
                if let Some(f) = fault {
                    let idx = f.index();
                    let gone = w.targets.get(idx.min(w.targets.len() - 1)).copied();
                    match w.drop_target(idx) {
                        Ok(node) => {
                            prop_assert_eq!(Some(node), gone.map(|g| g.0));
                            for idc in [A, B] {
                                prop_assert!(w.targets.iter().any(|&(_, i)| i == idc));
                            }
                        }
                        Err(IdcLost { idc }) => {
                            prop_assert!(!w.targets.iter().any(|&(_, i)| i == idc));
                            return Ok(());
                        }
                    }
                    let gs = w.genstamp();
                    prop_assert_eq!(w.bump_genstamp(), GenStamp(gs.0 + 1));
                    let resume = w.resume_offset();
                    prop_assert!(resume <= w.acked_len());
                    prop_assert_eq!(resume, w.acked_len());
                    let again = w.renumber(now);
                    if let Some(p) = again.first() {
                        prop_assert!(p.offset <= resume, "a gap before the resent packets");
                    }
                }
                prop_assert!(w.acked_len() >= before, "acked length went back");
                prop_assert!(w.acked_len() <= end);
                prop_assert!(w.in_flight.len() <= 1 || w.in_flight_bytes <= w.window_bytes);
                let bytes: usize = w.in_flight.iter().map(|p| p.packet.payload.len()).sum();
                prop_assert_eq!(bytes, w.in_flight_bytes);
                let mut expect = w.in_flight.front().map(|p| p.packet.seq);
                let mut covered = w.acked_len();
                for p in &w.in_flight {
                    prop_assert_eq!(Some(p.packet.seq), expect);
                    expect = expect.map(|s| s + 1);
                    prop_assert!(p.packet.offset <= covered, "gap before {}", p.packet.offset);
                    covered = covered.max(p.packet.offset + p.packet.payload.len() as u64);
                }
                prop_assert_eq!(covered, end, "every byte sent is acked or in flight");
            }
        }
    }
}

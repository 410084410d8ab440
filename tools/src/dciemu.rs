//! `strait dci-emu`: UDP relays that stand in for the WAN links between IDCs, since the
//! kernel here has no netem. Each relay forwards datagrams from clients to one target
//! node and the replies back; every relay of an IDC pair shares that pair's link in each
//! direction ([`EmuLayout`]), which adds a one-way delay, a rate cap with a bounded queue
//! (tail drop), and optional random loss.
//!
//! [`LinkModel`] is the pure core (explicit time, unit-tested); [`run_layout`] is the
//! shell. Datagrams are received and sent in batches (GRO, `recvmmsg`, GSO through
//! `quinn-udp`), so a batch of QUIC datagrams costs one system call each way, not one per
//! datagram.

use std::collections::{BinaryHeap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::{RngExt, SeedableRng};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;

/// Impairments of one direction.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LinkParams {
    /// Bytes per second (0: unlimited).
    pub rate: u64,
    /// One-way delay added to every datagram.
    pub delay: Duration,
    /// Most bytes waiting to be serialized; more are dropped.
    pub queue_bytes: u64,
    /// Probability (0..=1) of dropping a datagram.
    pub loss: f64,
}

/// One direction of the emulated link: decides when a datagram arrives, or drops it.
#[derive(Debug, Clone)]
pub struct LinkModel {
    params: LinkParams,
    /// When the serializer is free again.
    busy_until: Option<Instant>,
}

impl LinkModel {
    /// A fresh link.
    pub fn new(params: LinkParams) -> Self {
        LinkModel {
            params,
            busy_until: None,
        }
    }

    /// A datagram of `len` bytes offered at `now`; `lost` is a uniform sample in 0..1.
    /// Returns when it arrives at the other end, or `None` if it is dropped.
    pub fn admit(&mut self, now: Instant, len: usize, lost: f64) -> Option<Instant> {
        if lost < self.params.loss {
            return None;
        }
        let start = self.busy_until.filter(|&b| b > now).unwrap_or(now);
        if self.params.rate > 0 {
            // Bytes still waiting to be serialized at `now`.
            let backlog = (start - now).as_secs_f64() * self.params.rate as f64;
            if backlog + len as f64 > self.params.queue_bytes as f64 {
                return None;
            }
        }
        let tx = if self.params.rate == 0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(len as f64 / self.params.rate as f64)
        };
        let done = start + tx;
        self.busy_until = Some(done);
        Some(done + self.params.delay)
    }
}

/// One relay of an emulator: datagrams to `listen` go to `target`, a node in IDC `idc`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relay {
    /// Address to receive on (the node's `dci_addr`).
    pub listen: SocketAddr,
    /// The node behind it.
    pub target: SocketAddr,
    /// The node's IDC.
    pub idc: String,
}

/// Where the emulated links are: the relays, and which IDC each sending address is in.
/// A datagram from a client in IDC `x` to a relay of IDC `y` crosses the link `x -> y`;
/// its reply crosses `y -> x`. Every relay of an IDC pair shares that pair's two links,
/// as every node of an IDC shares the real DCI.
#[derive(Debug, Clone, Default)]
pub struct EmuLayout {
    /// The relays.
    pub relays: Vec<Relay>,
    /// Sending IP -> IDC. A sender not listed counts as IDC `"?"` (its own link).
    pub peers: HashMap<IpAddr, String>,
}

/// A batch of datagrams (one GSO send) due at `at`.
struct Pending {
    at: Instant,
    data: Vec<u8>,
    segment: usize,
    to: SocketAddr,
    via: Arc<Socket>,
}

impl PartialEq for Pending {
    fn eq(&self, other: &Self) -> bool {
        self.at == other.at
    }
}
impl Eq for Pending {}
impl PartialOrd for Pending {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Pending {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        // Earliest first out of a max-heap.
        other.at.cmp(&self.at)
    }
}

/// A UDP socket with batched IO: GRO on receive, GSO on send (`quinn-udp`).
struct Socket {
    io: UdpSocket,
    state: quinn_udp::UdpSocketState,
}

impl Socket {
    fn bind(addr: SocketAddr) -> std::io::Result<Socket> {
        let std = std::net::UdpSocket::bind(addr)?;
        std.set_nonblocking(true)?;
        let state = quinn_udp::UdpSocketState::new((&std).into())?;
        // Room for bursts while the relay task waits for the CPU.
        let _ = state.set_recv_buffer_size((&std).into(), 8 << 20);
        let _ = state.set_send_buffer_size((&std).into(), 8 << 20);
        Ok(Socket {
            io: UdpSocket::from_std(std)?,
            state,
        })
    }

    /// Receives one or more batches; returns how many `meta` entries were filled.
    async fn recv(
        &self,
        bufs: &mut [std::io::IoSliceMut<'_>],
        meta: &mut [quinn_udp::RecvMeta],
    ) -> std::io::Result<usize> {
        loop {
            self.io.readable().await?;
            match self.io.try_io(tokio::io::Interest::READABLE, || {
                self.state.recv((&self.io).into(), bufs, meta)
            }) {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                r => return r,
            }
        }
    }

    /// Sends `data` to `to` as datagrams of `segment` bytes (the last may be shorter).
    async fn send(&self, to: SocketAddr, data: &[u8], segment: usize) {
        let max = self.state.max_gso_segments().max(1) * segment;
        for chunk in data.chunks(max.max(1)) {
            let t = quinn_udp::Transmit {
                destination: to,
                ecn: None,
                contents: chunk,
                segment_size: (chunk.len() > segment).then_some(segment),
                src_ip: None,
            };
            loop {
                if self.io.writable().await.is_err() {
                    return;
                }
                match self.io.try_io(tokio::io::Interest::WRITABLE, || {
                    self.state.send((&self.io).into(), &t)
                }) {
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                    _ => break,
                }
            }
        }
    }
}

/// Delivers batches at their arrival times, earliest first.
async fn deliver(mut rx: mpsc::Receiver<Pending>) {
    let mut queue: BinaryHeap<Pending> = BinaryHeap::new();
    loop {
        let next = queue.peek().map(|p| p.at);
        tokio::select! {
            p = rx.recv() => match p {
                Some(p) => queue.push(p),
                None if queue.is_empty() => return,
                None => {}
            },
            _ = async { match next { Some(t) => tokio::time::sleep_until(t.into()).await, None => std::future::pending().await } } => {
                let now = Instant::now();
                while queue.peek().is_some_and(|p| p.at <= now) {
                    if let Some(p) = queue.pop() {
                        p.via.send(p.to, &p.data, p.segment).await;
                    }
                }
            }
        }
    }
}

/// Counters of a running emulator.
#[derive(Debug, Default)]
pub struct EmuStats {
    /// Datagrams forwarded (both directions).
    pub forwarded: std::sync::atomic::AtomicU64,
    /// Datagrams dropped by the queue limit or loss.
    pub dropped: std::sync::atomic::AtomicU64,
    /// Bytes forwarded (both directions).
    pub forwarded_bytes: std::sync::atomic::AtomicU64,
    /// Receive calls (each may return a batch of datagrams).
    pub recv_calls: std::sync::atomic::AtomicU64,
}

type Links = Arc<HashMap<(String, String), Mutex<LinkModel>>>;

/// Runs a single relay: datagrams to `listen` go to `target`; replies return to their
/// client. One link each way. Runs until the task is dropped.
pub async fn run(
    listen: SocketAddr,
    target: SocketAddr,
    params: LinkParams,
    stats: Arc<EmuStats>,
) -> std::io::Result<()> {
    let layout = EmuLayout {
        relays: vec![Relay {
            listen,
            target,
            idc: "target".into(),
        }],
        peers: HashMap::new(),
    };
    run_layout(layout, params, stats).await
}

/// Runs every relay of `layout`; relays of the same IDC pair share that pair's link in
/// each direction. Runs until the task is dropped.
pub async fn run_layout(
    layout: EmuLayout,
    params: LinkParams,
    stats: Arc<EmuStats>,
) -> std::io::Result<()> {
    let mut idcs: Vec<String> = layout.peers.values().cloned().collect();
    idcs.extend(layout.relays.iter().map(|r| r.idc.clone()));
    idcs.push("?".into());
    idcs.sort();
    idcs.dedup();
    let mut links = HashMap::new();
    for a in &idcs {
        for b in &idcs {
            if a != b {
                links.insert((a.clone(), b.clone()), Mutex::new(LinkModel::new(params)));
            }
        }
    }
    let links: Links = Arc::new(links);
    let peers = Arc::new(layout.peers);
    let (tx, rx) = mpsc::channel::<Pending>(65_536);
    tokio::spawn(deliver(rx));
    let mut tasks = tokio::task::JoinSet::new();
    for relay in layout.relays {
        let front = Arc::new(Socket::bind(relay.listen)?);
        tasks.spawn(relay_task(
            relay,
            front,
            links.clone(),
            peers.clone(),
            tx.clone(),
            stats.clone(),
        ));
    }
    match tasks.join_next().await {
        Some(Ok(r)) => r,
        Some(Err(e)) => Err(std::io::Error::other(e)),
        None => Ok(()),
    }
}

const BATCH: usize = 8;
const BUF: usize = 64 * 1024;

/// Buffers for one batched receive: up to `BATCH` GRO batches of up to `BUF` bytes.
struct Batch {
    storage: Vec<Vec<u8>>,
    meta: Vec<quinn_udp::RecvMeta>,
}

impl Batch {
    fn new() -> Self {
        Batch {
            storage: vec![vec![0u8; BUF]; BATCH],
            meta: vec![quinn_udp::RecvMeta::default(); BATCH],
        }
    }

    /// Receives into the buffers; returns how many hold data.
    async fn recv(&mut self, sock: &Socket) -> std::io::Result<usize> {
        let mut bufs: Vec<std::io::IoSliceMut<'_>> = self
            .storage
            .iter_mut()
            .map(|b| std::io::IoSliceMut::new(b))
            .collect();
        sock.recv(&mut bufs, &mut self.meta).await
    }
}

/// Admits the datagrams of one received batch (`len` bytes, `stride` each) to `link` and
/// queues the admitted runs for delivery.
#[allow(clippy::too_many_arguments)]
async fn forward(
    link: &Mutex<LinkModel>,
    rng: &mut rand::rngs::StdRng,
    data: &[u8],
    stride: usize,
    to: SocketAddr,
    via: &Arc<Socket>,
    tx: &mpsc::Sender<Pending>,
    stats: &EmuStats,
) {
    let stride = stride.max(1);
    let now = Instant::now();
    // Runs of consecutive admitted datagrams: (start, end, arrival of the last).
    let mut runs: Vec<(usize, usize, Instant)> = Vec::new();
    {
        let mut m = link.lock().unwrap_or_else(|e| e.into_inner());
        let mut off = 0;
        while off < data.len() {
            let n = stride.min(data.len() - off);
            let at = m.admit(now, n, rng.random::<f64>());
            count(stats, at.is_some(), n);
            match (at, runs.last_mut()) {
                (Some(at), Some(run)) if run.1 == off => {
                    run.1 = off + n;
                    run.2 = at;
                }
                (Some(at), _) => runs.push((off, off + n, at)),
                (None, _) => {}
            }
            off += n;
        }
    }
    for (a, b, at) in runs {
        let _ = tx
            .send(Pending {
                at,
                data: data[a..b].to_vec(),
                segment: stride,
                to,
                via: via.clone(),
            })
            .await;
    }
}

async fn relay_task(
    relay: Relay,
    front: Arc<Socket>,
    links: Links,
    peers: Arc<HashMap<IpAddr, String>>,
    tx: mpsc::Sender<Pending>,
    stats: Arc<EmuStats>,
) -> std::io::Result<()> {
    let mut upstreams: HashMap<SocketAddr, Arc<Socket>> = HashMap::new();
    let mut rng = rand::rngs::StdRng::seed_from_u64(u64::from(relay.listen.port()) ^ 0xdc1);
    let mut batch = Batch::new();
    loop {
        let n = batch.recv(&front).await?;
        stats.recv_calls.fetch_add(1, Ordering::Relaxed);
        for (m, buf) in batch.meta.iter().zip(&batch.storage).take(n) {
            let client = m.addr;
            let from = peers.get(&client.ip()).map_or("?", String::as_str);
            let up = match upstreams.get(&client) {
                Some(u) => u.clone(),
                None => {
                    let bind: SocketAddr = if relay.target.is_ipv4() {
                        SocketAddr::from(([0, 0, 0, 0], 0))
                    } else {
                        SocketAddr::from(([0u16; 8], 0))
                    };
                    let u = Arc::new(Socket::bind(bind)?);
                    upstreams.insert(client, u.clone());
                    tokio::spawn(replies(
                        u.clone(),
                        front.clone(),
                        client,
                        links.clone(),
                        (relay.idc.clone(), from.to_string()),
                        tx.clone(),
                        stats.clone(),
                    ));
                    u
                }
            };
            let Some(l) = links.get(&(from.to_string(), relay.idc.clone())) else {
                continue;
            };
            forward(
                l,
                &mut rng,
                &buf[..m.len],
                m.stride,
                relay.target,
                &up,
                &tx,
                &stats,
            )
            .await;
        }
    }
}

/// Replies from the target to `client`, across the link `dir.0 -> dir.1`.
async fn replies(
    up: Arc<Socket>,
    front: Arc<Socket>,
    client: SocketAddr,
    links: Links,
    dir: (String, String),
    tx: mpsc::Sender<Pending>,
    stats: Arc<EmuStats>,
) {
    let Some(link) = links.get(&dir) else { return };
    let mut rng = rand::rngs::StdRng::seed_from_u64(client.port().into());
    let mut batch = Batch::new();
    loop {
        let Ok(n) = batch.recv(&up).await else {
            return;
        };
        stats.recv_calls.fetch_add(1, Ordering::Relaxed);
        for (m, buf) in batch.meta.iter().zip(&batch.storage).take(n) {
            forward(
                link,
                &mut rng,
                &buf[..m.len],
                m.stride,
                client,
                &front,
                &tx,
                &stats,
            )
            .await;
        }
    }
}

fn count(stats: &EmuStats, sent: bool, bytes: usize) {
    if sent {
        stats.forwarded.fetch_add(1, Ordering::Relaxed);
        stats
            .forwarded_bytes
            .fetch_add(bytes as u64, Ordering::Relaxed);
    } else {
        stats.dropped.fetch_add(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_paces_delays_and_drops() {
        let t0 = Instant::now();
        let mut m = LinkModel::new(LinkParams {
            rate: 1_000_000,
            delay: Duration::from_millis(5),
            queue_bytes: 10_000,
            loss: 0.0,
        });
        // 1000-byte datagrams take 1 ms each to serialize, then 5 ms of delay.
        assert_eq!(m.admit(t0, 1000, 0.5), Some(t0 + Duration::from_millis(6)));
        assert_eq!(m.admit(t0, 1000, 0.5), Some(t0 + Duration::from_millis(7)));
        // The queue holds 10 000 bytes: offering 20 more at once drops the excess.
        let admitted = (0..20).filter(|_| m.admit(t0, 1000, 0.5).is_some()).count();
        assert_eq!(admitted, 8);
        // Later the queue has drained.
        assert!(m.admit(t0 + Duration::from_millis(20), 1000, 0.5).is_some());
        let mut lossy = LinkModel::new(LinkParams {
            rate: 0,
            delay: Duration::ZERO,
            queue_bytes: 0,
            loss: 0.1,
        });
        assert!(lossy.admit(t0, 10, 0.05).is_none());
        assert_eq!(lossy.admit(t0, 10, 0.5), Some(t0));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn relay_delivers_at_the_cap_with_the_delay() {
        let target = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let taddr = target.local_addr().unwrap();
        let listen: SocketAddr = {
            let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
            s.local_addr().unwrap()
        };
        let params = LinkParams {
            rate: 4_000_000,
            delay: Duration::from_millis(10),
            queue_bytes: 200_000,
            loss: 0.0,
        };
        let stats = Arc::new(EmuStats::default());
        let emu = tokio::spawn(run(listen, taddr, params, stats.clone()));
        tokio::task::yield_now().await;
        let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        // Added delay: a lone probe on an idle link.
        let mut buf = vec![0u8; 2048];
        let mut probe_delay = Duration::MAX;
        for _ in 0..5 {
            let t = Instant::now();
            loop {
                client.send_to(b"probe", listen).await.unwrap();
                if let Ok(Ok(_)) =
                    tokio::time::timeout(Duration::from_millis(200), target.recv_from(&mut buf))
                        .await
                {
                    break;
                }
            }
            probe_delay = probe_delay.min(t.elapsed());
        }
        assert!(
            probe_delay >= Duration::from_millis(10) && probe_delay < Duration::from_millis(16),
            "added delay {probe_delay:?}"
        );
        // Rate: offer 2x the cap for one second; count what arrives.
        let sender = tokio::spawn(async move {
            let data = vec![7u8; 1000];
            let t0 = Instant::now();
            let mut sent = 0u64;
            while t0.elapsed() < Duration::from_millis(1000) {
                client.send_to(&data, listen).await.unwrap();
                sent += 1000;
                let due = Duration::from_secs_f64(sent as f64 / 8_000_000.0);
                if let Some(wait) = due.checked_sub(t0.elapsed()) {
                    tokio::time::sleep(wait).await;
                }
            }
        });
        let t0 = Instant::now();
        let mut got = 0u64;
        while let Ok(Ok((n, _))) =
            tokio::time::timeout(Duration::from_millis(300), target.recv_from(&mut buf)).await
        {
            got += n as u64;
        }
        sender.await.unwrap();
        let secs = t0.elapsed().as_secs_f64() - 0.3;
        let rate = got as f64 / secs;
        eprintln!(
            "dci-emu accuracy: delivered {rate:.0} B/s for a 4 MB/s cap ({:.1}%), added delay {probe_delay:?} for 10 ms",
            100.0 * rate / 4e6
        );
        assert!(
            (3_600_000.0..=4_400_000.0).contains(&rate),
            "delivered {rate:.0} B/s for a 4 MB/s cap"
        );
        assert!(
            stats.dropped.load(std::sync::atomic::Ordering::Relaxed) > 0,
            "the bounded queue dropped the excess"
        );
        emu.abort();
    }

    /// Two nodes of idc-b behind their own relays, one sender in idc-a offering each of
    /// them the whole cap: together they get one cap, the link they share.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn relays_of_one_idc_pair_share_its_link() {
        let free = || {
            std::net::UdpSocket::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
        };
        let t1 = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let t2 = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let (l1, l2) = (free(), free());
        let sender = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let layout = EmuLayout {
            relays: vec![
                Relay {
                    listen: l1,
                    target: t1.local_addr().unwrap(),
                    idc: "idc-b".into(),
                },
                Relay {
                    listen: l2,
                    target: t2.local_addr().unwrap(),
                    idc: "idc-b".into(),
                },
            ],
            peers: [(sender.local_addr().unwrap().ip(), "idc-a".to_string())].into(),
        };
        let params = LinkParams {
            rate: 4_000_000,
            delay: Duration::from_millis(2),
            queue_bytes: 100_000,
            loss: 0.0,
        };
        let stats = Arc::new(EmuStats::default());
        let emu = tokio::spawn(run_layout(layout, params, stats.clone()));
        tokio::task::yield_now().await;
        let send = tokio::spawn(async move {
            let data = vec![1u8; 1000];
            let t0 = Instant::now();
            let mut sent = 0u64;
            while t0.elapsed() < Duration::from_millis(1000) {
                // Alternate which relay goes first, so that neither is always the one
                // that meets a full queue.
                let order = if sent.is_multiple_of(2000) {
                    [l1, l2]
                } else {
                    [l2, l1]
                };
                for l in order {
                    let _ = sender.send_to(&data, l).await;
                }
                sent += 1000;
                let due = Duration::from_secs_f64(sent as f64 / 4_000_000.0);
                if let Some(wait) = due.checked_sub(t0.elapsed()) {
                    tokio::time::sleep(wait).await;
                }
            }
        });
        let count = |t: UdpSocket| async move {
            let mut buf = vec![0u8; 2048];
            let mut got = 0u64;
            while let Ok(Ok((n, _))) =
                tokio::time::timeout(Duration::from_millis(300), t.recv_from(&mut buf)).await
            {
                got += n as u64;
            }
            got
        };
        let (g1, g2) = tokio::join!(count(t1), count(t2));
        send.await.unwrap();
        let total = (g1 + g2) as f64;
        // One second of offered load at 2x the cap, plus the queue: about one cap.
        assert!(
            (3_400_000.0..=4_600_000.0).contains(&total),
            "delivered {total} bytes through a shared 4 MB/s link ({g1} + {g2})"
        );
        assert!(
            g1 > 1_000_000 && g2 > 1_000_000,
            "both relays got a part: {g1} {g2}"
        );
        emu.abort();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn quic_between_idcs_goes_through_the_emulator() {
        use strait::topology::Topology;
        use strait::transport::{CertAuthority, Transport, TransportConfig};
        use strait::wire::{Ack, Frame, Status};
        let net = (std::process::id() % 250) as u8 + 1;
        let a = |h: u8| -> SocketAddr { SocketAddr::from(([127, 8, net, h], 7950)) };
        let topo = Arc::new(
            Topology::builder()
                .idc("idc-a")
                .idc("idc-b")
                .node("a1", "idc-a", "r1", a(1), 1 << 40)
                .node("b1", "idc-b", "r1", a(2), 1 << 40)
                .dci_addr(a(3))
                .link("idc-a", "idc-b", 125_000_000, Duration::from_millis(30))
                .build()
                .unwrap(),
        );
        let params = LinkParams {
            rate: 0,
            delay: Duration::from_millis(15),
            queue_bytes: 1 << 20,
            loss: 0.0,
        };
        let stats = Arc::new(EmuStats::default());
        let emu = tokio::spawn(run(a(3), a(2), params, stats.clone()));
        let ca = CertAuthority::generate("emu test").unwrap();
        let id = |n: &str| topo.node_by_name(n).unwrap();
        let (ta, _) = Transport::bind(
            id("a1"),
            topo.clone(),
            &ca.identity("a1").unwrap(),
            TransportConfig::default(),
        )
        .await
        .unwrap();
        let (_tb, mut incoming) = Transport::bind(
            id("b1"),
            topo.clone(),
            &ca.identity("b1").unwrap(),
            TransportConfig::default(),
        )
        .await
        .unwrap();
        tokio::spawn(async move {
            while let Some(mut s) = incoming.accept().await {
                tokio::spawn(async move {
                    while let Ok(Some(f)) = s.reader.recv().await {
                        if s.writer.send(&f).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        let mut s = ta.open(id("b1")).await.unwrap();
        let ping = Frame::Ack(Ack {
            seq: 1,
            statuses: vec![Status::Success],
        });
        s.writer.send(&ping).await.unwrap();
        assert_eq!(s.reader.recv().await.unwrap(), Some(ping.clone()));
        let t = Instant::now();
        s.writer.send(&ping).await.unwrap();
        assert_eq!(s.reader.recv().await.unwrap(), Some(ping));
        let rtt = t.elapsed();
        assert!(
            rtt >= Duration::from_millis(30),
            "round trip {rtt:?} did not cross the emulator"
        );
        assert!(stats.forwarded.load(std::sync::atomic::Ordering::Relaxed) > 4);
        emu.abort();
    }
}

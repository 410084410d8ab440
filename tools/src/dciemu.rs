//! `strait dci-emu`: a UDP relay that stands in for a WAN link between IDCs, since the
//! kernel here has no netem. It forwards datagrams from clients to one target and the
//! replies back, adding in each direction a one-way delay, a rate cap with a bounded
//! queue (tail drop), and optional random loss.
//!
//! [`LinkModel`] is the pure core (explicit time, unit-tested); [`run`] is the shell.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
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

struct Pending {
    at: Instant,
    data: Vec<u8>,
    to: SocketAddr,
    via: Arc<UdpSocket>,
}

/// Delivers datagrams at their arrival times, in order (arrivals are monotone).
async fn deliver(mut rx: mpsc::Receiver<Pending>) {
    let mut queue: VecDeque<Pending> = VecDeque::new();
    loop {
        let next = queue.front().map(|p| p.at);
        tokio::select! {
            p = rx.recv() => match p {
                Some(p) => queue.push_back(p),
                None if queue.is_empty() => return,
                None => {}
            },
            _ = async { match next { Some(t) => tokio::time::sleep_until(t.into()).await, None => std::future::pending().await } } => {
                let now = Instant::now();
                while queue.front().is_some_and(|p| p.at <= now) {
                    if let Some(p) = queue.pop_front() {
                        let _ = p.via.send_to(&p.data, p.to).await;
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
}

/// Runs the relay: datagrams to `listen` go to `target`; replies return to their client.
/// Runs until the task is dropped.
pub async fn run(
    listen: SocketAddr,
    target: SocketAddr,
    params: LinkParams,
    stats: Arc<EmuStats>,
) -> std::io::Result<()> {
    let front = Arc::new(UdpSocket::bind(listen).await?);
    let (tx, rx) = mpsc::channel::<Pending>(65_536);
    tokio::spawn(deliver(rx));
    let forward = Arc::new(tokio::sync::Mutex::new(LinkModel::new(params)));
    let backward = Arc::new(tokio::sync::Mutex::new(LinkModel::new(params)));
    let mut upstreams: HashMap<SocketAddr, Arc<UdpSocket>> = HashMap::new();
    let mut rng = rand::rngs::StdRng::seed_from_u64(0xdc1);
    let mut buf = vec![0u8; 65_536];
    loop {
        let (n, client) = front.recv_from(&mut buf).await?;
        let up = match upstreams.get(&client) {
            Some(u) => u.clone(),
            None => {
                let bind: SocketAddr = if target.is_ipv4() {
                    "0.0.0.0:0"
                } else {
                    "[::]:0"
                }
                .parse()
                .map_err(std::io::Error::other)?;
                let u = Arc::new(UdpSocket::bind(bind).await?);
                upstreams.insert(client, u.clone());
                // Replies from the target go back to this client through the front socket.
                let (u2, front2, tx2, back, stats2) = (
                    u.clone(),
                    front.clone(),
                    tx.clone(),
                    backward.clone(),
                    stats.clone(),
                );
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 65_536];
                    let mut rng = rand::rngs::StdRng::seed_from_u64(client.port().into());
                    while let Ok((n, _)) = u2.recv_from(&mut buf).await {
                        let at = back
                            .lock()
                            .await
                            .admit(Instant::now(), n, rng.random::<f64>());
                        count(&stats2, at.is_some());
                        if let Some(at) = at {
                            let _ = tx2
                                .send(Pending {
                                    at,
                                    data: buf[..n].to_vec(),
                                    to: client,
                                    via: front2.clone(),
                                })
                                .await;
                        }
                    }
                });
                u
            }
        };
        let at = forward
            .lock()
            .await
            .admit(Instant::now(), n, rng.random::<f64>());
        count(&stats, at.is_some());
        if let Some(at) = at {
            let _ = tx
                .send(Pending {
                    at,
                    data: buf[..n].to_vec(),
                    to: target,
                    via: up,
                })
                .await;
        }
    }
}

fn count(stats: &EmuStats, sent: bool) {
    let c = if sent {
        &stats.forwarded
    } else {
        &stats.dropped
    };
    c.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
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

//! Authenticated links between nodes that carry framed streams.
//!
//! One [`Transport`] per node: a quinn endpoint (QUIC, mutual TLS, ALPN `strait/1`) and a
//! TLS-over-TCP listener on the same address. Every stream that crosses an IDC boundary is
//! QUIC (multiplexing without head-of-line blocking, congestion control in user space);
//! inside an IDC the configured [`LinkKind`] is used. Outgoing QUIC connections are pooled:
//! one per peer, reused by many concurrent streams, re-established when lost. A TLS-over-TCP
//! connection carries one stream at a time (TCP has no streams to multiplex); once a
//! stream has ended cleanly in both directions the connection carries the next one to
//! that peer (`reuse`), so a stream costs no handshake while a connection is idle.
//!
//! Peers are identified by the node name in their certificate, which must be a node of
//! the topology; anyone else is refused. Windows are sized from the bandwidth-delay
//! product of the links in the topology, UDP and TCP socket buffers raised with socket2.
//! This module moves frames; it does not interpret them (see `wire`, and the pipeline).

// Test seam: public with the `fault-injection` feature, inert (never set) without.
#[cfg(feature = "fault-injection")]
pub mod filter;
#[cfg(not(feature = "fault-injection"))]
#[allow(dead_code, unreachable_pub)]
mod filter;
pub mod framed;
mod reuse;
pub mod tls;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::{AsyncRead, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Mutex as AsyncMutex, mpsc};

use crate::topology::{LiveTopology, NodeId, Tier, Topology};
pub use framed::{ByteSink, EndMarks, FrameReader, FrameWriter, FramedError, IoSink};
use reuse::TlsTcp;
pub use reuse::{TcpSink, TcpSource};
pub use tls::{CertAuthority, PeerRole, TlsIdentity, certificate_request, write_pem};

/// How a hop is carried.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum LinkKind {
    /// QUIC (quinn + rustls). Always used across IDCs.
    Quic,
    /// TLS 1.3 over TCP (rustls); about half the CPU per byte of QUIC on loopback here.
    TcpTls,
    /// In-process, no network: a node writing to itself as the first pipeline target.
    #[serde(skip)]
    Local,
}

impl std::fmt::Display for LinkKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            LinkKind::Quic => "quic",
            LinkKind::TcpTls => "tcp-tls",
            LinkKind::Local => "local",
        })
    }
}

impl std::str::FromStr for LinkKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "quic" => Ok(LinkKind::Quic),
            "tcp-tls" | "tcp" => Ok(LinkKind::TcpTls),
            other => Err(format!("unknown link kind {other:?} (quic, tcp-tls)")),
        }
    }
}

/// Errors of links and streams. "The peer refused" and "we failed locally" are separate
/// variants; each names the peer where there is one.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TransportError {
    /// TLS material could not be loaded or used.
    #[error("tls: {0}")]
    Tls(String),
    /// A listening socket could not be set up.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// A node id that is not in the topology, or this node itself.
    #[error("node {0:?} is not a peer in the topology")]
    NotAPeer(NodeId),
    /// The peer's certificate does not identify a node of the topology.
    #[error("peer identity refused: {0}")]
    PeerIdentity(String),
    /// Connecting failed (refused, TLS handshake failed, wrong server name...).
    #[error("connect to {peer} ({addr}): {reason}")]
    Connect {
        /// The peer's name.
        peer: String,
        /// Its address.
        addr: SocketAddr,
        /// What went wrong.
        reason: String,
    },
    /// An operation did not finish in time.
    #[error("{what} with {peer} timed out after {after:?}")]
    Timeout {
        /// The peer's name.
        peer: String,
        /// What was being done.
        what: &'static str,
        /// The limit.
        after: Duration,
    },
    /// The connection to the peer was lost.
    #[error("connection to {peer} lost: {reason}")]
    ConnectionLost {
        /// The peer's name.
        peer: String,
        /// Why.
        reason: String,
    },
    /// This transport is shut down.
    #[error("transport is shut down")]
    Closed,
}

/// Tuning of a node's transport. Defaults suit loopback tests and a 10 Gbit/s IDC with
/// sub-millisecond RTT; DCI links are sized from the topology.
#[derive(Debug, Clone)]
pub struct TransportConfig {
    /// Link kind for hops inside an IDC.
    pub intra_idc: LinkKind,
    /// Limit for establishing a connection (handshake included).
    pub connect_timeout: Duration,
    /// Limit for opening a stream on an established connection.
    pub open_timeout: Duration,
    /// A connection with no traffic for this long is closed (keep-alives every third).
    pub idle_timeout: Duration,
    /// Socket send/receive buffer size requested from the kernel.
    pub socket_buffer: usize,
    /// Smallest per-stream receive window, whatever the BDP.
    pub min_stream_window: u64,
    /// Capacity of the queue of accepted streams waiting for the node.
    pub accept_queue: usize,
    /// Largest UDP payload QUIC path-MTU discovery may probe up to. Probing is safe on
    /// any path (it falls back to 1200); jumbo-frame DCI links (9000) cut QUIC's
    /// per-packet CPU by ~6x compared with 1500-byte frames.
    pub quic_max_mtu: u16,
    /// Handshakes with peers not yet authenticated, at most, per link kind: a connection
    /// beyond this is closed at once, so that unauthenticated connections cannot take the
    /// descriptors the store needs. Each handshake has `connect_timeout`.
    pub max_handshakes: usize,
}

impl Default for TransportConfig {
    fn default() -> Self {
        TransportConfig {
            intra_idc: LinkKind::TcpTls,
            connect_timeout: Duration::from_secs(5),
            open_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(30),
            socket_buffer: 8 << 20,
            min_stream_window: 8 << 20,
            accept_queue: 1024,
            quic_max_mtu: 8952,
            max_handshakes: 256,
        }
    }
}

/// The two halves of a framed stream, with the peer it goes to.
pub struct Stream {
    /// The peer.
    pub peer: NodeId,
    /// What the peer's certificate lets it do (for streams a peer opened; streams this
    /// node opens go to nodes it chose).
    pub role: PeerRole,
    /// How it is carried.
    pub kind: LinkKind,
    /// Frames from the peer.
    pub reader: FrameReader<Source>,
    /// Frames to the peer.
    pub writer: FrameWriter<Sink>,
}

impl std::fmt::Debug for Stream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stream")
            .field("peer", &self.peer)
            .field("kind", &self.kind)
            .finish()
    }
}

/// The receiving half of a link stream.
pub enum Source {
    /// A QUIC stream.
    Quic(quinn::RecvStream),
    /// A TLS-over-TCP connection, for this stream.
    Tcp(TcpSource),
    /// An in-process pipe.
    Local(tokio::io::ReadHalf<tokio::io::DuplexStream>),
}

impl EndMarks for Source {
    fn accepts_end_mark(&self) -> bool {
        matches!(self, Source::Tcp(_))
    }
    fn end_marked(&mut self, rest: &mut bytes::BytesMut) {
        if let Source::Tcp(s) = self {
            s.end_marked(rest);
        }
    }
    fn unread(&mut self, buf: &mut bytes::BytesMut) {
        if let Source::Tcp(s) = self {
            s.unread(buf);
        }
    }
}

impl AsyncRead for Source {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Source::Quic(s) => Pin::new(s).poll_read(cx, buf),
            Source::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Source::Local(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

/// The sending half of a link stream.
pub enum Sink {
    /// A QUIC stream (zero-copy payloads).
    Quic(quinn::SendStream),
    /// A TLS-over-TCP connection, for this stream.
    Tcp(TcpSink),
    /// An in-process pipe.
    Local(IoSink<tokio::io::WriteHalf<tokio::io::DuplexStream>>),
}

impl ByteSink for Sink {
    async fn send_bytes(&mut self, bytes: bytes::Bytes) -> std::io::Result<()> {
        match self {
            Sink::Quic(s) => s.send_bytes(bytes).await,
            Sink::Tcp(s) => s.send_bytes(bytes).await,
            Sink::Local(s) => s.send_bytes(bytes).await,
        }
    }
    async fn flush_bytes(&mut self) -> std::io::Result<()> {
        match self {
            Sink::Quic(s) => s.flush_bytes().await,
            Sink::Tcp(s) => s.flush_bytes().await,
            Sink::Local(s) => s.flush_bytes().await,
        }
    }
    async fn finish(&mut self) -> std::io::Result<()> {
        match self {
            Sink::Quic(s) => ByteSink::finish(s).await,
            Sink::Tcp(s) => s.finish().await,
            Sink::Local(s) => s.finish().await,
        }
    }
}

/// Byte counters of a transport, per distance tier and direction (framing included).
#[derive(Debug, Default)]
pub struct LinkCounters {
    /// Streams opened to peers, by tier.
    pub streams_opened: [std::sync::atomic::AtomicU64; 4],
    /// Connections established, by link kind (0 = QUIC, 1 = TCP).
    pub connections: [std::sync::atomic::AtomicU64; 2],
    /// TCP streams opened on an idle connection (no handshake).
    pub tcp_reused: std::sync::atomic::AtomicU64,
}

/// Idle TLS-over-TCP connections kept per peer, at most: enough for the streams a node
/// opens to one peer back to back; each idles for a third of the idle timeout.
const MAX_IDLE_TCP: usize = 16;

struct IdleTcp {
    conn: TlsTcp,
    since: std::time::Instant,
}

struct Inner {
    me: NodeId,
    topology: Arc<LiveTopology>,
    config: TransportConfig,
    endpoint: quinn::Endpoint,
    tls_client: Arc<rustls::ClientConfig>,
    /// What this node presents in handshakes (replaced on renewal).
    cert: Arc<tls::CertSlot>,
    /// The CA it was started with: a renewal must keep it.
    ca: rustls::pki_types::CertificateDer<'static>,
    /// One QUIC connection per peer, behind a per-peer lock so concurrent opens share it.
    pool: std::sync::Mutex<HashMap<NodeId, Arc<AsyncMutex<Option<quinn::Connection>>>>>,
    /// Idle TLS-over-TCP connections this node opened, per peer, newest last.
    tcp_idle: std::sync::Mutex<HashMap<NodeId, Vec<IdleTcp>>>,
    /// Set at shutdown: idle connections close, none is kept from then on.
    closing: tokio::sync::watch::Sender<bool>,
    counters: LinkCounters,
    tasks: std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>,
    /// Peers whose last attempts to reach failed: how many in a row, and when the last
    /// one did (cleared by a stream opened to or accepted from them).
    unreachable: std::sync::Mutex<HashMap<NodeId, (u32, std::time::Instant)>>,
    /// Test seam: the filter put on the frames of streams opened from now on.
    filter: std::sync::RwLock<Option<Arc<dyn filter::FrameFilter>>>,
}

/// A node's transport. Cheap to clone.
#[derive(Clone)]
pub struct Transport {
    inner: Arc<Inner>,
}

/// Streams opened to this node by peers, as they arrive.
pub struct Incoming {
    rx: mpsc::Receiver<Stream>,
}

impl Incoming {
    /// The next accepted stream; `None` once the transport is shut down.
    pub async fn accept(&mut self) -> Option<Stream> {
        self.rx.recv().await
    }
}

/// Bytes of TLS records rustls may hold before the socket takes them (per connection,
/// held only while the socket is full). Its default (64 KiB) is less than one 64 KiB
/// packet with its frame head, so every such packet went out in two `writev`s: with 256
/// KiB (what the frame sink holds back anyway) a 2+2 pipeline of 64 KiB blocks makes one
/// `writev` fewer per hop and block (measured with `perf trace -s`: 36 096 to 28 095 for
/// 2000 blocks in the bench's two pipelines).
const TLS_BUFFER_LIMIT: usize = 256 << 10;

/// Applies [`TLS_BUFFER_LIMIT`] to a new TLS connection (either side).
fn limit_tls_buffer<D>(conn: &mut rustls::ConnectionCommon<D>) {
    conn.set_buffer_limit(Some(TLS_BUFFER_LIMIT));
}

fn bdp_window(topology: &Topology, me: NodeId, peer: NodeId, config: &TransportConfig) -> u64 {
    let (a, b) = (topology.location(me).idc, topology.location(peer).idc);
    let bdp = if a == b {
        0
    } else {
        topology.link(a, b).map_or(0, |l| l.bdp_bytes())
    };
    (2 * bdp).max(config.min_stream_window)
}

fn quic_transport(stream_window: u64, config: &TransportConfig) -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    let sw = stream_window.min(u32::MAX as u64 / 2) as u32;
    t.stream_receive_window(quinn::VarInt::from_u32(sw));
    t.receive_window(quinn::VarInt::from_u32(sw.saturating_mul(2)));
    t.send_window(u64::from(sw) * 2);
    t.max_concurrent_bidi_streams(quinn::VarInt::from_u32(1024));
    t.max_concurrent_uni_streams(quinn::VarInt::from_u32(0));
    t.keep_alive_interval(Some(config.idle_timeout / 3));
    if let Ok(idle) = quinn::IdleTimeout::try_from(config.idle_timeout) {
        t.max_idle_timeout(Some(idle));
    }
    // Start at the link's bandwidth-delay product (half the stream window) instead of
    // ten packets: every DCI byte is already paced by the governor at this node's share,
    // so slow start from ten packets only delays each new connection (measured: the
    // first 256 MiB written 2+2 across a 10 ms RTT ran at 70 MB/s against 95 warm).
    let mut cubic = quinn::congestion::CubicConfig::default();
    cubic.initial_window((stream_window / 2).clamp(14_720, 4 << 20));
    t.congestion_controller_factory(Arc::new(cubic));
    let mut mtu = quinn::MtuDiscoveryConfig::default();
    mtu.upper_bound(config.quic_max_mtu.max(1200));
    t.mtu_discovery_config(Some(mtu));
    t
}

fn udp_socket(addr: SocketAddr, buffer: usize) -> std::io::Result<std::net::UdpSocket> {
    let s = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    // Best effort: the kernel caps these at net.core.{r,w}mem_max.
    let _ = s.set_recv_buffer_size(buffer);
    let _ = s.set_send_buffer_size(buffer);
    s.bind(&addr.into())?;
    Ok(s.into())
}

fn tcp_listener(addr: SocketAddr, buffer: usize) -> std::io::Result<TcpListener> {
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    s.set_reuse_address(true)?;
    let _ = s.set_recv_buffer_size(buffer);
    let _ = s.set_send_buffer_size(buffer);
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    s.listen(1024)?;
    TcpListener::from_std(s.into())
}

impl Transport {
    /// Starts the transport of node `me`: binds QUIC (UDP) and TLS-over-TCP on the node's
    /// address in the topology, and begins accepting peers.
    pub async fn bind(
        me: NodeId,
        topology: Arc<Topology>,
        identity: &TlsIdentity,
        config: TransportConfig,
    ) -> Result<(Transport, Incoming), TransportError> {
        if !topology.contains(me) {
            return Err(TransportError::NotAPeer(me));
        }
        let addr = topology.node(me).addr;
        let cert = Arc::new(tls::CertSlot::new(identity)?);
        let server_tls = Arc::new(identity.server_config_with(cert.clone())?);
        let client_tls = Arc::new(identity.client_config_with(cert.clone())?);

        // The server side serves every peer: size its windows for the widest link.
        let widest = topology
            .node_ids()
            .filter(|&p| p != me)
            .map(|p| bdp_window(&topology, me, p, &config))
            .max()
            .unwrap_or(config.min_stream_window);
        let quic_server_crypto =
            quinn::crypto::rustls::QuicServerConfig::try_from(server_tls.clone())
                .map_err(|e| TransportError::Tls(format!("QUIC server config: {e}")))?;
        let mut server = quinn::ServerConfig::with_crypto(Arc::new(quic_server_crypto));
        server.transport_config(Arc::new(quic_transport(widest, &config)));
        server.max_incoming(config.max_handshakes.max(1));

        let socket = udp_socket(addr, config.socket_buffer)
            .map_err(|source| TransportError::Bind { addr, source })?;
        log_offload(&socket, addr);
        let endpoint = quinn::Endpoint::new(
            quinn::EndpointConfig::default(),
            Some(server),
            socket,
            Arc::new(quinn::TokioRuntime),
        )
        .map_err(|source| TransportError::Bind { addr, source })?;
        let listener = tcp_listener(addr, config.socket_buffer)
            .map_err(|source| TransportError::Bind { addr, source })?;

        let (tx, rx) = mpsc::channel(config.accept_queue.max(1));
        let inner = Arc::new(Inner {
            me,
            topology: Arc::new(LiveTopology::new(topology)),
            config,
            endpoint: endpoint.clone(),
            tls_client: client_tls,
            cert,
            ca: identity.ca().clone(),
            pool: std::sync::Mutex::new(HashMap::new()),
            tcp_idle: std::sync::Mutex::new(HashMap::new()),
            closing: tokio::sync::watch::Sender::new(false),
            counters: LinkCounters::default(),
            tasks: std::sync::Mutex::new(Vec::new()),
            unreachable: std::sync::Mutex::new(HashMap::new()),
            filter: std::sync::RwLock::new(None),
        });
        let t = Transport { inner };
        let quic_task = tokio::spawn(accept_quic(t.clone(), tx.clone()));
        let tcp_task = tokio::spawn(accept_tcp(
            t.clone(),
            listener,
            Arc::new(tokio_rustls::TlsAcceptor::from(server_tls)),
            tx,
        ));
        t.inner
            .tasks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend([quic_task, tcp_task]);
        tracing::info!(node = %t.topology().node(me).name, %addr, intra_idc = %t.inner.config.intra_idc, "transport listening (quic + tcp-tls)");
        Ok((t, Incoming { rx }))
    }

    /// This node.
    pub fn me(&self) -> NodeId {
        self.inner.me
    }

    /// When the certificate this node presents expires.
    pub fn certificate_expiry(&self) -> Option<std::time::SystemTime> {
        self.inner.cert.expiry()
    }

    /// Presents `identity`'s certificate and key from the next handshake on (certificate
    /// renewal; connections already up keep theirs). Refused unless it is for this node
    /// and chains to the same CA (a new CA means a restart of every node), or when the
    /// key does not match the certificate.
    pub fn reload_identity(&self, identity: &TlsIdentity) -> Result<(), TransportError> {
        let topo = self.topology();
        let me = &topo.node(self.inner.me).name;
        let name = identity.name()?;
        if &name != me {
            return Err(TransportError::Tls(format!(
                "certificate is for {name:?}, this node is {me:?}"
            )));
        }
        if identity.ca() != &self.inner.ca {
            return Err(TransportError::Tls(
                "the CA certificate changed: restart with the new CA instead".into(),
            ));
        }
        // Signed by that CA and valid now: the check a peer will make.
        identity.verify_own()?;
        self.inner.cert.replace(identity)
    }

    /// Tests only: puts `filter` on every frame sent by streams this transport opens or
    /// accepts from now on (`None` removes it for new streams).
    #[cfg(feature = "fault-injection")]
    pub fn set_frame_filter(&self, filter: Option<Arc<dyn filter::FrameFilter>>) {
        *self.inner.filter.write().unwrap_or_else(|e| e.into_inner()) = filter;
    }

    /// The filter for a stream to `peer`, if a test set one.
    fn attach(&self, peer: NodeId) -> Option<filter::Attached> {
        let f = self.inner.filter.read().unwrap_or_else(|e| e.into_inner());
        f.as_ref().map(|filter| filter::Attached {
            filter: filter.clone(),
            hop: filter::Hop {
                from: self.inner.me,
                to: peer,
            },
        })
    }

    /// Two connected in-process streams (no network, no TLS) between this node and
    /// itself, each direction with `buffer` bytes.
    pub(crate) fn local_pair(&self, buffer: usize) -> (Stream, Stream) {
        let me = self.inner.me;
        let (a, b) = tokio::io::duplex(buffer);
        let half = |s: tokio::io::DuplexStream| {
            let (r, w) = tokio::io::split(s);
            Stream {
                peer: me,
                role: PeerRole::Node,
                kind: LinkKind::Local,
                reader: FrameReader::new(Source::Local(r)),
                writer: FrameWriter::new(Sink::Local(IoSink(w))).with_filter(self.attach(me)),
            }
        };
        (half(a), half(b))
    }

    /// The topology the transport serves now (a snapshot: see [`LiveTopology`]).
    pub fn topology(&self) -> Arc<Topology> {
        self.inner.topology.get()
    }

    /// The cell the node's services read the topology from.
    pub(crate) fn live_topology(&self) -> &Arc<LiveTopology> {
        &self.inner.topology
    }

    /// Serves `topology` from now on (made with [`Topology::revise`] of the one in
    /// force): streams to and from retired nodes are refused, connections to them and to
    /// nodes whose address changed are closed. Returns the topology it replaced.
    pub(crate) fn set_topology(&self, topology: Arc<Topology>) -> Arc<Topology> {
        let old = self.inner.topology.set(topology.clone());
        for (i, was) in old.nodes().iter().enumerate() {
            let id = was.location.node;
            debug_assert_eq!(id.index(), i);
            let now = topology.node(id);
            if !topology.contains(id) || now.addr != was.addr || now.dci_addr != was.dci_addr {
                self.forget_connection(id);
            }
        }
        old
    }

    /// The link kind a stream to `peer` uses: QUIC across IDCs, the configured kind within.
    pub fn link_kind(&self, peer: NodeId) -> LinkKind {
        if self.topology().tier(self.inner.me, peer) == Tier::Dci {
            LinkKind::Quic
        } else {
            self.inner.config.intra_idc
        }
    }

    /// Counters of streams and connections.
    pub fn counters(&self) -> &LinkCounters {
        &self.inner.counters
    }

    /// Number of QUIC connections the endpoint has open (both directions).
    pub fn open_quic_connections(&self) -> usize {
        self.inner.endpoint.open_connections()
    }

    /// Idle TLS-over-TCP connections this node keeps for its next streams (all peers).
    pub fn idle_tcp_connections(&self) -> usize {
        self.inner
            .tcp_idle
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .map(Vec::len)
            .sum()
    }

    /// Drops the pooled QUIC connection and the idle TCP connections to `peer` (closing
    /// them), so that the next stream starts a new one. For a caller that got no answer on a stream: a peer that
    /// restarted leaves the old connection looking alive until its idle timeout.
    pub fn forget_connection(&self, peer: NodeId) {
        self.inner
            .tcp_idle
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&peer);
        let slot = self
            .inner
            .pool
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&peer);
        if let Some(slot) = slot
            && let Ok(mut guard) = slot.try_lock()
            && let Some(c) = guard.take()
        {
            c.close(quinn::VarInt::from_u32(0), b"no answer");
        }
    }

    /// Opens a framed stream to `peer`, over the link kind the topology calls for.
    pub async fn open(&self, peer: NodeId) -> Result<Stream, TransportError> {
        self.open_via(peer, self.link_kind(peer)).await
    }

    /// Opens a framed stream to `peer` over a given link kind.
    pub async fn open_via(&self, peer: NodeId, kind: LinkKind) -> Result<Stream, TransportError> {
        let topo = self.topology();
        if !topo.contains(peer) || peer == self.inner.me {
            return Err(TransportError::NotAPeer(peer));
        }
        let tier = topo.tier(self.inner.me, peer) as usize;
        drop(topo);
        let opened = match kind {
            LinkKind::Quic => self.open_quic(peer).await,
            LinkKind::TcpTls => self.open_tcp(peer).await,
            LinkKind::Local => return Err(TransportError::NotAPeer(peer)),
        };
        self.note_reach(peer, opened.is_ok());
        let s = opened?;
        self.inner.counters.streams_opened[tier].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(s)
    }

    /// Notes whether the last attempt to reach `peer` worked (a stream opened to it, or
    /// one accepted from it).
    fn note_reach(&self, peer: NodeId, ok: bool) {
        let mut u = self
            .inner
            .unreachable
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if ok {
            u.remove(&peer);
        } else {
            let e = u.entry(peer).or_insert((0, std::time::Instant::now()));
            *e = (e.0.saturating_add(1), std::time::Instant::now());
        }
    }

    /// Peers this node failed to reach at least twice in a row, the last time within the
    /// last idle timeout, with no stream to or from them since: what placement should
    /// skip (`Node::node_states`). One failure is not enough (a timeout under load would
    /// take a healthy node out of placement); a failure older than the idle timeout no
    /// longer counts, so that a peer nobody dials is tried again.
    pub fn unreachable_peers(&self) -> Vec<NodeId> {
        let within = self.inner.config.idle_timeout;
        let mut u = self
            .inner
            .unreachable
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        u.retain(|_, (_, at)| at.elapsed() < within);
        let mut v: Vec<NodeId> = u
            .iter()
            .filter(|(_, (n, _))| *n >= 2)
            .map(|(&p, _)| p)
            .collect();
        v.sort();
        v
    }

    fn peer_name(&self, peer: NodeId) -> String {
        self.topology().node(peer).name.clone()
    }

    async fn connect_quic(&self, peer: NodeId) -> Result<quinn::Connection, TransportError> {
        let topo = self.topology();
        let node = topo.node(peer);
        // Across the DCI, a node may be reached through another address (an emulator or
        // gateway in front of it); TLS still checks the node's own name.
        let addr = match node.dci_addr {
            Some(a) if topo.tier(self.inner.me, peer) == Tier::Dci => a,
            _ => node.addr,
        };
        let crypto =
            quinn::crypto::rustls::QuicClientConfig::try_from(self.inner.tls_client.clone())
                .map_err(|e| TransportError::Tls(format!("QUIC client config: {e}")))?;
        let mut cfg = quinn::ClientConfig::new(Arc::new(crypto));
        cfg.transport_config(Arc::new(quic_transport(
            bdp_window(&topo, self.inner.me, peer, &self.inner.config),
            &self.inner.config,
        )));
        let connect_err = |reason: String| TransportError::Connect {
            peer: node.name.clone(),
            addr,
            reason,
        };
        let connecting = self
            .inner
            .endpoint
            .connect_with(cfg, addr, &node.name)
            .map_err(|e| connect_err(e.to_string()))?;
        let after = self.inner.config.connect_timeout;
        let conn = tokio::time::timeout(after, connecting)
            .await
            .map_err(|_| TransportError::Timeout {
                peer: node.name.clone(),
                what: "QUIC connect",
                after,
            })?
            .map_err(|e| connect_err(e.to_string()))?;
        self.inner.counters.connections[0].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        tracing::debug!(peer = %node.name, %addr, "QUIC connection established");
        Ok(conn)
    }

    async fn open_quic(&self, peer: NodeId) -> Result<Stream, TransportError> {
        let slot = {
            let mut pool = self.inner.pool.lock().unwrap_or_else(|e| e.into_inner());
            pool.entry(peer).or_default().clone()
        };
        let after = self.inner.config.open_timeout;
        // At most two attempts: the pooled connection, then a fresh one if it was dead.
        for attempt in 0..2 {
            let conn = {
                let mut guard = slot.lock().await;
                match guard.as_ref().filter(|c| c.close_reason().is_none()) {
                    Some(c) => c.clone(),
                    None => {
                        let c = self.connect_quic(peer).await?;
                        *guard = Some(c.clone());
                        c
                    }
                }
            };
            match tokio::time::timeout(after, conn.open_bi()).await {
                Err(_) => {
                    return Err(TransportError::Timeout {
                        peer: self.peer_name(peer),
                        what: "open stream",
                        after,
                    });
                }
                Ok(Ok((send, recv))) => {
                    return Ok(Stream {
                        peer,
                        role: PeerRole::Node,
                        kind: LinkKind::Quic,
                        reader: FrameReader::new(Source::Quic(recv)),
                        writer: FrameWriter::new(Sink::Quic(send)).with_filter(self.attach(peer)),
                    });
                }
                Ok(Err(e)) if attempt == 0 => {
                    tracing::debug!(peer = %self.peer_name(peer), error = %e, "pooled connection lost, reconnecting");
                    *slot.lock().await = None;
                }
                Ok(Err(e)) => {
                    return Err(TransportError::ConnectionLost {
                        peer: self.peer_name(peer),
                        reason: e.to_string(),
                    });
                }
            }
        }
        Err(TransportError::ConnectionLost {
            peer: self.peer_name(peer),
            reason: "reconnect failed".into(),
        })
    }

    async fn open_tcp(&self, peer: NodeId) -> Result<Stream, TransportError> {
        let conn = match self.take_idle_tcp(peer) {
            Some(c) => {
                self.inner
                    .counters
                    .tcp_reused
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                c
            }
            None => self.connect_tcp(peer).await?,
        };
        let weak = Arc::downgrade(&self.inner);
        let (source, sink) = reuse::split(conn, false, move |whole| {
            if let Some(inner) = weak.upgrade() {
                spawn_detached(Transport { inner }.keep_idle_tcp(peer, whole));
            }
        });
        Ok(Stream {
            peer,
            role: PeerRole::Node,
            kind: LinkKind::TcpTls,
            reader: FrameReader::new(Source::Tcp(source)),
            writer: FrameWriter::new(Sink::Tcp(sink)).with_filter(self.attach(peer)),
        })
    }

    async fn connect_tcp(&self, peer: NodeId) -> Result<TlsTcp, TransportError> {
        let topo = self.topology();
        let node = topo.node(peer);
        let after = self.inner.config.connect_timeout;
        let connect_err = |reason: String| TransportError::Connect {
            peer: node.name.clone(),
            addr: node.addr,
            reason,
        };
        let connector = tokio_rustls::TlsConnector::from(self.inner.tls_client.clone());
        let server_name = rustls::pki_types::ServerName::try_from(node.name.clone())
            .map_err(|e| connect_err(e.to_string()))?;
        let fut = async {
            let tcp = TcpStream::connect(node.addr)
                .await
                .map_err(|e| connect_err(e.to_string()))?;
            tune_tcp(&tcp, &self.inner.config);
            connector
                .connect(server_name, reuse::buffered(tcp))
                .await
                .map_err(|e| connect_err(e.to_string()))
        };
        let mut tls =
            tokio::time::timeout(after, fut)
                .await
                .map_err(|_| TransportError::Timeout {
                    peer: node.name.clone(),
                    what: "TCP+TLS connect",
                    after,
                })??;
        self.inner.counters.connections[1].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        limit_tls_buffer(tls.get_mut().1);
        Ok(tokio_rustls::TlsStream::Client(tls))
    }

    /// The newest idle connection to `peer` that is young enough and still looks open;
    /// older or closed ones are dropped on the way.
    fn take_idle_tcp(&self, peer: NodeId) -> Option<TlsTcp> {
        let keep = self.inner.config.idle_timeout / 3;
        let mut idle = self
            .inner
            .tcp_idle
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let list = idle.get_mut(&peer)?;
        while let Some(c) = list.pop() {
            if c.since.elapsed() < keep && reuse::looks_open(&c.conn) {
                return Some(c.conn);
            }
        }
        None
    }

    /// The opener's end of a stream that ended cleanly: once the acceptor says it keeps the
    /// connection, keep it idle for the next stream to `peer`.
    async fn keep_idle_tcp(self, peer: NodeId, whole: reuse::Whole) {
        let within = self.inner.config.open_timeout;
        let Some((mut conn, rest)) = reuse::finish_reading(whole, within).await else {
            tracing::trace!(peer = %self.peer_name(peer), "TCP connection closed: no end mark from the peer");
            return;
        };
        if !reuse::await_ready(&mut conn, rest, within).await || *self.inner.closing.borrow() {
            tracing::trace!(peer = %self.peer_name(peer), "TCP connection closed: the peer does not keep it");
            return;
        }
        let mut idle = self
            .inner
            .tcp_idle
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let list = idle.entry(peer).or_default();
        if list.len() < MAX_IDLE_TCP {
            list.push(IdleTcp {
                conn,
                since: std::time::Instant::now(),
            });
        }
    }

    /// A TLS-over-TCP connection accepted from `peer` as the halves of a stream; each time a
    /// stream ends cleanly the connection waits for the peer's next one.
    fn accepted_tcp(
        &self,
        conn: TlsTcp,
        rest: bytes::BytesMut,
        peer: NodeId,
        role: PeerRole,
        tx: mpsc::Sender<Stream>,
    ) -> Stream {
        let weak = Arc::downgrade(&self.inner);
        let next_tx = tx;
        let (source, sink) = reuse::split(conn, true, move |whole| {
            if let Some(inner) = weak.upgrade() {
                spawn_detached(Transport { inner }.await_next_tcp(whole, peer, role, next_tx));
            }
        });
        Stream {
            peer,
            role,
            kind: LinkKind::TcpTls,
            reader: FrameReader::with_buffer(Source::Tcp(source), rest),
            writer: FrameWriter::new(Sink::Tcp(sink)).with_filter(self.attach(peer)),
        }
    }

    /// The acceptor's end of a stream that ended cleanly: waits (up to the idle timeout,
    /// or until shutdown) for the peer's next stream on the connection.
    async fn await_next_tcp(
        self,
        whole: reuse::Whole,
        peer: NodeId,
        role: PeerRole,
        tx: mpsc::Sender<Stream>,
    ) {
        let mut closing = self.inner.closing.subscribe();
        let (within, idle) = (
            self.inner.config.open_timeout,
            self.inner.config.idle_timeout,
        );
        let next = async {
            let ready_sent = whole.ready_sent;
            let (conn, rest) = reuse::finish_reading(whole, within).await?;
            reuse::await_next(conn, rest, idle, ready_sent).await
        };
        let next = tokio::select! {
            n = next => n,
            _ = closing.wait_for(|c| *c) => None,
        };
        if let Some((conn, rest)) = next {
            if !self.topology().contains(peer) {
                tracing::warn!(peer = %self.peer_name(peer), "closing the connection of a node removed from the topology");
                return;
            }
            let s = self.accepted_tcp(conn, rest, peer, role, tx.clone());
            let _ = tx.send(s).await;
        }
    }

    /// Identifies a peer from its verified certificate chain.
    fn identify(
        &self,
        certs: Option<&[rustls::pki_types::CertificateDer<'_>]>,
    ) -> Result<(NodeId, PeerRole), TransportError> {
        let cert = certs
            .and_then(|c| c.first())
            .ok_or_else(|| TransportError::PeerIdentity("no client certificate".into()))?;
        let name = tls::peer_name(cert)?;
        let role = tls::peer_role(cert);
        let id = self.topology().node_by_name(&name).ok_or_else(|| {
            TransportError::PeerIdentity(format!(
                "certificate names {name:?}, which is not a node of the topology"
            ))
        })?;
        if id == self.inner.me {
            return Err(TransportError::PeerIdentity(format!(
                "peer claims to be this node ({name})"
            )));
        }
        Ok((id, role))
    }

    /// Stops accepting, closes every connection and releases the sockets (within the
    /// connect timeout). Streams in flight fail.
    pub async fn shutdown(&self) {
        // Refuse new handshakes first: peers that keep dialling (probes, retries) must not
        // leave connections queued that keep the socket open after the node is gone.
        self.inner.endpoint.set_server_config(None);
        self.inner.closing.send_replace(true);
        self.inner
            .tcp_idle
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
        self.inner
            .endpoint
            .close(quinn::VarInt::from_u32(0), b"shutdown");
        let tasks: Vec<_> = self
            .inner
            .tasks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
            .collect();
        for t in tasks {
            t.abort();
            let _ = t.await;
        }
        self.inner
            .pool
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
        let _ = tokio::time::timeout(
            self.inner.config.connect_timeout,
            self.inner.endpoint.wait_idle(),
        )
        .await;
    }
}

/// Spawns `f` on the current runtime, if there is one (a stream's halves may be dropped
/// while a runtime shuts down; the connection then just closes).
fn spawn_detached(f: impl std::future::Future<Output = ()> + Send + 'static) {
    if let Ok(h) = tokio::runtime::Handle::try_current() {
        h.spawn(f);
    }
}

fn tune_tcp(tcp: &TcpStream, config: &TransportConfig) {
    let _ = tcp.set_nodelay(true);
    let s = socket2::SockRef::from(tcp);
    let _ = s.set_recv_buffer_size(config.socket_buffer);
    let _ = s.set_send_buffer_size(config.socket_buffer);
    // A peer that loses power sends no FIN: keepalives end the connection within about
    // the idle timeout, as QUIC's own idle timeout does on its links.
    let idle = config.idle_timeout;
    let keepalive = socket2::TcpKeepalive::new()
        .with_time((idle / 3).max(Duration::from_secs(1)))
        .with_interval((idle / 9).max(Duration::from_secs(1)))
        .with_retries(3);
    let _ = s.set_tcp_keepalive(&keepalive);
}

fn log_offload(socket: &std::net::UdpSocket, addr: SocketAddr) {
    match quinn::udp::UdpSocketState::new(socket.into()) {
        Ok(state) => {
            tracing::info!(%addr, gso_segments = state.max_gso_segments(), gro_segments = state.gro_segments(), "UDP segmentation offload")
        }
        Err(e) => tracing::warn!(%addr, error = %e, "cannot query UDP offload"),
    }
}

async fn accept_quic(t: Transport, tx: mpsc::Sender<Stream>) {
    let handshakes = Arc::new(tokio::sync::Semaphore::new(
        t.inner.config.max_handshakes.max(1),
    ));
    while let Some(incoming) = t.inner.endpoint.accept().await {
        let Ok(permit) = handshakes.clone().try_acquire_owned() else {
            tracing::warn!(remote = %incoming.remote_address(), "too many QUIC handshakes, refusing");
            incoming.refuse();
            continue;
        };
        let (t, tx) = (t.clone(), tx.clone());
        tokio::spawn(async move {
            let after = t.inner.config.connect_timeout;
            let conn = match tokio::time::timeout(after, incoming).await {
                Ok(Ok(c)) => c,
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "QUIC handshake from a peer failed");
                    return;
                }
                Err(_) => {
                    tracing::warn!("QUIC handshake from a peer timed out");
                    return;
                }
            };
            drop(permit);
            let certs = conn.peer_identity().and_then(|id| {
                id.downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
                    .ok()
            });
            let (peer, role) = match t.identify(certs.as_deref().map(Vec::as_slice)) {
                Ok(p) => p,
                Err(e) => {
                    tracing::warn!(remote = %conn.remote_address(), error = %e, "refusing QUIC peer");
                    conn.close(quinn::VarInt::from_u32(1), b"unknown peer");
                    return;
                }
            };
            while let Ok((send, recv)) = conn.accept_bi().await {
                if !t.topology().contains(peer) {
                    tracing::warn!(peer = %t.peer_name(peer), "closing the connection of a node removed from the topology");
                    conn.close(quinn::VarInt::from_u32(1), b"removed from the topology");
                    return;
                }
                t.note_reach(peer, true);
                let s = Stream {
                    peer,
                    role,
                    kind: LinkKind::Quic,
                    reader: FrameReader::new(Source::Quic(recv)),
                    writer: FrameWriter::new(Sink::Quic(send)).with_filter(t.attach(peer)),
                };
                if tx.send(s).await.is_err() {
                    return;
                }
            }
        });
    }
}

async fn accept_tcp(
    t: Transport,
    listener: TcpListener,
    acceptor: Arc<tokio_rustls::TlsAcceptor>,
    tx: mpsc::Sender<Stream>,
) {
    let handshakes = Arc::new(tokio::sync::Semaphore::new(
        t.inner.config.max_handshakes.max(1),
    ));
    let mut refused = 0u64;
    loop {
        let (tcp, remote) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(error = %e, "TCP accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = handshakes.clone().try_acquire_owned() else {
            // Unauthenticated connections may not hold more descriptors than this.
            refused += 1;
            if refused.is_power_of_two() {
                tracing::warn!(%remote, refused, "too many TLS handshakes, closing new connections");
            }
            drop(tcp);
            continue;
        };
        tune_tcp(&tcp, &t.inner.config);
        let (t, tx, acceptor) = (t.clone(), tx.clone(), acceptor.clone());
        tokio::spawn(async move {
            let after = t.inner.config.connect_timeout;
            let mut tls =
                match tokio::time::timeout(after, acceptor.accept(reuse::buffered(tcp))).await {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => {
                        tracing::warn!(%remote, error = %e, "TLS handshake from a peer failed");
                        return;
                    }
                    Err(_) => {
                        tracing::warn!(%remote, "TLS handshake from a peer timed out");
                        return;
                    }
                };
            drop(permit);
            let (peer, role) = match t.identify(tls.get_ref().1.peer_certificates()) {
                Ok(p) => p,
                Err(e) => {
                    tracing::warn!(%remote, error = %e, "refusing TCP peer");
                    return;
                }
            };
            t.note_reach(peer, true);
            limit_tls_buffer(tls.get_mut().1);
            let s = t.accepted_tcp(
                tokio_rustls::TlsStream::Server(tls),
                bytes::BytesMut::new(),
                peer,
                role,
                tx.clone(),
            );
            let _ = tx.send(s).await;
        });
    }
}

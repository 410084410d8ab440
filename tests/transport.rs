//! Transport over real sockets on 127.1.x.y: mutual TLS over QUIC and TCP, the three bad
//! peers, pooling and reconnects, malformed frames, unreachable peers.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use strait::block::{BlockId, GenStamp};
use strait::topology::{NodeId, Topology};
use strait::transport::{
    ByteSink, CertAuthority, FramedError, Incoming, LinkKind, PeerRole, TlsIdentity, Transport,
    TransportConfig, TransportError,
};
use strait::wire::{Ack, Frame, Packet, PacketFlags, ReadBlock, Status, TrafficClass};
use tokio::sync::mpsc;

static NET: AtomicU8 = AtomicU8::new(1);

/// A two-IDC topology on a fresh 127.1.N.0/24: a1, a2 in idc-a; b1, b2 in idc-b; and
/// "gone", where nothing listens.
fn topology() -> Arc<Topology> {
    let n = NET.fetch_add(1, Ordering::Relaxed);
    let addr = |host: u8| -> SocketAddr { format!("127.1.{n}.{host}:7300").parse().unwrap() };
    Arc::new(
        Topology::builder()
            .idc("idc-a")
            .idc("idc-b")
            .node("a1", "idc-a", "r1", addr(1), 1 << 40)
            .node("a2", "idc-a", "r2", addr(2), 1 << 40)
            .node("b1", "idc-b", "r1", addr(11), 1 << 40)
            .node("b2", "idc-b", "r1", addr(12), 1 << 40)
            .node("gone", "idc-b", "r2", addr(99), 1 << 40)
            .link("idc-a", "idc-b", 125_000_000, Duration::from_millis(2))
            .build()
            .unwrap(),
    )
}

fn config() -> TransportConfig {
    TransportConfig {
        connect_timeout: Duration::from_secs(2),
        open_timeout: Duration::from_secs(2),
        ..TransportConfig::default()
    }
}

async fn start(t: &Arc<Topology>, ca: &CertAuthority, name: &str) -> (Transport, Incoming) {
    let id = t.node_by_name(name).unwrap();
    Transport::bind(id, t.clone(), &ca.identity(name).unwrap(), config())
        .await
        .unwrap()
}

/// Echoes every frame back; reports stream errors.
fn echo(mut incoming: Incoming) -> mpsc::UnboundedReceiver<(NodeId, LinkKind, FramedError)> {
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(mut s) = incoming.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                loop {
                    match s.reader.recv().await {
                        Ok(Some(f)) => {
                            if s.writer.send(&f).await.is_err() {
                                return;
                            }
                        }
                        Ok(None) => {
                            let _ = s.writer.finish().await;
                            return;
                        }
                        Err(e) => {
                            let _ = tx.send((s.peer, s.kind, e));
                            return;
                        }
                    }
                }
            });
        }
    });
    rx
}

/// a1, and a peer `name` that echoes every stream it accepts.
struct EchoPeer {
    topo: Arc<Topology>,
    ca: CertAuthority,
    a1: Transport,
    peer: Transport,
    id: NodeId,
}

async fn a1_and_echo(name: &str) -> EchoPeer {
    let topo = topology();
    let ca = CertAuthority::generate("test CA").unwrap();
    let (a1, _) = start(&topo, &ca, "a1").await;
    let (peer, incoming) = start(&topo, &ca, name).await;
    echo(incoming);
    let id = topo.node_by_name(name).unwrap();
    EchoPeer {
        topo,
        ca,
        a1,
        peer,
        id,
    }
}

fn sample_frames() -> Vec<Frame> {
    vec![
        Frame::Ack(Ack {
            seq: 1,
            statuses: vec![Status::Success, Status::Success],
        }),
        Frame::Packet(Packet {
            seq: 2,
            offset: 0,
            flags: PacketFlags {
                last: true,
                ..Default::default()
            },
            data_len: 65536,
            crcs: vec![1; 16],
            payload: Bytes::from(vec![9u8; 65536]),
        }),
        Frame::ReadBlock(ReadBlock {
            block: BlockId(3),
            genstamp: GenStamp(4),
            offset: 0,
            len: 10,
            class: TrafficClass::Read,
            compression: strait::wire::Compression::None,
        }),
    ]
}

async fn exchange(t: &Transport, peer: NodeId) -> Result<LinkKind, String> {
    let mut s = t.open(peer).await.map_err(|e| e.to_string())?;
    for f in sample_frames() {
        s.writer.send(&f).await.map_err(|e| e.to_string())?;
        let back = s.reader.recv().await.map_err(|e| e.to_string())?;
        if back.as_ref() != Some(&f) {
            return Err(format!("echo mismatch: {back:?}"));
        }
    }
    Ok(s.kind)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quic_across_idcs_tcp_inside() {
    let topo = topology();
    let ca = CertAuthority::generate("test CA").unwrap();
    let (a1, _) = start(&topo, &ca, "a1").await;
    let (_a2, a2_in) = start(&topo, &ca, "a2").await;
    let (_b1, b1_in) = start(&topo, &ca, "b1").await;
    echo(a2_in);
    echo(b1_in);
    let id = |n| topo.node_by_name(n).unwrap();
    assert_eq!(exchange(&a1, id("b1")).await.unwrap(), LinkKind::Quic);
    assert_eq!(exchange(&a1, id("a2")).await.unwrap(), LinkKind::TcpTls);
    // Inside an IDC, QUIC can be asked for explicitly.
    let mut s = a1.open_via(id("a2"), LinkKind::Quic).await.unwrap();
    s.writer.send(&sample_frames()[0]).await.unwrap();
    assert_eq!(
        s.reader.recv().await.unwrap().as_ref(),
        Some(&sample_frames()[0])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_sees_the_peer_identity() {
    let topo = topology();
    let ca = CertAuthority::generate("test CA").unwrap();
    let (a1, _) = start(&topo, &ca, "a1").await;
    let (_b1, mut b1_in) = start(&topo, &ca, "b1").await;
    let b1 = topo.node_by_name("b1").unwrap();
    let client = tokio::spawn(async move {
        let mut s = a1.open(b1).await.unwrap();
        s.writer.send(&sample_frames()[0]).await.unwrap();
        s.reader.recv().await.unwrap();
    });
    let mut s = b1_in.accept().await.unwrap();
    assert_eq!(s.peer, topo.node_by_name("a1").unwrap());
    assert_eq!(s.kind, LinkKind::Quic);
    let f = s.reader.recv().await.unwrap().unwrap();
    s.writer.send(&f).await.unwrap();
    client.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_streams_share_one_connection() {
    let EchoPeer {
        a1,
        peer: _b1,
        id: b1,
        ..
    } = a1_and_echo("b1").await;
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let a1 = a1.clone();
        tasks.push(tokio::spawn(async move { exchange(&a1, b1).await }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap().unwrap(), LinkKind::Quic);
    }
    assert_eq!(
        a1.counters().connections[0].load(Ordering::Relaxed),
        1,
        "one QUIC connection for 20 streams"
    );
}

/// Shuts `t` (node `name`) down and binds it again. quinn releases the UDP socket from
/// its own driver task once the last handle is gone, so the address frees up shortly
/// after shutdown: wait for it, bounded.
async fn restart(
    t: Transport,
    topo: &Arc<Topology>,
    ca: &CertAuthority,
    name: &str,
) -> (Transport, Incoming) {
    t.shutdown().await;
    drop(t);
    let id = topo.node_by_name(name).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match Transport::bind(id, topo.clone(), &ca.identity(name).unwrap(), config()).await {
            Ok(x) => return x,
            Err(TransportError::Bind { .. }) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(10)).await
            }
            Err(e) => panic!("rebind: {e}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnects_after_peer_restart() {
    let EchoPeer {
        topo,
        ca,
        a1,
        peer: b1t,
        id: b1,
    } = a1_and_echo("b1").await;
    exchange(&a1, b1).await.unwrap();
    let (_b1t, b1_in) = restart(b1t, &topo, &ca, "b1").await;
    echo(b1_in);
    // The pooled connection is dead; at most one exchange may fail while the pool finds
    // out, then a fresh connection is made.
    let first = exchange(&a1, b1).await;
    if first.is_err() {
        exchange(&a1, b1).await.expect("reconnected");
    }
    assert!(a1.counters().connections[0].load(Ordering::Relaxed) >= 2);
}

/// Opens a stream over `kind` and exchanges one frame; the refused peers must fail here.
async fn talk_via(t: &Transport, peer: NodeId, kind: LinkKind) -> Result<(), String> {
    let mut s = t.open_via(peer, kind).await.map_err(|e| e.to_string())?;
    s.writer
        .send(&sample_frames()[0])
        .await
        .map_err(|e| e.to_string())?;
    match tokio::time::timeout(Duration::from_secs(5), s.reader.recv()).await {
        Err(_) => Err("no answer".into()),
        Ok(Ok(Some(_))) => Ok(()),
        Ok(Ok(None)) => Err("stream closed".into()),
        Ok(Err(e)) => Err(e.to_string()),
    }
}

async fn try_talk(t: &Transport, peer: NodeId) -> Result<(), String> {
    talk_via(t, peer, t.link_kind(peer)).await
}

async fn try_talk_tcp(t: &Transport, peer: NodeId) -> Result<(), String> {
    talk_via(t, peer, LinkKind::TcpTls).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_without_certificate_is_refused() {
    let topo = topology();
    let ca = CertAuthority::generate("test CA").unwrap();
    let (_b1, b1_in) = start(&topo, &ca, "b1").await;
    let mut errors = echo(b1_in);
    // A client that trusts the CA but presents no certificate of its own.
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls::pki_types::CertificateDer::from_pem_slice(ca.cert_pem().as_bytes()).unwrap())
        .unwrap();
    let mut tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    tls.alpn_protocols = vec![b"strait/1".to_vec()];
    let quic_tls = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
    let ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = topo.node(topo.node_by_name("b1").unwrap()).addr;
    let result: Result<(), String> = async {
        let conn = ep
            .connect_with(quinn::ClientConfig::new(Arc::new(quic_tls)), addr, "b1")
            .map_err(|e| e.to_string())?
            .await
            .map_err(|e| e.to_string())?;
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
        send.write_all(b"hello").await.map_err(|e| e.to_string())?;
        let mut buf = [0u8; 1];
        recv.read_exact(&mut buf).await.map_err(|e| e.to_string())?;
        Ok(())
    }
    .await;
    assert!(result.is_err(), "a peer without certificate got through");
    assert!(
        errors.try_recv().is_err(),
        "no stream was ever handed to the node"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_from_another_ca_is_refused() {
    let topo = topology();
    let ca = CertAuthority::generate("test CA").unwrap();
    let rogue = CertAuthority::generate("rogue CA").unwrap();
    let (_b1, b1_in) = start(&topo, &ca, "b1").await;
    echo(b1_in);
    // a1 with a certificate from the wrong CA (it also distrusts b1 as a consequence).
    let a1 = topo.node_by_name("a1").unwrap();
    let (t, _) = Transport::bind(a1, topo.clone(), &rogue.identity("a1").unwrap(), config())
        .await
        .unwrap();
    let b1 = topo.node_by_name("b1").unwrap();
    assert!(try_talk(&t, b1).await.is_err());
    // Trusting the right CA but holding a rogue certificate: still refused by the server.
    let cert = rogue.issue("a2").unwrap();
    let mixed = TlsIdentity::from_pem(
        ca.cert_pem().as_bytes(),
        cert.cert_pem.as_bytes(),
        cert.key_pem.as_bytes(),
    )
    .unwrap();
    let a2 = topo.node_by_name("a2").unwrap();
    let (t2, _) = Transport::bind(a2, topo.clone(), &mixed, config())
        .await
        .unwrap();
    assert!(try_talk(&t2, b1).await.is_err(), "refused over QUIC");
    assert!(try_talk_tcp(&t2, b1).await.is_err(), "refused over TCP too");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_with_the_wrong_name_is_refused() {
    let topo = topology();
    let ca = CertAuthority::generate("test CA").unwrap();
    let (a1, _) = start(&topo, &ca, "a1").await;
    // Something listens at b1's address with b2's (valid) certificate.
    let b1 = topo.node_by_name("b1").unwrap();
    let (_imp, imp_in) = Transport::bind(b1, topo.clone(), &ca.identity("b2").unwrap(), config())
        .await
        .unwrap();
    echo(imp_in);
    let e = try_talk(&a1, b1).await.unwrap_err();
    assert!(
        e.contains("b1") || e.contains("certificate") || e.contains("name"),
        "{e}"
    );
    assert!(try_talk_tcp(&a1, b1).await.is_err(), "refused over TCP too");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_unknown_to_the_topology_is_refused() {
    let topo = topology();
    let ca = CertAuthority::generate("test CA").unwrap();
    let (_b1, b1_in) = start(&topo, &ca, "b1").await;
    let mut errors = echo(b1_in);
    // A valid certificate from the cluster CA, for a name the topology does not have.
    let a2 = topo.node_by_name("a2").unwrap();
    let (t, _) = Transport::bind(
        a2,
        topo.clone(),
        &ca.identity("intruder").unwrap(),
        config(),
    )
    .await
    .unwrap();
    let b1 = topo.node_by_name("b1").unwrap();
    assert!(try_talk(&t, b1).await.is_err());
    assert!(try_talk_tcp(&t, b1).await.is_err());
    assert!(errors.try_recv().is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_frame_ends_only_its_stream() {
    let topo = topology();
    let ca = CertAuthority::generate("test CA").unwrap();
    let (a1, _) = start(&topo, &ca, "a1").await;
    let (_b1, b1_in) = start(&topo, &ca, "b1").await;
    let mut errors = echo(b1_in);
    let b1 = topo.node_by_name("b1").unwrap();
    let mut good = a1.open(b1).await.unwrap();
    good.writer.send(&sample_frames()[0]).await.unwrap();
    assert!(good.reader.recv().await.unwrap().is_some());
    for garbage in [
        &[0xff, 0xff, 0xff, 0x7f][..],
        &[6, 0, 0, 0, 1, 200, 0, 0, 0, 0][..],
    ] {
        let mut bad = a1.open(b1).await.unwrap();
        bad.writer
            .get_mut()
            .expect("open stream")
            .send_bytes(Bytes::copy_from_slice(garbage))
            .await
            .unwrap();
        let (_, kind, err) = errors.recv().await.unwrap();
        assert_eq!(kind, LinkKind::Quic);
        assert!(matches!(err, FramedError::Malformed(_)), "{err}");
    }
    // The connection and the other stream still work.
    good.writer.send(&sample_frames()[1]).await.unwrap();
    assert_eq!(
        good.reader.recv().await.unwrap().as_ref(),
        Some(&sample_frames()[1])
    );
    exchange(&a1, b1).await.unwrap();
    assert_eq!(a1.counters().connections[0].load(Ordering::Relaxed), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_peer_fails_in_bounded_time() {
    let topo = topology();
    let ca = CertAuthority::generate("test CA").unwrap();
    let (a1, _) = start(&topo, &ca, "a1").await;
    let gone = topo.node_by_name("gone").unwrap();
    let t0 = Instant::now();
    let e = a1.open(gone).await.unwrap_err();
    assert!(
        matches!(
            e,
            TransportError::Timeout { .. } | TransportError::Connect { .. }
        ),
        "{e}"
    );
    let e = a1.open_via(gone, LinkKind::TcpTls).await.unwrap_err();
    assert!(
        matches!(
            e,
            TransportError::Timeout { .. } | TransportError::Connect { .. }
        ),
        "{e}"
    );
    assert!(
        t0.elapsed() < Duration::from_secs(6),
        "took {:?}",
        t0.elapsed()
    );
    let e = a1.open(topo.node_by_name("a1").unwrap()).await.unwrap_err();
    assert!(matches!(e, TransportError::NotAPeer(_)), "{e}");
}

#[tokio::test]
async fn identity_files_round_trip_and_bad_files_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let ca = CertAuthority::generate("test CA").unwrap();
    // An a1.key left world-readable by someone: writing it again makes it 0600.
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(dir.path().join("a1.key"), "old").unwrap();
    std::fs::set_permissions(
        dir.path().join("a1.key"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    let files = ca.write_files(dir.path(), ["a1", "b1"]).unwrap();
    assert_eq!(
        files.len(),
        5,
        "ca.pem and two identities; no CA key among them"
    );
    assert!(
        !dir.path().join("ca.key").exists(),
        "the CA key stays out of node directories"
    );
    let key_dir = tempfile::tempdir().unwrap();
    let ca_key = ca.write_ca_key(&key_dir.path().join("ca.key")).unwrap();
    let mode = std::fs::metadata(&ca_key).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    TlsIdentity::from_pem_files(
        &dir.path().join("ca.pem"),
        &dir.path().join("a1.pem"),
        &dir.path().join("a1.key"),
    )
    .unwrap();
    let e = TlsIdentity::from_pem_files(
        &dir.path().join("ca.pem"),
        &dir.path().join("nope.pem"),
        &dir.path().join("a1.key"),
    )
    .unwrap_err();
    assert!(e.to_string().contains("nope.pem"), "{e}");
    std::fs::write(dir.path().join("junk.pem"), "not a pem").unwrap();
    assert!(
        TlsIdentity::from_pem_files(
            &dir.path().join("junk.pem"),
            &dir.path().join("a1.pem"),
            &dir.path().join("a1.key")
        )
        .is_err()
    );
    let mode = std::fs::metadata(dir.path().join("a1.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    // A key others can read is refused at load, with the file and its mode named.
    std::fs::set_permissions(
        dir.path().join("b1.key"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    let e = TlsIdentity::from_pem_files(
        &dir.path().join("ca.pem"),
        &dir.path().join("b1.pem"),
        &dir.path().join("b1.key"),
    )
    .unwrap_err();
    assert!(
        e.to_string().contains("b1.key") && e.to_string().contains("644"),
        "{e}"
    );
}

use rustls::pki_types::pem::PemObject;

/// One request/response stream that ends cleanly both ways: sends `frames`, ends the
/// stream, reads every echo and the peer's end.
async fn clean_exchange(t: &Transport, peer: NodeId, frames: &[Frame]) -> Result<(), String> {
    let mut s = t.open(peer).await.map_err(|e| e.to_string())?;
    for f in frames {
        s.writer.send(f).await.map_err(|e| e.to_string())?;
    }
    s.writer.finish().await.map_err(|e| e.to_string())?;
    for f in frames {
        let back = s.reader.recv().await.map_err(|e| e.to_string())?;
        if back.as_ref() != Some(f) {
            return Err(format!("echo mismatch: {back:?}"));
        }
    }
    match s.reader.recv().await {
        Ok(None) => Ok(()),
        other => Err(format!("expected the end of the stream, got {other:?}")),
    }
}

/// Waits (bounded) until `t` keeps `n` idle TCP connections.
async fn idle_tcp(t: &Transport, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while t.idle_tcp_connections() != n {
        assert!(Instant::now() < deadline, "never {n} idle TCP connections");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sequential_tcp_streams_reuse_one_connection() {
    let topo = topology();
    let ca = CertAuthority::generate("test CA").unwrap();
    let (a1, _) = start(&topo, &ca, "a1").await;
    let (_a2, a2_in) = start(&topo, &ca, "a2").await;
    let mut errors = echo(a2_in);
    let a2 = topo.node_by_name("a2").unwrap();
    for _ in 0..20 {
        clean_exchange(&a1, a2, &sample_frames()).await.unwrap();
        idle_tcp(&a1, 1).await;
    }
    let c = a1.counters();
    assert_eq!(c.connections[1].load(Ordering::Relaxed), 1, "one handshake");
    assert_eq!(c.tcp_reused.load(Ordering::Relaxed), 19);
    assert!(errors.try_recv().is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tcp_stream_that_does_not_end_cleanly_closes_its_connection() {
    let EchoPeer {
        topo,
        ca,
        a1,
        peer: _a2,
        id: a2,
    } = a1_and_echo("a2").await;
    // The opener drops its stream without ending it: nothing is kept.
    exchange(&a1, a2).await.unwrap();
    // A stream that ends cleanly afterwards needs a connection of its own, and is kept.
    clean_exchange(&a1, a2, &sample_frames()).await.unwrap();
    idle_tcp(&a1, 1).await;
    assert_eq!(a1.counters().connections[1].load(Ordering::Relaxed), 2);
    // The acceptor drops a stream without ending it: nothing is kept either.
    let (b1, _) = start(&topo, &ca, "b1").await;
    let (_b2, mut b2_in) = start(&topo, &ca, "b2").await;
    tokio::spawn(async move {
        while let Some(mut s) = b2_in.accept().await {
            if let Ok(Some(f)) = s.reader.recv().await {
                let _ = s.writer.send(&f).await;
            }
        }
    });
    let b2 = topo.node_by_name("b2").unwrap();
    for _ in 0..2 {
        let mut s = b1.open_via(b2, LinkKind::TcpTls).await.unwrap();
        s.writer.send(&sample_frames()[0]).await.unwrap();
        s.writer.finish().await.unwrap();
        assert!(s.reader.recv().await.unwrap().is_some());
        assert!(!matches!(s.reader.recv().await, Ok(Some(_))));
    }
    assert_eq!(b1.counters().connections[1].load(Ordering::Relaxed), 2);
    assert_eq!(b1.counters().tcp_reused.load(Ordering::Relaxed), 0);
}

/// Accepts streams; reads one frame of each, answers it, ends the stream and drops it
/// without reading the rest.
fn answer_first(mut incoming: Incoming) {
    tokio::spawn(async move {
        while let Some(mut s) = incoming.accept().await {
            tokio::spawn(async move {
                if let Ok(Some(f)) = s.reader.recv().await {
                    let _ = s.writer.send(&f).await;
                    let _ = s.writer.finish().await;
                }
            });
        }
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_that_stops_reading_early_still_keeps_the_connection() {
    let topo = topology();
    let ca = CertAuthority::generate("test CA").unwrap();
    let (a1, _) = start(&topo, &ca, "a1").await;
    let (_a2, a2_in) = start(&topo, &ca, "a2").await;
    answer_first(a2_in);
    let a2 = topo.node_by_name("a2").unwrap();
    for _ in 0..5 {
        let mut s = a1.open(a2).await.unwrap();
        for f in sample_frames() {
            s.writer.send(&f).await.unwrap();
        }
        s.writer.finish().await.unwrap();
        assert_eq!(
            s.reader.recv().await.unwrap().as_ref(),
            Some(&sample_frames()[0])
        );
        drop(s);
        idle_tcp(&a1, 1).await;
    }
    assert_eq!(a1.counters().connections[1].load(Ordering::Relaxed), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_connection_to_a_restarted_peer_is_not_reused() {
    let EchoPeer {
        topo,
        ca,
        a1,
        peer: a2t,
        id: a2,
    } = a1_and_echo("a2").await;
    clean_exchange(&a1, a2, &sample_frames()).await.unwrap();
    idle_tcp(&a1, 1).await;
    let (_a2t, a2_in) = restart(a2t, &topo, &ca, "a2").await;
    echo(a2_in);
    // The first stream after the restart works: the closed idle connection is noticed
    // before it is used.
    clean_exchange(&a1, a2, &sample_frames()).await.unwrap();
    assert_eq!(a1.counters().connections[1].load(Ordering::Relaxed), 2);
    assert_eq!(a1.counters().tcp_reused.load(Ordering::Relaxed), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_end_mark_on_a_quic_stream_is_malformed() {
    let topo = topology();
    let ca = CertAuthority::generate("test CA").unwrap();
    let (a1, _) = start(&topo, &ca, "a1").await;
    let (_b1, b1_in) = start(&topo, &ca, "b1").await;
    let mut errors = echo(b1_in);
    let b1 = topo.node_by_name("b1").unwrap();
    let mut s = a1.open(b1).await.unwrap();
    s.writer
        .get_mut()
        .expect("open stream")
        .send_bytes(Bytes::copy_from_slice(&strait::wire::END_MARK))
        .await
        .unwrap();
    let (_, kind, err) = errors.recv().await.unwrap();
    assert_eq!(kind, LinkKind::Quic);
    assert!(matches!(err, FramedError::Malformed(_)), "{err}");
}

/// Certificate renewal: a node whose certificate expired is refused by its peers until
/// `reload_identity` gives it a fresh one (TCP inside the IDC and QUIC across the DCI);
/// a certificate for another node, from another CA, or with a key that is not its own
/// is refused and the node keeps what it had.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewed_certificate_is_presented_from_the_next_handshake() {
    let topo = topology();
    let ca = CertAuthority::generate("test CA").unwrap();
    let identity = |validity: Duration| {
        let (csr, key) = strait::transport::certificate_request("a1").unwrap();
        let cert = ca.sign_request(&csr, PeerRole::Node, validity).unwrap();
        TlsIdentity::from_pem(ca.cert_pem().as_bytes(), cert.as_bytes(), key.as_bytes()).unwrap()
    };
    // Valid for one second (certificate times count whole seconds).
    let short = identity(Duration::from_secs(1));
    let expires = std::time::SystemTime::now() + Duration::from_secs(1);
    let a1 = Transport::bind(
        topo.node_by_name("a1").unwrap(),
        topo.clone(),
        &short,
        config(),
    )
    .await
    .unwrap()
    .0;
    let (_a2t, a2_in) = start(&topo, &ca, "a2").await;
    let (_b1t, b1_in) = start(&topo, &ca, "b1").await;
    echo(a2_in);
    echo(b1_in);
    let (a2, b1) = (
        topo.node_by_name("a2").unwrap(),
        topo.node_by_name("b1").unwrap(),
    );
    // What is under test is the certificate's clock: let it run out.
    let left = expires
        .duration_since(std::time::SystemTime::now())
        .unwrap_or_default();
    tokio::time::sleep(left + Duration::from_secs(2)).await;
    assert!(
        exchange(&a1, a2).await.is_err(),
        "expired certificate accepted over TCP"
    );
    assert!(
        exchange(&a1, b1).await.is_err(),
        "expired certificate accepted over QUIC"
    );

    // Refused renewals change nothing.
    let other = CertAuthority::generate("another CA").unwrap();
    for (bad, why) in [
        (ca.identity("a2").unwrap(), "this node is"),
        (other.identity("a1").unwrap(), "CA certificate changed"),
    ] {
        let e = a1.reload_identity(&bad).unwrap_err();
        assert!(e.to_string().contains(why), "{e}");
    }
    let mismatched = {
        let (csr, _) = strait::transport::certificate_request("a1").unwrap();
        let (_, wrong_key) = strait::transport::certificate_request("a1").unwrap();
        let cert = ca
            .sign_request(&csr, PeerRole::Node, Duration::from_secs(3600))
            .unwrap();
        TlsIdentity::from_pem(
            ca.cert_pem().as_bytes(),
            cert.as_bytes(),
            wrong_key.as_bytes(),
        )
        .unwrap()
    };
    assert!(
        a1.reload_identity(&mismatched).is_err(),
        "key of another certificate"
    );
    assert!(exchange(&a1, a2).await.is_err());

    a1.reload_identity(&identity(Duration::from_secs(3600)))
        .unwrap();
    assert_eq!(exchange(&a1, a2).await, Ok(LinkKind::TcpTls));
    assert_eq!(exchange(&a1, b1).await, Ok(LinkKind::Quic));
}

/// An acceptor whose service read the opener's end before it ended its own half sends
/// READY with its end mark: the opener keeps the connection for its next stream even
/// while that service still holds its finished stream, and the next stream reuses it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_comes_with_the_acceptors_end_when_it_read_the_openers_end_first() {
    let topo = topology();
    let ca = CertAuthority::generate("test CA").unwrap();
    let (a1, _) = start(&topo, &ca, "a1").await;
    let (_a2, mut a2_in) = start(&topo, &ca, "a2").await;
    let (held_tx, mut held) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(mut s) = a2_in.accept().await {
            let held_tx = held_tx.clone();
            tokio::spawn(async move {
                let mut got = Vec::new();
                while let Ok(Some(f)) = s.reader.recv().await {
                    got.push(f);
                }
                for f in &got {
                    let _ = s.writer.send(f).await;
                }
                let _ = s.writer.finish().await;
                // The service keeps its finished stream until the test lets it go.
                let _ = held_tx.send(s);
            });
        }
    });
    let a2 = topo.node_by_name("a2").unwrap();
    clean_exchange(&a1, a2, &sample_frames()).await.unwrap();
    idle_tcp(&a1, 1).await;
    let first = held.recv().await.unwrap();
    let next = {
        let a1 = a1.clone();
        tokio::spawn(async move { clean_exchange(&a1, a2, &sample_frames()).await })
    };
    // The acceptor takes the next stream once its service lets go of the first.
    drop(first);
    next.await.unwrap().unwrap();
    let c = a1.counters();
    assert_eq!(c.connections[1].load(Ordering::Relaxed), 1, "one handshake");
    assert_eq!(c.tcp_reused.load(Ordering::Relaxed), 1);
}

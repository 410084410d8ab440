//! What a certificate's role allows. Nodes relay, copy and recover anything; a client
//! reads, writes new blocks and recovers its own writes in progress, and nothing else.
//! Every refusal is checked over TCP (a client in the same IDC) and over QUIC (a client
//! reaching a node in the other IDC).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use strait::block::{BlockId, ChecksumSpec, GenStamp};
use strait::node::{Node, NodeConfig};
use strait::pipeline::{WriteError, WriteParams};
use strait::read::ReadParams;
use strait::store::ReplicaState;
use strait::topology::{NodeId, Topology};
use strait::transport::{CertAuthority, PeerRole, TransportConfig};
use strait::wire::{Compression, CopyBlock, Frame, Status, TrafficClass, WriteBlock, WriteMode};

struct Setup {
    topo: Arc<Topology>,
    nodes: Vec<Node>,
    client: Node,
    _dirs: Vec<tempfile::TempDir>,
}

impl Setup {
    fn node(&self, name: &str) -> &Node {
        self.nodes
            .iter()
            .find(|n| self.topo.node(n.id()).name == name)
            .unwrap()
    }
    fn id(&self, name: &str) -> NodeId {
        self.topo.node_by_name(name).unwrap()
    }
}

async fn setup(net: u8) -> Setup {
    setup_with(net, None).await
}

/// Like [`setup`], with the client's pipeline `setup_timeout` when given.
async fn setup_with(net: u8, client_setup_timeout: Option<Duration>) -> Setup {
    let addr = |h: u8| -> SocketAddr { SocketAddr::from(([127, 7, net, h], 7900)) };
    let topo = Arc::new(
        Topology::builder()
            .idc("idc-a")
            .idc("idc-b")
            .node("n1", "idc-a", "r1", addr(1), 1 << 40)
            .node("n2", "idc-a", "r2", addr(2), 1 << 40)
            .node("n3", "idc-b", "r1", addr(3), 1 << 40)
            .node("c1", "idc-a", "clients", addr(9), 1 << 40)
            .link("idc-a", "idc-b", 1_000_000_000, Duration::from_millis(1))
            .build()
            .unwrap(),
    );
    let ca = CertAuthority::generate("authz test CA").unwrap();
    let mut dirs = Vec::new();
    let mut start = |name: &str, role: PeerRole| {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = NodeConfig::new(
            name,
            topo.clone(),
            ca.identity_as(name, role).unwrap(),
            dir.path(),
        );
        cfg.store.io_threads = 1;
        cfg.transport = TransportConfig {
            connect_timeout: Duration::from_secs(2),
            open_timeout: Duration::from_secs(2),
            ..TransportConfig::default()
        };
        dirs.push(dir);
        cfg
    };
    let cfgs: Vec<NodeConfig> = ["n1", "n2", "n3"]
        .iter()
        .map(|n| start(n, PeerRole::Node))
        .collect();
    let mut client_cfg = start("c1", PeerRole::Client);
    if let Some(t) = client_setup_timeout {
        client_cfg.pipeline.setup_timeout = t;
    }
    let mut nodes = Vec::new();
    for cfg in cfgs {
        nodes.push(Node::start(cfg).await.unwrap().0);
    }
    let client = Node::start(client_cfg).await.unwrap().0;
    Setup {
        topo,
        nodes,
        client,
        _dirs: dirs,
    }
}

async fn write(
    from: &Node,
    block: BlockId,
    targets: &[NodeId],
    gs: GenStamp,
    data: &[u8],
) -> Result<strait::pipeline::WriteOutcome, WriteError> {
    let mut w = from.writer(block, targets, WriteParams::new(gs)).await?;
    w.write(Bytes::copy_from_slice(data)).await?;
    w.close().await
}

/// Sends one first frame from `from` to `to` and returns the answer.
async fn ask(from: &Node, to: NodeId, frame: Frame) -> Option<Frame> {
    let mut s = from.transport().open(to).await.unwrap();
    s.writer.send(&frame).await.unwrap();
    s.reader.recv().await.ok().flatten()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_writes_and_reads_new_blocks_but_cannot_replace_finalized_ones() {
    let s = setup(1).await;
    let targets = [s.id("n1"), s.id("n2"), s.id("n3")];
    let block = BlockId(1);
    let data = vec![7u8; 100_000];
    // A new block: fine, through every hop, and readable.
    let out = write(&s.client, block, &targets, GenStamp(1), &data)
        .await
        .unwrap();
    assert_eq!(out.replicas, targets.to_vec());
    let got = s
        .client
        .reader(block, GenStamp(1), &targets, ReadParams::default())
        .read_all()
        .await
        .unwrap();
    assert_eq!(&got[..], &data[..]);
    // Replacing it with a higher genstamp: refused by n1 (TCP) and by n3 (QUIC), with
    // the node named, and every replica untouched.
    for (via, target) in [("tcp", "n1"), ("quic", "n3")] {
        let err = write(
            &s.client,
            block,
            &[s.id(target)],
            GenStamp(u64::MAX),
            b"evil",
        )
        .await
        .expect_err(via);
        match err {
            WriteError::Denied { node, .. } => assert_eq!(node, target, "{via}"),
            other => panic!("{via}: expected Denied, got {other}"),
        }
        let info = s.node(target).store().get(block).unwrap();
        assert_eq!(
            (info.state, info.genstamp, info.len),
            (ReplicaState::Finalized, GenStamp(1), data.len() as u64),
            "{via}"
        );
    }
    // A node may (a copy replacing a stale replica does exactly this).
    write(s.node("n2"), block, &[s.id("n1")], GenStamp(5), &data)
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_cannot_order_copies_or_recover_a_write_that_is_not_its_own() {
    let s = setup(2).await;
    let all = [s.id("n1"), s.id("n2"), s.id("n3")];
    let block = BlockId(2);
    let data = vec![9u8; 50_000];
    write(s.node("n2"), block, &all, GenStamp(1), &data)
        .await
        .unwrap();
    for (via, source) in [("tcp", "n1"), ("quic", "n3")] {
        let copy = Frame::CopyBlock(CopyBlock {
            block,
            genstamp: GenStamp(1),
            len: data.len() as u64,
            targets: vec!["n2".into()],
            class: TrafficClass::Repair,
            replicas: vec![],
        });
        match ask(&s.client, s.id(source), copy).await {
            Some(Frame::Error(e)) => assert_eq!(e.status, Status::Denied, "{via}"),
            other => panic!("{via}: expected a refusal, got {other:?}"),
        }
    }
    // A node's write still in progress (n2 heads it, hflushed, not closed): a client
    // resuming it (offset > 0, new genstamp) is refused.
    let other = BlockId(3);
    let mut w = s
        .node("n2")
        .writer(
            other,
            &[s.id("n1"), s.id("n3")],
            WriteParams::new(GenStamp(1)),
        )
        .await
        .unwrap();
    w.write(Bytes::from(vec![1u8; 8192])).await.unwrap();
    w.hflush().await.unwrap();
    for (via, target) in [("tcp", "n1"), ("quic", "n3")] {
        let resume = Frame::WriteBlock(WriteBlock {
            block: other,
            genstamp: GenStamp(2),
            offset: 4096,
            targets: vec![],
            mode: WriteMode::Sync,
            class: TrafficClass::Sync,
            spot: false,
            checksum: ChecksumSpec::default(),
            compression: Compression::None,
            remote_targets: vec![],
            // What a client claims here is ignored: the head takes the origin from its
            // certificate.
            origin: Some("n2".into()),
            resume: true,
            replicas: vec![],
            lost: vec![],
        });
        match ask(&s.client, s.id(target), resume).await {
            Some(Frame::Ack(a)) => assert_eq!(a.statuses, vec![Status::Denied], "{via}"),
            other => panic!("{via}: expected a refusal, got {other:?}"),
        }
        let info = s.node(target).store().get(other).unwrap();
        assert_eq!((info.genstamp, info.len), (GenStamp(1), 8192), "{via}");
    }
    w.close().await.unwrap();
}

/// A client's one-packet block whose last hop (back into idc-a) dies before any ack comes back: the two
/// survivors have finalized it, the writer holds no ack and recovers at offset 0. That
/// recovery is the client's own write (a resume), not a replacement of finalized
/// replicas, so it is allowed and keeps them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_recovers_its_own_write_at_offset_zero() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use strait::transport::filter::{FrameAction, Hop};
    let s = setup(4).await;
    let targets = [s.id("n1"), s.id("n3"), s.id("n2")];
    let (n2, n3) = (s.id("n2"), s.id("n3"));
    let killed = AtomicBool::new(false);
    s.node("n3")
        .transport()
        .set_frame_filter(Some(Arc::new(move |hop: Hop, frame: &Frame| {
            if hop == (Hop { from: n3, to: n2 })
                && matches!(frame, Frame::Packet(_))
                && !killed.swap(true, Ordering::Relaxed)
            {
                FrameAction::Kill
            } else {
                FrameAction::Pass
            }
        })));
    let data = vec![9u8; 100];
    let out = write(&s.client, BlockId(4), &targets, GenStamp(1), &data)
        .await
        .expect("the client's recovery at offset 0 is allowed");
    assert_eq!(out.failed, vec![n2]);
    assert_eq!(out.replicas, vec![s.id("n1"), n3]);
    for name in ["n1", "n3"] {
        let info = s.node(name).store().get(BlockId(4)).unwrap();
        assert_eq!(
            (info.state, info.genstamp, info.len),
            (ReplicaState::Finalized, out.genstamp, 100),
            "{name}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tcp_peer_without_a_certificate_is_refused() {
    let s = setup(3).await;
    // Trust anything the server shows: the test is about the server refusing us.
    #[derive(Debug)]
    struct AnyServer;
    impl rustls::client::danger::ServerCertVerifier for AnyServer {
        fn verify_server_cert(
            &self,
            _: &rustls::pki_types::CertificateDer<'_>,
            _: &[rustls::pki_types::CertificateDer<'_>],
            _: &rustls::pki_types::ServerName<'_>,
            _: &[u8],
            _: rustls::pki_types::UnixTime,
        ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
            Ok(rustls::client::danger::ServerCertVerified::assertion())
        }
        fn verify_tls12_signature(
            &self,
            _: &[u8],
            _: &rustls::pki_types::CertificateDer<'_>,
            _: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
        }
        fn verify_tls13_signature(
            &self,
            _: &[u8],
            _: &rustls::pki_types::CertificateDer<'_>,
            _: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
        }
        fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
            rustls::crypto::ring::default_provider()
                .signature_verification_algorithms
                .supported_schemes()
        }
    }
    let mut tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .dangerous()
    .with_custom_certificate_verifier(Arc::new(AnyServer))
    .with_no_client_auth();
    tls.alpn_protocols = vec![b"strait/1".to_vec()];
    let addr = s.topo.node(s.id("n1")).addr;
    let result: Result<(), String> = async {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let tcp = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| e.to_string())?;
        let name = rustls::pki_types::ServerName::try_from("n1").unwrap();
        let mut tls = tokio_rustls::TlsConnector::from(Arc::new(tls))
            .connect(name, tcp)
            .await
            .map_err(|e| e.to_string())?;
        tls.write_all(b"\x05\x00\x00\x00hello")
            .await
            .map_err(|e| e.to_string())?;
        let mut buf = [0u8; 1];
        match tls.read(&mut buf).await {
            Ok(0) => Err("closed".to_string()),
            Ok(_) => Ok(()),
            Err(e) => Err(e.to_string()),
        }
    }
    .await;
    assert!(result.is_err(), "a peer without a certificate got through");
    assert_eq!(s.node("n1").resources().handlers, 0, "no stream was served");
}

/// A client sends a one-packet block with its setup; the first hop forwards it all, the
/// two below finalize it, and the first hop's setup answer never reaches the client (held
/// past the client's setup timeout). The client drops the first hop and sets the pipeline
/// up again at the next genstamp: that retry is its own write, not a replacement of the
/// finalized replicas its first attempt left (found by `strait-bench chaos`: "a client
/// may not replace the finalized replica at gs1" failed a healthy write).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clients_retry_after_a_lost_setup_answer_is_its_own_write() {
    use strait::transport::filter::{FrameAction, Hop};
    let s = setup_with(5, Some(Duration::from_secs(1))).await;
    let (c1, n1) = (s.client.id(), s.id("n1"));
    s.node("n1")
        .transport()
        .set_frame_filter(Some(Arc::new(move |hop: Hop, frame: &Frame| match frame {
            Frame::Ack(a) if hop == (Hop { from: n1, to: c1 }) && a.seq == u64::MAX => {
                FrameAction::Stall
            }
            _ => FrameAction::Pass,
        })));
    let targets = [n1, s.id("n2"), s.id("n3")];
    let block = BlockId(5);
    let data = vec![5u8; 100];
    let mut params = WriteParams::new(GenStamp(1));
    params.setup_with_first_packet = true;
    let out = async {
        let mut w = s.client.writer(block, &targets, params).await?;
        w.write(Bytes::copy_from_slice(&data)).await?;
        w.close().await
    }
    .await
    .expect("the retry is the client's own write");
    assert_eq!(out.failed, vec![n1]);
    assert_eq!(out.replicas, vec![s.id("n2"), s.id("n3")]);
    for name in ["n2", "n3"] {
        let info = s.node(name).store().get(block).unwrap();
        assert_eq!(
            (info.state, info.genstamp, info.len),
            (ReplicaState::Finalized, out.genstamp, 100),
            "{name}"
        );
        let got = s
            .client
            .reader(block, out.genstamp, &[s.id(name)], ReadParams::default())
            .read_all()
            .await
            .unwrap();
        assert_eq!(&got[..], &data[..], "{name}");
    }
}

//! `strait-bench transport`: one stream sending 64 KiB data-packet frames over loopback,
//! against the same bytes sent unframed on a raw quinn stream of the same connection
//! setup (the physical reference), and framed over a TLS-over-TCP link; plus the latency
//! of a small request/response round trip. Sender and receiver run in this process, so
//! CPU seconds per GB count both ends.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde_json::json;
use strait::block::{BlockId, ChecksumSpec, GenStamp};
use strait::topology::{NodeId, Topology};
use strait::transport::{
    CertAuthority, Incoming, LinkKind, Sink, Source, Stream, Transport, TransportConfig,
};
use strait::wire::{
    Ack, Compression, Frame, Packet, PacketFlags, Status, TrafficClass, WriteBlock, WriteMode,
};
use tokio::io::AsyncReadExt;

use super::{Latency, Phase, Table, r3};

/// What to run.
#[derive(Debug, Clone)]
pub struct TransportBenchParams {
    /// Bytes per measured transfer.
    pub bytes: u64,
    /// Bytes per packet.
    pub packet: usize,
    /// Round trips for the latency measurement.
    pub round_trips: usize,
    /// Rounds; medians are reported.
    pub rounds: usize,
}

const RAW_MARK: BlockId = BlockId(u64::MAX);

fn topology(base: u8) -> Result<Arc<Topology>, String> {
    let addr = |h: u8| -> SocketAddr { SocketAddr::from(([127, 3, base, h], 7400)) };
    Topology::builder()
        .idc("idc-a")
        .idc("idc-b")
        .node("a1", "idc-a", "r1", addr(1), 1 << 40)
        .node("a2", "idc-a", "r1", addr(2), 1 << 40)
        .node("b1", "idc-b", "r1", addr(11), 1 << 40)
        .link("idc-a", "idc-b", 1_250_000_000, Duration::from_micros(100))
        .build()
        .map(Arc::new)
        .map_err(|e| e.to_string())
}

/// Receiver: counts packets until the last one and acks it; echoes acks (round trips);
/// after a `WriteBlock` for [`RAW_MARK`], acks, reads raw bytes to the end, acks again.
async fn serve(mut incoming: Incoming) {
    while let Some(mut s) = incoming.accept().await {
        tokio::spawn(async move {
            let _ = serve_stream(&mut s).await;
        });
    }
}

async fn serve_stream(s: &mut Stream) -> Result<(), String> {
    loop {
        match s.reader.recv().await.map_err(|e| e.to_string())? {
            None => return Ok(()),
            Some(Frame::Packet(p)) if p.flags.last => {
                s.writer
                    .send(&Frame::Ack(Ack {
                        seq: p.seq,
                        statuses: vec![Status::Success],
                    }))
                    .await
                    .map_err(|e| e.to_string())?;
            }
            Some(Frame::Packet(_)) => {}
            Some(Frame::Ack(a)) => s
                .writer
                .send(&Frame::Ack(a))
                .await
                .map_err(|e| e.to_string())?,
            Some(Frame::WriteBlock(w)) if w.block == RAW_MARK => {
                let ack = Frame::Ack(Ack {
                    seq: 0,
                    statuses: vec![Status::Success],
                });
                s.writer.send(&ack).await.map_err(|e| e.to_string())?;
                let mut n = 0u64;
                match s.reader.get_mut() {
                    Source::Quic(r) => {
                        while let Some(chunk) = r
                            .read_chunk(1 << 20, true)
                            .await
                            .map_err(|e| e.to_string())?
                        {
                            n += chunk.bytes.len() as u64;
                        }
                    }
                    Source::Local(_) => return Err("no raw mode in-process".into()),
                    Source::Tcp(r) => {
                        let mut buf = vec![0u8; 1 << 20];
                        loop {
                            let k = r.read(&mut buf).await.map_err(|e| e.to_string())?;
                            if k == 0 {
                                break;
                            }
                            n += k as u64;
                        }
                    }
                }
                s.writer
                    .send(&Frame::Ack(Ack {
                        seq: n,
                        statuses: vec![Status::Success],
                    }))
                    .await
                    .map_err(|e| e.to_string())?;
                return Ok(());
            }
            Some(_) => {}
        }
    }
}

async fn framed(
    t: &Transport,
    peer: NodeId,
    kind: LinkKind,
    p: &TransportBenchParams,
) -> Result<Phase, String> {
    let payload = Bytes::from(vec![0x5au8; p.packet]);
    let crcs = ChecksumSpec::default().checksums(&payload);
    let n = p.bytes.div_ceil(p.packet as u64);
    let mut s = t.open_via(peer, kind).await.map_err(|e| e.to_string())?;
    let (phase, res) = Phase::measure(n * p.packet as u64, async {
        for seq in 0..n {
            let f = Frame::Packet(Packet {
                seq,
                offset: 0,
                flags: PacketFlags {
                    last: seq + 1 == n,
                    ..Default::default()
                },
                data_len: p.packet as u32,
                crcs: crcs.clone(),
                payload: payload.clone(),
            });
            s.writer.feed(&f).await.map_err(|e| e.to_string())?;
        }
        s.writer.flush().await.map_err(|e| e.to_string())?;
        match s.reader.recv().await.map_err(|e| e.to_string())? {
            Some(Frame::Ack(a)) if a.seq == n - 1 => Ok(()),
            other => Err(format!("unexpected answer {other:?}")),
        }
    })
    .await;
    res.map(|()| phase)
}

async fn raw(t: &Transport, peer: NodeId, p: &TransportBenchParams) -> Result<Phase, String> {
    let mut s = t
        .open_via(peer, LinkKind::Quic)
        .await
        .map_err(|e| e.to_string())?;
    let hello = Frame::WriteBlock(WriteBlock {
        block: RAW_MARK,
        genstamp: GenStamp(0),
        offset: 0,
        targets: vec![],
        mode: WriteMode::Sync,
        class: TrafficClass::Sync,
        spot: false,
        checksum: ChecksumSpec::default(),
        compression: Compression::None,
        remote_targets: vec![],
        origin: None,
        resume: false,
        replicas: vec![],
        lost: vec![],
    });
    s.writer.send(&hello).await.map_err(|e| e.to_string())?;
    s.reader.recv().await.map_err(|e| e.to_string())?;
    let payload = Bytes::from(vec![0x5au8; p.packet]);
    let n = p.bytes.div_ceil(p.packet as u64);
    let (phase, res) = Phase::measure(n * p.packet as u64, async {
        let Some(Sink::Quic(send)) = s.writer.get_mut() else {
            return Err("not QUIC".to_string());
        };
        for _ in 0..n {
            send.write_chunk(payload.clone())
                .await
                .map_err(|e| e.to_string())?;
        }
        send.finish().map_err(|e| e.to_string())?;
        match s.reader.recv().await.map_err(|e| e.to_string())? {
            Some(Frame::Ack(a)) if a.seq == n * p.packet as u64 => Ok(()),
            other => Err(format!("unexpected answer {other:?}")),
        }
    })
    .await;
    res.map(|()| phase)
}

async fn round_trips(
    t: &Transport,
    peer: NodeId,
    kind: LinkKind,
    count: usize,
) -> Result<Latency, String> {
    let mut s = t.open_via(peer, kind).await.map_err(|e| e.to_string())?;
    let mut lat = Latency::default();
    for i in 0..count {
        let f = Frame::Ack(Ack {
            seq: i as u64,
            statuses: vec![Status::Success],
        });
        let t0 = Instant::now();
        s.writer.send(&f).await.map_err(|e| e.to_string())?;
        s.reader
            .recv()
            .await
            .map_err(|e| e.to_string())?
            .ok_or("stream closed")?;
        lat.record(t0.elapsed());
    }
    Ok(lat)
}

fn median(mut v: Vec<Phase>) -> Phase {
    v.sort_by(|a, b| a.mb_s().total_cmp(&b.mb_s()));
    v[v.len() / 2]
}

/// Runs the scenario; prints the table and returns the JSON summary.
pub async fn run(p: &TransportBenchParams) -> Result<serde_json::Value, String> {
    let topo = topology(std::process::id() as u8)?;
    let ca = CertAuthority::generate("bench CA").map_err(|e| e.to_string())?;
    let id = |n: &str| topo.node_by_name(n).ok_or(format!("no node {n}"));
    let (a1, a2, b1) = (id("a1")?, id("a2")?, id("b1")?);
    let mut nodes = Vec::new();
    for n in [a1, a2, b1] {
        let ident = ca.identity(&topo.node(n).name).map_err(|e| e.to_string())?;
        let (t, incoming) = Transport::bind(n, topo.clone(), &ident, TransportConfig::default())
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(serve(incoming));
        nodes.push(t);
    }
    let client = &nodes[0];
    let (mut f_quic, mut f_raw, mut f_tcp) = (vec![], vec![], vec![]);
    for _ in 0..p.rounds.max(1) {
        f_raw.push(raw(client, b1, p).await?);
        f_quic.push(framed(client, b1, LinkKind::Quic, p).await?);
        f_tcp.push(framed(client, a2, LinkKind::TcpTls, p).await?);
    }
    let (quic, rawq, tcp) = (median(f_quic), median(f_raw), median(f_tcp));
    let rtt_quic = round_trips(client, b1, LinkKind::Quic, p.round_trips).await?;
    let rtt_tcp = round_trips(client, a2, LinkKind::TcpTls, p.round_trips).await?;
    for t in &nodes {
        t.shutdown().await;
    }

    println!(
        "transport: one stream, {} MiB per transfer in {} KiB packets, loopback, median of {} rounds",
        p.bytes >> 20,
        p.packet >> 10,
        p.rounds.max(1)
    );
    let mut t = Table::new(&["link", "MB/s", "ratio to raw", "cpu-s/GB (both ends)"]);
    for (name, ph) in [
        ("raw quinn stream (reference)", rawq),
        ("framed over QUIC", quic),
        ("framed over TCP+TLS", tcp),
    ] {
        t.row(vec![
            name.into(),
            format!("{:.0}", ph.mb_s()),
            format!("{:.2}", ph.mb_s() / rawq.mb_s()),
            format!("{:.2}", ph.cpu_s_per_gb()),
        ]);
    }
    print!("{}", t.render());
    let mut t = Table::new(&["round trip", "p50 us", "p90", "p99", "p99.9", "max"]);
    for (name, l) in [("QUIC", &rtt_quic), ("TCP+TLS", &rtt_tcp)] {
        let mut cells = vec![name.to_string()];
        cells.extend(l.summary().split_whitespace().map(str::to_string));
        t.row(cells);
    }
    print!("{}", t.render());
    Ok(json!({
        "scenario": "transport",
        "bytes": p.bytes,
        "packet_bytes": p.packet,
        "rounds": p.rounds.max(1),
        "framed_mb_s": r3(quic.mb_s()),
        "raw_mb_s": r3(rawq.mb_s()),
        "ratio": r3(quic.mb_s() / rawq.mb_s()),
        "rtt_p50_us": rtt_quic.at(0.5),
        "rtt_p99_us": rtt_quic.at(0.99),
        "tcp_tls_mb_s": r3(tcp.mb_s()),
        "tcp_tls_rtt_p50_us": rtt_tcp.at(0.5),
        "tcp_tls_rtt_p99_us": rtt_tcp.at(0.99),
        "framed_cpu_s_per_gb": r3(quic.cpu_s_per_gb()),
        "raw_cpu_s_per_gb": r3(rawq.cpu_s_per_gb()),
        "tcp_tls_cpu_s_per_gb": r3(tcp.cpu_s_per_gb()),
    }))
}

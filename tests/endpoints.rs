//! Endpoints under abuse: connections that never finish a handshake or a request must
//! not take a node's descriptors or its endpoint away from real peers.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{Cluster, pattern};
use strait::block::{BlockId, GenStamp};
use strait::pipeline::WriteParams;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Opens `n` TCP connections to `addr` that send nothing.
async fn half_open(addr: SocketAddr, n: usize) -> Vec<TcpStream> {
    let mut v = Vec::with_capacity(n);
    for _ in 0..n {
        v.push(TcpStream::connect(addr).await.unwrap());
    }
    v
}

/// How many of `socks` the server has closed (read sees EOF or an error) within `within`.
async fn closed_by_server(socks: &mut [TcpStream], within: Duration) -> usize {
    let mut closed = 0;
    let deadline = Instant::now() + within;
    for s in socks.iter_mut() {
        let left = deadline.saturating_duration_since(Instant::now());
        let mut b = [0u8; 1];
        match tokio::time::timeout(left.max(Duration::from_millis(1)), s.read(&mut b)).await {
            Ok(Ok(0)) | Ok(Err(_)) => closed += 1,
            _ => {}
        }
    }
    closed
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_open_connections_leave_writes_working() {
    let c = Cluster::start().await;
    let a1 = c.node("a1").clone();
    let node_addr = c.topo.node(a1.id()).addr;
    let metrics_addr = SocketAddr::new(node_addr.ip(), 9199);
    let _http = strait::daemon::http::serve(metrics_addr, a1.clone())
        .await
        .unwrap();
    // 200 half-open connections to each: the node's TLS port and its /metrics.
    let _node_conns = half_open(node_addr, 200).await;
    let mut metrics_conns = half_open(metrics_addr, 200).await;
    // A 2+2 write through a1 (its first hop is a new TLS connection to a1) still works.
    let t0 = Instant::now();
    let targets = c.ids(&["a1", "a2", "b1", "b2"]);
    let data = pattern(31, 3 << 20);
    let mut w = c
        .node("a3")
        .writer(BlockId(31), &targets, WriteParams::new(GenStamp(1)))
        .await
        .unwrap();
    w.write(Bytes::from(data)).await.unwrap();
    let out = w.close().await.unwrap();
    assert_eq!(out.replicas, targets);
    assert!(
        t0.elapsed() < Duration::from_secs(5),
        "took {:?}",
        t0.elapsed()
    );
    // /metrics serves at most 64 at once and gives each request 5 s in all: every
    // half-open connection is gone within the deadline, and it answers again.
    let closed = closed_by_server(&mut metrics_conns, Duration::from_secs(8)).await;
    assert_eq!(closed, 200, "half-open /metrics connections kept open");
    let mut s = TcpStream::connect(metrics_addr).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).await.unwrap();
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert!(resp.contains("strait_read_bytes_total"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unauthenticated_connections_beyond_the_cap_are_closed_at_once() {
    let c = Cluster::start().await;
    let node_addr = c.topo.node(c.id("b3")).addr;
    // The default cap is 256 handshakes in flight: 300 half-open connections leave at
    // least 44 closed by the node right away.
    let mut conns = half_open(node_addr, 300).await;
    let closed = closed_by_server(&mut conns, Duration::from_secs(1)).await;
    assert!(closed >= 44, "only {closed} of 300 closed");
    // Once the handshakes time out (2 s in this cluster), the rest are closed too.
    let closed = closed_by_server(&mut conns, Duration::from_secs(4)).await;
    assert_eq!(closed, 300);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_metrics_client_is_cut_at_the_request_deadline() {
    let c = Cluster::start().await;
    let addr = SocketAddr::new(c.topo.node(c.id("a2")).addr.ip(), 9198);
    let _http = strait::daemon::http::serve(addr, c.node("a2").clone())
        .await
        .unwrap();
    let mut s = TcpStream::connect(addr).await.unwrap();
    // One byte of a never-ending header every 300 ms.
    let t0 = Instant::now();
    let mut cut = false;
    for _ in 0..40 {
        if s.write_all(b"X").await.is_err() {
            cut = true;
            break;
        }
        let mut b = [0u8; 256];
        match tokio::time::timeout(Duration::from_millis(300), s.read(&mut b)).await {
            Ok(Ok(_)) | Ok(Err(_)) => {
                cut = true;
                break;
            }
            Err(_) => {}
        }
    }
    assert!(cut, "a client dripping bytes kept its connection for 12 s");
    assert!(
        t0.elapsed() < Duration::from_secs(7),
        "cut after {:?}",
        t0.elapsed()
    );
}

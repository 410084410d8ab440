//! The daemon's HTTP endpoint: `GET /metrics` answers with the node's metrics in the
//! OpenMetrics text format ([`super::export`], listed in `docs/METRICS.md`), `GET /health`
//! with `ok pid <process id>`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use super::export::{CONTENT_TYPE, render};
use crate::node::Node;

/// At most this many requests are served at once; more connections are closed at once.
pub const MAX_CONNECTIONS: usize = 64;
/// The whole of one request — reading it and writing the answer — must fit in this.
pub const REQUEST_DEADLINE: Duration = Duration::from_secs(5);

/// Serves `GET /metrics` and `GET /health` on `addr` until the task is dropped. Paths are
/// matched exactly; anything else gets a 404. A request head may be 8 KiB; each request
/// has [`REQUEST_DEADLINE`] in all, and at most [`MAX_CONNECTIONS`] are served at once, so
/// slow or idle clients cannot hold the endpoint (or the process's descriptors).
pub async fn serve(addr: SocketAddr, node: Node) -> std::io::Result<tokio::task::JoinHandle<()>> {
    let listener = TcpListener::bind(addr).await?;
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    Ok(tokio::spawn(async move {
        loop {
            let sock = match listener.accept().await {
                Ok((s, _)) => s,
                Err(e) => {
                    // Out of descriptors and the like: back off rather than spin.
                    tracing::warn!(error = %e, "metrics accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                // Full: close it now rather than queue it.
                drop(sock);
                continue;
            };
            let node = node.clone();
            tokio::spawn(async move {
                let _ = tokio::time::timeout(REQUEST_DEADLINE, answer(sock, &node)).await;
                drop(slot);
            });
        }
    }))
}

/// The path of a `GET` request line, if the head is one.
fn get_path(head: &[u8]) -> Option<&str> {
    let line = head.split(|&b| b == b'\r').next()?;
    let line = std::str::from_utf8(line).ok()?;
    let mut parts = line.split(' ');
    match (parts.next(), parts.next(), parts.next()) {
        (Some("GET"), Some(path), Some(version)) if version.starts_with("HTTP/") => Some(path),
        _ => None,
    }
}

async fn answer(mut sock: tokio::net::TcpStream, node: &Node) {
    let mut buf = vec![0u8; 8192];
    let mut n = 0;
    // Read the request head (bounded in size here, in time by the caller).
    while n < buf.len() {
        match sock.read(&mut buf[n..]).await {
            Ok(0) | Err(_) => return,
            Ok(k) => {
                n += k;
                if buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
                    break;
                }
            }
        }
    }
    let (status, kind, body) = match get_path(&buf[..n]) {
        Some("/metrics") => ("200 OK", CONTENT_TYPE, render(node)),
        // Says which process answers, so that a launcher can tell its own daemon from
        // another one holding the address.
        Some("/health") => (
            "200 OK",
            "text/plain",
            format!("ok pid {}\n", std::process::id()),
        ),
        _ => ("404 Not Found", "text/plain", "not found\n".to_string()),
    };
    let resp = format!(
        "HTTP/1.1 {status}\r\ncontent-type: {kind}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = sock.write_all(resp.as_bytes()).await;
    let _ = sock.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::get_path;

    #[test]
    fn paths_match_exactly() {
        assert_eq!(get_path(b"GET /metrics HTTP/1.1\r\n\r\n"), Some("/metrics"));
        assert_eq!(get_path(b"GET /metricsX HTTP/1.1\r\n"), Some("/metricsX"));
        assert_eq!(get_path(b"POST /metrics HTTP/1.1\r\n"), None);
        assert_eq!(get_path(b"GET /metrics"), None);
        assert_eq!(get_path(b"\xff\xfe"), None);
    }
}

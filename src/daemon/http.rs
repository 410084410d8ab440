//! The daemon's HTTP endpoint: `GET /metrics` answers with the node's metrics in the
//! OpenMetrics text format ([`super::export`], listed in `docs/METRICS.md`), `GET /health`
//! with `ok pid <process id>`; hyper speaks the HTTP/1.1.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode, header};
use hyper_util::rt::TokioIo;
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
                serve_connection(sock, node).await;
                drop(slot);
            });
        }
    }))
}

/// What a request is for: only `GET` of the exact paths.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route {
    Metrics,
    Health,
    NotFound,
    WrongMethod,
}

fn route(method: &Method, path: &str) -> Route {
    match (method, path) {
        (&Method::GET, "/metrics") => Route::Metrics,
        (&Method::GET, "/health") => Route::Health,
        (&Method::GET, _) => Route::NotFound,
        _ => Route::WrongMethod,
    }
}

/// Serves the requests of one connection: one request (no keep-alive), its head at most
/// 8 KiB, all of it within the caller's deadline.
async fn serve_connection(sock: tokio::net::TcpStream, node: Node) {
    let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
        let node = node.clone();
        async move { Ok::<_, std::convert::Infallible>(answer(&req, &node)) }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .keep_alive(false)
        .max_buf_size(8192)
        .serve_connection(TokioIo::new(sock), service);
    let _ = tokio::time::timeout(REQUEST_DEADLINE, conn).await;
}

fn answer(req: &Request<hyper::body::Incoming>, node: &Node) -> Response<Full<Bytes>> {
    let (status, kind, body) = match route(req.method(), req.uri().path()) {
        Route::Metrics => (StatusCode::OK, CONTENT_TYPE, render(node)),
        // Says which process answers, so that a launcher can tell its own daemon from
        // another one holding the address.
        Route::Health => (
            StatusCode::OK,
            "text/plain",
            format!("ok pid {}\n", std::process::id()),
        ),
        Route::NotFound => (StatusCode::NOT_FOUND, "text/plain", "not found\n".into()),
        Route::WrongMethod => (
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "only GET\n".into(),
        ),
    };
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, header::HeaderValue::from_static(kind));
    if status == StatusCode::METHOD_NOT_ALLOWED {
        resp.headers_mut()
            .insert(header::ALLOW, header::HeaderValue::from_static("GET"));
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::{Method, Route, route};

    #[test]
    fn paths_match_exactly() {
        assert_eq!(route(&Method::GET, "/metrics"), Route::Metrics);
        assert_eq!(route(&Method::GET, "/health"), Route::Health);
        assert_eq!(route(&Method::GET, "/metricsX"), Route::NotFound);
        assert_eq!(route(&Method::GET, "/metrics/"), Route::NotFound);
        assert_eq!(route(&Method::POST, "/metrics"), Route::WrongMethod);
    }
}

//! `/metrics` over HTTP (`--metrics-addr`, loopback by default): a small HTTP/1.1 server
//! that, on each scrape, asks the agent for a [`Scrape`] through the closure it was given,
//! brings the registry up to it and answers with the text exposition. It knows nothing
//! of the agent but that closure.

use std::{convert::Infallible, io, net::SocketAddr, sync::Arc};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode, body::Incoming, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::export::metrics::{Metrics, Scrape};

/// Default `--metrics-addr`: loopback only, Prometheus' exporter port range.
pub const DEFAULT_METRICS_ADDR: &str = "127.0.0.1:9469";

/// Content type of the Prometheus text format.
const TEXT_FORMAT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// What the server calls to read the agent, once per scrape (blocking: map reads).
pub type ScrapeFn = Arc<dyn Fn() -> Scrape + Send + Sync>;

/// Binds `--metrics-addr`.
pub async fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

/// Serves `/metrics` on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>, scrape: ScrapeFn) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(conn) => conn,
            Err(e) => {
                log::warn!("metrics: accept: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let (metrics, scrape) = (Arc::clone(&metrics), Arc::clone(&scrape));
        tokio::spawn(async move {
            let service = service_fn(move |req| respond(req, Arc::clone(&metrics), Arc::clone(&scrape)));
            if let Err(e) = http1::Builder::new().serve_connection(TokioIo::new(stream), service).await {
                log::debug!("metrics: connection from {peer}: {e}");
            }
        });
    }
}

async fn respond(
    req: Request<Incoming>,
    metrics: Arc<Metrics>,
    scrape: ScrapeFn,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let reply = |status: StatusCode, body: Vec<u8>, content_type: &str| {
        let mut response = Response::new(Full::new(Bytes::from(body)));
        *response.status_mut() = status;
        if let Ok(v) = content_type.parse() {
            response.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
        }
        Ok(response)
    };
    match (req.method(), req.uri().path()) {
        (&Method::GET | &Method::HEAD, "/metrics") => {
            let body = tokio::task::spawn_blocking(move || {
                metrics.update(&scrape());
                metrics.render()
            })
            .await;
            match body {
                Ok(body) => reply(StatusCode::OK, body, TEXT_FORMAT),
                Err(e) => reply(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n").into_bytes(), "text/plain"),
            }
        }
        (&Method::GET, "/") => {
            reply(StatusCode::OK, b"backplane agent: metrics at /metrics\n".to_vec(), "text/plain; charset=utf-8")
        }
        _ => reply(StatusCode::NOT_FOUND, b"not found: try /metrics\n".to_vec(), "text/plain; charset=utf-8"),
    }
}

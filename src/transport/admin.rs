//! The admin HTTP endpoint: `/metrics` in the Prometheus text format, on its own port so that
//! it is never exposed through the gRPC Service or the mesh's gRPC routes.

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use prometheus_client::encoding::text::encode;
use prometheus_client::registry::Registry;

use crate::transport::connection::Listener;

/// OpenMetrics text, which Prometheus negotiates and parses.
const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// How long a client has to send a request's headers, counted from when the connection is
/// ready for one (including a kept-alive connection between scrapes): a scrape sends its
/// headers at once, so 5 s only ever cuts off a stalled or idle client.
pub const HEADER_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Serves `/metrics` from `registry` on `listener` until the process ends, over HTTP/1 (what
/// Prometheus speaks), each connection bounded by [`HEADER_READ_TIMEOUT`].
pub async fn serve(mut listener: Listener, registry: Registry) {
    let app = Router::new()
        .route("/metrics", get(metrics))
        .with_state(Arc::new(registry));
    loop {
        let (connection, _) = listener.accept().await;
        let service = TowerToHyperService::new(app.clone());
        tokio::spawn(async move {
            let mut http = hyper::server::conn::http1::Builder::new();
            http.timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT);
            // A connection's end (closed, timed out, malformed) concerns that client alone.
            if let Err(err) = http
                .serve_connection(TokioIo::new(connection), service)
                .await
            {
                tracing::debug!(error = %err, "admin connection ended");
            }
        });
    }
}

async fn metrics(State(registry): State<Arc<Registry>>) -> impl IntoResponse {
    let mut body = String::new();
    match encode(&mut body, &registry) {
        Ok(()) => (StatusCode::OK, [(header::CONTENT_TYPE, CONTENT_TYPE)], body),
        Err(_) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            [(header::CONTENT_TYPE, "text/plain")],
            "metrics could not be encoded".to_owned(),
        ),
    }
}

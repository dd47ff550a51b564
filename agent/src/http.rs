//! /metrics and /healthz.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use axum::{Router, extract::State, http::StatusCode, response::IntoResponse, routing::get};
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::metrics::Metrics;

/// State shared by the window loop and the HTTP server.
pub struct Health {
    pub metrics: Metrics,
    last_window_unix_ms: AtomicU64,
    max_window_age: Duration,
}

impl Health {
    pub fn new(metrics: Metrics, interval: Duration) -> Self {
        // Healthy while windows keep coming: allow a few missed ones before reporting failure.
        Self {
            metrics,
            last_window_unix_ms: AtomicU64::new(now_ms()),
            max_window_age: interval * 3 + Duration::from_secs(5),
        }
    }

    pub fn window_done(&self) {
        self.last_window_unix_ms.store(now_ms(), Ordering::Relaxed);
    }

    fn healthy(&self) -> bool {
        let age = now_ms().saturating_sub(self.last_window_unix_ms.load(Ordering::Relaxed));
        u128::from(age) <= self.max_window_age.as_millis()
    }
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

async fn metrics(State(health): State<Arc<Health>>) -> impl IntoResponse {
    match health.metrics.encode() {
        Ok(body) => (
            StatusCode::OK,
            [(
                "content-type",
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            body,
        ),
        Err(_) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            [("content-type", "text/plain")],
            "encoding failed\n".to_owned(),
        ),
    }
}

async fn healthz(State(health): State<Arc<Health>>) -> impl IntoResponse {
    if health.healthy() {
        (StatusCode::OK, "ok\n")
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "no window summary within the expected time\n",
        )
    }
}

/// Serves until `shutdown` is cancelled.
pub async fn serve(addr: SocketAddr, health: Arc<Health>, shutdown: CancellationToken) -> std::io::Result<()> {
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .with_state(health);
    let listener = tokio::net::TcpListener::bind(addr).await?;
    info!(%addr, "serving /metrics and /healthz");
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
}

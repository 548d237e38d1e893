//! `/metrics` and `/healthz`.

use std::sync::{Arc, Mutex};

use axum::{
    Router,
    http::{StatusCode, header::CONTENT_TYPE},
    routing::get,
};
use prometheus_client::registry::Registry;

use super::lock;
use crate::metrics::{self, Status};

/// Serves `/metrics` and `/healthz` until the agent stops.
pub(super) async fn serve(
    listener: std::net::TcpListener,
    registry: Registry,
    status: Arc<Mutex<Status>>,
) -> anyhow::Result<()> {
    listener.set_nonblocking(true)?;
    let listener = tokio::net::TcpListener::from_std(listener)?;
    let registry = Arc::new(registry);
    let app = Router::new()
        .route(
            "/metrics",
            get(move || {
                let registry = Arc::clone(&registry);
                async move {
                    (
                        [(CONTENT_TYPE, metrics::CONTENT_TYPE)],
                        metrics::render(&registry),
                    )
                }
            }),
        )
        .route(
            "/healthz",
            get(move || {
                let unfiltered = lock(&status).unfiltered.clone();
                async move { health(&unfiltered) }
            }),
        );
    axum::serve(listener, app).await?;
    Ok(())
}

/// `ok` while every interface is filtered; 503 naming those that are not.
fn health(unfiltered: &std::collections::BTreeSet<String>) -> (StatusCode, String) {
    if unfiltered.is_empty() {
        return (StatusCode::OK, "ok\n".to_owned());
    }
    let names: Vec<&str> = unfiltered.iter().map(String::as_str).collect();
    let text = format!("unfiltered: {}\n", names.join(", "));
    (StatusCode::SERVICE_UNAVAILABLE, text)
}

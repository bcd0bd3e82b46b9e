//! Set-up shared by the in-process test files (`api.rs`, `pipeline.rs`): the embedded backends
//! in a temp dir, and the API on a free port.

// Each test file uses the part it needs.
#![allow(dead_code)]

use std::sync::Arc;

use sluice_api::AppState;
use sluice_index::{EmbeddedIndex, EmbeddedIndexConfig};
use sluice_registry::SqliteRegistry;

/// A registry in `dir` with its first org and key, as `sluice serve` creates them.
pub async fn registry_with_key(dir: &std::path::Path) -> (Arc<SqliteRegistry>, String) {
    let registry = Arc::new(
        SqliteRegistry::open(&dir.join("registry.db"))
            .await
            .expect("registry"),
    );
    let key = sluice_registry::bootstrap(registry.as_ref())
        .await
        .expect("bootstrap")
        .expect("first key");
    (registry, key)
}

/// An embedded index under `dir/index`, with one indexing thread.
pub fn embedded_index(dir: &std::path::Path) -> Arc<EmbeddedIndex> {
    let mut config = EmbeddedIndexConfig::new(dir.join("index"));
    config.threads = 1;
    Arc::new(EmbeddedIndex::open(config).expect("index"))
}

/// Serves the API for `state` on a free port.
pub async fn spawn_api(state: AppState) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let app = sluice_api::router(state);
    tokio::spawn(async move { axum::serve(listener, app).await });
    addr
}

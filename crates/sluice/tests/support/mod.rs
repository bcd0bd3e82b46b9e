//! Set-up shared by the test files: the embedded backends in a temp dir, the API on a free
//! port (in process), and the `sluice` binary as a child process.

// Each test file uses the part it needs.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

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

pub fn sluice(data_dir: &Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_sluice"));
    cmd.arg("--data-dir").arg(data_dir).env("RUST_LOG", "warn");
    cmd
}

pub fn run_ok(cmd: &mut Command) -> String {
    let out = cmd.output().expect("sluice runs");
    assert!(
        out.status.success(),
        "{:?} failed: {}",
        cmd,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 stdout")
}

pub fn run_err(cmd: &mut Command) -> String {
    let out = cmd.output().expect("sluice runs");
    assert!(!out.status.success(), "{cmd:?} should fail");
    String::from_utf8(out.stderr).expect("utf-8 stderr")
}

/// A `sluice serve` child process.
pub struct Server {
    pub child: Child,
    pub addr: SocketAddr,
    /// The key printed in the banner on first start.
    pub first_key: Option<String>,
}

impl Server {
    pub fn start(data_dir: &Path, extra: &[&str]) -> Server {
        let mut child = sluice(data_dir)
            .arg("serve")
            .args(["--listen", "127.0.0.1:0"])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::from(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(data_dir.with_extension("stderr.log"))
                    .expect("stderr file"),
            ))
            .spawn()
            .expect("spawn sluice serve");
        let stdout = child.stdout.take().expect("piped stdout");
        let mut lines = BufReader::new(stdout).lines();
        let mut addr = None;
        let mut first_key = None;
        for line in lines.by_ref() {
            let line = line.expect("banner line");
            if let Some(rest) = line.split("api key: ").nth(1) {
                first_key = Some(rest.trim().to_string());
            }
            if let Some(rest) = line.split("listening on http://").nth(1) {
                addr = Some(rest.trim().parse().expect("listen address"));
                break;
            }
        }
        // Keep draining stdout so the child never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        Server {
            child,
            addr: addr.expect("banner has the address"),
            first_key,
        }
    }

    pub fn sigterm(&mut self) -> std::process::ExitStatus {
        let status = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status()
            .expect("kill");
        assert!(status.success());
        wait_timeout(&mut self.child, Duration::from_secs(30)).expect("exits after SIGTERM")
    }

    pub fn sigkill(&mut self) {
        self.child.kill().expect("SIGKILL");
        let _ = self.child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn wait_timeout(child: &mut Child, timeout: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

//! Test support behind the `testing` feature, for this and other crates' tests: a
//! `redis-server` of the test's own on a free port, to restart or stop at will.

use std::process::{Child, Command, Stdio};
use std::sync::LazyLock;
use std::time::{Duration, Instant};

/// The test run's shared Redis: `SLUICE_TEST_REDIS` (set by `scripts/test`, which starts that
/// server, see `scripts/services`), or the machine's default `redis://127.0.0.1:6379`.
pub fn redis_url() -> &'static str {
    static URL: LazyLock<String> = LazyLock::new(|| {
        std::env::var("SLUICE_TEST_REDIS").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_string())
    });
    &URL
}

/// A redis-server of our own, keeping nothing on disk; killed on drop.
pub struct OwnRedis {
    child: Child,
    pub port: u16,
}

impl OwnRedis {
    /// A server on a free port.
    pub fn start() -> OwnRedis {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        OwnRedis::start_on(port)
    }

    /// A server on `port` (again, after a `stop`).
    pub fn start_on(port: u16) -> OwnRedis {
        let child = Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server runs");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "redis-server did not listen on {port}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        OwnRedis { child, port }
    }

    /// `redis://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

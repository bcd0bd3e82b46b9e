//! A real Kafka-protocol broker for tests: the `tansu` binary (installed into `.venv` by
//! `scripts/install-test-tools`, or named by `SLUICE_TANSU`), started on a free port with memory
//! storage and killed on drop. Behind the `testing` feature, for this and other crates' tests.

use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running tansu broker.
pub struct Tansu {
    child: Child,
    /// `127.0.0.1:PORT`, for `bootstrap.servers`.
    pub addr: String,
}

impl Tansu {
    /// The tansu binary: `SLUICE_TANSU`, else the workspace's `.venv/bin/tansu`.
    pub fn binary() -> String {
        std::env::var("SLUICE_TANSU").unwrap_or_else(|_| {
            concat!(env!("CARGO_MANIFEST_DIR"), "/../../.venv/bin/tansu").to_string()
        })
    }

    /// Starts a broker and waits until it listens. Panics (it is for tests) when it cannot.
    pub fn start() -> Tansu {
        let tansu = Tansu::binary();
        assert!(
            std::path::Path::new(&tansu).exists(),
            "no tansu broker at {tansu}: run ./scripts/test (it installs it), or set SLUICE_TANSU"
        );
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let url = format!("tcp://127.0.0.1:{port}");
        let child = Command::new(&tansu)
            .args([
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &url,
            ])
            .args(["--storage-engine", "memory://tansu/"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start tansu");
        let addr = format!("127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(&addr).is_err() {
            assert!(
                Instant::now() < deadline,
                "tansu did not listen on {addr} within 20 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Tansu { child, addr }
    }

    /// The broker's process id (to freeze it with SIGSTOP in chaos tests).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Tansu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

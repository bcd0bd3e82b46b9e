//! One OpenSearch 2.19 node (`scripts/engine.d/OpenSearchNode.java`), single-node discovery.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Mutex;
use std::time::Duration;

use crate::node::{Node, wait_until};

/// A running node. Dropping it stops it and removes its data.
pub struct OpenSearch {
    /// `http://127.0.0.1:PORT`.
    pub url: String,
    port: u16,
    node: Mutex<Node>,
    _dir: tempfile::TempDir,
}

impl OpenSearch {
    /// A node with the defaults of `OpenSearchNode.java`.
    pub fn start() -> OpenSearch {
        OpenSearch::start_with(&[])
    }

    /// A node with extra node `settings` (`key=value`, e.g. `thread_pool.write.queue_size=2`),
    /// once its cluster health is yellow or green.
    pub fn start_with(settings: &[&str]) -> OpenSearch {
        let dir = tempfile::Builder::new()
            .prefix("sluice-opensearch.")
            .tempdir()
            .expect("tempdir");
        let port = crate::free_port();
        let mut args: Vec<String> = vec![
            "opensearch-node".into(),
            "--dir".into(),
            dir.path().to_string_lossy().into_owned(),
            "--http-port".into(),
            port.to_string(),
            "--transport-port".into(),
            crate::free_port().to_string(),
        ];
        for s in settings {
            args.push("--set".into());
            args.push(s.to_string());
        }
        let node = Node::start("opensearch", args, dir.path());
        let search = OpenSearch {
            url: format!("http://127.0.0.1:{port}"),
            port,
            node: Mutex::new(node),
            _dir: dir,
        };
        search.wait_ready();
        search
    }

    fn wait_ready(&self) {
        wait_until(
            Duration::from_secs(180),
            || {
                self.node
                    .lock()
                    .expect("node")
                    .assert_alive("its cluster health");
                self.get("/_cluster/health?wait_for_status=yellow&timeout=1s")
                    .is_some_and(|(status, _)| status == 200)
            },
            || {
                format!(
                    "OpenSearch at {} was not yellow within 180 s{}",
                    self.url,
                    self.node.lock().expect("node").log_tail()
                )
            },
        );
    }

    /// A plain `GET path` on the node: its status and body, or None when it does not answer.
    /// (A test's own checks use a real client; this is the readiness probe.)
    pub fn get(&self, path: &str) -> Option<(u16, String)> {
        let mut stream = TcpStream::connect(("127.0.0.1", self.port)).ok()?;
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .ok()?;
        write!(
            stream,
            "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
        )
        .ok()?;
        let mut response = String::new();
        stream.read_to_string(&mut response).ok()?;
        let status = response.split(' ').nth(1)?.parse().ok()?;
        let body = response
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default();
        Some((status, body))
    }

    /// The JVM's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.node.lock().expect("node").pid()
    }

    /// SIGKILLs the node.
    pub fn kill(&self) {
        self.node.lock().expect("node").kill();
    }

    /// SIGSTOPs the node: connections stay open, nothing is answered.
    pub fn freeze(&self) {
        self.node.lock().expect("node").freeze();
    }

    /// SIGCONTs it after `freeze`.
    pub fn thaw(&self) {
        self.node.lock().expect("node").thaw();
    }

    /// Starts the node again on its data dir, and waits until it is yellow.
    pub fn restart(&self) {
        self.node.lock().expect("node").restart();
        self.wait_ready();
    }

    /// The engine log's last lines.
    pub fn log(&self) -> String {
        self.node.lock().expect("node").log_tail()
    }
}

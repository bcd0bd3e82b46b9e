//! Real engines for tests and benchmarks: an Apache Kafka 4 cluster (KRaft, one or more
//! combined broker+controller nodes) and an OpenSearch 2.19 node, each run from its Maven
//! Central jars by `scripts/engine` on free loopback ports with a temporary data dir.
//!
//! Every node is a `scripts/engine kafka-node|opensearch-node` process whose standard input is
//! a pipe held here: when this process exits, however it exits, the pipe closes and the script
//! kills its JVM. So an engine kept in a `static` for a whole test binary (start each engine
//! once per binary) is never left behind, and a dropped one is stopped at once.
//!
//! Faults are real signals to the JVM: `kill` (SIGKILL), `freeze`/`thaw` (SIGSTOP/SIGCONT),
//! `terminate` (SIGTERM, a clean shutdown), and `restart` on the same data dir.
//!
//! Anything that goes wrong panics (this is for tests) with the engine's own log: an engine
//! that cannot start fails its test with the reason, it never skips.

mod kafka;
mod node;
mod opensearch;

pub use kafka::Kafka;
pub use opensearch::OpenSearch;

/// A free loopback TCP port (bound and released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// `scripts/engine` of this workspace.
fn engine_script() -> String {
    concat!(env!("CARGO_MANIFEST_DIR"), "/../../scripts/engine").to_string()
}

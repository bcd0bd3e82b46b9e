//! The `sluice` binary's library half: everything `main.rs` glues together, public so the
//! integration tests drive the same code.
//!
//! Layout:
//! - `config`: defaults < TOML file < `SLUICE_*` env < flags; the backends, typed.
//! - `backends`: opens the log, dead-letter and actions logs, triggers, dedup store, index and
//!   registry the configuration names.
//! - `serve`: `sluice serve|api|ingest`: the API (behind the spill bridge), the pipeline, or both.
//! - `admin`: `sluice orgs|keys|users`, on the registry.
//! - `admin_socket`: the Unix socket a server holding embedded logs serves `sluice dlq` on.
//! - `buffer`: `sluice buffer status`, the API's spill buffer.
//! - `dlq`: `sluice dlq list|show|replay`, the dead letters.
//! - `bench`: `sluice bench`, the load generator.
//! - `client`: a one-connection HTTP/1.1 client used by `bench` and the tests.

pub mod admin;
pub mod admin_socket;
pub mod backends;
pub mod bench;
pub mod buffer;
pub mod client;
pub mod config;
pub mod dlq;
pub mod serve;

//! The `sluice` binary's library half: everything `main.rs` glues together, public so the
//! integration tests drive the same code.
//!
//! Layout:
//! - `config`: defaults < TOML file < `SLUICE_*` env < flags.
//! - `serve`: `sluice serve`, the embedded deployment in one process.
//! - `admin`: `sluice orgs|keys|users`, on the registry.
//! - `bench`: `sluice bench`, the load generator.
//! - `client`: a one-connection HTTP/1.1 client used by `bench` and the tests.

pub mod admin;
pub mod bench;
pub mod client;
pub mod config;
pub mod serve;

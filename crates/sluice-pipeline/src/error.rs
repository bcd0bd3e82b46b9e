//! The failure that stops the pipeline or the dispatcher, for every module that ends one.

use sluice_log::LogError;

/// A failure that stops the pipeline: a bug or a broken invariant (SPEC §6 "unknown").
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error("cannot join consumer group {group:?}: {source}")]
    Subscribe { group: String, source: LogError },
    #[error("consumer group {group:?} failed: {source}")]
    Consumer { group: String, source: LogError },
    #[error("partition {partition}, offsets {first}..={last}: {message}")]
    Stream {
        partition: u32,
        first: u64,
        last: u64,
        message: String,
    },
    #[error("a partition task panicked: {0}")]
    Panicked(String),
    #[error(
        "consumer group {group:?}: the membership ended {rejoins} times in a row within moments of joining (is another node running with the same instance id?): {source}"
    )]
    Rejoins {
        group: String,
        rejoins: u32,
        source: LogError,
    },
}

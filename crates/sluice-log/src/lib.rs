//! The partitioned log every message goes through between the API and the pipeline.
//!
//! The `Log` trait is the whole contract, with two sides:
//! - producer: `append` a request's records and get, once they are all durable, each one's
//!   partition and offset. Records with the same key keep their order.
//! - consumer: `subscribe` as a consumer group and get a `PartitionStream` per assigned
//!   partition, which yields records strictly in offset order and commits the group's position.
//!
//! `embedded` implements it on local disk (fjall); `kafka` on a Kafka cluster, with the same
//! guarantees: partition = Kafka's murmur2 partitioner on the key,
//! acknowledgement only after durability (`acks=all`), commits as "next offset to read".

use async_trait::async_trait;
use bytes::Bytes;

pub mod embedded;
pub mod kafka;

pub use embedded::{EmbeddedLog, EmbeddedLogConfig, LogStats};
pub use kafka::{KafkaLog, KafkaLogConfig};

/// A record to append.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Partition key: `<org>:<userKey>`.
    pub key: Vec<u8>,
    /// The JSON log value (SPEC §5).
    pub value: Vec<u8>,
    /// Unix milliseconds, used by age-based retention.
    pub timestamp_ms: i64,
}

/// Where an appended record landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ack {
    pub partition: u32,
    pub offset: u64,
}

/// A record read back from the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogRecord {
    pub partition: u32,
    pub offset: u64,
    pub timestamp_ms: i64,
    pub key: Bytes,
    pub value: Bytes,
}

/// What can go wrong at the log boundary.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LogError {
    #[error("log storage error at {path}: {message}")]
    Storage { path: String, message: String },
    #[error("{path} is in use by another process (is a sluice server running on this data dir?)")]
    Locked { path: String },
    #[error("the log is closed")]
    Closed,
    #[error("the log did not acknowledge within {0:?}")]
    Timeout(std::time::Duration),
    #[error("partition {partition} does not exist: the log has {partitions} partitions")]
    NoSuchPartition { partition: u32, partitions: u32 },
    #[error("cannot commit offset {offset} on partition {partition}: the log ends at {end}")]
    CommitBeyondEnd {
        partition: u32,
        offset: u64,
        end: u64,
    },
    #[error("consumer group {0:?} is already subscribed in this process")]
    GroupBusy(String),
    #[error("invalid log configuration: {0}")]
    Config(String),
    #[error("kafka ({brokers}): {message}")]
    Broker { brokers: String, message: String },
    #[error("partition {0} was revoked from this consumer: it can no longer commit")]
    Revoked(u32),
    #[error("the log broke an invariant: {0}")]
    Unexpected(String),
}

/// Trying again later may succeed for these (the API answers 503 + Retry-After).
impl sluice_model::Recoverable for LogError {
    fn is_recoverable(&self) -> bool {
        matches!(
            self,
            LogError::Storage { .. }
                | LogError::Timeout(_)
                | LogError::Closed
                | LogError::Broker { .. }
        )
    }
}

/// The log: producer and consumer sides. See the crate docs for the guarantees.
#[async_trait]
pub trait Log: Send + Sync + 'static {
    /// Number of partitions.
    fn partitions(&self) -> u32;

    /// Appends `records`, returning once every one of them is durable, with their positions in
    /// input order. Records with equal keys land in one partition in input order.
    ///
    /// No gaps: a record is written only after every record given earlier for its partition
    /// (by this call or an earlier one) was written. A caller that stops waiting (a dropped
    /// future, a timeout) may still see its records written later, in that order; whatever it
    /// sends again lands behind them. So a retry duplicates (dedup drops the copies) but never
    /// puts a user's later message ahead of an earlier one.
    async fn append(&self, records: Vec<Record>) -> Result<Vec<Ack>, LogError>;

    /// Joins consumer group `group`; partitions are handed out through the subscription.
    async fn subscribe(&self, group: &str) -> Result<Box<dyn Subscription>, LogError>;

    /// Whether the log can currently accept appends.
    fn is_healthy(&self) -> bool;

    /// Reads up to `max` stored records of `partition` from offset `from` on, in offset order,
    /// outside any consumer group (for inspection: `sluice dlq`). Empty at the end.
    async fn read(
        &self,
        partition: u32,
        from: u64,
        max: usize,
    ) -> Result<Vec<LogRecord>, LogError> {
        let _ = (partition, from, max);
        Err(LogError::Config(
            "this log cannot be read outside a consumer group".into(),
        ))
    }

    /// Each partition's end: the offset the next appended record will get (for lag: end minus
    /// the group's committed offset).
    async fn end_offsets(&self) -> Result<Vec<u64>, LogError> {
        Err(LogError::Config(
            "this log does not report its partitions' end offsets".into(),
        ))
    }

    /// One partition's end (`end_offsets` of it).
    async fn end_offset(&self, partition: u32) -> Result<u64, LogError> {
        let ends = self.end_offsets().await?;
        ends.get(partition as usize)
            .copied()
            .ok_or(LogError::NoSuchPartition {
                partition,
                partitions: ends.len() as u32,
            })
    }

    /// Deletes every record of `partition` before `offset`, which must not be past the
    /// partition's end (`sluice dlq purge`): the embedded log drops whole chunks (every chunk
    /// written before `offset` was taken as the end lies wholly before it), Kafka runs
    /// `DeleteRecords`. Offsets are never reused.
    async fn delete_before(&self, partition: u32, offset: u64) -> Result<(), LogError> {
        let _ = (partition, offset);
        Err(LogError::Config("this log cannot delete records".into()))
    }

    /// Stops accepting appends, finishes what was queued, and releases resources.
    async fn close(&self) -> Result<(), LogError>;
}

/// A change in which partitions this consumer owns.
pub enum Assignment {
    Assigned(Box<dyn PartitionStream>),
    /// The partition's stream must finish or abandon its batch, commit, and be dropped: the
    /// log waits for that (within a timeout) before handing the partition to another member.
    Revoked(u32),
    /// The membership ended on an error; no further assignment follows.
    Failed(LogError),
}

/// A consumer group membership.
#[async_trait]
pub trait Subscription: Send {
    /// The next assignment change, or `None` once the subscription has ended.
    async fn next(&mut self) -> Option<Assignment>;
}

/// One owned partition, read strictly in offset order.
#[async_trait]
pub trait PartitionStream: Send {
    fn partition(&self) -> u32;

    /// Offset of the next record `next_batch` will return.
    fn position(&self) -> u64;

    /// Waits until at least one record is available, then returns up to `max` records in offset
    /// order. Cancel-safe: if the future is dropped, no record is skipped.
    async fn next_batch(&mut self, max: usize) -> Result<Vec<LogRecord>, LogError>;

    /// Commits the group's position: `next_offset` is the first offset not yet processed.
    async fn commit(&mut self, next_offset: u64) -> Result<(), LogError>;
}

//! The batch stage (SPEC §6 step 2): up to `max_records` records, or whatever arrived within
//! `timeout` of the first record of the batch, whichever comes first.
//!
//! Waiting for the first record has no limit (an idle partition produces no empty batches);
//! the window starts when the first record arrives, so a lone record waits at most `timeout`.

use std::time::Duration;

use sluice_log::{LogError, LogRecord, PartitionStream};
use tokio::time::Instant;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchConfig {
    pub max_records: usize,
    pub timeout: Duration,
}

impl Default for BatchConfig {
    /// Iterable's numbers: 5000 records or 250 ms.
    fn default() -> Self {
        BatchConfig {
            max_records: 5000,
            timeout: Duration::from_millis(250),
        }
    }
}

/// Collects the next batch from `source`, in offset order.
///
/// An error after some records were collected returns those records; the error comes back
/// from the next call (the stream's position is past the records returned, so none is lost).
pub async fn next_batch(
    source: &mut dyn PartitionStream,
    config: &BatchConfig,
) -> Result<Vec<LogRecord>, LogError> {
    let mut batcher = Batcher::new(*config);
    batcher.fill(source).await?;
    Ok(batcher.take())
}

/// The batch stage as an accumulator that survives cancellation: [`Batcher::fill`] pulls
/// records into the pending batch until it is complete, and a `fill` future dropped halfway
/// keeps what it pulled (and the window it started), so the next `fill` goes on where it
/// stopped. The pipeline reads a partition's next batch while the batch before it is written,
/// and drops that read when the write ends first.
#[derive(Debug)]
pub struct Batcher {
    config: BatchConfig,
    pending: Vec<LogRecord>,
    /// When the window of the pending batch closes: set by its first record.
    deadline: Option<Instant>,
}

impl Batcher {
    pub fn new(config: BatchConfig) -> Self {
        Batcher {
            config,
            pending: Vec::new(),
            deadline: None,
        }
    }

    /// Waits until the pending batch is complete: `max_records` records, or at least one and
    /// the window since the first closed. Cancel-safe.
    ///
    /// An error with nothing pending is returned; with records pending it completes the
    /// batch early, and the stream gives the error again to the `fill` after `take`.
    pub async fn fill(&mut self, source: &mut dyn PartitionStream) -> Result<(), LogError> {
        let max = self.config.max_records.max(1);
        while self.pending.len() < max {
            let Some(deadline) = self.deadline else {
                let first = source.next_batch(max).await?;
                if !first.is_empty() {
                    self.pending.extend(first);
                    self.deadline = Some(Instant::now() + self.config.timeout);
                }
                continue;
            };
            match tokio::time::timeout_at(deadline, source.next_batch(max - self.pending.len()))
                .await
            {
                Ok(Ok(more)) => self.pending.extend(more),
                Ok(Err(_)) | Err(_) => break,
            }
        }
        Ok(())
    }

    /// The pending records (the complete batch once `fill` returned).
    pub fn pending(&self) -> &[LogRecord] {
        &self.pending
    }

    /// Takes the pending batch; the next `fill` starts a new one.
    pub fn take(&mut self) -> Vec<LogRecord> {
        self.deadline = None;
        std::mem::take(&mut self.pending)
    }

    /// Takes the first `n` pending records: the batch cut short (a forget starts a batch of
    /// its own). The rest stay pending in the window they arrived in, so the next `fill`
    /// completes at once unless there is room and time left.
    pub fn take_first(&mut self, n: usize) -> Vec<LogRecord> {
        if n >= self.pending.len() {
            return self.take();
        }
        let rest = self.pending.split_off(n);
        std::mem::replace(&mut self.pending, rest)
    }
}

/// The record at `offset` in a batch (offsets ascend; Kafka's may have gaps).
pub(crate) fn record_at(records: &[LogRecord], offset: u64) -> Option<&LogRecord> {
    records
        .binary_search_by_key(&offset, |r| r.offset)
        .ok()
        .map(|i| &records[i])
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use tokio::sync::mpsc;

    /// A partition fed by the test through a channel; `next_batch` behaves like the log's:
    /// waits for at least one record, then returns what is there (cancel-safe).
    struct ChannelPartition {
        records: mpsc::UnboundedReceiver<LogRecord>,
        position: u64,
    }

    #[async_trait::async_trait]
    impl PartitionStream for ChannelPartition {
        fn partition(&self) -> u32 {
            0
        }
        fn position(&self) -> u64 {
            self.position
        }
        async fn next_batch(&mut self, max: usize) -> Result<Vec<LogRecord>, LogError> {
            let first = self.records.recv().await.ok_or(LogError::Closed)?;
            let mut out = vec![first];
            while out.len() < max {
                match self.records.try_recv() {
                    Ok(r) => out.push(r),
                    Err(_) => break,
                }
            }
            self.position = out.last().map_or(self.position, |r| r.offset + 1);
            Ok(out)
        }
        async fn commit(&mut self, _next_offset: u64) -> Result<(), LogError> {
            Ok(())
        }
    }

    fn record(offset: u64) -> LogRecord {
        LogRecord {
            partition: 0,
            offset,
            timestamp_ms: 0,
            key: Bytes::new(),
            value: Bytes::new(),
        }
    }

    fn partition() -> (mpsc::UnboundedSender<LogRecord>, ChannelPartition) {
        let (tx, rx) = mpsc::unbounded_channel();
        (
            tx,
            ChannelPartition {
                records: rx,
                position: 0,
            },
        )
    }

    fn offsets(batch: &[LogRecord]) -> Vec<u64> {
        batch.iter().map(|r| r.offset).collect()
    }

    #[tokio::test(start_paused = true)]
    async fn a_partial_batch_flushes_when_the_window_closes() {
        let (tx, mut source) = partition();
        for i in 0..3 {
            tx.send(record(i)).expect("send");
        }
        let start = Instant::now();
        let batch = next_batch(&mut source, &BatchConfig::default())
            .await
            .expect("batch");
        assert_eq!(offsets(&batch), [0, 1, 2]);
        assert_eq!(start.elapsed(), Duration::from_millis(250));
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_batch_does_not_wait() {
        let (tx, mut source) = partition();
        for i in 0..10 {
            tx.send(record(i)).expect("send");
        }
        let start = Instant::now();
        let config = BatchConfig {
            max_records: 4,
            timeout: Duration::from_millis(250),
        };
        assert_eq!(
            offsets(&next_batch(&mut source, &config).await.expect("batch")),
            [0, 1, 2, 3]
        );
        assert_eq!(
            offsets(&next_batch(&mut source, &config).await.expect("batch")),
            [4, 5, 6, 7]
        );
        assert_eq!(start.elapsed(), Duration::ZERO);
        let rest = next_batch(&mut source, &config).await.expect("batch");
        assert_eq!(offsets(&rest), [8, 9]);
        assert_eq!(
            start.elapsed(),
            Duration::from_millis(250),
            "the last two waited for the window"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_window_starts_at_the_first_record_and_late_records_go_to_the_next_batch() {
        let (tx, mut source) = partition();
        let producer = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(1000)).await; // idle partition first
            tx.send(record(0)).expect("send");
            tokio::time::sleep(Duration::from_millis(100)).await;
            tx.send(record(1)).expect("send");
            tokio::time::sleep(Duration::from_millis(200)).await; // t = 300 ms after the first
            tx.send(record(2)).expect("send");
            tx
        });
        let start = Instant::now();
        let first = next_batch(&mut source, &BatchConfig::default())
            .await
            .expect("batch");
        assert_eq!(offsets(&first), [0, 1]);
        assert_eq!(start.elapsed(), Duration::from_millis(1250));
        let second = next_batch(&mut source, &BatchConfig::default())
            .await
            .expect("batch");
        assert_eq!(offsets(&second), [2]);
        drop(producer.await.expect("producer"));
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_partition_yields_no_empty_batch() {
        let (_tx, mut source) = partition();
        let waited = tokio::time::timeout(
            Duration::from_secs(3600),
            next_batch(&mut source, &BatchConfig::default()),
        )
        .await;
        assert!(
            waited.is_err(),
            "still waiting after an hour of virtual time"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_fill_dropped_halfway_keeps_its_records_and_its_window() {
        let (tx, mut source) = partition();
        tx.send(record(0)).expect("send");
        let start = Instant::now();
        let mut batcher = Batcher::new(BatchConfig::default());
        // Dropped 100 ms into the window, with record 0 pulled.
        let cut = tokio::time::timeout(Duration::from_millis(100), batcher.fill(&mut source)).await;
        assert!(cut.is_err(), "the window was still open");
        assert_eq!(offsets(batcher.pending()), [0]);
        tx.send(record(1)).expect("send");
        batcher.fill(&mut source).await.expect("fill");
        assert_eq!(
            start.elapsed(),
            Duration::from_millis(250),
            "the window started at record 0, not at the second fill"
        );
        assert_eq!(offsets(&batcher.take()), [0, 1]);
        tx.send(record(2)).expect("send");
        batcher.fill(&mut source).await.expect("fill");
        assert_eq!(offsets(batcher.pending()), [2], "a new batch after take");
    }
}

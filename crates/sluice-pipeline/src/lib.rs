//! The pipeline stages that run per log partition, strictly in offset order (SPEC §6), in
//! the order ARCHITECTURE.md states.
//!
//! Layout:
//! - `validate`: decode each record and check org, ban list and fields; rejects become
//!   dead-letter reasons.
//! - `dead_letter`: the record a refused message becomes in the dead-letter log.
//! - `batch`: collect records from a `PartitionStream` up to a size or a timeout.
//! - `merge`: fold consecutive user updates into one patch per user, and give each event the
//!   user's profile delta as it stood at that event in log order.
//! - `trigger`: `[[triggers]]` rules fire a webhook or append to an actions topic for each
//!   matching event, with the profile as it stood at that event.
//! - `dispatch`: delivers the webhook actions of the actions log, per (rule, user) in order,
//!   retrying per target host, so a down target never holds the pipeline.
//! - `runner`: one task per partition chaining the stages, with retries.
//! - `error`: `PipelineError`, the failure that stops a consumer.
//! - `retry`: exponential backoff with jitter for every recoverable failure.
//! - `stop`: the stop request every task and wait watches.
//! - `group`: consumer-group membership (a task per owned partition, rejoins), for the
//!   pipeline and the dispatcher.
//!
//! Invariant: no stage reorders the records of one partition.

pub mod batch;
pub mod dead_letter;
pub mod dispatch;
mod error;
pub mod forgotten;
pub mod group;
pub mod merge;
mod retry;
pub mod runner;
pub mod stop;
pub mod trigger;
pub mod validate;

pub use dispatch::{DispatchStats, Dispatcher, DispatcherConfig};
pub use error::PipelineError;
pub use runner::{Pipeline, PipelineConfig, PipelineStats};
pub use stop::{Stop, Stopper};
pub use trigger::{Action, Rule, Triggers};

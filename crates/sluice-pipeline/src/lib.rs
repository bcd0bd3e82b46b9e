//! The pipeline stages that run per log partition, strictly in offset order (SPEC §6):
//! validate → batch → dedup → merge → index → mark processed → triggers → commit.
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
//! - `runner`: one task per partition chaining the stages, with retries.
//!
//! Invariant: no stage reorders the records of one partition.

pub mod batch;
pub mod dead_letter;
pub mod merge;
pub mod runner;
pub mod trigger;
pub mod validate;

pub use runner::{Pipeline, PipelineConfig, PipelineError, PipelineStats};
pub use trigger::{Action, Rule, Triggers};

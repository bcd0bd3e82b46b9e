//! The vocabulary every sluice stage shares: what a message is, how it is keyed, and which log
//! partition it lands in.
//!
//! Layout:
//! - `partition`: Kafka's Java default partitioner (murmur2), so sluice and any other Kafka
//!   producer put the same key on the same partition.
//! - `message`: parsing and validating one client item (a user update or an event) into a
//!   `Message`, and turning a `Message` into its log record (key and JSON value, SPEC §5).
//! - `segment`: the Segment HTTP Tracking API calls mapped onto messages.
//! - `sendgrid`: SendGrid Event Webhook events mapped onto messages.
//! - `patch`: a user update as a `Patch` tree, and folding patches (shallow vs deep merge).
//! - `time`: the accepted `createdAt` forms (unix seconds, unix milliseconds, RFC 3339).
//! - `url`: backend URLs as shown in errors and logs (`redacted`: no password).
//! - `Recoverable`: the class of a store error, which decides whether a stage retries it.
//!
//! Invariant: this crate does no I/O. It is pure data so every stage can test against it.

pub mod message;
pub mod partition;
pub mod patch;
pub mod segment;
pub mod sendgrid;
pub mod time;
pub mod url;

pub use message::{
    ItemError, Kind, LogValue, Message, MessageBuilder, UserKey, parse_event, parse_user_update,
};
pub use partition::{murmur2, partition_for_key};
pub use patch::{Op, Patch};

/// The class of a failure at a store's boundary (log, index, dedup store, registry): whether
/// the same call may succeed later (a server down, a timeout, a full disk), so a stage retries
/// it, or not (a wrong setting, a bug), so the stage stops (SPEC §6 "unknown").
pub trait Recoverable {
    fn is_recoverable(&self) -> bool;
}

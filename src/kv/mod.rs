//! The fault-tolerant key/value service (6.824 lab 3): a [`state::KvStore`] replicated by [`crate::rsm`]
//! over Raft. Writes go through the log exactly once per client request; reads use ReadIndex and never
//! touch the log.

pub mod state;

pub use state::{KvCommand, KvOutput, KvQuery, KvStore};

//! Sharded key/value groups (6.824 lab 4B): each group is a Raft group serving the shards the shard
//! controller assigns it, pulling the shards it gains from their previous owners and deleting the ones it
//! gave away once the new owner has them.
//!
//! [`state`] is the replicated state machine (sans-IO, shared by the daemon and the simulator), [`page`]
//! how a shard in transfer is cut into bounded pages, [`migration`] the protocol that moves them;
//! [`service`] serves it to clients (`kv.Kv`) and to other groups (`ShardTransfer`); [`driver`] is the
//! leader's background worker that follows the controllers and moves shards; [`clerk`] is the client
//! library; [`key_to_shard`] is the one mapping from keys to shards that servers and clients agree on.

pub mod clerk;
pub mod driver;
pub mod metrics;
pub mod migration;
pub mod page;
pub mod service;
pub mod state;
pub mod wire;

pub use clerk::ShardClerk;
pub use page::{Cursor, ShardPage, PAGE_BYTES};
pub use state::{
    last_owner, Duty, Settled, ShardCommand, ShardData, ShardId, ShardKv, ShardOutput, ShardQuery,
    Source,
};

/// The shard a key belongs to, out of `shards` (FNV-1a of the key's bytes, modulo the shard count).
/// A stable hash rather than 6.824's first byte, so that keys with a common prefix spread over shards;
/// it must never change, or stored keys would land in the wrong shard.
pub fn key_to_shard(key: &str, shards: usize) -> ShardId {
    if shards == 0 {
        return 0;
    }
    crate::hash::fnv1a(key.as_bytes()) % shards as u64
}

#[cfg(test)]
mod tests;

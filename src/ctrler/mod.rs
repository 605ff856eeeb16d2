//! The shard controller (6.824 lab 4A): a replicated list of numbered configurations that say which
//! replica group serves which shard. Join and Leave rebalance deterministically, as evenly as possible and
//! with the fewest moves; Move pins one shard; Query reads any configuration kept (old ones are dropped
//! once every group has reported passing them).

pub mod addresses;
pub mod admission;
pub mod client;
pub mod rebalance;
pub mod service;
pub mod state;

pub use client::{CtrlerClerk, Fetched};
pub use state::{
    Config, CtrlerAnswer, CtrlerCommand, CtrlerOutput, CtrlerQuery, Gid, Groups, Servers,
    ShardCtrler, DEFAULT_KEEP_CONFIGS, DEFAULT_SHARDS, MAX_SERVERS_PER_GROUP, MAX_SHARDS,
    SERVERS_CHANGED,
};

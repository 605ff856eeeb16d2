//! A deterministic simulator for Raft clusters.
//!
//! Everything that could make a run differ from the next — message delays and drops, timer firings,
//! client behaviour, crashes — is drawn from one seeded RNG and ordered by one event queue with a
//! logical clock, so a seed names exactly one schedule. Tests print their seed when they fail and take
//! `RAFT_SEED` to replay it.
//!
//! - [`net`]: the fault model of 6.824's labrpc (drops, short and long delays, reordering, partitions);
//! - [`storage`]: an in-memory persister with the crash semantics of 6.824's (only what was handed to
//!   storage survives);
//! - [`cluster`]: a cluster of [`crate::raft::RaftCore`]s with the helpers of 6.824's Raft `config.go`
//!   (`one`, `check_one_leader`, `n_committed`, ...) and a safety checker that runs on every step;
//! - [`service`]: a cluster of servers of any replicated service (Raft + rsm + state machine) and its
//!   clerks; [`kv`] specialises it to the KV store with 6.824 kvraft's helpers;
//! - [`clock`]: the event queue and the loop that interleaves events with concurrent actors;
//! - [`seed`]: how tests choose and report seeds.

pub mod clock;
pub mod cluster;
pub mod group;
pub mod kv;
pub mod net;
pub mod raft_net;
pub mod seed;
pub mod service;
pub mod shardkv;
pub mod storage;

pub use clock::Actor;
pub use cluster::{ApplyMode, ClusterOptions, RaftCluster};

//! 6.824 lab 4B (sharded KV) scenarios in the deterministic simulator; see ../shared/scenarios.md §4.
//! Every failure names the seed; `RAFT_SEED=<n>` replays it.

mod common;
mod follower_reads;
mod scenarios;

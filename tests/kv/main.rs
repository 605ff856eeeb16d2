//! The KV scenarios of 6.824 (lab 3A and 3B) on the deterministic simulator. Each server runs the same
//! Raft core, rsm layer and KV store as `kvd`; histories of the concurrent tests are checked for
//! linearizability. A failure prints its seed: rerun with `RAFT_SEED=<seed> cargo nextest run <test>`.

mod common;
mod follower_reads;
mod part_a;
mod part_b;

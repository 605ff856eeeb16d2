//! The Raft scenarios of 6.824 (labs 2A–2D) on the deterministic simulator, plus randomized schedules.
//!
//! Each test is named after its Go original (`TestFigure8Unreliable2C` → `figure8_unreliable`) and keeps
//! its assertions and limits; time is simulated. A failure prints its seed: rerun that exact schedule
//! with `RAFT_SEED=<seed> cargo nextest run <test>`.

mod common;
mod election;
mod follower_reads;
mod late_flush;
mod lease;
mod membership;
mod persistence;
mod randomized;
mod replication;
mod robustness;
mod snapshots;
